"""The store-quality benchmark (benchmarks/store_quality.py): its options, its bytes and its held-out KL.

The full benchmark trains the embedded 120M student (hours on a CPU); here its pieces are checked on tiny models:
the option grammar gives the ``precompute teacher`` settings it names, the bytes per token are the section's
chunk files over its response rows, and the held-out KL is the full-vocabulary KL computed literally.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import store_quality as bench  # noqa: E402

from store import TeacherStore  # noqa: E402
from store import format as fmt  # noqa: E402


@pytest.mark.parametrize("text, settings, label", [
    ("k50", ["--top-k", "50"], "K = 50"),
    ("p0.98", ["--top-k", "50", "--top-p", "0.98"], "top-p 0.98 (K <= 50)"),
    ("k16+s12", ["--top-k", "16", "--tail-samples", "12", "--tail-seed", "3"], "K = 16 + S = 12"),
    ("s12", ["--top-k", "0", "--tail-samples", "12", "--tail-seed", "3"], "S = 12 (pure sampled)"),
    ("k30+p0.9", ["--top-k", "30", "--top-p", "0.9"], "top-p 0.9 (K <= 30)"),
])
def test_options_name_their_precompute_settings(text, settings, label):
    option = bench.parse_option(text)
    assert option.args(3) == settings and option.label == label
    assert option.store_name(3) == (f"{text}-seed3" if option.samples else text)


def test_a_bad_option_is_refused():
    with pytest.raises(ValueError, match="'q5' is not kN, pP or sN"):
        bench.parse_option("k16+q5")
    with pytest.raises(SystemExit):
        bench.parse(["--options", "k16,x"])


def test_bytes_per_token_are_the_sections_chunk_files_over_its_rows(tiny_store):
    got = bench.bytes_per_token(Path(tiny_store))
    store = TeacherStore.open(str(tiny_store))
    rows = sum(int(store.section_attrs(split, part, "pairs", "teacher")["rows"]["response"])
               for split in store.splits() for part in range(store.num_parts(split)))
    files = [f for f in Path(tiny_store).glob("*/part-*/pairs/teacher/*/c/**/*") if f.is_file()]
    assert got["response_tokens"] == rows
    assert got["teacher"] == pytest.approx(sum(f.stat().st_size for f in files) / rows, rel=1e-12)
    assert set(got["arrays"]) == {"topk_ids", fmt.ARRAY_TOPK_LOGP_STEPS, "tail_logp", "target_logp", "logp_sum"}
    assert got["store"] > got["teacher"]


def test_held_out_kl_is_the_full_vocabulary_kl(tiny_store, tiny_models):
    from transformers import LlamaForCausalLM

    sequences, prompts, roles = bench.test_sequences(Path(tiny_store))
    assert sorted(set(roles)) == [fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED]
    teacher, student = (LlamaForCausalLM.from_pretrained(path).eval() for path in tiny_models)
    got = bench.full_kl(teacher, student, sequences, prompts, roles, batch_tokens=64)
    sums, counts = {0: 0.0, 1: 0.0}, {0: 0, 1: 0}
    for seq, prompt, role in zip(sequences, prompts, roles):
        with torch.no_grad():
            ids = torch.as_tensor(np.asarray(seq, dtype=np.int64))[None]
            t = torch.log_softmax(teacher(ids).logits[0, prompt - 1:-1].double(), -1)
            s = torch.log_softmax(student(ids).logits[0, prompt - 1:-1].double(), -1)
        for r in range(t.shape[0]):
            p = t[r].exp().tolist()
            sums[role] += math.fsum(pv * (tv - sv) for pv, tv, sv in zip(p, t[r].tolist(), s[r].tolist()))
            counts[role] += 1
    assert got["tokens"] == counts[0] + counts[1]
    assert got["kl_chosen"] == pytest.approx(sums[0] / counts[0], rel=1e-5)
    assert got["kl_rejected"] == pytest.approx(sums[1] / counts[1], rel=1e-5)
    assert got["kl"] == pytest.approx((sums[0] + sums[1]) / got["tokens"], rel=1e-5)
