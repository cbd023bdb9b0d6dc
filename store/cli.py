"""``store``: look into, check and export a teacher-signal store.

    store info PATH [--json]
    store verify PATH
    store export PATH --format hdf5 --out FILE

PATH is a local directory or an fsspec URL (``s3://bucket/x.zarr``); pass
filesystem options with ``--storage-option key=value`` (repeatable, e.g.
``endpoint_url=http://127.0.0.1:9000``); s3fs also reads the usual ``AWS_*``
environment variables. Exit status: 0 fine, 1 verification found damage,
2 the command could not run (not a store, unknown format, bad option).
"""

from __future__ import annotations

import functools
import json
import os
import sys

import click

EXIT_DAMAGED = 1
EXIT_ERROR = 2


def _parse_storage_options(pairs: tuple[str, ...]) -> dict:
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got {pair!r}", param_hint="--storage-option")
        try:  # numbers, booleans, null and JSON objects keep their type
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def _clear_errors(command):
    """Turn an exception into one line on stderr and exit status 2 (STORE_DEBUG=1 keeps tracebacks)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .teacher_store import StoreError

        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit, KeyboardInterrupt):
            raise
        except StoreError as exc:
            if os.environ.get("STORE_DEBUG"):
                raise
            _fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - the user gets one clear line, not a traceback
            if os.environ.get("STORE_DEBUG"):
                raise
            _fail(f"{type(exc).__name__}: {exc}")

    return wrapper


def _open(path: str, storage_options: tuple[str, ...]):
    from .teacher_store import TeacherStore

    return TeacherStore.open(path, storage_options=_parse_storage_options(storage_options))


storage_option = click.option(
    "--storage-option", "-o", "storage_options", multiple=True, metavar="KEY=VALUE",
    help="fsspec filesystem option for a URL PATH, e.g. endpoint_url=http://127.0.0.1:9000 (repeatable).")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Look into, check and export a teacher-signal store (a local path or an fsspec URL)."""


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@storage_option
@_clear_errors
def info(path, as_json, storage_options):
    """Format, models, dataset, counts, top-K, bytes on disk and parts complete."""
    from .inspect import format_info, store_info

    data = store_info(_open(path, storage_options))
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        click.echo(format_info(data))


@main.command()
@click.argument("path")
@storage_option
@_clear_errors
def verify(path, storage_options):
    """Recompute every complete section's checksums; exit 1 naming what differs."""
    from tqdm import tqdm

    store = _open(path, storage_options)
    manifest = store.attrs.get("manifest") or {}
    with tqdm(total=len(manifest) or None, unit="section", desc="verify", file=sys.stderr,
              mininterval=0.5, leave=False) as bar:
        checked = []

        def progress(ref_path: str) -> None:
            checked.append(ref_path)
            bar.set_postfix_str(ref_path, refresh=False)
            bar.update(1)

        problems = store.verify(progress=progress)
    if problems:
        for problem in problems:
            click.echo(f"DAMAGED {problem}")
        click.echo(f"{len(problems)} problem(s) in {store.location} ({len(checked)} complete sections checked)")
        sys.exit(EXIT_DAMAGED)
    if not checked:
        click.echo(f"{store.location}: no complete section to verify")
        return
    click.echo(f"OK {store.location}: {len(checked)} complete sections, every checksum matches")


@main.command()
@click.argument("path")
@click.option("--format", "out_format", type=click.Choice(["hdf5"]), default="hdf5", show_default=True,
              help="Output format.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, writable=True),
              help="File to write (replaced if it exists).")
@storage_option
@_clear_errors
def export(path, out_format, out_path, storage_options):
    """Export complete sections, arrays decoded, to another format (HDF5, gzip)."""
    from tqdm import tqdm

    from .export import export_hdf5

    store = _open(path, storage_options)
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        _fail(f"{out_path}: directory {parent} does not exist")
    with tqdm(unit="section", desc="export", file=sys.stderr, mininterval=0.5, leave=False) as bar:
        summary = export_hdf5(store, out_path, progress=lambda _ref: bar.update(1))
    if summary["sections"] == 0:
        click.echo(f"warning: {store.location} has no complete section; {out_path} holds attributes only",
                   err=True)
    click.echo(f"wrote {out_path}: {summary['sections']} sections, {summary['arrays']} arrays, "
               f"{summary['bytes']:,} bytes ({out_format})")


if __name__ == "__main__":
    main()
