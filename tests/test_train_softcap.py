"""The student's chunked forward on a model whose output layer soft-caps its logits (Gemma 2).

Training splits a model into decoder and output layer exactly as precompute does
(:func:`lm.head.split_model`): the chunked per-token quantities must equal the ones
computed from the model's own full-vocabulary ``logits``, soft-capping included.
"""

from __future__ import annotations

import itertools

import torch

from lm import head
from store import ExampleStream, TeacherStore
from tests import tiny
from train import losses, methods
from train.batches import collate

SOFTCAP = 2.0


def tiny_gemma2():
    """A random 1-layer Gemma 2 with the test tokenizer's vocabulary and logits large enough for the cap to bite."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tiny.smollm2_tokenizer()), hidden_size=16, intermediate_size=32,
                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                          max_position_embeddings=256, final_logit_softcapping=SOFTCAP, attn_implementation="eager")
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)  # tied with the embeddings: raw logits of several units, cap at 2
    return model.double().eval()


def test_chunked_outputs_of_a_softcapped_model_equal_its_full_logits(tiny_store):
    terms = methods.resolve_terms("dckd+adpa")
    stream = ExampleStream(TeacherStore.open(str(tiny_store)), "train", methods.needs_of(terms), shuffle=False)
    batch = collate(list(itertools.islice(stream, 3)), pad_id=0)
    model = tiny_gemma2()
    first = batch.examples[0].sequences[0]
    head.check_split(model, first.input_ids, first.prompt_length)

    with torch.no_grad():
        out = methods.student_outputs(model, batch, methods.token_requests(terms), methods.Settings(), chunk_size=7)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = logits[batch.resp_seq, batch.resp_pos]  # [R, V], soft-capped by the model itself
    ids, topk_logp = batch.response["teacher/topk_ids"], batch.response["teacher/topk_logp"]
    tail = batch.response["teacher/tail_logp"]
    advantage = losses.adpa_advantage(topk_logp, batch.response["reference/topk_logp"])
    expected = {"logp": losses.token_logprobs(rows, batch.resp_target), "kd": losses.kd_tail_kl(rows, ids, topk_logp, tail),
                "adpa": losses.adpa_token_loss(rows, ids, advantage)}
    for name, values in expected.items():
        computed = out.computed[name]
        assert computed.any(), name
        torch.testing.assert_close(getattr(out, name)[computed], values[computed], rtol=1e-9, atol=1e-9, msg=name)

    # the cap matters here: the uncapped output layer would give other log-probs
    assert rows.abs().max() <= SOFTCAP
    uncapped = model.lm_head(model.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                             .last_hidden_state)[batch.resp_seq, batch.resp_pos].detach()
    assert uncapped.abs().max() > 2 * SOFTCAP
    assert (losses.token_logprobs(uncapped, batch.resp_target) - expected["logp"]).abs().max() > 0.1
