"""A refusal for missing store signals names the commands that write them, and they work as written.

For every method of :data:`train.methods.METHODS`, ``train student`` on a store
that lacks the method's signals is refused with one line that names the
commands to run; the test takes them from that line, runs each one literally
through the real ``precompute`` command line (only the placeholders the line
itself explains, ``TEACHER`` and ``JUDGE``, are filled in), and then the same
``train student`` command trains 2 steps. Pair methods start from a store that
``precompute sample`` made (no pairs, no teacher recorded), group methods from
one that ``precompute teacher``'s default passes made (no groups).
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from precompute.cli import main as precompute_main
from precompute.sample import SampleConfig, run_sample
from precompute.teacher import KNOWN_PASSES, TeacherConfig, run_teacher
from store import TeacherStore
from store import format as fmt
from tests.judge_server import JudgeServer
from tests import tiny
from tests.refusals import one_line as refusal
from train import methods
from train.cli import main as train_main

#: where each kind of method starts: a store without any of its signals
SAMPLED_ONLY, TEACHER_DEFAULT, PAIRS_ONLY = "sampled only", "teacher's default passes", "pairs pass only"


def _reads_groups(method: str) -> bool:
    return methods.SAMPLES in methods.needs_of(methods.resolve_terms(method))


CASES = [pytest.param(method, [], TEACHER_DEFAULT if _reads_groups(method) else SAMPLED_ONLY, id=method)
         for method in methods.METHODS]
CASES += [
    # PAD at alpha 1 reads no calibration: the commands leave it out
    pytest.param("pad", ["--pad-alpha", "1"], TEACHER_DEFAULT, id="pad-alpha-1"),
    # a store that records no student: the commands name the student being trained
    pytest.param("dpo", [], PAIRS_ONLY, id="dpo-no-student-recorded"),
]


@pytest.fixture(scope="module")
def starts(tmp_path_factory, tiny_models):
    """The stores the cases start from, by kind (each case works on its own copy): the train split (5 rows) of a
    6-row file, few because the commands sample with ``precompute sample``'s defaults (5 answers of up to 64 tokens
    per prompt)."""
    teacher, student = tiny_models
    root = tmp_path_factory.mktemp("starts")
    dataset = tiny.write_pairs(root / "pairs.jsonl", 6)
    common = dict(dataset=str(dataset), splits=("train",), max_length=96, examples_per_part=4, device="cpu",
                  dtype="float32", progress=False)
    sampled = root / "sampled.zarr"
    run_sample(SampleConfig(out=str(sampled), model=str(student), n=4, keep=4, max_new_tokens=8, **common))
    default = root / "default.zarr"
    run_teacher(TeacherConfig(out=str(default), teacher=str(teacher), student=str(student), top_k=8,
                              max_new_tokens=12, **common))
    pairs = root / "pairs.zarr"
    run_teacher(TeacherConfig(out=str(pairs), teacher=str(teacher), passes=("pairs",), top_k=8, **common))
    return {SAMPLED_ONLY: sampled, TEACHER_DEFAULT: default, PAIRS_ONLY: pairs}


@pytest.fixture(scope="module")
def judge():
    """A ranking server on loopback (longer answers first): what ``JUDGE`` stands for."""
    with JudgeServer(score=len) as server:
        yield server


def suggested(message: str) -> tuple[list[str], str]:
    """(the commands a refusal names, in order; its note on what the placeholders stand for)."""
    _, found, suggestion = message.partition("compute it first with: ")
    assert found, message
    commands, _, notes = suggestion.partition(" (where ")
    return commands.split(", then "), notes


def literal_words(command: str, notes: str, fill: dict[str, list[str]]) -> list[str]:
    """``command`` as the shell splits it, each placeholder the note explains replaced by ``fill``'s words."""
    words = []
    for word in shlex.split(command):
        if word in fill:
            assert f"{word} is " in notes, f"placeholder {word} is not explained: {notes}"
            words += fill[word]
        else:
            words.append(word)
    return words


@pytest.mark.slow
@pytest.mark.parametrize("method, extra, start", CASES)
def test_each_method_trains_after_running_the_commands_its_refusal_names(method, extra, start, starts, judge,
                                                                         tiny_models, tmp_path):
    teacher, student = tiny_models
    store = Path(shutil.copytree(starts[start], tmp_path / "store.zarr"))
    run = tmp_path / "run"
    train = ["student", "--cache", str(store), "--method", method, *extra, "--student", str(student), "--out",
             str(run), "--max-steps", "2", "--batch-tokens", "400", "--device", "cpu", "--dtype", "float32",
             "--log-every", "1", "--no-progress"]

    message = refusal(CliRunner().invoke(train_main, train))
    commands, notes = suggested(message)
    fill = {"TEACHER": [str(teacher)], "JUDGE": [judge.base_url, "--judge-model", "rule"]}
    for command in commands:
        words = literal_words(command, notes, fill)
        assert words[:2] in (["precompute", "sample"], ["precompute", "teacher"], ["precompute", "rank"]), command
        result = CliRunner().invoke(precompute_main, words[1:])
        assert result.exit_code == 0, f"{command}\n{result.output}"

    result = CliRunner().invoke(train_main, train)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 2

    opened = TeacherStore.open(str(store))
    if methods.SAMPLES in methods.needs_of(methods.resolve_terms(method)):
        assert "precompute sample" in commands[0]
    if method in ("cyclealign", "rrhf", "pro"):  # rankings come from a judge, not from a teacher pass
        assert "precompute rank" in commands[-1] and "precompute teacher" not in message
    if extra == ["--pad-alpha", "1"]:
        assert "--passes pad_logp" in message and "pad_mcq" not in message
        assert not opened.complete_parts("train", fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
    if start == PAIRS_ONLY:
        assert f"--student {student}" in message


def test_every_signal_a_term_reads_has_a_command_that_writes_it():
    """Whatever the settings, each ``set/section`` a term reads maps to a command, and a teacher pass to a known
    ``--passes`` value."""
    for pad_alpha in (0.0, 0.5, 1.0):
        settings = methods.Settings(pad_alpha=pad_alpha)
        for name, terms in methods.METHODS.items():
            for sequence_set, sections in methods.needs_of(list(terms), settings).items():
                for section in (fmt.BASE, *sections):
                    command, passes = methods.WRITER[f"{sequence_set}/{section}"]
                    assert command in (methods.SAMPLE, methods.TEACHER_COMMAND, methods.RANK), name
                    assert (passes in KNOWN_PASSES) == (command == methods.TEACHER_COMMAND), name
    assert set(methods.TEACHER_PASSES) == set(KNOWN_PASSES)


def test_pad_reads_the_calibration_only_below_alpha_1():
    for method in ("pad", "pad_dpo", "pad_simpo"):
        terms = methods.resolve_terms(method)
        at = {alpha: methods.needs_of(terms, methods.Settings(pad_alpha=alpha))[methods.SAMPLES]
              for alpha in (0.0, 0.5, 1.0)}
        assert methods.TEACHER_MCQ in at[0.5] and methods.TEACHER in at[0.5]
        assert methods.TEACHER_MCQ not in at[1.0] and methods.TEACHER in at[1.0]
        assert methods.TEACHER not in at[0.0] and methods.TEACHER_MCQ in at[0.0]
        assert methods.needs_of(terms)[methods.SAMPLES] == at[0.5]  # without settings: all it may read
