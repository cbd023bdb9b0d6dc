"""Store format 4: every array readable by any Zarr v3 implementation, every chunk checked on every read.

Stores are made by the real commands over tiny models (``precompute teacher``
with its default passes; ``precompute sample`` then ``precompute teacher
--passes pad``, plus a judge section through the store's writer), then read
array by array with TensorStore (Google's Zarr v3 implementation, not this
project's library) and with zarr-python, decoded with nothing but the rule the
array's attributes carry, and compared bit for bit with the store's own reader.
A byte flipped in a chunk must stop ``train student``, ``train evaluate`` and
``store export`` with one line naming the chunk's file, locally and over HTTP.
Format 3 stores still verify, train and evaluate (to the same numbers), and
``store upgrade`` rewrites them as format 4, verified.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from store import TeacherStore
from store import format as fmt
from store.cli import main as store_cli
from tests import store_helpers as H
from tests.refusals import one_line as refusal

REPO = Path(__file__).resolve().parents[1]
#: the codecs format 4 may name: the Zarr v3 core (bytes, blosc, crc32c) and the registered zstd
PORTABLE_CODECS = {"bytes", "blosc", "zstd", "crc32c"}
TRAIN = ["--method", "dckd", "--max-steps", "1", "--batch-tokens", "300", "--device", "cpu", "--no-progress"]


def _teacher_args(tiny_models, tiny_dataset, out):
    """``precompute teacher``'s command line with the ``tiny_store`` fixture's settings (conftest.py)."""
    teacher, student = tiny_models
    return ["teacher", "--out", str(out), "--teacher", str(teacher), "--student", str(student), "--dataset",
            str(tiny_dataset), "--top-k", "8", "--max-length", "96", "--max-new-tokens", "12",
            "--examples-per-part", "4", "--device", "cpu", "--dtype", "float32", "--no-progress"]


def _precompute(args):
    from precompute.cli import main as precompute_cli

    result = CliRunner().invoke(precompute_cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_models, tiny_dataset):
    """``precompute teacher`` over tiny models, default passes (pairs, dpo_ref, adpa), through the CLI."""
    out = tmp_path_factory.mktemp("v4") / "adpa.zarr"
    _precompute(_teacher_args(tiny_models, tiny_dataset, out))
    return out


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory, tiny_models):
    """``precompute sample`` then ``precompute teacher --passes pad`` through the CLI, and a judge section
    (``precompute rank``'s arrays) through the store's writer: the samples' sections of every kind."""
    teacher, student = tiny_models
    root = tmp_path_factory.mktemp("v4-sampled")
    prompts = root / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) for i in range(9)))
    out = root / "pad.zarr"
    common = ["--dataset", prompts, "--split", "train", "--max-new-tokens", "8", "--max-length", "64",
              "--examples-per-part", "4", "--device", "cpu", "--dtype", "float32", "--no-progress"]
    _precompute(["sample", "--out", out, "--model", student, "--n", "3", "--keep", "3", *common])
    _precompute(["teacher", "--out", out, "--teacher", teacher, "--passes", "pad", "--top-k", "8", *common])
    store = TeacherStore.open(str(out), mode="a")
    store.register_pass(fmt.PASS_SAMPLES_JUDGE, {"judge": "synthetic, for the codecs"})
    for part in range(store.num_parts("train")):
        base = store.read_section("train", part, fmt.SET_SAMPLES)
        sequences, groups = base["example_index"].shape[0], base["group_example_index"].shape[0]
        audit = [json.dumps({"group": g, "reply": "B > A > C", "error": None}).encode() for g in range(groups)]
        rng = np.random.default_rng(part)
        store.write_section("train", part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE, {
            "judge_rank": rng.integers(-1, 3, sequences).astype(np.int16),
            "white_rank": rng.integers(0, 3, sequences).astype(np.int16),
            "agreed_rank": rng.integers(-1, 3, sequences).astype(np.int16),
            "group_status": rng.integers(0, 3, groups).astype(np.int8),
            "group_tries": np.ones(groups, dtype=np.int8),
            "group_audit_offsets": np.concatenate([[0], np.cumsum([len(a) for a in audit])]).astype(np.int64),
            "audit_json": np.frombuffer(b"".join(audit), dtype=np.uint8)})
    store.refresh_manifest()
    return out


def _stored_arrays(location):
    """(array's folder, its zarr.json, the values the store's reader returns) of every array of every complete
    section of the store at ``location``."""
    store = TeacherStore.open(str(location))
    sections = list(store.complete_sections())
    decoded = store.read_sections([(ref.split, ref.part, ref.sequence_set, ref.section) for ref, _ in sections])
    for (ref, _attrs), arrays in zip(sections, decoded):
        for spec in fmt.arrays_of(ref.sequence_set, ref.section):
            if spec.name in arrays:
                folder = Path(location) / ref.path / fmt.stored_name(spec)
                yield folder, json.loads((folder / "zarr.json").read_text()), arrays[spec.name]


def test_every_array_reads_the_same_with_tensorstore_and_zarr_python(cli_store, sampled_store):
    """Both readers give the same stored values for every array; the rule in the array's attributes turns them
    into the store reader's values, bit for bit; every codec is a portable one, crc32c last."""
    import warnings

    import tensorstore as ts
    import zarr

    seen, sections = 0, set()
    for location in (cli_store, sampled_store):
        for folder, meta, ours in _stored_arrays(location):
            names = [codec["name"] for codec in meta["codecs"]]
            assert set(names) <= PORTABLE_CODECS and names[0] == "bytes" and names[-1] == "crc32c", (folder, names)
            spec = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(folder)}}, read=True)
            by_tensorstore = spec.result().read().result()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                by_zarr = zarr.open_array(str(folder), mode="r")[...]
            assert by_tensorstore.dtype == by_zarr.dtype and np.array_equal(by_tensorstore, by_zarr), folder
            values = H.decode_by_attributes(by_tensorstore, meta.get("attributes") or {})
            assert values.dtype == ours.dtype and values.tobytes() == ours.tobytes(), folder
            seen += 1
            place = folder.relative_to(location).parts  # split, part, set[, section], array
            sections.add(place[3] if len(place) == 5 else fmt.BASE)
    assert sections >= {fmt.BASE, fmt.SECTION_TEACHER, fmt.SECTION_STUDENT_INIT, fmt.SECTION_REFERENCE,
                        fmt.SECTION_TEACHER_MCQ, fmt.SECTION_JUDGE}
    assert seen > 100


def test_the_decoding_rule_is_in_the_attributes_and_cf_readers_cannot_misread_the_steps(cli_store):
    teacher = Path(cli_store) / "train/part-00000/pairs/teacher"
    assert not (teacher / fmt.ARRAY_TOPK_LOGP).exists()  # an old reader finds no topk_logp to misread
    steps = json.loads((teacher / fmt.ARRAY_TOPK_LOGP_STEPS / "zarr.json").read_text())
    tail = json.loads((teacher / fmt.ARRAY_TAIL_LOGP / "zarr.json").read_text())
    assert steps["data_type"] == tail["data_type"] == "uint16"
    rule = steps["attributes"][fmt.ATTRS_NAMESPACE]
    assert rule["decodes_to"] == "topk_logp" and rule["cumulative_axis"] == 1 and rule["scale"] == -1 / 128
    assert "scale_factor" not in steps["attributes"]  # xarray would scale the steps without cumulating them
    assert tail["attributes"]["scale_factor"] == -1 / 128 and tail["attributes"]["add_offset"] == 0.0
    assert tail["attributes"][fmt.ATTRS_NAMESPACE]["max_abs_error"] == 0.5 / 128
    description = TeacherStore.open(str(cli_store)).attrs["format_description"]
    assert "topk_logp_steps" in description["decoding"] and "crc32c" in description["decoding"]
    assert fmt.ARRAY_TOPK_LOGP_STEPS in description["arrays"]["teacher"]


NO_WARNING_READER = """
import sys, zarr
root = zarr.open_group(sys.argv[1], mode="r")
count = 0
def walk(group):
    global count
    for _, array in group.arrays():
        array[...]
        count += 1
    for _, child in group.groups():
        walk(child)
walk(root)
print(count)
"""


def test_zarr_python_reads_a_format_4_store_with_warnings_as_errors(cli_store, tmp_path):
    """Not one "Numcodecs codecs are not in the Zarr version 3 specification" warning: run without this project
    (its import silences that warning for older stores), every warning an error."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-W", "error", "-c", NO_WARNING_READER, str(cli_store)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 50


def test_values_decode_to_format_3_bit_for_bit():
    """Format 4's integers decode to exactly what format 3's numcodecs filters give, ties, clamping, -0.0 and
    the floor included; sorted rows use per-row steps, any row round-trips (uint16 arithmetic wraps)."""
    import zarr

    rng = np.random.default_rng(7)
    top = -np.sort(rng.exponential(3.0, size=(300, 8)), axis=1).astype(np.float32)
    top[0] = [0.0, -0.0, -1 / 256, -3 / 256, -5 / 256, -7 / 256, -499.999, -500.0]  # ties and the ends
    top[1] = [-0.5, -1.0, -np.inf, np.nan, -600.0, 0.1, -2.0, -2.0]  # clamped, and not sorted at all
    for spec in (fmt.SECTION_ARRAYS[fmt.SECTION_TEACHER][1], fmt.SECTION_ARRAYS[fmt.SECTION_REFERENCE][0]):
        values = fmt.prepare_values(spec, top)
        v3 = zarr.create_array(zarr.storage.MemoryStore(), shape=values.shape, chunks=(64, 8), dtype="float32",
                               fill_value=0, **fmt.codecs_for(spec, np.dtype("float32"), version=3))
        v3[...] = values
        stored = fmt.encode_stored(spec, values)
        assert stored.dtype == np.uint16
        q = np.round(-values.astype(np.float64) * 128).astype(np.int64)  # exact: values are float32
        if spec.encoding == fmt.ENC_LOGP_SORTED:  # descending rows: q's first entry, then non-negative steps
            assert np.array_equal(stored[2:, 0], q[2:, 0]) and np.array_equal(stored[2:, 1:], np.diff(q[2:], axis=1))
        else:
            assert np.array_equal(stored, q)
        got = fmt.decode_stored(spec, stored)
        assert got.dtype == np.float32 and got.tobytes() == v3[...].tobytes(), spec.name
        assert not np.signbit(got[got == 0]).any()  # no -0.0


def test_a_chunk_is_checked_against_the_crc32c_residue():
    """The stream checks a chunk by the CRC-32C of the whole file: a constant for data followed by its own CRC
    (little endian), as zarr's crc32c codec writes; one flipped bit anywhere breaks it."""
    import google_crc32c

    from store import stream

    rng = np.random.default_rng(3)
    for size in (0, 1, 7, 64, 1000):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        blob = data + google_crc32c.value(data).to_bytes(4, "little")
        assert stream._crc32c_ok(blob)
        for bit in range(0, 8 * len(blob), max(1, len(blob))):
            damaged = bytearray(blob)
            damaged[bit // 8] ^= 1 << (bit % 8)
            assert not stream._crc32c_ok(bytes(damaged))
    assert not stream._crc32c_ok(b"\x00\x01")


# -- a damaged chunk ------------------------------------------------------------------------------------------

#: arrays a flipped byte is put into, the pairs' (what `train student --method dckd` and `train evaluate` read)
DAMAGED = ["teacher/topk_ids", f"teacher/{fmt.ARRAY_TOPK_LOGP_STEPS}", "teacher/tail_logp", "teacher/target_logp",
           "input_ids"]


def _damage(location: Path, array: str) -> list[str]:
    """One byte of chunk 0 of ``pairs/<array>`` flipped in every part of every split; the chunks' paths."""
    store = TeacherStore.open(str(location))
    damaged = []
    for split in store.splits():
        for part in range(store.num_parts(split)):
            folder = location / fmt.group_path(split, part, fmt.SET_PAIRS) / array / "c"
            chunk = next(p for p in sorted(folder.rglob("*")) if p.is_file())
            data = bytearray(chunk.read_bytes())
            data[len(data) // 2] ^= 0x10
            chunk.write_bytes(bytes(data))
            damaged.append(chunk.relative_to(location).as_posix())
    return damaged


@pytest.mark.parametrize("where", ["local", "http"])
@pytest.mark.parametrize("array", DAMAGED)
def test_a_flipped_byte_stops_training_and_evaluation_naming_the_chunk(cli_store, tiny_models, tmp_path, array,
                                                                       where):
    from train.cli import main as train_cli

    damaged = tmp_path / "served" / "damaged.zarr"
    shutil.copytree(cli_store, damaged)
    chunks = _damage(damaged, array)
    server = H.FolderServer(damaged.parent) if where == "http" else None
    try:
        location = f"{server.url}/damaged.zarr" if server else str(damaged)
        for command, args in (("student", ["--out", str(tmp_path / "run"), *TRAIN]),
                              ("evaluate", ["--model", str(tiny_models[1]), "--device", "cpu"])):
            result = CliRunner().invoke(train_cli, [command, "--cache", location, *args])
            message = refusal(result, command)
            named = [chunk for chunk in chunks if f"{location}/{chunk}: damaged chunk" in message]
            assert len(named) == 1 and "crc32c" in message, message
    finally:
        if server:
            server.close()


def test_export_and_verify_name_the_damaged_chunk(cli_store, tmp_path):
    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(cli_store, damaged)
    chunks = _damage(damaged, f"teacher/{fmt.ARRAY_TOPK_LOGP_STEPS}")
    result = CliRunner().invoke(store_cli, ["export", str(damaged), "--out", str(tmp_path / "x.h5")])
    lines = [line for line in result.stderr.splitlines() if line.startswith("store export:")]  # after progress
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert result.stderr.rstrip().endswith(lines[0]) and not result.stdout
    assert any(f"{damaged}/{chunk}: damaged chunk" in lines[0] for chunk in chunks) and "crc32c" in lines[0]
    assert not (tmp_path / "x.h5").exists()
    verify = CliRunner().invoke(store_cli, ["verify", str(damaged)])
    assert verify.exit_code == 1
    for chunk in chunks:  # every damaged chunk, each on its own line
        assert f"DAMAGED {chunk}: cannot be decoded (its crc32c differs from its bytes)" in verify.output


def test_a_missing_chunk_file_is_damage_not_zeros(cli_store, tmp_path):
    """zarr reads a missing chunk as its fill value (zeros); every format 4 chunk is written, so readers refuse."""
    from train.cli import main as train_cli

    damaged = tmp_path / "damaged.zarr"
    shutil.copytree(cli_store, damaged)
    missing = [f"{fmt.group_path(split, 0, fmt.SET_PAIRS, fmt.SECTION_TEACHER)}/target_logp/c/0"
               for split in ("train", "test")]
    for chunk in missing:
        (damaged / chunk).unlink()
    result = CliRunner().invoke(train_cli, ["student", "--cache", str(damaged), "--out", str(tmp_path / "run"),
                                            *TRAIN])
    message = refusal(result, "student")
    assert any(f"{damaged}/{chunk}: damaged chunk" in message for chunk in missing) and "missing" in message
    exported = CliRunner().invoke(store_cli, ["export", str(damaged), "--out", str(tmp_path / "x.h5")])
    assert exported.exit_code == 2 and "target_logp: its values differ from their recorded checksum" in exported.stderr
    assert not (tmp_path / "x.h5").exists()


# -- format 3 stores ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def v3_store(cli_store, tmp_path_factory):
    """``cli_store`` as format 3 wrote it (numcodecs filters, no crc32c, topk_logp), same checksums."""
    location = tmp_path_factory.mktemp("v3") / "adpa-v3.zarr"
    shutil.copytree(cli_store, location)
    H.as_version(str(location), 3)
    return location


def test_a_format_3_store_verifies_trains_and_evaluates_to_the_same_numbers(v3_store, cli_store, tiny_models,
                                                                          tmp_path):
    from train.cli import main as train_cli

    old = TeacherStore.open(str(v3_store))
    assert old.format_version == 3 and old.verify() == []
    assert (Path(v3_store) / "train/part-00000/pairs/teacher/topk_logp").is_dir()
    assert H.all_checksums(old) == H.all_checksums(TeacherStore.open(str(cli_store)))
    reports = []
    for location, name in ((v3_store, "v3"), (cli_store, "v4")):
        trained = CliRunner().invoke(train_cli, ["student", "--cache", str(location), "--out", str(tmp_path / name),
                                                 "--method", "dckd", "--max-steps", "2", "--batch-tokens", "300",
                                                 "--device", "cpu", "--no-progress"])
        assert trained.exit_code == 0, trained.output
        assert (tmp_path / name / "model.safetensors").is_file()
        evaluated = CliRunner().invoke(train_cli, ["evaluate", "--cache", str(location), "--model",
                                                   str(tmp_path / name), "--device", "cpu", "--json"])
        assert evaluated.exit_code == 0, evaluated.output
        reports.append(_numbers(json.loads(evaluated.stdout)))
    assert reports[0] == reports[1]  # the same decoded values: the same training and the same evaluation
    assert reports[0]["pairs"] == 2 and isinstance(reports[0]["kl_chosen"], float)


def _numbers(report):
    """A report's numbers (what does not name a location or a time)."""
    if isinstance(report, dict):
        return {k: _numbers(v) for k, v in report.items() if isinstance(v, (int, float, dict, list))}
    if isinstance(report, list):
        return [_numbers(v) for v in report]
    return report


def test_store_upgrade_rewrites_format_3_as_format_4_verified(v3_store, cli_store, tmp_path):
    upgraded = tmp_path / "upgraded.zarr"
    result = CliRunner().invoke(store_cli, ["upgrade", str(v3_store), str(upgraded)])
    assert result.exit_code == 0, result.output
    assert "(format 3)" in result.stdout and "(format 4)" in result.stdout
    store, original = TeacherStore.open(str(upgraded)), TeacherStore.open(str(cli_store))
    assert store.format_version == 4 and store.verify() == []
    assert store.attrs["upgraded_from"]["format_version"] == 3
    assert store.attrs["format_description"] == json.loads(json.dumps(fmt.DESCRIPTION))
    assert H.all_checksums(store) == H.all_checksums(original)
    assert store.content_keys() == original.content_keys()  # keys name the numbers, which did not change
    for folder, _meta, _values in _stored_arrays(cli_store):  # the very files format 4's writer writes
        relative = folder.relative_to(cli_store)
        for chunk in sorted(p for p in folder.rglob("*") if p.is_file()):
            assert (upgraded / relative / chunk.relative_to(folder)).read_bytes() == chunk.read_bytes(), chunk
    again = CliRunner().invoke(store_cli, ["upgrade", str(v3_store), str(upgraded)])
    assert again.exit_code == 0 and "0 sections written" in again.stdout


def test_reuse_from_a_format_3_store_reencodes_every_section(v3_store, cli_store, tiny_models, tiny_dataset,
                                                             tmp_path, forbid_model_loading):
    """Content keys do not change with format 4 (the numbers do not): a run reuses a format 3 store's sections,
    each re-encoded as format 4 and verified, and loads no model."""
    forbid_model_loading()
    assert TeacherStore.open(str(v3_store)).key_layout() == TeacherStore.open(str(cli_store)).key_layout()
    out = tmp_path / "mine.zarr"
    result = _precompute([*_teacher_args(tiny_models, tiny_dataset, out), "--reuse-from", v3_store])
    assert "reused from" in result.stdout
    store = TeacherStore.open(str(out))
    assert store.format_version == 4 and store.verify() == []
    assert H.all_checksums(store) == H.all_checksums(TeacherStore.open(str(cli_store)))
    assert (out / "train/part-00000/pairs/teacher" / fmt.ARRAY_TOPK_LOGP_STEPS).is_dir()
    assert all(attrs.get("reused_from") for _ref, attrs in store.complete_sections())


def test_every_array_of_a_section_has_a_stored_name_of_its_own():
    """Two specs of one section stored under one name would overwrite each other (the raw and the mapped
    teacher log-probs of a cross-tokenizer section once did): names are distinct in every version."""
    for version in fmt.READABLE_VERSIONS:
        for sequence_set in fmt.SEQUENCE_SETS:
            for section in (fmt.BASE,) + fmt.SECTIONS:
                try:
                    specs = fmt.arrays_of(sequence_set, section)
                except ValueError:
                    continue
                names = [fmt.stored_name(spec, version) for spec in specs]
                assert len(names) == len(set(names)), (version, sequence_set, section, names)
