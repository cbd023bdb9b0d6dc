"""Which method works: every method of ``train student`` on a task whose preference a rule can check.

The task, its tokenizer and its rule are in ``benchmarks/efficacy_task.py`` (prompts list 3-5 digits; a valid
answer is one to three listed digits; a preferred answer starts with the largest listed digit). This script
builds everything else with the project's own commands, run in this process through their command-line entry
points (``precompute.cli.main``, ``train.cli.main``: exactly the command lines it prints and logs):

1. models: a reference (4 layers, hidden 128) and a student (2 layers, hidden 64), Llamas initialised at
   random and saved with the task's tokenizer and chat template (real model directories);
2. ``precompute teacher --passes dpo_ref`` on rows whose chosen answers are uniformly valid, then
   ``train student --method sft`` trains the reference (long) and the initial student (short: weaker);
3. the teacher: ``train student --method dpo`` from the reference on the preference pairs' train split
   (60% informative), so it knows the preference;
4. the stores: ``precompute teacher --teacher T --student S --reference R --passes pairs,dpo_ref,adpa`` on
   train/dev/test (every pair method; the held-out metrics), ``precompute sample`` then ``precompute teacher
   --passes pad,dpo_ref`` on train (pad, pad_dpo);
5. each method trains the initial student for the same number of optimizer steps at the same token budget per
   step (``train student --max-steps N --batch-tokens B``), at each learning rate of the sweep with seed 0;
   ``train evaluate --split dev --generations F --samples K`` picks each method's best rate (the mean of its
   greedy and sampled preferred rates on dev); the other seeds train at that rate;
   ADPA+ (staged): ``dckd`` for N/2 steps, a new store of that student's own answers (``precompute teacher
   --student <dckd run> --passes adpa``), then ``adpa`` from it for N/2 steps; CycleAlign: ``train
   cyclealign --rounds 3 --max-steps N/3`` with a rule-based black box (an OpenAI-compatible server on
   loopback, ``efficacy_task.RuleJudge``);
6. ``train evaluate --split test --generations F --samples K`` on every model: the rule's rates of valid and
   preferred answers (greedy and sampled at temperature 1), the held-out token KL to the teacher, preference
   accuracy (log-ratio to the initial student; mean log-prob) and agreement with the teacher's preference;
7. the cross-tokenizer column (unless ``--no-cross``): a student of another family
   (``efficacy_task.build_cross_tokenizer``: Llama-3 headers, a token per space-and-digit) made as the student was
   (SFT on its own tokens), the same teacher through ``precompute teacher --cross-tokenizer`` (stores of the
   student's ids, the teacher reading their text), and every method that reads a teacher (CycleAlign's black box
   reads text anyway: left out) trained at the rate and seeds of its same-tokenizer row, those that train KD
   also with ``--cross-tokenizer-loss chunk``; the table sets each method's rates beside its same-tokenizer ones,
   and the passes' alignment shares are printed.

It prints the settings, every step's wall time, the learning-rate sweep, the table (mean +- sample standard
deviation over the seeds) with the teacher, the reference and the initial student beside it, CycleAlign's rates
round by round, the total wall time and the load average, and writes a PNG of the table (``--png``).
Everything is deterministic given the thread count (seeds everywhere). Outputs land under ``--out``; a run
that was stopped skips what is complete (stores resume, trained models and evaluations are kept) when started
again with the same settings.

    python benchmarks/efficacy.py                       # everything: 15 rows, 5 rates, 3 seeds
    python benchmarks/efficacy.py --quick               # one rate per method (the sweep's middle), 2 seeds
    python benchmarks/efficacy.py --methods sft,dpo --steps 4 --seeds 1 --lrs 1e-3 --smoke   # plumbing only
    python benchmarks/efficacy.py --no-cross            # the same-tokenizer table only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import efficacy_task as task  # noqa: E402

COMMON = ["--device", "cpu", "--dtype", "float32", "--no-progress"]
METRICS = ("valid_greedy", "preferred_greedy", "valid_sampled", "preferred_sampled", "kl_chosen",
           "accuracy_logratio", "accuracy_avg_logp", "teacher_agreement")
HEADERS = ("valid (greedy)", "preferred (greedy)", "valid (sampled)", "preferred (sampled)", "KL(T||S) chosen",
           "acc. log-ratio", "acc. mean log-prob", "agrees w/ teacher")


@dataclass(frozen=True)
class Method:
    """One row of the table: how its student is trained."""

    name: str  # what --methods takes
    label: str  # the table's
    kind: str  # "main" (the pairs store), "pad" (the sampled groups), "staged" (ADPA+), "cyclealign"
    args: tuple[str, ...] = ()
    chunks: bool = False  # staged, across tokenizers: both of its runs with --cross-tokenizer-loss chunk


METHODS = (
    Method("sft", "sft", "main", ("--method", "sft")),
    Method("kd", "kd", "main", ("--method", "kd")),
    Method("dpo", "dpo", "main", ("--method", "dpo")),
    Method("simpo", "simpo", "main", ("--method", "simpo")),
    Method("dckd", "dckd (KD weights 1, default)", "main", ("--method", "dckd")),
    # the released DCKD weights (KD 0.1 beside SFT 1), the former default: how much the SFT term on the dataset's
    # noisy chosen answers dilutes the teacher's signal (docs/efficacy.md, "Defaults this changed")
    Method("dckd_released", "dckd, released KD weights 0.1", "main",
           ("--method", "dckd", "--weight", "kd_chosen=0.1", "--weight", "kd_rejected=0.1")),
    Method("adpa", "adpa (clipped, default)", "main", ("--method", "adpa")),
    Method("adpa_unclipped", "adpa --adpa-unclipped", "main", ("--method", "adpa", "--adpa-unclipped")),
    Method("dckd+adpa", "dckd+adpa (KD weights 1, default)", "main", ("--method", "dckd+adpa")),
    Method("dckd+adpa_released", "dckd+adpa, released KD weights 0.1", "main",
           ("--method", "dckd+adpa", "--weight", "kd_chosen=0.1", "--weight", "kd_rejected=0.1")),
    Method("adpa_plus", "ADPA+ staged (dckd, then adpa)", "staged"),
    Method("pad", "pad", "pad", ("--method", "pad")),
    Method("pad_alpha1", "pad --pad-alpha 1", "pad", ("--method", "pad", "--pad-alpha", "1")),
    Method("pad_dpo", "pad_dpo", "pad", ("--method", "pad_dpo")),
    Method("cyclealign", "cyclealign (3 rounds)", "cyclealign"),
)
BY_NAME = {m.name: m for m in METHODS}


@dataclass(frozen=True)
class Setup:
    """How the task, the reference, the student and the teacher are made (``--smoke``: a tiny version)."""

    sizes: task.TaskSizes = task.TaskSizes()
    reference_layers: int = 2
    reference_hidden: int = 128
    student_layers: int = 1
    student_hidden: int = 128
    heads: int = 8
    reference_steps: int = 800
    student_steps: int = 300
    sft_lr: float = 3e-3
    teacher_steps: int = 240
    teacher_lr: float = 1e-4  # 1e-3 x 120 steps broke validity (5.5% valid greedy on test); 1e-4 x 240: 100% (dev)
    teacher_beta: float = 0.1
    batch_tokens: int = 2048
    max_length: int = 64
    max_new_tokens: int = 12


SMOKE = Setup(sizes=task.TaskSizes(sft_prompts=40, train=48, dev=12, test=16), reference_layers=1,
              reference_hidden=32, student_layers=1, student_hidden=32, heads=4, reference_steps=6, student_steps=3,
              teacher_steps=3)


@dataclass
class Options:
    out: Path
    methods: tuple[str, ...]
    lrs: tuple[float, ...]
    seeds: int
    steps: int
    samples: int
    threads: int
    setup: Setup
    png: Path | None
    task_seed: int = 0
    cross: bool = True  # the cross-tokenizer column


# --------------------------------------------------------------------------- running the commands

class Runner:
    """Runs command lines of ``precompute`` and ``train`` in this process through their click entry points.

    Each command's stdout and stderr (those of its subprocesses too) go to ``OUT/logs/NNN-*.txt``; the command
    line and its wall time to ``OUT/commands.txt``. A command that fails stops the benchmark with the tail of
    its log.
    """

    def __init__(self, out: Path):
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.commands = out / "commands.txt"
        self.count = len(list(self.logs.glob("*.out")))
        self.seconds: dict[str, float] = {}

    def __call__(self, argv: list[str], *, what: str) -> str:
        from precompute.cli import main as precompute_main
        from train.cli import main as train_main

        mains = {"precompute": precompute_main, "train": train_main}
        self.count += 1
        stem = self.logs / f"{self.count:04d}-{argv[0]}-{argv[1]}"
        line = " ".join(shlex.quote(str(a)) for a in argv)
        t0 = time.perf_counter()
        failed = None
        with _fd_captured(stem.with_suffix(".out"), stem.with_suffix(".err")):
            try:
                mains[argv[0]].main(args=[str(a) for a in argv[1:]], prog_name=argv[0], standalone_mode=False)
            except SystemExit as exc:
                failed = exc.code if exc.code else None
            except Exception as exc:  # noqa: BLE001 - reported below with the log
                failed = f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        self.seconds[what] = self.seconds.get(what, 0.0) + seconds
        with open(self.commands, "a") as fh:
            fh.write(f"{seconds:8.1f} s  {line}\n")
        if failed is not None:
            tail = stem.with_suffix(".err").read_text()[-3000:]
            raise RuntimeError(f"`{line}` failed ({failed}); its stderr ends with:\n{tail}")
        return stem.with_suffix(".out").read_text()


@contextlib.contextmanager
def _fd_captured(out_path: Path, err_path: Path):
    """File descriptors 1 and 2 (and sys.stdout/err) into two files while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    saved_streams = sys.stdout, sys.stderr  # pytest's capture, for one, is not fd 1
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        # text streams on the same open files (dup: one offset), so Python-level writes land there too
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
        sys.stderr = os.fdopen(os.dup(2), "w", buffering=1)
        try:
            yield
        finally:
            sys.stdout.close()
            sys.stderr.close()
            sys.stdout, sys.stderr = saved_streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def trained(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def say(message: str) -> None:
    print(message, flush=True)


def lr_tag(lr: float) -> str:
    return f"{lr:g}"


# --------------------------------------------------------------------------- the benchmark

class Benchmark:
    def __init__(self, options: Options):
        self.o = options
        self.s = options.setup
        self.out = options.out
        self.run = Runner(self.out)
        self.data, self.models, self.stores = self.out / "data", self.out / "models", self.out / "stores"
        self.runs, self.results = self.out / "runs", self.out / "results"
        self.sft_data = self.data / "sft.json"
        self.prefs = self.data / "prefs.json"
        self.main_store = self.stores / "main.zarr"
        self.pad_store = self.stores / "pad.zarr"
        # the cross-tokenizer column: a student of another family, stores of its ids aligned to the teacher
        self.cross_main_store = self.stores / "cross-main.zarr"
        self.cross_pad_store = self.stores / "cross-pad.zarr"
        self.alignment: list[str] = []  # the cross-tokenizer passes' summary lines (shares of exact tokens, mass)

    # ---- building the task, the models and the stores

    def build(self) -> None:
        s = self.s
        t0 = time.perf_counter()
        task.write_task(self.data, self.o.task_seed, s.sizes)
        say(f"task: {self.sft_data} ({s.sizes.sft_prompts} prompts x {s.sizes.sft_answers} uniformly valid "
            f"answers), {self.prefs} (pairs: train {s.sizes.train}, {task.informative_share(self.prefs):.0%} "
            f"informative; dev {s.sizes.dev}, test {s.sizes.test}, all informative)")
        tokenizer = task.build_tokenizer()
        init_ref, init_student = self.models / "init-reference", self.models / "init-student"
        if not trained(init_ref):
            task.build_model(init_ref, tokenizer, seed=1, layers=s.reference_layers, hidden=s.reference_hidden,
                             heads=s.heads)
        if not trained(init_student):
            task.build_model(init_student, tokenizer, seed=2, layers=s.student_layers, hidden=s.student_hidden,
                             heads=s.heads)
        sft_store = self.stores / "sft.zarr"
        self.run(["precompute", "teacher", "--out", sft_store, "--teacher", init_ref, "--student", init_ref,
                  "--dataset", self.sft_data, "--split", "train", "--passes", "dpo_ref", "--max-length",
                  s.max_length, *COMMON], what="build")
        for name, init, steps in (("reference", init_ref, s.reference_steps),
                                  ("student", init_student, s.student_steps)):
            self.train(["--cache", sft_store, "--method", "sft", "--student", init, "--lr", s.sft_lr,
                        "--max-steps", steps, "--batch-tokens", s.batch_tokens, "--seed", 0],
                       self.models / name, what="build")
        teacher_store = self.stores / "teacher-pairs.zarr"
        self.run(["precompute", "teacher", "--out", teacher_store, "--teacher", self.models / "reference",
                  "--student", self.models / "reference", "--dataset", self.prefs, "--split", "train",
                  "--passes", "dpo_ref", "--max-length", s.max_length, *COMMON], what="build")
        self.train(["--cache", teacher_store, "--method", "dpo", "--student", self.models / "reference",
                    "--lr", s.teacher_lr, "--max-steps", s.teacher_steps, "--dpo-beta", s.teacher_beta,
                    "--batch-tokens", s.batch_tokens, "--seed", 0], self.models / "teacher", what="build")
        teacher, student, reference = (self.models / n for n in ("teacher", "student", "reference"))
        self.run(["precompute", "teacher", "--out", self.main_store, "--teacher", teacher, "--student", student,
                  "--reference", reference, "--dataset", self.prefs, "--split", "train,dev,test",
                  "--passes", "pairs,dpo_ref,adpa", "--max-length", s.max_length, "--max-new-tokens",
                  s.max_new_tokens, *COMMON], what="build")
        if any(BY_NAME[m].kind == "pad" for m in self.o.methods):
            self.run(["precompute", "sample", "--out", self.pad_store, "--model", student, "--dataset", self.prefs,
                      "--split", "train", "--max-new-tokens", s.max_new_tokens, "--max-length", s.max_length,
                      *COMMON], what="build")
            self.run(["precompute", "teacher", "--out", self.pad_store, "--teacher", teacher, "--student", student,
                      "--dataset", self.prefs, "--split", "train", "--passes", "pad,dpo_ref", "--max-length",
                      s.max_length, *COMMON], what="build")
        say(f"models and stores built in {time.perf_counter() - t0:.0f} s")

    def build_cross(self) -> None:
        """The cross-tokenizer column's student (SFT on its own tokens, as the student) and stores (module docstring)."""
        s = self.s
        t0 = time.perf_counter()
        tokenizer = task.build_cross_tokenizer()
        init = self.models / "init-cross-student"
        if not trained(init):
            task.build_model(init, tokenizer, seed=2, layers=s.student_layers, hidden=s.student_hidden, heads=s.heads)
        sft_store = self.stores / "cross-sft.zarr"
        self.run(["precompute", "teacher", "--out", sft_store, "--teacher", init, "--student", init,
                  "--dataset", self.sft_data, "--split", "train", "--passes", "dpo_ref", "--max-length",
                  s.max_length, *COMMON], what="build cross")
        student = self.train(["--cache", sft_store, "--method", "sft", "--student", init, "--lr", s.sft_lr,
                              "--max-steps", s.student_steps, "--batch-tokens", s.batch_tokens, "--seed", 0],
                             self.models / "cross-student", what="build cross")
        teacher, reference = self.models / "teacher", self.models / "reference"
        printed = self.run(["precompute", "teacher", "--out", self.cross_main_store, "--teacher", teacher,
                            "--student", student, "--reference", reference, "--dataset", self.prefs,
                            "--split", "train,dev,test", "--passes", "pairs,dpo_ref,adpa", "--cross-tokenizer",
                            "--max-length", s.max_length, "--max-new-tokens", s.max_new_tokens, *COMMON],
                           what="build cross")
        self.alignment = [line.strip() for line in printed.splitlines() if "across tokenizers" in line]
        if any(BY_NAME[m].kind == "pad" for m in self.o.methods):
            self.run(["precompute", "sample", "--out", self.cross_pad_store, "--model", student, "--dataset",
                      self.prefs, "--split", "train", "--max-new-tokens", s.max_new_tokens, "--max-length",
                      s.max_length, *COMMON], what="build cross")
            printed = self.run(["precompute", "teacher", "--out", self.cross_pad_store, "--teacher", teacher,
                                "--student", student, "--dataset", self.prefs, "--split", "train", "--passes",
                                "pad,dpo_ref", "--cross-tokenizer", "--max-length", s.max_length, *COMMON],
                               what="build cross")
            self.alignment += [line.strip() for line in printed.splitlines() if "across tokenizers" in line]
        say(f"cross-tokenizer student and stores built in {time.perf_counter() - t0:.0f} s")

    def train(self, args: list, out: Path, *, what: str) -> Path:
        if not trained(out):
            if out.exists():
                shutil.rmtree(out)  # an unfinished run of an earlier, stopped benchmark
            self.run(["train", "student", *args, "--out", out, *COMMON], what=what)
        return out

    def evaluate(self, model: Path, split: str, result: Path, *, what: str, cross: bool = False) -> dict:
        """``train evaluate`` on ``split`` of the main store (``cross``: the cross-tokenizer one), with the rule's
        rates of the model's answers."""
        if result.is_file():
            return json.loads(result.read_text())
        result.parent.mkdir(parents=True, exist_ok=True)
        answers = result.with_suffix(".answers.jsonl")
        cache = self.cross_main_store if cross else self.main_store
        printed = self.run(["train", "evaluate", "--model", model, "--cache", cache, "--split", split,
                            "--generations", answers, "--samples", self.o.samples, "--max-new-tokens",
                            self.s.max_new_tokens, "--seed", 0, "--json", "--device", "cpu", "--dtype", "float32"],
                           what=what)
        figures = json.loads(printed)
        rates = task.score_generations(answers, task.digits_by_index(self.prefs, split))
        figures.update(rates.as_dict())
        result.write_text(json.dumps(figures, indent=1))
        return figures

    # ---- one method at one rate and seed

    def train_method(self, method: Method, lr: float, seed: int, cross: bool = False) -> list[Path]:
        """Train ``method``'s student; the model directories to evaluate (CycleAlign: one per round). ``cross``:
        the cross-tokenizer column's student and stores."""
        n, s = self.o.steps, self.s
        folder = (self.runs / "cross" if cross else self.runs) / method.name / f"lr{lr_tag(lr)}-s{seed}-n{n}"
        common = ["--lr", lr, "--seed", seed, "--batch-tokens", s.batch_tokens]
        student = self.models / ("cross-student" if cross else "student")
        main_store = self.cross_main_store if cross else self.main_store
        if method.kind in ("main", "pad"):
            cache = main_store if method.kind == "main" else (self.cross_pad_store if cross else self.pad_store)
            return [self.train(["--cache", cache, *method.args, "--student", student, "--max-steps", n, *common],
                               folder / "model", what=method.name)]
        if method.kind == "staged":
            half = max(1, n // 2)
            loss = ["--cross-tokenizer-loss", "chunk"] if method.chunks else []
            first = self.train(["--cache", main_store, "--method", "dckd", "--student", student,
                                "--max-steps", half, *loss, *common], folder / "dckd", what=method.name)
            store = folder / "own-answers.zarr"
            final = folder / "model"
            if not trained(final):
                self.run(["precompute", "teacher", "--out", store, "--teacher", self.models / "teacher",
                          "--student", first, "--reference", self.models / "reference", "--dataset", self.prefs,
                          "--split", "train", "--passes", "adpa", "--max-length", s.max_length,
                          "--max-new-tokens", s.max_new_tokens, *(["--cross-tokenizer"] if cross else []), *COMMON],
                         what=method.name)
            return [self.train(["--cache", store, "--method", "adpa", "--student", first, "--max-steps", n - half,
                                *loss, *common], final, what=method.name)]
        if method.kind == "cyclealign":
            rounds = 3
            per_round = max(1, n // rounds)
            models = [folder / f"round-{r}" / "model" for r in range(1, rounds + 1)]
            if not all(trained(m) for m in models):
                with task.RuleJudge() as judge:
                    self.run(["train", "cyclealign", "--out", folder, "--judge", judge.base_url, "--judge-model",
                              "rule", "--student", student, "--dataset", self.prefs, "--split", "train",
                              "--rounds", rounds, "--max-steps", per_round, "--max-new-tokens", s.max_new_tokens,
                              *common, *COMMON], what=method.name)
            return models
        raise ValueError(method.kind)

    def result_path(self, method: Method, lr: float, seed: int, split: str, model: Path, cross: bool = False) -> Path:
        tag = f"lr{lr_tag(lr)}-s{seed}-n{self.o.steps}"
        suffix = f"-{model.parent.name}" if model.parent.name.startswith("round-") else ""
        return (self.results / "cross" if cross else self.results) / method.name / f"{tag}{suffix}-{split}.json"

    # ---- the whole benchmark

    def references(self) -> dict[str, dict]:
        out = {}
        for name in ("teacher", "reference", "student"):
            out[name] = self.evaluate(self.models / name, "test", self.results / "initial" / f"{name}-test.json",
                                      what="evaluate")
        return out

    def sweep(self, method: Method) -> tuple[float, dict[float, float]]:
        """The best rate of ``method`` on dev (seed 0) and each rate's dev score."""
        scores = {}
        for lr in self.o.lrs:
            models = self.train_method(method, lr, 0)
            model = models[-1]
            dev = self.evaluate(model, "dev", self.result_path(method, lr, 0, "dev", model), what="evaluate")
            scores[lr] = (dev["preferred_greedy"] + dev["preferred_sampled"]) / 2
        best = max(self.o.lrs, key=lambda lr: (scores[lr], -lr))  # ties: the smaller rate
        return best, scores

    def cross_seeds(self, method: Method, lr: float) -> list[dict]:
        """The cross-tokenizer column: test results of each seed at ``lr`` (the same-tokenizer row's rate)."""
        finals = []
        for seed in range(self.o.seeds):
            model = self.train_method(method, lr, seed, cross=True)[-1]
            finals.append(self.evaluate(model, "test", self.result_path(method, lr, seed, "test", model, cross=True),
                                        what="evaluate cross", cross=True))
        return finals

    def seeds(self, method: Method, lr: float) -> tuple[list[dict], list[list[dict]]]:
        """Test results of each seed at ``lr`` (the final model), and per seed every round's (CycleAlign)."""
        finals, rounds = [], []
        for seed in range(self.o.seeds):
            models = self.train_method(method, lr, seed)
            results = [self.evaluate(m, "test", self.result_path(method, lr, seed, "test", m), what="evaluate")
                       for m in (models if method.kind == "cyclealign" else models[-1:])]
            finals.append(results[-1])
            rounds.append(results)
        return finals, rounds


# --------------------------------------------------------------------------- printing

def cell(values: list[float], digits: int = 3) -> str:
    mean, sd = task.summarise(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def table(rows: list[tuple[str, str, list[dict]]]) -> str:
    """Markdown table: method, learning rate, then each metric as mean ± sd over the rows' results."""
    head = "| method | lr | " + " | ".join(HEADERS) + " |"
    lines = [head, "|" + "---|" * (len(HEADERS) + 2)]
    for label, lr, results in rows:
        cells = [cell([r[m] for r in results]) for m in METRICS]
        lines.append(f"| {label} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reads_kd(method: Method) -> bool:
    """Whether ``method`` trains KD (its rows without an exact teacher token differ between ULD and chunks)."""
    return method.kind == "staged" or any(a.split("+")[0] in ("kd", "dckd") or "+dckd" in a for a in method.args)


def with_chunks(method: Method) -> Method:
    """``method`` across tokenizers with ``--cross-tokenizer-loss chunk`` (the cross-tokenizer column's extra row)."""
    return Method(f"{method.name}_chunk", f"{method.label}, --cross-tokenizer-loss chunk", method.kind,
                  (*method.args, "--cross-tokenizer-loss", "chunk"), chunks=True)


#: the columns set side by side in the cross-tokenizer table: (metric, header)
CROSS_COLUMNS = (("preferred_greedy", "preferred (greedy)"), ("preferred_sampled", "preferred (sampled)"),
                 ("valid_greedy", "valid (greedy)"), ("teacher_agreement", "agrees w/ teacher"))


def cross_table(rows: list[tuple[str, str, list[dict], list[dict]]]) -> str:
    """Markdown: per method, each of :data:`CROSS_COLUMNS` with one tokenizer and across tokenizers (mean ± sd)."""
    head = "| method | lr | " + " | ".join(f"{h}: same | {h}: cross" for _, h in CROSS_COLUMNS) + " |"
    lines = [head, "|" + "---|" * (2 * len(CROSS_COLUMNS) + 2)]
    for label, lr, same, cross in rows:
        cells = []
        for metric, _ in CROSS_COLUMNS:
            cells += [cell([r[metric] for r in same]) if same else "", cell([r[metric] for r in cross])]
        lines.append(f"| {label} | {lr} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, rows: list[tuple[str, str, list[dict]]], references: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [label.split(" (")[0].replace("ADPA+ staged", "ADPA+") for label, _, _ in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(rows) + 2), 7.5), sharex=True)
    for ax, (kind, title) in zip(axes, (("preferred", "preferred answers (first digit = the largest listed)"),
                                        ("valid", "valid answers (1-3 listed digits)"))):
        for offset, mode, colour in ((-0.2, "greedy", "tab:blue"), (0.2, "sampled", "tab:orange")):
            key = f"{kind}_{mode}"
            stats = [task.summarise([r[key] for r in results]) for _, _, results in rows]
            ax.bar(x + offset, [m for m, _ in stats], 0.4, yerr=[sd for _, sd in stats], capsize=3, color=colour,
                   label=f"{mode}")
            for name, style in (("teacher", "-"), ("student", ":")):
                ax.axhline(references[name][key], color=colour, linestyle=style, linewidth=1,
                           label=f"{'teacher' if name == 'teacher' else 'initial student'}, {mode}")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("rate on test prompts")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=3, loc="lower left")
    axes[1].set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    fig.suptitle("Each method from the same initial student, same steps and token budget; "
                 "mean and sd over seeds, each at its best learning rate", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def parse(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/efficacy", help="Folder of every model, store, run and log.")
    p.add_argument("--methods", default=",".join(m.name for m in METHODS),
                   help=f"Comma list of {', '.join(m.name for m in METHODS)}.")
    p.add_argument("--lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2", help="Learning rates of the sweep (comma list).")
    p.add_argument("--seeds", type=int, default=3, help="Seeds per method at its best rate.")
    p.add_argument("--steps", type=int, default=60, help="Optimizer steps of every method (the budget).")
    p.add_argument("--samples", type=int, default=8, help="Sampled answers per test prompt.")
    p.add_argument("--threads", type=int, default=1, help="torch threads (OMP_NUM_THREADS).")
    p.add_argument("--quick", action="store_true", help="One rate per method (the middle of --lrs), 2 seeds.")
    p.add_argument("--smoke", action="store_true", help="A tiny task and tiny models: checks the plumbing only.")
    p.add_argument("--png", default=None, help="Where to write the plot [OUT/efficacy.png].")
    p.add_argument("--no-cross", action="store_true", help="Leave out the cross-tokenizer column (a student of "
                   "another tokenizer family, the same teacher through precompute teacher --cross-tokenizer).")
    a = p.parse_args(argv)
    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    unknown = [m for m in methods if m not in BY_NAME]
    if unknown:
        p.error(f"unknown method(s) {', '.join(unknown)}")
    lrs = tuple(float(x) for x in a.lrs.split(",") if x.strip())
    seeds = a.seeds
    if a.quick:
        lrs = (lrs[len(lrs) // 2],)
        seeds = min(seeds, 2)
    out = Path(a.out).resolve()
    return Options(out=out, methods=methods, lrs=lrs, seeds=seeds, steps=a.steps, samples=a.samples,
                   threads=a.threads, setup=SMOKE if a.smoke else Setup(),
                   png=Path(a.png).resolve() if a.png else out / "efficacy.png", cross=not a.no_cross)


def main(argv: list[str] | None = None) -> int:
    o = parse(argv)
    os.environ["OMP_NUM_THREADS"] = str(o.threads)  # this process's torch
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(o.threads)
    start, load = time.perf_counter(), os.getloadavg()
    say(f"efficacy benchmark: {len(o.methods)} methods, {o.steps} steps each at --batch-tokens "
        f"{o.setup.batch_tokens}, rates {', '.join(map(lr_tag, o.lrs))} (seed 0 on dev), {o.seeds} seed(s) at the "
        f"best rate, {o.samples} sampled answers per test prompt; {o.threads} torch thread(s); "
        f"load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}; out {o.out}")
    bench = Benchmark(o)
    bench.build()
    if o.cross:
        bench.build_cross()
    refs = bench.references()
    say("teacher/reference/initial student evaluated")

    rows, sweeps, rounds_of = [], {}, {}
    for name in o.methods:
        method = BY_NAME[name]
        t0 = time.perf_counter()
        if len(o.lrs) > 1:
            best, scores = bench.sweep(method)
        else:
            best, scores = o.lrs[0], {}
        sweeps[name] = (best, scores)
        finals, rounds = bench.seeds(method, best)
        rows.append((method.label, lr_tag(best), finals))
        if method.kind == "cyclealign":
            rounds_of[name] = rounds
        say(f"  {method.label:<34} best lr {lr_tag(best):<6} preferred greedy "
            f"{cell([r['preferred_greedy'] for r in finals])}, sampled {cell([r['preferred_sampled'] for r in finals])}"
            f"  ({time.perf_counter() - t0:.0f} s)")

    say("")
    if any(scores for _, scores in sweeps.values()):
        say("Learning-rate sweep (seed 0; dev split; score = mean of the greedy and sampled preferred rates):\n")
        say("| method | " + " | ".join(f"lr {lr_tag(lr)}" for lr in o.lrs) + " | best |")
        say("|---|" + "---|" * (len(o.lrs) + 1))
        for name in o.methods:
            best, scores = sweeps[name]
            say(f"| {BY_NAME[name].label} | " + " | ".join(f"{scores[lr]:.3f}" for lr in o.lrs)
                + f" | {lr_tag(best)} |")
        say("")
    say(f"Test split ({o.setup.sizes.test} prompts; {o.samples} sampled answers each at temperature 1; "
        f"{o.seeds} seed(s), mean ± sd):\n")
    ref_rows = [("teacher (dpo from the reference)", "", [refs["teacher"]]),
                ("reference (sft, uniform valid)", "", [refs["reference"]]),
                ("initial student (every method's start)", "", [refs["student"]])]
    say(table(ref_rows + rows))
    for name, rounds in rounds_of.items():
        say(f"\nCycleAlign round by round (test split; `train cyclealign --rounds 3`, each round's model; "
            f"{len(rounds)} seed(s) at lr {lr_tag(sweeps[name][0])}):\n")
        say("| round | valid (greedy) | preferred (greedy) | valid (sampled) | preferred (sampled) |")
        say("|---|---|---|---|---|")
        say(f"| 0 (initial student) | {refs['student']['valid_greedy']:.3f} | {refs['student']['preferred_greedy']:.3f}"
            f" | {refs['student']['valid_sampled']:.3f} | {refs['student']['preferred_sampled']:.3f} |")
        for r in range(len(rounds[0])):
            cells = [cell([seed[r][k] for seed in rounds]) for k in
                     ("valid_greedy", "preferred_greedy", "valid_sampled", "preferred_sampled")]
            say(f"| {r + 1} | " + " | ".join(cells) + " |")
    cross_rows, cross_refs = [], {}
    if o.cross:
        cross_refs["student"] = bench.evaluate(bench.models / "cross-student", "test",
                                               bench.results / "cross" / "initial" / "student-test.json",
                                               what="evaluate cross", cross=True)
        for name, (label, lr, finals) in zip(o.methods, rows):
            method = BY_NAME[name]
            if method.kind == "cyclealign":  # a black box that reads text: no teacher signal to align
                continue
            cross_rows.append((label, lr, finals, bench.cross_seeds(method, sweeps[name][0])))
            if reads_kd(method):  # KD's rows without an exact teacher token: ULD (the default) or the chunks
                chunked = with_chunks(method)
                cross_rows.append((chunked.label, lr, [], bench.cross_seeds(chunked, sweeps[name][0])))
        say(f"\nCross-tokenizer column (test split; the same teacher, a student of another tokenizer family: "
            f"{task.build_cross_tokenizer().name_or_path}, {len(task.build_cross_tokenizer())} tokens; each method "
            f"at its same-tokenizer rate, {o.seeds} seed(s)):\n")
        student_same, student_cross = refs["student"], cross_refs["student"]
        say(cross_table([("initial student", "", [student_same], [student_cross])] + cross_rows))
        say("\nAlignment of the cross-tokenizer stores (precompute teacher --cross-tokenizer):")
        for line in bench.alignment:
            say(f"  {line}")
    if o.png:
        plot(o.png, rows, refs)
        say(f"\nplot: {o.png}")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in sorted(bench.run.seconds.items(), key=lambda kv: -kv[1]))
    load = os.getloadavg()
    say(f"time per part (commands): {times}")
    say(f"wall time {time.perf_counter() - start:.0f} s; load average at the end {load[0]:.2f}, {load[1]:.2f}, "
        f"{load[2]:.2f}; commands and logs: {o.out / 'commands.txt'}, {o.out / 'logs'}")
    summary = {"rows": [{"method": label, "lr": lr, "results": results} for label, lr, results in rows],
               "references": refs, "sweeps": {k: [v[0], {lr_tag(lr): s for lr, s in v[1].items()}]
                                              for k, v in sweeps.items()},
               "cyclealign_rounds": rounds_of,
               "cross_rows": [{"method": label, "lr": lr, "results": cross} for label, lr, _, cross in cross_rows],
               "cross_references": cross_refs, "cross_alignment": bench.alignment}
    (o.out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
