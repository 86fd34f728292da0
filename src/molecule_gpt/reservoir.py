"""The bounded corpus reservoir of design.md §7: the lines the organism trains on, capped in count
and in line length, deduplicated case-insensitively, renewed by chat.

What it is: a plain, single-threaded container with a seedable RNG and an exact JSON round
trip. Whoever owns it (the Organism) guards it with its own lock and persists it (in the
checkpoint); `Memory` never stores a copy, so a forgotten line cannot come back from a second
store (see molecule_gpt.memory).

What it is not: a tokenizer cache or a training sampler; it only decides which lines are kept.

Rules, in the order `add` applies them:
  1. whitespace runs (newlines included) collapse to one space, ends are stripped, empty lines
     are skipped;
  2. a line longer than `max_line_chars` is split into pieces of at most that many characters,
     at the last space before the limit when one lies in the second half of the piece, else
     hard (nothing is dropped, every piece is a line);
  3. a line whose casefolded text is already held is skipped (dedup against what is held now:
     a line evicted earlier may come back);
  4. over `max_lines`, the newest `max_lines // 2` lines are kept and the older ones are
     sampled uniformly without replacement (in their original order) to fill the rest (with
     max_lines = 1, the newest line is kept).

Chat text enters through `add_message(role, text)`: split into sentences, each tagged "H: " or
"A: ", each piece (tag included) within `max_line_chars`.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from typing import Iterable, Iterator

import numpy as np

__all__ = ["Reservoir", "RESERVOIR_FORMAT", "RESERVOIR_VERSION", "is_chat_line"]

RESERVOIR_FORMAT = "molecule_gpt.reservoir"
RESERVOIR_VERSION = 1
ROLES = ("H", "A")  # human, assistant (the organism)
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
# bit generators a saved state may name (getattr on np.random with a name from a file is not ok)
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "Philox", "SFC64", "MT19937")


def _pieces(line: str, limit: int) -> list[str]:
    """`line` (already whitespace-normalized) as pieces of at most `limit` characters."""
    out = []
    while len(line) > limit:
        cut = line.rfind(" ", 0, limit + 1)
        if cut < limit // 2:
            cut = limit
        out.append(line[:cut].rstrip())
        line = line[cut:].lstrip()
    if line:
        out.append(line)
    return out


def _make_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or isinstance(rng, (int, np.integer, np.random.SeedSequence)):
        return np.random.default_rng(rng)
    raise TypeError(f"rng must be None, an int seed, a SeedSequence or a numpy Generator, got {type(rng).__name__}")


class Reservoir:
    """Bounded, deduplicated training lines (design.md §7). See the module docstring for the rules.

    Reservoir(lines=(), max_lines=8000, rng=None, *, max_line_chars=240)
      lines           initial lines (the birth corpus), added with the same rules as `add`
      max_lines       most lines held (Config.max_corpus_lines)
      rng             int seed, SeedSequence, numpy Generator (shared, not copied) or None
      max_line_chars  longest line held (Config.max_line_chars)

    Not thread-safe: the owner serializes calls.
    """

    def __init__(self, lines: Iterable[str] = (), max_lines: int = 8000, rng=None, *, max_line_chars: int = 240):
        if isinstance(max_lines, bool) or not isinstance(max_lines, (int, np.integer)) or max_lines < 1:
            raise ValueError(f"max_lines must be an int >= 1, got {max_lines!r}")
        if isinstance(max_line_chars, bool) or not isinstance(max_line_chars, (int, np.integer)) \
                or max_line_chars < 8:
            raise ValueError(f"max_line_chars must be an int >= 8 (a tag and a word must fit), got {max_line_chars!r}")
        self.max_lines = int(max_lines)
        self.max_line_chars = int(max_line_chars)
        self.rng = _make_rng(rng)
        self._lines: list[str] = []
        self._seen: set[str] = set()  # casefolded self._lines
        self.add(lines)

    # ---- reading

    @property
    def lines(self) -> list[str]:
        """The lines held, oldest first (a copy)."""
        return list(self._lines)

    @property
    def chars(self) -> int:
        """Characters held (the corpus size the BPE thresholds compare against)."""
        return sum(len(line) for line in self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._lines))

    def __contains__(self, line: object) -> bool:
        return isinstance(line, str) and " ".join(line.split()).casefold() in self._seen

    def __repr__(self) -> str:
        return f"Reservoir({len(self._lines)} lines, {self.chars} chars, max_lines={self.max_lines})"

    # ---- writing

    def add(self, lines: Iterable[str]) -> list[str]:
        """Add lines (rules 1-4); returns the lines actually added (normalized, before eviction:
        with more new lines than max_lines // 2 some of them may already be sampled out)."""
        if isinstance(lines, str):
            raise TypeError("add() takes an iterable of lines, got one str; wrap it in a list or use add_message()")
        added = []
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise TypeError(f"line {i} is a {type(line).__name__}; every line must be str")
            for piece in _pieces(" ".join(line.split()), self.max_line_chars):
                key = piece.casefold()
                if key in self._seen:
                    continue
                self._seen.add(key)
                self._lines.append(piece)
                added.append(piece)
        if len(self._lines) > self.max_lines:
            self._evict()
        return added

    def add_message(self, role: str, text: str) -> list[str]:
        """Add one chat message: its sentences, each tagged "H: " or "A: " (rule 2 applies to
        the tagged line). Returns the lines added."""
        tag = _check_role(role) + ": "
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        lines = []
        for raw in text.splitlines():
            for sentence in _SENTENCE.split(" ".join(raw.split())):
                lines.extend(tag + p for p in _pieces(sentence, self.max_line_chars - len(tag)))
        return self.add(lines)

    def _evict(self) -> None:
        """Rule 4: keep the newest max_lines // 2 (at least the newest line), sample the older
        ones to fill max_lines."""
        n_new = max(1, self.max_lines // 2)
        split = len(self._lines) - n_new
        older, newest = self._lines[:split], self._lines[split:]
        keep = np.sort(self.rng.choice(len(older), self.max_lines - n_new, replace=False))
        self._lines = [older[i] for i in keep] + newest
        self._seen = {line.casefold() for line in self._lines}

    def remove(self, lines: Iterable[str]) -> int:
        """Remove these exact lines (as held: normalized); returns how many were held."""
        gone = {line for line in lines if isinstance(line, str)}
        keep = [line for line in self._lines if line not in gone]
        removed = len(self._lines) - len(keep)
        if removed:
            held = set(self._lines)
            self._lines = keep
            # no two held lines share a casefold, so a removed line's casefold is nobody else's
            self._seen.difference_update(line.casefold() for line in gone if line in held)
        return removed

    def set_limits(self, max_lines: int, max_line_chars: int) -> None:
        """Apply new caps (Config.max_corpus_lines, max_line_chars) from now on; lines held over
        the new count cap are evicted by rule 4 at once."""
        self.max_lines = int(max_lines)
        self.max_line_chars = int(max_line_chars)
        if len(self._lines) > self.max_lines:
            self._evict()

    def forget(self, phrase: str | None = None, *, chat_only: bool = True) -> int:
        """Remove lines: those containing `phrase` (case-insensitive), or all when phrase is
        None. With chat_only (the default) only chat lines ("H: ..."/"A: ...") are candidates,
        so the birth corpus stays; chat_only=False considers every line. Returns how many went."""
        needle = _check_phrase(phrase)
        keep = []
        for line in self._lines:
            candidate = not chat_only or is_chat_line(line)
            if candidate and (needle is None or needle in line.casefold()):
                continue
            keep.append(line)
        removed = len(self._lines) - len(keep)
        if removed:
            self._lines = keep
            self._seen = {line.casefold() for line in keep}
        return removed

    # ---- JSON round trip

    def to_dict(self) -> dict:
        """Everything needed to continue exactly (lines, limits, RNG state); JSON-able."""
        return {"format": RESERVOIR_FORMAT, "format_version": RESERVOIR_VERSION,
                "max_lines": self.max_lines, "max_line_chars": self.max_line_chars,
                "lines": list(self._lines), "rng": self.rng.bit_generator.state}

    @classmethod
    def from_dict(cls, state: dict, rng=None) -> "Reservoir":
        """The reservoir `to_dict` described. Its RNG continues from the saved state unless
        `rng` is given (e.g. the owner's shared Generator)."""
        if not isinstance(state, dict) or state.get("format") != RESERVOIR_FORMAT:
            raise ValueError("not a molecule_gpt reservoir state (no 'format': 'molecule_gpt.reservoir')")
        if state.get("format_version") != RESERVOIR_VERSION:
            raise ValueError(f"reservoir state version {state.get('format_version')!r} is not supported "
                             f"(this molecule-gpt reads version {RESERVOIR_VERSION})")
        lines = state.get("lines")
        if not isinstance(lines, list):
            raise ValueError("reservoir state: 'lines' must be a list of str")
        if rng is None:
            saved = state.get("rng")
            name = saved.get("bit_generator") if isinstance(saved, dict) else None
            if name not in _BIT_GENERATORS:
                raise ValueError(f"reservoir state: unknown RNG {name!r} (expected one of {', '.join(_BIT_GENERATORS)})")
            bit_generator = getattr(np.random, name)()
            bit_generator.state = saved
            rng = np.random.Generator(bit_generator)
        # held lines already obey rules 1-3 and the cap, so add() consumes no randomness here
        return cls(lines, state["max_lines"], rng, max_line_chars=state["max_line_chars"])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str, rng=None) -> "Reservoir":
        return cls.from_dict(json.loads(text), rng=rng)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON state atomically (temporary file in the same directory, fsync,
        rename): a crash leaves the old file or the new one, never half of one."""
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".reservoir-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, rng=None) -> "Reservoir":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), rng=rng)


# ---------------------------------------------------------------------------------------------
# helpers shared with molecule_gpt.memory


def is_chat_line(line: str) -> bool:
    """A line that chat added (tagged "H: " or "A: ")."""
    return len(line) > 2 and line[1:3] == ": " and line[0] in ROLES


def _check_role(role: object) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be 'H' (the person) or 'A' (the organism), got {role!r}")
    return role  # type: ignore[return-value]


def _check_phrase(phrase: object) -> str | None:
    """The casefolded phrase, or None for "everything". An empty phrase is refused rather than
    read as "everything": forgetting all must be asked for explicitly."""
    if phrase is None:
        return None
    if not isinstance(phrase, str):
        raise TypeError(f"phrase must be str or None, got {type(phrase).__name__}")
    needle = " ".join(phrase.split()).casefold()
    if not needle:
        raise ValueError("phrase is empty; pass None to forget everything")
    return needle

