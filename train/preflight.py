"""Pre-flight: everything checked before a student loads, cheapest first (fail before the expensive part).

:func:`prepare` turns a :class:`TrainConfig` into a :class:`Plan`:

1. resolve the method into terms, the device and the dtype (float16 is refused:
   it would need loss scaling);
2. open the store and refuse one that lacks a signal the terms need, naming it and
   the ``precompute`` command that writes it with the settings the store was made
   with (:func:`require_signals`, :func:`commands_for`);
3. refuse ``--resume`` without a checkpoint or with other settings
   (:func:`train.checkpoint.check_resumable`), and a fresh run into a used directory;
4. resolve the student (default: the student the store records) and check its
   tokenizer against the store's;
5. count the batches of each epoch (:func:`count_batches`) and take a real
   sequence on which :func:`load_student` checks the student's decoder/output split.

Total steps: the schedule needs them before the first step. They are counted
exactly by one pass per epoch over the store's *base* arrays only (token ids and
offsets, a small fraction of the store: no teacher signal is read), streamed in
the very order training will see (same seed, same epoch, same buffer), through
the same :func:`train.batches.token_budget_batches`. Steps per epoch =
``ceil(batches / grad_accum)``; ``--max-steps`` caps the total.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lm import chat, head, models
from store import ExampleStream, ModelRecord, Sequence, StoreError, TeacherStore, check_complete
from store import format as fmt
from store.provenance import PASS_ENCODE

from . import checkpoint, methods
from .batches import token_budget_batches
from .config import TrainConfig, TrainError
from .records import METRICS_FILE


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
    batches_per_epoch: list[int]
    total_steps: int
    warmup_steps: int
    probe: Sequence  # a real sequence of the split: the student's decoder/output split is checked on it
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- the store and what it records


def open_store(location: str) -> TeacherStore:
    try:
        return TeacherStore.open(location)
    except StoreError as exc:
        raise TrainError(str(exc)) from exc


def recorded_model(store: TeacherStore, *steps: str) -> ModelRecord | None:
    """The model that ran the first of ``steps`` (e.g. "pairs/student_init") that the store records a model for."""
    passes = store.passes()
    return next((passes[step].model for step in steps if step in passes and passes[step].model), None)


def recorded_student(store: TeacherStore) -> ModelRecord | None:
    """The student's initial model: the DPO reference, ADPA's answers or, for PAD, the model that sampled."""
    return recorded_model(store, "pairs/student_init", "generated/base", "samples/base")


def recorded_teacher(store: TeacherStore) -> ModelRecord | None:
    return recorded_model(store, "pairs/teacher", "generated/teacher", "samples/teacher")


#: pass settings that are options of the command writing the pass, under the same name (``top_k``: ``--top-k``)
TEACHER_OPTIONS = ("limit", "max_length", "max_new_tokens", "top_k", "dtype")
SAMPLE_OPTIONS = ("limit", "max_length", "max_new_tokens", "n", "keep", "temperature", "top_p", "seed", "dtype")


def recorded_options(store: TeacherStore, steps: list[str], names: tuple[str, ...]) -> list[str]:
    """``--name value`` for each of ``names`` that a pass record of ``steps`` holds (the first such record's)."""
    passes = store.passes()
    found: dict[str, object] = {}
    for step in steps:
        for name, value in passes[step].settings.items() if step in passes else ():
            found.setdefault(name, value)
    return [f"--{name.replace('_', '-')} {found[name]}" for name in names if name in found]


def rows_options(store: TeacherStore) -> list[str]:
    """The options that select the store's rows: its dataset (a Hub name with its ``@revision``), splits, part size."""
    dataset = store.dataset()
    parts = []
    if dataset is not None and dataset.name:
        pinned = dataset.kind == "hub" and dataset.revision
        parts.append(f"--dataset {dataset.name}@{dataset.revision}" if pinned else f"--dataset {dataset.name}")
    return parts + [f"--split {','.join(store.splits())}", f"--examples-per-part {store.examples_per_part}"]


def precompute_command(store: TeacherStore, passes: list[str]) -> str:
    """The ``precompute teacher`` command that adds ``passes`` to ``store`` with every setting it records."""
    parts = ["precompute teacher", f"--out {store.location}", f"--passes {','.join(passes)}"]
    teacher, student = recorded_teacher(store), recorded_student(store)
    reference = recorded_model(store, f"{methods.GENERATED}/{methods.REFERENCE}")
    parts += [f"--{role} {model.name}" for role, model in (("teacher", teacher), ("student", student))
              if model is not None]
    if reference is not None and reference != student:  # else the reference defaulted to the student
        parts.append(f"--reference {reference.name}")
    teacher_steps = [step for step in store.passes() if step not in methods.SAMPLED]  # not the sampler's
    return " ".join(parts + rows_options(store) + recorded_options(store, teacher_steps, TEACHER_OPTIONS))


def sample_command(store: TeacherStore) -> str:
    """The ``precompute sample`` command that adds PAD's sampled groups to ``store`` with the settings it records."""
    parts = ["precompute sample", f"--out {store.location}"]
    student = recorded_student(store)
    if student is not None:
        parts.append(f"--model {student.name}")
    steps = [*methods.SAMPLED, PASS_ENCODE]  # the sampler's pass is named after the set it writes
    return " ".join(parts + rows_options(store) + recorded_options(store, steps, SAMPLE_OPTIONS))


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


def commands_for(store: TeacherStore, signals: list[str]) -> str:
    """The command(s) that write ``signals``: ``precompute sample`` first where groups are missing."""
    passes = list(dict.fromkeys(methods.PASS_OF.get(s, "pairs") for s in signals if s not in methods.SAMPLED))
    if not any(s in methods.SAMPLED for s in signals):
        return precompute_command(store, passes)
    if "pad" not in passes:  # fresh groups have no teacher signals yet
        passes.insert(0, "pad")
    return f"{sample_command(store)}, then {precompute_command(store, passes)}"


def require_signals(store: TeacherStore, split: str, needs: dict[str, list[str]], what: str) -> None:
    """Raise TrainError naming each missing ``set/section`` and the command that writes it."""
    if store.num_parts(split) == 0:
        raise TrainError(f"{store.location} has no split {split!r} (it has: {', '.join(store.splits()) or 'none'})")
    signals = missing_signals(store, split, needs)
    if signals:
        raise TrainError(f"{what} needs {', '.join(signals)} (split {split}), which {store.location} lacks or has "
                         f"incomplete; compute it first with: {commands_for(store, signals)}")


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
                  epoch: int) -> int:
    """Batches of one epoch, reading base arrays only, in training's order (see module docstring)."""
    stream = ExampleStream(store, split, base_only(needs), shuffle=True, seed=seed)
    return sum(1 for _ in token_budget_batches(stream.iterate(epoch), batch_tokens))


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


def prepare(config: TrainConfig) -> Plan:
    """Validate everything that can be validated without loading a model (module docstring)."""
    c = config
    try:
        terms = methods.resolve_terms(c.method, c.weights)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    device, dtype = resolve_precision(c.device, c.dtype)
    if dtype == torch.float16:
        raise TrainError("--dtype float16 is not supported (it needs loss scaling): use bfloat16 or float32")

    store = open_store(c.cache)
    needs = methods.needs_of(terms)
    require_signals(store, c.split, needs, f"method {c.method}")

    out = c.run_dir
    state = checkpoint.state_path(out)
    if c.resume and not state.is_file():
        raise TrainError(f"--resume: no checkpoint at {state}")
    if c.resume:
        checkpoint.check_resumable(checkpoint.saved_config(out), c)
    if not c.resume and (state.is_file() or (out / METRICS_FILE).is_file()):
        raise TrainError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")

    student, notes = resolve_student(c, store, terms)
    check_tokenizer(store, student)

    probe = first_sequence(store, c.split, needs)
    batches = [count_batches(store, c.split, needs, c.batch_tokens, c.seed, e) for e in range(c.epochs)]
    total = sum(math.ceil(n / c.grad_accum) for n in batches)
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    return Plan(config=c, store=store, terms=terms, needs=needs, student=student, teacher=recorded_teacher(store),
                device=device, dtype=dtype, out=out, batches_per_epoch=batches, total_steps=total,
                warmup_steps=math.ceil(c.warmup_ratio * total), probe=probe, notes=notes)


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
