"""Fuzz target: tokenizer documents (EvolvingTokenizer.from_dict on mutated to_dict() output).

What it is: `fuzz_one(data)` takes the to_dict() of one of four tokenizers (characters only;
BPE with merges; BPE without byte fallback; non-ASCII text with a lone surrogate), mutates it
as `data` chooses and loads it. Mutations are of two kinds: hostile values anywhere in the
document (fuzz_common.mutate_json), and edits that keep the document plausible so the checks
behind the type checks run: two ids swapped consistently, a character token replaced, a merge
added whose token is its parts joined (a new token or an existing one), merges reordered or
dropped, a token removed with the ids after it renumbered, hex spelled with upper case or
spaces, a word-end flag moved, a token doubled.

The contract checked (tokenizer.py's docstring: "a loaded tokenizer round-trips or the document
is rejected with TokenizerError"): from_dict raises TokenizerError, or it returns a tokenizer
for which, on a dozen strings (fixed ones, pieces of its own vocabulary, text from `data`):
- decode(encode(s)) == " ".join(s.split()), every id in range; without byte fallback encode
  may instead raise TokenizerError (a character outside the vocabulary);
- a StreamDecoder fed the ids one by one, then flushed, gives decode(ids) (its docstring);
- the compiled core and the pure-Python twin (_PyCore) encode alike, where the extension is
  built: this is the only check that reaches the Cython merge code, which atheris cannot see;
- from_dict(to_dict()) of the loaded tokenizer writes the same document again.

What it is not: a test of BPE training (tests/test_tokenizer_bpe.py) or of the original
checkpoint import (from_original).

Run: `python tests/fuzz/fuzz_tokenizer.py` (atheris when installed, see README.md).
"""
from __future__ import annotations

import copy
import sys

import fuzz_common
from fuzz_common import Choices, FuzzFailure, mutate_json

with fuzz_common.instrumented():
    from molecule_gpt import tokenizer as tokmod
    from molecule_gpt.errors import TokenizerError
    from molecule_gpt.tokenizer import EvolvingTokenizer

LINES = ["the cat sat on the mat.", "a dog ate the bone, then the dog slept.", "the end is near; the end is here!",
         "then the cat and the dog sat on the mat together.", "</w> <PAD> is text too"]
UNICODE = ["caf\u00e9 na\u00efve \u00e9t\u00e9", "\u65e5\u672c\u8a9e\u306e\u6587 \u65e5\u672c", "snow \u2603 and \U0001f600\U0001f600",
           "half \ud800 pair", "tab\tand\u00a0nbsp \u2028 sep"]
STRINGS = ["", " ", "the cat", "the cat sat on the mat.", "  spaced   out\tline\n", "the end is here! the dog",
           "caf\u00e9 \u2603 \U0001f600", "</w></w> <PAD><BOS><EOS>", "\x00\x01\x7f", "\ud800 lone \udfff",
           "\u65e5\u672c\u8a9e", "thethethe cat", "x" * 300]

_BASES: dict[str, dict] = {}


def bases() -> dict[str, dict]:
    """name -> to_dict() of an intact tokenizer."""
    if not _BASES:
        chars = EvolvingTokenizer(LINES)
        bpe = EvolvingTokenizer(LINES)
        bpe.train_bpe(LINES * 3, num_merges=40)
        strict = EvolvingTokenizer(LINES, byte_fallback=False)
        strict.train_bpe(LINES, num_merges=12)
        uni = EvolvingTokenizer(UNICODE)
        uni.train_bpe(UNICODE * 2, num_merges=20)
        for name, tok in (("chars", chars), ("bpe", bpe), ("strict", strict), ("unicode", uni)):
            _BASES[name] = tok.to_dict()
    return _BASES


# ---------------------------------------------------------------------------------------------
# mutations that keep the document plausible


def _renumber(d: dict, mapping) -> None:
    """Apply an id mapping (old id -> new id, or None: gone) to token_eow and merges."""
    d["token_eow"] = [mapping(i) for i in d["token_eow"] if mapping(i) is not None]
    merges = []
    for a, b, m in d["merges"]:
        na, nm = mapping(a), mapping(m)
        nb = b if b == tokmod.EOW else mapping(b)
        if None not in (na, nb, nm):
            merges.append([na, nb, nm])
    d["merges"] = merges


def _kinds(d: dict) -> list:
    return list(d["token_kinds"])


def _set_token(d: dict, i: int, display: str, hx: str, kind: str) -> None:
    kinds = _kinds(d)
    d["tokens"][i], d["token_bytes"][i], kinds[i] = display, hx, kind
    d["token_kinds"] = "".join(kinds)


def plausible(d: dict, ch: Choices) -> dict:
    n = len(d["tokens"])
    kinds = _kinds(d)
    if n < 2 or len(kinds) != n or len(d["token_bytes"]) != n:
        return d  # already broken beyond what these edits assume
    op = ch.below(12)
    if op == 0:  # two ids swapped everywhere
        i, j = ch.below(n), ch.below(n)
        for key in ("tokens", "token_bytes"):
            d[key][i], d[key][j] = d[key][j], d[key][i]
        kinds[i], kinds[j] = kinds[j], kinds[i]
        d["token_kinds"] = "".join(kinds)
        _renumber(d, lambda t: j if t == i else i if t == j else t)
    elif op == 1:  # a character token becomes another character (maybe one already there)
        chars = [i for i, k in enumerate(kinds) if k == "c"]
        if chars:
            c = chr(ch.pick([0x41, 0x7A, 0x20, 0x0A, 0xE9, 0x2603, 0x1F600, 0xD800, 0, 0x7F, 0x85, 0xFFFD]))
            _set_token(d, ch.pick(chars), c, c.encode("utf-8", "surrogatepass").hex(), "c")
    elif op == 2:  # a merge that to_dict could have written: its token is its parts joined
        usable = [i for i, k in enumerate(kinds) if k != "s"]
        if not usable:
            return d
        eow = set(d["token_eow"])
        a = ch.pick([i for i in usable if i not in eow] or usable)
        b = tokmod.EOW if ch.chance(25) else ch.pick(usable)
        surface = bytes.fromhex(d["token_bytes"][a]) + (b"" if b == tokmod.EOW else bytes.fromhex(d["token_bytes"][b]))
        ends = b == tokmod.EOW or b in eow
        same = [i for i in usable if bytes.fromhex(d["token_bytes"][i]) == surface and (i in eow) == ends]
        if same:
            m = same[0]
        else:
            m = n
            d["tokens"].append(surface.decode("utf-8", "replace") + ("</w>" if ends else ""))
            d["token_bytes"].append(surface.hex())
            d["token_kinds"] = "".join(kinds) + "m"
            if ends:
                d["token_eow"].append(m)
        d["merges"].insert(ch.below(len(d["merges"]) + 1), [a, b, m])
    elif op == 3:  # merges reordered, dropped, doubled
        merges = d["merges"]
        sub = ch.below(4)
        if sub == 0:
            merges.reverse()
        elif sub == 1 and merges:
            del merges[ch.below(len(merges))]
        elif sub == 2 and merges:
            merges.insert(ch.below(len(merges) + 1), list(merges[ch.below(len(merges))]))
        else:
            for k in range(len(merges) - 1, 0, -1):
                j = ch.below(k + 1)
                merges[k], merges[j] = merges[j], merges[k]
    elif op == 4:  # a token removed, the ids after it renumbered
        i = ch.below(n)
        for key in ("tokens", "token_bytes"):
            del d[key][i]
        del kinds[i]
        d["token_kinds"] = "".join(kinds)
        _renumber(d, lambda t: None if t == i else t - 1 if t > i else t)
    elif op == 5:  # hex as bytes.fromhex also reads it: upper case, spaces between bytes
        i = ch.below(n)
        hx = d["token_bytes"][i]
        d["token_bytes"][i] = ch.pick([hx.upper(), " ".join(hx[k:k + 2] for k in range(0, len(hx), 2)), " " + hx,
                                       hx + " ", hx + "0", hx[:-1]])
    elif op == 6:  # a word-end flag added or removed
        i = ch.below(n)
        eow = d["token_eow"]
        if i in eow:
            eow.remove(i)
        else:
            eow.append(i)
    elif op == 7:  # a token doubled
        i = ch.below(n)
        d["tokens"].append(d["tokens"][i] + ch.pick(["", "x"]))
        d["token_bytes"].append(d["token_bytes"][i])
        d["token_kinds"] = "".join(kinds) + ch.pick([kinds[i], "m"])
    elif op == 8:  # kinds as a list of letters (from_dict reads that too)
        d["token_kinds"] = kinds
    elif op == 9:  # a merged token no merge makes
        s = ch.take(1 + ch.below(6)) or b"zz"
        d["tokens"].append(s.decode("utf-8", "replace"))
        d["token_bytes"].append(s.hex())
        d["token_kinds"] = "".join(kinds) + "m"
    elif op == 10:
        d["bpe_enabled"] = not d["bpe_enabled"]
    else:  # a merge id pointing elsewhere
        if d["merges"]:
            k = ch.below(len(d["merges"]))
            d["merges"][k][ch.below(3)] = ch.pick([0, n - 1, n, -1, -2, ch.below(n)])
    return d


FIELDS = ("tokens", "token_bytes", "token_kinds", "token_eow", "merges", "bpe_enabled", "byte_fallback",
          "trained_chars", "enable_bpe_after_chars", "bpe_num_merges", "bpe_retrain_every_chars", "format",
          "format_version")


def mutate(d: dict, ch: Choices) -> dict:
    for _ in range(1 + ch.below(3)):
        if ch.chance(65):
            try:
                d = plausible(d, ch)
            except (ValueError, TypeError, IndexError, KeyError, AttributeError):
                break  # an earlier edit made the document too odd for this one: keep it as it is
        else:
            d = mutate_json(d, ch, times=1, prefer=(ch.pick(FIELDS),))
        if not isinstance(d, dict) or not all(isinstance(d.get(k), list) for k in ("tokens", "token_bytes",
                                                                                    "token_eow", "merges")) \
                or not all(isinstance(x, str) for x in d["tokens"] + d["token_bytes"]) \
                or not all(isinstance(m, list) and len(m) == 3 for m in d["merges"]) \
                or not isinstance(d.get("token_kinds"), (str, list)):
            break  # not plausible any more: no further edits of the plausible kind
    return d if isinstance(d, dict) else {"tokens": d}  # from_dict's contract is about dicts


# ---------------------------------------------------------------------------------------------
# the target


def strings(tok: EvolvingTokenizer, ch: Choices) -> list[str]:
    out = list(STRINGS)
    merged = [i for i in range(tok.vocab_size) if tok._kind[i] in ("m", "c")]
    for _ in range(2):  # runs of the tokenizer's own pieces, so merges apply
        if merged:
            parts = [tok._surface[ch.pick(merged)] + (b" " if ch.chance(30) else b"") for _ in range(1 + ch.below(8))]
            out.append(b"".join(parts).decode("utf-8", "replace"))
    out.append(ch.take(64).decode("utf-8", "replace"))
    return out


def check(tok: EvolvingTokenizer, ch: Choices) -> None:
    twin = None
    if tokmod.HAVE_EXTENSION:  # the same tables in the pure-Python core
        twin = copy.copy(tok)
        twin._core = tokmod._PyCore()
        twin._sync_core()
    for s in strings(tok, ch):
        try:
            ids = tok.encode(s)
        except TokenizerError:
            if tok.byte_fallback:
                raise FuzzFailure(f"encode({s!r}) raised TokenizerError although byte_fallback is on")
            continue
        if not all(type(i) is int and 0 <= i < tok.vocab_size for i in ids):
            raise FuzzFailure(f"encode({s!r}) gave ids outside [0, {tok.vocab_size}): {ids}")
        text = tok.decode(ids)
        if text != " ".join(s.split()):
            raise FuzzFailure(f"decode(encode({s!r})) == {text!r}, ids {ids}")
        stream = tok.stream_decoder()
        streamed = "".join(stream.feed(i) for i in ids) + stream.flush()
        if streamed != text:
            raise FuzzFailure(f"StreamDecoder gave {streamed!r}, decode {text!r}, ids {ids}")
        if twin is not None and twin.encode(s) != ids:
            raise FuzzFailure(f"the compiled core encodes {s!r} as {ids}, the Python twin as {twin.encode(s)}")
    # arbitrary ids too: the stream decoder promises decode()'s text for any sequence
    ids = [ch.below(tok.vocab_size) for _ in range(ch.below(24))]
    stream = tok.stream_decoder()
    streamed = "".join(stream.feed(i) for i in ids) + stream.flush()
    if streamed != tok.decode(ids):
        raise FuzzFailure(f"StreamDecoder gave {streamed!r}, decode {tok.decode(ids)!r}, ids {ids}")
    doc = tok.to_dict()
    if EvolvingTokenizer.from_dict(doc).to_dict() != doc:
        raise FuzzFailure("from_dict(to_dict()) of a loaded tokenizer writes another document")


def fuzz_one(data: bytes) -> str:
    ch = Choices(data)
    name = ch.pick(["chars", "bpe", "strict", "unicode"])
    d = mutate(copy.deepcopy(bases()[name]), ch)
    try:
        tok = EvolvingTokenizer.from_dict(d)
    except TokenizerError as exc:
        return f"TokenizerError: {str(exc).split(';')[0][:60]}"
    except Exception as exc:
        raise FuzzFailure(f"from_dict raised {type(exc).__name__}: {exc}") from exc
    try:
        check(tok, ch)
    except FuzzFailure:
        raise
    except Exception as exc:
        raise FuzzFailure(f"a loaded tokenizer raised {type(exc).__name__}: {exc}") from exc
    return f"{name}: loaded, {'bpe' if tok.bpe_enabled else 'chars'}"


if __name__ == "__main__":
    bases()
    sys.exit(fuzz_common.main(fuzz_one))
