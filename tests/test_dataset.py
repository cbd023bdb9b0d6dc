"""Tests for precompute.dataset: every source kind and row format, bad rows, splits, fingerprints.

All inputs are tiny files written into tmp_path.
"""

from __future__ import annotations

import csv
import gzip
import json

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
    {"chosen": "no transcript markers", "rejected": "at all"},                   # malformed_transcript
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
        "malformed_transcript": 2, "identical_responses": 1, "malformed_prompt": 2, "missing_responses": 1,
        "invalid_json": 1,
    }
    assert split.num_skipped == 12


@pytest.mark.parametrize("row,field", [(1, "chosen"), (3, "prompt"), (4, "chosen"), (6, "chosen"), (8, "rejected")])
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
