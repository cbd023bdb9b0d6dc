"""Store names are spelled once, in :mod:`store.format`; lm/, precompute/, store/, train/ and recipes/ use its constants.

A store name is an array name (``topk_ids``) or a pass name (``<set>/<section>``, e.g. ``pairs/teacher``).
The source is read with ``ast``: a string literal other than a docstring or an ``__all__`` entry that
equals a store name is one spelled again, and so is a path-like literal (no spaces, ``/``-separated) with
an array, set or section name as one of its parts (``"teacher/topk_ids"``, the literal pieces of
``f"{section}/topk_logp"``). Tests may spell names: they check the format from outside.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from store import format as fmt

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lm", "precompute", "store", "train", "recipes")
FORMAT_MODULE = "store/format.py"

ARRAYS = {spec.name for spec in fmt.BASE_ARRAYS + fmt.GROUP_ARRAYS} | {
    fmt.stored_name(spec, version) for specs in fmt.SECTION_ARRAYS.values() for spec in specs
    for version in fmt.READABLE_VERSIONS}  # a section's arrays under every version's name
PASSES = {fmt.pass_name(s, section) for s in fmt.SEQUENCE_SETS for section in (fmt.BASE,) + fmt.SECTIONS}
#: names that, as one part of a path-like literal, spell a store path or signal
PATH_PARTS = ARRAYS | set(fmt.SEQUENCE_SETS) | set(fmt.SECTIONS)
PATH_LIKE = re.compile(r"[\w.+-]*/[\w./+-]*")

#: literals equal to an array name that name something else (file, literal): why
OTHER_MEANINGS = {
    ("lm/chat.py", "role"): "a chat message's role key",
    ("lm/chat.py", "input_ids"): "a tokenizer's output key",
    ("precompute/calibration.py", "role"): "a chat message's role key",
    ("precompute/calibration.py", "input_ids"): "a tokenizer's output key",
    ("precompute/dataset.py", "role"): "a chat message's role key",
    ("precompute/rank.py", "role"): "a chat message's role key",
    ("train/generations.py", "example_index"): "a field of the generations file (train evaluate --generations)",
}


def _skipped(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings or entries of ``__all__``."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skipped.add(id(first.value))
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            skipped.update(id(n) for n in ast.walk(node.value))
    return skipped


def _spells_a_name(text: str, *, whole: bool) -> bool:
    """``whole``: ``text`` is a whole literal (it may equal a name); else a piece of an f-string."""
    if whole and (text in ARRAYS or text in PASSES):
        return True
    return bool(PATH_LIKE.fullmatch(text)) and any(part in PATH_PARTS for part in text.split("/"))


def spelled_names(source: str, where: str) -> list[str]:
    """``where:line: 'literal'`` for every store name ``source`` spells."""
    tree = ast.parse(source)
    skipped = _skipped(tree)
    pieces = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in skipped:
            continue
        if (where, node.value) in OTHER_MEANINGS:
            continue
        if _spells_a_name(node.value, whole=id(node) not in pieces):
            found.append((node.lineno, node.col_offset, f"{where}:{node.lineno}: {node.value!r}"))
    return [text for *_, text in sorted(found)]


def test_no_store_name_is_spelled_outside_the_format():
    found = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            where = path.relative_to(REPO).as_posix()
            if where != FORMAT_MODULE:
                found += spelled_names(path.read_text(), where)
    assert found == []


def test_the_check_finds_names_in_literals_and_f_strings_not_in_docstrings():
    source = '''
"""A module about topk_ids and pairs/teacher."""
__all__ = ["logp_sum"]
def f(section, sequence_set):
    """Reads tail_logp."""
    a = "topk_ids"
    b = "samples/judge"
    c = f"{section}/topk_logp"
    d = f"{sequence_set}/teacher"
    e = "teacher/logp_sum"
    ok = ("topk_ids width", f"{section}: bad", "teacher", "models/base")
'''
    assert spelled_names(source, "x.py") == [
        "x.py:6: 'topk_ids'", "x.py:7: 'samples/judge'", "x.py:8: '/topk_logp'", "x.py:9: '/teacher'",
        "x.py:10: 'teacher/logp_sum'"]


def test_the_format_has_a_constant_for_every_array_and_pass_name():
    constants = {name: value for name, value in vars(fmt).items() if isinstance(value, str)}
    arrays = {value for name, value in constants.items() if name.startswith("ARRAY_")}
    passes = {name: value for name, value in constants.items() if name.startswith("PASS_")}
    assert arrays == ARRAYS
    assert all(constants[f"ARRAY_{value.upper()}"] == value for value in ARRAYS)
    assert set(passes.values()) <= PASSES
    # PASS_<SET>_<SECTION> is pass_name(SET_<SET>, <section>)
    for name, value in passes.items():
        sequence_set, section = value.split("/")
        assert name == f"PASS_{sequence_set.upper()}_{section.upper()}"
