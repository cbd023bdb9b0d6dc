"""Tests for precompute.dataset: every source kind and row format, bad rows, splits, fingerprints.

All inputs are tiny files written into tmp_path.
"""

from __future__ import annotations

import csv
import gzip
import json
import re

import pytest

from precompute import dataset as D
from precompute.dataset import DataError, LoadedSplit, Row, dataset_identity, load_splits

SYS = {"role": "system", "content": "Be kind."}


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def trl(i):
    """A TRL conversational record with distinct content per i."""
    return {"prompt": [U(f"question {i}?")], "chosen": [A(f"good answer {i}")], "rejected": [A(f"bad answer {i}")]}


def write_jsonl(path, records, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def hh(*turns):
    """HH-RLHF transcript from (speaker, text) pairs."""
    return "".join(f"\n\n{s}: {t}" for s, t in turns)


def only(splits: dict[str, LoadedSplit]) -> LoadedSplit:
    assert len(splits) == 1
    return next(iter(splits.values()))


# --------------------------------------------------------------------------- #
# row formats
# --------------------------------------------------------------------------- #
def test_trl_conversational_and_string_formats(tmp_path):
    recs = [
        {"prompt": [SYS, U("Hi?")], "chosen": [A("Hello.")], "rejected": [A("Go away.")]},
        {"prompt": "Plain string prompt", "chosen": "Nice reply", "rejected": "Rude reply"},
        # chosen/rejected as full conversations repeating the prompt: prefix stripped
        {"prompt": [U("Q1"), A("A1"), U("Q2")],
         "chosen": [U("Q1"), A("A1"), U("Q2"), A("good A2")],
         "rejected": [U("Q1"), A("A1"), U("Q2"), A("bad A2")]},
        # several assistant messages: the final one is the response
        {"prompt": [U("Q")], "chosen": [A("draft"), A("final good")], "rejected": A("single dict bad")},
        # ShareGPT keys are normalised
        {"prompt": [{"from": "human", "value": "sharegpt q"}], "chosen": [{"from": "gpt", "value": "yes"}],
         "rejected": [{"from": "gpt", "value": "no"}]},
    ]
    split = only(load_splits(write_jsonl(tmp_path / "p.jsonl", recs), ["train"], test_fraction=0))
    assert split.skipped == {} and split.total_rows == 5
    assert split.rows == [
        Row(0, [SYS, U("Hi?")], "Hello.", "Go away."),
        Row(1, [U("Plain string prompt")], "Nice reply", "Rude reply"),
        Row(2, [U("Q1"), A("A1"), U("Q2")], "good A2", "bad A2"),
        Row(3, [U("Q")], "final good", "single dict bad"),
        Row(4, [U("sharegpt q")], "yes", "no"),
    ]


def test_hh_transcripts_parsed_into_messages(tmp_path):
    prefix = [("Human", "What is 2+2?"), ("Assistant", "It is 4."), ("Human", "And 3+3?")]
    recs = [
        {"chosen": hh(*prefix, ("Assistant", "It is 6.")), "rejected": hh(*prefix, ("Assistant", "No idea."))},
        # single turn, extra whitespace around the text is stripped
        {"chosen": hh(("Human", "  hi  "), ("Assistant", " hello \n")), "rejected": hh(("Human", "  hi  "), ("Assistant", "bye"))},
        # consecutive Assistant turns are merged
        {"chosen": hh(("Human", "q"), ("Assistant", "part one"), ("Assistant", "part two"), ("Human", "ok?"), ("Assistant", "yes")),
         "rejected": hh(("Human", "q"), ("Assistant", "part one"), ("Assistant", "part two"), ("Human", "ok?"), ("Assistant", "no"))},
    ]
    split = only(load_splits(write_jsonl(tmp_path / "hh.jsonl", recs), ["train"], test_fraction=0))
    assert split.skipped == {}
    assert split.rows[0] == Row(0, [U("What is 2+2?"), A("It is 4."), U("And 3+3?")], "It is 6.", "No idea.")
    assert split.rows[1] == Row(1, [U("hi")], "hello", "bye")
    assert split.rows[2].prompt == [U("q"), A("part one\n\npart two"), U("ok?")]
    assert (split.rows[2].chosen, split.rows[2].rejected) == ("yes", "no")


def test_hh_style_prompt_column(tmp_path):
    recs = [{"prompt": "\n\nHuman: Hi\n\nAssistant: Hey\n\nHuman: Tell a joke\n\nAssistant:",
             "chosen": " Why did the chicken...", "rejected": " No."}]
    row = only(load_splits(write_jsonl(tmp_path / "x.jsonl", recs), ["train"], test_fraction=0)).rows[0]
    assert row == Row(0, [U("Hi"), A("Hey"), U("Tell a joke")], "Why did the chicken...", "No.")


def test_implicit_prompt_message_lists(tmp_path):
    recs = [{"chosen": [U("Q"), A("A"), U("Q2"), A("good")], "rejected": [U("Q"), A("A"), U("Q2"), A("bad")]}]
    row = only(load_splits(write_jsonl(tmp_path / "x.jsonl", recs), ["train"], test_fraction=0)).rows[0]
    assert row == Row(0, [U("Q"), A("A"), U("Q2")], "good", "bad")


def test_prompt_only_rows(tmp_path):
    recs = [{"prompt": "sample me"}, {"prompt": [U("and me")]}]
    path = write_jsonl(tmp_path / "prompts.jsonl", recs)
    split = only(load_splits(path, ["train"], require_pairs=False, test_fraction=0))
    assert split.rows == [Row(0, [U("sample me")], None, None), Row(1, [U("and me")], None, None)]
    paired = only(load_splits(path, ["train"], test_fraction=0))
    assert paired.rows == [] and paired.skipped == {"missing_responses": 2}


# --------------------------------------------------------------------------- #
# bad rows
# --------------------------------------------------------------------------- #
BAD = [
    trl(0),                                                                     # ok
    {"prompt": "q", "chosen": "   ", "rejected": "r"},                           # empty_chosen
    {"prompt": [U("q")], "chosen": [A("")], "rejected": [A("r")]},               # empty_chosen
    {"prompt": "  \n", "chosen": "c", "rejected": "r"},                          # empty_prompt
    {"prompt": "q", "chosen": 42, "rejected": "r"},                              # non_string_chosen
    {"prompt": [U("q")], "chosen": [A("c")], "rejected": [{"role": "assistant", "content": [{"type": "text"}]}]},  # non_string_rejected
    {"chosen": "no transcript markers", "rejected": "at all"},                   # missing_prompt
    {"chosen": hh(("Human", "a"), ("Assistant", "x")),
     "rejected": hh(("Human", "DIFFERENT"), ("Assistant", "y"))},                # malformed_transcript (prefixes differ)
    {"prompt": "q", "chosen": "same", "rejected": "same"},                       # identical_responses
    {"prompt": [U("q"), A("a")], "chosen": "c", "rejected": "r"},                # malformed_prompt (ends with assistant)
    {"prompt": "q"},                                                             # missing_responses
    {"prompt": [{"role": "wizard", "content": "q"}], "chosen": "c", "rejected": "r"},  # malformed_prompt
    trl(12),                                                                    # ok
]


def test_bad_rows_skipped_and_counted(tmp_path):
    path = str(tmp_path / "bad.jsonl")
    with open(path, "w") as f:
        for r in BAD:
            f.write(json.dumps(r) + "\n")
        f.write("{not json\n")                                                   # invalid_json (row 13)
    split = only(load_splits(path, ["train"], test_fraction=0))
    assert [r.index for r in split.rows] == [0, 12]
    assert split.total_rows == 14
    assert split.skipped == {
        "empty_chosen": 2, "empty_prompt": 1, "non_string_chosen": 1, "non_string_rejected": 1,
        "missing_prompt": 1, "malformed_transcript": 1, "identical_responses": 1, "malformed_prompt": 2,
        "missing_responses": 1,
        "invalid_json": 1,
    }
    assert split.num_skipped == 12


@pytest.mark.parametrize("row,field", [(1, "chosen"), (3, "prompt"), (4, "chosen"), (6, "prompt"), (8, "rejected")])
def test_strict_raises_at_first_bad_row(tmp_path, row, field):
    # put the bad row after a good one; everything else is good
    recs = [trl(0)] * 1 + [trl(i) for i in range(1, row)] + [BAD[row]] + [BAD[1]]
    path = write_jsonl(tmp_path / "strict.jsonl", recs)
    with pytest.raises(DataError) as ei:
        load_splits(path, ["train"], strict=True, test_fraction=0)
    msg = str(ei.value)
    assert msg.startswith(f"{path}: row {row}: field '{field}': ")
    assert (ei.value.row, ei.value.field) == (row, field)


def test_strict_names_mapped_column(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"q": "x", "good": "", "bad": "y"}])
    with pytest.raises(DataError, match=r"row 0: field 'chosen' \(column 'good'\)"):
        load_splits(path, ["train"], strict=True, test_fraction=0,
                    columns={"prompt": "q", "chosen": "good", "rejected": "bad"})


# --------------------------------------------------------------------------- #
# columns, sources
# --------------------------------------------------------------------------- #
def test_column_mapping(tmp_path):
    recs = [{"question": "Why?", "good": "Because.", "bad": "Dunno.", "extra": 1}]
    path = write_jsonl(tmp_path / "cols.jsonl", recs)
    split = only(load_splits(path, ["train"], test_fraction=0,
                             columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))
    assert split.rows == [Row(0, [U("Why?")], "Because.", "Dunno.")]
    with pytest.raises(DataError, match="'answer'"):
        load_splits(path, ["train"], test_fraction=0, columns={"prompt": "question", "chosen": "answer"})
    with pytest.raises(ValueError, match="unknown field"):
        load_splits(path, ["train"], columns={"question": "prompt"})


def _expected_rows(n):
    return [Row(i, [U(f"question {i}?")], f"good answer {i}", f"bad answer {i}") for i in range(n)]


def test_json_and_gz_files(tmp_path):
    recs = [trl(i) for i in range(4)]
    sources = [
        write_jsonl(tmp_path / "a.jsonl.gz", recs, gz=True),
        str(tmp_path / "b.json"),
        str(tmp_path / "c.json.gz"),
        str(tmp_path / "d.json"),
    ]
    (tmp_path / "b.json").write_text(json.dumps(recs))
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        json.dump({"data": recs}, f)
    (tmp_path / "d.json").write_text(json.dumps({k: [r[k] for r in recs] for k in recs[0]}))  # columnar
    fps = set()
    for src in sources:
        split = only(load_splits(src, ["train"], test_fraction=0))
        assert split.rows == _expected_rows(4), src
        fps.add(split.fingerprint)
    assert len(fps) == 1


def test_json_with_named_splits(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"train": [trl(0), trl(1)], "test": [trl(2)]}))
    out = load_splits(str(path))
    assert [r.index for r in out["train"].rows] == [0, 1]
    assert out["test"].rows == [Row(0, [U("question 2?")], "good answer 2", "bad answer 2")]


def test_parquet_file(tmp_path):
    import datasets
    path = str(tmp_path / "p.parquet")
    datasets.Dataset.from_list([trl(i) for i in range(3)]).to_parquet(path)
    split = only(load_splits(path, ["train"], test_fraction=0))
    assert split.rows == _expected_rows(3)
    assert dataset_identity(path)["kind"] == "file"


def test_csv_file_with_string_and_json_cells(tmp_path):
    path = tmp_path / "p.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "chosen", "rejected"])
        w.writerow(["plain question", "yes", "no"])
        w.writerow([json.dumps([SYS, U("json question")]), "sure", "nope"])
        w.writerow(["empty chosen", "", "no"])
    split = only(load_splits(str(path), ["train"], test_fraction=0))
    assert split.rows == [Row(0, [U("plain question")], "yes", "no"), Row(1, [SYS, U("json question")], "sure", "nope")]
    assert split.skipped == {"missing_chosen": 1}


def test_saved_dataset_and_datasetdict(tmp_path):
    import datasets
    one = tmp_path / "saved_ds"
    datasets.Dataset.from_list([trl(i) for i in range(10)]).save_to_disk(str(one))
    out = load_splits(str(one))          # single 'train' split -> test carved
    assert [(r.index, r.source_row) for r in out["test"].rows] == [(0, 9)]
    assert out["train"].rows == _expected_rows(9)
    assert dataset_identity(str(one))["kind"] == "saved"
    assert dataset_identity(str(one))["revision"]

    dd = tmp_path / "saved_dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([trl(i) for i in range(3)]),
        "test": datasets.Dataset.from_list([{"chosen": hh(("Human", "h"), ("Assistant", "c")),
                                             "rejected": hh(("Human", "h"), ("Assistant", "r"))}]),
    }).save_to_disk(str(dd))
    out = load_splits(str(dd))
    assert out["train"].rows == _expected_rows(3)
    assert out["test"].rows == [Row(0, [U("h")], "c", "r")]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_splits(str(dd), ["validation"])


def test_bundled_demo(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "demo_prefs.train.jsonl", [trl(i) for i in range(3)])
    write_jsonl(tmp_path / "demo_prefs.test.jsonl", [trl(9)])
    monkeypatch.setattr(D, "_bundled_dir", lambda: tmp_path)
    for source in (None, "demo"):
        out = load_splits(source)
        assert out["train"].rows == _expected_rows(3)
        assert out["test"].rows == [Row(0, [U("question 9?")], "good answer 9", "bad answer 9")]
    ident = dataset_identity(None)
    assert ident["kind"] == "bundled" and ident["name"] == "demo" and len(ident["revision"]) == 64


def test_bundled_demo_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "_bundled_dir", lambda: tmp_path / "nowhere")
    with pytest.raises(DataError, match="demo_prefs"):
        load_splits("demo")


def test_missing_file_and_hub_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no such file"):
        load_splits(str(tmp_path / "missing.jsonl"))
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(*args, **kwargs):
            calls.append((args, kwargs))
            raise ConnectionError("offline")

    monkeypatch.setattr(D, "_datasets", lambda: FakeDatasets)
    with pytest.raises(DataError, match=r"owner/prefs:cfg@v1: .*Hugging Face Hub.*ConnectionError: offline"):
        load_splits("owner/prefs:cfg@v1")
    assert calls == [(("owner/prefs", "cfg"), {"revision": "v1"})]
    assert dataset_identity("owner/prefs@abc") == {"name": "owner/prefs", "revision": "abc", "kind": "hub"}


def test_dataset_identity_file(tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [trl(0)])
    ident = dataset_identity(path)
    assert ident["kind"] == "file" and ident["name"] == str((tmp_path / "f.jsonl").resolve())
    write_jsonl(tmp_path / "f.jsonl", [trl(1)])
    assert dataset_identity(path)["revision"] != ident["revision"]


# --------------------------------------------------------------------------- #
# splits, limit, fingerprint
# --------------------------------------------------------------------------- #
def test_test_split_carved_from_the_end(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [trl(i) for i in range(30)])
    out = load_splits(path, test_fraction=0.1)
    # ceil(0.1 * 30) = 3, no float surprise; example indices restart at 0, source rows are kept
    assert [(r.index, r.source_row) for r in out["test"].rows] == [(0, 27), (1, 28), (2, 29)]
    assert [r.index for r in out["train"].rows] == list(range(27))
    # the same carving whichever splits are asked for: no overlap across separate calls
    assert load_splits(path, ["train"])["train"].rows == out["train"].rows
    assert load_splits(path, ["test"])["test"].rows == out["test"].rows
    out = load_splits(path, test_fraction=0.25)
    assert [r.source_row for r in out["test"].rows] == list(range(22, 30))   # ceil(7.5) = 8
    # test_fraction=0: the whole file is train, and there is no test split
    assert len(load_splits(path, ["train"], test_fraction=0)["train"].rows) == 30
    with pytest.raises(DataError, match="no split 'test'"):
        load_splits(path, test_fraction=0)


def test_limit_applies_per_split_after_carving(tmp_path):
    recs = [trl(i) for i in range(20)]
    recs[1] = {"prompt": "q", "chosen": "", "rejected": "r"}
    path = write_jsonl(tmp_path / "l.jsonl", recs)
    out = load_splits(path, limit=3, test_fraction=0.5)
    assert [r.index for r in out["train"].rows] == [0, 2]
    assert out["train"].total_rows == 3 and out["train"].skipped == {"empty_chosen": 1}
    assert [(r.index, r.source_row) for r in out["test"].rows] == [(0, 10), (1, 11), (2, 12)]


def test_fingerprint_stable_and_sensitive(tmp_path):
    recs = [trl(i) for i in range(5)]
    a = load_splits(write_jsonl(tmp_path / "a.jsonl", recs), ["train"], test_fraction=0)["train"].fingerprint
    b = load_splits(write_jsonl(tmp_path / "b.jsonl", recs), ["train"], test_fraction=0)["train"].fingerprint
    assert a == b and len(a) == 64
    # formatting of the source that parses to the same rows does not matter
    recs_str = [{"prompt": f"question {i}?", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"} for i in range(5)]
    c = load_splits(write_jsonl(tmp_path / "c.jsonl", recs_str), ["train"], test_fraction=0)["train"].fingerprint
    assert c == a
    changed = [dict(r) for r in recs]
    changed[3] = {**changed[3], "rejected": [A("bad answer 3!")]}
    d = load_splits(write_jsonl(tmp_path / "d.jsonl", changed), ["train"], test_fraction=0)["train"].fingerprint
    assert d != a


# --------------------------------------------------------------------------- #
# undecodable input: bad bytes, broken gzip
# --------------------------------------------------------------------------- #
def test_invalid_utf8_line_is_a_bad_row_and_strict_names_the_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = [json.dumps(trl(i)).encode() for i in range(3)]
    # row 0, a blank line, a Latin-1 line (row 1 but line 3), then two good rows
    path.write_bytes(b"\n".join([good[0], b"", '{"prompt": "café", "chosen": "a", "rejected": "b"}'.encode("latin-1"),
                                 good[1], good[2]]) + b"\n")
    split = only(load_splits(str(path), ["train"], test_fraction=0))
    assert [(r.index, r.chosen) for r in split.rows] == [(0, "good answer 0"), (2, "good answer 1"),
                                                         (3, "good answer 2")]
    assert split.skipped == {"invalid_utf8": 1} and split.total_rows == 4
    with pytest.raises(DataError) as ei:
        load_splits(str(path), ["train"], test_fraction=0, strict=True)
    assert str(ei.value) == (f"{path}: row 1: field 'record': line 3 is not valid UTF-8 "
                             f"(byte 0xe9 at offset 15 of the line: invalid continuation byte) [invalid_utf8]")
    assert (ei.value.row, ei.value.reason) == (1, "invalid_utf8")


def test_invalid_utf8_in_json_lines_named_json(tmp_path):
    path = tmp_path / "lines.json"
    path.write_bytes(json.dumps(trl(0)).encode() + b"\n" + b'{"prompt": "\xff"}\n' + json.dumps(trl(1)).encode() + b"\n")
    split = only(load_splits(str(path), ["train"], test_fraction=0))
    assert split.rows == _expected_rows(2)[:1] + [Row(2, [U("question 1?")], "good answer 1", "bad answer 1")]
    assert split.skipped == {"invalid_utf8": 1}


@pytest.mark.parametrize("name", ["rows.jsonl.gz", "rows.json.gz"])
def test_truncated_gzip_names_file_and_lines_read(tmp_path, name):
    whole = gzip.compress("".join(json.dumps(trl(i)) + "\n" for i in range(400)).encode())
    path = tmp_path / name
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError) as ei:
        load_splits(str(path), ["train"])
    msg = str(ei.value)
    match = re.fullmatch(rf"{re.escape(str(path))}: the gzip stream ends early, after (\d+) line\(s\): "
                         r"the file is truncated or corrupt", msg)
    assert match, msg
    # the lines before the cut were read: some, not all
    assert 0 < int(match.group(1)) < 400
    assert ei.value.source == str(path)


def test_file_named_gz_that_is_not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    write_jsonl(path, [trl(0)])
    with pytest.raises(DataError) as ei:
        load_splits(str(path), ["train"])
    assert str(ei.value) == (f"{path}: bad gzip data after 0 line(s) (Not a gzipped file (b'{{\"')): the file is "
                             f"corrupt, or not gzip-compressed although its name ends in .gz")


# --------------------------------------------------------------------------- #
# a split with nothing to read
# --------------------------------------------------------------------------- #
EMPTY_FILES = {"empty.jsonl": b"", "blank.jsonl": b"\n\n", "empty.json": b"[]", "empty.jsonl.gz": gzip.compress(b"")}


@pytest.mark.parametrize("name", sorted(EMPTY_FILES))
@pytest.mark.parametrize("require_pairs", [True, False])
def test_empty_file_is_an_error(tmp_path, name, require_pairs):
    path = tmp_path / name
    path.write_bytes(EMPTY_FILES[name])
    for split in ("train", "test"):
        with pytest.raises(DataError) as ei:
            load_splits(str(path), [split], require_pairs=require_pairs)
        assert str(ei.value) == f"{path}: the file has no rows"


def test_columns_matching_nothing_name_rows_reasons_columns_and_a_mapping(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,good,bad\nq1,g1,b1\nq2,g2,b2\nq3,g3,b3\n")
    expected = (f"{path}: split 'train' has no usable row: 3 row(s) read, all skipped (missing_prompt: 3); "
                f"columns seen in the rows: bad, good, question; if the fields are in other columns, map them, "
                f"e.g. --column prompt=question --column chosen=good --column rejected=bad")
    with pytest.raises(DataError) as ei:
        load_splits(str(path), ["train"], test_fraction=0)
    assert str(ei.value) == expected and ei.value.row is None
    # prompt-only loading needs the prompt only
    with pytest.raises(DataError, match=r"all skipped \(missing_prompt: 3\).*e\.g\. --column prompt=question$"):
        load_splits(str(path), ["train"], test_fraction=0, require_pairs=False)
    # the suggested mapping works
    split = only(load_splits(str(path), ["train"], test_fraction=0,
                             columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))
    assert [(r.prompt, r.chosen, r.rejected) for r in split.rows] == [([U(f"q{i}")], f"g{i}", f"b{i}") for i in (1, 2, 3)]


def test_unguessable_columns_get_a_generic_mapping(tmp_path):
    # column names hinting at a field are guessed; the others are left as NAME
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": "x", "b": "y", "chosen_text": "c"}\n{"a": "z"}\n{oops\n')
    with pytest.raises(DataError) as ei:
        load_splits(str(path), ["train"], test_fraction=0)
    # reasons most frequent first
    assert str(ei.value).endswith("(missing_prompt: 2, invalid_json: 1); columns seen in the rows: a, b, "
                                  "chosen_text; if the fields are in other columns, map them, e.g. "
                                  "--column prompt=NAME --column chosen=chosen_text --column rejected=NAME")


def test_rows_that_are_not_records_are_an_error(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("{oops\n[1, 2]\nnot json\n")
    with pytest.raises(DataError) as ei:
        load_splits(str(path), ["train"], test_fraction=0)
    assert str(ei.value) == (f"{path}: split 'train' has no usable row: 3 row(s) read, all skipped "
                             f"(invalid_json: 3); columns seen in the rows: none")


def test_carving_that_leaves_train_empty_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "one.jsonl", [trl(0)])
    with pytest.raises(DataError) as ei:
        load_splits(path)
    assert str(ei.value) == (f"{path}: split 'train' has none of the source's 1 row(s): a single-split source "
                             f"gives its last rows to 'test' and the rest to 'train'")
    assert only(load_splits(path, ["test"])).rows == _expected_rows(1)


# --------------------------------------------------------------------------- #
# duplicates
# --------------------------------------------------------------------------- #
def test_duplicate_rows_skipped_within_a_split(tmp_path):
    recs = [
        trl(0),
        trl(1),
        trl(0),                                                                  # duplicate_row of row 0
        {"prompt": "question 1?", "chosen": "good answer 1", "rejected": "bad answer 1"},  # same as row 1 once parsed
        {**trl(2), "rejected": [A("bad answer 0")]},                             # not a duplicate: differs
        {**trl(0), "rejected": [A("other")]},                                    # not a duplicate: differs in rejected
    ]
    path = write_jsonl(tmp_path / "dups.jsonl", recs)
    split = only(load_splits(path, ["train"], test_fraction=0))
    assert [r.index for r in split.rows] == [0, 1, 4, 5]
    assert split.skipped == {"duplicate_row": 2} and split.total_rows == 6
    with pytest.raises(DataError) as ei:
        load_splits(path, ["train"], test_fraction=0, strict=True)
    assert str(ei.value) == f"{path}: row 2: field 'record': the same prompt, chosen and rejected as row 0 [duplicate_row]"
    # the fingerprint covers kept rows: a duplicate appended at the end changes nothing
    clean = write_jsonl(tmp_path / "clean.jsonl", [trl(i) for i in range(3)])
    dup_at_end = write_jsonl(tmp_path / "end.jsonl", [trl(i) for i in range(3)] + [trl(1)])
    a, b = (only(load_splits(p, ["train"], test_fraction=0)) for p in (clean, dup_at_end))
    assert a.fingerprint == b.fingerprint and (a.total_rows, b.total_rows) == (3, 4)


def test_carved_test_split_drops_rows_of_the_train_part(tmp_path):
    recs = [trl(i) for i in range(27)] + [trl(5), trl(28), trl(28)]   # test = source rows 27, 28, 29
    path = write_jsonl(tmp_path / "leak.jsonl", recs)
    out = load_splits(path)
    test = out["test"]
    assert [(r.index, r.source_row) for r in test.rows] == [(1, 28)]
    assert test.skipped == {"duplicate_of_train": 1, "duplicate_row": 1} and test.total_rows == 3
    assert out["train"].rows == _expected_rows(27) and out["train"].skipped == {}
    # the same test split whichever splits are requested, in whichever order
    for splits in (["test"], ["test", "train"]):
        alone = load_splits(path, splits)["test"]
        assert (alone.rows, alone.skipped, alone.fingerprint) == (test.rows, test.skipped, test.fingerprint)
    # the whole train part counts, whatever the limit
    limited = load_splits(path, ["test"], limit=1)["test"]
    assert limited.rows == [] and limited.skipped == {"duplicate_of_train": 1}
    with pytest.raises(DataError) as ei:
        load_splits(path, ["test"], strict=True)
    assert str(ei.value) == (f"{path}: row 27: field 'record': the same prompt, chosen and rejected as row 5, "
                             f"which is in the carved 'train' split [duplicate_of_train]")
    # named splits are not compared with each other
    named = tmp_path / "named.json"
    named.write_text(json.dumps({"train": [trl(0), trl(1)], "test": [trl(0)]}))
    assert load_splits(str(named))["test"].rows == _expected_rows(1)
