"""``precompute teacher --cross-tokenizer``: a teacher whose tokenizer differs from the student's, by text.

The store's sequences stay the student's token ids. Each teacher step reads a
part's sequences, turns every response into text and into the teacher's own
tokens (:mod:`lm.xtok`: the row's prompt messages and the response's text
through the teacher's chat template), runs the teacher over those, and writes a
section on the student's rows (:data:`store.format.DESCRIPTION`
``"cross_tokenizer"``):

- sequence level (every set; what PAD, pad_dpo and ``train evaluate``'s
  teacher agreement read): ``logp_sum``, the teacher's log-prob of the response
  text summed over its own response tokens, and ``teacher_length``, their
  number. PAD's mean log-prob is their ratio: length normalised by TEACHER
  tokens, the teacher's own mean token log-prob of the response, which with one
  tokenizer is exactly today's number (docs/methods.md);
- token level, per student response row (what kd, dckd and adpa read): the
  alignment code, the teacher's top-K in its own ids at the aligned teacher row
  (``teacher_topk_ids``/``teacher_topk_logp``), that top-K mapped into the
  student's vocabulary through the store's vocabulary map (:func:`map_top_k`:
  ``topk_ids``, ``topk_logp``, ``topk_count``, ``tail_logp``, every unmapped id's
  mass in the tail), the chunks' teacher log-probs, and both tokenizations'
  character spans.

The reference of ADPA shares the teacher's tokenizer: :func:`reference_step`
runs it over the same teacher tokens at the teacher's raw top-K ids and merges
its log-probs exactly as the teacher's were (:func:`merge_at`). PAD's
calibration asks the teacher in its own template and vocabulary, the options
decoded by the student's tokenizer (:mod:`precompute.calibration`).

The vocabulary map is computed once per pair of tokenizers (a few seconds, no
model) and kept at the store's root (:mod:`store.vocab_map`); a later run reads
it back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm import chat, models, xtok
from lm.head import check_split
from store import format as fmt
from store.format import LOGP_FLOOR
from store.sequences import split_sequences
from store.vocab_map import cross_tokenizer_record, map_sha256, read_vocab_map, write_vocab_map

from . import scoring
from .summary import StepResult

#: raw top-K entries whose (stored) log-prob is not above this are padding or of no mass: left out of the map
#: (an adaptive K pads at LOGP_FLOOR; a float32 probability of exp(-499) is 0)
KEPT_ABOVE = LOGP_FLOOR + 1.0
STAT_KEYS = ("rows", "exact", "starts_together", "none", "chunk_rows", "topk_mass", "mapped_mass")


@dataclass
class CrossTokenizer:
    """Both tokenizers of a cross-tokenizer run and what is derived from them once (no model)."""

    teacher: object  # the teacher's tokenizer (the reference's too)
    student: object  # the store's: the tokenizer of input_ids
    teacher_name: str
    student_name: str
    vocab_map: np.ndarray  # [teacher ids] int32, -1 where unmapped
    teacher_end_ids: list[int]
    student_end_ids: list[int]
    teacher_pad_id: int
    hashes: tuple[str, str] = ("", "")  # (teacher, student) tokenizer hashes

    @classmethod
    def build(cls, teacher, student, *, teacher_name: str, student_name: str, teacher_size: int,
              teacher_end_ids: list[int], student_end_ids: list[int]) -> "CrossTokenizer":
        vocab_map = xtok.vocabulary_map(teacher, student, teacher_size=teacher_size, teacher_end_ids=teacher_end_ids,
                                        student_end_id=student_end_ids[0])
        return cls(teacher, student, teacher_name, student_name, vocab_map, list(teacher_end_ids),
                   list(student_end_ids), chat.pad_id(teacher), (chat.tokenizer_hash(teacher),
                                                                 chat.tokenizer_hash(student)))

    def record(self) -> dict:
        """The root attribute ``cross_tokenizer`` (the map's entry is added when it is written)."""
        return {"teacher_tokenizer": {"name": self.teacher_name, "hash": self.hashes[0]},
                "student_tokenizer": {"name": self.student_name, "hash": self.hashes[1]}, "rule": xtok.RULE}

    def provenance(self) -> dict:
        """What a cross-tokenizer section's numbers depend on besides its model and settings (its pass record)."""
        return {"teacher_tokenizer_sha256": self.hashes[0], "rule": xtok.RULE,
                "vocab_map_sha256": map_sha256(self.vocab_map)}

    def keep_in(self, store) -> None:
        """Write the map into ``store`` the first time; afterwards the stored one is used (read back, checked)."""
        if cross_tokenizer_record(store) is not None:
            stored = read_vocab_map(store)
            if map_sha256(stored) == map_sha256(self.vocab_map):
                self.vocab_map = stored
                return
        write_vocab_map(store, self.vocab_map, self.record())

    def texts(self, sequences, prompt_lengths) -> list[xtok.ResponseText]:
        return [xtok.response_text(self.student, ids[p:], self.student_end_ids)
                for ids, p in zip(sequences, prompt_lengths)]

    def teacher_examples(self, prompts: list[list[dict]], texts: list[xtok.ResponseText],
                         max_length: int) -> list[xtok.TeacherExample]:
        return [xtok.teacher_example(self.teacher, prompt, text, max_length) for prompt, text in zip(prompts, texts)]


# --------------------------------------------------------------------------- the map applied to a top-K

@dataclass(frozen=True)
class Mapped:
    """A teacher top-K mapped into the student's vocabulary (module docstring of :func:`map_top_k`)."""

    ids: np.ndarray  # [R, K] int64 student ids, 0 past count
    logp: np.ndarray  # [R, K] float32, LOGP_FLOOR past count
    count: np.ndarray  # [R] int64, 0..K
    tail: np.ndarray  # [R] float32
    kept_mass: np.ndarray  # [R] float64: the teacher's mass on its kept top-K entries
    mapped_mass: np.ndarray  # [R] float64: the part of it the map keeps


def _groups(raw_ids: np.ndarray, kept: np.ndarray, vocab_map: np.ndarray):
    """The kept, mapped entries grouped by (row, student id): (rows, cols, student ids, group of each entry,
    group keys, first entry of each group)."""
    size = int(vocab_map.max(initial=-1)) + 2
    mapped = np.where(kept, vocab_map[np.clip(raw_ids, 0, vocab_map.shape[0] - 1)], -1)
    rows, cols = np.nonzero(mapped >= 0)  # row-major: within a row, most likely first
    student = mapped[rows, cols].astype(np.int64)
    keys = rows.astype(np.int64) * size + student
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return rows, cols, student, inverse.reshape(-1), unique, first, size


def _logsumexp_groups(values: np.ndarray, inverse: np.ndarray, groups: int) -> np.ndarray:
    top = np.full(groups, -np.inf)
    np.maximum.at(top, inverse, values)
    safe = np.where(np.isfinite(top), top, 0.0)
    total = np.zeros(groups)
    np.add.at(total, inverse, np.exp(values - safe[inverse]))
    with np.errstate(divide="ignore"):
        return safe + np.log(total)


def map_top_k(raw_ids: np.ndarray, raw_logp: np.ndarray, raw_count: np.ndarray, raw_tail: np.ndarray,
              vocab_map: np.ndarray) -> Mapped:
    """The teacher's top-K per row mapped into the student's vocabulary.

    Kept entries (``j < raw_count[r]``, log-prob above :data:`KEPT_ABOVE`) whose map
    is not -1 become bins; entries mapping to one student id are merged (log of the
    summed probability); the bins are sorted most likely first (ties: the teacher's
    order), the rest of the row is padding (id 0, :data:`store.format.LOGP_FLOOR`).
    The tail is ``log(exp(raw_tail) + sum of the unmapped kept entries' probabilities)``:
    every teacher id outside the mapped ones. With the identity map and nothing at the
    floor, ids, log-probs and tail are the raw ones, bit for bit.
    """
    R, K = raw_ids.shape
    logp64 = raw_logp.astype(np.float64)
    kept = (np.arange(K)[None, :] < np.asarray(raw_count)[:, None]) & (raw_logp > KEPT_ABOVE)
    rows, cols, student, inverse, unique, first, size = _groups(raw_ids, kept, vocab_map)
    merged = _logsumexp_groups(logp64[rows, cols], inverse, unique.shape[0])
    group_row, group_first = rows[first], cols[first]
    order = np.lexsort((group_first, -merged, group_row))
    count = np.bincount(group_row, minlength=R).astype(np.int64)
    start = np.cumsum(count) - count
    position = np.arange(order.shape[0]) - start[group_row[order]]
    ids = np.zeros((R, K), dtype=np.int64)
    logp = np.full((R, K), LOGP_FLOOR, dtype=np.float32)
    ids[group_row[order], position] = unique[order] % size
    logp[group_row[order], position] = merged[order].astype(np.float32)
    unmapped = kept.copy()
    unmapped[rows, cols] = False
    with np.errstate(divide="ignore"):
        lost = np.log(np.where(unmapped, np.exp(logp64), 0.0).sum(1))
    tail = np.logaddexp(np.asarray(raw_tail, dtype=np.float64), lost).astype(np.float32)
    kept_mass = np.where(kept, np.exp(logp64), 0.0).sum(1)
    mapped_mass = np.where(kept & ~unmapped, np.exp(logp64), 0.0).sum(1)
    return Mapped(ids, logp, count, tail, kept_mass, mapped_mass)


def merge_at(raw_ids: np.ndarray, raw_logp: np.ndarray, values: np.ndarray, vocab_map: np.ndarray,
             mapped_ids: np.ndarray, mapped_count: np.ndarray) -> np.ndarray:
    """``[R, K]`` float32: another model's log-probs ``values`` at the raw teacher ids, merged as
    :func:`map_top_k` merged the teacher's (same kept entries, log of the summed probability per student id)
    and placed at the teacher's mapped entries ``mapped_ids[:, :mapped_count]``; the floor past the count."""
    R, K = raw_ids.shape
    kept = raw_logp > KEPT_ABOVE - 2 * fmt.LOGP_MAX_ABS_ERROR  # the stored values: every entry the teacher kept
    rows, cols, student, inverse, unique, first, size = _groups(raw_ids, kept, vocab_map)
    merged = _logsumexp_groups(values.astype(np.float64)[rows, cols], inverse, unique.shape[0])
    out = np.full((R, K), LOGP_FLOOR, dtype=np.float32)
    at = np.arange(K)[None, :] < np.asarray(mapped_count)[:, None]
    r, k = np.nonzero(at)
    wanted = r.astype(np.int64) * size + mapped_ids[r, k].astype(np.int64)
    where = np.searchsorted(unique, wanted)
    found = (where < unique.shape[0]) & (unique[np.minimum(where, max(unique.shape[0] - 1, 0))] == wanted
                                          if unique.shape[0] else np.zeros_like(wanted, dtype=bool))
    if not found.all():
        raise ValueError("a mapped teacher entry has no raw entry behind it: the teacher section does not belong "
                         "to these ids")
    out[r, k] = merged[where].astype(np.float32)
    return out


# --------------------------------------------------------------------------- running the teacher over text

@dataclass
class _Part:
    """One part's sequences as the teacher reads them."""

    texts: list[xtok.ResponseText]
    examples: list[xtok.TeacherExample]
    alignments: list[xtok.Alignment]
    scorable: list[int]  # sequences whose teacher response has at least one token


def _part(ctx, step, split: str, part: int) -> tuple[_Part, dict]:
    cross = ctx.xtok
    base = ctx.store.read_section(split, part, step.sequence_set)
    seqs, prompt_lengths = split_sequences(base)
    rows = {r.index: r for r in ctx.rows_of_part(split, part, prompts=step.sequence_set == fmt.SET_SAMPLES)}
    missing = sorted({int(e) for e in base[fmt.ARRAY_EXAMPLE_INDEX]} - set(rows))
    if missing:
        raise ValueError(f"{split} part {part}: the rows of examples {missing[:5]} were not loaded; the teacher "
                         f"reads each row's prompt: use the --dataset, --limit and --column of the store's rows")
    prompts = [rows[int(e)].prompt for e in base[fmt.ARRAY_EXAMPLE_INDEX]]
    texts = cross.texts(seqs, prompt_lengths)
    examples = cross.teacher_examples(prompts, texts, ctx.config.max_length)
    alignments = [xtok.align(t.spans, e.spans) for t, e in zip(texts, examples)]
    scorable = [s for s, e in enumerate(examples) if 0 < e.prompt_length < len(e.input_ids)]
    return _Part(texts, examples, alignments, scorable), base


def _score(ctx, model, part: _Part, progress, **kwargs) -> list[scoring.Scored | None]:
    sequences = [part.examples[s].input_ids for s in part.scorable]
    lengths = [part.examples[s].prompt_length for s in part.scorable]
    scored = scoring.score_sequences(model, sequences, lengths, batch_tokens=ctx.config.batch_tokens,
                                     pad_id=ctx.xtok.teacher_pad_id, on_batch=progress, **kwargs) if sequences else []
    out: list[scoring.Scored | None] = [None] * len(part.examples)
    for s, result in zip(part.scorable, scored):
        out[s] = result
    return out


def _rows_of(alignment: xtok.Alignment, scored: scoring.Scored | None) -> np.ndarray:
    """The teacher row of each student row, -1 where none (or where the teacher had nothing to score)."""
    return alignment.teacher_row if scored is not None else np.full_like(alignment.teacher_row, -1)


def topk_step(ctx, step, split: str, part: int, model, progress) -> StepResult:
    """The teacher's signals over a part's responses read as text (module docstring)."""
    data, base = _part(ctx, step, split, part)
    k = ctx.top_k_of(step)
    scored = _score(ctx, model, data, progress, top_k=k, top_p=ctx.config.top_p)
    raw_ids, raw_logp, raw_count, raw_tail, target, chunk_logp = [], [], [], [], [], []
    sums, lengths, spans, offsets = [], [], [], [0]
    for alignment, result, example in zip(data.alignments, scored, data.examples):
        rows = _rows_of(alignment, result)
        n, aligned = rows.shape[0], rows >= 0
        at = np.where(aligned, rows, 0)
        if result is None:
            ids, logp = np.zeros((n, k), np.int64), np.full((n, k), LOGP_FLOOR, np.float32)
            count, tail, own = np.zeros(n, np.int64), np.zeros(n, np.float32), np.zeros(n, np.float32)
            teacher_logp = np.zeros(0, np.float64)
        else:
            ids = np.where(aligned[:, None], result.topk_ids[at], 0)
            logp = np.where(aligned[:, None], result.topk_logp[at], np.float32(LOGP_FLOOR))
            full = result.topk_count[at] if result.topk_count is not None else np.full(n, k)
            count = np.where(aligned, full, 0)
            tail = np.where(aligned, result.tail_logp[at], np.float32(0.0))
            own = np.where(aligned, result.target_logp[at], np.float32(0.0))
            teacher_logp = result.target_logp.astype(np.float64)
        chunk = np.zeros(n, np.float32)
        ends = np.nonzero(alignment.chunk_length)[0]
        for j in ends:
            t0, t1 = alignment.chunk_teacher[j]
            chunk[j] = teacher_logp[t0:t1].sum() if t1 <= teacher_logp.shape[0] else 0.0
        if result is None:
            alignment.chunk_length[:] = 0
        raw_ids.append(ids)
        raw_logp.append(logp)
        raw_count.append(count)
        raw_tail.append(tail)
        target.append(own)
        chunk_logp.append(chunk)
        sums.append(result.logp_sum if result is not None else 0.0)
        lengths.append(len(example.input_ids) - example.prompt_length if result is not None else 0)
        spans.append(example.spans)
        offsets.append(offsets[-1] + example.spans.shape[0])
    codes = [np.where(_rows_of(a, s) >= 0, a.code, xtok.NONE).astype(np.int8) for a, s in zip(data.alignments, scored)]
    raw_ids_all = _cat(raw_ids, (0, k), np.int64)
    raw_logp_all = _cat(raw_logp, (0, k), np.float32)
    mapped = map_top_k(raw_ids_all, raw_logp_all, _cat(raw_count, (0,), np.int64), _cat(raw_tail, (0,), np.float32),
                       ctx.xtok.vocab_map)
    code = _cat(codes, (0,), np.int8)
    arrays = {
        fmt.ARRAY_TOPK_IDS: mapped.ids, fmt.ARRAY_TOPK_LOGP: mapped.logp, fmt.ARRAY_TAIL_LOGP: mapped.tail,
        fmt.ARRAY_TOPK_COUNT: mapped.count.astype(np.uint16),
        fmt.ARRAY_TARGET_LOGP: _cat(target, (0,), np.float32),
        fmt.ARRAY_LOGP_SUM: np.asarray(sums, dtype=np.float32),
        fmt.ARRAY_ALIGNMENT: code,
        fmt.ARRAY_TEACHER_TOPK_IDS: raw_ids_all.astype(np.int32),
        fmt.ARRAY_TEACHER_TOPK_LOGP: raw_logp_all,
        fmt.ARRAY_CHUNK_LENGTH: _cat([a.chunk_length for a in data.alignments], (0,), np.int32),
        fmt.ARRAY_CHUNK_LOGP: _cat(chunk_logp, (0,), np.float32),
        fmt.ARRAY_STUDENT_SPAN: _cat([t.spans for t in data.texts], (0, 2), np.int32),
        fmt.ARRAY_TEACHER_LENGTH: np.asarray(lengths, dtype=np.int32),
        fmt.ARRAY_TEACHER_TOKEN_OFFSETS: np.asarray(offsets, dtype=np.int64),
        fmt.ARRAY_TEACHER_SPAN: _cat(spans, (0, 2), np.int32),
    }
    exact = code == xtok.EXACT
    stats = {"rows": int(code.shape[0]), "exact": int(exact.sum()), "starts_together": int((code == xtok.STARTS).sum()),
             "none": int((code == xtok.NONE).sum()), "chunk_rows": int(arrays[fmt.ARRAY_CHUNK_LENGTH].sum()),
             "topk_mass": float(mapped.kept_mass[exact].sum()), "mapped_mass": float(mapped.mapped_mass[exact].sum())}
    groups = int(ctx.store.section_attrs(split, part, fmt.SET_SAMPLES)["rows"].get(fmt.AXIS_GROUP, 0)) \
        if step.sequence_set == fmt.SET_SAMPLES else 0
    teacher_tokens = sum(len(data.examples[s].input_ids) for s in data.scorable)
    return StepResult(arrays, teacher_tokens, {fmt.ATTR_CROSS_TOKENIZER: stats}, groups=groups)


def reference_step(ctx, step, split: str, part: int, model, progress) -> StepResult:
    """ADPA's reference (the teacher's tokenizer) at the teacher's raw top-K ids of the same teacher rows, merged
    as the teacher's were (:func:`merge_at`)."""
    data, base = _part(ctx, step, split, part)
    teacher = ctx.store.read_section(split, part, step.sequence_set, fmt.SECTION_TEACHER,
                                     [fmt.ARRAY_TEACHER_TOPK_IDS, fmt.ARRAY_TEACHER_TOPK_LOGP, fmt.ARRAY_TOPK_IDS,
                                      fmt.ARRAY_TOPK_COUNT])
    raw_ids = teacher[fmt.ARRAY_TEACHER_TOPK_IDS].astype(np.int64)
    k = raw_ids.shape[1]
    response_offsets = base[fmt.ARRAY_RESPONSE_OFFSETS]
    at_ids = []
    for s in data.scorable:
        example, alignment = data.examples[s], data.alignments[s]
        given = np.zeros((len(example.input_ids) - example.prompt_length, k), dtype=np.int64)
        aligned = alignment.teacher_row >= 0
        given[alignment.teacher_row[aligned]] = raw_ids[response_offsets[s]:response_offsets[s + 1]][aligned]
        at_ids.append(given)
    scored = _score(ctx, model, data, progress, at_ids=at_ids)
    values = np.full(raw_ids.shape, LOGP_FLOOR, dtype=np.float32)
    target = np.zeros(raw_ids.shape[0], dtype=np.float32)
    sums = np.zeros(len(data.examples), dtype=np.float32)
    for s, (alignment, result) in enumerate(zip(data.alignments, scored)):
        if result is None:
            continue
        rows = alignment.teacher_row
        aligned = rows >= 0
        start = response_offsets[s]
        where = start + np.nonzero(aligned)[0]
        values[where] = result.at_ids_logp[rows[aligned]]
        target[where] = result.target_logp[rows[aligned]]
        sums[s] = result.logp_sum
    merged = merge_at(raw_ids, teacher[fmt.ARRAY_TEACHER_TOPK_LOGP], values, ctx.xtok.vocab_map,
                      teacher[fmt.ARRAY_TOPK_IDS].astype(np.int64), teacher[fmt.ARRAY_TOPK_COUNT].astype(np.int64))
    arrays = {fmt.ARRAY_TOPK_LOGP: merged, fmt.ARRAY_TARGET_LOGP: target, fmt.ARRAY_LOGP_SUM: sums}
    return StepResult(arrays, sum(len(data.examples[s].input_ids) for s in data.scorable))


def check_model(ctx, model, split: str, part: int, sequence_set: str) -> None:
    """:func:`lm.head.check_split` on the teacher's own tokens of the part's first sequence."""
    seqs, prompt_lengths = split_sequences(ctx.store.read_section(split, part, sequence_set))
    if not seqs:
        return
    rows = {r.index: r for r in ctx.rows_of_part(split, part, prompts=sequence_set == fmt.SET_SAMPLES)}
    example_index = int(ctx.store.read_section(split, part, sequence_set, fmt.BASE,
                                               [fmt.ARRAY_EXAMPLE_INDEX])[fmt.ARRAY_EXAMPLE_INDEX][0])
    if example_index not in rows:
        return
    text = ctx.xtok.texts(seqs[:1], prompt_lengths[:1])[0]
    example = ctx.xtok.teacher_examples([rows[example_index].prompt], [text], ctx.config.max_length)[0]
    if 0 < example.prompt_length < len(example.input_ids):
        check_split(model, example.input_ids, example.prompt_length)


def _cat(parts: list[np.ndarray], empty_shape: tuple, dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype=dtype)


# --------------------------------------------------------------------------- the summary

def add_stats(total: dict, more: dict) -> dict:
    return {key: total.get(key, 0) + (more or {}).get(key, 0) for key in STAT_KEYS}


def describe_stats(step: str, stats: dict) -> list[str]:
    """Summary lines of one step: the share of exact rows, what is suppressed, the top-K mass the map keeps."""
    rows = stats.get("rows", 0)
    if not rows:
        return []
    share = lambda key: 100.0 * stats.get(key, 0) / rows  # noqa: E731
    kept = stats.get("topk_mass", 0.0)
    mass = f"{100.0 * stats.get('mapped_mass', 0.0) / kept:.1f}%" if kept > 0 else "n/a"
    return [f"  {step} across tokenizers: {rows} student response tokens, {share('exact'):.1f}% with an exactly "
            f"matching teacher token, {share('starts_together'):.1f}% starting together, {share('none'):.1f}% "
            f"with no teacher token starting there (no token-level signal but chunks); {share('chunk_rows'):.1f}% "
            f"in aligned chunks; the vocabulary map keeps {mass} of the teacher's top-K mass on exact tokens"]


def summary_lines(store, splits, steps) -> list[str]:
    """Per cross-tokenizer teacher step of this run: its statistics over the store's complete parts."""
    lines = []
    for step in steps:
        if step.section != fmt.SECTION_TEACHER:
            continue
        stats: dict = {}
        for split in splits:
            for part in store.complete_parts(split, step.sequence_set, step.section):
                attrs = store.section_attrs(split, part, step.sequence_set, step.section) or {}
                stats = add_stats(stats, attrs.get(fmt.ATTR_CROSS_TOKENIZER))
        lines.extend(describe_stats(step.name, stats))
    return lines


def student_model_info(config, store_tokenizer_name: str | None) -> models.ModelInfo:
    """The student whose tokenizer wrote (or will write) the store's ids: ``--student``, else the model the store's
    tokenizer record names, else the embedded student."""
    spec = config.student or store_tokenizer_name
    return models.resolve_model(spec, models.EMBEDDED_STUDENT)
