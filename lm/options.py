"""Command-line options built from configuration dataclasses: one source for each option.

A run's settings live in one frozen-or-plain dataclass (``TeacherConfig``,
``SampleConfig``, ``TrainConfig``, ...). A field that users set from the
command line carries its help text and how to parse it in its metadata
(:func:`setting`), and :func:`click_options` turns those fields into click
options, so a default or a help text is written once, beside the field it
belongs to. :func:`from_cli` builds the dataclass back from what click parsed.

Conventions: a field ``top_k`` becomes ``--top-k``; a bool field whose default
is True and that has ``flag="--no-..."`` is inverted (``progress`` <->
``--no-progress``); tuples given as comma lists and mappings given as repeated
``KEY=VALUE`` are parsed by :func:`comma_list` and :func:`key_values`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import MISSING, dataclass
from typing import Any, Callable

import click

__all__ = ["Cli", "setting", "click_options", "from_cli", "comma_list", "key_values", "key_json_values",
           "field_defaults", "check_option_values"]


@dataclass(frozen=True)
class Cli:
    """How one dataclass field appears on the command line."""

    help: str = ""
    flag: str | None = None  # default: --field-name; "--no-x" on a bool field inverts it
    type: Any = None  # a click type
    is_flag: bool = False
    multiple: bool = False
    metavar: str | None = None
    parse: Callable[[Any], Any] | None = None  # click's value -> the field's value
    shown_default: Any = None  # what --help shows, when not the field's default
    required: bool = False


def setting(default: Any = MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            **cli: Any) -> Any:
    """A dataclass field with its command-line form (see :class:`Cli` for the keywords)."""
    meta = {"cli": Cli(help=help, **cli)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def comma_list(value) -> tuple[str, ...]:
    """``"train,test"`` -> ``("train", "test")`` (blank items dropped); tuples pass through."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(s.strip() for s in str(value).split(",") if s.strip())


def _pairs(values, option: str, decode: Callable[[str], Any]) -> dict:
    if isinstance(values, dict):
        return dict(values)
    out = {}
    for item in values or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=option)
        out[key.strip()] = decode(value)
    return out


def key_values(option: str) -> Callable[[Any], dict]:
    """Parser of repeated ``KEY=VALUE`` into a dict of strings (``option`` names the flag in errors)."""
    return lambda values: _pairs(values, option, lambda v: v)


def _json_or_text(value: str):
    try:  # numbers, booleans, null and JSON objects keep their type
        return json.loads(value)
    except ValueError:
        return value


def key_json_values(option: str) -> Callable[[Any], dict]:
    """Like :func:`key_values`, with each value read as JSON where it parses (``1``, ``true``, ``{...}``)."""
    return lambda values: _pairs(values, option, _json_or_text)


def _flag_name(field: dataclasses.Field, spec: Cli) -> str:
    return spec.flag or "--" + field.name.replace("_", "-")


def _inverted(field: dataclasses.Field, spec: Cli) -> bool:
    return _flag_name(field, spec).startswith("--no-") and field.default is True


def field_defaults(config_cls) -> dict[str, Any]:
    """Every field's default (factories called), by field name."""
    out = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def click_options(config_cls, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                  overrides: dict[str, dict] | None = None):
    """A decorator adding one click option per :func:`setting` field of ``config_cls``, in field order.

    ``overrides`` changes click keywords of single options (e.g. ``required``) for one command.
    """
    defaults = field_defaults(config_cls)

    def decorate(command):
        for f in reversed(dataclasses.fields(config_cls)):
            spec = f.metadata.get("cli")
            if spec is None or f.name in exclude or (only is not None and f.name not in only):
                continue
            kwargs: dict[str, Any] = {"help": spec.help, "required": spec.required}
            default = defaults.get(f.name)
            if _inverted(f, spec):
                kwargs.update(is_flag=True, default=False)
            elif spec.is_flag:
                kwargs.update(is_flag=True, default=bool(default))
            elif spec.multiple:
                kwargs.update(multiple=True, default=())
            else:
                shown = spec.shown_default
                if shown is None and isinstance(default, tuple):
                    shown = ",".join(map(str, default))
                if not spec.required:
                    kwargs["default"] = shown if shown is not None else default
                    kwargs["show_default"] = kwargs["default"] is not None
            if spec.type is not None:
                kwargs["type"] = spec.type
            if spec.metavar:
                kwargs["metavar"] = spec.metavar
            kwargs.update((overrides or {}).get(f.name, {}))
            command = click.option(_flag_name(f, spec), f.name, **kwargs)(command)
        return command

    return decorate


def from_cli(config_cls, values: dict[str, Any], **extra: Any):
    """``config_cls`` from click's parsed ``values`` (by field name), parsing and inverting as declared.

    Values for names that are not fields are ignored; ``extra`` fields are set as given.
    """
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(config_cls):
        if f.name in extra:
            kwargs[f.name] = extra[f.name]
            continue
        spec = f.metadata.get("cli")
        if spec is None or f.name not in values:
            continue
        value = values[f.name]
        if _inverted(f, spec):
            value = not value
        elif spec.parse is not None:
            value = spec.parse(value)
        kwargs[f.name] = value
    return config_cls(**kwargs)


def check_option_values(config, error: type[Exception] = ValueError) -> None:
    """Refuse a field of ``config`` outside the range or choices its command-line option declares.

    The option types of :func:`lm.options.setting` fields (``click.IntRange``,
    ``click.FloatRange``, ``click.Choice``) are the one statement of each limit:
    click applies them to flags, this applies them to values set in Python or
    read from a file. Raises ``error`` naming the option (``--pad-alpha: ...``).
    """
    for f in dataclasses.fields(config):
        spec, value = f.metadata.get("cli"), getattr(config, f.name)
        if spec is None or value is None or not isinstance(spec.type, click.ParamType):
            continue
        try:
            spec.type.convert(value, None, None)
        except click.BadParameter as exc:
            raise error(f"{spec.flag or '--' + f.name.replace('_', '-')}: {exc.message}") from None
