"""What a run leaves in its directory besides checkpoints: metrics, loss curves, its configuration, the model.

- ``metrics.jsonl``: one record per logged optimizer step (:class:`Meter`): the step,
  epoch, learning rate, gradient norm, the weighted loss and each term's unweighted
  value (means over the steps since the last record), tokens per second;
- ``loss_curves.png``: those losses against the step (:func:`plot_losses`);
- ``config.yaml``: the options, reusable as ``train student --config``, and under
  ``resolved`` what they resolved to (:func:`resolved_config`);
- the model and tokenizer, loadable by ``AutoModelForCausalLM.from_pretrained`` (:func:`save_model`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import yaml

from .config import LOSS_SETTINGS

if TYPE_CHECKING:
    from .preflight import Plan

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"
CURVES_FILE = "loss_curves.png"


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


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
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


def resolved_config(plan: "Plan") -> dict:
    """The options (reusable with ``--config``, one key each) and, under ``resolved``, what they resolved to."""
    c = plan.config
    options = dataclasses.asdict(c)
    options["out"] = str(plan.out)
    options.pop("resume")
    options.pop("progress")
    return {
        **options,
        "resolved": {
            "store": {"location": plan.store.location, "tokenizer": plan.store.tokenizer.to_dict(),
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
            "versions": {"torch": str(torch.__version__), "transformers": _version("transformers"),
                         "distill-cache": _version("distill-cache")},
        },
    }


def save_config(plan: "Plan") -> None:
    """``config.yaml`` in the run's directory (:func:`resolved_config`)."""
    (plan.out / CONFIG_FILE).write_text(yaml.safe_dump(resolved_config(plan), sort_keys=False))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def save_model(out: Path, model, tokenizer) -> None:
    """A directory ``AutoModelForCausalLM.from_pretrained`` loads as is (generation config included)."""
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
