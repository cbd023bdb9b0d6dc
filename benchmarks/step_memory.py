"""Where a training step's memory goes: a profile of one step, and the resident set over a whole run.

``--profile`` (default): one step of each configuration (a method's step from the
store and its own SFT step at the same token budget, :func:`train_step.sft_on_rows_of`;
without and with checkpointed decoder layers) under ``torch.profiler`` with
``profile_memory``. From the profiler's memory timeline (every allocation and free
of the step, each tensor given a category by torch: parameter, gradient, activation,
autograd detail, temporary, input), the tensors alive at the step's peak are summed
by category and by the phase that made them: before the step (the weights), the
decoder's forward, the rest of the forward (output layer in checkpointed chunks, the
terms), the backward. AdamW's state is made beforehand (one update from zero
gradients) and does not move during forward and backward: it is printed beside, from
its tensors' sizes, as are the batch's arrays (token ids, the teacher's top-K
signals). The profiler counts what torch allocates, not the resident set; the RSS
columns of ``benchmarks/train_step.py`` count that.

``--run N``: ``train student`` for N optimizer steps on the store, each allocator
setting in a fresh process of its own; after every optimizer step the resident set's
high-water mark since the previous one (Linux ``VmHWM``, reset by writing 5 to
``/proc/self/clear_refs``) and the resident set after the step (``VmRSS``, after the release). Settings: ``default`` (glibc's
malloc as a process gets it, and the trainer's own release of freed memory after each
step, :func:`train.trainer.release_freed_memory`), ``no-release`` (the trainer without
that release: what it did before), ``mmap`` (``MALLOC_MMAP_THRESHOLD_=65536``: every
allocation of 64 KiB or more its own mapping, returned to the system when freed) and
``arenas`` (``MALLOC_ARENA_MAX=2``). A growth of the step peaks over the run that the
step's own tensors do not explain is the allocator's.

Usage: ``python benchmarks/step_memory.py [--cache STORE] [--examples 8 | --batch-tokens N]
[--methods sft,dckd+adpa] [--run N [--settings default,no-release,mmap]]``; without
``--cache``, the benchmark store of ``benchmarks/train_step.py`` (built from the demo data).
On 2 CPU cores a profiled step of 8 examples (about 2000 padded tokens) takes about
2 minutes; ``--run`` takes the trainer's time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step  # noqa: E402
from lm import head, models  # noqa: E402
from train import methods  # noqa: E402

#: the phases a tensor alive at the peak was made in
BEFORE, DECODER, REST, BACKWARD = "before the step", "decoder forward", "output layer + terms", "backward"
SETTINGS = {"default": {}, "no-release": {}, "mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"},
            "arenas": {"MALLOC_ARENA_MAX": "2"}}
MiB = 2 ** 20


# --------------------------------------------------------------------------- one step, profiled


def phase_marks(model):
    """Mark the decoder's forward as a profiler range (hooks on the decoder of :func:`lm.head.split_model`)."""
    from torch.autograd.profiler import record_function

    decoder, _ = head.split_model(model)
    open_ranges = []
    decoder.register_forward_pre_hook(lambda *args: open_ranges.append(record_function("phase:" + DECODER)
                                                                       .__enter__()))
    decoder.register_forward_hook(lambda *args: open_ranges.pop().__exit__(None, None, None))


def alive_at_peak(prof) -> tuple[int, str, dict[tuple[str, str], int]]:
    """(peak bytes, the phase of the peak, {(category, phase made in): bytes alive at the peak}) on the CPU."""
    from torch.profiler._memory_profiler import Action, TensorKey

    memory = prof._memory_profile()
    ranges = []

    def walk(event):
        if event.name.startswith("phase:"):
            ranges.append((event.name[len("phase:"):], event.start_time_ns, event.end_time_ns))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)

    def phase(t):
        inside = [name for name, start, end in ranges if start <= t <= end]
        if DECODER in inside:
            return DECODER
        if BACKWARD in inside:
            return BACKWARD
        return REST if "forward" in inside else BEFORE

    def category(key, version):
        found = memory._categories.get(key, version) if isinstance(key, TensorKey) else None
        return found.name.lower().replace("_", " ") if found is not None else "unknown"

    live, total, peak = {}, 0, (0, BEFORE, {})
    for t, action, (key, version), size in memory.timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live[(key, version)] = (size, BEFORE if t == -1 else phase(t))
            total += size
        elif action == Action.INCREMENT_VERSION:
            if (key, version) in live:
                live[(key, version + 1)] = live.pop((key, version))
        elif action == Action.DESTROY:
            live.pop((key, version), None)
            total -= size
        if total > peak[0]:
            by = collections.Counter()
            for (k, v), (nbytes, made) in live.items():
                by[(category(k, v), made)] += nbytes
            peak = (total, BEFORE if t == -1 else phase(t), dict(by))
    return peak


def profile_step(model, optimizer, batch, terms, settings) -> tuple[int, str, dict]:
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        with record_function("phase:forward"):
            loss = methods.method_loss(model, batch, terms, settings)[0]
        with record_function("phase:" + BACKWARD):
            loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return alive_at_peak(prof)


def profile_configurations(args) -> None:
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    batch = train_step.first_batch(args.cache, args.examples, "cpu", batch_tokens=args.batch_tokens)
    student = models.load_model(models.EMBEDDED_STUDENT, device="cpu", dtype="float32",
                                default=models.EMBEDDED_STUDENT)[0].train()
    switch = train_step.checkpointing_switch(student)
    phase_marks(student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-7)
    train_step.prime_optimizer(student, optimizer)
    adamw = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                if torch.is_tensor(t))
    settings = methods.Settings()
    arrays = {name: value.numel() * value.element_size() for name, value in batch.response.items()}
    print(f"batch: {len(batch.examples)} example(s), {batch.num_sequences} sequences, {int(batch.input_ids.numel())} "
          f"padded tokens, {batch.num_response_tokens} response rows; its arrays {sum(arrays.values()) / MiB:.2f} MiB "
          f"(token ids {batch.input_ids.numel() * batch.input_ids.element_size() / MiB:.2f} MiB; teacher signals: "
          + ", ".join(f"{name} {size / MiB:.2f}" for name, size in arrays.items()) + ")")
    print(f"AdamW state (made before the step, unchanged by forward and backward, not in the profile): "
          f"{adamw / MiB:.0f} MiB")
    configurations = {}
    for method in args.methods:
        terms = methods.resolve_terms(method)
        base, same_rows = train_step.sft_on_rows_of(terms)
        configurations.setdefault(base, same_rows)
        configurations[method] = terms
    for name, terms in configurations.items():
        tokens, rows = train_step.step_budget(batch, terms)
        for checkpointed in (False, True):
            switch(checkpointed)
            started = time.perf_counter()
            peak, when, by = profile_step(student, optimizer, batch, terms, settings)
            switch(False)
            print(f"\n{name}{train_step.CKPT if checkpointed else ''}: decoder over {tokens} tokens, output layer on "
                  f"{rows} rows; peak {peak / MiB:.0f} MiB of tensors, in the {when} ({time.perf_counter() - started:.0f}"
                  f" s profiled)")
            for (what, made), size in sorted(by.items(), key=lambda item: -item[1]):
                if size >= MiB:
                    print(f"  {what:<16} made in the {made:<22} {size / MiB:8.1f} MiB")


# --------------------------------------------------------------------------- a whole run

RUN_CHILD = """
import json, os, sys
import torch
setting, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def status(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

from train import trainer
release = trainer.release_freed_memory if setting != "no-release" else (lambda: None)
peaks, after = [], []

def release_and_mark():
    release()
    after.append(status("VmRSS"))  # what stays resident between steps

trainer.release_freed_memory = release_and_mark
zero_grad = torch.optim.Optimizer.zero_grad

def zero_grad_and_mark(self, set_to_none=True):
    zero_grad(self, set_to_none)  # the trainer releases freed memory right after this
    peaks.append(status("VmHWM"))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")

torch.optim.Optimizer.zero_grad = zero_grad_and_mark
trainer.train(trainer.TrainConfig(out=out, progress=False, **options))
print(json.dumps({"step_peaks": peaks, "after": after}))
"""


def run_settings(args) -> None:
    import tempfile

    options = {"cache": args.cache, "method": args.methods[-1], "max_steps": args.run, "device": "cpu",
               "dtype": "float32", "log_every": args.run}
    if args.batch_tokens:
        options["batch_tokens"] = args.batch_tokens
    print(f"train student for {args.run} steps: {json.dumps(options)}; per optimizer step, the resident set's "
          f"high-water mark since the previous step (MiB)")
    for setting in args.settings:
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "PYTHONPATH": str(ROOT), **SETTINGS[setting]}
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", RUN_CHILD, setting, str(Path(tmp) / "run"),
                                   json.dumps(options)], env=env, check=True, stdout=subprocess.PIPE, text=True)
            got = json.loads(done.stdout.strip().splitlines()[-1])
        peaks, after = got["step_peaks"], got["after"]
        print(f"{setting:<11} peak max {max(peaks) / MiB:6.0f}  first {peaks[0] / MiB:6.0f}  last {peaks[-1] / MiB:6.0f}"
              f"  per step: {' '.join(f'{p / MiB:.0f}' for p in peaks)}; resident after each step: "
              f"{' '.join(f'{a / MiB:.0f}' for a in after)}  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", help="store (default: the benchmark store of train_step.py)")
    parser.add_argument("--methods", default="sft,dckd+adpa", help="--run trains the last one")
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="--profile: the first batch of this budget instead of --examples; --run: the run's")
    parser.add_argument("--run", type=int, default=0, help="train this many steps per allocator setting instead")
    parser.add_argument("--settings", default="default,no-release,mmap",
                        help=f"--run's allocator settings, of {', '.join(SETTINGS)}")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown {', '.join(unknown)}; known: {', '.join(SETTINGS)}")
    args.cache = train_step.bench_store(args.cache)
    if args.run:
        run_settings(args)
    else:
        profile_configurations(args)


if __name__ == "__main__":
    main()
