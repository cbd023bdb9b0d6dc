"""What one training step of each method costs, from the store and with the teacher run live.

For each method this prints its step time and peak memory divided by those of an
SFT step of the same student on the same batch, side by side for two ways
of getting the teacher's signals:

- ``store``: read from the teacher-signal store (what ``train student`` does);
- ``live``: what a user without a store does: every step runs the teacher
  forward for its top-K (and the reference model at those ids for ADPA, the
  initial model's sums for DPO) before the student's step. ADPA's generation of
  the student's own answers is a one-off before training in either case and is
  not timed.

PAD (and any method reading the ``samples`` set) is measured on a batch of whole
sampled groups from a second store (``--pad-cache``), against a plain SFT step on
the same sampled responses (``plain sft (groups)``). Its ``live`` step recomputes
what PAD reads: the teacher's log-prob sum of every response and its calibration
score, i.e. n (n - 1) multiple-choice prompts per group of n (each pair in both
orders, :mod:`precompute.calibration`). The sampling itself is not timed.

Two SFT baselines, both on every response token of every sequence of the batch
(the tokens a method step runs the student on), both followed by backward and an
AdamW step:

- ``plain sft``: ``model(input_ids).logits`` (the full [tokens, vocabulary]
  logits, prompts included) and cross-entropy: what a user's own SFT loop does;
- ``sft step``: the project's own SFT term through :func:`train.methods.method_loss`
  (decoder on the sequences, then the same chunked output layer,
  :func:`train.losses.chunked_token_terms`), on every response of the batch
  (:func:`sft_every_response`). Method ``sft`` itself trains on the chosen
  responses only, a third of the batch's; the ``sft`` row shows that step. This
  is the tight baseline: a method's ratio to it is what its own terms cost beyond
  running the student over the same tokens (target for ``dckd+adpa``: <= 1.05).

Time ratios are printed to both (``/plain``, ``/sft step``), memory ratios to the
plain one. On a shared 2-core machine a step's time varies by 20% or more from one
round to the next (page faults of the freshly allocated gradients, other work), so
the sft step is also measured a second time as a step of its own (the A/A control:
its ratio to the sft step is the noise floor), and the dckd+adpa target is judged
on the median of its per-round ratios to the sft step (each round runs both), which
a slow spell moves less than it moves a ratio of medians. A method step:
:func:`train.methods.method_loss`, backward, AdamW step. All steps run in one
process on the same batch, interleaved (round-robin, rotated each round) and
repeated; figures are medians. Judge the target on 9 or more repeats: a run of 2
printed 1.27 once where runs of 9 and 15 print 1.00.

Peak memory of a step. CUDA: ``torch.cuda.max_memory_allocated`` during the step
minus what was allocated before it (``process``: the maximum itself, weights and AdamW
state included). CPU: each configuration in a fresh process of its own, started with
``MALLOC_MMAP_THRESHOLD_=65536`` so that freed tensors leave the resident set at once;
it loads the student, makes AdamW's state (one update from zero gradients, so the
measured step is a steady one, not the first), then ``malloc_trim``, resets the
resident-set high-water mark (Linux ``VmHWM``, by writing 5 to
``/proc/self/clear_refs``), reads the resident set, runs one step and reads the
high-water mark: ``step`` is the growth (the high-water mark minus the resident set
before the step), ``process`` the high-water mark itself (what ``/usr/bin/time -v``
reports for a process that ran that step: weights, AdamW state, the Python and torch
runtime, the step). Not a sampling thread: the kernel's high-water mark misses no
short peak. The times come from the first process, with the ordinary allocator (that
setting slows allocation down). ``total`` in the time table adds the memory that stays
resident between steps, counted from parameter sizes: the student's weights and AdamW
state (12 bytes per parameter in float32) plus, for ``live``, the teacher and the
frozen reference/initial model it must hold.

The same token budget. A step's activation memory grows with the tokens the decoder
runs over (sequences x the longest of them, padding included) and with the rows the
output layer runs on; the memory table prints both for each configuration. A method is
held to its own SFT step at the same token budget: the SFT term's formula on exactly the
response rows the method reads (:func:`sft_on_rows_of`), so the decoder runs over the same
sequences and the output layer on the same rows; what is left is what the method's own
terms cost. For a method that reads every response of the batch (``dckd+adpa``: chosen,
rejected and generated; ``pad``: every sample of its groups) that is the ``sft step``
itself; ``dpo`` is held to ``sft step on pairs/chosen+rejected``, ``adpa`` to
``sft step on pairs/chosen, generated/generated``. Method ``sft`` (and ``train student
--method sft`` at the same ``--batch-tokens``) runs the decoder over the chosen responses
only, a third of the sequences of a dckd+adpa batch: a method's ratio to it measures the
data as much as the method. Target: every method's step peak <= 1.15x its SFT step's, with
checkpointing and without.

Activation checkpointing (``train student --gradient-checkpointing``,
:func:`train.distributed.checkpoint_layers`): every store step and the sft steps are also
measured with each decoder layer checkpointed (``+ckpt`` configurations; switched on and
off around the step on the same student), side by side; the memory table prints each
method's step and process peaks with and without it, its ratio to the sft step with it,
and the step-time cost of checkpointing (the median over rounds of the time with over the
time without, in the same round). ``--no-checkpointing`` leaves those out.
``--batch-tokens N`` measures the first batch the trainer would make with that budget
(store order) instead of ``--examples`` examples: ``--batch-tokens 4096`` on the demo store
is a default ``train student`` step.

Several processes (``train student`` under ``torchrun`` / ``accelerate launch``,
:mod:`train.distributed`): the last rows give the time per example of a
``dckd+adpa`` step (:class:`train.distributed.ParallelStudent`'s forward and backward, clipping, AdamW)
made by one process with every core, by one process with one core's share, and by
``--processes N`` processes (DDP over gloo on the CPU, NCCL on N GPUs) with the
cores shared out, each process with the same batch of ``--examples`` examples
(a step then takes N times as many); each configuration runs in fresh processes
started from here, twice, in turn (forward, then in reverse order), and each
run times ``--repeats`` steps after an untimed one: figures are medians of those
steps. The machine's load average is printed before and after.
``--processes 0`` leaves them out; ``--only-processes`` prints only them.

Usage: ``python benchmarks/train_step.py [--cache STORE] [--pad-cache STORE] [--methods sft,dckd+adpa,pad]
[--examples 1 | --batch-tokens N] [--repeats 3] [--no-live] [--no-checkpointing] [--processes 2] [--only-processes]
[--per-group] [--memory-only] [--dtype float32]``. ``--memory-only`` (CPU) prints the memory table alone: one step per
configuration, each in its own process, no timed rounds. ``--dtype bfloat16``: every step autocast, as
``train student --dtype``. ``--per-group``
adds a ``dckd+adpa`` step whose forward runs the output layer once per group of rows needing the same
quantities (what :func:`train.methods.student_outputs` did before it went to one pass), side by side with the
others. Without ``--cache`` a store is
built once from the bundled demo data (8 rows, the embedded models) under the model cache and reused
(about 2 minutes on 2 CPU cores the first time); likewise the groups store without
``--pad-cache`` (``precompute sample`` then ``--passes pad``, several minutes). The
measurement itself is (repeats + 1) x 18 + 4 steps of a 120M-parameter student
without checkpointing, about twice that with it (each configuration's memory then takes one
more step in a process of its own): about 10 minutes on an idle 2-core CPU at one example,
several times that on a loaded one or a larger batch; ``--no-live`` (no teacher run, so
neither it nor the reference is loaded) and fewer ``--methods`` make it much shorter.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import itertools
import os
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm import chat, models  # noqa: E402
from precompute import calibration  # noqa: E402
from precompute import dataset as data  # noqa: E402
from precompute import scoring as passes  # noqa: E402
from store import ExampleStream, TeacherStore  # noqa: E402
from store import format as store_format  # noqa: E402
from train import distributed, methods  # noqa: E402
from train.batches import collate, token_budget_batches  # noqa: E402

METHODS = ["sft", "kd", "dckd", "dpo", "simpo", "adpa", "dckd+adpa", "pad"]
ALL_NEEDS = {"pairs": ["teacher", "student_init"], "generated": ["teacher", "reference"]}
GROUP_NEEDS = {"samples": ["teacher", "teacher_mcq"]}
GROUP_BASE = "plain sft (groups)"
TIGHT_BASE = "sft step"
#: the sft step measured a second time as a step of its own: its ratio to the sft step is the noise floor
CONTROL = "sft step (A/A control)"
GROUP_TIGHT_BASE = "sft step (groups)"
MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"
DP_METHOD = "dckd+adpa"  # the method of the several-process rows
PER_GROUP_METHOD = "dckd+adpa"  # measured also with one output-layer pass per group of rows (the code before)
PER_GROUP = f"{PER_GROUP_METHOD}/per-group"
DP_ROUNDS = 2  # each configuration is started this many times, in turn (the second round in reverse order)
CKPT = "+ckpt"  # a configuration's name with its decoder layers checkpointed
MEMORY_TARGET = 1.15  # every method's step peak over the sft step's at the same token budget


# --------------------------------------------------------------------------- the store and the batch


def bench_name(stem: str) -> str:
    """The cached store's name: its recipe, and the store format (a writer completes only its own format)."""
    return f"{stem}-v1-format{store_format.FORMAT_VERSION}.zarr"


def bench_store(cache: str | None) -> str:
    if cache:
        return cache
    from precompute.teacher import TeacherConfig, run_teacher

    out = models.cache_dir() / "bench" / bench_name("demo-limit8")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"building (or completing) the benchmark store {out} from the bundled demo data ...", flush=True)
    run_teacher(TeacherConfig(out=str(out), limit=8, splits=("train",), top_k=50, max_length=256,
                              max_new_tokens=32, examples_per_part=8, device="auto", dtype="float32",
                              progress=False))
    return str(out)


def bench_pad_store(cache: str | None) -> str:
    if cache:
        return cache
    from precompute.teacher import TeacherConfig, run_teacher
    from precompute.sample import SampleConfig, run_sample

    out = models.cache_dir() / "bench" / bench_name("demo-pad-limit8")
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"building (or completing) the benchmark groups store {out} from the bundled demo data ...", flush=True)
    common = dict(out=str(out), limit=8, splits=("train",), max_length=256, max_new_tokens=32, examples_per_part=8,
                  device="auto", dtype="float32", progress=False)
    run_sample(SampleConfig(**common))
    run_teacher(TeacherConfig(passes=("pad",), **common))
    return str(out)


def uses_groups(method: str) -> bool:
    return "samples" in methods.needs_of(methods.resolve_terms(method))


def first_batch(store_path: str, n_examples: int, device: str, needs=ALL_NEEDS, batch_tokens: int | None = None):
    """The store's first ``n_examples`` examples (store order) as a batch; with ``batch_tokens``, the first batch the
    trainer's batching makes with that budget (:func:`train.batches.token_budget_batches`) instead."""
    stream = ExampleStream(TeacherStore.open(store_path), "train", needs, shuffle=False)
    if batch_tokens:
        examples = next(token_budget_batches(stream, batch_tokens))
    else:
        examples = list(itertools.islice(stream, n_examples))
    return collate(examples, pad_id=0).to(device)


def step_budget(batch, terms) -> tuple[int, int]:
    """(tokens the decoder runs over, padding included; rows the output layer runs on) of a step of ``terms``:
    the sequences that own a row some term reads, at their longest length, as
    :func:`train.methods.student_outputs` chooses them."""
    rows = torch.zeros(batch.num_response_tokens, dtype=torch.bool, device=batch.input_ids.device)
    for request in methods.token_requests(terms):
        rows |= methods.response_rows(batch, request.sequence_set, request.role)
    run = torch.zeros(batch.num_sequences, dtype=torch.bool, device=rows.device)
    run[batch.resp_seq[rows]] = True
    if not bool(run.any()):
        return 0, 0
    return int(run.sum()) * int(batch.attention_mask[run].sum(1).max()), int(rows.sum())


def plain_budget(batch) -> tuple[int, int]:
    """The plain SFT step's: the decoder and the output layer on every position of every sequence."""
    return int(batch.input_ids.numel()), int(batch.input_ids.numel())


def checkpointing_switch(student):
    """Checkpoint the student's decoder layers as ``train student --gradient-checkpointing`` does
    (:func:`train.distributed.checkpoint_layers`), switched off; a function switching them on (True) and off."""
    distributed.checkpoint_layers(student)
    flagged = [m for m in student.modules() if getattr(m, "gradient_checkpointing", False) is True]

    def switch(on: bool) -> None:
        for module in flagged:
            module.gradient_checkpointing = on

    switch(False)
    return switch


def checkpointed(step, switch):
    """``step`` with the decoder layers checkpointed while it runs."""
    def run():
        switch(True)
        try:
            step()
        finally:
            switch(False)
    return run


def live_signals(batch, needs, teacher, frozen, top_k: int, top_p: float = 1.0):
    """The batch with every signal ``needs`` asks for recomputed by running the models now (the store's adaptive
    K, ``top_p`` < 1, included: its kept counts too)."""
    sequences = [s for ex in batch.examples for s in ex.sequences]  # collate's order
    response = {k: v.clone() for k, v in batch.response.items()}
    scalars = {k: v.clone() for k, v in batch.scalars.items()}
    resp_seq = batch.resp_seq
    for sequence_set, sections in needs.items():
        index = [i for i, s in enumerate(sequences) if s.sequence_set == sequence_set]
        ids = [sequences[i].input_ids for i in index]
        prompt = [sequences[i].prompt_length for i in index]
        rows = [resp_seq == i for i in index]
        if "teacher" in sections:
            scored = passes.score_sequences(teacher, ids, prompt, top_k=top_k, top_p=top_p)
            for r, s in zip(rows, scored):
                response["teacher/topk_ids"][r] = torch.from_numpy(s.topk_ids).to(resp_seq.device)
                response["teacher/topk_logp"][r] = torch.from_numpy(s.topk_logp).to(resp_seq.device)
                if "teacher/tail_logp" in response:
                    response["teacher/tail_logp"][r] = torch.from_numpy(s.tail_logp).to(resp_seq.device)
                if s.topk_count is not None:
                    response["teacher/topk_count"][r] = torch.from_numpy(s.topk_count).to(resp_seq.device)
        if "reference" in sections:
            at = [response["teacher/topk_ids"][r].cpu().numpy() for r in rows]
            for r, s in zip(rows, passes.score_sequences(frozen, ids, prompt, at_ids=at)):
                response["reference/topk_logp"][r] = torch.from_numpy(s.at_ids_logp).to(resp_seq.device)
        if "student_init" in sections:
            for i, s in zip(index, passes.score_sequences(frozen, ids, prompt)):
                scalars["student_init/logp_sum"][i] = s.logp_sum
    return dataclasses.replace(batch, response=response, scalars=scalars)


class LiveGroupTeacher:
    """Recomputes what PAD reads from the store: the teacher's sums and calibration scores of each group."""

    def __init__(self, store_path: str, teacher, tokenizer):
        store = TeacherStore.open(store_path)
        dataset = store.attrs.get("provenance", {}).get("dataset", {})
        source = None if dataset.get("kind") in (None, "bundled") else dataset["name"]
        rows = data.load_splits(source, ("train",), require_pairs=False)["train"].rows
        self.questions = {r.index: calibration.last_user_message(r.prompt) for r in rows}
        self.teacher, self.tokenizer = teacher, tokenizer
        self.template = calibration.load_template(None)
        self.letter_ids = calibration.letter_token_ids(tokenizer)

    def signals(self, batch):
        sequences = [s for ex in batch.examples for s in ex.sequences]  # collate's order
        position = {id(s): i for i, s in enumerate(sequences)}
        scalars = {k: v.clone() for k, v in batch.scalars.items()}
        sampled = [s for s in sequences if s.sequence_set == "samples"]
        scored = passes.score_sequences(self.teacher, [s.input_ids for s in sampled],
                                        [s.prompt_length for s in sampled])
        for s, score in zip(sampled, scored):
            scalars["teacher/logp_sum"][position[id(s)]] = score.logp_sum
        for example in batch.examples:
            group = sorted(example.of("samples"), key=lambda s: s.role)
            n = len(group)
            options = [calibration.option_text(self.tokenizer, s.input_ids[s.prompt_length:]) for s in group]
            question = self.questions[example.example_index]
            asks = [chat.encode_prompt(self.tokenizer, [{"role": "user", "content": self.template.render(
                        question, options[a], options[b])}])
                    for i, j in calibration.unordered_pairs(n) for a, b in ((i, j), (j, i))]
            p_first = calibration.prob_first_option(calibration.option_logprobs(self.teacher, asks, self.letter_ids))
            index, prob = calibration.pair_rows(n, p_first[0::2], p_first[1::2])
            for s, score in zip(group, calibration.mcq_score(calibration.pair_matrix(index, prob, n))):
                scalars["teacher_mcq/mcq_score"][position[id(s)]] = float(score)
        return dataclasses.replace(batch, scalars=scalars)


# --------------------------------------------------------------------------- steps and measurement


def plain_sft_loss(model, batch):
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    rows = logits[batch.resp_seq, batch.resp_pos].float()
    return torch.nn.functional.cross_entropy(rows, batch.resp_target)


def sft_every_response(batch) -> list[methods.Term]:
    """The project's SFT term (mean token NLL, :func:`train.methods.sft_term`'s formula) on every response row of
    every sequence set in ``batch``: through :func:`train.methods.method_loss` it runs the decoder and the chunked
    output layer on exactly the rows a method step runs them on."""
    sets = sorted({sequence.sequence_set for example in batch.examples for sequence in example.sequences})

    def every_response_nll(batch, out, settings):
        return methods.token_mean(-out.logp, out.computed[methods.LOGP])

    requests = tuple(methods.TokenRequest(methods.LOGP, sequence_set, None) for sequence_set in sets)
    every_token = methods.Unit("every response token", lambda batch: int(batch.num_response_tokens))
    return [methods.Term("sft_every_response", 1.0, {s: () for s in sets}, requests, every_response_nll, every_token)]


def sft_on_rows_of(terms) -> tuple[str, list[methods.Term]]:
    """A method's own SFT step: the SFT term's formula on exactly the response rows ``terms`` read, so the decoder
    runs over the same sequences and the output layer on the same rows (the same token budget); and its name,
    ``sft step on`` the rows (``pairs/chosen+rejected``)."""
    requests = tuple(dict.fromkeys(methods.TokenRequest(methods.LOGP, r.sequence_set, r.role)
                                   for r in methods.token_requests(terms)))
    sets: dict[str, list[str]] = {}
    for request in requests:
        sets.setdefault(request.sequence_set, []).append(
            "all" if request.role is None else store_format.role_name(request.role))
    label = ", ".join(f"{s}/{'+'.join(roles)}" for s, roles in sets.items())

    def nll_on_rows(batch, out, settings):
        return methods.token_mean(-out.logp, out.computed[methods.LOGP])

    rows = methods.Unit("response tokens read", lambda batch: int(sum(
        methods.response_rows(batch, r.sequence_set, r.role).sum() for r in requests)))
    return f"sft step on {label}", [methods.Term("sft_same_rows", 1.0, {s: () for s in sets}, requests, nll_on_rows,
                                                 rows)]


def outputs_per_group(model, batch, requests, settings, chunk_size=1024):
    """The student's forward as :func:`train.methods.student_outputs` made it before it went to one pass: one
    chunked output-layer pass per group of rows needing the same quantities (:func:`train.methods.rows_by_need`),
    so pair rows (KD) and generated rows (ADPA) each run the output layer, and its weight's gradient, apart."""
    from lm import head
    from train import losses

    R, device = batch.num_response_tokens, batch.input_ids.device
    wanted = {name: torch.zeros(R, dtype=torch.bool, device=device) for name in losses.TOKEN_TERMS}
    for request in requests:
        wanted[request.quantity] |= methods.response_rows(batch, request.sequence_set, request.role)
    wanted[losses.LOGP] = torch.stack(list(wanted.values())).any(0)
    run = torch.zeros(batch.num_sequences, dtype=torch.bool, device=device)
    run[batch.resp_seq[wanted[losses.LOGP]]] = True
    run_index = run.nonzero().squeeze(1)
    position_in_run = torch.cumsum(run.long(), 0) - 1
    length = int(batch.attention_mask[run_index].sum(1).max())
    decoder, output_layer = head.split_model(model)
    hidden = decoder(input_ids=batch.input_ids[run_index, :length],
                     attention_mask=batch.attention_mask[run_index, :length]).last_hidden_state
    zeros = torch.zeros(R, dtype=torch.float32, device=device)
    values = dict.fromkeys(wanted, zeros)
    for names, rows in methods.rows_by_need(wanted):
        picked = hidden[position_in_run[batch.resp_seq[rows]], batch.resp_pos[rows]]
        reads = {signal for name in names for signal in losses.TOKEN_TERMS[name].reads}
        got = losses.chunked_token_terms(picked, output_layer.logits, names,
                                         methods.row_signals(batch, reads, rows, settings), chunk_size)
        for name, value in got.items():
            values[name] = values[name].index_put((rows,), value.to(zeros.dtype))
    return methods.StudentOutputs(values, wanted)


def per_group_loss(model, batch, terms, settings):
    out = outputs_per_group(model, batch, methods.token_requests(terms), settings)
    return sum(term.weight * term.loss(batch, out, settings) for term in terms)


#: the autocast each timed step's loss runs in (--dtype; float32: none), as train student's --dtype
STEP_DTYPE = {"device": "cpu", "dtype": torch.float32}


def make_step(model, optimizer, loss_fn):
    def step():
        with methods.autocast_for(STEP_DTYPE["device"], STEP_DTYPE["dtype"]):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(step, device: str) -> tuple[float, int, int]:
    """(seconds, peak bytes above the memory in use before the step, the peak itself): CUDA, allocated; CPU,
    resident (module docstring)."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        before = _status_kb("VmRSS")
    t0 = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else _status_kb("VmHWM")
    return seconds, max(0, peak - before), peak


def prime_optimizer(model, optimizer) -> None:
    """AdamW's state, made by one update from zero gradients (no step of any configuration): the measured step is
    then a steady one, whose peak does not include making the state."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# --------------------------------------------------------------------------- main


@dataclasses.dataclass
class Bench:
    """What :func:`build_steps` sets up: one step function per configuration and what the tables print of them."""

    steps: dict  # name -> step function (forward, backward, AdamW step)
    resident: dict  # name -> bytes resident between steps, from parameter sizes
    budgets: dict  # name -> (decoder tokens, output-layer rows) of the step
    baselines: dict  # name of a method's store step -> name of its SFT step at the same token budget
    about: str
    prime: object  # makes AdamW's state without a step (prime_optimizer)


def build_steps(args, device) -> Bench:
    """The store, the batch, the models, and one step function per measured configuration."""
    store_path = args.cache
    batch = first_batch(store_path, args.examples, device, batch_tokens=args.batch_tokens)
    top_k = int(batch.response["teacher/topk_ids"].shape[1])
    record = TeacherStore.open(store_path).pass_record("pairs/teacher")
    top_p = float(record.settings.get("top_p", 1.0)) if record else 1.0  # the store's adaptive K, if any
    group_methods = [m for m in args.methods if uses_groups(m)]
    student, _, student_info = models.load_model(models.EMBEDDED_STUDENT, device=device, dtype="float32",
                                                 default=models.EMBEDDED_STUDENT)
    student.train()
    switch = checkpointing_switch(student) if args.checkpointing else None
    live_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    teacher = frozen = None
    if args.live:
        teacher, teacher_tokenizer, teacher_info = models.load_model(models.EMBEDDED_TEACHER, device=device,
                                                                     dtype=live_dtype)
        frozen, _, _ = models.load_model(models.EMBEDDED_STUDENT, device=device, dtype=live_dtype,
                                         default=models.EMBEDDED_STUDENT)  # reference / initial model
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-7)
    settings = methods.Settings()
    steps, resident, budgets, baselines = {}, {}, {}, {}
    weights_and_adamw = 3 * param_bytes(student)  # weights + AdamW's two moments

    def add(name, loss_fn, step_batch, terms=None, extra_resident=0, checkpointing=False):
        steps[name] = make_step(student, optimizer, loss_fn)
        resident[name] = weights_and_adamw + extra_resident
        budgets[name] = plain_budget(step_batch) if terms is None else step_budget(step_batch, terms)
        if checkpointing and switch is not None:
            steps[name + CKPT] = checkpointed(steps[name], switch)
            resident[name + CKPT], budgets[name + CKPT] = resident[name], budgets[name]

    def add_store_step(method, step_batch, tight_base):
        """The method's step from the store, and its SFT step at the same token budget (the tight baseline where the
        method reads every response of the batch)."""
        terms = methods.resolve_terms(method)
        name = f"{method}/store"
        add(name, lambda: methods.method_loss(student, step_batch, terms, settings)[0], step_batch, terms,
            checkpointing=True)
        base, same_rows = sft_on_rows_of(terms)
        if budgets[name] == budgets[tight_base]:  # every response row of the batch: the tight baseline itself
            base = tight_base
        if base not in steps:
            add(base, lambda: methods.method_loss(student, step_batch, same_rows, settings)[0], step_batch, same_rows,
                checkpointing=True)
        baselines[name] = base
        return terms

    add("plain sft", lambda: plain_sft_loss(student, batch), batch)
    tight = sft_every_response(batch)
    add(TIGHT_BASE, lambda: methods.method_loss(student, batch, tight, settings)[0], batch, tight, checkpointing=True)
    steps[CONTROL] = steps[TIGHT_BASE]  # the same step under a second name, timed in its own slot of each round
    resident[CONTROL], budgets[CONTROL] = resident[TIGHT_BASE], budgets[TIGHT_BASE]
    if group_methods:
        group_batch = first_batch(args.pad_cache, args.examples, device, GROUP_NEEDS, batch_tokens=args.batch_tokens)
        live_groups = LiveGroupTeacher(args.pad_cache, teacher, teacher_tokenizer) if args.live else None
        add(GROUP_BASE, lambda: plain_sft_loss(student, group_batch), group_batch)
        group_tight = sft_every_response(group_batch)
        add(GROUP_TIGHT_BASE, lambda: methods.method_loss(student, group_batch, group_tight, settings)[0],
            group_batch, group_tight, checkpointing=True)
    for method in group_methods:
        terms = add_store_step(method, group_batch, GROUP_TIGHT_BASE)
        if not args.live:
            continue

        def live_group_loss(t=terms):
            with torch.no_grad():
                fresh = live_groups.signals(group_batch)
            return methods.method_loss(student, fresh, t, settings)[0]
        add(f"{method}/live", live_group_loss, group_batch, terms, extra_resident=param_bytes(teacher))
    for method in [m for m in args.methods if m not in group_methods]:
        terms = add_store_step(method, batch, TIGHT_BASE)
        needs = {s: [x for x in sec if x in ALL_NEEDS[s]] for s, sec in methods.needs_of(terms).items()}
        if method == PER_GROUP_METHOD and args.per_group:
            add(PER_GROUP, lambda t=terms: per_group_loss(student, batch, t, settings), batch, terms)
        if args.live and any(needs.values()):
            def live_loss(t=terms, n=needs):
                with torch.no_grad():
                    fresh = live_signals(batch, n, teacher, frozen, top_k, top_p)
                return methods.method_loss(student, fresh, t, settings)[0]
            uses_frozen = bool({"reference", "student_init"} & {x for sec in needs.values() for x in sec})
            add(f"{method}/live", live_loss, batch, terms,
                extra_resident=param_bytes(teacher) + (param_bytes(frozen) if uses_frozen else 0))
    teacher_about = (f"teacher {teacher_info.name} ({sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M, "
                     f"{live_dtype} when live)" if args.live else "no live teacher (--no-live)")
    chosen = f"the first {args.batch_tokens}-token batch" if args.batch_tokens else f"{args.examples} example(s)"
    about = (f"device {device}; student {student_info.name} ({sum(p.numel() for p in student.parameters()) / 1e6:.1f}M"
             f" params), {teacher_about}; store {store_path}\n"
             f"batch: {chosen} = {len(batch.examples)} example(s), {batch.num_sequences} sequences, "
             f"{int(batch.attention_mask.sum())} tokens ({int(batch.input_ids.numel())} padded), "
             f"{batch.num_response_tokens} response tokens, top-K {top_k}")
    if group_methods:
        sizes = [len(ex.of("samples")) for ex in group_batch.examples]
        about += (f"\ngroups batch ({', '.join(group_methods)}; against {GROUP_BASE}): {len(sizes)} group(s) of "
                  f"{'/'.join(map(str, sizes))} sampled responses from {args.pad_cache} = "
                  f"{int(group_batch.attention_mask.sum())} tokens, {group_batch.num_response_tokens} response tokens")
    return Bench(steps, resident, budgets, baselines, about, lambda: prime_optimizer(student, optimizer))


def run_rounds(steps, repeats, device):
    """Warm up, then measure every step ``repeats`` times, round-robin, rotated each round."""
    names = list(steps)
    # warm-up, untimed: AdamW's state, first-call allocations; the last step is the most complete one
    for name in dict.fromkeys([names[0], names[-1]]):
        steps[name]()
    timings = {name: [] for name in names}
    peaks = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, peak, whole = measure(steps[name], device)
            timings[name].append(seconds)
            peaks[name].append((peak, whole))
    # the medians, and every round's time of every step (for the paired ratios)
    return ({n: statistics.median(v) for n, v in timings.items()},
            {n: {"step": statistics.median(p for p, _ in v), "process": statistics.median(w for _, w in v)}
             for n, v in peaks.items()}, timings)


def paired_ratio(rounds: dict, name: str, base: str) -> tuple[float, float, float]:
    """Median, first and third quartile of ``name``'s time over ``base``'s within each round: the two ran
    minutes apart at most, so a slow spell of the machine (page faults, other work) moves both."""
    ratios = sorted(a / b for a, b in zip(rounds[name], rounds[base]))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return statistics.median(ratios), q[0], q[-1]


def memory_in_children(argv, names, live_names) -> dict[str, dict[str, int]]:
    """CPU: each configuration's peaks measured by a fresh process of its own whose malloc returns freed tensors to
    the system (module docstring); a configuration without the live teacher loads none."""
    env = {**os.environ, MMAP_ENV: "65536"}
    peaks = {}
    for name in names:
        extra = [] if name in live_names else ["--no-live"]
        done = subprocess.run([sys.executable, __file__, *argv, *extra, "--memory-of", name], env=env, check=True,
                              stdout=subprocess.PIPE, text=True)
        peaks[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  memory of {name}: step {peaks[name]['step'] / 2**20:.0f} MiB, process "
              f"{peaks[name]['process'] / 2**20:.0f} MiB", flush=True)
    return peaks


# --------------------------------------------------------------------------- several processes


def data_parallel_worker(args) -> None:
    """One process of a several-process measurement (started alone or by torchrun): time DP_METHOD steps."""
    from train import distributed, records

    torch.set_num_threads(args.threads)
    terms = methods.resolve_terms(DP_METHOD)
    needs = methods.needs_of(terms)
    store = TeacherStore.open(args.cache)
    examples = list(itertools.islice(ExampleStream(store, "train", needs, shuffle=False), args.examples))
    with distributed.setup(args.device) as context:
        device = models.resolve_device(context.device)
        context.device = device
        student, tokenizer, _ = models.load_model(models.EMBEDDED_STUDENT, device=device, dtype="float32",
                                                  default=models.EMBEDDED_STUDENT)
        student.train()
        pad_id = chat.pad_id(tokenizer)
        parallel = distributed.ParallelStudent(context, student, terms, methods.Settings(), 1024,
                                               distributed.filler_source(store, "train", needs, pad_id))
        optimizer = torch.optim.AdamW(parallel.parameters(), lr=1e-7)
        meter = records.Meter([t.name for t in terms], reduce=context.sum)
        batch = collate(examples, pad_id).to(device)  # the same batch in every process: timing only

        def step() -> float:
            if context.world > 1:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            with parallel.accumulating(sync=True):  # the trainer's step of one batch
                loss, parts = parallel.loss(batch)
                parallel.backward(loss)
            meter.add_batch(loss, parts, int(batch.attention_mask.sum()), 1.0)
            parallel.clip(1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if context.world > 1:
                torch.distributed.barrier()
            return time.perf_counter() - t0

        step()  # untimed: AdamW's state, first-call allocations
        seconds = [step() for _ in range(args.repeats)]
        if context.main:
            Path(args.dp_result).write_text(json.dumps({"seconds": seconds, "processes": context.world,
                                                        "examples": len(examples)}))


def data_parallel_rows(args, device: str) -> None:
    """Time per example of a DP_METHOD step: 1 process with every core, 1 with a core's share, N processes."""
    import tempfile

    n = args.processes
    cores = os.cpu_count() or 1
    cuda = device.startswith("cuda")
    if cuda and torch.cuda.device_count() < n:
        print(f"\n{n} processes: skipped, {torch.cuda.device_count()} GPU(s) here")
        return
    share = max(1, cores // n)
    runs = [(f"1 process, {cores} thread(s)", 1, cores), (f"1 process, {share} thread(s)", 1, share),
            (f"{n} processes, {share} thread(s) each", n, share)]
    if share == cores:
        runs.pop(1)
    print(f"\n{DP_METHOD} step on several processes ({'NCCL' if cuda else 'gloo, CPU'}), {args.examples} "
          f"example(s) per process per step, medians of {DP_ROUNDS} x {args.repeats} steps (configurations in "
          f"turn, {DP_ROUNDS} rounds); load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        order = [run for r in range(DP_ROUNDS) for run in (runs if r % 2 == 0 else runs[::-1])]
        for name, processes, threads in order:
            result = Path(tmp) / "result.json"
            worker = [__file__, "--dp-worker", "--cache", args.cache, "--examples", str(args.examples),
                      "--repeats", str(args.repeats), "--device", args.device, "--dp-threads", str(threads),
                      "--dp-result", str(result)]
            launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                         str(processes)] if processes > 1 else [sys.executable])
            env = {k: v for k, v in os.environ.items()
                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
            env["OMP_NUM_THREADS"] = str(threads)
            subprocess.run(launcher + worker, env=env, check=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
            got = json.loads(result.read_text())
            results.setdefault(name, {**got, "seconds": []})["seconds"] += got["seconds"]
    base = results[runs[0][0]]
    base_per_example = statistics.median(base["seconds"]) / base["examples"]
    print(f"{'processes':<34} {'step ms':>8} {'examples':>8} {'ms/example':>10} {'/1 process':>10}")
    for name, _, _ in runs:
        got = results[name]
        examples = got["examples"] * got["processes"]
        seconds = statistics.median(got["seconds"])
        per_example = seconds / examples
        print(f"{name:<34} {seconds * 1e3:>8.0f} {examples:>8} {per_example * 1e3:>10.0f} "
              f"{per_example / base_per_example:>10.2f}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def memory_table(names, timings, rounds, peaks, budgets, baselines) -> None:
    """Each configuration's step and process peaks, without and with checkpointing, and its ratio to the sft step on
    the same batch; the 1.15x target and dckd+adpa's cost of checkpointing (module docstring)."""
    def mib(value):
        return f"{value / 2**20:.0f}"

    header = (f"{'configuration':<22} {'dec tok':>7} {'rows':>6} | {'step':>6} {'/sft':>5} {'process':>7} | "
              f"{'ckpt step':>9} {'/sft':>5} {'process':>7} {'process':>8} {'time':>6}")
    print(header)
    print(f"{'':<22} {'':>7} {'':>6} | {'MiB':>6} {'step':>5} {'MiB':>7} | {'MiB':>9} {'step':>5} {'MiB':>7} "
          f"{'/no ckpt':>8} {'/no':>6}")
    print("-" * len(header))
    over = {"": [], CKPT: []}
    for name in names:
        base = baselines.get(name, GROUP_TIGHT_BASE if name == GROUP_BASE else TIGHT_BASE)
        base = name if name.startswith(TIGHT_BASE) else base  # an sft step is its own baseline
        tokens, rows = budgets[name]
        cells = []
        for variant in ("", CKPT):
            got, sft = peaks.get(name + variant), peaks.get(base + variant)
            if got is None or sft is None:
                cells.append(["", "", ""])
                continue
            ratio = got["step"] / max(sft["step"], 1)
            if name.endswith("/store") and ratio > MEMORY_TARGET:
                over[variant].append(f"{name.split('/')[0]} {ratio:.2f}")
            cells.append([mib(got["step"]), f"{ratio:.2f}", mib(got["process"])])
        cost = ["", ""]
        if name + CKPT in peaks and name in peaks:
            cost[0] = f"{peaks[name + CKPT]['process'] / peaks[name]['process']:.2f}"
        if name + CKPT in rounds:  # not timed with --memory-only
            cost[1] = f"{paired_ratio(rounds, name + CKPT, name)[0]:.2f}"
        print(f"{name:<22} {tokens:>7} {rows:>6} | {cells[0][0]:>6} {cells[0][1]:>5} {cells[0][2]:>7} | "
              f"{cells[1][0]:>9} {cells[1][1]:>5} {cells[1][2]:>7} {cost[0]:>8} {cost[1]:>6}")
    for variant, label in (("", "without checkpointing"), (CKPT, "with checkpointing")):
        if any(n + variant in peaks for n in names if n.endswith("/store")):
            print(f"target: every method's step peak <= {MEMORY_TARGET}x its SFT step's at the same token budget, "
                  f"{label}: " + ("met" if not over[variant] else "NOT met (" + ", ".join(over[variant]) + ")"))
    method = "dckd+adpa/store"
    if method + CKPT in peaks:
        fall = 1 - peaks[method + CKPT]["process"] / peaks[method]["process"]
        step_fall = 1 - peaks[method + CKPT]["step"] / peaks[method]["step"]
        timed = "step time not measured (--memory-only)"
        if method + CKPT in rounds:
            paired, lo, hi = paired_ratio(rounds, method + CKPT, method)
            timed = (f"step time {paired:.3f} x without, paired within rounds (quartiles {lo:.3f}-{hi:.3f}; target "
                     f"<= 1.35: {'met' if paired <= 1.35 else 'NOT met'})")
        print(f"dckd+adpa with checkpointing: process peak {mib(peaks[method]['process'])} -> "
              f"{mib(peaks[method + CKPT]['process'])} MiB, {fall:.0%} less (target >= 40%: "
              f"{'met' if fall >= 0.40 else 'NOT met'}); step peak {step_fall:.0%} less; {timed}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="store to read (default: build a small one from the demo data)")
    parser.add_argument("--pad-cache", help="store with sampled groups and --passes pad, for pad "
                        "(default: build a small one from the demo data)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--examples", type=int, default=1,
                        help="examples in the batch (each: chosen, rejected, generated)")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="instead of --examples: the first batch train student makes with this budget of padded "
                             "tokens (4096: its default)")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="leave out the steps with checkpointed decoder layers (--gradient-checkpointing)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-only", action="store_true",
                        help="CPU: only the memory table (each configuration's peaks in a process of its own), no "
                             "timed rounds")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="the steps' autocast over float32 weights (train student --dtype) [float32]")
    parser.add_argument("--no-live", dest="live", action="store_false",
                        help="measure the store steps only (no teacher run, no teacher loaded): much shorter")
    parser.add_argument("--per-group", action="store_true",
                        help=f"also time {PER_GROUP_METHOD} with one output-layer pass per group of rows (the code "
                             f"before the one-pass forward), side by side")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=2,
                        help=f"the several-process rows: {DP_METHOD} on N processes against 1 (0: leave them out)")
    parser.add_argument("--only-processes", action="store_true", help="print only the several-process rows")
    parser.add_argument("--dp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dp-threads", dest="threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dp-result", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    device = models.resolve_device(args.device)
    cuda = device.startswith("cuda")
    STEP_DTYPE.update(device=device, dtype=models.resolve_dtype(args.dtype, device))
    if args.memory_only and cuda:
        parser.error("--memory-only: on CUDA the memory is measured in the timed rounds; leave it out")

    if args.dp_worker:
        data_parallel_worker(args)
        return
    if args.only_processes:
        args.cache = bench_store(args.cache)
        data_parallel_rows(args, device)
        return

    if args.memory_of:  # a child of memory_in_children: one configuration's peaks, JSON on the last line
        bench = build_steps(args, device)
        bench.prime()
        _, step, whole = measure(bench.steps[args.memory_of], device)
        print(json.dumps({"step": step, "process": whole}))
        return

    t0 = time.perf_counter()
    args.cache = bench_store(args.cache)
    if any(uses_groups(m) for m in args.methods):
        args.pad_cache = bench_pad_store(args.pad_cache)
    bench = build_steps(args, device)
    resident, budgets, baselines = bench.resident, bench.budgets, bench.baselines
    print(bench.about + (f"; steps autocast to {args.dtype}" if args.dtype != "float32" else ""))
    memory_how = ("torch.cuda.max_memory_allocated, same process" if cuda else
                  f"RSS high-water mark (VmHWM, reset before the step) minus the RSS before it, each configuration "
                  f"in a fresh process of its own started with {MMAP_ENV}=65536, after AdamW's state is made; "
                  f"times from this process")
    print(f"peak memory: {memory_how}; {args.repeats} interleaved repeats, medians", flush=True)
    if args.memory_only:
        timings, memory, rounds = {}, {}, {}
    else:
        timings, memory, rounds = run_rounds(bench.steps, args.repeats, device)
    names = [n for n in bench.steps if n != CONTROL]
    del bench
    if not cuda:
        gc.collect()
        memory = memory_in_children([*argv, "--cache", args.cache] + (["--pad-cache", args.pad_cache]
                                                                       if args.pad_cache else []),
                                    names, [n for n in names if n.endswith("/live")])
    peaks = {name: got["step"] for name, got in memory.items()}
    if args.memory_only:
        print_memory_table(names, timings, rounds, memory, budgets, baselines)
        print(f"measured in {time.perf_counter() - t0:.0f} s")
        return

    base_time, base_peak = timings["plain sft"], peaks["plain sft"]
    base_total = base_peak + resident["plain sft"]
    print(f"\nplain SFT step: {base_time * 1e3:.0f} ms, step peak {base_peak / 2**20:.0f} MiB, "
          f"total (with resident weights + AdamW) {base_total / 2**20:.0f} MiB")
    print(f"{TIGHT_BASE} (the project's SFT term on every response, chunked output layer): "
          f"{timings[TIGHT_BASE] * 1e3:.0f} ms = {timings[TIGHT_BASE] / base_time:.2f} x plain, "
          f"step peak {peaks[TIGHT_BASE] / 2**20:.0f} MiB")
    if GROUP_BASE in timings:
        print(f"{GROUP_BASE} step (the baseline of the methods on groups): {timings[GROUP_BASE] * 1e3:.0f} ms, "
              f"step peak {peaks[GROUP_BASE] / 2**20:.0f} MiB; {GROUP_TIGHT_BASE}: "
              f"{timings[GROUP_TIGHT_BASE] * 1e3:.0f} ms")
    print("ratios on the same responses: time to the plain SFT step (old baseline) and to the project's sft step "
          "(tight baseline); step peak and total peak memory to the plain SFT step")
    header = (f"{'method':<12} {'store: /plain':>13} {'/sft step':>9} {'step mem':>9} {'total':>6}   "
              f"{'live: /plain':>12} {'/sft step':>9} {'step mem':>9} {'total':>6}")
    print(header)
    print("-" * len(header))

    def cells(name):
        if name not in timings:
            return ["(not run)", "", "", ""]
        groups = uses_groups(name.split("/")[0])
        base, tight = (GROUP_BASE, GROUP_TIGHT_BASE) if groups else ("plain sft", TIGHT_BASE)
        total = peaks[base] + resident[base]
        return [f"{timings[name] / timings[base]:.2f}", f"{timings[name] / timings[tight]:.2f}",
                f"{peaks[name] / max(peaks[base], 1):.2f}", f"{(peaks[name] + resident[name]) / total:.2f}"]

    for method in args.methods:
        store, live = cells(f"{method}/store"), cells(f"{method}/live")
        print(f"{method:<12} {store[0]:>13} {store[1]:>9} {store[2]:>9} {store[3]:>6}   "
              f"{live[0]:>12} {live[1]:>9} {live[2]:>9} {live[3]:>6}")
    control, c_lo, c_hi = paired_ratio(rounds, CONTROL, TIGHT_BASE)
    print(f"\nnoise floor: the sft step against itself ({CONTROL}), {timings[CONTROL] / timings[TIGHT_BASE]:.3f} "
          f"by medians, {control:.3f} paired within rounds (quartiles {c_lo:.3f}-{c_hi:.3f})")
    if "dckd+adpa/store" in timings:
        ratio = timings["dckd+adpa/store"] / timings[TIGHT_BASE]
        paired, lo, hi = paired_ratio(rounds, "dckd+adpa/store", TIGHT_BASE)
        print(f"dckd+adpa from the store: {ratio:.3f} x the sft step by medians, {paired:.3f} paired within rounds "
              f"(quartiles {lo:.3f}-{hi:.3f}); target <= 1.05 (paired): {'met' if paired <= 1.05 else 'NOT met'}")
    if PER_GROUP in timings:
        print(f"{PER_GROUP_METHOD} with one output-layer pass per group of rows (the code before; same batch, same "
              f"run): {timings[PER_GROUP] / timings[TIGHT_BASE]:.2f} x the sft step, step peak "
              f"{peaks[PER_GROUP] / max(peaks['plain sft'], 1):.2f} x plain")
    print_memory_table(names, timings, rounds, memory, budgets, baselines)
    print("\nabsolute medians (ms / step-peak MiB): " + ", ".join(
        f"{n} {timings[n] * 1e3:.0f}/{peaks[n] / 2**20:.0f}" for n in timings if n in peaks))
    if args.processes > 1:
        data_parallel_rows(args, device)
    print(f"measured in {time.perf_counter() - t0:.0f} s")


def print_memory_table(names, timings, rounds, memory, budgets, baselines) -> None:
    print(f"\npeak memory per step at the same token budget. dec tok: tokens the decoder runs over (sequences x "
          f"their longest, padding included); rows: rows through the output layer; step: the step's peak growth; "
          f"/sft step: over its SFT step's at the same token budget (the SFT term on the rows it reads, same batch); "
          f"process: the "
          f"process's peak (weights, AdamW state, runtime, step); ckpt: with the decoder layers checkpointed; "
          f"process /no ckpt: the process peak with checkpointing over without; time /no: the step time with "
          f"checkpointing over without, paired within rounds")
    memory_table([n for n in names if not n.endswith(CKPT) and not n.endswith("/live") and n != PER_GROUP],
                 timings, rounds, memory, budgets, baselines)


if __name__ == "__main__":
    main()
