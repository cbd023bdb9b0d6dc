"""Streaming throughput and memory of a K=50 store, read on one core, side by side with another revision.

Writes a synthetic but realistic store (``pairs`` with a ``teacher`` section:
vocabulary 49152 so uint16 ids, Zipf-like top-50 ids, sorted top-50 log-probs of
peaked distributions with a tail and, where the format has it, the tail's log-mass;
prompts of 32-256 and responses of 16-256 tokens, 64 examples per part) at two
sizes, then reads each in a fresh process pinned to one CPU
(``sched_setaffinity`` + ``torch.set_num_threads(1)``) with ``ExampleStream``
(shuffled) -> ``token_budget_batches`` -> ``collate``.

``--baseline REV`` measures the code of a git revision (``git archive REV``)
the same way in the same run: it writes its own store of the same content (in
its own format) and the reads alternate between the two, so a busy machine
slows both alike and the ratio stays meaningful.

``--checks`` measures instead what checking each chunk costs, this tree only,
reads alternating the same way: the format 4 store as written (every chunk's
crc32c checked), the same with the check turned off
(``store.stream.CHECK_CRC32C``), the same content rewritten as format 3 (no
check there), and format 3 with every array hashed and compared with the
manifest's sha256 on read (what readers of format 1-3 stores would pay to
check them; they do not).

Reported per size and code: response tokens per second through to batch
tensors, and memory as the growth of peak RSS (``ru_maxrss``) over the RSS just
before streaming began, in a process that read only that store. Also the
tracemalloc peak of a second, traced pass (numpy buffers are traced, torch's are
not). Throughput is given against wall time and against the reader's CPU time
(the two agree on an idle machine; on a shared one the CPU figure is the work
done).

    python benchmarks/store_stream.py [--sizes 200000,800000] [--baseline REV | --checks] [--repeat 3]
        [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

VOCAB = 49152
K = 50
EXAMPLES_PER_PART = 64
BATCH_TOKENS = 16384
TARGET = 1_000_000


def synthetic_topk(rng: np.random.Generator, rows: int, k: int = K, vocab: int = VOCAB):
    """Top-k ids, sorted log-probs and the tail log-mass of distributions that look like a language model's.

    Each row gets a random sharpness; the k largest logits are sorted and the
    remaining vocabulary contributes a tail mass, so log-probs are normalised
    over the full vocabulary as the teacher's are, and the tail is what lies
    outside the top-k.
    """
    sharp = rng.uniform(0.5, 4.0, size=(rows, 1)).astype(np.float32)
    z = -np.sort(-rng.standard_normal((rows, k)).astype(np.float32), axis=1) * sharp
    tail = np.log(np.float32(vocab - k)) + z[:, -1:] - 3.0  # tail logits well below the k-th
    norm = np.logaddexp(np.log(np.exp(z - z[:, :1]).sum(axis=1, keepdims=True)) + z[:, :1], tail)
    logp = (z - norm).astype(np.float32)
    # frequent tokens are likelier candidates: ids drawn from a power law over the vocabulary
    ids = np.minimum((vocab * rng.random((rows, k)) ** 3).astype(np.int64), vocab - 1)
    return ids, logp, (tail - norm)[:, 0].astype(np.float32)


def write_store(path: str, response_tokens: int, seed: int = 0) -> dict:
    """The benchmark's store, written by whichever ``store`` package is imported (its own format)."""
    from store import TeacherStore
    from store import format as fmt

    has_tail = any(spec.name == "tail_logp" for spec in fmt.arrays_of(fmt.SET_PAIRS, fmt.SECTION_TEACHER))
    rng = np.random.default_rng(seed)
    # draw example shapes until the response-token budget is met
    shapes = []
    total = 0
    while total < response_tokens:
        prompt = int(rng.integers(32, 257))
        chosen, rejected = int(rng.integers(16, 257)), int(rng.integers(16, 257))
        shapes.append((prompt, chosen, rejected))
        total += chosen + rejected
    n = len(shapes)
    store = TeacherStore.create(path, tokenizer={"name": "bench", "hash": "bench"}, vocab_size=VOCAB,
                                examples_per_part=EXAMPLES_PER_PART)
    store.set_split("train", n, dataset={"name": "synthetic", "fingerprint": f"{seed}-{n}"})
    store.register_pass("pairs/teacher", {"model": {"name": "synthetic", "hash": "-"}, "top_k": K})
    for part in range(store.num_parts("train")):
        start, stop = store.part_range("train", part)
        ex, role, plen, rlen, ids = [], [], [], [], []
        for i in range(start, stop):
            prompt_len, *responses = shapes[i]
            prompt = rng.integers(0, VOCAB, size=prompt_len)
            for r, length in zip((fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED), responses):
                ex.append(i)
                role.append(r)
                plen.append(prompt_len)
                rlen.append(length)
                ids.append(np.concatenate([prompt, rng.integers(0, VOCAB, size=length)]))
        plen_a, rlen_a = np.asarray(plen, np.int32), np.asarray(rlen, np.int32)
        tok_off = np.concatenate([[0], np.cumsum(plen_a + rlen_a)]).astype(np.int64)
        resp_off = np.concatenate([[0], np.cumsum(rlen_a)]).astype(np.int64)
        input_ids = np.concatenate(ids)
        mask = np.zeros(input_ids.shape[0], bool)
        for s in range(len(plen)):
            mask[tok_off[s] + plen_a[s]:tok_off[s + 1]] = True
        store.write_section("train", part, fmt.SET_PAIRS, fmt.BASE, {
            "example_index": np.asarray(ex, np.int64), "role": np.asarray(role, np.int8),
            "prompt_length": plen_a, "response_length": rlen_a, "token_offsets": tok_off,
            "response_offsets": resp_off, "input_ids": input_ids, "loss_mask": mask})
        rows = int(resp_off[-1])
        topk_ids, topk_logp, tail_logp = synthetic_topk(rng, rows)
        target = topk_logp[np.arange(rows), rng.integers(0, 5, size=rows)]
        sums = np.add.reduceat(target, resp_off[:-1]).astype(np.float32)
        teacher = {"topk_ids": topk_ids, "topk_logp": topk_logp, "target_logp": target, "logp_sum": sums}
        if has_tail:
            teacher["tail_logp"] = tail_logp
        store.write_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER, teacher)
    return {"examples": n, "response_tokens": total, "parts": store.num_parts("train"),
            "bytes": store.nbytes_on_disk(), "format_version": fmt.FORMAT_VERSION, "tail": has_tail}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rewrite_as_version_3(source: str, target: str) -> dict:
    """A copy of the store at ``source`` as format 3 wrote it (same decoded values and checksums)."""
    from tests.store_helpers import as_version  # the tests' rewriter: names, codecs and chunking of a version

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(source, target)
    as_version(target, 3)
    from store import TeacherStore

    return {"bytes": TeacherStore.open(target).nbytes_on_disk(), "format_version": 3}


def _check_manifest_on_read(store) -> None:
    """Make the stream hash every array it reads and compare it with the store's manifest (format 1-3 readers
    could check their stores this way; this measures what it would cost)."""
    from store import StoreError, stream
    from store.format import SectionRef, array_checksum

    # the sections' checksums, as the manifest lists them (read before the timed loop, as a reader would keep them)
    manifest = {ref.path: attrs["checksums"] for ref, attrs in store.complete_sections()}
    read_part = stream._read_part

    def checked(store_, requests, scratch=None):
        out = read_part(store_, requests, scratch)
        for request, arrays in zip(requests, out):
            sums = manifest[SectionRef(*request[:4]).path]
            for name, values in arrays.items():
                if array_checksum(values) != sums[name]:
                    raise StoreError(f"{name}: checksum differs")
        return out

    stream._read_part = checked


def read_store(path: str, traced: bool, check: str = "default") -> dict:
    """Stream the store to batch tensors once; runs in its own process. ``check``: "default" (what the reader
    does), "no-crc" (format 4's crc32c not checked), "sha256" (every array checked against the manifest)."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    import torch

    torch.set_num_threads(1)
    from store import ExampleStream, TeacherStore, stream
    from train.batches import collate, token_budget_batches

    store = TeacherStore.open(path)
    if check == "no-crc":
        stream.CHECK_CRC32C = False
    elif check == "sha256":
        _check_manifest_on_read(store)
    stream = ExampleStream(store, "train", {"pairs": ["teacher"]}, shuffle=True, seed=0, buffer_examples=256)
    if traced:
        import tracemalloc

        tracemalloc.start()
    rss0 = _rss_bytes()
    c0 = time.process_time()
    t0 = time.perf_counter()
    tokens = batches = 0
    for examples in token_budget_batches(stream.iterate(epoch=0), BATCH_TOKENS):
        batch = collate(examples)
        tokens += batch.num_response_tokens
        batches += 1
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0
    out = {"tokens": tokens, "batches": batches, "seconds": seconds, "cpu": cpu}
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out["rss_growth"] = max(0, peak_rss - rss0)
    if traced:
        out["traced_peak"] = tracemalloc.get_traced_memory()[1]
    return out


def _child(args: list[str], code: str | None) -> dict:
    """Run this script's ``args`` in a fresh process whose ``store``/``train`` come from ``code`` (default: ROOT)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=code or ROOT)
    cmd = [sys.executable, os.path.abspath(__file__), *args] + (["--_code", code] if code else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"child {' '.join(args)} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _export(revision: str, into: str) -> str:
    """The repository's tree at ``revision`` (``git archive``), unpacked in ``into``; returns its path."""
    target = os.path.join(into, "baseline-code")
    os.makedirs(target, exist_ok=True)
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision], capture_output=True, check=False)
    if archive.returncode != 0:
        sys.exit(f"--baseline {revision}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", target], input=archive.stdout, check=True)
    return target


def _measure(path: str, size: int, code: str | None, repeat_runs: list) -> dict:
    best = min(repeat_runs, key=lambda r: r["seconds"])
    traced = _child(["--_read", path, "--_traced"], code)
    return {**best, "cpu": min(r["cpu"] for r in repeat_runs), "rss_growth": max(r["rss_growth"] for r in repeat_runs),
            "traced_peak": traced["traced_peak"], "reads": [r["seconds"] for r in repeat_runs]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200000,800000", help="response tokens per store, comma-separated")
    parser.add_argument("--workdir", default=None, help="where to write the stores (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3, help="timed reads per size and code (best is reported)")
    parser.add_argument("--baseline", default=None, metavar="REV",
                        help="also measure the code of this git revision (e.g. the commit before a change), "
                             "reads alternating with this tree's")
    parser.add_argument("--checks", action="store_true",
                        help="measure the cost of checking chunks on read (crc32c on and off, format 3 with and "
                             "without the manifest's sha256) instead of comparing code")
    parser.add_argument("--_read", help=argparse.SUPPRESS)
    parser.add_argument("--_check", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--_v3", help=argparse.SUPPRESS)
    parser.add_argument("--_write", help=argparse.SUPPRESS)
    parser.add_argument("--_size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_code", help=argparse.SUPPRESS)
    parser.add_argument("--_traced", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._code:  # a child measuring another revision: its packages first
        sys.path.insert(0, args._code)
    if args._read:
        print(json.dumps(read_store(args._read, args._traced, args._check)))
        return 0
    if args._v3:
        print(json.dumps(rewrite_as_version_3(args._v3, args._write)))
        return 0
    if args._write:
        t0 = time.perf_counter()
        written = write_store(args._write, args._size)
        print(json.dumps({**written, "write_s": time.perf_counter() - t0}))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    workdir = args.workdir or tempfile.mkdtemp(prefix="store-stream-")
    os.makedirs(workdir, exist_ok=True)
    if args.checks:
        try:
            return measure_checks(sizes, workdir, max(1, args.repeat))
        finally:
            if args.workdir is None:
                shutil.rmtree(workdir, ignore_errors=True)
    codes = [("this tree", None)]
    if args.baseline:
        codes.insert(0, (f"baseline {args.baseline}", _export(args.baseline, workdir)))
    load_before = os.getloadavg()
    results = []  # one per (size, code)
    try:
        for size in sizes:
            paths, written = {}, {}
            for label, code in codes:
                paths[label] = os.path.join(workdir, f"k{K}-{size}-{'base' if code else 'tree'}.zarr")
                shutil.rmtree(paths[label], ignore_errors=True)
                written[label] = _child(["--_write", paths[label], "--_size", str(size)], code)
            runs = {label: [] for label, _ in codes}
            for _ in range(max(1, args.repeat)):  # alternate: a busy machine slows every code alike
                for label, code in codes:
                    runs[label].append(_child(["--_read", paths[label]], code))
            for label, code in codes:
                measured = _measure(paths[label], size, code, runs[label])
                results.append({"size": size, "code": label, **written[label], **measured})
                print(f"  {size:,} response tokens, {label}: written in {written[label]['write_s']:.1f} s, read in "
                      f"{', '.join('%.2f s' % r for r in measured['reads'])}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    load_after = os.getloadavg()

    mib = 1 << 20
    rows = [
        ("code", [r["code"] for r in results]),
        ("store format version", [f"{r['format_version']}" + (" (+ tail)" if r["tail"] else "") for r in results]),
        ("response tokens in store", [f"{r['response_tokens']:,}" for r in results]),
        ("examples / parts", [f"{r['examples']:,} / {r['parts']}" for r in results]),
        ("bytes on disk", [f"{r['bytes'] / mib:.1f} MiB" for r in results]),
        ("bytes / response token", [f"{r['bytes'] / r['response_tokens']:.1f}" for r in results]),
        ("batches (16k-token budget)", [f"{r['batches']:,}" for r in results]),
        ("read time (best of %d)" % max(1, args.repeat), [f"{r['seconds']:.2f} s" for r in results]),
        ("response tokens / s (1 core, wall)", [f"{r['tokens'] / r['seconds']:,.0f}" for r in results]),
        ("response tokens / s (1 core, CPU time)", [f"{r['tokens'] / r['cpu']:,.0f}" for r in results]),
        ("peak RSS growth", [f"{r['rss_growth'] / mib:.1f} MiB" for r in results]),
        ("tracemalloc peak (numpy)", [f"{r['traced_peak'] / mib:.1f} MiB" for r in results]),
    ]
    width = max(len(label) for label, _ in rows)
    col = max(14, *(len(v) for _, vals in rows for v in vals))
    print(f"store streaming, K={K}, vocab {VOCAB} (uint16 ids), ExampleStream -> token_budget_batches -> "
          f"collate, one core")
    print(f"{'':<{width}}  " + "  ".join(f"{'size %d' % (sizes.index(r['size']) + 1):>{col}}" for r in results))
    for label, vals in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{v:>{col}}" for v in vals))
    mine = [r for r in results if r["code"] == "this tree"]
    if args.baseline:
        for r in mine:
            base = next(b for b in results if b["size"] == r["size"] and b["code"] != "this tree")
            print(f"size {r['size']:,}: this tree / baseline = {base['seconds'] / r['seconds']:.2f}x (wall), "
                  f"{base['cpu'] / r['cpu']:.2f}x (CPU time) response tokens per second")
    slowest = min(r["tokens"] / r["seconds"] for r in mine)
    slowest_cpu = min(r["tokens"] / r["cpu"] for r in mine)
    growth = mine[-1]["rss_growth"] / max(1, mine[0]["rss_growth"])
    print(f"target >= {TARGET:,} response tokens/s (this tree): wall {'met' if slowest >= TARGET else 'MISSED'} "
          f"(slowest {slowest:,.0f}), CPU time {'met' if slowest_cpu >= TARGET else 'MISSED'} "
          f"(slowest {slowest_cpu:,.0f}); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, "
          f"on {os.cpu_count()} CPUs")
    print(f"memory (this tree): store {mine[-1]['size'] / mine[0]['size']:.0f}x larger -> peak RSS growth "
          f"{growth:.2f}x")
    return 0


#: --checks: (label, store written as, what the reader checks)
CHECK_VARIANTS = (
    ("format 4, crc32c checked (default)", "v4", "default"),
    ("format 4, crc32c not checked", "v4", "no-crc"),
    ("format 3 (nothing to check)", "v3", "default"),
    ("format 3, sha256 per array vs manifest", "v3", "sha256"),
)


def measure_checks(sizes: list[int], workdir: str, repeat: int) -> int:
    """``--checks``: streaming speed of each of :data:`CHECK_VARIANTS`, reads alternating; one table."""
    load_before = os.getloadavg()
    results = []
    for size in sizes:
        paths = {"v4": os.path.join(workdir, f"k{K}-{size}-v4.zarr"), "v3": os.path.join(workdir, f"k{K}-{size}-v3.zarr")}
        shutil.rmtree(paths["v4"], ignore_errors=True)
        written = {"v4": _child(["--_write", paths["v4"], "--_size", str(size)], None)}
        written["v3"] = {**written["v4"], **_child(["--_write", paths["v3"], "--_v3", paths["v4"]], None)}
        runs = {label: [] for label, _, _ in CHECK_VARIANTS}
        for _ in range(repeat):
            for label, kind, check in CHECK_VARIANTS:
                runs[label].append(_child(["--_read", paths[kind], "--_check", check], None))
        for label, kind, _check in CHECK_VARIANTS:
            best = min(runs[label], key=lambda r: r["seconds"])
            results.append({"size": size, "label": label, **written[kind], **best,
                            "cpu": min(r["cpu"] for r in runs[label])})
            print(f"  {size:,} response tokens, {label}: read in "
                  f"{', '.join('%.2f s' % r['seconds'] for r in runs[label])}", file=sys.stderr)
    load_after = os.getloadavg()
    print(f"store streaming with and without checking chunks, K={K}, vocab {VOCAB}, ExampleStream -> "
          f"token_budget_batches -> collate, one core, best of {repeat} alternating reads")
    print(f"  {'size':>9}  {'variant':<40} {'B/token':>8} {'tokens/s wall':>14} {'tokens/s CPU':>13} "
          f"{'CPU vs first':>12}")
    for size in sizes:
        mine = [r for r in results if r["size"] == size]
        first = mine[0]["cpu"]
        for r in mine:
            print(f"  {size:>9,}  {r['label']:<40} {r['bytes'] / r['response_tokens']:8.1f} "
                  f"{r['tokens'] / r['seconds']:14,.0f} {r['tokens'] / r['cpu']:13,.0f} {r['cpu'] / first:11.2f}x")
    print(f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
