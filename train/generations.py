"""``train evaluate --generations FILE``: what the model answers to the split's prompts, one JSON line each.

The prompts are the store's own token ids (the prompt of each example's first
sequence), so they are exactly what the model was trained and scored on. Each
line holds the example index, the prompt as text, the greedy answer and, with
``--samples N``, N answers sampled at ``--temperature`` (top-p 1, seeded by
``--seed``); answers are cut at the first end-of-turn token (:mod:`lm.generate`)
and decoded without special tokens. With ``--engine vllm`` a vLLM engine
(:mod:`lm.engines`) generates them: the same greedy answers (up to ties within
its numerical error), samples from the same distribution with per-prompt seeds,
none of the model's generation defaults applied. Scoring them (by a rule, a reward model, a
person) is up to the reader: ``benchmarks/efficacy.py`` checks them by a rule.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from lm import chat
from lm.generate import generate_greedy, generate_in_batches
from store import TeacherStore
from store import format as fmt

__all__ = ["split_prompts", "write_generations"]


def split_prompts(store: TeacherStore, split: str) -> list[tuple[int, np.ndarray]]:
    """(example index, prompt token ids) of every example of ``split``, in index order, from the first set that
    holds it (pairs, then generated, then samples)."""
    prompts: dict[int, np.ndarray] = {}
    for sequence_set in fmt.SEQUENCE_SETS:
        for part in store.complete_parts(split, sequence_set):
            base = store.read_section(split, part, sequence_set, fmt.BASE,
                                      [fmt.ARRAY_EXAMPLE_INDEX, fmt.ARRAY_PROMPT_LENGTH, fmt.ARRAY_TOKEN_OFFSETS,
                                       fmt.ARRAY_INPUT_IDS])
            for s, example in enumerate(base[fmt.ARRAY_EXAMPLE_INDEX].tolist()):
                if example not in prompts:
                    start = int(base[fmt.ARRAY_TOKEN_OFFSETS][s])
                    stop = start + int(base[fmt.ARRAY_PROMPT_LENGTH][s])
                    prompts[example] = base[fmt.ARRAY_INPUT_IDS][start:stop].astype(np.int64)
    return sorted(prompts.items())


@torch.no_grad()
def write_generations(model, tokenizer, store: TeacherStore, split: str, path: str, *, samples: int = 0,
                      temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0,
                      batch_size: int = 16, engine=None, prompts: list | None = None) -> int:
    """Write the JSON lines of the module docstring to ``path`` (atomically); returns the number of prompts.

    ``engine``: a :class:`lm.engines.VllmEngine` that generates instead of ``model``'s ``generate()``;
    ``prompts``: :func:`split_prompts`' result when the caller has it."""
    prompts = split_prompts(store, split) if prompts is None else prompts
    ids = [p for _, p in prompts]
    ends = chat.end_of_turn_ids(tokenizer)
    pad = chat.pad_id(tokenizer)
    sampled: list[list[np.ndarray]] = [[] for _ in ids]
    if engine is not None:
        greedy = engine.greedy(ids, max_new_tokens=max_new_tokens, eos_ids=ends)
        if samples:
            sampled = engine.sample(ids, n=samples, temperature=temperature, top_p=1.0,
                                    max_new_tokens=max_new_tokens, seed=seed, eos_ids=ends)
    else:
        greedy = generate_greedy(model, ids, max_new_tokens=max_new_tokens, eos_ids=ends, pad_id=pad,
                                 batch_size=batch_size)
    if samples and engine is None:
        torch.manual_seed(seed)
        for batch, answers in generate_in_batches(model, ids, n=samples, max_new_tokens=max_new_tokens,
                                                  eos_ids=ends, pad_id=pad, batch_size=batch_size, do_sample=True,
                                                  temperature=temperature, top_p=1.0, top_k=0):
            for i, group in zip(batch, answers):
                sampled[i] = group

    def text(answer) -> str:
        return tokenizer.decode(np.asarray(answer).tolist(), skip_special_tokens=True).strip()

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        for (example, prompt), answer, drawn in zip(prompts, greedy, sampled):
            out.write(json.dumps({"example_index": example,
                                  "prompt": tokenizer.decode(prompt.tolist(), skip_special_tokens=True),
                                  "greedy": text(answer), "samples": [text(a) for a in drawn]},
                                 ensure_ascii=False) + "\n")
    os.replace(tmp, target)
    return len(prompts)
