"""The compiled BPE core: training against the pure-Python reference merge for merge, the two
merge-application kernels against each other and the reference, the word cache, and
adversarial inputs (linear-ish time, nothing lost).

Hypothesis examples per property: MOLECULE_GPT_HYPOTHESIS_EXAMPLES (default 150).
"""
import os
import random
import time

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


def random_lines(seed, alphabet="ab", n_lines=30, max_len=12):
    rng = random.Random(seed)
    return [" ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(1, max_len)))
                     for _ in range(rng.randint(1, 6))) for _ in range(n_lines)]


def assert_same_state(tok, ref):
    assert tok.merges == ref.merges
    assert tok.vocab_size == len(ref.tokens)
    for i in range(tok.vocab_size):
        assert tok.token_bytes(i) == ref.surface[i], i
    assert tok._eow == ref.eow


def train_both(birth, corpus, n):
    tok, ref = EvolvingTokenizer(birth), ReferenceTokenizer(birth)
    tok.train_bpe(corpus, n)
    ref.train_bpe(corpus, n)
    return tok, ref


# ----------------------------------------------------------------------------------------------
# training == reference, merge for merge

FIXTURE_LINES = ["The river keeps no copy of the rain it swallowed.", "A lamp learns the room by the shadows it throws.",
                 "Small gears turn the large wheel slowly but surely.", "Every map forgets the ground it was drawn upon."]


@pytest.mark.parametrize("name,birth,corpus,n", [
    ("fixture-ties", FIXTURE_LINES, FIXTURE_LINES, 300),         # runs out of pairs: stops early
    ("english-docs", doc_lines(), doc_lines(), 250),
    ("ab-overlaps", random_lines(1), random_lines(1), 60),
    ("abc-many-ties", random_lines(2, "abc", 50, 6), random_lines(3, "abc", 50, 6), 80),
    ("aaaa-runs", ["a aa aaa"], ["a" * k for k in range(1, 40)] + ["aaaa aaaa b"], 40),
    ("unknown-chars-in-bytes", FIXTURE_LINES,
     FIXTURE_LINES + ["😀😀 über ünter 😀 naïve 👩\u200d👩 e\u0301 \ud800x ǅ"] * 5, 150),
])
def test_training_matches_reference(name, birth, corpus, n):
    tok, ref = train_both(birth, corpus, n)
    assert_same_state(tok, ref)
    assert len(tok.merges) == len(ref.merges) <= n


def test_retraining_matches_reference():
    lines = doc_lines()
    tok, ref = EvolvingTokenizer(lines[:30]), ReferenceTokenizer(lines[:30])
    for k, corpus in enumerate([lines[:80], lines[40:] + ["ñandú 😀 ok"] * 3, lines[::2]]):
        tok.train_bpe(corpus, 70 + 20 * k)
        ref.train_bpe(corpus, 70 + 20 * k)
        assert_same_state(tok, ref)


@HYP
@given(st.lists(st.text(st.sampled_from("ab c\n\u00e9😀"), max_size=25), max_size=12), st.integers(1, 40))
def test_training_matches_reference_property(lines, n):
    tok, ref = train_both(["a b"], lines, n)
    assert_same_state(tok, ref)
    for s in lines:
        assert tok.encode(s) == ref.encode(s)


def test_tie_rule_first_occurrence():
    """Equal counts: the pair met first scanning words in first-occurrence order, left to right."""
    tok = EvolvingTokenizer(["xy"])
    tok.train_bpe(["xy yx"], 1)          # (x,y) (y,</w>) (y,x) (x,</w>) all count 1
    x, y = tok.tokens.index("x"), tok.tokens.index("y")
    assert tok.merges[0][:2] == (x, y)
    tok.train_bpe(["yx xy"], 1)
    assert tok.merges[0][:2] == (y, x)
    tok.train_bpe(["yx xy xy"], 1)       # (x,y) now counts 2: count beats position
    assert tok.merges[0][:2] == (x, y)
    tok.train_bpe(["yxx"], 1)            # one word: (y,x) precedes (x,x)
    assert tok.merges[0][:2] == (y, x)


def test_training_counts_with_word_frequencies():
    """Counts are word frequency times occurrences (overlapping), as design.md §1 counts them."""
    tok = EvolvingTokenizer(["ab"])
    a, b = tok.tokens.index("a"), tok.tokens.index("b")
    tok.train_bpe(["aaa b b b"], 1)      # (a,a): 2 overlapping in one word; (b,</w>): 3
    assert tok.merges[0][:2] == (b, EOW)
    tok.train_bpe(["aaaa b b b"], 1)     # (a,a): 3 ties (b,</w>): 3; "aaaa" comes first
    assert tok.merges[0][:2] == (a, a)


def test_pure_python_trainer_agrees_on_english():
    lines = doc_lines()
    fast = EvolvingTokenizer(lines)
    slow = EvolvingTokenizer(lines)
    slow._core = _PyCore()
    slow._sync_core()
    fast.train_bpe(lines, 120)
    slow.train_bpe(lines, 120)
    assert fast.merges == slow.merges and fast.tokens == slow.tokens


# ----------------------------------------------------------------------------------------------
# merge application: naive (rank rescan) == heap == reference


def _random_merge_table(rng, n_base, n_merges):
    merges, nxt = [], n_base
    symbols = list(range(n_base))
    for _ in range(n_merges):
        a = rng.choice(symbols)
        b = rng.choice(symbols + [EOW])
        merges.append((a, b, nxt))
        if rng.random() < 0.1 and merges:               # a pair listed twice keeps its last rank
            merges.append(rng.choice(merges))
        symbols.append(nxt)
        nxt += 1
    return merges


@needs_ext
@HYP
@given(st.integers(0, 2 ** 32 - 1), st.integers(0, 200))
def test_naive_and_heap_merge_application_agree(seed, length):
    from molecule_gpt._bpe import BPECore
    rng = random.Random(seed)
    n_base = rng.randint(1, 4)
    merges = _random_merge_table(rng, n_base, rng.randint(0, 30))
    core = BPECore()
    core.set_merges(merges)
    ref = ReferenceTokenizer([])
    ref.merges = merges
    syms = [rng.randrange(n_base) for _ in range(length)] + [EOW]
    expected = ref.apply_merges(syms)
    assert core._apply_merges_memview(syms, "naive") == expected
    assert core._apply_merges_memview(syms, "heap") == expected
    assert core._apply_merges_memview(syms, "auto") == expected
    py = _PyCore()
    py.set_merges(merges)
    assert py._apply_merges_memview(syms) == expected


@needs_ext
def test_merge_rank_last_listing_wins():
    from molecule_gpt._bpe import BPECore
    core = BPECore()
    core.set_merges([(0, 1, 5), (1, 2, 6), (0, 1, 5)])
    assert core.merge_rank(0, 1) == (2, 5)
    assert core.merge_rank(1, 2) == (1, 6)
    assert core.merge_rank(2, 0) is None
    # so (1,2) now beats (0,1): [0,1,2] -> [0,6]
    assert core._apply_merges_memview([0, 1, 2], "naive") == [0, 6]
    assert core._apply_merges_memview([0, 1, 2], "heap") == [0, 6]
    with pytest.raises(ValueError, match="method"):
        core._apply_merges_memview([0], "fast")


@needs_ext
def test_short_words_cut_where_no_merge_joins_keep_the_rank_scan_ids():
    """A word of at most NAIVE_MAX symbols is cut between base symbols that no merge joins
    across, and its pieces are merged apart: the same ids as the rank scan over the whole word,
    on every distinct word of English prose and on words spliced from pieces of them (most of
    which have such a cut, so the pieces path is what runs)."""
    from molecule_gpt import _bpe
    lines = doc_lines()
    tok = EvolvingTokenizer(lines)
    tok.train_bpe(lines, 300)
    core = tok._core
    words = sorted({w for ln in lines for w in ln.split()})
    rng = random.Random(0)
    words += ["".join(rng.choice(words)[rng.randrange(3):][:rng.randint(1, 5)] for _ in range(3))
              for _ in range(500)]

    def check_all():
        checked = cut = 0
        for w in words:
            syms = core.encode_array(w, False)[1:-1].tolist() + [EOW]    # (without <BOS>, <EOS>)
            if len(syms) > _bpe.NAIVE_MAX_SYMBOLS:
                continue
            checked += 1
            cut += any(not core.is_junction(a, b) for a, b in zip(syms, syms[1:]))
            assert core._apply_merges_memview(syms, "auto") == core._apply_merges_memview(syms, "naive"), w
        assert checked > 1000 and cut > checked // 2

    check_all()
    check_all()                 # pieces now served from the table of recurring pieces
    tok.train_bpe(lines[::2], 120)      # other merges: nothing the table kept may be reused
    check_all()


# ----------------------------------------------------------------------------------------------
# the per-word cache never changes results


@needs_ext
@pytest.mark.parametrize("cache_words", [0, 1, 3, 64])
def test_cache_size_does_not_change_ids(cache_words):
    from molecule_gpt._bpe import BPECore
    lines = doc_lines()
    tok = EvolvingTokenizer(lines)
    tok.train_bpe(lines, 150)
    text = " ".join(lines) + " 😀 " + "x" * 50 + " " + "supercalifragilisticexpialidocious" * 2
    expected = tok.encode(text)
    tok._core = BPECore(cache_words=cache_words)
    tok._sync_core()
    assert tok.encode(text) == expected
    assert tok.encode(text) == expected      # second pass: served from the cache where it fits
    if cache_words:
        assert 0 < tok._core.cache_size <= cache_words and tok._core.cache_resets > 0
    if cache_words == 64:
        assert tok._core.cache_hits > 0
    if cache_words == 0:
        assert tok._core.cache_hits == tok._core.cache_size == 0
    # merges change -> the cache is dropped
    tok.train_bpe(lines[:20], 30)
    ref = EvolvingTokenizer.from_dict(tok.to_dict())
    assert tok.encode(text) == ref.encode(text)


@needs_ext
def test_cache_bounds():
    from molecule_gpt._bpe import BPECore, CACHE_KEY_LEN
    with pytest.raises(ValueError, match="cache_words"):
        BPECore(cache_words=-1)
    tok = EvolvingTokenizer(["ab"])
    tok.train_bpe(["ab ab"], 2)
    tok._core.clear_cache()
    tok.encode("a" * (CACHE_KEY_LEN + 1) + " ab ab")
    assert tok._core.cache_size == 1          # the long word is not cached, "ab" is, once


# ----------------------------------------------------------------------------------------------
# adversarial inputs: linear-ish, nothing lost

def _aaaa_tokenizer():
    """Merges that keep doubling runs of a: a+a, aa+aa, aaaa+aaaa, ..."""
    tok = EvolvingTokenizer(["a b"])
    tok.train_bpe(["a" * 1024 + " " + "a" * 777], 40)
    return tok


def _best_time(fn, repeats=3):
    """Best of `repeats` in this thread's CPU time (a descheduled thread's wait is not counted,
    so the ratio below measures the work, not the machine's load)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


@needs_ext
def test_one_million_a_finishes_and_roundtrips():
    tok = _aaaa_tokenizer()
    s = "a" * 1_000_000
    t0 = time.perf_counter()
    ids = tok.encode(s)
    elapsed = time.perf_counter() - t0
    assert tok.decode(ids) == s
    assert len(ids) < 1000                   # long runs really merged
    assert elapsed < 5.0, f"encoding 'a' * 1_000_000 took {elapsed:.2f} s"


@needs_ext
def test_long_word_time_is_linearish():
    """A quadratic merge loop would take 16x for 4x the input; allow 8x (noise, log factor)."""
    tok = _aaaa_tokenizer()
    small, big = "a" * 100_000, "a" * 400_000
    t_small = _best_time(lambda: tok.encode(small))
    t_big = _best_time(lambda: tok.encode(big))
    assert t_big < 8 * t_small + 0.02, f"{t_small * 1e3:.1f} ms -> {t_big * 1e3:.1f} ms"


@needs_ext
def test_100k_char_word_and_emoji_runs():
    lines = doc_lines()
    tok = EvolvingTokenizer(lines)
    tok.train_bpe(lines + ["😀😀😀😀 👩\u200d👩\u200d👧 😀😀"] * 20, 300)
    rng = random.Random(5)
    alphabet = sorted(set("".join(lines)) - set(" \n\t"))
    word = "".join(rng.choice(alphabet) for _ in range(100_000))
    emoji = "😀" * 60_000 + "👩\u200d👩\u200d👧" * 20_000
    mixed = " ".join("😀" * rng.randint(1, 30) + "x" for _ in range(5_000))
    for s in (word, emoji, mixed):
        t0 = time.perf_counter()
        ids = tok.encode(s)
        elapsed = time.perf_counter() - t0
        assert tok.decode(ids) == " ".join(s.split())
        assert elapsed < 5.0, f"{len(s)} chars took {elapsed:.2f} s"
    # and the long word agrees with the reference design on a prefix it can afford
    ref = ReferenceTokenizer(lines)
    ref.train_bpe(lines + ["😀😀😀😀 👩\u200d👩\u200d👧 😀😀"] * 20, 300)
    assert tok.encode(word[:600]) == ref.encode(word[:600])
    assert tok.encode(emoji[:500] + " " + mixed[:500]) == ref.encode(emoji[:500] + " " + mixed[:500])


@needs_ext
def test_training_on_adversarial_corpus():
    """One huge word and many distinct words: training stays fast and matches the reference
    on the part the reference can afford."""
    rng = random.Random(7)
    big = ["a" * 200_000, "ab" * 50_000] + ["".join(rng.choice("abcdef") for _ in range(rng.randint(1, 9)))
                                             for _ in range(50_000)]
    tok = EvolvingTokenizer(["abcdef"])
    t0 = time.perf_counter()
    tok.train_bpe(big, 500)
    assert time.perf_counter() - t0 < 20
    small = big[2:2000] + ["a" * 300, "ab" * 100]
    tok2, ref = train_both(["abcdef"], small, 200)
    assert_same_state(tok2, ref)
