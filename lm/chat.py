"""The one place that turns (prompt messages, response text) into token ids.

Both ``precompute`` (teacher side) and ``train`` (student side) import this
module, so the two always see the same ids for the same example.

Padding: :func:`pad_id` is the one rule both sides use to fill batches: the
tokenizer's pad token, else the end-of-turn token. Padded positions are always
masked out, so the choice never changes a number; one rule keeps batches equal.

End of turn
-----------
:func:`end_of_turn_ids` lists every id that ends an assistant turn, in this
order, without duplicates; :func:`end_of_turn_id` is the first of them, the one
every stored response ends with:

1. the template's own end-of-turn token (tokenizers with a chat template): a
   probe conversation, one user turn and one assistant reply, is rendered with
   and without the reply; after the reply's ids, the first special or added
   token the template writes is the end of turn (``<|im_end|>``,
   ``<|eot_id|>``, ``<end_of_turn>``, ``</s>``).  The probe text is the first
   of ``PROBE_REPLIES`` ("Okay", "ok", "yes", "a", "1") that the vocabulary
   spells, else the first alphanumeric vocabulary entry that it spells;
   "spells" means: its ids hold no unk, special or added token and decode
   back to it (whitespace aside).  So the probe never contributes a token of
   its own, and a vocabulary that cannot spell "Okay" (one that turns it into
   unk) still finds the template's suffix;
2. the tokenizer's ``eos_token_id`` (one id or a list);
3. ``generation_eos``: a generation config's ``eos_token_id`` when the caller
   passes it (:func:`lm.models.generation_eos_ids` reads a model directory's).

The unk id is never accepted (it is what an unspellable text becomes), nor an
id outside the vocabulary.  A pad id is accepted only where one of the three
sources names it: a pad that is the eos (``lm.models`` sets pad = eos when a
tokenizer has none) or the token the template writes to end the turn
(``lm.models`` pads converted GGUF models with it) is an end token; a
dedicated padding token never is, since no source names it.  Padded positions
are masked by length, never by id, so pad == end token changes no number.
When no source is left, :class:`NoEndOfTurn` (a ``ValueError``) names the
tokenizer and says what each source gave; it is raised too when the template
cannot render the probe conversation (rather than guessing from the eos).

Generation stops at any of :func:`end_of_turn_ids` (Llama-3 templates end
turns with ``<|eot_id|>`` while the eos may be ``<|end_of_text|>``), and
:mod:`precompute.scoring` cuts an answer after its first one and writes the
first id (the template's) in its place, so generated and tokenised responses
end alike.

Chat template
-------------
When the tokenizer has a ``chat_template`` it is used:

* prompt ids = ``apply_chat_template(prompt, tokenize=True,
  add_generation_prompt=True)``, exactly what is fed to ``generate()``;
* response ids: the template renders prompt + ``{"role": "assistant",
  "content": response}``; the prompt ids must be a prefix of those ids, and
  the response ids are the rest, cut right after the first end-of-turn token
  (that token is kept: it gets a target too; whatever the template writes
  after it, typically a newline, is dropped).  A response whose text itself
  contains the end-of-turn token's text is therefore cut there.  If the prompt ids are not a
  prefix (templates that render history turns differently from the turn being
  generated), or the rest holds no end-of-turn id (a template that ends turns
  with text, its end of turn then being the eos), the response ids are
  ``tokenizer(response, add_special_tokens=False)`` followed by the
  end-of-turn id.

Without a chat template a plain fallback template is used::

    System: {content}\\n        (only for system messages)
    User: {content}\\n
    Assistant: {content}\\n     (earlier assistant turns)
    Assistant:                  (generation prompt, with a trailing space)

tokenised with the tokenizer's default special tokens (e.g. a BOS), and the
response ids are ``tokenizer(response, add_special_tokens=False)`` followed by
the end-of-turn id (for such tokenizers, their usable eos: see "End of turn").

Truncation (``max_length``)
---------------------------
When prompt + response is longer than ``max_length``, the prompt is cut from
the LEFT (its oldest tokens go, the last ones stay) and the response is kept
whole.  If the response alone would leave fewer than ``MIN_PROMPT_TOKENS``
(8) prompt tokens, the response is cut from the right to ``max_length - 8``
tokens (it then loses its end-of-turn token; ``response_truncated`` is set)
and only the last 8 prompt tokens are kept (or all of them, if the prompt has
fewer).  ``max_length`` must therefore be greater than 8.
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

__all__ = [
    "Encoded",
    "TokenizerMismatch",
    "MIN_PROMPT_TOKENS",
    "encode_prompt",
    "encode_example",
    "end_of_turn_id",
    "end_of_turn_ids",
    "NoEndOfTurn",
    "tokenizer_hash",
    "check_same_tokenization",
    "render_fallback",
    "pad_id",
]

MIN_PROMPT_TOKENS = 8
FALLBACK_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
FALLBACK_GENERATION_PROMPT = "Assistant: "

# Used by check_same_tokenization when no samples are given.
DEFAULT_SAMPLES: list[tuple[list[dict], str]] = [
    ([{"role": "user", "content": "What is the capital of France?"}], "The capital of France is Paris."),
    ([{"role": "system", "content": "You are terse."},
      {"role": "user", "content": "Count to three, then say 'naïve café' ✓."},
      {"role": "assistant", "content": "1, 2, 3. naïve café ✓"},
      {"role": "user", "content": "  Again,\twith    spaces\nand lines?"}],
     "  1,  2,\n3\t— done!  "),
]


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray       # int32 [L], prompt tokens then response tokens
    prompt_length: int          # number of prompt tokens; response = input_ids[prompt_length:]
    prompt_truncated: bool      # the prompt was cut from the left to fit max_length
    response_truncated: bool    # the response was cut from the right to fit max_length

    @property
    def prompt_ids(self) -> np.ndarray:
        return self.input_ids[: self.prompt_length]

    @property
    def response_ids(self) -> np.ndarray:
        return self.input_ids[self.prompt_length:]

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


class TokenizerMismatch(ValueError):
    """Two tokenizers give different ids for the same example."""


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _as_ids(out: Any) -> list[int]:
    """apply_chat_template / __call__ output (list, BatchEncoding, dict, tensor, array) -> flat list of ints."""
    if hasattr(out, "keys") and "input_ids" in out.keys():
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    out = list(out)
    if len(out) == 1 and isinstance(out[0], (list, tuple)):
        out = list(out[0])
    return [int(i) for i in out]


def _template_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, add_generation_prompt=add_generation_prompt)
    return _as_ids(out)


def _text_ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return _as_ids(tokenizer(text, add_special_tokens=add_special_tokens))


def render_fallback(prompt: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """The plain template used for tokenizers without a chat template."""
    parts = []
    for m in prompt:
        role = m["role"]
        if role not in FALLBACK_ROLES:
            raise ValueError(f"unknown role {role!r}")
        parts.append(f"{FALLBACK_ROLES[role]}: {m['content']}\n")
    if add_generation_prompt:
        parts.append(FALLBACK_GENERATION_PROMPT)
    return "".join(parts)


def _id_list(value: Any) -> list[int]:
    """An eos setting (None, an id, or a list of ids) as a list of ints."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def _marker_ids(tokenizer) -> set[int]:
    """Ids that text never spells by accident: special tokens and added tokens."""
    return _special_ids(tokenizer) | {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}


def _tokenizer_name(tokenizer) -> str:
    name = getattr(tokenizer, "name_or_path", "") or "(no name)"
    return f"{type(tokenizer).__name__} {name!r}"


class NoEndOfTurn(ValueError):
    """No token can end an assistant turn for this tokenizer (module docstring, "End of turn")."""


_EOT_CACHE: "weakref.WeakKeyDictionary[Any, tuple[Any, list[int]]]" = weakref.WeakKeyDictionary()
PROBE_REPLIES = ("Okay", "ok", "yes", "a", "1")
PROBE_VOCAB_SCAN = 4096


def _spelled(tokenizer, text: str, refused: set[int]) -> list[int] | None:
    """``text``'s ids if the vocabulary spells it: no refused id (unk, special, added), and decoding gives
    ``text`` back (whitespace aside); else None."""
    ids = _text_ids(tokenizer, text, add_special_tokens=False)
    if not ids or any(i in refused for i in ids):
        return None
    back = tokenizer.decode(ids)
    return ids if "".join(back.split()) == "".join(text.split()) else None


def _probe(tokenizer, refused: set[int]) -> tuple[str, list[int]] | None:
    """The first of PROBE_REPLIES the vocabulary spells, else the first alphanumeric vocabulary entry
    (by id, among the first PROBE_VOCAB_SCAN) that it spells; None if there is none."""
    for text in PROBE_REPLIES:
        ids = _spelled(tokenizer, text, refused)
        if ids:
            return text, ids
    by_id = sorted(tokenizer.get_vocab().values())[:PROBE_VOCAB_SCAN]
    for i in by_id:
        if int(i) in refused:
            continue
        text = tokenizer.decode([int(i)]).strip()
        ids = _spelled(tokenizer, text, refused) if text.isalnum() else None
        if ids:
            return text, ids
    return None


def _find_last(seq: list[int], part: list[int]) -> int | None:
    for start in range(len(seq) - len(part), -1, -1):
        if seq[start: start + len(part)] == part:
            return start
    return None


def _template_end(tokenizer, unk: int | None) -> tuple[int | None, str]:
    """(the template's end-of-turn id or None, what was seen): rule 1 of the module docstring."""
    markers = _marker_ids(tokenizer)
    probe = _probe(tokenizer, markers | ({unk} if unk is not None else set()))
    if probe is None:
        return None, (f"the vocabulary spells none of the probe replies {list(PROBE_REPLIES)} nor any "
                      f"alphanumeric token among its first {PROBE_VOCAB_SCAN} ids without unk")
    text, reply = probe
    user = [{"role": "user", "content": text}]
    try:
        prompt = _template_ids(tokenizer, user, True)
        full = _template_ids(tokenizer, user + [{"role": "assistant", "content": text}], False)
    except Exception as e:  # jinja, transformers and template-raised errors alike
        raise NoEndOfTurn(f"{_tokenizer_name(tokenizer)}: its chat template cannot render the probe conversation "
                          f"{user + [{'role': 'assistant', 'content': text}]} that finds the end-of-turn token "
                          f"({type(e).__name__}: {e})") from e
    n = 0
    while n < min(len(prompt), len(full)) and prompt[n] == full[n]:
        n += 1
    rest = full[n:]
    at = _find_last(rest, reply)
    after = rest[at + len(reply):] if at is not None else rest
    for i in after:
        if i in markers and i != unk:
            return i, f"the template ends the probe reply {text!r} with {tokenizer.convert_ids_to_tokens(i)!r}"
    written = tokenizer.convert_ids_to_tokens(after)
    return None, (f"the template writes {written!r} after the probe reply {text!r}: no special or added token "
                  f"other than unk")


def end_of_turn_ids(tokenizer, generation_eos: int | Sequence[int] | None = None) -> list[int]:
    """Every id that ends an assistant turn, the template's own end-of-turn token first.

    The rule (module docstring, "End of turn"): the first special or added
    token the chat template writes after a spellable probe reply, then the
    tokenizer's eos id(s), then ``generation_eos`` (a generation config's
    ``eos_token_id``), without duplicates, never unk or an id outside the
    vocabulary. Raises :class:`NoEndOfTurn` when none is left.
    """
    template = getattr(tokenizer, "chat_template", None)
    unk = getattr(tokenizer, "unk_token_id", None)
    given = tuple(_id_list(generation_eos))
    key = (template if isinstance(template, str) else repr(template), getattr(tokenizer, "eos_token_id", None),
           unk, len(tokenizer), given)
    try:
        hit = _EOT_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and hit[0] == key:
        return list(hit[1])

    tried = []
    ordered = []
    if _has_template(tokenizer):
        end, seen = _template_end(tokenizer, unk)
        tried.append(seen)
        ordered += [end] if end is not None else []
    else:
        tried.append("no chat template")
    for what, ids in (("eos_token_id", _id_list(getattr(tokenizer, "eos_token_id", None))),
                      ("generation config eos_token_id", list(given))):
        usable = [i for i in ids if i != unk and 0 <= i < len(tokenizer)]
        tried.append(f"{what} {ids or 'none'}" + (f" (unk is {unk}; vocabulary size {len(tokenizer)})"
                                                 if ids and not usable else ""))
        ordered += usable
    result = list(dict.fromkeys(ordered))
    if not result:
        raise NoEndOfTurn(f"{_tokenizer_name(tokenizer)}: no token ends an assistant turn: {'; '.join(tried)}. "
                          f"Give the tokenizer an eos_token that ends assistant turns, or a chat template "
                          f"that writes a special token after the assistant's text")
    try:
        _EOT_CACHE[tokenizer] = (key, result)
    except TypeError:
        pass
    return list(result)


def end_of_turn_id(tokenizer, generation_eos: int | Sequence[int] | None = None) -> int:
    """The token that ends an assistant turn: the first of :func:`end_of_turn_ids` (module docstring)."""
    return end_of_turn_ids(tokenizer, generation_eos)[0]


def pad_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else the end-of-turn token (module docstring)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else end_of_turn_id(tokenizer)


# --------------------------------------------------------------------------- #
# encoding
# --------------------------------------------------------------------------- #
def _prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    if not prompt:
        raise ValueError("empty prompt")
    if _has_template(tokenizer):
        return _template_ids(tokenizer, prompt, True)
    return _text_ids(tokenizer, render_fallback(prompt), add_special_tokens=True)


def encode_prompt(tokenizer, prompt: list[dict], max_length: int | None = None) -> np.ndarray:
    """Ids of the prompt with the generation prompt (what ``generate()`` is fed), int32.

    With ``max_length`` the prompt is cut from the left to its last ``max_length`` tokens.
    """
    ids = _prompt_ids(tokenizer, prompt)
    if max_length is not None:
        if max_length <= 0:
            raise ValueError(f"max_length must be positive, got {max_length}")
        ids = ids[-max_length:]
    return np.asarray(ids, dtype=np.int32)


def _response_ids(tokenizer, prompt: list[dict], prompt_ids: list[int], response: str) -> list[int]:
    if not _has_template(tokenizer):
        return _text_ids(tokenizer, response, add_special_tokens=False) + [end_of_turn_id(tokenizer)]
    eot = end_of_turn_id(tokenizer)
    full = _template_ids(tokenizer, list(prompt) + [{"role": "assistant", "content": response}], False)
    n = len(prompt_ids)
    if len(full) > n and full[:n] == prompt_ids:
        rest = full[n:]
        if eot in rest:
            return rest[: rest.index(eot) + 1]
    return _text_ids(tokenizer, response, add_special_tokens=False) + [eot]


def encode_example(tokenizer, prompt: list[dict], response: str, max_length: int | None) -> Encoded:
    """Prompt ids (with generation prompt) followed by the response ids ending in end-of-turn.

    See the module docstring for how responses are tokenised and how
    ``max_length`` truncates.
    """
    p = _prompt_ids(tokenizer, prompt)
    r = _response_ids(tokenizer, prompt, p, response)
    prompt_truncated = response_truncated = False
    if max_length is not None and len(p) + len(r) > max_length:
        if max_length <= MIN_PROMPT_TOKENS:
            raise ValueError(f"max_length must be greater than {MIN_PROMPT_TOKENS}, got {max_length}")
        keep_prompt = min(MIN_PROMPT_TOKENS, len(p))
        if len(r) > max_length - keep_prompt:
            r = r[: max_length - keep_prompt]
            response_truncated = True
        keep = max_length - len(r)
        if keep < len(p):
            p = p[-keep:]
            prompt_truncated = True
    ids = np.asarray(p + r, dtype=np.int32)
    return Encoded(input_ids=ids, prompt_length=len(p), prompt_truncated=prompt_truncated,
                   response_truncated=response_truncated)


# --------------------------------------------------------------------------- #
# identity / compatibility
# --------------------------------------------------------------------------- #
def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def tokenizer_hash(tokenizer) -> str:
    """sha256 hex of what decides tokenisation: the full tokenizer serialisation
    (``backend_tokenizer.to_str()`` for fast tokenizers, else the vocabulary and
    added tokens), the special tokens, and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(b"fast\0")
        h.update(backend.to_str().encode("utf-8"))
    else:
        vocab = tokenizer.get_vocab()
        h.update(b"vocab\0")
        h.update(json.dumps(sorted(vocab.items(), key=lambda kv: (kv[1], kv[0])), ensure_ascii=False).encode("utf-8"))
        added = {int(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
        h.update(json.dumps(sorted(added.items()), ensure_ascii=False).encode("utf-8"))
    special = {
        "map": _jsonable(getattr(tokenizer, "special_tokens_map", {}) or {}),
        "ids": {name: _jsonable(getattr(tokenizer, f"{name}_token_id", None))
                for name in ("bos", "eos", "pad", "unk")},
    }
    h.update(b"\0special\0")
    h.update(json.dumps(special, sort_keys=True, ensure_ascii=False).encode("utf-8"))
    h.update(b"\0template\0")
    h.update(json.dumps(_jsonable(getattr(tokenizer, "chat_template", None)), sort_keys=True,
                        ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


def _preview(ids: Sequence[int], start: int, width: int = 8) -> str:
    lo = max(0, start - 2)
    seg = list(ids[lo: lo + width])
    return ("…" if lo else "") + str(seg) + ("…" if lo + width < len(ids) else "")


def check_same_tokenization(tok_a, tok_b, samples: list[tuple[list[dict], str]],
                            names: tuple[str, str] = ("teacher", "student")) -> None:
    """Raise :class:`TokenizerMismatch` unless both tokenizers encode every sample identically.

    Cheap (no model needed): run it before loading any model.  Identical
    tokenizer hashes pass at once; otherwise each (prompt, response) sample is
    encoded with both (``encode_example``, no truncation) and the first
    difference is reported with both names and both hashes.  With no samples a
    small built-in set is used.
    """
    ha, hb = tokenizer_hash(tok_a), tokenizer_hash(tok_b)
    if ha == hb:
        return
    na, nb = names
    for k, (prompt, response) in enumerate(samples or DEFAULT_SAMPLES):
        try:
            ea = encode_example(tok_a, prompt, response, None)
            eb = encode_example(tok_b, prompt, response, None)
        except Exception as e:
            raise TokenizerMismatch(
                f"cannot compare tokenizers {na} (hash {ha}) and {nb} (hash {hb}): sample {k} failed to encode: "
                f"{type(e).__name__}: {e}") from e
        a, b = ea.input_ids.tolist(), eb.input_ids.tolist()
        if a == b and ea.prompt_length == eb.prompt_length:
            continue
        pos = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        user = next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
        raise TokenizerMismatch(
            f"{na} and {nb} tokenise differently, so the cached {na} signals cannot be used for the {nb}: "
            f"{na} tokenizer hash {ha}, {nb} tokenizer hash {hb}; first differing sample {k} "
            f"(prompt {user[:60]!r}, response {response[:60]!r}): {len(a)} vs {len(b)} ids "
            f"(prompt {ea.prompt_length} vs {eb.prompt_length}), first difference at position {pos}: "
            f"{na} {_preview(a, pos)} vs {nb} {_preview(b, pos)}")
