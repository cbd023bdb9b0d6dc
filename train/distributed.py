"""``train student`` on several processes: ``torchrun`` or ``accelerate launch``, one process per device.

Nothing to add to the command: a launcher sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`setup` reads them.
Without them (``WORLD_SIZE`` unset or 1) the run is a world of one process: no
process group, no wrapper, every collective the identity. The trainer's loop is the
same either way: what differs lives in :class:`ParallelStudent` and :class:`Context`.

Process group. ``torch.distributed.init_process_group`` from the environment
(``env://``): backend ``nccl`` when the device is CUDA, ``gloo`` on the CPU. Each
process takes ``cuda:LOCAL_RANK`` (``--device auto`` or ``cuda``); ``--device cuda:N``
is refused there (every process would take the same GPU). A group that the caller
already started is used as it is and left open.

Plain torch, not HF Accelerate's ``Accelerator``: both launchers only set the
environment above, so the same code serves both, and nothing of Accelerate's
(its scheduler stepping once per process, its own autocast, its own
checkpoints) has to be reconciled with this trainer's. What an ``accelerate
launch`` configuration says is read from the variables it sets
(:func:`launch_settings`): ``distributed_type: FSDP`` (``ACCELERATE_USE_FSDP``)
turns FSDP on with its ``fsdp_*`` settings; ``mixed_precision: bf16`` is
``--dtype bfloat16`` when ``--dtype`` is ``auto`` (fp16 and fp8 are refused, as
``--dtype float16`` is); a DeepSpeed configuration is refused with a message
(FSDP's full sharding is ZeRO-3's; use ``configs/accelerate_fsdp.yaml``).

Wrapping. The student's forward does not go through ``model(...)``:
:func:`train.methods.student_outputs` runs the decoder, then the output layer on
chosen rows in checkpointed chunks. So the module that is wrapped is
:class:`StudentLoss`, whose ``forward(batch)`` is :func:`train.methods.method_loss`
on the student it holds: DDP's reducer and FSDP's unshard/reshard hooks see the
whole loss computation. :class:`ParallelStudent` holds it (unwrapped on one process)
and gives the trainer's loop its forward, backward, gradient accumulation, clipping
and checkpoint states, the same calls for one process and several.

- DDP (default): ``DistributedDataParallel(StudentLoss(student))``, buffers not
  broadcast (the student's are constants), gradients as bucket views.
- FSDP (``--fsdp``, or an accelerate FSDP configuration): FSDP2 ``fully_shard`` on
  every decoder layer (the classes of the model's ``_no_split_modules``, or
  ``fsdp_transformer_layer_cls_to_wrap``), then on the :class:`StudentLoss` root,
  which holds the rest (embeddings, final norm, output layer: a tied output layer
  stays with its embedding). The student loads on the CPU and each process keeps
  only its shard on its device; the optimizer is built on the sharded parameters.
  Accelerate's ``fsdp_reshard_after_forward`` (an FSDP1 config's sharding
  strategy: SHARD_GRAD_OP keeps the gathered weights until backward, NO_SHARD is
  DDP, hybrid strategies shard over all processes) and ``fsdp_offload_params``
  (CPU offload, CUDA only) are followed; other ``fsdp_*`` settings that are on
  are ignored with a note.

Both: bf16 ``torch.autocast`` as on one process (float32 weights, gradients and
optimizer state); gradient accumulation with no gradient communication on the
accumulation steps (DDP ``no_sync``, FSDP ``set_requires_gradient_sync(False)``,
which keeps unsharded gradients until the step's last batch: memory for speed),
communication on the last batch of each optimizer step.

Exactly the one-process gradient. A term is a mean over its own units in the
batch: response tokens (SFT, KD, ADPA, CycleAlign's SFT on the best), pairs (DPO,
SimPO) or groups (PAD and its baselines; CycleAlign's RRHF and PRO: the groups
with a pseudo-label): each term's own :class:`train.methods.Unit`.
Before each forward the processes sum, per term, the number of units in their
batches (one all-reduce of a few numbers); process ``r`` then backpropagates
``W * sum_t weight_t * term_t * n_rt / N_t`` (``n_rt`` its units, ``N_t`` everyone's,
``W`` processes). DDP and FSDP average gradients over the W processes, so the
gradient is ``sum_t weight_t * (sum_r n_rt * term_rt) / N_t``: each term's mean
over the union of the processes' batches, as if one process had the whole batch,
whatever the processes' token counts. The logged loss and terms are the same
global means (:class:`train.records.Meter` sums the processes' shares).

Sharding (:class:`RankStream`). The epoch's part order is the one-process order
(:meth:`store.ExampleStream.part_order`, shuffled by the seed and the epoch). Its
first ``W * floor(P / W)`` parts are dealt round-robin, whole, to the processes;
the remaining ``P mod W`` parts are read by every process and split by example
(example index mod W). Each process shuffles its share through the stream's own
bounded buffer. Every example of the epoch is read by exactly one process, in an
order fixed by the seed and the epoch; with one process it is the one-process
stream exactly. Batches are built per process, ``--batch-tokens`` each: one
optimizer step takes ``W * grad_accum`` batches, up to ``W * grad_accum *
batch_tokens`` padded tokens.

Uneven shares. The shares rarely make the same number of batches. Pre-flight
counts every process's batches per epoch (each process counts them all, from the
base arrays, in the same order as training: no communication);
an epoch lasts as many batches as the longest share (``ceil(longest / grad_accum)``
optimizer steps), and a process whose share is done runs its remaining batches of
the epoch as zero-weight batches (:meth:`ParallelStudent.loss`: one fixed example,
no unit counted, loss times 0), so that every process makes the same
collective calls. No example is dropped or repeated.

Launcher gone. torchrun starts each process in a session of its own, so killing
the launcher's process group would leave them training; each process has the
kernel kill it when the launcher dies (:func:`die_with_launcher`), and rank 0
holds the run folder's lock (:mod:`train.runlock`).

Only the process of rank 0 writes (model, ``metrics.jsonl``, ``config.yaml``,
``loss_curves.png``, checkpoints, TensorBoard events) and shows the progress bar
and notes; a refusal found by every process is printed once. Under FSDP the full
model and optimizer states are gathered to it (``torch.distributed.checkpoint``'s
full state dicts) to be written in the one-process formats' places.

Resuming. A checkpoint of W processes holds, besides the one-process state, each
process's examples consumed in the epoch and its RNG state
(``state["processes"]``), and the optimizer state by parameter name (which FSDP
and DDP both load). Every process reads it and takes its own position;
``--resume`` with another number of processes is refused (the shares, so the
positions, depend on it).
"""

from __future__ import annotations

import inspect
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch

from store import Example, ExampleStream, TeacherStore

from . import checkpoint, methods
from .batches import Batch, collate
from .config import TrainError

T = TypeVar("T")

#: variables an ``accelerate launch`` configuration sets that this module reads
ENV_FSDP, ENV_DEEPSPEED, ENV_PRECISION = "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_MIXED_PRECISION"
FSDP_FOLLOWED = ("FSDP_RESHARD_AFTER_FORWARD", "FSDP_SHARDING_STRATEGY", "FSDP_OFFLOAD_PARAMS",
                 "FSDP_TRANSFORMER_CLS_TO_WRAP", "FSDP_VERSION", "FSDP_AUTO_WRAP_POLICY", "FSDP_STATE_DICT_TYPE",
                 "FSDP_USE_ORIG_PARAMS", "FSDP_SYNC_MODULE_STATES", "FSDP_MIN_NUM_PARAMS")


#: accelerate's ways of saying that FSDP reshards after forward (FULL_SHARD) or keeps (SHARD_GRAD_OP), or none
_RESHARD = frozenset({"TRUE", "1", "FULL_SHARD", "HYBRID_SHARD", "4"})
_KEEP = frozenset({"FALSE", "0", "SHARD_GRAD_OP", "2", "HYBRID_SHARD_ZERO2", "5"})
_NO_SHARD = frozenset({"NO_SHARD", "3"})


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes")


# --------------------------------------------------------------------------- who this process is


@dataclass(frozen=True)
class Shard:
    """This process's place: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def shard_from_env() -> Shard:
    """``RANK`` and ``WORLD_SIZE`` as torchrun and accelerate set them (one process without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0) if world > 1 else 0
    if world < 1 or not 0 <= rank < world:
        raise TrainError(f"RANK={rank} and WORLD_SIZE={world} from the environment do not make a process group")
    return Shard(rank, world)


def is_main_process() -> bool:
    """Whether this process is the one that prints and writes (rank 0, or the only one)."""
    return shard_from_env().main


@dataclass(frozen=True)
class LaunchSettings:
    """What the launcher's environment asks for beyond rank and world size (module docstring)."""

    fsdp: bool = False
    reshard_after_forward: bool = True
    offload_params: bool = False
    layer_classes: tuple[str, ...] = ()
    dtype: str | None = None  # "bfloat16" when accelerate's mixed_precision is bf16
    notes: tuple[str, ...] = ()


def launch_settings(fsdp_flag: bool = False) -> LaunchSettings:
    """The launcher's settings from the environment (accelerate's variables); TrainError for what cannot run."""
    env = os.environ
    if _true(env.get(ENV_DEEPSPEED)):
        raise TrainError("accelerate's DeepSpeed configurations are not supported by `train student`; use FSDP, "
                         "whose full sharding is ZeRO-3's (accelerate launch --config_file "
                         "configs/accelerate_fsdp.yaml, or --fsdp under torchrun), or DDP "
                         "(configs/accelerate_ddp.yaml)")
    precision = (env.get(ENV_PRECISION) or "no").strip().lower()
    if precision in ("fp16", "fp8"):
        raise TrainError(f"accelerate's mixed_precision {precision} is not supported (float16 needs loss scaling): "
                         f"use bf16 or no (launch with --mixed_precision bf16)")
    fsdp = fsdp_flag or _true(env.get(ENV_FSDP))
    notes = []
    # FSDP2 configs say fsdp_reshard_after_forward true/false; FSDP1 configs a sharding strategy, there or in
    # fsdp_sharding_strategy (by name or number)
    how = (env.get("FSDP_RESHARD_AFTER_FORWARD") or env.get("FSDP_SHARDING_STRATEGY") or "true").strip().upper()
    reshard = how in _RESHARD
    if fsdp and how in _NO_SHARD and not fsdp_flag:
        fsdp = False
        notes.append("note: the accelerate config's NO_SHARD is DDP: training with DDP")
    elif fsdp and (how not in _RESHARD | _KEEP or how.startswith("HYBRID") or how in ("4", "5")):
        reshard = how not in _KEEP
        notes.append(f"note: FSDP sharding {how.lower()} is run over all processes as "
                     f"{'FULL_SHARD' if reshard else 'SHARD_GRAD_OP'} (no hybrid sharding)")
    ignored = sorted(k for k in env if k.startswith("FSDP_") and k not in FSDP_FOLLOWED and _true(env[k]))
    if fsdp and ignored:
        notes.append(f"note: ignored accelerate FSDP settings: {', '.join(ignored)}")
    classes = tuple(c.strip() for c in (env.get("FSDP_TRANSFORMER_CLS_TO_WRAP") or "").split(",") if c.strip())
    return LaunchSettings(fsdp=fsdp, reshard_after_forward=reshard, layer_classes=classes,
                          offload_params=_true(env.get("FSDP_OFFLOAD_PARAMS")),
                          dtype="bfloat16" if precision == "bf16" else None, notes=tuple(notes))


def process_device(device: str, shard: Shard, local_rank: int) -> str:
    """The device of this process: ``cuda:LOCAL_RANK`` for auto/cuda on several processes, else ``device``."""
    cuda = torch.cuda.is_available()
    if shard.world == 1:
        return device
    if device in ("", "auto"):
        return f"cuda:{local_rank}" if cuda else "cpu"
    if device == "cuda":
        return f"cuda:{local_rank}"
    if device.startswith("cuda:"):
        raise TrainError(f"--device {device} on {shard.world} processes: every process would use that GPU; pass "
                         f"--device cuda (or auto): each process takes cuda:LOCAL_RANK")
    if device != "cpu":
        raise TrainError(f"--device {device} is not supported on several processes: use cuda or cpu")
    return device


# --------------------------------------------------------------------------- the process group


@dataclass
class Context:
    """The process group this run is part of (a one-process run has none), and how to talk to it."""

    shard: Shard = field(default_factory=Shard)
    local_rank: int = 0
    device: str = "cpu"  # where the student trains
    launch: LaunchSettings = field(default_factory=LaunchSettings)
    owns_group: bool = False  # whether :func:`setup` started the group (and so ends it)

    @property
    def world(self) -> int:
        return self.shard.world

    @property
    def main(self) -> bool:
        return self.shard.main

    @property
    def parallel(self) -> str:
        """``none`` (one process), ``ddp`` or ``fsdp``."""
        return "none" if self.world == 1 else "fsdp" if self.launch.fsdp else "ddp"

    @property
    def load_device(self) -> str:
        """Where the student loads: the CPU under FSDP (sharding moves each process's shard to its device)."""
        return "cpu" if self.parallel == "fsdp" else self.device

    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        # gloo reduces CPU tensors, nccl CUDA tensors
        return torch.as_tensor(values, dtype=dtype, device=self.device if self.device.startswith("cuda") else "cpu")

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (itself on one process)."""
        if self.world == 1:
            return list(values)
        tensor = self._tensor(values)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list | None:
        """Every process's ``value`` (picklable), in rank order, on rank 0; None on the others."""
        if self.world == 1:
            return [value]
        gathered = [None] * self.world if self.main else None
        torch.distributed.gather_object(value, gathered, dst=0)
        return gathered

    def agree(self, run: Callable[[], T]) -> T:
        """``run()`` on every process; when it failed on any, it fails on all, reported by one.

        The lowest rank that failed raises its own error (printed as on one process); the
        others raise a TrainError marked ``quiet`` (the command line exits without
        printing it). So a refusal that every process finds (a bad option, a missing
        signal) is one line, and a failure of one process (a model that does not load)
        stops them all instead of leaving the others waiting in a collective.
        """
        if self.world == 1:
            return run()
        result, failure, raised = None, None, None
        try:
            result = run()
        except Exception as exc:  # noqa: BLE001 - told to the others first, then raised here as it is
            raised = exc
            failure = str(exc) if isinstance(exc, TrainError) else f"{type(exc).__name__}: {exc}"
        failures = [None] * self.world
        torch.distributed.all_gather_object(failures, failure)
        failed = [rank for rank, message in enumerate(failures) if message is not None]
        if not failed:
            return result
        if failed[0] == self.shard.rank:  # the lowest failed rank reports, its error as it is
            raise raised
        error = TrainError(f"process {failed[0]} failed: {failures[failed[0]]}")
        error.quiet = True  # reported by that process
        raise error

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


#: set by torch's elastic agent (``torchrun``, and ``accelerate launch``, which runs it) in each process it starts
ENV_ELASTIC_RUN = "TORCHELASTIC_RUN_ID"
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_launcher() -> bool:
    """Under torch's elastic agent, have the kernel SIGKILL this process when the agent dies; whether it was set.

    The agent starts each process in a session of its own (``start_new_session``), so
    a signal to the launcher's process group (a job killed by hand or by a scheduler)
    does not reach the processes, which would train on, write the model and hold the
    run folder's lock (:mod:`train.runlock`) with no launcher left. ``prctl(PR_SET_PDEATHSIG,
    SIGKILL)`` (Linux; through ctypes) ties each process to the agent, its parent:
    the kernel acts at the parent's death, with no thread of ours to poll
    ``os.getppid()`` and nothing that a process blocked in a collective or in
    native code would have to run first; SIGKILL because nobody is left to read
    what the process would do on the way out, and every file of the run survives a
    kill (:mod:`train.checkpoint`). An agent that died before the call (the parent
    is already init) ends the process at once. Elsewhere (not Linux, or no
    launcher: a process started from a shell may outlive it on purpose, under
    ``nohup``) nothing is set.
    """
    if ENV_ELASTIC_RUN not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # no C library to call, or no prctl in it
        return False
    if os.getppid() == 1:  # the launcher died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGKILL)
    return True


@contextmanager
def setup(device: str, fsdp_flag: bool = False) -> Iterator[Context]:
    """The run's :class:`Context`: a process group from the environment on several processes (module docstring);
    under a launcher, this process dies with it (:func:`die_with_launcher`)."""
    die_with_launcher()
    shard = shard_from_env()
    launch = launch_settings(fsdp_flag)
    local_rank = int(os.environ.get("LOCAL_RANK", shard.rank) or 0)
    context = Context(shard=shard, local_rank=local_rank, device=process_device(device, shard, local_rank),
                      launch=launch)
    if shard.world > 1:  # a world of one needs no group: its collectives are the identity
        if not torch.distributed.is_initialized():
            cuda = context.device.startswith("cuda")
            if cuda:
                torch.cuda.set_device(context.device)
            torch.distributed.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                                 rank=shard.rank, world_size=shard.world)
            context.owns_group = True
        elif torch.distributed.get_world_size() != shard.world:
            raise TrainError(f"WORLD_SIZE={shard.world} but the process group already started has "
                             f"{torch.distributed.get_world_size()} processes")
    try:
        yield context
    finally:
        context.close()


# --------------------------------------------------------------------------- each process's share of the store


def shared_parts(order: list[int], world: int) -> list[int]:
    """The parts of ``order`` (an epoch's part order) that every process reads and splits by example: the last
    ``len(order) mod world`` (none for one process); the others are dealt whole."""
    return order[len(order) - len(order) % world:]


def rank_parts(order: list[int], shard: Shard) -> list[int]:
    """The parts process ``shard.rank`` reads in an epoch whose part order is ``order``: its whole parts (every
    ``world``-th of the dealt ones, from its rank), then the shared parts (:func:`shared_parts`). One process:
    ``order``."""
    dealt = len(order) - len(order) % shard.world
    return order[shard.rank:dealt:shard.world] + shared_parts(order, shard.world)


class RankStream(ExampleStream):
    """The examples of one process's share of a split, streamed, shuffled (module docstring, "Sharding").

    An :class:`store.ExampleStream` whose part order is the process's parts; examples of
    the shared parts are kept when their index mod ``world`` is the rank.
    ``iterate(epoch, skip)`` skips ``skip`` of the share's examples (resuming). With one
    process: the plain shuffled stream.
    """

    def __init__(self, store: TeacherStore, split: str, needs, *, seed: int = 0, shard: Shard = Shard(),
                 buffer_examples: int = 512):
        super().__init__(store, split, needs, shuffle=True, seed=seed, buffer_examples=buffer_examples)
        self.shard = shard

    def epoch_order(self, epoch: int) -> list[int]:
        """The one-process part order of ``epoch``."""
        return ExampleStream.part_order(self, epoch)

    def part_order(self, epoch: int) -> list[int]:
        return rank_parts(self.epoch_order(epoch), self.shard)

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[Example]:
        ranges = [self.store.part_range(self.split, part) for part in shared_parts(self.epoch_order(epoch),
                                                                                  self.shard.world)]
        kept = 0
        for example in super().iterate(epoch):
            index = example.example_index
            if any(start <= index < stop for start, stop in ranges) and index % self.shard.world != self.shard.rank:
                continue  # another process's example of a shared part
            if kept >= skip:
                yield example
            kept += 1


# --------------------------------------------------------------------------- each term's units


def term_counts(batch: Batch, terms: list[methods.Term]) -> list[int]:
    """Each term's units in ``batch`` (its :class:`train.methods.Unit`), in the order of ``terms``."""
    return [t.unit.count(batch) for t in terms]


def shares(counts: list[int], totals: list[float]) -> list[float]:
    """Each term's share of its global units held by this batch (0 where the total is 0)."""
    return [count / total if total > 0 else 0.0 for count, total in zip(counts, totals)]


def has_rows(batch: Batch, terms: list[methods.Term]) -> bool:
    """Whether some response row of ``batch`` is one the terms run the student on (else the loss is a constant)."""
    return any(bool(methods.response_rows(batch, r.sequence_set, r.role).any()) for r in methods.token_requests(terms))


# --------------------------------------------------------------------------- the wrapped student and its steps


class StudentLoss(torch.nn.Module):
    """The student, with the method's loss on a batch as its ``forward``: the module DDP and FSDP wrap."""

    def __init__(self, student: torch.nn.Module, terms: list[methods.Term], settings, chunk_size: int):
        super().__init__()
        self.student = student
        self.terms, self.settings, self.chunk_size = terms, settings, chunk_size

    def forward(self, batch: Batch):
        return methods.method_loss(self.student, batch, self.terms, self.settings, self.chunk_size)


def _layer_classes(student: torch.nn.Module, named: tuple[str, ...]) -> set[type]:
    names = set(named or getattr(student, "_no_split_modules", None) or ())
    return {type(m) for m in student.modules() if type(m).__name__ in names}


def checkpoint_layers(student: torch.nn.Module) -> int:
    """Activation checkpointing on each decoder layer of ``student`` (transformers' own, ``use_reentrant=False``);
    the number of modules it checkpoints. TrainError for a model that has none.

    transformers wraps each layer's ``forward`` (not ``__call__``): DDP's and FSDP2's hooks stay outside the
    checkpoint, so an FSDP unit's weights are gathered once for the forward and once for the backward, its
    recomputation included. A layer checkpoints only in train mode with gradients on, and then drops any KV
    cache (:func:`train.methods.student_outputs` asks for none). ``activation_checkpointing_enable`` is what
    transformers 5 names ``gradient_checkpointing_enable`` (kept there as a deprecated alias); older versions
    have only the latter.
    """
    if not getattr(student, "supports_gradient_checkpointing", False):
        raise TrainError(f"--gradient-checkpointing: {type(student).__name__} does not support activation "
                         f"checkpointing (transformers' supports_gradient_checkpointing is False): train without it")
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    flagged = {id(m): m for m in student.modules() if getattr(m, "gradient_checkpointing", False) is True}
    # the layers: flagged modules with no flagged module inside (the decoder that holds them is flagged too)
    layers = sum(1 for m in flagged.values() if not any(id(inner) in flagged for inner in list(m.modules())[1:]))
    if layers == 0:
        raise TrainError(f"--gradient-checkpointing: {type(student).__name__} has no layer that transformers "
                         f"checkpoints: train without it")
    return layers


def fully_shard_student(loss: StudentLoss, context: Context) -> list[str]:
    """FSDP2 over ``loss`` (module docstring); notes on what it did not find."""
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard
    except ImportError:
        raise TrainError(f"FSDP here is FSDP2 (fully_shard), which torch {torch.__version__} lacks: install "
                         f"torch >= 2.6, or train with DDP (no --fsdp)") from None

    settings = context.launch
    device_type = "cuda" if context.device.startswith("cuda") else "cpu"
    mesh = init_device_mesh(device_type, (context.world,))
    offload = CPUOffloadPolicy() if settings.offload_params and device_type == "cuda" else OffloadPolicy()
    classes = _layer_classes(loss.student, settings.layer_classes)
    notes = [] if classes else [f"note: FSDP found no decoder layer class to shard ({type(loss.student).__name__} "
                                f"names none in _no_split_modules): the whole student is one unit"]
    for module in list(loss.student.modules()):
        if type(module) in classes:
            fully_shard(module, mesh=mesh, reshard_after_forward=settings.reshard_after_forward,
                        offload_policy=offload)
    fully_shard(loss, mesh=mesh, reshard_after_forward=settings.reshard_after_forward, offload_policy=offload)
    return notes


class ParallelStudent:
    """The student as the run's processes train it together, one process or several: the loop's one code path.

    - :meth:`loss` (the forward): :func:`train.methods.method_loss` on this process's batch through
      :class:`StudentLoss` (wrapped by DDP or FSDP on several processes), each term weighted by this
      process's share of the step's units of that term (module docstring, "Exactly the one-process
      gradient"; 1 on one process), so that the processes' losses add up to the loss of the union of
      their batches. A process without a batch (its share of the epoch is done), or whose batch has
      no row any term reads, runs a zero-weight batch (:meth:`filler`), so that every process makes
      the same collective calls;
    - :meth:`backward`: backpropagates it, times the number of processes, whose gradients DDP and FSDP
      average;
    - :meth:`accumulating`: the context of one batch of an optimizer step, in which the gradients are
      communicated on the step's last batch only;
    - :meth:`clip`; :meth:`state` and :meth:`load_state`, the full states a checkpoint holds;
      :meth:`weights`, the model's weights to save.

    ``gradient_checkpointing``: each decoder layer recomputes its activations in backward
    (:func:`checkpoint_layers`), set before the wrapping.
    """

    def __init__(self, context: Context, student: torch.nn.Module, terms: list[methods.Term], settings,
                 chunk_size: int, filler: Callable[[], Batch], gradient_checkpointing: bool = False):
        self.context, self.student, self.terms = context, student, terms
        self._filler_source, self._filler = filler, None
        self.notes: list[str] = []
        if gradient_checkpointing:  # on the layers before DDP or FSDP wraps them (checkpoint_layers)
            checkpoint_layers(student)
        # names under which a parameter is seen a second time (a tied output layer): a gathered state dict holds
        # them as copies, which the saved model leaves out as the one-process save does
        first: dict[int, str] = {}
        self.aliases = [name for name, p in student.named_parameters(remove_duplicate=False)
                        if first.setdefault(id(p), name) != name]
        self.module = StudentLoss(student, terms, settings, chunk_size)
        if context.parallel == "fsdp":
            self.notes += fully_shard_student(self.module, context)
        elif context.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            cuda = context.device.startswith("cuda")
            # the student's buffers (rotary tables) are constants: not synchronised at each forward
            quiet_buffers = ({"forward_sync_buffers": False}
                             if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                             else {"broadcast_buffers": False})
            self.module = DistributedDataParallel(self.module, device_ids=[context.device] if cuda else None,
                                                  gradient_as_bucket_view=True, **quiet_buffers)

    def parameters(self):
        return self.student.parameters()

    def accumulating(self, sync: bool):
        """The context of one batch's forward and backward: its gradients communicated (``sync``, the step's last
        batch) or kept for the step's last batch (DDP ``no_sync``, FSDP ``set_requires_gradient_sync(False)``)."""
        if self.context.parallel == "ddp" and not sync:
            return self.module.no_sync()
        if self.context.parallel == "fsdp":
            self.module.set_requires_gradient_sync(sync)
        return nullcontext()

    def filler(self) -> Batch:
        """The zero-weight batch: the split's first example, fixed."""
        if self._filler is None:
            self._filler = self._filler_source().to(self.context.device)
        return self._filler

    def loss(self, batch: Batch | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(sum_t weight_t * share_t * term_t, {term name: share_t * term_t})`` on ``batch`` (None: this process
        has none), with ``share_t`` this process's share of the step's units of term ``t``: the forward."""
        # a batch none of whose response rows a term reads cannot move the student: run as a zero-weight one
        real = batch is not None and has_rows(batch, self.terms)
        counts = term_counts(batch, self.terms) if real else [0] * len(self.terms)
        mine = shares(counts, self.context.sum(counts))
        _, parts = self.module(batch if real else self.filler())
        contributions = {t.name: parts[t.name] * share for t, share in zip(self.terms, mine)}
        return sum(t.weight * contributions[t.name] for t in self.terms), contributions

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (:meth:`loss`, divided by the step's batches): DDP and FSDP average the
        processes' gradients, and the step's is their sum, so it is multiplied by the number of processes."""
        if loss.requires_grad:
            (loss * self.context.world).backward()

    def clip(self, max_norm: float) -> float:
        """Clip the (communicated) gradients to ``max_norm``; their norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.student.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP: a DTensor, replicated
            norm = norm.full_tensor()
        return float(norm)

    # ----------------------------------------------------------------------- whole states, for rank 0

    def state(self, optimizer, examples: int) -> dict | None:
        """What a checkpoint holds of the processes, on rank 0 (None on the others): the student's and the
        optimizer's full states (gathered under FSDP; the optimizer's by parameter name on several processes)
        and ``processes`` (:func:`train.checkpoint.process_states`: each process's ``examples`` consumed in the
        epoch and RNG state; None on one process, whose checkpoint keeps its RNG state at the top)."""
        if self.context.world == 1:
            return {"model": self.student.state_dict(), "optimizer": optimizer.state_dict(), "processes": None}
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.student, options=options)
        optimizer_state = get_optimizer_state_dict(self.student, optimizer, options=options)
        gathered = self.context.gather((examples, checkpoint.rng_state()))
        if not self.context.main:
            return None
        processes = checkpoint.process_states([n for n, _ in gathered], [rng for _, rng in gathered])
        return {"model": model_state, "optimizer": optimizer_state, "processes": processes}

    def load_state(self, model_state: dict, optimizer_state: dict, optimizer) -> None:
        """Load full states (every process holds them: :func:`train.checkpoint.resume`) into the student, sharded
        where it is, and into the optimizer."""
        if self.context.world == 1:
            self.student.load_state_dict(model_state)
            optimizer.load_state_dict(optimizer_state)
            return
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.student, model_state, options=options)
        set_optimizer_state_dict(self.student, optimizer, optimizer_state, options=options)

    def weights(self) -> dict | None:
        """The weights to save as the model when the student's own are not whole on rank 0: under FSDP, gathered
        from the shards (every process takes part; rank 0 gets them, tied copies left out); else None."""
        if self.context.parallel != "fsdp":
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in state.items() if k not in self.aliases} if self.context.main else None


def filler_source(store: TeacherStore, split: str, needs, pad_id: int) -> Callable[[], Batch]:
    """A function giving the zero-weight batch: the split's first example with every set, in store order."""

    def make() -> Batch:
        example = next(iter(ExampleStream(store, split, needs, shuffle=False)), None)
        if example is None:
            raise TrainError(f"{store.location}: split {split!r} has no example with {', '.join(needs)}")
        return collate([example], pad_id)

    return make


__all__ = ["Shard", "Context", "LaunchSettings", "RankStream", "StudentLoss", "ParallelStudent", "setup",
           "shard_from_env", "is_main_process", "launch_settings", "rank_parts", "shared_parts", "term_counts",
           "filler_source", "checkpoint_layers"]
