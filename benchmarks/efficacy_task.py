"""The verifiable-preference task of ``benchmarks/efficacy.py``: data, tokenizer, models, rule, black box.

The task
    A prompt lists 3 to 5 distinct digits in random order: ``Pick from: 3 7 2 9``.
    A **valid** answer is one to three digits of the list, separated by single
    spaces (repeats allowed): ``7``, ``2 9``, ``9 3 3``. Anything else is invalid
    (a digit not listed, four digits, other text, no end of turn within the
    length limit). The **preferred** answers are the valid answers whose first
    digit is the largest listed one (``9``, ``9 2``, ``9 7 3``). A prompt of k
    digits has k + k^2 + k^3 valid answers, 1 + k + k^2 of them preferred, so an
    answer drawn uniformly among the valid ones is preferred with probability
    1/k (0.27 over the mix of k). Both properties are checked by
    :func:`judge_answer`, a rule, never by a model.

Why this task
    Several valid answers per prompt, of which one kind is preferred; the
    preference hinges on one token (the first digit) inside answers whose other
    tokens are free, as real preferences hinge on a few tokens of a long reply;
    the answer space is large enough (39 to 155 valid answers) that a few sampled
    answers are rarely identical (``precompute sample`` drops groups with
    duplicates); tiny models learn it in seconds to minutes on a CPU.

The data (:func:`write_task`)
    ``sft``: rows whose chosen answers are uniform over the valid answers (length
    uniform in 1..3, digits uniform over the list): what the reference and the
    student learn validity from. ``prefs``: preference pairs. In ``train``, a
    fraction ``informative`` (0.6) of the pairs has a preferred chosen and a
    valid, non-preferred rejected answer; the rest has two valid non-preferred
    answers in random order (pairs that carry no information about the rule, as
    real labels are partly noise). ``dev`` (the learning-rate sweep) and ``test``
    (the table) have informative pairs only, so label accuracy there measures the
    rule. No prompt (set of listed digits in its order) appears in two of
    ``sft``, ``train``, ``dev``, ``test``.

Tokenizer and models (:func:`build_tokenizer`, :func:`build_model`)
    A character-level tokenizer built with ``tokenizers``: one token per
    printable ASCII character and newline, ChatML specials ``<|endoftext|>``,
    ``<|im_start|>``, ``<|im_end|>`` and the role names ``user``/``assistant``/
    ``system`` as added tokens; a ChatML chat template. Models are
    ``LlamaForCausalLM`` saved with that tokenizer and a generation config that
    stops at ``<|im_end|>``: real Hugging Face model directories.

The other family (:func:`build_cross_tokenizer`: the cross-tokenizer column)
    The same characters, plus one token for a space followed by a digit (`` 7``),
    Llama-3's header template and its specials (``<|begin_of_text|>``,
    ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>``,
    ``<|end_of_text|>``): the teacher's ``9 2 7`` is 5 tokens, this student's 3
    (``9``, `` 2``, `` 7``). The first digit of an answer, the one the preference
    is about, matches a teacher token exactly; every later digit starts together
    with the teacher's space and ends elsewhere.

The black box (:class:`RuleJudge`)
    An OpenAI-compatible chat-completions server on loopback for ``precompute
    rank`` / ``train cyclealign``: it reads the question and the labelled answers
    of the last user message and replies ``[a] > [b] > ...``, preferred answers
    first, then valid ones, then invalid ones (ties: the lower label first).
"""

from __future__ import annotations

import json
import random
import re
import string
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Sequence

PROMPT_PREFIX = "Pick from: "
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ROLE_TOKENS = ("system", "user", "assistant")
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
ALPHABET = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # printable ASCII, space and newline
_ANSWER_RE = re.compile(r"^[0-9]( [0-9]){0,2}$")
_DIGITS_RE = re.compile(r"(?:^|\s)([0-9](?: [0-9])+)\s*$")


# --------------------------------------------------------------------------- the rule

def listed_digits(prompt_text: str) -> list[int]:
    """The digits a prompt lists: those after the last ``Pick from:`` (or, failing that, a trailing list)."""
    at = prompt_text.rfind(PROMPT_PREFIX.strip())
    if at >= 0:
        tail = prompt_text[at + len(PROMPT_PREFIX.strip()):]
        return [int(c) for c in tail.split("\n")[0] if c.isdigit()]
    found = _DIGITS_RE.search(prompt_text)
    return [int(c) for c in found.group(1).split()] if found else []


def judge_answer(digits: Sequence[int], answer: str) -> tuple[bool, bool]:
    """(valid, preferred) of ``answer`` to the prompt listing ``digits`` (module docstring)."""
    text = answer.strip()
    if not _ANSWER_RE.match(text):
        return False, False
    picked = [int(c) for c in text.split()]
    valid = all(d in digits for d in picked)
    return valid, valid and picked[0] == max(digits)


def answer_score(digits: Sequence[int], answer: str) -> int:
    """2 for a preferred answer, 1 for another valid one, 0 for an invalid one (the black box's order)."""
    valid, preferred = judge_answer(digits, answer)
    return 2 if preferred else 1 if valid else 0


# --------------------------------------------------------------------------- data

def prompt_text(digits: Sequence[int]) -> str:
    return PROMPT_PREFIX + " ".join(map(str, digits))


def _answer(rng: random.Random, digits: Sequence[int], *, first_max: bool | None) -> str:
    """A valid answer, its length uniform in 1..3; ``first_max`` True: preferred, False: not, None: any."""
    top = max(digits)
    length = rng.randint(1, 3)
    if first_max is None:
        first = rng.choice(list(digits))
    elif first_max:
        first = top
    else:
        first = rng.choice([d for d in digits if d != top])
    rest = [rng.choice(list(digits)) for _ in range(length - 1)]
    return " ".join(map(str, [first] + rest))


def _message(role: str, text: str) -> list[dict]:
    return [{"role": role, "content": text}]


def _row(digits: Sequence[int], chosen: str, rejected: str) -> dict:
    return {"prompt": _message("user", prompt_text(digits)), "chosen": _message("assistant", chosen),
            "rejected": _message("assistant", rejected), "digits": list(digits)}


def _prompts(rng: random.Random, count: int, taken: set) -> list[tuple[int, ...]]:
    out = []
    while len(out) < count:
        k = rng.randint(3, 5)
        digits = tuple(rng.sample(range(10), k))
        if digits not in taken:
            taken.add(digits)
            out.append(digits)
    return out


@dataclass(frozen=True)
class TaskSizes:
    sft_prompts: int = 600  # each with 4 uniformly valid answers
    sft_answers: int = 4
    train: int = 600
    dev: int = 100
    test: int = 200
    informative: float = 0.6


def make_task(seed: int, sizes: TaskSizes = TaskSizes()) -> tuple[dict, dict]:
    """(sft rows by split, preference rows by split), deterministic in ``seed``."""
    rng = random.Random(seed)
    taken: set = set()
    sft = []
    for digits in _prompts(rng, sizes.sft_prompts, taken):
        answers: list[str] = []
        while len(answers) < sizes.sft_answers:  # distinct answers: a repeated row would be dropped as a duplicate
            a = _answer(rng, digits, first_max=None)
            if a not in answers:
                answers.append(a)
        for a in answers:
            wrong = rng.choice([d for d in range(10) if d not in digits])  # unused by SFT; a pair needs one
            sft.append(_row(digits, a, str(wrong)))
    prefs: dict[str, list[dict]] = {}
    for split in ("train", "dev", "test"):
        rows = []
        for digits in _prompts(rng, getattr(sizes, split), taken):
            if split != "train" or rng.random() < sizes.informative:
                rows.append(_row(digits, _answer(rng, digits, first_max=True), _answer(rng, digits, first_max=False)))
            else:
                a = _answer(rng, digits, first_max=False)
                b = _answer(rng, digits, first_max=False)
                while b == a:
                    b = _answer(rng, digits, first_max=False)
                rows.append(_row(digits, a, b))
        prefs[split] = rows
    return {"train": sft}, prefs


def write_task(folder: Path, seed: int, sizes: TaskSizes = TaskSizes()) -> tuple[Path, Path]:
    """Write ``sft.json`` and ``prefs.json`` (each a dict of split -> TRL rows) under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    sft, prefs = make_task(seed, sizes)
    paths = []
    for name, splits in (("sft.json", sft), ("prefs.json", prefs)):
        path = folder / name
        path.write_text(json.dumps(splits, indent=0) + "\n")
        paths.append(path)
    return paths[0], paths[1]


def digits_by_index(prefs_path: Path, split: str) -> list[list[int]]:
    """The listed digits of each row of ``split`` (a store's example index is the row's position)."""
    return [row["digits"] for row in json.loads(Path(prefs_path).read_text())[split]]


def informative_share(prefs_path: Path, split: str = "train") -> float:
    rows = json.loads(Path(prefs_path).read_text())[split]
    hits = sum(judge_answer(r["digits"], r["chosen"][0]["content"])[1] for r in rows)
    return hits / len(rows)


# --------------------------------------------------------------------------- scoring answers

@dataclass
class Rates:
    valid_greedy: float
    preferred_greedy: float
    valid_sampled: float
    preferred_sampled: float
    prompts: int
    samples: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def score_generations(path: Path, digits: Sequence[Sequence[int]]) -> Rates:
    """The rule's rates over a ``train evaluate --generations`` file (greedy and sampled answers)."""
    greedy = [0, 0]
    sampled = [0, 0]
    prompts = samples = 0
    for line in Path(path).read_text().splitlines():
        item = json.loads(line)
        listed = digits[item["example_index"]]
        if listed_digits(item["prompt"]) != list(listed):  # the store's prompt is the row's
            raise ValueError(f"{path}: example {item['example_index']} prompt {item['prompt']!r} does not list "
                             f"{listed}")
        valid, preferred = judge_answer(listed, item["greedy"])
        greedy[0] += valid
        greedy[1] += preferred
        prompts += 1
        for answer in item["samples"]:
            valid, preferred = judge_answer(listed, answer)
            sampled[0] += valid
            sampled[1] += preferred
            samples += 1
    n = max(samples, 1)
    return Rates(greedy[0] / prompts, greedy[1] / prompts, sampled[0] / n, sampled[1] / n, prompts, samples)


# --------------------------------------------------------------------------- tokenizer and models

def build_tokenizer():
    """The task's character-level ChatML tokenizer (a ``PreTrainedTokenizerFast``)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(list(SPECIALS) + ALPHABET)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIALS))
    backend.add_tokens(list(ROLE_TOKENS))  # the template's role names as one token each
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path="efficacy-char-chatml",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


CROSS_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
          " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def build_cross_tokenizer():
    """The other family's tokenizer (module docstring): characters, a token per space-and-digit, Llama-3 headers."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    spaced = [f" {d}" for d in "0123456789"]
    vocab = {token: i for i, token in enumerate(list(CROSS_SPECIALS) + ALPHABET + spaced)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[(" ", d) for d in "0123456789"]))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(CROSS_SPECIALS))
    backend.add_tokens(list(ROLE_TOKENS))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, name_or_path="efficacy-llama3-spaced-digits",
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|end_of_text|>")
    tokenizer.chat_template = LLAMA3
    return tokenizer


def build_model(directory: Path, tokenizer, *, seed: int, layers: int, hidden: int, heads: int = 4) -> Path:
    """A randomly initialised ``LlamaForCausalLM`` saved with ``tokenizer`` and a generation config."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(seed)
    end, pad = tokenizer.eos_token_id, tokenizer.pad_token_id  # <|im_end|> and <|endoftext|> for the task's own
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=end, pad_token_id=pad)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    GenerationConfig(eos_token_id=[end], pad_token_id=pad).save_pretrained(directory)
    return directory


# --------------------------------------------------------------------------- the black box

_LABELLED = re.compile(r"^\[(\d+)\] ?(.*)$")


def rank_reply(messages: Sequence[dict]) -> str:
    """The ranking line the rule gives for the last user message (module docstring)."""
    lines = messages[-1]["content"].splitlines()
    question = next((line[len("Question: "):] for line in lines if line.startswith("Question: ")), "")
    digits = listed_digits(question)
    answers = {}
    for line in lines:
        found = _LABELLED.match(line)
        if found:
            answers[int(found.group(1))] = found.group(2)
    order = sorted(answers, key=lambda label: (-answer_score(digits, answers[label]), label))
    return " > ".join(f"[{label}]" for label in order)


class RuleJudge:
    """``POST /v1/chat/completions`` on 127.0.0.1 answered by :func:`rank_reply`; a context manager."""

    def __init__(self):
        self.requests = 0
        lock = threading.Lock()
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    judge.requests += 1
                payload = {"id": "rule", "object": "chat.completion", "created": 0, "model": body.get("model", "rule"),
                           "choices": [{"index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": rank_reply(body["messages"])}}],
                           "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}
                data = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "RuleJudge":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def summarise(values: Iterable[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    values = list(values)
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
