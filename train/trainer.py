"""``train student``: stream a teacher-signal store into a student. The loop is :func:`train`.

Order of work, cheapest first (fail before the expensive part):

1. :func:`prepare`: open the store, resolve the method into terms, refuse a store
   that lacks a signal the terms need (naming it and the ``precompute`` command
   that writes it), resolve the student (default: the student the store records),
   check its tokenizer against the store's, count the batches of each epoch.
2. :func:`train`: load the student, then one loop: stream examples -> token-budget
   batches -> collate -> the method's loss (a weighted sum of terms, see
   :mod:`train.methods`) -> backward, every ``grad_accum`` batches clip, AdamW step,
   schedule step -> log, checkpoint.

Memory stays flat whatever the store's size: examples stream part by part through a
bounded shuffle buffer (:class:`store.ExampleStream`), batches hold at most
``batch_tokens`` padded tokens, and the output layer runs in row chunks.

Total steps: the schedule needs them before the first step. They are counted
exactly by one pass per epoch over the store's *base* arrays only (token ids and
offsets, a small fraction of the store: no teacher signal is read), streamed in
the very order training will see (same seed, same epoch, same buffer), through
the same :func:`train.batches.token_budget_batches`. Steps per epoch =
``ceil(batches / grad_accum)``; ``--max-steps`` caps the total.

Gradient accumulation: each batch's loss is a token mean; the batches of one
optimizer step are weighted equally (loss / number of batches in the step; the
last step of an epoch may have fewer).

Schedule: linear warmup over ``ceil(warmup_ratio * total)`` steps, factor
``(s + 1) / (warmup + 1)``, then cosine from 1 towards 0 over the remaining
steps, ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))``; neither the
first nor the last step has learning rate 0.

Resuming: a checkpoint (``out/checkpoint/state.pt``, replaced atomically) holds
the model, optimizer and scheduler states, the step, the epoch, the examples and
batches consumed in that epoch, the RNG states and the configuration.
``ExampleStream.iterate(epoch, skip=examples)`` replays the same order from that
point and batches restart at a batch boundary, so a resumed run follows the
uninterrupted one exactly. Settings that change the trajectory must match.

Precision: the student's weights, gradients and optimizer state are float32;
``dtype`` bfloat16 (auto on CUDA GPUs that have it) runs forward and backward
under ``torch.autocast``. float16 is refused (it would need loss scaling).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from lm import chat, models
from store import ExampleStream, StoreError, TeacherStore, TokenizerMismatchError, check_complete
from store import format as fmt

from . import methods
from .batches import collate, token_budget_batches

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CURVES_FILE = "loss_curves.png"

#: settings that change what a run computes; a resumed run must match them
TRAJECTORY_KEYS = ("cache", "split", "method", "weights", "dpo_beta", "simpo_beta", "simpo_gamma", "adpa_beta",
                   "adpa_unclipped", "pad_loss", "pad_beta", "pad_alpha", "pad_max_group", "epochs", "max_steps",
                   "lr", "batch_tokens", "grad_accum", "seed", "warmup_ratio", "max_grad_norm", "weight_decay")


class TrainError(ValueError):
    """A configuration or store that cannot train; the message says what to do."""


@dataclass
class TrainConfig:
    cache: str
    method: str = "dckd+adpa"
    student: str | None = None  # None: the student the store records, else the embedded student
    out: str | None = None  # None: runs/<method with + replaced by _>
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 5e-7  # released DCKD / ADPA recipes
    batch_tokens: int = 4096
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False
    weights: dict[str, float] = field(default_factory=dict)
    dpo_beta: float = 0.1
    simpo_beta: float = 2.0
    simpo_gamma: float = 0.5
    adpa_beta: float = 1.0
    adpa_unclipped: bool = False
    pad_loss: str = "ppd"
    pad_beta: float = 10.0
    pad_alpha: float = 0.5  # see train.methods: the released 0 is noise with the embedded teacher
    pad_max_group: int = 6
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    save_every: int | None = None  # steps; a checkpoint is always written at the end
    log_every: int = 10
    split: str = "train"
    chunk_size: int = 1024  # response rows per output-layer chunk
    progress: bool = True

    def settings(self) -> methods.Settings:
        return methods.Settings(dpo_beta=self.dpo_beta, simpo_beta=self.simpo_beta, simpo_gamma=self.simpo_gamma,
                                adpa_beta=self.adpa_beta, adpa_clip=not self.adpa_unclipped,
                                pad_loss=self.pad_loss, pad_beta=self.pad_beta, pad_alpha=self.pad_alpha,
                                pad_max_group=self.pad_max_group)


def default_out(method: str) -> str:
    return os.path.join("runs", method.replace("+", "_"))


@dataclass
class Plan:
    """Everything decided before a model is loaded."""

    config: TrainConfig
    store: TeacherStore
    terms: list[methods.Term]
    needs: dict[str, list[str]]
    student: models.ModelInfo
    out: Path
    batches_per_epoch: list[int]
    total_steps: int
    warmup_steps: int
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- checks before training


def open_store(location: str) -> TeacherStore:
    try:
        return TeacherStore.open(location)
    except StoreError as exc:
        raise TrainError(str(exc)) from exc


def recorded_model(store: TeacherStore, *steps: str) -> dict | None:
    """``{"name", "sha256"}`` of the model the first of ``steps`` (e.g. "pairs/student_init") ran, if recorded."""
    passes = store.attrs.get("passes", {})
    for step in steps:
        model = passes.get(step, {}).get("model")
        if model:
            return model
    return None


def recorded_student(store: TeacherStore) -> dict | None:
    """The student's initial model: the DPO reference, ADPA's answers or, for PAD, the model that sampled."""
    return recorded_model(store, "pairs/student_init", "generated/base", "samples/base")


def recorded_teacher(store: TeacherStore) -> dict | None:
    return recorded_model(store, "pairs/teacher", "generated/teacher", "samples/teacher")


def precompute_command(store: TeacherStore, passes: list[str]) -> str:
    """The ``precompute teacher`` command that adds ``passes`` to ``store`` with its recorded settings."""
    parts = ["precompute teacher", f"--out {store.location}", f"--passes {','.join(passes)}"]
    teacher = recorded_teacher(store)
    student = recorded_student(store)
    if teacher:
        parts.append(f"--teacher {teacher['name']}")
    if student:
        parts.append(f"--student {student['name']}")
    dataset = store.attrs.get("provenance", {}).get("dataset", {})
    if dataset.get("kind") not in (None, "bundled"):
        parts.append(f"--dataset {dataset['name']}")
    recorded = store.attrs.get("passes", {})
    max_length = recorded.get("encode", {}).get("max_length")
    if max_length and max_length != 512:
        parts.append(f"--max-length {max_length}")
    top_k = (recorded.get("pairs/teacher", {}).get("top_k") or recorded.get("generated/teacher", {}).get("top_k")
             or recorded.get("samples/teacher", {}).get("top_k"))
    if top_k and top_k != 50:
        parts.append(f"--top-k {top_k}")
    return " ".join(parts)


def sample_command(store: TeacherStore) -> str:
    """The ``precompute sample`` command that adds PAD's sampled groups to ``store``."""
    parts = ["precompute sample", f"--out {store.location}"]
    student = recorded_student(store)
    if student:
        parts.append(f"--model {student['name']}")
    dataset = store.attrs.get("provenance", {}).get("dataset", {})
    if dataset.get("kind") not in (None, "bundled"):
        parts.append(f"--dataset {dataset['name']}")
    return " ".join(parts)


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


def check_tokenizer(store: TeacherStore, tokenizer, name: str) -> None:
    """Refuse a student whose tokenizer would read the store's token ids differently."""
    stored = store.attrs.get("tokenizer", {})
    if chat.tokenizer_hash(tokenizer) == stored.get("hash"):
        return
    try:
        teacher_tokenizer = models.load_tokenizer(stored.get("name"))
        same = teacher_tokenizer.get_vocab() == tokenizer.get_vocab()
    except Exception:  # the store's tokenizer is not available here: only the hash can decide
        same = False
    if not same:
        raise TokenizerMismatchError(
            f"student {name}: its tokenizer differs from the store's ({stored.get('name')}, hash "
            f"{str(stored.get('hash'))[:12]}); token-level signals would be read with the wrong ids")


def resolve_student(config: TrainConfig, store: TeacherStore) -> tuple[models.ModelInfo, list[str]]:
    notes = []
    spec = config.student
    if not spec:
        recorded = recorded_student(store)
        spec = recorded["name"] if recorded else models.EMBEDDED_STUDENT
    try:
        info = models.resolve_model(spec, models.EMBEDDED_STUDENT)
    except models.ModelNotFoundError as exc:
        hint = "" if config.student else " (the student the store records; pass --student)"
        raise TrainError(f"{exc}{hint}") from exc
    needs = methods.needs_of(methods.resolve_terms(config.method, config.weights))
    for sequence_set, sections in needs.items():
        init = recorded_model(store, f"{sequence_set}/{methods.STUDENT_INIT}")
        if methods.STUDENT_INIT in sections and init and init.get("sha256") != info.weights_hash:
            notes.append(f"note: DPO's reference sums in the store ({sequence_set}) come from {init['name']}, "
                         f"not from the student being trained ({spec})")
    return info, notes


def count_batches(store: TeacherStore, split: str, needs: dict[str, list[str]], batch_tokens: int, seed: int,
                  epoch: int) -> int:
    """Batches of one epoch, reading base arrays only, in training's order (see module docstring)."""
    base_only = {sequence_set: [] for sequence_set in needs}
    stream = ExampleStream(store, split, base_only, shuffle=True, seed=seed)
    return sum(1 for _ in token_budget_batches(stream.iterate(epoch), batch_tokens))


def prepare(config: TrainConfig) -> Plan:
    """Validate everything that can be validated without loading a model."""
    c = config
    for name, value, low in (("epochs", c.epochs, 1), ("batch_tokens", c.batch_tokens, 1),
                             ("grad_accum", c.grad_accum, 1), ("log_every", c.log_every, 1),
                             ("chunk_size", c.chunk_size, 1)):
        if value < low:
            raise TrainError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    if c.max_steps is not None and c.max_steps < 1:
        raise TrainError(f"--max-steps must be >= 1, got {c.max_steps}")
    if c.save_every is not None and c.save_every < 1:
        raise TrainError(f"--save-every must be >= 1, got {c.save_every}")
    if not 0 <= c.warmup_ratio < 1:
        raise TrainError(f"--warmup-ratio must be in [0, 1), got {c.warmup_ratio}")
    if c.lr <= 0:
        raise TrainError(f"--lr must be > 0, got {c.lr}")
    try:
        terms = methods.resolve_terms(c.method, c.weights)
        c.settings()  # refuses a bad --pad-loss, --pad-alpha, ...
        device = models.resolve_device(c.device)
        dtype = models.resolve_dtype(c.dtype, device)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    if dtype == torch.float16:
        raise TrainError("--dtype float16 is not supported (it needs loss scaling): use bfloat16 or float32")

    store = open_store(c.cache)
    needs = methods.needs_of(terms)
    require_signals(store, c.split, needs, f"method {c.method}")

    out = Path(c.out or default_out(c.method))
    checkpoint = out / CHECKPOINT_DIR / CHECKPOINT_FILE
    if c.resume and not checkpoint.is_file():
        raise TrainError(f"--resume: no checkpoint at {checkpoint}")
    if c.resume:
        check_resumable(json.loads((out / CHECKPOINT_DIR / "config.json").read_text()), c)
    if not c.resume and (checkpoint.is_file() or (out / METRICS_FILE).is_file()):
        raise TrainError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")

    student, notes = resolve_student(c, store)
    tokenizer = models.load_tokenizer(student.path)
    try:
        check_tokenizer(store, tokenizer, student.name)
    except TokenizerMismatchError as exc:
        raise TrainError(str(exc)) from exc

    batches = [count_batches(store, c.split, needs, c.batch_tokens, c.seed, e) for e in range(c.epochs)]
    total = sum(math.ceil(n / c.grad_accum) for n in batches)
    if total == 0:
        raise TrainError(f"{c.cache}: split {c.split!r} has no example with {', '.join(needs)}")
    if c.max_steps is not None:
        total = min(total, c.max_steps)
    warmup = math.ceil(c.warmup_ratio * total)
    return Plan(c, store, terms, needs, student, out, batches, total, warmup, notes)


# --------------------------------------------------------------------------- schedule, checkpoints, records


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor of step s (0-based): linear warmup, then cosine decay (see module docstring)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    examples: int = 0  # examples consumed in this epoch
    batches: int = 0  # batches consumed in this epoch


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out: Path, model, optimizer, scheduler, position: Position, config: TrainConfig) -> Path:
    """Write ``out/checkpoint/state.pt`` atomically (temporary file, then rename)."""
    directory = out / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "position": dataclasses.asdict(position), "rng": _rng_state(), "config": dataclasses.asdict(config)}
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")  # before state
    tmp = directory / f".{CHECKPOINT_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    (directory / "position.json").write_text(json.dumps(dataclasses.asdict(position)) + "\n")
    return directory / CHECKPOINT_FILE


def load_checkpoint(out: Path, model, optimizer, scheduler, config: TrainConfig) -> Position:
    state = torch.load(out / CHECKPOINT_DIR / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    check_resumable(state["config"], config)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Position(**state["position"])


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that change the trajectory (see TRAJECTORY_KEYS)."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)  # keys older runs did not have
                if f.default is not dataclasses.MISSING}
    saved = {k: saved.get(k, defaults.get(k)) for k in TRAJECTORY_KEYS}
    differ = [k for k in TRAJECTORY_KEYS if _comparable(saved[k]) != _comparable(getattr(config, k))]
    if differ:
        raise TrainError("--resume: the checkpoint was made with other settings: " + ", ".join(
            f"{k} {saved.get(k)!r} (now {getattr(config, k)!r})" for k in differ))


def _comparable(value):
    return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else value


def resolved_config(plan: Plan, dtype: torch.dtype, device: str) -> dict:
    """The options (reusable with ``--config``) and, under ``resolved``, what they resolved to."""
    c = plan.config
    options = dataclasses.asdict(c)
    options["out"] = str(plan.out)
    options.pop("resume")
    options.pop("progress")
    return {
        **options,
        "resolved": {
            "store": {"location": plan.store.location, "tokenizer": plan.store.attrs.get("tokenizer", {}),
                      "teacher": recorded_teacher(plan.store)},
            "student": {"name": plan.student.name, "path": plan.student.path, "sha256": plan.student.weights_hash},
            "terms": {t.name: t.weight for t in plan.terms},
            "needs": plan.needs,
            "settings": dataclasses.asdict(c.settings()),
            "batches_per_epoch": plan.batches_per_epoch,
            "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps,
            "device": device,
            "dtype": str(dtype).replace("torch.", ""),
            "versions": {"torch": str(torch.__version__), "transformers": _version("transformers"),
                         "distill-cache": _version("distill-cache")},
        },
    }


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint being resumed (they will be logged again)."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Total and per-term losses against the step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4))
    if records:
        steps = [r["step"] for r in records]
        ax.plot(steps, [r["loss"] for r in records], label="loss (weighted total)", linewidth=2, color="black")
        for name in records[-1].get("terms", {}):
            ax.plot(steps, [r["terms"].get(name, float("nan")) for r in records], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def save_model(out: Path, model, tokenizer) -> None:
    """A directory ``AutoModelForCausalLM.from_pretrained`` loads as is (generation config included)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


class Meter:
    """Sums between two log records: each optimizer step's loss and terms, tokens read, time."""

    def __init__(self, term_names: list[str]):
        self.term_names = term_names
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.loss, self.terms, self.steps, self.tokens, self.since = 0.0, dict.fromkeys(self.term_names, 0.0), 0, 0, now

    def add_batch(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], tokens: int, share: float) -> None:
        """One batch, ``share`` of its optimizer step (1 / batches in the step)."""
        self.loss += float(loss.detach()) * share
        for name, value in parts.items():
            self.terms[name] += float(value.detach()) * share
        self.tokens += tokens

    def record(self, **fields) -> dict:
        """Means per optimizer step since the last record; tokens/s = non-padding tokens read per second."""
        now, n = time.perf_counter(), max(self.steps, 1)
        record = {**fields, "loss": self.loss / n, "terms": {k: v / n for k, v in self.terms.items()},
                  "tokens_per_s": self.tokens / max(now - self.since, 1e-9)}
        self._reset(now)
        return record


# --------------------------------------------------------------------------- the loop


def train(config: TrainConfig, *, stop_after: int | None = None) -> Path:
    """Train, writing the model, metrics.jsonl, config.yaml, loss_curves.png and checkpoints to the out dir.

    ``stop_after``: leave (after writing a checkpoint) once this many steps were made in
    this call, as an interrupted or time-boxed job would; ``resume`` continues.
    Returns the output directory.
    """
    from tqdm.auto import tqdm

    plan = prepare(config)
    c, out = plan.config, plan.out
    for note in plan.notes:
        print(note, file=sys.stderr)
    device = models.resolve_device(c.device)
    dtype = models.resolve_dtype(c.dtype, device)
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    settings = c.settings()

    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    random.seed(c.seed)
    model, tokenizer, _ = models.load_model(plan.student.path, device=device, dtype="float32")
    methods.check_output_layer(model)
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, plan.warmup_steps))

    out.mkdir(parents=True, exist_ok=True)
    position = Position()
    if c.resume:
        position = load_checkpoint(out, model, optimizer, scheduler, c)
        _truncate_metrics(out / METRICS_FILE, position.step)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(resolved_config(plan, dtype, device), sort_keys=False))

    stream = ExampleStream(plan.store, c.split, plan.needs, shuffle=True, seed=c.seed)
    started_at, stopped = position.step, False
    meter = Meter([t.name for t in plan.terms])
    bar = tqdm(total=plan.total_steps, initial=position.step, desc=f"train {c.method}", unit="step",
               disable=not c.progress, dynamic_ncols=True)
    with open(out / METRICS_FILE, "a") as metrics:
        while not stopped and position.step < plan.total_steps and position.epoch < c.epochs:
            epoch_batches = plan.batches_per_epoch[position.epoch]
            examples = stream.iterate(position.epoch, skip=position.examples)
            for batch_examples in token_budget_batches(examples, c.batch_tokens):
                step_start = position.batches - position.batches % c.grad_accum
                in_step = min(c.grad_accum, epoch_batches - step_start)  # batches in this optimizer step
                batch = collate(batch_examples, pad_id).to(device)
                with autocast:
                    loss, parts = methods.method_loss(model, batch, plan.terms, settings, c.chunk_size)
                if loss.requires_grad:
                    (loss / in_step).backward()
                meter.add_batch(loss, parts, int(batch.attention_mask.sum()), 1 / in_step)
                position.examples += len(batch_examples)
                position.batches += 1
                if position.batches - step_start < in_step:
                    continue  # accumulate

                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                meter.steps += 1
                bar.update(1)

                last = position.step >= plan.total_steps
                if position.step % c.log_every == 0 or position.step == 1 or last:
                    record = meter.record(step=position.step, epoch=position.epoch, lr=lr, grad_norm=float(grad_norm))
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                stopped = stop_after is not None and position.step - started_at >= stop_after
                if (c.save_every and position.step % c.save_every == 0) or stopped:
                    save_checkpoint(out, model, optimizer, scheduler, position, c)
                if last or stopped:
                    break
            if position.batches >= epoch_batches:  # the epoch ran to its end
                if position.batches != epoch_batches:
                    raise TrainError(f"{c.cache}: epoch {position.epoch} gave {position.batches} batches, "
                                     f"{epoch_batches} were counted; was the store changed during training?")
                position = Position(step=position.step, epoch=position.epoch + 1)
    bar.close()

    if not stopped:
        save_checkpoint(out, model, optimizer, scheduler, position, c)
        save_model(out, model, tokenizer)
    plot_losses(out / METRICS_FILE, out / CURVES_FILE)
    return out
