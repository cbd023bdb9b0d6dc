"""``--reuse-from``: sections other stores already hold, found by content key and copied instead of computed.

Reuse (``--reuse-from LOCATION``, repeatable, and :data:`lm.options.REUSE_ENV`): before a
step computes a part, :class:`Reuse` looks its content key (:mod:`store.keys`)
up in the stores found at those locations and copies a matching section,
verified, instead (:func:`store.copy.copy_section`); the summary counts the
parts reused per location. Locations, storage options and anything else that
may hold a credential reach the summary, the store and the terminal only
redacted (:func:`store.locations.redact_text` for error messages).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Mapping, Sequence

from lm.options import REUSE_ENV
from store import TeacherStore
from store import keys
from store.format import SectionRef
from store.locations import is_url, redact_url

from .summary import Summary


def split_locations(text: str | None) -> list[str]:
    """The locations of a :data:`REUSE_ENV` value (blank items dropped)."""
    out = []
    for item in (text or "").split(","):
        item = item.strip()
        if "://" in item:
            out.append(item)
        else:
            out.extend(p.strip() for p in item.split(os.pathsep) if p.strip())
    return out


def reuse_locations(given: Iterable[str]) -> list[str]:
    """``--reuse-from`` locations first, then :data:`REUSE_ENV`'s, each once."""
    return list(dict.fromkeys([*map(str, given or ()), *split_locations(os.environ.get(REUSE_ENV))]))


def _protocol(location: str) -> str:
    return location.split("://", 1)[0] if is_url(location) else "file"


def reuse_storage_options(location: str, out: str, storage_options: Mapping | None,
                          reuse_options: Mapping | None) -> dict:
    """fsspec options for a reuse location: the ``--reuse-option`` ones when given, else the ``--storage-option``
    ones where the location has ``--out``'s protocol (an S3 endpoint means nothing to an HTTP server), else none."""
    if reuse_options:
        return dict(reuse_options)
    return dict(storage_options or {}) if _protocol(location) == _protocol(out) else {}


class Reuse:
    """The sections other stores hold for this run: found by content key, copied verified, counted.

    Built with the run's store and reuse locations; the stores there are searched once, on the first
    :meth:`take` (a run with nothing to compute never lists them). With no location, :meth:`take` is False.
    """

    def __init__(self, target: TeacherStore, locations: Sequence[str], summary: Summary, *,
                 out: str, storage_options: Mapping | None = None, reuse_options: Mapping | None = None):
        self.target = target
        self.summary = summary
        self.locations = [(loc, reuse_storage_options(loc, out, storage_options, reuse_options))
                          for loc in locations]
        self._index = None

    @classmethod
    def for_run(cls, target: TeacherStore, config, summary: Summary) -> "Reuse":
        """From a command's config: its :class:`lm.options.ReuseOptions` (and :data:`REUSE_ENV`), its
        ``storage_options`` and its ``out``."""
        return cls(target, reuse_locations(config.reuse_from), summary, out=config.out,
                   storage_options=config.storage_options, reuse_options=config.reuse_options)

    def __bool__(self) -> bool:
        return bool(self.locations)

    @property
    def index(self):
        if self._index is None:
            from store.catalog import SectionIndex

            self._index = SectionIndex(self.locations, self.target.key_layout(), exclude=self.target.location).build()
            for seen in self._index.found:
                problems = "; ".join(seen["problems"])
                self.summary.notes.append(
                    f"  reuse: {seen['location']}: {seen['stores']} store(s), {seen['sections']} keyed "
                    f"section(s) usable{'; ' + problems if problems else ''}")
        return self._index

    def take(self, step: str, ref: SectionRef, key: str | None) -> bool:
        """Copy the section with content key ``key`` into ``ref`` of the run's store, if another store has it.

        False when none has it, or when the copy fails its checks (the section is then computed: a note
        says so).
        """
        if not self.locations or not key:
            return False
        found = self.index.find(key)
        if found is None:
            return False
        from store.copy import copy_section

        origin = redact_url(found.store.location)
        try:
            attrs = found.attrs(key)
            if attrs is None:  # changed or removed since its store listed it
                return False
            copy_section(found.store, self.target, found.ref, attrs, to=ref, make_parents=True,
                         extra_attrs={keys.REUSED_ATTR: {"store": origin, "section": found.ref.path},
                                      "reused_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        except Exception as exc:  # noqa: BLE001 - a cache that fails is a part to compute, never a failed run
            self.summary.notes.append(f"  reuse: {ref.path} from {origin} failed ({type(exc).__name__}); "
                                      f"computed instead")
            return False
        self.summary.add_reused(step, found.store.location)
        return True

    def take_parts(self, step: str, sequence_set: str, section: str, parts: Sequence[tuple[str, int]],
                   key_of: Callable[[str, int], str | None], before: Callable[[], None] | None = None) -> list:
        """``parts`` (split, part) whose section could not be reused; ``before()`` runs once, before the first
        copy (to record the pass the copied sections belong to)."""
        if not self.locations:
            return list(parts)
        left, ready = [], False
        for split, part in parts:
            key = key_of(split, part)
            if key and not ready and self.index.find(key) is not None:
                ready = True
                if before is not None:
                    before()
            if not (key and self.take(step, SectionRef(split, part, sequence_set, section), key)):
                left.append((split, part))
        return left
