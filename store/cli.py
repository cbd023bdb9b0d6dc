"""``store``: find, look into, check, copy and export teacher-signal stores.

    store ls LOCATION [--json]
    store info PATH [--json]
    store verify PATH
    store cp SRC DST
    store upgrade SRC DST
    store export PATH --format hdf5 --out FILE

PATH is a local directory or an fsspec URL (``s3://bucket/x.zarr``); pass
filesystem options with ``--storage-option key=value`` (repeatable, e.g.
``endpoint_url=http://127.0.0.1:9000``); s3fs also reads the usual ``AWS_*``
environment variables. None of these commands writes to a store it reads
(``cp`` and ``upgrade`` write only their destination). Exit status: 0 fine, 1 verification
found damage, 2 the command could not run (not a store, unknown format, bad
option), 3 an internal error, each said in one line naming the command
(:func:`lm.cli.run_reported`); ``DISTILL_DEBUG=1`` shows tracebacks instead.
Whatever a command prints, its refusals included, goes through
:func:`store.locations.redact_text` first, as ``train``'s and ``precompute``'s
lines do: a password in a location (``user:password@``), a secret-looking query
value or ``--storage-option`` value is never printed.
"""

from __future__ import annotations

import contextvars
import functools
import json
import os
import sys
from typing import Callable

import click

from lm.cli import run_reported
from lm.options import STORAGE_OPTION_HELP, parse_storage_options

from .format import ATTR_UNFINISHED
from .locations import redact_text, redact_url, secret_values

EXIT_DAMAGED = 1

#: the command's arguments that name locations, and its options that may hold credentials
_LOCATIONS = ("path", "location", "src", "dst")
_OPTIONS = ("storage_options", "src_options", "dst_options")
#: what the running command prints goes through this (:func:`_redaction` of its arguments)
_REDACT: contextvars.ContextVar[Callable[[str], str]] = contextvars.ContextVar("store_redact", default=redact_text)


def _redaction(arguments: dict) -> Callable[[str], str]:
    """What a command's locations (``user:password@``, secret-looking query values) and secret-looking
    ``--storage-option`` values hold, removed from a line to print (:func:`store.locations.redact_text`)."""
    options = {}
    for name in _OPTIONS:
        try:
            options[name] = parse_storage_options(arguments.get(name) or ())
        except click.ClickException:  # a malformed option: its own message says so, without the value
            options[name] = {}
    secrets = secret_values(options, [str(arguments[name]) for name in _LOCATIONS if arguments.get(name)])
    return lambda text: redact_text(text, secrets)


def _echo(text: str, err: bool = False) -> None:
    """Print a line of the running command, redacted (:func:`_redaction`)."""
    click.echo(_REDACT.get()(text), err=err)


def _reported(command):
    """``command``'s failures in one line naming it, ``store NAME: ...`` (:func:`lm.cli.run_reported`); that line
    and whatever the command prints (:func:`_echo`) redacted: no credential of its arguments is ever printed."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        from .errors import StoreError

        redact = _redaction(kwargs)
        token = _REDACT.set(redact)
        try:
            return run_reported(f"store {command.__name__}", lambda: command(*args, **kwargs),
                                expected=(StoreError,), redact=redact)
        finally:
            _REDACT.reset(token)

    return wrapper


def _open(path: str, storage_options: tuple[str, ...]):
    from .teacher_store import TeacherStore

    return TeacherStore.open(path, storage_options=parse_storage_options(storage_options))


storage_option = click.option("--storage-option", "-o", "storage_options", multiple=True, metavar="KEY=VALUE",
                              help=STORAGE_OPTION_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Look into, check and export a teacher-signal store (a local path or an fsspec URL)."""


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the information as JSON.")
@storage_option
@_reported
def info(path, as_json, storage_options):
    """Format, models, dataset, counts, top-K, bytes on disk and parts complete."""
    from .inspect import format_info, store_info

    data = store_info(_open(path, storage_options))
    if as_json:
        _echo(json.dumps(data, indent=2, sort_keys=False))
    else:
        _echo(format_info(data))


@main.command()
@click.argument("path")
@storage_option
@_reported
def verify(path, storage_options):
    """Recompute every complete section's checksums; exit 1 naming what differs (unfinished sections are listed)."""
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
            _echo(f"DAMAGED {problem}")
        _echo(f"{len(problems)} problem(s) in {store.location} ({len(checked)} complete sections checked)")
        sys.exit(EXIT_DAMAGED)
    unfinished = list(store.unfinished_sections())  # written unfinished (store.format): not done, not damage
    for ref, attrs in unfinished:
        _echo(f"UNFINISHED {ref.path}: {(attrs.get(ATTR_UNFINISHED) or {}).get('reason')}")
    left = f"; {len(unfinished)} section(s) unfinished (listed above)" if unfinished else ""
    if not checked:
        _echo(f"{store.location}: no complete section to verify{left}")
        return
    _echo(f"OK {store.location}: {len(checked)} complete sections, every checksum matches{left}")


@main.command()
@click.argument("path")
@click.option("--format", "out_format", type=click.Choice(["hdf5"]), default="hdf5", show_default=True,
              help="Output format.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, writable=True),
              help="File to write (replaced if it exists).")
@storage_option
@_reported
def export(path, out_format, out_path, storage_options):
    """Export complete sections, arrays decoded, to another format (HDF5, gzip)."""
    from tqdm import tqdm

    from .export import export_hdf5

    store = _open(path, storage_options)
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"{out_path}: directory {parent} does not exist")
    with tqdm(unit="section", desc="export", file=sys.stderr, mininterval=0.5, leave=False) as bar:
        summary = export_hdf5(store, out_path, progress=lambda _ref: bar.update(1))
    if summary["sections"] == 0:
        _echo(f"warning: {store.location} has no complete section; {out_path} holds attributes only",
                   err=True)
    _echo(f"wrote {out_path}: {summary['sections']} sections, {summary['arrays']} arrays, "
               f"{summary['bytes']:,} bytes ({out_format})")


@main.command(name="ls")
@click.argument("location")
@click.option("--json", "as_json", is_flag=True, help="Print the listing as JSON.")
@click.option("--max-depth", type=click.IntRange(min=0), default=4, show_default=True,
              help="Folder levels to descend below LOCATION.")
@storage_option
@_reported
def ls(location, as_json, max_depth, storage_options):
    """Every store under a folder or bucket prefix: teacher, dataset, passes, splits, completeness, size, age.

    A location that does not exist, is a file or cannot be reached is refused (exit 2); an existing folder
    without stores lists none.
    """
    from .catalog import UNLISTED_PROTOCOLS, find_stores, format_listing, store_summary
    from .locations import is_url

    options = parse_storage_options(storage_options)
    summaries = [store_summary(found, options) for found in find_stores(location, options, max_depth)]
    _echo(json.dumps(summaries, indent=2) if as_json else format_listing(summaries))
    if not summaries and is_url(location) and location.split("://", 1)[0] in UNLISTED_PROTOCOLS:
        _echo(f"note: {redact_url(location)}: a plain HTTP server need not list its folders (nor tell one it does "
              f"not list from a missing one); a store it serves is reached by its own URL", err=True)


def _src_dst_options(command):
    """SRC and DST, with the storage options both share and those of either alone."""
    for option in reversed([
        click.argument("src"), click.argument("dst"), storage_option,
        click.option("--src-option", "src_options", multiple=True, metavar="KEY=VALUE",
                     help="fsspec option for SRC only (repeatable; overrides --storage-option)."),
        click.option("--dst-option", "dst_options", multiple=True, metavar="KEY=VALUE",
                     help="fsspec option for DST only (repeatable; overrides --storage-option).")]):
        command = option(command)
    return command


def _copy_with_progress(src, dst, storage_options, src_options, dst_options, upgrade: bool) -> dict:
    from tqdm import tqdm

    from .copy import copy_store

    both = parse_storage_options(storage_options)
    with tqdm(unit="section", desc="upgrade" if upgrade else "copy", file=sys.stderr, mininterval=0.5,
              leave=False) as bar:
        return copy_store(src, dst, src_options={**both, **parse_storage_options(src_options)},
                          dst_options={**both, **parse_storage_options(dst_options)},
                          progress=lambda _path, _copied: bar.update(1), upgrade=upgrade)


@main.command()
@_src_dst_options
@_reported
def cp(src, dst, storage_options, src_options, dst_options):
    """Copy a store to another location; run it again to resume. Every section is verified on arrival."""
    counts = _copy_with_progress(src, dst, storage_options, src_options, dst_options, upgrade=False)
    _echo(f"copied {redact_url(src)} -> {redact_url(dst)}: {counts['copied']} sections copied and verified, "
          f"{counts['skipped']} already there")


@main.command()
@_src_dst_options
@_reported
def upgrade(src, dst, storage_options, src_options, dst_options):
    """Copy a store into this version's format, every section re-encoded and verified; run it again to resume."""
    counts = _copy_with_progress(src, dst, storage_options, src_options, dst_options, upgrade=True)
    click.echo(f"upgraded {redact_url(src)} (format {counts['from_version']}) -> {redact_url(dst)} (format "
               f"{counts['to_version']}): {counts['copied']} sections written and verified, {counts['skipped']} "
               f"already there")


if __name__ == "__main__":
    main()
