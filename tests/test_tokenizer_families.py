"""End of turn, chat encoding and generation with tokenizers of several chat-template families.

Every tokenizer is built here with the ``tokenizers`` library (``tests.tiny``):
ChatML, Llama-3 headers with ``<|eot_id|>``, Gemma turns, ``[INST]``/``</s>``,
a template-less tokenizer, and a character-level vocabulary with ``<unk>`` that
cannot spell the probe "Okay" (the reported bug: its turns ended in ``<unk>``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lm import chat, models
from lm.chat import NoEndOfTurn, encode_example, encode_prompt, end_of_turn_id, end_of_turn_ids
from lm import generate
from tests import tiny

FAMILIES = list(tiny.FAMILIES)
TEMPLATED = [name for name in FAMILIES if tiny.FAMILIES[name].template is not None]
MULTI_END = ["chatml", "llama3", "gemma"]       # families whose eos differs from the template's end token

EXPECTED_ENDS = {                                # end_of_turn_ids(tokenizer, family generation eos), as tokens
    "chatml": ["<|im_end|>", "<|endoftext|>"],
    "llama3": ["<|eot_id|>", "<|end_of_text|>"],
    "gemma": ["<end_of_turn>", "<eos>"],
    "inst": ["</s>"],
    "plain": ["</s>"],
    "charlevel": ["</s>"],
}


def conversation(name):
    """(prompt, response) the family's vocabulary spells; the character-level one spells digits only."""
    if tiny.FAMILIES[name].char_level:
        return [{"role": "user", "content": "3 1 4 2?"}, {"role": "assistant", "content": "1 2 3 4"},
                {"role": "user", "content": "9 7 8?"}], "7 8 9"
    return [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "Name three colours."}], "Red, green and blue."


def end_token_id(name, tok=None):
    tok = tok or tiny.family_tokenizer(name)
    return tok.convert_tokens_to_ids(tiny.FAMILIES[name].end)


def rendered_ids(tok, messages):
    out = tok.apply_chat_template(messages, tokenize=True)
    return list(out["input_ids"]) if hasattr(out, "keys") else list(out)


# --------------------------------------------------------------------------- end of turn

@pytest.mark.parametrize("name", FAMILIES)
def test_end_of_turn_is_the_family_end_token(name):
    tok = tiny.family_tokenizer(name)
    eot = end_of_turn_id(tok)
    assert tok.convert_ids_to_tokens(eot) == tiny.FAMILIES[name].end
    assert eot != tok.unk_token_id


@pytest.mark.parametrize("name", FAMILIES)
def test_end_of_turn_ids_list_the_template_token_first_then_eos(name):
    tok = tiny.family_tokenizer(name)
    ids = end_of_turn_ids(tok, tiny.family_generation_eos(name))
    assert tok.convert_ids_to_tokens(ids) == EXPECTED_ENDS[name]
    assert tok.unk_token_id not in ids
    assert end_of_turn_id(tok, tiny.family_generation_eos(name)) == end_of_turn_id(tok)   # adds, never overrides


def test_char_level_vocabulary_cannot_spell_the_old_probe_yet_finds_its_end_token():
    tok = tiny.family_tokenizer("charlevel")
    assert tok("Okay", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]   # the reported tokenizer
    assert end_of_turn_id(tok) == tok.convert_tokens_to_ids("</s>") != tok.unk_token_id


def test_pad_that_the_template_writes_as_end_of_turn_is_the_end_token():
    # lm.models pads a tokenizer without pad with its end-of-turn token; eos stays <|endoftext|>
    tok = tiny.family_tokenizer("chatml")
    tok.pad_token = "<|im_end|>"
    assert tok.pad_token_id == end_token_id("chatml", tok) != tok.eos_token_id
    assert end_of_turn_ids(tok) == [tok.pad_token_id, tok.eos_token_id]


def _text_ended_template_tokenizer(**roles):
    """The character-level vocabulary with a template that ends assistant turns with a newline, no token."""
    tok = tiny.family_tokenizer("charlevel")
    tok.chat_template = ("{% for m in messages %}{{ m['role'][0] | upper + ':' + m['content'] + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    for role, token in roles.items():
        setattr(tok, role, token)
    return tok


@pytest.mark.parametrize("case", ["no-eos", "eos-is-unk", "dedicated-pad", "template-less-without-eos"])
def test_tokenizer_without_a_usable_end_token_is_refused(case):
    if case == "template-less-without-eos":
        tok = tiny.family_tokenizer("plain")
        tok.eos_token = None
    else:
        tok = _text_ended_template_tokenizer(eos_token={"no-eos": None, "eos-is-unk": "<unk>",
                                                       "dedicated-pad": None}[case])
        if case == "dedicated-pad":
            tok.add_special_tokens({"pad_token": "<pad>"})
    unk = tok.unk_token_id
    with pytest.raises(NoEndOfTurn) as refused:
        end_of_turn_id(tok, [unk] if unk is not None else None)   # a generation eos of unk does not count either
    message = str(refused.value)
    assert isinstance(refused.value, ValueError)
    assert "tiny-" in message and "no token ends an assistant turn" in message
    assert "eos_token_id" in message and "generation config" in message
    if case == "template-less-without-eos":
        assert "no chat template" in message
    else:
        assert "after the probe reply '1'" in message       # what the template writes after the probe
    with pytest.raises(NoEndOfTurn):
        encode_example(tok, [{"role": "user", "content": "1 2?"}], "1 2", None)


def test_template_that_cannot_render_the_probe_is_refused_not_guessed():
    tok = tiny.family_tokenizer("llama3")
    tok.chat_template = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('start with a system turn') }}"
                         "{% endif %}" + tiny.LLAMA3_TEMPLATE)
    with pytest.raises(NoEndOfTurn, match=r"tiny-llama3'.*cannot render the probe conversation.*start with a system"):
        end_of_turn_id(tok)


# --------------------------------------------------------------------------- encoding

@pytest.mark.parametrize("name", FAMILIES)
def test_encoded_response_ends_with_the_family_end_token(name):
    tok = tiny.family_tokenizer(name)
    prompt, response = conversation(name)
    enc = encode_example(tok, prompt, response, None)
    eot = end_token_id(name)
    assert enc.prompt_ids.tolist() == encode_prompt(tok, prompt).tolist()
    assert enc.response_ids[-1] == eot and enc.response_ids.tolist().count(eot) == 1
    lead = " " if name == "inst" else ""         # [INST] templates write the space before the answer
    assert tok.decode(enc.response_ids.tolist()) == lead + response + tiny.FAMILIES[name].end
    assert not enc.prompt_truncated and not enc.response_truncated


@pytest.mark.parametrize("name", TEMPLATED)
def test_prompt_and_response_are_what_the_template_renders(name):
    tok = tiny.family_tokenizer(name)
    prompt, response = conversation(name)
    enc = encode_example(tok, prompt, response, None)
    full = rendered_ids(tok, prompt + [{"role": "assistant", "content": response}])
    # the template's ids up to and including the end token; what it writes after (a newline) is dropped
    assert enc.input_ids.tolist() == full[: len(enc)]
    assert full[len(enc) - 1] == end_token_id(name)
    assert len(full) - len(enc) == {"chatml": 1, "gemma": 1, "charlevel": 1}.get(name, 0)


def test_template_less_tokenizer_uses_the_fallback_and_its_eos():
    tok = tiny.family_tokenizer("plain")
    prompt, response = conversation("plain")
    enc = encode_example(tok, prompt, response, None)
    assert enc.input_ids[0] == tok.bos_token_id                      # the tokenizer's own BOS, added once
    assert tok.decode(enc.input_ids.tolist()) == "<s>" + chat.render_fallback(prompt) + response + "</s>"


# --------------------------------------------------------------------------- generation

def _script(prompt_ids, answer, then):
    """Successor map: the prompt's last token -> answer... -> then..., and then[-1] -> then[0] (a loop)."""
    chain = [int(prompt_ids[-1])] + [int(t) for t in answer] + [int(t) for t in then]
    assert len(set(chain)) == len(chain), "a scripted token repeats: pick other tokens"
    script = {a: b for a, b in zip(chain, chain[1:])}
    script[chain[-1]] = int(then[0])
    return script


def _plain_tokens(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name,stop", [(name, "template") for name in FAMILIES] +
                         [(name, "eos") for name in MULTI_END])
def test_generation_is_cut_at_the_first_end_token(name, stop):
    """The scripted model answers, ends its turn (with the template's token, or with the eos where that
    differs), then goes on; the kept answer stops there and ends with the template's token."""
    tok = tiny.family_tokenizer(name)
    prompt, _ = conversation(name)
    ids = encode_prompt(tok, prompt)
    eot = end_token_id(name)
    answer = _plain_tokens(tok, "7" if name == "charlevel" else "Hi")[:1]
    after = _plain_tokens(tok, "5" if name == "charlevel" else " ok")[:1]
    then = [eot] + after if stop == "template" else [tok.eos_token_id, eot]
    assert then[0] != then[1]
    model = tiny.scripted_model(tok, _script(ids, answer, then))
    ends = end_of_turn_ids(tok, tiny.family_generation_eos(name))
    (got,) = generate.generate_greedy(model, [ids], max_new_tokens=6, eos_ids=ends, pad_id=chat.pad_id(tok))
    assert got.tolist() == answer + [eot]

    # what generate() returns when it is not told to stop: the cut keeps the first end only, as the template's
    raw = model.generate(torch.as_tensor(ids[None].astype(np.int64)), max_new_tokens=6, do_sample=False,
                         eos_token_id=None, pad_token_id=chat.pad_id(tok))[0, len(ids):].numpy()
    assert raw.tolist()[: len(answer) + 1] == answer + then[:1] and sum(t in ends for t in raw.tolist()) >= 2
    assert generate.cut_after_eos(raw, set(ends), 6, ends[0]).tolist() == answer + [eot]


def test_cut_keeps_the_first_end_id_and_can_write_the_template_token_in_its_place():
    row = np.array([5, 6, 9, 7, 8, 0, 0])
    assert generate.cut_after_eos(row, {8, 9}, 6).tolist() == [5, 6, 9]
    assert generate.cut_after_eos(row, {8, 9}, 6, 8).tolist() == [5, 6, 8]
    assert generate.cut_after_eos(row, {4}, 6).tolist() == [5, 6, 9, 7, 8, 0]
    assert row.tolist() == [5, 6, 9, 7, 8, 0, 0]                        # the generated row is left as it was


def test_batched_generation_drops_padding_and_cuts_unended_rows_at_max_new_tokens():
    tok = tiny.family_tokenizer("gemma")
    prompt, _ = conversation("gemma")
    ends_here = encode_prompt(tok, prompt)
    z, c, a = (_plain_tokens(tok, t)[0] for t in ("Z", "c", "Hi"))
    runs_on = np.concatenate([ends_here, [z]]).astype(np.int32)        # longer prompt, last token z -> c -> c ...
    eot = end_token_id("gemma")
    script = {**_script(ends_here, [a], [eot]), z: c, c: c}
    model = tiny.scripted_model(tok, script)
    pad = chat.pad_id(tok)
    assert pad not in (a, c, eot)
    for eos_ids in (end_of_turn_ids(tok), [eot]):
        got = generate.generate_greedy(model, [ends_here, runs_on], max_new_tokens=5, eos_ids=eos_ids, pad_id=pad,
                                      batch_size=2)
        assert [g.tolist() for g in got] == [[a, eot], [c] * 5]


def test_char_level_generation_stops_at_its_end_token():
    """The report: generate() was told to stop at <unk>, so answers ran past </s> ('3 1 4 2</s>7</s>')."""
    tok = tiny.family_tokenizer("charlevel")
    prompt = [{"role": "user", "content": "4 3 1?"}]
    ids = encode_prompt(tok, prompt)
    eot = tok.convert_tokens_to_ids("</s>")
    three, one, seven = (tok.convert_tokens_to_ids(t) for t in "317")
    model = tiny.scripted_model(tok, {int(ids[-1]): three, three: one, one: eot, eot: seven, seven: eot})
    (got,) = generate.generate_greedy(model, [ids], max_new_tokens=8, eos_ids=[end_of_turn_id(tok)],
                                     pad_id=chat.pad_id(tok))
    assert tok.decode(got.tolist()) == "31</s>"


def test_generation_without_end_ids_is_refused():
    tok = tiny.family_tokenizer("charlevel")
    model = tiny.scripted_model(tok, {1: 1})
    with pytest.raises(ValueError, match="eos_ids is empty"):
        generate.generate_greedy(model, [np.array([2, 3])], max_new_tokens=2, eos_ids=[], pad_id=0)


# --------------------------------------------------------------------------- lm.models

def test_generation_config_of_a_converted_model_stops_at_every_end_token():
    tok = tiny.family_tokenizer("llama3")
    config = models._generation_config(tok)
    assert config.eos_token_id == [end_token_id("llama3"), tok.eos_token_id]


def test_converted_tokenizer_without_pad_is_padded_with_its_end_token():
    tok = models._pad_with_end_of_turn(tiny.family_tokenizer("inst"))
    assert tok.pad_token == "</s>" and len(tok) == len(tiny.family_tokenizer("inst"))


def test_generation_eos_ids_read_from_a_model_directory(tmp_path):
    path = tiny.make_family_model(tmp_path / "m", "llama3", seed=0)
    tok = models.load_tokenizer(str(path))
    assert models.generation_eos_ids(path) == tiny.family_generation_eos("llama3")
    assert end_of_turn_ids(tok, models.generation_eos_ids(path)) == [end_token_id("llama3"), tok.eos_token_id]
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    with pytest.raises(models.ModelLoadError, match="generation_config.json: eos_token_id must be a token id"):
        models.generation_eos_ids(path)
    assert models.generation_eos_ids(tmp_path) == []


# --------------------------------------------------------------------------- end to end

def test_precompute_and_train_with_a_char_level_tokenizer(tmp_path):
    from precompute.teacher import TeacherConfig, run_teacher
    from store import TeacherStore
    from store import format as fmt
    from train.trainer import TrainConfig, train

    teacher = tiny.make_family_model(tmp_path / "teacher", "charlevel", seed=1, layers=2, hidden=32)
    student = tiny.make_family_model(tmp_path / "student", "charlevel", seed=2, layers=1, hidden=16)
    data = tiny.write_digit_pairs(tmp_path / "digits.jsonl", 12)
    out = tmp_path / "store.zarr"
    run_teacher(TeacherConfig(out=str(out), teacher=str(teacher), student=str(student), dataset=str(data),
                              passes=("pairs", "dpo_ref", "adpa"), top_k=4, max_length=48, max_new_tokens=10,
                              examples_per_part=4, device="cpu", dtype="float32", progress=False))

    tok = tiny.family_tokenizer("charlevel")
    eot = tok.convert_tokens_to_ids("</s>")
    ends = set(end_of_turn_ids(tok, tiny.family_generation_eos("charlevel")))
    store = TeacherStore.open(str(out))
    pairs = generated = 0
    for split in store.splits():
        for part in range(store.num_parts(split)):
            for sequence_set in (fmt.SET_PAIRS, fmt.SET_GENERATED):
                base = store.read_section(split, part, sequence_set)
                off = base["token_offsets"]
                for s in range(len(off) - 1):
                    response = base["input_ids"][off[s] + int(base["prompt_length"][s]): off[s + 1]].tolist()
                    assert tok.unk_token_id not in response, tok.decode(response)
                    assert not ends & set(response[:-1]), f"end token inside the answer: {tok.decode(response)!r}"
                    if sequence_set == fmt.SET_PAIRS:
                        assert response[-1] == eot, tok.decode(response)
                        pairs += 1
                    else:
                        assert response[-1] == eot or len(response) == 10, tok.decode(response)
                        generated += 1
    assert pairs == 24 and generated == 12

    run = train(TrainConfig(cache=str(out), out=str(tmp_path / "run"), method="dckd+adpa", lr=1e-3,
                            batch_tokens=200, max_steps=3, device="cpu", dtype="float32", log_every=1,
                            progress=False))
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
