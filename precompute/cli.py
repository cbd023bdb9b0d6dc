"""``precompute``: run the teacher passes into a store (thin: parse, validate, call).

Every option is a field of :class:`precompute.teacher.TeacherConfig`,
:class:`precompute.sample.SampleConfig` or :class:`precompute.rank.RankConfig`
(the options they share: :mod:`lm.options`), which declare its default and help.
A failure ends in one line naming the command (:func:`lm.cli.run_reported`).
"""

from __future__ import annotations

import click

from lm.cli import run_reported
from lm.options import click_options, from_cli

from .rank import RankConfig
from .sample import SampleConfig
from .teacher import TeacherConfig


def _redact(options: dict):
    """What prints this command's lines: the credentials its options and $DISTILL_REUSE_FROM hold removed."""
    from lm.options import parse_storage_options
    from store.locations import redact_text, secret_values

    from .reuse import reuse_locations

    given = {}
    for name in ("storage_options", "reuse_options"):
        try:
            given[name] = parse_storage_options(options.get(name) or ())
        except click.ClickException:  # a malformed option: its own message says so, without the value
            given[name] = {}
    secrets = secret_values(given, [str(options.get("out") or ""), *reuse_locations(options.get("reuse_from") or ())])
    return lambda text: redact_text(text, secrets)


def _run(command: str, run, options: dict) -> None:
    """Run ``run()`` and print its summary; a failure ends in one line (:func:`lm.cli.run_reported`)."""
    from store import StoreError

    expected = (StoreError, NotImplementedError)  # besides ValueError and OSError, which the others subclass
    if options.get("cluster"):  # only --cluster runs import dask
        from .cluster import ClusterError

        expected += (ClusterError,)
    from store.files import refuse_read_only

    def checked():
        refuse_read_only(options.get("out") or "")  # an HTTP --out: refused before a cluster, data or a model
        return run()

    redact = _redact(options)
    summary = run_reported(f"precompute {command}", checked, expected=expected, redact=redact,
                           interrupted="interrupted; the same command resumes where it stopped")
    click.echo(redact("\n".join(summary.lines())))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Compute teacher signals once into a chunked Zarr store."""


@main.command()
@click_options(TeacherConfig)
def teacher(**options):
    """Run the teacher passes (default: what dckd+adpa needs) into --out."""
    from .teacher import run_teacher

    _run("teacher", lambda: run_teacher(from_cli(TeacherConfig, options)), options)


@main.command()
@click_options(SampleConfig)
def sample(**options):
    """Sample groups of responses per prompt into --out (PAD; then `teacher --passes pad`)."""
    from .sample import run_sample

    _run("sample", lambda: run_sample(from_cli(SampleConfig, options)), options)


@main.command()
@click_options(RankConfig)
def rank(**options):
    """Rank each sampled group with a black-box judge and agree with the student (CycleAlign)."""
    from .rank import run_rank

    _run("rank", lambda: run_rank(from_cli(RankConfig, options)), options)


if __name__ == "__main__":
    main()
