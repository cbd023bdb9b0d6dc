"""The one place that turns (prompt messages, response text) into token ids.

Both ``precompute`` (teacher side) and ``train`` (student side) import this
module, so the two always see the same ids for the same example.

Padding: :func:`pad_id` is the one rule both sides use to fill batches: the
tokenizer's pad token, else the end-of-turn token. Padded positions are always
masked out, so the choice never changes a number; one rule keeps batches equal.

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
  generated), the response ids are ``tokenizer(response,
  add_special_tokens=False)`` followed by the end-of-turn id.

Without a chat template a plain fallback template is used::

    System: {content}\\n        (only for system messages)
    User: {content}\\n
    Assistant: {content}\\n     (earlier assistant turns)
    Assistant:                  (generation prompt, with a trailing space)

tokenised with the tokenizer's default special tokens (e.g. a BOS), and the
response ids are ``tokenizer(response, add_special_tokens=False)`` followed by
``eos_token_id`` (the end-of-turn id of such tokenizers).

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


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(f"{type(tokenizer).__name__} has no eos_token_id and no chat template end-of-turn token")
    return int(eos)


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []))
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for i, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


_EOT_CACHE: "weakref.WeakKeyDictionary[Any, tuple[Any, int]]" = weakref.WeakKeyDictionary()
_PROBE_USER = "Reply with one word."
_PROBE_REPLY = "Okay"


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn.

    With a chat template: render a probe conversation and take the first
    special token after the assistant text (e.g. ``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``); if there is none, ``eos_token_id``.
    Without a template: ``eos_token_id``.
    """
    template = getattr(tokenizer, "chat_template", None)
    key = (template if isinstance(template, str) else repr(template), getattr(tokenizer, "eos_token_id", None))
    try:
        hit = _EOT_CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        hit = None
    if hit is not None and hit[0] == key:
        return hit[1]

    result = None
    if _has_template(tokenizer):
        probe = [{"role": "user", "content": _PROBE_USER}]
        prompt_ids = _template_ids(tokenizer, probe, True)
        full_ids = _template_ids(tokenizer, probe + [{"role": "assistant", "content": _PROBE_REPLY}], False)
        rest = full_ids[len(prompt_ids):] if full_ids[: len(prompt_ids)] == prompt_ids else full_ids
        special = _special_ids(tokenizer)
        for i in rest:
            if i in special:
                result = i
                break
    if result is None:
        result = _eos_id(tokenizer)
    try:
        _EOT_CACHE[tokenizer] = (key, result)
    except TypeError:
        pass
    return result


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
        return _text_ids(tokenizer, response, add_special_tokens=False) + [_eos_id(tokenizer)]
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
