"""Teacher pass throughput relative to a bare forward pass of the same model, and to the tight limit.

All run on the same length-sorted token-budget batches on the same device:

- bare forward: ``model(input_ids, attention_mask).logits`` and nothing else (logits on every row,
  prompts included): today's baseline;
- tight limit: the decoder, then the output layer (its linear map, :func:`lm.head.split_model`) on the
  response rows only, in the pass's row chunks, and nothing else: what the teacher pass cannot do without;
- teacher pass: what ``precompute teacher`` does per part: decoder, output layer on
  response rows, log-softmax, top-K on the device, target log-probs, the exact tail, copy to host,
  and writing the part into a store (on the background writer thread, as the
  pipeline does, so writing overlaps the next part's compute).

Rounds alternate between the three and the medians are compared, since these
machines are noisy. Targets: teacher pass / tight limit >= 0.95; / bare forward >= 0.85.
With ``--device cuda`` it also prints the model FLOP utilisation of each: 2 x parameters FLOP
per token over the device's bf16 matrix-multiply rate, measured here on square matrices.

    python benchmarks/precompute_throughput.py [--examples 48] [--rounds 3] [--device auto] [--top-p 1.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm import chat, models  # noqa: E402
from lm.head import split_model  # noqa: E402
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
    ap.add_argument("--top-p", type=float, default=1.0, help="the pass's adaptive K (precompute teacher --top-p)")
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

    def padded_batches():
        """(ids, mask, lengths, prompts, batch) of every batch of every part, in the pass's order."""
        for base in parts:
            seqs, prompts = split_sequences(base)
            lengths = [len(s) for s in seqs]
            for batch in passes.token_budget_order(lengths, args.batch_tokens):
                ids, mask = passes.right_padded([seqs[i] for i in batch], pad, device)
                yield ids, mask, lengths, prompts, batch

    @torch.inference_mode()
    def bare() -> float:
        t0 = time.perf_counter()
        for ids, mask, *_ in padded_batches():
            model(input_ids=ids, attention_mask=mask).logits
        sync()
        return time.perf_counter() - t0

    decoder, output_layer = split_model(model)

    @torch.inference_mode()
    def tight() -> float:
        """The decoder, then the output layer's linear map on the response rows only (the pass's chunks)."""
        t0 = time.perf_counter()
        for ids, mask, lengths, prompts, batch in padded_batches():
            hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
            rows_b = torch.cat([torch.full((lengths[i] - prompts[i],), b, dtype=torch.long)
                                for b, i in enumerate(batch)]).to(hidden.device)
            rows_p = torch.cat([torch.arange(prompts[i] - 1, lengths[i] - 1) for i in batch]).to(hidden.device)
            picked = hidden[rows_b, rows_p]
            for c0 in range(0, picked.shape[0], passes.HEAD_CHUNK_ROWS):
                output_layer.module(picked[c0:c0 + passes.HEAD_CHUNK_ROWS])
        sync()
        return time.perf_counter() - t0

    def teacher_pass(store: TeacherStore) -> float:
        writer = ThreadPoolExecutor(1)
        pending = None
        t0 = time.perf_counter()
        for part, base in enumerate(parts):
            seqs, prompts = split_sequences(base)
            scored = passes.score_sequences(model, seqs, prompts, top_k=args.top_k, top_p=args.top_p,
                                            batch_tokens=args.batch_tokens, pad_id=pad)
            if pending is not None:
                pending.result()
            pending = writer.submit(store.write_section, "train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER,
                                    passes.scored_arrays(scored, topk=True))
        pending.result()
        sync()
        return time.perf_counter() - t0

    bare()  # warm-up: allocator, kernels
    tight()
    load_before = os.getloadavg()
    times_bare, times_tight, times_pass = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            store = TeacherStore.create(f"{tmp}/r{r}.zarr", tokenizer={"name": info.name, "hash": "bench"},
                                        vocab_size=len(tokenizer), examples_per_part=args.examples_per_part)
            store.set_split("train", len(rows))
            for part, base in enumerate(parts):
                store.write_section("train", part, fmt.SET_PAIRS, fmt.BASE, base)
            runs = [("bare", bare), ("tight", tight), ("pass", lambda: teacher_pass(store))]
            for name, run in runs[r % 3:] + runs[:r % 3]:  # rotated each round
                {"bare": times_bare, "tight": times_tight, "pass": times_pass}[name].append(run())
    tb, tt, tp = (statistics.median(t) for t in (times_bare, times_tight, times_pass))
    response_tokens = sum(int(b["response_offsets"][-1]) for b in parts)
    print(f"model {info.name} on {device} ({dtype}), {len(rows)} examples, {tokens} tokens "
          f"({response_tokens} response tokens), top-K {args.top_k}"
          f"{f', top-p {args.top_p}' if args.top_p < 1 else ''}, {args.rounds} rotated rounds, medians; "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after:")
    print(f"  {'bare forward (logits on every row)':<52} {tokens / tb:10.1f} tokens/s  ({tb:.2f} s)")
    print(f"  {'tight limit (decoder + output layer, response rows)':<52} {tokens / tt:10.1f} tokens/s  ({tt:.2f} s)")
    print(f"  {'teacher pass (into store)':<52} {tokens / tp:10.1f} tokens/s  ({tp:.2f} s)")
    print(f"  ratio teacher pass / tight limit:  {tt / tp:.3f}   (target >= 0.95)")
    print(f"  ratio teacher pass / bare forward: {tb / tp:.3f}   (today's baseline; target >= 0.85)")
    if device.startswith("cuda"):
        rate = bf16_matmul_rate(device)
        params = sum(p.numel() for p in model.parameters())
        print(f"  model FLOP utilisation: 2 x {params / 1e6:.1f}M parameters FLOP per token over the measured bf16 "
              f"matmul rate {rate / 1e12:.1f} TFLOP/s:")
        for name, seconds in (("bare forward", tb), ("tight limit", tt), ("teacher pass", tp)):
            print(f"    {name:<14} {2 * params * tokens / seconds / rate:7.1%}")


def bf16_matmul_rate(device: str, n: int = 8192, repeats: int = 20) -> float:
    """FLOP/s of ``n x n @ n x n`` bf16 matrix multiplies on ``device`` (best of three timings)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 * repeats / best


if __name__ == "__main__":
    main()
