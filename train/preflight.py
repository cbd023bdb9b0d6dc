"""Pre-flight: everything checked before a student loads, cheapest first (fail before the expensive part).

:func:`prepare` turns a :class:`TrainConfig` into a :class:`Plan`:

1. resolve the method into terms, the device and the dtype (float16 is refused:
   it would need loss scaling);
2. open the store and refuse one that lacks a signal the terms read with these
   settings (PAD's calibration only below alpha 1), naming it and the commands
   that write it, in order and with the settings the store was made with, to run as
   written: ``precompute sample``, a ``precompute teacher`` pass, ``precompute
   rank`` (:func:`require_signals`, :func:`commands_for`; what a store cannot say,
   the judge or an unrecorded teacher, is a placeholder the line explains), and
   rankings in which no group agreed (:func:`require_agreed_groups`: every ranking
   term would be 0);
3. refuse ``--resume`` without a checkpoint or with other settings
   (:func:`train.checkpoint.check_resumable`), and a fresh run into a directory
   holding a checkpoint; a directory that a run stopped before its first checkpoint
   left is started afresh, with a note (:mod:`train.checkpoint` lists the states a
   kill can leave); an ``--out`` that is a file or cannot be written is refused
   first of all (:func:`check_out`);
4. resolve the student (default: the student the store records) and check its
   tokenizer against the store's;
5. count the batches of each epoch (:func:`count_batches`) and take a real
   sequence on which :func:`load_student` checks the student's decoder/output split.

Total steps: the schedule needs them before the first step. They are counted
exactly by one pass per epoch over the store's *base* arrays only (token ids and
offsets, a small fraction of the store: no teacher signal is read), streamed in
the very order training will see (same seed, same epoch, same buffer), through
the same :func:`train.batches.token_budget_batches`. Steps per epoch =
``ceil(batches / grad_accum)``. On several processes (:mod:`train.distributed`)
every process counts the batches of every process's share (one pass per share,
no communication: all processes reach the same plan), and an epoch lasts as many
batches as the longest share: ``ceil(longest / grad_accum)`` steps. Without ``--max-steps`` the run is ``--epochs``
epochs. With ``--max-steps N`` (as ``max_steps`` in transformers' Trainer, which
overrides ``num_train_epochs``) the run is exactly N steps: epochs 0, 1, 2, ...,
each shuffled by the seed and its number, follow one another until N steps are
made (the last one stops where the N-th step ends), and ``--epochs`` is ignored;
only the epochs that run are counted (:func:`epochs_for`).
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm import chat, head, models
from store import ExampleStream, ModelRecord, Sequence, StoreError, TeacherStore, check_complete
from store import format as fmt
from store.locations import redact_url
from store.provenance import PASS_ENCODE

from . import checkpoint, distributed, methods
from .batches import token_budget_batches
from .config import TrainConfig, TrainError
from .distributed import RankStream, Shard
from .records import METRICS_FILE, MODEL_STAGING, model_complete, read_metrics


@dataclass
class Plan:
    """Everything decided before a model is loaded."""

    config: TrainConfig
    store: TeacherStore
    terms: list[methods.Term]
    needs: dict[str, list[str]]
    student: models.ModelInfo
    teacher: ModelRecord | None  # as the store records it
    device: str
    dtype: torch.dtype
    out: Path
    batches_per_epoch: list[int]  # of every epoch the run goes through (with max_steps: as many as it needs);
    # on several processes, the longest share's (each process runs that many, some with zero weight)
    total_steps: int
    warmup_steps: int
    probe: Sequence  # a real sequence of the split: the student's decoder/output split is checked on it
    notes: list[str] = field(default_factory=list)
    shard: Shard = field(default_factory=Shard)  # this process's place among the run's processes
    rank_batches: list[list[int]] = field(default_factory=list)  # per epoch, each process's batches
    parallel: str = "none"  # how several processes train: ddp or fsdp (:mod:`train.distributed`)

    @property
    def my_batches(self) -> list[int]:
        """This process's batches in each epoch."""
        return [per_rank[self.shard.rank] for per_rank in self.rank_batches]


# --------------------------------------------------------------------------- the store and what it records


def open_store(location: str, storage_options: dict | None = None) -> TeacherStore:
    """The store at ``location`` (a path or an fsspec URL, reached with ``storage_options``, e.g. credentials).

    TrainError naming the store for one that is not there or not readable, and for a server that
    refuses access (HTTP 401/403, a permission error), saying how to pass credentials.
    """
    try:
        return TeacherStore.open(location, storage_options=storage_options)
    except StoreError as exc:
        raise TrainError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - fsspec's and the HTTP clients' errors: one line naming the store
        where = redact_url(location)
        reason = " ".join(str(exc).split()) or type(exc).__name__
        status = getattr(exc, "status", None)
        if status in (401, 403):  # aiohttp's (fsspec's http) answer: "403, message='Forbidden', url=..."
            reason = f"HTTP {status} {getattr(exc, 'message', '') or ''}".strip()
        if isinstance(exc, PermissionError) or status in (401, 403):
            given = "the --storage-option values given" if storage_options else "no --storage-option"
            raise TrainError(f"{where}: access refused ({reason}) with {given}: pass the store's credentials as "
                             f"--storage-option KEY=VALUE (e.g. headers='{{\"Authorization\": \"Bearer ...\"}}' "
                             f"for HTTP, key=... secret=... or profile=... for S3) or where the filesystem reads "
                             f"them (environment, profiles)") from exc
        if isinstance(exc, (OSError, ValueError, TypeError)) or type(exc).__module__.split(".")[0] in (
                "aiohttp", "fsspec", "botocore", "s3fs", "gcsfs", "requests", "zarr"):
            raise TrainError(f"{where}: cannot open the store ({type(exc).__name__}: {reason})") from exc
        raise


def recorded_model(store: TeacherStore, *steps: str) -> ModelRecord | None:
    """The model that ran the first of ``steps`` (e.g. "pairs/student_init") that the store records a model for."""
    passes = store.passes()
    return next((passes[step].model for step in steps if step in passes and passes[step].model), None)


def recorded_student(store: TeacherStore) -> ModelRecord | None:
    """The student's initial model: the DPO reference, ADPA's answers or, for PAD, the model that sampled."""
    return recorded_model(store, fmt.PASS_PAIRS_STUDENT_INIT, fmt.PASS_GENERATED_BASE, fmt.PASS_SAMPLES_BASE)


def recorded_teacher(store: TeacherStore) -> ModelRecord | None:
    return recorded_model(store, fmt.PASS_PAIRS_TEACHER, fmt.PASS_GENERATED_TEACHER, fmt.PASS_SAMPLES_TEACHER)


#: pass settings that are options of the command writing the pass, under the same name (``top_k``: ``--top-k``)
TEACHER_OPTIONS = ("max_length", "max_new_tokens", "top_k", "tail_samples", "tail_seed", "dtype")
SAMPLE_OPTIONS = ("max_length", "max_new_tokens", "n", "keep", "temperature", "top_p", "seed", "dtype")

#: what a suggested command cannot take from the store, written in its place, and what to put there
JUDGE_PLACEHOLDER, TEACHER_PLACEHOLDER = "JUDGE", "TEACHER"


def _quoted(value) -> str:
    """``value`` as one shell word (a path with spaces stays one argument when the command is pasted)."""
    return shlex.quote(str(value))


def recorded_options(store: TeacherStore, steps: list[str], names: tuple[str, ...]) -> list[str]:
    """``--name value`` for each of ``names`` that a pass record of ``steps`` holds (the first such record's)."""
    passes = store.passes()
    found: dict[str, object] = {}
    for step in steps:
        for name, value in passes[step].settings.items() if step in passes else ():
            found.setdefault(name, value)
    return [f"--{name.replace('_', '-')} {_quoted(found[name])}" for name in names if name in found]


def data_options(store: TeacherStore) -> list[str]:
    """The options that select the store's rows: its dataset (a Hub name with its ``@revision``), its splits, and
    ``--limit`` the largest split's row count (``--limit`` keeps the first rows of each split, so this reads
    exactly the rows of a store made with or without one)."""
    dataset = store.dataset()
    parts = []
    if dataset is not None and dataset.name:
        pinned = dataset.kind == "hub" and dataset.revision
        parts.append(f"--dataset {_quoted(f'{dataset.name}@{dataset.revision}' if pinned else dataset.name)}")
    splits = store.splits()
    parts.append(f"--split {_quoted(','.join(splits))}")
    rows = max((store.num_examples(split) for split in splits), default=0)
    return parts + ([f"--limit {rows}"] if rows else [])


def rows_options(store: TeacherStore) -> list[str]:
    """:func:`data_options` and the store's part size: what a command writing new parts is given."""
    return data_options(store) + [f"--examples-per-part {store.examples_per_part}"]


def teacher_option(store: TeacherStore) -> tuple[str, str | None]:
    """``(--teacher ..., placeholder note)``: the teacher the store records; without one, nothing when the store's
    tokenizer is the embedded models' (the default teacher fits), else the TEACHER placeholder and what it is."""
    teacher = recorded_teacher(store)
    if teacher is not None:
        return f"--teacher {_quoted(teacher.name)}", None
    cross = store.attrs.get(fmt.ATTR_CROSS_TOKENIZER)
    if isinstance(cross, dict) and (cross.get("teacher_tokenizer") or {}).get("name"):
        return f"--teacher {_quoted(cross['teacher_tokenizer']['name'])}", None  # the model its tokenizer came from
    if store.tokenizer.name in (models.EMBEDDED_TEACHER, models.EMBEDDED_STUDENT):
        return "", None
    return (f"--teacher {TEACHER_PLACEHOLDER}",
            f"{TEACHER_PLACEHOLDER} is the teacher to distil, a model dir, .gguf file or name with the store's "
            f"tokenizer, that of {store.tokenizer.name}")


def precompute_command(store: TeacherStore, passes: list[str], student: str | None = None) -> tuple[str, list[str]]:
    """The ``precompute teacher`` command that adds ``passes`` to ``store`` with every setting it records, and the
    notes on its placeholders. ``student``: the student to name where the store records none (the one being
    trained: DPO's reference sums are its own)."""
    parts = ["precompute teacher", f"--out {_quoted(store.location)}", f"--passes {','.join(passes)}"]
    teacher, note = teacher_option(store)
    recorded = recorded_student(store)
    student = recorded.name if recorded is not None else student
    if isinstance(store.attrs.get(fmt.ATTR_CROSS_TOKENIZER), dict):  # aligned across tokenizers: so is what is added
        parts.append("--cross-tokenizer")
        student = student or store.tokenizer.name
    reference = recorded_model(store, f"{methods.GENERATED}/{methods.REFERENCE}")
    parts += [option for option in (teacher, f"--student {_quoted(student)}" if student else "") if option]
    if reference is not None and reference != recorded:  # else the reference defaulted to the student
        parts.append(f"--reference {_quoted(reference.name)}")
    teacher_steps = [step for step, (command, _) in _steps_by_writer(store) if command == methods.TEACHER_COMMAND]
    command = " ".join(parts + rows_options(store) + recorded_options(store, teacher_steps, TEACHER_OPTIONS))
    return command, [note] if note else []


def sample_command(store: TeacherStore, student: str | None = None) -> str:
    """The ``precompute sample`` command that adds the groups to ``store`` with the settings it records; the model
    that samples is the student's initial model (``student`` where the store records none)."""
    parts = ["precompute sample", f"--out {_quoted(store.location)}"]
    recorded = recorded_student(store)
    student = recorded.name if recorded is not None else student
    if student:
        parts.append(f"--model {_quoted(student)}")
    steps = [fmt.PASS_SAMPLES_BASE, PASS_ENCODE]
    return " ".join(parts + rows_options(store) + recorded_options(store, steps, SAMPLE_OPTIONS))


def rank_command(store: TeacherStore) -> tuple[str, list[str]]:
    """The ``precompute rank`` command that ranks the store's groups, and the note on its JUDGE placeholder: the
    black box is the user's choice (the white box defaults to the model that sampled)."""
    parts = ["precompute rank", f"--out {_quoted(store.location)}", f"--judge {JUDGE_PLACEHOLDER}"]
    note = (f"{JUDGE_PLACEHOLDER} is the black box that ranks the groups, local:MODEL or an OpenAI-compatible base "
            f"URL followed by --judge-model NAME")
    return " ".join(parts + data_options(store)), [note]


def _steps_by_writer(store: TeacherStore) -> list[tuple[str, tuple[str, str | None]]]:
    """The store's recorded steps with the command that wrote each (``encode`` counts as the teacher's)."""
    return [(step, methods.WRITER.get(step, (methods.TEACHER_COMMAND, None))) for step in store.passes()]


def teacher_passes(signals: list[str]) -> list[str]:
    """The ``precompute teacher --passes`` values that write ``signals``, in :data:`train.methods.TEACHER_PASSES`
    order; pad_logp and pad_mcq together are ``pad``."""
    wanted = {methods.WRITER[s][1] for s in signals if methods.WRITER[s][0] == methods.TEACHER_COMMAND}
    if wanted.issuperset(methods.PAD_PARTS):
        wanted = (wanted - set(methods.PAD_PARTS)) | {"pad"}
    return [name for name in methods.TEACHER_PASSES if name in wanted]


def commands_for(store: TeacherStore, signals: list[str], student: str | None = None) -> str:
    """The commands that write ``signals``, in the order they must run (groups sampled, then the teacher's passes,
    then the judge's rankings), joined by ", then ", and what each placeholder in them stands for.

    Every signal a term can read has a writer (:data:`train.methods.WRITER`). ``student``: the student being
    trained, named where the store records none (it samples the groups and gives DPO's reference sums).
    """
    unknown = [s for s in signals if s not in methods.WRITER]
    if unknown:
        raise TrainError(f"no command known to write {', '.join(unknown)}")
    writers = {methods.WRITER[s][0] for s in signals}
    commands, notes = [], []
    if methods.SAMPLE in writers:
        commands.append(sample_command(store, student))
    if methods.TEACHER_COMMAND in writers:
        command, more = precompute_command(store, teacher_passes(signals), student)
        commands.append(command)
        notes += more
    if methods.RANK in writers:
        command, more = rank_command(store)
        commands.append(command)
        notes += more
    text = ", then ".join(commands)
    return f"{text} (where {'; '.join(notes)})" if notes else text


# --------------------------------------------------------------------------- checks


def missing_signals(store: TeacherStore, split: str, needs: dict[str, list[str]]) -> list[str]:
    """``set/section`` names (``set/base`` for a set's own arrays) that ``needs`` asks for and ``split`` lacks."""
    signals = []
    for path in check_complete(store, split, needs):  # "<split>/part-NNNNN/<set>[/<section>]"
        pieces = path.split("/")
        signal = f"{pieces[2]}/{pieces[3] if len(pieces) > 3 else fmt.BASE}"
        if signal not in signals:
            signals.append(signal)
    return signals


def require_signals(store: TeacherStore, split: str, needs: dict[str, list[str]], what: str,
                    student: str | None = None) -> None:
    """Raise TrainError naming each missing ``set/section`` and the commands that write it (:func:`commands_for`;
    ``student``: the student being trained, where the store records none)."""
    if store.num_parts(split) == 0:
        raise TrainError(f"{store.location} has no split {split!r} (it has: {', '.join(store.splits()) or 'none'})")
    signals = missing_signals(store, split, needs)
    if signals:
        raise TrainError(f"{what} needs {', '.join(signals)} (split {split}), which {store.location} lacks or has "
                         f"incomplete; compute it first with: {commands_for(store, signals, student)}")


def uses_kd(terms: list[methods.Term]) -> bool:
    """Whether a term of ``terms`` reads KD (whose tail ``--kd-tail`` chooses)."""
    return any(request.quantity == methods.KD for term in terms for request in term.tokens)


def check_kd_tail(store: TeacherStore, kd_tail: str, what: str) -> None:
    """Refuse, before a model loads, a ``--kd-tail`` that the store's ``pairs/teacher`` cannot serve: ``samples``
    without tail samples (``precompute teacher --tail-samples S`` writes them), and ``bin`` on a store without a
    top-K (``--top-k 0``: one bin holds the whole mass, so KD would be 0 whatever the student)."""
    record = store.pass_record(fmt.PASS_PAIRS_TEACHER)
    settings = record.settings if record is not None else {}
    if kd_tail == methods.KD_TAIL_SAMPLES and not settings.get("tail_samples"):
        raise TrainError(f"{what} with --kd-tail {methods.KD_TAIL_SAMPLES}: {store.location} has no tail samples "
                         f"(its pairs/teacher was written without --tail-samples); write a store with them to another "
                         f"--out, e.g. `precompute teacher --out NEW_STORE --tail-samples 12` with this store's teacher "
                         f"and data, or train with --kd-tail {methods.KD_TAIL_AUTO}")
    if kd_tail == methods.KD_TAIL_BIN and settings.get("top_k") == 0:
        raise TrainError(f"{what} with --kd-tail {methods.KD_TAIL_BIN}: {store.location} keeps no top-K (--top-k 0, "
                         f"a pure sampled store), so its one tail bin holds all the mass and KD would be 0; use "
                         f"--kd-tail {methods.KD_TAIL_AUTO} (its tail samples)")


def refuse_adpa_without_top_k(store: TeacherStore, split: str, needs: dict[str, list[str]], what: str) -> None:
    """A store written with ``--top-k 0`` (a pure sampled store) cannot get ADPA's sections: its ``precompute
    teacher`` settings refuse the ``adpa`` pass (the advantage lives at the teacher's top-K ids), so the command
    :func:`require_signals` would suggest cannot run; say what can instead."""
    record = store.pass_record(fmt.PASS_PAIRS_TEACHER)
    if (record is None or record.settings.get("top_k") != 0 or methods.GENERATED not in needs
            or not missing_signals(store, split, {methods.GENERATED: needs[methods.GENERATED]})):
        return
    raise TrainError(f"{what} needs ADPA's generated answers and the teacher's top-K on them, which "
                     f"{store.location} cannot hold: it keeps no top-K (--top-k 0, a pure sampled store) and ADPA's "
                     f"advantage is taken at the teacher's top-K ids; write a store with a --top-k of 1 or more "
                     f"(--tail-samples keeps KD's samples beside it), or train a method without adpa")


def require_agreed_groups(store: TeacherStore, split: str, needs: dict[str, list[str]], what: str) -> None:
    """Refuse (TrainError) rankings without one agreed group: every ranking term would be 0, and the student
    would not move. Reads the complete judge sections' ``group_status`` only (before any model loads)."""
    if fmt.SECTION_JUDGE not in needs.get(fmt.SET_SAMPLES, ()):
        return
    requests = [(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE, [fmt.ARRAY_GROUP_STATUS])
                for part in range(store.num_parts(split))]
    statuses = [section[fmt.ARRAY_GROUP_STATUS] for section in store.read_sections(requests)]
    if any((status == fmt.GROUP_STATUS_AGREED).any() for status in statuses):
        return
    outcomes: dict[str, int] = {}
    for part in range(store.num_parts(split)):
        attrs = store.section_attrs(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE) or {}
        for name, n in (attrs.get("outcomes") or {}).items():
            outcomes[name] = outcomes.get(name, 0) + int(n)
    groups = sum(len(status) for status in statuses)
    counted = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items())) or "none counted"
    raise TrainError(f"{what} trains on agreed rankings, and {store.location} has none: pass "
                     f"{fmt.PASS_SAMPLES_JUDGE} (split {split}) agreed on 0 of {groups} groups ({counted}); every "
                     f"ranking term would be 0. Look at the judge's replies (each judge section's "
                     f"{fmt.ARRAY_AUDIT_JSON}) and rank into another --out with a judge that answers full rankings")


def check_tokenizer(store: TeacherStore, model: models.ModelInfo) -> None:
    """Refuse a model whose tokenizer would read the store's token ids differently (TrainError)."""
    stored = store.tokenizer
    tokenizer = models.load_tokenizer(model.path)
    if chat.tokenizer_hash(tokenizer) == stored.hash:
        return
    try:
        same = models.load_tokenizer(stored.name).get_vocab() == tokenizer.get_vocab()
    except Exception:  # the store's tokenizer is not available here: only the hash can decide
        same = False
    if not same:
        cross = store.attrs.get(fmt.ATTR_CROSS_TOKENIZER)
        if isinstance(cross, dict):  # the teacher's tokenizer is another one, and not the one to train with either
            teacher = cross.get("teacher_tokenizer") or {}
            raise TrainError(f"{model.name}: its tokenizer (hash {chat.tokenizer_hash(tokenizer)[:12]}) is neither "
                             f"the store's student tokenizer ({stored.name}, hash {stored.hash[:12]}), whose ids the "
                             f"store holds and its teacher signals were aligned to, nor one that could read them; the "
                             f"teacher's was {teacher.get('name')} (hash {str(teacher.get('hash'))[:12]}). Train a "
                             f"student with {stored.name}'s tokenizer, or compute a store for this one")
        raise TrainError(f"{model.name}: its tokenizer differs from the store's ({stored.name}, hash "
                         f"{stored.hash[:12]}); token-level signals would be read with the wrong ids")


def resolve_model(spec: str | None, hint: str = "") -> models.ModelInfo:
    """:func:`lm.models.resolve_model` (default: the embedded student), TrainError (with ``hint``) when not found."""
    try:
        return models.resolve_model(spec, models.EMBEDDED_STUDENT)
    except models.ModelNotFoundError as exc:
        raise TrainError(f"{exc}{hint}") from exc


def resolve_student(config: TrainConfig, store: TeacherStore,
                    terms: list[methods.Term]) -> tuple[models.ModelInfo, list[str]]:
    """The student to train (default: the one the store records) and notes on the reference sums it will meet."""
    recorded = recorded_student(store)
    spec = config.student or (recorded.name if recorded else None)
    if spec is None and isinstance(store.attrs.get(fmt.ATTR_CROSS_TOKENIZER), dict):
        spec = store.tokenizer.name  # across tokenizers the store's tokenizer is the student's (its model's name)
    info = resolve_model(spec, "" if config.student else " (the student the store records; pass --student)")
    notes = []
    for sequence_set, sections in methods.needs_of(terms).items():
        init = recorded_model(store, f"{sequence_set}/{methods.STUDENT_INIT}")
        if methods.STUDENT_INIT in sections and init and init.sha256 != info.weights_hash:
            notes.append(f"note: DPO's reference sums in the store ({sequence_set}) come from {init.name}, "
                         f"not from the student being trained ({spec})")
    return info, notes


def base_only(needs: dict[str, list[str]]) -> dict[str, list[str]]:
    """The same sequence sets without their sections: what reading only token ids and offsets asks for."""
    return {sequence_set: [] for sequence_set in needs}


def count_batches(store: TeacherStore, split: str, needs: dict[str, list[str]], batch_tokens: int, seed: int,
                  epoch: int, shard: Shard = Shard()) -> int:
    """Batches of one epoch of ``shard``'s share (the whole split on one process), reading base arrays only, in
    training's order (see module docstring)."""
    stream = RankStream(store, split, base_only(needs), seed=seed, shard=shard)
    return sum(1 for _ in token_budget_batches(stream.iterate(epoch), batch_tokens))


def count_shares(store: TeacherStore, split: str, needs: dict[str, list[str]], batch_tokens: int, seed: int,
                 epoch: int, world: int) -> list[int]:
    """Batches of one epoch of each of ``world`` processes' shares, in rank order."""
    return [count_batches(store, split, needs, batch_tokens, seed, epoch, Shard(rank, world)) for rank in range(world)]


def epochs_for(config: TrainConfig, count) -> list[list[int]]:
    """Batches of each epoch the run goes through, per process; ``count(epoch)`` counts one epoch's batches of
    each process's share (a list, one number per process).

    ``config.epochs`` epochs, or with ``config.max_steps`` as many epochs as make that many
    optimizer steps (``ceil(longest share's batches / grad_accum)`` per epoch), ``epochs`` ignored.
    """
    if config.max_steps is None:
        return [count(epoch) for epoch in range(config.epochs)]
    batches, steps = [], 0
    while steps < config.max_steps:
        batches.append(count(len(batches)))
        if max(batches[-1]) == 0:
            raise TrainError(f"{config.cache}: epoch {len(batches) - 1} of split {config.split!r} makes no batch")
        steps += math.ceil(max(batches[-1]) / config.grad_accum)
    return batches


def check_out(out: Path) -> None:
    """Refuse (TrainError) an output directory that is a file, lies under a file, or cannot be written."""
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out} is a file, not a directory: choose another --out")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TrainError(f"--out {out}: {existing} is a file, not a directory: choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "it is" if existing == out else f"{existing} is"
        raise TrainError(f"--out {out}: {where} not writable (read-only): choose another --out")


def check_run_directory(out: Path, resume: bool) -> list[str]:
    """Refuse a resume without a checkpoint and a fresh start over one; notes on what a fresh start replaces.

    The states a kill can leave in ``out``: :mod:`train.checkpoint`.
    """
    state = checkpoint.state_path(out)
    if checkpoint.has_checkpoint(out):
        if resume:
            return []
        if (out / MODEL_STAGING).exists():
            raise TrainError(f"{out} holds a run whose final model was not completely written: pass --resume to "
                             f"write it (no training step), or choose another --out")
        finished = " (a finished one: --resume only writes its model again)" if model_complete(out) else ""
        raise TrainError(f"{out} already holds a run{finished}: pass --resume to continue it, or choose another --out")
    left = checkpoint.unfinished_files(out)
    if resume:
        stopped = f" ({out} holds a run stopped before its first checkpoint)" if left else ""
        raise TrainError(f"--resume: no checkpoint at {state}{stopped}: nothing to resume; run the same command "
                         f"without --resume to start {'afresh' if left else 'the run'}")
    if not left:
        return []
    records = read_metrics(out / METRICS_FILE)
    reached = f", which had logged step {records[-1]['step']}," if records else ""
    return [f"note: {out} holds a run that stopped before its first checkpoint{reached} so there is nothing to "
            f"resume: starting afresh, replacing {', '.join(left)}"]


def first_sequence(store: TeacherStore, split: str, needs: dict[str, list[str]]) -> Sequence:
    """The first sequence of ``split``'s examples with every set of ``needs``, in store order (base arrays only):
    a real example to check a model on. TrainError when there is no such example."""
    example = next(iter(ExampleStream(store, split, base_only(needs), shuffle=False)), None)
    if example is None:
        raise TrainError(f"{store.location}: split {split!r} has no example with {', '.join(needs)}")
    return example.sequences[0]


def resolve_precision(device: str, dtype: str) -> tuple[str, torch.dtype]:
    """``(device, dtype)`` from the options (``auto`` resolved), TrainError for an unknown dtype."""
    device = models.resolve_device(device)
    try:
        return device, models.resolve_dtype(dtype, device)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc


def prepare(config: TrainConfig, context: "distributed.Context | None" = None) -> Plan:
    """Validate everything that can be validated without loading a model (module docstring).

    ``context``: the processes of the run (:func:`train.distributed.setup`): this
    process's share, its device, the launcher's settings; None: one process.
    """
    context = context or distributed.Context(device=config.device)
    shard = context.shard
    try:
        terms = methods.resolve_terms(config.method, config.weights)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    launched_dtype = context.launch.dtype if config.dtype == "auto" else None  # accelerate's mixed_precision: bf16
    device, dtype = resolve_precision(context.device, launched_dtype or config.dtype)
    if dtype == torch.float16:
        raise TrainError("--dtype float16 is not supported (it needs loss scaling): use bfloat16 or float32")
    out = config.run_dir
    check_out(out)

    store = open_store(config.cache, config.storage_options)
    needs = methods.needs_of(terms, config)  # what the terms read with these settings (PAD's alpha)
    refuse_adpa_without_top_k(store, config.split, needs, f"method {config.method}")
    require_signals(store, config.split, needs, f"method {config.method}", config.student)
    require_agreed_groups(store, config.split, needs, f"method {config.method}")
    if uses_kd(terms):
        check_kd_tail(store, config.kd_tail, f"method {config.method}")

    notes = check_run_directory(out, config.resume)
    if config.resume:
        saved = checkpoint.saved_config(out)
        checkpoint.check_resumable(saved, config)
        checkpoint.check_processes(saved, shard.world)
    if shard.world == 1 and (config.fsdp or context.launch.fsdp):
        notes.append("note: FSDP shards over several processes; one process trains the whole student (no FSDP)")
    notes += list(context.launch.notes)

    student, student_notes = resolve_student(config, store, terms)
    notes += student_notes
    check_tokenizer(store, student)

    probe = first_sequence(store, config.split, needs)
    shares = epochs_for(config, lambda epoch: count_shares(store, config.split, needs, config.batch_tokens,
                                                           config.seed, epoch, shard.world))
    batches = [max(per_rank) for per_rank in shares]
    total = sum(math.ceil(n / config.grad_accum) for n in batches)
    if config.max_steps is not None:
        total = config.max_steps  # the epochs counted make at least that many
    return Plan(config=config, store=store, terms=terms, needs=needs, student=student,
                teacher=recorded_teacher(store), device=device, dtype=dtype, out=out, batches_per_epoch=batches,
                total_steps=total, warmup_steps=math.ceil(config.warmup_ratio * total), probe=probe, notes=notes, shard=shard,
                rank_batches=shares, parallel=context.parallel)


def load_student(path: str, device: str, probe: Sequence):
    """``(model, tokenizer)``: float32 weights on ``device``, refused (TrainError) when the model's decoder and
    output layer do not reproduce its own logits on ``probe`` (:func:`lm.head.check_split`): the one check that
    needs the model, made before the first step."""
    model, tokenizer, _ = models.load_model(path, device=device, dtype="float32")
    try:
        head.check_split(model, probe.input_ids, probe.prompt_length)
    except (RuntimeError, ValueError) as exc:
        raise TrainError(str(exc)) from exc
    return model, tokenizer
