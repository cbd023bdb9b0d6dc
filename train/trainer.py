"""``train student``: stream a teacher-signal store into a student. The loop is :func:`train`, top to bottom.

1. :func:`train.preflight.prepare`: everything checked before the student loads
   (store, terms, signals, student, tokenizer, batches per epoch);
2. load the student (float32 weights, its decoder/output split checked on a real
   sequence), AdamW, the schedule;
3. per epoch: stream examples -> token-budget batches -> collate -> the method's loss
   (a weighted sum of terms, :func:`train.methods.method_loss`) -> backward; every
   ``grad_accum`` batches: clip, AdamW step, schedule step -> log
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
``--fsdp``; only rank 0 writes and prints.

Schedule: linear warmup over ``ceil(warmup_ratio * total)`` steps, factor
``(s + 1) / (warmup + 1)``, then cosine from 1 towards 0 over the remaining
steps, ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))``; neither the
first nor the last step has learning rate 0.

Precision: the student's weights, gradients and optimizer state are float32;
``dtype`` bfloat16 (auto on CUDA GPUs that have it) runs forward and backward
under ``torch.autocast``.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

from lm import chat

from . import checkpoint, distributed, preflight, records
from .batches import collate, token_budget_batches
from .checkpoint import Position, load_checkpoint, save_checkpoint
from .config import TrainConfig, TrainError


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
        return _train(config, context, stop_after)


def _train(config: TrainConfig, context: distributed.Context, stop_after: int | None) -> Path:
    from tqdm.auto import tqdm

    main = context.main  # the process that prints and writes
    plan = context.agree(lambda: preflight.prepare(config, context))
    c, out = plan.config, plan.out
    context.device = plan.device  # as pre-flight resolved it ("auto")
    say = (lambda message: print(message, file=sys.stderr)) if main else (lambda message: None)
    for note in plan.notes:
        say(note)
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    random.seed(c.seed)
    model, tokenizer = context.agree(lambda: preflight.load_student(plan.student.path, context.load_device,
                                                                    plan.probe))
    model.train()
    pad_id = chat.pad_id(tokenizer)
    engine = distributed.Engine(context, model, plan.terms, c, c.chunk_size, plan.dtype,
                                distributed.filler_source(plan.store, c.split, plan.needs, pad_id))
    for note in engine.notes:
        say(note)
    optimizer = torch.optim.AdamW(engine.parameters(), lr=c.lr, weight_decay=c.weight_decay)  # sharded under FSDP
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, plan.warmup_steps))

    if main:
        out.mkdir(parents=True, exist_ok=True)
    position = Position()
    if c.resume:
        if context.world == 1:
            position = load_checkpoint(out, model, optimizer, scheduler, c)
        else:
            position = checkpoint.load_process_checkpoint(
                out, lambda model_state, optimizer_state: engine.load_states(model_state, optimizer, optimizer_state),
                scheduler, c, context.shard.rank, context.world)
        if main:
            records.truncate_metrics(out / records.METRICS_FILE, position.step)
        if position.step >= plan.total_steps:
            say(f"note: the checkpoint in {out} is the run's last (step {position.step}); writing its model")
    elif main:
        checkpoint.discard_unfinished(out)  # what a run stopped before its first checkpoint left (preflight's note)
    if main:
        records.save_config(plan)

    def save() -> None:
        """A checkpoint of where every process stands (gathered states, written by rank 0)."""
        if context.world == 1:
            save_checkpoint(out, model, optimizer, scheduler, position, c)
            return
        model_state, optimizer_state = engine.model_state(), engine.optimizer_state(optimizer)
        gathered = context.gather((position.examples, checkpoint.rng_state()))
        if main:
            processes = checkpoint.process_states([n for n, _ in gathered], [rng for _, rng in gathered])
            checkpoint.write_checkpoint(out, model_state, optimizer_state, scheduler, position, c, processes)

    stream = distributed.RankStream(plan.store, c.split, plan.needs, seed=c.seed, shard=plan.shard)
    started_at, saved_at, stopped = position.step, position.step, False
    meter = records.Meter([t.name for t in plan.terms], reduce=context.sum if context.world > 1 else None)
    bar = tqdm(total=plan.total_steps, initial=position.step, desc=f"train {c.method}", unit="step",
               disable=not (c.progress and main), dynamic_ncols=True)
    epochs = len(plan.batches_per_epoch)
    with contextlib.ExitStack() as closing:
        metrics = (closing.enter_context(open(out / records.METRICS_FILE, "a" if c.resume else "w")) if main
                   else None)
        board = None
        if main and c.report_to == "tensorboard":
            board = records.TensorBoard(out, purge_step=position.step + 1 if c.resume else None)
            closing.callback(board.close)
        while not stopped and position.step < plan.total_steps and position.epoch < epochs:
            epoch_batches = plan.batches_per_epoch[position.epoch]  # every process runs as many
            mine = plan.my_batches[position.epoch]  # of them, this process's share makes these; zero weight after
            examples = stream.iterate(position.epoch, skip=position.examples)
            batches = token_budget_batches(examples, c.batch_tokens)
            while position.batches < epoch_batches:
                step_start = position.batches - position.batches % c.grad_accum
                in_step = min(c.grad_accum, epoch_batches - step_start)  # batches in this optimizer step
                batch_examples = next(batches, None) if position.batches < mine else None
                if batch_examples is None and position.batches < mine:
                    raise TrainError(f"{c.cache}: epoch {position.epoch} gave {position.batches} batches, {mine} "
                                     f"were counted; was the store changed during training?")
                batch = collate(batch_examples, pad_id).to(plan.device) if batch_examples else None
                last_of_step = position.batches + 1 - step_start == in_step
                engine.micro_step(batch, in_step, last_of_step, meter)
                position.examples += len(batch_examples or ())
                position.batches += 1
                if not last_of_step:
                    continue  # accumulate

                grad_norm = engine.clip(c.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                meter.steps += 1
                bar.update(1)

                last = position.step >= plan.total_steps
                if position.step % c.log_every == 0 or position.step == 1 or last:
                    record = meter.record(step=position.step, epoch=position.epoch, lr=lr, grad_norm=grad_norm)
                    if main:
                        metrics.write(json.dumps(record) + "\n")
                        metrics.flush()
                        if board is not None:
                            board.write(record)
                        bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                stopped = stop_after is not None and position.step - started_at >= stop_after
                if (c.save_every and position.step % c.save_every == 0) or stopped:
                    save()
                    saved_at = position.step
                if last or stopped:
                    break
            if position.batches >= epoch_batches:  # the epoch ran to its end
                if next(batches, None) is not None:
                    raise TrainError(f"{c.cache}: epoch {position.epoch} gave more than the {mine} batches "
                                     f"counted; was the store changed during training?")
                position = Position(step=position.step, epoch=position.epoch + 1)
    bar.close()

    if not stopped:
        if position.step != saved_at:  # else the last checkpoint (saved now, or the one resumed) is at the end
            save()
        weights = engine.model_weights() if context.parallel == "fsdp" else None  # gathered from the shards
        if main:
            records.save_model(out, model, tokenizer, state_dict=weights)
    if main:
        records.plot_losses(out / records.METRICS_FILE, out / records.CURVES_FILE)
    return out
