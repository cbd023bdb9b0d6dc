"""``train evaluate``: how close a student is to the teacher, and how it ranks preference pairs and groups.

For any model that :func:`lm.models.resolve_model` accepts (a trained
run's directory, the embedded student, ...), on a split (default ``test``) of the
store's ``pairs`` when it has ``pairs/teacher``:

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

and on the split's sampled groups when it has ``samples/teacher`` and
``samples/teacher_mcq`` (PAD), the model's ranking of each group by its mean
token log-prob (PAD's student reward; the order does not depend on beta) against
the teacher's, by PAD's teacher reward with the chosen ``pad_alpha``
(:func:`train.methods.teacher_rewards`):

- ``kendall_tau``: mean over groups of Kendall's tau-a,
  ``sum_{i<j} sign(s_i - s_j) sign(t_i - t_j) / (n (n - 1) / 2)`` (a pair tied on
  either side counts 0; 1 = same order, -1 = reversed, 0 = chance);
- ``top1_agreement``: fraction of groups whose model-best response is the
  teacher's best (a tie for the teacher's best counts every tied response as
  best; chance is 1/n);
- ``pad_ppd``: PAD's PPD divergence between the two Plackett-Luce distributions
  over orderings at ``pad_beta`` (:func:`train.losses.pad_loss`), mean over groups;
- ``mean_logp_samples``: the model's mean log-prob per sampled response token.
"""

from __future__ import annotations

import gc
import math
from contextlib import nullcontext

import torch

from lm import models
from store import ExampleStream, TokenizerMismatchError, check_complete

from . import losses, methods
from .batches import collate, token_budget_batches
from .trainer import TrainError, check_tokenizer, commands_for, missing_signals, open_store, recorded_student, \
    require_signals

TIE_NATS = 1e-3

_PAIR_LOGP = (methods.TokenRequest(methods.LOGP, methods.PAIRS, methods.CHOSEN),
              methods.TokenRequest(methods.LOGP, methods.PAIRS, methods.REJECTED))
_PAIR_KD = (methods.TokenRequest(methods.KD, methods.PAIRS, methods.CHOSEN),
            methods.TokenRequest(methods.KD, methods.PAIRS, methods.REJECTED))
_SAMPLES_LOGP = (methods.TokenRequest(methods.LOGP, methods.SAMPLES, None),)
PAIR_NEEDS = {methods.PAIRS: [methods.TEACHER]}
GROUP_NEEDS = {methods.SAMPLES: [methods.TEACHER, methods.TEACHER_MCQ]}


def kendall_tau(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[G] Kendall's tau-a between two scorings [G, n] of each group (module docstring)."""
    n = student.shape[-1]
    agree = (torch.sign(student[:, :, None] - student[:, None, :])
             * torch.sign(teacher[:, :, None] - teacher[:, None, :]))  # [G, n, n]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=student.device), diagonal=1)
    return agree[:, upper].sum(-1) / max(1, n * (n - 1) // 2)


def top1_agreement(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """[G] 1.0 where the student's best response [G, n] is (one of) the teacher's best, else 0.0."""
    picked = teacher.gather(-1, student.argmax(-1, keepdim=True)).squeeze(-1)
    return (picked == teacher.max(-1).values).double()


@torch.no_grad()
def _model_pass(model, store, split, needs, requests, *, pad_id, device, dtype, batch_tokens, chunk_size):
    """Yield (batch, outputs) over the split's examples that have every set of ``needs``, in store order."""
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
             device: str = "auto", dtype: str = "auto", batch_tokens: int = 4096, chunk_size: int = 1024,
             pad_alpha: float = 0.5, pad_beta: float = 10.0) -> dict:
    """The metrics of the module docstring, as a dict of plain numbers and names.

    Pair metrics when the split has ``pairs/teacher``, group metrics when it has
    ``samples/teacher`` and ``samples/teacher_mcq``; refused when it has neither.
    """
    store = open_store(cache)
    if store.num_parts(split) == 0:
        require_signals(store, split, PAIR_NEEDS, "evaluate")  # names the splits there are
    missing_pairs = missing_signals(store, split, PAIR_NEEDS)
    missing_groups = missing_signals(store, split, GROUP_NEEDS)
    has_pairs, has_groups = not missing_pairs, not missing_groups
    if not has_pairs and not has_groups:
        raise TrainError(f"evaluate needs pairs/teacher (pair metrics) or samples/teacher and samples/teacher_mcq "
                         f"(group rankings) for split {split}; {store.location} has neither complete. Compute "
                         f"pairs with: {commands_for(store, missing_pairs)}; or groups with: "
                         f"{commands_for(store, missing_groups)}")
    device = models.resolve_device(device)
    try:
        torch_dtype = models.resolve_dtype(dtype, device)
        settings = methods.Settings(pad_alpha=pad_alpha, pad_beta=pad_beta)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    stored_init = not check_complete(store, split, {methods.PAIRS: [methods.STUDENT_INIT]})
    recorded = recorded_student(store)
    try:
        student = models.resolve_model(model, models.EMBEDDED_STUDENT)
        check_tokenizer(store, models.load_tokenizer(student.path), student.name)
        initial_info = None
        if has_pairs and (initial or not stored_init):
            initial_info = models.resolve_model(initial or (recorded["name"] if recorded else None),
                                                models.EMBEDDED_STUDENT)
            check_tokenizer(store, models.load_tokenizer(initial_info.path), initial_info.name)
    except (models.ModelNotFoundError, TokenizerMismatchError) as exc:
        raise TrainError(str(exc)) from exc
    pass_options = dict(device=device, dtype=torch_dtype, batch_tokens=batch_tokens, chunk_size=chunk_size)

    init_sums: dict[int, tuple[float, float]] = {}
    if initial_info is not None:  # one forward pass of the initial model, then it is freed
        init_model, _, _, pad_id = _load(initial_info.path, device)
        for batch, outputs in _model_pass(init_model, store, split, {methods.PAIRS: []}, _PAIR_LOGP, pad_id=pad_id,
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
    result = {"model": student.name, "store": store.location, "split": split}
    if has_pairs:
        result.update(_pair_metrics(model_obj, store, split, initial_info, init_sums, pad_id, pass_options))
        result["initial"] = initial_from
    if has_groups:
        result.update(_group_metrics(model_obj, store, split, settings, pad_id, pass_options))
    return result


def _mean(total, n):
    return total / n if n else math.nan


def _pair_metrics(model_obj, store, split, initial_info, init_sums, pad_id, pass_options) -> dict:
    needs = {methods.PAIRS: [methods.TEACHER] + ([methods.STUDENT_INIT] if initial_info is None else [])}
    kl = {"chosen": 0.0, "rejected": 0.0}
    logp = {"chosen": 0.0, "rejected": 0.0}
    tokens = {"chosen": 0, "rejected": 0}
    pairs = 0
    wins_logratio = wins_avg = 0.0
    for batch, outputs in _model_pass(model_obj, store, split, needs, _PAIR_KD, pad_id=pad_id, **pass_options):
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
        raise TrainError(f"{store.location}: split {split!r} has no preference pairs")
    return {
        "pairs": pairs,
        "kl_chosen": _mean(kl["chosen"], tokens["chosen"]), "kl_rejected": _mean(kl["rejected"], tokens["rejected"]),
        "mean_logp_chosen": _mean(logp["chosen"], tokens["chosen"]),
        "mean_logp_rejected": _mean(logp["rejected"], tokens["rejected"]),
        "accuracy_logratio": wins_logratio / pairs, "accuracy_avg_logp": wins_avg / pairs,
        "tokens_chosen": tokens["chosen"], "tokens_rejected": tokens["rejected"],
    }


def _group_metrics(model_obj, store, split, settings, pad_id, pass_options) -> dict:
    taus, tops, ppd, sizes = [], [], [], set()
    logp_total, tokens = 0.0, 0
    for batch, outputs in _model_pass(model_obj, store, split, GROUP_NEEDS, _SAMPLES_LOGP, pad_id=pad_id,
                                      **pass_options):
        rows = methods.response_rows(batch, methods.SAMPLES, None)
        logp_total += float(outputs.logp[rows].double().sum())
        tokens += int(rows.sum())
        for index in methods.sample_groups(batch):
            student = methods.student_rewards(batch, outputs, index, settings).double().cpu()
            teacher = methods.teacher_rewards(batch, index, settings).cpu()
            taus.append(kendall_tau(student, teacher))
            tops.append(top1_agreement(student, teacher))
            ppd.append(losses.pad_loss(student, teacher, kind="ppd", max_group=settings.pad_max_group))
            sizes.add(int(index.shape[1]))
    if not taus:
        raise TrainError(f"{store.location}: split {split!r} has no sampled groups")
    return {
        "groups": int(sum(t.numel() for t in taus)), "group_sizes": sorted(sizes),
        "pad_alpha": settings.pad_alpha, "pad_beta": settings.pad_beta,
        "kendall_tau": float(torch.cat(taus).mean()), "top1_agreement": float(torch.cat(tops).mean()),
        "pad_ppd": float(torch.cat(ppd).mean()),
        "mean_logp_samples": _mean(logp_total, tokens), "tokens_samples": tokens,
    }


def format_table(result: dict) -> str:
    """The result as an aligned plain-text table: the pairs' part, then the groups', as present."""
    has_pairs, has_groups = "pairs" in result, "groups" in result
    counts = [f"{result[k]} {k}" for k in ("pairs", "groups") if k in result]
    rows = [("model", result["model"]), ("store", f"{result['store']} (split {result['split']}, {', '.join(counts)})")]
    width = 44
    lines = [f"{k:<{width}}{v}" for k, v in rows]
    if has_pairs:
        lines.extend(_pair_lines(result, width))
    if has_groups:
        lines.extend(_group_lines(result, width))
    return "\n".join(lines)


def _pair_lines(result: dict, width: int) -> list[str]:
    lines = [f"{'initial model sums':<{width}}{result['initial']}"]
    lines.append(f"{'':<{width}}{'chosen':>10}  {'rejected':>10}")
    lines.append(f"{'token KL(teacher || model), tail bucket':<{width}}{result['kl_chosen']:>10.4f}  "
                 f"{result['kl_rejected']:>10.4f}")
    lines.append(f"{'mean log-prob per token':<{width}}{result['mean_logp_chosen']:>10.4f}  "
                 f"{result['mean_logp_rejected']:>10.4f}")
    lines.append(f"{'response tokens':<{width}}{result['tokens_chosen']:>10d}  {result['tokens_rejected']:>10d}")
    lines.append(f"{'preference accuracy, log-ratio to initial':<{width}}{result['accuracy_logratio']:>10.4f}")
    lines.append(f"{'preference accuracy, mean log-prob':<{width}}{result['accuracy_avg_logp']:>10.4f}")
    return lines


def _group_lines(result: dict, width: int) -> list[str]:
    sizes = result["group_sizes"]
    chance = " / ".join(f"{1 / n:.2f}" for n in sizes)
    return [
        f"{'groups':<{width}}{result['groups']} of {'/'.join(map(str, sizes))} responses; teacher reward "
        f"alpha {result['pad_alpha']:g}, beta {result['pad_beta']:g}",
        f"{'ranking vs teacher: Kendall tau':<{width}}{result['kendall_tau']:>10.4f}  (chance 0)",
        f"{'ranking vs teacher: top-1 agreement':<{width}}{result['top1_agreement']:>10.4f}  (chance {chance})",
        f"{'PAD PPD divergence over orderings':<{width}}{result['pad_ppd']:>10.4f}  (0 = teacher's, max ln 2)",
        f"{'mean log-prob per sampled token':<{width}}{result['mean_logp_samples']:>10.4f}  "
        f"({result['tokens_samples']} tokens)",
    ]
