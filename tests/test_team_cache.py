"""Sharing stores with a team: find them (`store ls`), move them intact (`store cp`), keep secrets out.

Real stores on disk and on a real S3-compatible server on loopback (moto).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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

class _Recording:
    """A plain static HTTP server on loopback over a folder, recording the methods it was asked."""

    def __init__(self, folder):
        import functools
        import threading
        from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

        self.methods = []
        recording = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_response(self, code, message=None):
                recording.methods.append(self.command)
                super().send_response(code, message)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


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
