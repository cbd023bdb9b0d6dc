"""``train evaluate``: how close a student is to the teacher, and how it ranks preference pairs.

On a split of the store's ``pairs`` (default ``test``), for any model that
:func:`precompute.models.resolve_model` accepts (a trained run's directory, the
embedded student, ...):

- ``kl_chosen`` / ``kl_rejected``: held-out token KL(teacher || model), the
  (K+1)-bin tail-bucket KL that KD trains (:func:`train.losses.kd_tail_kl`),
  averaged over every chosen (rejected) response token of the split;
- ``mean_logp_chosen`` / ``mean_logp_rejected``: the model's mean log-prob per
  response token;
- ``accuracy_logratio``: fraction of pairs the model ranks chosen above rejected
  by its log-ratio to its initial model (DPO's implicit reward):
  ``(log pi(y_w) - log pi_0(y_w)) > (log pi(y_l) - log pi_0(y_l))``. The initial
  sums come from ``--initial`` when given (computed by loading it), else from the
  store's ``pairs/student_init`` section, else from the student the store records;
- ``accuracy_avg_logp``: fraction with a higher length-normalised log-prob of
  the chosen response (SimPO's reward; needs no initial model).

A tie counts half: a margin within ``TIE_NATS`` (log-ratio; the stored initial sums
were computed by another run in float32, so an untrained model differs from them
by rounding only) or exactly zero (length-normalised).
"""

from __future__ import annotations

import gc
import math
from contextlib import nullcontext

import torch

from precompute import models
from store import ExampleStream, TokenizerMismatchError, check_complete

from . import methods
from .batches import collate, token_budget_batches
from .trainer import TrainError, check_tokenizer, open_store, recorded_student, require_signals

TIE_NATS = 1e-3

_PAIR_LOGP = (methods.TokenRequest(methods.LOGP, methods.PAIRS, methods.CHOSEN),
              methods.TokenRequest(methods.LOGP, methods.PAIRS, methods.REJECTED))
_PAIR_KD = (methods.TokenRequest(methods.KD, methods.PAIRS, methods.CHOSEN),
            methods.TokenRequest(methods.KD, methods.PAIRS, methods.REJECTED))


@torch.no_grad()
def _pair_pass(model, store, split, needs, requests, *, pad_id, device, dtype, batch_tokens, chunk_size):
    """Yield (batch, outputs) over the split's pairs, in store order."""
    autocast = torch.autocast(device.split(":")[0], dtype=dtype) if dtype != torch.float32 else nullcontext()
    stream = ExampleStream(store, split, needs, shuffle=False)
    for examples in token_budget_batches(stream, batch_tokens):
        batch = collate(examples, pad_id).to(device)
        with autocast:
            outputs = methods.student_outputs(model, batch, requests, methods.Settings(), chunk_size)
        yield batch, outputs


def _pair_sums(batch, outputs) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(example indices, logp sums chosen, rejected, token counts chosen, rejected) per pair of a batch."""
    chosen, rejected = methods.pair_sequences(batch)
    sums = methods.pair_logp_sums(batch, outputs).double().cpu()
    counts = torch.bincount(batch.resp_seq, minlength=batch.num_sequences).double().cpu()
    examples = [batch.examples[int(i)].example_index for i in batch.seq_example[chosen].cpu()]
    chosen, rejected = chosen.cpu(), rejected.cpu()
    return examples, sums[chosen], sums[rejected], counts[chosen], counts[rejected]


def _load(spec, device, default=models.EMBEDDED_STUDENT):
    model, tokenizer, info = models.load_model(spec, device=device, dtype="float32", default=default)
    methods.check_output_layer(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return model, tokenizer, info, pad_id


def evaluate(model: str | None, cache: str, split: str = "test", initial: str | None = None, *,
             device: str = "auto", dtype: str = "auto", batch_tokens: int = 4096, chunk_size: int = 1024) -> dict:
    """The metrics of the module docstring, as a dict of plain numbers and names."""
    store = open_store(cache)
    require_signals(store, split, {methods.PAIRS: [methods.TEACHER]}, "evaluate")
    device = models.resolve_device(device)
    try:
        torch_dtype = models.resolve_dtype(dtype, device)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    stored_init = not check_complete(store, split, {methods.PAIRS: [methods.STUDENT_INIT]})
    recorded = recorded_student(store)
    try:
        student = models.resolve_model(model, models.EMBEDDED_STUDENT)
        check_tokenizer(store, models.load_tokenizer(student.path), student.name)
        initial_info = None
        if initial or not stored_init:
            initial_info = models.resolve_model(initial or (recorded["name"] if recorded else None),
                                                models.EMBEDDED_STUDENT)
            check_tokenizer(store, models.load_tokenizer(initial_info.path), initial_info.name)
    except (models.ModelNotFoundError, TokenizerMismatchError) as exc:
        raise TrainError(str(exc)) from exc
    pass_options = dict(device=device, dtype=torch_dtype, batch_tokens=batch_tokens, chunk_size=chunk_size)

    init_sums: dict[int, tuple[float, float]] = {}
    if initial_info is not None:  # one forward pass of the initial model, then it is freed
        init_model, _, _, pad_id = _load(initial_info.path, device)
        for batch, outputs in _pair_pass(init_model, store, split, {methods.PAIRS: []}, _PAIR_LOGP, pad_id=pad_id,
                                         **pass_options):
            for ex, c, r, _, _ in zip(*_pair_sums(batch, outputs)):
                init_sums[ex] = (float(c), float(r))
        del init_model
        gc.collect()
        initial_from = f"computed with {initial_info.name}"
    else:
        initial_from = "store pairs/student_init" + (f" ({recorded['name']})" if recorded else "")

    model_obj, _, _, pad_id = _load(student.path, device)
    model_obj.eval()
    needs = {methods.PAIRS: [methods.TEACHER] + ([methods.STUDENT_INIT] if initial_info is None else [])}
    kl = {"chosen": 0.0, "rejected": 0.0}
    logp = {"chosen": 0.0, "rejected": 0.0}
    tokens = {"chosen": 0, "rejected": 0}
    pairs = 0
    wins_logratio = wins_avg = 0.0
    for batch, outputs in _pair_pass(model_obj, store, split, needs, _PAIR_KD, pad_id=pad_id, **pass_options):
        for role_name, role in (("chosen", methods.CHOSEN), ("rejected", methods.REJECTED)):
            rows = methods.response_rows(batch, methods.PAIRS, role)
            kl[role_name] += float(outputs.kd[rows].double().sum())
            logp[role_name] += float(outputs.logp[rows].double().sum())
            tokens[role_name] += int(rows.sum())
        examples, sum_c, sum_r, n_c, n_r = _pair_sums(batch, outputs)
        if initial_info is None:
            chosen, rejected = methods.pair_sequences(batch)
            ref = batch.scalars[f"{methods.STUDENT_INIT}/logp_sum"].double().cpu()
            ref_c, ref_r = ref[chosen.cpu()], ref[rejected.cpu()]
        else:
            ref_c = torch.tensor([init_sums[e][0] for e in examples], dtype=torch.float64)
            ref_r = torch.tensor([init_sums[e][1] for e in examples], dtype=torch.float64)
        margin = (sum_c - ref_c) - (sum_r - ref_r)
        wins_logratio += float(torch.where(margin.abs() <= TIE_NATS, 0.5, (margin > 0).double()).sum())
        avg_margin = sum_c / n_c.clamp(min=1) - sum_r / n_r.clamp(min=1)
        wins_avg += float(torch.where(avg_margin == 0, 0.5, (avg_margin > 0).double()).sum())
        pairs += len(examples)
    if pairs == 0:
        raise TrainError(f"{cache}: split {split!r} has no preference pairs")

    def mean(total, n):
        return total / n if n else math.nan

    return {
        "model": student.name, "store": store.location, "split": split, "pairs": pairs,
        "initial": initial_from,
        "kl_chosen": mean(kl["chosen"], tokens["chosen"]), "kl_rejected": mean(kl["rejected"], tokens["rejected"]),
        "mean_logp_chosen": mean(logp["chosen"], tokens["chosen"]),
        "mean_logp_rejected": mean(logp["rejected"], tokens["rejected"]),
        "accuracy_logratio": wins_logratio / pairs, "accuracy_avg_logp": wins_avg / pairs,
        "tokens_chosen": tokens["chosen"], "tokens_rejected": tokens["rejected"],
    }


def format_table(result: dict) -> str:
    """The result as an aligned plain-text table."""
    rows = [
        ("model", result["model"]),
        ("store", f"{result['store']} (split {result['split']}, {result['pairs']} pairs)"),
        ("initial model sums", result["initial"]),
    ]
    width = 44
    lines = [f"{k:<{width}}{v}" for k, v in rows]
    lines.append(f"{'':<{width}}{'chosen':>10}  {'rejected':>10}")
    lines.append(f"{'token KL(teacher || model), tail bucket':<{width}}{result['kl_chosen']:>10.4f}  "
                 f"{result['kl_rejected']:>10.4f}")
    lines.append(f"{'mean log-prob per token':<{width}}{result['mean_logp_chosen']:>10.4f}  "
                 f"{result['mean_logp_rejected']:>10.4f}")
    lines.append(f"{'response tokens':<{width}}{result['tokens_chosen']:>10d}  {result['tokens_rejected']:>10d}")
    lines.append(f"{'preference accuracy, log-ratio to initial':<{width}}{result['accuracy_logratio']:>10.4f}")
    lines.append(f"{'preference accuracy, mean log-prob':<{width}}{result['accuracy_avg_logp']:>10.4f}")
    return "\n".join(lines)
