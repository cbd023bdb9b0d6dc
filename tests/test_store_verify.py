"""`store verify` finds every damage a user can do to a store, names the file, and reports all of it in one run.

Each case damages a fresh copy of a small synthetic store in one way that
verification used to miss (or stopped at), and checks the command exits 1
naming the damaged place; one case damages many places at once and every one
must be reported.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from store import format as fmt
from store.cli import main as store_cli
from tests import store_helpers as H

PART = "train/part-00001"
SECTION = f"{PART}/{fmt.SET_PAIRS}/{fmt.SECTION_TEACHER}"


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    location = tmp_path_factory.mktemp("verify") / "intact.zarr"
    H.write_synthetic_store(str(location), num_examples={"train": 9, "test": 3})
    return location


@pytest.fixture
def store_copy(intact, tmp_path):
    location = tmp_path / "damaged.zarr"
    shutil.copytree(intact, location)
    return location


def _verify(location):
    result = CliRunner().invoke(store_cli, ["verify", str(location)])
    assert "Traceback" not in result.output
    return result


def _edit_json(path, change):
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


def _edit_root_attrs(location, change):
    _edit_json(location / "zarr.json", lambda doc: change(doc["attributes"]))


def test_an_intact_store_verifies(intact):
    result = _verify(intact)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK ")


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_an_arrays_metadata_damaged_is_named(store_copy, how):
    meta = store_copy / SECTION / fmt.ARRAY_TOPK_LOGP_STEPS / "zarr.json"
    meta.write_text(meta.read_text()[:25] if how == "truncated" else "not json at all")
    result = _verify(store_copy)
    assert result.exit_code == 1
    assert f"{SECTION}/{fmt.ARRAY_TOPK_LOGP_STEPS}/zarr.json" in result.output


def test_a_complete_flag_set_to_false_disagrees_with_the_manifest(store_copy):
    _edit_json(store_copy / SECTION / "zarr.json", lambda doc: doc["attributes"].update(complete=False))
    result = _verify(store_copy)
    assert result.exit_code == 1
    assert f"{SECTION}/zarr.json" in result.output and "complete flag is false" in result.output


@pytest.mark.parametrize("level", ["part", "split"])
@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_a_part_or_split_metadata_damaged_is_named(store_copy, level, how):
    meta = store_copy / (PART if level == "part" else "train") / "zarr.json"
    if how == "deleted":
        meta.unlink()
    else:
        meta.write_text("{broken")
    result = _verify(store_copy)
    assert result.exit_code == 1
    assert f"{meta.relative_to(store_copy)}" in result.output


@pytest.mark.parametrize("damage", ["entry removed", "fake part", "emptied", "deleted"])
def test_manifest_damage_is_reported(store_copy, damage):
    fake = "train/part-00042/pairs/teacher"

    def change(attrs):
        if damage == "entry removed":
            del attrs["manifest"][SECTION]
        elif damage == "fake part":
            attrs["manifest"][fake] = attrs["manifest"][SECTION]
        elif damage == "emptied":
            attrs["manifest"] = {}
        else:
            del attrs["manifest"]

    _edit_root_attrs(store_copy, change)
    result = _verify(store_copy)
    assert result.exit_code == 1
    expected = {"entry removed": SECTION, "fake part": fake, "emptied": SECTION, "deleted": "manifest"}[damage]
    assert expected in result.output


@pytest.mark.parametrize("count", [3, 8, 12])
def test_an_edited_example_count_is_caught(store_copy, count):
    """9 train examples in parts of 3, as a run records them (9 rows used, none skipped): fewer drops parts
    from the layout, 8 moves the last part's range, 12 adds a part and disagrees with the rows counted."""
    def change(attrs):
        train = attrs["layout"]["splits"]["train"]
        train["dataset"].update(rows_used=9, skipped={})
        train["num_examples"] = count

    _edit_root_attrs(store_copy, change)
    result = _verify(store_copy)
    assert result.exit_code == 1
    assert ("train/part-0000" in result.output or f"has {count} examples" in result.output)
    assert "layout" in result.output


def test_every_damage_is_reported_in_one_run(store_copy):
    other = f"test/part-00000/{fmt.SET_GENERATED}/{fmt.SECTION_REFERENCE}"
    (store_copy / SECTION / "topk_ids" / "zarr.json").write_text("garbage")
    (store_copy / "train/part-00002/zarr.json").unlink()
    _edit_json(store_copy / other / "zarr.json", lambda doc: doc["attributes"].update(complete=False))
    chunk = next(p for p in (store_copy / f"test/part-00000/{fmt.SET_SAMPLES}").rglob("c/*") if p.is_file())
    chunk.write_bytes(b"\x00" * 7)
    result = _verify(store_copy)
    assert result.exit_code == 1
    for place in (f"{SECTION}/topk_ids/zarr.json", "train/part-00002/zarr.json", f"{other}/zarr.json",
                  os.path.dirname(os.path.dirname(str(chunk.relative_to(store_copy))))):
        assert place in result.output, place
