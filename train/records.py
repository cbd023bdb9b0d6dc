"""What a run leaves in its directory besides checkpoints: metrics, loss curves, its configuration, the model.

- ``metrics.jsonl``: one record per logged optimizer step (:class:`Meter`): the step,
  epoch, learning rate, gradient norm, the weighted loss and each term's unweighted
  value (means over the steps since the last record), tokens per second;
- ``loss_curves.png``: those losses against the step (:func:`plot_losses`);
- with ``--report-to tensorboard``, the same scalars as TensorBoard events in
  ``tensorboard/`` (:class:`TensorBoard`): ``train/loss``, ``train/terms/<term>``,
  ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ``train/epoch``;
- ``config.yaml``: the options, reusable as ``train student --config``, and under
  ``resolved`` what they resolved to (:func:`resolved_config`); never a credential: the
  store's location without one and every ``--storage-option`` value redacted
  (:func:`train.config.recorded_settings`; give them again when reusing the file);
- the model and tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained`` (:func:`save_model`).

Every file is written so that a kill at any moment leaves either its previous
content or its new one (:func:`write_atomically`, staged model files), except
``metrics.jsonl``, which is appended to: a kill there can cut its last record,
which :func:`read_metrics` then ignores (``train.checkpoint`` lists what each
kill leaves and how a run continues). TensorBoard's event files are appended to as
well; a resumed run drops the events after its checkpoint's step (``purge_step``).

On several processes only rank 0 writes any of them; the records hold the means
over every process's batches (:class:`Meter` with ``reduce``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from store.locations import redact_url

from .config import LOSS_SETTINGS, recorded_settings

if TYPE_CHECKING:
    from .preflight import Plan

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CURVES_FILE = "loss_curves.png"
MODEL_FILE = "model.safetensors"
#: where :func:`save_model` writes the model before moving its files into the run's directory
MODEL_STAGING = ".model.partial"
#: ``--report-to tensorboard``'s event files
TENSORBOARD_DIR = "tensorboard"


def temporary_path(path: Path) -> Path:
    """``dir/.NAME.tmp``: where :func:`write_atomically` writes ``dir/NAME`` before renaming it."""
    return path.with_name(f".{path.name}.tmp")


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a kill leaves the old file or the new."""
    tmp = temporary_path(path)
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


class Meter:
    """Sums between two log records: each optimizer step's loss and terms, tokens read, time.

    ``reduce``: sums a list of numbers over the run's processes (:meth:`train.distributed.Context.sum`,
    the identity on one; every process calls :meth:`record` at the same steps); each process adds its
    batches' shares of the global means, so the reduced sums are the global means.
    """

    def __init__(self, term_names: list[str], reduce=None):
        self.term_names, self.reduce = term_names, reduce
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self.loss, self.terms, self.steps, self.tokens, self.since = 0.0, dict.fromkeys(self.term_names, 0.0), 0, 0, now

    def add_batch(self, loss: torch.Tensor, parts: dict[str, torch.Tensor], tokens: int, share: float) -> None:
        """One batch, ``share`` of its optimizer step (1 / batches in the step)."""
        self.loss += float(loss.detach()) * share
        for name, value in parts.items():
            self.terms[name] += float(value.detach()) * share
        self.tokens += tokens

    def partial(self) -> dict:
        """The loss and term sums since the last record, over every process (a collective on several: every
        process calls it at the same steps), and the steps they cover: what a checkpoint keeps, so that the
        first record of a resumed run averages the same steps as the uninterrupted run's (tokens and time are
        this process's run's own and start again)."""
        values = [self.loss, *self.terms.values()]
        if self.reduce is not None:
            values = self.reduce(values)
        return {"steps": int(self.steps), "loss": float(values[0]),
                "terms": {name: float(v) for name, v in zip(self.terms, values[1:])}}

    def restore(self, saved: dict, main: bool) -> None:
        """Go on from a checkpoint's :meth:`partial`: the sums (held by the ``main`` process only, since records
        sum the processes' shares) and their steps."""
        self.steps = int(saved.get("steps", 0))
        if main:
            self.loss = float(saved.get("loss", 0.0))
            for name, value in (saved.get("terms") or {}).items():
                if name in self.terms:
                    self.terms[name] = float(value)

    def record(self, **fields) -> dict:
        """Means per optimizer step since the last record; tokens/s = non-padding tokens read per second."""
        if self.reduce is not None:
            summed = self.reduce([self.loss, *self.terms.values(), float(self.tokens)])
            self.loss, self.terms, self.tokens = summed[0], dict(zip(self.terms, summed[1:-1])), summed[-1]
        now, n = time.perf_counter(), max(self.steps, 1)
        record = {**fields, "loss": self.loss / n, "terms": {k: v / n for k, v in self.terms.items()},
                  "tokens_per_s": self.tokens / max(now - self.since, 1e-9)}
        self._reset(now)
        return record


def record_scalars(record: dict) -> dict[str, float]:
    """A metrics record's numbers as TensorBoard scalars: ``train/<key>``, terms as ``train/terms/<term>``."""
    scalars = {f"train/{key}": float(value) for key, value in record.items()
               if key not in ("step", "terms") and isinstance(value, (int, float))}
    scalars.update({f"train/terms/{name}": float(value) for name, value in record.get("terms", {}).items()})
    return scalars


class TensorBoard:
    """``--report-to tensorboard``: each metrics record's scalars (:func:`record_scalars`) at its step, in
    ``out/tensorboard``. ``purge_step``: a resumed run's first step; events from it on are dropped by readers."""

    def __init__(self, out: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # torch's writer needs the tensorboard package
            raise RuntimeError(f"--report-to tensorboard needs the tensorboard package ({exc}): "
                               f"pip install tensorboard") from exc
        self.writer = SummaryWriter(log_dir=str(out / TENSORBOARD_DIR), purge_step=purge_step)

    def write(self, record: dict) -> None:
        for name, value in record_scalars(record).items():
            self.writer.add_scalar(name, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of ``metrics.jsonl``; a last line without its newline (a record cut by a kill) is left out."""
    if not path.is_file():
        return []
    text = path.read_text()
    lines = text.split("\n")[:-1]  # every complete line ends with "\n"; what follows the last one was cut
    return [json.loads(line) for line in lines if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after the checkpoint being resumed (they will be logged again), atomically."""
    kept = [r for r in read_metrics(path) if r["step"] <= last_step]
    write_atomically(path, "".join(json.dumps(r) + "\n" for r in kept))


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
    tmp = temporary_path(png_path)
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    os.replace(tmp, png_path)


def resolved_config(plan: "Plan") -> dict:
    """The options (reusable with ``--config``, one key each) and, under ``resolved``, what they resolved to."""
    config = plan.config
    options = recorded_settings(config)
    options["out"] = str(plan.out)
    options.pop("resume")
    options.pop("progress")
    return {
        **options,
        "resolved": {
            "store": {"location": redact_url(plan.store.location), "tokenizer": plan.store.tokenizer.to_dict(),
                      "teacher": plan.teacher.to_dict() if plan.teacher else None},
            "student": {"name": plan.student.name, "path": plan.student.path, "sha256": plan.student.weights_hash},
            "terms": {t.name: t.weight for t in plan.terms},
            "needs": plan.needs,
            "settings": {name: options[name] for name in LOSS_SETTINGS},
            "batches_per_epoch": plan.batches_per_epoch,
            "total_steps": plan.total_steps,
            "warmup_steps": plan.warmup_steps,
            "device": plan.device,
            "dtype": str(plan.dtype).replace("torch.", ""),
            "processes": processes(plan),
            "versions": {"torch": str(torch.__version__), "transformers": _version("transformers"),
                         "distill-cache": _version("distill-cache")},
        },
    }


def processes(plan: "Plan") -> dict:
    """How many processes train, how (ddp, fsdp; none for one), the batches of each one's share per epoch, and
    the most padded tokens one optimizer step takes: processes x grad_accum x batch_tokens."""
    config, world = plan.config, plan.shard.world
    return {"world_size": world, "parallel": plan.parallel, "batches_per_rank": plan.rank_batches,
            "step_tokens": world * config.grad_accum * config.batch_tokens}


def save_config(plan: "Plan") -> None:
    """``config.yaml`` in the run's directory (:func:`resolved_config`)."""
    write_atomically(plan.out / CONFIG_FILE, yaml.safe_dump(resolved_config(plan), sort_keys=False))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def save_model(out: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """A directory ``AutoModelForCausalLM.from_pretrained`` loads as is (generation config included).

    The files are written into ``out/.model.partial`` first, then each is renamed into
    ``out`` (weights last) and the staging directory removed: a kill leaves no
    truncated file in ``out``, and a staging directory or a missing weights file says
    the model is not complete (:func:`model_complete`; ``--resume`` writes it again).
    ``state_dict``: the weights to write instead of the model's own (a sharded model's, gathered).
    """
    staging = out / MODEL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(staging)
    # the weights last (a sharded model's index after its shards): their presence says the rest is there
    names = sorted(os.listdir(staging), key=lambda name: (name.endswith(".index.json"), ".safetensors" in name))
    for name in names:
        os.replace(staging / name, out / name)
    staging.rmdir()


def model_complete(out: Path) -> bool:
    """Whether :func:`save_model` ran to its end in ``out``."""
    weights = (out / MODEL_FILE).is_file() or (out / f"{MODEL_FILE}.index.json").is_file()
    return weights and not (out / MODEL_STAGING).exists()
