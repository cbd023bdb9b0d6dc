"""``precompute``: run the teacher passes into a store (thin: parse, validate, call).

Every option is a field of :class:`precompute.teacher.TeacherConfig` or
:class:`precompute.sample.SampleConfig`, which declare its default and help.
"""

from __future__ import annotations

import os
import sys

import click

from lm.options import click_options, from_cli

from .rank import RankConfig
from .sample import SampleConfig
from .teacher import TeacherConfig


def _secrets(options: dict) -> set[str]:
    """What this command's options and $DISTILL_REUSE_FROM hold that must never be printed."""
    from lm.options import parse_storage_options
    from store.locations import secret_values

    from .reuse import reuse_locations

    given = {}
    for name in ("storage_options", "reuse_options"):
        try:
            given[name] = parse_storage_options(options.get(name) or ())
        except click.ClickException:  # a malformed option: click reports it
            given[name] = {}
    locations = [str(options.get("out") or ""), *reuse_locations(options.get("reuse_from") or ())]
    return secret_values(given, locations)


def _report(command: str, run, secrets: set[str] = frozenset()):
    """Run ``run()`` and print its summary; a user's mistake ends in one line on stderr and exit 2.

    ``DISTILL_DEBUG=1`` shows the traceback of anything unexpected instead. ``secrets`` (credentials
    given as options or inside locations) are redacted from whatever is printed.
    """
    from lm.chat import TokenizerMismatch
    from lm.models import ModelLoadError, ModelNotFoundError
    from store import StoreError
    from store.locations import redact_text

    from .dataset import DataError

    def echo(text: str, err: bool = False) -> None:
        click.echo(redact_text(text, secrets), err=err)

    expected = (DataError, TokenizerMismatch, StoreError, ModelNotFoundError, ModelLoadError, ValueError,
                NotImplementedError, OSError)
    try:
        summary = run()
    except click.ClickException:
        raise
    except KeyboardInterrupt:
        click.echo(f"precompute {command}: interrupted; the same command resumes where it stopped", err=True)
        sys.exit(130)
    except expected as exc:
        if os.environ.get("DISTILL_DEBUG"):
            raise
        echo(f"precompute {command}: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - a bug of ours: one line, and how to see more
        if os.environ.get("DISTILL_DEBUG"):
            raise
        cluster = sys.modules.get("precompute.cluster")  # imported by --cluster runs only (it imports dask)
        if cluster is not None and isinstance(exc, cluster.ClusterError):
            echo(f"precompute {command}: {exc}", err=True)
            sys.exit(2)
        echo(f"precompute {command}: internal error {type(exc).__name__}: {exc} "
             f"(DISTILL_DEBUG=1 shows the traceback)", err=True)
        sys.exit(3)
    echo("\n".join(summary.lines()))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Compute teacher signals once into a chunked Zarr store."""


@main.command()
@click_options(TeacherConfig)
def teacher(**options):
    """Run the teacher passes (default: what dckd+adpa needs) into --out."""
    from .teacher import run_teacher

    _report("teacher", lambda: run_teacher(from_cli(TeacherConfig, options)), _secrets(options))


@main.command()
@click_options(SampleConfig)
def sample(**options):
    """Sample groups of responses per prompt into --out (PAD; then `teacher --passes pad`)."""
    from .sample import run_sample

    _report("sample", lambda: run_sample(from_cli(SampleConfig, options)), _secrets(options))


@main.command()
@click_options(RankConfig)
def rank(**options):
    """Rank each sampled group with a black-box judge and agree with the student (CycleAlign)."""
    from .rank import run_rank

    _report("rank", lambda: run_rank(from_cli(RankConfig, options)), _secrets(options))


if __name__ == "__main__":
    main()
