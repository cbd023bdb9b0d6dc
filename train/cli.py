"""``train``: train a student from a teacher-signal store, evaluate it (thin: parse, call, print).

Every option is a field of :mod:`train.config` (its default and help written there once).
"""

from __future__ import annotations

import json
import sys

import click
from click.core import ParameterSource

from lm import options

from .config import LOSS_SETTINGS, PAD_REWARD, EvaluateConfig, TrainConfig, TrainError
from .methods import Settings


def _fail(command: str, message: str):
    click.echo(f"train {command}: {message}", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Train a small student from a teacher-signal store; evaluate students."""


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML file of these options (e.g. a run's config.yaml); flags given here override it "
              "(a --method other than the file's drops the file's weights).")
@options.click_options(TrainConfig, exclude=LOSS_SETTINGS)
@options.click_options(Settings)
@click.pass_context
def student(ctx, config_file, **values):
    """Train a student by streaming --cache with --method."""
    from .trainer import train

    given = [name for name in values if ctx.get_parameter_source(name) != ParameterSource.DEFAULT]
    try:
        config = TrainConfig.from_sources(config_file, values, given)
        out = train(config)
    except (TrainError, OSError, click.BadParameter) as exc:
        _fail("student", exc.format_message() if isinstance(exc, click.BadParameter) else str(exc))
    click.echo(f"trained {config.method}: {out}")


@main.command()
@options.click_options(EvaluateConfig, exclude=LOSS_SETTINGS, overrides={"cache": {"required": True}})
@options.click_options(Settings, only=PAD_REWARD)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(as_json, **values):
    """On held-out pairs: token KL to the teacher, preference accuracy, log-probs; on groups: ranking agreement."""
    from .evaluate import evaluate as run_evaluate
    from .evaluate import format_table

    try:
        result = run_evaluate(options.from_cli(EvaluateConfig, values))
    except (TrainError, OSError) as exc:
        _fail("evaluate", str(exc))
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


if __name__ == "__main__":
    main()
