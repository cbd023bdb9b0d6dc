"""``--storage-option`` on the train commands: a credential reaches the store and no file, log or terminal.

A real store served over plain HTTP on loopback by a server that answers 403 to any
request without the right ``Authorization`` header, so a passing run proves the option
was used; the real ``train`` commands (click's runner, in process) train, resume and
evaluate over it; then every file the commands could have written is searched for the
secret, byte for byte.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from http.server import SimpleHTTPRequestHandler
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from lm.options import parse_storage_options
from store.locations import REDACTED
from tests.store_helpers import FolderServer
from train.cli import main as train_cli


class _Guarded(FolderServer):
    """A static HTTP server on loopback over a folder that serves only requests carrying ``Authorization: Bearer
    TOKEN`` (403 otherwise), and records what it served and refused."""

    def __init__(self, folder, token: str):
        self.served, self.refused = 0, []  # refused: the Authorization header of each refused request
        guard = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send_head(self):  # GET and HEAD both come here
                given = self.headers.get("Authorization")
                if given != f"Bearer {token}":
                    guard.refused.append(given)
                    self.send_error(403, "Forbidden")
                    return None
                guard.served += 1
                return super().send_head()

        super().__init__(folder, Handler)


@pytest.fixture
def guarded(tiny_store):
    """(store URL, token, server): ``tiny_store`` served only to requests with the token."""
    token = f"SECRET-{uuid.uuid4().hex}"
    server = _Guarded(Path(tiny_store).parent, token)
    try:
        yield f"{server.url}/{Path(tiny_store).name}", token, server
    finally:
        server.close()


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The commands' temporary files go under ``tmp_path/tmp`` (searched with the rest of ``tmp_path``)."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _train(*args):
    """``train ARGS`` in process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(train_cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _option(token: str) -> list[str]:
    return ["--storage-option", 'headers={"Authorization": "Bearer %s"}' % token]


def _student_args(url, out, *extra):
    return ["student", "--cache", url, "--method", "dckd", "--out", out, "--lr", "1e-3", "--max-steps", "2",
            "--batch-tokens", "400", "--device", "cpu", "--dtype", "float32", "--no-progress", *extra]


def _files_holding(secret: bytes, roots, since: float | None = None) -> list[str]:
    """Files under ``roots`` (only those changed after ``since`` when given) whose bytes contain ``secret``."""
    found = []
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                try:
                    if since is not None and os.stat(path).st_mtime < since:
                        continue
                    with open(path, "rb") as fh:
                        if secret in fh.read():
                            found.append(path)
                except OSError:  # gone meanwhile, a socket, unreadable: nothing written by us
                    continue
    return found


def _one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_a_secret_storage_option_opens_the_store_and_appears_in_no_file_or_output(guarded, tiny_store, tmp_path,
                                                                                  private_tmp, capfd):
    url, token, server = guarded
    started = time.time() - 1
    run = tmp_path / "run"
    outputs = []

    code, out, err = _train(*_student_args(url, run, "--report-to", "tensorboard", "--save-every", "1"),
                            *_option(token))
    outputs += [out, err]
    assert code == 0, err
    assert (run / "model.safetensors").is_file() and (run / "checkpoint" / "state.pt").is_file()
    assert server.served > 0 and server.refused == []  # every request carried the option's header

    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["storage_options"] == {"headers": {"Authorization": REDACTED}}  # names kept, values not
    assert recorded["cache"] == url and recorded["resolved"]["store"]["location"] == url
    saved = json.loads((run / "checkpoint" / "config.json").read_text())
    assert saved["storage_options"] == {"headers": {"Authorization": REDACTED}}

    # resumed from its own config.yaml: the recorded (redacted) options are not used, the command line's are
    code, out, err = _train("student", "--config", run / "config.yaml", "--resume", *_option(token))
    outputs += [out, err]
    assert code == 0, err
    assert server.refused == []
    code, out, err = _train("student", "--config", run / "config.yaml", "--resume")  # and without: refused
    outputs += [out, err]
    assert code == 2 and url in _one_line_error(err) and "403" in err, err
    assert server.refused and all(given is None for given in server.refused)  # nothing recorded was sent
    server.refused.clear()

    generations = tmp_path / "generations.jsonl"
    code, out, err = _train("evaluate", "--model", run, "--cache", url, *_option(token), "--device", "cpu",
                            "--generations", generations, "--max-new-tokens", "4", "--json")
    outputs += [out, err]
    assert code == 0, err
    report = json.loads(out)
    assert report["store"] == url and report["pairs"] == 2 and generations.is_file()
    assert server.refused == []

    captured = capfd.readouterr()  # anything written to the process's own stdout/stderr besides click's
    outputs += [captured.out, captured.err]
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(run / "tensorboard"))
    for text in outputs:
        assert token not in text
    # the run, its checkpoints, tensorboard events and model, the generations, the commands' temporary files
    # (private_tmp), the served store, and whatever the commands changed in the user's cache
    written = _files_holding(token.encode(), [tmp_path, Path(tiny_store).parent])
    written += _files_holding(token.encode(), [Path.home() / ".cache"], since=started)
    assert written == []
    assert len(_files_holding(b"Authorization", [run])) >= 2  # the search does see what was written


def test_without_the_option_each_command_fails_in_one_line_naming_the_store(guarded, tmp_path, private_tmp):
    url, token, server = guarded
    code, out, err = _train(*_student_args(url, tmp_path / "run"))
    line = _one_line_error(err)
    assert code == 2 and line.startswith(f"train student: {url}: access refused (HTTP 403"), line
    assert "--storage-option" in line
    assert not (tmp_path / "run").exists()

    code, out, err = _train("evaluate", "--cache", url, "--device", "cpu")
    line = _one_line_error(err)
    assert code == 2 and line.startswith(f"train evaluate: {url}: access refused (HTTP 403"), line

    code, out, err = _train(*_student_args(url, tmp_path / "run"), *_option("wrong-token"))
    line = _one_line_error(err)
    assert code == 2 and "access refused" in line and "wrong-token" not in err, line
    assert server.served == 0 and len(server.refused) == 3


@pytest.mark.parametrize("item, says", [
    ("Bearer SECRET-abc", "item 1 has no '='"),
    ("=SECRET-abc", "item 1 has an empty KEY"),
    ('headers={"Authorization": Bearer SECRET-abc}', "headers: the value starts like JSON but is not valid JSON"),
])
def test_the_one_parser_refuses_a_malformed_option_without_repeating_its_value(item, says, tmp_path):
    with pytest.raises(click.BadParameter) as refused:
        parse_storage_options(["endpoint_url=http://127.0.0.1:9000", item] if says.startswith("headers") else [item])
    message = refused.value.format_message()
    assert says in message and "--storage-option" in message and "SECRET-abc" not in message
    for command in (["student", "--cache", tmp_path / "none.zarr"], ["evaluate", "--cache", tmp_path / "none.zarr"],
                    ["cyclealign", "--out", tmp_path / "rounds", "--judge", "local:x"]):
        code, out, err = _train(*command, "--storage-option", item)
        line = _one_line_error(err)
        assert code == 2 and says in line and "SECRET-abc" not in out + err, line
    assert not (tmp_path / "rounds").exists()


def test_options_keep_their_types_and_reach_the_precompute_steps_as_given():
    from recipes.cyclealign import CycleAlignConfig, round_steps

    given = ["endpoint_url=http://127.0.0.1:9000", "anon=false", "port=9000", "profile=team",
             'headers={"Authorization": "Bearer x y"}', 'client_kwargs={"region_name": "eu"}']
    options = parse_storage_options(given)
    assert options == {"endpoint_url": "http://127.0.0.1:9000", "anon": False, "port": 9000, "profile": "team",
                       "headers": {"Authorization": "Bearer x y"}, "client_kwargs": {"region_name": "eu"}}
    steps = round_steps(CycleAlignConfig(out="rounds", judge="local:x", storage_options=options), 1, None)
    assert steps.sample.storage_options == steps.rank.storage_options == steps.train.storage_options == options


def test_a_recorded_config_gives_no_credential_back_and_a_resume_ignores_how_the_store_is_reached(tmp_path):
    from train.checkpoint import check_resumable
    from train.config import TrainConfig, recorded_settings

    url = "http://alice:pa55word@127.0.0.1:8000/team/adpa.zarr?sig=abc123&v=1"
    config = TrainConfig(cache=url, storage_options={"headers": {"Authorization": "Bearer t0ken"},
                                                     "endpoint_url": "http://127.0.0.1:9000"})
    settings = recorded_settings(config)
    assert settings["storage_options"] == {"headers": {"Authorization": REDACTED}, "endpoint_url": REDACTED}
    assert "pa55word" not in json.dumps(settings) and "abc123" not in json.dumps(settings)
    check_resumable(json.loads(json.dumps(settings)), config)  # the same run, reached with its credentials
    check_resumable(json.loads(json.dumps(settings)), TrainConfig(cache=url))  # or with others

    path = tmp_path / "config.yaml"
    plain = "http://127.0.0.1:8000/team/adpa.zarr"
    path.write_text(yaml.safe_dump({**settings, "cache": plain}))
    again = TrainConfig.from_sources(str(path), {"cache": None, "storage_options": ("profile=team",)},
                                     ["storage_options"])
    assert again.storage_options == {"profile": "team"} and again.cache == plain
    path.write_text(yaml.safe_dump({**settings, "cache": plain, "storage_options": {
        "endpoint_url": "http://127.0.0.1:9000", "headers": {"Authorization": REDACTED}}}))
    again = TrainConfig.from_sources(str(path), {"cache": None, "storage_options": ()}, [])
    assert again.storage_options == {"endpoint_url": "http://127.0.0.1:9000"}  # what a person wrote is kept

    from train.config import TrainError

    path.write_text(yaml.safe_dump(settings))  # the URL's signature was redacted: it cannot reach the store
    with pytest.raises(TrainError, match="had a credential removed"):
        TrainConfig.from_sources(str(path), {"cache": None}, [])
    assert TrainConfig.from_sources(str(path), {"cache": plain}, ["cache"]).cache == plain
