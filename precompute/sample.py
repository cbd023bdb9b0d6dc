"""``precompute sample``: groups of the student's sampled responses per prompt (PAD, step 1).

Source: PAD (Gu et al., "Preference-Aligned Distillation"; code EganGu/PAD; docs/methods.md), released settings: n = 5
responses drawn per prompt at temperature 1.0 and top-p 0.95, the 4 most
diverse kept, prompts with duplicate responses dropped. What this module fixes:

Drawing
    Plain ancestral sampling with ``generate()`` (``--engine hf``, the default)
    or vLLM (``--engine vllm``, :mod:`lm.engines`): temperature and top-p only
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
    in each part's attributes). With ``--engine vllm`` each prompt's request
    carries its own seed, from the part's seed and the prompt's position in the
    part (:func:`lm.engines.request_seed`): a part then comes out the same
    whatever the batching (``--generation-batch`` does not apply) or the worker,
    on one device kind and dtype; the pass record names the engine, its version
    and its tensor parallelism, each part's attributes all its settings.
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
Each part's content key (:func:`sample_key`, :mod:`store.keys`) covers the
model, the sampling settings, the part's seed, device kind and generation batch
and its prompts; ``--reuse-from`` copies a part whose key another store holds
instead of sampling it (on a cluster, before the parts are submitted).
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import click
import numpy as np
import torch
from tqdm.auto import tqdm

from lm import chat, engines, models
from lm.generate import PLAIN_SAMPLING, generate_in_batches
from lm.options import (ClusterOption, DataOptions, EngineOptions, LayoutOptions, ProgressOption, ReuseOptions,
                        RunOptions, setting)
from store import ModelRecord, PassRecord, ProvenanceMismatch, TeacherStore
from store import format as fmt
from store import keys
from store.sequences import base_arrays

from .dataset import LoadedSplit, dataset_identity, load_data
from .provenance import prompts_fingerprint
from .reuse import Reuse
from .stores import open_store, record_sample_counts
from .summary import Summary, finish_summary

DROP_DUPLICATES = "duplicate_responses"
PASS_SAMPLES = fmt.PASS_SAMPLES_BASE


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
                                            pad_id=pad_id, batch_size=batch_size, temperature=temperature,
                                            top_p=top_p, **PLAIN_SAMPLING):
        for i, responses in zip(batch, drawn):
            out[i] = responses
        if on_batch:
            on_batch(len(batch))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- the run

@dataclass(frozen=True, kw_only=True)
class SampleConfig(DataOptions, LayoutOptions, RunOptions, EngineOptions, ClusterOption, ReuseOptions,
                   ProgressOption):
    """Settings of ``precompute sample``; each field is also its command-line option."""

    out: str = setting(help="Store path or fsspec URL (created, or completed if it exists).", required=True)
    model: str | None = setting(None, "Model that samples (the student's initial model) [embedded demo student].")
    n: int = setting(5, "Responses drawn per prompt.", type=click.IntRange(min=2))
    temperature: float = setting(1.0, "Sampling temperature.", type=click.FloatRange(min=0, min_open=True))
    top_p: float = setting(0.95, "Nucleus sampling mass.", type=click.FloatRange(min=0, max=1, min_open=True))
    keep: int = setting(4, "Most diverse responses kept per prompt (greedy max-min token edit distance).",
                        type=click.IntRange(min=2))
    max_new_tokens: int = setting(64, "Length limit of each response.", type=click.IntRange(min=1))
    seed: int = setting(0, "Part p of train draws with seed + p.", type=int)
    generation_batch: int = setting(16, "Prompts per generate() call (each drawn n times; --engine hf).",
                                    type=click.IntRange(min=1))

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
        engines.EngineSpec.of(self).check()

    def sequence_length(self) -> int:
        """The longest prompt + response a part can hold (a vLLM engine's max_model_len)."""
        return max(self.max_length, chat.MIN_PROMPT_TOKENS + self.max_new_tokens)


@dataclass
class SampleContext:
    """Everything the sampling of a part reads, decided before the model loads."""

    config: SampleConfig
    store: TeacherStore
    tokenizer: object
    model: models.ModelInfo
    rows: dict[str, LoadedSplit]
    device: str
    dtype: str
    eot_ids: list[int]  # every id that ends the sampling model's turn, the template's own first
    pad_id: int


@dataclass
class _Part:
    split: str
    part: int
    rows: list = field(default_factory=list)


def describe_counts(split: str, total: dict, keep: int | None = None) -> str:
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(total["dropped"].items()) if v) or "none"
    size = f" of {keep}" if keep else ""
    return (f"  {split} samples: {total['prompts']} prompts -> {total['groups']} groups{size}; "
            f"dropped: {dropped}; prompts cut to fit: {total['truncated_prompts']}")


def sample_record(ctx: SampleContext) -> PassRecord:
    """What the sampled groups depend on: the model and every sampling setting."""
    config = ctx.config
    settings = {
        "dataset": dataset_identity(config.dataset),
        "n": config.n, "temperature": config.temperature, "top_p": config.top_p, "top_k": "off", "keep": config.keep,
        "seed": config.seed, "seed_per_part": "seed + part (+ crc32(split) for splits other than train)",
        "max_new_tokens": config.max_new_tokens, "max_length": config.max_length, "dtype": ctx.dtype,
        "selection": "greedy max-min token edit distance from response 0, ties to the lowest index",
        "duplicates": "prompt dropped if two of the n drawn responses have identical token ids",
    }
    engine = engines.EngineSpec.of(config).record(seeds=engines.SEED_RULE)
    if engine:  # absent: generate(), as before engines existed (the keys of existing stores stay valid)
        settings["engine"] = engine
    return PassRecord(ModelRecord(ctx.model.name, ctx.model.weights_hash), settings)


def prepare(config: SampleConfig, summary: Summary) -> tuple[SampleContext, list[_Part]]:
    """Rows, the model resolved, the store opened; returns the context and the parts still to sample."""
    config.check()
    device = models.resolve_device(config.device)
    dtype = str(models.resolve_dtype(config.dtype, device)).replace("torch.", "")
    rows = load_data(config, require_pairs=False)
    info = models.resolve_model(config.model, models.EMBEDDED_STUDENT)
    tokenizer = models.load_tokenizer(info.path)
    store = open_store(config.out, model=info, tokenizer=tokenizer, dataset=config.dataset,
                       max_length=config.max_length, examples_per_part=config.examples_per_part,
                       storage_options=config.storage_options)
    ctx = SampleContext(config=config, store=store, tokenizer=tokenizer, model=info, rows=rows, device=device,
                        dtype=dtype, eot_ids=chat.end_of_turn_ids(tokenizer, models.generation_eos_ids(info.path)),
                        pad_id=chat.pad_id(tokenizer))
    engines.note_suggestion(config.engine, device)
    diff = store.pass_conflict(PASS_SAMPLES, sample_record(ctx).to_dict())
    if diff and any(store.complete_parts(split, fmt.SET_SAMPLES) for split in rows if split in store.splits()):
        raise ProvenanceMismatch(f"{store.location}: pass {PASS_SAMPLES!r} is already in this store with other "
                                 f"settings: {diff}. Write to another --out, or delete the store")
    todo: list[_Part] = []
    for split, loaded in rows.items():
        # no dataset record here: the split's dataset record describes the pairs (see teacher)
        store.set_split(split, loaded.total_rows)
        summary.examples[split] = len(loaded.rows)
        summary.skipped[split] = dict(loaded.skipped)
        outside = sum(1 for r in loaded.rows if not 0 <= r.index < loaded.total_rows)
        if outside:  # no part covers them (a test split carved from a single file)
            summary.notes.append(f"  {split}: {outside} rows have indices outside [0, {loaded.total_rows}) "
                                 f"and are not sampled")
        for part in range(store.num_parts(split)):
            if not store.is_complete(split, part, fmt.SET_SAMPLES):
                start, stop = store.part_range(split, part)
                todo.append(_Part(split, part, [r for r in loaded.rows if start <= r.index < stop]))
    return ctx, todo


def _prompts(ctx: SampleContext, rows: Sequence) -> tuple[list[np.ndarray], int]:
    """The rows' prompts as sampled (chat template, cut from the left to the budget), and how many were cut."""
    config = ctx.config
    budget = max(chat.MIN_PROMPT_TOKENS, config.max_length - config.max_new_tokens)
    prompts, truncated = [], 0
    for r in rows:
        full = chat.encode_prompt(ctx.tokenizer, r.prompt)
        truncated += int(len(full) > budget)
        prompts.append(full[-budget:])
    return prompts, truncated


def sample_key(ctx: SampleContext, todo: _Part) -> str:
    """The content key of one part's groups (:func:`store.keys.samples_base_key`): no model loads."""
    config = ctx.config
    prompts, _ = _prompts(ctx, todo.rows)
    return keys.samples_base_key(
        layout=ctx.store.key_layout(), example_range=ctx.store.part_range(todo.split, todo.part),
        model_sha256=ctx.model.weights_hash, settings=sample_record(ctx).settings,
        part_seed=part_seed(config.seed, todo.split, todo.part), device=ctx.device,
        generation_batch=config.generation_batch,
        eot_ids=ctx.eot_ids, prompts_sha256=prompts_fingerprint(todo.rows),
        prompt_ids=[(r.index, p) for r, p in zip(todo.rows, prompts)])


def open_engine(ctx: SampleContext):
    """What draws: the model loaded for ``generate()`` (``--engine hf``), or a :class:`lm.engines.VllmEngine`."""
    config = ctx.config
    if config.engine == engines.VLLM:
        return engines.VllmEngine(models.model_dir(ctx.model), device=ctx.device, dtype=ctx.dtype,
                                  tensor_parallel=config.tensor_parallel, kv_cache_gib=config.kv_cache_gib,
                                  max_model_len=config.sequence_length())
    model, _, _ = models.load_model(ctx.model.path, device=ctx.device, dtype=ctx.dtype)
    return model


def sample_part(ctx: SampleContext, todo: _Part, model, progress) -> tuple[dict, dict, int]:
    """Draw, de-duplicate and select one part's groups: (base arrays, section attributes, tokens drawn).

    ``model``: a model for ``generate()``, or an engine (:mod:`lm.engines`)."""
    config = ctx.config
    prompts, truncated = _prompts(ctx, todo.rows)
    seed = part_seed(config.seed, todo.split, todo.part)
    engine = engines.as_engine(model, pad_id=ctx.pad_id, batch_size=config.generation_batch)
    drawn = engine.sample(prompts, n=config.n, temperature=config.temperature, top_p=config.top_p,
                          max_new_tokens=config.max_new_tokens, seed=seed, eos_ids=ctx.eot_ids, on_batch=progress)
    seqs, groups, dropped = [], [], {}
    for r, prompt, responses in zip(todo.rows, prompts, drawn):
        kept, reason = choose_group(responses, config.keep)
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
        "generation_batch": config.generation_batch, "device": ctx.device, "dtype": ctx.dtype,
        keys.ATTR: sample_key(ctx, todo),
    }
    if engine.name == engines.VLLM:
        attrs["engine"] = engine.settings()
    drawn_tokens = sum(len(resp) for responses in drawn for resp in responses)
    return base_arrays(seqs, groups=groups), attrs, drawn_tokens


def run_sample(config: SampleConfig) -> Summary:
    t0 = time.perf_counter()
    summary = Summary(store=config.out)
    if config.cluster:
        return _finish(_run_on_cluster(config, summary), summary, t0)
    ctx, todo = prepare(config, summary)
    record = summary.step_record(PASS_SAMPLES, sum(ctx.store.num_parts(s) for s in ctx.rows) - len(todo))
    todo = _reuse_parts(ctx, todo, summary)
    if todo:
        model = open_engine(ctx)
        try:
            ctx.store.register_pass(PASS_SAMPLES, sample_record(ctx).to_dict(), may_replace=True)  # what runs
            t1 = time.perf_counter()
            with tqdm(total=sum(len(p.rows) for p in todo), desc=PASS_SAMPLES, unit="prompt",
                      disable=not config.progress, dynamic_ncols=True) as bar:
                for part in todo:
                    if ctx.store.is_complete(part.split, part.part, fmt.SET_SAMPLES):
                        record["parts_skipped"] += 1  # another writer of this store finished it meanwhile
                        continue
                    arrays, attrs, drawn_tokens = sample_part(ctx, part, model, bar.update)
                    ctx.store.write_section(part.split, part.part, fmt.SET_SAMPLES, fmt.BASE, arrays, attrs)
                    record["parts_done"] += 1
                    record["tokens"] += drawn_tokens
            record["seconds"] = time.perf_counter() - t1
        finally:
            engines.release(model)  # a vLLM engine's processes end here, whatever happened
            model = None
            models.free_memory()
    return _finish(ctx, summary, t0)


def _reuse_parts(ctx: SampleContext, todo: list[_Part], summary: Summary) -> list[_Part]:
    """The parts of ``todo`` that no store of ``--reuse-from`` holds; the others are copied in, verified, the
    pass recorded first."""
    reuse = Reuse.for_run(ctx.store, ctx.config, summary)
    if not reuse:
        return todo
    by_place = {(p.split, p.part): p for p in todo}

    def record() -> None:
        ctx.store.register_pass(PASS_SAMPLES, sample_record(ctx).to_dict(), may_replace=True)

    left = reuse.take_parts(PASS_SAMPLES, fmt.SET_SAMPLES, fmt.BASE, list(by_place),
                            lambda split, part: sample_key(ctx, by_place[(split, part)]), before=record)
    return [by_place[place] for place in left]


def _finish(ctx: SampleContext, summary: Summary, t0: float) -> Summary:
    summary.seconds = time.perf_counter() - t0
    counts = record_sample_counts(ctx.store, list(ctx.rows))
    for split, total in counts.items():
        summary.truncated[split] = {"prompt": total["truncated_prompts"]}
        summary.notes.append(describe_counts(split, total, ctx.config.keep))
    return finish_summary(ctx.store, ctx.rows, summary)


# --------------------------------------------------------------------------- on a cluster (--cluster)

def _run_on_cluster(config: SampleConfig, summary: Summary) -> SampleContext:
    """Each part a unit of work on a dask cluster (see :mod:`precompute.cluster`).

    The seed is per part, so a part comes out the same whichever worker draws
    it (given one device kind and dtype for all workers, which the session
    checks, and the same ``--generation-batch``). The pass is recorded once
    before the parts are submitted.
    """
    from . import cluster

    with cluster.ClusterSession(config.cluster, engine=engines.EngineSpec.of(config)) as session:
        device, dtype = session.resolve(config.device, config.dtype)
        ctx, todo = prepare(dataclasses.replace(config, device=device, dtype=dtype), summary)
        record = summary.step_record(PASS_SAMPLES, sum(ctx.store.num_parts(s) for s in ctx.rows) - len(todo))
        todo = _reuse_parts(ctx, todo, summary)  # reused here, not submitted
        if todo:
            ctx.store.register_pass(PASS_SAMPLES, sample_record(ctx).to_dict(), may_replace=True)
            portable = dataclasses.replace(ctx, store=None, rows={},  # reuse options may hold credentials
                                           config=dataclasses.replace(ctx.config, reuse_from=(), reuse_options={}))
            fingerprint = session.install(attach_context, portable)
            units = [cluster.Unit(PASS_SAMPLES, p.split, p.part, sample_part_on_worker,
                                  (fingerprint, p.split, p.part, p.rows)) for p in todo]
            cluster.tally(session.run(units, desc=PASS_SAMPLES, progress=config.progress), {PASS_SAMPLES: record})
        summary.notes.append(f"  cluster {config.cluster}: {session.workers} worker(s)")
    return ctx


def attach_context(portable: SampleContext) -> SampleContext:
    """On a worker: the shipped context with the store opened there (same location)."""
    config = portable.config
    store = TeacherStore.open(config.out, mode="a", storage_options=config.storage_options)
    return dataclasses.replace(portable, store=store)


def sample_part_on_worker(fingerprint: str, split: str, part: int, rows: list) -> dict:
    """On a worker: draw and write one part's groups (a unit of :func:`_run_on_cluster`)."""
    from . import cluster

    ctx = cluster.worker_context(fingerprint)
    with cluster.part_task(PASS_SAMPLES, split, part) as outcome:
        if ctx.store.is_complete(split, part, fmt.SET_SAMPLES):
            return outcome
        if ctx.config.engine == engines.VLLM:
            model = cluster.worker_engine(ctx.model, device=ctx.device, dtype=ctx.dtype,
                                          spec=engines.EngineSpec.of(ctx.config),
                                          max_model_len=ctx.config.sequence_length())
        else:
            model = cluster.worker_model(ctx.model, device=ctx.device, dtype=ctx.dtype)
        arrays, attrs, drawn_tokens = sample_part(ctx, _Part(split, part, rows), model, None)
        written = ctx.store.write_section(split, part, fmt.SET_SAMPLES, fmt.BASE, arrays, attrs)
        outcome.update(computed=True, written=written is not None, tokens=drawn_tokens)
    return outcome
