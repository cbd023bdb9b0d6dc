"""From store examples to tensors: token-budget batching and collation.

A :class:`Batch` holds B sequences padded to the longest (right padding) and the
response rows of all of them flattened along one axis, in the store's own
layout: response row ``r`` belongs to sequence ``resp_seq[r]`` and its logits are
the student's at position ``resp_pos[r]`` of that sequence (the position just
before the token it predicts). Signals from the store keep their names
(``"teacher/topk_logp"``); rows of sequences whose set lacks a signal are zero
and flagged false in ``has[name]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch

from store import Example
from store import format as fmt

SET_CODES = {name: i for i, name in enumerate(fmt.SEQUENCE_SETS)}


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L] long, right-padded with pad_id
    attention_mask: torch.Tensor  # [B, L] long
    seq_role: torch.Tensor  # [B] long, store role codes
    seq_set: torch.Tensor  # [B] long, SET_CODES
    seq_example: torch.Tensor  # [B] long, index into ``examples``
    seq_group_pos: torch.Tensor  # [B] long, position within its group (samples), else -1
    resp_seq: torch.Tensor  # [R] long, sequence of each response row
    resp_pos: torch.Tensor  # [R] long, position whose logits predict the row's token
    resp_target: torch.Tensor  # [R] long, the response token itself
    response: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [R, ...]
    scalars: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [B]
    has: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [R] or [B] bool
    examples: list[Example] = field(default_factory=list)

    @property
    def num_sequences(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_response_tokens(self) -> int:
        return int(self.resp_seq.shape[0])

    def to(self, device: str | torch.device) -> "Batch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return Batch(
            move(self.input_ids), move(self.attention_mask), move(self.seq_role), move(self.seq_set),
            move(self.seq_example), move(self.seq_group_pos), move(self.resp_seq), move(self.resp_pos),
            move(self.resp_target),
            {k: move(v) for k, v in self.response.items()},
            {k: move(v) for k, v in self.scalars.items()},
            {k: move(v) for k, v in self.has.items()},
            self.examples,
        )

    def sequences_where(self, sequence_set: str, role: int | None = None) -> torch.Tensor:
        keep = self.seq_set == SET_CODES[sequence_set]
        if role is not None:
            keep &= self.seq_role == role
        return keep


def token_budget_batches(examples: Iterable[Example], batch_tokens: int) -> Iterator[list[Example]]:
    """Group examples so each batch holds at most ``batch_tokens`` tokens (padding counted).

    An example larger than the budget forms a batch alone rather than being dropped.
    """
    batch: list[Example] = []
    longest = 0
    count = 0
    for example in examples:
        ex_longest = max(int(s.input_ids.shape[0]) for s in example.sequences)
        ex_count = len(example.sequences)
        new_longest, new_count = max(longest, ex_longest), count + ex_count
        if batch and new_longest * new_count > batch_tokens:
            yield batch
            batch, longest, count = [], 0, 0
            new_longest, new_count = ex_longest, ex_count
        batch.append(example)
        longest, count = new_longest, new_count
    if batch:
        yield batch


def collate(examples: list[Example], pad_id: int = 0) -> Batch:
    sequences = [(i, s) for i, ex in enumerate(examples) for s in ex.sequences]
    seqs = [s for _, s in sequences]
    B = len(seqs)
    lengths = np.fromiter((s.input_ids.shape[0] for s in seqs), dtype=np.int64, count=B)
    prompt_len = np.fromiter((s.prompt_length for s in seqs), dtype=np.int64, count=B)
    L = int(lengths.max())
    # right padding in one vectorised assignment: row-major order of the mask is the
    # order of the concatenated sequences
    valid = np.arange(L)[None, :] < lengths[:, None]
    input_ids = np.full((B, L), pad_id, dtype=np.int64)
    input_ids[valid] = np.concatenate([s.input_ids for s in seqs])
    attention = valid.astype(np.int64)
    resp_len = lengths - prompt_len
    resp_seq = np.repeat(np.arange(B), resp_len)
    starts = np.cumsum(resp_len) - resp_len
    within = np.arange(resp_seq.shape[0]) - np.repeat(starts, resp_len)
    resp_pos = np.repeat(prompt_len, resp_len) + within - 1
    resp_target = input_ids[resp_seq, resp_pos + 1]

    response, has_resp = {}, {}
    names = {name for s in seqs for name in s.response}
    for name in sorted(names):
        flags = np.fromiter((name in s.response for s in seqs), dtype=bool, count=B)
        sample = next(s.response[name] for s in seqs if name in s.response)
        out_dtype = np.int64 if sample.dtype.kind in "iu" else np.float32
        if flags.all():
            parts = [s.response[name] for s in seqs]
        else:
            parts = [s.response[name] if flag else np.zeros((resp_len[b],) + sample.shape[1:], dtype=sample.dtype)
                     for b, (s, flag) in enumerate(zip(seqs, flags))]
        # concatenate straight into the tensor's dtype: one pass over the data
        values = np.concatenate(parts, dtype=out_dtype, casting="unsafe")
        response[name] = torch.from_numpy(values)
        has_resp[name] = torch.from_numpy(np.repeat(flags, resp_len))

    scalars, has_seq = {}, {}
    for name in sorted({name for s in seqs for name in s.scalars}):
        scalars[name] = torch.tensor([s.scalars.get(name, 0.0) for s in seqs], dtype=torch.float32)
        has_seq[name] = torch.tensor([name in s.scalars for s in seqs])

    group_pos = [s.role - fmt.ROLE_SAMPLE_BASE if s.role >= fmt.ROLE_SAMPLE_BASE else -1 for s in seqs]

    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        seq_role=torch.tensor([s.role for s in seqs], dtype=torch.long),
        seq_set=torch.tensor([SET_CODES[s.sequence_set] for s in seqs], dtype=torch.long),
        seq_example=torch.tensor([i for i, _ in sequences], dtype=torch.long),
        seq_group_pos=torch.tensor(group_pos, dtype=torch.long),
        resp_seq=torch.from_numpy(resp_seq),
        resp_pos=torch.from_numpy(resp_pos),
        resp_target=torch.from_numpy(resp_target),
        response=response,
        scalars=scalars,
        has={**has_resp, **has_seq},
        examples=examples,
    )
