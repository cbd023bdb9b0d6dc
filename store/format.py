"""The teacher-signal store format, version 4 (version 1, 2 and 3 stores are still read).

This module *is* the format: every group name, array name, axis, dtype and codec
that a store may hold is declared here, and nothing else in the project spells
them out. A reader who has never seen this project can open a store with plain
``zarr`` and read :data:`DESCRIPTION` from the root attributes
(``format_description``) to understand it.

Layout (Zarr v3)::

    <root>/                      attrs: format, format_description, provenance, layout, manifest
      <split>/                   "train", "test"
        part-00000/              attrs: example_start, example_stop (examples [start, stop))
          <set>/                 a *sequence set*: "pairs", "generated" or "samples"
            (base arrays)        attrs: complete, checksums, ...
            <section>/           signals one model computed for these sequences
              (section arrays)   attrs: complete, checksums, ...

A *part* covers a contiguous range of example indices of one split. Inside a part
every sequence set keeps a flat token axis (no padding) with CSR offsets:

- token axis ``[T]``: ``input_ids``, ``loss_mask``; sequence ``s`` is
  ``input_ids[token_offsets[s]:token_offsets[s+1]]``, its first ``prompt_length[s]``
  tokens are the prompt.
- response axis ``[R]`` (response tokens only): sequence ``s`` owns rows
  ``response_offsets[s]:response_offsets[s+1]``; row ``j`` of that range describes
  the teacher's next-token distribution *before* response token ``j``, i.e. the
  distribution that predicts ``input_ids[token_offsets[s] + prompt_length[s] + j]``.
- group axis ``[G]`` (sampled sets only): group ``g`` is sequences
  ``group_offsets[g]:group_offsets[g+1]``, all answers to one prompt.

A section (and a set's base arrays) counts only once its group attribute
``complete`` is true; that flag is written last, after every chunk is durable,
together with a sha256 per array of its decoded bytes.

Version 2 differs from version 1 in two things, both listed in
:data:`VERSION_CHANGES`: a teacher section may hold ``tail_logp``, the exact log
of the teacher's probability mass outside its top-K (see :data:`DESCRIPTION`
``"tail"`` for how readers use it), and the large arrays (token ids, log-probs)
are compressed with Blosc (zstd inside, byte shuffle), a codec of the Zarr v3
core, instead of numcodecs' shuffle followed by zstd. The values a reader gets
back are the same kind in both versions.

Version 3 adds an adaptive K: a teacher section may hold
``topk_count``, the number of entries of each row's top-K that are kept (the
fewest whose mass reaches the pass's ``top_p``, at most K); entries past it are
padding (id 0, log-prob at :data:`LOGP_FLOOR`) and the tail carries the mass of
every id outside the kept ones (:data:`DESCRIPTION` ``"adaptive_k"``). Without
``topk_count`` every entry is kept, as in versions 1 and 2. The version moved
because a version 2 reader would take the padding for bins.

Version 4 (this writer) changes only how the same values are encoded, so that
any Zarr v3 implementation (zarr-python, TensorStore, zarrs, zarr.js) reads
every array: each array's codecs are ``bytes``, then Blosc (zstd inside, byte
shuffle) or, for one-byte items, the registered ``zstd``, then ``crc32c``, a
checksum of every chunk that readers check on every read. No numcodecs codec
remains. Quantised log-probs are stored as uint16 integers with their scale in
the array's attributes (:func:`array_attributes`), and the teacher's sorted
top-K log-probs as per-row steps along K under another name,
``topk_logp_steps`` (:data:`ARRAY_TOPK_LOGP_STEPS`), so that a reader which
does not know the rule finds no ``topk_logp`` rather than misreading one.
:func:`decode_stored` is the rule; decoded values, hence checksums and content
keys, are those of version 3, bit for bit. Readers accept
:data:`READABLE_VERSIONS`; writers write only :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass

import numpy as np

FORMAT_NAME = "distill-cache/teacher-signal-store"
FORMAT_VERSION = 4
#: versions a reader of this module understands (a version 1 store has no ``tail_logp`` and other codecs,
#: versions 1 and 2 no ``topk_count``, versions 1 to 3 numcodecs codecs and no crc32c)
READABLE_VERSIONS = (1, 2, 3, 4)
VERSION_CHANGES = {
    2: "teacher sections may hold tail_logp (the exact log tail mass); token ids and log-probs use the "
       "core Blosc codec (zstd, byte shuffle) instead of numcodecs shuffle + zstd; sampled sets may hold "
       "a 'judge' section (CycleAlign's rankings)",
    3: "teacher sections may hold topk_count (an adaptive K, precompute teacher --top-p): row r keeps its first "
       "topk_count[r] top-K entries, the others are padding (id 0, log-prob at the floor) and its tail_logp is "
       "the mass outside the kept ids",
    4: "every array is encoded with codecs of the Zarr v3 specification and its registered extensions only "
       "(bytes, blosc or zstd, crc32c), readable by any Zarr v3 implementation, and every chunk ends with a "
       "crc32c that readers check; quantised log-probs are uint16 integers whose scale is in the array's "
       "attributes, and the teacher's topk_logp is stored as topk_logp_steps (per-row steps along K: readers "
       "cumulate them, then scale; every sorted log-prob array NAME is stored as NAME_steps); decoded values are "
       "version 3's, bit for bit; optional arrays: a teacher section across tokenizers (precompute teacher "
       "--cross-tokenizer: alignment, spans, the teacher's own top-K beside the mapped one, teacher_length, "
       "chunks) with the root group vocab_map, and tail samples (tail_sample_ids, tail_sample_logp: precompute "
       "teacher --tail-samples S, S draws from the teacher's distribution outside the kept top-K, see "
       "'tail_samples'), with a K that may be 0 (a pure sampled store)",
}

SPLITS = ("train", "test")

# Sequence sets -------------------------------------------------------------
SET_PAIRS = "pairs"  # the dataset's chosen and rejected responses
SET_GENERATED = "generated"  # the student's own responses (ADPA), one per prompt
SET_SAMPLES = "samples"  # groups of sampled responses per prompt (PAD, ranking)
SEQUENCE_SETS = (SET_PAIRS, SET_GENERATED, SET_SAMPLES)

# Sections: which model computed the signals --------------------------------
BASE = "base"  # pseudo-section name for a set's own arrays (tokens, offsets)
SECTION_TEACHER = "teacher"  # aligned teacher: top-K, target log-prob, sums
SECTION_REFERENCE = "reference"  # reference teacher at the teacher's top-K ids (ADPA)
SECTION_STUDENT_INIT = "student_init"  # the student's initial model (DPO reference)
SECTION_TEACHER_MCQ = "teacher_mcq"  # teacher's pairwise judgements of a group (PAD)
SECTION_JUDGE = "judge"  # a black box's ranking of each group and its agreement with the student's (CycleAlign)
SECTIONS = (SECTION_TEACHER, SECTION_REFERENCE, SECTION_STUDENT_INIT, SECTION_TEACHER_MCQ, SECTION_JUDGE)


def pass_name(sequence_set: str, section: str = BASE) -> str:
    """``<set>/<section>``: the name of what writes one section of a set, as the root attribute ``passes``
    records it and as content keys (:mod:`store.keys`) name their kind; a set's own arrays are ``<set>/base``."""
    return f"{sequence_set}/{section}"


# Passes: every section that something writes --------------------------------
PASS_PAIRS_BASE = pass_name(SET_PAIRS)  # the dataset's pairs, tokenised
PASS_PAIRS_TEACHER = pass_name(SET_PAIRS, SECTION_TEACHER)
PASS_PAIRS_STUDENT_INIT = pass_name(SET_PAIRS, SECTION_STUDENT_INIT)
PASS_GENERATED_BASE = pass_name(SET_GENERATED)  # the student's answers
PASS_GENERATED_TEACHER = pass_name(SET_GENERATED, SECTION_TEACHER)
PASS_GENERATED_REFERENCE = pass_name(SET_GENERATED, SECTION_REFERENCE)
PASS_SAMPLES_BASE = pass_name(SET_SAMPLES)  # the sampled groups
PASS_SAMPLES_TEACHER = pass_name(SET_SAMPLES, SECTION_TEACHER)
PASS_SAMPLES_TEACHER_MCQ = pass_name(SET_SAMPLES, SECTION_TEACHER_MCQ)
PASS_SAMPLES_STUDENT_INIT = pass_name(SET_SAMPLES, SECTION_STUDENT_INIT)
PASS_SAMPLES_JUDGE = pass_name(SET_SAMPLES, SECTION_JUDGE)

# Roles of a sequence --------------------------------------------------------
ROLE_CHOSEN = 0
ROLE_REJECTED = 1
ROLE_GENERATED = 2
ROLE_SAMPLE_BASE = 16  # sample i of a group has role 16 + i


def role_name(role: int) -> str:
    if role == ROLE_CHOSEN:
        return "chosen"
    if role == ROLE_REJECTED:
        return "rejected"
    if role == ROLE_GENERATED:
        return "generated"
    if role >= ROLE_SAMPLE_BASE:
        return f"sample {role - ROLE_SAMPLE_BASE}"
    raise ValueError(f"unknown role code {role}")


# Axes -----------------------------------------------------------------------
AXIS_TOKEN = "token"
AXIS_RESPONSE = "response"
AXIS_SEQUENCE = "sequence"
AXIS_SEQUENCE_OFFSETS = "sequence+1"
AXIS_GROUP = "group"
AXIS_GROUP_OFFSETS = "group+1"
AXIS_PAIR = "pair"
AXIS_AUDIT = "audit_byte"  # UTF-8 bytes of per-group JSON records
AXIS_TEACHER_TOKEN = "teacher_token"  # a cross-tokenizer section's teacher response tokens (version 4)
AXIS_TEACHER_VOCAB = "teacher_vocab"  # the teacher's token ids (the vocabulary map, version 4)

# Rows per chunk along each axis: chunks of the order of megabytes.
CHUNK_ROWS = {
    AXIS_TOKEN: 1 << 18,
    AXIS_RESPONSE: 1 << 14,
    AXIS_SEQUENCE: 1 << 16,
    AXIS_SEQUENCE_OFFSETS: 1 << 16,
    AXIS_GROUP: 1 << 16,
    AXIS_GROUP_OFFSETS: 1 << 16,
    AXIS_PAIR: 1 << 16,
    AXIS_AUDIT: 1 << 22,
    AXIS_TEACHER_TOKEN: 1 << 18,
    AXIS_TEACHER_VOCAB: 1 << 20,
}


def chunk_rows(axis: str, rows: int) -> int:
    """Rows per chunk of an array of ``rows`` rows along ``axis``: at most ``CHUNK_ROWS[axis]``, and the
    fewest chunks of that size split evenly, so that no chunk is mostly padding (a reader decodes every
    chunk whole, the padding past the last row included). Version 1 used ``min(CHUNK_ROWS, rows)``."""
    limit = CHUNK_ROWS[axis]
    if rows <= limit:
        return max(1, rows)
    chunks = -(-rows // limit)
    return -(-rows // chunks)


# Encodings -------------------------------------------------------------------
ENC_PLAIN = "plain"  # lossless, shuffle + zstd
ENC_TOKEN_IDS = "token_ids"  # lossless: uint16 when the vocabulary fits, else int32
ENC_LOGP_SORTED = "logp_sorted"  # lossy: quantised to 1/128 nat, delta along K
ENC_LOGP = "logp_quantised"  # lossy: quantised to 1/128 nat
ENC_COUNT = "count"  # lossless small unsigned integers, Blosc like the ids (version 3: topk_count)

LOGP_SCALE = 128  # quantisation steps per nat
LOGP_MAX_ABS_ERROR = 0.5 / LOGP_SCALE  # 0.00390625 nats, for log-probs >= LOGP_FLOOR
LOGP_FLOOR = -500.0  # log-probs are clamped here before quantising (uint16 range / 128)
#: worst KL(exact || stored) of one row's K+1 bins (top-K and tail, both stored, renormalised):
#: every bin's log is off by at most e = LOGP_MAX_ABS_ERROR, so by Hoeffding's lemma
#: KL = log E_p[exp(err)] - E_p[err] <= (2e)^2 / 8 = e^2 / 2 (bins at the floor aside)
KL_BOUND_WITH_TAIL = LOGP_MAX_ABS_ERROR ** 2 / 2

#: Blosc settings of the large arrays (version 2): zstd at Blosc level 7 (zstd level 13) with a byte
#: shuffle, which runs inside Blosc when decoding (benchmarks/store_size.py compares them with version 1's:
#: docs/store-format.md, "Format versions").
BLOSC_CNAME = "zstd"
BLOSC_CLEVEL = 7


# Arrays ---------------------------------------------------------------------
# a set's base arrays
ARRAY_EXAMPLE_INDEX = "example_index"
ARRAY_ROLE = "role"
ARRAY_PROMPT_LENGTH = "prompt_length"
ARRAY_RESPONSE_LENGTH = "response_length"
ARRAY_TOKEN_OFFSETS = "token_offsets"
ARRAY_RESPONSE_OFFSETS = "response_offsets"
ARRAY_INPUT_IDS = "input_ids"
ARRAY_LOSS_MASK = "loss_mask"
# a sampled set's groups
ARRAY_GROUP_OFFSETS = "group_offsets"
ARRAY_GROUP_EXAMPLE_INDEX = "group_example_index"
# teacher, reference and student_init sections
ARRAY_TOPK_IDS = "topk_ids"
ARRAY_TOPK_LOGP = "topk_logp"
#: version 4's stored form of a teacher section's topk_logp (ENC_LOGP_SORTED): uint16 steps along K
#: version 4 stores a sorted log-prob array ``name`` as ``name + STEPS_SUFFIX`` (per-row steps along K)
STEPS_SUFFIX = "_steps"
ARRAY_TOPK_LOGP_STEPS = "topk_logp_steps"
ARRAY_TAIL_LOGP = "tail_logp"
ARRAY_TOPK_COUNT = "topk_count"
#: tail samples (precompute teacher --tail-samples S): S ids drawn from the teacher's distribution outside the
#: kept top-K, and their teacher log-probs (:data:`DESCRIPTION` ``"tail_samples"``)
ARRAY_TAIL_SAMPLE_IDS = "tail_sample_ids"
ARRAY_TAIL_SAMPLE_LOGP = "tail_sample_logp"
ARRAY_TARGET_LOGP = "target_logp"
ARRAY_LOGP_SUM = "logp_sum"
# teacher_mcq sections
ARRAY_PAIR_INDEX = "pair_index"
ARRAY_PAIR_PROB = "pair_prob"
ARRAY_GROUP_PAIR_OFFSETS = "group_pair_offsets"
ARRAY_MCQ_SCORE = "mcq_score"
# judge sections
ARRAY_JUDGE_RANK = "judge_rank"
ARRAY_WHITE_RANK = "white_rank"
ARRAY_AGREED_RANK = "agreed_rank"
ARRAY_GROUP_STATUS = "group_status"
ARRAY_GROUP_TRIES = "group_tries"
ARRAY_GROUP_AUDIT_OFFSETS = "group_audit_offsets"
ARRAY_AUDIT_JSON = "audit_json"
# teacher sections aligned across tokenizers (precompute teacher --cross-tokenizer; DESCRIPTION "cross_tokenizer")
ARRAY_ALIGNMENT = "alignment"
ARRAY_TEACHER_TOPK_IDS = "teacher_topk_ids"
ARRAY_TEACHER_TOPK_LOGP = "teacher_topk_logp"
ARRAY_TEACHER_TOPK_LOGP_STEPS = ARRAY_TEACHER_TOPK_LOGP + STEPS_SUFFIX  # its name in a version 4 store
ARRAY_CHUNK_LENGTH = "chunk_length"
ARRAY_CHUNK_LOGP = "chunk_logp"
ARRAY_STUDENT_SPAN = "student_span"
ARRAY_TEACHER_LENGTH = "teacher_length"
ARRAY_TEACHER_SPAN = "teacher_span"
ARRAY_TEACHER_TOKEN_OFFSETS = "teacher_token_offsets"
# the store's vocabulary map (one per store, at the root: DESCRIPTION "cross_tokenizer")
GROUP_VOCAB_MAP = "vocab_map"
VOCAB_MAP_TEACHER_TO_STUDENT = "teacher_to_student"
#: the root attribute that records both tokenizers of a cross-tokenizer store and its vocabulary map
ATTR_CROSS_TOKENIZER = "cross_tokenizer"

#: ``alignment`` codes of a student response row (DESCRIPTION "cross_tokenizer"; :mod:`lm.xtok` computes them)
ALIGN_EXACT, ALIGN_STARTS, ALIGN_NONE = 0, 1, 2

#: ``group_status`` of a judge section's group that carries a pseudo-label (ranked, and agreed on 2 or more)
GROUP_STATUS_AGREED = 0

#: the attribute of an unfinished section (:data:`DESCRIPTION` ``"unfinished"``): {"reason", "pending_groups"}
ATTR_UNFINISHED = "unfinished"


@dataclass(frozen=True)
class ArraySpec:
    name: str
    axis: str
    dtype: str  # numpy dtype of what a reader gets back; "token_id" resolves per store
    width: str | None  # None for 1-D, "K" for [rows, K] (K may be 0), "S" for [rows, S] (tail samples), "2"
    encoding: str
    description: str
    #: an optional array may be absent from a complete section (the description says what then)
    optional: bool = False
    #: the first format version that has this array
    since: int = 1


def _spec(name, axis, dtype, width, encoding, description, *, optional=False, since=1):
    return ArraySpec(name, axis, dtype, width, encoding, description, optional, since)


BASE_ARRAYS = (
    _spec(ARRAY_EXAMPLE_INDEX, AXIS_SEQUENCE, "int64", None, ENC_PLAIN,
          "index of the example (row of the split) this sequence answers"),
    _spec(ARRAY_ROLE, AXIS_SEQUENCE, "int8", None, ENC_PLAIN,
          "0 chosen, 1 rejected, 2 generated by the student, 16+i sample i of a group"),
    _spec(ARRAY_PROMPT_LENGTH, AXIS_SEQUENCE, "int32", None, ENC_PLAIN,
          "number of prompt tokens at the start of the sequence"),
    _spec(ARRAY_RESPONSE_LENGTH, AXIS_SEQUENCE, "int32", None, ENC_PLAIN,
          "number of response tokens (the end-of-turn token included)"),
    _spec(ARRAY_TOKEN_OFFSETS, AXIS_SEQUENCE_OFFSETS, "int64", None, ENC_PLAIN,
          "CSR offsets of each sequence into the token axis"),
    _spec(ARRAY_RESPONSE_OFFSETS, AXIS_SEQUENCE_OFFSETS, "int64", None, ENC_PLAIN,
          "CSR offsets of each sequence into the response axis"),
    _spec(ARRAY_INPUT_IDS, AXIS_TOKEN, "token_id", None, ENC_TOKEN_IDS,
          "token ids, prompt then response, sequences back to back"),
    _spec(ARRAY_LOSS_MASK, AXIS_TOKEN, "bool", None, ENC_PLAIN,
          "true on response tokens (the ones that get a target)"),
)
GROUP_ARRAYS = (
    _spec(ARRAY_GROUP_OFFSETS, AXIS_GROUP_OFFSETS, "int64", None, ENC_PLAIN,
          "CSR offsets of each group into the sequence axis"),
    _spec(ARRAY_GROUP_EXAMPLE_INDEX, AXIS_GROUP, "int64", None, ENC_PLAIN,
          "example index of each group's prompt"),
)

SECTION_ARRAYS: dict[str, tuple[ArraySpec, ...]] = {
    SECTION_TEACHER: (
        _spec(ARRAY_TOPK_IDS, AXIS_RESPONSE, "token_id", "K", ENC_TOKEN_IDS,
              "teacher's K most likely next tokens, most likely first (with topk_count: 0 past the row's count)"),
        _spec(ARRAY_TOPK_LOGP, AXIS_RESPONSE, "float32", "K", ENC_LOGP_SORTED,
              "teacher log-probs of topk_ids, normalised over the full vocabulary (with topk_count: the floor "
              "past the row's count)"),
        _spec(ARRAY_TAIL_LOGP, AXIS_RESPONSE, "float32", None, ENC_LOGP,
              "log of the teacher's probability mass outside topk_ids (with topk_count: outside the kept ids): "
              "logsumexp of its log-softmax over every other id, from the full distribution (optional: see 'tail')",
              optional=True, since=2),
        _spec(ARRAY_TOPK_COUNT, AXIS_RESPONSE, "uint16", None, ENC_COUNT,
              "entries of the row's topk_ids / topk_logp that are kept, 1..K: the fewest whose teacher mass "
              "reaches the pass's top_p (provenance), at most K (optional: absent, all K are kept; see "
              "'adaptive_k')", optional=True, since=3),
        _spec(ARRAY_TAIL_SAMPLE_IDS, AXIS_RESPONSE, "token_id", "S", ENC_TOKEN_IDS,
              "S ids drawn independently, with replacement, from the teacher's distribution restricted to the ids "
              "outside the kept topk_ids (probability p_j / exp(tail_logp)), seeded per part (optional: see "
              "'tail_samples')", optional=True, since=4),
        _spec(ARRAY_TAIL_SAMPLE_LOGP, AXIS_RESPONSE, "float32", "S", ENC_LOGP,
              "teacher log-probs of tail_sample_ids, normalised over the full vocabulary (optional: with "
              "tail_sample_ids)", optional=True, since=4),
        _spec(ARRAY_TARGET_LOGP, AXIS_RESPONSE, "float32", None, ENC_PLAIN,
              "teacher log-prob of the response token actually there"),
        _spec(ARRAY_LOGP_SUM, AXIS_SEQUENCE, "float32", None, ENC_PLAIN,
              "sum of target_logp over the sequence's response"),
        # across tokenizers only (DESCRIPTION "cross_tokenizer")
        _spec(ARRAY_ALIGNMENT, AXIS_RESPONSE, "int8", None, ENC_PLAIN,
              "across tokenizers: 0 exact (one teacher token spans the student token's characters), 1 starts "
              "together (a teacher token starts where it starts, ends elsewhere), 2 none (no teacher token "
              "starts there)", optional=True, since=4),
        _spec(ARRAY_TEACHER_TOPK_IDS, AXIS_RESPONSE, "int32", "K", ENC_TOKEN_IDS,
              "across tokenizers: the teacher's K most likely ids in its own vocabulary at the aligned teacher "
              "row, most likely first (0 where alignment is none, and past an adaptive K)",
              optional=True, since=4),
        _spec(ARRAY_TEACHER_TOPK_LOGP, AXIS_RESPONSE, "float32", "K", ENC_LOGP_SORTED,
              "across tokenizers: the teacher's log-probs of teacher_topk_ids (the floor where alignment is none, "
              "and past an adaptive K)", optional=True, since=4),
        _spec(ARRAY_CHUNK_LENGTH, AXIS_RESPONSE, "int32", None, ENC_PLAIN,
              "across tokenizers: on the last student row of an aligned chunk, its number of student rows; 0 "
              "elsewhere", optional=True, since=4),
        _spec(ARRAY_CHUNK_LOGP, AXIS_RESPONSE, "float32", None, ENC_PLAIN,
              "across tokenizers: on the last student row of an aligned chunk, the teacher's log-prob of the "
              "chunk's text (sum over its teacher tokens); 0 elsewhere", optional=True, since=4),
        _spec(ARRAY_STUDENT_SPAN, AXIS_RESPONSE, "int32", "2", ENC_PLAIN,
              "across tokenizers: [start, end) of the student token's characters in the response text",
              optional=True, since=4),
        _spec(ARRAY_TEACHER_LENGTH, AXIS_SEQUENCE, "int32", None, ENC_PLAIN,
              "across tokenizers: the teacher's response tokens (end of turn included), over which logp_sum "
              "runs: its mean token log-prob is logp_sum / teacher_length", optional=True, since=4),
        _spec(ARRAY_TEACHER_TOKEN_OFFSETS, AXIS_SEQUENCE_OFFSETS, "int64", None, ENC_PLAIN,
              "across tokenizers: CSR offsets of each sequence into teacher_span", optional=True, since=4),
        _spec(ARRAY_TEACHER_SPAN, AXIS_TEACHER_TOKEN, "int32", "2", ENC_PLAIN,
              "across tokenizers: [start, end) of each teacher response token's characters in the response text "
              "([-1, -1]: outside it)", optional=True, since=4),
    ),
    SECTION_REFERENCE: (
        _spec(ARRAY_TOPK_LOGP, AXIS_RESPONSE, "float32", "K", ENC_LOGP,
              "reference model's log-probs at the teacher's topk_ids (same rows)"),
        _spec(ARRAY_TARGET_LOGP, AXIS_RESPONSE, "float32", None, ENC_PLAIN,
              "reference model's log-prob of the response token"),
        _spec(ARRAY_LOGP_SUM, AXIS_SEQUENCE, "float32", None, ENC_PLAIN,
              "sum of target_logp over the sequence's response"),
    ),
    SECTION_STUDENT_INIT: (
        _spec(ARRAY_TARGET_LOGP, AXIS_RESPONSE, "float32", None, ENC_PLAIN,
              "the student's initial model's log-prob of the response token"),
        _spec(ARRAY_LOGP_SUM, AXIS_SEQUENCE, "float32", None, ENC_PLAIN,
              "sum of target_logp over the sequence's response (DPO reference)"),
    ),
    SECTION_TEACHER_MCQ: (
        _spec(ARRAY_PAIR_INDEX, AXIS_PAIR, "int32", "2", ENC_PLAIN,
              "(i, j) positions within the group of the two responses compared"),
        _spec(ARRAY_PAIR_PROB, AXIS_PAIR, "float32", "2", ENC_PLAIN,
              "P(i chosen over j) asked with i as option A, and with i as option B"),
        _spec(ARRAY_GROUP_PAIR_OFFSETS, AXIS_GROUP_OFFSETS, "int64", None, ENC_PLAIN,
              "CSR offsets of each group into the pair axis"),
        _spec(ARRAY_MCQ_SCORE, AXIS_SEQUENCE, "float32", None, ENC_PLAIN,
              "s_mcq(i) = log((eps + sum_j P(i over j)) / (n - 1)), orders averaged"),
    ),
    SECTION_JUDGE: (
        _spec(ARRAY_JUDGE_RANK, AXIS_SEQUENCE, "int16", None, ENC_PLAIN,
              "place of the response in the black box's ranking of its group, 0 = best; -1: group unranked", since=2),
        _spec(ARRAY_WHITE_RANK, AXIS_SEQUENCE, "int16", None, ENC_PLAIN,
              "place in the student's own ranking by its mean token log-prob (samples/student_init)", since=2),
        _spec(ARRAY_AGREED_RANK, AXIS_SEQUENCE, "int16", None, ENC_PLAIN,
              "place in the agreement (longest common subsequence of both rankings), 0 = best; -1: not in "
              "it, or the group gives no pseudo-label", since=2),
        _spec(ARRAY_GROUP_STATUS, AXIS_GROUP, "int8", None, ENC_PLAIN,
              "0 ranked and agreed; 1 the black box gave no full ranking; 2 agreement shorter than 2; 3 (only in "
              "an unfinished section) not answered yet: its requests failed in transport", since=2),
        _spec(ARRAY_GROUP_TRIES, AXIS_GROUP, "int8", None, ENC_PLAIN,
              "requests sent to the black box, those that failed in transport included", since=2),
        _spec(ARRAY_GROUP_AUDIT_OFFSETS, AXIS_GROUP_OFFSETS, "int64", None, ENC_PLAIN,
              "CSR offsets of each group into audit_json", since=2),
        _spec(ARRAY_AUDIT_JSON, AXIS_AUDIT, "uint8", None, ENC_PLAIN,
              "UTF-8 JSON per group: every try's exact messages, raw reply, parsed order and error", since=2),
    ),
}


#: the root group ``vocab_map``'s one array (DESCRIPTION "cross_tokenizer"); written once per store
VOCAB_MAP_ARRAY = _spec(VOCAB_MAP_TEACHER_TO_STUDENT, AXIS_TEACHER_VOCAB, "int32", None, ENC_PLAIN,
                        "teacher id -> the student id whose decoded string equals it; -1 where none does",
                        since=4)


def signal_name(section: str, array: str) -> str:
    """``<section>/<array>``: how an example read from a store (:mod:`store.stream`) names one array of one
    section of its set, e.g. ``teacher/topk_logp``."""
    return f"{section}/{array}"


def required_names(specs) -> list[str]:
    return [s.name for s in specs if not s.optional]


def base_arrays(sequence_set: str) -> tuple[ArraySpec, ...]:
    if sequence_set == SET_SAMPLES:
        return BASE_ARRAYS + GROUP_ARRAYS
    return BASE_ARRAYS


def arrays_of(sequence_set: str, section: str) -> tuple[ArraySpec, ...]:
    if sequence_set not in SEQUENCE_SETS:
        raise ValueError(f"unknown sequence set {sequence_set!r}; known: {', '.join(SEQUENCE_SETS)}")
    if section == BASE:
        return base_arrays(sequence_set)
    if section not in SECTION_ARRAYS:
        raise ValueError(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
    return SECTION_ARRAYS[section]


def token_id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("uint16") if vocab_size <= 1 << 16 else np.dtype("int32")


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def part_index(name: str) -> int:
    if not name.startswith("part-"):
        raise ValueError(f"not a part name: {name!r}")
    return int(name[5:])


def group_path(split: str, part: int, sequence_set: str, section: str = BASE) -> str:
    path = f"{split}/{part_name(part)}/{sequence_set}"
    return path if section == BASE else f"{path}/{section}"


def array_checksum(values: np.ndarray) -> str:
    """sha256 of an array's decoded values: dtype, shape and little-endian C-order bytes."""
    values = np.ascontiguousarray(values)
    sha = hashlib.sha256()
    sha.update(f"{values.dtype.str}|{values.shape}".encode())
    sha.update(values.astype(values.dtype.newbyteorder("<"), copy=False).tobytes())
    return sha.hexdigest()


@dataclass(frozen=True)
class SectionRef:
    split: str
    part: int
    sequence_set: str
    section: str = BASE

    @property
    def path(self) -> str:
        return group_path(self.split, self.part, self.sequence_set, self.section)

    @classmethod
    def from_path(cls, path: str) -> "SectionRef":
        """The section at ``path`` (``<split>/part-NNNNN/<set>[/<section>]``, as :attr:`path` gives)."""
        split, part, sequence_set, *section = path.split("/")
        return cls(split, part_index(part), sequence_set, section[0] if section else BASE)

    def __str__(self) -> str:
        return self.path


# Codecs ----------------------------------------------------------------------

#: the namespaced block of a version 4 array's attributes that says how to decode it (:func:`array_attributes`)
ATTRS_NAMESPACE = "distill_cache"
#: version 4's stored value of a quantised log-prob: q = round(-logp * LOGP_SCALE) as uint16, and back
#: logp = q * LOGP_STORED_SCALE + LOGP_STORED_OFFSET (exact in float32: q < 2**24, the scale a power of two)
LOGP_STORED_DTYPE = np.dtype("uint16")
LOGP_STORED_SCALE = -1.0 / LOGP_SCALE
LOGP_STORED_OFFSET = 0.0
#: format 4 encodes one-byte items with zstd at this level (registered codec), the others with Blosc
ZSTD_LEVEL = 9


def is_quantised(spec: ArraySpec) -> bool:
    return spec.encoding in (ENC_LOGP_SORTED, ENC_LOGP)


def stored_name(spec: ArraySpec, version: int = FORMAT_VERSION) -> str:
    """The name of ``spec``'s array in a store of ``version``: version 4 stores a teacher's sorted log-probs
    under their name and :data:`STEPS_SUFFIX` (``topk_logp`` as :data:`ARRAY_TOPK_LOGP_STEPS`); everything
    else under the spec's own name, which is also what readers return and what checksums name."""
    if version >= 4 and spec.encoding == ENC_LOGP_SORTED:
        return spec.name + STEPS_SUFFIX
    return spec.name


def stored_dtype(spec: ArraySpec, dtype: np.dtype, version: int = FORMAT_VERSION) -> np.dtype:
    """The zarr data type of ``spec``'s array in a store of ``version`` (``dtype``: the decoded values')."""
    if version >= 4 and is_quantised(spec):
        return LOGP_STORED_DTYPE
    return np.dtype(dtype)


def codecs_for(spec: ArraySpec, dtype: np.dtype, version: int = FORMAT_VERSION) -> dict:
    """Keyword arguments for ``zarr.create_array`` that encode ``spec`` as format ``version`` does.

    ``dtype`` is the decoded values' (float32 for log-probs). Writers use the current version;
    ``version=1`` (or 2, 3) gives that version's codecs (tests and benchmarks build older stores with it).
    Version 4: ``bytes``, then Blosc (zstd level :data:`BLOSC_CLEVEL`, byte shuffle) or, for one-byte items,
    ``zstd`` level :data:`ZSTD_LEVEL` (smaller than Blosc on runs such as ``loss_mask``), then ``crc32c``,
    on every array; the values are :func:`encode_stored`'s.
    """
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

    if version not in READABLE_VERSIONS:
        raise ValueError(f"no format version {version}; known: {READABLE_VERSIONS}")
    if version >= 4:
        itemsize = stored_dtype(spec, dtype, version).itemsize
        if itemsize == 1:
            first = ZstdCodec(level=ZSTD_LEVEL)
        else:
            first = BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, typesize=itemsize, shuffle="shuffle")
        return dict(filters=None, serializer=BytesCodec(), compressors=[first, Crc32cCodec()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numcodecs codecs are outside the v3 core spec
        from zarr.codecs.numcodecs import Delta, FixedScaleOffset, Shuffle

        itemsize = dtype.itemsize
        filters = None
        if is_quantised(spec):
            # value = -q / 128 with q = round(-logp * 128) stored as uint16
            filters = [FixedScaleOffset(offset=0, scale=-LOGP_SCALE, dtype="<f4", astype="<u2")]
            if spec.encoding == ENC_LOGP_SORTED:
                # descending log-probs give small non-negative steps along K
                filters.append(Delta(dtype="<u2"))
            itemsize = 2
        large = spec.encoding in (ENC_LOGP_SORTED, ENC_LOGP, ENC_TOKEN_IDS, ENC_COUNT)
        if version >= 2 and large:
            compressors = [BloscCodec(cname=BLOSC_CNAME, clevel=BLOSC_CLEVEL, typesize=itemsize,
                                      shuffle="shuffle" if itemsize > 1 else "noshuffle")]
        elif itemsize == 1:
            compressors = [ZstdCodec(level=9)]
        else:
            compressors = [Shuffle(elementsize=itemsize), ZstdCodec(level=9)]
        return dict(filters=filters, serializer=BytesCodec(), compressors=compressors)


def prepare_values(spec: ArraySpec, values: np.ndarray) -> np.ndarray:
    """Clamp log-probs into the quantiser's range (no wrap-around of uint16)."""
    if is_quantised(spec):
        values = np.asarray(values, dtype=np.float32)
        return np.clip(np.nan_to_num(values, nan=LOGP_FLOOR, neginf=LOGP_FLOOR), LOGP_FLOOR, 0.0)
    return values


def encode_stored(spec: ArraySpec, values: np.ndarray, version: int = FORMAT_VERSION) -> np.ndarray:
    """What a store of ``version`` holds for ``spec``'s (prepared, :func:`prepare_values`) values.

    Versions 1-3 hold the values themselves (their numcodecs filters quantise). Version 4 holds quantised
    log-probs as uint16 ``q = round(-logp * 128)`` (round half to even, as numcodecs' FixedScaleOffset did,
    so the decoded values are version 3's bit for bit), and sorted ones as per-row steps along K:
    ``s[:, 0] = q[:, 0]``, ``s[:, k] = q[:, k] - q[:, k-1]`` modulo 2**16 (non-negative and small for
    descending log-probs; any values round-trip).
    """
    if version < 4 or not is_quantised(spec):
        return values
    q = np.around(np.asarray(values, dtype=np.float32) * np.float32(-LOGP_SCALE)).astype(LOGP_STORED_DTYPE)
    if spec.encoding == ENC_LOGP_SORTED and q.ndim == 2 and q.shape[1] > 1:
        steps = q.copy()
        np.subtract(q[:, 1:], q[:, :-1], out=steps[:, 1:])  # uint16 arithmetic: modulo 2**16
        return steps
    return q


def decode_stored(spec: ArraySpec, stored: np.ndarray, version: int = FORMAT_VERSION,
                  out: np.ndarray | None = None) -> np.ndarray:
    """The values of ``spec`` from what a store of ``version`` holds (zarr's decoded array): the rule that
    :func:`array_attributes` writes beside every version 4 array, in numpy.

    Quantised log-probs (version 4): ``q`` (steps cumulated along K in uint16 arithmetic, for a sorted
    array), then ``q * -1/128 + 0.0`` in float32, exact, with ``+ 0.0`` turning -0.0 into 0.0 as numcodecs'
    offset did. Anything else is returned as it is.
    """
    if version < 4 or not is_quantised(spec):
        return stored
    q = np.asarray(stored).astype(LOGP_STORED_DTYPE, copy=False)
    if spec.encoding == ENC_LOGP_SORTED and q.ndim == 2:
        q = np.cumsum(q, axis=1, dtype=LOGP_STORED_DTYPE)
    out = np.multiply(q, np.float32(LOGP_STORED_SCALE), dtype=np.float32, out=out)
    out += np.float32(LOGP_STORED_OFFSET)
    return out


def array_attributes(spec: ArraySpec, version: int = FORMAT_VERSION) -> dict:
    """The attributes a version 4 writer puts on ``spec``'s array: its description and, for quantised
    log-probs, how to decode them (nothing for older versions).

    A quantised array that decodes by a scale alone (``tail_logp``, the reference's ``topk_logp``) carries
    the CF conventions' ``scale_factor``/``add_offset``/``units``, which CF-aware readers (xarray) apply by
    themselves. The steps (``topk_logp_steps``) carry the scale only inside the :data:`ATTRS_NAMESPACE` block:
    a CF reader would scale the steps without cumulating them first, a silent misreading.
    """
    if version < 4:
        return {}
    attrs: dict = {"description": spec.description}
    if not is_quantised(spec):
        return attrs
    rule = {
        "encoding": "logp_sorted_steps" if spec.encoding == ENC_LOGP_SORTED else "logp_quantised",
        "decodes_to": spec.name,
        "decoded_dtype": "float32",
        "scale": LOGP_STORED_SCALE,
        "offset": LOGP_STORED_OFFSET,
        "max_abs_error": LOGP_MAX_ABS_ERROR,
        "floor": LOGP_FLOOR,
        "encode": f"q = round_half_even(-clip(logp, {LOGP_FLOOR}, 0) * {LOGP_SCALE}) as uint16",
    }
    if spec.encoding == ENC_LOGP_SORTED:
        rule.update(cumulative_axis=1, decode=(
            "q = cumulative sum of the stored steps along axis 1 (K), in uint16 arithmetic (modulo 2**16); "
            "value = float32(q) * scale + offset, in float32 (exact), + 0.0 (no -0.0)"))
        return {**attrs, "units": "nat", ATTRS_NAMESPACE: rule}
    rule["decode"] = "value = float32(stored) * scale + offset, in float32 (exact), + 0.0 (no -0.0)"
    return {**attrs, "scale_factor": LOGP_STORED_SCALE, "add_offset": LOGP_STORED_OFFSET, "units": "nat",
            ATTRS_NAMESPACE: rule}


def key_format_version(version: int) -> int:
    """The format version content keys (:mod:`store.keys`) record for a store of ``version``: the last
    version that changed what the numbers are. Version 4 changed only their encoding (decoded values are
    version 3's), so its keys are version 3's, and a section keyed in one is found from the other (copying
    it re-encodes: :func:`store.copy.copy_section`)."""
    return 3 if version == 4 else version


# Content keys (:mod:`store.keys`) -----------------------------------------------
#: settings of a pass record that say where something came from, not what it is (a sha256 or the
#: weights' hash beside them says that); dotted names reach into nested settings
DESCRIPTIVE_SETTINGS = ("dataset", "reference_is", "template.source", "dynamic_demos.from")

#: what goes into each kind of content key, in words (:mod:`store.keys` is the code)
KEY_INPUTS = {
    "every key": (
        "sha256 hex of canonical JSON (sorted keys, no spaces) of {key_version, kind, layout: {format_version, "
        "token_id_dtype, tokenizer_sha256}, example_range: [start, stop) of the part, inputs}; format_version is "
        "3 in version 4 stores too (version 4 changed only the encoding: the same numbers have the same key); "
        "a pass record's "
        "settings enter as written, without the model's name and without "
        + ", ".join(DESCRIPTIVE_SETTINGS) + " (names of where something came from)"
    ),
    PASS_PAIRS_BASE: (
        "inputs: encode settings (max_length, chat_template_sha256, tokenizer_sha256) and rows_sha256, the "
        "sha256 of every row of the part that survived loading: [index, prompt messages, chosen, rejected]"
    ),
    PASS_GENERATED_BASE: (
        "inputs: model_sha256 of the generating model (the student), the pass settings (decoding, "
        "max_new_tokens, max_length, dtype, ...), end_of_turn_ids, and prompt_ids_sha256 of every row's "
        "prompt token ids as generation sees them (chat template, cut from the left to its budget)"
    ),
    PASS_SAMPLES_BASE: (
        "inputs: model_sha256 of the sampling model, the pass settings (n, temperature, top_p, keep, seed, "
        "max_new_tokens, max_length, dtype, selection, ...), part_seed (the seed this part draws with), "
        "device kind (cpu, cuda) and generation_batch (they change the random draws), end_of_turn_ids, "
        "prompts_sha256 (the rows' prompt messages) and prompt_ids_sha256 (their token ids as sampled)"
    ),
    "sections": (
        "teacher, student_init, reference, teacher_mcq, judge: model_sha256 of the model that computed it, "
        "the pass settings (top_k, dtype, max_length, the MCQ template's sha256 and letters, the judge's "
        "identity and prompts, ...), base_checksums (every array checksum of the set's base: the token ids "
        "it was computed on), reads (checksums of other sections it reads: the reference reads "
        "generated/teacher topk_ids, the judge samples/student_init logp_sum), and where they matter "
        "prompts_sha256 (teacher_mcq and judge show the rows' prompt text) and part_seed (judge; a teacher "
        "section with tail samples: the seed its part draws with, see 'tail_samples')"
    ),
    "engine": (
        "a pass computed with vLLM (--engine vllm: samples base, generated base, teacher) has settings.engine = "
        "{name, version, tensor_parallel, and seeds (samples: one seed per request) or tail (teacher: how the "
        "tail is computed from the top-K)}, which enters its keys like any setting; without it, transformers "
        "computed it (the keys of stores made before engines existed are unchanged). The engine's other "
        "settings (KV cache, engine process, eager mode, chunked prefill) are each part's engine attribute, "
        "not in the key"
    ),
}


DESCRIPTION = {
    "summary": (
        "Teacher signals for distilling a language model, computed once. Groups: "
        "<split>/part-NNNNN/<set>[/<section>]. A part covers examples "
        "[attrs.example_start, attrs.example_stop) of its split. Sets: 'pairs' (dataset "
        "chosen/rejected), 'generated' (student's own responses), 'samples' (groups of "
        "sampled responses). Sections hold what one model computed for a set's "
        "sequences: 'teacher', 'reference', 'student_init', 'teacher_mcq', 'judge'. A group "
        "counts only if attrs.complete is true. Concatenate parts in order to get a "
        "whole split; offsets are local to a part."
    ),
    ATTR_UNFINISHED: (
        "A section may be written unfinished: attrs.complete false, attrs.checksums of its arrays as for a "
        "complete one, and attrs.unfinished = {reason, pending_groups}. It is what a run kept of work it could "
        "not finish (a judge section: the groups the black box answered, while pending_groups, with "
        "group_status 3, got no answer because their requests failed in transport); the writer's next run with "
        "the same content key keeps those answers, asks the rest and writes the section complete. Readers skip "
        "it like any section that is not complete; it is not in the manifest."
    ),
    "offsets": (
        "CSR: sequence s owns input_ids[token_offsets[s]:token_offsets[s+1]] whose first "
        "prompt_length[s] are the prompt, and response rows "
        "[response_offsets[s], response_offsets[s+1]); response row j holds the "
        "distribution predicting response token j. Group g owns sequences "
        "[group_offsets[g], group_offsets[g+1]), pairs "
        "[group_pair_offsets[g], group_pair_offsets[g+1]) and, in a judge section, audit bytes "
        "[group_audit_offsets[g], group_audit_offsets[g+1])."
    ),
    "roles": {"0": "chosen", "1": "rejected", "2": "generated", "16+i": "sample i"},
    "content_keys": {
        "summary": (
            "A section's attrs.content_key is a sha256 of everything that decides its numbers (weights' "
            "sha256, pass settings, the rows or token ids it was computed on); stores made from the same "
            "inputs have the same key for the same section, so a writer may copy a section whose key matches "
            "from another store (verified against its checksums) instead of computing it, and then records "
            "attrs.reused_from: the store (credentials removed) and section it came from. The root's "
            "attrs.content_keys (path -> key of every complete section that has one, refreshed with the "
            "manifest) finds them with one read per store. Keys:"
        ),
        **KEY_INPUTS,
    },
    "encodings": {
        ENC_PLAIN: "lossless",
        ENC_TOKEN_IDS: "lossless token ids (uint16 when the vocabulary fits); Blosc (zstd, byte shuffle)",
        ENC_LOGP_SORTED: (
            f"log-probs clamped to [{LOGP_FLOOR}, 0] and quantised to 1/{LOGP_SCALE} nat "
            f"(max abs error {LOGP_MAX_ABS_ERROR}); version 4: stored as {ARRAY_TOPK_LOGP_STEPS}, uint16 steps "
            f"along K, decoded as 'decoding' says; versions 1-3: delta along K inside numcodecs filters that "
            f"zarr-python decodes to float32"
        ),
        ENC_LOGP: (
            f"log-probs clamped to [{LOGP_FLOOR}, 0] and quantised to 1/{LOGP_SCALE} nat "
            f"(max abs error {LOGP_MAX_ABS_ERROR}); version 4: uint16, decoded as 'decoding' says; versions "
            f"1-3: a numcodecs filter that zarr-python decodes to float32"
        ),
        ENC_COUNT: "lossless unsigned integers; Blosc (zstd, byte shuffle)",
    },
    "decoding": (
        "Version 4 stores only codecs of the Zarr v3 specification and its registered extensions: bytes "
        "(little endian), then blosc (zstd, byte shuffle) or, for one-byte items, zstd, then crc32c; any Zarr v3 "
        "reader (zarr-python, TensorStore, zarrs, zarr.js) decodes every array and checks each chunk's crc32c. "
        "Integers are the values, except quantised log-probs, stored as uint16 q = round_half_even(-clip(logp, "
        f"{LOGP_FLOOR}, 0) * {LOGP_SCALE}): their attributes hold the rule under '{ATTRS_NAMESPACE}' (scale "
        f"{LOGP_STORED_SCALE}, offset {LOGP_STORED_OFFSET}, max_abs_error, floor), and, where a scale is the "
        "whole rule (tail_logp, a reference section's topk_logp), CF's scale_factor / add_offset / units too: "
        "value = float32(q) * scale + offset, computed in float32 (exact), plus 0.0 (no -0.0). A teacher "
        f"section's topk_logp is stored as {ARRAY_TOPK_LOGP_STEPS}: per-row steps along K (step 0 = q of entry "
        "0, step k = q_k - q_(k-1) modulo 2**16); cumulate them along K in uint16 arithmetic to get q, then "
        "scale (no CF attributes there: scaling the steps alone would misread them). Versions 1-3 use numcodecs "
        "filters (fixedscaleoffset, delta, shuffle) that zarr-python decodes by itself, and no crc32c."
    ),
    "checksums": (
        "A section's attrs.checksums (and the root manifest) hold per array a sha256 of its decoded values "
        "(dtype, shape, little-endian C-order bytes), named as readers return them: topk_logp for "
        f"{ARRAY_TOPK_LOGP_STEPS}. Equal values have equal checksums in every version."
    ),
    "versions": {str(v): change for v, change in VERSION_CHANGES.items()},
    "arrays": {
        "base": {s.name: f"[{s.axis}{', ' + s.width if s.width else ''}] {s.description}"
                 for s in BASE_ARRAYS + GROUP_ARRAYS},
        **{
            section: {
                **{s.name: f"[{s.axis}{', ' + s.width if s.width else ''}] {s.description}" for s in specs},
                **{stored_name(s): f"[{s.axis}{', ' + s.width if s.width else ''}] version 4's stored form of "
                                   f"{s.name}: uint16 steps along K (see 'decoding')"
                   for s in specs if stored_name(s) != s.name},
            }
            for section, specs in SECTION_ARRAYS.items()
        },
    },
    "tail": (
        "The teacher's distribution at a response row, over K+1 bins: exp(topk_logp[row, k]) for its top-K "
        "ids and a tail bin for every other id. Where the teacher section has tail_logp, the tail bin is "
        "exp(tail_logp[row]), computed from the full log-softmax (exact before quantising, even when the "
        "top-K holds nearly all the mass); the K+1 stored bins then sum to 1 only within the quantisation "
        f"(each log within {LOGP_MAX_ABS_ERROR} nat), and readers renormalise them: bin_j / sum of bins. "
        f"Renormalised, KL(exact || stored) <= {KL_BOUND_WITH_TAIL:.2g} nats per row. Without tail_logp "
        "(version 1 stores, or writers that lacked the full distribution) the tail bin is "
        "1 - sum(exp(topk_logp[row])), which quantisation can make 0 or negative: clamp it at a tiny "
        "positive mass."
    ),
    ATTR_CROSS_TOKENIZER: (
        "A store whose root has attrs.cross_tokenizer holds teacher sections computed by a teacher with another "
        "tokenizer than the store's own (format version 4; precompute teacher --cross-tokenizer): "
        "{teacher_tokenizer: {name, hash}, student_tokenizer: {name, hash} (the store's 'tokenizer', that of "
        "input_ids), rule, vocab_map: {path, sha256, teacher_ids, mapped}}. The teacher scored each response's "
        "text: the student's response ids decoded by the student's tokenizer (end of turn left out, whitespace "
        "stripped), with the row's prompt, through the teacher's chat template and tokenizer. Characters: "
        "student_span and teacher_span are [start, end) in that text; both end-of-turn tokens get [n, n+1) (n "
        "the text's length). alignment per student response row: 0 exact, 1 starts together, 2 none (the "
        "array's description). The group vocab_map at the root holds teacher_to_student[teacher id] = the "
        "student id whose decoded string (read after a one-character anchor token) equals the teacher id's, "
        "-1 where none; the teacher's end-of-turn ids map to the student's end of turn. Per student row, at "
        "the aligned teacher row: teacher_topk_ids and teacher_topk_logp are the teacher's own top-K; "
        "topk_ids, topk_logp, tail_logp and topk_count are that top-K mapped into the student's vocabulary: "
        "its kept entries whose map is not -1, entries mapping to one student id merged (log of the summed "
        "probability), sorted most likely first, topk_count of them (0..K here: 0 where none maps), the rest "
        "padding as in 'adaptive_k'; tail_logp is the log mass of every teacher id outside the mapped ones "
        "(the stored tail plus every unmapped entry). target_logp is the teacher's log-prob of its own token "
        "at the aligned row (0 where alignment is none); logp_sum sums the teacher's log-probs over its own "
        "response tokens, teacher_length of them. A reference section of such a set holds the reference "
        "model's log-probs at the same mapped and merged entries (the reference shares the teacher's "
        "tokenizer). Chunks: chunk_length and chunk_logp on the last student row of each run of student and "
        "teacher tokens covering the same characters. Rows whose alignment is none have no teacher row: "
        "their top-K is padding."
    ),
    "adaptive_k": (
        "Where a teacher section has topk_count (format version 3, precompute teacher --top-p P), row r keeps "
        "only its first n = topk_count[r] entries: the fewest of the K most likely ids whose teacher mass "
        "reaches P (n = K when the K do not reach it). Entries n..K-1 are padding: topk_ids 0 and topk_logp "
        f"{LOGP_FLOOR} (the floor; in a reference section too), not ids of the teacher's: readers use "
        "topk_ids[r, :n] and topk_logp[r, :n] only. tail_logp[r] is then the exact log mass of every id "
        "outside the n kept ones, so the row's distribution has n + 1 bins: the kept ones and the tail (the "
        "mass of the dropped entries is in the tail, exactly), renormalised as 'tail' says. A section "
        "without topk_count keeps all K entries of every row."
    ),
    "tail_samples": (
        "Where a teacher section has tail_sample_ids and tail_sample_logp [R, S] (precompute teacher "
        "--tail-samples S; the pass record holds tail_samples and tail_seed), row r holds S ids drawn "
        "independently, with replacement, from the teacher's distribution restricted to the ids outside its "
        "kept top-K: id j with probability q_j = p_j / m, m = exp(tail_logp[r]) the tail's exact mass, and "
        "tail_sample_logp[r, i] = log p_j of the draw (normalised over the full vocabulary, quantised like "
        "the other log-probs). With them the tail's part of KL(teacher || student), sum over the tail of "
        "p_j log(p_j / s_j), is estimated without bias by (m / S) sum_i (tail_sample_logp[r, i] - "
        "log s[tail_sample_ids[r, i]]) (docs/methods.md, 'KD with tail samples'); the top-K part stays exact. "
        "How they were drawn (to reproduce them): part p of split 'train' uses seed tail_seed + p (other "
        "splits add crc32 of the split's name), modulo 2**63; u = numpy.random.default_rng(seed).random((R, "
        "S)) in float64, one row per response row of the part in order; draw i of row r is the first id j, in "
        "id order, whose cumulative weight exp(log p_j - the largest log p outside the kept ids) (float64, kept "
        "ids 0; proportional to q) exceeds u[r, i] times the row's total weight. A row "
        f"with no id outside its kept ones (K = V) holds padding: id 0, log-prob at the floor {LOGP_FLOOR}, "
        "and its tail has no mass. A top_k of 0 (a pure sampled store: topk_ids and topk_logp [R, 0], "
        "tail_logp the log of the whole mass, 0 up to rounding) samples the whole vocabulary (Anshumann et al., "
        "ACL 2025, 'Sparse Logit Sampling')."
    ),
}
