"""Where stores live: a local path or any fsspec URL, the options to reach it, and secrets kept out of artefacts.

Every command that opens a store takes ``--storage-option KEY=VALUE``
(repeatable), parsed here and only here (:func:`parse_storage_options`: a value
that reads as JSON keeps its type, ``anon=true`` is a bool, ``port=9000`` an int).
Credentials come from the usual places (environment variables, profiles,
``~/.aws``); when one is passed as an option it is used to open the store and
never written anywhere: whatever records options or locations (a run's
``config.yaml``, metrics, summaries, ``store info``) goes through
:func:`redact_options` / :func:`redact_url` first.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["STORAGE_OPTION_CLI", "parse_storage_options", "redact_options", "redact_url", "is_url", "REDACTED"]

REDACTED = "<redacted>"
# option or query names that hold a secret (matched as words inside the name, case-insensitive)
_SECRET = re.compile(r"(key|secret|token|password|passwd|credential|session|auth|signature|sig)", re.IGNORECASE)


def parse_storage_options(pairs: Iterable[str] | Mapping | None) -> dict:
    """Repeated ``KEY=VALUE`` -> a dict of fsspec options (a mapping passes through).

    ValueError naming the bad item for anything without ``=`` or with an empty key.
    """
    if isinstance(pairs, Mapping):
        return dict(pairs)
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            import click

            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--storage-option")
        try:  # numbers, booleans, null and JSON objects keep their type
            options[key.strip()] = json.loads(value)
        except ValueError:
            options[key.strip()] = value
    return options


#: keywords of :func:`lm.options.setting` for a ``storage_options`` field: one declaration for every command
STORAGE_OPTION_CLI = dict(
    help="fsspec option for a URL location, KEY=VALUE (repeatable), e.g. endpoint_url=http://127.0.0.1:9000; "
         "secrets given here are never written anywhere.",
    flag="--storage-option", multiple=True, metavar="KEY=VALUE", parse=parse_storage_options)


def redact_options(options: Mapping | None) -> dict:
    """``options`` with every value whose name looks like a secret replaced by a marker (nested mappings too)."""
    out = {}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping):
            out[key] = redact_options(value)
        else:
            out[key] = REDACTED if _SECRET.search(str(key)) else value
    return out


def redact_url(location: str) -> str:
    """A location with any ``user:password@`` and secret-looking query parameters removed."""
    if not is_url(location):
        return location
    parts = urlsplit(location)
    netloc = parts.netloc.rsplit("@", 1)[-1]  # host[:port], without user:password@
    query = urlencode([(k, REDACTED if _SECRET.search(k) else v) for k, v in parse_qsl(parts.query)])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_url(location: str) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")
