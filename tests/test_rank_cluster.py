"""``precompute rank --cluster``: the same rankings as one process, each group asked once.

Real components throughout: a ``distributed.LocalCluster`` of 2 worker processes
(one thread each), the tiny random Llamas of ``tests/tiny.py`` (the white box,
and a ``local:`` judge), the loopback OpenAI-compatible judge of
``tests/judge_server.py`` (ranks longer responses first), real stores on disk.
Stores are compared by every section's completeness and checksums, as
tests/test_cluster.py compares them.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from distributed import Client, LocalCluster

from precompute import cluster as cl
from precompute import stores
from precompute.cli import main as precompute_cli
from precompute.rank import PASS_JUDGE, PASS_WHITE_BOX, RankConfig, run_rank
from store import TeacherStore
from tests import store_helpers, tiny
from tests.judge_server import JudgeServer

PARTS = [("train", 0), ("train", 1), ("train", 2)]  # the 10 train rows of tiny_dataset, 4 per part
RANK_STEPS = (PASS_WHITE_BOX, PASS_JUDGE)
KEY_ENV = "DISTILL_TEST_RANK_CLUSTER_KEY"
KEY = "sk-rank-cluster-test-9f3a"


def _manifest(path) -> dict:
    """path -> (complete, checksums) of every section present: what a run wrote, timestamps aside."""
    return {p: (a.get("complete"), a.get("checksums"))
            for p, a in store_helpers.section_attrs(TeacherStore.open(str(path))).items()}


def _rank_lines(summary_lines) -> list[str]:
    """The summary's lines about the groups ranked and what the judge cost."""
    return [line for line in summary_lines if line.startswith(("  rank:", "  judge cost:"))]


def _asked(requests) -> Counter:
    """How many times each exact conversation was sent."""
    return Counter(json.dumps(r["body"]["messages"], sort_keys=True) for r in requests)


def _copy(src, dst) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def judge():
    """One judge for the module (its address is not part of the rankings' content key: the model name is)."""
    with JudgeServer(score=len) as server:
        yield server


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_models, tiny_dataset):
    return tiny.sampled_store(tmp_path_factory.mktemp("rank-cluster") / "sampled.zarr", tiny_models[1], tiny_dataset)


def _config(out, tiny_dataset, judge_spec: str, **overrides) -> RankConfig:
    options = dict(out=str(out), judge=judge_spec, judge_model="rule", judge_timeout=60.0, judge_retries=0,
                   judge_concurrency=2, dataset=str(tiny_dataset), splits=("train",), device="cpu",
                   dtype="float32", progress=False)
    options.update(overrides)
    return RankConfig(**options)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, sampled, tiny_dataset, judge):
    """The reference: the same samples ranked in one process; (store, summary, the requests it sent)."""
    out = _copy(sampled, tmp_path_factory.mktemp("rank-one") / "one.zarr")
    before = len(judge.requests)
    summary = run_rank(_config(out, tiny_dataset, judge.base_url))
    return out, summary, judge.requests[before:]


@pytest.fixture(scope="module")
def dask_cluster():
    """Two worker processes, one thread each, reached by their scheduler's address."""
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0,
                           dashboard_address=":0")
    client = Client(cluster)
    yield cluster, client
    client.close()
    cluster.close()


def _units_ran(client, since: dict | None = None) -> dict[int, list[dict]]:
    """pid -> the units each worker finished (after ``since``, an earlier result of this function)."""
    logs = {log["pid"]: log["ran"] for log in client.run(cl.worker_log).values()}
    return {pid: ran[len((since or {}).get(pid, [])):] for pid, ran in logs.items()}


# --------------------------------------------------------------------------- the command, local:2


def test_rank_cli_on_local_cluster_equals_one_process_and_asks_each_group_once(tmp_path, monkeypatch, sampled,
                                                                                tiny_dataset, judge, one_process):
    one, one_summary, one_requests = one_process
    out = _copy(sampled, tmp_path / "cluster.zarr")
    monkeypatch.setenv(KEY_ENV, KEY)  # the workers of local:N inherit this process's environment
    before = len(judge.requests)
    result = CliRunner().invoke(precompute_cli, [
        "rank", "--out", str(out), "--judge", judge.base_url, "--judge-model", "rule",
        "--judge-api-key-env", KEY_ENV, "--judge-timeout", "60", "--judge-retries", "0",
        "--judge-concurrency", "2", "--dataset", str(tiny_dataset), "--split", "train", "--device", "cpu",
        "--dtype", "float32", "--no-progress", "--cluster", "local:2"])
    requests = judge.requests[before:]
    assert result.exit_code == 0, (result.output, result.stderr)

    manifest = _manifest(out)
    for split, part in PARTS:
        for section in ("samples/student_init", "samples/judge"):
            assert manifest[f"{split}/part-{part:05d}/{section}"][0], (split, part, section)
    assert manifest == _manifest(one)
    assert TeacherStore.open(str(out)).verify() == []

    # every group's conversation sent once, exactly the one-process run's, with the key of the workers' environment
    groups = stores.sample_counts(TeacherStore.open(str(out)), "train")["groups"]
    assert _asked(requests) == _asked(one_requests) and set(_asked(requests).values()) == {1}
    assert len(requests) == len(one_requests) == groups > 0
    assert all(r["auth"] == f"Bearer {KEY}" for r in requests)

    assert "dask cluster local:2: 2 worker(s)" in result.stderr and "dashboard http://" in result.stderr
    lines = result.stdout.splitlines()
    for step in RANK_STEPS:
        assert any(line.split()[:4] == [step, str(len(PARTS)), "parts", "written,"] for line in lines), lines
    assert "  cluster local:2: 2 worker(s)" in lines
    assert _rank_lines(lines) == _rank_lines(one_summary.lines())
    # the key was used, never written: not in the store, not in what was printed
    assert KEY not in result.output and KEY not in result.stderr
    assert not [f for f in out.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]


# --------------------------------------------------------------------------- on a running scheduler


def test_each_part_computed_once_models_loaded_once_per_worker_and_a_rerun_does_nothing(
        tmp_path, sampled, tiny_dataset, tiny_models, judge, one_process, dask_cluster):
    one, one_summary, one_requests = one_process
    cluster, client = dask_cluster
    out = _copy(sampled, tmp_path / "address.zarr")
    since, before = _units_ran(client), len(judge.requests)
    summary = run_rank(_config(out, tiny_dataset, judge.base_url, cluster=cluster.scheduler_address))

    assert _manifest(out) == _manifest(one)
    assert _asked(judge.requests[before:]) == _asked(one_requests)
    assert [(s["step"], s["parts_done"], s["parts_skipped"]) for s in summary.steps] == \
        [(step, len(PARTS), 0) for step in RANK_STEPS]
    assert _rank_lines(summary.lines()) == _rank_lines(one_summary.lines())
    ran = _units_ran(client, since)
    computed = Counter((o["step"], o["split"], o["part"]) for units in ran.values() for o in units if o["computed"])
    assert computed == Counter({(step, split, part): 1 for step in RANK_STEPS for split, part in PARTS})
    assert all(o["written"] for units in ran.values() for o in units)
    for units in ran.values():  # the white box loads once per worker, not per part (an HTTP judge loads nothing)
        assert sum(o["loaded"] for o in units) <= 1
        assert [o["loaded"] for o in sorted(units, key=lambda o: o["start"])
                if o["step"] == PASS_WHITE_BOX][:1] in ([], [True])

    before = len(judge.requests)
    again = run_rank(_config(out, tiny_dataset, judge.base_url, cluster=cluster.scheduler_address))
    assert [(s["parts_done"], s["parts_skipped"]) for s in again.steps] == [(0, len(PARTS))] * 2
    assert len(judge.requests) == before


def test_reuse_from_on_a_cluster_copies_the_rankings_and_asks_nothing(tmp_path, sampled, tiny_dataset, judge,
                                                                      one_process, dask_cluster):
    one, _, _ = one_process
    cluster, client = dask_cluster
    out = _copy(sampled, tmp_path / "reused.zarr")
    since, before = _units_ran(client), len(judge.requests)
    summary = run_rank(_config(out, tiny_dataset, judge.base_url, cluster=cluster.scheduler_address,
                               reuse_from=(str(one),)))
    assert len(judge.requests) == before  # nothing asked
    assert not any(_units_ran(client, since).values())  # nothing submitted: the coordinator copied every part
    assert _manifest(out) == _manifest(one)
    assert {(e["step"], e["parts"]) for e in summary.reused} == {(step, len(PARTS)) for step in RANK_STEPS}
    assert any("parts reused from" in line for line in summary.lines())
    assert f"  cluster {cluster.scheduler_address}: 2 worker(s)" in summary.notes


def test_workers_read_the_key_from_their_own_environment_never_from_the_run(tmp_path, monkeypatch, capsys, sampled,
                                                                            tiny_dataset, judge, dask_cluster):
    """The workers were started without the variable: the key set here after they started never reaches them."""
    cluster, _ = dask_cluster
    monkeypatch.setenv(KEY_ENV, KEY)
    out = _copy(sampled, tmp_path / "keyless.zarr")
    before = len(judge.requests)
    run_rank(_config(out, tiny_dataset, judge.base_url, cluster=cluster.scheduler_address, judge_api_key_env=KEY_ENV))
    requests = judge.requests[before:]
    assert requests and all(KEY not in str(r["auth"]) for r in requests)
    warning = capsys.readouterr().err
    assert f"${KEY_ENV} is set here but not on worker(s)" in warning and KEY not in warning


def test_a_local_model_judge_is_loaded_once_per_worker_and_ranks_as_in_one_process(tmp_path, sampled, tiny_dataset,
                                                                                    tiny_models, dask_cluster):
    teacher, student = tiny_models
    cluster, client = dask_cluster
    spec = f"local:{teacher}"
    local = dict(judge_model=None, judge_max_tokens=6, tries=1)
    one = _copy(sampled, tmp_path / "local-one.zarr")
    run_rank(_config(one, tiny_dataset, spec, **local))
    out = _copy(sampled, tmp_path / "local-cluster.zarr")
    since = _units_ran(client)
    run_rank(_config(out, tiny_dataset, spec, cluster=cluster.scheduler_address, **local))

    assert _manifest(out) == _manifest(one)
    model_of = {PASS_WHITE_BOX: Path(student).resolve(), PASS_JUDGE: Path(teacher).resolve()}
    ran = _units_ran(client, since)
    assert Counter(o["step"] for units in ran.values() for o in units if o["computed"]) == \
        {PASS_WHITE_BOX: len(PARTS), PASS_JUDGE: len(PARTS)}
    for units in ran.values():  # a model loads when a part needs another one than the last, never per part
        units = sorted((o for o in units if o["computed"]), key=lambda o: o["start"])
        needs = [model_of[o["step"]] for o in units]
        assert [o["loaded"] for o in units] == [i == 0 or needs[i - 1] != m for i, m in enumerate(needs)]


def test_a_judge_the_workers_could_not_build_is_refused_before_any_part(tmp_path, sampled, tiny_dataset, judge,
                                                                         dask_cluster):
    cluster, client = dask_cluster
    out = _copy(sampled, tmp_path / "refused.zarr")
    since = _units_ran(client)
    with pytest.raises(ValueError, match="--judge-model"):
        run_rank(_config(out, tiny_dataset, judge.base_url, cluster=cluster.scheduler_address, judge_model=None))
    assert not any(_units_ran(client, since).values())
    assert not [p for p in _manifest(out) if p.endswith(("/samples/student_init", "/samples/judge"))]


def test_cluster_is_an_option_of_rank_and_says_where_the_key_comes_from():
    text = " ".join(CliRunner().invoke(precompute_cli, ["rank", "--help"]).output.split())
    assert "--cluster" in text and "tcp://HOST:PORT" in text and "own environment" in text
    assert "per worker with --cluster" in text


# --------------------------------------------------------------------------- a judge that never answered


def _rankings(path) -> dict:
    """part -> the judge section's ranking arrays (every part must be complete)."""
    store = TeacherStore.open(str(path))
    names = ["judge_rank", "white_rank", "agreed_rank", "group_status"]
    return {part: {name: values.tolist() for name, values in
                   store.read_section("train", part, "samples", "judge", names).items()}
            for _, part in PARTS}


def test_a_judge_that_never_answers_leaves_every_part_unfinished_on_a_cluster_and_a_rerun_finishes(
        tmp_path, sampled, tiny_dataset, one_process):
    """--cluster local:2 with a judge that answers HTTP 500: each part stops asking once most of its requests
    failed and is written unfinished; the command fails in one line; the same command with the judge up (the
    same address) ranks as one process with a working judge did."""
    one, _, _ = one_process
    out = _copy(sampled, tmp_path / "faulty.zarr")
    with JudgeServer(score=len, fault="500") as server:
        args = ["rank", "--out", str(out), "--judge", server.base_url, "--judge-model", "rule", "--judge-timeout",
                "60", "--judge-retries", "0", "--judge-concurrency", "2", "--dataset", str(tiny_dataset), "--split",
                "train", "--device", "cpu", "--dtype", "float32", "--no-progress", "--cluster", "local:2"]
        failed = CliRunner().invoke(precompute_cli, args)
        assert failed.exit_code == 2, (failed.output, failed.stderr)
        # per part: 4 failed requests stop it (part 2, of 2 groups: two rounds of 2)
        assert failed.stderr.splitlines()[-1] == (
            f"precompute rank: judge {server.base_url} (model rule): 12 of 12 requests failed in transport; last: "
            f"http_500; stopped asking: most of the recent requests failed. Parts written: 0 complete, 3 unfinished "
            f"(train/part-00000: 4 of 4 groups unanswered, train/part-00001: 4 of 4 groups unanswered, "
            f"train/part-00002: 2 of 2 groups unanswered); rerun the same command when the judge answers")
        store = TeacherStore.open(str(out))
        assert store.complete_parts("train", "samples", "judge") == []
        assert [ref.path for ref, _ in store.unfinished_sections()] == [
            f"{split}/part-{part:05d}/samples/judge" for split, part in PARTS]
        assert store.verify() == []

        server.fault = None
        again = CliRunner().invoke(precompute_cli, args)
        assert again.exit_code == 0, (again.output, again.stderr)
    assert _rankings(out) == _rankings(one)
    store = TeacherStore.open(str(out))
    assert list(store.unfinished_sections()) == [] and store.verify() == []
