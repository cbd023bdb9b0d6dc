"""Tests for lm.models.

The GGUF -> transformers conversion takes ~20-30 s on CPU, so it happens once
per session (``built_cache``); the GGUF-loaded model it used is captured then,
so the round-trip check does not have to dequantise the file a second time.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lm import models as M

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
SAMPLE = "The capital of France is Paris. 12 + 7 = 19."


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def built_cache(tmp_path_factory):
    """A cache holding the embedded teacher and student, plus GGUF reference logits."""
    root = tmp_path_factory.mktemp("distill-cache")
    gguf_models = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        if kwargs.get("gguf_file"):
            gguf_models.append(model)
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(M.CACHE_ENV, str(root))
        mp.setattr(AutoModelForCausalLM, "from_pretrained", spy)
        teacher_dir = M.ensure_embedded_teacher()
        M.ensure_embedded_student()
        tokenizer = M.load_tokenizer(M.EMBEDDED_TEACHER)

    assert len(gguf_models) == 1, "the GGUF file should be dequantised exactly once"
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = gguf_models[0].eval()(ids).logits
    return {"root": root, "teacher_dir": teacher_dir, "ids": ids, "gguf_logits": reference}


@pytest.fixture
def cache(built_cache, monkeypatch):
    monkeypatch.setenv(M.CACHE_ENV, str(built_cache["root"]))
    return built_cache


@pytest.fixture
def tiny_dir(tmp_path, built_cache):
    """A tiny random Llama saved with the teacher's tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
    )
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(built_cache["teacher_dir"] / name, path / name)
    return path


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    assert M.cache_dir() == tmp_path
    monkeypatch.delenv(M.CACHE_ENV)
    assert M.cache_dir() == Path("~/.cache/distill-cache").expanduser()


def test_local_directory_spec_loads(cache, tiny_dir):
    model, tokenizer, info = M.load_model(str(tiny_dir))
    assert info.kind == "directory" and info.name == str(tiny_dir)
    assert Path(info.path) == tiny_dir.resolve()
    assert not model.training
    assert model.config.num_hidden_layers == 2
    assert M.model_param_count(model) == sum(p.numel() for p in model.parameters())
    ids = tokenizer(SAMPLE, return_tensors="pt").input_ids
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 49152)


def test_name_in_cache_dir_resolves(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "cache"))
    shutil.copytree(tiny_dir, tmp_path / "cache" / "models" / "my-tiny")
    info = M.resolve_model("my-tiny")
    assert info.kind == "cache" and info.path == str(tmp_path / "cache" / "models" / "my-tiny")


def test_embedded_teacher_reloads_with_gguf_logits(cache):
    model, tokenizer, info = M.load_model(None)
    assert info.kind == "embedded" and info.name == M.EMBEDDED_TEACHER
    assert Path(info.path) == cache["teacher_dir"]
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in (cache["teacher_dir"] / "config.json").read_text()
    with torch.no_grad():
        logits = model(cache["ids"]).logits
    torch.testing.assert_close(logits, cache["gguf_logits"], atol=1e-4, rtol=0)
    end_of_turn = tokenizer.convert_tokens_to_ids(M.END_OF_TURN)
    assert model.generation_config.eos_token_id == end_of_turn
    assert model.generation_config.pad_token_id is not None
    assert tokenizer.chat_template


def test_embedded_student_is_teacher_minus_layers(cache):
    student, s_tok, info = M.load_model(M.EMBEDDED_STUDENT)
    teacher, t_tok, _ = M.load_model(M.EMBEDDED_TEACHER)
    assert info.kind == "embedded"
    n_teacher = teacher.config.num_hidden_layers
    assert student.config.num_hidden_layers == n_teacher - len(M.STUDENT_DROP_LAYERS) == 26
    assert len(student.model.layers) == 26
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == list(range(26))
    assert M.model_param_count(student) < M.model_param_count(teacher)

    # same tokenizer: same ids for plain text and for the chat template
    assert s_tok(SAMPLE).input_ids == t_tok(SAMPLE).input_ids
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert s_tok.apply_chat_template(chat, add_generation_prompt=True) == \
        t_tok.apply_chat_template(chat, add_generation_prompt=True)
    assert len(s_tok) == len(t_tok)

    # kept layers are the teacher's, re-indexed: student layer 12 is teacher layer 16
    kept = [i for i in range(n_teacher) if i not in M.STUDENT_DROP_LAYERS]
    for new, old in [(0, 0), (12, kept[12]), (25, n_teacher - 1)]:
        torch.testing.assert_close(student.model.layers[new].mlp.down_proj.weight,
                                   teacher.model.layers[old].mlp.down_proj.weight, atol=0, rtol=0)
    assert kept[12] == 16
    torch.testing.assert_close(student.lm_head.weight, teacher.lm_head.weight, atol=0, rtol=0)
    with torch.no_grad():
        assert student(cache["ids"]).logits.shape == cache["gguf_logits"].shape


def test_weights_hash_stable_and_sensitive(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "cache"))
    first = M.resolve_model(str(tiny_dir)).weights_hash
    assert first == _sha256(tiny_dir / "model.safetensors")
    assert (tmp_path / "cache" / M._HASH_SIDECAR).is_file()
    assert M.resolve_model(str(tiny_dir)).weights_hash == first  # from the sidecar
    (tmp_path / "cache" / M._HASH_SIDECAR).unlink()
    assert M.weights_hash(tiny_dir) == first  # recomputed, same answer

    model = LlamaForCausalLM.from_pretrained(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(tiny_dir)
    changed = M.resolve_model(str(tiny_dir)).weights_hash
    assert changed != first and changed == _sha256(tiny_dir / "model.safetensors")


def test_gguf_spec_hashes_the_file(cache):
    gguf = M._embedded_gguf()
    info = M.resolve_model(str(gguf))
    assert info.kind == "gguf" and info.path == str(gguf.resolve())
    assert info.weights_hash == _sha256(gguf)


def test_gguf_conversion_is_keyed_by_hash_and_reused(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "cache"))
    gguf = M._embedded_gguf()
    converted = tmp_path / "cache" / "models" / f"gguf-{_sha256(gguf)[:16]}"
    shutil.copytree(tiny_dir, converted)  # stands in for an earlier conversion
    model, _, info = M.load_model(str(gguf))
    assert info.kind == "gguf"
    assert model.config.num_hidden_layers == 2  # loaded from the cache, not re-converted


def test_embedded_hash_matches_saved_weights(cache):
    info = M.resolve_model(M.EMBEDDED_TEACHER)
    assert info.weights_hash == _sha256(cache["teacher_dir"] / "model.safetensors")


@pytest.mark.parametrize("spec", ["/nonexistent/model-dir", "./missing/teacher.gguf", "no-such-model-xyz"])
def test_unknown_spec_raises_clear_error(monkeypatch, tmp_path, spec):
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(M.ModelNotFoundError, match=spec.replace(".", r"\.")):
        M.resolve_model(spec)
    with pytest.raises(FileNotFoundError):
        M.load_tokenizer(spec)


def test_atomic_build_keeps_existing_and_cleans_up(tmp_path):
    target = tmp_path / "models" / "thing"
    target.mkdir(parents=True)
    assert M._build_atomically(target, lambda tmp: pytest.fail("rebuilt")) == target

    def broken(tmp):
        (tmp / "partial").write_text("x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        M._build_atomically(tmp_path / "models" / "other", broken)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["thing"]


def test_dtype_and_device_resolution():
    assert M.resolve_device("cpu") == "cpu"
    assert M.resolve_device("auto") in ("cpu", "cuda")
    assert M.resolve_dtype("auto", "cpu") == torch.float32
    assert M.resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert M.resolve_dtype(torch.float16, "cpu") == torch.float16
    with pytest.raises(ValueError, match="float8"):
        M.resolve_dtype("float8", "cpu")
