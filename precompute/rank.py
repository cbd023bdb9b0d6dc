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
   (free text, a partial ranking, a repeated or unknown label) is the judge's
   answer: the group is asked again with the labels shuffled (``--tries``
   answers in all, ours); then it stays unranked and is counted by reason.
   A request that failed in transport (no connection, a timeout, an HTTP
   error after the client's retries, a body that is no chat completion) is
   not an answer: it is asked again with the same labels, at most ``--tries``
   requests per group in a run. A group still unanswered leaves its part
   *unfinished*: written with ``complete: false`` (:mod:`store.format`
   ``"unfinished"``) holding the answers got so far; the run fails with one
   line (:class:`JudgeUnanswered`: the judge's address, the requests that
   failed, the last error, the parts written), and the same command, run again
   when the judge answers, asks exactly the unanswered groups, with the labels
   one run with a working judge would have shown. Once most of the recent
   requests failed (:class:`precompute.judges.TransportTally`) a run stops
   asking. The judge's address is not a setting of the pass (a judge is its
   model): another URL serving the same ``--judge-model`` may finish it; each
   part records the addresses that answered it (``judge_urls``).
2. The white box ranks the group by its own length-normalised conditional
   log-probability of each response (the mean token log-prob, RRHF's score):
   the ``samples/student_init`` sums of the model that sampled.
3. Agreement (ours): the longest common subsequence of the two orders, best to
   worst (:func:`agreement`); a group whose agreement is shorter than 2 gives no
   pseudo-label and is counted as dropped.
4. Dynamic demonstrations (ours): the groups of this round with the longest
   agreements (ties to the lower example index) are the next round's.

Everything the black box was told and said (the exact messages sent, the raw
reply, the parsed order, each try, each failed request and why) is kept per
group in the store, so a resumed or repeated run never asks twice and a
teammate can audit it.

``--cluster SPEC`` (:mod:`precompute.cluster`, as for ``teacher`` and
``sample``): the coordinator does everything cheap as in one process (rows, the
white box resolved, tokenizers compared, demonstrations, the pass records,
``--reuse-from``), records each pass once, then submits one unit per part and
step (:func:`_run_on_cluster`): the white box's sums of a part
(:func:`white_box_part_on_worker`) and its rankings
(:func:`judge_part_on_worker`), which waits for that part's sums only. Each
worker builds its judge once per run and keeps it: an HTTP client
(``--judge-concurrency`` requests in flight *per worker*) or a ``local:`` model,
loaded once per worker like the white box (:func:`precompute.cluster.worker_model`).
An HTTP judge's API key is read on the worker from the variable
``--judge-api-key-env`` names, in the worker's own environment: the key never
travels with the run (workers of ``local:N`` inherit the coordinator's
environment; workers started by hand need it set where they start).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import time
from dataclasses import dataclass, field
from importlib import resources
from typing import Sequence

import click
import numpy as np
from tqdm.auto import tqdm

from lm import chat, models
from lm.options import (BatchTokensOption, ClusterOption, DataOptions, ProgressOption, ReuseOptions, RunOptions,
                        setting)
from store import ModelRecord, PassRecord, ProvenanceMismatch, TeacherStore
from store import format as fmt
from store import keys
from store.locations import redact_url
from store.sequences import split_sequences

from . import scoring
from .calibration import option_text
from .dataset import LoadedSplit, Row, load_data
from .judges import NOT_SENT, Judge, LocalJudge, TransportTally, judge_address, judge_identity, make_judge
from .provenance import prompts_fingerprint
from .reuse import Reuse
from .stores import check_samples_match, require_samples
from .summary import Summary, finish_summary

__all__ = ["LABEL_RE", "RankingError", "parse_ranking", "agreement", "render_prompt", "Demo", "load_static_demos",
           "load_instruction", "JudgeOptions", "RankConfig", "run_rank"]

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
    """The order responses are shown in on a given try (the judge's answers so far): as drawn first, then
    shuffled (deterministically)."""
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
#: only in an unfinished section: the judge has not answered this group yet (its requests failed in transport)
STATUS_UNANSWERED = 3


@dataclass
class GroupRanking:
    """What ranking one group gave: the judge's order, the agreement, and every try for the audit.

    A try whose request failed in transport (``reply`` None: timeout, HTTP error, no connection, a body that
    is no chat completion) is kept for the audit but is not one of the judge's answers: only answers count
    toward ``--tries`` and move the label shuffle on.
    """

    judge_order: list[int] | None  # positions, best first; None when no try gave a full ranking
    tries: list[dict]  # {"messages", "reply", "order" | None, "error" | None} per try
    agreed: list[int] | None = None  # the agreement with the white box (set by :func:`agree`)

    @property
    def answers(self) -> int:
        """Tries the judge answered (a reply, parsed or not)."""
        return sum(1 for t in self.tries if t.get("reply") is not None)

    def pending(self, tries: int) -> bool:
        """Still to ask: no full ranking yet and fewer than ``tries`` answers."""
        return self.judge_order is None and self.answers < tries

    @property
    def failure(self) -> str | None:
        """Why the group is unranked: the reason of the judge's last answer (else of the last failed request)."""
        if self.judge_order is not None:
            return None
        answered = [t for t in self.tries if t.get("reply") is not None]
        return (answered or self.tries or [{"error": "no_try"}])[-1]["error"]


def rank_groups(judge, instruction: str, demos: Sequence[Demo], groups: Sequence[tuple[str, Sequence[str]]], *,
                tries: int, seed: int, on_reply=None, previous: Sequence[GroupRanking | None] | None = None,
                transport: TransportTally | None = None) -> list[GroupRanking]:
    """Ask the judge to rank each (question, responses) group; retry with shuffled labels (module docstring).

    All groups still pending are asked together on each round (the judge batches
    or parallelises them), at most ``tries`` rounds: a group stops being asked
    once a reply parses or the judge has answered it ``tries`` times. The labels
    a group is shown depend on how many answers it has had (:func:`shuffled_labels`),
    so a request that failed in transport is asked again with the same labels,
    and a group that a later run finishes (``previous``: what an unfinished part
    kept) sees exactly what one run with a working judge would have shown it.
    ``transport``: counts the requests; once most recent ones failed no further
    round is asked (:class:`precompute.judges.TransportTally`).
    """
    results = [GroupRanking(p.judge_order, list(p.tries)) if p is not None else GroupRanking(None, [])
               for p in (previous if previous is not None else [None] * len(groups))]
    pending = [g for g, result in enumerate(results) if result.pending(tries)]
    for _ in range(tries):
        if not pending or (transport is not None and transport.failing):
            break
        asked = []
        for g in pending:
            question, responses = groups[g]
            shown = shuffled_labels(len(responses), results[g].answers, seed + g)
            asked.append((g, shown, render_prompt(instruction, demos, question, responses, shown)))
        conversations = [messages for _, _, messages in asked]
        replies = (judge.ask_all(conversations, on_reply=on_reply) if transport is None
                   else judge.ask_all(conversations, on_reply=on_reply, transport=transport))
        for (g, shown, messages), reply in zip(asked, replies):
            if reply.error == NOT_SENT:
                continue  # the judge had stopped: never asked, nothing to keep
            record = {"messages": messages, "reply": reply.text, "order": None, "error": reply.error,
                      "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
            if reply.text is not None:
                try:
                    record["order"] = [shown[label] for label in parse_ranking(reply.text, len(shown))]
                except RankingError as exc:
                    record["error"] = exc.reason
            results[g].tries.append(record)
            if record["order"] is not None:
                results[g].judge_order = record["order"]
        pending = [g for g in pending if results[g].pending(tries)]
    return results


def shuffle_seed(seed: int, part: int) -> int:
    """The seed of a part's label shuffles (group g of the part adds g)."""
    return seed + 7919 * part


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


# --------------------------------------------------------------------------- the command

PASS_JUDGE = fmt.PASS_SAMPLES_JUDGE
PASS_WHITE_BOX = fmt.PASS_SAMPLES_STUDENT_INIT


@dataclass(frozen=True, kw_only=True)
class JudgeOptions:
    """How the black box is reached and asked: options of ``precompute rank`` that ``train cyclealign`` passes on."""

    judge: str = setting(help="The black box: local:MODEL (a model dir, .gguf file or embedded name) or an "
                              "OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.", required=True)
    judge_model: str | None = setting(None, "Model name the HTTP judge serves (required for a URL judge).")
    judge_api_key_env: str = setting("OPENAI_API_KEY", "Environment variable holding the HTTP judge's API key, read "
                                                       "at run time (with --cluster, by each worker from its own "
                                                       "environment) and never recorded.")
    judge_concurrency: int = setting(4, "HTTP requests in flight at once (per worker with --cluster).",
                                     type=click.IntRange(min=1))
    judge_timeout: float = setting(60.0, "Seconds before an HTTP request counts as timed out.",
                                   type=click.FloatRange(min=0, min_open=True))
    judge_retries: int = setting(3, "HTTP retries with exponential backoff on 429, 5xx and timeouts, per request.",
                                 type=click.IntRange(min=0))
    judge_max_tokens: int = setting(64, "Longest reply the judge may write.", type=click.IntRange(min=4))
    tries: int = setting(3, "Requests per group before it stays unranked (labels reshuffled after the first).",
                         type=click.IntRange(min=1))
    demos: int = setting(2, "Dynamic demonstrations per request: the previous round's longest agreements.",
                         type=click.IntRange(min=0))
    instruction: str | None = setting(None, "Instruction file for the judge [precompute/templates/"
                                            "rank_instruction.txt].", type=click.Path(dir_okay=False))
    static_demos: str | None = setting(None, "JSON file of static demonstrations [precompute/templates/"
                                             "rank_demos.json].", type=click.Path(dir_okay=False))

    def open_judge(self, device: str, dtype: str) -> Judge:
        """The judge ``--judge`` names (:func:`precompute.judges.make_judge`: a ``local:`` model loads on first use;
        an HTTP client reads its key from this process's environment)."""
        return make_judge(self.judge, model=self.judge_model, api_key_env=self.judge_api_key_env,
                          concurrency=self.judge_concurrency, timeout=self.judge_timeout, retries=self.judge_retries,
                          max_new_tokens=self.judge_max_tokens, device=device, dtype=dtype)


@dataclass(frozen=True, kw_only=True)
class RankConfig(JudgeOptions, DataOptions, RunOptions, BatchTokensOption, ClusterOption, ReuseOptions,
                 ProgressOption):
    """Settings of ``precompute rank``; each field is also its command-line option."""

    out: str = setting(help="Store that `precompute sample` filled (its groups are ranked in place; give the "
                            "--dataset, --limit and --column of that run).", required=True)
    demos_from: str | None = setting(None, "Store of the previous round, whose best agreements become the --demos "
                                           "dynamic demonstrations [none: static demonstrations only].")
    student: str | None = setting(None, "White box scoring the responses [the model that sampled them].")
    seed: int = setting(0, "Seed of the label shuffles.", type=int)


def question_text(prompt: Sequence[dict]) -> str:
    """What the judge is shown as the question: the user's message, or the conversation as ``Role: text`` lines."""
    if len(prompt) == 1:
        return prompt[0]["content"]
    return "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in prompt)


def dynamic_demos(location: str | None, count: int, storage_options: dict | None = None) -> list[Demo]:
    """The ``count`` groups of a previous round's store with the longest agreements (ties: split order, then the
    lower example index), each shown with its agreed responses in the agreed order."""
    if not location or count == 0:
        return []
    store = TeacherStore.open(location, storage_options=storage_options)
    found = []
    for split in store.splits():
        for part in store.complete_parts(split, fmt.SET_SAMPLES, fmt.SECTION_JUDGE):
            judged = store.read_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE)
            base = store.read_section(split, part, fmt.SET_SAMPLES, fmt.BASE,
                                      [fmt.ARRAY_GROUP_OFFSETS, fmt.ARRAY_GROUP_EXAMPLE_INDEX])
            audits = _audits(judged)
            for g, example in enumerate(base[fmt.ARRAY_GROUP_EXAMPLE_INDEX].tolist()):
                if judged[fmt.ARRAY_GROUP_STATUS][g] != STATUS_RANKED:
                    continue
                s0, s1 = int(base[fmt.ARRAY_GROUP_OFFSETS][g]), int(base[fmt.ARRAY_GROUP_OFFSETS][g + 1])
                agreed = [(int(r), s - s0) for s, r in zip(range(s0, s1), judged[fmt.ARRAY_AGREED_RANK][s0:s1])
                          if r >= 0]
                record = audits[g]
                responses = [record["responses"][position] for _, position in sorted(agreed)]
                found.append((-len(agreed), store.splits().index(split), example,
                              Demo(record["question"], tuple(responses), tuple(range(len(responses))))))
    return [demo for *_, demo in sorted(found, key=lambda item: item[:3])[:count]]


def _audits(judged: dict) -> list[dict]:
    offsets, raw = judged[fmt.ARRAY_GROUP_AUDIT_OFFSETS], judged[fmt.ARRAY_AUDIT_JSON].tobytes()
    return [json.loads(raw[offsets[g]:offsets[g + 1]].decode("utf-8")) for g in range(len(offsets) - 1)]


def _section_key(store: TeacherStore, name: str, record: PassRecord, split: str, part: int,
                 prompts_sha256: str | None = None, part_seed: int | None = None) -> str | None:
    """The content key (:mod:`store.keys`) of section ``name`` of a part of the samples; None until the
    sections it is computed on are complete."""
    base = store.section_attrs(split, part, fmt.SET_SAMPLES)
    if not (base and base.get("complete")):
        return None
    reads = {}
    if name == PASS_JUDGE:  # the agreement reads the white box's sums
        white = store.section_attrs(split, part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT)
        if not (white and white.get("complete")):
            return None
        reads[PASS_WHITE_BOX] = {fmt.ARRAY_LOGP_SUM: white["checksums"][fmt.ARRAY_LOGP_SUM]}
    return keys.section_key(name, layout=store.key_layout(), example_range=store.part_range(split, part),
                            model_sha256=record.model.sha256 if record.model else None, settings=record.settings,
                            base_checksums=base["checksums"], reads=reads, prompts_sha256=prompts_sha256,
                            part_seed=part_seed)


@dataclass
class RankContext:
    """Everything ranking a part reads, decided before any model loads (on a cluster: shipped to the workers
    once, without its store handle and rows; see :func:`portable_context`)."""

    config: RankConfig
    store: TeacherStore | None
    rows: dict[str, LoadedSplit]
    white_box: models.ModelInfo
    tokenizer: object
    instruction: str
    demos: list[Demo]  # the static ones, then the dynamic ones
    record: PassRecord  # samples/judge
    white: PassRecord  # samples/student_init
    device: str
    dtype: str
    judge_info: models.ModelInfo | None = None  # a local: judge's model, resolved once (cluster runs)
    judge: Judge | None = field(default=None, repr=False)  # on a worker: built for its first part, then kept

    def rows_of_part(self, split: str, part: int) -> list[Row]:
        start, stop = self.store.part_range(split, part)
        return [r for r in self.rows[split].rows if start <= r.index < stop]


def prepare(config: RankConfig, summary: Summary) -> RankContext:
    """The store, rows, white box, tokenizer, prompt parts and pass records: everything cheap and checkable."""
    store = require_samples(config.out, config.splits, config.storage_options,
                            make="`precompute sample` for these prompts")
    rows = load_data(config, require_pairs=False)
    check_samples_match(store, rows, config.out)
    for split, loaded in rows.items():
        summary.examples[split] = len(loaded.rows)
        summary.skipped[split] = dict(loaded.skipped)
    sampler = (store.pass_record(fmt.PASS_SAMPLES_BASE) or PassRecord()).model
    white_box = models.resolve_model(config.student or (sampler.name if sampler else None), models.EMBEDDED_STUDENT)
    if sampler and not config.student and white_box.weights_hash != sampler.sha256:
        raise ValueError(f"{config.out}: the model that sampled, {sampler.name}, is not at that path any more (other "
                         f"weights there); pass the white box with --student")
    tokenizer = models.load_tokenizer(white_box.path)
    if chat.tokenizer_hash(tokenizer) != store.tokenizer.hash:
        raise ValueError(f"--student {white_box.name}: its tokenizer differs from the store's ({store.tokenizer.name})")
    instruction = load_instruction(config.instruction)
    static = load_static_demos(config.static_demos)
    dynamic = dynamic_demos(config.demos_from, config.demos, config.storage_options)
    record = judge_record(config, instruction, static, dynamic, white_box)
    diff = store.pass_conflict(PASS_JUDGE, _as_stored_address(store, record.to_dict()))
    if diff and any(store.complete_parts(s, fmt.SET_SAMPLES, fmt.SECTION_JUDGE) for s in rows):
        raise ProvenanceMismatch(f"{config.out}: pass {PASS_JUDGE!r} is already in this store with other settings: "
                                 f"{diff}. Write the samples to another --out, or delete the store")
    device = models.resolve_device(config.device)
    dtype = str(models.resolve_dtype(config.dtype, device)).replace("torch.", "")
    white = PassRecord(ModelRecord(white_box.name, white_box.weights_hash), {
        "dtype": dtype, "max_length": (store.pass_record(fmt.PASS_SAMPLES_BASE) or PassRecord()).max_length})
    return RankContext(config=config, store=store, rows=rows, white_box=white_box, tokenizer=tokenizer,
                       instruction=instruction, demos=[*static, *dynamic], record=record, white=white,
                       device=device, dtype=dtype)


def _as_stored_address(store: TeacherStore, asked: dict) -> dict:
    """``asked`` with the judge's address of the stored record, if it has one (written before the address left
    the record): the address is never compared."""
    stored = (store.attrs.get("passes") or {}).get(PASS_JUDGE) or {}
    address = (stored.get("judge") or {}).get("base_url") if isinstance(stored.get("judge"), dict) else None
    if address is None or not isinstance(asked.get("judge"), dict):
        return asked
    return {**asked, "judge": {**asked["judge"], "base_url": address}}


def white_box_key(ctx: RankContext, split: str, part: int) -> str | None:
    return _section_key(ctx.store, PASS_WHITE_BOX, ctx.white, split, part)


def judge_key(ctx: RankContext, split: str, part: int, rows: Sequence[Row]) -> str | None:
    """The content key of a part's rankings; ``rows``: the part's rows (their prompts are the questions)."""
    return _section_key(ctx.store, PASS_JUDGE, ctx.record, split, part,
                        prompts_sha256=prompts_fingerprint(rows), part_seed=shuffle_seed(ctx.config.seed, part))


def _register_white_box(ctx: RankContext) -> None:
    ctx.store.register_pass(PASS_WHITE_BOX, ctx.white.to_dict(), may_replace=True)


def _register_judge(ctx: RankContext) -> None:
    ctx.store.register_pass(PASS_JUDGE, ctx.record.to_dict(), may_replace=True)


def _todo(ctx: RankContext, summary: Summary, reuse: Reuse, name: str, section: str, key_of,
          register) -> tuple[dict, list[tuple[str, int]]]:
    """The step's summary record and its parts still to compute: not complete, and not reused (copied here)."""
    todo = [(split, part) for split in ctx.rows for part in range(ctx.store.num_parts(split))
            if not ctx.store.is_complete(split, part, fmt.SET_SAMPLES, section)]
    step = summary.step_record(name, sum(ctx.store.num_parts(s) for s in ctx.rows) - len(todo))
    return step, reuse.take_parts(name, fmt.SET_SAMPLES, section, todo, key_of, register)


def _white_box_todo(ctx: RankContext, summary: Summary, reuse: Reuse):
    return _todo(ctx, summary, reuse, PASS_WHITE_BOX, fmt.SECTION_STUDENT_INIT,
                 lambda split, part: white_box_key(ctx, split, part), lambda: _register_white_box(ctx))


def _judge_todo(ctx: RankContext, summary: Summary, reuse: Reuse):
    """(On a cluster this runs before the white box's sums of this run exist: a part whose sums are computed
    now has no key yet, and is ranked rather than reused.)"""
    return _todo(ctx, summary, reuse, PASS_JUDGE, fmt.SECTION_JUDGE,
                 lambda split, part: judge_key(ctx, split, part, ctx.rows_of_part(split, part)),
                 lambda: _register_judge(ctx))


def white_box_part(ctx: RankContext, split: str, part: int, model) -> tuple[dict, int]:
    """The white box's sums over each response of one part: (the section's arrays, tokens scored)."""
    seqs, prompts = split_sequences(ctx.store.read_section(split, part, fmt.SET_SAMPLES))
    scored = scoring.score_sequences(model, seqs, prompts, batch_tokens=ctx.config.batch_tokens,
                                     pad_id=chat.pad_id(ctx.tokenizer))
    return scoring.scored_arrays(scored), sum(map(len, seqs))


def _white_box_sums(ctx: RankContext, summary: Summary, reuse: Reuse) -> None:
    """``samples/student_init`` (the white box's sums over each response) for the parts that lack it."""
    record, todo = _white_box_todo(ctx, summary, reuse)
    if not todo:
        return
    model, _, _ = models.load_model(ctx.white_box.path, device=ctx.device, dtype=ctx.dtype)
    _register_white_box(ctx)
    started = time.perf_counter()
    for split, part in todo:
        arrays, tokens = white_box_part(ctx, split, part, model)
        if ctx.store.write_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT, arrays,
                                   {keys.ATTR: white_box_key(ctx, split, part)}) is not None:
            record["parts_done"] += 1
            record["tokens"] += tokens
    record["seconds"] = time.perf_counter() - started
    model = None
    models.free_memory()


def judge_setting(spec: str, model: str | None) -> dict:
    """The judge as the pass record holds it: :func:`precompute.judges.judge_identity` without the address."""
    return {k: v for k, v in judge_identity(spec, model).items() if k != "base_url"}


def judge_record(config: RankConfig, instruction: str, static: Sequence[Demo], dynamic: Sequence[Demo],
                 white_box) -> PassRecord:
    """What the rankings depend on: the judge (never its key), the prompt's parts, tries, seed, the white box.

    An HTTP judge is its model name: its address is how it is reached, not a setting of its numbers (another
    URL serving the same ``--judge-model`` may finish the pass); each part records the addresses that
    answered it (:data:`ATTR_JUDGE_URLS`).
    """
    def digest(value) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()

    return PassRecord(ModelRecord(white_box.name, white_box.weights_hash), {
        "judge": judge_setting(config.judge, config.judge_model),
        "instruction_sha256": digest(instruction),
        "static_demos_sha256": digest([d.to_json() for d in static]),
        "dynamic_demos": {"from": redact_url(config.demos_from) if config.demos_from else None,
                          "sha256": digest([d.to_json() for d in dynamic]), "count": len(dynamic)},
        "tries": config.tries, "seed": config.seed, "max_tokens": config.judge_max_tokens,
        "parse": "last non-empty line must be [a] > [b] > ... naming every label once",
        "white_box_score": "mean token log-prob of samples/student_init (model: this record's model)",
        "agreement": "longest common subsequence of the two orders, best first; shorter than 2: no pseudo-label",
    })


#: section attribute of an unfinished judge section (:mod:`store.format` ``unfinished``): what is left to ask
ATTR_UNFINISHED = fmt.ATTR_UNFINISHED
#: section attribute: the addresses (credentials removed) of the HTTP judges whose answers the part holds
ATTR_JUDGE_URLS = "judge_urls"


def previous_answers(store: TeacherStore, split: str, part: int, key: str | None,
                     n_groups: int) -> tuple[list[GroupRanking | None], list[str]]:
    """What an earlier run kept of a part it could not finish: each group's :class:`GroupRanking` (None for all
    when there is no unfinished section, or one written with other inputs or settings: another content key)
    and the judge addresses that answered it."""
    nothing: list[GroupRanking | None] = [None] * n_groups
    found = store.unfinished_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE)
    if found is None or key is None:
        return nothing, []
    attrs, arrays = found
    if attrs.get(keys.ATTR) != key or len(arrays[fmt.ARRAY_GROUP_AUDIT_OFFSETS]) != n_groups + 1:
        return nothing, []  # asked with other settings or on other samples: asked again from the start
    kept = [GroupRanking(audit["judge_order"], list(audit["tries"])) for audit in _audits(arrays)]
    return kept, list(attrs.get(ATTR_JUDGE_URLS) or [])


def rank_part(store: TeacherStore, split: str, part: int, judge, tokenizer, instruction: str,
              demos: Sequence[Demo], rows_by_index: dict, config: RankConfig, progress, *, key: str | None = None,
              transport: TransportTally | None = None) -> tuple[dict, dict]:
    """Rank every group of one part: (the judge section's arrays, its attributes).

    Groups an earlier run of the same settings got answers for (an unfinished section with content key
    ``key``) are kept as they are; only the others are asked. Groups the judge has still not answered
    (requests failed in transport) have status :data:`STATUS_UNANSWERED`, and the attributes then hold
    :data:`ATTR_UNFINISHED`: the section is to be written unfinished, for the next run to finish.
    """
    base = store.read_section(split, part, fmt.SET_SAMPLES)
    sums = store.read_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT,
                              [fmt.ARRAY_LOGP_SUM])[fmt.ARRAY_LOGP_SUM]
    seqs, prompt_lengths = split_sequences(base)
    offsets, examples = base[fmt.ARRAY_GROUP_OFFSETS], base[fmt.ARRAY_GROUP_EXAMPLE_INDEX].tolist()
    groups, spans = [], []
    for g, example in enumerate(examples):
        s0, s1 = int(offsets[g]), int(offsets[g + 1])
        responses = [option_text(tokenizer, seqs[s][prompt_lengths[s]:]) for s in range(s0, s1)]
        groups.append((question_text(rows_by_index[example].prompt), responses))
        spans.append((s0, s1))
    previous, urls = previous_answers(store, split, part, key, len(groups))
    results = rank_groups(judge, instruction, demos, groups, tries=config.tries,
                          seed=shuffle_seed(config.seed, part), on_reply=progress, previous=previous,
                          transport=transport)
    kept_tries = [len(p.tries) if p is not None else 0 for p in previous]
    answered_now = any(t.get("reply") is not None for r, n in zip(results, kept_tries) for t in r.tries[n:])
    address = judge_address(config.judge)
    if answered_now and config.judge.startswith(("http://", "https://")) and address not in urls:
        urls.append(address)
    n_seq = len(seqs)
    judge_rank = np.full(n_seq, -1, np.int16)
    white_rank = np.full(n_seq, -1, np.int16)
    agreed_rank = np.full(n_seq, -1, np.int16)
    status, tries, audit, audit_offsets = [], [], bytearray(), [0]
    counts: dict[str, int] = {}
    unanswered = []
    for g, ((s0, s1), (question, responses), result) in enumerate(zip(spans, groups, results)):
        mean_logp = [float(sums[s]) / max(1, len(seqs[s]) - prompt_lengths[s]) for s in range(s0, s1)]
        if result.pending(config.tries):
            code, reason = STATUS_UNANSWERED, "unanswered"
            unanswered.append(g)
        else:
            code = agree(result, mean_logp)
            reason = {STATUS_RANKED: "agreed", STATUS_SHORT_AGREEMENT: "agreement_shorter_than_2"}.get(
                code, f"unranked_{result.failure}")
        for place, position in enumerate(white_box_order(mean_logp)):
            white_rank[s0 + position] = place
        if result.judge_order is not None:
            for place, position in enumerate(result.judge_order):
                judge_rank[s0 + position] = place
        if result.agreed is not None:
            for place, position in enumerate(result.agreed):
                agreed_rank[s0 + position] = place
        counts[reason] = counts.get(reason, 0) + 1
        status.append(code)
        tries.append(min(len(result.tries), np.iinfo(np.int8).max))
        audit += json.dumps({"question": question, "responses": responses, "tries": result.tries,
                             "judge_order": result.judge_order, "agreed_order": result.agreed},
                            ensure_ascii=False).encode("utf-8")
        audit_offsets.append(len(audit))
    arrays = {fmt.ARRAY_JUDGE_RANK: judge_rank, fmt.ARRAY_WHITE_RANK: white_rank, fmt.ARRAY_AGREED_RANK: agreed_rank,
              fmt.ARRAY_GROUP_STATUS: np.asarray(status, np.int8), fmt.ARRAY_GROUP_TRIES: np.asarray(tries, np.int8),
              fmt.ARRAY_GROUP_AUDIT_OFFSETS: np.asarray(audit_offsets, np.int64),
              fmt.ARRAY_AUDIT_JSON: np.frombuffer(bytes(audit), dtype=np.uint8)}
    cost = {"requests": sum(len(r.tries) for r in results),
            "prompt_tokens": sum(t.get("prompt_tokens", 0) for r in results for t in r.tries),
            "completion_tokens": sum(t.get("completion_tokens", 0) for r in results for t in r.tries)}
    agreement_lengths = [len(r.agreed) for r in results if r.agreed is not None]
    attrs = {"groups": len(groups), "outcomes": counts, "judge_cost": cost, "agreement_lengths": agreement_lengths}
    if urls:
        attrs[ATTR_JUDGE_URLS] = urls
    if unanswered:
        last = next((t["error"] for r in reversed(results) for t in reversed(r.tries) if t.get("reply") is None),
                    None)
        attrs[ATTR_UNFINISHED] = {
            "reason": f"{len(unanswered)} of {len(groups)} groups not answered by the judge yet (requests failed "
                      f"in transport{f'; last: {last}' if last else ''}); `precompute rank` asks them again",
            "pending_groups": unanswered}
    return arrays, attrs


def judge_part(ctx: RankContext, split: str, part: int, judge, rows: Sequence[Row], progress,
               transport: TransportTally | None = None) -> tuple[dict, dict]:
    """:func:`rank_part` of one part with its content key; ``rows``: the part's rows."""
    key = judge_key(ctx, split, part, rows)
    arrays, attrs = rank_part(ctx.store, split, part, judge, ctx.tokenizer, ctx.instruction, ctx.demos,
                              {r.index: r for r in rows}, ctx.config, progress, key=key, transport=transport)
    attrs[keys.ATTR] = key
    return arrays, attrs


def _new_totals() -> dict:
    return {"outcomes": {}, "judge_cost": {}, "agreement_lengths": [], "groups": 0}


class JudgeUnanswered(ValueError):
    """The judge left groups unanswered (their requests failed in transport): their parts are written unfinished
    and the same command, run again when the judge answers, asks exactly those groups."""


@dataclass
class JudgeReport:
    """What the judge step of a run left: its requests and those that failed in transport, the parts written
    complete or unfinished, and the parts it stopped before asking."""

    address: str  # credentials removed
    model: str | None
    requests: int = 0
    failed: int = 0
    last_error: str | None = None
    stopped: bool = False  # most recent requests failed: the run asked nothing more
    complete: list[str] = field(default_factory=list)  # "split/part-NNNNN" written complete in this run
    unfinished: list[tuple[str, int, int]] = field(default_factory=list)  # (part, groups unanswered, groups)
    not_asked: int = 0  # parts left without a request once the run stopped

    def add_transport(self, tally: dict) -> None:
        """Add one tally (:func:`transport_counts`) of requests."""
        self.requests += tally["requests"]
        self.failed += tally["failed"]
        self.last_error = tally["last_error"] or self.last_error
        self.stopped = self.stopped or tally["stopped"]

    def error(self) -> JudgeUnanswered | None:
        """The one-line refusal that ends a run that left groups unanswered (None when every part is complete)."""
        if not (self.unfinished or self.not_asked):
            return None
        judge = f"judge {self.address}" + (f" (model {self.model})" if self.model else "")
        stopped = "; stopped asking: most of the recent requests failed" if self.stopped else ""
        shown = ", ".join(f"{name}: {left} of {groups} groups unanswered"
                          for name, left, groups in sorted(self.unfinished)[:3])
        more = ", ..." if len(self.unfinished) > 3 else ""
        written = [f"{len(self.complete)} complete", f"{len(self.unfinished)} unfinished"
                   + (f" ({shown}{more})" if shown else "")]
        if self.not_asked:
            written.append(f"{self.not_asked} not asked")
        return JudgeUnanswered(f"{judge}: {self.failed} of {self.requests} requests failed in transport; last: "
                               f"{self.last_error or 'none'}{stopped}. Parts written: {', '.join(written)}; rerun "
                               f"the same command when the judge answers")


def transport_counts(tally: TransportTally) -> dict:
    """A :class:`TransportTally`'s counts, as plain values (a cluster unit's outcome carries them)."""
    return {"requests": tally.requests, "failed": tally.failed, "last_error": tally.last_error,
            "stopped": tally.failing}


def run_rank(config: RankConfig) -> Summary:
    """``precompute rank``: white-box sums where missing, then the judge's rankings part by part.

    Raises :class:`JudgeUnanswered` (after the store's manifest and summary are written) when groups are left
    unanswered: their parts are written unfinished, and the same command finishes them.
    """
    started = time.perf_counter()
    summary = Summary(store=config.out)
    if config.cluster:
        ctx, totals, report = _run_on_cluster(config, summary)
    else:
        ctx = prepare(config, summary)
        reuse = Reuse.for_run(ctx.store, config, summary)
        _white_box_sums(ctx, summary, reuse)
        totals, report = _rank_parts(ctx, summary, reuse)
    summary.notes.extend(describe_totals(totals))
    summary.seconds = time.perf_counter() - started
    summary = finish_summary(ctx.store, list(ctx.rows), summary)
    error = report.error()
    if error is not None:
        raise error
    return summary


def _part_name(split: str, part: int) -> str:
    return f"{split}/{fmt.part_name(part)}"


def _count_part(report: JudgeReport, split: str, part: int, attrs: dict) -> None:
    """Count a part written in this run as complete or unfinished."""
    left = attrs.get(ATTR_UNFINISHED)
    if left:
        report.unfinished.append((_part_name(split, part), len(left["pending_groups"]), attrs["groups"]))
    else:
        report.complete.append(_part_name(split, part))


def _rank_parts(ctx: RankContext, summary: Summary, reuse: Reuse) -> tuple[dict, JudgeReport]:
    """The judge's rankings of the parts that lack them, in this process; returns the totals of the run and
    what the judge left. Once most recent requests failed in transport, the parts after the current one are
    not asked."""
    config = ctx.config
    step, todo = _judge_todo(ctx, summary, reuse)
    totals = _new_totals()
    report = JudgeReport(judge_address(config.judge), config.judge_model)
    if not todo:
        return totals, report
    judge = config.open_judge(config.device, config.dtype)
    _register_judge(ctx)
    transport = TransportTally()
    groups_todo = sum(int(ctx.store.section_attrs(s, p, fmt.SET_SAMPLES)["rows"].get(fmt.AXIS_GROUP, 0))
                      for s, p in todo)
    t0 = time.perf_counter()
    with tqdm(total=groups_todo or None, desc=PASS_JUDGE, unit="request", disable=not config.progress,
              dynamic_ncols=True) as bar:
        for i, (split, part) in enumerate(todo):
            if transport.failing:
                report.not_asked = len(todo) - i
                break
            arrays, attrs = judge_part(ctx, split, part, judge, ctx.rows_of_part(split, part), bar.update, transport)
            finished = ATTR_UNFINISHED not in attrs
            if ctx.store.write_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE, arrays, attrs,
                                       complete=finished) is None:
                step["parts_skipped"] += 1  # another writer finished it meanwhile
                continue
            if finished:
                step["parts_done"] += 1
            else:  # not a part written: the summary's runs record keeps the count
                step["parts_unfinished"] = step.get("parts_unfinished", 0) + 1
            step["tokens"] += attrs["judge_cost"]["prompt_tokens"] + attrs["judge_cost"]["completion_tokens"]
            _add_totals(totals, attrs)
            _count_part(report, split, part, attrs)
    step["seconds"] = time.perf_counter() - t0
    judge.close()
    report.add_transport(transport_counts(transport))
    return totals, report


# --------------------------------------------------------------------------- on a cluster (--cluster)

def _run_on_cluster(config: RankConfig, summary: Summary) -> tuple[RankContext, dict, JudgeReport]:
    """Each part of each step a unit of work on a dask cluster (module docstring, :mod:`precompute.cluster`).

    The coordinator reuses what ``--reuse-from`` holds, records each pass once,
    then submits the parts: the white box's sums first (priority), each part's
    rankings after that part's sums only. Returns the context, the totals of
    the groups ranked in this run and what the judge left (each part counts its
    own requests: a part stops asking once most of its recent requests failed).
    """
    from . import cluster

    totals = _new_totals()
    report = JudgeReport(judge_address(config.judge), config.judge_model)
    with cluster.ClusterSession(config.cluster) as session:
        device, dtype = session.resolve(config.device, config.dtype)
        ctx = prepare(dataclasses.replace(config, device=device, dtype=dtype), summary)
        ctx.config.open_judge(ctx.device, ctx.dtype).close()  # a bad --judge is refused here, not on each worker
        reuse = Reuse.for_run(ctx.store, ctx.config, summary)
        white_step, white_todo = _white_box_todo(ctx, summary, reuse)  # reused here, not submitted
        judge_step, judge_todo = _judge_todo(ctx, summary, reuse)
        if white_todo:
            _register_white_box(ctx)
        if judge_todo:
            _register_judge(ctx)
            _warn_of_workers_without_key(session, ctx.config)
        if white_todo or judge_todo:
            fingerprint = session.install(attach_context, portable_context(ctx))
            units = [cluster.Unit(PASS_WHITE_BOX, split, part, white_box_part_on_worker, (fingerprint, split, part),
                                  priority=2) for split, part in white_todo]
            summing = set(white_todo)
            units += [cluster.Unit(PASS_JUDGE, split, part, judge_part_on_worker,
                                   (fingerprint, split, part, ctx.rows_of_part(split, part)),
                                   after=((PASS_WHITE_BOX, split, part),) if (split, part) in summing else (),
                                   priority=1) for split, part in judge_todo]
            results = session.run(units, desc="rank parts", progress=ctx.config.progress)
            cluster.tally(results, {PASS_WHITE_BOX: white_step, PASS_JUDGE: judge_step})
            for unit, outcome in sorted(results, key=lambda item: item[1]["stop"] or 0):  # the last error last
                if unit.step != PASS_JUDGE:
                    continue
                if outcome.get("transport"):
                    report.add_transport(outcome["transport"])
                if outcome["written"] or outcome.get("unfinished"):
                    _add_totals(totals, outcome["totals"])
                    _count_part(report, unit.split, unit.part, outcome["totals"])
                if outcome.get("unfinished"):  # tally counted it as found complete: it is neither
                    judge_step["parts_skipped"] -= 1
                    judge_step["parts_unfinished"] = judge_step.get("parts_unfinished", 0) + 1
        summary.notes.append(f"  cluster {config.cluster}: {session.workers} worker(s)")
    return ctx, totals, report


def _has_environment_variable(name: str) -> bool:
    """On a worker: whether ``name`` is set in its environment (its value never leaves the worker)."""
    return bool(os.environ.get(name))


def _warn_of_workers_without_key(session, config: RankConfig) -> None:
    """An HTTP judge's key is read on each worker; say which workers lack the variable the coordinator has."""
    name = config.judge_api_key_env
    if not config.judge.startswith(("http://", "https://")) or not os.environ.get(name):
        return  # a server that needs no key (none here either)
    lacking = sorted(address for address, has in session.client.run(_has_environment_variable, name).items()
                     if not has)
    if lacking:
        session.echo(f"warning: ${name} is set here but not on worker(s) {', '.join(lacking)}: they call the judge "
                     f"without a key; set it in the workers' environment (the key never travels with the run)")


def portable_context(ctx: RankContext) -> RankContext:
    """What the workers get once per run: the context without its store handle, rows, reuse and demonstration
    locations (which may hold credentials: the coordinator alone reads them); never the API key, which each
    worker reads from its own environment."""
    config = dataclasses.replace(ctx.config, reuse_from=(), reuse_options={}, demos_from=None)
    local = config.judge.startswith("local:")
    return dataclasses.replace(ctx, config=config, store=None, rows={}, judge=None,
                               judge_info=models.resolve_model(config.judge[len("local:"):]) if local else None)


def attach_context(portable: RankContext) -> RankContext:
    """On a worker: the portable context with the store opened there (same location)."""
    config = portable.config
    store = TeacherStore.open(config.out, mode="a", storage_options=config.storage_options)
    return dataclasses.replace(portable, store=store)


class _WorkerLocalJudge(LocalJudge):
    """A ``local:`` judge on a worker: its model is the worker's kept model (:func:`precompute.cluster.worker_model`),
    loaded once per worker and placed on the worker's own GPU."""

    def __init__(self, info: models.ModelInfo, *, device: str, dtype: str, max_new_tokens: int):
        super().__init__(info.path, device=device, dtype=dtype, max_new_tokens=max_new_tokens)
        self.info = info

    def _load(self):
        from . import cluster

        if self._tokenizer is None:
            here = cluster.local_model(self.info)
            self._tokenizer, self._path = models.load_tokenizer(here.path), models.model_dir(here)
        return cluster.worker_model(self.info, device=self.device, dtype=self.dtype), self._tokenizer

    def close(self) -> None:  # the model is the worker's (released when the run ends)
        self._tokenizer = None


def worker_judge(ctx: RankContext) -> Judge:
    """On a worker: the run's judge, built for its first part and kept (one HTTP client, or one local model)."""
    if ctx.judge is None:
        config = ctx.config
        if ctx.judge_info is not None:
            ctx.judge = _WorkerLocalJudge(ctx.judge_info, device=ctx.device, dtype=ctx.dtype,
                                          max_new_tokens=config.judge_max_tokens)
        else:  # the key: from this worker's environment
            ctx.judge = config.open_judge(ctx.device, ctx.dtype)
    return ctx.judge


def white_box_part_on_worker(fingerprint: str, split: str, part: int) -> dict:
    """On a worker: the white box's sums of one part, written into the store (a unit of :func:`_run_on_cluster`)."""
    from . import cluster

    ctx = cluster.worker_context(fingerprint)
    with cluster.part_task(PASS_WHITE_BOX, split, part) as outcome:
        if ctx.store.is_complete(split, part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT):
            return outcome  # done before, or by a worker that died after writing it
        model = cluster.worker_model(ctx.white_box, device=ctx.device, dtype=ctx.dtype)
        arrays, tokens = white_box_part(ctx, split, part, model)
        written = ctx.store.write_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_STUDENT_INIT, arrays,
                                          {keys.ATTR: white_box_key(ctx, split, part)})
        outcome.update(computed=True, written=written is not None, tokens=tokens)
    return outcome


def judge_part_on_worker(fingerprint: str, split: str, part: int, rows: list, *_after) -> dict:
    """On a worker: the judge's rankings of one part and their agreement, written into the store (a unit of
    :func:`_run_on_cluster`); the outcome carries the part's totals for the summary."""
    from . import cluster

    ctx = cluster.worker_context(fingerprint)
    with cluster.part_task(PASS_JUDGE, split, part) as outcome:
        if ctx.store.is_complete(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE):
            return outcome
        transport = TransportTally()  # this part's requests: a dead judge costs each part a few requests only
        arrays, attrs = judge_part(ctx, split, part, worker_judge(ctx), rows, None, transport)
        finished = ATTR_UNFINISHED not in attrs
        written = ctx.store.write_section(split, part, fmt.SET_SAMPLES, fmt.SECTION_JUDGE, arrays, attrs,
                                          complete=finished) is not None
        cost = attrs["judge_cost"]
        totals = {k: attrs[k] for k in ("groups", "outcomes", "judge_cost", "agreement_lengths")}
        if not finished:
            totals[ATTR_UNFINISHED] = attrs[ATTR_UNFINISHED]
        # "written": written complete; a part written unfinished is counted apart (the coordinator's JudgeReport)
        outcome.update(computed=True, written=written and finished, unfinished=written and not finished,
                       tokens=cost["prompt_tokens"] + cost["completion_tokens"], groups=attrs["groups"],
                       totals=totals, transport=transport_counts(transport))
    return outcome


def _add_totals(totals: dict, attrs: dict) -> None:
    totals["groups"] += attrs["groups"]
    for key in ("outcomes", "judge_cost"):
        for name, n in attrs[key].items():
            totals[key][name] = totals[key].get(name, 0) + n
    totals["agreement_lengths"] += attrs["agreement_lengths"]


def describe_totals(totals: dict) -> list[str]:
    """Summary lines: what happened to the groups ranked in this run, and what the judge cost."""
    if not totals["groups"]:
        return ["  rank: no group ranked in this run"]
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(totals["outcomes"].items()))
    lengths = totals["agreement_lengths"]
    cost = totals["judge_cost"]
    per_group = {k: v / totals["groups"] for k, v in cost.items()}
    return [f"  rank: {totals['groups']} groups: {outcomes}; mean agreement length "
            f"{(sum(lengths) / len(lengths)) if lengths else 0:.2f}",
            f"  judge cost: {cost.get('requests', 0)} requests, {cost.get('prompt_tokens', 0)} prompt and "
            f"{cost.get('completion_tokens', 0)} reply tokens; per group {per_group.get('requests', 0):.2f} "
            f"requests, {per_group.get('prompt_tokens', 0):.0f} + {per_group.get('completion_tokens', 0):.0f} tokens"]
