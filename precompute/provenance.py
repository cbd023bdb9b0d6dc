"""What a ``precompute`` store records about its inputs: how rows became token ids, which prompts a part answers."""

from __future__ import annotations

import hashlib
import json
from typing import Sequence

from store import PassRecord

from .dataset import Row


def encode_record(tokenizer, tokenizer_hash: str, max_length: int) -> PassRecord:
    """The ``encode`` pass: how dataset rows became token ids."""
    template = tokenizer.chat_template or "fallback"
    return PassRecord(settings={
        "max_length": max_length,
        "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest(),
        "tokenizer_sha256": tokenizer_hash,
    })


def prompts_fingerprint(rows: Sequence[Row]) -> str:
    """sha256 of the (index, prompt messages) the samples of a part answer."""
    payload = [[r.index, r.prompt] for r in rows]
    text = json.dumps(payload, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
