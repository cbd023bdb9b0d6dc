"""`train student --gradient-checkpointing`: the decoder layers recompute their activations in backward.

On the path the trainer takes (:func:`train.methods.student_outputs`: the decoder of
:func:`lm.head.split_model`, then the output layer in checkpointed chunks), in float64 on
tiny real models and real stores: every method family's gradients with checkpointing equal
those without; every decoder layer runs again in backward (and not without checkpointing);
the decoder keeps no KV cache. A whole run records the option and makes the weights of a run
without it, and a run may be resumed with the option changed (it changes memory and time,
not what is computed). The run on several processes is in tests/test_train_distributed.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lm import head, models
from store import ExampleStream, TeacherStore
from tests.test_train_distributed import groups_store, ranked_store  # noqa: F401 (fixtures: groups, ranked groups)
from train import distributed, methods
from train.batches import collate
from train.config import TrainConfig, TrainError
from train.trainer import train

#: every method family, and the store that has what it reads
FAMILIES = {"sft": "tiny_store", "kd": "tiny_store", "dckd": "tiny_store", "adpa": "tiny_store",
            "dpo": "tiny_store", "simpo": "tiny_store", "pad": "groups_store", "pad_dpo": "groups_store",
            "cyclealign": "ranked_store", "pro": "ranked_store"}


def float64_student(path, checkpointed: bool):
    model = models.load_model(str(path), device="cpu")[0].double().train()
    if checkpointed:
        assert distributed.checkpoint_layers(model) == model.config.num_hidden_layers
    return model


def layer_calls_in_backward(model):
    """Count, per decoder layer, the calls of its sub-modules made while backward runs; and the decoder's outputs.

    Hooks on sub-modules: transformers checkpoints a layer's ``forward``, so the layer's own
    hooks run once, while its sub-modules run again in the recomputation (up to the last one
    whose output backward needs: torch's checkpoint stops there)."""
    decoder, _ = head.split_model(model)
    calls, state, outputs = [0] * len(decoder.layers), {"backward": False}, []

    def counter(i):
        def hook(module, args, output):
            calls[i] += state["backward"]
        return hook

    for i, layer in enumerate(decoder.layers):
        for sub in list(layer.modules())[1:]:
            sub.register_forward_hook(counter(i))
    decoder.register_forward_hook(lambda module, args, output: outputs.append(output))
    return calls, state, outputs


def loss_and_gradients(model, batch, terms):
    calls, state, outputs = layer_calls_in_backward(model)
    total, _ = methods.method_loss(model, batch, terms, methods.Settings(), chunk_size=7)
    state["backward"] = True
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return float(total.detach()), grads, calls, outputs


@pytest.mark.parametrize("method", list(FAMILIES))
def test_gradients_with_and_without_checkpointing_agree_for_every_method_family(method, request, tiny_models):
    store_path = request.getfixturevalue(FAMILIES[method])
    terms = methods.resolve_terms(method)
    stream = ExampleStream(TeacherStore.open(str(store_path)), "train", methods.needs_of(terms), shuffle=False)
    batch = collate(list(itertools.islice(stream, 3)), pad_id=0)
    batch.response = {k: v.double() if v.is_floating_point() else v for k, v in batch.response.items()}

    plain = loss_and_gradients(float64_student(tiny_models[1], False), batch, terms)
    checkpointed = loss_and_gradients(float64_student(tiny_models[1], True), batch, terms)

    assert checkpointed[0] == pytest.approx(plain[0], rel=1e-12)
    assert plain[1].keys() == checkpointed[1].keys() and len(plain[1]) > 0
    for name, expected in plain[1].items():
        torch.testing.assert_close(checkpointed[1][name], expected, rtol=1e-10, atol=1e-13, msg=name)
    assert any(float(g.abs().max()) > 0 for g in plain[1].values())
    assert plain[2] == [0] * len(plain[2])  # without: nothing of a layer runs in backward
    assert all(n > 0 for n in checkpointed[2])  # with: every layer runs again there
    for outputs in (plain[3], checkpointed[3]):  # the decoder kept no KV cache, with checkpointing or not
        assert len(outputs) == 1
        assert getattr(outputs[0], "cache", None) is None and getattr(outputs[0], "past_key_values", None) is None


def test_a_model_without_checkpointing_support_is_refused_in_one_line():
    class NoCheckpointing(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(TrainError, match="NoCheckpointing does not support activation checkpointing"):
        distributed.checkpoint_layers(NoCheckpointing())


def test_a_run_records_the_option_makes_the_same_weights_and_resumes_with_it_changed(tiny_store, tmp_path):
    common = dict(cache=str(tiny_store), method="dckd+adpa", lr=1e-3, batch_tokens=300, max_steps=3, device="cpu",
                  dtype="float32", log_every=1, progress=False)
    plain = train(TrainConfig(out=str(tmp_path / "plain"), **common))
    checkpointed = train(TrainConfig(out=str(tmp_path / "checkpointed"), gradient_checkpointing=True, **common))
    assert yaml.safe_load((checkpointed / "config.yaml").read_text())["gradient_checkpointing"] is True
    assert yaml.safe_load((plain / "config.yaml").read_text())["gradient_checkpointing"] is False
    # started with checkpointing, resumed without: not a trajectory setting
    train(TrainConfig(out=str(tmp_path / "switched"), gradient_checkpointing=True, save_every=1, **common),
          stop_after=1)
    switched = train(TrainConfig(out=str(tmp_path / "switched"), resume=True, **common))
    expected = load_file(plain / "model.safetensors")
    for run in (checkpointed, switched):
        got = load_file(run / "model.safetensors")
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=(run.name, name))
