"""``train cyclealign``: R rounds of CycleAlign end to end, sample -> rank -> train, resumable.

Round r (1-based) under ``--out DIR``::

    DIR/round-r/samples.zarr   precompute sample   the round's student samples n responses per prompt
                               precompute rank     the black box ranks each group; agreement with the student
                                                   (round r > 1: the demonstrations include round r-1's best
                                                   agreements, --demos-from DIR/round-(r-1)/samples.zarr)
    DIR/round-r/model          train student       --method cyclealign (RRHF + SFT on the top) from that student

Round 1 starts from ``--student``; round r from round r-1's model. The two
``precompute`` steps run as the commands themselves (a subprocess each, so
``train`` never imports ``precompute``); every step resumes where it stopped
(complete parts are skipped, a training run with a checkpoint continues), so
the same command after a kill goes on at the first unfinished step.
``--storage-option`` values reach every step (the ``precompute`` processes on their
command line, as the user gave them to this one: never through a file), and are
recorded by none (:mod:`train.records`).
See :mod:`precompute.rank` and ``docs/methods.md`` for what is the paper's and
what is this project's reconstruction.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from lm.options import BatchTokensOption, DataOptions, ProgressOption, RunOptions, comma_list, setting

from .config import TrainConfig, TrainError

ROUND_DIR = "round-{r}"
SAMPLES = "samples.zarr"
MODEL = "model"


@dataclass(frozen=True, kw_only=True)
class CycleAlignConfig(DataOptions, RunOptions, BatchTokensOption, ProgressOption):
    """Settings of ``train cyclealign``; each field is also its command-line option."""

    out: str = setting(help="Folder holding every round's store and model.", required=True)
    judge: str = setting(help="The black box (as `precompute rank --judge`): local:MODEL or an OpenAI-compatible "
                              "base URL.", required=True)
    judge_model: str | None = setting(None, "Model name the HTTP judge serves.")
    judge_api_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the HTTP judge's API key.")
    rounds: int = setting(3, "Rounds of sample -> rank -> train.", type=click.IntRange(min=1))
    student: str | None = setting(None, "The first round's student [embedded demo student].")
    splits: tuple[str, ...] = setting(("train",), "Comma list of splits to sample and rank (training uses train).",
                                      flag="--split", parse=comma_list)
    n: int = setting(4, "Responses sampled per prompt.", type=click.IntRange(min=2))
    temperature: float = setting(1.0, "Sampling temperature.", type=click.FloatRange(min=0, min_open=True))
    max_new_tokens: int = setting(64, "Length limit of each sampled response.", type=click.IntRange(min=1))
    demos: int = setting(2, "Dynamic demonstrations per request from the previous round.",
                         type=click.IntRange(min=0))
    tries: int = setting(3, "Requests per group before it stays unranked.", type=click.IntRange(min=1))
    method: str = setting("cyclealign", "Training method on the agreed rankings: cyclealign (RRHF + SFT), rrhf, pro.",
                          type=click.Choice(["cyclealign", "rrhf", "pro"]))
    lr: float = setting(1e-5, "Peak learning rate of each round's training.",
                        type=click.FloatRange(min=0, min_open=True))
    epochs: int = setting(1, "Epochs per round.", type=click.IntRange(min=1))
    max_steps: int | None = setting(None, "Optimizer steps per round [every epoch].", type=click.IntRange(min=1))
    seed: int = setting(0, "Seed of sampling (round r adds r - 1), shuffles and training.", type=int)

    def round_dir(self, r: int) -> Path:
        return Path(self.out) / ROUND_DIR.format(r=r)


def _common(config: CycleAlignConfig) -> list[str]:
    args = ["--split", ",".join(config.splits), "--device", config.device, "--dtype", config.dtype]
    if config.dataset:
        args += ["--dataset", config.dataset]
    if config.limit:
        args += ["--limit", str(config.limit)]
    if not config.progress:
        args.append("--no-progress")
    return args + storage_args(config.storage_options)


def storage_args(storage_options: dict) -> list[str]:
    """``--storage-option KEY=VALUE`` for each option, each value as JSON: what
    :func:`store.locations.parse_storage_options` reads back into the same option (type included)."""
    args = []
    for key, value in (storage_options or {}).items():
        args += ["--storage-option", f"{key}={json.dumps(value)}"]
    return args


def _precompute(command: str, args: list[str]) -> None:
    """Run ``precompute COMMAND ARGS`` as its own process; a failure stops the rounds with its message."""
    done = subprocess.run([sys.executable, "-m", "precompute.cli", command, *args])
    if done.returncode != 0:
        raise TrainError(f"`precompute {command}` ended with status {done.returncode} (its message is above); "
                         f"the same `train cyclealign` command resumes from this step")


def trained(model_dir: Path) -> bool:
    """A round's training finished: its model directory was written (weights last)."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def run_rounds(config: CycleAlignConfig, train) -> list[Path]:
    """Every round in order, each step skipped or resumed when already (partly) done; the rounds' model dirs.

    ``train``: the function that trains a student from a :class:`TrainConfig` (``train.trainer.train``).
    """
    student = config.student
    models = []
    for r in range(1, config.rounds + 1):
        folder = config.round_dir(r)
        folder.mkdir(parents=True, exist_ok=True)
        samples, model_dir = folder / SAMPLES, folder / MODEL
        if not trained(model_dir):
            sample_args = ["--out", str(samples), "--n", str(config.n), "--keep", str(config.n),
                           "--temperature", str(config.temperature), "--max-new-tokens", str(config.max_new_tokens),
                           "--seed", str(config.seed + r - 1), *_common(config)]
            _precompute("sample", sample_args + (["--model", student] if student else []))
            rank_args = ["--out", str(samples), "--judge", config.judge, "--judge-api-key-env",
                         config.judge_api_key_env, "--tries", str(config.tries), "--demos", str(config.demos),
                         "--seed", str(config.seed), *_common(config)]
            if config.judge_model:
                rank_args += ["--judge-model", config.judge_model]
            if r > 1:
                rank_args += ["--demos-from", str(config.round_dir(r - 1) / SAMPLES)]
            _precompute("rank", rank_args + (["--student", student] if student else []))
            resume = (model_dir / "checkpoint" / "state.pt").is_file()
            train(TrainConfig(cache=str(samples), method=config.method, student=student, out=str(model_dir),
                              lr=config.lr, epochs=config.epochs, max_steps=config.max_steps,
                              batch_tokens=config.batch_tokens, seed=config.seed, device=config.device,
                              dtype=config.dtype, resume=resume, progress=config.progress,
                              storage_options=config.storage_options))
        models.append(model_dir)
        student = str(model_dir)
    return models
