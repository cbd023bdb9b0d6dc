"""``train``: train a student from a teacher-signal store, evaluate it (thin: parse, validate, call)."""

from __future__ import annotations

import dataclasses
import json
import sys

import click
import yaml

from . import methods
from .trainer import TrainConfig, TrainError

_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def _fail(command: str, message: str):
    click.echo(f"train {command}: {message}", err=True)
    sys.exit(2)


def _parse_weights(items) -> dict[str, float]:
    weights = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r}: expected TERM=NUMBER, e.g. kd_chosen=0.1", param_hint="--weight")
        if not sep:
            raise click.BadParameter(f"{item!r}: expected TERM=NUMBER", param_hint="--weight")
    return weights


def _load_config_file(path: str) -> dict:
    """Options from a YAML file (keys as the long options, - or _); a run's config.yaml works as is."""
    with open(path) as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        raise TrainError(f"{path}: expected a mapping of option names to values")
    loaded.pop("resolved", None)  # what a run's config.yaml adds beside the options
    options = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(options) - _FIELDS)
    if unknown:
        raise TrainError(f"{path}: unknown option(s) {', '.join(unknown)}")
    return options


TERM_HELP = "; ".join(f"{m}: " + ", ".join(f"{t.name}={t.weight:g}" for t in terms)
                      for m, terms in methods.METHODS.items())


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train a small student from a teacher-signal store; evaluate students."""


@main.command()
@click.option("--cache", default=None,
              help="Teacher-signal store made by `precompute teacher` (required here or in --config).")
@click.option("--method", default="dckd+adpa", show_default=True,
              help=f"{', '.join(methods.METHODS)}, or a + combination (shared terms count once).")
@click.option("--student", default=None, help="Student's initial model: dir (e.g. a finished run), embedded name, "
              "cached name [the student the store records, else the embedded student].")
@click.option("--out", default=None, help="Output directory [runs/<method with + replaced by _>].")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=None, help="Stop after this many optimizer steps.")
@click.option("--lr", type=float, default=5e-7, show_default=True, help="Peak learning rate (released recipes: 5e-7).")
@click.option("--batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True,
              help="Padded tokens per batch (all sequences of its examples).")
@click.option("--grad-accum", type=click.IntRange(min=1), default=1, show_default=True,
              help="Batches per optimizer step.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True,
              help="auto (bf16 autocast on CUDA GPUs that have it, else fp32), float32, bfloat16.")
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint (same settings required).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of these options (e.g. a run's config.yaml); flags given here override it "
              "(a --method other than the file's drops the file's weights).")
@click.option("--weight", "weights", multiple=True, metavar="TERM=W",
              help=f"Override a term's weight, 0 drops it (repeatable). Defaults: {TERM_HELP}.")
@click.option("--dpo-beta", type=float, default=0.1, show_default=True,
              help="DPO beta (DPO paper / TRL default; the teacher was aligned with 0.01).")
@click.option("--simpo-beta", type=float, default=2.0, show_default=True)
@click.option("--simpo-gamma", type=float, default=0.5, show_default=True, help="SimPO margin, in reward units.")
@click.option("--adpa-beta", type=float, default=1.0, show_default=True, help="Advantage scale.")
@click.option("--adpa-unclipped", is_flag=True,
              help="Use the paper's unclipped advantage (default: clipped into [1e-8, 1-1e-8] like the released code).")
@click.option("--pad-loss", type=click.Choice(methods.PAD_LOSSES), default="ppd", show_default=True,
              help="PAD: ppd (Jensen-Shannon divergence of the orderings' distributions) or vpd (-log P of the "
              "teacher's order).")
@click.option("--pad-beta", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="PAD: reward scale, student and teacher (released 10).")
@click.option("--pad-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="PAD: teacher reward = alpha * mean log-prob + (1 - alpha) * calibration score; released 0, "
              "whose calibration the embedded teacher cannot judge (see train/methods.py).")
@click.option("--pad-max-group", type=click.IntRange(2, 6), default=6, show_default=True,
              help="PAD: larger groups are split into overlapping windows of this size (6! = 720 orderings).")
@click.option("--warmup-ratio", type=float, default=0.1, show_default=True)
@click.option("--max-grad-norm", type=float, default=1.0, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--save-every", type=click.IntRange(min=1), default=None,
              help="Checkpoint every N steps (and at the end).")
@click.option("--log-every", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--split", default="train", show_default=True)
@click.option("--chunk-size", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Response rows per output-layer chunk (memory).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.pass_context
def student(ctx, config_file, weights, no_progress, **options):
    """Train a student by streaming --cache with --method."""
    from .trainer import train

    try:
        from_file = _load_config_file(config_file) if config_file else {}
        for param in ctx.command.params:  # YAML values through the options' own types ("1e-3" -> 1e-3)
            if param.name in from_file and param.name in options and from_file[param.name] is not None:
                from_file[param.name] = param.type_cast_value(ctx, from_file[param.name])
        given = {k: v for k, v in options.items()
                 if ctx.get_parameter_source(k) != click.core.ParameterSource.DEFAULT}
        merged = {**options, **from_file, **given}
        file_weights = {k: float(v) for k, v in (from_file.get("weights") or {}).items()}
        if "method" in given and given["method"] != from_file.get("method", given["method"]):
            file_weights = {}  # they were the file's method's weights
        merged["weights"] = {**file_weights, **_parse_weights(weights)}
        merged["progress"] = not no_progress
        if not merged.get("cache"):
            raise TrainError("--cache is required (or `cache:` in --config)")
        config = TrainConfig(**{k: v for k, v in merged.items() if k in _FIELDS})
        out = train(config)
    except (TrainError, OSError, click.BadParameter) as exc:
        _fail("student", exc.format_message() if isinstance(exc, click.BadParameter) else str(exc))
    click.echo(f"trained {config.method}: {out}")


@main.command()
@click.option("--model", default=None, help="Model to evaluate: a run's dir, embedded name, ... [embedded student].")
@click.option("--cache", required=True,
              help="Teacher-signal store with pairs/teacher and/or samples/teacher + teacher_mcq for --split.")
@click.option("--split", default="test", show_default=True)
@click.option("--initial", default=None,
              help="Initial model for the log-ratio accuracy [store pairs/student_init, else the store's student].")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--batch-tokens", type=click.IntRange(min=1), default=4096, show_default=True)
@click.option("--pad-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Groups: the teacher reward's mix that rankings are compared with (as in training).")
@click.option("--pad-beta", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
              help="Groups: reward scale of the held-out PPD divergence (rankings do not depend on it).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(model, cache, split, initial, device, dtype, batch_tokens, pad_alpha, pad_beta, as_json):
    """On held-out pairs: token KL to the teacher, preference accuracy, log-probs; on groups: ranking agreement."""
    from .evaluate import evaluate as run_evaluate
    from .evaluate import format_table

    try:
        result = run_evaluate(model, cache, split, initial, device=device, dtype=dtype, batch_tokens=batch_tokens,
                              pad_alpha=pad_alpha, pad_beta=pad_beta)
    except (TrainError, OSError) as exc:
        _fail("evaluate", str(exc))
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


if __name__ == "__main__":
    main()
