"""PAD's calibration score: the teacher judges pairs of sampled responses as a multiple-choice question.

Source: PAD (Gu et al., "Preference-Aligned Distillation"; code EganGu/PAD), as written in docs/methods.md::

    s_mcq(i) = log( (eps + sum_{j != i} P(i chosen | {i, j})) / (n - 1) )

What this module fixes, where the paper and the released code leave it open:

Question
    The text of the prompt's *last user message*, taken from the dataset row
    (the exact text, not decoded from the stored, possibly left-truncated prompt
    tokens). Earlier turns of a multi-turn prompt are not shown. A question
    longer than the sampling prompt budget is cut from the left to that many
    tokens (the teacher then sees what the student saw).
Options
    The sampled responses' token ids decoded with ``skip_special_tokens=True``
    and stripped of surrounding whitespace (the end-of-turn token is not shown).
Prompt
    The template file (default ``precompute/templates/mcq.txt``, overridable
    with ``precompute teacher --mcq-template FILE``) with its three
    placeholders ``{question}``, ``{option_a}`` and ``{option_b}`` replaced in
    one pass (so option text that happens to contain ``{option_b}`` is not
    substituted again; other braces are left alone). Trailing newlines of the
    file are dropped. The result is the content of one user message, rendered
    through the teacher's chat template with the generation prompt
    (:func:`lm.chat.encode_prompt`). The template must ask for the
    letters ``A`` and ``B``.
Reading the answer
    The teacher's next-token distribution at the last prompt position, over
    the whole vocabulary. ``p_A`` is the sum of the probabilities of every
    vocabulary token that decodes, alone and stripped of whitespace, to exactly
    ``"A"`` (case-sensitive; e.g. ``"A"`` and ``" A"``), ``p_B`` likewise.
Normalisation
    Within one ask, ``P(A chosen) = p_A / (p_A + p_B)`` (computed as
    ``sigmoid(log p_A - log p_B)``): the judgement between the two options only,
    whatever mass the teacher puts on other tokens. The raw masses are kept as
    statistics (how well the teacher follows the format), not used in the score.
Orders
    Each unordered pair {i, j} is asked twice, i as option A and i as option B.
    Both ordered rows (i, j) and (j, i) are stored, so that a reader can fill a
    [n, n] matrix without knowing the normalisation:
    ``pair_prob[(i, j)] = [P(i chosen | i is A), P(i chosen | i is B)]``, and with
    the normalisation above row (j, i) is the complement of row (i, j) with the
    orders swapped. ``P(i over j)`` is the mean of the two orders; the released
    code asks one order only, which keeps the teacher's position bias.
eps
    :data:`MCQ_EPS`, the same value as ``train.losses.mcq_score``'s default
    (a test checks both give the same scores).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from lm import chat
from lm.head import split_model
from lm.options import BATCH_TOKENS
from store import format as fmt
from store.sequences import split_sequences

from .scoring import right_padded, token_budget_order
from .summary import StepResult

MCQ_EPS = 1e-8
LETTERS = ("A", "B")
PLACEHOLDERS = ("question", "option_a", "option_b")
DEFAULT_TEMPLATE = "templates/mcq.txt"  # inside the precompute package

_PLACEHOLDER_RE = re.compile(r"\{(question|option_a|option_b)\}")


# --------------------------------------------------------------------------- the prompt

@dataclass(frozen=True)
class McqTemplate:
    text: str
    source: str  # "default" or the file given
    sha256: str

    def render(self, question: str, option_a: str, option_b: str) -> str:
        values = {"question": question, "option_a": option_a, "option_b": option_b}
        return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], self.text)


def load_template(path: str | None = None) -> McqTemplate:
    """The MCQ template at ``path`` (None: the bundled default), checked for its placeholders."""
    if path is None:
        text = resources.files("precompute").joinpath(DEFAULT_TEMPLATE).read_text(encoding="utf-8")
        source = "default"
    else:
        try:
            text = Path(path).expanduser().read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"--mcq-template {path}: cannot read it ({exc})") from exc
        source = str(path)
    text = text.rstrip("\n")
    found = _PLACEHOLDER_RE.findall(text)
    missing = [p for p in PLACEHOLDERS if p not in found]
    repeated = sorted({p for p in found if found.count(p) > 1})
    if missing or repeated:
        what = []
        if missing:
            what.append("missing " + ", ".join("{" + p + "}" for p in missing))
        if repeated:
            what.append("repeated " + ", ".join("{" + p + "}" for p in repeated))
        raise ValueError(f"MCQ template {source}: {'; '.join(what)} (it needs each of "
                         f"{{question}}, {{option_a}}, {{option_b}} exactly once)")
    return McqTemplate(text=text, source=source, sha256=hashlib.sha256(text.encode("utf-8")).hexdigest())


def last_user_message(prompt: Sequence[dict]) -> str:
    for message in reversed(prompt):
        if message.get("role") == "user":
            return message["content"]
    raise ValueError("the prompt has no user message")


def cut_question(tokenizer, question: str, max_tokens: int) -> tuple[str, bool]:
    """``question`` cut from the left to its last ``max_tokens`` tokens; (text, was cut)."""
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return question, False
    return tokenizer.decode(ids[-max_tokens:]), True


def option_text(tokenizer, response_ids: np.ndarray) -> str:
    return tokenizer.decode([int(t) for t in response_ids], skip_special_tokens=True).strip()


def letter_token_ids(tokenizer, letters: Sequence[str] = LETTERS) -> list[np.ndarray]:
    """Per letter, every token id that decodes alone (stripped, case-sensitive) to exactly that letter."""
    ids = list(range(len(tokenizer)))
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    out = []
    for letter in letters:
        found = np.array([i for i, text in zip(ids, texts) if text.strip() == letter], dtype=np.int64)
        if found.size == 0:
            raise ValueError(f"no token of the teacher's vocabulary decodes to {letter!r}: "
                             f"the multiple-choice answer cannot be read")
        out.append(found)
    return out


# --------------------------------------------------------------------------- the teacher

@torch.inference_mode()
def option_logprobs(model, prompts: Sequence[np.ndarray], letter_ids: Sequence[np.ndarray], *,
                    batch_tokens: int = BATCH_TOKENS, pad_id: int = 0,
                    on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """``[N, len(letter_ids)]`` float64: log of the next-token probability mass on each letter's tokens.

    Only the last position of each prompt goes through the output layer
    (right-padded batches of length-sorted prompts, ``batch_tokens`` padded
    tokens each). ``on_batch(prompts_done)`` reports progress.
    """
    device = next(model.parameters()).device
    base, head = split_model(model)
    index = [torch.as_tensor(np.asarray(ids, dtype=np.int64), device=device) for ids in letter_ids]
    lengths = [len(p) for p in prompts]
    if any(n < 1 for n in lengths):
        raise ValueError("empty multiple-choice prompt")
    out = np.zeros((len(prompts), len(letter_ids)), dtype=np.float64)
    for batch in token_budget_order(lengths, batch_tokens):
        ids, mask = right_padded([prompts[i] for i in batch], pad_id, device)
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
        last = torch.as_tensor([lengths[i] - 1 for i in batch], device=device)
        rows = torch.arange(len(batch), device=device)
        logp = torch.log_softmax(head.logits(hidden[rows, last]), dim=-1)
        letters = torch.stack([torch.logsumexp(logp[:, ix], dim=-1) for ix in index], dim=-1)
        out[batch] = letters.double().cpu().numpy()
        if on_batch:
            on_batch(len(batch))
    return out


def prob_first_option(letter_logp: np.ndarray) -> np.ndarray:
    """``P(A chosen) = p_A / (p_A + p_B)`` per ask, from ``[N, 2]`` log masses (stable in log space)."""
    diff = np.asarray(letter_logp[:, 0] - letter_logp[:, 1], dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-diff))


# --------------------------------------------------------------------------- pairs and scores

def unordered_pairs(n: int) -> list[tuple[int, int]]:
    """The (i, j), i < j, of a group of ``n``; each is asked as (A=i, B=j) and then (A=j, B=i)."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


def ordered_pairs(n: int) -> list[tuple[int, int]]:
    """Every (i, j), i != j, in lexicographic order: the rows of ``pair_index`` for one group."""
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def pair_rows(n: int, a_first: np.ndarray, a_second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pair_index`` [n(n-1), 2] and ``pair_prob`` [n(n-1), 2] of one group.

    ``a_first[u]`` is ``P(A chosen)`` when unordered pair ``u = (i, j)`` of
    :func:`unordered_pairs` is asked with i as A, ``a_second[u]`` with j as A.
    """
    row = {}
    for u, (i, j) in enumerate(unordered_pairs(n)):
        row[(i, j)] = (a_first[u], 1.0 - a_second[u])  # i as A, i as B
        row[(j, i)] = (a_second[u], 1.0 - a_first[u])  # j as A, j as B
    index = ordered_pairs(n)
    return (np.array(index, dtype=np.int32).reshape(-1, 2),
            np.array([row[p] for p in index], dtype=np.float64).reshape(-1, 2))


def pair_matrix(pair_index: np.ndarray, pair_prob: np.ndarray, n: int) -> np.ndarray:
    """``[n, n]``: ``P(i over j)``, the mean of the two orders; zero on the diagonal."""
    matrix = np.zeros((n, n), dtype=np.float64)
    matrix[pair_index[:, 0], pair_index[:, 1]] = np.asarray(pair_prob, dtype=np.float64).mean(axis=1)
    return matrix


def mcq_score(pair_probs: np.ndarray, eps: float = MCQ_EPS) -> np.ndarray:
    """``s_mcq(i) = log((eps + sum_{j != i} P(i over j)) / (n - 1))`` over the last axis of ``[..., n, n]``."""
    p = np.asarray(pair_probs, dtype=np.float64)
    n = p.shape[-1]
    if n < 2:
        raise ValueError(f"mcq_score needs n >= 2 responses, got {n}")
    wins = np.where(np.eye(n, dtype=bool), 0.0, p).sum(axis=-1)
    return np.log((eps + wins) / (n - 1))


# --------------------------------------------------------------------------- statistics

STAT_KEYS = ("asks", "sum_prob_a", "sum_mass_a", "sum_mass_b", "pairs", "sum_abs_judgement", "orders_agree")


def ask_stats(letter_logp: np.ndarray, a_first: np.ndarray, a_second: np.ndarray) -> dict:
    """Sums over asks and unordered pairs, so that parts add up (see :func:`describe_stats`)."""
    p_a = prob_first_option(letter_logp) if len(letter_logp) else np.zeros(0)
    judgement = (a_first + 1.0 - a_second) / 2.0  # P(i over j), orders averaged
    agree = (a_first > 0.5) == (a_second < 0.5)  # both orders pick the same response
    return {
        "asks": int(len(letter_logp)),
        "sum_prob_a": float(p_a.sum()),
        "sum_mass_a": float(np.exp(letter_logp[:, 0]).sum()) if len(letter_logp) else 0.0,
        "sum_mass_b": float(np.exp(letter_logp[:, 1]).sum()) if len(letter_logp) else 0.0,
        "pairs": int(len(a_first)),
        "sum_abs_judgement": float(np.abs(judgement - 0.5).sum()),
        "orders_agree": int(agree.sum()),
    }


def add_stats(total: dict, more: dict) -> dict:
    return {k: total.get(k, 0) + more.get(k, 0) for k in STAT_KEYS}


def describe_stats(stats: dict) -> list[str]:
    """Summary lines: position bias, format compliance, and whether any preference is left."""
    asks, pairs = stats.get("asks", 0), stats.get("pairs", 0)
    if not asks or not pairs:
        return ["  pad calibration: no multiple-choice asks in this store"]
    return [
        f"  pad calibration: {asks} asks; P(option A chosen) = {stats['sum_prob_a'] / asks:.3f} on average "
        f"(0.5 = no position bias); raw next-token mass on A {stats['sum_mass_a'] / asks:.3g}, "
        f"on B {stats['sum_mass_b'] / asks:.3g}",
        f"  pad judgement: mean |P(i over j) - 0.5| = {stats['sum_abs_judgement'] / pairs:.3f} over {pairs} "
        f"pairs, orders averaged (0 = no preference); both orders pick the same response in "
        f"{100.0 * stats['orders_agree'] / pairs:.0f}% of pairs",
    ]


# --------------------------------------------------------------------------- the step of `precompute teacher`

@dataclass
class McqSetup:
    """What the calibration step needs besides the store: the template and how long a question may be."""

    template: McqTemplate
    tokenizer: object
    question_budget: int  # longest question in tokens: the prompt budget the samples were drawn with
    _letter_ids: list[np.ndarray] | None = None

    @classmethod
    def build(cls, tokenizer, template: McqTemplate, samples_record, config) -> "McqSetup":
        """``samples_record``: the ``samples/base`` pass record (its max_length and max_new_tokens)."""
        drawn = samples_record.settings
        max_length = drawn.get("max_length", config.max_length)
        budget = max(chat.MIN_PROMPT_TOKENS, max_length - drawn.get("max_new_tokens", config.max_new_tokens))
        return cls(template=template, tokenizer=tokenizer, question_budget=budget)

    @property
    def letter_ids(self) -> list[np.ndarray]:
        if self._letter_ids is None:  # decodes the whole vocabulary once, when the step first runs
            self._letter_ids = letter_token_ids(self.tokenizer)
        return self._letter_ids

    def provenance(self) -> dict:
        return {
            "template": {"source": self.template.source, "sha256": self.template.sha256},
            "question": "last user message of the dataset row, cut from the left to "
                        f"{self.question_budget} tokens",
            "options": "response ids decoded without special tokens, stripped",
            "letters": list(LETTERS),
            "letter_tokens": "every token that decodes alone, stripped, to the letter (case-sensitive)",
            "normalisation": "P(A chosen) = p_A / (p_A + p_B) per ask",
            "orders": "each pair asked with either response as A; P(i over j) is their mean",
            "eps": MCQ_EPS,
        }


def mcq_step(ctx, step, split: str, part: int, model, progress):
    """PAD's calibration for one part: every pair of every group asked in both orders (module docstring).

    The options are decoded, and the question cut, by the store's tokenizer (the one that sampled them); the
    prompt is encoded by the teacher's (``setup.tokenizer``: the same one, unless the run is across tokenizers).
    """
    setup, tokenizer = ctx.mcq, ctx.tokenizer
    pad_id = ctx.xtok.teacher_pad_id if getattr(ctx, "xtok", None) is not None else ctx.pad_id
    base = ctx.store.read_section(split, part, fmt.SET_SAMPLES)
    seqs, prompt_lengths = split_sequences(base)
    group_offsets = base[fmt.ARRAY_GROUP_OFFSETS]
    rows = {r.index: r for r in ctx.rows_of_part(split, part, prompts=True)}
    asks, sizes, cut = [], [], 0
    for g, example in enumerate(base[fmt.ARRAY_GROUP_EXAMPLE_INDEX]):
        first, stop = int(group_offsets[g]), int(group_offsets[g + 1])
        question, was_cut = cut_question(tokenizer, last_user_message(rows[int(example)].prompt),
                                         setup.question_budget)
        cut += was_cut
        options = [option_text(tokenizer, seqs[s][prompt_lengths[s]:]) for s in range(first, stop)]
        for i, j in unordered_pairs(stop - first):
            for a, b in ((i, j), (j, i)):
                text = setup.template.render(question, options[a], options[b])
                asks.append(chat.encode_prompt(setup.tokenizer, [{"role": "user", "content": text}]))
        sizes.append(stop - first)
    part_tokens = int(base[fmt.ARRAY_TOKEN_OFFSETS][-1])
    done = [0, 0]  # asks done, progress reported (in the sample set's tokens, the bar's unit)

    def on_batch(n_asks):
        done[0] += n_asks
        now = part_tokens * done[0] // max(1, len(asks))
        progress(now - done[1])
        done[1] = now

    letter_logp = option_logprobs(model, asks, setup.letter_ids, batch_tokens=ctx.config.batch_tokens,
                                  pad_id=pad_id, on_batch=on_batch)
    p_first = prob_first_option(letter_logp)
    pair_index, pair_prob, pair_offsets, scores = [], [], [0], []
    stats, at = {}, 0
    for n in sizes:
        u = len(unordered_pairs(n))
        a_first, a_second = p_first[at:at + 2 * u:2], p_first[at + 1:at + 2 * u:2]
        index, prob = pair_rows(n, a_first, a_second)
        pair_index.append(index)
        pair_prob.append(prob)
        pair_offsets.append(pair_offsets[-1] + len(index))
        scores.append(mcq_score(pair_matrix(index, prob, n)))
        stats = add_stats(stats, ask_stats(letter_logp[at:at + 2 * u], a_first, a_second))
        at += 2 * u
    arrays = {
        fmt.ARRAY_PAIR_INDEX: np.concatenate(pair_index) if pair_index else np.zeros((0, 2), np.int32),
        fmt.ARRAY_PAIR_PROB: (np.concatenate(pair_prob) if pair_prob else np.zeros((0, 2))).astype(np.float32),
        fmt.ARRAY_GROUP_PAIR_OFFSETS: np.asarray(pair_offsets, dtype=np.int64),
        fmt.ARRAY_MCQ_SCORE: (np.concatenate(scores) if scores else np.zeros(0)).astype(np.float32),
    }
    return StepResult(arrays, int(sum(map(len, asks))), {"calibration": stats, "questions_cut": int(cut)},
                      groups=len(sizes))


def summary_lines(store, splits, summary, groups_done: dict[str, int]) -> list[str]:
    """Position bias and judgement over the store's complete MCQ parts; cost per group of this run."""
    stats = {}
    for split in splits:
        for part in store.complete_parts(split, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ):
            attrs = store.section_attrs(split, part, fmt.SET_SAMPLES, fmt.SECTION_TEACHER_MCQ)
            stats = add_stats(stats, attrs.get("calibration", {}))
    lines = describe_stats(stats)
    costs = []
    for record in summary.steps:
        if not record["step"].startswith(fmt.SET_SAMPLES + "/"):
            continue
        groups = groups_done.get(record["step"], 0)
        if groups:
            costs.append(f"{record['step']} {record['seconds'] / groups:.3f} s and "
                         f"{record['tokens'] / groups:.0f} tokens")
        else:
            costs.append(f"{record['step']} " + ("no groups" if record["parts_done"] else "already complete"))
    lines.append("  pad cost per group: " + "; ".join(costs))
    return lines
