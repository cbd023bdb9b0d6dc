"""``train``: train a student from a teacher-signal store, evaluate it (thin: parse, call, print).

Every option is a field of :mod:`train.config` (its default and help written there once).
A user's mistake (a missing store or signal, a bad ``--config``, an ``--out`` that
cannot be written, ...) ends in one line on stderr and exit status 2; anything
unexpected in one line naming it and exit status 3; ``DISTILL_DEBUG=1`` shows the
traceback instead (:func:`_report`). Whatever is printed goes through
:func:`store.locations.redact_text` first: credentials given as ``--storage-option``
or inside a location (``user:password@``) are never printed.

Under ``torchrun`` or ``accelerate launch`` every process runs the same command
(:mod:`train.distributed`); a refusal that every process meets is printed by one of
them (the others' errors are ``quiet``), and only rank 0 prints the result.
"""

from __future__ import annotations

import json
import os
import sys

import click
from click.core import ParameterSource

from lm import options

from .config import LOSS_SETTINGS, PAD_REWARD, EvaluateConfig, TrainConfig, TrainError
from .cyclealign import CycleAlignConfig
from .methods import Settings


def _fail(command: str, message: str, status: int = 2, secrets: frozenset[str] | set[str] = frozenset()):
    from store.locations import redact_text

    click.echo(redact_text(f"train {command}: {message}", secrets), err=True)
    sys.exit(status)


def _secrets(values: dict) -> set[str]:
    """What this command's ``--storage-option`` values and store location hold that must never be printed."""
    from lm.options import parse_storage_options
    from store.locations import secret_values

    try:
        storage_options = parse_storage_options(values.get("storage_options") or ())
    except click.ClickException:  # a malformed option: its own message says so, without the value
        storage_options = {}
    return secret_values(storage_options, [str(values.get("cache") or values.get("out") or "")])


def _one_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _report(command: str, run, secrets: frozenset[str] | set[str] = frozenset()):
    """``run()``'s result; a user's mistake ends in one line on stderr and exit 2 (module docstring).

    ``secrets``: values (credentials) that the printed message must not show (:func:`_secrets`).
    """
    import yaml

    from lm.chat import TokenizerMismatch
    from lm.models import ModelLoadError, ModelNotFoundError
    from store import StoreError

    expected = (TrainError, StoreError, TokenizerMismatch, ModelNotFoundError, ModelLoadError, ValueError, OSError,
                yaml.YAMLError)
    debug = bool(os.environ.get("DISTILL_DEBUG"))
    try:
        return run()
    except click.BadParameter as exc:  # a value from --config or --weight: one line, not click's usage block
        if debug:
            raise
        _fail(command, exc.format_message(), secrets=secrets)
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        again = ("; --resume continues from the last checkpoint (with none yet, the same command starts afresh)"
                 if command == "student" else "")
        _fail(command, f"interrupted{again}", 130, secrets)
    except expected as exc:
        if getattr(exc, "quiet", False):  # another process of the run reported it
            sys.exit(2)
        if debug:
            raise
        _fail(command, _one_line(exc), secrets=secrets)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, and how to see more
        if debug:
            raise
        _fail(command, f"internal error {type(exc).__name__}: {_one_line(exc)} (DISTILL_DEBUG=1 shows the "
                       f"traceback)", 3, secrets)


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

    def run():
        config = TrainConfig.from_sources(config_file, values, given)
        return config, train(config)

    config, out = _report("student", run, _secrets(values))
    from .distributed import is_main_process

    if is_main_process():
        click.echo(f"trained {config.method}: {out}")


@main.command()
@options.click_options(EvaluateConfig, exclude=LOSS_SETTINGS, overrides={"cache": {"required": True}})
@options.click_options(Settings, only=PAD_REWARD)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def evaluate(as_json, **values):
    """On held-out pairs: token KL to the teacher, preference accuracy, log-probs; on groups: ranking agreement."""
    from .evaluate import evaluate as run_evaluate
    from .evaluate import format_table

    result = _report("evaluate", lambda: run_evaluate(options.from_cli(EvaluateConfig, values)), _secrets(values))
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


@main.command()
@options.click_options(CycleAlignConfig)
def cyclealign(**values):
    """CycleAlign end to end: R rounds of sample -> rank (a black box) -> train, resuming after a kill."""
    from .cyclealign import run_rounds
    from .trainer import train

    models = _report("cyclealign", lambda: run_rounds(options.from_cli(CycleAlignConfig, values), train),
                     _secrets(values))
    click.echo("rounds trained: " + ", ".join(map(str, models)))


if __name__ == "__main__":
    main()
