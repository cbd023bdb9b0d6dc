"""``precompute sample``: groups of the student's sampled responses per prompt (PAD, step 1).

Source: PAD (Gu et al., seed 001; code EganGu/PAD), released settings: n = 5
responses drawn per prompt at temperature 1.0 and top-p 0.95, the 4 most
diverse kept, prompts with duplicate responses dropped. What this module fixes:

Drawing
    Plain ancestral sampling with ``generate()``: temperature and top-p only
    (top-k off, no repetition penalty or min-p, whatever the model's
    ``generation_config`` says). The prompt is the dataset row's prompt messages
    through the chat template with the generation prompt, cut from the left to
    ``max(8, max_length - max_new_tokens)`` tokens, like ADPA's generations. A
    response ends right after its first end-of-turn token (kept), or after
    ``max_new_tokens`` tokens without one.
Seeds
    The global torch generator is seeded per part with ``seed + part`` (for
    split ``train``; other splits add ``crc32(split name)`` so that they do not
    replay train's random numbers), then the part's prompts are drawn in a
    fixed order. A resumed run therefore draws a redone part exactly as before,
    given the same device, dtype and ``--generation-batch`` (which are written
    in each part's attributes).
Duplicates
    Two responses are duplicates when their token ids are identical (after the
    end-of-turn cut). A prompt is dropped when any two of its n *drawn*
    responses are duplicates, even if the kept ones would not be; it is counted
    under ``duplicate_responses``.
Diversity (greedy max-min)
    Edit distance is the Levenshtein distance between token id sequences
    (insert, delete, substitute, each cost 1). Selection starts with the first
    drawn response (index 0), then repeatedly adds the not yet kept response
    whose smallest distance to the kept ones is largest, ties going to the
    lowest draw index, until ``keep`` are kept. The kept responses are stored
    in draw order: sample i of a group (role ``16 + i``) is the i-th kept in
    draw order.

Each part's ``samples`` base arrays are written once (a complete part is
skipped: that is resuming). Per part, its attributes record the prompts,
groups kept, drop counts by reason, truncated prompts, the seed and the
hardware settings; the per-split totals go to
``layout.splits.<split>.samples`` in the root attributes and to the summary.
"""

from __future__ import annotations

import hashlib
import json
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from store import TeacherStore
from store import format as fmt

from lm import chat, models

from . import dataset as data
from . import teacher as pipeline
from .scoring import generate_in_batches

DROP_DUPLICATES = "duplicate_responses"
PASS_SAMPLES = "samples/base"


# --------------------------------------------------------------------------- selection

def edit_distance(a: Sequence[int], b: Sequence[int]) -> int:
    """Levenshtein distance between two token id sequences (bit-parallel, Myers/Hyyrö).

    One column of the dynamic programme is held as bit vectors of vertical
    +1/-1 steps, so each token of ``b`` costs a few big-integer operations over
    ``len(a)`` bits instead of ``len(a)`` Python steps.
    """
    a, b = list(a), list(b)
    if not a or not b:
        return len(a) + len(b)
    m = len(a)
    mask = (1 << m) - 1
    high = 1 << (m - 1)
    peq: dict[int, int] = {}
    for i, token in enumerate(a):
        peq[token] = peq.get(token, 0) | (1 << i)
    pv, mv, score = mask, 0, m
    for token in b:
        eq = peq.get(token, 0)
        xv = eq | mv
        xh = ((((eq & pv) + pv) & mask) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = ((ph << 1) | 1) & mask  # row 0 of the table grows by one per column
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def has_duplicates(responses: Sequence[Sequence[int]]) -> bool:
    """True when two responses have identical token ids."""
    seen = {tuple(int(t) for t in r) for r in responses}
    return len(seen) < len(responses)


def select_diverse(responses: Sequence[Sequence[int]], keep: int) -> list[int]:
    """Indices of ``keep`` responses chosen by greedy max-min edit distance, in draw order.

    Starts with response 0, then adds the response farthest (by its smallest
    distance) from those kept so far; ties go to the lowest index.
    """
    n = len(responses)
    if not 1 <= keep <= n:
        raise ValueError(f"cannot keep {keep} of {n} responses")
    distance = np.zeros((n, n), dtype=np.int64)
    for i in range(n):
        for j in range(i + 1, n):
            distance[i, j] = distance[j, i] = edit_distance(responses[i], responses[j])
    kept = [0]
    nearest = distance[0].copy()  # smallest distance of each response to the kept set
    while len(kept) < keep:
        candidates = [i for i in range(n) if i not in kept]
        best = max(candidates, key=lambda i: (nearest[i], -i))
        kept.append(best)
        nearest = np.minimum(nearest, distance[best])
    return sorted(kept)


def choose_group(responses: Sequence[Sequence[int]], keep: int) -> tuple[list[int] | None, str | None]:
    """(kept indices, None), or (None, drop reason) for a prompt that is dropped."""
    if has_duplicates(responses):
        return None, DROP_DUPLICATES
    return select_diverse(responses, keep), None


# --------------------------------------------------------------------------- drawing

def part_seed(seed: int, split: str, part: int) -> int:
    offset = 0 if split == "train" else zlib.crc32(split.encode("utf-8"))
    return (seed + offset + part) % (1 << 63)


def prompts_fingerprint(rows: Sequence[data.Row]) -> str:
    """sha256 of the (index, prompt messages) the samples of a part answer."""
    payload = [[r.index, r.prompt] for r in rows]
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@torch.inference_mode()
def sample_responses(model, prompts: Sequence[np.ndarray], *, n: int, temperature: float, top_p: float,
                     max_new_tokens: int, eos_ids: Sequence[int], pad_id: int, batch_size: int = 16,
                     on_batch: Callable[[int], None] | None = None) -> list[list[np.ndarray]]:
    """``n`` sampled continuations per prompt, each cut after its first end-of-turn id (kept).

    Uses the global torch generator: seed it before calling. Prompts are drawn
    longest first, ``batch_size`` prompts (times n rows) per ``generate()`` call.
    """
    out: list[list[np.ndarray] | None] = [None] * len(prompts)
    for batch, drawn in generate_in_batches(model, prompts, n=n, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                            pad_id=pad_id, batch_size=batch_size, do_sample=True,
                                            temperature=temperature, top_p=top_p, top_k=0, min_p=None,
                                            typical_p=1.0, repetition_penalty=1.0, no_repeat_ngram_size=0):
        for i, responses in zip(batch, drawn):
            out[i] = responses
        if on_batch:
            on_batch(len(batch))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- the run

@dataclass
class SampleConfig:
    out: str
    model: str | None = None  # None: the embedded student
    dataset: str | None = None
    splits: tuple[str, ...] = ("train", "test")
    limit: int | None = None
    n: int = 5
    temperature: float = 1.0
    top_p: float = 0.95
    keep: int = 4
    max_new_tokens: int = 64
    max_length: int = 512
    seed: int = 0
    generation_batch: int = 16
    device: str = "auto"
    dtype: str = "auto"
    columns: dict | None = None
    strict: bool = False
    examples_per_part: int = 64
    storage_options: dict | None = None
    progress: bool = True

    def check(self) -> None:
        if self.n < 2:
            raise ValueError(f"--n {self.n}: PAD compares responses, draw at least 2")
        if not 2 <= self.keep <= self.n:
            raise ValueError(f"--keep {self.keep}: keep between 2 and --n ({self.n}) responses")
        if not self.temperature > 0:
            raise ValueError(f"--temperature {self.temperature}: must be > 0 (sampling, not greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        if self.max_length <= chat.MIN_PROMPT_TOKENS:
            raise ValueError(f"--max-length {self.max_length}: must be greater than {chat.MIN_PROMPT_TOKENS}")


@dataclass
class _Part:
    split: str
    part: int
    rows: list = field(default_factory=list)


def sample_counts(store: TeacherStore, split: str) -> dict:
    """Totals over a split's complete ``samples`` parts: prompts, groups, drops by reason, truncation."""
    total = {"prompts": 0, "groups": 0, "dropped": {}, "truncated_prompts": 0, "parts": 0}
    for part in store.complete_parts(split, fmt.SET_SAMPLES):
        attrs = store.section_attrs(split, part, fmt.SET_SAMPLES) or {}
        total["parts"] += 1
        total["prompts"] += int(attrs.get("prompts", 0))
        total["groups"] += int(attrs.get("groups", 0))
        total["truncated_prompts"] += int(attrs.get("truncated_prompts", 0))
        for reason, count in (attrs.get("dropped") or {}).items():
            total["dropped"][reason] = total["dropped"].get(reason, 0) + int(count)
    return total


def record_sample_counts(store: TeacherStore, splits: Sequence[str]) -> dict[str, dict]:
    """Write each split's totals to ``layout.splits.<split>.samples``; returns them."""
    counts = {split: sample_counts(store, split) for split in splits}

    def mutate(attrs):
        for split, total in counts.items():
            attrs["layout"]["splits"].setdefault(split, {})["samples"] = total

    store.update_attrs(mutate)
    return counts


def describe_counts(split: str, total: dict, keep: int | None = None) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(total["dropped"].items()) if v) or "none"
    size = f" of {keep}" if keep else ""
    return (f"  {split} samples: {total['prompts']} prompts -> {total['groups']} groups{size}; "
            f"dropped: {dropped}; prompts cut to fit: {total['truncated_prompts']}")


class SampleRun:
    def __init__(self, config: SampleConfig):
        config.check()
        self.config = config
        self.summary = pipeline.Summary(store=config.out)
        self.device = models.resolve_device(config.device)
        self.dtype = models.resolve_dtype(config.dtype, self.device)
        self.dtype_name = str(self.dtype).replace("torch.", "")

    def provenance(self) -> dict:
        c = self.config
        return {
            "model": {"name": self.info.name, "sha256": self.info.weights_hash},
            "dataset": data.dataset_identity(c.dataset),
            "n": c.n, "temperature": c.temperature, "top_p": c.top_p, "top_k": "off", "keep": c.keep,
            "seed": c.seed, "seed_per_part": "seed + part (+ crc32(split) for splits other than train)",
            "max_new_tokens": c.max_new_tokens, "max_length": c.max_length, "dtype": self.dtype_name,
            "selection": "greedy max-min token edit distance from response 0, ties to the lowest index",
            "duplicates": "prompt dropped if two of the n drawn responses have identical token ids",
        }

    def prepare(self) -> None:
        c = self.config
        self.rows = data.load_splits(c.dataset, c.splits, limit=c.limit, columns=c.columns, strict=c.strict,
                                     require_pairs=False)
        self.info = models.resolve_model(c.model, models.EMBEDDED_STUDENT)
        self.tokenizer = models.load_tokenizer(self.info.path)
        tokenizer_hash = chat.tokenizer_hash(self.tokenizer)
        self.eot_id = chat.end_of_turn_id(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_id
        self.store = TeacherStore.create(
            c.out, tokenizer={"name": self.info.name, "hash": tokenizer_hash},
            vocab_size=pipeline.vocab_size_of(self.info, self.tokenizer), examples_per_part=c.examples_per_part,
            storage_options=c.storage_options, provenance={"dataset": data.dataset_identity(c.dataset)},
        )
        self.store.register_pass("encode", pipeline.encode_provenance(self.tokenizer, tokenizer_hash, c.max_length))
        self.store.register_pass(PASS_SAMPLES, self.provenance())
        self.todo: list[_Part] = []
        parts_total = 0
        for split, loaded in self.rows.items():
            # no dataset record here: the split's dataset record describes the pairs (see pipeline)
            self.store.set_split(split, loaded.total_rows)
            self.summary.examples[split] = len(loaded.rows)
            self.summary.skipped[split] = dict(loaded.skipped)
            by_index = {r.index: r for r in loaded.rows}
            outside = sum(1 for r in loaded.rows if not 0 <= r.index < loaded.total_rows)
            if outside:  # no part covers them (a test split carved from a single file)
                self.summary.notes.append(f"  {split}: {outside} rows have indices outside [0, {loaded.total_rows}) "
                                          f"and are not sampled")
            for part in range(self.store.num_parts(split)):
                parts_total += 1
                if self.store.is_complete(split, part, fmt.SET_SAMPLES):
                    continue
                start, stop = self.store.part_range(split, part)
                self.todo.append(_Part(split, part, [by_index[i] for i in range(start, stop) if i in by_index]))
        self.record = {"step": PASS_SAMPLES, "parts_done": 0, "parts_skipped": parts_total - len(self.todo),
                       "tokens": 0, "seconds": 0.0}
        self.summary.steps.append(self.record)

    def run(self) -> None:
        if not self.todo:
            return
        c = self.config
        model, _, _ = models.load_model(self.info.path, device=self.device, dtype=self.dtype_name)
        t0 = time.perf_counter()
        budget = max(chat.MIN_PROMPT_TOKENS, c.max_length - c.max_new_tokens)
        total = sum(len(p.rows) for p in self.todo)
        with tqdm(total=total, desc=PASS_SAMPLES, unit="prompt", disable=not c.progress, dynamic_ncols=True) as bar:
            for todo in self.todo:
                arrays, attrs, drawn_tokens = self._run_part(model, todo, budget, bar)
                self.store.write_section(todo.split, todo.part, fmt.SET_SAMPLES, fmt.BASE, arrays, attrs)
                self.record["parts_done"] += 1
                self.record["tokens"] += drawn_tokens
        self.record["seconds"] = time.perf_counter() - t0
        model = None
        pipeline._free_memory()

    def _run_part(self, model, todo: _Part, budget: int, bar) -> tuple[dict, dict, int]:
        c = self.config
        prompts, truncated = [], 0
        for r in todo.rows:
            full = chat.encode_prompt(self.tokenizer, r.prompt)
            truncated += int(len(full) > budget)
            prompts.append(full[-budget:])
        seed = part_seed(c.seed, todo.split, todo.part)
        torch.manual_seed(seed)
        drawn = sample_responses(model, prompts, n=c.n, temperature=c.temperature, top_p=c.top_p,
                                 max_new_tokens=c.max_new_tokens, eos_ids=[self.eot_id], pad_id=self.pad_id,
                                 batch_size=c.generation_batch, on_batch=bar.update)
        seqs, groups, dropped = [], [], {}
        for r, prompt, responses in zip(todo.rows, prompts, drawn):
            kept, reason = choose_group(responses, c.keep)
            if kept is None:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            for position, k in enumerate(kept):
                seqs.append((r.index, fmt.ROLE_SAMPLE_BASE + position,
                             np.concatenate([prompt, responses[k]]).astype(np.int64), len(prompt)))
            groups.append((r.index, len(kept)))
        attrs = {
            "prompts": len(todo.rows), "groups": len(groups), "dropped": dropped, "truncated_prompts": truncated,
            "prompts_sha256": prompts_fingerprint(todo.rows), "seed": seed,
            "generation_batch": c.generation_batch, "device": self.device, "dtype": self.dtype_name,
        }
        drawn_tokens = sum(len(resp) for responses in drawn for resp in responses)
        return pipeline.base_arrays(seqs, groups=groups), attrs, drawn_tokens

    def finish(self) -> pipeline.Summary:
        counts = record_sample_counts(self.store, list(self.rows))
        for split, total in counts.items():
            self.summary.truncated[split] = {"prompt": total["truncated_prompts"]}
            self.summary.notes.append(describe_counts(split, total, self.config.keep))
        return pipeline.finish_summary(self.store, self.rows, self.summary)


def run_sample(config: SampleConfig) -> pipeline.Summary:
    t0 = time.perf_counter()
    run = SampleRun(config)
    run.prepare()
    run.run()
    run.summary.seconds = time.perf_counter() - t0
    return run.finish()
