"""Where stores live: a local path or any fsspec URL, the options to reach it, and secrets kept out of artefacts.

Every command that opens a store takes ``--storage-option KEY=VALUE``
(repeatable; :func:`lm.options.parse_storage_options` reads them: a value
that reads as JSON keeps its type, ``anon=true`` is a bool, ``port=9000`` an int).
Credentials come from the usual places (environment variables, profiles,
``~/.aws``); when one is passed as an option it is used to open the store and
never written anywhere: whatever records options or locations (a run's
``config.yaml``, metrics, summaries, ``store info``) goes through
:func:`redact_options` / :func:`redact_url` first.
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["redact_options", "redact_values", "without_redacted", "secret_values", "redact_text", "redact_url",
           "is_url", "REDACTED"]

REDACTED = "<redacted>"
# option or query names that hold a secret (matched as words inside the name, case-insensitive)
_SECRET = re.compile(r"(key|secret|token|password|passwd|credential|session|auth|signature|sig)", re.IGNORECASE)


def redact_options(options: Mapping | None) -> dict:
    """``options`` with every value whose name looks like a secret replaced by a marker (nested mappings too)."""
    out = {}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping):
            out[key] = redact_options(value)
        else:
            out[key] = REDACTED if _SECRET.search(str(key)) else value
    return out


def redact_values(options: Mapping | None) -> dict:
    """``options`` with every value replaced by :data:`REDACTED`, names kept (nested mappings too): how a
    run records the options it was given (its ``config.yaml``, checkpoints), whatever their names."""
    return {key: redact_values(value) if isinstance(value, Mapping) else REDACTED
            for key, value in (options or {}).items()}


def without_redacted(options: Mapping | None) -> dict:
    """``options`` without the values :func:`redact_values` or :func:`redact_options` replaced (nested mappings
    left empty are dropped): what of a recorded configuration can be used again."""
    out = {}
    for key, value in (options or {}).items():
        if isinstance(value, Mapping):
            value = without_redacted(value)
            if not value:
                continue
        elif value == REDACTED:
            continue
        out[key] = value
    return out


def secret_values(options: Mapping | None = None, locations: Iterable[str] = ()) -> set[str]:
    """The values never to print: options with secret-looking names (nested too), and of ``locations`` the
    passwords of ``user:password@`` and the values of secret-looking query parameters (for :func:`redact_text`)."""
    found: set[str] = set()

    def walk(given: Mapping, redacted: Mapping) -> None:
        for key, value in given.items():
            if isinstance(value, Mapping):
                walk(value, redacted.get(key) or {})
            elif redacted.get(key) == REDACTED and value not in (None, ""):
                found.add(str(value))

    walk(dict(options or {}), redact_options(options))
    for location in locations:
        if is_url(str(location)):
            parts = urlsplit(str(location))
            if parts.password:
                found.add(parts.password)
            found.update(value for name, value in parse_qsl(parts.query) if _SECRET.search(name) and value)
    return found


_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` (a message to print) with every secret value replaced by :data:`REDACTED` and any
    ``user:password@`` of a URL removed."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= 3:
            text = text.replace(secret, REDACTED)
    return _USERINFO.sub("", text)


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
