"""Generation both sides need: a model's answers to prompts, cut at the first end-of-turn token.

``precompute`` generates the student's greedy answers (ADPA) and sampled groups
(PAD, CycleAlign); ``train evaluate`` generates a trained student's answers for
inspection or scoring by a rule. Both go through :func:`generate_in_batches`:
prompts left-padded, longest first, ``generate()`` told to stop at every
end-of-turn id (:func:`lm.chat.end_of_turn_ids`), each answer cut after the
first one, which is stored as the template's own end id.

:class:`HfEngine` is that path behind the engine interface of :mod:`lm.engines`
(``sample``, ``greedy``), which :class:`lm.vllm_engine.VllmEngine` implements too
(``--engine vllm``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

__all__ = ["left_padded", "cut_after_eos", "generate_in_batches", "generate_greedy", "PLAIN_SAMPLING", "HfEngine"]

#: generate()'s settings for plain ancestral sampling at a temperature and top-p: every other logits processor
#: off, whatever the model's generation_config says (``precompute sample``'s draws)
PLAIN_SAMPLING = dict(do_sample=True, top_k=0, min_p=None, typical_p=1.0, repetition_penalty=1.0,
                      no_repeat_ngram_size=0)


def left_padded(prompts: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts padded on the left (as generate() wants), with their attention mask."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), L), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.from_numpy(np.asarray(p, dtype=np.int64))
        mask[b, L - len(p):] = 1
    return ids, mask


def cut_after_eos(row: np.ndarray, eos: set[int], max_new_tokens: int, end_id: int | None = None) -> np.ndarray:
    """A generated row up to and including its first id in ``eos``; whatever follows (padding, or tokens
    generated past it) is dropped. With ``end_id`` that last id is written as ``end_id`` (the template's
    end-of-turn token, see :mod:`lm.chat`). A row without any is cut to ``max_new_tokens``."""
    cut = next((j for j, t in enumerate(row) if int(t) in eos), None)
    if cut is None:
        return row[:max_new_tokens]
    answer = row[: cut + 1].copy()
    if end_id is not None:
        answer[-1] = end_id
    return answer


def generate_in_batches(model, prompts: Sequence[np.ndarray], *, n: int, max_new_tokens: int,
                        eos_ids: Sequence[int], pad_id: int, batch_size: int, **decoding):
    """Yield (prompt indices, their n continuations each) per ``generate()`` call.

    Prompts go longest first, ``batch_size`` of them (times ``n`` rows) per call,
    left-padded; ``decoding`` holds generate()'s sampling settings. ``eos_ids``
    lists every id that ends an answer, the template's end-of-turn id first
    (:func:`lm.chat.end_of_turn_ids`): generate() stops at any of them, each
    answer is cut after its first one, which is stored as ``eos_ids[0]``.
    """
    ends = [int(e) for e in eos_ids]
    if not ends:
        raise ValueError("generate_in_batches: eos_ids is empty; pass lm.chat.end_of_turn_ids(tokenizer)")
    device = next(model.parameters()).device
    eos = set(ends)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    for b0 in range(0, len(order), batch_size):
        batch = order[b0:b0 + batch_size]
        ids, mask = left_padded([prompts[i] for i in batch], pad_id)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), num_beams=1,
                             num_return_sequences=n, max_new_tokens=max_new_tokens, eos_token_id=sorted(eos),
                             pad_token_id=pad_id, **decoding)
        new = gen[:, ids.shape[1]:].cpu().numpy()
        # generate() repeats each prompt n times in a row
        yield batch, [[cut_after_eos(new[b * n + k], eos, max_new_tokens, ends[0]) for k in range(n)]
                      for b in range(len(batch))]


@torch.inference_mode()
def generate_greedy(model, prompts: Sequence[np.ndarray], *, max_new_tokens: int, eos_ids: Sequence[int],
                    pad_id: int, batch_size: int = 16, on_batch: Callable[[int], None] | None = None
                    ) -> list[np.ndarray]:
    """One greedy continuation per prompt, cut after its first id of ``eos_ids`` (kept, written as
    ``eos_ids[0]``: see :func:`generate_in_batches`)."""
    out: list[np.ndarray | None] = [None] * len(prompts)
    for batch, answers in generate_in_batches(model, prompts, n=1, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                              pad_id=pad_id, batch_size=batch_size, do_sample=False,
                                              top_p=None, top_k=None, temperature=None):
        for i, (answer,) in zip(batch, answers):
            out[i] = answer
        if on_batch:
            on_batch(int(sum(len(a) for (a,) in answers)))
    return out  # type: ignore[return-value]


class HfEngine:
    """transformers' ``generate()`` behind the engine interface (:mod:`lm.engines`): ``--engine hf``, the default.

    ``sample`` seeds the global torch generator with ``seed`` and draws the
    prompts longest first, ``batch_size`` prompts (times n rows) per call: its
    draws depend on the batch size and the device, which the callers record.
    """

    name = "hf"

    def __init__(self, model, *, pad_id: int, batch_size: int = 16):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size

    @torch.inference_mode()
    def sample(self, prompts: Sequence[np.ndarray], *, n: int, temperature: float, top_p: float,
               max_new_tokens: int, seed: int, eos_ids: Sequence[int],
               on_batch: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
        """``n`` answers per prompt, each cut after its first id of ``eos_ids`` (written as ``eos_ids[0]``);
        ``on_batch(prompts done)``."""
        torch.manual_seed(seed)
        out: list[list[np.ndarray] | None] = [None] * len(prompts)
        for batch, drawn in generate_in_batches(self.model, prompts, n=n, max_new_tokens=max_new_tokens,
                                                eos_ids=eos_ids, pad_id=self.pad_id, batch_size=self.batch_size,
                                                temperature=temperature, top_p=top_p, **PLAIN_SAMPLING):
            for i, answers in zip(batch, drawn):
                out[i] = answers
            if on_batch:
                on_batch(len(batch))
        return out  # type: ignore[return-value]

    def greedy(self, prompts: Sequence[np.ndarray], *, max_new_tokens: int, eos_ids: Sequence[int],
               on_batch: Callable[[int], None] | None = None) -> list[np.ndarray]:
        """One greedy answer per prompt (:func:`generate_greedy`); ``on_batch(tokens generated)``."""
        return generate_greedy(self.model, prompts, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                               pad_id=self.pad_id, batch_size=self.batch_size, on_batch=on_batch)

    def close(self) -> None:
        """Nothing to shut down: the caller owns the model."""
