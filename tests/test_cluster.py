"""precompute on a dask cluster (``--cluster``): the same store as one process, each part computed once.

Real components throughout: a ``distributed.LocalCluster`` of 2 worker processes
(one thread each), the tiny random Llamas of ``tests/tiny.py``, real stores on
disk. Stores are compared by every section's completeness and checksums
(``_manifest_without_times``), the way tests/test_precompute.py compares a
resumed run with an uninterrupted one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster

from precompute import cluster as cl
from precompute.cli import main as precompute_cli
from precompute.sample import SampleConfig, run_sample
from precompute.teacher import STEPS, TeacherConfig, run_teacher
from store import TeacherStore
from store.format import SectionRef
from store.teacher_store import STAGING_SUFFIX
from tests import store_helpers

REPO = Path(__file__).resolve().parents[1]
TEACHER_STEPS = ("pairs/student_init", "generated/base", "pairs/teacher", "generated/teacher", "generated/reference")
PARTS = [("train", 0), ("train", 1), ("train", 2), ("test", 0)]  # 10 + 2 rows of tiny_dataset, 4 per part


def _manifest_without_times(path) -> dict:
    """path -> (complete, checksums) of every section present: what a run wrote, timestamps aside."""
    return {p: (a.get("complete"), a.get("checksums"))
            for p, a in store_helpers.section_attrs(TeacherStore.open(str(path))).items()}


def _teacher_config(tiny_models, tiny_dataset, out, **extra) -> TeacherConfig:
    """The settings of the ``tiny_store`` fixture (conftest.py), with ``extra``."""
    teacher, student = tiny_models
    return TeacherConfig(out=str(out), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset),
                         top_k=8, max_length=96, max_new_tokens=12, examples_per_part=4, device="cpu",
                         dtype="float32", progress=False, **extra)


def _local_cluster(workers: int = 2, threads: int = 1, processes: bool = True) -> LocalCluster:
    return LocalCluster(n_workers=workers, threads_per_worker=threads, processes=processes, memory_limit=0,
                        dashboard_address=":0")


@pytest.fixture(scope="module")
def dask_cluster():
    """Two worker processes, one thread each, reached by their scheduler's address (workers started apart)."""
    cluster = _local_cluster()
    client = Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


def _worker_logs(client) -> dict[str, dict]:
    return client.run(cl.worker_log)


def _section_path(outcome: dict) -> str:
    step = STEPS[outcome["step"]]
    return SectionRef(outcome["split"], outcome["part"], step.sequence_set, step.section).path


def _model_of(step: str, tiny_models) -> Path:
    teacher, student = tiny_models
    return Path(teacher if STEPS[step].model_role == "teacher" else student).resolve()  # reference: the student


# --------------------------------------------------------------------------- no cluster needed


def test_cluster_specs_are_parsed_or_refused_naming_the_forms():
    assert cl.parse_spec("local:2") == cl.ClusterSpec("local:2", "local", workers=2)
    assert cl.parse_spec("cuda").kind == "cuda"
    assert cl.parse_spec("tcp://10.0.0.5:8786") == cl.ClusterSpec("tcp://10.0.0.5:8786", "address",
                                                                  address="tcp://10.0.0.5:8786")
    for bad in ("local:0", "local:", "local:two", "gpu", "tcp://host", "http://host:8786", ""):
        with pytest.raises(ValueError) as err:
            cl.parse_spec(bad)
        assert "--cluster" in str(err.value)


def test_gpus_are_shared_out_between_workers_of_one_machine():
    assert cl.gpus_of_worker(None, None, 4) == [0, 1, 2, 3]  # a worker started by hand: all it sees
    assert [cl.gpus_of_worker(i, 4, 4) for i in range(4)] == [[0], [1], [2], [3]]
    assert [cl.gpus_of_worker(i, 2, 8) for i in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # 2 sharded teachers
    assert [cl.gpus_of_worker(i, 3, 2) for i in range(3)] == [[0], [1], [0]]
    assert cl.gpus_of_worker(1, 2, 0) == []


def test_one_device_kind_and_dtype_for_the_whole_cluster():
    gpu = {"gpus": 1, "bf16": True}
    old_gpu = {"gpus": 2, "bf16": False}
    cpu = {"gpus": 0, "bf16": False}
    assert cl.choose_device({"a": gpu, "b": gpu}, "auto", "auto") == ("cuda", "bfloat16")
    assert cl.choose_device({"a": gpu, "b": old_gpu}, "auto", "auto") == ("cuda", "float32")
    assert cl.choose_device({"a": cpu, "b": cpu}, "auto", "auto") == ("cpu", "float32")
    assert cl.choose_device({"a": gpu, "b": cpu}, "cpu", "bf16") == ("cpu", "bfloat16")
    with pytest.raises(ValueError, match="b have none"):
        cl.choose_device({"a": gpu, "b": cpu}, "auto", "auto")
    with pytest.raises(ValueError, match="no GPU"):
        cl.choose_device({"a": cpu}, "cuda", "auto")
    with pytest.raises(ValueError, match="its own GPU"):
        cl.choose_device({"a": gpu}, "cuda:1", "auto")


def test_cluster_and_device_map_are_options_of_the_commands():
    runner = CliRunner()
    teacher = runner.invoke(precompute_cli, ["teacher", "--help"]).output
    sample = runner.invoke(precompute_cli, ["sample", "--help"]).output
    assert "--cluster" in teacher and "tcp://HOST:PORT" in teacher and "--device-map" in teacher
    assert "--cluster" in sample


def test_device_map_gives_the_numbers_of_a_plain_load(tmp_path, tiny_models, tiny_dataset, tiny_store):
    out = tmp_path / "sharded.zarr"
    run_teacher(_teacher_config(tiny_models, tiny_dataset, out, passes=("pairs",), device_map="auto"))
    sharded, reference = _manifest_without_times(out), _manifest_without_times(tiny_store)
    assert "train/part-00000/pairs/teacher" in sharded
    assert {p: v for p, v in reference.items() if p.endswith(("/pairs", "/pairs/teacher"))} == sharded


def test_workers_with_several_threads_are_refused_before_the_store_is_touched(tmp_path, tiny_models,
                                                                              tiny_dataset):
    cluster = _local_cluster(workers=1, threads=2, processes=False)
    try:
        out = tmp_path / "never.zarr"
        with pytest.raises(cl.ClusterError, match="--nthreads 1"):
            run_teacher(_teacher_config(tiny_models, tiny_dataset, out, cluster=cluster.scheduler_address))
        assert not out.exists()
    finally:
        cluster.close()


# --------------------------------------------------------------------------- on a cluster


def test_cluster_store_equals_one_process_store_each_part_computed_once(tmp_path, tiny_models, tiny_dataset,
                                                                         tiny_store, dask_cluster):
    cluster, client = dask_cluster
    out = tmp_path / "cluster.zarr"
    summary = run_teacher(_teacher_config(tiny_models, tiny_dataset, out, cluster=cluster.scheduler_address))

    assert _manifest_without_times(out) == _manifest_without_times(tiny_store)
    assert [(s["step"], s["parts_done"], s["parts_skipped"]) for s in summary.steps] == \
        [(step, len(PARTS), 0) for step in TEACHER_STEPS]
    assert TeacherStore.open(str(out)).verify() == []

    logs = _worker_logs(client)
    ran = [o for log in logs.values() for o in log["ran"] if o["step"] in TEACHER_STEPS]
    computed = Counter((o["step"], o["split"], o["part"]) for o in ran if o["computed"])
    assert computed == Counter({(step, split, part): 1 for step in TEACHER_STEPS for split, part in PARTS})
    assert all(o["written"] for o in ran)
    assert all(any(o["computed"] for o in log["ran"]) for log in logs.values()), "one worker did nothing"
    for log in logs.values():  # a model is loaded when a unit needs another one than the last, never per unit
        units = sorted((o for o in ran if o["worker"].endswith(f":{log['pid']}") and o["computed"]),
                       key=lambda o: o["start"])
        needs = [_model_of(o["step"], tiny_models) for o in units]
        assert [o["loaded"] for o in units] == [i == 0 or needs[i - 1] != m for i, m in enumerate(needs)]
        assert sum(o["loaded"] for o in units) < len(units)

    again = run_teacher(_teacher_config(tiny_models, tiny_dataset, out, cluster=cluster.scheduler_address))
    assert [(s["parts_done"], s["parts_skipped"]) for s in again.steps] == [(0, len(PARTS))] * len(TEACHER_STEPS)


def test_a_killed_worker_loses_only_its_part_and_the_store_ends_equal(tmp_path, tiny_models, tiny_dataset,
                                                                      tiny_store):
    cluster = _local_cluster()
    client = Client(cluster)
    try:
        out = tmp_path / "killed.zarr"
        staging = Path(f"{out}{STAGING_SUFFIX}")
        pids = set(client.run(os.getpid).values())
        finished: dict = {}

        def run():
            try:
                finished["summary"] = run_teacher(_teacher_config(tiny_models, tiny_dataset, out,
                                                                  cluster=cluster.scheduler_address))
            except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
                finished["error"] = exc

        coordinator = threading.Thread(target=run)
        coordinator.start()
        # once some parts are written, kill the first worker caught writing a section (mid-part)
        deadline, victim = time.time() + 180, None
        while victim is None and coordinator.is_alive() and time.time() < deadline:
            if list(out.glob("*/part-*/pairs/student_init")):
                for entry in (staging.iterdir() if staging.is_dir() else ()):
                    pid = entry.name.rpartition("-")[0].rpartition("-")[2]
                    if pid.isdigit() and int(pid) in pids:
                        victim = int(pid)
                        os.kill(victim, signal.SIGKILL)
                        break
            time.sleep(0.001)
        assert victim is not None, "the run ended before a worker could be killed mid-part"
        complete_at_kill = {p for p, (complete, _) in _manifest_without_times(out).items() if complete}
        assert any(e.name.rpartition("-")[0].endswith(f"-{victim}") for e in staging.iterdir()), \
            "the killed worker had finished its section"  # it died with a staged, uncompleted section
        coordinator.join(300)
        assert not coordinator.is_alive() and "error" not in finished, finished.get("error")

        assert _manifest_without_times(out) == _manifest_without_times(tiny_store)
        assert TeacherStore.open(str(out)).verify() == []
        assert not staging.exists()  # the dead writer's staged section was removed, never renamed into place
        client.wait_for_workers(2, timeout=60)  # the nanny restarted the killed worker process
        assert victim not in set(client.run(os.getpid).values())
        # every section not complete when the worker died was computed afterwards, once, by a live worker
        logs = _worker_logs(client)
        computed = Counter(_section_path(o) for log in logs.values() for o in log["ran"] if o["computed"])
        redo = {p for p in _manifest_without_times(tiny_store) if p not in complete_at_kill}
        assert redo and all(computed[p] == 1 for p in redo), (redo, computed)
    finally:
        client.close()
        cluster.close()


def test_sample_and_pad_on_cluster_equal_one_process(tmp_path, tiny_models, tiny_dataset, dask_cluster):
    cluster, client = dask_cluster
    teacher, student = tiny_models
    sample = dict(model=str(student), dataset=str(tiny_dataset), n=4, keep=3, max_new_tokens=8, max_length=64,
                  examples_per_part=4, device="cpu", dtype="float32", progress=False)
    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    run_sample(SampleConfig(out=str(one), **sample))
    summary = run_sample(SampleConfig(out=str(two), cluster=cluster.scheduler_address, **sample))
    assert _manifest_without_times(one) == _manifest_without_times(two)
    assert summary.steps[0]["parts_done"] == len(PARTS)
    drawn = [o for log in _worker_logs(client).values() for o in log["ran"] if o["step"] == "samples/base"]
    assert sorted((o["split"], o["part"]) for o in drawn if o["computed"]) == sorted(PARTS)

    pad = dict(teacher=str(teacher), dataset=str(tiny_dataset), passes=("pad",), top_k=8, max_length=64,
               max_new_tokens=8, examples_per_part=4, device="cpu", dtype="float32", progress=False)
    run_teacher(TeacherConfig(out=str(one), **pad))
    scored = run_teacher(TeacherConfig(out=str(two), cluster=cluster.scheduler_address, **pad))
    manifest = _manifest_without_times(two)
    assert "train/part-00002/samples/teacher_mcq" in manifest
    assert _manifest_without_times(one) == manifest
    assert [(s["step"], s["parts_done"]) for s in scored.steps] == [("samples/teacher", 4),
                                                                    ("samples/teacher_mcq", 4)]
    assert any(line.startswith("  pad cost per group") for line in scored.notes)


def test_cli_local_cluster_prints_dashboard_and_summary(tmp_path, tiny_models, tiny_dataset, tiny_store):
    teacher, student = tiny_models
    out = tmp_path / "cli.zarr"
    proc = subprocess.run([sys.executable, "-m", "precompute.cli", "teacher", "--out", str(out),
                           "--teacher", str(teacher), "--student", str(student), "--dataset", str(tiny_dataset),
                           "--top-k", "8", "--max-length", "96", "--max-new-tokens", "12",
                           "--examples-per-part", "4", "--device", "cpu", "--dtype", "float32", "--no-progress",
                           "--cluster", "local:2"], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "dask cluster local:2: 2 worker(s)" in proc.stderr and "dashboard http://" in proc.stderr
    for step in TEACHER_STEPS:
        assert any(line.split()[:4] == [step, "4", "parts", "written,"] for line in proc.stdout.splitlines()), \
            proc.stdout
    assert "cluster local:2: 2 worker(s)" in proc.stdout
    assert _manifest_without_times(out) == _manifest_without_times(tiny_store)


def test_cli_refuses_a_bad_cluster_spec_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "precompute.cli", "teacher", "--out", str(tmp_path / "x.zarr"),
                           "--cluster", "local:none"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "local:N needs a number of workers" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.zarr").exists()


def test_a_refused_scheduler_address_is_said_at_once_and_a_silent_one_after_the_timeout(tmp_path, tiny_models,
                                                                                        tiny_dataset):
    import socket

    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    teacher, student = tiny_models
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "precompute.cli", "teacher", "--out", str(tmp_path / "x.zarr"),
                           "--teacher", str(teacher), "--student", str(student), "--dataset", str(tiny_dataset),
                           "--device", "cpu", "--no-progress", "--cluster", f"tcp://127.0.0.1:{port}"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"precompute teacher: --cluster tcp://127.0.0.1:{port}: connection refused: no scheduler listens at "
        f"127.0.0.1:{port} (start one with `dask scheduler --port {port}`, or check the address)")
    assert elapsed < cl.CONNECT_TIMEOUT_S  # dask's Client alone retried until its 30 s timeout, then said "timed out"
    assert not (tmp_path / "x.zarr").exists()

    # a host that answers nothing (a listening socket whose backlog is full drops the next SYN): the timeout holds
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(0)
        address, waiting = silent.getsockname(), []
        while True:  # fill the backlog until a connection attempt goes unanswered
            client = socket.socket()
            client.settimeout(0.5)
            try:
                client.connect(address)
            except OSError:
                client.close()
                break
            waiting.append(client)
        started = time.monotonic()
        with pytest.raises(cl.ClusterError, match=r"no answer from 127\.0\.0\.1:\d+ within 1 s"):
            cl.probe_scheduler(cl.parse_spec(f"tcp://{address[0]}:{address[1]}"), timeout=1.0)
        assert 0.9 < time.monotonic() - started < 10
        for client in waiting:
            client.close()
