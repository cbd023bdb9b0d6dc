"""Teacher pass throughput relative to a bare forward pass of the same model.

Both run on the same length-sorted token-budget batches on the same device:

- bare forward: ``model(input_ids, attention_mask).logits`` and nothing else;
- teacher pass: what ``precompute teacher`` does per part: decoder, output layer on
  response rows, log-softmax, top-K on the device, target log-probs, copy to host,
  and writing the part into a store (on the background writer thread, as the
  pipeline does, so writing overlaps the next part's compute).

Rounds alternate between the two and the medians are compared, since these
machines are noisy. Target: ratio >= 0.85 on CPU.

    python benchmarks/precompute_throughput.py [--examples 48] [--rounds 3] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm import chat, models  # noqa: E402
from precompute import dataset as data  # noqa: E402
from precompute import scoring as passes  # noqa: E402
from store.sequences import base_arrays, split_sequences  # noqa: E402
from store import TeacherStore  # noqa: E402
from store import format as fmt  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--examples", type=int, default=48)
    ap.add_argument("--examples-per-part", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    device = models.resolve_device(args.device)
    dtype = str(models.resolve_dtype(args.dtype, device)).replace("torch.", "")
    model, tokenizer, info = models.load_model(None, device=device, dtype=dtype)
    rows = data.load_splits(None, ("train",), limit=args.examples)["train"].rows
    parts = []
    for p0 in range(0, len(rows), args.examples_per_part):
        seqs = []
        for r in rows[p0:p0 + args.examples_per_part]:
            for role, text in ((fmt.ROLE_CHOSEN, r.chosen), (fmt.ROLE_REJECTED, r.rejected)):
                enc = chat.encode_example(tokenizer, r.prompt, text, 512)
                seqs.append((r.index, role, enc.input_ids, enc.prompt_length))
        parts.append(base_arrays(seqs))
    pad = tokenizer.pad_token_id
    tokens = sum(int(b["token_offsets"][-1]) for b in parts)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def bare() -> float:
        t0 = time.perf_counter()
        for base in parts:
            seqs, _ = split_sequences(base)
            lengths = [len(s) for s in seqs]
            for batch in passes.token_budget_order(lengths, args.batch_tokens):
                ids, mask = passes.right_padded([seqs[i] for i in batch], pad, device)
                model(input_ids=ids, attention_mask=mask).logits
        sync()
        return time.perf_counter() - t0

    def teacher_pass(store: TeacherStore) -> float:
        writer = ThreadPoolExecutor(1)
        pending = None
        t0 = time.perf_counter()
        for part, base in enumerate(parts):
            seqs, prompts = split_sequences(base)
            scored = passes.score_sequences(model, seqs, prompts, top_k=args.top_k,
                                            batch_tokens=args.batch_tokens, pad_id=pad)
            if pending is not None:
                pending.result()
            pending = writer.submit(store.write_section, "train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER,
                                    passes.scored_arrays(scored, topk=True))
        pending.result()
        sync()
        return time.perf_counter() - t0

    bare()  # warm-up: allocator, kernels
    times_bare, times_pass = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times_bare.append(bare())
            store = TeacherStore.create(f"{tmp}/r{r}.zarr", tokenizer={"name": info.name, "hash": "bench"},
                                        vocab_size=len(tokenizer), examples_per_part=args.examples_per_part)
            store.set_split("train", len(rows))
            for part, base in enumerate(parts):
                store.write_section("train", part, fmt.SET_PAIRS, fmt.BASE, base)
            times_pass.append(teacher_pass(store))
    tb, tp = statistics.median(times_bare), statistics.median(times_pass)
    print(f"model {info.name} on {device} ({dtype}), {len(rows)} examples, {tokens} tokens, "
          f"top-K {args.top_k}, {args.rounds} alternating rounds, medians:")
    print(f"  {'bare forward':<28} {tokens / tb:10.1f} tokens/s  ({tb:.2f} s)")
    print(f"  {'teacher pass (into store)':<28} {tokens / tp:10.1f} tokens/s  ({tp:.2f} s)")
    print(f"  ratio teacher pass / bare forward: {tb / tp:.3f}   (target >= 0.85)")


if __name__ == "__main__":
    main()
