"""The best student per byte: held-out quality of a student trained from each kind of store, against its bytes.

Every option is a ``precompute teacher`` store of the embedded pair (teacher SmolLM2-135M-Instruct, student
the embedded 120M ``smollm2-120m-student-drop12-15``, vocabulary 49,152) on the bundled demo data
(``precompute/demo_data``, 240 train and 60 test rows), written by the project's own commands, run in this
process through their command-line entry points (the command lines are in ``OUT/commands.txt``):

- ``k50``: fixed K = 50 (``--top-k 50``, the default); ``k16``: fixed K = 16;
- ``p0.98``: an adaptive K (``--top-k 50 --top-p 0.98``);
- ``k16+s12``, ``k50+s12``: the top-K and 12 tail samples (``--tail-samples 12``), KD's tail estimated from them;
- ``s12``: the pure sampled store of Sparse Logit Sampling (Anshumann et al., ACL 2025): ``--top-k 0
  --tail-samples 12``.

(``--options`` takes any ``+`` combination of ``kN``, ``pP`` and ``sN``; ``pP`` caps at K = 50 unless a ``kN``
is given, ``sN`` alone keeps no top-K.) Then, for every option and every seed, ``train student --method kd``
(``--method``) from the same initial student, for the same number of optimizer steps at the same token budget
and learning rate, with ``--seed`` the seed (a sampled option's store is drawn with ``--tail-seed`` the seed
too, so the spread over seeds includes the draws'). KD alone by default: the store's teacher signal is then the
only thing the student learns from, so a difference between options is the store's; ``dckd`` adds SFT on the
dataset's labels, the same for every option, which dilutes that difference.

Quality is the held-out KL from the *full* teacher distribution to the trained student, computed here with the
live teacher on the test split's chosen and rejected responses (never from a store): per response token
``sum_v p_v (log p_v - log s_v)`` over the whole vocabulary, in float64 from both models' float32 logits,
averaged over tokens. Bytes per token are measured from the stores on disk: the chunk files of
``pairs/teacher`` (train and test) per response token, array by array, and the whole store.

It prints the settings, the table (KL mean +- sample standard deviation over the seeds, each seed's value,
bytes per token), the initial student's KL, the wall time and the load average, writes the results as JSON
(``OUT/results.json``) and the frontier as a PNG (``--png``). A run that was stopped skips what is complete
(stores resume, trained runs and evaluations are kept) when started again with the same settings.

    python benchmarks/store_quality.py --png docs/store_quality.png          # everything: 6 options x 3 seeds
    python benchmarks/store_quality.py --examples 8 --steps 2 --seeds 1 --options k16,k16+s4,s4   # plumbing only
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from efficacy import Runner, say, trained  # noqa: E402  (the same way of running the commands)

TEACHER = "smollm2-135m-instruct"
STUDENT = "smollm2-120m-student-drop12-15"
OPTIONS = "k50,k16,p0.98,k16+s12,k50+s12,s12"
CAP = 50  # the K an adaptive option caps at when it names none
TARGET_BYTES = 80  # issue 22: the default store at <= 80 bytes per token
COMMON = ["--device", "cpu", "--dtype", "float32", "--no-progress"]


@dataclass(frozen=True)
class StoreOption:
    """One kind of store: its name (``k16+s12``) and the ``precompute teacher`` settings it stands for."""

    name: str
    top_k: int
    top_p: float | None = None
    samples: int = 0

    @property
    def label(self) -> str:
        parts = []
        if self.top_p is not None:
            parts.append(f"top-p {self.top_p:g} (K <= {self.top_k})")
        elif self.top_k:
            parts.append(f"K = {self.top_k}")
        if self.samples:
            parts.append(f"S = {self.samples}" + ("" if self.top_k else " (pure sampled)"))
        return " + ".join(parts)

    def args(self, seed: int) -> list[str]:
        args = ["--top-k", str(self.top_k)]
        if self.top_p is not None:
            args += ["--top-p", f"{self.top_p:g}"]
        if self.samples:
            args += ["--tail-samples", str(self.samples), "--tail-seed", str(seed)]
        return args

    def store_name(self, seed: int) -> str:
        """One store per option, and per seed where the store draws samples."""
        return f"{self.name}-seed{seed}" if self.samples else self.name


def parse_option(text: str) -> StoreOption:
    """``kN``, ``pP``, ``sN`` joined by ``+`` (module docstring)."""
    top_k = top_p = None
    samples = 0
    for piece in text.split("+"):
        match = re.fullmatch(r"([kps])([0-9.]+)", piece.strip())
        if not match:
            raise ValueError(f"option {text!r}: {piece!r} is not kN, pP or sN")
        kind, value = match.groups()
        if kind == "k":
            top_k = int(value)
        elif kind == "p":
            top_p = float(value)
        else:
            samples = int(value)
    if top_k is None:
        top_k = CAP if top_p is not None or not samples else 0
    return StoreOption(text, top_k, top_p, samples)


# --------------------------------------------------------------------------- measuring


def bytes_per_token(store_path: Path) -> dict:
    """Bytes of ``pairs/teacher``'s chunk files per response token (all splits), array by array, and of the whole
    store (every file) per response token."""
    from store import TeacherStore
    from store import format as fmt

    store = TeacherStore.open(str(store_path))
    tokens, per_array = 0, {}
    for split in store.splits():
        for part in range(store.num_parts(split)):
            attrs = store.section_attrs(split, part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
            tokens += int(attrs["rows"][fmt.AXIS_RESPONSE])
            folder = store_path / fmt.group_path(split, part, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
            for array in folder.iterdir():
                if array.is_dir():
                    size = sum(f.stat().st_size for f in array.rglob("*") if f.is_file() and f.name != "zarr.json")
                    per_array[array.name] = per_array.get(array.name, 0) + size
    whole = sum(f.stat().st_size for f in store_path.rglob("*") if f.is_file())
    return {"response_tokens": tokens, "teacher": sum(per_array.values()) / tokens,
            "arrays": {name: size / tokens for name, size in sorted(per_array.items())}, "store": whole / tokens}


def test_sequences(store_path: Path):
    """(token ids, prompt lengths, roles) of the test split's pairs, from a store's pairs base."""
    from store import TeacherStore
    from store import format as fmt
    from store.sequences import split_sequences

    store = TeacherStore.open(str(store_path))
    sequences, prompts, roles = [], [], []
    for part in range(store.num_parts("test")):
        base = store.read_section("test", part, fmt.SET_PAIRS)
        seqs, lengths = split_sequences(base)
        sequences += seqs
        prompts += list(lengths)
        roles += base[fmt.ARRAY_ROLE].tolist()
    return sequences, prompts, roles


def full_kl(teacher, student, sequences, prompts, roles, batch_tokens: int = 1024) -> dict:
    """Held-out KL(teacher || student) over the whole vocabulary, per response token, summed by role (module
    docstring): both models' float32 logits, log-softmax and the sum in float64."""
    import torch

    from precompute.scoring import right_padded, token_budget_order
    from store import format as fmt

    sums = {"chosen": 0.0, "rejected": 0.0}
    counts = {"chosen": 0, "rejected": 0}
    with torch.inference_mode():
        for batch in token_budget_order([len(s) for s in sequences], batch_tokens):
            ids, mask = right_padded([sequences[i] for i in batch], 0, "cpu")
            t_logits = teacher(input_ids=ids, attention_mask=mask).logits
            s_logits = student(input_ids=ids, attention_mask=mask).logits
            for row, i in enumerate(batch):
                positions = torch.arange(int(prompts[i]) - 1, len(sequences[i]) - 1)
                t = torch.log_softmax(t_logits[row, positions].double(), -1)
                s = torch.log_softmax(s_logits[row, positions].double(), -1)
                role = "chosen" if roles[i] == fmt.ROLE_CHOSEN else "rejected"
                sums[role] += float((t.exp() * (t - s)).sum())
                counts[role] += int(positions.shape[0])
    total = sum(counts.values())
    return {"kl": sum(sums.values()) / total, "kl_chosen": sums["chosen"] / max(1, counts["chosen"]),
            "kl_rejected": sums["rejected"] / max(1, counts["rejected"]), "tokens": total}


def summarise(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


# --------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Settings:
    options: tuple[str, ...]
    examples: int | None
    steps: int
    seeds: int
    lr: float
    batch_tokens: int
    method: str
    threads: int


class Benchmark:
    def __init__(self, out: Path, settings: Settings):
        self.out, self.s = out, settings
        self.run = Runner(out)
        self.stores, self.runs, self.results = out / "stores", out / "runs", out / "results"
        self.options = [parse_option(name) for name in settings.options]
        self._teacher = None

    def store(self, option: StoreOption, seed: int) -> Path:
        path = self.stores / f"{option.store_name(seed)}.zarr"
        limit = ["--limit", str(self.s.examples)] if self.s.examples else []
        self.run(["precompute", "teacher", "--out", path, "--passes", "pairs", "--teacher", TEACHER,
                  *option.args(seed), *limit, *COMMON], what=f"precompute {option.name}")
        return path

    def train(self, option: StoreOption, store: Path, seed: int) -> Path:
        out = self.runs / option.name / f"seed{seed}"
        if not trained(out):
            self.run(["train", "student", "--cache", store, "--method", self.s.method, "--student", STUDENT,
                      "--out", out, "--max-steps", self.s.steps, "--lr", self.s.lr, "--batch-tokens",
                      self.s.batch_tokens, "--seed", seed, *COMMON], what=f"train {option.name}")
        return out

    def teacher(self):
        if self._teacher is None:
            from lm import models

            self._teacher = models.load_model(TEACHER, device="cpu", dtype="float32")[0]
        return self._teacher

    def quality(self, model: str, name: str, sequences) -> dict:
        path = self.results / f"{name}.json"
        if path.is_file():
            return json.loads(path.read_text())
        from lm import models

        t0 = time.perf_counter()
        student = models.load_model(str(model), device="cpu", dtype="float32")[0]
        result = full_kl(self.teacher(), student, *sequences)
        result["seconds"] = time.perf_counter() - t0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        return result

    def measure(self) -> dict:
        rows, sequences, initial = [], None, None
        for option in self.options:
            stores, kls = [], []
            for seed in range(self.s.seeds):
                if seed == 0 or option.samples:
                    stores.append(self.store(option, seed))
                if sequences is None:
                    sequences = test_sequences(stores[0])
                    initial = self.quality(STUDENT, "initial", sequences)
                    say(f"initial student: held-out full KL {initial['kl']:.4f} on {initial['tokens']} test tokens")
                model = self.train(option, stores[-1], seed)
                kls.append(self.quality(model, f"{option.name}-seed{seed}", sequences))
                say(f"{option.name} seed {seed}: held-out full KL {kls[-1]['kl']:.4f}")
            sizes = [bytes_per_token(path) for path in stores]
            rows.append({"option": option.name, "label": option.label, **asdict(option),
                         "bytes": {key: summarise([s[key] for s in sizes])[0] for key in ("teacher", "store")},
                         "bytes_arrays": {name: summarise([s["arrays"][name] for s in sizes])[0]
                                          for name in sizes[0]["arrays"]},
                         "response_tokens": sizes[0]["response_tokens"],
                         "kl": [k["kl"] for k in kls], "kl_chosen": [k["kl_chosen"] for k in kls],
                         "kl_rejected": [k["kl_rejected"] for k in kls]})
        return {"settings": asdict(self.s), "initial": initial, "rows": rows,
                "test_tokens": initial["tokens"] if initial else 0}


ARRAY_COLUMNS = (("topk_ids", "ids"), ("topk_logp_steps", "top-K log-probs"), ("tail_logp", "tail"),
                 ("topk_count", "counts"), ("tail_sample_ids", "sample ids"), ("tail_sample_logp", "sample log-probs"),
                 ("target_logp", "target"), ("logp_sum", "sums"))


def table(results: dict) -> str:
    """Markdown: option, bytes per token (teacher section and its arrays; whole store), KL mean +- sd, each seed."""
    lines = ["| store | bytes / token: pairs/teacher (" + ", ".join(label for _, label in ARRAY_COLUMNS)
             + ") | whole store | held-out full KL(T || S), mean ± sd | per seed |",
             "|---|---|---|---|---|"]
    for row in results["rows"]:
        arrays = ", ".join(f"{row['bytes_arrays'][name]:.1f}" if name in row["bytes_arrays"] else "-"
                           for name, _ in ARRAY_COLUMNS)
        mean, sd = summarise(row["kl"])
        lines.append(f"| {row['label']} (`{row['option']}`) | {row['bytes']['teacher']:.1f} ({arrays}) | "
                     f"{row['bytes']['store']:.1f} | {mean:.4f} ± {sd:.4f} | "
                     + ", ".join(f"{v:.4f}" for v in row["kl"]) + " |")
    return "\n".join(lines)


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for row in results["rows"]:
        mean, sd = summarise(row["kl"])
        colour = "tab:orange" if row["samples"] else "tab:blue"
        ax.errorbar(row["bytes"]["teacher"], mean, yerr=sd, fmt="o", capsize=4, color=colour)
        ax.annotate(row["option"], (row["bytes"]["teacher"], mean), textcoords="offset points", xytext=(6, 4),
                    fontsize=8)
        if row["option"] == "k50":
            ax.axhspan(mean - sd, mean + sd, color="tab:blue", alpha=0.12, label="K = 50: mean ± sd")
    ax.axvline(TARGET_BYTES, color="grey", linestyle=":", label=f"{TARGET_BYTES} bytes / token")
    ax.set_xlabel("bytes per response token (pairs/teacher, measured on disk)")
    ax.set_ylabel("held-out KL(full teacher || student), nats / token")
    s = results["settings"]
    initial = results.get("initial") or {}
    ax.set_title(f"{s['method']}, {s['steps']} steps, lr {s['lr']:g}, {s['seeds']} seed(s); mean ± sd over seeds; "
                 f"initial student {initial.get('kl', float('nan')):.3f}", fontsize=9)
    ax.plot([], [], "o", color="tab:blue", label="top-K only")
    ax.plot([], [], "o", color="tab:orange", label="with tail samples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv: list[str] | None = None) -> tuple[Path, Settings, Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/store_quality", help="Folder of every store, run, result and log.")
    p.add_argument("--options", default=OPTIONS, help=f"Comma list of store options [{OPTIONS}].")
    p.add_argument("--examples", type=int, default=None, help="The first N rows of each split [all: 240, 60].")
    p.add_argument("--steps", type=int, default=60, help="Optimizer steps of every run.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds 0..N-1 of every option.")
    p.add_argument("--lr", type=float, default=5e-5, help="Learning rate of every run.")
    p.add_argument("--batch-tokens", type=int, default=2048, help="Token budget per step of every run.")
    p.add_argument("--method", default="kd", choices=("kd", "dckd"), help="The KD-type method every run trains.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS).")
    p.add_argument("--png", default=None, help="Where to write the plot [OUT/store_quality.png].")
    a = p.parse_args(argv)
    options = tuple(o.strip() for o in a.options.split(",") if o.strip())
    for option in options:
        try:
            parse_option(option)
        except ValueError as exc:
            p.error(str(exc))
    if a.steps < 1 or a.seeds < 1 or (a.examples is not None and a.examples < 1):
        p.error("--steps, --seeds and --examples must be at least 1")
    out = Path(a.out).resolve()
    settings = Settings(options, a.examples, a.steps, a.seeds, a.lr, a.batch_tokens, a.method, a.threads)
    return out, settings, Path(a.png).resolve() if a.png else out / "store_quality.png"


def main(argv: list[str] | None = None) -> int:
    out, settings, png = parse(argv)
    os.environ["OMP_NUM_THREADS"] = str(settings.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(settings.threads)
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    say(f"settings: {json.dumps(asdict(settings))}; out {out}")
    results = Benchmark(out, settings).measure()
    results["seconds"] = time.perf_counter() - t0
    results["load_average"] = os.getloadavg()
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(png, results)
    say("")
    say(table(results))
    say(f"\ninitial student (untrained): held-out full KL {results['initial']['kl']:.4f}; "
        f"{results['test_tokens']} test response tokens (chosen and rejected)")
    say(f"wall time {results['seconds']:.0f} s; load average {results['load_average'][0]:.1f}; plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
