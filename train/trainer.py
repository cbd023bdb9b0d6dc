"""``train student``: stream a teacher-signal store into a student. The loop is :func:`train`, top to bottom.

0. the lock on the run folder (:mod:`train.runlock`: one writer per ``--out``, for the run's life);
1. :func:`train.preflight.prepare`: everything checked before the student loads
   (store, terms, signals, student, tokenizer, batches per epoch);
2. load the student (float32 weights, its decoder/output split checked on a real
   sequence) as the run's processes train it (:class:`train.distributed.ParallelStudent`,
   one process or several), AdamW, the schedule;
3. per epoch: stream examples -> token-budget batches -> collate -> forward and the
   method's loss (a weighted sum of terms, :func:`train.methods.method_loss`) ->
   backward; every ``grad_accum`` batches: clip, AdamW step, schedule step -> log
   (:mod:`train.records`) -> checkpoint (:mod:`train.checkpoint`).

Epochs: ``--epochs`` of them, or with ``--max-steps N`` exactly N optimizer steps,
epoch after epoch (each reshuffled by the seed and its number) as transformers'
Trainer does with ``max_steps`` (:mod:`train.preflight`, "Total steps").

Memory stays flat whatever the store's size: examples stream part by part through a
bounded shuffle buffer (:class:`store.ExampleStream`), batches hold at most
``batch_tokens`` padded tokens, and the output layer runs in row chunks.

Gradient accumulation: each batch's loss is a token mean; the batches of one
optimizer step are weighted equally (loss / number of batches in the step; the
last step of an epoch may have fewer).

Several processes (``torchrun``, ``accelerate launch``; :mod:`train.distributed`):
each streams its own share of the store and makes its own token-budget batches;
the i-th batches of all processes together are the step's i-th batch, each
term a mean over all of them (the one-process gradient of that union, exactly);
every process runs the longest share's number of batches per epoch (zero weight
once its share is done), so all make the same steps. DDP by default, FSDP with
``--fsdp``; only rank 0 writes and prints (:mod:`train.output`). The loop is the
same for one process and several: what differs lives in
:class:`train.distributed.ParallelStudent` and :mod:`train.output`.

Schedule: linear warmup over ``ceil(warmup_ratio * total)`` steps, factor
``(s + 1) / (warmup + 1)``, then cosine from 1 towards 0 over the remaining
steps, ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))``; neither the
first nor the last step has learning rate 0.

Precision: the student's weights, gradients and optimizer state are float32;
``dtype`` bfloat16 (auto on CUDA GPUs that have it) runs forward and backward
under ``torch.autocast``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import random
from pathlib import Path

import numpy as np
import torch

from lm import chat

from . import checkpoint, distributed, methods, preflight, records
from .batches import collate, token_budget_batches
from .checkpoint import Position
from .config import TrainConfig, TrainError
from .output import output_for
from .runlock import RunLock


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the memory glibc's malloc keeps after frees back to the system (``malloc_trim(0)``).

    A step frees gigabytes of activations and gradients on the CPU; glibc keeps much of it
    in its heaps and arenas, so the resident set grows over a run. Called once per
    optimizer step; a no-op where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor of step s (0-based): linear warmup, then cosine decay (see module docstring)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train(config: TrainConfig, *, stop_after: int | None = None) -> Path:
    """Train, writing the model, metrics.jsonl, config.yaml, loss_curves.png and checkpoints to the out dir.

    ``stop_after``: leave (after writing a checkpoint) once this many steps were made in
    this call, as an interrupted or time-boxed job would; ``resume`` continues.
    Under a launcher (``torchrun``, ``accelerate launch``) every process runs this with
    its share of the store, and only rank 0 writes (:mod:`train.distributed`).
    Returns the output directory.
    """
    with distributed.setup(config.device, config.fsdp) as context:
        # one writer per --out: held by the process that writes (rank 0), before pre-flight reads the folder
        lock = context.agree(lambda: RunLock.take(config.run_dir, storage_options=config.storage_options,
                                                  cache=config.cache) if context.main else None)
        try:
            return _train(config, context, stop_after)
        finally:
            if lock is not None:
                lock.release()


def _train(config: TrainConfig, context: distributed.Context, stop_after: int | None) -> Path:
    plan = context.agree(lambda: preflight.prepare(config, context))
    config, out = plan.config, plan.out
    context.device = plan.device  # as pre-flight resolved it ("auto")
    output = output_for(plan, context)  # rank 0 prints and writes; the other processes do not
    for note in plan.notes:
        output.note(note)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    model, tokenizer = context.agree(lambda: preflight.load_student(plan.student.path, context.load_device,
                                                                    plan.probe))
    model.train()
    pad_id = chat.pad_id(tokenizer)
    student = distributed.ParallelStudent(context, model, plan.terms, config, config.chunk_size,
                                          distributed.filler_source(plan.store, config.split, plan.needs, pad_id),
                                          gradient_checkpointing=config.gradient_checkpointing)
    for note in student.notes:
        output.note(note)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, plan.warmup_steps))

    position, resumed_meter = Position(), None
    if config.resume:
        saved = checkpoint.resume(out, config, context.shard)  # this process's position and RNG state in it
        student.load_state(saved.model, saved.optimizer, optimizer)
        scheduler.load_state_dict(saved.scheduler)
        checkpoint.set_rng_state(saved.rng)
        position, resumed_meter = saved.position, saved.meter
        del saved  # the full states, loaded now
    output.start(position)
    meter = records.Meter([t.name for t in plan.terms], reduce=context.sum)
    if resumed_meter is not None:  # the sums of the steps since the last record before the checkpoint
        meter.restore(resumed_meter, context.main)

    def save() -> None:
        """A checkpoint of where every process stands, and of the metrics' sums since the last record."""
        state = student.state(optimizer, position.examples)
        output.save_checkpoint(state, scheduler, position, meter.partial())

    stream = distributed.RankStream(plan.store, config.split, plan.needs, seed=config.seed, shard=plan.shard)
    started_at, saved_at, stopped = position.step, position.step, False
    epochs = len(plan.batches_per_epoch)
    with output.recording(position):
        while not stopped and position.step < plan.total_steps and position.epoch < epochs:
            epoch_batches = plan.batches_per_epoch[position.epoch]  # every process runs as many
            mine = plan.my_batches[position.epoch]  # of them, this process's share makes these; none after
            examples = stream.iterate(position.epoch, skip=position.examples)
            batches = token_budget_batches(examples, config.batch_tokens)
            while position.batches < epoch_batches:
                step_start = position.batches - position.batches % config.grad_accum
                in_step = min(config.grad_accum, epoch_batches - step_start)  # batches in this optimizer step
                batch_examples = next(batches, None) if position.batches < mine else None
                if batch_examples is None and position.batches < mine:
                    raise TrainError(f"{config.cache}: epoch {position.epoch} gave {position.batches} batches, "
                                     f"{mine} were counted; was the store changed during training?")
                batch = collate(batch_examples, pad_id).to(plan.device) if batch_examples else None
                last_of_step = position.batches + 1 - step_start == in_step
                with student.accumulating(sync=last_of_step):  # the gradients meet on the step's last batch
                    with methods.autocast_for(plan.device, plan.dtype):
                        loss, terms = student.loss(batch)  # forward: each term a mean over the step's units
                    student.backward(loss / in_step)
                tokens = int(batch.attention_mask.sum()) if batch is not None else 0
                meter.add_batch(loss, terms, tokens, 1 / in_step)
                position.examples += len(batch_examples or ())
                position.batches += 1
                if not last_of_step:
                    continue  # accumulate

                grad_norm = student.clip(config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                release_freed_memory()  # the step's freed activations and gradients leave the resident set
                position.step += 1
                meter.steps += 1
                output.step()

                last = position.step >= plan.total_steps
                if position.step % config.log_every == 0 or position.step == 1 or last:
                    output.log(meter.record(step=position.step, epoch=position.epoch, lr=lr, grad_norm=grad_norm))
                stopped = stop_after is not None and position.step - started_at >= stop_after
                if (config.save_every and position.step % config.save_every == 0) or stopped:
                    save()
                    saved_at = position.step
                if last or stopped:
                    break
            if position.batches >= epoch_batches:  # the epoch ran to its end
                if next(batches, None) is not None:
                    raise TrainError(f"{config.cache}: epoch {position.epoch} gave more than the {mine} batches "
                                     f"counted; was the store changed during training?")
                position = Position(step=position.step, epoch=position.epoch + 1)

    if not stopped:
        if position.step != saved_at:  # else the last checkpoint (saved now, or the one resumed) is at the end
            save()
        output.save_model(model, tokenizer, student.weights())
    output.finish()
    return out
