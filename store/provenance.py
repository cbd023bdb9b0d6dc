"""Provenance as typed records: written once by the passes, read the same way everywhere.

A store's root attributes say where its numbers came from (see
:mod:`store.format`). Writers build these records and store ``to_dict()``;
readers (``store info``, the trainer's pre-flight, resuming runs) call
``from_dict`` and use fields, never guessing at key spellings. The JSON form
is format version 1's, unchanged:

- ``tokenizer``: ``{"name", "hash"}``                           -> :class:`TokenizerRecord`
- ``provenance.dataset`` and ``layout.splits.<s>.dataset``:
  ``{"name", "revision", "kind"[, "fingerprint", counts...]}``  -> :class:`DatasetRecord`
- ``passes.<name>``: ``{"model": {"name", "sha256"}, "dtype", "max_length",
  "top_k", ...}`` (``encode`` has no model)                      -> :class:`PassRecord`

As zarr-python does for its metadata: frozen dataclasses, ``to_dict`` and
``from_dict`` inverse of each other, unknown keys kept (``extra``/``settings``)
so a newer writer's attributes survive a read and write by an older reader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["ModelRecord", "TokenizerRecord", "DatasetRecord", "PassRecord", "read_passes",
           "PASS_ENCODE", "DATASET_IDENTITY"]

PASS_ENCODE = "encode"  # how rows became token ids: max_length, chat template and tokenizer hashes
#: the keys of a dataset record that identify the rows (the others are counts of a run)
DATASET_IDENTITY = ("name", "revision", "kind", "fingerprint")


@dataclass(frozen=True)
class ModelRecord:
    """A model by the name it was given and the sha256 of its weight files' bytes."""

    name: str
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "ModelRecord | None":
        if not isinstance(data, Mapping) or "sha256" not in data:
            return None
        return cls(name=str(data.get("name", "")), sha256=str(data["sha256"]))


@dataclass(frozen=True)
class TokenizerRecord:
    name: str
    hash: str

    def to_dict(self) -> dict:
        return {"name": self.name, "hash": self.hash}

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "TokenizerRecord":
        data = data or {}
        return cls(name=str(data.get("name", "")), hash=str(data.get("hash", "")))


@dataclass(frozen=True)
class DatasetRecord:
    """Where a split's rows came from: ``name``, ``revision`` (file hash, fingerprint or hub revision), ``kind``.

    ``fingerprint`` identifies the rows used; ``counts`` holds what a run
    counted (rows used, skipped and truncated rows by reason).
    """

    name: str | None
    revision: str | None = None
    kind: str | None = None
    fingerprint: str | None = None
    counts: Mapping[str, Any] = field(default_factory=dict)

    def identity(self) -> dict:
        return {k: v for k, v in self.to_dict().items() if k in DATASET_IDENTITY}

    def to_dict(self) -> dict:
        out = {"name": self.name, "revision": self.revision, "kind": self.kind}
        if self.fingerprint is not None:
            out["fingerprint"] = self.fingerprint
        out.update(self.counts)
        return out

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "DatasetRecord | None":
        if not isinstance(data, Mapping):
            return None
        counts = {k: v for k, v in data.items() if k not in DATASET_IDENTITY}
        return cls(name=data.get("name"), revision=data.get("revision"), kind=data.get("kind"),
                   fingerprint=data.get("fingerprint"), counts=counts)


@dataclass(frozen=True)
class PassRecord:
    """What one step of a run depends on: the model that ran it and every setting that changes its numbers.

    ``model`` is None for steps no model computes (``encode``). ``settings``
    holds the rest (``dtype``, ``max_length``, ``top_k``, sampling settings, the
    calibration template, ...), exactly as written.
    """

    model: ModelRecord | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def top_k(self) -> int | None:
        value = self.settings.get("top_k")
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def max_length(self) -> int | None:
        value = self.settings.get("max_length")
        return int(value) if isinstance(value, int) else None

    @property
    def dtype(self) -> str | None:
        return self.settings.get("dtype")

    def to_dict(self) -> dict:
        out = {} if self.model is None else {"model": self.model.to_dict()}
        out.update(self.settings)
        return out

    @classmethod
    def from_dict(cls, data: Mapping | None) -> "PassRecord":
        data = dict(data or {})
        model = ModelRecord.from_dict(data.pop("model", None))
        return cls(model=model, settings=data)


def read_passes(attrs: Mapping) -> dict[str, PassRecord]:
    """The ``passes`` of a store's root attributes, typed."""
    return {str(name): PassRecord.from_dict(record) for name, record in (attrs.get("passes") or {}).items()}
