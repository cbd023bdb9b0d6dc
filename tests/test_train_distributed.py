"""`train student` on several processes (train/distributed.py): real launchers, real process groups.

Two processes on the CPU with the gloo backend, started by ``torchrun``
(``python -m torch.distributed.run``) or ``accelerate launch`` exactly as a user
starts them, on the tiny real store and student of ``tests/conftest.py``. What a
test needs to see inside the processes (the files they open for writing, the
examples they batch, a kill at a given moment) comes from a hook that a process
runs before the command (:data:`HOOK`), not from the project's code.

Every process runs with one thread (``OMP_NUM_THREADS=1``): the machine's cores
are shared.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from store import ExampleStream, TeacherStore
from train import checkpoint, distributed, methods, preflight, records
from train.batches import collate, token_budget_batches
from train.config import TrainConfig, TrainError
from train.distributed import RankStream, Shard
from train.trainer import train

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no",
              "--main_process_port", "0"]
SPLIT_SIZE = 10  # the tiny store's train split: 12 rows, the last 2 are the test split

# Run by each process before `train`'s command line (argv[1]: the run's --out, the rest: the command line).
# TRACE_DIR: at exit, write there (outside --out) rank<R>.json: every file operation of this process that writes
# under --out (an open for writing, a rename, a removal, a new folder) and the example indices of each batch the
# trainer collated. KILL_AFTER=NAME:N on rank 0: SIGKILL right after the N-th rename onto --out/NAME.
# PID_DIR: write there rank<R>.pid, this process's pid, first. STEP_SLEEP: sleep that many seconds per batch.
HOOK = textwrap.dedent("""
    import atexit, json, os, signal, sys, time

    out, rank = os.path.abspath(sys.argv[1]), int(os.environ.get("RANK", "0"))
    writes, batches = [], []
    if os.environ.get("PID_DIR"):
        with open(os.path.join(os.environ["PID_DIR"], f"rank{rank}.pid"), "w") as fh:
            fh.write(str(os.getpid()))
    WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    CHANGES = ("os.rename", "os.remove", "os.rmdir", "os.mkdir", "os.truncate", "os.link", "os.symlink",
               "shutil.rmtree", "shutil.copyfile", "shutil.move")

    def inside(path):
        if not isinstance(path, (str, bytes, os.PathLike)):
            return False  # a file descriptor, a mode, None
        path = os.path.abspath(os.fsdecode(path))
        return path == out or path.startswith(out + os.sep)

    def audit(event, args):
        if event == "open" and len(args) >= 3:
            path, mode, flags = args[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITING)
            if writing and inside(path):
                writes.append([event, os.path.abspath(os.fsdecode(path))])
        elif event in CHANGES and any(inside(a) for a in args[:2]):
            writes.append([event] + [os.path.abspath(os.fsdecode(a)) for a in args[:2]
                                     if isinstance(a, (str, bytes, os.PathLike))])

    sys.addaudithook(audit)

    import train.trainer as trainer

    collate = trainer.collate

    def collating(examples, *args, **kwargs):
        batches.append([e.example_index for e in examples])
        if os.environ.get("STEP_SLEEP"):
            time.sleep(float(os.environ["STEP_SLEEP"]))
        return collate(examples, *args, **kwargs)

    trainer.collate = collating

    if os.environ.get("KILL_AFTER") and rank == 0:
        victim, nth = os.environ["KILL_AFTER"].rsplit(":", 1)
        replace, seen = os.replace, [0]

        def replacing(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if os.path.abspath(os.fsdecode(dst)) == os.path.join(out, victim):
                seen[0] += 1
                if seen[0] == int(nth):
                    os.kill(os.getpid(), signal.SIGKILL)

        os.replace = replacing

    if os.environ.get("TRACE_DIR"):
        def dump():
            with open(os.path.join(os.environ["TRACE_DIR"], f"rank{rank}.json"), "w") as fh:
                json.dump({"writes": writes, "batches": batches}, fh)
        atexit.register(dump)

    from train.cli import main
    main(sys.argv[2:], prog_name="train")
""")


def student_args(store, out, *extra, method="dckd", **options):
    """``train student``'s command line (the arguments after ``-m train.cli``)."""
    settings = {"method": method, "lr": "1e-3", "device": "cpu", "dtype": "float32", "log-every": "1",
                **{k.replace("_", "-"): str(v) for k, v in options.items()}}
    args = ["student", "--cache", str(store), "--out", str(out), "--no-progress"]
    for key, value in settings.items():
        args += [f"--{key}", value]
    return args + list(extra)


def launch(command, *, env=None, timeout=300, expect_ok=True) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)  # the launcher sets them
    done = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    if expect_ok:
        assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-6000:])
    return done


def hooked(tmp_path, out, args, launcher=TORCHRUN, **env) -> tuple[subprocess.CompletedProcess, Path]:
    """Run ``train`` under ``launcher`` with :data:`HOOK`; the process traces' folder."""
    script, traces = tmp_path / "hook.py", tmp_path / "traces"
    script.write_text(HOOK)
    traces.mkdir(exist_ok=True)
    done = launch([*launcher, str(script), str(out), *args], env={"TRACE_DIR": str(traces), **env},
                  expect_ok="KILL_AFTER" not in env)
    return done, traces


def metrics(out):
    return records.read_metrics(Path(out) / records.METRICS_FILE)


def assert_same_weights(a_dir, b_dir, atol=1e-6):
    a, b = load_file(Path(a_dir) / "model.safetensors"), load_file(Path(b_dir) / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=atol, msg=name)


def assert_same_records(got, expected, rel=1e-6, grad_rel=1e-6):
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for mine, theirs in zip(got, expected):
        assert mine["epoch"] == theirs["epoch"]
        assert mine["lr"] == pytest.approx(theirs["lr"], rel=1e-12)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=rel), mine["step"]
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=grad_rel), mine["step"]
        for term, value in theirs["terms"].items():
            assert mine["terms"][term] == pytest.approx(value, rel=rel, abs=1e-7), (mine["step"], term)


# --------------------------------------------------------------------------- shares of the store (no processes)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_each_epoch_every_example_goes_to_exactly_one_process(tiny_store, world):
    store = TeacherStore.open(str(tiny_store))
    needs = methods.needs_of(methods.resolve_terms("dckd+adpa"))
    plain = ExampleStream(store, "train", needs, shuffle=True, seed=3)
    orders = []
    for epoch in range(3):
        shares = [[e.example_index for e in RankStream(store, "train", needs, seed=3,
                                                        shard=Shard(rank, world)).iterate(epoch)]
                  for rank in range(world)]
        everything = sorted(i for share in shares for i in share)
        assert everything == list(range(SPLIT_SIZE)), (epoch, shares)  # each once: none lost, none twice
        assert max(map(len, shares)) - min(map(len, shares)) <= 4  # at most a part apart (4 examples a part)
        if world == 1:  # one process: the one-process stream itself
            assert shares[0] == [e.example_index for e in plain.iterate(epoch)]
        again = [e.example_index for e in RankStream(store, "train", needs, seed=3,
                                                      shard=Shard(world - 1, world)).iterate(epoch)]
        assert again == shares[-1]  # fixed by the seed and the epoch
        skipped = [e.example_index for e in RankStream(store, "train", needs, seed=3,
                                                        shard=Shard(world - 1, world)).iterate(epoch, skip=2)]
        assert skipped == shares[-1][2:]  # resuming skips the share's own examples
        orders.append(shares)
    assert orders[0] != orders[1]  # reshuffled each epoch
    # pre-flight counts each share's batches as training makes them
    for epoch in range(2):
        counted = preflight.count_shares(store, "train", needs, 200, 3, epoch, world)
        made = [sum(1 for _ in token_budget_batches(RankStream(store, "train", needs, seed=3,
                                                               shard=Shard(rank, world)).iterate(epoch), 200))
                for rank in range(world)]
        assert counted == made


def test_parts_are_dealt_whole_and_the_rest_split_by_example():
    assert distributed.rank_parts([5, 2, 7, 0, 3], Shard(0, 2)) == [5, 7, 3]
    assert distributed.rank_parts([5, 2, 7, 0, 3], Shard(1, 2)) == [2, 0, 3]
    assert distributed.shared_parts([5, 2, 7, 0, 3], 2) == [3]
    assert distributed.rank_parts([5, 2, 7], Shard(2, 3)) == [7] and distributed.shared_parts([5, 2, 7], 3) == []
    assert distributed.rank_parts([4, 1], Shard(1, 3)) == [4, 1]  # fewer parts than processes: all shared
    assert distributed.rank_parts([4, 1], Shard(0, 1)) == [4, 1]


# --------------------------------------------------------------------------- each term's denominator


@pytest.fixture(scope="module")
def groups_store(tmp_path_factory, tiny_models, tiny_dataset):
    """A store with sampled groups and what PAD and its baselines read (teacher, teacher_mcq, student_init)."""
    from precompute.sample import SampleConfig, run_sample
    from precompute.teacher import TeacherConfig, run_teacher

    teacher, student = tiny_models
    out = str(tmp_path_factory.mktemp("groups") / "groups.zarr")
    common = dict(out=out, dataset=str(tiny_dataset), max_length=96, max_new_tokens=6, examples_per_part=4,
                  device="cpu", dtype="float32", progress=False)
    run_sample(SampleConfig(model=str(student), n=3, keep=3, seed=1, **common))
    run_teacher(TeacherConfig(teacher=str(teacher), student=str(student), passes=("pad", "dpo_ref"), top_k=8,
                              **common))
    return out


@pytest.fixture(scope="module")
def ranked_store(tmp_path_factory, tiny_models, tiny_dataset):
    """A store with sampled groups ranked by CycleAlign's judges (a rule-scoring HTTP judge on loopback)."""
    from precompute.rank import RankConfig, run_rank
    from precompute.sample import SampleConfig, run_sample
    from tests.judge_server import JudgeServer

    out = str(tmp_path_factory.mktemp("ranked") / "ranked.zarr")
    run_sample(SampleConfig(out=out, model=str(tiny_models[1]), dataset=str(tiny_dataset), splits=("train",), n=4,
                            keep=4, max_new_tokens=10, examples_per_part=4, device="cpu", dtype="float32",
                            progress=False))
    with JudgeServer(score=len) as server:
        run_rank(RankConfig(out=out, judge=server.base_url, judge_model="rule", judge_timeout=5.0,
                            dataset=str(tiny_dataset), splits=("train",), device="cpu", dtype="float32",
                            progress=False))
    return out


CASES = {"dckd+adpa+dpo+simpo": "tiny_store", "pad+pad_dpo+pad_simpo": "groups_store", "cyclealign+pro": "ranked_store"}


def test_every_term_of_every_method_has_a_denominator():
    every = [t for terms in methods.METHODS.values() for t in terms]
    names = {t.name for t in every}
    assert all(isinstance(t.unit, methods.Unit) and callable(t.unit.count) for t in every)  # what it is a mean over
    assert names == {t.name for method in CASES for t in methods.resolve_terms(method)}  # and a case here


@pytest.mark.parametrize("method", list(CASES))
def test_each_terms_denominator_makes_the_halves_the_whole(method, request, tiny_models):
    """The exactness of several processes rests on each term's unit (Term.unit): term(whole) = sum over parts of
    share * term(part), with uneven parts; checked on every term of METHODS, in float64."""
    from lm import models

    store_path = request.getfixturevalue(CASES[method])
    terms = methods.resolve_terms(method)
    examples = list(ExampleStream(TeacherStore.open(str(store_path)), "train", methods.needs_of(terms),
                                  shuffle=False))[:5]
    model = models.load_model(str(tiny_models[1]), device="cpu")[0].double()
    settings = methods.Settings()
    with torch.no_grad():
        whole = methods.method_loss(model, collate(examples), terms, settings)[1]
        pieces = [collate(examples[:1]), collate(examples[1:])]  # 1 example and 4: very uneven units
        counts = [distributed.term_counts(piece, terms) for piece in pieces]
        totals = [sum(column) for column in zip(*counts)]
        assert totals == distributed.term_counts(collate(examples), terms)
        assert all(total > 0 for total in totals)
        rebuilt = {t.name: 0.0 for t in terms}
        for piece, count in zip(pieces, counts):
            parts = methods.method_loss(model, piece, terms, settings)[1]
            for term, share in zip(terms, distributed.shares(count, totals)):
                rebuilt[term.name] += share * float(parts[term.name])
        naive = {t.name: sum(float(methods.method_loss(model, p, terms, settings)[1][t.name]) for p in pieces) / 2
                 for t in terms}
    for term in terms:
        assert rebuilt[term.name] == pytest.approx(float(whole[term.name]), rel=1e-10, abs=1e-12), term.name
    assert any(abs(naive[t.name] - float(whole[t.name])) > 1e-3 for t in terms)  # a plain average would be wrong


# --------------------------------------------------------------------------- the step on two processes


STEP_WORKER = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lm import models
    from store import ExampleStream, TeacherStore
    from train import distributed, methods, records
    from train.batches import collate

    student, result, cases = sys.argv[1], sys.argv[2], sys.argv[3:]  # cases: METHOD STORE ...
    settings = methods.Settings()
    found = {}
    with distributed.setup("cpu") as context:
        for method, store_path in zip(cases[0::2], cases[1::2]):
            terms = methods.resolve_terms(method)
            needs = methods.needs_of(terms)
            store = TeacherStore.open(store_path)
            ex = list(ExampleStream(store, "train", needs, shuffle=False))[:4]
            # one optimizer step of two batches: rank 0 has examples [0, 1], then [2]; rank 1 has [3], then
            # nothing (a zero-weight batch). The step's batches are {0, 1, 3} and {2}.
            mine = {0: [ex[0:2], ex[2:3]], 1: [ex[3:4], None]}[context.shard.rank]
            for parallel in ("ddp", "fsdp"):
                ctx = distributed.Context(shard=context.shard, device="cpu",
                                          launch=distributed.LaunchSettings(fsdp=parallel == "fsdp"))
                model = models.load_model(student, device="cpu")[0].train()
                parallel_student = distributed.ParallelStudent(ctx, model, terms, settings, 7,
                                                               distributed.filler_source(store, "train", needs, 0))
                meter = records.Meter([t.name for t in terms], reduce=ctx.sum)
                for i, examples in enumerate(mine):  # the trainer's batch of a step of 2
                    batch = collate(examples) if examples else None
                    with parallel_student.accumulating(sync=i == 1):
                        loss, parts = parallel_student.loss(batch)
                        parallel_student.backward(loss / 2)
                    meter.add_batch(loss, parts, int(batch.attention_mask.sum()) if batch else 0, 1 / 2)
                meter.steps = 1
                record = meter.record(step=1)
                norm = parallel_student.clip(1e9)
                grads = {}
                for name, p in model.named_parameters():
                    g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                    grads[name] = g.double()
                found[(method, parallel)] = (grads, record, norm)
            if context.shard.rank == 0:  # the one-process step on the same batches, loss / 2 each
                model = models.load_model(student, device="cpu")[0].train()
                loss_sum, parts_sum = 0.0, {t.name: 0.0 for t in terms}
                for batch in (collate(ex[0:2] + ex[3:4]), collate(ex[2:3])):
                    loss, parts = methods.method_loss(model, batch, terms, settings, 7)
                    (loss / 2).backward()
                    loss_sum += float(loss.detach()) / 2
                    for name in parts_sum:
                        parts_sum[name] += float(parts[name].detach()) / 2
                found[(method, "one process")] = ({n: p.grad.double() for n, p in model.named_parameters()},
                                                  {"loss": loss_sum, "terms": parts_sum}, None)
    if context.shard.rank == 0:
        out = {}
        for (method, parallel), (grads, record, norm) in found.items():
            expected = found[(method, "one process")][0]
            out.setdefault(method, {})[parallel] = {
                "worst": max(float((grads[n] - expected[n]).norm() / expected[n].norm()) for n in expected),
                "loss": record["loss"], "terms": record["terms"],
                "norm": norm if norm is not None else float(torch.sqrt(sum(g.pow(2).sum() for g in grads.values())))}
        with open(result, "w") as fh:
            json.dump(out, fh)
""")


def test_two_processes_with_uneven_batches_and_a_zero_weight_one_give_the_one_process_gradient(
        request, tiny_models, tmp_path):
    """One optimizer step of two batches: process 0 holds examples [0, 1] then [2], process 1 holds [3] then
    nothing. Under DDP and under FSDP, the gradient is the one-process gradient of batches {0, 1, 3} then {2}
    (loss / 2 each), to float tolerance, and the logged loss and terms are the one-process values; for the
    token and pair terms, the group terms and CycleAlign's."""
    script, result = tmp_path / "step.py", tmp_path / "result.json"
    script.write_text(STEP_WORKER)
    cases = [str(x) for method, store in CASES.items() for x in (method, request.getfixturevalue(store))]
    launch([*TORCHRUN, str(script), str(tiny_models[1]), str(result), *cases])
    found = json.loads(result.read_text())
    assert set(found) == set(CASES)
    for method, runs in found.items():
        expected = runs.pop("one process")
        assert set(runs) == {"ddp", "fsdp"}
        for parallel, got in runs.items():
            assert got["worst"] < 1e-5, (method, parallel)  # every parameter's gradient, relative (float32 sums)
            assert got["loss"] == pytest.approx(expected["loss"], rel=1e-6), (method, parallel)
            for term, value in expected["terms"].items():
                assert got["terms"][term] == pytest.approx(value, rel=1e-5, abs=1e-7), (method, parallel, term)
            assert got["norm"] == pytest.approx(expected["norm"], rel=1e-4), (method, parallel)


# --------------------------------------------------------------------------- whole runs


WHOLE = dict(batch_tokens=100_000, max_steps=2)  # the split in one batch: each process's half of it


@pytest.fixture(scope="module")
def one_process(tiny_store, tmp_path_factory):
    """The one-process run the two-process runs must equal: each step's batch is the whole split."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(TrainConfig(cache=str(tiny_store), out=str(out), method="dckd+adpa+dpo+simpo", lr=1e-3, device="cpu",
                      dtype="float32", log_every=1, progress=False, **WHOLE))
    return out


def test_one_step_on_two_processes_each_with_half_the_batch_equals_one_process_with_all(
        tiny_store, one_process, tmp_path):
    store = TeacherStore.open(str(tiny_store))
    needs = methods.needs_of(methods.resolve_terms("dckd+adpa+dpo+simpo"))
    halves = [[e for e in RankStream(store, "train", needs, shard=Shard(rank, 2)).iterate(0)] for rank in range(2)]
    tokens = [sum(e.num_response_tokens for e in half) for half in halves]
    assert sorted(e.example_index for half in halves for e in half) == list(range(SPLIT_SIZE))
    assert tokens[0] != tokens[1]  # the halves weigh differently: a plain average of their means would be off

    out = tmp_path / "two"
    done = launch([*TORCHRUN, "-m", "train.cli", *student_args(tiny_store, out, method="dckd+adpa+dpo+simpo",
                                                               **WHOLE)])
    assert done.stdout.count("trained dckd+adpa+dpo+simpo") == 1  # rank 0 only
    assert_same_weights(one_process, out)
    assert_same_records(metrics(out), metrics(one_process), rel=1e-6, grad_rel=1e-6)
    resolved = yaml.safe_load((out / "config.yaml").read_text())["resolved"]
    assert resolved["processes"]["world_size"] == 2 and resolved["processes"]["parallel"] == "ddp"
    assert resolved["processes"]["batches_per_rank"] == [[1, 1], [1, 1]]
    assert resolved["processes"]["step_tokens"] == 2 * WHOLE["batch_tokens"]


def test_fsdp_from_an_accelerate_config_equals_one_process(tiny_store, tiny_models, one_process, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    launch([*ACCELERATE, "--config_file", str(REPO / "configs" / "accelerate_fsdp.yaml"), "-m", "train.cli",
            *student_args(tiny_store, out, method="dckd+adpa+dpo+simpo", **WHOLE)])
    assert yaml.safe_load((out / "config.yaml").read_text())["resolved"]["processes"]["parallel"] == "fsdp"
    assert_same_weights(one_process, out)  # gathered from the shards, tied copy left out as one process does
    # the gradient norm is computed over the shards: float32 sums in another order
    assert_same_records(metrics(out), metrics(one_process), rel=1e-6, grad_rel=1e-4)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.architectures == ["LlamaForCausalLM"]
    state = checkpoint.read_state(checkpoint.state_path(out))
    assert state["processes"]["world_size"] == 2 and len(state["optimizer"]["state"]) > 0


def test_fsdp_with_gradient_checkpointing_equals_one_process_without(tiny_store, one_process, tmp_path):
    """FSDP2 over decoder layers that recompute their activations in backward (the checkpoint inside each unit's
    gather hooks): the weights and records of the one-process run without checkpointing."""
    out = tmp_path / "fsdp-checkpointed"
    launch([*TORCHRUN, "-m", "train.cli", *student_args(tiny_store, out, "--fsdp", "--gradient-checkpointing",
                                                        method="dckd+adpa+dpo+simpo", **WHOLE)])
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["gradient_checkpointing"] is True and config["resolved"]["processes"]["parallel"] == "fsdp"
    assert_same_weights(one_process, out)
    assert_same_records(metrics(out), metrics(one_process), rel=1e-6, grad_rel=1e-4)


UNEVEN = dict(batch_tokens=200, grad_accum=2, max_steps=6, save_every=2)  # shares of 3 and 5 batches per epoch


@pytest.fixture(scope="module")
def straight_two(tiny_store, tmp_path_factory):
    """An uninterrupted two-process run, started by `accelerate launch` with the repository's DDP config."""
    out = tmp_path_factory.mktemp("straight-two") / "run"
    launch([*ACCELERATE, "--config_file", str(REPO / "configs" / "accelerate_ddp.yaml"), "-m", "train.cli",
            *student_args(tiny_store, out, **UNEVEN)])
    return out


def test_a_two_process_run_killed_and_resumed_ends_as_the_uninterrupted_one(tiny_store, straight_two, tmp_path):
    per_rank = yaml.safe_load((straight_two / "config.yaml").read_text())["resolved"]["processes"]["batches_per_rank"]
    assert any(len(set(epoch)) > 1 for epoch in per_rank)  # uneven shares: zero-weight batches in the run

    out = tmp_path / "run"
    killed, _ = hooked(tmp_path, out, student_args(tiny_store, out, **UNEVEN), KILL_AFTER="checkpoint/state.pt:1")
    assert killed.returncode != 0
    assert checkpoint.has_checkpoint(out) and not (out / "model.safetensors").exists()
    state = checkpoint.read_state(checkpoint.state_path(out))
    assert state["position"]["step"] == 2 and state["processes"]["world_size"] == 2
    # step 2 is 4 batches per process: process 0's share of epoch 0 (3 batches) is done, with a zero-weight
    # batch after it; process 1 (5 batches) is inside its share
    assert per_rank[0] == [3, 5]
    store = TeacherStore.open(str(tiny_store))
    needs = methods.needs_of(methods.resolve_terms("dckd"))
    shares = [len(list(RankStream(store, "train", needs, shard=Shard(rank, 2)).iterate(0))) for rank in range(2)]
    examples = state["processes"]["examples"]
    assert examples[0] == shares[0] and 0 < examples[1] < shares[1]
    refused = launch([*TORCHRUN, "-m", "train.cli", *student_args(tiny_store, out, **UNEVEN)], expect_ok=False)
    assert refused.returncode != 0 and refused.stderr.count("pass --resume") == 1  # one process says it

    launch([*TORCHRUN, "-m", "train.cli", *student_args(tiny_store, out, "--resume", **UNEVEN)])
    assert_same_weights(straight_two, out)
    assert_same_records(metrics(out), metrics(straight_two), rel=1e-5, grad_rel=1e-5)
    assert [r["step"] for r in metrics(out)] == list(range(1, 7))

    with pytest.raises(TrainError, match="made by 2 process"):  # one process cannot take it up
        train(TrainConfig(cache=str(tiny_store), out=str(out), method="dckd", lr=1e-3, device="cpu",
                          dtype="float32", progress=False, resume=True, **UNEVEN))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead but not yet reaped by whoever adopted it, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="processes die with the launcher on Linux")
def test_killing_the_launchers_process_group_ends_every_process_and_the_folder_has_one_writer(tiny_store, tmp_path):
    """torchrun starts each process in a session of its own: SIGKILL to the launcher's process group must still end
    them (before, both trained on and wrote the model). While the run lives, a second `train student` on its --out
    is refused naming rank 0; once it is killed, --resume takes the folder (the dead run's lock held nothing)."""
    import signal
    import time

    from click.testing import CliRunner

    from train.cli import main
    from tests.refusals import one_line

    out, pids = tmp_path / "run", tmp_path / "pids"
    pids.mkdir()
    script = tmp_path / "hook.py"
    script.write_text(HOOK)
    options = dict(max_steps=30, save_every=2, batch_tokens=200)
    environment = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PID_DIR": str(pids),
                   "STEP_SLEEP": "0.5"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environment.pop(name, None)
    log = tmp_path / "launcher.log"  # not a pipe: the processes hold its end as long as they live
    with open(log, "w") as output:
        launcher = subprocess.Popen([*TORCHRUN, str(script), str(out), *student_args(tiny_store, out, **options)],
                                    cwd=REPO, env=environment, start_new_session=True, stdout=output,
                                    stderr=subprocess.STDOUT)
    ranks = []
    try:
        deadline = time.monotonic() + 300
        while len(metrics(out)) < 3:  # step 2's checkpoint written
            assert launcher.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run made no 3 steps in 300 s"
            time.sleep(0.2)
        ranks = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
        assert os.getpgid(ranks[0]) != launcher.pid  # each in a session of its own: the group's kill misses them

        refused = one_line(CliRunner().invoke(main, student_args(tiny_store, out, "--resume", **options)))
        assert f"--out {out} is being written by another run (pid {ranks[0]} on host " in refused, refused

        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 8  # the run has 27 steps of at least 0.5 s to go: more than that
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "a process outlived its launcher"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        for pid in ranks:  # a test that failed leaves no process behind
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    logged = len(metrics(out))
    time.sleep(2)
    assert len(metrics(out)) == logged and not (out / "model.safetensors").exists()  # nobody trains on

    launch([*TORCHRUN, "-m", "train.cli", *student_args(tiny_store, out, "--resume", **options)])
    assert [r["step"] for r in metrics(out)] == list(range(1, 31))
    assert (out / "model.safetensors").is_file() and not (out / "run.lock").exists()


def test_only_rank_0_writes_and_every_example_of_the_epoch_is_batched_once(tiny_store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    options = dict(batch_tokens=200, grad_accum=2, epochs=1)
    done, traces = hooked(tmp_path, out, student_args(tiny_store, out, "--report-to", "tensorboard", **options))
    assert done.stdout.count("trained dckd") == 1
    rank0, rank1 = (json.loads((traces / f"rank{r}.json").read_text()) for r in (0, 1))

    assert rank1["writes"] == []  # process 1 never opened, renamed, removed or made anything under --out
    written = {Path(op[-1]).relative_to(out).as_posix() for op in rank0["writes"] if op[0] in ("open", "os.rename")}
    for name in ("config.yaml", "metrics.jsonl", "loss_curves.png", "model.safetensors", "checkpoint/state.pt",
                 "checkpoint/config.json"):
        assert name in written, name
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in written)

    shares = [[i for batch in trace["batches"] for i in batch] for trace in (rank0, rank1)]
    assert sorted(shares[0] + shares[1]) == list(range(SPLIT_SIZE))  # each example once, by one process
    per_rank = yaml.safe_load((out / "config.yaml").read_text())["resolved"]["processes"]["batches_per_rank"]
    assert [len(rank0["batches"]), len(rank1["batches"])] == per_rank[0]
    steps = math.ceil(max(per_rank[0]) / 2)
    records_ = metrics(out)
    assert [r["step"] for r in records_] == list(range(1, steps + 1))

    events = EventAccumulator(str(out / records.TENSORBOARD_DIR))
    events.Reload()
    for name, value in records.record_scalars(records_[0]).items():
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [r["step"] for r in records_], name
        assert logged[0].value == pytest.approx(value, rel=1e-6), name
    assert set(events.Tags()["scalars"]) == set(records.record_scalars(records_[0]))


# --------------------------------------------------------------------------- what the launcher's environment says


def test_launcher_settings_from_the_environment(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert distributed.launch_settings().fsdp is False
    assert distributed.launch_settings(fsdp_flag=True).fsdp is True
    for name in [k for k in os.environ if k.startswith("FSDP_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert distributed.launch_settings().reshard_after_forward is True  # FULL_SHARD unless said otherwise
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")  # an FSDP1 config
    monkeypatch.setenv("FSDP_ACTIVATION_CHECKPOINTING", "true")
    settings = distributed.launch_settings()
    assert settings.fsdp and settings.reshard_after_forward is False
    assert any("FSDP_ACTIVATION_CHECKPOINTING" in note for note in settings.notes)
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")  # an FSDP2 config's setting wins
    assert distributed.launch_settings().reshard_after_forward is True
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "NO_SHARD")
    assert distributed.launch_settings().fsdp is False  # no sharding is DDP
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    monkeypatch.setenv("FSDP_TRANSFORMER_CLS_TO_WRAP", "LlamaDecoderLayer, Other")
    assert distributed.launch_settings().layer_classes == ("LlamaDecoderLayer", "Other")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    assert distributed.launch_settings().dtype == "bfloat16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(TrainError, match="fp16"):
        distributed.launch_settings()
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(TrainError, match="DeepSpeed"):
        distributed.launch_settings()

    two = Shard(1, 2)
    assert distributed.process_device("cpu", two, 1) == "cpu"
    assert distributed.process_device("cuda", two, 1) == "cuda:1"
    with pytest.raises(TrainError, match="cuda:LOCAL_RANK"):
        distributed.process_device("cuda:0", two, 1)
    assert distributed.process_device("cuda:3", Shard(), 0) == "cuda:3"  # one process: as given


def test_one_process_writes_tensorboard_and_a_resume_drops_the_events_after_its_checkpoint(tiny_store, tmp_path):
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    config = dict(cache=str(tiny_store), out=str(run), method="sft", lr=1e-3, batch_tokens=300, max_steps=4,
                  device="cpu", dtype="float32", log_every=1, progress=False, report_to="tensorboard")
    train(TrainConfig(**config), stop_after=2)
    shutil.copytree(run / checkpoint.CHECKPOINT_DIR, tmp_path / "at-step-2")
    train(TrainConfig(**config, resume=True), stop_after=1)  # step 3 logged, with its events
    shutil.rmtree(run / checkpoint.CHECKPOINT_DIR)  # what a kill after step 3's record and before its checkpoint
    shutil.copytree(tmp_path / "at-step-2", run / checkpoint.CHECKPOINT_DIR)  # leaves: records after the checkpoint
    resumed = train(TrainConfig(**config, resume=True))

    events = EventAccumulator(str(resumed / records.TENSORBOARD_DIR))
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2, 3, 4]  # step 3 once: the events after the checkpoint were dropped
    assert [e.value for e in logged] == pytest.approx([r["loss"] for r in metrics(resumed)], rel=1e-6)
    assert [e.value for e in events.Scalars("train/terms/sft")] == pytest.approx(
        [r["terms"]["sft"] for r in metrics(resumed)], rel=1e-6)
