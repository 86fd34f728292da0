"""An OpenAI-compatible HTTP server and a web chat page for organisms (`molecule-gpt serve`).

    pip install "molecule-gpt[serve]"
    molecule-gpt serve --home DIR            # then http://127.0.0.1:8000/ or base_url .../v1

    from molecule_gpt.server import create_app
    app = create_app(home="~/.local/share/molecule-gpt")      # an ASGI app (Starlette)
    app = create_app(organisms={"pet": org})                  # organisms you hold yourself

What it serves:

    GET  /                               the chat page (molecule_gpt/web: no external resources)
    GET  /v1/models, /v1/models/{id}     one model per organism; its id is the home folder's name
    POST /v1/chat/completions            messages -> a reply (plain or streamed as SSE)
    POST /v1/completions                 prompt -> a continuation (plain or streamed)
    GET  /v1/organisms/{name}/status     molecule_gpt.status.status_document (as /status)

Sampling: request fields override the organism's Config for that request only: temperature
(0 = greedy), top_p, max_tokens (or max_completion_tokens) -> max_gen_tokens, stop (plus "H:"
and "A:" in a chat, as the terminal chat stops), seed (choice i of n uses seed + i),
frequency_penalty. What the API has no field for (top_k, min_p, typical_p, the
entropy-adaptive temperature, min_gen_tokens, repetition_guard, the corpus-field blend) keeps
the organism's values. Fields whose meaning the organism cannot honour (tools, logprobs,
logit_bias, presence_penalty, a response_format other than text) are refused with a 400 that
names them when they ask for something; unknown fields are refused as OpenAI does.

Learning (unless learn=False / --no-learn): OpenAI clients resend the history (all of it, or
the newest part of it), so a message is known by the message before it: each message's key is
a hash of the previous message and itself (system messages are context and left out of the
keys), and the first message of a request is known by itself (the part before it may have
been cut). So a message is learned once per message it follows, and a conversation's first
message is not learned again when it was heard before anywhere. A chat message whose key was
not seen before is learned (Organism.observe with speaker "H" for user, "A" for assistant: the
corpus, the quantum buffer and the home's memory); a seen one is not, so a resent history is
learned once. The reply is learned when it is complete (not when the client went away
mid-stream, and not with n > 1: the client sends back the choice it kept). System messages are
context, never learned; completions (`/v1/completions`) are not learned. Learning runs in one
thread per organism after the response, so it never delays a reply; the background trainer
then runs checked bursts as in `molecule-gpt chat`, giving way while generations are in flight
(Config.train_share_while_generating). The keys live in memory (at most MAX_SEEN): after a
restart a resent history is observed again (the corpus deduplicates its lines; the memory
stores the messages again).

The prompt of a chat is built from that request's own messages only: the system messages,
the earlier messages most relevant to the last one (shared words; at most recall_relevant),
then the newest recall_recent messages, as plain text (the way `chat` builds its prompt from
the memory). The home's memory is written, never searched for a prompt, so one client's words
never appear in another client's prompt.

Safety: the server binds to loopback unless told otherwise, and the command line refuses a
non-loopback host without an API key; request bodies, prompt length, max_tokens, n, stop
strings and messages are bounded (Limits); every error is an OpenAI error object
({"error": {"message", "type", "param", "code"}}) with its status (400 malformed or out of
range, 401 bad key, 404 unknown model or route, 413 body too large, 503 while an organism
loads), never a traceback. One log line per request (logger "molecule_gpt.server").
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import pathlib
import queue
import re
import threading
import time
import traceback
import uuid
from typing import Any, Iterator, Mapping

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .errors import GenerationError, MemoryStoreError, MoleculeError, OrganismError
from .generation import SamplingParams, SubmittedGeneration
from .organism import Organism
from .status import history_records, status_document

__all__ = ["create_app", "Limits", "is_loopback", "MAX_SEEN"]

log = logging.getLogger("molecule_gpt.server")

WEB_DIR = pathlib.Path(__file__).resolve().parent / "web"
LEARN_GATHER_SECONDS = 0.05  # the learner waits this long for more turns before observing a batch
MAX_SEEN = 100_000  # conversation keys remembered per organism (the oldest are forgotten first)
CHAT_STOPS = ("H:", "A:")  # a chat reply ends where the corpus's speaker tags would start
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_WORD = re.compile(r"\w+")


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask."""
    max_body_bytes: int = 1 << 20  # a larger body is refused with 413
    max_prompt_chars: int = 32_000  # all message contents (or prompts) together
    max_messages: int = 512
    max_tokens: int = 1024  # max_tokens per choice
    max_n: int = 8  # choices per request (and prompts x choices for completions)
    max_stop: int = 4  # stop strings, as OpenAI
    max_stop_chars: int = 64


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# errors: OpenAI's error object


class ApiError(Exception):
    """An error the client caused (or a 503 while loading), answered as OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# request validation


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
        raise _bad(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}", name)
    return float(v)


def _integer(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise _bad(f"{name} must be an integer in [{lo}, {hi}], got {v!r}", name)
    return v


# fields of each endpoint: accepted and used, accepted and irrelevant here, or refused unless
# they ask for nothing (default-like values)
_COMMON = {"model", "temperature", "top_p", "max_tokens", "stop", "seed", "n", "frequency_penalty", "stream",
           "stream_options", "presence_penalty", "logit_bias", "logprobs", "user"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                          "tool_choice", "parallel_tool_calls", "functions", "function_call", "metadata", "store",
                          "service_tier"}
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}


def _refuse_unsupported(body: dict, allowed: set) -> None:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise _bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    asks = {
        "presence_penalty": lambda v: v not in (None, 0, 0.0),
        "logit_bias": lambda v: bool(v),
        "logprobs": lambda v: v not in (None, False, 0),
        "top_logprobs": lambda v: v not in (None, 0),
        "tools": lambda v: bool(v), "functions": lambda v: bool(v),
        "tool_choice": lambda v: v not in (None, "none"), "function_call": lambda v: v not in (None, "none"),
        "response_format": lambda v: not (v is None or (isinstance(v, dict) and v.get("type") == "text")),
        "suffix": lambda v: v not in (None, ""),
        "best_of": lambda v: v not in (None, 1),
    }
    for name, asked in asks.items():
        if name in body and asked(body[name]):
            raise _bad(f"{name} is not supported by molecule-gpt (the organism samples plain text; see the "
                       f"serve documentation for the fields it honours)", name, "unsupported_parameter")


@dataclasses.dataclass
class Sampling:
    """What one request asks of generation."""
    overrides: dict  # SamplingParams fields
    n: int
    stream: bool
    include_usage: bool


def _sampling(body: dict, limits: Limits, chat: bool) -> Sampling:
    """The request's sampling fields as Organism.run overrides (see the module docstring)."""
    o: dict[str, Any] = {}
    t = _number(body, "temperature", 0.0, 2.0)
    if t is not None:
        o["temperature"] = t
    p = _number(body, "top_p", 0.0, 1.0)
    if p is not None:
        if p == 0.0:
            raise _bad("top_p must be greater than 0 (use temperature 0 for greedy sampling)", "top_p")
        o["top_p"] = p
    f = _number(body, "frequency_penalty", -2.0, 2.0)
    if f is not None:
        o["frequency_penalty"] = f
    max_name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    m = _integer(body, max_name, 1, limits.max_tokens)
    if m is not None:
        o["max_gen_tokens"] = m
    seed = _integer(body, "seed", -(2 ** 63), 2 ** 63 - 1)
    if seed is not None:
        o["seed"] = seed % (2 ** 63)  # the decoder's seed is unsigned; negative seeds are OpenAI-legal
    n = _integer(body, "n", 1, limits.max_n)
    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = list(stop)
    else:
        raise _bad(f"stop must be a string or a list of strings, got {stop!r}", "stop")
    if len(stops) > limits.max_stop or any(len(s) > limits.max_stop_chars for s in stops):
        raise _bad(f"stop holds at most {limits.max_stop} strings of at most {limits.max_stop_chars} characters",
                   "stop")
    stops = [s for s in stops if s]
    if chat:
        stops += [s for s in CHAT_STOPS if s not in stops]
    if stops:
        o["stop"] = tuple(stops)
    stream = body.get("stream")
    if stream not in (None, True, False):
        raise _bad(f"stream must be a boolean, got {stream!r}", "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and set(options) <= {"include_usage"}
                                    and options.get("include_usage") in (None, True, False)):
        raise _bad("stream_options must be {\"include_usage\": true|false}", "stream_options")
    if options and not stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")
    return Sampling(o, n or 1, bool(stream), bool(options and options.get("include_usage")))


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content: only text parts are supported, got {str(part)[:80]}",
                           f"messages[{i}].content")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _messages(body: dict, limits: Limits) -> list[tuple[str, str]]:
    """[(role, text)] with role "system", "user" or "assistant" ("developer" counts as system)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise _bad(f"at most {limits.max_messages} messages per request, got {len(messages)}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        role = m.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise _bad(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}",
                       f"messages[{i}].role")
        out.append((role, _content(m, i)))
    if not any(role != "system" for role, _ in out):
        raise _bad("messages must hold at least one user or assistant message", "messages")
    total = sum(len(text) for _, text in out)
    if total > limits.max_prompt_chars:
        raise _bad(f"the messages hold {total:,} characters; this server takes at most {limits.max_prompt_chars:,}",
                   "messages", "context_length_exceeded")
    return out


def _prompts(body: dict, limits: Limits) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise _bad("prompt must be a string or a non-empty list of strings", "prompt")
    total = sum(map(len, prompts))
    if total > limits.max_prompt_chars:
        raise _bad(f"the prompt holds {total:,} characters; this server takes at most {limits.max_prompt_chars:,}",
                   "prompt", "context_length_exceeded")
    return prompts


# ---------------------------------------------------------------------------------------------
# conversations: the prompt, and which turns are new


def chat_prompt(messages: list[tuple[str, str]], recent: int = 6, relevant: int = 4) -> str:
    """The prompt of a chat request, from its own messages only: the system messages, up to
    `relevant` earlier messages that share the most words with the last one, the newest
    `recent` messages; plain text joined by spaces, as `molecule-gpt chat` joins its recall."""
    system = [t for r, t in messages if r == "system" and t.strip()]
    turns = [t for r, t in messages if r != "system" and t.strip()]
    last = turns[-1:] if turns else []
    newest = turns[max(0, len(turns) - max(recent, 1)):]
    earlier = turns[:len(turns) - len(newest)]
    picked: list[int] = []
    if relevant and earlier and last:
        words = set(_WORD.findall(last[0].casefold()))
        scored = [(len(words & set(_WORD.findall(t.casefold()))), i) for i, t in enumerate(earlier)]
        picked = sorted(i for score, i in sorted(scored, reverse=True)[:relevant] if score > 0)
    return " ".join(" ".join(t.split()) for t in system + [earlier[i] for i in picked] + newest)


def _norm(text: str) -> str:
    return " ".join(text.split())


def _message_key(role: str, text: str) -> bytes:
    """A message by itself: its role and its text (whitespace normalized)."""
    return hashlib.sha256(b"message\0" + role.encode() + b"\0" + _norm(text).encode("utf-8", "surrogatepass")).digest()


def _spoken(messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The messages that are learned and keyed: not system messages, not empty ones."""
    return [(role, text) for role, text in messages if role != "system" and text.strip()]


def _pair_key(previous: tuple[str, str], role: str, text: str) -> bytes:
    """A message after the one before it."""
    return hashlib.sha256(b"pair\0" + _message_key(*previous) + _message_key(role, text)).digest()


# ---------------------------------------------------------------------------------------------
# one served organism


def learn_turns(org: Organism, turns: list[tuple[str, str]], name: str) -> None:
    """Observe chat turns [(speaker, text), ...] in one go. The memory refuses a batch whole
    (nothing of it stored or learned): then each turn is tried on its own, so that one refused
    message does not cost the others. Errors are logged; learning goes on for everyone."""
    if not turns:
        return
    try:
        org.observe_turns(turns)
        return
    except MemoryStoreError as exc:
        if len(turns) == 1:
            log.error("%s: could not learn a message: %s", name, exc)
            return
    except Exception as exc:
        log.error("%s: could not learn %d message(s): %s", name, len(turns), exc)
        return
    for turn in turns:
        try:
            org.observe_turns([turn])
        except Exception as exc:
            log.error("%s: could not learn a message: %s", name, exc)


class Served:
    """An organism behind the API: its state while loading, what it learned of which conversation,
    and the thread that feeds it what it hears."""

    def __init__(self, name: str, *, home=None, organism: Organism | None = None, learn: bool = True,
                 settings: Mapping[str, Any] | None = None):
        self.name = name
        self.home = home  # a cli.Home (None for an organism the caller holds)
        self.org: Organism | None = organism
        self.learn = learn
        self.settings = dict(settings or {})
        self.state = "ready" if organism is not None else "loading"
        self.error: str | None = None
        self.created = int(time.time())
        self.earlier: list[dict] = []  # history records read back from the home's telemetry
        self._seen: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._seen_lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._learner: threading.Thread | None = None
        self._own_trainer = False  # whether start_learning started the background trainer

    # ---- learning

    def start_learning(self) -> None:
        if self.learn and self._learner is None:
            self._learner = threading.Thread(target=self._learn_loop, name=f"molecule-gpt-learn-{self.name}",
                                             daemon=True)
            self._learner.start()
            try:
                self.org.start_background()
                self._own_trainer = True
            except OrganismError:  # the caller runs its trainer already: theirs to stop
                self._own_trainer = False

    def stop_learning(self) -> None:
        """Learn what is queued, then stop the learner and the background trainer (if it started it)."""
        if self._learner is not None:
            self._queue.put(None)
            self._learner.join()
            self._learner = None
            if not self._own_trainer:
                return
            try:
                self.org.stop()
            except MoleculeError as exc:
                log.error("%s: the background trainer stopped with an error: %s", self.name, exc)

    def _learn_loop(self) -> None:
        while True:
            batch = [self._queue.get()]
            if batch[0] is not None:
                time.sleep(LEARN_GATHER_SECONDS)  # let the turns of concurrent requests gather
            while not self._queue.empty():  # what queued up meanwhile, in one go
                batch.append(self._queue.get_nowait())
            learn_turns(self.org, [turn for turns in batch if turns for turn in turns], self.name)
            # new text changes the corpus field, whose held-out loss sets the model's share of the
            # blend: measure it here, once, instead of in the next request's way
            self.org.model_alpha()
            if None in batch:
                return

    def new_turns(self, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """The chat messages of this conversation not learned before (marked as learned now).
        A message is known after the message before it (system messages aside); the first
        one a request sends is known by itself, so that a client that sends only the newest
        part of a conversation (a sliding window) is recognized as well as one that resends it
        all."""
        if not self.learn:
            return []
        out = []
        spoken = _spoken(messages)
        with self._seen_lock:
            for i, (role, text) in enumerate(spoken):
                key = _message_key(role, text) if i == 0 else _pair_key(spoken[i - 1], role, text)
                if key in self._seen:
                    self._seen.move_to_end(key)
                    continue
                self._remember(spoken[i - 1] if i else None, role, text)
                out.append(("H" if role == "user" else "A", text.strip()))
        return out

    def _remember(self, previous: tuple[str, str] | None, role: str, text: str) -> None:
        """Mark a message learned: by itself and after the one before it. Holds _seen_lock."""
        self._mark(_message_key(role, text))
        if previous is not None:
            self._mark(_pair_key(previous, role, text))

    def mark_reply(self, messages: list[tuple[str, str]], reply: str) -> None:
        """Mark the reply to `messages` learned (when the client sends it back it is known)."""
        spoken = _spoken(messages)
        with self._seen_lock:
            self._remember(spoken[-1] if spoken else None, "assistant", reply)

    def _mark(self, key: bytes) -> None:
        self._seen[key] = None
        if len(self._seen) > MAX_SEEN:
            self._seen.popitem(last=False)

    def learn_turns(self, turns: list[tuple[str, str]], messages: list[tuple[str, str]] | None = None,
                    reply: str | None = None) -> None:
        """Queue `turns`, and the finished `reply` to `messages` (its key marked: when the
        client sends it back it is not learned again)."""
        if not self.learn:
            return
        if reply is not None and reply.strip():
            self.mark_reply(messages, reply)
            turns = turns + [("A", reply.strip())]
        if turns:
            self._queue.put(turns)

    # ---- generation: hooks that molecule_gpt.colony's RemoteServed overrides to generate on the
    # Ray actor holding the organism (the routes call these, never the organism directly)

    async def check_sampling(self, sampling: "Sampling") -> None:
        """The organism's own check of the sampling settings (see _check_sampling)."""
        _check_sampling(self.org, sampling)

    async def run_all(self, prompts: list[str], sampling: "Sampling") -> tuple[list, int]:
        """Every choice of every prompt and the prompt tokens (see _App._run_all), in a thread."""
        return await anyio.to_thread.run_sync(_App._run_all, self.org, prompts, sampling)

    def generated(self, prompt: str, overrides: dict, box: dict):
        """One streamed generation's text pieces (see _generated)."""
        return _generated(self.org, prompt, overrides, box)

    def status(self) -> dict:
        doc = status_document(self.org, earlier=self.earlier)
        doc.update({"object": "organism.status", "name": self.name, "learning": self.learn})
        return doc


# ---------------------------------------------------------------------------------------------
# generation in worker threads


def _check_sampling(org: Organism, s: Sampling) -> None:
    """The organism's own check of the request's sampling settings (SamplingParams), before
    anything is sent: what it refuses is a 400."""
    try:
        SamplingParams.from_config(org.config, **s.overrides)
    except GenerationError as exc:
        raise _bad(str(exc)) from None


def _finish(reason: str | None) -> str:
    return "length" if reason == "max_tokens" else "stop"


def _prompt_tokens(org: Organism, prompt: str) -> int:
    ids = org.tokenizer.encode(prompt)
    return len(ids) - (1 if ids and ids[-1] == org.tokenizer.eos_id else 0)


def _choice_overrides(s: Sampling, i: int) -> dict:
    o = dict(s.overrides)
    if "seed" in o and i:
        o["seed"] = o["seed"] + i  # choice i of n: the next seed, as `generate -n` and Organism.run(n=) do
    return o


# Streams are begun (encoded and prefilled) on a pool of reused threads: starting a thread per
# request makes the event loop wait until the new thread runs, which under load costs more than
# the first token. More streams than workers wait for a free one.
_STREAM_WORKERS = 64
_stream_pool: concurrent.futures.ThreadPoolExecutor | None = None
_stream_pool_lock = threading.Lock()


def _stream_threads() -> concurrent.futures.ThreadPoolExecutor:
    global _stream_pool
    with _stream_pool_lock:
        if _stream_pool is None:
            _stream_pool = concurrent.futures.ThreadPoolExecutor(_STREAM_WORKERS,
                                                                 thread_name_prefix="molecule-gpt-stream")
        return _stream_pool


async def _generated(org: Organism, prompt: str, overrides: dict, box: dict):
    """Stream one generation, yielding its text as it comes: it is begun (encoded and
    prefilled) on a pool thread and decoded by the organism's decode loop together with every
    other request's (Organism.submit); pieces that arrived while the event loop was busy are
    joined into one (so a loaded server sends fewer, longer events instead of falling behind).
    When the stream ends, `box` holds "prompt_tokens", "ids" and "reason". A consumer that
    stops early (the client went away) ends the generation at the loop's next step."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()
    started: list = []

    def post(item) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            cancel.set()
            for job in started:
                job.cancel()

    def begin() -> None:
        try:
            count = _prompt_tokens(org, prompt)
            job = org.submit(prompt, **overrides)
        except BaseException as exc:  # handed to the consumer, which raises it in the request
            post(exc)
            return
        box["prompt_tokens"] = count
        started.append(job)
        if cancel.is_set():
            job.cancel()
        job.listen(lambda piece: post(piece if piece is not None else job))

    _stream_threads().submit(begin)
    try:
        while True:
            item = await q.get()
            text = []
            while isinstance(item, str):
                text.append(item)
                item = q.get_nowait() if not q.empty() else None
            if text:
                yield "".join(text)
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, SubmittedGeneration):
                result = item.result()
                box.update(ids=result.ids, reason=result.stop_reason)
                return
    finally:
        cancel.set()
        for job in started:
            job.cancel()


async def _merged(streams: dict):
    """The pieces of several async streams, interleaved as they come: (key, piece), and
    (key, None) when that stream ends. An error in one is raised here; leaving early closes
    them all (each stream's cleanup runs before this returns)."""
    if len(streams) == 1:  # the common case, without the hop through a queue
        ((key, stream),) = streams.items()
        try:
            async for piece in stream:
                yield key, piece
            yield key, None
        finally:
            await stream.aclose()
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(key, stream) -> None:
        try:
            async for piece in stream:
                await q.put((key, piece, None))
            await q.put((key, None, None))
        except Exception as exc:  # handed to the consumer
            await q.put((key, None, exc))

    tasks = [asyncio.ensure_future(pump(key, stream)) for key, stream in streams.items()]
    try:
        for _ in range(len(tasks)):
            while True:
                key, piece, error = await q.get()
                if error is not None:
                    raise error
                yield key, piece
                if piece is None:
                    break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


# ---------------------------------------------------------------------------------------------
# the application


class _App:
    """The routes over a set of served organisms; see create_app."""

    def __init__(self, served: dict[str, Served], api_key: str | None, limits: Limits,
                 loader=None, closer=None):
        self.served = served
        self.api_key = api_key
        self.limits = limits
        self._loader, self._closer = loader, closer
        self._load_thread: threading.Thread | None = None

    # ---- lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        for s in self.served.values():
            if s.state == "ready":
                s.start_learning()
        if self._loader is not None:
            self._load_thread = threading.Thread(target=self._loader, name="molecule-gpt-loader", daemon=True)
            self._load_thread.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(self._shutdown)

    def _shutdown(self) -> None:
        if self._load_thread is not None:
            self._load_thread.join()  # a warmup in flight finishes first (seconds at the default config)
        for s in self.served.values():
            if s.org is not None:
                s.stop_learning()
        if self._closer is not None:
            self._closer()

    # ---- helpers

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided" if given else
                           "Missing API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", type="invalid_request_error")

    async def _body(self, request: Request) -> dict:
        declared = request.headers.get("content-length")
        limit = self.limits.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {int(declared):,} bytes; this server takes at most {limit:,}",
                           code="request_too_large")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request body exceeds {limit:,} bytes", code="request_too_large")
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise _bad(f"the request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise _bad("the request body must be a JSON object")
        return body

    def _organism(self, name) -> Served:
        if not isinstance(name, str) or not name:
            raise _bad("model is required: one of " + ", ".join(sorted(self.served)), "model")
        s = self.served.get(name)
        if s is None:
            raise ApiError(404, f"The model '{name[:100]}' does not exist; this server has "
                                f"{', '.join(sorted(self.served))}", param="model", code="model_not_found")
        if s.state == "loading":
            raise ApiError(503, f"the organism '{name}' is still loading (warming up); retry in a few seconds",
                           code="model_loading", headers={"Retry-After": "5"})
        if s.state == "failed":
            raise ApiError(503, f"the organism '{name}' failed to load: {s.error}", code="model_failed")
        return s

    def _model_object(self, s: Served) -> dict:
        return {"id": s.name, "object": "model", "created": s.created, "owned_by": "molecule-gpt"}

    # ---- routes

    async def index(self, request: Request) -> Response:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def models(self, request: Request) -> Response:
        self._check_key(request)
        return JSONResponse({"object": "list", "data": [self._model_object(s) for s in self.served.values()]})

    async def model(self, request: Request) -> Response:
        self._check_key(request)
        name = request.path_params["name"]
        if name not in self.served:
            raise ApiError(404, f"The model '{name[:100]}' does not exist", param="model", code="model_not_found")
        return JSONResponse(self._model_object(self.served[name]))

    async def status(self, request: Request) -> Response:
        self._check_key(request)
        name = request.path_params["name"]
        s = self.served.get(name)
        if s is None:
            raise ApiError(404, f"no organism named '{name[:100]}'", code="model_not_found")
        if s.state != "ready":
            return JSONResponse({"object": "organism.status", "name": name, "state": s.state, "error": s.error},
                                status_code=503 if s.state == "loading" else 200)
        doc = await anyio.to_thread.run_sync(s.status)
        doc["state"] = "ready"
        return JSONResponse(doc)

    async def chat_completions(self, request: Request) -> Response:
        self._check_key(request)
        body = await self._body(request)
        _refuse_unsupported(body, _CHAT_FIELDS)
        sampling = _sampling(body, self.limits, chat=True)
        messages = _messages(body, self.limits)
        s = self._organism(body.get("model"))
        request.state.model = s.name
        await s.check_sampling(sampling)
        prompt = chat_prompt(messages, s.settings.get("recall_recent", 6), s.settings.get("recall_relevant", 4))
        turns = s.new_turns(messages)
        learn_reply = sampling.n == 1 and messages[-1][0] != "assistant"
        if sampling.stream:
            return self._stream(request, s, [prompt], sampling, chat=True,
                                on_done=lambda reply: s.learn_turns(turns, messages, reply if learn_reply else None))
        reply = None
        try:
            results, prompt_tokens = await s.run_all([prompt], sampling)
            reply = results[0].text if learn_reply else None
        finally:  # the new turns are learned also when no reply came (their keys are marked already)
            s.learn_turns(turns, messages, reply)
        usage = self._usage(results, prompt_tokens)
        request.state.tokens = usage["completion_tokens"]
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": s.name, "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "content": r.text},
                         "logprobs": None, "finish_reason": _finish(r.stop_reason)}
                        for i, r in enumerate(results)],
            "usage": usage})

    async def completions(self, request: Request) -> Response:
        self._check_key(request)
        body = await self._body(request)
        _refuse_unsupported(body, _COMPLETION_FIELDS)
        sampling = _sampling(body, self.limits, chat=False)
        prompts = _prompts(body, self.limits)
        if len(prompts) * sampling.n > self.limits.max_n:
            raise _bad(f"prompts x n may be at most {self.limits.max_n}", "n")
        echo = body.get("echo")
        if echo not in (None, True, False):
            raise _bad(f"echo must be a boolean, got {echo!r}", "echo")
        s = self._organism(body.get("model"))
        request.state.model = s.name
        await s.check_sampling(sampling)
        if sampling.stream:
            return self._stream(request, s, prompts, sampling, chat=False, echo=bool(echo))
        results, prompt_tokens = await s.run_all(prompts, sampling)
        usage = self._usage(results, prompt_tokens)
        request.state.tokens = usage["completion_tokens"]
        return JSONResponse({
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": s.name, "system_fingerprint": None,
            "choices": [{"index": i, "text": (prompts[i // sampling.n] if echo else "") + r.text, "logprobs": None,
                         "finish_reason": _finish(r.stop_reason)} for i, r in enumerate(results)],
            "usage": usage})

    # ---- generation

    @staticmethod
    def _run_all(org: Organism, prompts: list[str], s: Sampling) -> tuple[list, int]:
        """Every choice of every prompt (prompt-major) and the prompt tokens (each prompt once,
        as OpenAI counts them)."""
        jobs, prompt_tokens = [], 0
        try:
            for prompt in prompts:
                prompt_tokens += _prompt_tokens(org, prompt)
                # decoded with every other request's; choice i uses seed + i (_choice_overrides)
                jobs += [org.submit(prompt, **s.overrides)] if s.n == 1 else org.submit(prompt, n=s.n, **s.overrides)
            return [job.result() for job in jobs], prompt_tokens
        except GenerationError as exc:  # sampling settings the organism refuses: the request's fault
            raise _bad(str(exc)) from None
        finally:
            for job in jobs:
                job.cancel()

    @staticmethod
    def _usage(results, prompt_tokens: int) -> dict:
        completion = sum(len(r.ids) for r in results)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion}

    def _stream(self, request: Request, s: Served, prompts: list[str], sampling: Sampling, *, chat: bool,
                echo: bool = False, on_done=None) -> StreamingResponse:
        """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        cid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None = None, finish: str | None = None, role: bool = False) -> dict:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            out = {"id": cid, "object": obj, "created": created, "model": s.name, "system_fingerprint": None,
                   "choices": [choice]}
            if sampling.include_usage:
                out["usage"] = None
            return out

        async def events():
            prompt_tokens = completion_tokens = 0
            choices = [(p * sampling.n + i, prompt, i) for p, prompt in enumerate(prompts) for i in range(sampling.n)]
            texts: dict[int, list[str]] = {index: [] for index, _, _ in choices}
            boxes: dict[int, dict] = {index: {} for index, _, _ in choices}
            finished = False
            try:
                for index, prompt, _ in choices:
                    if chat:
                        yield _sse(chunk(index, role=True))
                    elif echo:
                        yield _sse(chunk(index, prompt))
                # every choice at once (decoded together), their chunks as they come
                streams = {index: s.generated(prompt, _choice_overrides(sampling, i), boxes[index])
                           for index, prompt, i in choices}
                async for index, piece in _merged(streams):
                    if piece is not None:
                        texts[index].append(piece)
                        yield _sse(chunk(index, piece))
                        continue
                    box = boxes[index]
                    if index % sampling.n == 0:
                        prompt_tokens += box["prompt_tokens"]
                    completion_tokens += len(box["ids"])
                    yield _sse(chunk(index, finish=_finish(box["reason"])))
                if sampling.include_usage:
                    yield _sse({"id": cid, "object": obj, "created": created, "model": s.name,
                                "system_fingerprint": None, "choices": [],
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                          "total_tokens": prompt_tokens + completion_tokens}})
                finished = True
                request.state.tokens = completion_tokens
                yield b"data: [DONE]\n\n"
            except (MoleculeError, ValueError, TypeError) as exc:  # a generation that cannot start or go on
                log.error("%s: generation failed: %s", s.name, exc)
                yield _sse(ApiError(500, f"generation failed: {exc}").body())
                yield b"data: [DONE]\n\n"
            finally:
                # the reply is learned only when it was streamed whole; the client's new turns always
                if on_done is not None:
                    on_done("".join(texts[0]) if finished else None)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _not_found(request: Request, exc) -> Response:
    return ApiError(404, f"no route {request.method} {request.url.path}", code="not_found").response()


async def _method_not_allowed(request: Request, exc) -> Response:
    return ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed").response()


class _ErrorsAndLog:
    """ASGI middleware: an ApiError anywhere becomes its error object; any other exception a 500
    error object (the traceback goes to the log, never to the client); one log line per request:
    method, path, model, status, completion tokens, seconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": None}
        scope.setdefault("state", {})

        async def send_logged(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        except ApiError as exc:
            if status["code"] is None:
                status["code"] = exc.status
                await exc.response()(scope, receive, send)
        except Exception:
            log.error("internal error on %s %s\n%s", scope["method"], scope["path"], traceback.format_exc())
            if status["code"] is None:
                status["code"] = 500
                await ApiError(500, "internal server error (the server log has the details)",
                               code="internal_error").response()(scope, receive, send)
        finally:
            state = scope["state"]
            log.info("%s %s %s model=%s tokens=%s %.3fs", scope["method"], scope["path"], status["code"],
                     state.get("model", "-"), state.get("tokens", "-"), time.perf_counter() - t0)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return exc.response()


def create_app(home: str | os.PathLike | None = None, *, homes: str | os.PathLike | None = None,
               organisms: Mapping[str, Organism] | None = None, api_key: str | None = None, learn: bool = True,
               config: str | os.PathLike | None = None, recover: bool = False,
               limits: Limits | None = None) -> Starlette:
    """The ASGI application (Starlette) serving organisms; mount it in your own app or run it
    with uvicorn. Exactly one source of organisms:

      home       a home directory (as `molecule-gpt chat --home`): one organism, whose model id
                 is the folder's name; born from the seed corpus and warmed up if new
      homes      a directory of homes: one organism per sub-folder (a folder name is the model
                 id: letters, digits, '.', '_', '-'; other entries are skipped)
      organisms  {model id: Organism} you hold: served as they are; the server starts and stops
                 their background trainer (when learning) but does not save or close them

    Homes load (and warm up, with a progress line on stderr) in a thread once the app starts;
    meanwhile their requests get 503. While serving, a home is locked as `chat` locks it; at
    shutdown it is saved. api_key: required as `Authorization: Bearer KEY` on /v1 routes.
    learn=False: nothing is observed and no background trainer runs. config: a config file
    (as --config); recover: load the previous save of a damaged checkpoint (as --recover)."""
    from . import cli  # the home, its lock, birth, warmup and save are the chat's own
    limits = limits or Limits()
    sources = [x is not None for x in (home, homes, organisms)]
    if sum(sources) != 1:
        raise ValueError("create_app needs exactly one of home=, homes= or organisms=")
    options = cli.load_options(None if config is None else os.fspath(config))
    served: dict[str, Served] = {}
    if organisms is not None:
        for name, org in organisms.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise ValueError(f"model id {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
            if not isinstance(org, Organism):
                raise TypeError(f"organisms[{name!r}] must be a molecule_gpt.Organism, got {type(org).__name__}")
            served[name] = Served(name, organism=org, learn=learn, settings=options.settings)
        return _build(served, api_key, limits)

    if home is not None:
        path = pathlib.Path(home).expanduser()
        name = path.resolve().name
        if not _NAME.match(name):
            raise ValueError(f"the home folder's name {name!r} is the model id and must use letters, digits, "
                             f"'.', '_' and '-'; rename it or serve its parent with homes=")
        paths = {name: path}
    else:
        root = pathlib.Path(homes).expanduser()
        if not root.is_dir():
            raise ValueError(f"--homes {root}: not a directory")
        paths = {}
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            # only real sub-folders with a plain name: no symlink leads the server out of DIR
            if entry.is_dir(follow_symlinks=False) and _NAME.match(entry.name) and entry.name not in (".", ".."):
                paths[entry.name] = root / entry.name
            elif not entry.name.startswith("."):
                log.warning("--homes %s: skipping %r (not a folder with a plain name)", root, entry.name)
        if not paths:
            raise ValueError(f"--homes {root} holds no organism folders; create one folder per organism "
                             f"(e.g. mkdir {root / 'pet'})")
    for name, path in paths.items():
        served[name] = Served(name, home=cli.Home(path, options), learn=learn, settings=options.settings)
    stack = contextlib.ExitStack()
    args = _SessionArgs(recover)

    def load() -> None:
        for s in served.values():
            try:
                org, memory, _ = stack.enter_context(cli.writer_session(s.home, args, None))
                if not org.trainer.warmed_up:
                    log.info("%s: warming up (%d steps)", s.name, org.config.warmup_steps)
                    summary = cli.run_warmup(org, s.home)
                    log.info("%s: warm: loss %.3f, held-out %s in %.1f s", s.name, summary["loss"] or float("nan"),
                             summary["val_loss"], summary["seconds"])
                s.home.save(org)
                s.earlier = history_records(_read_telemetry(s.home.telemetry))
                s.org = org
                s.state = "ready"
                s.start_learning()
                log.info("%s: ready (%s)", s.name, repr(org))
            except Exception as exc:  # a CLIError says what to do; anything else is named
                s.state, s.error = "failed", getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                log.error("%s: %s", s.name, s.error)

    def close() -> None:
        for s in served.values():
            if s.org is not None and s.home is not None:
                try:
                    s.home.save(s.org)
                    log.info("%s: saved to %s", s.name, s.home.checkpoint)
                except Exception as exc:
                    log.error("%s: could not save: %s", s.name, getattr(exc, "message", exc))
        stack.close()  # closes each organism and memory, archives the checkpoint, releases the lock

    return _build(served, api_key, limits, load, close)


@dataclasses.dataclass
class _SessionArgs:
    """What cli.writer_session reads of the command line's arguments."""
    recover: bool


def _read_telemetry(path: pathlib.Path) -> Iterator[dict]:
    from .telemetry import read_records
    return read_records(path)


def _build(served: dict[str, Served], api_key: str | None, limits: Limits, loader=None, closer=None) -> Starlette:
    a = _App(served, api_key, limits, loader, closer)
    routes = [
        Route("/", a.index, methods=["GET"]),
        Route("/v1/models", a.models, methods=["GET"]),
        Route("/v1/models/{name:path}", a.model, methods=["GET"]),
        Route("/v1/chat/completions", a.chat_completions, methods=["POST"]),
        Route("/v1/completions", a.completions, methods=["POST"]),
        Route("/v1/organisms/{name}/status", a.status, methods=["GET"]),
        Mount("/static", app=StaticFiles(directory=WEB_DIR), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=a.lifespan,
                    exception_handlers={ApiError: _api_error, 404: _not_found, 405: _method_not_allowed})
    app.add_middleware(_ErrorsAndLog)
    app.state.served = served  # for callers that mount it and want to look (read-only use)
    return app
