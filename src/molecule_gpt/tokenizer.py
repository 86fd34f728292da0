"""EvolvingTokenizer: characters at birth, grow-only BPE later, and nothing is ever dropped.

This is the tokenizer of design.md §1 with the defect of §8.2 fixed. It is the policy layer: the
vocabulary, when it grows, what a merge creates, serialization, the original-checkpoint import.
The hot loops (word scanning, merge application with a per-word cache, BPE training with
incremental pair counts) are in the Cython extension `_bpe`; `_PyCore` below is its pure-Python
twin, used when the extension is not built or MOLECULE_GPT_PUREPYTHON=1 is set.

Vocabulary (ids never change, tokens are never removed)
    birth      the sorted characters of "\\n".join(lines) + "\\n", then <PAD>, <BOS>, <EOS>
    bytes      byte tokens "<0xNN>", appended once (at birth for a new tokenizer)
    merges     each BPE training appends the merged tokens it creates that do not exist yet

Decision: byte fallback, not growth on encode. A character that has no token is spelled by the
byte tokens of its UTF-8 encoding (lone surrogates as Python's "surrogatepass" spells them), the
way GPT-2's byte-level BPE and SentencePiece's byte_fallback do. Why:
- encode stays a pure function. If encode appended characters as new tokens, a chat prompt
  could change the vocabulary under a model mid-generation; every caller would have to grow
  the model's rows and the optimizer state before using the ids (the crash of §8.5).
- The vocabulary stays bounded: noise, emoji and one-off scripts cannot grow it without limit.
- Learning still happens: BPE training runs over the same symbols, so a character (or a word)
  seen often enough becomes a merged token of its own, at a growth event the organism expects.
There is one byte token per byte value that can occur in such an encoding (0x00-0xF4 except
0xC0 and 0xC1) and that is not already a one-character token (ASCII characters of the alphabet
are their own byte); at most 243. They are appended after the existing tokens, so an original
checkpoint's ids are unchanged; `from_original(..., byte_fallback=False)` keeps its exact
vocabulary instead, and then a character outside it raises TokenizerError instead of vanishing.

Encoding (design.md §1): strip; <BOS>; char mode: one token per character; BPE mode: per
whitespace-separated word, its characters plus the end-of-word marker </w>, merges applied
lowest rank first, leftmost on ties (a pair listed twice keeps its last rank, like the
original's dict), the bare </w> not emitted, the space token between words; <EOS>.
Decoding: skip <BOS>/<PAD>, stop at <EOS>, concatenate the tokens' bytes, decode UTF-8
(surrogatepass; invalid sequences become U+FFFD), collapse whitespace runs, strip. Hence
`decode(encode(s)) == " ".join(s.split())` for every str s. Unlike the original, a literal
"</w>" typed in the text survives (the marker is a symbol, not text).

Training (design.md §1): words of the whitespace-split lines, each its base symbols plus </w>;
repeatedly merge the most frequent adjacent pair (counted with word frequencies, overlapping
occurrences included), bpe_num_merges times or until no pair is left. Ties between equal
counts go to the pair met first when scanning the distinct words in first-occurrence order,
symbols left to right: the original's rule, so a tokenizer imported with byte_fallback=False
and retrained learns exactly the merges the original would have. A merge whose text (bytes
and end-of-word flag) is already a token reuses that token; others are appended.

Growth events: `maybe_enable_bpe`, `maybe_retrain_bpe` and `enable_byte_fallback` return None
when nothing happened; they and `train_bpe` otherwise return a `TokenizerUpdate`. When one is
returned the merges may have changed (re-encode cached ids); when `update.grew`, grow every
vocabulary-sized matrix to `update.new_vocab_size` rows (existing rows untouched).

Threads: encode, decode and stream decoders may run in other threads while one thread runs a
growth event (the core's tables are swapped at once; ids stay valid since nothing is removed).
Two growth events must not run at the same time.

Serialized form (to_dict; JSON, format "molecule_gpt.tokenizer", format_version 1)
    tokens          display string per id: the character, "<PAD>"/"<BOS>"/"<EOS>", "<0xNN>",
                    or a merged token's text with "</w>" appended when it ends a word
    token_bytes     per id, hex of the UTF-8 bytes it decodes to ("" for the specials)
    token_kinds     one letter per id: c character, s special, b byte, m merged
    token_eow       the ids of tokens that end a word
    merges          [left, right, merged] ids in rank order; right is -1 for the </w> marker
    bpe_enabled, byte_fallback, trained_chars, enable_bpe_after_chars, bpe_num_merges,
    bpe_retrain_every_chars
Only token_bytes, token_kinds and token_eow define the tokens; `tokens` is kept as written
(an imported original's strings survive a round trip). from_dict checks the document against
itself before using it (specials, character and byte tokens, no two tokens alike, byte tokens
iff byte_fallback, every merge's token its parts' bytes joined): a loaded tokenizer round-trips
or the document is rejected with TokenizerError.
"""
from __future__ import annotations

import codecs
import itertools
import operator
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, NamedTuple

from .config import Config
from .errors import TokenizerError

try:  # the compiled core; MOLECULE_GPT_PUREPYTHON=1 forces the pure-Python twin
    if os.environ.get("MOLECULE_GPT_PUREPYTHON", "0") == "1":
        raise ImportError("MOLECULE_GPT_PUREPYTHON=1")
    from ._bpe import BPECore as _Core
    from ._bpe import EOW_ID as EOW
    HAVE_EXTENSION = True
except ImportError:
    _Core = None
    EOW = -1
    HAVE_EXTENSION = False

__all__ = ["EvolvingTokenizer", "StreamDecoder", "TokenizerUpdate", "CorpusFile", "read_corpus"]

MARKER = "</w>"
PAD, BOS, EOS = "<PAD>", "<BOS>", "<EOS>"
FORMAT = "molecule_gpt.tokenizer"
FORMAT_VERSION = 1

# token kinds, one letter per token in to_dict()["token_kinds"]
CHAR, SPECIAL, BYTE, MERGED = "c", "s", "b", "m"

# byte values that occur in UTF-8 (with surrogatepass): all but 0xC0, 0xC1, 0xF5-0xFF
_UTF8_BYTES = [b for b in range(0xF5) if b not in (0xC0, 0xC1)]


def _lenient(exc):
    """Decode error handler: lone surrogates as 'surrogatepass' spells them, else U+FFFD."""
    try:
        return codecs.lookup_error("surrogatepass")(exc)
    except UnicodeError:
        return codecs.replace_errors(exc)


codecs.register_error("molecule_gpt.lenient", _lenient)
_VERSIONS = itertools.count(1)  # tokenizer versions, unique in the process (copies never share one)
_WS_RUNS = re.compile(r"(\s+)")  # re's \s is exactly str.isspace()


def _decode_surface(data: bytes) -> str:
    return data.decode("utf-8", "molecule_gpt.lenient")


def _display(surface: bytes, eow: bool) -> str:
    """Human-readable text of a merged token: its text, `</w>` when it ends a word."""
    try:
        text = surface.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        text = surface.decode("utf-8", "backslashreplace")
    return text + (MARKER if eow else "")



_DICT_FIELDS = ("tokens", "token_bytes", "token_kinds", "token_eow", "merges", "bpe_enabled", "byte_fallback",
                "trained_chars", "enable_bpe_after_chars", "bpe_num_merges", "bpe_retrain_every_chars")


def _corrupt(what: str) -> TokenizerError:
    return TokenizerError(f"corrupt tokenizer dict: {what}; from_dict() reads only what to_dict() writes "
                          f"(load an intact copy, e.g. the previous checkpoint)")


def _token_surface(i: int, display: str, hx: str, kind: str, eow: bool, index: dict) -> bytes:
    """The bytes of token i of a dict, checked against its kind (what _append and the core
    rely on), or TokenizerError."""
    try:
        surface = bytes.fromhex(hx)
    except ValueError:
        raise _corrupt(f"token {i}'s bytes {hx[:40]!r} are not hex") from None
    if kind not in (CHAR, SPECIAL, BYTE, MERGED):
        raise _corrupt(f"token {i} has unknown kind {kind!r} (one of {CHAR} character, {SPECIAL} special, "
                       f"{BYTE} byte, {MERGED} merged)")
    if eow and kind != MERGED:
        raise _corrupt(f"token {i} ({display!r}) is listed in token_eow but only merged tokens end a word")
    if kind == SPECIAL:
        if display not in (PAD, BOS, EOS) or surface:
            raise _corrupt(f"special token {i} must be {PAD}, {BOS} or {EOS} with no bytes, got {display!r} "
                           f"with {len(surface)} byte(s)")
        return surface
    if kind == CHAR and (len(display) != 1 or display.encode("utf-8", "surrogatepass") != surface):
        raise _corrupt(f"character token {i} ({display!r}) must be one character whose UTF-8 is its bytes "
                       f"({surface!r})")
    if kind == BYTE and len(surface) != 1:
        raise _corrupt(f"byte token {i} ({display!r}) must have exactly one byte, has {len(surface)}")
    if kind == MERGED and not surface:
        raise _corrupt(f"merged token {i} ({display!r}) has no bytes")
    if (surface, eow) in index:
        raise _corrupt(f"tokens {index[(surface, eow)]} and {i} both spell {surface!r}"
                       f"{' ending a word' if eow else ''}")
    return surface

def _check_lines(lines, what="lines") -> list:
    if isinstance(lines, (str, bytes)):
        raise TypeError(f"{what} must be a list of str (one per line), got a single {type(lines).__name__}; "
                        f"wrap it in a list or use text.splitlines()")
    try:
        lines = list(lines)
    except TypeError:
        raise TypeError(f"{what} must be a list of str, got {type(lines).__name__}") from None
    for i, line in enumerate(lines):
        if not isinstance(line, str):
            raise TypeError(f"{what}[{i}] must be str, got {type(line).__name__}")
    return lines


@dataclass(frozen=True)
class TokenizerUpdate:
    """What a growth event did. `grew`: the model must grow its vocabulary rows."""
    event: str            # "enable_bpe", "retrain_bpe", "extend_bpe", "train_bpe" or "byte_fallback"
    old_vocab_size: int
    new_vocab_size: int
    num_merges: int       # merges in effect after the event

    @property
    def grew(self) -> bool:
        return self.new_vocab_size > self.old_vocab_size


class CorpusFile(NamedTuple):
    lines: list      # stripped, non-empty lines
    invalid_bytes: int  # bytes that were not UTF-8, each replaced by U+FFFD


def read_corpus(path, *, max_line_chars: int | None = None) -> CorpusFile:
    """Read a text file as UTF-8; invalid bytes become U+FFFD and are counted, never fatal.

    Lines are stripped, empty ones dropped, and cut to max_line_chars when given (as the
    original's corpus loader does)."""
    with open(path, "rb") as f:
        raw = f.read()
    # surrogateescape maps each invalid byte to one of U+DC80..U+DCFF, which valid UTF-8 can
    # never produce: count them, then replace them
    text = raw.decode("utf-8", "surrogateescape")
    invalid = sum(1 for ch in text if "\udc80" <= ch <= "\udcff") if not text.isascii() else 0
    if invalid:
        text = re.sub("[\udc80-\udcff]", "\ufffd", text)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            lines.append(line[:max_line_chars] if max_line_chars else line)
    return CorpusFile(lines, invalid)


class EvolvingTokenizer:
    """Char-level tokenizer that learns grow-only BPE merges; see the module docstring.

    EvolvingTokenizer(lines, config=None, *, enable_bpe_after_chars=None, bpe_num_merges=None,
    bpe_retrain_every_chars=None, byte_fallback=True)
    Thresholds come from `config` (a Config, default Config()) unless given as keywords.
    """

    # ------------------------------------------------------------------------------------------
    # construction

    def __init__(self, lines: Iterable[str], config: Config | None = None, *,
                 enable_bpe_after_chars: int | None = None, bpe_num_merges: int | None = None,
                 bpe_retrain_every_chars: int | None = None, byte_fallback: bool = True):
        lines = _check_lines(lines)
        base_text = "\n".join(lines) + "\n"
        self._init_empty(config, enable_bpe_after_chars, bpe_num_merges, bpe_retrain_every_chars)
        for ch in sorted(set(base_text)):
            self._append(ch, ch.encode("utf-8", "surrogatepass"), False, CHAR)
        self._add_specials()
        self.trained_chars = len(base_text)
        if byte_fallback:
            self._add_byte_tokens()
        self._sync_core()

    def _init_empty(self, config, enable_bpe_after_chars, bpe_num_merges, bpe_retrain_every_chars):
        cfg = config if config is not None else Config()
        if not isinstance(cfg, Config):
            raise TypeError(f"config must be a molecule_gpt.Config, got {type(cfg).__name__}")
        thresholds = {
            "enable_bpe_after_chars": cfg.enable_bpe_after_chars if enable_bpe_after_chars is None else enable_bpe_after_chars,
            "bpe_num_merges": cfg.bpe_num_merges if bpe_num_merges is None else bpe_num_merges,
            "bpe_retrain_every_chars": cfg.bpe_retrain_every_chars if bpe_retrain_every_chars is None else bpe_retrain_every_chars,
        }
        for name, value in thresholds.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TokenizerError(f"{name} must be a non-negative int, got {value!r}")
        self.enable_bpe_after_chars = thresholds["enable_bpe_after_chars"]
        self.bpe_num_merges = thresholds["bpe_num_merges"]
        self.bpe_retrain_every_chars = thresholds["bpe_retrain_every_chars"]
        self.tokens: list[str] = []          # display string per id (chars, specials, <0xNN>, merged)
        self._surface: list[bytes] = []      # bytes each id contributes to decoded text
        self._eow: list[bool] = []           # the token ends a word (its string ends in </w>)
        self._kind: list[str] = []           # CHAR / SPECIAL / BYTE / MERGED
        self._index: dict = {}               # (surface, eow) -> id, every non-special token
        self._merges: list = []              # (left, right, merged) ids in rank order; right may be EOW
        self.bpe_enabled = False
        self.byte_fallback = False
        self.trained_chars = 0
        self.version = 0                     # renewed whenever encode's results may change
        self.pad_id = self.bos_id = self.eos_id = -1
        self._core = _Core() if _Core is not None else _PyCore()

    def _append(self, display: str, surface: bytes, eow: bool, kind: str) -> int:
        tid = len(self.tokens)
        self.tokens.append(display)
        self._surface.append(surface)
        self._eow.append(eow)
        self._kind.append(kind)
        if kind != SPECIAL:
            self._index[(surface, eow)] = tid
        return tid

    def _add_specials(self):
        self.pad_id = self._append(PAD, b"", False, SPECIAL)
        self.bos_id = self._append(BOS, b"", False, SPECIAL)
        self.eos_id = self._append(EOS, b"", False, SPECIAL)

    def _add_byte_tokens(self) -> None:
        for b in _UTF8_BYTES:
            if (bytes([b]), False) not in self._index:
                self._append(f"<0x{b:02X}>", bytes([b]), False, BYTE)
        self.byte_fallback = True

    def _sync_core(self) -> None:
        """Hand the current vocabulary and merges to the core (at birth and after growth)."""
        chars = {ord(t): i for i, t in enumerate(self.tokens) if self._kind[i] == CHAR}
        byte_ids = [self._index.get((bytes([b]), False), -1) for b in range(256)]
        if not self.byte_fallback:  # only ASCII characters of the alphabet spell themselves
            byte_ids = [t if t >= 0 and self._kind[t] == CHAR else -1 for t in byte_ids]
        space_id = self._index.get((b" ", False), -1)
        self._core.set_vocab(chars, byte_ids, self._surface, space_id, self.bos_id, self.eos_id, self.pad_id)
        self._core.set_merges(self._merges)
        self.version = next(_VERSIONS)

    # ------------------------------------------------------------------------------------------
    # the API the organism uses

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    @property
    def merges(self) -> list:
        """(left, right, merged) ids in rank order; right is EOW (-1) for the </w> marker."""
        return list(self._merges)

    def merge_strings(self) -> list:
        """The merges as [left, right] display strings, as the original checkpoint stores them."""
        return [[self.tokens[a], MARKER if b == EOW else self.tokens[b]] for a, b, _ in self._merges]

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token contributes to decoded text (b"" for the special tokens)."""
        return self._surface[self._check_id(token_id)]

    def encode(self, s: str) -> list:
        """<BOS>, the tokens of s.strip(), <EOS>. Never drops a character."""
        if not isinstance(s, str):
            raise TypeError(f"encode() expects str, got {type(s).__name__}")
        return self._core.encode(s, self.bpe_enabled)

    def encode_array(self, s: str):
        """encode(s) as a numpy int32 array: the same ids, without a Python int per id (for long
        texts that is most of the time a list costs)."""
        if not isinstance(s, str):
            raise TypeError(f"encode_array() expects str, got {type(s).__name__}")
        return self._core.encode_array(s, self.bpe_enabled)

    def decode(self, ids) -> str:
        """Text of ids: <BOS>/<PAD> skipped, stop at <EOS>, whitespace runs collapsed, stripped."""
        if isinstance(ids, (str, bytes)):
            raise TypeError(f"decode() expects a sequence of int token ids, got {type(ids).__name__}")
        return " ".join(_decode_surface(self._core.decode_bytes(ids)).split())

    def stream_decoder(self) -> "StreamDecoder":
        """A decoder for generation: feed(id) -> new text, flush() -> the rest."""
        return StreamDecoder(self)

    def _check_id(self, token_id) -> int:
        try:
            tid = operator.index(token_id)
        except TypeError:
            raise TypeError(f"token ids are int, got {type(token_id).__name__}") from None
        if not 0 <= tid < len(self.tokens):
            raise TokenizerError(f"token id {tid} is outside the vocabulary (size {len(self.tokens)}); "
                                 f"decode only ids this tokenizer produced")
        return tid

    # ------------------------------------------------------------------------------------------
    # growth

    def growth_due(self, lines) -> bool:
        """Whether maybe_enable_bpe or maybe_retrain_bpe would train on `lines` now (cheap: it
        only counts characters)."""
        total = sum(len(x) for x in _check_lines(lines))
        if not self.bpe_enabled:
            return total >= self.enable_bpe_after_chars
        return total - self.trained_chars >= self.bpe_retrain_every_chars

    def maybe_enable_bpe(self, lines) -> TokenizerUpdate | None:
        """Train BPE and switch to BPE mode once the corpus has enable_bpe_after_chars characters
        (counted as sum(len(line)), as the original does). None when nothing happened."""
        lines = _check_lines(lines)
        total = sum(len(x) for x in lines)
        if self.bpe_enabled or total < self.enable_bpe_after_chars:
            return None
        update = self._train(lines, self.bpe_num_merges, "enable_bpe")
        self.bpe_enabled = True
        self.version = next(_VERSIONS)
        self.trained_chars = total
        return update

    def maybe_retrain_bpe(self, lines) -> TokenizerUpdate | None:
        """Retrain the merges once bpe_retrain_every_chars new characters arrived since the last
        training (BPE mode only). None when nothing happened."""
        lines = _check_lines(lines)
        if not self.bpe_enabled:
            return None
        total = sum(len(x) for x in lines)
        if total - self.trained_chars < self.bpe_retrain_every_chars:
            return None
        update = self._train(lines, self.bpe_num_merges, "retrain_bpe")
        self.trained_chars = total
        return update

    def train_bpe(self, lines, num_merges: int | None = None) -> TokenizerUpdate:
        """Train merges now (replacing the merge list, keeping every token) and enable BPE mode."""
        lines = _check_lines(lines)
        n = self.bpe_num_merges if num_merges is None else num_merges
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise TokenizerError(f"num_merges must be a non-negative int, got {n!r}")
        update = self._train(lines, n, "train_bpe")
        self.bpe_enabled = True
        self.version = next(_VERSIONS)
        self.trained_chars = sum(len(x) for x in lines)
        return update

    def extend_bpe(self, lines, num_merges: int) -> TokenizerUpdate:
        """Append up to num_merges merges learned on `lines` as the current merges segment them
        (BPE mode only). The existing merges keep their ranks and ids, so text segments as
        before except where a new merge joins two of its tokens: the model's rows keep their
        meaning, and only the new tokens need rows (growth after training)."""
        lines = _check_lines(lines)
        if not self.bpe_enabled:
            raise TokenizerError("extend_bpe needs BPE mode; enable it first (maybe_enable_bpe or train_bpe)")
        if isinstance(num_merges, bool) or not isinstance(num_merges, int) or num_merges < 0:
            raise TokenizerError(f"num_merges must be a non-negative int, got {num_merges!r}")
        old = len(self.tokens)
        try:
            added = self._core.train(lines, num_merges, self._merged_id, True)
            self._merges = self._merges + [tuple(m) for m in added]
        finally:
            self._sync_core()
        self.trained_chars = sum(len(x) for x in lines)
        return TokenizerUpdate("extend_bpe", old, len(self.tokens), len(self._merges))

    def enable_byte_fallback(self) -> TokenizerUpdate | None:
        """Append the byte tokens (if missing) so that every string encodes. None if present."""
        if self.byte_fallback:
            return None
        old = len(self.tokens)
        self._add_byte_tokens()
        self._sync_core()
        return TokenizerUpdate("byte_fallback", old, len(self.tokens), len(self._merges))

    def _merged_id(self, left: int, right: int) -> int:
        """The token of the merge (left, right): an existing token with the same bytes and
        end-of-word flag, else a new one appended at the end of the vocabulary."""
        if right == EOW:
            surface, eow = self._surface[left], True
        else:
            surface, eow = self._surface[left] + self._surface[right], self._eow[right]
        tid = self._index.get((surface, eow))
        if tid is None:
            tid = self._append(_display(surface, eow), surface, eow, MERGED)
        return tid

    def _train(self, lines, num_merges, event) -> TokenizerUpdate:
        old = len(self.tokens)
        try:
            merges = self._core.train(lines, num_merges, self._merged_id)
            self._merges = [tuple(m) for m in merges]
        finally:
            self._sync_core()
        return TokenizerUpdate(event, old, len(self.tokens), len(self._merges))

    # ------------------------------------------------------------------------------------------
    # serialization

    def to_dict(self) -> dict:
        """JSON-serializable state; from_dict(to_dict()) is the same tokenizer. (A tokenizer
        born on text with lone surrogates needs json.dumps' default ensure_ascii=True.)"""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokens": list(self.tokens),
            "token_bytes": [s.hex() for s in self._surface],
            "token_kinds": "".join(self._kind),
            "token_eow": [i for i, e in enumerate(self._eow) if e],
            "merges": [list(m) for m in self._merges],
            "bpe_enabled": self.bpe_enabled,
            "byte_fallback": self.byte_fallback,
            "trained_chars": self.trained_chars,
            "enable_bpe_after_chars": self.enable_bpe_after_chars,
            "bpe_num_merges": self.bpe_num_merges,
            "bpe_retrain_every_chars": self.bpe_retrain_every_chars,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "EvolvingTokenizer":
        """The tokenizer to_dict() wrote. Everything is checked before it is used, so a loaded
        tokenizer encodes and decodes consistently or is not loaded: a dict to_dict() could
        not have written (a field of the wrong type, a special token missing or doubled, a
        character token whose bytes are not its character's UTF-8, a byte token of more than
        one byte, two tokens with the same bytes and end-of-word flag, byte tokens that do not
        match byte_fallback, a merge whose token is not its two parts joined, an id out of
        range) raises TokenizerError naming the first fault."""
        if not isinstance(d, dict):
            raise TypeError(f"from_dict() expects a dict, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise TokenizerError(f"not a molecule_gpt tokenizer dict (format={d.get('format')!r}); "
                                 f"for the original implementation's checkpoint use from_original()")
        if d.get("format_version") != FORMAT_VERSION:
            raise TokenizerError(f"tokenizer format_version {d.get('format_version')!r} is not supported "
                                 f"(this molecule_gpt reads version {FORMAT_VERSION}); upgrade molecule_gpt")
        missing = [k for k in _DICT_FIELDS if k not in d]
        if missing:
            raise _corrupt(f"it lacks the field(s) {', '.join(missing)}")
        tokens, hexes, kinds = d["tokens"], d["token_bytes"], d["token_kinds"]
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise _corrupt("'tokens' must be a list of str (the display string of each id)")
        if not isinstance(hexes, list) or not all(isinstance(h, str) for h in hexes):
            raise _corrupt("'token_bytes' must be a list of str (the hex of each id's bytes)")
        if isinstance(kinds, list) and all(isinstance(k, str) and len(k) == 1 for k in kinds):
            kinds = "".join(kinds)
        if not isinstance(kinds, str):
            raise _corrupt(f"'token_kinds' must be a str of one letter per id ({CHAR}, {SPECIAL}, {BYTE} or {MERGED}), "
                           f"got {type(kinds).__name__}")
        if not (len(tokens) == len(hexes) == len(kinds)):
            raise TokenizerError("tokens, token_bytes and token_kinds differ in length")
        n = len(tokens)
        eow_list = d["token_eow"]
        if not isinstance(eow_list, list) or not all(type(i) is int and 0 <= i < n for i in eow_list):
            raise _corrupt(f"'token_eow' must be a list of token ids in [0, {n})")
        for name in ("bpe_enabled", "byte_fallback"):
            if not isinstance(d[name], bool):
                raise _corrupt(f"{name!r} must be true or false, got {d[name]!r}")
        trained = d["trained_chars"]
        if type(trained) is not int or trained < 0:
            raise _corrupt(f"'trained_chars' must be a non-negative int, got {trained!r}")
        self = cls.__new__(cls)
        self._init_empty(None, d["enable_bpe_after_chars"], d["bpe_num_merges"], d["bpe_retrain_every_chars"])
        eow_ids = set(eow_list)
        for i, (display, hx, kind) in enumerate(zip(tokens, hexes, kinds)):
            self._append(display, _token_surface(i, display, hx, kind, i in eow_ids, self._index), i in eow_ids, kind)
        specials = [(t, i) for i, (t, k) in enumerate(zip(tokens, kinds)) if k == SPECIAL]
        for name in (PAD, BOS, EOS):
            found = sum(t == name for t, _ in specials)
            if found != 1:
                raise _corrupt(f"it must hold the special token {name} exactly once, found {found}")
        ids = dict(specials)  # (a merged token may display as "<PAD>": only special ones count)
        self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
        byte_tokens = BYTE in kinds
        if d["byte_fallback"] != byte_tokens:
            raise _corrupt(f"byte_fallback is {d['byte_fallback']} but the vocabulary "
                           f"{'holds' if byte_tokens else 'has no'} byte tokens")
        if byte_tokens:
            absent = [b for b in _UTF8_BYTES if (bytes([b]), False) not in self._index]
            if absent:
                raise _corrupt(f"byte_fallback is true but no token spells the byte(s) "
                               f"{', '.join(f'0x{b:02X}' for b in absent[:5])}{' ...' if len(absent) > 5 else ''}")
        merges = d["merges"]
        if not isinstance(merges, list):
            raise _corrupt("'merges' must be a list of [left, right, merged] id triples")
        for k, triple in enumerate(merges):
            self._merges.append(self._checked_merge(k, triple))
        self.bpe_enabled = d["bpe_enabled"]
        self.byte_fallback = d["byte_fallback"]
        self.trained_chars = trained
        self._sync_core()
        return self

    def _checked_merge(self, k: int, triple) -> tuple:
        """Merge number k of a dict as (left, right, merged), or TokenizerError: the merged
        token's bytes are the left token's then the right token's and it ends a word as the
        right one does (right EOW: the left token's bytes, ending a word)."""
        if not (isinstance(triple, (list, tuple)) and len(triple) == 3 and all(type(x) is int for x in triple)):
            raise _corrupt(f"merge {k} is {triple!r}, not a [left, right, merged] triple of int ids")
        a, b, m = triple
        n = len(self.tokens)
        if not (0 <= a < n and (b == EOW or 0 <= b < n) and 0 <= m < n):
            raise _corrupt(f"merge {k} {[a, b, m]} refers to a token outside the vocabulary (size {n})")
        for t in (a, b, m):
            if t != EOW and self._kind[t] == SPECIAL:
                raise _corrupt(f"merge {k} {[a, b, m]} uses the special token {self.tokens[t]}")
        if self._eow[a]:
            raise _corrupt(f"merge {k} {[a, b, m]}: its left token {a} ({self.tokens[a]!r}) ends a word, so no pair "
                           f"starts with it")
        want = (self._surface[a], True) if b == EOW else (self._surface[a] + self._surface[b], self._eow[b])
        if (self._surface[m], self._eow[m]) != want:
            raise _corrupt(f"merge {k} {[a, b, m]}: token {m} is {self._surface[m]!r}"
                           f"{' ending a word' if self._eow[m] else ''}, but joining token {a} and "
                           f"{'the end-of-word marker' if b == EOW else f'token {b}'} gives {want[0]!r}"
                           f"{' ending a word' if want[1] else ''}")
        return a, b, m

    @classmethod
    def from_original(cls, obj: dict, config: Config | None = None, *, byte_fallback: bool = True,
                      **thresholds) -> "EvolvingTokenizer":
        """Build from the original implementation's checkpoint "tokenizer" object (keys tokens,
        bpe_enabled, merges, trained_chars). Every original token keeps its id, so any string
        of characters the original knew encodes to exactly the original's ids (char and BPE
        mode). byte_fallback=True appends the byte tokens after the original's tokens (a growth
        event: vocab_size exceeds len(obj["tokens"])); False keeps the original vocabulary
        exactly, for reproducing its numbers.

        Original merges that cannot occur here are skipped (rank order kept): those whose
        symbols are not tokens (characters the original never had at birth; we spell those
        in bytes). A merged string ending in "</w>" is read as ending a word."""
        if not isinstance(obj, dict):
            raise TypeError(f"from_original() expects the checkpoint's 'tokenizer' dict, got {type(obj).__name__}")
        try:
            tokens = list(obj["tokens"])
            merges = list(obj.get("merges") or [])
            bpe_enabled = bool(obj.get("bpe_enabled", False))
            trained_chars = int(obj.get("trained_chars", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise TokenizerError(f"original tokenizer object is missing or has a bad field: {e}") from None
        for name in (PAD, BOS, EOS):
            if tokens.count(name) != 1:
                raise TokenizerError(f"original tokenizer must hold {name} exactly once, found {tokens.count(name)}")
        n_chars = tokens.index(PAD)
        if tokens[n_chars:n_chars + 3] != [PAD, BOS, EOS]:
            raise TokenizerError("original tokenizer must list <PAD>, <BOS>, <EOS> right after its characters")
        self = cls.__new__(cls)
        self._init_empty(config, thresholds.pop("enable_bpe_after_chars", None), thresholds.pop("bpe_num_merges", None),
                         thresholds.pop("bpe_retrain_every_chars", None))
        if thresholds:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(thresholds))}")
        for i, t in enumerate(tokens):
            if not isinstance(t, str):
                raise TokenizerError(f"original token {i} is not a string: {t!r}")
            if i < n_chars:
                if len(t) != 1:
                    raise TokenizerError(f"original token {i} ({t!r}) should be a single character")
                self._append(t, t.encode("utf-8", "surrogatepass"), False, CHAR)
            elif i < n_chars + 3:
                self._append(t, b"", False, SPECIAL)
            else:
                if len(t) < 2:
                    raise TokenizerError(f"original merged token {i} ({t!r}) is shorter than two characters")
                eow = t.endswith(MARKER) and len(t) > len(MARKER)
                text = t[:-len(MARKER)] if eow else t
                self._append(t, text.encode("utf-8", "surrogatepass"), eow, MERGED)
        self.pad_id, self.bos_id, self.eos_id = n_chars, n_chars + 1, n_chars + 2
        stoi = {t: i for i, t in enumerate(tokens)}
        for pair in merges:
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise TokenizerError(f"original merge {pair!r} is not a [left, right] pair of strings")
            a, b = pair
            ia, im = stoi.get(a), stoi.get(a + b)
            ib = EOW if b == MARKER else stoi.get(b)
            if ia is None or ib is None or im is None:
                continue
            if SPECIAL in (self._kind[ia], self._kind[im]) or (ib != EOW and self._kind[ib] == SPECIAL):
                continue
            self._merges.append((ia, ib, im))
        self.bpe_enabled = bpe_enabled
        self.trained_chars = trained_chars
        if byte_fallback:
            self._add_byte_tokens()
        self._sync_core()
        return self

    def __repr__(self):
        mode = f"bpe, {len(self._merges)} merges" if self.bpe_enabled else "char"
        return f"EvolvingTokenizer(vocab_size={self.vocab_size}, {mode}, byte_fallback={self.byte_fallback})"


class StreamDecoder:
    """Incremental decode for generation: the texts returned by feed() and then flush(),
    concatenated, equal tokenizer.decode(ids). Never returns part of a UTF-8 character: bytes
    of an unfinished character are held until it completes (or flush() ends the stream).
    Whitespace is collapsed and stripped as decode() does, so a trailing space is only
    emitted once a non-space character follows it. After <EOS>, feed() returns ""."""

    def __init__(self, tokenizer: EvolvingTokenizer):
        self._tok = tokenizer
        self.reset()

    def reset(self) -> None:
        self._pending = b""       # bytes of an unfinished UTF-8 sequence
        self._started = False     # some non-space text was emitted (strip the left side)
        self._space = False       # whitespace seen after text, not yet emitted
        self.done = False         # <EOS> was fed

    def feed(self, token_id) -> str:
        """The text that is final after one more token."""
        return self.feed_many((self._tok._check_id(token_id),))

    def feed_many(self, token_ids) -> str:
        """What feed() returns for each of token_ids in turn, concatenated, in one pass (a batch
        of sequences advances many tokens a step). On an id outside the vocabulary, raises
        TokenizerError and feeds none of them."""
        tok = self._tok
        ids = list(token_ids)
        try:
            end = ids.index(tok.eos_id)
        except ValueError:
            end = len(ids)
        data = tok._core.decode_bytes(ids[:end])  # checks the ids; skips <BOS> and <PAD>
        for tid in ids[end + 1:]:
            tok._check_id(tid)
        if self.done:
            return ""
        data = self._pending + data
        if end < len(ids):  # <EOS>: everything held comes out
            self._pending = data
            self.done = True
            return self._drain()
        cut = _complete_prefix(data)
        self._pending = data[cut:]
        return self._collapse(_decode_surface(data[:cut]))

    def flush(self) -> str:
        """The held bytes (an unfinished character decodes to U+FFFD); then start afresh."""
        text = self._drain()
        self.reset()
        return text

    def _drain(self) -> str:
        data, self._pending = self._pending, b""
        return self._collapse(_decode_surface(data)) if data else ""

    def _collapse(self, text: str) -> str:
        out = []
        for part in _WS_RUNS.split(text):
            if not part:
                continue
            if part[0].isspace():
                self._space = self._started
            else:
                if self._space:
                    out.append(" ")
                    self._space = False
                out.append(part)
                self._started = True
        return "".join(out)


def _complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of data that does not end inside a UTF-8 sequence that the
    next bytes could still complete. Decoding at that cut gives what decoding all at once does."""
    n = len(data)
    for back in (1, 2, 3):
        if back > n:
            break
        b = data[n - back]
        if b & 0xC0 == 0x80:          # continuation byte: look further back for the lead
            continue
        need = 2 if 0xC2 <= b <= 0xDF else 3 if 0xE0 <= b <= 0xEF else 4 if 0xF0 <= b <= 0xF4 else 1
        return n - back if need > back else n
    return n


# ----------------------------------------------------------------------------------------------
# _PyCore: the pure-Python twin of _bpe.BPECore (same methods, same results, much slower).


class _PyCore:
    def __init__(self, cache_words: int = 65536):
        self.cache_hits = self.cache_misses = self.cache_resets = self.cache_size = 0
        self._chars, self._byte_ids, self._surfaces = {}, [-1] * 256, []
        self._ranks: dict = {}
        self._space = self._bos = self._eos = self._pad = -1

    def set_vocab(self, chars, byte_ids, surfaces, space_id, bos_id, eos_id, pad_id):
        self._chars = {chr(cp): i for cp, i in chars.items()}
        self._byte_ids = list(byte_ids)
        self._surfaces = list(surfaces)
        self._space, self._bos, self._eos, self._pad = space_id, bos_id, eos_id, pad_id

    def set_merges(self, merges):
        self._ranks = {}
        for rank, (a, b, m) in enumerate(merges):
            self._ranks[(a, b)] = (rank, m)

    def clear_cache(self):
        self.cache_hits = self.cache_misses = self.cache_resets = 0

    def merge_rank(self, a, b):
        return self._ranks.get((a, b))

    def _base(self, ch: str, out: list) -> None:
        t = self._chars.get(ch)
        if t is not None:
            out.append(t)
            return
        for byte in ch.encode("utf-8", "surrogatepass"):
            t = self._byte_ids[byte]
            if t < 0:
                raise TokenizerError(
                    f"character {ch!r} (U+{ord(ch):04X}) has no token and this tokenizer has no byte tokens "
                    f"to spell it; call enable_byte_fallback() once (it appends the byte tokens and returns "
                    f"the new vocabulary size) so that every string encodes")
            out.append(t)

    def _apply_merges_memview(self, symbols, method="auto"):
        if method not in ("naive", "heap", "auto"):
            raise ValueError(f"method must be 'naive', 'heap' or 'auto', got {method!r}")
        s = list(symbols)
        while len(s) > 1:
            best, bi = None, -1
            for i in range(len(s) - 1):
                r = self._ranks.get((s[i], s[i + 1]))
                if r is not None and (best is None or r[0] < best[0]):
                    best, bi = r, i
            if best is None:
                break
            s[bi:bi + 2] = [best[1]]
        return s

    def encode(self, text: str, bpe: bool) -> list:
        text = text.strip()
        out = [self._bos]
        if not bpe:
            for ch in text:
                self._base(ch, out)
        else:
            for wi, word in enumerate(text.split()):
                if wi:
                    if self._space < 0:
                        raise TokenizerError("there is no token for the space between words; call enable_byte_fallback()")
                    out.append(self._space)
                syms: list = []
                for ch in word:
                    self._base(ch, syms)
                syms.append(EOW)
                out.extend(t for t in self._apply_merges_memview(syms) if t != EOW)
        out.append(self._eos)
        return out

    def encode_array(self, text: str, bpe: bool):
        import numpy as np
        return np.asarray(self.encode(text, bpe), dtype=np.int32)

    def decode_bytes(self, ids) -> bytes:
        parts = []
        n = len(self._surfaces)
        for obj in ids:
            t = operator.index(obj)
            if not 0 <= t < n:
                raise TokenizerError(f"token id {t} is outside the vocabulary (size {n}); "
                                     f"decode only ids this tokenizer produced")
            if t == self._eos:
                break
            if t != self._bos and t != self._pad:
                parts.append(self._surfaces[t])
        return b"".join(parts)

    def train(self, lines, num_merges, merged_id, segmented=False):
        """design.md §1 as written: recount all pairs each round (ties: first met in word order)."""
        vocab: Counter = Counter()
        for line in lines:
            for word in line.split():
                syms: list = []
                for ch in word:
                    self._base(ch, syms)
                syms.append(EOW)
                vocab[tuple(self._apply_merges_memview(syms) if segmented else syms)] += 1
        merges = []
        for _ in range(num_merges):
            pairs: dict = {}
            for syms, freq in vocab.items():
                for i in range(len(syms) - 1):
                    pairs[syms[i], syms[i + 1]] = pairs.get((syms[i], syms[i + 1]), 0) + freq
            if not pairs:
                break
            a, b = max(pairs, key=pairs.__getitem__)
            m = merged_id(a, b)
            merges.append((a, b, m))
            new_vocab: Counter = Counter()
            for syms, freq in vocab.items():
                out, i = [], 0
                while i < len(syms):
                    if i + 1 < len(syms) and syms[i] == a and syms[i + 1] == b:
                        out.append(m)
                        i += 2
                    else:
                        out.append(syms[i])
                        i += 1
                new_vocab[tuple(out)] += freq
            vocab = new_vocab
        return merges
