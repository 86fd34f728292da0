"""CorpusField: unigram, bigram and trigram counts of the corpus's token ids (design.md §5).

What it is: counts kept as sorted int64 keys with parallel counts (a bigram (a, b) is the key
a*V + b, a trigram (a, b, c) is (a*V + b)*V + c), so a context's continuations are one
contiguous range found by binary search, in numpy to build and merge and in `_field.Field` to
sample. The field can generate alone (trigram -> bigram -> unigram back-off, sampled
∝ count^(1/T)) so an organism speaks before it has trained, and its trigram/bigram distribution
is blended with the model's probabilities (generation.py): `blend_probs` gives what that blend
takes from the field on held-out text, and `best_blend_weight` the model's weight that predicts
such text best (Organism.model_alpha).

What it is not: a language model to train. `heldout_loss` scores it on held-out text with a
fixed interpolation (below), to compare the model against it (benchmarks).

Arrays are never modified in place: `add` builds new ones and swaps them in, so a native view
handed to a generating thread stays valid while another thread adds text.
"""
from __future__ import annotations

import threading
from typing import Iterable, Sequence

import numpy as np

from . import _core, _field

__all__ = ["CorpusField", "best_blend_weight"]

# Interpolation weights of heldout_loss (trigram, bigram, add-one unigram); a level whose
# context was never seen passes its weight down.
_LAMBDAS = (0.6, 0.3, 0.1)


def _flat_ids(sequences: Iterable[Sequence[int]], V: int) -> tuple[np.ndarray, np.ndarray]:
    """(every id back to back as int64, each sequence's length) of sequences of ids in [0, V)."""
    seqs = sequences if isinstance(sequences, list) else list(sequences)
    plain = _core.ragged_ids(seqs, V) if seqs else None  # lists of plain ints: one native pass
    if plain is not None:
        return plain[0].astype(np.int64), plain[1]
    arrays = []
    for i, seq in enumerate(seqs):
        arr = np.asarray(seq)
        if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(f"sequence {i} must be a flat list of int token ids")
        if arr.size and (arr.min() < 0 or arr.max() >= V):
            raise ValueError(f"sequence {i} holds ids outside the vocabulary [0, {V})")
        arrays.append(arr.astype(np.int64))
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    return flat, np.array([len(arr) for arr in arrays], dtype=np.intp)


def _ngrams(flat: np.ndarray, lengths: np.ndarray, V: int) -> tuple:
    """(unigram counts (V,), bigram keys, trigram keys) of the sequences laid back to back in
    flat, keys not yet unique."""
    seq_id = np.repeat(np.arange(len(lengths)), lengths)
    uni = np.bincount(flat, minlength=V).astype(np.float64)
    same2 = seq_id[:-1] == seq_id[1:]
    bi = (flat[:-1] * V + flat[1:])[same2]
    same3 = seq_id[:-2] == seq_id[2:]
    tri = ((flat[:-2] * V + flat[1:-1]) * V + flat[2:])[same3]
    return uni, bi, tri


def _merge(keys_a, counts_a, keys_b, counts_b) -> tuple[np.ndarray, np.ndarray]:
    """New arrays: the sorted unique keys of a (sorted unique) and b (any order) with their
    counts summed. Costs a sort of b and a pass over a, not a sort of both: a's tables are the
    whole corpus, b is what one observe() heard."""
    kb, inv = np.unique(keys_b, return_inverse=True)
    cb = np.bincount(inv, weights=counts_b, minlength=len(kb))
    pos = np.searchsorted(keys_a, kb)
    found = pos < len(keys_a)
    found[found] = keys_a[pos[found]] == kb[found]
    counts = np.array(counts_a, np.float64)
    counts[pos[found]] += cb[found]
    fresh = ~found
    keys = np.insert(np.asarray(keys_a, np.int64), pos[fresh], kb[fresh])
    return keys, np.insert(counts, pos[fresh], cb[fresh])


class CorpusField:
    """N-gram counts over token ids. `CorpusField(vocab_size, sequences=())`."""

    def __init__(self, vocab_size: int, sequences: Iterable[Sequence[int]] = ()):
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if int(vocab_size) ** 3 >= 2 ** 62:
            raise ValueError(f"vocab_size {vocab_size} is too large for int64 trigram keys (max about 1.6 million)")
        self.vocab_size = int(vocab_size)
        self._lock = threading.Lock()  # the tables are swapped and read together under it
        self._changing = threading.Lock()  # one change (add, grow_vocab) at a time
        e = np.zeros(0, np.int64)
        self.unigrams = np.zeros(self.vocab_size)
        self.bigram_keys, self.bigram_counts = e, np.zeros(0)
        self.trigram_keys, self.trigram_counts = e, np.zeros(0)
        self._native = None
        self.add(sequences)

    # ---- building

    def add(self, sequences: Iterable[Sequence[int]]) -> None:
        """Count the n-grams of more sequences (each e.g. an encoded line with BOS and EOS)."""
        flat, lengths = _flat_ids(sequences, self.vocab_size)
        if not len(flat):
            return
        uni, bi, tri = _ngrams(flat, lengths, self.vocab_size)
        with self._changing:  # the merge runs outside _lock: readers keep the tables meanwhile
            bk, bc = _merge(self.bigram_keys, self.bigram_counts, bi, np.ones(len(bi)))
            tk, tc = _merge(self.trigram_keys, self.trigram_counts, tri, np.ones(len(tri)))
            unigrams = self.unigrams + uni
            with self._lock:
                self.unigrams = unigrams
                self.bigram_keys, self.bigram_counts = bk, bc
                self.trigram_keys, self.trigram_counts = tk, tc
                self._native = None

    def grow_vocab(self, new_vocab_size: int) -> None:
        """Re-key the tables for a larger vocabulary (ids keep their meaning; new ids have no counts)."""
        V, W = self.vocab_size, int(new_vocab_size)
        if W < V:
            raise ValueError(f"the vocabulary only grows: {W} < {V}")
        if W == V:
            return
        if W ** 3 >= 2 ** 62:
            raise ValueError(f"vocab_size {W} is too large for int64 trigram keys")
        with self._changing, self._lock:
            a, b = np.divmod(self.bigram_keys, V)
            t, c = np.divmod(self.trigram_keys, V)
            ta, tb = np.divmod(t, V)
            self.bigram_keys = a * W + b  # order is preserved: (a, b) lexicographic in both keyings
            self.trigram_keys = (ta * W + tb) * W + c
            self.unigrams = np.concatenate([self.unigrams, np.zeros(W - V)])
            self.vocab_size = W
            self._native = None

    @property
    def total_tokens(self) -> int:
        return int(self.unigrams.sum())

    # ---- using

    def native(self) -> "_field.Field | None":
        """The native view used by the decoder (None while the field is empty)."""
        with self._lock:
            if self._native is not None or self.unigrams.sum() == 0:
                return self._native
            tables = (self.vocab_size, self.unigrams, self.bigram_keys, self.bigram_counts,
                      self.trigram_keys, self.trigram_counts)
        native = _field.Field(*tables)  # outside the lock: a change meanwhile is not waited for
        with self._lock:
            if self._native is None and tables[1] is self.unigrams and tables[2] is self.bigram_keys \
                    and tables[4] is self.trigram_keys:
                self._native = native
        return native

    def distribution(self, context: Sequence[int], temperature: float = 1.0, min_level: int = 1) -> tuple[np.ndarray, int]:
        """(q, level): the next-token distribution after `context` ∝ count^(1/temperature), from
        the most specific level >= min_level whose context was seen (3 trigram, 2 bigram,
        1 unigram); level 0 and q all zero when none was."""
        nat = self.native()
        if nat is None:
            return np.zeros(self.vocab_size), 0
        return nat.distribution(list(context), float(temperature), int(min_level))

    def heldout_loss(self, sequences: Iterable[Sequence[int]], block_size: int | None = None) -> float:
        """Mean over sequences of the mean cross-entropy (nats) of predicting ids[t+1] from the
        ids before it, t = 0..n-1 with n = min(block_size, L-1) (the model's loss positions),
        under p = 0.6 p_tri + 0.3 p_bi + 0.1 p_uni, p_uni add-one smoothed; a level whose
        context is unseen passes its weight to the next."""
        return float(np.mean(self.sequence_losses(sequences, block_size)))

    def sequence_losses(self, sequences: Iterable[Sequence[int]], block_size: int | None = None) -> np.ndarray:
        """Each sequence's mean cross-entropy, as heldout_loss defines it, in order (sequences
        shorter than 2 ids left out). The counts' context totals are derived once for all of
        them and every position is looked up in one pass."""
        (p_uni, p_bi, seen_bi, p_tri, seen_tri), first, ns = self._positions(sequences, block_size, "heldout_loss")
        l3, l2, l1 = _LAMBDAS
        w3 = np.where(seen_tri, l3, 0.0)
        w2 = np.where(seen_bi, l2 + (l3 - w3), 0.0)
        w1 = 1.0 - w3 - w2
        nll = -np.log(w3 * p_tri + w2 * p_bi + w1 * p_uni)
        return np.add.reduceat(nll, first) / ns

    def blend_probs(self, sequences: Iterable[Sequence[int]], block_size: int | None = None,
                    leave_one_out: bool = False) -> np.ndarray:
        """The field's probability of each predicted id in the blend generation samples
        (design.md §4 step 3) at temperature 1: the trigram's count share when the two ids
        before it were seen as a context, else the bigram's when the id before it was, else
        NaN (the field does not take part there: the model speaks alone). One value per
        position that sequence_losses scores, in the same order. leave_one_out: the sequences
        were counted into the field, so each position's own occurrence is taken out of the
        counts (its n-gram and its context once each), as text the field never saw would see it."""
        (_, p_bi, seen_bi, p_tri, seen_tri), _, _ = self._positions(sequences, block_size, "blend_probs", leave_one_out)
        return np.where(seen_tri, p_tri, np.where(seen_bi, p_bi, np.nan))

    def _positions(self, sequences, block_size: int | None, caller: str, leave_one_out: bool = False) -> tuple:
        """Every predicted position of the sequences (ids t + 1 from ids t and t - 1, for
        t < min(block_size, L - 1); sequences shorter than 2 ids left out), looked up in one pass:
        ((p_uni add-one smoothed, p_bi, bigram context seen, p_tri, trigram context seen), each
        sequence's first position, its number of positions); leave_one_out as in blend_probs
        (for the bigram and trigram levels)."""
        V = self.vocab_size
        flat, lengths = _flat_ids(sequences, V)
        starts = np.cumsum(lengths) - lengths
        scored = lengths >= 2
        starts, lengths = starts[scored], lengths[scored]
        if not len(lengths):
            raise ValueError(f"{caller} needs at least one sequence of 2 or more ids")
        with self._lock:
            uni, bk, bc, tk, tc = self.unigrams, self.bigram_keys, self.bigram_counts, self.trigram_keys, self.trigram_counts
        p_uni_all = (uni + 1.0) / (uni.sum() + V)
        ctx2, ctx2_tot = _context_totals(bk, bc, V)
        ctx3, ctx3_tot = _context_totals(tk, tc, V)
        ns = lengths - 1 if block_size is None else np.minimum(block_size, lengths - 1)
        # position t of a sequence predicts its id t + 1 from ids t (and t - 1 when t > 0)
        first = np.cumsum(ns) - ns  # each sequence's first position among all of them
        t = np.arange(int(ns.sum())) - np.repeat(first, ns)
        at = np.repeat(starts, ns) + t
        tgt, prev1 = flat[at + 1], flat[at]
        prev2 = np.where(t > 0, flat[at - 1], -1)
        taken = 1 if leave_one_out else 0
        p_bi, seen_bi = _lookup(bk, bc, ctx2, ctx2_tot, prev1, tgt, V, taken)
        k3 = np.where(prev2 >= 0, prev2 * V + prev1, -1)
        p_tri, seen_tri = _lookup(tk, tc, ctx3, ctx3_tot, k3, tgt, V, taken)
        return (p_uni_all[tgt], p_bi, seen_bi, p_tri, seen_tri), first, ns


def best_blend_weight(model_nats: np.ndarray, field_probs: np.ndarray) -> float:
    """The model's weight a in [0, 1] under which the blend a p_model + (1 - a) p_field predicts
    the given targets best (least total cross-entropy), from each target's model nats
    (-ln p_model) and field probability (NaN where the field does not take part, so a does not
    matter there). The loss is convex in a: its derivative g(a) = sum(r), r = (q - p) / (a p +
    (1 - a) q), rises with a, at the rate sum(r^2). a is 1 where g(1) <= 0, 0 where g(0) >= 0,
    else g's root, by Newton's steps kept inside a bracket that each step narrows (a bisection
    step where Newton's would leave it). 1 when the field takes part nowhere."""
    p = np.exp(-np.asarray(model_nats, dtype=np.float64))
    q = np.asarray(field_probs, dtype=np.float64)
    if p.shape != q.shape:
        raise ValueError(f"model_nats has {p.shape} values and field_probs {q.shape}; give one of each per target")
    part = ~np.isnan(q)
    p, q = p[part], q[part]
    if not len(p):
        return 1.0

    def slope(a: float) -> tuple[float, float]:
        # a target both give 0 adds 0/0: no weight helps it (its loss is infinite at any a); one
        # only the model gives a chance adds -inf at a = 0 (the field alone cannot say it)
        with np.errstate(all="ignore"):
            r = (q - p) / (a * p + (1 - a) * q)
            r = r[~np.isnan(r)]
            return float(np.sum(r)), float(np.dot(r, r))

    if slope(1.0)[0] <= 0:
        return 1.0
    if slope(0.0)[0] >= 0:
        return 0.0
    lo, hi, a = 0.0, 1.0, 0.5
    for _ in range(100):
        g, h = slope(a)
        if g > 0:
            hi = a
        else:
            lo = a
        step = a - g / h if 0 < h < np.inf else -1.0
        if hi - lo < 1e-12 or abs(step - a) < 1e-14:
            return step if lo <= step <= hi else a
        a = step if lo < step < hi else 0.5 * (lo + hi)
    return a


def _context_totals(keys: np.ndarray, counts: np.ndarray, V: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique contexts (key // V, sorted) and the total count of each."""
    if not len(keys):
        return np.zeros(0, np.int64), np.zeros(0)
    ctx = keys // V
    uniq, start = np.unique(ctx, return_index=True)
    return uniq, np.add.reduceat(counts, start)


def _lookup(keys, counts, ctx, ctx_tot, context_keys, targets, V, taken: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """p(target | context) by counts and whether the context was seen (context key < 0: unseen),
    with `taken` occurrences of each looked-up n-gram (and of its context) taken out of the
    counts first (a context left with no count is unseen)."""
    n = len(targets)
    p = np.zeros(n)
    seen = np.zeros(n, bool)
    if not len(keys):
        return p, seen
    ci = np.searchsorted(ctx, context_keys)
    ci_ok = (context_keys >= 0) & (ci < len(ctx))
    ci_ok[ci_ok] = ctx[ci[ci_ok]] == context_keys[ci_ok]
    if taken:
        ci_ok[ci_ok] = ctx_tot[ci[ci_ok]] > taken
    seen[:] = ci_ok
    full = context_keys * V + targets
    ki = np.searchsorted(keys, full)
    hit = ci_ok & (ki < len(keys))
    hit[hit] = keys[ki[hit]] == full[hit]
    p[hit] = (counts[ki[hit]] - taken) / (ctx_tot[ci[hit]] - taken)
    return p, seen
