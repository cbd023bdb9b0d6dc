"""Sequences <-> a set's base arrays: the CSR packing of :mod:`store.format` and its inverse.

:func:`base_arrays` packs ``(example_index, role, input_ids, prompt_length)``
tuples (and, for sampled sets, ``(example_index, size)`` groups) into the arrays
a set's base section holds; :func:`split_sequences` gives back the sequences
and prompt lengths from them, as :func:`store.stream.load_part` does for whole
examples.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import format as fmt

__all__ = ["base_arrays", "split_sequences"]


def base_arrays(sequences: Sequence[tuple[int, int, np.ndarray, int]], *,
                groups: Sequence[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Base arrays of a set from (example_index, role, input_ids, prompt_length) tuples, in order.

    ``groups``: (example_index, number of sequences) per group, for the ``samples``
    set; the groups' sequences must be consecutive in ``sequences``.
    """
    lengths = np.array([len(ids) for _, _, ids, _ in sequences], dtype=np.int64)
    prompt_lengths = np.array([p for _, _, _, p in sequences], dtype=np.int32)
    response_lengths = (lengths - prompt_lengths).astype(np.int32)
    ids = (np.concatenate([np.asarray(s[2], dtype=np.int64) for s in sequences]) if len(sequences)
           else np.zeros(0, np.int64))
    token_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    loss_mask = np.zeros(int(lengths.sum()), dtype=bool)
    for s, prompt_length in enumerate(prompt_lengths):
        loss_mask[token_offsets[s] + prompt_length: token_offsets[s + 1]] = True
    arrays = {
        fmt.ARRAY_EXAMPLE_INDEX: np.array([e for e, _, _, _ in sequences], dtype=np.int64),
        fmt.ARRAY_ROLE: np.array([r for _, r, _, _ in sequences], dtype=np.int8),
        fmt.ARRAY_PROMPT_LENGTH: prompt_lengths,
        fmt.ARRAY_RESPONSE_LENGTH: response_lengths,
        fmt.ARRAY_TOKEN_OFFSETS: token_offsets,
        fmt.ARRAY_RESPONSE_OFFSETS: np.concatenate([[0], np.cumsum(response_lengths)]).astype(np.int64),
        fmt.ARRAY_INPUT_IDS: ids,
        fmt.ARRAY_LOSS_MASK: loss_mask,
    }
    if groups is not None:
        sizes = np.array([n for _, n in groups], dtype=np.int64)
        arrays[fmt.ARRAY_GROUP_OFFSETS] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[fmt.ARRAY_GROUP_EXAMPLE_INDEX] = np.array([e for e, _ in groups], dtype=np.int64)
    return arrays


def split_sequences(base: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    """(token ids of each sequence, prompt length of each) from a set's base arrays."""
    offsets = base[fmt.ARRAY_TOKEN_OFFSETS]
    ids = base[fmt.ARRAY_INPUT_IDS]
    return ([ids[offsets[s]:offsets[s + 1]] for s in range(len(offsets) - 1)],
            [int(p) for p in base[fmt.ARRAY_PROMPT_LENGTH]])
