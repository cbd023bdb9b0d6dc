"""Session fixtures shared by the precompute and train tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests import tiny


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """(teacher_dir, student_dir): random Llamas sharing the SmolLM2 tokenizer."""
    root = tmp_path_factory.mktemp("tiny-models")
    teacher = tiny.make_tiny_model(root / "teacher", seed=1, layers=3, hidden=48)
    student = tiny.make_tiny_model(root / "student", seed=2, layers=2, hidden=32)
    return teacher, student


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A 12-row TRL-format file; its last 2 rows become the test split."""
    return tiny.write_pairs(tmp_path_factory.mktemp("tiny-data") / "pairs.jsonl", 12)


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_models, tiny_dataset):
    """A store made by `precompute teacher` with the default passes (pairs, dpo_ref, adpa)."""
    from precompute.teacher import TeacherConfig, run_teacher

    teacher, student = tiny_models
    out = tmp_path_factory.mktemp("tiny-store") / "adpa.zarr"
    config = TeacherConfig(out=str(out), teacher=str(teacher), student=str(student), dataset=str(tiny_dataset),
                           top_k=8, max_length=96, max_new_tokens=12, examples_per_part=4, device="cpu",
                           dtype="float32", progress=False)
    run_teacher(config)
    return out


@pytest.fixture
def forbid_model_loading(monkeypatch):
    """Call it to make any later model load fail: for checks that must refuse before the expensive part."""
    from lm import models

    def refuse(*args, **kwargs):
        raise AssertionError("the student was loaded before the store was checked")

    return lambda: monkeypatch.setattr(models, "load_model", refuse)


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto) on loopback with a bucket named ``bucket``; its URL."""
    from tests import store_helpers as H

    executable = shutil.which("moto_server")
    if executable is None:
        pytest.skip("moto_server is not installed (pip install 'moto[server]'): no local S3 server to test against")
    server = H.MotoServer(executable)
    try:
        server.wait_until_up()
        import s3fs

        s3fs.S3FileSystem(endpoint_url=server.url, key="test", secret="test").mkdir("bucket")
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def read_only_view(tmp_path):
    """A read-only bind mount of a folder (needs root, as in this project's CI); skipped where not allowed."""
    mounts = []

    def make(source):
        view = tmp_path / f"ro-{len(mounts)}"
        view.mkdir()
        for cmd in (["mount", "--bind", str(source), str(view)],
                    ["mount", "-o", "remount,ro,bind", str(view)]):
            if subprocess.run(cmd, capture_output=True).returncode != 0:
                subprocess.run(["umount", str(view)], capture_output=True)
                pytest.skip("cannot make a read-only bind mount here (needs root)")
        mounts.append(view)
        return view

    yield make
    for view in mounts:
        subprocess.run(["umount", str(view)], capture_output=True)
