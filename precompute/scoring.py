"""What a model computes for a batch of sequences: the numbers the store keeps.

:func:`score_sequences` runs one model over many (prompt + response) token
sequences in token-budget batches of length-sorted sequences and returns, per
sequence and per response token, any of:

- the model's top-K next-token ids and log-probs (normalised over the whole
  vocabulary), taken on the device, with the log of the mass outside them
  (a logsumexp over every other id of the full log-softmax: exact however
  small, which ``log(1 - sum(top-K))`` is not); with ``top_p < 1`` an adaptive
  K per row (:func:`kept_counts`: the fewest ids whose mass reaches ``top_p``,
  K the cap), the entries past it padded (:func:`pad_past_count`) and the tail
  taken outside the kept ids only;
- with ``tail_uniforms``, S ids per row drawn from its distribution outside the
  kept top-K (:func:`draw_tail_samples`: inverse CDF in float64 at uniforms the
  caller draws per part and row, so the draws do not depend on batching, chunks
  or device), and their log-probs; ``top_k = 0`` keeps no top-K, the tail then
  being the whole vocabulary (a pure sampled store);
- its log-probs at ids given per row (the reference model at the teacher's top-K);
- the log-prob of the token actually there, and its sum over the response.

Only the response rows go through the output layer: the decoder runs over every
token, then the output layer (:mod:`lm.head`, soft-capping included) is applied
to the hidden states of the positions that predict response tokens, in row
chunks, so a [tokens, vocabulary] tensor never exists for the prompt.
:func:`lm.head.check_split` proves on real inputs that this equals the model's
own logits before a pass relies on it. :func:`scored_arrays` turns the results
into a section's arrays.

With ``--engine vllm`` a teacher's top-K comes from the engine's prompt
log-probs instead (:func:`score_with_engine`, :meth:`lm.engines.VllmEngine.prompt_topk`),
its tail from what they leave; the other passes (target log-probs and sums of the
student's initial model, the reference at the teacher's ids) stay on this path.

The greedy responses of ADPA's released recipe are generated elsewhere
(:func:`lm.generate.generate_greedy`, shared with ``train evaluate``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from lm.head import split_model
from lm.options import BATCH_TOKENS
from store import format as fmt
from store.format import LOGP_FLOOR

HEAD_CHUNK_ROWS = 1024


@dataclass
class Scored:
    target_logp: np.ndarray  # [r] float32
    logp_sum: float
    topk_ids: np.ndarray | None = None  # [r, K] int64
    topk_logp: np.ndarray | None = None  # [r, K] float32
    at_ids_logp: np.ndarray | None = None  # [r, K'] float32
    tail_logp: np.ndarray | None = None  # [r] float32: log of the mass outside the kept topk_ids (with top-K)
    topk_count: np.ndarray | None = None  # [r] int64: kept entries of each row (top_p < 1 only)
    tail_sample_ids: np.ndarray | None = None  # [r, S] int64: draws outside the kept ids (with tail_uniforms)
    tail_sample_logp: np.ndarray | None = None  # [r, S] float32: their log-probs


#: what entries past a row's kept count hold (``store.format.DESCRIPTION["adaptive_k"]``)
PAD_ID = 0
PAD_LOGP = LOGP_FLOOR  # the quantiser's floor: padding costs next to nothing once compressed


def kept_counts(topk_logp: torch.Tensor, top_p: float) -> torch.Tensor:
    """[c] int64: per row of descending log-probs ``topk_logp`` [c, K], the smallest k whose cumulative mass
    ``sum_{j < k} exp(topk_logp[j])`` is >= ``top_p``, capped at K (K when the K hold less than ``top_p``).

    The sums are taken in float64 whatever the model's dtype (K numbers per row), so the rule does not
    depend on the device's float32 summation order.
    """
    cumulative = topk_logp.double().exp().cumsum(dim=-1)
    return ((cumulative < top_p).sum(dim=-1) + 1).clamp(max=topk_logp.shape[-1])


def pad_past_count(values: np.ndarray, counts: np.ndarray, pad) -> np.ndarray:
    """``values`` [r, K] with ``pad`` in every entry at or past its row's ``counts`` [r] (a copy)."""
    keep = np.arange(values.shape[1])[None, :] < np.asarray(counts)[:, None]
    return np.where(keep, values, np.asarray(pad, dtype=values.dtype))


def tail_logmass_(logp: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """[c] log of the probability mass outside ``topk_ids`` [c, K] of normalised log-probs ``logp`` [c, V].

    ``logsumexp`` over the other ids, computed in place: ``logp`` is overwritten
    (no second [c, V] tensor on the device). ``-inf`` when no id is outside.
    """
    logp.scatter_(-1, topk_ids, float("-inf"))
    top = logp.amax(dim=-1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return top + logp.sub_(top.unsqueeze(-1)).exp_().sum(dim=-1).log()


#: rows of a chunk whose tail samples are drawn at a time: the float64 [rows, V] weights and their cumulative
#: sums stay near 25 MB each at V = 49152
SAMPLE_BLOCK_ROWS = 64


def draw_tail_samples(logp: torch.Tensor, excluded_ids: torch.Tensor,
                      uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """S draws per row from the distribution of normalised log-probs ``logp`` [c, V] restricted to the ids outside
    ``excluded_ids`` [c, K] (repeated ids count once; K may be 0), at ``uniforms`` [c, S] in [0, 1).

    Inverse CDF, exact up to float64 rounding: with weights ``w = exp(logp - max of logp outside)`` outside the
    excluded ids and 0 at them (float64; proportional to ``q = p / m``, the largest 1, so none underflows as a
    whole), draw ``i`` of row ``r`` is the first id ``j`` (in id order) whose cumulative sum of ``w`` exceeds
    ``uniforms[r, i]`` times the row's total: id ``j`` comes out with probability ``q_j`` for uniform draws, and
    never an excluded id (its weight is 0). The draws depend on the uniforms alone, not on how rows are batched.
    Returns (ids [c, S] int64, their ``logp`` [c, S] in ``logp``'s dtype); a row with no id outside (K = V) gets
    :data:`PAD_ID` and :data:`PAD_LOGP` (``store.format.DESCRIPTION["tail_samples"]``). Two float64 buffers of
    :data:`SAMPLE_BLOCK_ROWS` rows are reused from block to block (a fresh one per block costs more than the
    arithmetic: page faults).
    """
    rows, samples = uniforms.shape
    ids = torch.empty((rows, samples), dtype=torch.long, device=logp.device)
    values = torch.empty((rows, samples), dtype=logp.dtype, device=logp.device)
    size = (min(rows, SAMPLE_BLOCK_ROWS), logp.shape[-1])
    weights = torch.empty(size, dtype=torch.float64, device=logp.device)
    cumulative = torch.empty(size, dtype=torch.float64, device=logp.device)
    for lo in range(0, rows, SAMPLE_BLOCK_ROWS):
        block = slice(lo, lo + SAMPLE_BLOCK_ROWS)
        n = min(SAMPLE_BLOCK_ROWS, rows - lo)
        w, c = weights[:n], cumulative[:n]
        w.copy_(logp[block]).scatter_(-1, excluded_ids[block].long(), float("-inf"))
        top = w.amax(dim=-1, keepdim=True)
        w.sub_(torch.where(torch.isfinite(top), top, torch.zeros_like(top))).exp_()
        torch.cumsum(w, dim=-1, out=c)
        targets = uniforms[block].to(device=logp.device, dtype=torch.float64) * c[:, -1:]
        drawn = torch.searchsorted(c, targets, right=True).clamp_(max=logp.shape[-1] - 1)
        empty = (c[:, -1] == 0).unsqueeze(-1)  # no id outside the excluded ones
        ids[block] = torch.where(empty, torch.full_like(drawn, PAD_ID), drawn)
        values[block] = torch.where(empty, torch.full_like(values[block], PAD_LOGP), logp[block].gather(-1, drawn))
    return ids, values


def token_budget_order(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Indices grouped into batches of length-sorted sequences (padded size <= budget)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, current, longest = [], [], 0
    for i in order:
        n = lengths[i]
        if current and max(longest, n) * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def right_padded(seqs: Sequence[np.ndarray], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences padded on the right to the longest, with their attention mask, on ``device``."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.from_numpy(np.asarray(seq, dtype=np.int64))
        mask[row, : len(seq)] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def score_sequences(
    model,
    sequences: Sequence[np.ndarray],
    prompt_lengths: Sequence[int],
    *,
    top_k: int | None = None,
    top_p: float = 1.0,
    at_ids: Sequence[np.ndarray] | None = None,
    tail_uniforms: Sequence[np.ndarray] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    pad_id: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Scored]:
    """Score every sequence's response tokens with ``model`` (see module docstring).

    ``top_p < 1`` (with ``top_k``): an adaptive K, ``Scored.topk_count`` the kept
    entries of each row (:func:`kept_counts`), the others padded with :data:`PAD_ID`
    and :data:`PAD_LOGP`, the tail the log mass outside the kept ids. ``top_p >= 1``:
    all K kept, no count. ``at_ids[s]`` is ``[r_s, K']``: ids at which to read the
    log-probs of each response row of sequence ``s``. ``tail_uniforms[s]`` is
    ``[r_s, S]`` (with ``top_k``): uniforms in [0, 1) at which each response row's S
    tail samples are drawn (:func:`draw_tail_samples`, outside the kept ids).
    ``top_k = 0``: no top-K, the tail the whole vocabulary. ``on_batch(tokens)``
    reports progress.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: must be in (0, 1]")
    with_topk = top_k is not None  # 0: no id kept, the tail is the whole vocabulary
    if tail_uniforms is not None and not with_topk:
        raise ValueError("tail samples are drawn outside a top-K: give top_k (0 for the whole vocabulary)")
    adaptive = bool(top_k) and top_p < 1
    device = next(model.parameters()).device
    base, head = split_model(model)
    lengths = [len(s) for s in sequences]
    for seq, prompt_length in zip(sequences, prompt_lengths):
        if prompt_length < 1 or prompt_length >= len(seq):
            raise ValueError(f"sequence of {len(seq)} tokens with prompt length {prompt_length}: needs >= 1 prompt "
                             f"and >= 1 response token")
    results: list[Scored | None] = [None] * len(sequences)
    for batch in token_budget_order(lengths, batch_tokens):
        ids, mask = right_padded([sequences[i] for i in batch], pad_id, device)
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        # one output-layer row per response token: its sequence's row in the batch, the position predicting it
        row_sequence, row_position, response_rows = [], [], []
        start = 0
        for row, i in enumerate(batch):
            prompt_length, length = int(prompt_lengths[i]), lengths[i]
            row_sequence.append(torch.full((length - prompt_length,), row, dtype=torch.long))
            row_position.append(torch.arange(prompt_length - 1, length - 1))
            response_rows.append(slice(start, start + length - prompt_length))
            start += length - prompt_length
        # indices on the hidden states' device: with a model sharded over GPUs it is the last layer's
        row_sequence = torch.cat(row_sequence).to(hidden.device)
        row_position = torch.cat(row_position).to(hidden.device)
        targets = ids.to(hidden.device)[row_sequence, row_position + 1]
        picked = hidden[row_sequence, row_position]
        if at_ids is not None:
            given = torch.from_numpy(np.concatenate([np.asarray(at_ids[i], dtype=np.int64) for i in batch]))
        if tail_uniforms is not None:
            uniforms = torch.from_numpy(np.concatenate([np.asarray(tail_uniforms[i], dtype=np.float64)
                                                        for i in batch]))
        target_logp, topk_ids, topk_logp, at_ids_logp, tails, counts = [], [], [], [], [], []
        sample_ids, sample_logp = [], []
        for first in range(0, picked.shape[0], HEAD_CHUNK_ROWS):
            chunk = slice(first, first + HEAD_CHUNK_ROWS)
            logp = torch.log_softmax(head.logits(picked[chunk]), dim=-1)
            target_logp.append(logp.gather(-1, targets[chunk, None].to(logp.device))[:, 0])
            if with_topk:
                top_logp, top_ids = logp.topk(top_k, dim=-1)
                topk_ids.append(top_ids)
                topk_logp.append(top_logp)
            if at_ids is not None:
                at_ids_logp.append(logp.gather(-1, given[chunk].to(logp.device)))
            # the tail last: tail_logmass_ overwrites logp
            if adaptive:  # the tail outside the kept ids: padding repeats the first id, which counts once
                kept = kept_counts(top_logp, top_p)
                counts.append(kept)
                is_kept = torch.arange(top_k, device=top_ids.device) < kept.to(top_ids.device).unsqueeze(-1)
                outside_of = torch.where(is_kept, top_ids, top_ids[:, :1])
            elif with_topk:
                outside_of = top_ids
            if tail_uniforms is not None:  # before tail_logmass_ overwrites logp
                drawn = draw_tail_samples(logp, outside_of, uniforms[chunk])
                sample_ids.append(drawn[0])
                sample_logp.append(drawn[1])
            if with_topk:
                tails.append(tail_logmass_(logp, outside_of))
        target_logp = torch.cat(target_logp).cpu().numpy()
        if with_topk:
            topk_ids = torch.cat(topk_ids).cpu().numpy()
            topk_logp = torch.cat(topk_logp).cpu().numpy()
            tails = torch.cat(tails).cpu().numpy()
        if tail_uniforms is not None:
            sample_ids = torch.cat(sample_ids).cpu().numpy()
            sample_logp = torch.cat(sample_logp).float().cpu().numpy()
        if adaptive:
            counts = torch.cat(counts).cpu().numpy()
            topk_ids = pad_past_count(topk_ids, counts, PAD_ID)
            topk_logp = pad_past_count(topk_logp, counts, PAD_LOGP)
        if at_ids is not None:
            at_ids_logp = torch.cat(at_ids_logp).cpu().numpy()
        for rows, i in zip(response_rows, batch):
            results[i] = Scored(
                target_logp=target_logp[rows],
                logp_sum=float(np.sum(target_logp[rows], dtype=np.float64)),
                topk_ids=topk_ids[rows] if with_topk else None,
                topk_logp=topk_logp[rows] if with_topk else None,
                at_ids_logp=at_ids_logp[rows] if at_ids is not None else None,
                tail_logp=tails[rows] if with_topk else None,
                topk_count=counts[rows] if adaptive else None,
                tail_sample_ids=sample_ids[rows] if tail_uniforms is not None else None,
                tail_sample_logp=sample_logp[rows] if tail_uniforms is not None else None,
            )
        if on_batch:
            on_batch(int(sum(lengths[i] for i in batch)))
    return results  # type: ignore[return-value]


def score_with_engine(engine, sequences: Sequence[np.ndarray], prompt_lengths: Sequence[int], *, top_k: int,
                      top_p: float = 1.0, on_batch: Callable[[int], None] | None = None) -> list[Scored]:
    """:func:`score_sequences`' top-K results from an engine's prompt log-probs (``--engine vllm``).

    The top-K ids, their log-probs and the actual token's log-prob are the
    engine's (float32). With ``top_p < 1`` the kept entries of each row are
    :func:`kept_counts`' as in the HF pass. The tail is what the kept entries
    leave, computed in float64 from those numbers: ``tail = 1 - sum exp(topk_logp)``,
    clipped to [0, 1], ``tail_logp = log(tail)`` (-inf where it clips to 0). It
    is not the HF pass's logsumexp over every other id: if each kept log-prob is
    off by at most ``delta``, each kept probability is off by at most
    ``p (e^delta - 1)``, so ``|d tail| <= (1 - tail) (e^delta - 1)``: an absolute
    bound, loose where the tail is far below ``delta`` (its log is then inexact).
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p {top_p}: must be in (0, 1]")
    adaptive = top_p < 1
    results = []
    for captured in engine.prompt_topk(sequences, prompt_lengths, top_k=top_k, on_batch=on_batch):
        ids, logp, target = captured.topk_ids, captured.topk_logp, captured.target_logp
        probs = np.exp(logp.astype(np.float64))
        counts = None
        if adaptive:
            counts = kept_counts(torch.from_numpy(logp), top_p).numpy()
            probs = np.where(np.arange(top_k)[None, :] < counts[:, None], probs, 0.0)
            ids, logp = pad_past_count(ids, counts, PAD_ID), pad_past_count(logp, counts, PAD_LOGP)
        tail = np.clip(1.0 - probs.sum(axis=-1), 0.0, 1.0)
        with np.errstate(divide="ignore"):
            tail_logp = np.log(tail).astype(np.float32)
        results.append(Scored(target_logp=target.astype(np.float32),
                              logp_sum=float(np.sum(target, dtype=np.float64)),
                              topk_ids=ids.astype(np.int64), topk_logp=logp.astype(np.float32), tail_logp=tail_logp,
                              topk_count=counts.astype(np.int64) if adaptive else None))
    return results


def scored_arrays(scored: list[Scored], *, topk: bool = False, at_ids: bool = False,
                  at_counts: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """A section's arrays from :func:`score_sequences`' results: target log-probs and sums, plus top-K
    and the tail log-mass outside it (``topk``, teacher sections: ``tail_logp``, see
    ``store.format.DESCRIPTION["tail"]``; ``topk_count`` where the top-K is adaptive, see ``"adaptive_k"``)
    or the log-probs at given ids (``at_ids``, the reference section), with :data:`PAD_LOGP` past each row's
    ``at_counts`` (the teacher's ``topk_count`` of the same rows, when it has one: padding, no id of its)."""
    def cat(values, width=None):
        if values:
            return np.concatenate(values)
        return np.zeros((0,) if width is None else (0, width), dtype=np.float32)

    arrays = {
        fmt.ARRAY_TARGET_LOGP: cat([s.target_logp for s in scored]).astype(np.float32),
        fmt.ARRAY_LOGP_SUM: np.array([s.logp_sum for s in scored], dtype=np.float32),
    }
    if topk:
        width = scored[0].topk_ids.shape[1] if scored else 1  # 0: a pure sampled store
        arrays[fmt.ARRAY_TOPK_IDS] = cat([s.topk_ids for s in scored], width).astype(np.int64)
        arrays[fmt.ARRAY_TOPK_LOGP] = cat([s.topk_logp for s in scored], width).astype(np.float32)
        arrays[fmt.ARRAY_TAIL_LOGP] = cat([s.tail_logp for s in scored]).astype(np.float32)
        adaptive = [s.topk_count is not None for s in scored]
        if any(adaptive):
            if not all(adaptive):
                raise ValueError("scored sequences mix an adaptive and a fixed top-K")
            arrays[fmt.ARRAY_TOPK_COUNT] = cat([s.topk_count for s in scored]).astype(np.uint16)
        sampled = [s.tail_sample_ids is not None for s in scored]
        if any(sampled):
            if not all(sampled):
                raise ValueError("scored sequences mix rows with and without tail samples")
            width = scored[0].tail_sample_ids.shape[1]
            arrays[fmt.ARRAY_TAIL_SAMPLE_IDS] = cat([s.tail_sample_ids for s in scored], width).astype(np.int64)
            arrays[fmt.ARRAY_TAIL_SAMPLE_LOGP] = cat([s.tail_sample_logp for s in scored], width).astype(np.float32)
    if at_ids:
        arrays[fmt.ARRAY_TOPK_LOGP] = cat([s.at_ids_logp for s in scored], 1).astype(np.float32)
        if at_counts is not None:
            arrays[fmt.ARRAY_TOPK_LOGP] = pad_past_count(arrays[fmt.ARRAY_TOPK_LOGP], at_counts, PAD_LOGP)
    return arrays
