"""Preference datasets in, clean rows out.

``load_splits`` turns a preference data source into lists of :class:`Row`
(prompt messages + chosen/rejected response text), one list per split, with
bad rows skipped and counted by reason (or, with ``strict=True``, rejected with
a :class:`DataError` that names the source, the row and the field).

Sources
-------
* ``None`` or ``"demo"``: the bundled demo dataset, the files
  ``precompute/demo_data/demo_prefs.<split>.jsonl`` (or ``.jsonl.gz``) shipped in
  the package.
* A local file: ``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz`` (read with
  plain Python, so that rows of different shapes can coexist), ``.parquet``
  and ``.csv`` (read with ``datasets``).  A ``.json`` file may hold a list of
  records, a dict of columns, or a dict of split name -> list of records.  In
  a CSV file a cell holding a JSON list of ``{"role", "content"}`` messages is
  decoded into that list.
* A directory written by ``datasets`` ``save_to_disk`` (a ``Dataset`` or a
  ``DatasetDict``).
* Anything else is taken as a Hugging Face Hub dataset name, optionally
  ``"owner/name:config@revision"``, and passed to ``datasets.load_dataset``.

Splits
------
A named split of the source is used as it is.  A source with one split only,
named ``"train"`` (every single file is such a source), is split
deterministically: ``"test"`` is its LAST ``ceil(test_fraction * n)`` rows
and ``"train"`` the rows before them.  This carving is applied whichever of
the two splits is asked for, so asking for ``("train",)`` alone and
``("test",)`` alone in two separate runs never gives overlapping rows; pass
``test_fraction=0`` to get the whole source as ``"train"`` (``"test"`` is then
unavailable).  ``limit`` keeps the first ``limit`` source rows of each split,
after carving and before skipping.

``Row.index`` is the 0-based position of the row in the loaded split, before
skipping: the example index a store uses, so a split's parts cover
``[0, total_rows)``. ``Row.source_row`` is its position in the source's split
(for a carved ``"test"`` split of a 100-row file, index 0 is source row 90),
which is what error messages name.

Duplicates
----------
Two rows are the same when their prompt messages, chosen and rejected are
equal after parsing (so a string prompt and the same prompt as one user
message are the same).  Within a split, a row equal to an earlier one is
skipped as ``"duplicate_row"``.  In a carved ``"test"`` split, a row equal to
a usable row of the carved ``"train"`` part (all of it, whatever ``limit``) is
skipped as ``"duplicate_of_train"``, so the test split holds no training row;
the train part is read for this whether or not ``"train"`` is requested, so
``("test",)`` alone drops the same rows.  A test row that repeats both counts
as ``"duplicate_of_train"``.  Named splits of a source are not compared.

Errors of the source as a whole
-------------------------------
Raised whether or not ``strict``: a missing or unreadable file; a gzip file
that is truncated, corrupt or not gzip (the message says how many lines were
read); a split with nothing to read, that is with no rows at all, or whose
rows have no column of any field (the message gives the rows read, the skip
counts, the columns seen and a ``--column`` suggestion guessed from them).  A
split whose rows do have the columns but all fail (pairs asked of a file of
prompts) is returned empty, with its skip counts.

Row formats (detected per row)
------------------------------
1. TRL: ``prompt`` (a string, or a list of messages ending with a user turn)
   and ``chosen``/``rejected`` (strings, or message lists: the assistant
   turn(s), of which the final assistant message is the response; a list that
   repeats the prompt messages first has that prefix removed).  A prompt
   string in HH style (``"\\n\\nHuman: ...\\n\\nAssistant:"``) is parsed into
   messages, and the responses of such a row are stripped of surrounding
   whitespace.
2. Implicit prompt: no prompt, ``chosen``/``rejected`` are HH-RLHF transcripts
   (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) or full message lists.  The prompt
   is the shared prefix of turns, each response the final assistant turn.  In
   transcripts, turn text is stripped and consecutive turns of the same
   speaker are merged (joined by a blank line).
3. Prompt only: a prompt and no responses, kept when ``require_pairs=False``
   (for sampling), else skipped as ``"missing_responses"``.

Messages may also use ShareGPT keys (``from``/``value``, roles ``human``,
``gpt``); they are normalised to ``{"role", "content"}`` with roles
``system``/``user``/``assistant``.  A system message is only allowed first.

Skip reasons: ``missing_prompt``, ``missing_responses``, ``missing_chosen``,
``missing_rejected``, ``empty_<field>``, ``non_string_<field>``,
``malformed_<field>``, ``malformed_transcript``, ``identical_responses``,
``invalid_json`` (a JSON-lines line that does not parse, or is not an object),
``invalid_utf8`` (a JSON-lines line that is not UTF-8; the other lines are
read), ``duplicate_row``, ``duplicate_of_train`` (see Duplicates).  With
``strict=True`` each of them is an error naming the row (and, for a line of a
JSON-lines file, the line number).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import re
import zlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

__all__ = [
    "Row",
    "LoadedSplit",
    "DataError",
    "load_splits",
    "dataset_identity",
    "FIELDS",
]

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")
_ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
}
_FILE_SUFFIXES = (".jsonl.gz", ".json.gz", ".jsonl", ".json", ".parquet", ".csv")
_DEMO_NAMES = (None, "demo")
_DEMO_STEM = "demo_prefs"


# --------------------------------------------------------------------------- #
# public types
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Row:
    index: int  # position in the loaded split (0-based): the example index in a store
    prompt: list[dict]
    chosen: str | None
    rejected: str | None
    source_row: int | None = field(default=None, compare=False)  # position in the source, as errors name it

    def to_json(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class LoadedSplit:
    name: str
    rows: list[Row]
    skipped: dict[str, int]
    total_rows: int
    fingerprint: str

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


class DataError(ValueError):
    """A data source, or one row of it, cannot be used.

    Row-level errors read ``"{source}: row {index}: field '{field}': {what}"``;
    the parts are also kept as attributes (``None`` for source-level errors).
    """

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.source = source
        self.row = row
        self.field = field
        self.reason = reason


# --------------------------------------------------------------------------- #
# source resolution
# --------------------------------------------------------------------------- #
class _Broken:
    """Placeholder for a record that could not even be decoded: why (a skip reason) and where."""

    __slots__ = ("reason", "what")

    def __init__(self, reason: str, what: str):
        self.reason = reason
        self.what = what


@dataclass
class _Source:
    label: str                       # how error messages name the source
    kind: str                        # bundled | file | saved | hub
    splits: dict[str, Any]           # split name -> list of records or datasets.Dataset
    labels: dict[str, str] = field(default_factory=dict)  # split -> label for messages
    decode_json_cells: bool = False  # CSV: decode JSON message lists stored as strings
    columns: dict[str, set] = field(default_factory=dict)  # split -> known column names (datasets only)


def _bundled_dir():
    """The package folder holding the bundled demo files (a Traversable)."""
    return resources.files("precompute").joinpath("demo_data")


def _looks_like_path(source: str) -> bool:
    """True for strings that can only mean a local path (so a missing one is an error, not a Hub name)."""
    return (source.lower().endswith(_FILE_SUFFIXES) or source.startswith(("/", "./", "../", "~", "."))
            or source.count("/") > 1 or "\\" in source)


def _local_path(source: str) -> Path | None:
    p = Path(os.path.expanduser(source))
    if p.exists():
        return p
    if _looks_like_path(source):
        raise DataError(f"{source}: no such file or directory", source=source)
    return None


def _parse_hub(source: str) -> tuple[str, str | None, str | None]:
    """``owner/name[:config][@revision]`` -> (name, config, revision)."""
    name, revision = source, None
    if "@" in name:
        name, revision = name.rsplit("@", 1)
    config = None
    if ":" in name:
        name, config = name.split(":", 1)
    return name, config or None, revision or None


def _is_saved_dir(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _suffix(p: Path | str) -> str:
    name = str(p).lower()
    for s in _FILE_SUFFIXES:
        if name.endswith(s):
            return s
    return ""


def _sha256_file(p, h=None) -> str:
    h = h or hashlib.sha256()
    with p.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _bundled_files() -> dict[str, Any]:
    d = _bundled_dir()
    found: dict[str, Any] = {}
    if d.is_dir():
        for entry in sorted(d.iterdir(), key=lambda e: e.name):
            n = entry.name
            if not n.startswith(_DEMO_STEM + "."):
                continue
            for suf in (".jsonl", ".jsonl.gz"):
                if n.endswith(suf):
                    split = n[len(_DEMO_STEM) + 1: -len(suf)]
                    if split and "." not in split:
                        found.setdefault(split, entry)
    return found


def _lines(path, gz: bool, label: str) -> Iterator[bytes]:
    """The lines of a Path or an importlib.resources Traversable, as bytes, gunzipped when ``gz``.

    Bytes, not text: each line is decoded on its own, so that one line that is not
    UTF-8 is one bad row rather than the end of the file.  A gzip stream that cannot
    be read to its end is a source-level error naming the file and how far it got.
    """
    lines_read = 0
    with path.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if gz else raw
        try:
            for line in stream:
                yield line
                lines_read += 1
        except EOFError:
            raise DataError(f"{label}: the gzip stream ends early, after {lines_read} line(s): "
                            f"the file is truncated or corrupt", source=label) from None
        except (gzip.BadGzipFile, zlib.error) as e:
            raise DataError(f"{label}: bad gzip data after {lines_read} line(s) ({e}): the file is corrupt, "
                            f"or not gzip-compressed although its name ends in .gz", source=label) from None


def _jsonl_records(lines: Iterable[bytes]) -> list:
    records: list = []
    for lineno, raw in enumerate(lines, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append(_Broken("invalid_utf8", f"line {lineno} is not valid UTF-8 (byte "
                                                   f"0x{raw[e.start]:02x} at offset {e.start} of the line: {e.reason})"))
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            records.append(_Broken("invalid_json", f"line {lineno} is not valid JSON ({e.msg})"))
            continue
        records.append(rec if isinstance(rec, dict) else _Broken("invalid_json", f"line {lineno} is not a JSON object"))
    return records


def _read_jsonl(path, gz: bool, label: str) -> list:
    return _jsonl_records(_lines(path, gz, label))


def _read_json(path: Path, gz: bool, label: str) -> dict[str, list]:
    lines = list(_lines(path, gz, label))
    try:
        obj = json.loads(b"".join(lines).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        # Often JSON lines saved under a .json name; read line by line, a bad line is a bad row.
        return {"train": _jsonl_records(lines)}
    if isinstance(obj, list):
        return {"train": [r if isinstance(r, dict) else _Broken("invalid_json", "record is not a JSON object")
                          for r in obj]}
    if isinstance(obj, dict):
        values = list(obj.values())
        if values and all(isinstance(v, list) and all(isinstance(x, dict) for x in v) for v in values):
            if len(obj) == 1:          # {"data": [...]}
                return {"train": values[0]}
            return {str(k): v for k, v in obj.items()}  # {"train": [...], "test": [...]}
        if values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
            keys = list(obj)
            return {"train": [dict(zip(keys, vals)) for vals in zip(*values)]}
    raise DataError(f"{label}: unsupported JSON layout (expected a list of records, a dict of columns, "
                    f"or a dict of split name -> records)", source=label)


def _datasets():
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - dependency of the project
        raise DataError("the 'datasets' package is needed for this source") from e
    return datasets


def _from_datasets_obj(obj) -> dict[str, Any]:
    datasets = _datasets()
    if isinstance(obj, datasets.DatasetDict):
        return {str(k): v for k, v in obj.items()}
    if isinstance(obj, datasets.Dataset):
        return {"train": obj}
    raise DataError(f"unsupported object from datasets: {type(obj).__name__}")


def _resolve(source: str | None) -> _Source:
    if source in _DEMO_NAMES:
        files = _bundled_files()
        if not files:
            raise DataError(f"bundled demo dataset not found: expected "
                            f"precompute/demo_data/{_DEMO_STEM}.<split>.jsonl in the package", source="demo")
        labels = {s: f"demo ({p.name})" for s, p in files.items()}
        splits = {s: _read_jsonl(p, p.name.endswith(".gz"), labels[s]) for s, p in files.items()}
        return _Source(label="demo", kind="bundled", splits=splits, labels=labels)

    assert source is not None
    path = _local_path(source)
    if path is not None:
        if path.is_dir():
            if not _is_saved_dir(path):
                raise DataError(f"{source}: a directory, but not one written by datasets' save_to_disk "
                                f"(no dataset_dict.json or state.json)", source=source)
            try:
                obj = _datasets().load_from_disk(str(path))
            except Exception as e:
                raise DataError(f"{source}: cannot load the saved dataset: {e}", source=source) from e
            splits = _from_datasets_obj(obj)
            return _Source(label=source, kind="saved", splits=splits,
                           columns={k: set(v.column_names) for k, v in splits.items()})
        suf = _suffix(path)
        if suf in (".jsonl", ".jsonl.gz"):
            return _Source(label=source, kind="file", splits={"train": _read_jsonl(path, suf.endswith(".gz"), source)})
        if suf in (".json", ".json.gz"):
            return _Source(label=source, kind="file", splits=_read_json(path, suf.endswith(".gz"), source))
        if suf in (".parquet", ".csv"):
            builder = suf[1:]
            try:
                ds = _datasets().load_dataset(builder, data_files=str(path), split="train")
            except Exception as e:
                raise DataError(f"{source}: cannot read the {builder} file: {e}", source=source) from e
            return _Source(label=source, kind="file", splits={"train": ds}, decode_json_cells=(builder == "csv"),
                           columns={"train": set(ds.column_names)})
        raise DataError(f"{source}: unsupported file type (use one of {', '.join(_FILE_SUFFIXES)}, "
                        f"or a directory written by save_to_disk)", source=source)

    name, config, revision = _parse_hub(source)
    try:
        obj = _datasets().load_dataset(name, config, revision=revision)
    except Exception as e:
        raise DataError(f"{source}: not a local file or directory, and loading it as a Hugging Face Hub "
                        f"dataset failed: {type(e).__name__}: {e}", source=source) from e
    splits = _from_datasets_obj(obj)
    return _Source(label=source, kind="hub", splits=splits,
                   columns={k: set(v.column_names) for k, v in splits.items()})


def dataset_identity(source: str | None) -> dict:
    """Provenance of a source: ``{"name", "revision", "kind"}``.

    ``revision`` is the sha256 of the file contents for bundled and local files,
    the datasets fingerprint(s) for a saved directory, the ``@revision`` given
    for a Hub name (else ``None``).
    """
    if source in _DEMO_NAMES:
        files = _bundled_files()
        h = hashlib.sha256()
        for split in sorted(files):
            h.update(split.encode() + b"\0")
            _sha256_file(files[split], h)
        return {"name": "demo", "revision": h.hexdigest() if files else None, "kind": "bundled"}
    assert source is not None
    path = _local_path(source)
    if path is not None:
        name = str(path.resolve())
        if path.is_dir():
            prints = []
            for state in sorted(path.rglob("state.json")):
                try:
                    fp = json.loads(state.read_text()).get("_fingerprint")
                except (OSError, json.JSONDecodeError):
                    fp = None
                if fp:
                    rel = state.parent.relative_to(path).as_posix()
                    prints.append(fp if rel == "." else f"{rel}={fp}")
            return {"name": name, "revision": ",".join(prints) or None, "kind": "saved"}
        return {"name": name, "revision": _sha256_file(path), "kind": "file"}
    name, config, revision = _parse_hub(source)
    return {"name": name if config is None else f"{name}:{config}", "revision": revision, "kind": "hub"}


# --------------------------------------------------------------------------- #
# split planning
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class _Span:
    """The source rows ``[start, stop)`` of ``source_split`` that make one requested split."""

    source_split: str
    start: int
    stop: int
    carved: bool = False                # one of the "train"/"test" splits carved from a single-split source
    train_part_stop: int | None = None  # a carved "test": the carved "train" is source rows [0, train_part_stop)


def _plan(source: _Source, requested: Sequence[str], test_fraction: float, limit: int | None) -> dict[str, _Span]:
    """split -> the source rows it is made of."""
    sizes = {k: len(v) for k, v in source.splits.items()}
    carve = set(sizes) == {"train"} and test_fraction > 0
    plan = {}
    for split in requested:
        carved = carve and split in ("train", "test")
        if carved:
            n = sizes["train"]
            n_train = n - math.ceil(round(test_fraction * n, 9))
            start, stop = (n_train, n) if split == "test" else (0, n_train)
            src = "train"
        elif split in sizes:
            src, start, stop = split, 0, sizes[split]
        else:
            hint = " (test_fraction=0 turns off carving a test split)" if split == "test" and set(sizes) == {"train"} else ""
            raise DataError(f"{source.label}: no split '{split}' (available: {', '.join(sorted(sizes))}){hint}",
                            source=source.label)
        if limit is not None:
            stop = min(stop, start + limit)
        plan[split] = _Span(src, start, stop, carved=carved,
                            train_part_stop=n_train if carved and split == "test" else None)
    return plan


def _records(data, start: int, stop: int) -> Iterator:
    if isinstance(data, list):
        yield from data[start:stop]
    else:  # datasets.Dataset
        if stop > start:
            yield from data.select(range(start, stop))


# --------------------------------------------------------------------------- #
# row parsing
# --------------------------------------------------------------------------- #
class _Skip(Exception):
    def __init__(self, reason: str, field: str, what: str):
        super().__init__(what)
        self.reason = reason
        self.field = field
        self.what = what


_TURN_RE = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_TRANSCRIPT_PROMPT_RE = re.compile(r"\s*Human:")


def _parse_transcript(text: str, fld: str) -> list[dict]:
    parts = _TURN_RE.split(text)
    if len(parts) < 3:
        raise _Skip("malformed_transcript", fld, "no 'Human:'/'Assistant:' turns")
    if parts[0].strip():
        raise _Skip("malformed_transcript", fld, "text before the first 'Human:'/'Assistant:' turn")
    msgs: list[dict] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role = "user" if speaker == "Human" else "assistant"
        content = content.strip()
        if msgs and msgs[-1]["role"] == role:
            joined = "\n\n".join(c for c in (msgs[-1]["content"], content) if c)
            msgs[-1] = {"role": role, "content": joined}
        else:
            msgs.append({"role": role, "content": content})
    if msgs[0]["role"] != "user":
        raise _Skip("malformed_transcript", fld, "the transcript does not start with a 'Human:' turn")
    return msgs


def _maybe_json_messages(value):
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]"):
            try:
                obj = json.loads(s)
            except json.JSONDecodeError:
                return value
            if isinstance(obj, list) and obj and all(isinstance(m, dict) and ("role" in m or "from" in m) for m in obj):
                return obj
    return value


def _messages(value, fld: str) -> list[dict]:
    if isinstance(value, dict):
        value = [value]
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise _Skip(f"malformed_{fld}", fld, f"message {i} is a {type(m).__name__}, not a dict")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        norm = _ROLE_ALIASES.get(role.lower()) if isinstance(role, str) else None
        if norm is None:
            raise _Skip(f"malformed_{fld}", fld, f"message {i} has role {role!r} (expected one of {', '.join(ROLES)})")
        if content is None:
            raise _Skip(f"empty_{fld}", fld, f"message {i} has no content")
        if not isinstance(content, str):
            raise _Skip(f"non_string_{fld}", fld, f"message {i} content is a {type(content).__name__}, not a string")
        out.append({"role": norm, "content": content})
    return out


def _check_prompt(msgs: list[dict], fld: str = "prompt", reason: str | None = None) -> list[dict]:
    if not msgs:
        raise _Skip("empty_prompt", fld, "no prompt messages")
    for i, m in enumerate(msgs):
        if m["role"] == "system" and i != 0:
            raise _Skip(reason or "malformed_prompt", fld, f"system message at position {i} (only allowed first)")
    if msgs[-1]["role"] != "user":
        raise _Skip(reason or "malformed_prompt", fld, f"the prompt ends with a {msgs[-1]['role']} turn, not a user turn")
    if not msgs[-1]["content"].strip():
        raise _Skip("empty_prompt", fld, "the last user message is empty")
    return msgs


def _parse_prompt(value) -> tuple[list[dict], bool]:
    """-> (messages, came from an HH-style transcript string)."""
    if isinstance(value, str):
        if not value.strip():
            raise _Skip("empty_prompt", "prompt", "empty or whitespace-only")
        if _TRANSCRIPT_PROMPT_RE.match(value) and "\n\nAssistant:" in value:
            try:
                msgs = _parse_transcript(value, "prompt")
            except _Skip as e:
                raise _Skip("malformed_prompt", "prompt", e.what) from None
            if msgs[-1]["role"] == "assistant":
                if msgs[-1]["content"]:
                    raise _Skip("malformed_prompt", "prompt", "the transcript prompt ends with a non-empty Assistant turn")
                msgs = msgs[:-1]
            return _check_prompt(msgs), True
        return [{"role": "user", "content": value}], False
    if isinstance(value, (list, dict)):
        return _check_prompt(_messages(value, "prompt")), False
    raise _Skip("non_string_prompt", "prompt", f"a {type(value).__name__}, not a string or a list of messages")


def _parse_response(value, fld: str, prompt: list[dict], strip: bool) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (list, dict)):
        msgs = _messages(value, fld)
        n = len(prompt)
        if len(msgs) > n and msgs[:n] == prompt:
            msgs = msgs[n:]
        if not msgs:
            raise _Skip(f"empty_{fld}", fld, "no messages")
        bad = [m["role"] for m in msgs if m["role"] != "assistant"]
        if bad:
            raise _Skip(f"malformed_{fld}", fld, f"the response turns contain a {bad[0]} message "
                                                 f"(and do not start with the prompt messages)")
        text = msgs[-1]["content"]
    else:
        raise _Skip(f"non_string_{fld}", fld, f"a {type(value).__name__}, not a string or a list of messages")
    if not text.strip():
        raise _Skip(f"empty_{fld}", fld, "empty or whitespace-only")
    return text.strip() if strip else text


def _conversation(value, fld: str) -> tuple[list[dict], bool]:
    """A full conversation (transcript string or message list) -> (messages, is transcript)."""
    if isinstance(value, str):
        return _parse_transcript(value, fld), True
    if isinstance(value, (list, dict)):
        return _messages(value, fld), False
    raise _Skip(f"non_string_{fld}", fld, f"a {type(value).__name__}, not a transcript string or a list of messages")


def _final_turn(rest: list[dict], fld: str, reason: str) -> str:
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        raise _Skip(reason, fld, "the conversations do not share all turns before a final Assistant turn")
    text = rest[0]["content"]
    if not text.strip():
        raise _Skip(f"empty_{fld}", fld, "the final Assistant turn is empty")
    return text


def _is_plain_text(value) -> bool:
    """A string that is neither an HH-style transcript nor JSON messages: a bare response."""
    return isinstance(value, str) and not _TURN_RE.search(value)


def _parse_implicit(chosen, rejected, require_pairs: bool) -> tuple[list[dict], str | None, str | None]:
    if chosen is None and rejected is None:
        raise _Skip("missing_prompt", "prompt", "no prompt and no responses")
    present = [v for v in (chosen, rejected) if v is not None]
    if all(_is_plain_text(v) for v in present):
        raise _Skip("missing_prompt", "prompt", "no 'prompt' field, and chosen/rejected are plain text, not "
                                                "'Human:'/'Assistant:' transcripts or message lists; if the prompt "
                                                "is in another column, map it with --column prompt=NAME")
    if chosen is None or rejected is None:
        present, missing = ("chosen", "rejected") if rejected is None else ("rejected", "chosen")
        if require_pairs:
            raise _Skip(f"missing_{missing}", missing, "missing (and there is no prompt column)")
        conv, is_tr = _conversation(chosen if chosen is not None else rejected, present)
        reason = "malformed_transcript" if is_tr else f"malformed_{present}"
        prompt = _check_prompt(conv[:-1], present, reason) if len(conv) > 1 else _check_prompt([], present)
        text = _final_turn(conv[-1:], present, reason)
        return prompt, (text if present == "chosen" else None), (text if present == "rejected" else None)

    conv_c, tr_c = _conversation(chosen, "chosen")
    conv_r, tr_r = _conversation(rejected, "rejected")
    k = 0
    cap = min(len(conv_c), len(conv_r)) - 1
    while k < cap and conv_c[k] == conv_r[k]:
        k += 1
    prompt = conv_c[:k]
    reason_c = "malformed_transcript" if tr_c else "malformed_chosen"
    reason_r = "malformed_transcript" if tr_r else "malformed_rejected"
    c_text = _final_turn(conv_c[k:], "chosen", reason_c)
    r_text = _final_turn(conv_r[k:], "rejected", reason_r)
    _check_prompt(prompt, "chosen", reason_c)
    return prompt, c_text, r_text


def _parse_record(rec, cols: Mapping[str, str], require_pairs: bool, decode_json: bool) -> tuple[list[dict], str | None, str | None]:
    if isinstance(rec, _Broken):
        raise _Skip(rec.reason, "record", rec.what)
    p, c, r = (rec.get(cols[f]) for f in FIELDS)
    if decode_json:
        p, c, r = _maybe_json_messages(p), _maybe_json_messages(c), _maybe_json_messages(r)

    if p is None:
        prompt, chosen, rejected = _parse_implicit(c, r, require_pairs)
    else:
        prompt, from_transcript = _parse_prompt(p)
        if c is None and r is None:
            if require_pairs:
                raise _Skip("missing_responses", "chosen", "no chosen/rejected responses")
            return prompt, None, None
        if require_pairs and (c is None or r is None):
            missing = "chosen" if c is None else "rejected"
            raise _Skip(f"missing_{missing}", missing, "missing")
        chosen = _parse_response(c, "chosen", prompt, from_transcript) if c is not None else None
        rejected = _parse_response(r, "rejected", prompt, from_transcript) if r is not None else None

    if chosen is not None and rejected is not None and chosen.strip() == rejected.strip():
        raise _Skip("identical_responses", "rejected", "identical to chosen")
    return prompt, chosen, rejected


def _fingerprint(rows: list[Row]) -> str:
    payload = [[r.index, r.prompt, r.chosen, r.rejected] for r in rows]
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- #
# duplicates
# --------------------------------------------------------------------------- #
def _row_key(prompt: list[dict], chosen: str | None, rejected: str | None) -> tuple:
    """What makes two rows the same row: the same prompt messages, chosen and rejected, after parsing."""
    return tuple((m["role"], m["content"]) for m in prompt), chosen, rejected


def _check_not_repeated(key: tuple, kept: Mapping[tuple, int], train: Mapping[tuple, int]) -> None:
    """Skip a row that repeats a kept row of its split, or (carved "test") a row of the carved "train"."""
    if key in train:
        raise _Skip("duplicate_of_train", "record",
                    f"the same prompt, chosen and rejected as row {train[key]}, which is in the carved 'train' split")
    if key in kept:
        raise _Skip("duplicate_row", "record", f"the same prompt, chosen and rejected as row {kept[key]}")


# --------------------------------------------------------------------------- #
# a split with no usable row
# --------------------------------------------------------------------------- #
# Column names that usually hold a field, for the --column suggestion; a column whose
# name contains the field's name (e.g. "chosen_response") is tried before these.
_COLUMN_GUESSES = {
    "prompt": ("question", "instruction", "query", "input", "context", "user", "human"),
    "chosen": ("good", "preferred", "better", "accepted", "winner", "positive", "pos"),
    "rejected": ("bad", "dispreferred", "worse", "loser", "negative", "neg"),
}


def _guess_column(fld: str, free: Sequence[str]) -> str | None:
    contains = [c for c in free if fld in c.lower()]
    if contains:
        return contains[0]
    by_name = {c.lower(): c for c in free}
    return next((by_name[g] for g in _COLUMN_GUESSES[fld] if g in by_name), None)


def _column_suggestion(seen: set, cols: Mapping[str, str], needed: Sequence[str]) -> str:
    """``--column`` flags for the needed fields whose column is not in the rows, guessed from the columns
    that are (``NAME`` where nothing fits); empty when every needed column is there or no row had any."""
    absent = [f for f in needed if cols[f] not in seen]
    if not absent or not seen:
        return ""
    taken = {cols[f] for f in FIELDS}
    flags = []
    for fld in absent:
        guess = _guess_column(fld, [c for c in sorted(seen) if c not in taken])
        if guess is not None:
            taken.add(guess)
        flags.append(f"--column {fld}={guess or 'NAME'}")
    return " ".join(flags)


def _unusable(span: _Span, seen: set, cols: Mapping[str, str]) -> bool:
    """True for a split that gives no row because there is nothing to read: no rows at all, or no row
    with a column of any field (so the columns must be named differently).

    A split whose rows have the columns but all fail (e.g. pairs asked of a file of
    prompts) is returned empty with its skip counts, unless the caller asks for rows
    (``require_rows``, as the commands do).
    """
    return span.stop == span.start or not any(cols[f] in seen for f in FIELDS)


def _no_usable_row(label: str, split: str, span: _Span, source: _Source, skipped: Mapping[str, int],
                   seen: set, cols: Mapping[str, str], needed: Sequence[str]) -> DataError:
    """The error for a requested split that ends up with no row: why, and what to try."""
    size = len(source.splits[span.source_split])
    if size == 0:
        whole = "the file" if source.kind in ("file", "bundled") else "the dataset"
        return DataError(f"{label}: {whole if len(source.splits) == 1 else 'this split'} has no rows", source=label)
    read = span.stop - span.start
    if read == 0:
        carving = ": a single-split source gives its last rows to 'test' and the rest to 'train'" if span.carved else ""
        return DataError(f"{label}: split '{split}' has none of the source's {size} row(s){carving}", source=label)
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    message = (f"{label}: split '{split}' has no usable row: {read} row(s) read, all skipped ({reasons}); "
               f"columns seen in the rows: {', '.join(sorted(seen)) or 'none'}")
    flags = _column_suggestion(seen, cols, needed)
    if flags:
        message += f"; if the fields are in other columns, map them, e.g. {flags}"
    return DataError(message, source=label)


# --------------------------------------------------------------------------- #
# entry point
# --------------------------------------------------------------------------- #
@dataclass
class _Reader:
    """Reads the requested splits of one source, each the same way (one ``load_splits`` call)."""

    source: _Source
    cols: dict[str, str]          # field -> column name
    named: Mapping[str, str]      # the columns the caller named: each must exist
    strict: bool
    require_pairs: bool
    require_rows: bool  # a split whose every row is skipped is an error too
    # (source split, stop) -> {row key: first source row holding it} over the source rows [0, stop);
    # kept so that a carved "test" reuses the keys of the "train" read in the same call.
    first_rows: dict[tuple[str, int], dict[tuple, int]] = field(default_factory=dict)

    def label(self, src_split: str) -> str:
        src = self.source
        return src.labels.get(src_split) or (src.label if len(src.splits) == 1 else f"{src.label} [split '{src_split}']")

    def parse(self, rec) -> tuple[list[dict], str | None, str | None]:
        return _parse_record(rec, self.cols, self.require_pairs, self.source.decode_json_cells)

    def read(self, split: str, span: _Span) -> LoadedSplit:
        label = self.label(span.source_split)
        known = self.source.columns.get(span.source_split)
        if self.named and known is not None:
            self._check_named_columns(label, known, "column(s) not found: ", f"; columns are: {', '.join(sorted(known))}")
        train = self._carved_train_rows(span)
        rows: list[Row] = []
        skipped: dict[str, int] = {}
        seen_cols: set = set()
        kept: dict[tuple, int] = {}  # row key -> source row of the row kept with it
        for index, rec in enumerate(_records(self.source.splits[span.source_split], span.start, span.stop), span.start):
            if isinstance(rec, dict):
                seen_cols.update(k for k, v in rec.items() if v is not None)
            try:
                prompt, chosen, rejected = self.parse(rec)
                key = _row_key(prompt, chosen, rejected)
                _check_not_repeated(key, kept, train)
            except _Skip as e:
                if self.strict:
                    raise self._row_error(label, index, e) from None
                skipped[e.reason] = skipped.get(e.reason, 0) + 1
                continue
            kept[key] = index
            rows.append(Row(index=index - span.start, prompt=prompt, chosen=chosen, rejected=rejected,
                            source_row=index))
        if span.start == 0 and not train:  # then ``kept`` is every first row of [0, stop)
            self.first_rows[(span.source_split, span.stop)] = kept
        if self.named and known is None and span.stop > span.start:
            self._check_named_columns(label, seen_cols, "column(s) not found in any row: ", "")
        if not rows and (self.require_rows or _unusable(span, seen_cols, self.cols)):
            needed = FIELDS if self.require_pairs else ("prompt",)
            raise _no_usable_row(label, split, span, self.source, skipped, seen_cols, self.cols, needed)
        return LoadedSplit(name=split, rows=rows, skipped=dict(sorted(skipped.items())),
                           total_rows=span.stop - span.start, fingerprint=_fingerprint(rows))

    def _carved_train_rows(self, span: _Span) -> Mapping[tuple, int]:
        """For a carved "test": row key -> first source row of the carved "train" with it; else empty.

        Read whether or not "train" is requested (and whatever ``limit``), so that a
        "test" loaded alone drops the same rows as one loaded with "train".
        """
        if span.train_part_stop is None:
            return {}
        cache_key = (span.source_split, span.train_part_stop)
        if cache_key not in self.first_rows:
            first: dict[tuple, int] = {}
            for index, rec in enumerate(_records(self.source.splits[span.source_split], 0, span.train_part_stop)):
                try:
                    first.setdefault(_row_key(*self.parse(rec)), index)
                except _Skip:
                    continue
            self.first_rows[cache_key] = first
        return self.first_rows[cache_key]

    def _check_named_columns(self, label: str, present: set, what: str, tail: str) -> None:
        absent = {f: c for f, c in self.named.items() if c not in present}
        if absent:
            raise DataError(f"{label}: {what}" + ", ".join(f"'{c}' (for field '{f}')" for f, c in absent.items())
                            + tail, source=label)

    def _row_error(self, label: str, index: int, e: _Skip) -> DataError:
        col = self.cols.get(e.field, e.field)
        named = f"'{e.field}'" + (f" (column '{col}')" if col != e.field else "")
        return DataError(f"{label}: row {index}: field {named}: {e.what} [{e.reason}]",
                         source=label, row=index, field=e.field, reason=e.reason)


def load_splits(source: str | None, splits: Sequence[str] = ("train", "test"), *, limit: int | None = None,
                columns: Mapping[str, str] | None = None, strict: bool = False, require_pairs: bool = True,
                test_fraction: float = 0.1, require_rows: bool = False) -> dict[str, LoadedSplit]:
    """Load the named splits of a preference data source (see the module docstring).

    ``columns`` maps our field names (``prompt``, ``chosen``, ``rejected``) to the
    source's column names.  Bad rows are skipped and counted in
    ``LoadedSplit.skipped`` by reason; with ``strict=True`` the first bad row
    raises :class:`DataError` instead.  A requested split with nothing to read
    (no rows, or none with a column of any field) raises :class:`DataError`,
    strict or not; with ``require_rows`` (the commands) so does a split whose
    every row was skipped.
    """
    if isinstance(splits, str):
        splits = (splits,)
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    cols = {f: f for f in FIELDS}
    if columns:
        unknown = set(columns) - set(FIELDS)
        if unknown:
            raise ValueError(f"columns: unknown field(s) {sorted(unknown)}; expected some of {list(FIELDS)}")
        cols.update(columns)

    src = _resolve(source)
    plan = _plan(src, list(dict.fromkeys(splits)), test_fraction, limit)
    reader = _Reader(src, cols, dict(columns or {}), strict, require_pairs, require_rows)
    return {split: reader.read(split, span) for split, span in plan.items()}


def load_data(options, *, require_pairs: bool = True) -> dict[str, LoadedSplit]:
    """The rows a command's :class:`lm.options.DataOptions` name (:func:`load_splits`; a split with no usable
    row is refused)."""
    return load_splits(options.dataset, options.splits, limit=options.limit, columns=options.columns,
                       strict=options.strict, require_pairs=require_pairs, require_rows=True)
