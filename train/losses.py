"""Loss functions for preference distillation: pure, torch-only, one per loss.

Every function here is a pure function of its tensor arguments: no module
state, no reduction over tokens or prompts unless the docstring says so.
Token-level functions take the student's logits rows *already gathered at
response positions* (shape ``[R, V]``: ``R`` response tokens of the whole
batch flattened, ``V`` vocabulary) and return one value per token ``[R]``;
the caller masks, sums per sequence (:func:`sequence_sums`,
:func:`sequence_means`) and averages.

Precision: inputs are upcast to at least float32 before any softmax,
logsumexp or exponent (bf16/fp16 inputs are computed and returned in
float32; float64 inputs stay float64, which is what the tests use).

Formulas and their sources (the project's account of each: ``docs/methods.md``):

- KD with a tail bucket: forward KL over K+1 bins (the ADPA repository's
  ``get_kl_loss``; TRL's ``_add_tail_bucket``).
- KD with tail samples: the top-K exact, the tail's part of the full-vocabulary KL
  estimated without bias from ids sampled from the teacher (Anshumann et al., ACL
  2025, "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs").
- DCKD and ADPA: "Advantage-Guided Distillation for Preference Alignment in
  Small Language Models" (ADPA paper; DCKD is its "dual-constrained" KD
  baseline/stage).
- DPO: Rafailov et al. 2023, "Direct Preference Optimization".
- SimPO: Meng et al. 2024, "SimPO: Simple Preference Optimization with a
  Reference-Free Reward".
- PAD: Gu et al., "Preference-Aligned Distillation" (code: EganGu/PAD),
  Plackett-Luce distributions over orderings of n responses per prompt.
- Across tokenizers: Universal Logit Distillation (Boizard et al. 2024, arXiv
  2402.12030: L1 between sorted probability vectors) and a chunk likelihood
  match after ALM (Minixhofer et al. 2025, arXiv 2503.20083: a binarised
  f-divergence between chunk probabilities, here the KL).

All code below is written for this project; only the equations are taken
from the sources named.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from store import format as fmt

__all__ = [
    "log1mexp",
    "token_logprobs",
    "kd_tail_kl",
    "kd_sampled_kl",
    "teacher_kd_sample_logp",
    "teacher_kd_bins",
    "kept_entries",
    "kept_ids",
    "student_tail_logmass",
    "adpa_advantage",
    "adpa_token_loss",
    "uld_loss",
    "chunk_likelihood_loss",
    "dpo_loss",
    "simpo_loss",
    "sequence_sums",
    "sequence_means",
    "permutations_tensor",
    "plackett_luce_log_probs",
    "pad_ppd_loss",
    "pad_vpd_loss",
    "pad_loss",
    "pad_teacher_rewards",
    "rrhf_loss",
    "pro_loss",
    "mcq_score",
    "TokenTerm",
    "TOKEN_TERMS",
    "chunked_token_terms",
    "MAX_EXACT_PL_GROUP",
    "PAD_LOSSES",
]

_LN2 = math.log(2.0)

#: Largest group size for which the n! orderings are enumerated exactly
#: (6! = 720 orderings; 7! = 5040 would already cost 5040 x 7 per prompt).
MAX_EXACT_PL_GROUP = 6

#: the kinds of :func:`pad_loss`: PPD (JSD over orderings), VPD (-log P_S of the teacher's order)
PAD_LOSSES = ("ppd", "vpd")


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) -> float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Upcast a floating tensor to at least float32."""
    return t.to(_compute_dtype(t))


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """Numerically safe ``log(1 - exp(x))`` for ``x <= 0``.

    Equation (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"):
    ``log(-expm1(x))`` for ``x > -ln 2`` and ``log1p(-exp(x))`` otherwise.

    Shapes: any; elementwise. ``x = 0`` gives ``-inf`` (callers clamp first);
    ``x = -inf`` gives ``0``. Each branch is fed an input clamped into its own
    domain so that the branch not selected by ``torch.where`` never produces
    an inf/NaN that would poison the gradient.
    """
    near_zero = x > -_LN2
    x_hi = x.clamp(min=-_LN2)  # domain of branch 1: (-ln2, 0]
    x_lo = x.clamp(max=-_LN2)  # domain of branch 2: [-inf, -ln2]
    return torch.where(near_zero, torch.log(-torch.expm1(x_hi)), torch.log1p(-torch.exp(x_lo)))


def _tail_logmass(topk_logp: torch.Tensor) -> torch.Tensor:
    """Log of the mass outside the K bins from the K log-probs alone: ``log(1 - sum_k exp(topk_logp))``.

    Only for the teacher of a store without its tail (``teacher/tail_logp``, store
    format version 1): the student's tail is :func:`student_tail_logmass`.
    ``topk_logp``: [R, K] log-probabilities normalised over the full
    vocabulary. Returns [R]. The logsumexp is clamped to ``<= 0`` so that a
    top-K that holds all the mass (or, through rounding, slightly more) gives a
    tail of no mass, ``-inf``, not NaN: a bin of teacher probability 0, which
    contributes nothing (:func:`_kl_of_bins`; the teacher's bins are constants,
    so no gradient goes through this).
    """
    lse = torch.logsumexp(topk_logp, dim=-1).clamp(max=0.0)
    return log1mexp(lse)


def _target_logp(student_logsoftmax: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """[R] the student's log-softmax [R, V] gathered at ``target_ids`` [R]; see token_logprobs."""
    return student_logsoftmax.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)


#: elements of the [rows, V] temporary that :func:`_logsumexp_outside` fills at a time (2 MiB in float32): a
#: block this small stays in the allocator's heap and the CPU's cache; at [200, 49152] float32 the tail costs
#: 8.7 ms in blocks of 8 rows, 31 ms in one block (measured on 2 cores)
_TAIL_BLOCK_ELEMENTS = 1 << 19


def _outside(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """A copy of ``log_probs`` [r, V] with ``-inf`` at each row's ``ids`` [r, K] (repeated ids are fine)."""
    return log_probs.scatter(-1, ids, float("-inf"))


def _logsumexp_outside(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[r] ``logsumexp`` of each row of ``log_probs`` [r, V] over the ids not in its ``ids`` [r, K], without
    gradient; the masked copy is made a block of rows at a time (:data:`_TAIL_BLOCK_ELEMENTS`)."""
    rows, vocab = log_probs.shape
    out = torch.empty(rows, dtype=log_probs.dtype, device=log_probs.device)
    block = max(1, _TAIL_BLOCK_ELEMENTS // max(1, vocab))
    with torch.no_grad():
        for lo in range(0, rows, block):
            out[lo:lo + block] = torch.logsumexp(_outside(log_probs[lo:lo + block], ids[lo:lo + block]), dim=-1)
    return out


class _LogSumExpOutside(torch.autograd.Function):
    """``logsumexp`` of each row of ``log_probs`` over the ids *not* in that row's ``ids``.

    Forward fills the masked copy a block of rows at a time and keeps nothing of it;
    backward rebuilds it once as the gradient itself:
    ``d out[r] / d log_probs[r, v] = exp(log_probs[r, v] - out[r])`` outside the ids, 0 at them.
    """

    @staticmethod
    def forward(ctx, log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = _logsumexp_outside(log_probs, ids)
        ctx.save_for_backward(log_probs, ids, out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        log_probs, ids, out = ctx.saved_tensors
        # out = -inf: no mass outside the ids (K = V); every entry of the row is -inf, exp gives 0
        finite_out = torch.where(torch.isfinite(out), out, torch.zeros_like(out))
        grad = _outside(log_probs, ids)
        grad.sub_(finite_out.unsqueeze(-1)).exp_().mul_(grad_out.unsqueeze(-1))
        return grad, None


def student_tail_logmass(student_logsoftmax: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """The student's tail bin: log of its probability mass outside ``topk_ids``.

    Equation: ``tail[r] = logsumexp_{v not in topk_ids[r]} log_softmax[r, v]``, a
    logsumexp over the ids outside the top-K of the full log-softmax, never
    ``log(1 - sum_k q_k)``: that difference has no precision left when the top-K
    holds all but ~1e-7 of the mass (float32), i.e. exactly when the student is
    over-confident and KD must pull mass back into the tail (its gradient
    would vanish). Memory: one [rows, V] block temporary in forward, the
    gradient itself in backward (:class:`_LogSumExpOutside`).

    Shapes: ``student_logsoftmax`` [R, V] (normalised log-probs), ``topk_ids``
    [R, K] int64 (repeated ids count once). Returns [R]; ``-inf`` when no id is
    outside (K = V).
    """
    return _LogSumExpOutside.apply(student_logsoftmax, topk_ids.long())


def kept_entries(topk_count: torch.Tensor, k: int) -> torch.Tensor:
    """[R, K] bool: entry ``j`` of row ``r`` is one of the teacher's kept ids, ``j < topk_count[r]``.

    A store written with an adaptive K (``precompute teacher --top-p P``, the store's
    ``teacher/topk_count``) keeps the first ``topk_count[r]`` of the K entries of a row; the
    others are padding (id 0, log-prob at the floor), not bins: every reader masks them.
    Shapes: ``topk_count`` [R] integer; returns [R, k].
    """
    return torch.arange(k, device=topk_count.device) < topk_count.long().unsqueeze(-1)


def kept_ids(topk_ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``topk_ids`` [R, K] with every entry outside ``kept`` [R, K] replaced by the row's first id.

    What KD and ADPA gather the student at: a replaced entry repeats the first kept bin, whose
    teacher bin is ``-inf`` there (:func:`teacher_kd_bins` with ``kept``: weight 0) and whose
    advantage is 0 (:func:`adpa_advantage` with ``kept``), and the student's tail
    (:func:`student_tail_logmass`, a logsumexp outside the ids, repeated ids counting once)
    then excludes exactly the kept ids. Needs the first entry kept (counts are >= 1).
    """
    ids = topk_ids.long()
    return torch.where(kept, ids, ids[..., :1])


def teacher_kd_bins(
    topk_logp: torch.Tensor,
    tail_logp: Optional[torch.Tensor] = None,
    has_tail: Optional[torch.Tensor] = None,
    kept: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The teacher's log-probs over the K+1 bins of KD (its top-K, then the tail), renormalised, [R, K+1].

    The tail bin is ``tail_logp`` (the store's ``teacher/tail_logp``: the exact log
    mass outside the top-K, from the teacher's full log-softmax) on rows where
    ``has_tail`` is true (all rows when ``has_tail`` is None), and on other rows,
    or without ``tail_logp``, ``log(1 - sum_k exp(topk_logp))`` clamped as
    :func:`_tail_logmass` says (stores that lack the tail, format version 1).
    Stored log-probs are quantised, so the K+1 bins sum to 1 only within that
    error; they are renormalised: ``bins - logsumexp(bins)`` (the convention of
    ``store.format.DESCRIPTION["tail"]``). A ``-inf`` entry stays ``-inf`` (a
    bin of teacher probability 0).

    ``kept`` [R, K] bool (:func:`kept_entries`, stores with an adaptive K): entries
    outside it are padding, not bins: they get ``-inf`` (probability 0) before
    anything else, so a row's bins are its kept entries and its stored tail, which
    holds the mass of every other id.

    Shapes: ``topk_logp`` [R, K]; ``tail_logp`` [R]; ``has_tail`` [R] bool; ``kept`` [R, K] bool.
    Returns [R, K+1] in ``topk_logp``'s compute dtype (>= float32), detached.
    """
    teacher_topk = _upcast(topk_logp).detach()
    if kept is not None:
        teacher_topk = torch.where(kept.bool(), teacher_topk, torch.full_like(teacher_topk, float("-inf")))
    tail = _tail_logmass(teacher_topk)
    if tail_logp is not None:
        stored = _upcast(tail_logp).to(teacher_topk.dtype).detach()
        tail = stored if has_tail is None else torch.where(has_tail.bool(), stored, tail)
    bins = torch.cat([teacher_topk, tail.unsqueeze(-1)], dim=-1)
    return bins - torch.logsumexp(bins, dim=-1, keepdim=True)


def _ids_cover_vocabulary(topk_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """[R] bool: the row's ids [R, K] (repeated ids counting once) are every id of a vocabulary of ``vocab``, so
    its tail bin holds no id. Only possible when K >= V; otherwise answered without looking at the ids."""
    if topk_ids.shape[-1] < vocab:
        return torch.zeros(topk_ids.shape[:-1], dtype=torch.bool, device=topk_ids.device)
    ordered = topk_ids.sort(dim=-1).values
    return 1 + (ordered[..., 1:] != ordered[..., :-1]).sum(-1) >= vocab


def _without_empty_tail(teacher_bins: torch.Tensor, topk_ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """``teacher_bins`` [R, K+1] with the tail bin of each row whose ids cover the vocabulary (K = V) set to
    ``-inf`` and the row renormalised over its K bins. A bin that holds no id has no mass, whatever tail the
    teacher's rounded top-K log-probs leave (``1 - sum_k p_k`` of a format-1 store is rounding noise of either
    sign there), and the student's tail is ``-inf`` too: ``p log(p / q)`` of that bin is ``0 log(0 / 0) = 0``
    instead of ``p log(p / 0) = inf``."""
    if topk_ids.shape[-1] < vocab:  # no row can be empty
        return teacher_bins
    empty = _ids_cover_vocabulary(topk_ids, vocab)
    tail = torch.where(empty, torch.full_like(teacher_bins[:, -1], float("-inf")), teacher_bins[:, -1])
    bins = torch.cat([teacher_bins[:, :-1], tail.unsqueeze(-1)], dim=-1)
    return torch.where(empty.unsqueeze(-1), bins - torch.logsumexp(bins, dim=-1, keepdim=True), teacher_bins)


def _tail_bucket_bins(
    student_logsoftmax: torch.Tensor, topk_ids: torch.Tensor, teacher_bins: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's log-probs over the K+1 bins (top-K ids, then the tail), [R, K+1] each.

    ``teacher_bins`` is :func:`teacher_kd_bins`' output (a constant: detached here), without the mass of
    an empty tail bin (:func:`_without_empty_tail`). The student's tail is :func:`student_tail_logmass`;
    see kd_tail_kl.
    """
    student_topk = student_logsoftmax.gather(-1, topk_ids)  # [R, K]
    student_bins = torch.cat([student_topk, student_tail_logmass(student_logsoftmax, topk_ids).unsqueeze(-1)], dim=-1)
    teacher = _without_empty_tail(teacher_bins.to(student_bins.dtype), topk_ids, student_logsoftmax.shape[-1])
    return student_bins, teacher.detach()


def _kd_from_logsoftmax(
    student_logsoftmax: torch.Tensor, topk_ids: torch.Tensor, teacher_bins: torch.Tensor
) -> torch.Tensor:
    """KD tail-bucket KL from a precomputed student log-softmax [R, V] and :func:`teacher_kd_bins`; see kd_tail_kl."""
    return _kl_of_bins(*_tail_bucket_bins(student_logsoftmax, topk_ids, teacher_bins))


def _kl_of_bins(student_bins: torch.Tensor, teacher_bins: torch.Tensor) -> torch.Tensor:
    """[R] ``sum_j p_j (t_j - s_j)`` with ``t = teacher_bins``, ``s = student_bins`` (log-probs, [R, K+1] each)
    and ``p = exp(t)``: the KL of the teacher's bins to the student's. ``p log(p / q) -> 0`` where ``p == 0``
    (a ``-inf`` teacher bin; a student tail of ``-inf`` when K = V), its gradient 0 too."""
    teacher_probs = teacher_bins.exp()
    return torch.where(teacher_probs > 0, teacher_probs * (teacher_bins - student_bins),
                       torch.zeros_like(teacher_probs)).sum(-1)


def _adpa_from_logsoftmax(
    student_logsoftmax: torch.Tensor, topk_ids: torch.Tensor, advantage: torch.Tensor
) -> torch.Tensor:
    """ADPA token loss from a precomputed student log-softmax [R, V]; see adpa_token_loss."""
    student_topk_probs = student_logsoftmax.gather(-1, topk_ids).exp()  # [R, K]
    return -(student_topk_probs * _upcast(advantage).to(student_topk_probs.dtype).detach()).sum(-1)


# --------------------------------------------------------------------------
# token-level losses
# --------------------------------------------------------------------------


def token_logprobs(student_logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Student log-probability of each target token.

    Equation: ``logp[r] = log_softmax(student_logits[r])[target_ids[r]]``
    (the full-vocabulary log-softmax, gathered at the target).

    Shapes: ``student_logits`` [R, V] (any float dtype, upcast to >= fp32),
    ``target_ids`` [R] int64 in ``[0, V)``. Returns [R]. No masking: rows are
    response tokens already; ``-mean`` of this over a response is SFT's NLL.
    """
    return _target_logp(torch.log_softmax(_upcast(student_logits), dim=-1), target_ids.long())


def kd_tail_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logp: torch.Tensor,
    tail_logp: Optional[torch.Tensor] = None,
    topk_count: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the teacher's top-K plus a tail bin.

    Source: ADPA repository ``get_kl_loss`` (forward KL on the teacher's
    top-K) with the tail bucket of TRL's ``_add_tail_bucket``; the KL used by
    DCKD ("Advantage-Guided Distillation for Preference Alignment in Small
    Language Models").

    Equation, per token r, with K+1 bins::

        p = [exp(topk_logp[r, 1..K]), exp(tail_logp[r])] / their sum                  (teacher)
        q = [softmax(student_logits[r])[topk_ids[r, 1..K]], sum of the others]        (student)
        KL[r] = sum_j p_j (log p_j - log q_j)

    Computed in log space. The student's tail bin is a logsumexp of its
    log-softmax over the ids outside ``topk_ids`` (:func:`student_tail_logmass`),
    exact even for a student that puts all but 1e-30 of its mass on the top-K.
    The teacher's bins are :func:`teacher_kd_bins`: the stored exact tail
    ``tail_logp`` when given, else ``log(1 - sum_k exp(topk_logp))`` (clamped:
    ``-inf`` when the top-K holds all the mass), renormalised over the K+1 bins.
    Bins with teacher probability 0 contribute 0 (``p log p -> 0``); a row whose
    ids are the whole vocabulary (K = V) has an empty tail bin, of no mass for
    either model, whatever the teacher's tail says (:func:`_without_empty_tail`),
    so its KL is over the K ids alone. Because p and q are proper distributions
    over the same K+1 bins the result is >= 0 up to rounding (a truncated sum
    without the tail is not a KL and can go negative).

    An adaptive K (``topk_count`` [R], the store's ``teacher/topk_count``): row ``r``
    has ``topk_count[r]`` bins of the top-K and the tail, ``k' + 1`` bins in all; its
    entries past the count are padding and take no part (:func:`kept_entries`,
    :func:`kept_ids`): the student's tail is the mass outside the *kept* ids, the
    teacher's tail the stored ``tail_logp`` (which the writer computed outside the
    kept ids: the mass of the dropped entries is in it, exactly).

    Shapes: ``student_logits`` [R, V]; ``topk_ids`` [R, K] int64;
    ``topk_logp`` [R, K] teacher log-probs normalised over the *full*
    vocabulary (not renormalised over the K); ``tail_logp`` [R] or None;
    ``topk_count`` [R] or None (every entry kept).
    Returns [R]; gradient flows to ``student_logits`` only (teacher detached).
    """
    student_logsoftmax = torch.log_softmax(_upcast(student_logits), dim=-1)
    ids, kept = topk_ids.long(), None
    if topk_count is not None:
        kept = kept_entries(topk_count, ids.shape[-1])
        ids = kept_ids(ids, kept)
    return _kd_from_logsoftmax(student_logsoftmax, ids, teacher_kd_bins(topk_logp, tail_logp, kept=kept))


def teacher_kd_sample_logp(
    topk_logp: torch.Tensor, tail_logp: torch.Tensor, sample_logp: torch.Tensor,
    kept: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The teacher's log-probs of the tail samples on the scale of :func:`teacher_kd_bins`, [R, S], detached.

    The stored top-K, tail and sample log-probs are quantised; KD renormalises the K+1 bins by their
    ``logsumexp`` (``store.format.DESCRIPTION["tail"]``), and the samples, which split the tail bin, are
    divided by the same total: ``sample_logp - logsumexp(bins)``. ``kept`` as in :func:`teacher_kd_bins`.

    Shapes: ``topk_logp`` [R, K] (K may be 0); ``tail_logp`` [R]; ``sample_logp`` [R, S]; ``kept`` [R, K] bool.
    """
    teacher_topk = _upcast(topk_logp).detach()
    if kept is not None:
        teacher_topk = torch.where(kept.bool(), teacher_topk, torch.full_like(teacher_topk, float("-inf")))
    tail = _upcast(tail_logp).to(teacher_topk.dtype).detach()
    bins = torch.cat([teacher_topk, tail.unsqueeze(-1)], dim=-1)
    return _upcast(sample_logp).to(teacher_topk.dtype).detach() - torch.logsumexp(bins, dim=-1, keepdim=True)


def _kd_sampled_parts(
    student_logsoftmax: torch.Tensor, topk_ids: torch.Tensor, teacher_bins: torch.Tensor,
    sample_ids: torch.Tensor, sample_teacher: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value [R], the teacher's top-K probabilities [R, K], each sample's weight m / S [R, 1]) of
    :func:`kd_sampled_kl` from the student's log-softmax; terms of teacher probability (or weight) 0 are 0."""
    teacher = _without_empty_tail(teacher_bins.to(student_logsoftmax.dtype), topk_ids,
                                  student_logsoftmax.shape[-1]).detach()
    top_probs = teacher[:, :-1].exp()
    top = torch.where(top_probs > 0, top_probs * (teacher[:, :-1] - student_logsoftmax.gather(-1, topk_ids)),
                      torch.zeros_like(top_probs)).sum(-1)
    weight = teacher[:, -1:].exp() / max(1, sample_ids.shape[-1])
    estimate = weight * (sample_teacher.to(student_logsoftmax.dtype) - student_logsoftmax.gather(-1, sample_ids))
    tail = torch.where(weight > 0, estimate, torch.zeros_like(estimate)).sum(-1)
    return top + tail, top_probs, weight


def _kd_sampled_from_logsoftmax(
    student_logsoftmax: torch.Tensor, topk_ids: torch.Tensor, teacher_bins: torch.Tensor,
    sample_ids: torch.Tensor, sample_teacher: torch.Tensor,
) -> torch.Tensor:
    """KD with tail samples from a precomputed student log-softmax [R, V]; see kd_sampled_kl."""
    return _kd_sampled_parts(student_logsoftmax, topk_ids, teacher_bins, sample_ids, sample_teacher)[0]


def kd_sampled_kl(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logp: torch.Tensor,
    tail_logp: torch.Tensor,
    sample_ids: torch.Tensor,
    sample_logp: torch.Tensor,
    topk_count: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Forward KL(teacher || student) over the full vocabulary: exact on the teacher's top-K, the tail's part
    estimated without bias from S ids sampled from the teacher's distribution outside the top-K.

    Source: random-sampling KD, Anshumann et al., ACL 2025, "Sparse Logit Sampling: Accelerating Knowledge
    Distillation in LLMs" (arXiv 2503.16870), with the teacher itself as the proposal; here only the tail is
    sampled (``precompute teacher --tail-samples S``), and ``--top-k 0`` is the paper's pure sampled store.

    Equation, per token, with ``p`` the teacher's distribution (the K+1 stored bins renormalised as in
    :func:`teacher_kd_bins`; the samples divided by the same total, :func:`teacher_kd_sample_logp`),
    ``m = p(tail)``, ``s`` the student's softmax and ``j_1..j_S`` the stored ids, drawn from ``p_j / m`` on
    the tail::

        KL_hat = sum_{k in top-K} p_k (log p_k - log s_k)  +  (m / S) sum_i (log p_{j_i} - log s_{j_i})

    Unbiased: ``E[log p_j - log s_j] = sum_{j in tail} (p_j / m)(log p_j - log s_j)``, so ``E[KL_hat]`` is
    the full-vocabulary KL, and (the estimate being linear in ``log s``) its expected gradient with respect to
    the student's logits is the full-vocabulary KD gradient ``s - p``: the top-K part gives
    ``P_K s - p_K`` (``P_K`` the top-K's mass), each sample ``(m / S)(s - e_j)``, whose expectation over
    ``S`` draws is ``m s - p_tail`` (``docs/methods.md``, "KD with tail samples"). One estimate can be
    negative (a sample the student makes likelier than the teacher); its mean cannot. Where the teacher's
    tail has no mass (K = V: padding samples), the estimate is the KL over the K ids. An adaptive K
    (``topk_count``) keeps its kept entries, as in :func:`kd_tail_kl`.

    Shapes: ``student_logits`` [R, V]; ``topk_ids`` [R, K] (K may be 0); ``topk_logp`` [R, K];
    ``tail_logp`` [R]; ``sample_ids`` [R, S]; ``sample_logp`` [R, S] (the teacher's log-probs of the
    samples, normalised over the full vocabulary); ``topk_count`` [R] or None.
    Returns [R]; gradient flows to ``student_logits`` only.
    """
    student_logsoftmax = torch.log_softmax(_upcast(student_logits), dim=-1)
    ids, kept = topk_ids.long(), None
    if topk_count is not None:
        kept = kept_entries(topk_count, ids.shape[-1])
        ids = kept_ids(ids, kept)
    bins = teacher_kd_bins(topk_logp, tail_logp, kept=kept)
    samples = teacher_kd_sample_logp(topk_logp, tail_logp, sample_logp, kept=kept)
    return _kd_sampled_from_logsoftmax(student_logsoftmax, ids, bins, sample_ids.long(), samples)


def adpa_advantage(
    topk_logp: torch.Tensor, ref_logp: torch.Tensor, beta: float = 1.0, clip: bool = True,
    kept: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """ADPA's token advantage at the teacher's top-K ids.

    Source: ADPA paper ("Advantage-Guided Distillation for Preference
    Alignment in Small Language Models"): ``A[t, k] = beta * (log pi_T(k|s_t)
    - log pi_R(k|s_t))`` for the teacher's top-K ids k.

    ``clip=True`` (default, the released code's behaviour, which produced the
    paper's numbers): clamp A into ``[1e-8, 1 - 1e-8]``, which zeroes (to
    1e-8) every negative advantage and caps positive ones at ~1 (in float32
    ``1 - 1e-8`` rounds to 1.0). ``clip=False``: the paper's unclipped
    equation.

    ``kept`` [R, K] bool (:func:`kept_entries`, a store with an adaptive K): the
    advantage is 0 on every entry outside it (padding: no id of the teacher's, so
    no term of the sum), clipped or not.

    Shapes: ``topk_logp``, ``ref_logp`` [R, K] (ref evaluated at the same
    ids); ``kept`` [R, K] bool or None. Returns [R, K], detached (the advantage is a constant).
    """
    advantage = beta * (_upcast(topk_logp) - _upcast(ref_logp).to(_compute_dtype(topk_logp)))
    if clip:
        advantage = advantage.clamp(min=1e-8, max=1.0 - 1e-8)
    if kept is not None:
        advantage = torch.where(kept.bool(), advantage, torch.zeros_like(advantage))
    return advantage.detach()


def adpa_token_loss(
    student_logits: torch.Tensor, topk_ids: torch.Tensor, advantage: torch.Tensor
) -> torch.Tensor:
    """ADPA's per-token loss: minus the advantage-weighted student probability.

    Source: ADPA paper, ``L_ADPA = - mean_t sum_k pi_theta(topk_ids[t,k] | s_t) * A[t,k]``;
    this function returns the per-token term ``-sum_k q[t,k] A[t,k]`` (the
    caller takes the mean over response tokens).

    Shapes: ``student_logits`` [R, V]; ``topk_ids`` [R, K] int64;
    ``advantage`` [R, K] (see :func:`adpa_advantage`; detached here).
    ``q`` is the full-vocabulary softmax gathered at ``topk_ids``. Returns [R].
    """
    return _adpa_from_logsoftmax(torch.log_softmax(_upcast(student_logits), dim=-1), topk_ids.long(), advantage)


def _uld_from_logsoftmax(student_logsoftmax: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD from a precomputed student log-softmax [R, V] and the teacher's sorted top-K probabilities; see uld_loss."""
    teacher = _upcast(teacher_probs).to(student_logsoftmax.dtype).detach()
    k = min(teacher.shape[-1], student_logsoftmax.shape[-1])
    student_sorted = student_logsoftmax.topk(k, dim=-1).values.exp()
    teacher = teacher[..., :k]
    return torch.where(teacher > 0, (teacher - student_sorted).abs(), torch.zeros_like(teacher)).sum(-1)


def uld_loss(student_logits: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """Universal Logit Distillation at rows whose teacher token is not the student's (Boizard et al. 2024,
    "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs", arXiv 2402.12030).

    Equation, per row r, with the teacher's top-K probabilities sorted in decreasing order
    ``p_(1) >= ... >= p_(K)`` (the store's ``teacher/teacher_topk_logp``, exponentiated) and the student's
    ``q_(1) >= q_(2) >= ...`` (its full softmax sorted)::

        ULD[r] = sum_{k <= n_r} | p_(k) - q_(k) |,     n_r = the teacher's kept entries (p_(k) > 0)

    The paper's loss is the L1 distance between the two whole sorted vectors (the shorter padded with zeros);
    a store keeps the teacher's top K, so the sum stops at the teacher's kept entries (an adaptive K's padding
    and rows without a teacher row are 0 and drop out). It needs no shared vocabulary: only the
    probabilities' order statistics are compared, not which token holds them.

    Shapes: ``student_logits`` [R, V]; ``teacher_probs`` [R, K] (0 past the kept entries). Returns [R];
    gradient to ``student_logits`` only.
    """
    return _uld_from_logsoftmax(torch.log_softmax(_upcast(student_logits), dim=-1), teacher_probs)


def chunk_likelihood_loss(student_chunk_logp: torch.Tensor, teacher_chunk_logp: torch.Tensor) -> torch.Tensor:
    """The likelihood of aligned chunks matched between student and teacher, after ALM's binarised
    f-divergence (Minixhofer et al. 2025, "Universal Cross-Tokenizer Distillation via Approximate Likelihood
    Matching", arXiv 2503.20083), with the KL.

    A chunk is a run of student tokens and of teacher tokens covering the same characters; ``l_S`` is the
    student's log-prob of the chunk (the sum of its target log-probs over the chunk's rows), ``l_T`` the
    teacher's (stored: ``teacher/chunk_logp``). With ``p = exp(l)``, the KL between the two Bernoulli
    distributions "the chunk is generated" / "it is not"::

        L[c] = p_T (l_T - l_S) + (1 - p_T) (log(1 - p_T) - log(1 - p_S))

    computed in log space (:func:`log1mexp`), both log-probs clamped to ``<= -tiny`` (the smallest
    positive normal of the dtype: a certain chunk keeps a finite ``log(1 - p)``). 0 where they are equal,
    >= 0 otherwise.

    Shapes: both [C]. Returns [C]; gradient to ``student_chunk_logp`` only.
    """
    student = _upcast(student_chunk_logp)
    teacher = _upcast(teacher_chunk_logp).to(student.dtype).detach()
    tiny = torch.finfo(student.dtype).tiny
    student, teacher = student.clamp(max=-tiny), teacher.clamp(max=-tiny)
    p = teacher.exp()
    return p * (teacher - student) + (1 - p) * (log1mexp(teacher) - log1mexp(student))


# --------------------------------------------------------------------------
# sequence-level losses
# --------------------------------------------------------------------------


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """DPO loss per pair (Rafailov et al. 2023, "Direct Preference Optimization").

    Equation::

        L = -log sigmoid(beta * ((pc - rc) - (pr - rr)))

    with ``pc, pr`` the policy's summed response log-probs of the chosen and
    rejected responses and ``rc, rr`` the frozen reference's (cached).
    ``F.logsigmoid`` keeps it stable for large margins of either sign.

    Shapes: all four [B]. Returns [B]; reference terms detached.
    """
    pc, pr = _upcast(policy_chosen_logps), _upcast(policy_rejected_logps)
    rc = _upcast(ref_chosen_logps).to(pc.dtype).detach()
    rr = _upcast(ref_rejected_logps).to(pc.dtype).detach()
    margin = (pc - rc) - (pr - rr)
    return -F.logsigmoid(beta * margin)


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
) -> torch.Tensor:
    """SimPO loss per pair (Meng et al. 2024, "SimPO: Simple Preference
    Optimization with a Reference-Free Reward").

    Equation (the paper's form)::

        L = -log sigmoid(beta * avg_logp(y_w) - beta * avg_logp(y_l) - gamma)

    ``avg_logp`` is the length-normalised (mean per-token) log-prob of the
    response under the policy (see :func:`sequence_means`); no reference.

    ``gamma`` is the target margin in *reward units* (as in the paper and in
    TRL's CPOTrainer ``simpo_gamma``, default 0.5). SimPO's own code instead
    takes ``gamma_beta_ratio = gamma / beta`` (its default 0.5 with beta=2
    would be gamma=1.0 here). beta=2.0 is the SimPO paper's most common value.

    Shapes: both [B]. Returns [B].
    """
    chosen = _upcast(chosen_avg_logps)
    rejected = _upcast(rejected_avg_logps).to(chosen.dtype)
    return -F.logsigmoid(beta * chosen - beta * rejected - gamma)


def sequence_sums(
    token_values: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum per-token values into per-sequence sums.

    Equation: ``out[s] = sum_{r : seq_index[r] = s} mask[r] * token_values[r]``.

    Shapes: ``token_values`` [R] float; ``seq_index`` [R] int64 in
    ``[0, num_sequences)``; optional ``mask`` [R] (bool or 0/1 float; masked
    tokens contribute nothing, not even NaN). Returns [S] = [num_sequences];
    a sequence with no (unmasked) tokens sums to 0. Differentiable
    (``index_add``).
    """
    values = _upcast(token_values)
    if mask is not None:
        values = torch.where(mask.bool(), values, torch.zeros_like(values))
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, seq_index.long(), values)


def sequence_means(
    token_values: torch.Tensor,
    seq_index: torch.Tensor,
    num_sequences: int,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Length-normalised per-sequence means of per-token values.

    Equation: ``out[s] = sequence_sums(...)[s] / max(1, #{r : seq_index[r] = s, mask[r]})``.

    Shapes as :func:`sequence_sums`; returns [S]. Sequences with no
    (unmasked) tokens give 0. Used for SimPO's and PAD's length-normalised
    log-probs and for per-sequence mean NLL / KD.
    """
    sums = sequence_sums(token_values, seq_index, num_sequences, mask)
    ones = torch.ones_like(sums[:1]).expand(seq_index.shape[0])
    counts = sequence_sums(ones, seq_index, num_sequences, mask)
    return sums / counts.clamp(min=1.0)


# --------------------------------------------------------------------------
# PAD: Plackett-Luce over orderings
# --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _permutations_cpu(n: int) -> torch.Tensor:
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long).reshape(-1, n)


def permutations_tensor(n: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """All n! orderings of ``range(n)`` in lexicographic order.

    Returns a LongTensor [n!, n] (row ``p`` is the ordering ``tau``: position
    k holds the index of the response ranked k-th). Cached per n; treat the
    result as read-only. ``n`` must be in ``1..MAX_EXACT_PL_GROUP``.
    """
    if n < 1:
        raise ValueError(f"group size must be >= 1, got {n}")
    if n > MAX_EXACT_PL_GROUP:
        raise ValueError(
            f"exact enumeration of {n}! orderings is not supported (n > {MAX_EXACT_PL_GROUP}); "
            "use pad_loss(..., max_group=...) which decomposes large groups into "
            "overlapping sub-groups"
        )
    perms = _permutations_cpu(n)
    return perms if device is None else perms.to(device)


def _pl_log_prob_of(ordered_rewards: torch.Tensor) -> torch.Tensor:
    """log PL probability of rewards already arranged in ranked order along the last dim.

    ``log P = sum_k [ g_k - logsumexp_{j >= k} g_j ]``; the suffix logsumexp
    is a reversed ``logcumsumexp``. Shape [..., n] -> [...].
    """
    suffix_lse = torch.logcumsumexp(ordered_rewards.flip(-1), dim=-1).flip(-1)
    return (ordered_rewards - suffix_lse).sum(-1)


def plackett_luce_log_probs(rewards: torch.Tensor) -> torch.Tensor:
    """Log-probability of every ordering under a Plackett-Luce model.

    Source: PAD (Gu et al., "Preference-Aligned Distillation"; code
    EganGu/PAD). Equation, for an ordering ``tau`` of the n responses::

        log P(tau) = sum_{k=1..n} [ r_{tau_k} - logsumexp_{j not in tau_<k} r_j ]

    Vectorised: rewards are gathered by :func:`permutations_tensor` into
    [G, n!, n] and the inner logsumexp over the not-yet-ranked responses is
    a reverse cumulative logsumexp along the ranking.

    Shapes: ``rewards`` [G, n] (G prompts, n responses each, rewards already
    scaled, e.g. ``beta * avg_logp``). Returns [G, n!], columns in the
    lexicographic order of :func:`permutations_tensor`; ``exp`` of each row
    sums to 1. Exact for n <= 6; raises ValueError for n > 6.
    """
    r = _upcast(rewards)
    perms = permutations_tensor(r.shape[-1], device=r.device)  # [P, n]
    ordered = r[:, perms]  # [G, P, n]
    return _pl_log_prob_of(ordered)


def pad_ppd_loss(student_rewards: torch.Tensor, teacher_rewards: torch.Tensor) -> torch.Tensor:
    """PAD's probabilistic preference distillation (PPD) loss, per prompt.

    Source: PAD (Gu et al., "Preference-Aligned Distillation"). Textbook
    Jensen-Shannon divergence between the student's and the teacher's
    Plackett-Luce distributions over all n! orderings, one value per prompt::

        JSD = 0.5 KL(P_S || M) + 0.5 KL(P_T || M),   M = (P_S + P_T) / 2

    computed in log space (``log M = logaddexp(log P_S, log P_T) - ln 2``).
    Symmetric, 0 iff P_S = P_T, bounded by ln 2.

    Deliberate difference from the released code (EganGu/PAD), which
    computes ``0.5 [KL(M || P_S) + KL(M || P_T)]`` and mixes prompts when the
    per-device batch exceeds one: here it is the textbook JSD, per prompt.

    Shapes: ``student_rewards``, ``teacher_rewards`` [G, n], n <= 6 (use
    :func:`pad_loss` for larger n). Teacher side detached. Returns [G].
    """
    log_student = plackett_luce_log_probs(student_rewards)  # [G, P]
    log_teacher = plackett_luce_log_probs(teacher_rewards.detach()).to(log_student.dtype)  # [G, P]
    log_mixture = torch.logaddexp(log_student, log_teacher) - _LN2
    kl_student = (log_student.exp() * (log_student - log_mixture)).sum(-1)
    kl_teacher = (log_teacher.exp() * (log_teacher - log_mixture)).sum(-1)
    return 0.5 * kl_student + 0.5 * kl_teacher


def pad_vpd_loss(student_rewards: torch.Tensor, teacher_rewards: torch.Tensor) -> torch.Tensor:
    """PAD's value-based preference distillation (VPD) loss, per prompt.

    Source: PAD (Gu et al., "Preference-Aligned Distillation"). Minus the
    student's Plackett-Luce log-probability of the teacher's ranking::

        L = -log P_S(tau*),   tau* = argsort(teacher_rewards, descending)

    Ties in the teacher's rewards are broken by response index (stable
    sort). Only the one ordering is evaluated (no enumeration), so this is
    exact for any n.

    Shapes: both [G, n]. Teacher detached. Returns [G].
    """
    order = torch.argsort(teacher_rewards.detach(), dim=-1, descending=True, stable=True)
    return -_pl_log_prob_of(_upcast(student_rewards).gather(-1, order))


# --------------------------------------------------------------------------
# CycleAlign: ranking losses over agreed orders (RRHF, PRO)
# --------------------------------------------------------------------------


def rrhf_loss(scores: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """RRHF's ranking loss per group (Yuan et al. 2023, "RRHF: Rank Responses to Align Language Models with
    Human Feedback without tears")::

        L = sum over pairs (i, j) with i ranked above j of max(0, p_j - p_i)

    ``p`` is the student's length-normalised log-prob of each response (RRHF's
    score). Only ranked responses take part: ``ranks`` holds each response's
    place (0 = best) or -1 for a response outside the ranking.

    Shapes: ``scores`` [G, n] float, ``ranks`` [G, n] integer. Returns [G]
    (0 for a group with fewer than two ranked responses). Differentiable in
    ``scores``.
    """
    p = _upcast(scores)
    ranks = ranks.to(p.device)
    ranked = ranks >= 0
    above = (ranks[:, :, None] < ranks[:, None, :]) & ranked[:, :, None] & ranked[:, None, :]  # [G, i, j]: i above j
    violation = torch.relu(p[:, None, :] - p[:, :, None])  # [G, i, j]: max(0, p_j - p_i)
    return torch.where(above, violation, torch.zeros_like(violation)).sum((-1, -2))


def pro_loss(scores: torch.Tensor, ranks: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """PRO's listwise loss per group (Song et al. 2023, "Preference Ranking Optimization for Human
    Alignment"), in its plain form: minus the Plackett-Luce log-probability of the ranking under the
    scores (divided by ``temperature``)::

        L = - sum_k [ p_(k) / T - logsumexp_{j >= k} p_(j) / T ]   over the ranked responses, best first

    ``p`` as in :func:`rrhf_loss`; responses with rank -1 take no part (neither
    as a term nor in any denominator). PRO's paper adds a reward-dependent
    temperature per step and an SFT term; the SFT term is the method's
    ``sft_best`` here, and the dynamic temperature is left out (our choice).

    Shapes: ``scores`` [G, n], ``ranks`` [G, n] integer. Returns [G] (0 with fewer than two ranked).
    """
    p = _upcast(scores) / temperature
    ranks = ranks.to(p.device)
    big = ranks.max().clamp(min=0) + 1 if ranks.numel() else torch.tensor(1, device=p.device)
    order = torch.argsort(torch.where(ranks >= 0, ranks, big + torch.arange(ranks.shape[-1], device=p.device)),
                          dim=-1, stable=True)
    ordered = p.gather(-1, order)
    kept = (ranks >= 0).gather(-1, order)
    masked = torch.where(kept, ordered, torch.full_like(ordered, float("-inf")))
    suffix = torch.logcumsumexp(masked.flip(-1), dim=-1).flip(-1)
    terms = torch.where(kept, ordered - suffix, torch.zeros_like(ordered))
    return -terms.sum(-1)


def _window_starts(n: int, m: int) -> list[int]:
    """Starts of windows of size m over positions 0..n-1 (n > m), stride m - 1,
    the last window shifted to end at n - 1 so every window has size m."""
    starts = list(range(0, n - m, m - 1))
    starts.append(n - m)
    return starts


def pad_loss(
    student_rewards: torch.Tensor,
    teacher_rewards: torch.Tensor,
    kind: str = "ppd",
    max_group: int = MAX_EXACT_PL_GROUP,
) -> torch.Tensor:
    """PAD loss (PPD or VPD) for any group size; PPD with preference decomposition above ``max_group``.

    VPD is always exactly :func:`pad_vpd_loss`, ``-log P_S(argsort r_T)``: it
    evaluates one ordering (n terms), so it is cheap and exact for any n and is
    never decomposed (``max_group`` does not change it).

    PPD: for ``n <= max_group`` this is exactly :func:`pad_ppd_loss`. For
    ``n > max_group`` (n! orderings would be too many; PAD's "preference
    decomposing") the group is split as follows:

    1. sort each prompt's responses by teacher reward, descending (stable);
    2. take windows of ``m = max_group`` consecutive positions in that order,
       with stride ``m - 1`` so consecutive windows share one response; the
       last window is shifted to end at the last position so every window has
       exactly m responses (it may then overlap its neighbour by more than
       one). Window count ``W = ceil((n - 1) / (m - 1))``;
    3. apply the exact loss to each window's sub-group and average over the W
       windows: ``L = (1/W) sum_w loss(r_S[window_w], r_T[window_w])``.

    Why this is sound: Plackett-Luce satisfies Luce's choice axiom, so the
    distribution it induces on the relative order of any subset of responses
    is the PL model on that subset with the same rewards: each window's PL
    distribution is exactly the marginal of the full one, and matching
    marginals is a necessary condition for matching the full distributions.
    Windows along the teacher's order cover every adjacent pair of the
    teacher's ranking and share responses, so the chain of comparisons is
    connected (the whole ranking is constrained, not disjoint blocks).
    The decomposed loss is a surrogate, not equal to the full-group loss.

    Shapes: both [G, n]; ``kind`` in :data:`PAD_LOSSES`; ``2 <= max_group <= 6``.
    Teacher side detached. Returns [G].
    """
    if kind not in PAD_LOSSES:
        raise ValueError(f"kind must be one of {', '.join(PAD_LOSSES)}, got {kind!r}")
    if not 2 <= max_group <= MAX_EXACT_PL_GROUP:
        raise ValueError(f"max_group must be in [2, {MAX_EXACT_PL_GROUP}], got {max_group}")
    if kind == "vpd":
        return pad_vpd_loss(student_rewards, teacher_rewards)  # exact for any n: one ordering
    exact = pad_ppd_loss
    G, n = student_rewards.shape
    if n <= max_group:
        return exact(student_rewards, teacher_rewards)
    teacher = teacher_rewards.detach()
    order = torch.argsort(teacher, dim=-1, descending=True, stable=True)  # [G, n]
    starts = torch.tensor(_window_starts(n, max_group), device=order.device)
    positions = starts[:, None] + torch.arange(max_group, device=order.device)  # [W, m]
    W = positions.shape[0]
    members = order[:, positions].reshape(G, -1)  # [G, W * m] response indices, window by window
    student_windows = student_rewards.gather(-1, members).reshape(G * W, max_group)
    teacher_windows = teacher.gather(-1, members).reshape(G * W, max_group)
    return exact(student_windows, teacher_windows).reshape(G, W).mean(-1)


def pad_teacher_rewards(
    mean_logp: torch.Tensor, mcq_score: torch.Tensor, alpha: float, beta: float = 10.0
) -> torch.Tensor:
    """PAD's teacher reward per response.

    Source: PAD (Gu et al.): ``r_T(i) = beta * (alpha * avglogp_T(y_i) +
    (1 - alpha) * s_mcq(i))``; released config alpha = 0, beta = 10.

    Shapes: ``mean_logp`` [G, n] (teacher mean token log-prob of each
    response), ``mcq_score`` [G, n] (:func:`mcq_score`). Returns [G, n]. A
    term whose weight is exactly 0 is skipped, so e.g. alpha = 0 does not
    turn a -inf/NaN ``mean_logp`` into NaN.
    """
    mean_logp, mcq_score = _upcast(mean_logp), _upcast(mcq_score)
    if alpha == 0:
        inner = mcq_score
    elif alpha == 1:
        inner = mean_logp
    else:
        inner = alpha * mean_logp + (1.0 - alpha) * mcq_score.to(mean_logp.dtype)
    return beta * inner


def mcq_score(pair_probs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """PAD's calibration (multiple-choice) score of each response.

    Source: PAD (Gu et al., "Preference-Aligned Distillation"), as ``docs/methods.md`` records it::

        s_mcq(i) = log( (eps + sum_{j != i} P(i chosen | {i, j})) / (n - 1) )

    (eps inside the numerator, before dividing by n - 1).

    Shapes: ``pair_probs`` [G, n, n] with ``pair_probs[g, i, j] = P(i chosen
    over j)``; the diagonal is ignored (may hold anything, even NaN). If both
    option orders were asked, average them before calling. Returns [G, n].
    """
    p = _upcast(pair_probs)
    n = p.shape[-1]
    if n < 2:
        raise ValueError(f"mcq_score needs n >= 2 responses, got {n}")
    eye = torch.eye(n, dtype=torch.bool, device=p.device)
    wins = torch.where(eye, torch.zeros_like(p), p).sum(-1)  # [G, n]
    return torch.log((eps + wins) / (n - 1))


# --------------------------------------------------------------------------
# per-token terms of the student's log-softmax, and their chunked computation
# --------------------------------------------------------------------------

#: per-token quantities (the keys of :data:`TOKEN_TERMS`); ULD and CHUNK serve stores aligned across tokenizers:
#: ULD at rows whose teacher token is not the student's, CHUNK the target log-prob on rows of aligned chunks
#: (:func:`chunk_likelihood_loss` sums it per chunk)
LOGP, KD, ADPA, ULD, CHUNK = "logp", "kd", "adpa", "uld", "chunk"
#: KD with tail samples (:func:`kd_sampled_kl`): what ``train.methods.student_outputs`` computes instead of ``kd``
#: on rows whose store has tail samples (``--kd-tail``)
KD_SAMPLED = "kd_sampled"

#: row signals the terms read: the row's own target token, the teacher's top-K from the
#: store, and ADPA's advantage ``A`` [R, K], which depends on settings (beta, clip) and is
#: derived before the chunk loop (:func:`adpa_advantage`; ``train.methods.DERIVED_SIGNALS``);
#: KD's teacher bins [R, K+1] are derived there too (:func:`teacher_kd_bins` of the stored
#: top-K and, where the store has it, the stored tail ``teacher/tail_logp``)
TARGET_IDS = "target_ids"
TOPK_IDS = fmt.signal_name(fmt.SECTION_TEACHER, fmt.ARRAY_TOPK_IDS)
TOPK_LOGP = fmt.signal_name(fmt.SECTION_TEACHER, fmt.ARRAY_TOPK_LOGP)
TAIL_LOGP = fmt.signal_name(fmt.SECTION_TEACHER, fmt.ARRAY_TAIL_LOGP)
#: the kept entries of each row of a store written with an adaptive K (``--top-p``); absent: all K kept.
#: Readers derive :data:`TOPK_IDS` with padding replaced (:func:`kept_ids`) and mask KD's teacher bins and
#: ADPA's advantage with it (``train.methods.DERIVED_SIGNALS``)
TOPK_COUNT = fmt.signal_name(fmt.SECTION_TEACHER, fmt.ARRAY_TOPK_COUNT)
ADVANTAGE = "adpa/advantage"
KD_TEACHER = "kd/teacher_bins"
#: ULD's teacher side [R, K]: the teacher's own top-K probabilities at the aligned teacher row, 0 past its kept
#: entries (derived from the store's ``teacher/teacher_topk_logp``: ``train.methods.DERIVED_SIGNALS``)
ULD_TEACHER = "uld/teacher_probs"
#: the tail samples (``precompute teacher --tail-samples S``): ids [R, S] as stored, and the teacher's log-probs
#: of them [R, S] on KD's bins' scale (:func:`teacher_kd_sample_logp`), derived before the chunk loop
TAIL_SAMPLE_IDS = fmt.signal_name(fmt.SECTION_TEACHER, fmt.ARRAY_TAIL_SAMPLE_IDS)
TAIL_SAMPLE_LOGP = fmt.signal_name(fmt.SECTION_TEACHER, fmt.ARRAY_TAIL_SAMPLE_LOGP)
KD_SAMPLE_TEACHER = "kd/sampled_teacher_logp"

@dataclass(frozen=True)
class LogSoftmaxGradient:
    """``d value[r] / d log_softmax[r, v]`` of a per-token term on its rows, times the gradient of each row's value,
    in the two shapes the analytic gradients have (the rest of the vocabulary gets nothing):

    - ``at``: pairs ``(ids [c, k], values [c, k])``: ``values[r, j]`` at ``ids[r, j]`` (repeated ids add up);
    - ``tail``: ``(ids [c, k], coef [c], logmass [c])``: ``coef[r] * exp(log_softmax[r, v] - logmass[r])`` at every
      ``v`` outside ``ids[r]``, where ``logmass[r]`` is the logsumexp of the row outside them (a tail bin's
      gradient: :class:`_LogSumExpOutside`); these add up to ``coef[r]``.
    """

    at: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()
    tail: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None


#: an analytic gradient: ``(log_softmax [c, V], *signals) -> (value [c], gradient)``, where
#: ``gradient(grad_value [c]) -> LogSoftmaxGradient``
AnalyticGradient = Callable[..., tuple[torch.Tensor, Callable[[torch.Tensor], LogSoftmaxGradient]]]


@dataclass(frozen=True)
class TokenTerm:
    """A per-token quantity of the student's log-softmax rows.

    ``value(log_softmax, *signals) -> [c]`` computes it with torch operations from the student's
    log-softmax rows ``[c, V]`` (>= float32) and the row signals named by ``reads``, passed in that
    order, each ``[c, ...]`` on the same rows. :func:`chunked_token_terms` differentiates it with
    autograd, chunk by chunk: a new per-token loss needs nothing more.

    ``with_gradient`` (optional, a speed-up): the value and its derivative written out
    (:data:`AnalyticGradient`), so that every such term of a chunk writes into one [c, V]
    gradient instead of autograd's zero-filled [c, V] tensor per gather. The tests hold each one
    to autograd's gradient of ``value`` (``chunked_token_terms(..., analytic=False)``).
    """

    reads: tuple[str, ...]
    value: Callable[..., torch.Tensor]
    with_gradient: Optional[AnalyticGradient] = None


def _logp_with_gradient(log_probs: torch.Tensor, target_ids: torch.Tensor):
    """:func:`_target_logp` and its gradient: 1 at the target."""
    return _target_logp(log_probs, target_ids), lambda grad: LogSoftmaxGradient(
        at=((target_ids.unsqueeze(-1), grad.unsqueeze(-1)),))


def _kd_with_gradient(log_probs: torch.Tensor, topk_ids: torch.Tensor, teacher_bins: torch.Tensor):
    """:func:`_kd_from_logsoftmax` and its gradient: ``-p_k`` at the K ids, ``-p_tail`` spread over the tail
    in proportion to the student's probabilities there."""
    tail = _logsumexp_outside(log_probs, topk_ids)
    teacher = _without_empty_tail(teacher_bins.to(log_probs.dtype), topk_ids, log_probs.shape[-1])
    value = _kl_of_bins(torch.cat([log_probs.gather(-1, topk_ids), tail.unsqueeze(-1)], dim=-1), teacher)
    teacher_probs = teacher.exp()

    def gradient(grad: torch.Tensor) -> LogSoftmaxGradient:
        minus_p = -teacher_probs * grad.unsqueeze(-1)
        return LogSoftmaxGradient(at=((topk_ids, minus_p[:, :-1]),), tail=(topk_ids, minus_p[:, -1], tail))

    return value, gradient


def _kd_sampled_with_gradient(log_probs: torch.Tensor, topk_ids: torch.Tensor, teacher_bins: torch.Tensor,
                              sample_ids: torch.Tensor, sample_teacher: torch.Tensor):
    """:func:`_kd_sampled_from_logsoftmax` and its gradient: ``-p_k`` at the K ids, ``-m / S`` at each sample
    (repeated draws add up); no pass over the vocabulary."""
    value, top_probs, weight = _kd_sampled_parts(log_probs, topk_ids, teacher_bins, sample_ids, sample_teacher)

    def gradient(grad: torch.Tensor) -> LogSoftmaxGradient:
        scale = -grad.unsqueeze(-1)
        return LogSoftmaxGradient(at=((topk_ids, top_probs * scale), (sample_ids, (weight * scale).expand_as(
            sample_ids).to(log_probs.dtype))))

    return value, gradient


def _adpa_with_gradient(log_probs: torch.Tensor, topk_ids: torch.Tensor, advantage: torch.Tensor):
    """:func:`_adpa_from_logsoftmax` and its gradient: ``-q_k A_k`` at the K ids."""
    weighted = log_probs.gather(-1, topk_ids).exp() * advantage.to(log_probs.dtype)
    return -weighted.sum(-1), lambda grad: LogSoftmaxGradient(at=((topk_ids, -weighted * grad.unsqueeze(-1)),))


#: what :func:`chunked_token_terms` can compute. A per-token loss is a function of (log-softmax rows, row signals)
#: and an entry here; the four below also have their gradient written out (``with_gradient``), for speed
TOKEN_TERMS: dict[str, TokenTerm] = {
    LOGP: TokenTerm((TARGET_IDS,), _target_logp, _logp_with_gradient),  # token_logprobs
    KD: TokenTerm((TOPK_IDS, KD_TEACHER), _kd_from_logsoftmax, _kd_with_gradient),  # kd_tail_kl
    KD_SAMPLED: TokenTerm((TOPK_IDS, KD_TEACHER, TAIL_SAMPLE_IDS, KD_SAMPLE_TEACHER), _kd_sampled_from_logsoftmax,
                          _kd_sampled_with_gradient),  # kd_sampled_kl
    ADPA: TokenTerm((TOPK_IDS, ADVANTAGE), _adpa_from_logsoftmax, _adpa_with_gradient),  # adpa_token_loss
    ULD: TokenTerm((ULD_TEACHER,), _uld_from_logsoftmax),  # uld_loss (autograd's gradient)
    CHUNK: TokenTerm((TARGET_IDS,), _target_logp, _logp_with_gradient),  # token_logprobs, on chunk rows
}


def _row_signal(values: torch.Tensor) -> torch.Tensor:
    """Ids as int64 (for gather), other signals detached: the student's rows are the only thing trained."""
    return values.detach() if values.is_floating_point() else values.long()


def _chunk_selection(mask: Optional[torch.Tensor], lo: int, hi: int, device) -> object:
    """Which rows of the chunk ``[lo, hi)`` a term computes: None (all), a slice (a contiguous run), an index
    tensor (on ``device``), or ``()`` (none). ``mask``: [R] bool on the CPU, or None (every row)."""
    if mask is None:
        return None
    local = mask[lo:hi]
    index = local.nonzero().squeeze(1)
    if index.numel() == local.numel():
        return None
    if index.numel() == 0:
        return ()
    first, last = int(index[0]), int(index[-1])
    if last - first + 1 == index.numel():
        return slice(first, last + 1)
    return index.to(device)


def _on_selection(selection, values: torch.Tensor) -> torch.Tensor:
    return values if selection is None else values[selection]


def _selection_index(selection, rows: int, device) -> torch.Tensor:
    """The selected rows of a chunk of ``rows`` as an index tensor (``selection`` as :func:`_chunk_selection` gives)."""
    if selection is None:
        return torch.arange(rows, device=device)
    if isinstance(selection, slice):
        return torch.arange(selection.start, selection.stop, device=device)
    return selection


@dataclass
class _Evaluated:
    """One term on one chunk, after the chunk's first forward: its value on every row of the chunk (0 off its rows),
    its rows as an index, and what its gradient needs: the analytic gradient, or (autograd) the term's signals on
    its rows, to differentiate ``value`` again in backward."""

    value: torch.Tensor
    index: Optional[torch.Tensor] = None  # None: no row of this chunk
    gradient: Optional[Callable[[torch.Tensor], LogSoftmaxGradient]] = None
    signals: tuple[torch.Tensor, ...] = ()


class _ChunkPlan:
    """The terms of one chunk and the rows of each: shared by the chunk's forward and by the checkpoint's
    recomputation of it, which takes the values (and what their gradients need) from the first forward
    instead of computing them again; it only needs the log-softmax back."""

    def __init__(self, terms: Sequence[TokenTerm], selections: tuple, analytic: bool = True):
        self.terms, self.selections, self.analytic = terms, selections, analytic
        self.done: Optional[list[_Evaluated]] = None  # after the first forward

    def evaluate(self, log_probs: torch.Tensor, by_name: Mapping[str, torch.Tensor]) -> list[_Evaluated]:
        rows, done = log_probs.shape[0], []
        for term, selection in zip(self.terms, self.selections):
            if isinstance(selection, tuple):  # no row of this chunk
                done.append(_Evaluated(log_probs.new_zeros(rows)))
                continue
            selected = _on_selection(selection, log_probs)
            signals = tuple(_on_selection(selection, by_name[signal]) for signal in term.reads)
            index = _selection_index(selection, rows, log_probs.device)
            if self.analytic and term.with_gradient is not None:
                value, gradient = term.with_gradient(selected, *signals)
                evaluated = _Evaluated(value, index, gradient=gradient)
            else:
                evaluated = _Evaluated(term.value(selected, *signals), index, signals=signals)
            if selection is not None:
                evaluated.value = log_probs.new_zeros(rows).index_copy_(0, index, evaluated.value.to(log_probs.dtype))
            done.append(evaluated)
        return done


def _autograd_gradient(term: TokenTerm, log_probs: torch.Tensor, signals: tuple, grad: torch.Tensor) -> torch.Tensor:
    """[c, V] ``d sum(grad * term.value(log_probs, *signals)) / d log_probs``, by autograd."""
    with torch.enable_grad():
        leaf = log_probs.detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(term.value(leaf, *signals), leaf, grad, allow_unused=True)
    return torch.zeros_like(leaf) if gradient is None else gradient


#: beyond this, ``exp(log|coef| - logmass)`` of a tail bin leaves the rest of the row's scale below float64's
#: precision (and exp itself near its range)
_LOG_SCALE_EXACT = 600.0


class _TermsOfLogits(torch.autograd.Function):
    """The per-token terms of a chunk of logits [c, V], with one [c, V] gradient written in place.

    With ``g = d(sum of the terms, each times its gradient) / d log_softmax`` and ``p = softmax(logits)``,
    the gradient of the logits is ``g - p * sum(g)`` per row. A term without an analytic gradient adds
    autograd's ``d value / d log_softmax`` ([c, V], :func:`_autograd_gradient`) to ``g``. The analytic
    ones (:class:`LogSoftmaxGradient`) are 0 outside the ids of the terms or (on a row with a tail
    bin) ``coef * exp(log_softmax - logmass)``, so there their gradient is ``p * scale`` with one scale per row:
    ``-sum(g)``, plus ``coef * exp(-logmass)`` on a tail row (``sum(g)`` is known without a pass over
    the vocabulary: a tail's entries add up to ``coef``). The backward therefore makes one pass,
    ``exp(log_softmax + log|scale|) * sign(scale)`` (in log space: a near-certain student's tail has
    ``exp(-logmass)`` far beyond float range, its product with ``p`` is not), written into the saved
    log-softmax itself, then sets the tail row's ids, adds each analytic term's entries and each
    autograd term's gradient. Autograd alone would build a zero-filled [c, V] gradient for every
    gather and slice and add them up.

    Only for :func:`chunked_token_terms`, under its checkpoint: the log-softmax the backward
    overwrites is the checkpoint's recomputation, made anew for each backward.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, plan: _ChunkPlan, reads: tuple, *signal_chunks: torch.Tensor):
        log_probs = torch.log_softmax(logits, dim=-1)
        first = plan.done is None
        if first:
            plan.done = plan.evaluate(log_probs, dict(zip(reads, signal_chunks)))
        ctx.plan = plan
        ctx.save_for_backward(log_probs)
        # the recomputation's outputs are thrown away; fresh tensors leave the first forward's ones alone
        return tuple(term.value if first else term.value.clone() for term in plan.done)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        (log_probs,) = ctx.saved_tensors
        total = torch.zeros(log_probs.shape[0], dtype=torch.float64, device=log_probs.device)  # sum_v g[r, v]
        entries, tail, dense = [], None, []
        plan = ctx.plan
        for term, selection, evaluated, grad in zip(plan.terms, plan.selections, plan.done, grads):
            index = evaluated.index
            if index is None or grad is None:
                continue
            grad = grad.index_select(0, index).to(log_probs.dtype)
            if evaluated.gradient is None:  # autograd's, before the log-softmax becomes the gradient
                gradient = _autograd_gradient(term, _on_selection(selection, log_probs), evaluated.signals, grad)
                dense.append((index, gradient))
                total.index_add_(0, index, gradient.sum(-1).to(torch.float64))
                continue
            parts = evaluated.gradient(grad)
            for ids, values in parts.at:
                entries.append((index, ids, values))
                total.index_add_(0, index, values.sum(-1).to(torch.float64))
            if parts.tail is not None:
                if tail is not None:
                    raise ValueError("two per-token terms with a tail bin in one pass; compute them separately")
                ids, coef, logmass = parts.tail
                coef = torch.where(torch.isfinite(logmass), coef, torch.zeros_like(coef))  # no tail: nothing
                total.index_add_(0, index, coef.to(torch.float64))
                tail = (index, ids, coef, logmass)
        log_scale, sign = total.abs().log(), -total.sign()
        if tail is not None:
            index, ids, coef, logmass = tail
            coef64 = coef.to(torch.float64)
            log_tail = torch.where(coef64 != 0, coef64.abs().log() - logmass.to(torch.float64),
                                   torch.full_like(coef64, float("-inf")))
            exact = coef64.sign() * log_tail.clamp(max=_LOG_SCALE_EXACT).exp() - total[index]
            big = log_tail > _LOG_SCALE_EXACT
            log_scale[index] = torch.where(big, log_tail, exact.abs().log())
            sign[index] = torch.where(big, coef64.sign(), exact.sign())
            at_ids = log_probs.index_select(0, index).gather(-1, ids)  # before log_probs becomes the gradient
        dtype = log_probs.dtype
        grad_logits = log_probs.add_(log_scale.to(dtype).unsqueeze(-1)).exp_().mul_(sign.to(dtype).unsqueeze(-1))
        if tail is not None:  # the tail's ids are not the tail's: only -p * sum(g) there
            rows = index.unsqueeze(-1).expand_as(ids)
            grad_logits.index_put_((rows, ids), -at_ids.exp() * total[index].to(dtype).unsqueeze(-1))
        for index, ids, values in entries:
            grad_logits.index_put_((index.unsqueeze(-1).expand_as(ids), ids), values.to(dtype), accumulate=True)
        for index, gradient in dense:
            grad_logits.index_add_(0, index, gradient.to(dtype))
        return (grad_logits, None, None) + (None,) * (len(ctx.needs_input_grad) - 3)


def chunked_token_terms(
    hidden: torch.Tensor,
    logits_of: Callable[[torch.Tensor], torch.Tensor],
    names: Sequence[str],
    signals: Mapping[str, torch.Tensor],
    chunk_size: int = 1024,
    rows: Optional[Mapping[str, torch.Tensor]] = None,
    analytic: bool = True,
) -> dict[str, torch.Tensor]:
    """The :data:`TOKEN_TERMS` named ``names`` on every row, without materialising [R, V] logits.

    The student's full-vocabulary log-softmax is the largest tensor of
    training. This computes, per chunk of ``chunk_size`` rows,
    ``logits_of(hidden_chunk)`` (the output layer, e.g.
    :meth:`lm.head.OutputLayer.logits`, soft-capping and scale included), one
    log-softmax (upcast to >= fp32; the output layer itself runs in the
    inputs' dtype), and from it each named term's value (``TokenTerm.value``): ``"logp"`` is
    :func:`token_logprobs`, ``"kd"`` :func:`kd_tail_kl`, ``"adpa"``
    :func:`adpa_token_loss`.

    ``rows`` (optional): ``{name: [R] bool}``, the rows on which that term is
    computed (a name not in it: every row). One pass over the chunks serves every
    term, each on its own rows of each chunk, so the output layer (and, in
    backward, the gradient of its weight) runs once per row whatever the terms;
    a term's value is 0 on the other rows, with no gradient. Keep each term's rows
    together along R (e.g. rows sorted by the set of terms they need): a term's
    rows within a chunk are then a slice (a view of the log-softmax, no copy),
    otherwise they are gathered.

    Each chunk runs under ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``
    so its [chunk, V] logits are recomputed in backward instead of stored (the
    terms' values are not: the recomputation takes them from the first forward);
    the backward is :class:`_TermsOfLogits`' own, one [chunk, V] gradient for
    every term: each term's ``with_gradient`` where it has one, autograd's gradient of its
    ``value`` otherwise (every term, with ``analytic=False``: the reference the tests hold
    the analytic gradients to). Values and gradients equal the unchunked functions applied
    to ``logits_of(hidden)`` (on each term's rows).

    Shapes: ``hidden`` [R, H]; ``signals``: at least every row signal the
    terms read (``TOKEN_TERMS[name].reads``), [R, ...] each, ids cast to
    int64, the others detached; a signal's values on rows that no term reading it
    computes are never used. Returns ``{name: [R]}``.
    """
    unknown = [name for name in names if name not in TOKEN_TERMS]
    if unknown:
        raise ValueError(f"no per-token term {', '.join(unknown)}; known: {', '.join(TOKEN_TERMS)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    names = list(dict.fromkeys(names))
    terms = [TOKEN_TERMS[name] for name in names]
    reads = list(dict.fromkeys(signal for term in terms for signal in term.reads))
    missing = [signal for signal in reads if signal not in signals]
    if missing:
        raise ValueError(f"{', '.join(names)} read the row signal(s) {', '.join(missing)}, which were not given")
    row_signals = [_row_signal(signals[signal]) for signal in reads]
    masks = [None if rows is None or rows.get(name) is None else rows[name].detach().to("cpu", torch.bool)
             for name in names]
    for name, mask in zip(names, masks):
        if mask is not None and mask.shape != (hidden.shape[0],):
            raise ValueError(f"rows of {name!r}: shape {tuple(mask.shape)}, expected ({hidden.shape[0]},)")

    def chunk_terms(plan: _ChunkPlan, hidden_chunk: torch.Tensor, *signal_chunks: torch.Tensor) -> tuple:
        return _TermsOfLogits.apply(_upcast(logits_of(hidden_chunk)), plan, tuple(reads), *signal_chunks)

    pieces: list[tuple[torch.Tensor, ...]] = []
    for lo in range(0, max(hidden.shape[0], 1), chunk_size):
        hi = min(lo + chunk_size, hidden.shape[0])
        plan = _ChunkPlan(terms, tuple(_chunk_selection(mask, lo, hi, hidden.device) for mask in masks), analytic)
        chunk = (hidden[lo:hi], *(values[lo:hi] for values in row_signals))
        if torch.is_grad_enabled():
            pieces.append(checkpoint(chunk_terms, plan, *chunk, use_reentrant=False))
        else:
            pieces.append(chunk_terms(plan, *chunk))
    return {name: torch.cat([piece[i] for piece in pieces]) for i, name in enumerate(names)}
