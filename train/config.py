"""The settings of ``train student`` and ``train evaluate``, each declared once.

- :class:`train.methods.Settings`: the loss hyper-parameters (``dpo_beta`` ...
  ``pad_max_group``), declared beside the terms that read them;
- :class:`TrainConfig`: a training run, which *is* a ``Settings`` (it extends it)
  plus the run's own fields, so it stays flat: a run's ``config.yaml`` holds one
  key per option, and a TrainConfig is the ``settings`` argument of the losses;
- :class:`EvaluateConfig`: ``train evaluate``'s, also a ``Settings``, of which only
  the PAD reward's two and KD's tail (:data:`EVALUATE_LOSS_SETTINGS`) are options there.

Both also inherit the run options every command shares (``--device``, ``--dtype``,
``--storage-option``, ``--batch-tokens``, ...), declared once in :mod:`lm.options`.

Every field is an :func:`lm.options.setting`: its default, help text and
command-line type are written on the field, ``train/cli.py`` turns the fields
into click options (:func:`lm.options.click_options`) and parsed options back
into a configuration (:func:`lm.options.from_cli`, :meth:`TrainConfig.from_sources`).
A configuration is checked when it is made, against the same option types
(:func:`lm.options.check_option_values`), so one made in Python or read from
a file is refused exactly as the command line would refuse it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import click
import yaml

from lm import options
from lm.options import BatchTokensOption, ChunkSizeOption, EngineOptions, ProgressOption, RunOptions, setting
from store.locations import REDACTED, redact_url, redact_values, without_redacted

from . import methods
from .methods import Settings

#: the loss settings' names: the options TrainConfig and EvaluateConfig take from Settings
LOSS_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings))
#: where ``--report-to`` sends metrics besides metrics.jsonl
REPORT_TO = ("none", "tensorboard")
#: what ``train evaluate`` takes of them: the teacher reward a group's ranking is compared with
PAD_REWARD = ("pad_alpha", "pad_beta")
#: the loss settings that are options of ``train evaluate``: PAD's reward, and how the KL counts the tail
EVALUATE_LOSS_SETTINGS = (*PAD_REWARD, "kd_tail")


class TrainError(ValueError):
    """A configuration or store that cannot train; the message says what to do."""


def term_weights(values) -> dict[str, float]:
    """Repeated ``TERM=W`` (or a mapping, from a file) -> ``{term: weight}``; BadParameter for a non-number."""
    weights = {}
    for name, value in options.key_values("--weight")(values).items():
        try:
            weights[name] = float(value)
        except (TypeError, ValueError):
            raise click.BadParameter(f"{name}={value!r}: expected TERM=NUMBER, e.g. kd_chosen=0.1",
                                     param_hint="--weight") from None
    return weights


_TERM_DEFAULTS = "; ".join(f"{method}: " + ", ".join(f"{t.name}={t.weight:g}" for t in terms)
                          for method, terms in methods.METHODS.items())


@dataclass(frozen=True, kw_only=True)
class TrainConfig(Settings, RunOptions, BatchTokensOption, ChunkSizeOption, ProgressOption):
    """``train student``: the loss settings it extends, and the run's own."""

    cache: str = setting(help="Teacher-signal store made by `precompute teacher` (required here or in --config).")
    method: str = setting("dckd+adpa", f"{', '.join(methods.METHODS)}, or a + combination (shared terms count once).")
    student: str | None = setting(None, "Student's initial model: dir (e.g. a finished run), embedded name, cached "
                                  "name [the student the store records, else the embedded student].")
    out: str | None = setting(None, "Output directory [runs/<method with + replaced by _>].")
    epochs: int = setting(1, "Passes over the split (ignored with --max-steps).", type=click.IntRange(min=1))
    max_steps: int | None = setting(None, "Train exactly this many optimizer steps, going through as many epochs "
                                    "as that takes (each reshuffled); overrides --epochs, as max_steps does in "
                                    "transformers' Trainer [--epochs epochs].", type=click.IntRange(min=1))
    lr: float = setting(5e-7, "Peak learning rate (released recipes: 5e-7).",
                        type=click.FloatRange(min=0, min_open=True))
    grad_accum: int = setting(1, "Batches per optimizer step.", type=click.IntRange(min=1))
    seed: int = setting(0, "Shuffling and initialisation seed.", type=int)
    resume: bool = setting(False, "Continue from OUT/checkpoint (same settings required).", is_flag=True)
    weights: dict[str, float] = setting(factory=dict, help="Override a term's weight, 0 drops it (repeatable). "
                                        f"Defaults: {_TERM_DEFAULTS}.", flag="--weight", multiple=True,
                                        metavar="TERM=W", parse=term_weights)
    warmup_ratio: float = setting(0.1, "Share of the steps with a linear warmup.",
                                  type=click.FloatRange(0, 1, max_open=True))
    max_grad_norm: float = setting(1.0, "Gradient clipping norm.", type=float)
    weight_decay: float = setting(0.0, "AdamW weight decay.", type=float)
    save_every: int | None = setting(None, "Checkpoint every N steps as well [only at the end].",
                                     type=click.IntRange(min=1))
    log_every: int = setting(10, "Write metrics every N steps (and at steps 1 and last).", type=click.IntRange(min=1))
    split: str = setting("train", "Split of the store to train on.")
    fsdp: bool = setting(False, "On several processes (torchrun, accelerate launch): shard the student's weights, "
                         "gradients and optimizer state across them (FSDP2) instead of a whole copy in each (DDP), "
                         "for students that do not fit one device; an accelerate FSDP configuration turns it on.",
                         is_flag=True)
    gradient_checkpointing: bool = setting(False, "Recompute each decoder layer's activations in backward instead of "
                                           "keeping them (transformers' activation checkpointing, non-reentrant): "
                                           "less memory per token for one more decoder forward per step; with DDP, "
                                           "FSDP and one process alike (docs/memory.md).", is_flag=True)
    report_to: str = setting("none", "Also write metrics.jsonl's scalars to tensorboard (OUT/tensorboard), as TRL "
                             "and accelerate's --report_to do; none: metrics.jsonl only.", type=click.Choice(REPORT_TO))

    def __post_init__(self):
        options.check_option_values(self, TrainError)

    @property
    def run_dir(self) -> Path:
        """``out``, else ``runs/<method with + replaced by _>``."""
        return Path(self.out or os.path.join("runs", self.method.replace("+", "_")))

    @classmethod
    def from_sources(cls, file_path: str | None, parsed: Mapping[str, Any], given: Iterable[str]) -> "TrainConfig":
        """The configuration from ``--config FILE`` and the command line: defaults < the file < flags given.

        ``parsed``: click's values by field name (defaults included); ``given``: the names
        set on the command line. A ``--method`` other than the file's drops the file's
        weights (they were its method's); ``--weight`` flags are added over the file's.
        ``--storage-option`` flags are added over the file's ``storage_options``, of which the
        values a run's ``config.yaml`` holds redacted are left out (:func:`recorded_settings`):
        credentials come from the command line or the environment, never from a recorded file.
        """
        flags = options.from_cli(cls, parsed)
        from_file = read_config_file(file_path) if file_path else {}
        given = set(given)
        file_weights = from_file.pop("weights", None) or {}
        if "method" in given and flags.method != from_file.get("method", flags.method):
            file_weights = {}
        file_options = without_redacted(from_file.pop("storage_options", None))
        if "cache" not in given and _redacted_url(from_file.get("cache")):
            raise TrainError(f"{file_path}: cache {from_file['cache']} had a credential removed when it was "
                             f"recorded: pass --cache (and its credentials as --storage-option or in the environment)")
        config = dataclasses.replace(flags, **{k: v for k, v in from_file.items() if k not in given},
                                     weights={**file_weights, **flags.weights},
                                     storage_options={**file_options, **flags.storage_options})
        if not config.cache:
            raise TrainError("--cache is required (or `cache:` in --config)")
        return config


def recorded_settings(config: "TrainConfig") -> dict:
    """The options as a run writes them (``config.yaml``, ``checkpoint/config.json``, the checkpoint's state):
    ``cache`` without a ``user:password@`` or secret-looking query values (:func:`store.locations.redact_url`)
    and every ``storage_options`` value replaced by a marker, its name kept (they may be credentials)."""
    settings = dataclasses.asdict(config)
    settings["cache"] = redact_url(config.cache) if config.cache else config.cache
    settings["storage_options"] = redact_values(config.storage_options)
    return settings


def _redacted_url(location) -> bool:
    from urllib.parse import unquote

    return isinstance(location, str) and REDACTED in unquote(location)


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML file's options by field name (keys as the long options, - or _); a run's config.yaml works as is.

    Values go through their option's type or parser, as flags do (``lr: 1e-3``, which YAML
    reads as a string, becomes 0.001; ``weights`` a mapping of floats).
    """
    try:
        with open(path) as fh:
            loaded = yaml.safe_load(fh) or {}
    except yaml.YAMLError as exc:
        raise TrainError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    except UnicodeDecodeError:
        raise TrainError(f"{path}: not a text file (expected YAML)") from None
    if not isinstance(loaded, dict):
        raise TrainError(f"{path}: expected a mapping of option names to values")
    loaded.pop("resolved", None)  # what a run's config.yaml adds beside the options
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise TrainError(f"{path}: unknown option(s) {', '.join(unknown)}")
    typed = {}
    for name, value in values.items():
        try:
            typed[name] = _as_declared(fields[name], value)
        except click.BadParameter as exc:
            raise TrainError(f"{path}: {name}: {exc.message}") from None
    return typed


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line from a YAML error: what is wrong, and where (line and column, 1-based)."""
    problem = getattr(exc, "problem", None) or str(exc).strip().splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def _as_declared(field: dataclasses.Field, value):
    """``value`` through the field's option parser or type, as click would treat it on the command line."""
    spec = field.metadata.get("cli")
    if value is None or spec is None:
        return value
    if spec.parse is not None:
        return spec.parse(value)
    if spec.type is not None:
        return click.types.convert_type(spec.type).convert(value, None, None)
    return value


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(Settings, RunOptions, BatchTokensOption, ChunkSizeOption, EngineOptions):
    """``train evaluate``: the model, the store and split, how to run; of the loss settings, :data:`EVALUATE_LOSS_SETTINGS`."""

    model: str | None = setting(None, "Model to evaluate: a run's dir, embedded name, ... [embedded student].")
    cache: str = setting(help="Teacher-signal store with pairs/teacher and/or samples/teacher + teacher_mcq "
                         "for --split.")
    split: str = setting("test", "Held-out split to evaluate on.")
    initial: str | None = setting(None, "Initial model for the log-ratio accuracy [store pairs/student_init, else "
                                  "the store's student].")
    generations: str | None = setting(None, "Also write the model's answers to the split's prompts to this JSON lines "
                                      "file (greedy, and --samples sampled ones), for scoring outside.")
    samples: int = setting(0, "With --generations: sampled answers per prompt besides the greedy one.",
                           type=click.IntRange(min=0))
    temperature: float = setting(1.0, "With --generations: sampling temperature.",
                                 type=click.FloatRange(min=0, min_open=True))
    max_new_tokens: int = setting(64, "With --generations: length limit of an answer.", type=click.IntRange(min=1))
    seed: int = setting(0, "With --generations: seed of the sampled answers.", type=int)

    def __post_init__(self):
        options.check_option_values(self, TrainError)
