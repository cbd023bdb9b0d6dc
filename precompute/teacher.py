"""``precompute teacher``: dataset -> encoded parts -> model passes -> store.

A run is a list of *steps*; each writes one section of one sequence set for
every part of every split (see :mod:`store.format`):

=================== ================= ==========================================
pass (``--passes``)  step              what it writes
=================== ================= ==========================================
(always)            pairs/base        chosen and rejected, tokenised
pairs               pairs/teacher     teacher top-K, target log-probs, sums
dpo_ref             pairs/student_init the student's initial model's sums (DPO)
adpa                generated/base    the student's greedy answer per prompt
adpa                generated/teacher teacher top-K on those answers
adpa                generated/reference reference model at the teacher's ids
pad                 samples/teacher   teacher top-K on ``precompute sample``'s groups
pad                 samples/teacher_mcq the teacher's pairwise judgements (PAD's s_mcq)
=================== ================= ==========================================

The pad pass needs a store that ``precompute sample`` filled (set ``samples``)
and is refused before any model loads without one. A pad-only run takes
prompt-only rows and writes no pairs; the pairs base is written only when
pairs, dpo_ref or adpa is asked. The calibration prompt, its template
(``precompute/templates/mcq.txt``, ``--mcq-template``) and how the answer is
read are described in :mod:`precompute.calibration`. Readers derive a
response's mean teacher log-prob as ``logp_sum / response_length``.

Models are loaded one at a time, grouped so each loads once where it can: the
student first (DPO sums, generation), then the teacher, then the reference
(after the teacher, because it is read at the teacher's top-K ids). A step
skips parts whose section is already complete, which is the whole of resuming.
Each part's arrays are written by a background thread while the model works on
the next part.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from store import TeacherStore
from store import format as fmt

from lm import chat, models

from . import calibration
from . import dataset as data
from . import scoring as passes

PASS_PAIRS = "pairs"
PASS_DPO_REF = "dpo_ref"
PASS_ADPA = "adpa"
PASS_PAD = "pad"
NEEDS_PAIRS = (PASS_PAIRS, PASS_DPO_REF, PASS_ADPA)  # passes that read the dataset's pairs
DEFAULT_PASSES = (PASS_PAIRS, PASS_DPO_REF, PASS_ADPA)
KNOWN_PASSES = (PASS_PAIRS, PASS_DPO_REF, PASS_ADPA, PASS_PAD)

ROLE_TEACHER, ROLE_STUDENT, ROLE_REFERENCE = "teacher", "student", "reference"


@dataclass
class TeacherConfig:
    out: str
    teacher: str | None = None
    student: str | None = None
    reference: str | None = None  # None: the student's initial model (ADPA's released commands)
    dataset: str | None = None
    splits: tuple[str, ...] = ("train", "test")
    limit: int | None = None
    top_k: int = 50
    max_length: int = 512
    max_new_tokens: int = 64
    batch_tokens: int = 4096
    generation_batch: int = 64
    device: str = "auto"
    dtype: str = "auto"
    passes: tuple[str, ...] = DEFAULT_PASSES
    columns: dict | None = None
    strict: bool = False
    examples_per_part: int = 64
    storage_options: dict | None = None
    progress: bool = True
    mcq_template: str | None = None  # None: precompute/templates/mcq.txt


@dataclass
class Summary:
    store: str
    examples: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, dict[str, int]] = field(default_factory=dict)
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    steps: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    bytes_on_disk: int = 0
    response_tokens: int = 0
    notes: list[str] = field(default_factory=list)  # extra lines from a pass (PAD's counts, bias, cost)

    def lines(self) -> list[str]:
        out = [f"store: {self.store}"]
        for split, n in self.examples.items():
            skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.get(split, {}).items())) or "none"
            trunc = ", ".join(f"{k} {v}" for k, v in sorted(self.truncated.get(split, {}).items()) if v) or "none"
            out.append(f"  {split}: {n} examples; skipped: {skipped}; truncated: {trunc}")
        for step in self.steps:
            rate = step["tokens"] / step["seconds"] if step["seconds"] > 0 else 0.0
            out.append(f"  {step['step']:<22} {step['parts_done']:>4} parts written, {step['parts_skipped']:>4} "
                       f"already complete, {step['tokens']:>8} tokens, {step['seconds']:7.1f} s, {rate:8.1f} tok/s")
        if self.response_tokens:
            out.append(f"  {self.bytes_on_disk / 1e6:.2f} MB on disk, "
                       f"{self.bytes_on_disk / self.response_tokens:.1f} bytes per response token "
                       f"({self.response_tokens} response tokens)")
        out.extend(self.notes)
        out.append(f"  total time {self.seconds:.1f} s")
        return out


@dataclass
class Step:
    name: str  # "<set>/<section>"
    sequence_set: str
    section: str
    model_role: str  # which model computes it
    run: Callable  # (ctx, split, part, model, tokenizer) -> (arrays, tokens)


# --------------------------------------------------------------------------- building arrays

def base_arrays(sequences: list[tuple[int, int, np.ndarray, int]], *, groups: list[tuple[int, int]] | None = None
                ) -> dict[str, np.ndarray]:
    """Base arrays of a set from (example_index, role, input_ids, prompt_length) tuples."""
    lengths = np.array([len(ids) for _, _, ids, _ in sequences], dtype=np.int64)
    prompt = np.array([p for _, _, _, p in sequences], dtype=np.int32)
    response = (lengths - prompt).astype(np.int32)
    ids = np.concatenate([np.asarray(s[2], dtype=np.int64) for s in sequences]) if sequences else np.zeros(0, np.int64)
    mask = np.zeros(int(lengths.sum()), dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    for s, p in enumerate(prompt):
        mask[offsets[s] + p: offsets[s + 1]] = True
    arrays = {
        "example_index": np.array([e for e, _, _, _ in sequences], dtype=np.int64),
        "role": np.array([r for _, r, _, _ in sequences], dtype=np.int8),
        "prompt_length": prompt,
        "response_length": response,
        "token_offsets": offsets,
        "response_offsets": np.concatenate([[0], np.cumsum(response)]).astype(np.int64),
        "input_ids": ids,
        "loss_mask": mask,
    }
    if groups is not None:
        sizes = np.array([n for _, n in groups], dtype=np.int64)
        arrays["group_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays["group_example_index"] = np.array([e for e, _ in groups], dtype=np.int64)
    return arrays


def split_sequences(base: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[int]]:
    off = base["token_offsets"]
    ids = base["input_ids"]
    return [ids[off[s]:off[s + 1]] for s in range(len(off) - 1)], [int(p) for p in base["prompt_length"]]


def scored_arrays(scored: list[passes.Scored], *, topk: bool = False, at_ids: bool = False) -> dict[str, np.ndarray]:
    def cat(values, width=None):
        if values:
            return np.concatenate(values)
        return np.zeros((0,) if width is None else (0, width), dtype=np.float32)

    arrays = {
        "target_logp": cat([s.target_logp for s in scored]).astype(np.float32),
        "logp_sum": np.array([s.logp_sum for s in scored], dtype=np.float32),
    }
    if topk:
        arrays["topk_ids"] = cat([s.topk_ids for s in scored], 1).astype(np.int64)
        arrays["topk_logp"] = cat([s.topk_logp for s in scored], 1).astype(np.float32)
    if at_ids:
        arrays["topk_logp"] = cat([s.at_ids_logp for s in scored], 1).astype(np.float32)
    return arrays


# --------------------------------------------------------------------------- shared with `precompute sample`

def vocab_size_of(info: models.ModelInfo, tokenizer) -> int:
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(models._model_dir(info)).vocab_size)
    return max(vocab, len(tokenizer))


def encode_provenance(tokenizer, tokenizer_hash: str, max_length: int) -> dict:
    template = tokenizer.chat_template or "fallback"
    return {
        "max_length": max_length,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "tokenizer_sha256": tokenizer_hash,
    }


def finish_summary(store: TeacherStore, splits, summary: Summary) -> Summary:
    """Manifest, size on disk, and the run's summary appended to the root attributes."""
    store.refresh_manifest()
    summary.bytes_on_disk = store.nbytes_on_disk()
    summary.response_tokens = sum(int(attrs["rows"]["response"])
                                  for _ref, attrs in store.walk_sections(splits, sections=(fmt.BASE,))
                                  if attrs and attrs.get("complete"))
    record = json.loads(json.dumps(summary.__dict__))
    store.update_attrs(lambda a: a.setdefault("runs", []).append(
        {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}))
    return summary


# --------------------------------------------------------------------------- the run

class TeacherRun:
    def __init__(self, config: TeacherConfig):
        unknown = set(config.passes) - set(KNOWN_PASSES)
        if unknown:
            raise ValueError(f"unknown pass(es) {', '.join(sorted(unknown))}; known: {', '.join(KNOWN_PASSES)}")
        self.config = config
        self.summary = Summary(store=config.out)
        self.device = models.resolve_device(config.device)
        self.dtype = models.resolve_dtype(config.dtype, self.device)
        self.dtype_name = str(self.dtype).replace("torch.", "")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._pending: Future | None = None
        self._pending_base: dict[tuple[str, int], dict] = {}  # stays empty when no pass needs pairs

    # -- set-up: everything cheap and checkable happens before a model runs --

    def prepare(self) -> None:
        c = self.config
        self.needs_pairs = any(p in c.passes for p in NEEDS_PAIRS)
        if PASS_PAD in c.passes:
            self._check_samples_exist()
            self.mcq_template = calibration.load_template(c.mcq_template)
            # the MCQ question is the row's text: prompt-only rows are fine for pad
            self.prompt_rows = data.load_splits(c.dataset, c.splits, limit=c.limit, columns=c.columns,
                                                strict=c.strict, require_pairs=False)
            self._check_samples_match(self.prompt_rows)
        self.rows = (data.load_splits(c.dataset, c.splits, limit=c.limit, columns=c.columns, strict=c.strict)
                     if self.needs_pairs else self.prompt_rows)
        self.model_info = {ROLE_TEACHER: models.resolve_model(c.teacher, models.EMBEDDED_TEACHER)}
        needs_student = PASS_DPO_REF in c.passes or PASS_ADPA in c.passes
        if needs_student:
            self.model_info[ROLE_STUDENT] = models.resolve_model(c.student, models.EMBEDDED_STUDENT)
        if PASS_ADPA in c.passes:
            self.model_info[ROLE_REFERENCE] = (
                models.resolve_model(c.reference, models.EMBEDDED_STUDENT) if c.reference
                else self.model_info[ROLE_STUDENT]
            )
        self.tokenizer = models.load_tokenizer(self.model_info[ROLE_TEACHER].path)
        samples = [(r.prompt, r.chosen) for split in self.rows.values() for r in split.rows[:8]
                   if r.chosen is not None]
        for role, info in self.model_info.items():
            if role == ROLE_TEACHER:
                continue
            other = models.load_tokenizer(info.path)
            chat.check_same_tokenization(self.tokenizer, other, samples or chat.DEFAULT_SAMPLES,
                                         names=(f"teacher {self.model_info[ROLE_TEACHER].name}",
                                                f"{role} {info.name}"))
        self.vocab_size = vocab_size_of(self.model_info[ROLE_TEACHER], self.tokenizer)
        self.tokenizer_hash = chat.tokenizer_hash(self.tokenizer)
        self.eot_id = chat.end_of_turn_id(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_id

        self.store = TeacherStore.create(
            c.out, tokenizer={"name": self.model_info[ROLE_TEACHER].name, "hash": self.tokenizer_hash},
            vocab_size=self.vocab_size, examples_per_part=c.examples_per_part, storage_options=c.storage_options,
            provenance={"dataset": data.dataset_identity(c.dataset)},
        )
        self.store.register_pass("encode", encode_provenance(self.tokenizer, self.tokenizer_hash, c.max_length))
        if PASS_PAD in c.passes:
            self._prompt_rows_by_index = {split: {r.index: r for r in loaded.rows}
                                          for split, loaded in self.prompt_rows.items()}
        for split, loaded in self.rows.items():
            self.summary.examples[split] = len(loaded.rows)
            self.summary.skipped[split] = dict(loaded.skipped)
            if not self.needs_pairs:  # pad only: the split's dataset record describes pairs, leave it
                self.store.set_split(split, loaded.total_rows)
                continue
            truncated = self._encode_split(split, loaded)
            self.summary.truncated[split] = truncated
            self.store.set_split(split, loaded.total_rows, dataset={
                **data.dataset_identity(c.dataset), "fingerprint": loaded.fingerprint,
                "rows_used": len(loaded.rows), "skipped": dict(loaded.skipped), "truncated": truncated,
            })
        if PASS_PAD in c.passes:
            from .sample import record_sample_counts

            record_sample_counts(self.store, list(self.rows))  # set_split above resets the split's record

    def _check_samples_exist(self) -> None:
        """Refuse a pad run, before any model loads, on a store without complete sampled groups."""
        c = self.config
        make = (f"`precompute sample --out {c.out} --dataset {c.dataset or 'demo'}"
                f"{' --limit ' + str(c.limit) if c.limit else ''} --split {','.join(c.splits)}`")
        store = TeacherStore(c.out, mode="r", storage_options=c.storage_options)
        if not store.exists():
            raise ValueError(f"{c.out}: no store here; the pad pass scores sampled groups: run {make} first")
        missing = []
        for split in c.splits:
            if split not in store.splits():
                missing.append(f"split {split!r}")
                continue
            parts = [p for p in range(store.num_parts(split)) if not store.is_complete(split, p, fmt.SET_SAMPLES)]
            if parts:
                missing.append(f"{split} part(s) {', '.join(map(str, parts))}")
        if missing:
            raise ValueError(f"{c.out}: no sampled groups for {'; '.join(missing)}; the pad pass scores the "
                             f"groups that `precompute sample` writes: run {make} first")
        self._samples_store = store
        self._samples_provenance = store.attrs["passes"].get("samples/base", {})

    def _check_samples_match(self, prompt_rows: dict[str, data.LoadedSplit]) -> None:
        """The rows given now must be the prompts the groups were sampled for (the MCQ question is theirs)."""
        from .sample import prompts_fingerprint

        store = self._samples_store
        for split, loaded in prompt_rows.items():
            if store.num_examples(split) != loaded.total_rows:
                raise ValueError(f"{self.config.out}: split {split!r} was sampled from {store.num_examples(split)} "
                                 f"rows, this run has {loaded.total_rows}; use the same --dataset, --limit")
            by_index = {r.index: r for r in loaded.rows}
            for part in range(store.num_parts(split)):
                start, stop = store.part_range(split, part)
                rows = [by_index[i] for i in range(start, stop) if i in by_index]
                stored = (store.section_attrs(split, part, fmt.SET_SAMPLES) or {}).get("prompts_sha256")
                if stored != prompts_fingerprint(rows):
                    raise ValueError(f"{self.config.out}: the samples of {split} part {part} answer other prompts "
                                     f"than the rows given now; use the --dataset, --limit and --column of the "
                                     f"`precompute sample` run")

    def _encode_split(self, split: str, loaded: data.LoadedSplit) -> dict[str, int]:
        c = self.config
        truncated = {"prompt": 0, "response": 0}
        self._rows_by_index = getattr(self, "_rows_by_index", {})
        self._rows_by_index[split] = {r.index: r for r in loaded.rows}
        per = c.examples_per_part
        nparts = (loaded.total_rows + per - 1) // per
        self._pending_base: dict[tuple[str, int], dict] = getattr(self, "_pending_base", {})
        seqs_of_part: list[list] = [[] for _ in range(nparts)]
        for r in loaded.rows:  # rows come in index order, so each part's sequences do too
            for role, text in ((fmt.ROLE_CHOSEN, r.chosen), (fmt.ROLE_REJECTED, r.rejected)):
                enc = chat.encode_example(self.tokenizer, r.prompt, text, c.max_length)
                truncated["prompt"] += enc.prompt_truncated
                truncated["response"] += enc.response_truncated
                seqs_of_part[r.index // per].append((r.index, role, enc.input_ids, enc.prompt_length))
        for part, seqs in enumerate(seqs_of_part):
            self._pending_base[(split, part)] = base_arrays(seqs)
        return truncated

    def write_bases(self) -> None:
        """Tokenised pairs go in first: cheap, and every later step reads them."""
        for (split, part), arrays in self._pending_base.items():
            if not self.store.is_complete(split, part, fmt.SET_PAIRS):
                self.store.write_section(split, part, fmt.SET_PAIRS, fmt.BASE, arrays)
        self._pending_base = {}

    # -- steps ---------------------------------------------------------------

    def steps(self) -> list[Step]:
        c = self.config
        out: list[Step] = []
        if PASS_DPO_REF in c.passes:
            out.append(Step("pairs/student_init", fmt.SET_PAIRS, fmt.SECTION_STUDENT_INIT, ROLE_STUDENT,
                            self._run_sums))
            if self._has_samples():  # DPO reference sums for the groups too (pad_dpo)
                out.append(Step("samples/student_init", fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT, ROLE_STUDENT,
                                self._run_sums))
        if PASS_ADPA in c.passes:
            out.append(Step("generated/base", fmt.SET_GENERATED, fmt.BASE, ROLE_STUDENT, self._run_generate))
        if PASS_PAIRS in c.passes:
            out.append(Step("pairs/teacher", fmt.SET_PAIRS, fmt.SECTION_TEACHER, ROLE_TEACHER, self._run_topk))
        if PASS_PAD in c.passes:
            out.append(Step("samples/teacher", fmt.SET_SAMPLES, fmt.SECTION_TEACHER, ROLE_TEACHER,
                            self._run_samples_topk))
            out.append(Step("samples/teacher_mcq", fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ, ROLE_TEACHER,
                            self._run_mcq))
        if PASS_ADPA in c.passes:
            out.append(Step("generated/teacher", fmt.SET_GENERATED, fmt.SECTION_TEACHER, ROLE_TEACHER,
                            self._run_topk))
            out.append(Step("generated/reference", fmt.SET_GENERATED, fmt.SECTION_REFERENCE, ROLE_REFERENCE,
                            self._run_reference))
        return out

    def _has_samples(self) -> bool:
        return all(self.store.is_complete(split, part, fmt.SET_SAMPLES)
                   for split in self.rows for part in range(self.store.num_parts(split))) and bool(self.rows)

    def step_provenance(self, step: Step) -> dict:
        info = self.model_info[step.model_role]
        prov = {"model": {"name": info.name, "sha256": info.weights_hash}, "dtype": self.dtype_name,
                "max_length": self.config.max_length}
        if step.section == fmt.SECTION_TEACHER:
            prov["top_k"] = self.config.top_k
        if step.section == fmt.SECTION_REFERENCE:
            prov["reference_is"] = "the student's initial model" if not self.config.reference else "given (--reference)"
            prov["at_ids_of"] = "generated/teacher topk_ids"
        if step.section == fmt.SECTION_TEACHER_MCQ:
            template = self.mcq_template
            prov.update({
                "template": {"source": template.source, "sha256": template.sha256},
                "question": "last user message of the dataset row, cut from the left to "
                            f"{self._question_budget()} tokens",
                "options": "response ids decoded without special tokens, stripped",
                "letters": list(calibration.LETTERS),
                "letter_tokens": "every token that decodes alone, stripped, to the letter (case-sensitive)",
                "normalisation": "P(A chosen) = p_A / (p_A + p_B) per ask",
                "orders": "each pair asked with either response as A; P(i over j) is their mean",
                "eps": calibration.MCQ_EPS,
            })
        if step.sequence_set == fmt.SET_GENERATED and step.section == fmt.BASE:
            prov.update({"decoding": "greedy", "responses_per_prompt": 1,
                         "max_new_tokens": self.config.max_new_tokens})
        return prov

    def _part_tokens(self, split: str, part: int, sequence_set: str) -> int:
        attrs = self.store.section_attrs(split, part, sequence_set)
        return int(attrs["rows"]["token"]) if attrs and attrs.get("complete") else 0

    def _run_topk(self, split, part, model, tokenizer, bar):
        base = self.store.read_section(split, part, self._current.sequence_set)
        seqs, prompts = split_sequences(base)
        scored = passes.score_sequences(model, seqs, prompts, top_k=self.config.top_k,
                                        batch_tokens=self.config.batch_tokens, pad_id=self.pad_id,
                                        on_batch=bar.update)
        return scored_arrays(scored, topk=True), sum(map(len, seqs))

    def _run_samples_topk(self, split, part, model, tokenizer, bar):
        arrays, tokens = self._run_topk(split, part, model, tokenizer, bar)
        self._count_groups(split, part)
        return arrays, tokens

    def _count_groups(self, split, part) -> None:
        groups = int(self.store.section_attrs(split, part, fmt.SET_SAMPLES)["rows"].get(fmt.AXIS_GROUP, 0))
        counts = self.__dict__.setdefault("_groups_done", {})
        counts[self._current.name] = counts.get(self._current.name, 0) + groups

    def _question_budget(self) -> int:
        """Longest MCQ question in tokens: the prompt budget the samples were drawn with."""
        drawn = getattr(self, "_samples_provenance", {})
        max_length = drawn.get("max_length", self.config.max_length)
        return max(chat.MIN_PROMPT_TOKENS, max_length - drawn.get("max_new_tokens", self.config.max_new_tokens))

    def _run_mcq(self, split, part, model, tokenizer, bar):
        """PAD's calibration: every pair of a group asked in both orders (see :mod:`precompute.calibration`)."""
        if getattr(self, "_letter_ids", None) is None:
            self._letter_ids = calibration.letter_token_ids(self.tokenizer)
        base = self.store.read_section(split, part, fmt.SET_SAMPLES)
        seqs, prompt_lengths = split_sequences(base)
        group_offsets = base["group_offsets"]
        rows = self._prompt_rows_by_index[split]
        asks, sizes, cut = [], [], 0
        for g, example in enumerate(base["group_example_index"]):
            first, stop = int(group_offsets[g]), int(group_offsets[g + 1])
            question, was_cut = calibration.cut_question(
                self.tokenizer, calibration.last_user_message(rows[int(example)].prompt), self._question_budget())
            cut += was_cut
            options = [calibration.option_text(self.tokenizer, seqs[s][prompt_lengths[s]:]) for s in range(first, stop)]
            for i, j in calibration.unordered_pairs(stop - first):
                for a, b in ((i, j), (j, i)):
                    text = self.mcq_template.render(question, options[a], options[b])
                    asks.append(chat.encode_prompt(self.tokenizer, [{"role": "user", "content": text}]))
            sizes.append(stop - first)
        part_tokens = self._part_tokens(split, part, fmt.SET_SAMPLES)
        done = [0, 0]  # asks done, progress reported (in the sample set's tokens, the bar's unit)

        def progress(n_asks):
            done[0] += n_asks
            now = part_tokens * done[0] // max(1, len(asks))
            bar.update(now - done[1])
            done[1] = now

        letter_logp = calibration.option_logprobs(model, asks, self._letter_ids, batch_tokens=self.config.batch_tokens,
                                                  pad_id=self.pad_id, on_batch=progress)
        p_first = calibration.prob_first_option(letter_logp)
        pair_index, pair_prob, pair_offsets, scores = [], [], [0], []
        stats, at = {}, 0
        for n in sizes:
            u = len(calibration.unordered_pairs(n))
            a_first, a_second = p_first[at:at + 2 * u:2], p_first[at + 1:at + 2 * u:2]
            index, prob = calibration.pair_rows(n, a_first, a_second)
            pair_index.append(index)
            pair_prob.append(prob)
            pair_offsets.append(pair_offsets[-1] + len(index))
            scores.append(calibration.mcq_score(calibration.pair_matrix(index, prob, n)))
            stats = calibration.add_stats(stats, calibration.ask_stats(letter_logp[at:at + 2 * u], a_first, a_second))
            at += 2 * u
        arrays = {
            "pair_index": np.concatenate(pair_index) if pair_index else np.zeros((0, 2), np.int32),
            "pair_prob": (np.concatenate(pair_prob) if pair_prob else np.zeros((0, 2))).astype(np.float32),
            "group_pair_offsets": np.asarray(pair_offsets, dtype=np.int64),
            "mcq_score": (np.concatenate(scores) if scores else np.zeros(0)).astype(np.float32),
        }
        self._count_groups(split, part)
        return arrays, int(sum(map(len, asks))), {"calibration": stats, "questions_cut": int(cut)}

    def _run_sums(self, split, part, model, tokenizer, bar):
        base = self.store.read_section(split, part, self._current.sequence_set)
        seqs, prompts = split_sequences(base)
        scored = passes.score_sequences(model, seqs, prompts, batch_tokens=self.config.batch_tokens,
                                        pad_id=self.pad_id, on_batch=bar.update)
        return scored_arrays(scored), sum(map(len, seqs))

    def _run_reference(self, split, part, model, tokenizer, bar):
        sequence_set = self._current.sequence_set
        base = self.store.read_section(split, part, sequence_set)
        teacher_ids = self.store.read_section(split, part, sequence_set, fmt.SECTION_TEACHER, ["topk_ids"])["topk_ids"]
        seqs, prompts = split_sequences(base)
        off = base["response_offsets"]
        at = [teacher_ids[off[s]:off[s + 1]] for s in range(len(seqs))]
        scored = passes.score_sequences(model, seqs, prompts, at_ids=at, batch_tokens=self.config.batch_tokens,
                                        pad_id=self.pad_id, on_batch=bar.update)
        return scored_arrays(scored, at_ids=True), sum(map(len, seqs))

    def _run_generate(self, split, part, model, tokenizer, bar):
        c = self.config
        start, stop = self.store.part_range(split, part)
        rows = [self._rows_by_index[split][i] for i in range(start, stop) if i in self._rows_by_index[split]]
        budget = max(chat.MIN_PROMPT_TOKENS, c.max_length - c.max_new_tokens)
        prompts = [chat.encode_prompt(self.tokenizer, r.prompt, budget) for r in rows]
        answers = passes.generate_greedy(model, prompts, max_new_tokens=c.max_new_tokens,
                                         eos_ids=[self.eot_id], pad_id=self.pad_id,
                                         batch_size=c.generation_batch, on_batch=bar.update)
        seqs = [(r.index, fmt.ROLE_GENERATED, np.concatenate([p, a]).astype(np.int64), len(p))
                for r, p, a in zip(rows, prompts, answers) if len(a) > 0]
        return base_arrays(seqs), sum(len(s[2]) for s in seqs)

    def _write_async(self, split, part, step: Step, arrays, attrs: dict | None = None) -> None:
        if self._pending is not None:
            self._pending.result()
        self._pending = self._writer.submit(self.store.write_section, split, part, step.sequence_set,
                                            step.section, arrays, attrs)

    def _flush(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def run_steps(self) -> None:
        steps = self.steps()
        for step in steps:
            self.store.register_pass(step.name, self.step_provenance(step))
        model = tokenizer = self._loaded_path = None
        for step in steps:
            todo = [(split, part) for split in self.rows for part in range(self.store.num_parts(split))
                    if not self.store.is_complete(split, part, step.sequence_set, step.section)]
            record = {"step": step.name, "parts_done": 0, "parts_skipped": 0, "tokens": 0, "seconds": 0.0}
            record["parts_skipped"] = sum(self.store.num_parts(s) for s in self.rows) - len(todo)
            self.summary.steps.append(record)
            if not todo:
                continue
            info = self.model_info[step.model_role]
            if info.path != self._loaded_path:  # the reference is often the student: same weights, no reload
                model = tokenizer = None  # unload before the next model loads
                _free_memory()
                model, tokenizer, _ = models.load_model(info.path, device=self.device, dtype=self.dtype_name)
                self._loaded_path = info.path
                if step.section != fmt.BASE:
                    self._self_check(model, todo[0])
            self._current = step
            total = sum(self._part_tokens(s, p, step.sequence_set) for s, p in todo) or None
            t0 = time.perf_counter()
            with tqdm(total=total, desc=step.name, unit="tok", unit_scale=True, disable=not self.config.progress,
                      dynamic_ncols=True) as bar:
                for split, part in todo:
                    arrays, tokens, *attrs = step.run(split, part, model, tokenizer, bar)  # attrs: optional
                    self._write_async(split, part, step, arrays, attrs[0] if attrs else None)
                    record["parts_done"] += 1
                    record["tokens"] += tokens
                self._flush()
            record["seconds"] = time.perf_counter() - t0
        model = tokenizer = None
        _free_memory()

    def _self_check(self, model, where) -> None:
        split, part = where
        base = self.store.read_section(split, part, self._first_set_with_base(split, part))
        seqs, prompts = split_sequences(base)
        if seqs:
            passes.check_head_path(model, seqs[0], prompts[0])

    def _first_set_with_base(self, split, part) -> str:
        for sequence_set in (fmt.SET_PAIRS, fmt.SET_GENERATED, fmt.SET_SAMPLES):
            if self.store.is_complete(split, part, sequence_set):
                return sequence_set
        return fmt.SET_PAIRS

    def finish(self) -> Summary:
        if PASS_PAD in self.config.passes:
            self.summary.notes.extend(self._pad_notes())
        return finish_summary(self.store, self.rows, self.summary)

    def _pad_notes(self) -> list[str]:
        """Position bias and judgement over the store's complete MCQ parts; cost per group of this run."""
        stats = {}
        for split in self.rows:
            for part in self.store.complete_parts(split, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ):
                attrs = self.store.section_attrs(split, part, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
                stats = calibration.add_stats(stats, attrs.get("calibration", {}))
        lines = calibration.describe_stats(stats)
        costs = []
        groups_done = getattr(self, "_groups_done", {})
        for record in self.summary.steps:
            groups = groups_done.get(record["step"], 0)
            if not record["step"].startswith(fmt.SET_SAMPLES + "/"):
                continue
            if groups:
                costs.append(f"{record['step']} {record['seconds'] / groups:.3f} s and "
                             f"{record['tokens'] / groups:.0f} tokens")
            else:
                costs.append(f"{record['step']} " + ("no groups" if record["parts_done"] else "already complete"))
        lines.append("  pad cost per group: " + "; ".join(costs))
        return lines


def _free_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_teacher(config: TeacherConfig) -> Summary:
    t0 = time.perf_counter()
    run = TeacherRun(config)
    run.prepare()
    run.write_bases()
    run.run_steps()
    run.summary.seconds = time.perf_counter() - t0
    return run.finish()
