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
