"""Checkpoints: where a run stands, saved atomically, resumed only with the same trajectory, loaded as data only.

A checkpoint (``out/checkpoint/state.pt``, replaced atomically) holds the model,
optimizer and scheduler states, the :class:`Position` (step, epoch, examples and
batches consumed in that epoch), the RNG states, the configuration and the
metrics' sums since the last logged record (``meter``: a resumed run's first
record then averages the same steps as the uninterrupted run's).
``ExampleStream.iterate(epoch, skip=examples)`` replays the same order from that
point and batches restart at a batch boundary, so a resumed run follows the
uninterrupted one exactly. Settings that change the trajectory
(:data:`TRAJECTORY_KEYS`) must match; ``config.json`` beside the state lets
pre-flight check them before anything loads.

Several processes (:mod:`train.distributed`): rank 0 writes the checkpoint, with the
full model and optimizer states (gathered under FSDP; the optimizer's by parameter
name) and, under ``processes``, the number of processes and each one's examples
consumed in the epoch and RNG state (:func:`process_states`). Every process reads it
and takes its own position (:func:`resume`); a run of another
number of processes is refused (:func:`check_processes`), its shares would differ.
``config.json`` records the number of processes as ``world_size`` (absent: one).

Loading never runs code: ``torch.load(weights_only=True)`` accepts tensors and
plain values (dicts, lists, tuples, strings, numbers, None) and refuses anything
else with a :class:`TrainError` (:func:`read_state`). The state holds nothing
else (numpy's RNG state is kept as a tensor and plain values); checkpoints
written before that, with numpy's state as an array, load through a narrow
allow-list: numpy's array reconstruction, ``ndarray`` and the uint32 dtype.

What a kill leaves, and how the run goes on. ``train student`` writes ``config.yaml``,
then per logged step a record appended to ``metrics.jsonl``, per checkpoint
``checkpoint/config.json`` then ``checkpoint/state.pt`` (then ``position.json``,
informative), and at the end the model and ``loss_curves.png``. Every file but
``metrics.jsonl`` is written to a temporary and renamed into place, so a kill leaves
its old content or its new one; a record of ``metrics.jsonl`` cut by a kill is
ignored when the file is read.

- Killed before the first checkpoint is complete (``config.yaml``, records of the
  first steps, perhaps ``checkpoint/config.json`` and ``checkpoint/.state.pt.tmp``,
  no ``state.pt``): nothing to resume. The same command without ``--resume`` starts
  afresh: it prints a note naming what the stopped run left and replaces it
  (:func:`unfinished_files`, :func:`discard_unfinished`); ``--resume`` is refused
  with a message that says so.
- Killed after a checkpoint, or while writing a later one (``state.pt`` is the last
  complete checkpoint; records logged after it; ``position.json`` perhaps one
  checkpoint behind): ``--resume`` continues from it and logs the later steps again
  (their records are dropped first); without ``--resume`` the directory is refused
  as holding a run.
- Killed after the final checkpoint, while writing the model (``.model.partial/`` or
  some of its files already moved into place): ``--resume`` writes the model
  without training a step; without it the refusal says that the model is
  incomplete and how to finish it.
- Finished: ``--resume`` only writes the model again; without it, refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm import options
from store.locations import redact_url

from .config import LOSS_SETTINGS, TrainConfig, TrainError, recorded_settings
from .records import CONFIG_FILE, CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR, temporary_path, write_atomically

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "state.pt"
CONFIG_JSON = "config.json"
POSITION_JSON = "position.json"

#: settings that change what a run computes (every loss setting among them); a resumed run must match them
#: (``epochs`` only without ``max_steps``, which overrides it)
TRAJECTORY_KEYS = ("cache", "split", "method", "weights", *LOSS_SETTINGS, "epochs", "max_steps", "lr", "batch_tokens",
                   "grad_accum", "seed", "warmup_ratio", "max_grad_norm", "weight_decay")

#: what a checkpoint's state holds
STATE_KEYS = ("model", "optimizer", "scheduler", "position", "rng", "config")


@dataclass
class Position:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    examples: int = 0  # examples consumed in this epoch
    batches: int = 0  # batches consumed in this epoch


def state_path(out: Path) -> Path:
    return out / CHECKPOINT_DIR / CHECKPOINT_FILE


def has_checkpoint(out: Path) -> bool:
    """Whether ``out`` holds a complete checkpoint (``state.pt`` only ever appears complete)."""
    return state_path(out).is_file()


def unfinished_files(out: Path) -> list[str]:
    """Files (relative to ``out``) that a run stopped before its first checkpoint leaves, and a fresh start replaces.

    Only meaningful when ``out`` has no checkpoint.
    """
    candidates = [name for file in (METRICS_FILE, CONFIG_FILE, CURVES_FILE)
                  for name in (file, temporary_path(Path(file)).name)]
    for folder in (CHECKPOINT_DIR, TENSORBOARD_DIR):  # checkpoint files; --report-to tensorboard's events
        if (out / folder).is_dir():
            candidates += [f"{folder}/{name}" for name in sorted(os.listdir(out / folder))]
    return [name for name in candidates if (out / name).is_file()]


def discard_unfinished(out: Path) -> None:
    """Before a fresh start in ``out`` (no checkpoint): remove what a stopped run's checkpoint writing left
    (``checkpoint/``'s files), its TensorBoard events and the temporaries of the run's files; ``metrics.jsonl`` is
    replaced by the trainer."""
    if has_checkpoint(out):
        raise TrainError(f"{out} holds a checkpoint; refusing to discard it")
    for directory in (out / CHECKPOINT_DIR, out / TENSORBOARD_DIR):
        if directory.is_dir():
            for name in os.listdir(directory):
                if (directory / name).is_file():
                    (directory / name).unlink()
    for name in (METRICS_FILE, CONFIG_FILE, CURVES_FILE):
        temporary_path(out / name).unlink(missing_ok=True)


def saved_config(out: Path) -> dict:
    """The configuration the checkpoint in ``out`` was made with (``config.json``, readable without the state).

    ``config.json`` is written, atomically, before each state; should it be unreadable
    anyway (a checkpoint of an older version), the configuration inside the state is used.
    """
    try:
        return json.loads((out / CHECKPOINT_DIR / CONFIG_JSON).read_text())
    except (OSError, ValueError):
        return read_state(state_path(out), mmap=True)["config"]


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, Python, CUDA), as a checkpoint keeps them (plain data)."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Set this process's RNG states from :func:`rng_state`'s (or an older checkpoint's, numpy's as an array)."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    np.random.set_state(numpy_state)  # a tuple with an array: a checkpoint of an older version
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def process_states(examples: list[int], rngs: list[dict]) -> dict:
    """What a checkpoint of several processes adds (``state["processes"]``): their number, and per process (in
    rank order) the examples it consumed in the epoch and its RNG state; the optimizer state is by name."""
    return {"world_size": len(examples), "examples": [int(n) for n in examples], "rng": rngs,
            "optimizer_keys": "names"}


def write_checkpoint(out: Path, model_state: dict, optimizer_state: dict, scheduler, position: Position,
                     config: TrainConfig, processes: dict | None = None, meter: dict | None = None) -> Path:
    """Write ``out/checkpoint/state.pt`` atomically (temporary file, then rename), its ``config.json`` first.

    The model's and the optimizer's states are whole (of several processes: gathered on rank 0, with
    ``processes``, :func:`process_states`; of one process: None, and its RNG state is taken here).
    ``meter``: the metrics' sums since the last record (:meth:`train.records.Meter.partial`).
    """
    directory = out / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    settings = recorded_settings(config)  # no credential: cache redacted, storage option values replaced
    if processes is not None:
        settings["world_size"] = processes["world_size"]
    state = {"model": model_state, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
             "position": dataclasses.asdict(position), "rng": processes["rng"][0] if processes else rng_state(),
             "config": settings}
    if processes is not None:
        state["processes"] = processes
    if meter is not None:
        state["meter"] = meter
    write_atomically(directory / CONFIG_JSON, json.dumps(settings, indent=1) + "\n")
    tmp = temporary_path(directory / CHECKPOINT_FILE)
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_FILE)
    where = dataclasses.asdict(position)
    if processes is not None:
        where["examples"] = processes["examples"]  # each process's
    write_atomically(directory / POSITION_JSON, json.dumps(where) + "\n")  # informative
    return directory / CHECKPOINT_FILE


def _older_numpy_rng_globals() -> list:
    """What numpy's RNG state as an array needs: its reconstruction, ``ndarray``, ``dtype``, the uint32 dtype."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_state(path: Path, *, mmap: bool = False) -> dict:
    """A checkpoint's state, loaded as data only (``weights_only=True``); TrainError for anything else."""
    try:
        with torch.serialization.safe_globals(_older_numpy_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))  # torch names the global it refused
        what = f" ({found.group(1)})" if found else ""
        raise TrainError(f"{path}: refused: it holds a pickled object{what} that loading would have to run as code; "
                         f"a checkpoint of `train student` holds only tensors and plain values, so this file was "
                         f"made or changed by something else. Resume only from a checkpoint you trust the origin "
                         f"of") from None
    except (RuntimeError, EOFError, OSError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainError(f"{path}: not a readable checkpoint ({reason})") from None
    missing = [key for key in STATE_KEYS if key not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing:
        raise TrainError(f"{path}: not a checkpoint of `train student` (it lacks {', '.join(missing)})")
    return state


@dataclass
class Resumed:
    """A checkpoint as one process of a run takes it up: the full states, and this process's position and RNG state."""

    model: dict
    optimizer: dict
    scheduler: dict
    rng: dict
    position: Position
    meter: dict | None = None  # the metrics' sums since the last record; None in checkpoints made before them


def resume(out: Path, config: TrainConfig, shard) -> Resumed:
    """The checkpoint in ``out`` for process ``shard.rank`` of ``shard.world`` (:class:`train.distributed.Shard`),
    refused when its settings (:func:`check_resumable`) or its number of processes (:func:`check_processes`)
    differ from this run's.

    A checkpoint of one process holds its position and RNG state at the top; one of several, each process's
    examples consumed in the epoch and RNG state under ``processes`` (the rest of the position is shared).
    Several processes read the same file: memory-mapped, so that they share its pages.
    """
    state = read_state(state_path(out), mmap=shard.world > 1)
    check_resumable(state["config"], config)
    check_processes(state["config"], shard.world)
    processes = state.get("processes") or {"examples": [state["position"]["examples"]], "rng": [state["rng"]]}
    if not isinstance(processes, dict) or len(processes.get("examples", ())) != shard.world:
        raise TrainError(f"{state_path(out)}: not a checkpoint of {shard.world} processes (it lacks their positions)")
    position = Position(**{**state["position"], "examples": int(processes["examples"][shard.rank])})
    return Resumed(state["model"], state["optimizer"], state["scheduler"], processes["rng"][shard.rank], position,
                   state.get("meter"))


def check_processes(saved: dict, world: int) -> None:
    """Refuse to resume on another number of processes than the checkpoint's (``world_size``, absent: one)."""
    made = int(saved.get("world_size", 1) or 1)
    if made != world:
        how = (f"torchrun --nproc-per-node {made} or accelerate launch --num_processes {made}" if made > 1
               else "one process (no launcher)")
        raise TrainError(f"--resume: the checkpoint was made by {made} process(es), this run has {world}; each "
                         f"process's share of the store, so where it stands, depends on their number: resume "
                         f"on {how}")


def check_resumable(saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings that change the trajectory (see TRAJECTORY_KEYS).

    ``cache`` is compared as recorded, without credentials (:func:`train.config.recorded_settings`);
    ``storage_options`` are not compared: how the store is reached (its credentials among them) does
    not change what it holds, and the resumed command's own options are the ones used.
    """
    defaults = options.field_defaults(TrainConfig)  # for keys older runs did not have
    keys = [k for k in TRAJECTORY_KEYS if not (k == "epochs" and config.max_steps is not None)]
    saved = {k: _comparable(k, saved.get(k, defaults.get(k))) for k in keys}
    now = {k: _comparable(k, getattr(config, k)) for k in keys}
    differ = [k for k in keys if saved[k] != now[k]]
    if differ:
        raise TrainError("--resume: the checkpoint was made with other settings: " + ", ".join(
            f"{k} {saved[k]!r} (now {now[k]!r})" for k in differ))


def _comparable(key: str, value):
    if key == "cache" and isinstance(value, str):
        return redact_url(value)
    return {k: float(v) for k, v in value.items()} if isinstance(value, dict) else value
