"""Generation throughput: transformers' generate() against vLLM on the same prompts and model, side by side.

Both engines run through the product's own interface (:class:`lm.generate.HfEngine`,
:class:`lm.engines.VllmEngine`: what ``precompute sample`` and the ``adpa`` pass
call), one after the other in one run, on the demo set's prompts through the
model's chat template:

- greedy: one answer per prompt (the ``adpa`` pass, ``train evaluate --generations``);
- sampled: ``--n`` answers per prompt at temperature 1 and ``--top-p`` (``precompute sample``).

It prints each engine's output tokens/s (answer tokens, end-of-turn included;
start-up apart: loading the model, starting the engine), vLLM / HF, and the
greedy agreement: answers identical, tokens before the first difference, and at
each first difference HF's own log-prob gap between the two tokens there
(teacher-forced on the common prefix: a near tie is a numerical difference, a
large gap a bug). vLLM runs first and is shut down before HF loads, so each has
the device to itself. Target on a GPU: vLLM >= 5x HF for 0.5B-3B students.

Models: ``--model`` (a directory, .gguf or embedded name; default the embedded
student), or ``--random 0.5b|1.5b|3b``: a Llama of that size with random
weights and the SmolLM2 tokenizer, built once under the cache (no network; its
answers run to ``--max-new-tokens``, its greedy agreement means little).

    python benchmarks/generation.py [--device auto] [--dtype auto] [--prompts 32] [--n 4] [--max-new-tokens 64]
        [--top-p 0.95] [--batch 16] [--model NAME | --random 1.5b] [--kv-cache-gib G]

Needs vLLM (``pip install '.[vllm]'``, or ``make test-vllm``'s ``.venv-vllm`` on CPU).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lm import chat, engines, models  # noqa: E402
from lm.generate import HfEngine  # noqa: E402
from precompute import dataset as data  # noqa: E402

#: Llama shapes of the student sizes users train (Qwen2.5's 0.5B / 1.5B / 3B widths and depths)
RANDOM_SHAPES = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960),
    "3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
               intermediate_size=11008),
}


def random_model(size: str, device: str) -> Path:
    """A random-weight Llama of ``size`` with the embedded tokenizer, saved once (bfloat16) under the cache."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    target = models.cache_dir() / "models" / f"random-llama-{size}"
    if (target / "config.json").is_file():
        return target
    tokenizer = models.load_tokenizer(None)  # the embedded teacher's: SmolLM2's 49152 tokens
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **RANDOM_SHAPES[size])
    torch.manual_seed(0)
    with torch.device(device if device.startswith("cuda") else "cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    GenerationConfig(eos_token_id=chat.end_of_turn_ids(tokenizer), pad_token_id=tokenizer.pad_token_id
                     ).save_pretrained(tmp)
    os.replace(tmp, target)
    return target


def demo_prompts(tokenizer, count: int, budget: int) -> list[np.ndarray]:
    rows = data.load_splits(None, ("train",), limit=count, require_pairs=False)["train"].rows
    return [chat.encode_prompt(tokenizer, r.prompt, budget) for r in rows]


def timed(run, rounds: int):
    """(result of the last round, median seconds)."""
    seconds, result = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return result, float(np.median(seconds))


def tokens_of(answers) -> int:
    return int(sum(len(a) for group in answers for a in (group if isinstance(group, list) else [group])))


@torch.no_grad()
def agreement(model, prompts, hf, served, device) -> dict:
    """Answers identical, tokens before the first difference, and HF's log-prob gap at each first difference."""
    same, before, gaps = 0, 0, []
    for prompt, a, b in zip(prompts, hf, served):
        if np.array_equal(a, b):
            same += 1
            before += len(a)
            continue
        step = next((j for j in range(min(len(a), len(b))) if a[j] != b[j]), min(len(a), len(b)))
        before += step
        if step < min(len(a), len(b)):
            ids = torch.from_numpy(np.concatenate([prompt, a[:step]]).astype(np.int64))[None].to(device)
            logp = model(ids).logits[0, -1].double().log_softmax(-1)
            gaps.append(abs(float(logp[int(a[step])] - logp[int(b[step])])))
    return {"same": same, "rows": len(prompts), "tokens_before_difference": before,
            "tokens": int(sum(len(a) for a in hf)), "gaps": sorted(gaps)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model dir, .gguf or name [the embedded student]")
    ap.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None,
                    help="a random-weight Llama of this size instead of --model")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--n", type=int, default=4, help="sampled answers per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=512, help="prompt budget + answer, as precompute's")
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=16, help="HF: prompts per generate() call (--generation-batch)")
    ap.add_argument("--rounds", type=int, default=1, help="timed repetitions per engine and mode (median)")
    ap.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM's KV cache [engines' default]")
    args = ap.parse_args()

    device = models.resolve_device(args.device)
    dtype = str(models.resolve_dtype(args.dtype, device)).replace("torch.", "")
    if args.random:
        path, name = random_model(args.random, device), f"random Llama {args.random}"
    else:
        info = models.resolve_model(args.model, models.EMBEDDED_STUDENT)
        path, name = models.model_dir(info), info.name
    tokenizer = models.load_tokenizer(str(path))
    budget = max(chat.MIN_PROMPT_TOKENS, args.max_length - args.max_new_tokens)
    prompts = demo_prompts(tokenizer, args.prompts, budget)
    ends = chat.end_of_turn_ids(tokenizer, models.generation_eos_ids(path))
    greedy_args = dict(max_new_tokens=args.max_new_tokens, eos_ids=ends)
    sample_args = dict(n=args.n, temperature=1.0, top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=0,
                       eos_ids=ends)
    print(f"model {name} ({path}), {device}, {dtype}; {len(prompts)} prompts of {min(map(len, prompts))}-"
          f"{max(map(len, prompts))} tokens, up to {args.max_new_tokens} new tokens; sampled: n {args.n}, "
          f"top-p {args.top_p}; HF batch {args.batch} prompts; vLLM {engines.vllm_version()}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)

    figures = {}
    t0 = time.perf_counter()
    engine = engines.VllmEngine(path, device=device, dtype=dtype, kv_cache_gib=args.kv_cache_gib,
                                max_model_len=budget + args.max_new_tokens)
    start = time.perf_counter() - t0
    try:
        served_greedy, greedy_s = timed(lambda: engine.greedy(prompts, **greedy_args), args.rounds)
        served_sampled, sampled_s = timed(lambda: engine.sample(prompts, **sample_args), args.rounds)
    finally:
        engine.close()
    figures["vllm"] = (start, tokens_of(served_greedy), greedy_s, tokens_of(served_sampled), sampled_s)

    t0 = time.perf_counter()
    model, _, _ = models.load_model(str(path), device=device, dtype=dtype)
    hf = HfEngine(model, pad_id=chat.pad_id(tokenizer), batch_size=args.batch)
    start = time.perf_counter() - t0
    hf_greedy, greedy_s = timed(lambda: hf.greedy(prompts, **greedy_args), args.rounds)
    hf_sampled, sampled_s = timed(lambda: hf.sample(prompts, **sample_args), args.rounds)
    figures["hf"] = (start, tokens_of(hf_greedy), greedy_s, tokens_of(hf_sampled), sampled_s)
    agree = agreement(model, prompts, hf_greedy, served_greedy, device)

    print(f"{'':<24}{'start s':>9}{'greedy tokens':>15}{'tok/s':>10}{'sampled tokens':>16}{'tok/s':>10}")
    rate = {}
    for key, label in (("hf", "transformers generate"), ("vllm", "vLLM")):
        start, g_tokens, g_s, s_tokens, s_s = figures[key]
        rate[key] = (g_tokens / g_s, s_tokens / s_s)
        print(f"{label:<24}{start:>9.1f}{g_tokens:>15d}{rate[key][0]:>10.1f}{s_tokens:>16d}{rate[key][1]:>10.1f}")
    print(f"{'vLLM / HF':<24}{'':>9}{'':>15}{rate['vllm'][0] / rate['hf'][0]:>10.2f}{'':>16}"
          f"{rate['vllm'][1] / rate['hf'][1]:>10.2f}   (target on a GPU: >= 5 for 0.5B-3B students)")
    gaps = agree["gaps"]
    print(f"greedy agreement: {agree['same']}/{agree['rows']} answers identical, {agree['tokens_before_difference']}"
          f"/{agree['tokens']} HF tokens before the first difference"
          + (f"; HF's log-prob gap at the {len(gaps)} first differences: min {gaps[0]:.2e}, median "
             f"{gaps[len(gaps) // 2]:.2e}, max {gaps[-1]:.2e}" if gaps else ""), flush=True)


if __name__ == "__main__":
    main()
