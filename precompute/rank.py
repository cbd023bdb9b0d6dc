"""``precompute rank``: CycleAlign's rankings of sampled groups, into the store beside the samples.

Source: Hong et al., "CycleAlign: Iterative Distillation from Black-box LLM to
White-box Models for Better Human Alignment" (arXiv 2310.16271, Findings of
ACL 2024). The paper's full text is not available to this project: this is a
reconstruction from its abstract and a survey's summary (Xu et al. 2024, arXiv
2402.13116, section 3.2.4); docs/methods.md lists what is the paper's and what
is ours. Every choice marked *ours* below is this project's.

One round, for each group of responses that ``precompute sample`` drew from the
current student:

1. The black box ranks the group. The prompt (ours): an instruction
   (``precompute/templates/rank_instruction.txt``), in-context demonstrations
   (static ones shipped in ``precompute/templates/rank_demos.json``, then up to
   ``--demos`` dynamic ones: the longest agreements of the previous round's
   store, ``--demos-from``), then the question and the responses labelled
   ``[1]..[n]``. The reply must be a full ranking of exactly those labels, best
   first, such as ``[3] > [1] > [4] > [2]`` (:func:`parse_ranking`, strict: the
   last non-empty line of the reply, nothing else on it). A reply that is not
   (free text, a partial ranking, a repeated or unknown label) or a failed
   request is asked again with the labels shuffled (``--tries`` in all, ours);
   then the group stays unranked and is counted by reason.
2. The white box ranks the group by its own length-normalised conditional
   log-probability of each response (the mean token log-prob, RRHF's score):
   the ``samples/student_init`` sums of the model that sampled.
3. Agreement (ours): the longest common subsequence of the two orders, best to
   worst (:func:`agreement`); a group whose agreement is shorter than 2 gives no
   pseudo-label and is counted as dropped.
4. Dynamic demonstrations (ours): the groups of this round with the longest
   agreements (ties to the lower example index) are the next round's.

Everything the black box was told and said (the exact messages sent, the raw
reply, the parsed order, each try) is kept per group in the store, so a resumed
or repeated run never asks twice and a teammate can audit it.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

__all__ = ["LABEL_RE", "RankingError", "parse_ranking", "agreement", "render_prompt", "Demo", "load_static_demos",
           "load_instruction"]

#: a ranking line: labels [k] joined by ">" (spaces allowed around them), and nothing else
LABEL_RE = re.compile(r"\[(\d+)\]")
_CHAIN_RE = re.compile(r"^\s*\[\d+\](?:\s*>\s*\[\d+\])*\s*$")

REASON_NO_RANKING = "no_ranking"  # free text: no line is a chain of labels
REASON_PARTIAL = "partial"  # some labels missing
REASON_REPEATED = "repeated_label"
REASON_UNKNOWN = "unknown_label"  # a label outside 1..n


class RankingError(ValueError):
    """A reply that is not a full ranking of the group's labels; ``reason`` is one of the REASON_* codes."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_ranking(reply: str, n: int) -> list[int]:
    """The order (0-based positions in the labelled list, best first) a reply states; RankingError if it does not.

    Strict: the reply's last non-empty line must be ``[a] > [b] > ...`` naming each
    of the labels ``1..n`` exactly once.
    """
    lines = [line for line in (reply or "").splitlines() if line.strip()]
    if not lines or not _CHAIN_RE.match(lines[-1]):
        raise RankingError(REASON_NO_RANKING, f"no ranking line like [2] > [1] in {reply[-80:]!r}")
    labels = [int(x) for x in LABEL_RE.findall(lines[-1])]
    unknown = sorted({x for x in labels if not 1 <= x <= n})
    if unknown:
        raise RankingError(REASON_UNKNOWN, f"labels {unknown} are not among [1]..[{n}]")
    if len(set(labels)) != len(labels):
        raise RankingError(REASON_REPEATED, f"a label is repeated in {lines[-1].strip()!r}")
    if len(labels) != n:
        missing = sorted(set(range(1, n + 1)) - set(labels))
        raise RankingError(REASON_PARTIAL, f"labels {missing} are missing from {lines[-1].strip()!r}")
    return [x - 1 for x in labels]


def agreement(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The longest common subsequence of two orders (items best first): the items both put in the same order.

    Classic dynamic programme. Among equally long subsequences the one that keeps
    ``first``'s earlier items is returned (``first`` is the judge's order: ties
    favour the black box), so the result is deterministic.
    """
    a, b = list(first), list(second)
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) - 1, -1, -1):
        for j in range(len(b) - 1, -1, -1):
            table[i][j] = table[i + 1][j + 1] + 1 if a[i] == b[j] else max(table[i + 1][j], table[i][j + 1])
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == b[j]:
            out.append(a[i])
            i, j = i + 1, j + 1
        elif table[i + 1][j] > table[i][j + 1]:
            i += 1
        else:
            j += 1
    return out


@dataclass(frozen=True)
class Demo:
    """An in-context demonstration: a question, its responses, and their ranking (positions, best first)."""

    question: str
    responses: tuple[str, ...]
    order: tuple[int, ...]

    def to_json(self) -> dict:
        return {"question": self.question, "responses": list(self.responses), "order": list(self.order)}


def _labelled(question: str, responses: Sequence[str], shown: Sequence[int]) -> str:
    """The question and the responses in ``shown`` order, labelled [1]..[n]."""
    lines = [f"Question: {question}", ""]
    for label, position in enumerate(shown, 1):
        lines.append(f"[{label}] {responses[position]}")
    return "\n".join(lines)


def _ranking_line(order_of_labels: Sequence[int]) -> str:
    return " > ".join(f"[{label}]" for label in order_of_labels)


def render_prompt(instruction: str, demos: Sequence[Demo], question: str, responses: Sequence[str],
                  shown: Sequence[int]) -> list[dict]:
    """The chat messages that ask for a ranking: the instruction, each demo as a user/assistant exchange,
    then the group with its responses in ``shown`` order (a permutation of their positions)."""
    messages = [{"role": "system", "content": instruction}]
    for demo in demos:
        messages.append({"role": "user", "content": _labelled(demo.question, demo.responses,
                                                              range(len(demo.responses)))})
        messages.append({"role": "assistant", "content": _ranking_line([p + 1 for p in demo.order])})
    messages.append({"role": "user", "content": _labelled(question, responses, shown)})
    return messages


def shuffled_labels(n: int, try_index: int, seed: int) -> list[int]:
    """The order responses are shown in on a given try: as drawn first, then shuffled (deterministically)."""
    shown = list(range(n))
    if try_index:
        random.Random(seed * 1_000_003 + try_index).shuffle(shown)
    return shown


def load_instruction(path: str | None = None) -> str:
    if path is None:
        return resources.files("precompute").joinpath("templates/rank_instruction.txt").read_text("utf-8").strip()
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip()


def load_static_demos(path: str | None = None) -> list[Demo]:
    if path is None:
        text = resources.files("precompute").joinpath("templates/rank_demos.json").read_text("utf-8")
    else:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    demos = []
    for i, item in enumerate(json.loads(text)):
        responses = tuple(item["responses"])
        order = tuple(item["order"])
        if sorted(order) != list(range(len(responses))):
            raise ValueError(f"demonstration {i} of {path or 'rank_demos.json'}: order {list(order)} is not a "
                             f"ranking of its {len(responses)} responses (0-based positions, best first)")
        demos.append(Demo(item["question"], responses, order))
    return demos


# --------------------------------------------------------------------------- one group, one part

STATUS_RANKED, STATUS_UNRANKED, STATUS_SHORT_AGREEMENT = 0, 1, 2


@dataclass
class GroupRanking:
    """What ranking one group gave: the judge's order, the agreement, and every try for the audit."""

    judge_order: list[int] | None  # positions, best first; None when no try gave a full ranking
    tries: list[dict]  # {"messages", "reply", "order" | None, "error" | None} per try
    agreed: list[int] | None = None  # the agreement with the white box (set by :func:`agree`)

    @property
    def failure(self) -> str | None:
        """The last try's reason when the group stayed unranked."""
        return None if self.judge_order is not None else (self.tries[-1]["error"] if self.tries else "no_try")


def rank_groups(judge, instruction: str, demos: Sequence[Demo], groups: Sequence[tuple[str, Sequence[str]]], *,
                tries: int, seed: int, on_reply=None) -> list[GroupRanking]:
    """Ask the judge to rank each (question, responses) group; retry with shuffled labels (module docstring).

    All groups still unranked are asked together on each try (the judge batches
    or parallelises them); a group stops being asked once a reply parses.
    """
    results = [GroupRanking(None, []) for _ in groups]
    pending = list(range(len(groups)))
    for attempt in range(tries):
        if not pending:
            break
        asked = []
        for g in pending:
            question, responses = groups[g]
            shown = shuffled_labels(len(responses), attempt, seed + g)
            asked.append((g, shown, render_prompt(instruction, demos, question, responses, shown)))
        replies = judge.ask_all([messages for _, _, messages in asked], on_reply=on_reply)
        still = []
        for (g, shown, messages), reply in zip(asked, replies):
            record = {"messages": messages, "reply": reply.text, "order": None, "error": reply.error}
            if reply.text is not None:
                try:
                    record["order"] = [shown[label] for label in parse_ranking(reply.text, len(shown))]
                except RankingError as exc:
                    record["error"] = exc.reason
            results[g].tries.append(record)
            if record["order"] is not None:
                results[g].judge_order = record["order"]
            else:
                still.append(g)
        pending = still
    return results


def white_box_order(mean_logp: Sequence[float]) -> list[int]:
    """Positions by the white box's length-normalised log-prob, highest first (ties to the lower position)."""
    return sorted(range(len(mean_logp)), key=lambda i: (-float(mean_logp[i]), i))


def agree(result: GroupRanking, mean_logp: Sequence[float]) -> int:
    """Set ``result.agreed`` (None when shorter than 2 or unranked) and return the group's status code."""
    if result.judge_order is None:
        return STATUS_UNRANKED
    common = agreement(result.judge_order, white_box_order(mean_logp))
    if len(common) < 2:
        return STATUS_SHORT_AGREEMENT
    result.agreed = common
    return STATUS_RANKED
