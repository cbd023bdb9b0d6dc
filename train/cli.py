"""``train``: train a student from a teacher-signal store, evaluate it (thin: parse, call, print).

Every option is a field of :mod:`train.config` (its default and help written there once;
the options every command shares in :mod:`lm.options`). A user's mistake (a missing
store or signal, a bad ``--config``, an ``--out`` that cannot be written, ...) ends in
one line on stderr and exit status 2; anything unexpected in one line naming it and
exit status 3; ``DISTILL_DEBUG=1`` shows the traceback instead (:func:`lm.cli.run_reported`).
Whatever is printed goes through :func:`store.locations.redact_text` first: credentials
given as ``--storage-option`` or inside a location (``user:password@``) are never printed.

Under ``torchrun`` or ``accelerate launch`` every process runs the same command
(:mod:`train.distributed`); a refusal that every process meets is printed by one of
them (the others' errors are ``quiet``), and only rank 0 prints the result.
"""

from __future__ import annotations

import json
from typing import Callable

import click
from click.core import ParameterSource

from lm import options

from .config import EVALUATE_LOSS_SETTINGS, LOSS_SETTINGS, EvaluateConfig, TrainConfig
from .methods import Settings


def _redact(values: dict) -> Callable[[str], str]:
    """What this command's ``--storage-option`` values and store location hold, removed from a line to print."""
    from lm.options import parse_storage_options
    from store.locations import redact_text, secret_values

    try:
        storage_options = parse_storage_options(values.get("storage_options") or ())
    except click.ClickException:  # a malformed option: its own message says so, without the value
        storage_options = {}
    secrets = secret_values(storage_options, [str(values[name]) for name in ("cache", "out") if values.get(name)])
    return lambda text: redact_text(text, secrets)


def _run(command: str, run, redact: Callable[[str], str], interrupted: str = "interrupted"):
    """``run()``'s result; a failure ends in one line naming ``train COMMAND`` (:func:`lm.cli.run_reported`)."""
    import yaml

    from lm.cli import run_reported
    from store import StoreError

    return run_reported(f"train {command}", run, expected=(StoreError, yaml.YAMLError), redact=redact,
                        interrupted=interrupted)


class _Commands(click.Group):
    """``train``'s commands; ``cyclealign`` runs a recipe that uses ``precompute`` too (:mod:`recipes.cyclealign`),
    so it is imported only when that command is asked for (or listed)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "cyclealign"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return _cyclealign_command() if name == "cyclealign" else super().get_command(ctx, name)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
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

    def run():
        config = TrainConfig.from_sources(config_file, values, given)
        return config, train(config)

    config, out = _run("student", run, _redact(values),
                       interrupted="interrupted; --resume continues from the last checkpoint (with none yet, the same "
                                   "command starts afresh)")
    from .distributed import is_main_process

    if is_main_process():
        click.echo(f"trained {config.method}: {out}")


@main.command()
@options.click_options(EvaluateConfig, exclude=LOSS_SETTINGS, overrides={"cache": {"required": True}})
@options.click_options(Settings, only=EVALUATE_LOSS_SETTINGS)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(as_json, **values):
    """On held-out pairs: token KL to the teacher, preference accuracy, log-probs; on groups: ranking agreement."""
    from .evaluate import evaluate as run_evaluate
    from .evaluate import format_table

    result = _run("evaluate", lambda: run_evaluate(options.from_cli(EvaluateConfig, values)), _redact(values))
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


def _cyclealign_command() -> click.Command:
    from recipes.cyclealign import CycleAlignConfig, run_rounds

    @click.command("cyclealign")
    @options.click_options(CycleAlignConfig)
    def cyclealign(**values):
        """CycleAlign end to end: R rounds of sample -> rank (a black box) -> train, resuming after a kill."""
        redact = _redact(values)
        models = _run("cyclealign", lambda: run_rounds(options.from_cli(CycleAlignConfig, values),
                                                       echo=lambda text: click.echo(redact(text))),
                      redact, interrupted="interrupted; the same command goes on at the first unfinished step")
        click.echo("rounds trained: " + ", ".join(map(str, models)))

    return cyclealign


if __name__ == "__main__":
    main()
