"""Black-box judges for ``precompute rank`` (CycleAlign): something that answers chat messages with text.

A judge is only ever asked questions: no weights, no log-probs. Two kinds:

``local:MODEL``
    Any model :func:`lm.models.resolve_model` accepts (a model directory, a
    ``.gguf`` file, the embedded names), prompted through its own chat template
    and decoded greedily, ``max_new_tokens`` at most.
``http://HOST:PORT/v1`` (or ``https://``)
    Any OpenAI-compatible chat-completions endpoint (a vLLM or llama.cpp server,
    a hosted API), called through the maintained ``openai`` client library: its
    base URL, a model name (``--judge-model``), an API key read from the
    environment variable named by ``--judge-api-key-env`` (never written to the
    store or to logs), at most ``concurrency`` requests in flight, a timeout per
    request, and the client's retries with exponential backoff on 429, 5xx and
    timeouts (``retries``).

:meth:`Judge.ask_all` sends many conversations and returns one :class:`Reply`
each, in order: the text, or the reason there is none (``timeout``,
``http_500``, ``connection``, ``bad_response (...)``: a reply that is not a chat
completion, JSON or not). A failed request never raises. It is not the judge's
opinion: the caller asks it again later (``precompute rank`` leaves its part
unfinished). A :class:`TransportTally` passed to ``ask_all`` counts the requests
sent and those that failed; once most of the recent ones failed
(:attr:`TransportTally.failing`) the judge sends nothing more and answers
:data:`NOT_SENT` for the rest.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np

__all__ = ["Reply", "NOT_SENT", "TransportTally", "Judge", "HttpJudge", "LocalJudge", "make_judge", "judge_identity",
           "judge_address"]

Messages = list[dict]


@dataclass(frozen=True)
class Reply:
    text: str | None  # None when the request failed
    error: str | None = None  # why there is no text: "timeout", "http_500", "connection", ...
    prompt_tokens: int = 0  # what the request cost, as the judge counts it (0 when unknown)
    completion_tokens: int = 0


#: why a conversation has no reply when it was never sent (the judge had stopped: :class:`TransportTally`)
NOT_SENT = "not_sent"


@dataclass
class TransportTally:
    """The requests a judge sent and those that failed in transport (no reply text), shared by its threads.

    ``failing``: at least ``least`` of the last ``window`` requests are known and more than half of them
    failed; a judge sends nothing more once it is (the rest of a run would wait on a dead endpoint).
    """

    window: int = 16
    least: int = 4
    requests: int = 0
    failed: int = 0
    last_error: str | None = None
    _recent: deque = field(default_factory=deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, reply: "Reply") -> None:
        with self._lock:
            self.requests += 1
            failed = reply.text is None
            self.failed += failed
            if failed:
                self.last_error = reply.error
            self._recent.append(failed)
            while len(self._recent) > self.window:
                self._recent.popleft()

    @property
    def failing(self) -> bool:
        with self._lock:
            return len(self._recent) >= self.least and 2 * sum(self._recent) > len(self._recent)


class Judge:
    """Answers chat conversations; see the module docstring."""

    name: str = "judge"

    def ask_all(self, conversations: Sequence[Messages], on_reply: Callable[[int], None] | None = None,
                transport: TransportTally | None = None) -> list[Reply]:
        """One reply per conversation, in order; ``transport`` counts the requests (module docstring)."""
        raise NotImplementedError

    def close(self) -> None:
        """Free what the judge holds (a loaded model, open connections)."""


class HttpJudge(Judge):
    """An OpenAI-compatible chat-completions endpoint, through the ``openai`` client library."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
                 timeout: float = 60.0, retries: int = 3, max_tokens: int = 64):
        import openai

        self.name = f"{judge_address(base_url)} ({model})"  # printed: no credentials
        self.model, self.max_tokens, self.concurrency = model, max_tokens, max(1, concurrency)
        # a local server accepts any key; the real one never leaves the environment
        self._client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "not-set",
                                     timeout=timeout, max_retries=retries)

    def _ask(self, messages: Messages) -> Reply:
        import openai

        try:
            response = self._client.chat.completions.create(model=self.model, messages=messages, temperature=0,
                                                            max_tokens=self.max_tokens)
        except openai.APITimeoutError:
            return Reply(None, "timeout")
        except openai.APIStatusError as exc:
            return Reply(None, f"http_{exc.status_code}")
        except openai.APIConnectionError:
            return Reply(None, "connection")
        except openai.OpenAIError as exc:  # a reply the client cannot read as a completion
            return Reply(None, f"bad_response ({type(exc).__name__})")
        except ValueError:  # a 200 whose body claims JSON and is not (the client's JSON decoding raised)
            return Reply(None, "bad_response (not JSON)")
        choices = getattr(response, "choices", None) or []
        text = choices[0].message.content if choices and choices[0].message else None
        usage = getattr(response, "usage", None)
        cost = dict(prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                    completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0))
        if not isinstance(text, str):
            return Reply(None, "bad_response (no message content)", **cost)
        return Reply(text, None, **cost)

    def _ask_counted(self, messages: Messages, transport: TransportTally | None) -> Reply:
        if transport is None:
            return self._ask(messages)
        if transport.failing:
            return Reply(None, NOT_SENT)
        reply = self._ask(messages)
        transport.record(reply)
        return reply

    def ask_all(self, conversations, on_reply=None, transport=None):
        replies: list[Reply | None] = [None] * len(conversations)
        with ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="judge") as pool:
            futures = {pool.submit(self._ask_counted, messages, transport): i
                       for i, messages in enumerate(conversations)}
            for future, i in futures.items():
                replies[i] = future.result()
                if on_reply:
                    on_reply(1)
        return replies  # type: ignore[return-value]

    def close(self) -> None:
        self._client.close()


class LocalJudge(Judge):
    """A local model through its chat template, greedy decoding (loaded on first use)."""

    def __init__(self, spec: str, *, device: str = "auto", dtype: str = "auto", max_new_tokens: int = 64,
                 batch_size: int = 8):
        self.spec, self.device, self.dtype = spec, device, dtype
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.name = f"local:{spec}"
        self._model = self._tokenizer = None

    def _load(self):
        if self._model is None:
            from lm import models

            self._model, self._tokenizer, info = models.load_model(self.spec, device=self.device, dtype=self.dtype)
            self._path = models.model_dir(info)
        return self._model, self._tokenizer

    def ask_all(self, conversations, on_reply=None, transport=None):  # a local model has no transport to fail
        from lm import chat, models

        from lm.generate import generate_greedy

        model, tokenizer = self._load()
        prompts = [chat.encode_prompt(tokenizer, messages) for messages in conversations]
        answers = generate_greedy(model, prompts, max_new_tokens=self.max_new_tokens,
                                  eos_ids=chat.end_of_turn_ids(tokenizer, models.generation_eos_ids(self._path)),
                                  pad_id=chat.pad_id(tokenizer),
                                  batch_size=self.batch_size, on_batch=None)
        if on_reply:
            on_reply(len(conversations))
        return [Reply(tokenizer.decode(np.asarray(a).tolist(), skip_special_tokens=True), None,
                      prompt_tokens=len(p), completion_tokens=len(a)) for p, a in zip(prompts, answers)]

    def close(self) -> None:
        self._model = self._tokenizer = None


def make_judge(spec: str, *, model: str | None = None, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4,
               timeout: float = 60.0, retries: int = 3, max_new_tokens: int = 64, device: str = "auto",
               dtype: str = "auto") -> Judge:
    """A judge from ``--judge`` (module docstring); ValueError for a spec that is neither kind."""
    if spec.startswith(("http://", "https://")):
        if not model:
            raise ValueError(f"--judge {spec}: an HTTP judge needs --judge-model (the model name the server serves)")
        return HttpJudge(spec, model, api_key_env=api_key_env, concurrency=concurrency, timeout=timeout,
                         retries=retries, max_tokens=max_new_tokens)
    if spec.startswith("local:"):
        return LocalJudge(spec[len("local:"):], device=device, dtype=dtype, max_new_tokens=max_new_tokens)
    raise ValueError(f"--judge {spec!r}: use local:MODEL (a model directory, .gguf file or embedded name) or "
                     f"an OpenAI-compatible base URL such as http://127.0.0.1:8000/v1")


def judge_identity(spec: str, model: str | None) -> dict:
    """What the store records of a judge: where it is and which model, never a key."""
    if spec.startswith("local:"):
        from lm import models

        info = models.resolve_model(spec[len("local:"):])
        return {"kind": "local", "model": {"name": info.name, "sha256": info.weights_hash}}
    return {"kind": "http", "base_url": judge_address(spec), "model_name": model}


def judge_address(spec: str) -> str:
    """Where a judge is reached, fit to print and record: an HTTP judge's base URL without ``user:password@`` and
    without its query; a ``local:`` spec as given."""
    if not spec.startswith(("http://", "https://")):
        return spec
    parts = urlsplit(spec)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")  # user:password@ and the query are left out
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
