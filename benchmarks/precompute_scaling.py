"""Teacher pass throughput on a dask cluster: 1 worker against 2, side by side in one run.

CPU (default): ``precompute teacher --passes pairs`` (the teacher's top-K on
chosen and rejected, written into a store) over the same rows, on a
``distributed.LocalCluster`` of 1 worker process and on one of 2, each worker
with one thread and one torch thread, reached by the scheduler's address as
workers started by hand would be; rounds alternate (1, 2, 1, 2, ...). Prints
each configuration's best tokens/s (prompt and response tokens through the
teacher, over the span from the first part's start to the last part's end,
model loads included; every round's figure beside it), their ratio (target >=
1.7 on a 2-core machine with nothing else running: check the load average it
prints), and whether both stores hold the same numbers.

GPU (``--cluster cuda``): the same run on dask-cuda's one worker per visible
GPU; prints the throughput per GPU against a bare forward of the teacher
(``model(ids, mask).logits`` and nothing else) on the same batches on one GPU.

    python benchmarks/precompute_scaling.py [--limit 120] [--examples-per-part 6] [--rounds 2] [--cluster local|cuda]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from precompute.teacher import TeacherConfig, run_teacher  # noqa: E402
from store import TeacherStore  # noqa: E402


def _warm() -> bool:
    """Import what a unit imports, so that a worker's start-up is not timed."""
    import precompute.teacher  # noqa: F401

    return True


def _config(args, out: str, cluster: str, device: str, dtype: str) -> TeacherConfig:
    return TeacherConfig(out=out, teacher=args.teacher, dataset=args.dataset, splits=("train",), limit=args.limit,
                         passes=("pairs",), top_k=args.top_k, max_length=args.max_length,
                         batch_tokens=args.batch_tokens, examples_per_part=args.examples_per_part, device=device,
                         dtype=dtype, progress=False, cluster=cluster)


def _checksums(path: str) -> dict:
    store = TeacherStore.open(path)
    return {ref.path: attrs["checksums"] for ref, attrs in store.complete_sections()}


def run_local(args, workers: int, out: str) -> dict:
    """One pairs pass on a fresh LocalCluster of ``workers`` processes, one thread each."""
    from distributed import Client, LocalCluster

    from precompute import cluster as cl

    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, memory_limit=0,
                           dashboard_address=":0", env={"OMP_NUM_THREADS": "1"})
    client = Client(cluster)
    try:
        client.run(_warm)
        summary = run_teacher(_config(args, out, cluster.scheduler_address, "cpu", "float32"))
        logs = client.run(cl.worker_log)
    finally:
        client.close()
        cluster.close()
    step = summary.steps[0]
    parts = Counter(o["worker"] for log in logs.values() for o in log["ran"] if o["computed"])
    return {"workers": workers, "tokens": step["tokens"], "seconds": step["seconds"], "parts": dict(parts),
            "threads": sorted(log["torch_threads"] for log in logs.values()),
            "rate": step["tokens"] / step["seconds"]}


def main_local(args) -> None:
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternating, so that a neighbour's load falls on both alike
            for n in (1, 2):
                out = f"{tmp}/w{n}-r{r}.zarr"
                runs[n].append(run_local(args, n, out))
        same = _checksums(f"{tmp}/w1-r0.zarr") == _checksums(f"{tmp}/w2-r0.zarr")
    print(f"load average after:  {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"teacher {args.teacher or 'embedded SmolLM2-135M-Instruct'}, pass pairs (top-K {args.top_k}), "
          f"{args.limit} train rows in parts of {args.examples_per_part}, float32 on CPU, "
          f"best of {args.rounds} alternating rounds:")
    best = {}
    for n, rounds in runs.items():
        best[n] = b = max(rounds, key=lambda r: r["rate"])
        rates = [r["rate"] for r in rounds]
        print(f"  {n} worker(s), torch threads {b['threads']}: {b['tokens']} tokens in {b['seconds']:.1f} s = "
              f"{b['rate']:8.1f} tokens/s   (rounds: {', '.join(f'{x:.1f}' for x in rates)}; "
              f"parts per worker: {sorted(b['parts'].values(), reverse=True)})")
    print(f"  ratio 2 workers / 1 worker: {best[2]['rate'] / best[1]['rate']:.2f}   (target >= 1.7)")
    print(f"  stores equal (every section's checksums): {'yes' if same else 'NO'}")


def main_cuda(args) -> None:
    import numpy as np
    import torch

    from lm import models
    from precompute import scoring
    from store import format as fmt
    from store.sequences import split_sequences

    gpus = torch.cuda.device_count()
    if not gpus:
        sys.exit("--cluster cuda: no GPU visible")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/cuda.zarr"
        summary = run_teacher(_config(args, out, "cuda", "auto", "auto"))
        step = summary.steps[0]
        store = TeacherStore.open(out)
        dtype = store.pass_record(fmt.PASS_PAIRS_TEACHER).settings["dtype"]
        bases = [store.read_section("train", p, fmt.SET_PAIRS) for p in range(store.num_parts("train"))]
    model, tokenizer, info = models.load_model(args.teacher, device="cuda:0", dtype=dtype)
    pad = tokenizer.pad_token_id
    tokens = sum(int(b["token_offsets"][-1]) for b in bases)

    @torch.inference_mode()
    def bare() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for base in bases:
            seqs, _ = split_sequences(base)
            for batch in scoring.token_budget_order([len(s) for s in seqs], args.batch_tokens):
                ids, mask = scoring.right_padded([np.asarray(seqs[i]) for i in batch], pad, "cuda:0")
                model(input_ids=ids, attention_mask=mask).logits
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    bare()  # warm-up
    seconds = min(bare() for _ in range(3))
    cluster_rate = step["tokens"] / step["seconds"]
    print(f"teacher {info.name} ({dtype}), pass pairs (top-K {args.top_k}), {args.limit} train rows, "
          f"{len(bases)} parts, {gpus} GPU worker(s) (dask-cuda):")
    print(f"  cluster, all GPUs:          {cluster_rate:10.1f} tokens/s "
          f"({step['tokens']} tokens, {step['seconds']:.1f} s)")
    print(f"  cluster, per GPU:           {cluster_rate / gpus:10.1f} tokens/s")
    print(f"  bare forward, one GPU:      {tokens / seconds:10.1f} tokens/s (same batches)")
    print(f"  ratio per GPU / bare forward: {cluster_rate / gpus / (tokens / seconds):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cluster", choices=("local", "cuda"), default="local")
    ap.add_argument("--teacher", default=None, help="teacher model [embedded SmolLM2-135M-Instruct]")
    ap.add_argument("--dataset", default=None, help="rows [the bundled demo set]")
    ap.add_argument("--limit", type=int, default=120, help="train rows (the demo set has 240)")
    ap.add_argument("--examples-per-part", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of 1 and 2 workers (local)")
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch-tokens", type=int, default=4096)
    args = ap.parse_args()
    (main_cuda if args.cluster == "cuda" else main_local)(args)


if __name__ == "__main__":
    main()
