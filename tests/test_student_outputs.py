"""The student's forward (:func:`train.methods.student_outputs`): one output-layer pass over every row.

Rows that need different quantities (KD on the pairs, ADPA on the generated
answers) share the chunks of one pass: the output layer, and in backward the
gradient of its (tied) weight, run once per row, not once per group of rows.
Checked on a real store and a real tiny model in float64: the outputs and the
gradients of every parameter equal those of one pass per group of rows (what
the trainer did before), and both equal the model's own full logits.
"""

from __future__ import annotations

import pytest
import torch

from lm import head
from tests import store_helpers as H
from tests.test_adaptive_k import spread_teacher, top_p_store  # noqa: F401 (fixtures: a store with counts)
from train import losses, methods


def dckd_adpa_batch(store_path, n_examples=3):
    return H.float64_batch(store_path, "dckd+adpa", n_examples)


def student(path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path).double().train()


def outputs_one_pass_per_group(model, batch, requests, settings, chunk_size):
    """One output-layer pass per group of rows needing the same quantities, each with its own signals:
    the computation :func:`train.methods.student_outputs` made before it went to one pass."""
    R = batch.num_response_tokens
    wanted = {name: torch.zeros(R, dtype=torch.bool) for name in losses.TOKEN_TERMS}
    for request in requests:
        wanted[request.quantity] |= methods.response_rows(batch, request.sequence_set, request.role)
    wanted[losses.LOGP] = torch.stack(list(wanted.values())).any(0)
    decoder, output_layer = head.split_model(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    values = dict.fromkeys(wanted, torch.zeros(R, dtype=torch.float64))
    for names, rows in methods.rows_by_need(wanted):
        picked = hidden[batch.resp_seq[rows], batch.resp_pos[rows]]
        reads = {signal for name in names for signal in losses.TOKEN_TERMS[name].reads}
        got = losses.chunked_token_terms(picked, output_layer.logits, names,
                                         methods.row_signals(batch, reads, rows, settings), chunk_size)
        for name, value in got.items():
            values[name] = values[name].index_put((rows,), value)
    return methods.StudentOutputs(values, wanted)


@pytest.mark.parametrize("store_name", ["tiny_store", "top_p_store"])
@pytest.mark.parametrize("chunk_size", [5, 4096])
def test_one_pass_equals_one_pass_per_group_values_and_gradients(request, tiny_models, store_name, chunk_size):
    terms, batch = dckd_adpa_batch(request.getfixturevalue(store_name))
    settings = methods.Settings()
    requests = methods.token_requests(terms)
    one, per_group = student(tiny_models[1]), student(tiny_models[1])

    out = methods.student_outputs(one, batch, requests, settings, chunk_size)
    reference = outputs_one_pass_per_group(per_group, batch, requests, settings, chunk_size)
    assert {name for name, v in out.computed.items() if v.any()} == {"logp", "kd", "adpa"}
    for name in losses.TOKEN_TERMS:
        assert torch.equal(out.computed[name], reference.computed[name])
        torch.testing.assert_close(out.values[name], reference.values[name], rtol=0, atol=1e-14, msg=name)
        assert (out.values[name][~out.computed[name]] == 0).all()
    # every term of dckd+adpa, weighted, then backward through both models: the same gradients
    total = sum(term.weight * term.loss(batch, out, settings) for term in terms)
    total_ref = sum(term.weight * term.loss(batch, reference, settings) for term in terms)
    assert float(total.detach()) == pytest.approx(float(total_ref.detach()), rel=1e-14)
    total.backward()
    total_ref.backward()
    compared = 0
    for (name, p), q in zip(one.named_parameters(), per_group.parameters()):
        if p.grad is None and q.grad is None:
            continue
        scale = max(float(q.grad.abs().max()), 1e-30)
        assert float((p.grad - q.grad).abs().max()) <= 1e-12 * scale, name
        compared += 1
    assert compared == len(list(one.parameters()))

    # and both equal the model's own full logits (an independent computation of each quantity)
    with torch.no_grad():
        logits = one(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = logits[batch.resp_seq, batch.resp_pos]
    ids = methods.topk_ids_rows(batch, torch.arange(batch.num_response_tokens), settings)
    count = batch.response.get(losses.TOPK_COUNT)
    kd = losses.kd_tail_kl(rows, batch.response["teacher/topk_ids"], batch.response["teacher/topk_logp"],
                           batch.response["teacher/tail_logp"], count)
    computed = out.computed["kd"]
    torch.testing.assert_close(out.kd[computed].detach(), kd[computed], rtol=1e-10, atol=1e-12)
    generated = out.computed["adpa"]
    kept = None if count is None else losses.kept_entries(count, ids.shape[1])
    advantage = losses.adpa_advantage(batch.response["teacher/topk_logp"][generated],
                                      batch.response["reference/topk_logp"][generated],
                                      kept=None if kept is None else kept[generated])
    adpa = losses.adpa_token_loss(rows[generated], ids[generated], advantage)
    torch.testing.assert_close(out.adpa[generated].detach(), adpa, rtol=1e-10, atol=1e-12)


def test_the_output_layer_runs_once_per_row(tiny_store, tiny_models):
    """dckd+adpa: pair rows (logp, kd) and generated rows (logp, adpa) go through the output layer in one pass:
    as many output-layer calls as chunks of all the rows, not one series of chunks per group."""
    terms, batch = dckd_adpa_batch(tiny_store)
    model = student(tiny_models[1])
    calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    try:
        for chunk_size in (4096, 16):
            calls.clear()
            with torch.no_grad():
                out = methods.student_outputs(model, batch, methods.token_requests(terms), methods.Settings(),
                                              chunk_size)
            rows = int(out.computed["logp"].sum())
            assert sum(calls) == rows
            assert len(calls) == -(-rows // chunk_size)
            calls.clear()
            out = methods.student_outputs(model, batch, methods.token_requests(terms), methods.Settings(), chunk_size)
            sum(out.values[name].sum() for name in out.values).backward()
            assert len(calls) == 2 * -(-rows // chunk_size)  # forward, and the recomputation of each chunk in backward
    finally:
        hook.remove()
