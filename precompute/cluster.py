"""``--cluster SPEC``: ``precompute`` commands on a dask.distributed cluster.

The store was built for many writers (parts are independent, a section is
complete or it is not there), so a run on a cluster is the one-process run cut
into *work units*, one part of one step each, that dask.distributed schedules
over worker processes. Nothing here schedules, queues or locks by itself: dask
places and retries the units, the store's atomic sections make the writes safe.

Specs (:func:`parse_spec`)
    ``local:N``
        a :class:`distributed.LocalCluster` of N worker processes on this
        machine, one thread each (one model job at a time). On CPUs each worker
        runs torch with ``cores // N`` threads; on a GPU machine worker ``i``
        takes GPU ``i`` (several per worker when there are more GPUs than
        workers: ``local:1 --device-map auto`` shards one teacher over all of them).
    ``cuda``
        dask-cuda's ``LocalCUDACluster``: one worker per visible GPU, each
        pinned to its own GPU (``pip install 'distill-cache[gpu]'``).
    ``tcp://HOST:PORT`` (or ``tls://``, ``ucx://``)
        a scheduler that is already running, with workers started by hand or by
        a cluster manager on any number of machines (``dask worker ADDRESS
        --nthreads 1``). Each worker uses the GPUs its ``CUDA_VISIBLE_DEVICES``
        shows it and the torch threads its ``OMP_NUM_THREADS`` gives it.

    Every worker must run with one thread (``--nthreads 1``): a run refuses a
    cluster with others, naming them.

The coordinator (:class:`ClusterSession`, in the process that runs the command)
    connects, asks every worker what it has (:meth:`ClusterSession.resolve`:
    ``--device auto`` means cuda when every worker has a GPU, ``--dtype auto``
    bf16 when every worker's GPU has it: the store records one dtype per pass,
    and a part must come out the same whichever worker draws it), then the
    command does its cheap part itself exactly as in one process (rows, models
    resolved, tokenizers compared, store opened, pass records, pair bases), ships
    its prepared context to the workers once (:meth:`ClusterSession.install`) and
    submits the units (:meth:`ClusterSession.run`).

Work units (:class:`Unit`)
    A unit names its step, split and part, the module-level function a worker
    runs (importable on the workers: the package must be installed there), its
    arguments (the context's fingerprint and, for steps that read rows, that
    part's rows only) and the units it needs first (``after``). Each is
    submitted with an explicit key ``(step, split, part, run id)``, ``pure=False``,
    ``retries=RETRIES`` and a priority that follows the command's step order, so
    that a worker runs every job of one model before the next model's
    (``precompute teacher``: student, teacher, reference: few model swaps). A
    dependency is a dask dependency on the future of the unit it needs (a
    generated/teacher part on that part's generated/base, generated/reference on
    generated/teacher): a part waits for just the parts it reads, not for a whole
    step. Units whose dependencies are already complete in the store have none.
    A unit's result is a small dict (:func:`part_task`); the coordinator drops
    each result once it is counted, so a dead worker holds nothing that must be
    recomputed.

On the workers
    Two worker plugins (:meth:`distributed.Client.register_plugin`): one set up
    per session (:class:`WorkerPlacement`: torch threads, which GPUs this worker
    owns) and one per run (:class:`RunContext`: the command's context, pickled
    once, with its store handle and rows left out; fingerprint = sha256 of those
    bytes). A worker that (re)starts later gets both from the scheduler. On its
    first unit a worker attaches the context (reopens the store at the same
    location, a shared path or any fsspec URL) and keeps it by fingerprint
    (:func:`worker_context`). Models are kept by path, one at a time per worker
    (:func:`worker_model`): loaded when a unit first needs one, kept while the
    next units need the same, dropped (and GPU memory freed) when a unit needs
    another, and at the end of the run. A model whose path is not on a worker's
    machine is resolved there by name and must have the same weights' sha256.

Engines (``--engine vllm``, :mod:`lm.engines`)
    Each worker holds one vLLM engine in the same one slot as a model
    (:func:`worker_engine`), over the GPUs it owns (``--tensor-parallel N``
    of them: ``local:1`` on a node of 8 GPUs gives one engine all 8). On a GPU
    the engine runs in processes of its own, which a daemonic process may not
    start, so ``local:N`` and ``cuda`` start non-daemonic workers for such a
    run, and a run on workers started by hand refuses daemonic ones, naming
    them (start them with ``DASK_DISTRIBUTED__WORKER__DAEMON=False``). On CPU
    with one GPU-less engine per worker the engine runs inside the worker's
    process, daemonic or not.

Devices
    ``--device cuda`` on a worker means its own GPU (``cuda:i`` for ``local:N``,
    ``cuda:0`` under dask-cuda, the first visible one for ``tcp://``).
    ``--device-map auto`` (accelerate) shards one model over all GPUs the worker
    owns; the decoder and output layer then hand their outputs back on the
    device of their inputs, so the scoring code sees one device.

Faults
    A unit first looks at the store: a section already complete is not computed
    again. A worker that dies mid-part leaves no complete section (see
    :mod:`store.teacher_store`: a section is renamed into place whole, or marked
    complete last on remote stores); the scheduler sends that part to another
    worker (``distributed.scheduler.allowed-failures``, 3 deaths by default,
    after which the run stops with :class:`ClusterError`); an exception inside a
    unit is retried ``RETRIES`` times by dask (``retries=``), then ends the run
    with that exception, after the units still pending are cancelled. What was
    written stays: the same command resumes.

Progress
    One bar over all the run's parts on the coordinator, with the cluster's
    tokens/s; the dashboard's address is printed when the session opens (the
    dashboard needs bokeh). The summary is the one-process summary: per step,
    parts written, parts already complete, tokens and seconds, here the span
    from the step's first unit start to its last unit end over all workers.

Adding a command (as :mod:`precompute.rank` does): build the context as in one
process, :meth:`ClusterSession.install` it with an ``attach`` function, write a
module-level unit function that takes ``(fingerprint, ...)``, opens
``with part_task(step, split, part) as outcome``, gets its context from
:func:`worker_context` and model from :func:`worker_model`, skips complete
sections and fills ``outcome``; then :meth:`ClusterSession.run` and
:func:`tally` into the summary.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from distributed import Client, KilledWorker, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm.auto import tqdm

from lm import engines, models

#: dask's own retries of a unit that raised (a worker that dies is handled by allowed-failures)
RETRIES = 2
CONNECT_TIMEOUT_S = 30
WAIT_FOR_WORKERS_S = 120
PLACEMENT_PLUGIN = "distill-cache-placement"
CONTEXT_PLUGIN = "distill-cache-context-"
ADDRESS_SCHEMES = ("tcp", "tls", "ucx", "inproc")
SPEC_HELP = "local:N (N worker processes here), cuda (one worker per GPU; .[gpu]) or tcp://HOST:PORT"


class ClusterError(RuntimeError):
    """The cluster cannot run this command (no workers, wrong worker threads, a part that kills its workers)."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ClusterSpec:
    text: str
    kind: str  # "local" | "cuda" | "address"
    workers: int | None = None  # local:N
    address: str | None = None  # tcp://HOST:PORT


def parse_spec(text: str) -> ClusterSpec:
    """``local:N``, ``cuda`` or a scheduler address; ValueError naming the accepted forms."""
    spec = str(text).strip()
    if spec.startswith("local:"):
        count = spec[len("local:"):]
        if count.isdigit() and int(count) >= 1:
            return ClusterSpec(spec, "local", workers=int(count))
        raise ValueError(f"--cluster {text!r}: local:N needs a number of workers N >= 1 (local:2)")
    if spec == "cuda":
        return ClusterSpec(spec, "cuda")
    scheme, sep, rest = spec.partition("://")
    if sep and scheme in ADDRESS_SCHEMES:
        host, _, port = rest.rpartition(":")
        if scheme == "inproc" or (host and port.isdigit()):
            return ClusterSpec(spec, "address", address=spec)
        raise ValueError(f"--cluster {text!r}: a scheduler address needs a host and a port (tcp://HOST:8786)")
    raise ValueError(f"--cluster {text!r}: expected {SPEC_HELP}")


def probe_scheduler(spec: ClusterSpec, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Connect to a ``tcp://`` or ``tls://`` scheduler address once, with a plain socket, before dask does:
    ClusterError at once when the connection is refused (nothing listens there) or the host is unknown, and
    after ``timeout`` seconds when nothing answers (an unreachable host). dask's own Client retries a refused
    connection until its timeout and then says only that it timed out. Other addresses are left to dask."""
    scheme, _, rest = (spec.address or "").partition("://")
    if spec.kind != "address" or scheme not in ("tcp", "tls"):
        return
    host, _, port = rest.rpartition(":")
    host = host.strip("[]")  # an IPv6 address in brackets
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return
    except ConnectionRefusedError:
        raise ClusterError(f"--cluster {spec.text}: connection refused: no scheduler listens at {host}:{port} "
                           f"(start one with `dask scheduler --port {port}`, or check the address)") from None
    except socket.timeout:
        raise ClusterError(f"--cluster {spec.text}: no answer from {host}:{port} within {timeout:g} s "
                           f"(an unreachable host, or a firewall in the way)") from None
    except socket.gaierror as exc:
        raise ClusterError(f"--cluster {spec.text}: unknown host {host!r} ({exc.strerror or exc})") from None
    except OSError as exc:
        raise ClusterError(f"--cluster {spec.text}: cannot connect to {host}:{port} "
                           f"({exc.strerror or type(exc).__name__})") from None


def gpus_of_worker(index: int | None, workers: int | None, gpu_count: int) -> list[int]:
    """The visible GPUs one worker owns: all of them, or its share when ``workers`` share the machine.

    Worker ``index`` of ``workers`` gets ``gpu_count // workers`` consecutive
    GPUs; with more workers than GPUs, workers share GPUs round robin.
    """
    if gpu_count <= 0:
        return []
    if index is None or not workers:
        return list(range(gpu_count))
    per = gpu_count // workers
    if per == 0:
        return [index % gpu_count]
    return list(range(index * per, (index + 1) * per))


def choose_device(probes: Mapping[str, Mapping], device: str, dtype: str) -> tuple[str, str]:
    """One device kind and one dtype for the whole cluster, from what each worker reported.

    ``auto`` device: cuda when every worker has a GPU, cpu when none has;
    workers that differ are refused (a pass has one dtype in the store).
    ``auto`` dtype: bfloat16 on cuda when every worker's GPU has it, else float32.
    """
    if not probes:
        raise ClusterError("the cluster has no workers")
    with_gpu = sorted(address for address, p in probes.items() if p.get("gpus"))
    without = sorted(address for address, p in probes.items() if not p.get("gpus"))
    device = device or "auto"
    if device.startswith("cuda:"):
        raise ValueError(f"--device {device} with --cluster: each worker uses its own GPU(s); "
                         f"use --device cuda (or auto)")
    if device == "auto":
        if with_gpu and without:
            raise ValueError(f"--device auto: workers {', '.join(with_gpu)} have GPUs and {', '.join(without)} "
                             f"have none; one pass needs one device kind: pass --device cpu, or use workers alike")
        device = "cuda" if with_gpu else "cpu"
    elif device == "cuda" and without:
        raise ValueError(f"--device cuda: workers {', '.join(without)} have no GPU")
    elif device not in ("cpu", "cuda"):
        raise ValueError(f"--device {device} with --cluster: use auto, cpu or cuda")
    if dtype in (None, "", "auto"):
        bf16 = device == "cuda" and all(p.get("bf16") for p in probes.values())
        return device, "bfloat16" if bf16 else "float32"
    return device, str(models.resolve_dtype(dtype, "cpu")).replace("torch.", "")


# --------------------------------------------------------------------------- on the workers


@dataclass
class _WorkerState:
    """What one worker process keeps between units (module-level: one per process)."""

    gpus: list[int] = field(default_factory=list)
    torch_threads: int | None = None
    payloads: dict[str, tuple[Callable, bytes]] = field(default_factory=dict)  # fingerprint -> (attach, pickled)
    contexts: dict[str, Any] = field(default_factory=dict)  # fingerprint -> attached context
    model_key: tuple | None = None  # (path, device, dtype, device map) of the model kept
    model: Any = None
    loads: list[str] = field(default_factory=list)  # model paths loaded, in order (this process's life)
    ran: list[dict] = field(default_factory=list)  # every unit this process finished, computed or not
    current: tuple | None = None  # (step, split, part) of the unit running now


_STATE = _WorkerState()


class WorkerPlacement(WorkerPlugin):
    """Per session: torch threads, and which GPUs this worker owns (see :func:`gpus_of_worker`).

    ``mode``: ``split`` (``local:N``: worker ``name`` of ``workers`` takes its
    share), ``own`` (dask-cuda: visible GPU 0 is the worker's own), ``all``
    (workers started by hand: every GPU they see).
    """

    idempotent = False

    def __init__(self, mode: str, workers: int | None = None, torch_threads: int | None = None):
        self.mode, self.workers, self.torch_threads = mode, workers, torch_threads

    def setup(self, worker) -> None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = worker.name if isinstance(worker.name, int) else None
        if self.mode == "own":
            _STATE.gpus = [0] if count else []
        elif self.mode == "split":
            _STATE.gpus = gpus_of_worker(index, self.workers, count)
        else:
            _STATE.gpus = gpus_of_worker(None, None, count)
        _STATE.torch_threads = self.torch_threads
        _set_threads()


class RunContext(WorkerPlugin):
    """Per run: the command's prepared context, pickled once (``attach`` reopens what does not travel)."""

    idempotent = True  # the name carries the fingerprint: the same bytes

    def __init__(self, fingerprint: str, attach: Callable[[Any], Any], payload: bytes):
        self.fingerprint, self.attach, self.payload = fingerprint, attach, payload

    def setup(self, worker) -> None:
        _STATE.payloads[self.fingerprint] = (self.attach, self.payload)

    def teardown(self, worker) -> None:
        _STATE.payloads.pop(self.fingerprint, None)
        _STATE.contexts.pop(self.fingerprint, None)
        if not _STATE.payloads:  # no run left on this worker: give the model's memory back
            release_model()


def _set_threads() -> None:
    if _STATE.torch_threads and torch.get_num_threads() != _STATE.torch_threads:
        torch.set_num_threads(_STATE.torch_threads)


def worker_context(fingerprint: str):
    """The run's context on this worker, attached on first use and kept."""
    ctx = _STATE.contexts.get(fingerprint)
    if ctx is None:
        if fingerprint not in _STATE.payloads:
            raise ClusterError(f"worker on {socket.gethostname()} (pid {os.getpid()}) has no context "
                               f"{fingerprint}: its run's plugin was removed (another run replaced it?)")
        attach, payload = _STATE.payloads[fingerprint]
        ctx = attach(pickle.loads(payload))
        _STATE.contexts[fingerprint] = ctx
    return ctx


def placed_device(device: str) -> str:
    """``cuda`` -> this worker's own GPU; anything else as it is."""
    if device == "cuda" and _STATE.gpus:
        return f"cuda:{_STATE.gpus[0]}"
    return device


def local_model(info: models.ModelInfo) -> models.ModelInfo:
    """``info`` as this machine has it: its path, or the same name resolved here with the same weights."""
    if os.path.exists(info.path):
        return info
    here = models.resolve_model(info.name, info.name)
    if here.weights_hash != info.weights_hash:
        raise models.ModelLoadError(f"{socket.gethostname()}: model {info.name!r} resolves to {here.path}, whose "
                                    f"weights differ from the coordinator's ({info.path}); give every worker "
                                    f"the same weights (a shared path, or a copy)")
    return here


def worker_model(info: models.ModelInfo, *, device: str, dtype: str, device_map: str | None = None,
                 on_load: Callable[[Any], None] | None = None):
    """The model at ``info``, loaded once on this worker and kept until a unit needs another one
    (another path, device, dtype or device map).

    ``on_load(model)`` runs after a load (a check); a model that fails it is not kept.
    """
    key = (info.path, device, dtype, device_map)
    if _STATE.model_key != key or _STATE.model is None:
        release_model()
        model = load_model(local_model(info), device=placed_device(device), dtype=dtype, device_map=device_map,
                           gpus=_STATE.gpus)
        if on_load is not None:
            on_load(model)
        _STATE.model, _STATE.model_key = model, key
        _STATE.loads.append(info.path)
    return _STATE.model


def worker_engine(info: models.ModelInfo, *, device: str, dtype: str, spec: engines.EngineSpec,
                  max_model_len: int, max_logprobs: int = 0) -> engines.VllmEngine:
    """A vLLM engine over the model at ``info`` on this worker's GPUs (or its CPU), kept like
    :func:`worker_model`'s model (one at a time, in the same slot) until a unit needs another one."""
    key = (engines.VLLM, info.path, device, dtype, spec, int(max_model_len), int(max_logprobs))
    if _STATE.model_key != key or _STATE.model is None:
        release_model()
        gpus = list(_STATE.gpus) if device.startswith("cuda") else None
        if gpus is not None and spec.tensor_parallel > len(gpus):
            raise ClusterError(f"--tensor-parallel {spec.tensor_parallel}: the worker on {socket.gethostname()} "
                               f"(pid {os.getpid()}) owns {len(gpus)} GPU(s) {gpus}; give each worker that many "
                               f"(--cluster local:N with N = GPUs / {spec.tensor_parallel})")
        engine = engines.VllmEngine(models.model_dir(local_model(info)), device=placed_device(device), dtype=dtype,
                                    tensor_parallel=spec.tensor_parallel, kv_cache_gib=spec.kv_cache_gib,
                                    max_model_len=max_model_len, max_logprobs=max_logprobs, gpus=gpus)
        _STATE.model, _STATE.model_key = engine, key
        _STATE.loads.append(info.path)
    return _STATE.model


def release_model() -> None:
    """Drop this worker's model (an engine is shut down) and give its memory back."""
    engines.release(_STATE.model)
    _STATE.model = _STATE.model_key = None
    models.free_memory()


@contextmanager
def part_task(step: str, split: str, part: int) -> Iterator[dict]:
    """The outcome of one unit: the body sets ``computed``, ``written``, ``tokens``, ``groups``.

    Start and stop times (wall clock, comparable across the machines of a
    cluster as far as their clocks agree), the worker and whether the unit
    loaded a model are added; the outcome is kept in this worker's log
    (:func:`worker_log`).
    """
    _set_threads()
    outcome = {"step": step, "split": split, "part": int(part), "computed": False, "written": False,
               "tokens": 0, "groups": 0, "start": time.time(), "stop": None, "loaded": False,
               "worker": f"{socket.gethostname()}:{os.getpid()}"}
    loads = len(_STATE.loads)
    _STATE.current = (step, split, int(part))
    try:
        yield outcome
    finally:
        _STATE.current = None
    outcome["stop"] = time.time()
    outcome["loaded"] = len(_STATE.loads) > loads
    _STATE.ran.append(dict(outcome))


def worker_log() -> dict:
    """This worker's pid, the models it loaded and the units it finished (``client.run(worker_log)``)."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "gpus": list(_STATE.gpus),
            "torch_threads": torch.get_num_threads(), "loads": list(_STATE.loads), "ran": list(_STATE.ran),
            "current": _STATE.current}


def _probe() -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"host": socket.gethostname(), "pid": os.getpid(), "gpus": gpus,
            "bf16": bool(gpus and torch.cuda.is_bf16_supported()), "torch_threads": torch.get_num_threads(),
            "daemon": bool(multiprocessing.current_process().daemon)}


# --------------------------------------------------------------------------- loading


def load_model(info: models.ModelInfo, *, device: str, dtype: str, device_map: str | None = None,
               gpus: Sequence[int] | None = None):
    """A model in eval mode: on ``device``, or sharded by accelerate over ``gpus`` with ``device_map``."""
    if not device_map:
        model, _, _ = models.load_model(info.path, device=device, dtype=dtype)
        return model
    from transformers import AutoModelForCausalLM

    path = models.model_dir(info)  # a GGUF file is converted once, as models.load_model does
    kwargs: dict = {}
    if device.startswith("cuda"):
        count = torch.cuda.device_count()
        owned = list(gpus) if gpus else list(range(count))
        if len(owned) < count:  # this worker's share of the machine's GPUs only
            kwargs["max_memory"] = {g: int(0.9 * torch.cuda.get_device_properties(g).total_memory) for g in owned}
    else:
        kwargs["max_memory"] = None
        device_map = {"": "cpu"} if device == "cpu" else device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=models.resolve_dtype(dtype, device),
                                                     device_map=device_map, **kwargs)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise models.ModelLoadError(f"{path}: the model cannot be loaded with --device-map {device_map} "
                                    f"({type(exc).__name__}: {exc})") from exc
    keep_outputs_on_input_device(model)
    return model.eval()


def keep_outputs_on_input_device(model) -> None:
    """Make the decoder and the output layer return on their input's device (a sharded model's scoring).

    accelerate moves a sharded model's tensors between GPUs inside ``forward``
    and returns the whole model's outputs on the input's device, but not those
    of its parts; the scoring code calls the decoder and the output layer apart
    (:func:`lm.head.split_model`).
    """
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from lm.head import split_model

    decoder, head = split_model(model)
    for module in (decoder, head.module):
        add_hook_to_module(module, AlignDevicesHook(io_same_device=True), append=True)


# --------------------------------------------------------------------------- the coordinator


@dataclass(frozen=True)
class Unit:
    """One part of one step: ``fn(*args, *results of after)`` on a worker returns a :func:`part_task` outcome."""

    step: str
    split: str
    part: int
    fn: Callable[..., dict]
    args: tuple = ()
    after: tuple[tuple[str, str, int], ...] = ()  # (step, split, part) of units of this run it reads
    priority: int = 0  # higher runs first: the command's model order

    @property
    def id(self) -> tuple[str, str, int]:
        return (self.step, self.split, self.part)


def _echo(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ClusterSession:
    """A cluster for one command run: started (``local:N``, ``cuda``) or joined (an address), then closed.

    ``torch_threads`` overrides the per-worker torch threads of ``local:N``
    (``cores // N``) and ``cuda``; workers of an address keep their own.
    ``engine``: the run's engine (``--engine vllm``: non-daemonic workers where
    it needs them, see the module docstring).
    """

    def __init__(self, spec: str, *, torch_threads: int | None = None, echo: Callable[[str], None] = _echo,
                 engine: engines.EngineSpec | None = None):
        self.spec = parse_spec(spec)
        self.torch_threads = torch_threads
        self.echo = echo
        self.engine = engine or engines.EngineSpec()
        self.cluster = None
        self.client: Client | None = None
        self._plugins: list[str] = []
        self._dask_config = None

    # -- opening and closing ---------------------------------------------------

    def __enter__(self) -> "ClusterSession":
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        spec, cores = self.spec, os.cpu_count() or 1
        if self.engine.is_vllm and spec.kind in ("local", "cuda"):
            # vLLM on a GPU starts processes of its own: the workers (and any the nanny restarts) may not be
            # daemonic; undone in close()
            import dask

            self._dask_config = dask.config.set({"distributed.worker.daemon": False})
        if spec.kind == "local":
            self.cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                                        memory_limit=0)  # models, not dask, decide memory: no pausing or killing
            placement = WorkerPlacement("split", spec.workers,
                                        self.torch_threads or max(1, cores // spec.workers))
        elif spec.kind == "cuda":
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                raise ClusterError("--cluster cuda needs dask-cuda: pip install 'distill-cache[gpu]'") from None
            self.cluster = LocalCUDACluster(threads_per_worker=1, memory_limit=0)
            placement = WorkerPlacement("own", None,
                                        self.torch_threads or max(1, cores // max(1, len(self.cluster.workers))))
        else:
            probe_scheduler(spec)  # a refused connection said at once, not after dask's timeout
            placement = WorkerPlacement("all", None, self.torch_threads)
        self.client = Client(self.cluster if self.cluster is not None else spec.address,
                             timeout=CONNECT_TIMEOUT_S, set_as_default=False)
        try:
            self.client.wait_for_workers(1, timeout=WAIT_FOR_WORKERS_S)
        except TimeoutError:
            raise ClusterError(f"--cluster {spec.text}: no worker joined the scheduler within "
                               f"{WAIT_FOR_WORKERS_S} s (start them with `dask worker {spec.address} "
                               f"--nthreads 1`)") from None
        threads = self.client.nthreads()
        several = sorted(f"{address} ({n})" for address, n in threads.items() if n != 1)
        if several:
            raise ClusterError(f"--cluster {spec.text}: workers must run one thread each (one model job at "
                               f"a time: `dask worker ... --nthreads 1`); these have more: {', '.join(several)}")
        self.client.register_plugin(placement, name=PLACEMENT_PLUGIN)
        link = self.client.dashboard_link or "none (the dashboard needs bokeh)"
        self.echo(f"dask cluster {spec.text}: {len(threads)} worker(s), scheduler {self.client.scheduler.address}, "
                  f"dashboard {link}")

    def close(self) -> None:
        if self.client is not None:
            for name in self._plugins:  # frees the workers' contexts and models (workers of an address live on)
                try:
                    self.client.unregister_worker_plugin(name)
                except Exception:  # noqa: BLE001 - closing: a worker already gone has nothing to free
                    pass
            self._plugins.clear()
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None
        if self._dask_config is not None:
            self._dask_config.__exit__(None, None, None)
            self._dask_config = None

    @property
    def workers(self) -> int:
        return len(self.client.nthreads()) if self.client is not None else 0

    # -- what the workers have -------------------------------------------------

    def probes(self) -> dict[str, dict]:
        return self.client.run(_probe)

    def resolve(self, device: str, dtype: str) -> tuple[str, str]:
        """``--device``/``--dtype`` for every worker alike (:func:`choose_device`); with a vLLM engine that
        starts processes of its own (on a GPU, or over several), workers that may not start them are refused."""
        probes = self.probes()
        device, dtype = choose_device(probes, device, dtype)
        if self.engine.is_vllm and (device == "cuda" or self.engine.tensor_parallel > 1):
            daemonic = sorted(address for address, p in probes.items() if p.get("daemon"))
            if daemonic:
                raise ClusterError(f"--engine vllm on --cluster {self.spec.text}: workers {', '.join(daemonic)} are "
                                   f"daemonic processes, which cannot start vLLM's engine processes; start them "
                                   f"with DASK_DISTRIBUTED__WORKER__DAEMON=False in their environment")
        return device, dtype

    def install(self, attach: Callable[[Any], Any], portable: Any) -> str:
        """Send a run's context to every worker, present and future; returns its fingerprint."""
        payload = pickle.dumps(portable, protocol=pickle.HIGHEST_PROTOCOL)
        fingerprint = hashlib.sha256(payload).hexdigest()[:16]
        name = CONTEXT_PLUGIN + fingerprint
        self.client.register_plugin(RunContext(fingerprint, attach, payload), name=name)
        self._plugins.append(name)
        return fingerprint

    # -- running units -----------------------------------------------------------

    def run(self, units: Sequence[Unit], *, desc: str = "parts", progress: bool = True) -> list[tuple[Unit, dict]]:
        """Submit every unit, wait for all; (unit, outcome) in completion order.

        The first unit that fails (after dask's retries) cancels the rest and its
        exception is raised; a unit that killed ``allowed-failures`` workers raises
        :class:`ClusterError`.
        """
        run_id = uuid.uuid4().hex[:8]
        ids = {u.id for u in units}
        futures: dict[tuple, Any] = {}
        unit_of_key: dict = {}
        for unit in units:
            missing = [a for a in unit.after if a in ids and a not in futures]
            if missing:
                raise ValueError(f"{unit.id}: submitted before the units it needs: {missing}")
            deps = [futures[a] for a in unit.after if a in futures]
            future = self.client.submit(unit.fn, *unit.args, *deps, key=(*unit.id, run_id), pure=False,
                                        retries=RETRIES, priority=unit.priority)
            futures[unit.id] = future
            unit_of_key[future.key] = unit
        pending = as_completed(list(futures.values()), loop=self.client.loop)
        futures.clear()  # as_completed holds them until done, nothing after: a result counted is let go
        done: list[tuple[Unit, dict]] = []
        tokens, t0 = 0, time.perf_counter()
        bar = tqdm(total=len(unit_of_key), desc=desc, unit="part", disable=not progress, dynamic_ncols=True)
        try:
            for future in pending:
                unit = unit_of_key[future.key]
                try:
                    outcome = future.result()
                except KilledWorker as exc:
                    raise ClusterError(f"{unit.step} {unit.split} part {unit.part}: the workers died each of the "
                                       f"{exc.allowed_failures + 1} times one ran it (out of memory?); see the "
                                       f"workers' logs; the same command resumes") from None
                del future
                done.append((unit, outcome))
                tokens += int(outcome.get("tokens", 0))
                bar.update(1)
                bar.set_postfix_str(f"{unit.step}, {tokens / max(1e-9, time.perf_counter() - t0):.0f} tok/s",
                                    refresh=False)
        finally:
            bar.close()
            left = list(pending.futures)
            if left:
                self.client.cancel(left)
        return done


def tally(results: Sequence[tuple[Unit, dict]], records: Mapping[str, dict]) -> dict[str, int]:
    """Add outcomes to the summary's step records; returns sampled groups covered per step.

    A part computed and written counts as written; one found complete (or
    completed by another writer meanwhile) as already complete. A step's
    seconds are the span from its first unit's start to its last unit's end.
    """
    groups: dict[str, int] = {}
    spans: dict[str, list[float]] = {}
    for unit, outcome in results:
        record = records[unit.step]
        if outcome["written"]:
            record["parts_done"] += 1
            record["tokens"] += int(outcome["tokens"])
            groups[unit.step] = groups.get(unit.step, 0) + int(outcome["groups"])
        else:
            record["parts_skipped"] += 1
        if outcome["computed"]:
            span = spans.setdefault(unit.step, [outcome["start"], outcome["stop"]])
            span[0], span[1] = min(span[0], outcome["start"]), max(span[1], outcome["stop"])
    for step, (start, stop) in spans.items():
        records[step]["seconds"] = stop - start
    return groups
