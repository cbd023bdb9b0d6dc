"""Checkpoints: where a run stands, saved atomically, and resumed only with the same trajectory.

A checkpoint (``out/checkpoint/state.pt``, replaced atomically) holds the model,
optimizer and scheduler states, the :class:`Position` (step, epoch, examples and
batches consumed in that epoch), the RNG states and the configuration.
``ExampleStream.iterate(epoch, skip=examples)`` replays the same order from that
point and batches restart at a batch boundary, so a resumed run follows the
uninterrupted one exactly. Settings that change the trajectory
(:data:`TRAJECTORY_KEYS`) must match; ``config.json`` beside the state lets
pre-flight check them before anything loads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm import options

from .config import LOSS_SETTINGS, TrainConfig, TrainError

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
CONFIG_JSON = "config.json"

#: settings that change what a run computes (every loss setting among them); a resumed run must match them
TRAJECTORY_KEYS = ("cache", "split", "method", "weights", *LOSS_SETTINGS, "epochs", "max_steps", "lr", "batch_tokens",
                   "grad_accum", "seed", "warmup_ratio", "max_grad_norm", "weight_decay")


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    examples: int = 0  # examples consumed in this epoch
    batches: int = 0  # batches consumed in this epoch


def state_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR / CHECKPOINT_FILE


def saved_config(out: Path) -> dict:
    """The configuration the checkpoint in ``out`` was made with (readable without torch.load)."""
    return json.loads((out / CHECKPOINT_DIR / CONFIG_JSON).read_text())


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
    (directory / CONFIG_JSON).write_text(json.dumps(dataclasses.asdict(config), indent=1) + "\n")  # before state
    tmp = directory / f".{CHECKPOINT_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    (directory / "position.json").write_text(json.dumps(dataclasses.asdict(position)) + "\n")
    return directory / CHECKPOINT_FILE


def load_checkpoint(out: Path, model, optimizer, scheduler, config: TrainConfig) -> Position:
    state = torch.load(state_path(out), map_location="cpu", weights_only=False)
    check_resumable(state["config"], config)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return Position(**state["position"])


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that change the trajectory (see TRAJECTORY_KEYS)."""
    defaults = options.field_defaults(TrainConfig)  # for keys older runs did not have
    saved = {k: saved.get(k, defaults.get(k)) for k in TRAJECTORY_KEYS}
    differ = [k for k in TRAJECTORY_KEYS if _comparable(saved[k]) != _comparable(getattr(config, k))]
    if differ:
        raise TrainError("--resume: the checkpoint was made with other settings: " + ", ".join(
            f"{k} {saved.get(k)!r} (now {getattr(config, k)!r})" for k in differ))


def _comparable(value):
    return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else value
