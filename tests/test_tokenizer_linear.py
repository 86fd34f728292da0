"""Long words in linear time: the rank buckets (monotone merge tables) and the cuts between base
symbols no merge can join, against the reference (merges applied in rank order, lowest rank
first, leftmost on ties) and against the heap kernel (itself checked against the reference in
test_tokenizer_bpe.py) where the reference is too slow; adversarial no-space input; tokenizer
growth; the numpy encode.

Hypothesis examples per property: MOLECULE_GPT_HYPOTHESIS_EXAMPLES (default 150).
"""
import os
import random
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpe_reference import ReferenceTokenizer
from molecule_gpt.tokenizer import EOW, HAVE_EXTENSION, EvolvingTokenizer, _PyCore

EXAMPLES = int(os.environ.get("MOLECULE_GPT_HYPOTHESIS_EXAMPLES", "150"))
HYP = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

needs_ext = pytest.mark.skipif(not HAVE_EXTENSION, reason="molecule_gpt._bpe is not built (or MOLECULE_GPT_PUREPYTHON=1)")


def doc_lines():
    import argparse, collections, json, pathlib, re, string, textwrap
    out = []
    for mod in (collections, json, re, string, textwrap, argparse, pathlib):
        out += [ln for ln in (mod.__doc__ or "").splitlines() if ln.strip()]
    return out


def monotone_table(rng, n_base, n_merges, eow=True):
    """A merge table as training makes them: each merge's token is new, built from symbols
    that exist before it (so every pair containing it ranks later). Pairs of equal symbols
    (runs) and the end-of-word marker are frequent on purpose."""
    merges, symbols, nxt, used = [], list(range(n_base)), n_base, set()
    for _ in range(n_merges):
        for _ in range(20):
            a = rng.choice(symbols[-6:] if rng.random() < 0.5 else symbols)
            b = a if rng.random() < 0.25 else (EOW if eow and rng.random() < 0.15 else rng.choice(symbols))
            if (a, b) not in used:
                break
        else:
            continue
        used.add((a, b))
        merges.append((a, b, nxt))
        symbols.append(nxt)
        nxt += 1
    return merges


def any_table(rng, n_base, n_merges):
    """Any table: pairs listed twice (the last rank wins), products reused by several pairs,
    products that are base symbols or that appear in earlier merges (not monotone)."""
    merges = []
    symbols = list(range(n_base))
    nxt = n_base
    for _ in range(n_merges):
        a = rng.choice(symbols)
        b = rng.choice(symbols + [EOW])
        r = rng.random()
        m = rng.choice(symbols) if r < 0.2 else nxt
        merges.append((a, b, m))
        if rng.random() < 0.15:
            merges.append(rng.choice(merges))
        if m == nxt:
            symbols.append(nxt)
            nxt += 1
    return merges


def reference_apply(merges, syms):
    ref = ReferenceTokenizer([])
    ref.merges = merges
    return ref.apply_merges(syms)


def core_with(merges):
    from molecule_gpt._bpe import BPECore
    core = BPECore()
    core.set_merges(merges)
    return core


def word(rng, n_base, length, mode):
    if mode == "run":
        return [rng.randrange(n_base)] * length
    if mode == "period":
        unit = [rng.randrange(n_base) for _ in range(rng.randint(2, 5))]
        return (unit * (length // len(unit) + 1))[:length]
    return [rng.randrange(n_base) for _ in range(length)]


def monotone_case(seed: int, length: int, mode: str) -> tuple[list, list]:
    """A random monotone merge table of 1-4 base symbols and up to 40 merges, and a word of
    `length` base symbols in `mode`, with the end-of-word marker 7 times in 10."""
    rng = random.Random(seed)
    n_base = rng.randint(1, 4)
    merges = monotone_table(rng, n_base, rng.randint(0, 40))
    return merges, word(rng, n_base, length, mode) + ([EOW] if rng.random() < 0.7 else [])


# ----------------------------------------------------------------------------------------------
# kernels == reference


@needs_ext
@HYP
@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 160), st.sampled_from(["random", "run", "period"]))
def test_bucket_kernel_equals_reference_on_monotone_tables(seed, length, mode):
    merges, syms = monotone_case(seed, length, mode)
    core = core_with(merges)
    assert core.monotone_merges
    expected = reference_apply(merges, syms)
    assert core._apply_merges_memview(syms, "bucket") == expected
    assert core._apply_merges_memview(syms, "cut") == expected
    assert core._apply_merges_memview(syms, "auto") == expected


@needs_ext
@HYP
@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 160), st.sampled_from(["random", "run", "period"]),
       st.integers(1, 48))
def test_window_kernel_equals_reference_on_monotone_tables(seed, length, mode, window):
    """Windows far smaller than the word: many frontiers, windows that find no final token
    (and double), a last window with or without the end-of-word marker."""
    merges, syms = monotone_case(seed, length, mode)
    assert core_with(merges)._apply_merges_memview(syms, "window", window) == reference_apply(merges, syms)


@needs_ext
def test_window_kernel_rejects_bad_arguments():
    core = core_with([(0, 1, 2)])
    with pytest.raises(ValueError, match="at least 1"):
        core._apply_merges_memview([0, 1], "window", 0)
    with pytest.raises(ValueError, match="monotone"):
        core_with([(0, 1, 2), (2, 0, 0)])._apply_merges_memview([0, 1], "window", 4)


@needs_ext
@HYP
@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 160), st.sampled_from(["random", "run", "period"]))
def test_cuts_equal_reference_on_any_table(seed, length, mode):
    rng = random.Random(seed)
    n_base = rng.randint(1, 6)
    merges = any_table(rng, n_base, rng.randint(0, 30))
    core = core_with(merges)
    syms = word(rng, n_base, length, mode) + ([EOW] if rng.random() < 0.7 else [])
    expected = reference_apply(merges, syms)
    assert core._apply_merges_memview(syms, "cut") == expected
    assert core._apply_merges_memview(syms, "auto") == expected
    if core.monotone_merges:
        assert core._apply_merges_memview(syms, "bucket") == expected
    else:
        with pytest.raises(ValueError, match="monotone"):
            core._apply_merges_memview(syms, "bucket")


@needs_ext
def test_non_monotone_tables_are_detected():
    # the product of rank 1 is used by the pair of rank 0: BPE may go back to a lower rank
    assert not core_with([(0, 3, 4), (1, 2, 3)]).monotone_merges
    # a pair listed again later: its product now appears after the merges that use it
    assert not core_with([(0, 1, 5), (5, 2, 6), (0, 1, 5)]).monotone_merges
    # a product that is one of its own parts
    assert not core_with([(0, 1, 0)]).monotone_merges
    assert core_with([(0, 1, 5), (5, 2, 6), (5, 5, 7), (7, EOW, 8)]).monotone_merges
    assert core_with([]).monotone_merges


@needs_ext
def test_junctions():
    core = core_with([(0, 1, 5), (5, 2, 6), (2, 2, 7), (6, EOW, 8)])
    # joined: 0|1, 1|2 (last of 5 is 1, first of 2 is 2), 2|2, 2|</w> (last of 6 is 2)
    for a, b in [(0, 1), (1, 2), (2, 2), (2, EOW), (6, EOW), (5, 2)]:
        assert core.is_junction(a, b), (a, b)
    for a, b in [(1, 0), (2, 0), (0, 2), (1, EOW), (0, 0), (3, 1)]:
        assert not core.is_junction(a, b), (a, b)
    # a product reused by another pair: its parts' end symbols count too
    core = core_with([(0, 1, 5), (3, 4, 5), (5, 2, 6)])
    assert core.is_junction(1, 2) and core.is_junction(4, 2) and not core.is_junction(0, 2)


@needs_ext
@HYP
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from(["random", "run", "period"]), st.booleans())
def test_long_words_all_kernels_agree(seed, mode, monotone):
    """Words far beyond the naive and heap sizes: the reference is too slow there; the heap
    kernel (checked against it elsewhere) is the judge."""
    rng = random.Random(seed)
    n_base = rng.randint(1, 5)
    merges = monotone_table(rng, n_base, rng.randint(1, 60)) if monotone else any_table(rng, n_base, 40)
    core = core_with(merges)
    syms = word(rng, n_base, rng.randint(1025, 6000), mode) + [EOW]
    expected = core._apply_merges_memview(syms, "heap")
    assert core._apply_merges_memview(syms, "auto") == expected
    assert core._apply_merges_memview(syms, "cut") == expected
    if core.monotone_merges:
        assert core._apply_merges_memview(syms, "bucket") == expected
        assert core._apply_merges_memview(syms, "window", rng.randint(2, 700)) == expected


@needs_ext
@pytest.mark.parametrize("seed", range(6))
def test_words_longer_than_a_window_all_kernels_agree(seed):
    """encode's own windows (WINDOW_SYMBOLS) on words of a few windows, and a table that is not
    monotone (no windows: the heap over the whole piece) on a word as long."""
    from molecule_gpt._bpe import WINDOW_SYMBOLS
    rng = random.Random(seed)
    n_base = rng.randint(1, 4)
    monotone = seed % 3 != 2
    merges = monotone_table(rng, n_base, rng.randint(5, 60)) if monotone else any_table(rng, n_base, 40)
    core = core_with(merges)
    assert core.monotone_merges or not monotone
    syms = word(rng, n_base, rng.randint(WINDOW_SYMBOLS + 1, 3 * WINDOW_SYMBOLS), ["run", "period", "random"][seed % 3])
    syms += [EOW]
    expected = core._apply_merges_memview(syms, "heap")
    assert core._apply_merges_memview(syms, "auto") == expected
    assert core._apply_merges_memview(syms, "cut") == expected


# ----------------------------------------------------------------------------------------------
# a trained tokenizer on adversarial text without spaces, and after growth


def _english():
    lines = doc_lines()
    tok = EvolvingTokenizer(lines)
    tok.train_bpe(lines, 300)
    ref = ReferenceTokenizer(lines)
    ref.train_bpe(lines, 300)
    return lines, tok, ref


_LINES, _TOK, _REF = _english()
_LETTERS = sorted(set("".join(_LINES)) - set(" \t\n"))
NO_SPACE = st.one_of(
    st.text(st.sampled_from(_LETTERS), min_size=1, max_size=400),
    st.tuples(st.sampled_from(_LETTERS), st.integers(1, 400)).map(lambda t: t[0] * t[1]),
    st.tuples(st.sampled_from(["the", "of", "and", "ing", "tion", "aab", "😀", "é"]), st.integers(1, 120))
      .map(lambda t: t[0] * t[1]),
    st.text(st.sampled_from("ab"), min_size=1, max_size=400),
)


@needs_ext
def test_trained_table_is_monotone_and_cuts():
    assert _TOK._core.monotone_merges
    # random letters are cut into short pieces: most letter pairs are never joined
    x, q = _TOK.tokens.index("x"), _TOK.tokens.index("q")
    assert not _TOK._core.is_junction(x, q)


@needs_ext
@HYP
@given(NO_SPACE)
def test_no_space_text_equals_reference(s):
    assert _TOK.encode(s) == _REF.encode(s)
    assert _TOK.encode(s + " " + s[::-1]) == _REF.encode(s + " " + s[::-1])


@needs_ext
@HYP
@given(st.integers(0, 2 ** 32 - 1), st.sampled_from(["letters", "letter", "word", "ab"]))
def test_long_no_space_text_all_kernels_agree(seed, mode):
    rng = random.Random(seed)
    n = rng.randint(1100, 20000)
    if mode == "letters":
        s = "".join(rng.choice(_LETTERS) for _ in range(n))
    elif mode == "letter":
        s = rng.choice(_LETTERS) * n
    elif mode == "word":
        s = rng.choice(["the", "and", "ation", "ing", "ss"]) * (n // 3)
    else:
        s = "".join(rng.choice("ab") for _ in range(n))
    core = _TOK._core
    syms = _TOK.encode(s)            # BPE applied by encode (auto)
    base = EvolvingTokenizer.from_dict(_TOK.to_dict())
    base.bpe_enabled = False
    chars = base.encode(s)[1:-1] + [EOW]
    expected = [t for t in core._apply_merges_memview(chars, "heap") if t != EOW]
    assert syms == [_TOK.bos_id] + expected + [_TOK.eos_id]


def rank_passes(merges, syms):
    """BPE under a monotone table, literally: the ranks in increasing order, each replacing the
    occurrences of its pair left to right (a pair listed twice keeps its last rank). Linear per
    rank that applies, so it reaches lengths the rank-rescan reference cannot."""
    eff = {}
    for r, (a, b, m) in enumerate(merges):
        eff[(a, b)] = (r, m)
    out, present = list(syms), set(syms)
    for (a, b), (_, m) in sorted(eff.items(), key=lambda kv: kv[1][0]):
        if a not in present or b not in present:
            continue
        new, i, n = [], 0, len(out)
        while i < n:
            if i + 1 < n and out[i] == a and out[i + 1] == b:
                new.append(m)
                i += 2
            else:
                new.append(out[i])
                i += 1
        if len(new) != n:
            out, present = new, set(new)
    return out


@HYP
@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 120), st.sampled_from(["random", "run", "period"]))
def test_rank_passes_equal_reference_on_monotone_tables(seed, length, mode):
    """The judge of the long periodic words below is itself the reference where both run."""
    merges, syms = monotone_case(seed, length, mode)
    assert rank_passes(merges, syms) == reference_apply(merges, syms)


@needs_ext
@pytest.mark.parametrize("unit", ["the", "e", "ation", "aab", "tionof"])
def test_long_periodic_words_equal_rank_passes(unit):
    """About 200 KB of one unit repeated (no space in the word: a dozen of encode's windows,
    nothing cut) encodes to the ids of the merges applied in rank order; so do its two halves
    with a space between (each a word of its own)."""
    n = 200_000
    s = (unit * (n // len(unit) + 1))[:n]
    merges = _TOK.merges
    base = EvolvingTokenizer.from_dict(_TOK.to_dict())
    base.bpe_enabled = False
    chars = base.encode(s)[1:-1]
    assert len(chars) == n

    def word_ids(syms):
        return [t for t in rank_passes(merges, syms + [EOW]) if t != EOW]

    bos, eos, space = _TOK.bos_id, _TOK.eos_id, _TOK.tokens.index(" ")
    assert _TOK.encode_array(s).tolist() == [bos] + word_ids(chars) + [eos]
    h = n // 2 + 1
    assert _TOK.encode(s[:h] + " " + s[h:]) == [bos] + word_ids(chars[:h]) + [space] + word_ids(chars[h:]) + [eos]


@needs_ext
@pytest.mark.parametrize("seed", range(6))
def test_words_longer_than_the_stream_buffer_equal_the_heap_kernel(seed):
    """Words of a few stream buffers (STREAM_SYMBOLS), encoded a buffer at a time: stretches of
    random letters (cut often), of a unit repeated and of one letter repeated (never cut: the
    buffer's prefix goes window by window), with characters spelled in 2 to 4 byte symbols
    for the tokenizer with byte fallback; the judge is the heap kernel over the whole word."""
    from molecule_gpt._bpe import STREAM_SYMBOLS
    rng = random.Random(seed)
    tok = [_TOK, _BYTE_TOK][seed % 2]
    letters = _LETTERS if tok is _TOK else ["a", "b", "c", "é", "ÿ", "😀", "\x00"]
    units = ["the", "ation", "ab", "abcab"] + (["😀a", "éé"] if tok is _BYTE_TOK else [])
    parts, total = [], 0
    while total < 3 * STREAM_SYMBOLS:
        kind = rng.random()
        if kind < 0.4:
            part = "".join(rng.choice(letters) for _ in range(rng.randint(1, 30_000)))
        elif kind < 0.8:
            part = rng.choice(units) * rng.randint(1, 20_000)
        else:
            part = rng.choice(letters) * rng.randint(1, 50_000)
        parts.append(part)
        total += len(part)
    s = "".join(parts)
    base = EvolvingTokenizer.from_dict(tok.to_dict())
    base.bpe_enabled = False
    chars = base.encode(s)[1:-1]
    expected = [t for t in tok._core._apply_merges_memview(chars + [EOW], "heap") if t != EOW]
    assert tok.encode_array(s).tolist() == [tok.bos_id] + expected + [tok.eos_id]


@needs_ext
@pytest.mark.parametrize("where", [0, 70_000, 150_000, 199_999])
def test_unspellable_character_in_a_streamed_word_raises(where):
    """A character with no token and no byte tokens, anywhere in a word longer than the stream
    buffer, raises TokenizerError (as in a short word); the tokenizer keeps working after it."""
    from bpe_reference import OriginalTokenizer
    from molecule_gpt.errors import TokenizerError
    lines = doc_lines()
    orig = OriginalTokenizer(lines)
    orig.train_bpe(lines, 100)
    tok = EvolvingTokenizer.from_original(orig.checkpoint_object(), byte_fallback=False)
    s = "the" * 66_667
    bad = s[:where] + "\u0436" + s[where + 1:]
    with pytest.raises(TokenizerError, match="U\\+0436"):
        tok.encode_array(bad)
    with pytest.raises(TokenizerError, match="U\\+0436"):
        tok.encode(bad)
    assert tok.encode_array(s).tolist() == tok.encode(s)
    assert tok.decode(tok.encode(s)) == s


@needs_ext
def test_growth_changes_long_word_ids_like_the_reference():
    lines = doc_lines()
    tok, ref = EvolvingTokenizer(lines[:50]), ReferenceTokenizer(lines[:50])
    s = "thethethe" * 40 + "aaaa" * 100 + "".join(random.Random(3).choice("etaoinshr") for _ in range(300))
    for k, corpus in enumerate([lines[:60], lines[30:] + [s[:200]] * 5, lines[::3] + ["aaaa aaaaaaaa"] * 20]):
        tok.train_bpe(corpus, 60 + 40 * k)
        ref.train_bpe(corpus, 60 + 40 * k)
        assert tok.encode(s) == ref.encode(s)
        assert tok.encode(s[:1500] + " " + s) == ref.encode(s[:1500] + " " + s)


# ----------------------------------------------------------------------------------------------
# time: linear in the length of a word without spaces


def _cpu_time(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


@needs_ext
@pytest.mark.parametrize("kind", ["letter", "word", "letters"])
def test_no_space_time_is_linear(kind):
    """8x the input costs at most 8x * 2 the CPU time (a quadratic kernel: 64x)."""
    rng = random.Random(1)
    unit = {"letter": "e", "word": "the", "letters": "".join(rng.choice("abcdefghijklmnopqrstuvwxyz")
                                                            for _ in range(1000))}[kind]
    small = (unit * (125_000 // len(unit) + 1))[:125_000]
    big = (unit * (1_000_000 // len(unit) + 1))[:1_000_000]
    if kind == "letters":
        big = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(1_000_000))
    t_small = _cpu_time(lambda: _TOK.encode_array(small))
    t_big = _cpu_time(lambda: _TOK.encode_array(big))
    assert t_big < 16 * t_small + 0.01, f"{t_small * 1e3:.1f} ms -> {t_big * 1e3:.1f} ms"


# ----------------------------------------------------------------------------------------------
# the word caches (short-word table and general cache) never change ids


_BYTE_LINES = ["ab abc aab ba", "cab cabbage a b c", "ÿé é ée"]
_BYTE_TOK = EvolvingTokenizer(_BYTE_LINES[:2])        # ÿ, é, \x00 ... are spelled in bytes
_BYTE_TOK.train_bpe(_BYTE_LINES * 3 + ["\x00a\x00 ÿÿ"] * 4, 40)
_BYTE_REF = ReferenceTokenizer(_BYTE_LINES[:2])
_BYTE_REF.train_bpe(_BYTE_LINES * 3 + ["\x00a\x00 ÿÿ"] * 4, 40)
CACHE_TEXT = st.lists(st.sampled_from(["a", "b", "c", "ab", "é", "ÿ", "\x00", " ", "  ", "\n", "😀", "\u0100",
                                       "abcabcab", "abcabcabc", "ÿÿÿÿ", "\u3000"]), max_size=40).map("".join)


@needs_ext
@HYP
@given(st.lists(CACHE_TEXT, min_size=1, max_size=6), st.sampled_from([0, 1, 2, 7, 65536]))
def test_caches_never_change_ids(texts, cache_words):
    from molecule_gpt._bpe import BPECore
    tok = EvolvingTokenizer.from_dict(_BYTE_TOK.to_dict())
    tok._core = BPECore(cache_words=cache_words)
    tok._sync_core()
    for _ in range(2):                       # second pass: from the caches where the words fit
        for s in texts:
            expected = _BYTE_REF.encode(s)
            assert tok.encode(s) == expected
            assert tok.encode_array(s).tolist() == expected
        assert tok._core.cache_size <= cache_words
    if cache_words == 0:
        assert tok._core.cache_hits == tok._core.cache_size == 0


@needs_ext
def test_short_and_long_words_are_cached_and_dropped_on_growth():
    tok = EvolvingTokenizer.from_dict(_BYTE_TOK.to_dict())
    tok._core.clear_cache()
    s = "ab cabbage abcabcabcabc ab cabbage abcabcabcabc 😀ab 😀ab"
    ids = tok.encode(s)
    assert tok._core.cache_size == 4 and tok._core.cache_hits == 4
    tok.train_bpe(_BYTE_LINES, 5)            # fewer merges: other ids, the caches are emptied
    assert tok._core.cache_size == 0
    ref = ReferenceTokenizer(_BYTE_LINES[:2])          # the same history: same ids for new tokens
    ref.train_bpe(_BYTE_LINES * 3 + ["\x00a\x00 ÿÿ"] * 4, 40)
    ref.train_bpe(_BYTE_LINES, 5)
    assert tok.encode(s) == ref.encode(s) != ids


def test_encode_array_matches_encode_on_every_core():
    for core in ("ext", "py"):
        if core == "ext" and not HAVE_EXTENSION:
            continue
        tok = EvolvingTokenizer.from_dict(_TOK.to_dict())
        if core == "py":
            tok._core = _PyCore()
            tok._sync_core()
        for s in ["", "   ", "the river", " ".join(_LINES[:50]), "😀 \ud800 x" * 3]:
            arr = tok.encode_array(s)
            assert isinstance(arr, np.ndarray) and arr.dtype == np.int32 and arr.ndim == 1
            assert arr.tolist() == tok.encode(s)
        with pytest.raises(TypeError, match="str"):
            tok.encode_array(b"bytes")
