"""``train cyclealign``: R rounds of CycleAlign end to end, sample -> rank -> train, resumable.

Round r (1-based) under ``--out DIR``::

    DIR/round-r/samples.zarr   precompute sample   the round's student samples n responses per prompt
                               precompute rank     the black box ranks each group; agreement with the student
                                                   (round r > 1: the demonstrations include round r-1's best
                                                   agreements, --demos-from DIR/round-(r-1)/samples.zarr)
    DIR/round-r/model          train student       --method cyclealign (RRHF + SFT on the top) from that student

Round 1 starts from ``--student``; round r from round r-1's model. Each step is
its command's own function called with its command's configuration
(:func:`round_steps`: :func:`precompute.sample.run_sample`,
:func:`precompute.rank.run_rank`, :func:`train.trainer.train`), so an option of
a step reaches it as a field, typed. Every step resumes where it stopped
(complete parts are skipped, a training run with a checkpoint continues), so the
same command after a kill goes on at the first unfinished step.
``--storage-option`` values reach every step as given and are recorded by none
(:mod:`train.records`). See :mod:`precompute.rank` and ``docs/methods.md`` for
what is the paper's and what is this project's reconstruction.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

from lm.options import BatchTokensOption, DataOptions, EngineOptions, ProgressOption, RunOptions, comma_list, setting
from precompute.rank import JudgeOptions, RankConfig, run_rank
from precompute.sample import SampleConfig, run_sample
from train.config import TrainConfig
from train.trainer import train

ROUND_DIR = "round-{r}"
SAMPLES = "samples.zarr"
MODEL = "model"


@dataclass(frozen=True, kw_only=True)
class CycleAlignConfig(JudgeOptions, DataOptions, RunOptions, BatchTokensOption, EngineOptions, ProgressOption):
    """Settings of ``train cyclealign``; each field is also its command-line option (the judge's and the data's
    are passed on to ``precompute rank`` and ``precompute sample``; ``--engine`` to ``precompute sample``, whose
    sampling is the rounds' generation)."""

    out: str = setting(help="Folder holding every round's store and model.", required=True)
    rounds: int = setting(3, "Rounds of sample -> rank -> train.", type=click.IntRange(min=1))
    student: str | None = setting(None, "The first round's student [embedded demo student].")
    splits: tuple[str, ...] = setting(("train",), "Comma list of splits to sample and rank (training uses train).",
                                      flag="--split", parse=comma_list)
    n: int = setting(4, "Responses sampled per prompt.", type=click.IntRange(min=2))
    temperature: float = setting(1.0, "Sampling temperature.", type=click.FloatRange(min=0, min_open=True))
    max_new_tokens: int = setting(64, "Length limit of each sampled response.", type=click.IntRange(min=1))
    method: str = setting("cyclealign", "Training method on the agreed rankings: cyclealign (RRHF + SFT), rrhf, pro.",
                          type=click.Choice(["cyclealign", "rrhf", "pro"]))
    lr: float = setting(1e-5, "Peak learning rate of each round's training.",
                        type=click.FloatRange(min=0, min_open=True))
    epochs: int = setting(1, "Epochs per round.", type=click.IntRange(min=1))
    max_steps: int | None = setting(None, "Optimizer steps per round [every epoch].", type=click.IntRange(min=1))
    seed: int = setting(0, "Seed of sampling (round r adds r - 1), shuffles and training.", type=int)

    def round_dir(self, r: int) -> Path:
        return Path(self.out) / ROUND_DIR.format(r=r)


@dataclass(frozen=True)
class RoundSteps:
    """The configurations of one round's three steps."""

    sample: SampleConfig
    rank: RankConfig
    train: TrainConfig


def _shared(config: CycleAlignConfig, *option_sets) -> dict:
    """The fields of ``option_sets`` as ``config`` holds them: what a step takes unchanged."""
    return {f.name: getattr(config, f.name) for option_set in option_sets for f in dataclasses.fields(option_set)}


def round_steps(config: CycleAlignConfig, r: int, student: str | None) -> RoundSteps:
    """Round ``r``'s steps, from ``student`` (None: the embedded demo student); ``--batch-tokens`` is training's
    (the white box's sums in ``precompute rank`` keep that command's default)."""
    samples, model_dir = config.round_dir(r) / SAMPLES, config.round_dir(r) / MODEL
    data_and_run = _shared(config, DataOptions, RunOptions, ProgressOption)
    sample = SampleConfig(out=str(samples), model=student, n=config.n, keep=config.n, temperature=config.temperature,
                          max_new_tokens=config.max_new_tokens, seed=config.seed + r - 1, **data_and_run,
                          **_shared(config, EngineOptions))
    rank = RankConfig(out=str(samples), student=student, seed=config.seed,
                      demos_from=str(config.round_dir(r - 1) / SAMPLES) if r > 1 else None,
                      **_shared(config, JudgeOptions), **data_and_run)
    trainer = TrainConfig(cache=str(samples), method=config.method, student=student, out=str(model_dir), lr=config.lr,
                          epochs=config.epochs, max_steps=config.max_steps, batch_tokens=config.batch_tokens,
                          seed=config.seed, resume=(model_dir / "checkpoint" / "state.pt").is_file(),
                          **_shared(config, RunOptions, ProgressOption))
    return RoundSteps(sample, rank, trainer)


def trained(model_dir: Path) -> bool:
    """A round's training finished: its model directory was written (weights last)."""
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def run_rounds(config: CycleAlignConfig, echo: Callable[[str], None] | None = None) -> list[Path]:
    """Every round in order, each step skipped or resumed when already (partly) done; the rounds' model dirs.

    ``echo``: where the two ``precompute`` steps' summaries go (as their commands print them).
    """
    student = config.student
    models = []
    for r in range(1, config.rounds + 1):
        model_dir = config.round_dir(r) / MODEL
        if not trained(model_dir):
            config.round_dir(r).mkdir(parents=True, exist_ok=True)
            steps = round_steps(config, r, student)
            for run_step, step_config in ((run_sample, steps.sample), (run_rank, steps.rank)):
                summary = run_step(step_config)
                if echo is not None:
                    echo("\n".join(summary.lines()))
            train(steps.train)
        models.append(model_dir)
        student = str(model_dir)
    return models
