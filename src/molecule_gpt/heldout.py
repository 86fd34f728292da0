"""Held-out loss, defined once: nats per character of text the model never trained on.

What it is: the one measure of how well the organism predicts a set of lines, used by the
immune system, the telemetry, `/status` and the learning benchmark alike. Per character, not
per token, so the figure stays comparable when the tokenizer grows (a token-level loss falls
just because tokens get longer).

Definition. For held-out lines l_1..l_n, each whitespace-normalized and encoded as the
organism encodes a line (<BOS> tokens <EOS>):
    loss = (sum over lines, over every predicted token of the line, of -ln p(token | context))
           / (sum over lines of (code points of the normalized line + 1))
The +1 per line counts the line's end (its <EOS> is predicted too). A line longer than the
context window is scored in consecutive windows of block_size + 1 tokens that overlap by one
token, so every target is predicted exactly once (each window starts its context afresh).

What it is not: a cache or a policy. `HeldOut` below keeps a line set with its encodings
(re-encoded when the tokenizer changes, by its version counter) and answers loss(model).
"""
from __future__ import annotations

import itertools
import math
import threading
import time
from typing import Callable, Sequence

import numpy as np

__all__ = ["HeldOut", "line_chars", "window_target_nats", "windows"]

_serials = itertools.count()
_WINDOWS_PER_CALL = 32


def line_chars(line: str) -> int:
    """Characters a line counts for: code points after whitespace normalization, plus its end."""
    return len(" ".join(line.split())) + 1


def windows(ids: Sequence[int], block_size: int) -> list:
    """`ids` (one encoded line) as consecutive windows of at most block_size + 1 tokens sharing
    one token at each seam: every target ids[1:] lies in exactly one window."""
    T = block_size
    return [list(ids[s:s + T + 1]) for s in range(0, max(1, len(ids) - 1), T)]


def window_target_nats(model, ws: Sequence[Sequence[int]], pace: Callable[[float], None] | None = None,
                       known: dict | None = None) -> list[np.ndarray]:
    """Each window's targets' cross-entropy (nats), in order (Model.token_nats). pace(seconds)
    is called after each piece of windows (the model lock is free between pieces). known: each
    window's target nats (keyed by the window's ids as a tuple) under the model's current
    weights, from an earlier evaluation; those are not evaluated again, and the new ones are
    added to it. Pass it only where a window's nats depend on nothing but its ids and the
    weights (Model.rows_independent: each sequence computed as it would be alone), so that a
    known value is the value."""
    keys = [tuple(w) for w in ws]
    found = known if known is not None else {}
    todo = [i for i, key in enumerate(keys) if key not in found]
    for start in range(0, len(todo), _WINDOWS_PER_CALL):
        part = todo[start:start + _WINDOWS_PER_CALL]
        t0 = time.perf_counter()
        for i, nats in zip(part, model.token_nats([ws[i] for i in part])):
            found[keys[i]] = nats
        if pace is not None:
            pace(time.perf_counter() - t0)
    return [found[key] for key in keys]


class HeldOut:
    """A fixed set of held-out lines and their per-character loss under a model.

    HeldOut(lines, encode, version)
      lines    the held-out lines (str)
      encode   the tokenizer's encode (str -> ids with <BOS>/<EOS>)
      version  a callable returning the tokenizer's version: encodings are redone when it changes

    Thread-safe: the encodings are rebuilt under a lock; loss() evaluates in batches of the
    model's batch_size, taking the model lock per batch (generation can interleave)."""

    def __init__(self, lines: Sequence[str], encode: Callable[[str], list], version: Callable[[], int]):
        self.lines = [line for line in lines if line.split()]
        self.chars = sum(line_chars(line) for line in self.lines)
        self._encode = encode
        self._version = version
        self._lock = threading.Lock()
        self._key = None
        self._windows: list = []
        self._serial = next(_serials)

    def __len__(self) -> int:
        return len(self.lines)

    def key(self) -> tuple:
        """Changes when the set or the tokenizer changes (for caching a loss)."""
        return (self._serial, self._version())

    def windows(self, block_size: int) -> list:
        """Every window of every line (see `windows`), encoded with the current tokenizer."""
        key = (self._version(), block_size)
        with self._lock:
            if key != self._key:
                self._windows = [w for line in self.lines for w in windows(self._encode(line), block_size)]
                self._key = key
            return self._windows

    def window_nats(self, model, pace: Callable[[float], None] | None = None,
                    known: dict | None = None) -> list[float]:
        """Summed cross-entropy (nats) of each window (see `windows`), in order: the mean of
        its targets' nats times their number. pace and known as in window_target_nats."""
        return [float(nats.mean()) * len(nats) for nats in self._window_target_nats(model, pace, known)]

    def target_nats(self, model, pace: Callable[[float], None] | None = None,
                    known: dict | None = None) -> np.ndarray:
        """Cross-entropy (nats) of every predicted token, window after window (see `windows`):
        one value per target of the lines. pace and known as in window_target_nats."""
        parts = self._window_target_nats(model, pace, known)
        return np.concatenate(parts) if parts else np.zeros(0)

    def _window_target_nats(self, model, pace, known) -> list[np.ndarray]:
        return window_target_nats(model, self.windows(model.config.block_size), pace, known)

    def total_nats(self, model, pace: Callable[[float], None] | None = None, known: dict | None = None) -> float:
        """Summed cross-entropy (nats) over every predicted token of the lines: the windows'
        nats (window_nats) summed exactly (math.fsum: the same total in any order, so a total
        built partly from known windows equals a fresh one bit for bit)."""
        return math.fsum(self.window_nats(model, pace, known))

    def loss(self, model, pace: Callable[[float], None] | None = None, known: dict | None = None) -> float | None:
        """Nats per character (see the module docstring); None without lines. known: as in
        window_nats."""
        if not self.lines:
            return None
        return self.total_nats(model, pace, known) / self.chars
