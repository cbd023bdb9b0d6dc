"""Tests of the teacher-signal store: format round trip, concurrent and interrupted writers,
verification, refusals, plain-zarr readability, streaming, S3, info and HDF5 export.

Stores are small synthetic ones from :mod:`tests.store_helpers` (deterministic per part),
so a store written any way (serially, by racing processes, resumed after a kill) can be
compared with one written the plain way, checksum by checksum.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from store.teacher_store import STAGING_SUFFIX
from store import (ExampleReader, ExampleStream, FormatMismatch, IncompleteSection, TeacherStore,
                   TokenizerMismatchError)
from store import format as fmt
from store.cli import main as store_cli
from tests import store_helpers as H

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGP_ENCODINGS = (fmt.ENC_LOGP_SORTED, fmt.ENC_LOGP)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory):
    """The synthetic store written the plain way, once; tests only read it."""
    return H.write_synthetic_store(str(tmp_path_factory.mktemp("reference") / "ref.zarr"))


@pytest.fixture(scope="module")
def reference_sums(reference_store):
    return H.all_checksums(reference_store)


def _spec(sequence_set, section, name):
    return next(s for s in fmt.arrays_of(sequence_set, section) if s.name == name)


# -- format round trip ----------------------------------------------------------------------------


def test_round_trip_every_array(reference_store):
    store = TeacherStore.open(reference_store.location, tokenizer_hash=H.TOKENIZER["hash"])
    seen = set()
    for split, part, sequence_set, section, written in H.expected_sections(store):
        assert store.is_complete(split, part, sequence_set, section)
        read = store.read_section(split, part, sequence_set, section)
        # what was written comes back: every required array, optional ones (tail_logp) only when written
        assert set(read) == set(written) and set(fmt.required_names(fmt.arrays_of(sequence_set, section))) <= set(read)
        for name, values in written.items():
            spec = _spec(sequence_set, section, name)
            got = read[name]
            assert got.shape == values.shape, (split, part, sequence_set, section, name)
            if spec.encoding in LOGP_ENCODINGS:
                assert got.dtype == np.float32
                err = np.abs(got.astype(np.float64) - values.astype(np.float64)).max(initial=0.0)
                assert err <= fmt.LOGP_MAX_ABS_ERROR + 1e-6, (split, part, sequence_set, section, name, err)
            else:
                if spec.dtype == "token_id":
                    assert got.dtype == np.uint16  # vocab 1000 fits
                else:
                    assert got.dtype == np.dtype(spec.dtype)
                np.testing.assert_array_equal(got, values.astype(got.dtype), err_msg=f"{split}/{part}/{section}/{name}")
            seen.add((sequence_set, section, name))
    # every array the format declares for the sets and sections written was checked
    expected = {(st, sec, s.name) for st, secs in H.SECTIONS_OF.items() for sec in (fmt.BASE, *secs)
                for s in fmt.arrays_of(st, sec) if not s.optional}
    assert seen == expected
    assert store.verify() == []


# -- concurrent writers ---------------------------------------------------------------------------


def spawned_together(target, argses: list[tuple]) -> list[int]:
    """Exit codes of ``target(*args, barrier)`` run in one spawned process per ``args``, sharing a barrier."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(argses))
    workers = [ctx.Process(target=target, args=(*args, barrier)) for args in argses]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    return [w.exitcode for w in workers]


def test_concurrent_writers_in_separate_processes(tmp_path, reference_store, reference_sums):
    location = str(tmp_path / "concurrent.zarr")
    H.create_store(location)
    store = TeacherStore.open(location)
    jobs = [(split, part) for split in store.splits() for part in range(store.num_parts(split))]
    assert spawned_together(H.writer_process, [(location, jobs[i::3], 0) for i in range(3)]) == [0, 0, 0]
    store = TeacherStore.open(location, mode="a")
    store.refresh_manifest()
    sums = H.all_checksums(store)
    assert set(sums) == set(reference_sums)
    for path in sorted(reference_sums):  # part by part, array by array
        assert sums[path] == reference_sums[path], path
    assert store.verify() == []
    # the values themselves, not only the recorded sums
    for split, part, sequence_set, section, _ in H.expected_sections(store):
        a = store.read_section(split, part, sequence_set, section)
        b = reference_store.read_section(split, part, sequence_set, section)
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_writers_making_the_same_part_group_at_one_instant_all_succeed(tmp_path):
    """Independent writers start a part together: each creates its group; the losers open the winner's."""
    location = str(tmp_path / "race.zarr")
    H.create_store(location)
    store = TeacherStore.open(location)
    parts = [(split, part) for split in store.splits() for part in range(store.num_parts(split))]
    assert spawned_together(H.part_group_process, [(location, parts)] * 4) == [0, 0, 0, 0]
    for split, part in parts:
        group = zarr.open_group(location, path=f"{split}/{fmt.part_name(part)}", mode="r")
        assert (group.attrs["example_start"], group.attrs["example_stop"]) == store.part_range(split, part)


# -- a writer killed in the middle of a section ---------------------------------------------------

KILLED_WRITER = textwrap.dedent("""
    import os, sys
    from zarr.core.array import AsyncArray
    from store import TeacherStore, format as fmt
    from tests import store_helpers as H

    victim = sys.argv[2]
    writing = [None]
    original_write, original_setitem = TeacherStore.write_section, AsyncArray.setitem

    def tracking(self, split, part, sequence_set, section, *args, **kwargs):
        writing[0] = fmt.group_path(split, part, sequence_set, section)
        return original_write(self, split, part, sequence_set, section, *args, **kwargs)

    async def setitem_then_die(self, *args, **kwargs):
        await original_setitem(self, *args, **kwargs)
        if writing[0] == victim:
            os._exit(17)  # killed right after the section's first array was written

    TeacherStore.write_section, AsyncArray.setitem = tracking, setitem_then_die
    store = H.create_store(sys.argv[1])
    H.write_parts(store, "train", range(store.num_parts("train")))
""")


def test_killed_writer_resumes(tmp_path, reference_sums):
    location = str(tmp_path / "killed.zarr")
    victim = fmt.group_path("train", 1, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, location, victim], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 17, done.stderr

    # the victim was being built beside the store (its first array is on disk there): in the store it is absent
    staging = location + STAGING_SUFFIX
    leftovers = os.listdir(staging)
    assert len(leftovers) == 1
    on_disk = [name for name in ("topk_ids", "topk_logp", "target_logp", "logp_sum")
               if os.path.exists(os.path.join(staging, leftovers[0], name, "c"))]
    assert on_disk, "the victim section should have been killed after writing an array"
    assert json.load(open(os.path.join(staging, leftovers[0], "zarr.json")))["attributes"]["complete"] is False
    assert not os.path.exists(os.path.join(location, victim))
    store = TeacherStore.open(location, mode="a")
    assert not store.is_complete("train", 1, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
    assert store.is_complete("train", 1, fmt.SET_PAIRS, fmt.BASE)
    with pytest.raises(IncompleteSection):
        store.read_section("train", 1, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
    with pytest.raises(IncompleteSection):
        ExampleStream(store, "train", {fmt.SET_PAIRS: [fmt.SECTION_TEACHER]})
    store = H.create_store(location)  # a writer opening the store again cleans the dead writer's leftover
    assert not os.path.exists(staging)
    before = H.all_checksums(store)
    assert victim not in before and fmt.group_path("train", 0, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ) in before

    # resume: skip complete sections, write the rest
    written = []
    original = store.write_section

    def recording(split, part, sequence_set, section, arrays, attrs=None):
        written.append(fmt.group_path(split, part, sequence_set, section))
        return original(split, part, sequence_set, section, arrays, attrs)

    store.write_section = recording
    for split in store.splits():
        H.write_parts(store, split, range(store.num_parts(split)), skip_complete=True)
    assert victim in written
    assert not set(written) & set(before), "a complete section was computed twice"
    store.refresh_manifest()
    after = H.all_checksums(store)
    assert after == reference_sums  # equal to an uninterrupted write
    assert store.verify() == []


# -- verify finds damage --------------------------------------------------------------------------


def test_verify_finds_corrupted_and_missing_chunks(tmp_path):
    location = str(tmp_path / "damaged.zarr")
    H.write_synthetic_store(location, num_examples={"train": 6, "test": 3})
    runner = CliRunner()
    ok = runner.invoke(store_cli, ["verify", location])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output

    corrupted = fmt.group_path("train", 1, fmt.SET_PAIRS, fmt.SECTION_TEACHER) + "/" + fmt.ARRAY_TOPK_LOGP_STEPS
    chunk = os.path.join(location, corrupted, "c", "0", "0")
    data = bytearray(open(chunk, "rb").read())
    middle = len(data) // 2
    for i in range(middle, min(middle + 8, len(data))):
        data[i] ^= 0xFF
    with open(chunk, "wb") as fh:
        fh.write(bytes(data))
    missing = fmt.group_path("test", 0, fmt.SET_GENERATED) + "/input_ids"
    missing_key = f"{missing}/c/0"
    os.remove(os.path.join(location, missing_key))

    result = runner.invoke(store_cli, ["verify", location])
    assert result.exit_code == 1, result.output
    assert corrupted in result.output  # part, set, section and array
    assert missing in result.output and missing_key in result.output
    assert "2 problem(s)" in result.output

    # the same as a real command, progress on stderr
    done = subprocess.run([sys.executable, "-m", "store.cli", "verify", location], env=_env(), cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert corrupted in done.stdout and missing_key in done.stdout
    assert "section" in done.stderr  # tqdm's progress
    assert "Traceback" not in done.stderr


# -- refusals -------------------------------------------------------------------------------------


def test_tokenizer_mismatch_refused_with_both_hashes(reference_store):
    other = "ffff" * 16
    with pytest.raises(TokenizerMismatchError) as info:
        TeacherStore.open(reference_store.location, tokenizer_hash=other)
    assert H.TOKENIZER["hash"] in str(info.value) and other in str(info.value)
    with pytest.raises(TokenizerMismatchError) as info:
        H.create_store(reference_store.location, tokenizer={"name": "other", "hash": other})
    assert H.TOKENIZER["hash"] in str(info.value) and other in str(info.value)


def test_unknown_format_version_refused(tmp_path):
    location = str(tmp_path / "future.zarr")
    H.create_store(location, num_examples={"train": 2})
    meta_path = os.path.join(location, "zarr.json")
    meta = json.load(open(meta_path))
    meta["attributes"]["format"]["version"] = 99
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(FormatMismatch) as info:
        TeacherStore.open(location)
    message = str(info.value)
    assert "version 99" in message and ", ".join(str(v) for v in fmt.READABLE_VERSIONS) in message
    for command in (["info", location], ["verify", location], ["export", location, "--out", str(tmp_path / "x.h5")]):
        result = CliRunner().invoke(store_cli, command)
        assert result.exit_code == 2
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "version 99" in lines[0] and "Traceback" not in result.output
    result = CliRunner().invoke(store_cli, ["info", str(tmp_path / "nothing-here")])
    assert result.exit_code == 2 and "no teacher-signal store" in result.output


# -- readable without this project ----------------------------------------------------------------

PLAIN_READER = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np, zarr, dask.array as da
    warnings.simplefilter("error")  # format 4: only codecs of the Zarr v3 specification, so no warning at all
    assert "store" not in sys.modules and not any("{repo}" == p.rstrip("/") for p in sys.path), sys.path
    root = zarr.open_group(sys.argv[1], mode="r")
    assert root.attrs["format"]["name"] == "distill-cache/teacher-signal-store"
    out = {{}}
    for path, stored in json.loads(sys.argv[2]).items():
        array = root[stored]
        a = array[...]
        d = da.from_zarr(sys.argv[1], component=stored).compute()
        assert np.array_equal(a, d)
        rule = array.attrs.get("distill_cache")  # the format description's "decoding", as written beside it
        if rule:
            f32 = np.float32
            q = np.cumsum(a, axis=rule["cumulative_axis"], dtype=a.dtype) if "cumulative_axis" in rule else a
            a = q.astype(f32) * f32(rule["scale"]) + f32(rule["offset"]) + f32(0.0)
        out[path] = a
    np.savez(sys.argv[3], **{{p.replace("/", "|"): v for p, v in out.items()}})
""")


def test_plain_zarr_and_dask_read_without_project(tmp_path, reference_store):
    specs = {(sequence_set, section): {spec.name: spec for spec in fmt.arrays_of(sequence_set, section)}
             for sequence_set in fmt.SEQUENCE_SETS for section in (fmt.BASE, *fmt.SECTIONS)}
    paths = {f"{fmt.group_path(split, part, sequence_set, section)}/{name}":  # path of the values -> of the array
             f"{fmt.group_path(split, part, sequence_set, section)}/"
             f"{fmt.stored_name(specs[(sequence_set, section)][name])}"
             for split, part, sequence_set, section, written in H.expected_sections(reference_store)
             for name in written if part == 1 or split == "test"}
    out = tmp_path / "plain.npz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-I", "-c", PLAIN_READER.format(repo=REPO), reference_store.location,
                           json.dumps(paths), str(out)], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    plain = np.load(out)
    assert len(plain.files) == len(paths)
    for path in paths:
        group, name = path.rsplit("/", 1)
        split, part_name, sequence_set, *section = group.split("/")
        ours = reference_store.read_section(split, fmt.part_index(part_name), sequence_set,
                                            section[0] if section else fmt.BASE, [name])[name]
        got = plain[path.replace("/", "|")]
        assert got.dtype == ours.dtype
        np.testing.assert_array_equal(got, ours)


# -- streaming ------------------------------------------------------------------------------------


def _content(example):
    """Everything an example holds, as plain comparable values."""
    seqs = sorted(((s.sequence_set, s.role, s.input_ids.tolist(), s.prompt_length,
                    sorted((k, v.tolist()) for k, v in s.response.items()), sorted(s.scalars.items()))
                   for s in example.sequences), key=lambda t: (t[0], t[1]))
    return (example.split, example.example_index, seqs, sorted((k, v.tolist()) for k, v in example.group.items()))


def test_streaming_shuffle_skip_and_random_access(reference_store):
    store = TeacherStore.open(reference_store.location)
    stream = ExampleStream(store, "train", H.ALL_NEEDS, shuffle=True, seed=7, buffer_examples=3)
    n = store.num_examples("train")

    def order(epoch, skip=0, s=stream):
        return [e.example_index for e in s.iterate(epoch=epoch, skip=skip)]

    first = order(0)
    assert sorted(first) == list(range(n))  # every example exactly once
    assert order(0) == first  # seeded: deterministic
    assert order(1) != first and sorted(order(1)) == list(range(n))  # a new order per epoch
    other_seed = ExampleStream(store, "train", H.ALL_NEEDS, shuffle=True, seed=8, buffer_examples=3)
    assert order(0, s=other_seed) != first
    for skip in (1, 4, n - 1):
        assert order(0, skip=skip) == first[skip:]  # resuming continues the same order
        assert order(1, skip=skip) == order(1)[skip:]
    plain = ExampleStream(store, "train", H.ALL_NEEDS, shuffle=False)
    assert order(0, s=plain) == list(range(n))

    reader = ExampleReader(store, "train", H.ALL_NEEDS, cache_parts=1)
    streamed = list(stream.iterate(epoch=0))
    for example in streamed:
        assert _content(reader[example.example_index]) == _content(example)
    # what is streamed is, bit for bit, what zarr reads (the stream decodes chunk files itself)
    by_index = {e.example_index: e for e in streamed}
    for part in range(store.num_parts("train")):
        for sequence_set, sections in H.ALL_NEEDS.items():
            base = store.read_section("train", part, sequence_set)
            signals = {sec: store.read_section("train", part, sequence_set, sec) for sec in sections}
            for s, ex in enumerate(base["example_index"].tolist()):
                seq = by_index[ex].one(sequence_set, int(base["role"][s]))
                t0, t1 = base["token_offsets"][s], base["token_offsets"][s + 1]
                assert seq.input_ids.tobytes() == base["input_ids"][t0:t1].tobytes()
                assert seq.prompt_length == base["prompt_length"][s]
                r0, r1 = base["response_offsets"][s], base["response_offsets"][s + 1]
                for sec in sections:
                    for spec in fmt.arrays_of(sequence_set, sec):
                        if spec.optional and spec.name not in signals[sec]:
                            assert f"{sec}/{spec.name}" not in seq.response
                            continue
                        values = signals[sec][spec.name]
                        if spec.axis == fmt.AXIS_RESPONSE:
                            got = seq.response[f"{sec}/{spec.name}"]
                            assert got.dtype == values.dtype and got.tobytes() == values[r0:r1].tobytes()
                        elif spec.axis == fmt.AXIS_SEQUENCE:
                            assert seq.scalars[f"{sec}/{spec.name}"] == float(values[s])
            if sequence_set == fmt.SET_SAMPLES:
                offsets = signals[fmt.SECTION_TEACHER_MCQ]["group_pair_offsets"]
                for g, ex in enumerate(base["group_example_index"].tolist()):
                    got = by_index[ex].group["teacher_mcq/pair_prob"]
                    want = signals[fmt.SECTION_TEACHER_MCQ]["pair_prob"][offsets[g]:offsets[g + 1]]
                    assert got.tobytes() == want.tobytes()

    from train.batches import collate, token_budget_batches

    batches = list(token_budget_batches(stream.iterate(epoch=0), 200))
    assert [e.example_index for b in batches for e in b] == first
    batch = collate(batches[0])
    assert batch.num_response_tokens == sum(e.num_response_tokens for e in batches[0])
    assert batch.response["teacher/topk_ids"].shape == (batch.num_response_tokens, H.TOP_K)


# -- S3 -------------------------------------------------------------------------------------------


def test_s3_round_trip_info_and_verify(s3_endpoint, monkeypatch):
    options = {"endpoint_url": s3_endpoint, "key": "test", "secret": "test"}
    url = "s3://bucket/x.zarr"
    sets = [fmt.SET_PAIRS]  # base, teacher and student_init: every lossless and lossy encoding but one
    H.write_synthetic_store(url, num_examples={"train": 2}, examples_per_part=2, storage_options=options, sets=sets)

    store = TeacherStore.open(url, storage_options=options, tokenizer_hash=H.TOKENIZER["hash"])
    assert not store.is_local
    for split, part, sequence_set, section, written in H.expected_sections(store, sets=sets):
        read = store.read_section(split, part, sequence_set, section)
        for name, values in written.items():
            if _spec(sequence_set, section, name).encoding in LOGP_ENCODINGS:
                assert np.abs(read[name] - values).max(initial=0) <= fmt.LOGP_MAX_ABS_ERROR + 1e-6
            else:
                np.testing.assert_array_equal(read[name], values.astype(read[name].dtype))
    stream = ExampleStream(store, "train", {fmt.SET_PAIRS: list(H.SECTIONS_OF[fmt.SET_PAIRS])}, seed=1)
    examples = list(stream)
    assert sorted(e.example_index for e in examples) == [0, 1]
    teacher = store.read_section("train", 0, fmt.SET_PAIRS, fmt.SECTION_TEACHER)
    streamed = np.concatenate([examples[i].one(fmt.SET_PAIRS, role).response["teacher/topk_logp"]
                               for i in np.argsort([e.example_index for e in examples])
                               for role in (fmt.ROLE_CHOSEN, fmt.ROLE_REJECTED)])
    assert streamed.tobytes() == teacher["topk_logp"].tobytes()

    # credentials from the environment, as s3fs reads them; endpoint as a storage option
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    runner = CliRunner()
    result = runner.invoke(store_cli, ["info", url, "--json", "--storage-option", f"endpoint_url={s3_endpoint}"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    pairs = info["splits"]["train"]["sets"][fmt.SET_PAIRS]
    assert pairs["examples"] == 2 and pairs["sequences"] == 4
    assert info["bytes_on_disk"] > 0 and info["top_k"] == H.TOP_K
    result = runner.invoke(store_cli, ["verify", url, "-o", f"endpoint_url={s3_endpoint}"])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


# -- info and export ------------------------------------------------------------------------------


def test_info_json_counts_and_hdf5_export(tmp_path):
    import h5py

    from store.export import decode_attr

    location = str(tmp_path / "info.zarr")
    store = H.write_synthetic_store(location, num_examples={"train": 5, "test": 3})
    # one section not complete: it must not be exported, and info must say so
    undone = fmt.group_path("test", 0, fmt.SET_GENERATED, fmt.SECTION_REFERENCE)
    meta_path = os.path.join(location, undone, "zarr.json")
    meta = json.load(open(meta_path))
    meta["attributes"]["complete"] = False
    json.dump(meta, open(meta_path, "w"))

    result = CliRunner().invoke(store_cli, ["info", location, "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["format"]["version"] == fmt.FORMAT_VERSION
    assert info["tokenizer"] == H.TOKENIZER
    assert info["top_k"] == H.TOP_K
    assert {(m["name"], m["hash"]) for m in info["models"]} == {
        (m["name"], m["sha256"]) for m in (H.TEACHER_MODEL, H.REFERENCE_MODEL, H.STUDENT_MODEL)}
    assert set(info["passes"]) == set(H.pass_provenance())
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(location) for f in files)
    assert info["bytes_on_disk"] == on_disk
    total_response = 0
    for split, n in (("train", 5), ("test", 3)):
        s = info["splits"][split]
        assert s["num_examples"] == n and s["dataset"]["fingerprint"] == H.DATASET["fingerprint"]
        for sequence_set in fmt.SEQUENCE_SETS:
            bases = [a for sp, _, st, sec, a in H.expected_sections(store)
                     if sp == split and st == sequence_set and sec == fmt.BASE]
            got = s["sets"][sequence_set]
            assert got["examples"] == len({int(e) for b in bases for e in b["example_index"]}) == n
            assert got["sequences"] == sum(len(b["example_index"]) for b in bases)
            assert got["response_tokens"] == sum(int(b["response_length"].sum()) for b in bases)
            assert got["tokens"] == sum(len(b["input_ids"]) for b in bases)
            assert got["parts_total"] == store.num_parts(split)
            total_response += got["response_tokens"]
    assert info["response_tokens"] == total_response
    assert info["bytes_per_response_token"] == pytest.approx(on_disk / total_response)
    generated = info["splits"]["test"]["sets"][fmt.SET_GENERATED]["parts_complete"]
    assert generated[fmt.SECTION_REFERENCE] == store.num_parts("test") - 1
    assert generated[fmt.SECTION_TEACHER] == store.num_parts("test")
    text = CliRunner().invoke(store_cli, ["info", location])
    assert text.exit_code == 0 and H.TEACHER_MODEL["sha256"] in text.output and "0/1" in text.output

    out = tmp_path / "export.h5"
    result = CliRunner().invoke(store_cli, ["export", location, "--format", "hdf5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as h5:
        assert decode_attr(h5.attrs["format"]) == {"name": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION}
        assert undone not in h5
        count = 0
        for split, part, sequence_set, section, _ in H.expected_sections(store):
            path = fmt.group_path(split, part, sequence_set, section)
            if path == undone:
                continue
            group = h5[path]
            attrs = store.section_attrs(split, part, sequence_set, section)
            assert {k: decode_attr(v) for k, v in group.attrs.items()} == attrs
            ours = store.read_section(split, part, sequence_set, section)
            for name, values in ours.items():
                dataset = group[name]
                assert dataset.compression == ("gzip" if values.size else None)
                got = dataset[...]
                assert got.dtype == values.dtype
                if _spec(sequence_set, section, name).encoding in LOGP_ENCODINGS:
                    assert got.dtype == np.float32
                np.testing.assert_array_equal(got, values)
                count += 1
        assert count > 0
        part_attrs = h5[f"train/{fmt.part_name(1)}"].attrs
        assert (int(part_attrs["example_start"]), int(part_attrs["example_stop"])) == store.part_range("train", 1)
