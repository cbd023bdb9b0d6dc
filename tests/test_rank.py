"""CycleAlign's ranking pieces: strict parsing, agreement, the prompt, and a real HTTP judge with faults.

The black box is a real OpenAI-compatible server on loopback (tests/judge_server.py)
that ranks by a rule; faults are injected per request.
"""

from __future__ import annotations

import itertools

import pytest

from precompute.judges import HttpJudge, judge_identity, make_judge
from precompute.rank import (
    STATUS_RANKED,
    STATUS_SHORT_AGREEMENT,
    STATUS_UNRANKED,
    RankingError,
    agree,
    agreement,
    load_static_demos,
    parse_ranking,
    rank_groups,
    render_prompt,
    white_box_order,
)
from tests.judge_server import JudgeServer


@pytest.mark.parametrize("reply,order", [
    ("[3] > [1] > [2]", [2, 0, 1]),
    ("Here is my ranking:\n\n  [2]>[3] >[1]  \n", [1, 2, 0]),
])
def test_a_full_ranking_parses_to_positions(reply, order):
    assert parse_ranking(reply, 3) == order


@pytest.mark.parametrize("reply,reason", [
    ("Both are fine.", "no_ranking"),
    ("[1] > [2]\nI prefer the first.", "no_ranking"),  # the ranking must be the last line
    ("[1] > [2]", "partial"),
    ("[1] > [1] > [2]", "repeated_label"),
    ("[1] > [4] > [2]", "unknown_label"),
    ("", "no_ranking"),
])
def test_anything_but_a_full_ranking_is_refused_with_its_reason(reply, reason):
    with pytest.raises(RankingError) as err:
        parse_ranking(reply, 3)
    assert err.value.reason == reason


def _lcs_length_brute_force(a, b):
    best = 0
    for k in range(len(a), 0, -1):
        for sub in itertools.combinations(a, k):
            it = iter(b)
            if all(x in it for x in sub):
                return k
    return best


@pytest.mark.parametrize("a,b", [([0, 1, 2, 3], [0, 1, 2, 3]), ([0, 1, 2, 3], [3, 2, 1, 0]),
                                 ([2, 0, 1, 3], [0, 2, 1, 3]), ([4, 1, 3, 0, 2], [1, 4, 0, 3, 2])])
def test_agreement_is_a_longest_common_subsequence(a, b):
    common = agreement(a, b)
    assert len(common) == _lcs_length_brute_force(a, b)
    for order in (a, b):  # a subsequence of both
        it = iter(order)
        assert all(x in it for x in common)


def test_white_box_agreement_and_status():
    from precompute.rank import GroupRanking

    mean_logp = [-1.0, -0.5, -2.0, -0.7]  # white box: 1 > 3 > 0 > 2
    assert white_box_order(mean_logp) == [1, 3, 0, 2]
    same = GroupRanking([1, 3, 0, 2], [])
    assert agree(same, mean_logp) == STATUS_RANKED and same.agreed == [1, 3, 0, 2]
    reversed_ = GroupRanking([2, 0, 3, 1], [])
    assert agree(reversed_, mean_logp) == STATUS_SHORT_AGREEMENT and reversed_.agreed is None
    assert agree(GroupRanking(None, []), mean_logp) == STATUS_UNRANKED


def test_the_prompt_shows_demos_then_the_group_in_the_order_given():
    demos = load_static_demos()
    messages = render_prompt("Rank them.", demos, "Q?", ["alpha", "beta", "gamma"], [2, 0, 1])
    assert messages[0] == {"role": "system", "content": "Rank them."}
    assert len(messages) == 2 + 2 * len(demos)
    assert messages[2]["content"] == " > ".join(f"[{p + 1}]" for p in demos[0].order)
    assert messages[-1]["content"].splitlines()[2:] == ["[1] gamma", "[2] alpha", "[3] beta"]


def test_an_http_judge_ranks_by_its_rule_and_faults_are_retried_or_counted():
    groups = [(f"question {g}", ["x" * (g + 5), "x", "x" * (g + 2)]) for g in range(4)]
    # replies in arrival order: try 1 is one request per group; every fault kind once
    script = ["500", "free", "partial", "repeat"]
    with JudgeServer(score=len, script=script) as server:
        judge = HttpJudge(server.base_url, "rule", timeout=5.0, retries=0, concurrency=1)
        results = rank_groups(judge, "Rank.", [], groups, tries=3, seed=0)
        judge.close()
    for g, result in enumerate(results):
        assert result.judge_order == [0, 2, 1]  # the rule: longest first
        assert [t["error"] for t in result.tries] == [("http_500", "no_ranking", "partial", "repeated_label")[g],
                                                      None]
        assert result.tries[0]["messages"][-1]["content"].startswith(f"Question: question {g}")


def test_labels_are_shown_as_drawn_first_then_shuffled_deterministically():
    from precompute.rank import shuffled_labels

    assert shuffled_labels(5, 0, seed=3) == [0, 1, 2, 3, 4]
    retries = [shuffled_labels(5, t, seed=3) for t in (1, 2)]
    assert all(sorted(r) == [0, 1, 2, 3, 4] for r in retries) and retries[0] != [0, 1, 2, 3, 4]
    assert retries == [shuffled_labels(5, t, seed=3) for t in (1, 2)]


def test_a_group_that_never_parses_stays_unranked_with_its_last_reason():
    with JudgeServer(score=len, script=["free", "timeout", "partial"], timeout_sleep=2.0) as server:
        judge = HttpJudge(server.base_url, "rule", timeout=0.5, retries=0, concurrency=1)
        (result,) = rank_groups(judge, "Rank.", [], [("q", ["a", "bb", "ccc"])], tries=3, seed=0)
        judge.close()
    assert result.judge_order is None
    assert [t["error"] for t in result.tries] == ["no_ranking", "timeout", "partial"]
    assert result.failure == "partial"


def test_the_client_retries_a_server_error_before_giving_up():
    with JudgeServer(score=len, script=["500", "500"]) as server:
        judge = make_judge(server.base_url, model="rule", retries=2, timeout=5.0)
        (reply,) = judge.ask_all([[{"role": "user", "content": "[1] a\n[2] bb"}]])
        judge.close()
        assert reply.text == "[2] > [1]" and len(server.requests) == 3


def test_the_api_key_is_sent_but_never_recorded(monkeypatch):
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-secret-123")
    with JudgeServer(score=len) as server:
        judge = make_judge(server.base_url, model="rule", api_key_env="MY_JUDGE_KEY")
        judge.ask_all([[{"role": "user", "content": "[1] a"}]])
        judge.close()
        assert server.requests[0]["auth"] == "Bearer sk-secret-123"
    identity = judge_identity("https://user:pw@judge.example:8443/v1?key=abc", "rule")
    assert identity == {"kind": "http", "base_url": "https://judge.example:8443/v1", "model_name": "rule"}
    assert "sk-secret" not in str(identity)


# -- a judge that never answered: over real HTTP on loopback, then a rerun against a working judge -----------

RANKINGS = ("judge_rank", "white_rank", "agreed_rank", "group_status")
JUDGE_SECTION = "samples/judge"


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, tiny_models, tiny_dataset):
    from tests import tiny

    return tiny.sampled_store(tmp_path_factory.mktemp("rank-faults") / "sampled.zarr", tiny_models[1], tiny_dataset)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rank_args(out, url, tiny_dataset, timeout="30", concurrency="2"):
    return ["rank", "--out", str(out), "--judge", url, "--judge-model", "rule", "--judge-timeout", timeout,
            "--judge-retries", "0", "--judge-concurrency", concurrency, "--dataset", str(tiny_dataset),
            "--split", "train", "--device", "cpu", "--dtype", "float32", "--no-progress"]


def _rank(args):
    from click.testing import CliRunner

    from precompute.cli import main as precompute_cli

    return CliRunner().invoke(precompute_cli, args)


def _rankings(path) -> dict:
    """part -> the judge section's ranking arrays (read_section: every part must be complete)."""
    from store import TeacherStore

    store = TeacherStore.open(str(path))
    return {part: {name: values.tolist() for name, values in
                   store.read_section("train", part, "samples", "judge", list(RANKINGS)).items()}
            for part in range(store.num_parts("train"))}


def _asked(requests) -> "Counter":
    import json
    from collections import Counter

    return Counter(json.dumps(r["body"]["messages"], sort_keys=True) for r in requests)


@pytest.fixture(scope="module")
def reference(sampled, tmp_path_factory, tiny_dataset):
    """The samples ranked by a working judge from the start (another address than the tests' judges)."""
    out = _copy(sampled, tmp_path_factory.mktemp("rank-reference") / "reference.zarr")
    with JudgeServer(score=len) as server:
        result = _rank(_rank_args(out, server.base_url, tiny_dataset))
    assert result.exit_code == 0, result.output
    return out


FAULT_ERRORS = {"nothing_listening": "connection", "500": "http_500", "timeout": "timeout",
                "garbage": "bad_response (not JSON)", "not_completion": "bad_response (no message content)"}


@pytest.mark.parametrize("fault", list(FAULT_ERRORS))
def test_a_judge_that_never_answered_leaves_the_part_unfinished_and_a_rerun_equals_a_working_judge(
        fault, sampled, reference, tiny_dataset, tmp_path):
    from click.testing import CliRunner

    from store import TeacherStore
    from store.cli import main as store_cli
    from tests.judge_server import nothing_listening

    out = _copy(sampled, tmp_path / "faulty.zarr")
    with JudgeServer(score=len, fault=None if fault == "nothing_listening" else fault,
                     timeout_sleep=1.0) as server:
        url = nothing_listening() if fault == "nothing_listening" else server.base_url
        # credentials in the address (nothing listens there to see them) are never printed
        spec = url.replace("http://", "http://alice:SECRET@") if fault == "nothing_listening" else url
        failed = _rank(_rank_args(out, spec, tiny_dataset, timeout="0.3"))
        assert "SECRET" not in failed.output
        # every request of the first part failed (4 groups, 4 requests): the run stops there, exit 2, one line
        assert failed.exit_code == 2, failed.output
        # (above it: the white box's weights loading, a progress bar of transformers')
        assert failed.stderr.splitlines()[-1:] == [
            f"precompute rank: judge {url} (model rule): 4 of 4 requests failed in transport; last: "
            f"{FAULT_ERRORS[fault]}; stopped asking: most of the recent requests failed. Parts written: 0 complete, "
            f"1 unfinished (train/part-00000: 4 of 4 groups unanswered), 2 not asked; rerun the same command when "
            f"the judge answers"]
        assert "Traceback" not in failed.output
        store = TeacherStore.open(str(out))
        assert store.complete_parts("train", "samples", "judge") == []
        assert store.verify() == []
        verified = CliRunner().invoke(store_cli, ["verify", str(out)])
        assert verified.exit_code == 0
        assert verified.stdout.splitlines()[0].startswith(f"UNFINISHED train/part-00000/{JUDGE_SECTION}: 4 of 4 groups")
        assert verified.stdout.splitlines()[-1].endswith("; 1 section(s) unfinished (listed above)")
        info = CliRunner().invoke(store_cli, ["info", str(out), "--json"])
        import json

        info = json.loads(info.stdout)
        assert [entry["section"] for entry in info["unfinished"]] == [f"train/part-00000/{JUDGE_SECTION}"]
        samples = info["splits"]["train"]["sets"]["samples"]
        assert samples["parts_complete"]["judge"] == 0 and samples["parts_unfinished"] == {"judge": 1}
        assert "train/part-00000/samples/judge" not in store.attrs["manifest"]

        if fault == "nothing_listening":  # the judge comes up at another address: it finishes the pass
            with JudgeServer(score=len) as working:
                again = _rank(_rank_args(out, working.base_url, tiny_dataset))
                url, requests = working.base_url, working.requests
        else:  # the same address answers now
            server.fault = None
            before = len(server.requests)
            again = _rank(_rank_args(out, url, tiny_dataset))
            requests = server.requests[before:]
    assert again.exit_code == 0, again.output
    assert _rankings(out) == _rankings(reference)
    assert len(requests) == 10  # each of the 10 groups asked once: the failed requests were no try
    store = TeacherStore.open(str(out))
    assert store.verify() == [] and list(store.unfinished_sections()) == []
    assert store.pass_record(JUDGE_SECTION).settings["judge"] == {"kind": "http", "model_name": "rule"}
    assert all(store.section_attrs("train", p, "samples", "judge")["judge_urls"] == [url] for p in range(3))


def test_groups_the_judge_answered_are_kept_and_only_the_others_are_asked_again_at_another_address(
        sampled, tiny_dataset, tmp_path):
    """Concurrency 1: requests in group order. The judge answers group 0, gives group 1 free text (its answer: a
    try), then fails; a judge at another address finishes the pass, asking only what is left, with the labels
    one working judge would have shown, and the rankings equal that judge's."""
    script = ["", "free"]  # the first two requests: group 0 ranked, group 1 free text; every later one per `fault`
    one = _copy(sampled, tmp_path / "one.zarr")
    with JudgeServer(score=len, script=script) as server:
        assert _rank(_rank_args(one, server.base_url, tiny_dataset, concurrency="1")).exit_code == 0
        one_requests = list(server.requests)

    out = _copy(sampled, tmp_path / "two.zarr")
    with JudgeServer(score=len, script=script, fault="500") as down:
        failed = _rank(_rank_args(out, down.base_url, tiny_dataset, concurrency="1"))
        first_requests = list(down.requests)
    # round 1: group 0 ranked, 1 free, 2 and 3 failed; round 2: group 1 failed, and 3 of 5 failed: stop
    assert failed.exit_code == 2
    assert (f"judge {down.base_url} (model rule): 3 of 5 requests failed in transport; last: http_500; "
            f"stopped asking") in failed.stderr
    assert "1 unfinished (train/part-00000: 3 of 4 groups unanswered), 2 not asked" in failed.stderr
    with JudgeServer(score=len) as up:
        again = _rank(_rank_args(out, up.base_url, tiny_dataset, concurrency="1"))
        second_requests = list(up.requests)
    assert again.exit_code == 0, again.output

    assert _rankings(out) == _rankings(one)
    # what the working judge was asked from the start, less the two answers kept, and nothing else
    assert _asked(second_requests) == _asked(one_requests) - _asked(first_requests[:2])
    from store import TeacherStore

    store = TeacherStore.open(str(out))
    attrs = store.section_attrs("train", 0, "samples", "judge")
    assert attrs["complete"] and attrs["judge_urls"] == [down.base_url, up.base_url]
    audit = store.read_section("train", 0, "samples", "judge", ["audit_json", "group_audit_offsets"])
    import json

    offsets = audit["group_audit_offsets"]
    tries = [[t["error"] for t in json.loads(audit["audit_json"][offsets[g]:offsets[g + 1]].tobytes())["tries"]]
             for g in range(4)]
    assert tries == [[None], ["no_ranking", "http_500", None], ["http_500", None], ["http_500", None]]


def test_an_old_record_with_the_judges_address_is_finished_at_another_address(sampled, reference, tiny_dataset,
                                                                              tmp_path):
    """A store whose pass record still holds the judge's address (written before the address left it): another
    address serving the same model is not 'other settings'."""
    out = _copy(reference, tmp_path / "old.zarr")
    from store import TeacherStore

    store = TeacherStore.open(str(out), mode="a")

    def put_address(attrs):
        attrs["passes"][JUDGE_SECTION]["judge"]["base_url"] = "http://10.0.0.1:8000/v1"

    store.update_attrs(put_address)
    import shutil

    for part in (1, 2):  # two parts to rank again
        shutil.rmtree(out / "train" / f"part-{part:05d}" / "samples" / "judge")
    with JudgeServer(score=len) as server:
        result = _rank(_rank_args(out, server.base_url, tiny_dataset))
    assert result.exit_code == 0, result.output
    assert _rankings(out) == _rankings(reference)
