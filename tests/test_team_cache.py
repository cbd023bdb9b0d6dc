"""Sharing stores with a team: find them (`store ls`), move them intact (`store cp`), keep secrets out.

Real stores on disk and on a real S3-compatible server on loopback (moto).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from store import TeacherStore
from store.cli import main as store_cli
from tests import store_helpers as H

REPO = Path(__file__).resolve().parents[1]


def _store(location, **kwargs):
    store = H.write_synthetic_store(str(location), num_examples={"train": 9, "test": 3}, **kwargs)
    return store


def _invoke(*args):
    result = CliRunner().invoke(store_cli, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    return result


def test_ls_finds_every_store_under_a_folder_with_what_it_holds(tmp_path):
    _store(tmp_path / "team" / "alice" / "adpa.zarr")
    _store(tmp_path / "team" / "bob" / "runs" / "pad.zarr", sets=["samples"])
    (tmp_path / "team" / "notes").mkdir()
    (tmp_path / "team" / "notes" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    result = _invoke("ls", tmp_path / "team", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.stdout)
    assert [Path(s["location"]).relative_to(tmp_path / "team").as_posix() for s in listing] == [
        "alice/adpa.zarr", "bob/runs/pad.zarr"]
    alice, bob = listing
    assert alice["splits"] == {"train": 9, "test": 3}
    assert alice["teacher"]["sha256"] == H.TEACHER_MODEL["sha256"]
    assert alice["dataset"]["name"] == H.DATASET["name"]
    assert alice["complete"] and alice["bytes"] > 0 and alice["created_at"]
    text = _invoke("ls", tmp_path / "team").stdout
    assert "alice/adpa.zarr" in text and "bob/runs/pad.zarr" in text


def test_ls_says_when_a_store_is_incomplete(tmp_path):
    store = H.create_store(str(tmp_path / "half.zarr"), num_examples={"train": 6})
    H.write_parts(store, "train", [0])
    store.refresh_manifest()
    (summary,) = json.loads(_invoke("ls", tmp_path, "--json").stdout)
    assert not summary["complete"]
    assert summary["passes"]["pairs/teacher"] == {"model": H.TEACHER_MODEL["name"], "sections_complete": 1,
                                                  "sections_expected": 2}


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ls_refuses_a_location_that_is_not_a_folder_and_lists_none_in_an_empty_one(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a folder")
    unreachable = f"http://alice:PaSs-h21@127.0.0.1:{_closed_port()}/team"
    refused = {
        "no such folder": (_invoke("ls", tmp_path / "tema"), f"{tmp_path / 'tema'}: no such folder"),
        "no such folder, depth 0": (_invoke("ls", tmp_path / "tema", "--max-depth", "0"),
                                    f"{tmp_path / 'tema'}: no such folder"),
        "a file": (_invoke("ls", tmp_path / "notes.txt", "--json"), f"{tmp_path / 'notes.txt'}: a file, not a folder"),
        "unreachable": (_invoke("ls", unreachable), f"{unreachable.replace('alice:PaSs-h21@', '')}: cannot be listed"),
    }
    for name, (result, message) in refused.items():
        assert result.exit_code == 2 and result.stdout == "", (name, result.output)
        assert result.stderr.startswith(f"store ls: {message}") and len(result.stderr.splitlines()) == 1, \
            (name, result.stderr)
        assert "PaSs-h21" not in result.output
    empty = _invoke("ls", tmp_path / "empty")
    assert empty.exit_code == 0 and empty.stdout.strip() == "no teacher-signal store found", empty.output
    assert json.loads(_invoke("ls", tmp_path / "empty", "--json").stdout) == []


def test_cp_to_s3_and_back_gives_equal_checksums(tmp_path, s3_endpoint):
    source = _store(tmp_path / "src.zarr")
    options = ["--storage-option", f"endpoint_url={s3_endpoint}", "--storage-option", "key=test",
               "--storage-option", "secret=test"]
    result = _invoke("cp", tmp_path / "src.zarr", "s3://bucket/copied.zarr", *options)
    assert result.exit_code == 0, result.output
    result = _invoke("cp", "s3://bucket/copied.zarr", tmp_path / "back.zarr", *options)
    assert result.exit_code == 0, result.output
    back = TeacherStore.open(str(tmp_path / "back.zarr"))
    assert H.all_checksums(back) == H.all_checksums(source)
    assert back.verify() == []
    assert back.attrs["copied_from"] == "s3://bucket/copied.zarr"
    again = _invoke("cp", tmp_path / "src.zarr", "s3://bucket/copied.zarr", *options)
    assert "0 sections copied" in again.stdout


KILLED_COPY = """
import os, sys
from store import copy as C

done = []
original = C._copy_section

def copy_then_die(*args, **kwargs):
    original(*args, **kwargs)
    done.append(1)
    if len(done) == int(sys.argv[3]):
        os._exit(17)

C._copy_section = copy_then_die
C.copy_store(sys.argv[1], sys.argv[2])
"""


def test_a_killed_copy_never_reads_complete_and_resumes(tmp_path):
    source = _store(tmp_path / "src.zarr")
    target = tmp_path / "dst.zarr"
    done = subprocess.run([sys.executable, "-c", KILLED_COPY, str(tmp_path / "src.zarr"), str(target), "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 17, done.stderr
    partial = TeacherStore.open(str(target))
    assert partial.attrs["manifest"] == {}  # not filled until the end
    complete = [ref.path for ref, _ in partial.complete_sections()]
    assert len(complete) == 5
    assert partial.verify() != []  # what is there is checked, and the copy is reported unfinished

    result = _invoke("cp", tmp_path / "src.zarr", target)
    assert result.exit_code == 0, result.output
    assert "5 already there" in result.stdout
    copied = TeacherStore.open(str(target))
    assert H.all_checksums(copied) == H.all_checksums(source) and copied.verify() == []


# -- read-only everywhere: a store served over plain HTTP, a store on a read-only mount ----------------

class _Recording(H.FolderServer):
    """A plain static HTTP server on loopback over a folder, recording the methods it was asked."""

    def __init__(self, folder):
        from http.server import SimpleHTTPRequestHandler

        self.methods = []
        recording = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_response(self, code, message=None):
                recording.methods.append(self.command)
                super().send_response(code, message)

        super().__init__(folder, Handler)


def _read_everything(location, tiny_models, tmp_path):
    """store info, verify and ls, a short training run and an evaluation on ``location``; nothing may fail."""
    from train.evaluate import evaluate
    from train.config import EvaluateConfig, TrainConfig
    from train.trainer import train

    info = _invoke("info", location, "--json")
    assert info.exit_code == 0, info.output
    verify = _invoke("verify", location)
    assert verify.exit_code == 0 and verify.stdout.startswith("OK"), verify.output
    out = train(TrainConfig(cache=str(location), method="dckd", out=str(tmp_path / "run"), lr=1e-3, max_steps=2,
                            batch_tokens=400, device="cpu", dtype="float32", progress=False))
    assert (out / "model.safetensors").is_file()
    report = evaluate(EvaluateConfig(model=str(tiny_models[1]), cache=str(location), device="cpu"))
    assert report["pairs"] == 2
    return json.loads(info.stdout)


def test_a_store_served_over_plain_http_is_inspected_trained_and_evaluated(tiny_store, tiny_models, tmp_path):
    server = _Recording(Path(tiny_store).parent)
    try:
        url = f"{server.url}/{Path(tiny_store).name}"
        info = _read_everything(url, tiny_models, tmp_path)
        on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(tiny_store) for f in files)
        assert info["bytes_on_disk"] == on_disk
        listing = json.loads(_invoke("ls", server.url, "--json").stdout)
        assert [s["location"] for s in listing] == [url] and listing[0]["complete"]
    finally:
        server.close()
    assert set(server.methods) <= {"GET", "HEAD"}


def test_a_store_on_a_read_only_mount_is_inspected_trained_and_evaluated(tiny_store, tiny_models, tmp_path,
                                                                        read_only_view):
    view = read_only_view(Path(tiny_store).parent)
    _read_everything(view / Path(tiny_store).name, tiny_models, tmp_path)
    listing = json.loads(_invoke("ls", view, "--json").stdout)
    assert len(listing) == 1 and listing[0]["complete"]


def test_no_store_command_prints_the_password_of_a_location(tmp_path):
    """store info, verify, export, ls and cp name a location with ``user:password@`` without its password, in
    their refusals and in what they print when they work (and export's file records it without), as train does."""
    import h5py

    from store.locations import redact_text, secret_values

    H.write_synthetic_store(str(tmp_path / "served" / "s.zarr"), num_examples={"train": 3}, sets=["pairs"])
    password = "PaSsWoRd-h21"
    server = _Recording(tmp_path / "served")
    try:
        with_password = server.url.replace("http://", f"http://alice:{password}@")
        refusals = {
            "info": _invoke("info", f"{with_password}/nothing.zarr"),
            "verify": _invoke("verify", f"{with_password}/nothing.zarr"),
            "export": _invoke("export", f"{with_password}/nothing.zarr", "--out", tmp_path / "x.h5"),
            "cp from": _invoke("cp", f"{with_password}/nothing.zarr", tmp_path / "copy.zarr"),
        }
        worked = {
            "info": _invoke("info", f"{with_password}/s.zarr"),
            "info --json": _invoke("info", f"{with_password}/s.zarr", "--json"),
            "verify": _invoke("verify", f"{with_password}/s.zarr"),
            "export": _invoke("export", f"{with_password}/s.zarr", "--out", tmp_path / "s.h5"),
            "ls": _invoke("ls", with_password),
            "cp": _invoke("cp", f"{with_password}/s.zarr", tmp_path / "copy.zarr"),
        }
    finally:
        server.close()
    for name, result in refusals.items():
        assert result.exit_code == 2 and f"{server.url}/nothing.zarr: no teacher-signal store" in result.stderr, \
            (name, result.output)
        assert password not in result.output, name
    for name, result in worked.items():
        assert result.exit_code == 0, (name, result.output)
        assert password not in result.output, (name, result.output)
        if name != "export":  # which prints the file it wrote
            assert f"{server.url}/s.zarr" in result.stdout, (name, result.output)
    assert json.loads(worked["info --json"].stdout)["location"] == f"{server.url}/s.zarr"
    with h5py.File(tmp_path / "s.h5", "r") as exported:
        assert exported.attrs["exported_from"] == f"{server.url}/s.zarr"
    assert json.loads((tmp_path / "copy.zarr" / "zarr.json").read_text())["attributes"]["copied_from"] == \
        f"{server.url}/s.zarr"
    # a secret-looking query value of a location is never printed either
    location = "https://host/x.zarr?token=tOkEn-h21&region=eu"
    assert redact_text(f"cannot read {location}", secret_values(locations=[location])) == \
        "cannot read https://host/x.zarr?token=<redacted>&region=eu"


# -- content keys and --reuse-from: no teammate pays for a teacher pass twice ---------------------------------

TEACHER_STEPS = ("pairs/student_init", "generated/base", "pairs/teacher", "generated/teacher", "generated/reference")
REUSABLE = ("pairs/base",) + TEACHER_STEPS
SAMPLE = dict(n=4, keep=3, max_new_tokens=8, max_length=64, examples_per_part=4, device="cpu", dtype="float32",
              progress=False)


def _teacher(tiny_models, tiny_dataset, out, **extra):
    """The settings of the ``tiny_store`` fixture (conftest.py), with ``extra``."""
    from precompute.teacher import TeacherConfig

    teacher, student = tiny_models
    settings = dict(out=str(out), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset), top_k=8,
                    max_length=96, max_new_tokens=12, examples_per_part=4, device="cpu", dtype="float32",
                    progress=False)
    return TeacherConfig(**{**settings, **extra})


def _teacher_args(tiny_models, tiny_dataset, out):
    teacher, student = tiny_models
    return ["teacher", "--out", str(out), "--teacher", str(teacher), "--student", str(student), "--dataset",
            str(tiny_dataset), "--top-k", "8", "--max-length", "96", "--max-new-tokens", "12",
            "--examples-per-part", "4", "--device", "cpu", "--dtype", "float32", "--no-progress"]


def _checksums(location, storage_options=None):
    return H.all_checksums(TeacherStore.open(str(location), storage_options=storage_options))


def _keys(location, storage_options=None):
    return TeacherStore.open(str(location), storage_options=storage_options).content_keys()


def _reused_lines(stdout):
    """step -> (parts, location) of the summary's "N parts reused from LOCATION" lines."""
    found = {}
    for line in stdout.splitlines():
        words = line.split()
        if words[2:5] == ["parts", "reused", "from"]:
            found[words[0]] = (int(words[1]), words[5])
    return found


@pytest.fixture(scope="module")
def limited_store(tmp_path_factory, tiny_models, tiny_dataset):
    """``tiny_store``'s settings on the first 4 rows of each split: train part 0 and test part 0 only."""
    from precompute.teacher import run_teacher

    out = tmp_path_factory.mktemp("limited") / "first4.zarr"
    run_teacher(_teacher(tiny_models, tiny_dataset, out, limit=4))
    return out


def test_every_input_of_a_key_changes_it_and_names_do_not():
    from store import keys

    layout = keys.layout(3, "uint16", "t" * 64)
    rows = [{"index": 0, "prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    cases = {
        keys.pairs_base_key: dict(layout=layout, example_range=(0, 4), rows=rows,
                                  encode={"max_length": 96, "chat_template_sha256": "c" * 64}),
        keys.generated_base_key: dict(layout=layout, example_range=(0, 4), model_sha256="m" * 64,
                                      settings={"max_new_tokens": 12, "dtype": "float32"}, eot_ids=[2],
                                      prompt_ids=[(0, [1, 2, 3])]),
        keys.samples_base_key: dict(layout=layout, example_range=(0, 4), model_sha256="m" * 64,
                                    settings={"n": 4, "temperature": 1.0}, part_seed=0, device="cpu",
                                    generation_batch=16, eot_ids=[2], prompts_sha256="p" * 64,
                                    prompt_ids=[(0, [1, 2, 3])]),
        functools.partial(keys.section_key, "generated/reference"): dict(
            layout=layout, example_range=(0, 4), model_sha256="m" * 64, settings={"top_k": 8, "dtype": "float32"},
            base_checksums={"input_ids": "i" * 64}, reads={"generated/teacher": {"topk_ids": "k" * 64}},
            prompts_sha256="p" * 64, part_seed=7),
    }
    changed = {"layout": keys.layout(3, "int32", "t" * 64), "example_range": (0, 3), "model_sha256": "n" * 64,
               "eot_ids": [2, 3], "prompt_ids": [(0, [1, 2, 4])], "part_seed": 1, "device": "cuda",
               "generation_batch": 8, "prompts_sha256": "q" * 64, "base_checksums": {"input_ids": "j" * 64},
               "reads": {"generated/teacher": {"topk_ids": "l" * 64}},
               "rows": [{**rows[0], "rejected": "c"}], "encode": {"max_length": 80, "chat_template_sha256": "c" * 64}}
    for make, inputs in cases.items():
        key = make(**inputs)
        assert len(key) == 64 and make(**json.loads(json.dumps(inputs))) == key  # a pure function of the values
        for name in inputs:
            if name == "settings":
                assert make(**{**inputs, name: {**inputs[name], "dtype": "bfloat16"}}) != key
                assert make(**{**inputs, name: {**inputs[name], "model": {"name": "elsewhere"}}}) == key
            else:
                assert make(**{**inputs, name: changed[name]}) != key, (make, name)
    template = {"template": {"source": "/home/a/mcq.txt", "sha256": "s" * 64}, "letters": ["A", "B"]}
    section = dict(layout=layout, example_range=(0, 4), model_sha256="m" * 64, base_checksums={})
    moved = {"template": {"source": "/home/b/copy.txt", "sha256": "s" * 64}, "letters": ["A", "B"]}
    edited = {"template": {"source": "/home/a/mcq.txt", "sha256": "e" * 64}, "letters": ["A", "B"]}
    mcq = keys.section_key("samples/teacher_mcq", settings=template, **section)
    assert keys.section_key("samples/teacher_mcq", settings=moved, **section) == mcq  # where the file was
    assert keys.section_key("samples/teacher_mcq", settings=edited, **section) != mcq  # what it says


def test_two_stores_computed_apart_from_the_same_inputs_agree_on_every_key(tmp_path, tiny_store, tiny_models,
                                                                           tiny_dataset):
    from precompute.teacher import run_teacher

    out = tmp_path / "again.zarr"
    run_teacher(_teacher(tiny_models, tiny_dataset, out))
    keys_here, keys_there = _keys(out), _keys(tiny_store)
    assert keys_here == keys_there
    assert set(keys_here) == set(_checksums(tiny_store))  # every complete section has one
    assert {path.split("/", 2)[2] for path in keys_here} == {  # base and sections of both sets
        "pairs", "generated", "pairs/student_init", "pairs/teacher", "generated/teacher", "generated/reference"}
    assert len(set(keys_here.values())) == len(keys_here)  # and no two sections share one


def test_a_second_run_with_the_same_inputs_reuses_every_section_and_loads_no_model(
        tmp_path, tiny_store, tiny_models, tiny_dataset, forbid_model_loading):
    from precompute.cli import main as precompute_cli

    forbid_model_loading()
    out = tmp_path / "mine.zarr"
    result = CliRunner().invoke(precompute_cli, [*_teacher_args(tiny_models, tiny_dataset, out),
                                                 "--reuse-from", str(tiny_store)])
    assert result.exit_code == 0, result.output
    assert _reused_lines(result.stdout) == {step: (4, str(tiny_store)) for step in REUSABLE}
    for step in TEACHER_STEPS:
        assert any(line.split()[:4] == [step, "0", "parts", "written,"] for line in result.stdout.splitlines())
    assert _checksums(out) == _checksums(tiny_store)
    assert _keys(out) == _keys(tiny_store)
    store = TeacherStore.open(str(out))
    for ref, attrs in store.complete_sections():
        assert attrs["reused_from"] == {"store": str(tiny_store), "section": ref.path}
    verify = _invoke("verify", out)
    assert verify.exit_code == 0 and verify.stdout.startswith("OK"), verify.output
    (run,) = store.attrs["runs"]  # the run is recorded with what it reused
    assert {entry["step"]: entry["parts"] for entry in run["reused"]} == {step: 4 for step in REUSABLE}


def test_a_changed_setting_changes_the_keys_it_affects_and_reuses_none_of_those(tmp_path, tiny_store, tiny_models,
                                                                                tiny_dataset):
    from precompute.teacher import run_teacher

    first = _keys(tiny_store)
    out = tmp_path / "k4.zarr"
    summary = run_teacher(_teacher(tiny_models, tiny_dataset, out, top_k=4, passes=("pairs",),
                                   reuse_from=(str(tiny_store),)))
    assert summary.reused_parts("pairs/teacher") == 0 and summary.steps[0]["parts_done"] == 4
    assert summary.reused_parts("pairs/base") == 4  # the pairs' token ids do not depend on --top-k
    keys = _keys(out)
    teacher_keys = {p: k for p, k in keys.items() if p.endswith("/pairs/teacher")}
    assert len(teacher_keys) == 4 and all(first[p] != k for p, k in teacher_keys.items())
    assert all(first[p] == k for p, k in keys.items() if p.endswith("/pairs"))

    out = tmp_path / "len80.zarr"
    summary = run_teacher(_teacher(tiny_models, tiny_dataset, out, max_length=80, passes=("pairs",),
                                   reuse_from=(str(tiny_store),)))
    assert summary.reused == [] and summary.steps[0]["parts_done"] == 4  # everything is encoded otherwise
    assert set(_keys(out).values()).isdisjoint(first.values())


def test_a_superset_of_the_rows_reuses_the_parts_whose_rows_match(tmp_path, limited_store, tiny_store, tiny_models,
                                                                  tiny_dataset):
    from precompute.teacher import run_teacher

    first = _keys(limited_store)  # computed apart from tiny_store, on train part 0 and test part 0
    assert sorted({p.split("/")[0] + "/" + p.split("/")[1] for p in first}) == ["test/part-00000",
                                                                                "train/part-00000"]
    assert all(_keys(tiny_store)[path] == key for path, key in first.items())

    out = tmp_path / "all.zarr"
    summary = run_teacher(_teacher(tiny_models, tiny_dataset, out, reuse_from=(str(limited_store),)))
    assert {step: summary.reused_parts(step) for step in REUSABLE} == {step: 2 for step in REUSABLE}
    assert [(s["step"], s["parts_done"]) for s in summary.steps] == [(step, 2) for step in TEACHER_STEPS]
    assert _checksums(out) == _checksums(tiny_store)
    assert _keys(out) == _keys(tiny_store)
    store = TeacherStore.open(str(out))
    reused = {ref.path.split("/")[:2][0] + "/" + ref.path.split("/")[1]
              for ref, attrs in store.complete_sections() if "reused_from" in attrs}
    assert reused == {"train/part-00000", "test/part-00000"}
    assert store.verify() == []


def test_a_section_that_fails_its_checksums_is_computed_instead(tmp_path, tiny_store, tiny_models, tiny_dataset):
    from precompute.teacher import run_teacher

    damaged = tmp_path / "team" / "damaged.zarr"
    shutil.copytree(tiny_store, damaged)
    meta = damaged / "train" / "part-00001" / "pairs" / "teacher" / "zarr.json"
    document = json.loads(meta.read_text())
    document["attributes"]["checksums"]["target_logp"] = "0" * 64  # the data no longer matches its record
    meta.write_text(json.dumps(document))
    out = tmp_path / "mine.zarr"
    summary = run_teacher(_teacher(tiny_models, tiny_dataset, out, passes=("pairs",),
                                   reuse_from=(str(tmp_path / "team"),)))
    assert summary.reused_parts("pairs/teacher") == 3 and summary.steps[0]["parts_done"] == 1
    assert any("train/part-00001/pairs/teacher from" in note and "computed instead" in note
               for note in summary.notes)
    wanted = {p: c for p, c in _checksums(tiny_store).items() if p.endswith(("/pairs", "/pairs/teacher"))}
    assert _checksums(out) == wanted
    assert "reused_from" not in TeacherStore.open(str(out)).section_attrs("train", 1, "pairs", "teacher")


def test_sample_reuses_a_store_on_s3_named_by_the_environment_variable(tmp_path, tiny_models, tiny_dataset,
                                                                       s3_endpoint, forbid_model_loading,
                                                                       monkeypatch):
    from precompute.sample import SampleConfig, run_sample

    options = {"endpoint_url": s3_endpoint, "key": "test", "secret": "test"}
    on_s3 = "s3://bucket/team/pad.zarr"
    drawn = run_sample(SampleConfig(out=on_s3, model=str(tiny_models[1]), dataset=str(tiny_dataset),
                                    storage_options=options, **SAMPLE))
    apart = tmp_path / "apart.zarr"  # the same draws made again, apart: the same keys
    run_sample(SampleConfig(out=str(apart), model=str(tiny_models[1]), dataset=str(tiny_dataset), **SAMPLE))
    assert _keys(apart) == _keys(on_s3, options) and len(_keys(apart)) == 4

    monkeypatch.setenv("DISTILL_REUSE_FROM", f"{tmp_path / 'nothing'}{os.pathsep}{tmp_path / 'none'},"
                                             f"s3://bucket/team")
    forbid_model_loading()
    out = tmp_path / "mine.zarr"
    summary = run_sample(SampleConfig(out=str(out), model=str(tiny_models[1]), dataset=str(tiny_dataset),
                                      reuse_options=options, **SAMPLE))
    assert summary.reused == [{"step": "samples/base", "from": on_s3, "parts": 4}]
    assert summary.steps[0]["parts_done"] == 0
    assert _checksums(out) == _checksums(on_s3, options) == _checksums(apart)
    assert [n for n in summary.notes if "samples:" in n] == [n for n in drawn.notes if "samples:" in n]
    assert TeacherStore.open(str(out)).verify() == []
    assert any(note.startswith("  reuse: s3://bucket/team: 1 store(s), 4 keyed") for note in summary.notes)


def test_on_a_cluster_the_coordinator_copies_what_it_can_and_submits_the_rest(tmp_path, limited_store, tiny_store,
                                                                              tiny_models, tiny_dataset):
    from distributed import Client, LocalCluster

    from precompute import cluster as cl
    from precompute.teacher import run_teacher

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=0, dashboard_address=":0")
    client = Client(cluster)
    try:
        out = tmp_path / "cluster.zarr"
        summary = run_teacher(_teacher(tiny_models, tiny_dataset, out, cluster=cluster.scheduler_address,
                                       reuse_from=(str(limited_store),)))
        computed = sorted({(o["split"], o["part"]) for log in client.run(cl.worker_log).values()
                           for o in log["ran"] if o["computed"]})
    finally:
        client.close()
        cluster.close()
    assert computed == [("train", 1), ("train", 2)]  # the parts the first 4 rows do not cover, no other
    assert {step: summary.reused_parts(step) for step in REUSABLE} == {step: 2 for step in REUSABLE}
    assert _checksums(out) == _checksums(tiny_store) and _keys(out) == _keys(tiny_store)


def test_credentials_never_reach_the_store_the_summary_or_the_terminal(tmp_path, tiny_store, tiny_models,
                                                                       tiny_dataset, s3_endpoint):
    import uuid

    import s3fs

    from precompute.cli import main as precompute_cli

    secret, key_id, password, other = (f"{what}-{uuid.uuid4().hex}" for what in ("SeCrEt", "KeYiD", "PaSs", "PwEnV"))
    name = Path(tiny_store).name
    server = _Recording(Path(tiny_store).parent)
    try:
        served = server.url.replace("http://", f"http://alice:{password}@")
        proc = subprocess.run(
            [sys.executable, "-m", "precompute.cli", *_teacher_args(tiny_models, tiny_dataset, "s3://bucket/s.zarr"),
             "--passes", "pairs", "--top-k", "4", "--storage-option", f"endpoint_url={s3_endpoint}",
             "--storage-option", f"key={key_id}", "--storage-option", f"secret={secret}", "--reuse-from", served],
            cwd=REPO, capture_output=True, text=True, timeout=600,
            env={**os.environ, "DISTILL_REUSE_FROM": f"http://bob:{other}@127.0.0.1:9/nothing"})
        # an error that names a location with a password: the location is named, the password is not
        refused = CliRunner().invoke(precompute_cli, [*_teacher_args(tiny_models, tiny_dataset, f"{served}/{name}"),
                                                      "--passes", "pairs", "--examples-per-part", "3"])
    finally:
        server.close()
    assert proc.returncode == 0, proc.stderr
    assert set(server.methods) <= {"GET", "HEAD"}
    here = f"{server.url}/{name}"
    # (an HTTP --out is refused as read-only before the store is read, by the location it names)
    assert refused.exit_code == 2 and f"{here}: HTTP locations are read-only" in refused.stderr, refused.output
    assert password not in refused.output
    assert _reused_lines(proc.stdout) == {"pairs/base": (4, here)}  # the location shown, its password not
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key=key_id, secret=secret)
    files = fs.find("bucket/s.zarr")
    assert len(files) > 50 and any(f.endswith("pairs/teacher/zarr.json") for f in files)
    written = b"".join(fs.cat(files).values())
    assert b'"reused_from"' in written and here.encode() in written
    for value in (secret, key_id, password, other):
        assert value not in proc.stdout and value not in proc.stderr
        assert value.encode() not in written


class _NoListings(_Recording):
    """A static HTTP server that answers 404 for every folder: no directory listings, files only."""

    def __init__(self, folder):
        super().__init__(folder)
        served = self.server.RequestHandlerClass

        class Handler(served.func):
            def list_directory(self, path):
                self.send_error(404, "no listings here")

        self.server.RequestHandlerClass = functools.partial(Handler, **served.keywords)


def test_a_store_url_on_a_server_without_listings_is_reused_file_by_file(tmp_path, tiny_store, tiny_models,
                                                                        tiny_dataset, forbid_model_loading):
    from precompute.teacher import run_teacher

    server = _NoListings(Path(tiny_store).parent)
    try:
        assert _invoke("ls", server.url).stdout.strip() == "no teacher-signal store found"  # nothing is listed
        forbid_model_loading()
        url = f"{server.url}/{Path(tiny_store).name}"
        out = tmp_path / "mine.zarr"
        summary = run_teacher(_teacher(tiny_models, tiny_dataset, out, passes=("pairs",), reuse_from=(url,)))
    finally:
        server.close()
    assert summary.reused == [{"step": "pairs/base", "from": url, "parts": 4},
                              {"step": "pairs/teacher", "from": url, "parts": 4}]
    wanted = {p: c for p, c in _checksums(tiny_store).items() if p.endswith(("/pairs", "/pairs/teacher"))}
    assert _checksums(out) == wanted and TeacherStore.open(str(out)).verify() == []
    assert set(server.methods) <= {"GET", "HEAD"}
