"""Two tokenizers over one text: character spans, their alignment, and the vocabulary map between them.

A teacher whose tokenizer differs from the student's scores the *text* of a
response the store holds in the student's ids (``precompute teacher
--cross-tokenizer``; :mod:`precompute.xtok` runs it). This module is the
tokenizer-level part, no model involved:

Response text (:func:`response_text`)
    The student's response ids, its final end-of-turn token left out, decoded by
    the student's own tokenizer (special tokens kept, no clean-up), then stripped
    of leading and trailing whitespace: the *content* the teacher's chat template
    gets as the assistant's message. Every student token gets its character span
    ``[a, b)`` in content coordinates (:func:`char_spans`); a token that holds
    stripped whitespace has a span reaching outside the content, so it matches no
    teacher token. A response that ended with an end-of-turn token gives that
    token the span ``[len(content), len(content) + 1)``: one character past the
    text that no tokenizer spells, where the teacher's end-of-turn token is too:
    the two end-of-turn tokens match by their role, whatever their spelling.
Teacher encoding (:func:`teacher_example`)
    The dataset row's prompt messages and the content, through the teacher's
    chat template and tokenizer (:func:`lm.chat.encode_example`, with the
    store's ``max_length``); the teacher's end of turn is dropped where the
    student's response had none (cut at ``max_new_tokens``). The teacher's
    response tokens get character spans the same way; the teacher's decoded text
    is mapped onto the content (equal, or the content inside it, e.g. a template
    that writes a space before the answer; else the blocks ``difflib`` matches):
    a teacher token outside the mapped characters has no span (``[-1, -1)``).
Character spans (:func:`char_spans`)
    Token ``j``'s span ends where the decoded prefix ``ids[:j+1]`` ends in the
    decoded whole; a prefix that ends inside a character (a byte-level token
    holding part of a UTF-8 character decodes to U+FFFD) ends before that
    character, which then belongs to the token that completes it (the other
    token may get an empty span). Robust to byte-level BPE (``Ġ``), SentencePiece
    (``▁``) and byte-fallback tokens alike, because only each tokenizer's own
    decoder is used. Cost: a decode of every prefix, quadratic in the response
    length (about 20 ms for 500 tokens, in one batched call).
Alignment (:func:`align`), per student response row ``j`` (predicting token ``j`` of span ``[a, b)``)
    :data:`EXACT`: one teacher token spans exactly ``[a, b)``; :data:`STARTS`
    (starts together): a teacher token starts at ``a`` and ends elsewhere;
    :data:`NONE`: no teacher token starts at ``a`` (the student splits what the
    teacher does not, e.g. a multi-digit number), or the student's span is empty
    or outside the content. The teacher row used at an exact or starts-together
    row is the one predicting that teacher token.
Chunks (:func:`align`)
    A chunk is a maximal run of consecutive student tokens and of consecutive
    teacher tokens covering the same characters: it ends wherever a student
    token and a teacher token end at the same character. Its last student row
    records the number of student rows in it and the teacher tokens it spans; an
    exact row is a chunk of one row. Runs whose tokens do not tile the same
    characters (a token outside the content) give no chunk.
Vocabulary map (:func:`vocabulary_map`)
    ``map[t]`` = the student id whose decoded string equals teacher id ``t``'s,
    ``-1`` where none does. Strings are each tokenizer's own decoding of the
    token *after an anchor token* (a one-character token such as ``a``), minus
    the anchor's text: that is how the token reads inside a text (SentencePiece's
    ``▁the`` reads `` the`` there, as byte-level ``Ġthe`` does, though alone it
    decodes to ``the``). Left unmapped: special and added-special tokens, tokens
    that decode to nothing or to a partial character (U+FFFD), and ids past the
    tokenizer's length. Where several student ids decode to one string (byte
    fallback ``<0x41>`` beside ``A``), the one the student's tokenizer writes for
    it after the anchor wins, else the lowest. The teacher's end-of-turn ids map
    to the student's end-of-turn id, by role. Identical tokenizers: the identity.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import chat

__all__ = ["EXACT", "STARTS", "NONE", "ALIGNMENT_NAMES", "RULE", "char_spans", "ResponseText", "response_text",
           "TeacherExample", "teacher_example", "Alignment", "align", "vocabulary_map"]

#: alignment codes of a student response row (the store's ``teacher/alignment``)
EXACT, STARTS, NONE = 0, 1, 2
ALIGNMENT_NAMES = {EXACT: "exact", STARTS: "starts together", NONE: "none"}
#: what a store records as the rule its sections were aligned by (bumped if the rule changes)
RULE = "text spans v1: student response decoded and stripped; spans by prefix decoding; end of turn by role"

_REPLACEMENT = "\ufffd"
_ANCHORS = ("a", "x", "e", "1", "A")


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def char_spans(tokenizer, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """``(text, spans [n, 2] int64)``: ``ids`` decoded, and each token's ``[start, end)`` in it (module docstring)."""
    ids = [int(i) for i in ids]
    text = _decode(tokenizer, ids)
    spans = np.zeros((len(ids), 2), dtype=np.int64)
    if not ids:
        return text, spans
    prefixes = tokenizer.batch_decode([ids[:j + 1] for j in range(len(ids))], skip_special_tokens=False,
                                      clean_up_tokenization_spaces=False)
    end = 0
    for j, prefix in enumerate(prefixes):
        if not text.startswith(prefix):  # ends inside a character: up to the last whole one
            prefix = prefix.rstrip(_REPLACEMENT)
        reached = len(prefix) if text.startswith(prefix) else end  # a decoder whose prefixes are not prefixes
        spans[j] = (end, max(end, reached))
        end = max(end, reached)
    return text, spans


@dataclass(frozen=True)
class ResponseText:
    """A student response as text: the content, each response token's span in it, whether it ended its turn."""

    content: str
    spans: np.ndarray  # [n, 2] int64, one per response token (the end-of-turn token's included)
    ended: bool


def response_text(tokenizer, response_ids: Sequence[int], end_ids: Sequence[int]) -> ResponseText:
    """The student's response ``response_ids`` as text and spans (module docstring, "Response text")."""
    ids = [int(i) for i in response_ids]
    ended = bool(ids) and ids[-1] in set(int(i) for i in end_ids)
    body = ids[:-1] if ended else ids
    text, spans = char_spans(tokenizer, body)
    lead = len(text) - len(text.lstrip())
    content = text.strip()
    spans = spans - lead
    if ended:
        spans = np.concatenate([spans, [[len(content), len(content) + 1]]]).astype(np.int64)
    return ResponseText(content, spans, ended)


@dataclass(frozen=True)
class TeacherExample:
    """The teacher's own tokens of a prompt and a response text, and its response tokens' spans in the text."""

    input_ids: np.ndarray  # [L] prompt then response, teacher ids
    prompt_length: int
    spans: np.ndarray  # [m, 2] int64 in the content's coordinates, [-1, -1] where unmapped
    prompt_truncated: bool
    response_truncated: bool


def _onto(text: str, content: str) -> list[tuple[int, int, int]]:
    """Blocks ``(i, j, n)``: ``text[i:i+n] == content[j:j+n]``, the characters of ``text`` that are the content's."""
    if text == content:
        return [(0, 0, len(text))]
    at = text.find(content) if content else -1
    if at >= 0:
        return [(at, 0, len(content))]
    if content.startswith(text):  # the teacher's response was cut (max_length)
        return [(0, 0, len(text))]
    matcher = difflib.SequenceMatcher(None, text, content, autojunk=False)
    return [tuple(block) for block in matcher.get_matching_blocks() if block[2]]


def _map_spans(spans: np.ndarray, blocks: list[tuple[int, int, int]]) -> np.ndarray:
    """Spans of a text moved into the content's coordinates; a span not inside one block -> [-1, -1]."""
    out = np.full_like(spans, -1)
    for k, (a, b) in enumerate(spans.tolist()):
        if a >= b:
            continue
        for i, j, n in blocks:
            if i <= a and b <= i + n:
                out[k] = (a - i + j, b - i + j)
                break
    return out


def teacher_example(tokenizer, prompt: list[dict], response: ResponseText, max_length: int | None) -> TeacherExample:
    """The teacher's encoding of ``prompt`` and the student's ``response`` text (module docstring)."""
    enc = chat.encode_example(tokenizer, prompt, response.content, max_length)
    ids = enc.input_ids
    body = enc.response_ids.tolist()
    eot = chat.end_of_turn_id(tokenizer)
    ended = bool(body) and body[-1] == eot and not enc.response_truncated
    if ended and not response.ended:  # the student's answer was cut: so is the teacher's
        ids, body, ended = ids[:-1], body[:-1], False
    text, spans = char_spans(tokenizer, body[:-1] if ended else body)
    spans = _map_spans(spans, _onto(text, response.content))
    if ended:
        end = len(response.content)
        spans = np.concatenate([spans, [[end, end + 1]]]).astype(np.int64)
    return TeacherExample(np.asarray(ids, dtype=np.int64), enc.prompt_length, spans, enc.prompt_truncated,
                          enc.response_truncated)


@dataclass(frozen=True)
class Alignment:
    """Per student response row: its code, the teacher row it reads (-1: none), and the chunks it ends."""

    code: np.ndarray  # [n] int8: EXACT, STARTS, NONE
    teacher_row: np.ndarray  # [n] int64, -1 where NONE
    chunk_length: np.ndarray  # [n] int32: on a chunk's last row, the student rows in it; 0 elsewhere
    chunk_teacher: np.ndarray  # [n, 2] int64: on a chunk's last row, its teacher rows [t0, t1); else [0, 0]


def align(student: np.ndarray, teacher: np.ndarray) -> Alignment:
    """The alignment of student spans [n, 2] and teacher spans [m, 2] (module docstring)."""
    n = student.shape[0]
    starts = {int(a): t for t, (a, b) in enumerate(teacher.tolist()) if a < b}
    ends = {int(b): t for t, (a, b) in enumerate(teacher.tolist()) if a < b}
    code = np.full(n, NONE, dtype=np.int8)
    row = np.full(n, -1, dtype=np.int64)
    chunk_length = np.zeros(n, dtype=np.int32)
    chunk_teacher = np.zeros((n, 2), dtype=np.int64)
    first = 0  # the chunk under way starts at student row ``first``
    for j, (a, b) in enumerate(student.tolist()):
        if a < b and a in starts:
            t = starts[a]
            row[j] = t
            code[j] = EXACT if teacher[t, 1] == b else STARTS
        if b not in ends or a >= b:
            continue
        t0, t1 = starts.get(int(student[first, 0])), ends[b]
        tiled = (t0 is not None and t0 <= t1
                 and all(student[k, 1] == student[k + 1, 0] for k in range(first, j))
                 and all(teacher[k, 1] == teacher[k + 1, 0] for k in range(t0, t1)))
        if tiled:
            chunk_length[j] = j - first + 1
            chunk_teacher[j] = (t0, t1 + 1)
        first = j + 1
    return Alignment(code, row, chunk_length, chunk_teacher)


# --------------------------------------------------------------------------- the vocabulary map

def _anchor(tokenizer) -> tuple[int, str] | None:
    """A one-character token that decodes to itself, read before each token (module docstring)."""
    for text in _ANCHORS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) == 1 and _decode(tokenizer, ids) == text:
            return int(ids[0]), text
    return None


def _pieces(tokenizer) -> list[str | None]:
    """Each id's string inside a text (after the anchor), None for ids left unmapped (module docstring)."""
    n = len(tokenizer)
    specials = {int(i) for i in (getattr(tokenizer, "all_special_ids", None) or [])}
    for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            specials.add(int(i))
    anchor = _anchor(tokenizer)
    if anchor is None:
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
    else:
        anchor_id, anchor_text = anchor
        joined = tokenizer.batch_decode([[anchor_id, i] for i in range(n)], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False)
        texts = [t[len(anchor_text):] if t.startswith(anchor_text) else None for t in joined]
    return [None if i in specials or not t or _REPLACEMENT in t else t for i, t in enumerate(texts)]


def vocabulary_map(teacher, student, *, teacher_size: int, teacher_end_ids: Sequence[int],
                   student_end_id: int) -> np.ndarray:
    """``[teacher_size]`` int32: teacher id -> student id of the same string, -1 where none (module docstring).

    Identical tokenizers (the same :func:`lm.chat.tokenizer_hash`) give the identity over ``teacher_size``.
    """
    if chat.tokenizer_hash(teacher) == chat.tokenizer_hash(student):
        return np.arange(teacher_size, dtype=np.int32)
    out = np.full(teacher_size, -1, dtype=np.int32)
    by_string: dict[str, list[int]] = {}
    for i, piece in enumerate(_pieces(student)):
        if piece is not None:
            by_string.setdefault(piece, []).append(i)
    canonical: dict[str, int] = {}
    anchor = _anchor(student)
    for piece, ids in by_string.items():
        choice = ids[0]
        if len(ids) > 1 and anchor is not None:
            written = student(anchor[1] + piece, add_special_tokens=False).input_ids
            if len(written) == 2 and written[0] == anchor[0] and written[1] in ids:
                choice = int(written[1])
        canonical[piece] = choice
    for t, piece in enumerate(_pieces(teacher)[:teacher_size]):
        if piece is not None and piece in canonical:
            out[t] = canonical[piece]
    for t in teacher_end_ids:
        if 0 <= int(t) < teacher_size:
            out[int(t)] = int(student_end_id)
    return out
