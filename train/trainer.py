"""``train student``: stream a teacher-signal store into a student. The loop is :func:`train`, top to bottom.

1. :func:`train.preflight.prepare`: everything checked before the student loads
   (store, terms, signals, student, tokenizer, batches per epoch);
2. load the student (float32 weights, its decoder/output split checked on a real
   sequence), AdamW, the schedule;
3. per epoch: stream examples -> token-budget batches -> collate -> the method's loss
   (a weighted sum of terms, :func:`train.methods.method_loss`) -> backward; every
   ``grad_accum`` batches: clip, AdamW step, schedule step -> log
   (:mod:`train.records`) -> checkpoint (:mod:`train.checkpoint`).

Memory stays flat whatever the store's size: examples stream part by part through a
bounded shuffle buffer (:class:`store.ExampleStream`), batches hold at most
``batch_tokens`` padded tokens, and the output layer runs in row chunks.

Gradient accumulation: each batch's loss is a token mean; the batches of one
optimizer step are weighted equally (loss / number of batches in the step; the
last step of an epoch may have fewer).

Schedule: linear warmup over ``ceil(warmup_ratio * total)`` steps, factor
``(s + 1) / (warmup + 1)``, then cosine from 1 towards 0 over the remaining
steps, ``0.5 * (1 + cos(pi * (s - warmup) / (total - warmup)))``; neither the
first nor the last step has learning rate 0.

Precision: the student's weights, gradients and optimizer state are float32;
``dtype`` bfloat16 (auto on CUDA GPUs that have it) runs forward and backward
under ``torch.autocast``.
"""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

from lm import chat
from store import ExampleStream

from . import methods, preflight, records
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
    Returns the output directory.
    """
    from tqdm.auto import tqdm

    plan = preflight.prepare(config)
    c, out = plan.config, plan.out
    for note in plan.notes:
        print(note, file=sys.stderr)
    torch.manual_seed(c.seed)
    np.random.seed(c.seed)
    random.seed(c.seed)
    model, tokenizer = preflight.load_student(plan.student.path, plan.device, plan.probe)
    model.train()
    pad_id = chat.pad_id(tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(plan.total_steps, plan.warmup_steps))

    out.mkdir(parents=True, exist_ok=True)
    position = Position()
    if c.resume:
        position = load_checkpoint(out, model, optimizer, scheduler, c)
        records.truncate_metrics(out / records.METRICS_FILE, position.step)
    records.save_config(plan)

    stream = ExampleStream(plan.store, c.split, plan.needs, shuffle=True, seed=c.seed)
    started_at, stopped = position.step, False
    meter = records.Meter([t.name for t in plan.terms])
    bar = tqdm(total=plan.total_steps, initial=position.step, desc=f"train {c.method}", unit="step",
               disable=not c.progress, dynamic_ncols=True)
    with open(out / records.METRICS_FILE, "a") as metrics:
        while not stopped and position.step < plan.total_steps and position.epoch < c.epochs:
            epoch_batches = plan.batches_per_epoch[position.epoch]
            examples = stream.iterate(position.epoch, skip=position.examples)
            for batch_examples in token_budget_batches(examples, c.batch_tokens):
                step_start = position.batches - position.batches % c.grad_accum
                in_step = min(c.grad_accum, epoch_batches - step_start)  # batches in this optimizer step
                batch = collate(batch_examples, pad_id).to(plan.device)
                with methods.autocast_for(plan.device, plan.dtype):
                    loss, parts = methods.method_loss(model, batch, plan.terms, c, c.chunk_size)
                if loss.requires_grad:
                    (loss / in_step).backward()
                meter.add_batch(loss, parts, int(batch.attention_mask.sum()), 1 / in_step)
                position.examples += len(batch_examples)
                position.batches += 1
                if position.batches - step_start < in_step:
                    continue  # accumulate

                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                position.step += 1
                meter.steps += 1
                bar.update(1)

                last = position.step >= plan.total_steps
                if position.step % c.log_every == 0 or position.step == 1 or last:
                    record = meter.record(step=position.step, epoch=position.epoch, lr=lr, grad_norm=float(grad_norm))
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                stopped = stop_after is not None and position.step - started_at >= stop_after
                if (c.save_every and position.step % c.save_every == 0) or stopped:
                    save_checkpoint(out, model, optimizer, scheduler, position, c)
                if last or stopped:
                    break
            if position.batches >= epoch_batches:  # the epoch ran to its end
                if position.batches != epoch_batches:
                    raise TrainError(f"{c.cache}: epoch {position.epoch} gave {position.batches} batches, "
                                     f"{epoch_batches} were counted; was the store changed during training?")
                position = Position(step=position.step, epoch=position.epoch + 1)
    bar.close()

    if not stopped:
        save_checkpoint(out, model, optimizer, scheduler, position, c)
        records.save_model(out, model, tokenizer)
    records.plot_losses(out / records.METRICS_FILE, out / records.CURVES_FILE)
    return out
