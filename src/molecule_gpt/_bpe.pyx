"""_bpe: the tokenizer's hot paths over integer ids, in Cython.

What is here: mapping characters to base symbols (one-character tokens, else the UTF-8 byte
tokens of the character), scanning whitespace-separated words straight out of the str's
internal buffer, applying merges to a word (a C hash map (left, right) -> (rank, merged id),
lowest rank first, leftmost on ties), a bounded per-word cache of encoded words, and BPE
training with incremental pair counts.

What is not here: the vocabulary itself, which token a merge creates, serialization, the growth
policy and the original-checkpoint import. Those are policy and live in tokenizer.py
(EvolvingTokenizer), which validates everything before calling in; this module trusts its
inputs. A pure-Python twin of `BPECore` with the same methods lives in tokenizer.py
(`_PyCore`) for when this extension is not built (or MOLECULE_GPT_PUREPYTHON=1).

Symbols are int32 token ids; the end-of-word marker `</w>` is the symbol EOW = -1, which is
never a token and never emitted (a merged token that ends in `</w>`, like `the</w>`, is).
Everything runs with the GIL held. encode and decode_bytes touch shared state only in stretches
that run no Python code, so they are atomic with respect to other threads (one thread may
encode while another trains: training works on its own _Trainer and calls back into Python
once per merge to learn the merged token's id; set_vocab/set_merges swap the tables at once).

Notes (alternatives considered and rejected):
- Merge application. tiktoken rescans an array of ranks after every merge: O(n^2) on one long
  word. We do the same for words of up to NAIVE_MAX symbols (it is the fastest there). A longer
  word is first cut between base symbols that no merge can join across (set_merges computes
  these junctions; random letters fall apart into short pieces); pieces of up to HEAP_MAX
  symbols use a min-heap of (rank, position) over a linked list, O(n log n); longer ones, when
  the table is monotone (always, for tables our trainer makes), rank buckets: O(n + ranks), so
  "a" * 1_000_000 or "the" * 300_000 is linear. A table that is not monotone (a hand-made or
  imported one) keeps the heap. All kernels are tested against the reference and each other
  (`_apply_merges_memview`).
- Windows and streaming: time per byte that does not depend on the word's length. Periodic
  text has no cut (every neighbouring pair of "thethe..." is a junction), and the rank buckets
  need 36 bytes of scratch a symbol: over a whole piece of millions of symbols that is hundreds
  of MB, newly allocated (page faults, zeroing) and read from DRAM once per rank, where a short
  piece stays in the CPU caches. So pieces longer than WINDOW symbols go through the buckets a
  window at a time (apply_windowed): the window is BPE'd alone while the kernel tracks a
  frontier F left of which the window's tokens provably equal those of the whole piece
  (_bucket_run); the tokens before F are final, and the next window starts at F. Likewise a word
  of more than STREAM code points never has all its symbols in memory (_emit_long): it streams
  through a buffer of STREAM symbols, emitting what precedes the buffer's last cut, or a
  window's final tokens. Tables that are not monotone keep whole-word scratch (no windows).
- Word cache. An open-addressing table of up to `cache_words` words (key: the word's code
  points; value: its ids, both in one arena), emptied at once when full. Bounded memory, no
  eviction bookkeeping, no allocation per word, and a hit rate near 100% on natural text (a
  direct-mapped table of fixed slots lost words to collisions alone). Words longer than
  CACHE_KEY code points are never cached (a small share of natural text; adversarial words must
  not flush the table). Figures: benchmarks/RESULTS.md.
- Training. One round = pop the best pair from a lazy max-heap, rewrite only the words that
  contain it (pair -> word list), subtract the old pair counts of those words and add the new
  ones. Recounting everything every round (the original) is O(rounds * corpus).
- Short-word table, in front of the word cache. Words of up to SHORT_KEY code points, all
  below 256, that encode to at most SHORT_IDS ids (most English words) live in a table of
  64-byte slots holding the key bytes and the ids: a hit reads one cache line, where the word
  cache reads a table slot, an entry and the arena one after the other. It grows by doubling
  and shares the `cache_words` bound (both are emptied together). Words are read in place from
  the str (1, 2 or 4 bytes a code point); nothing is copied to look them up.
"""
cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, INT32_MAX
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

import numpy as _np

from molecule_gpt.errors import TokenizerError

cdef extern from "Python.h":
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    unsigned int PyUnicode_KIND(object o)
    void* PyUnicode_DATA(object o)
    int PyUnicode_1BYTE_KIND
    int PyUnicode_2BYTE_KIND
    bint Py_UNICODE_ISSPACE(Py_UCS4 ch) nogil
    object PyList_New(Py_ssize_t n)
    PyObject* PyLong_FromLong(long v)
    void PyList_SET_ITEM_STEAL "PyList_SET_ITEM"(object lst, Py_ssize_t i, PyObject* item)
    object PyBytes_FromStringAndSize(const char* s, Py_ssize_t n)
    bint PyLong_CheckExact(object o)
    object PyNumber_Index(object o)

cdef extern from *:
    """
    /* Moves of a few ints: a plain loop. gcc would turn such a loop into a memmove call, which
       costs more than the move itself at these sizes. */
    #if defined(__GNUC__) && !defined(__clang__)
    __attribute__((optimize("no-tree-loop-distribute-patterns")))
    #endif
    static inline void mgpt_move_i32(int32_t* dst, const int32_t* src, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) dst[i] = src[i];
    }
    """
    void move_i32 "mgpt_move_i32"(int32_t* dst, const int32_t* src, Py_ssize_t n) noexcept nogil

cdef extern from *:
    """
    #include <stdlib.h>
    #if defined(__linux__)
    #include <sys/mman.h>
    #endif
    /* Scratch of a long word (tens of MB for a word of millions of symbols): on Linux, 2 MB
       aligned and marked for transparent huge pages, so that touching it costs one page fault
       per 2 MB instead of one per 4 KB (those faults were most of a long word's time). */
    static void* mgpt_big_alloc(size_t n) {
    #if defined(__linux__) && defined(MADV_HUGEPAGE)
        if (n >= ((size_t)4 << 20)) {
            void* p = NULL;
            if (posix_memalign(&p, (size_t)2 << 20, n) != 0) return NULL;
            madvise(p, n, MADV_HUGEPAGE);
            return p;
        }
    #endif
        return malloc(n ? n : 1);
    }
    """
    void* big_alloc "mgpt_big_alloc"(size_t n) noexcept nogil

cdef extern from *:
    """
    #define MGPT_EMPTY64 0xFFFFFFFFFFFFFFFFULL
    #define MGPT_EMPTY32 0xFFFFFFFFu
    #define MGPT_MIX1 0xff51afd7ed558ccdULL
    #define MGPT_MIX2 0xc4ceb9fe1a85ec53ULL
    #define MGPT_FNV_PRIME 0x100000001b3ULL
    #define MGPT_FNV_SEED 0xcbf29ce484222325ULL
    """
    uint64_t EMPTY64 "MGPT_EMPTY64"
    uint32_t EMPTY32 "MGPT_EMPTY32"
    uint64_t MIX1 "MGPT_MIX1"
    uint64_t MIX2 "MGPT_MIX2"
    uint64_t FNV_PRIME "MGPT_FNV_PRIME"
    uint64_t FNV_SEED "MGPT_FNV_SEED"

ctypedef fused char_t:
    uint8_t
    uint16_t
    uint32_t

cdef enum:
    EOW = -1              # the end-of-word marker </w> as a symbol
    NO_RANK = 2147483647  # (INT32_MAX) rank of a pair that has no merge
    CACHE_KEY = 32        # longest word (in code points) the per-word cache holds
    SHORT_KEY = 16        # words of up to this many code points < 256 go to the short-word table
    SHORT_IDS = 11        # ... when they encode to at most this many ids
    NAIVE_MAX = 48        # words of up to this many symbols use the O(n^2) rank scan
    PIECE_KEY = 12        # pieces of a short word of 3 to this many symbols go through the piece table
    PIECE_SLOTS = 4096    # ... of this many slots (direct-mapped, 104 bytes each)
    HEAP_MAX = 1024       # longer segments use the rank buckets (monotone merge tables)
    WINDOW = 16384        # ... and longer ones than this go through them a window at a time
    STREAM = 65536        # words of more code points than this stream through a buffer of this many symbols
    MAX_JUNCTIONS = 1 << 22  # more junction pairs than this: long words are not cut
    JBITS = 512           # junction bitmap side (32 KB): covers the base symbols of most vocabularies
    NOT_FOUND = -2        # map lookups: absent (distinct from EOW)

EOW_ID = EOW  # exported for the facade and the tests
CACHE_KEY_LEN = CACHE_KEY
NAIVE_MAX_SYMBOLS = NAIVE_MAX
HEAP_MAX_SYMBOLS = HEAP_MAX
WINDOW_SYMBOLS = WINDOW
STREAM_SYMBOLS = STREAM

# Python's own whitespace (str.isspace / str.split) for code points < 256; above, the C API.
cdef uint8_t SPACE_LATIN1[256]
for _i in range(256):
    SPACE_LATIN1[_i] = chr(_i).isspace()


cdef inline bint is_space(uint32_t cp) noexcept nogil:
    if cp < 256:
        return SPACE_LATIN1[cp]
    return Py_UNICODE_ISSPACE(cp)


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    """murmur3 finalizer: spreads every input bit over the high and low bits."""
    x ^= x >> 33
    x *= MIX1
    x ^= x >> 33
    x *= MIX2
    x ^= x >> 33
    return x


cdef inline uint64_t pair_key(int32_t a, int32_t b) noexcept nogil:
    return ((<uint64_t><uint32_t>a) << 32) | <uint64_t><uint32_t>b


cdef inline int utf8_encode(uint32_t cp, uint8_t* out) noexcept nogil:
    """UTF-8 bytes of one code point; lone surrogates as 3 bytes (Python's 'surrogatepass')."""
    if cp < 0x80:
        out[0] = <uint8_t>cp
        return 1
    if cp < 0x800:
        out[0] = <uint8_t>(0xC0 | (cp >> 6))
        out[1] = <uint8_t>(0x80 | (cp & 0x3F))
        return 2
    if cp < 0x10000:
        out[0] = <uint8_t>(0xE0 | (cp >> 12))
        out[1] = <uint8_t>(0x80 | ((cp >> 6) & 0x3F))
        out[2] = <uint8_t>(0x80 | (cp & 0x3F))
        return 3
    out[0] = <uint8_t>(0xF0 | (cp >> 18))
    out[1] = <uint8_t>(0x80 | ((cp >> 12) & 0x3F))
    out[2] = <uint8_t>(0x80 | ((cp >> 6) & 0x3F))
    out[3] = <uint8_t>(0x80 | (cp & 0x3F))
    return 4


cdef inline Py_ssize_t ids_without_eow(int32_t* dst, const int32_t* s, Py_ssize_t n) noexcept nogil:
    """A word's tokens s[:n] copied to dst without the end-of-word marker; returns how many."""
    cdef Py_ssize_t i, k = 0
    for i in range(n):
        if s[i] != EOW:
            dst[k] = s[i]
            k += 1
    return k


cdef inline Py_ssize_t linked_tokens(int32_t* dst, const int32_t* s, const int32_t* nxt,
                                     Py_ssize_t end) noexcept nogil:
    """The tokens of a merge kernel's linked list (the first at 0, s[i] the token starting at i,
    nxt[i] the next start, -1 after the last) that start before `end`, copied in order to dst;
    returns how many. dst may be s: each token moves left or stays."""
    cdef Py_ssize_t i = 0, k = 0
    while 0 <= i < end:
        dst[k] = s[i]
        k += 1
        i = nxt[i]
    return k


cdef inline bint same_u32(const uint32_t* a, const uint32_t* b, Py_ssize_t n) noexcept nogil:
    """a[:n] == b[:n]; inline because words are short (a libc memcmp call costs more)."""
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != b[i]:
            return False
    return True


cdef inline size_t pow2_at_least(size_t n) noexcept nogil:
    cdef size_t p = 16
    while p < n:
        p <<= 1
    return p


cdef void* xgrow(void* p, size_t old_nbytes, size_t nbytes) except NULL:
    """A bigger buffer holding p's first old_nbytes (p freed); huge pages when large."""
    cdef void* q = big_alloc(nbytes)
    if q == NULL:
        raise MemoryError()
    if p != NULL:
        if old_nbytes:
            memcpy(q, p, old_nbytes)
        free(p)
    return q


cdef void* xrealloc(void* p, size_t nbytes) except NULL:
    cdef void* q = realloc(p, nbytes if nbytes > 0 else 1)
    if q == NULL:
        raise MemoryError()
    return q


# ---------------------------------------------------------------------------------------------
# Merge map: (left, right) -> (rank, merged id). Open addressing, linear probing, load <= 1/2.

cdef struct MergeSlot:
    uint64_t key     # pair_key(left, right); EMPTY64 = free (left == EOW never happens)
    int32_t rank
    int32_t merged

cdef struct MergeMap:
    MergeSlot* slots
    uint64_t mask
    uint32_t shift   # 64 - log2(capacity): Fibonacci hashing takes the product's top bits


cdef inline uint64_t map_slot(const MergeMap* m, uint64_t key) noexcept nogil:
    # one multiply (the lookup is on the path of every merge step); its top bits mix all of key
    return (key * <uint64_t>0x9E3779B97F4A7C15ULL) >> m.shift


cdef inline uint32_t map_shift(uint64_t cap) noexcept nogil:
    cdef uint32_t k = 0
    while (<uint64_t>1 << k) < cap:
        k += 1
    return 64 - k


cdef inline MergeSlot* merge_find(const MergeMap* m, int32_t a, int32_t b) noexcept nogil:
    """The slot of (a, b), or NULL when the pair has no merge."""
    cdef uint64_t key = pair_key(a, b)
    cdef uint64_t i = map_slot(m, key)
    while m.slots[i].key != EMPTY64:
        if m.slots[i].key == key:
            return &m.slots[i]
        i = (i + 1) & m.mask
    return NULL


cdef inline int32_t merge_rank(const MergeMap* m, int32_t a, int32_t b, int32_t* merged) noexcept nogil:
    cdef MergeSlot* s = merge_find(m, a, b)
    if s == NULL:
        return NO_RANK
    merged[0] = s.merged
    return s.rank


cdef inline Py_ssize_t _jbit(int32_t a, int32_t b) noexcept nogil:
    """The junction bitmap's bit of (a, b), or -1 when it is not covered."""
    if <uint32_t>a >= JBITS - 1:
        return -1
    if b == EOW:
        b = JBITS - 1
    elif <uint32_t>b >= JBITS - 1:
        return -1
    return a * JBITS + b


cdef bint _map_put(MergeMap* m, int32_t a, int32_t b, int32_t rank, int32_t merged) noexcept nogil:
    """Insert or overwrite (a, b); True when the pair was new."""
    cdef uint64_t key = pair_key(a, b)
    cdef uint64_t i = map_slot(m, key)
    cdef bint new
    while m.slots[i].key != EMPTY64 and m.slots[i].key != key:
        i = (i + 1) & m.mask
    new = m.slots[i].key == EMPTY64
    m.slots[i].key = key
    m.slots[i].rank = rank
    m.slots[i].merged = merged
    return new


def _junction_pairs(eff, bint monotone, base):
    """The base-symbol pairs some merge can join across, or None when there are too many.

    eff: the effective merges as (rank, left, right, merged), in rank order; base: the set of
    ids that can be base symbols (None: any id). first(t) / last(t): the base symbols a symbol
    t can start / end with: t itself if it may be a base symbol, and those of the left / right
    part of every merge producing t (a fixed point; one pass in rank order when the table is
    monotone). A merge (x, y) joins across last(x) x first(y). If the two base symbols on
    either side of a boundary are not such a pair, the first merge that would cross that
    boundary cannot exist, so BPE on the two sides separately gives the same ids."""
    first, last = {}, {}
    changed = True
    while changed:
        changed = False
        for _, a, b, m in eff:
            for table, part in ((first, a), (last, b)):
                dst = table.get(m)
                if dst is None:
                    dst = table[m] = {m} if base is None or m in base else set()
                src = table.get(part)
                n0 = len(dst)
                if src is None:
                    dst.add(part)
                else:
                    dst.update(src)
                if len(dst) != n0:
                    changed = True
        if monotone:
            break
    out = set()
    for _, a, b, m in eff:
        la = last.get(a) or (a,)
        fb = first.get(b) or (b,)
        if len(out) + len(la) * len(fb) > MAX_JUNCTIONS:
            return None
        for u in la:
            for v in fb:
                out.add((u, v))
    return out


# ---------------------------------------------------------------------------------------------
# Code point map for characters >= U+0100 (those below live in a flat table).

cdef struct CpSlot:
    uint32_t cp      # EMPTY32 = free
    int32_t id

cdef struct CpMap:
    CpSlot* slots
    uint64_t mask


cdef inline int32_t cp_get(const CpMap* m, uint32_t cp) noexcept nogil:
    cdef uint64_t i = mix64(cp) & m.mask
    while m.slots[i].cp != EMPTY32:
        if m.slots[i].cp == cp:
            return m.slots[i].id
        i = (i + 1) & m.mask
    return NOT_FOUND


# ---------------------------------------------------------------------------------------------
# Per-word cache: open addressing over entries whose key and ids live in one uint32 arena.

cdef struct CacheEntry:
    uint64_t hash    # of the code points
    int64_t off      # arena[off : off + klen] = code points, then nids ids
    int32_t klen
    int32_t nids


cdef struct PieceSlot:
    int32_t klen                  # symbols of the piece; 0 = empty
    int32_t nout
    int32_t key[PIECE_KEY]
    int32_t out[PIECE_KEY]


cdef struct ShortSlot:
    uint64_t key0    # the word's code points (each < 256), one byte each, first in the low byte
    uint64_t key1    # code points 8-15
    uint32_t meta    # klen | nids << 8; 0 = free
    int32_t ids[SHORT_IDS]


@cython.final
cdef class BPECore:
    """Encoding state: base-symbol maps, merges, surfaces for decoding, scratch buffers.

    Set up by the facade through set_vocab / set_merges; every call after that trusts it.
    """
    cdef int32_t latin1[256]         # code point < 256 -> char token id, or NOT_FOUND
    cdef int32_t byte_id[256]        # byte value -> byte token id, or NOT_FOUND (no fallback)
    cdef CpMap cpmap                 # code point >= 256 -> char token id
    cdef MergeMap merges
    cdef Py_ssize_t n_merges
    # rank -> (left, right, merged) of that listing, and the rank buckets' heads (-1 = empty
    # between calls); only used when the table is monotone (see set_merges)
    cdef int32_t* rank_a
    cdef int32_t* rank_b
    cdef int32_t* rank_m
    cdef int32_t* bucket_head
    cdef Py_ssize_t n_ranks
    cdef bint monotone
    # junctions: base-symbol pairs (u, v) that some merge can join across; a long word is cut
    # between two base symbols that are not a junction (no token ever spans that boundary)
    cdef MergeMap junctions
    cdef uint8_t* jbits              # the junctions between symbols < JBITS - 1 (EOW as JBITS - 1), a bitmap
    cdef bint cut_ok
    cdef int32_t space_id, bos_id, eos_id, pad_id
    # decoding: surfaces of every token, concatenated
    cdef uint8_t* surf
    cdef int64_t* surf_off           # (V + 1,)
    cdef Py_ssize_t vocab_size
    # per-word cache
    cdef int32_t* cache_slots        # table slot -> entry index, -1 = free
    cdef uint64_t cache_mask
    cdef CacheEntry* cache_entries
    cdef Py_ssize_t cache_n, cache_max
    cdef uint32_t* cache_arena
    cdef Py_ssize_t cache_arena_n, cache_arena_cap
    cdef public uint64_t cache_hits, cache_misses, cache_resets
    cdef ShortSlot* swt              # short-word table: key and ids in one 64-byte slot
    cdef PieceSlot* pieces           # (PIECE_SLOTS,) a short word's pieces -> their merged symbols
    cdef uint64_t swt_mask
    cdef Py_ssize_t swt_n
    # scratch: output ids and one word's symbols (sym: sym_cap), and the merge kernels' work
    # buffers for a piece or window of up to work_cap symbols: aux1, aux2, wsym (work_cap int32
    # each) and heap (3 * work_cap uint64)
    cdef int32_t* out
    cdef Py_ssize_t out_n, out_cap
    cdef int32_t* sym
    cdef Py_ssize_t sym_cap
    cdef int32_t* aux1
    cdef int32_t* aux2
    cdef int32_t* wsym
    cdef uint64_t* heap
    cdef Py_ssize_t work_cap
    cdef uint32_t err_cp

    def __cinit__(self):
        self.cpmap.slots = NULL
        self.merges.slots = NULL
        self.junctions.slots = NULL
        self.jbits = NULL
        self.rank_a = self.rank_b = self.rank_m = self.bucket_head = NULL
        self.n_ranks = 0
        self.monotone = True
        self.cut_ok = False
        self.surf = NULL
        self.surf_off = NULL
        self.cache_slots = NULL
        self.cache_entries = NULL
        self.cache_arena = NULL
        self.swt = NULL
        self.swt_n = 0
        self.pieces = NULL
        self.out = NULL
        self.sym = NULL
        self.aux1 = NULL
        self.aux2 = NULL
        self.wsym = NULL
        self.heap = NULL
        self.sym_cap = self.work_cap = 0

    def __init__(self, Py_ssize_t cache_words=65536):
        """cache_words: the per-word cache holds up to this many words (0 disables it)."""
        if cache_words < 0 or cache_words > (1 << 26):
            raise ValueError(f"cache_words must be in [0, 2**26], got {cache_words}")
        self.cache_max = cache_words
        self.space_id = self.bos_id = self.eos_id = self.pad_id = NOT_FOUND
        for i in range(256):
            self.latin1[i] = NOT_FOUND
            self.byte_id[i] = NOT_FOUND
        self._alloc_cpmap(16)
        self._alloc_merges(16)
        self.vocab_size = 0
        self.pieces = <PieceSlot*>calloc(PIECE_SLOTS, sizeof(PieceSlot))
        if self.pieces == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.cpmap.slots)
        free(self.merges.slots)
        free(self.junctions.slots)
        free(self.jbits)
        free(self.rank_a)
        free(self.rank_b)
        free(self.rank_m)
        free(self.bucket_head)
        free(self.surf)
        free(self.surf_off)
        free(self.cache_slots)
        free(self.cache_entries)
        free(self.cache_arena)
        free(self.swt)
        free(self.pieces)
        free(self.out)
        free(self.sym)
        free(self.aux1)
        free(self.aux2)
        free(self.wsym)
        free(self.heap)

    cdef int _alloc_cpmap(self, size_t n) except -1:
        cdef size_t cap = pow2_at_least(2 * n + 2)
        free(self.cpmap.slots)
        self.cpmap.slots = NULL
        self.cpmap.slots = <CpSlot*>xrealloc(NULL, cap * sizeof(CpSlot))
        memset(self.cpmap.slots, 0xFF, cap * sizeof(CpSlot))
        self.cpmap.mask = cap - 1
        return 0

    cdef int _alloc_merges(self, size_t n) except -1:
        cdef size_t cap = pow2_at_least(2 * n + 2)
        free(self.merges.slots)
        self.merges.slots = NULL
        self.merges.slots = <MergeSlot*>xrealloc(NULL, cap * sizeof(MergeSlot))
        memset(self.merges.slots, 0xFF, cap * sizeof(MergeSlot))
        self.merges.mask = cap - 1
        self.merges.shift = map_shift(cap)
        self.n_merges = 0
        return 0

    # ---- setup (called by the facade at birth and at every growth event)

    def set_vocab(self, chars, byte_ids, surfaces, int space_id, int bos_id, int eos_id, int pad_id):
        """chars: {code point: id} of one-character tokens; byte_ids: 256 ids (-1 = none);
        surfaces: bytes per token id (what decoding it contributes; b"" for specials);
        space_id: the token between words (-1 = none)."""
        cdef uint64_t i
        cdef uint32_t cp
        cdef Py_ssize_t v, total = 0
        for v in range(256):
            self.latin1[v] = NOT_FOUND
            b = byte_ids[v]
            self.byte_id[v] = NOT_FOUND if b < 0 else b
        self._alloc_cpmap(len(chars))
        for key, tid in chars.items():
            cp = key
            if cp < 256:
                self.latin1[cp] = tid
                continue
            i = mix64(cp) & self.cpmap.mask
            while self.cpmap.slots[i].cp != EMPTY32 and self.cpmap.slots[i].cp != cp:
                i = (i + 1) & self.cpmap.mask
            self.cpmap.slots[i].cp = cp
            self.cpmap.slots[i].id = tid
        self.space_id = NOT_FOUND if space_id < 0 else space_id
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        # surfaces, concatenated, for decode_bytes
        self.vocab_size = len(surfaces)
        for s in surfaces:
            total += len(<bytes>s)
        free(self.surf)
        self.surf = NULL
        free(self.surf_off)
        self.surf_off = NULL
        self.surf = <uint8_t*>xrealloc(NULL, total)
        self.surf_off = <int64_t*>xrealloc(NULL, (self.vocab_size + 1) * sizeof(int64_t))
        total = 0
        for v in range(self.vocab_size):
            s = surfaces[v]
            self.surf_off[v] = total
            if len(<bytes>s):
                memcpy(self.surf + total, <const char*>(<bytes>s), len(<bytes>s))
            total += len(<bytes>s)
        self.surf_off[self.vocab_size] = total
        self.clear_cache()

    def set_merges(self, merges):
        """merges: (left, right, merged) triples in rank order; a pair listed twice keeps its
        last rank (as the original's {pair: i for i, pair in enumerate(merges)}).

        Also derived here, for long words: whether the table is monotone (every pair that
        contains a merge's product ranks after that merge, as in a freshly trained table; then
        BPE takes the ranks in increasing order and the rank buckets apply), and the junctions
        (every base-symbol pair (last base symbol of a left part, first base symbol of a right
        part) some merge can join). Everything is computed before the tables are swapped."""
        cdef Py_ssize_t nr, r, cap
        cdef MergeMap mm, jm
        cdef int32_t* ra = NULL
        cdef int32_t* rb = NULL
        cdef int32_t* rm = NULL
        cdef int32_t* bh = NULL
        cdef uint8_t* jb = NULL
        cdef Py_ssize_t n_eff = 0, bit
        triples = [(int(t[0]), int(t[1]), int(t[2])) for t in merges]
        nr = len(triples)
        eff = {}                                   # (left, right) -> (rank, merged), last listing
        for r in range(nr):
            a, b, m = triples[r]
            eff[(a, b)] = (r, m)
        produced = {}                              # token -> highest rank that produces it
        for (a, b), (r, m) in eff.items():
            if r > produced.get(m, -1):
                produced[m] = r
        monotone = all(r > produced.get(a, -1) and r > produced.get(b, -1) for (a, b), (r, m) in eff.items())
        ordered = sorted((r, a, b, m) for (a, b), (r, m) in eff.items())
        junctions = self._junctions_simple(ordered) if monotone else None
        if junctions is None:
            junctions = _junction_pairs(ordered, monotone, self._base_symbol_set())
        mm.slots = jm.slots = NULL
        try:
            cap = pow2_at_least(2 * nr + 2)
            mm.slots = <MergeSlot*>xrealloc(NULL, cap * sizeof(MergeSlot))
            memset(mm.slots, 0xFF, cap * sizeof(MergeSlot))
            mm.mask = cap - 1
            mm.shift = map_shift(cap)
            cap = pow2_at_least(2 * (len(junctions) if junctions is not None else 0) + 2)
            jm.slots = <MergeSlot*>xrealloc(NULL, cap * sizeof(MergeSlot))
            memset(jm.slots, 0xFF, cap * sizeof(MergeSlot))
            jm.mask = cap - 1
            jm.shift = map_shift(cap)
            ra = <int32_t*>xrealloc(NULL, (nr + 1) * sizeof(int32_t))
            rb = <int32_t*>xrealloc(NULL, (nr + 1) * sizeof(int32_t))
            rm = <int32_t*>xrealloc(NULL, (nr + 1) * sizeof(int32_t))
            bh = <int32_t*>xrealloc(NULL, (nr + 1) * sizeof(int32_t))
            memset(bh, 0xFF, (nr + 1) * sizeof(int32_t))
            for r in range(nr):
                a, b, m = triples[r]
                ra[r], rb[r], rm[r] = a, b, m
                if _map_put(&mm, a, b, r, m):
                    n_eff += 1
            jb = <uint8_t*>xrealloc(NULL, JBITS * JBITS // 8)
            memset(jb, 0, JBITS * JBITS // 8)
            if junctions is not None:
                for a, b in junctions:
                    _map_put(&jm, a, b, 0, 0)
                    bit = _jbit(a, b)
                    if bit >= 0:
                        jb[bit >> 3] |= <uint8_t>(1 << (bit & 7))
        except BaseException:
            free(jb)
            free(mm.slots)
            free(jm.slots)
            free(ra)
            free(rb)
            free(rm)
            free(bh)
            raise
        # swap (no Python code from here on)
        free(self.merges.slots)
        free(self.junctions.slots)
        free(self.jbits)
        free(self.rank_a)
        free(self.rank_b)
        free(self.rank_m)
        free(self.bucket_head)
        self.merges = mm
        self.junctions = jm
        self.jbits = jb
        self.rank_a, self.rank_b, self.rank_m, self.bucket_head = ra, rb, rm, bh
        self.n_ranks = nr
        self.n_merges = n_eff
        self.monotone = monotone
        self.cut_ok = junctions is not None
        self.clear_cache()

    cdef object _junctions_simple(self, list ordered):
        """_junction_pairs for the common case, in C arrays: a monotone table over this
        vocabulary in which no merge produces a base symbol and every symbol starts and ends
        with one base symbol only (first/last are single ids; true of trained tables). None
        when the table is not of that kind (then _junction_pairs decides)."""
        cdef Py_ssize_t V = self.vocab_size, v
        cdef uint64_t i
        cdef int32_t a, b, m, la, fb
        cdef int32_t* first = NULL
        cdef int32_t* last = NULL
        cdef uint8_t* isbase = NULL
        if V == 0:
            return None
        try:
            first = <int32_t*>xrealloc(NULL, V * sizeof(int32_t))
            last = <int32_t*>xrealloc(NULL, V * sizeof(int32_t))
            isbase = <uint8_t*>xrealloc(NULL, V)
            memset(isbase, 0, V)
            for v in range(256):
                if 0 <= self.latin1[v] < V:
                    isbase[self.latin1[v]] = 1
                if 0 <= self.byte_id[v] < V:
                    isbase[self.byte_id[v]] = 1
            for i in range(self.cpmap.mask + 1):
                if self.cpmap.slots[i].cp != EMPTY32 and 0 <= self.cpmap.slots[i].id < V:
                    isbase[self.cpmap.slots[i].id] = 1
            for v in range(V):
                first[v] = last[v] = <int32_t>v if isbase[v] else NOT_FOUND
            out = []
            for _, a, b, m in ordered:
                if not (0 <= a < V and (b == EOW or 0 <= b < V) and 0 <= m < V) or isbase[m]:
                    return None
                la = last[a]
                fb = EOW if b == EOW else first[b]
                if la == NOT_FOUND or fb == NOT_FOUND:
                    return None
                if first[m] == NOT_FOUND:
                    first[m] = first[a]
                    last[m] = EOW if b == EOW else last[b]
                elif first[m] != first[a] or last[m] != (EOW if b == EOW else last[b]):
                    return None
                out.append((la, fb))
            return out
        finally:
            free(first)
            free(last)
            free(isbase)

    cdef object _base_symbol_set(self):
        """The ids encode can put in a word before merging (character and byte tokens, EOW), or
        None before set_vocab (then any id may be one)."""
        cdef Py_ssize_t v
        cdef uint64_t i
        if self.vocab_size == 0:
            return None
        out = {EOW}
        for v in range(256):
            if self.latin1[v] >= 0:
                out.add(self.latin1[v])
            if self.byte_id[v] >= 0:
                out.add(self.byte_id[v])
        for i in range(self.cpmap.mask + 1):
            if self.cpmap.slots[i].cp != EMPTY32:
                out.add(self.cpmap.slots[i].id)
        return out

    @property
    def monotone_merges(self):
        """Whether the merge table is monotone (long words then use the rank buckets)."""
        return bool(self.monotone)

    def is_junction(self, int a, int b):
        """Whether some merge can join a token ending in base symbol a to one starting with b
        (a long word is never cut there). True for every pair when cutting is off."""
        return (not self.cut_ok) or self.junction(a, b)

    cdef inline bint junction(self, int32_t a, int32_t b) noexcept:
        cdef int32_t merged = 0
        cdef Py_ssize_t bit = _jbit(a, b)
        if bit >= 0:
            return (self.jbits[bit >> 3] >> (bit & 7)) & 1
        return merge_rank(&self.junctions, a, b, &merged) != NO_RANK

    def clear_cache(self):
        """Forget every cached word and zero the counters."""
        self._reset_cache()
        self.cache_hits = 0
        self.cache_misses = 0
        self.cache_resets = 0

    cdef void _reset_cache(self) noexcept:
        if self.cache_slots != NULL:
            memset(self.cache_slots, 0xFF, (self.cache_mask + 1) * sizeof(int32_t))
        self.cache_n = 0
        self.cache_arena_n = 0
        if self.swt != NULL:
            memset(self.swt, 0, (self.swt_mask + 1) * sizeof(ShortSlot))
        self.swt_n = 0
        if self.pieces != NULL:
            memset(self.pieces, 0, PIECE_SLOTS * sizeof(PieceSlot))

    @property
    def cache_size(self):
        """Words in the cache now (both tables)."""
        return self.cache_n + self.swt_n

    cdef int _swt_grow(self) except -1:
        """Create the short-word table, or double it (rehashing) when half full."""
        cdef size_t cap = 1024 if self.swt == NULL else 2 * (self.swt_mask + 1), i
        cdef ShortSlot* old = self.swt
        cdef ShortSlot* t = <ShortSlot*>xrealloc(NULL, cap * sizeof(ShortSlot))
        cdef uint64_t j, mask = cap - 1
        memset(t, 0, cap * sizeof(ShortSlot))
        if old != NULL:
            for i in range(self.swt_mask + 1):
                if old[i].meta:
                    j = _short_hash(old[i].key0, old[i].key1, old[i].meta & 0xFF) & mask
                    while t[j].meta:
                        j = (j + 1) & mask
                    t[j] = old[i]
            free(old)
        self.swt = t
        self.swt_mask = mask
        return 0

    def merge_rank(self, int a, int b):
        """(rank, merged id) of the pair, or None."""
        cdef int32_t merged = 0
        cdef int32_t r = merge_rank(&self.merges, a, b, &merged)
        return None if r == NO_RANK else (r, merged)

    # ---- scratch

    cdef int _ensure_out(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t need = self.out_n + extra, cap
        if need > self.out_cap:
            cap = max(need, 2 * self.out_cap, 1024)
            self.out = <int32_t*>xgrow(self.out, self.out_n * sizeof(int32_t), cap * sizeof(int32_t))
            self.out_cap = cap
        return 0

    cdef void _free_sym(self) noexcept:
        free(self.sym)
        self.sym = NULL
        self.sym_cap = 0

    cdef void _free_work(self) noexcept:
        free(self.aux1)
        free(self.aux2)
        free(self.wsym)
        free(self.heap)
        self.aux1 = self.aux2 = self.wsym = NULL
        self.heap = NULL
        self.work_cap = 0

    cdef int _ensure_sym(self, Py_ssize_t n) except -1:
        """Room for n symbols in sym, keeping its contents (a word's symbols while written)."""
        cdef Py_ssize_t cap
        if n > self.sym_cap:
            cap = max(n, 2 * self.sym_cap, 64)
            self.sym = <int32_t*>xgrow(self.sym, self.sym_cap * sizeof(int32_t), cap * sizeof(int32_t))
            self.sym_cap = cap
        return 0

    cdef int _ensure_work(self, Py_ssize_t n) except -1:
        """Work buffers for a piece of n symbols (contents not kept)."""
        cdef Py_ssize_t cap
        cdef void* a
        cdef void* b
        cdef void* w
        cdef void* h
        if n > self.work_cap:
            cap = max(n, 2 * self.work_cap, 64)
            # all four are allocated before any is replaced (a MemoryError leaves them intact)
            a = b = w = h = NULL
            try:
                a = xgrow(NULL, 0, cap * sizeof(int32_t))
                b = xgrow(NULL, 0, cap * sizeof(int32_t))
                w = xgrow(NULL, 0, cap * sizeof(int32_t))
                h = xgrow(NULL, 0, 3 * cap * sizeof(uint64_t))
            except MemoryError:
                free(a)
                free(b)
                free(w)
                raise
            self._free_work()
            self.aux1 = <int32_t*>a
            self.aux2 = <int32_t*>b
            self.wsym = <int32_t*>w
            self.heap = <uint64_t*>h
            self.work_cap = cap
        return 0

    cdef int _ensure_cache(self) except -1:
        cdef size_t n
        if self.cache_slots == NULL:
            n = pow2_at_least(2 * self.cache_max)
            self.cache_slots = <int32_t*>xrealloc(NULL, n * sizeof(int32_t))
            self.cache_mask = n - 1
            self.cache_entries = <CacheEntry*>xrealloc(NULL, self.cache_max * sizeof(CacheEntry))
            memset(self.cache_slots, 0xFF, n * sizeof(int32_t))     # (the short-word table stays)
            self.cache_n = 0
            self.cache_arena_n = 0
        return 0

    cdef int _cache_reserve(self, Py_ssize_t need) except -1:
        """Room for need more uint32 in the cache arena."""
        cdef Py_ssize_t cap
        if self.cache_arena_n + need > self.cache_arena_cap:
            cap = max(self.cache_arena_n + need, 2 * self.cache_arena_cap, 4096)
            self.cache_arena = <uint32_t*>xrealloc(self.cache_arena, cap * sizeof(uint32_t))
            self.cache_arena_cap = cap
        return 0

    # ---- base symbols

    cdef inline int base_symbols(self, uint32_t cp, int32_t* dst) noexcept:
        """Write the base symbols of one character to dst (1 to 4); 0 if it has none."""
        cdef int32_t t
        cdef uint8_t b[4]
        cdef int n, k
        if cp < 256:
            t = self.latin1[cp]
        else:
            t = cp_get(&self.cpmap, cp)
        if t >= 0:
            dst[0] = t
            return 1
        n = utf8_encode(cp, b)
        for k in range(n):
            t = self.byte_id[b[k]]
            if t < 0:
                self.err_cp = cp
                return 0
            dst[k] = t
        return n

    # ---- merge application (one word, in place; returns the new length)

    cdef Py_ssize_t apply_naive(self, int32_t* s, Py_ssize_t n) noexcept:
        """Greedy BPE by rescanning a rank array: lowest rank first, leftmost on ties. O(n^2)."""
        cdef int32_t* ranks = self.aux1
        cdef int32_t* mids = self.aux2
        cdef Py_ssize_t i, bi
        cdef uint64_t best, v
        for i in range(n - 1):
            ranks[i] = merge_rank(&self.merges, s[i], s[i + 1], &mids[i])
        while n > 1:
            # (rank, position) packed in one integer: a branch-free minimum (the comparisons
            # are unpredictable), lowest rank first, leftmost on ties
            best = (<uint64_t>NO_RANK) << 32
            for i in range(n - 1):
                v = ((<uint64_t><uint32_t>ranks[i]) << 32) | <uint64_t>i
                best = v if v < best else best
            if (best >> 32) == <uint64_t>NO_RANK:
                break
            bi = <Py_ssize_t>(best & 0xFFFFFFFFu)
            s[bi] = mids[bi]
            # drop symbol bi+1 and the pair that started at it
            move_i32(s + bi + 1, s + bi + 2, n - bi - 2)
            if n - bi - 3 > 0:
                move_i32(ranks + bi + 1, ranks + bi + 2, n - bi - 3)
                move_i32(mids + bi + 1, mids + bi + 2, n - bi - 3)
            n -= 1
            if bi > 0:
                ranks[bi - 1] = merge_rank(&self.merges, s[bi - 1], s[bi], &mids[bi - 1])
            if bi < n - 1:
                ranks[bi] = merge_rank(&self.merges, s[bi], s[bi + 1], &mids[bi])
        return n

    cdef Py_ssize_t apply_heap(self, int32_t* s, Py_ssize_t n) noexcept:
        """The same greedy BPE in O(n log n): a min-heap of (rank << 32 | position) over a
        doubly linked list of symbols. Stale entries (position merged away, or its pair changed)
        are skipped when popped; positions keep their left-to-right order, so the smallest
        (rank, position) is exactly the lowest-rank, leftmost pair."""
        cdef int32_t* nxt = self.aux1
        cdef int32_t* prv = self.aux2
        cdef uint64_t* h = self.heap
        cdef Py_ssize_t hn = 0, i, p, q, r
        cdef uint64_t top, e
        cdef int32_t rank, merged = 0, pos
        for i in range(n):
            nxt[i] = <int32_t>(i + 1) if i + 1 < n else -1
            prv[i] = <int32_t>(i - 1)
        # heapify all initial pairs
        for i in range(n - 1):
            rank = merge_rank(&self.merges, s[i], s[i + 1], &merged)
            if rank != NO_RANK:
                h[hn] = ((<uint64_t>rank) << 32) | <uint64_t>i
                hn += 1
        i = hn // 2 - 1
        while i >= 0:
            _sift_down(h, hn, i)
            i -= 1
        while hn > 0:
            top = h[0]
            hn -= 1
            if hn > 0:
                h[0] = h[hn]
                _sift_down(h, hn, 0)
            pos = <int32_t>(top & 0xFFFFFFFF)
            rank = <int32_t>(top >> 32)
            q = nxt[pos]
            if s[pos] == NOT_FOUND or q < 0:
                continue
            if merge_rank(&self.merges, s[pos], s[q], &merged) != rank:
                continue
            s[pos] = merged
            s[q] = NOT_FOUND          # dead
            r = nxt[q]
            nxt[pos] = <int32_t>r
            if r >= 0:
                prv[r] = pos
            p = prv[pos]
            if p >= 0:
                rank = merge_rank(&self.merges, s[p], s[pos], &merged)
                if rank != NO_RANK:
                    e = ((<uint64_t>rank) << 32) | <uint64_t>p
                    h[hn] = e
                    hn += 1
                    _sift_up(h, hn - 1)
            if r >= 0:
                rank = merge_rank(&self.merges, s[pos], s[r], &merged)
                if rank != NO_RANK:
                    e = ((<uint64_t>rank) << 32) | <uint64_t>pos
                    h[hn] = e
                    hn += 1
                    _sift_up(h, hn - 1)
        return linked_tokens(s, s, nxt, n)  # compact the surviving symbols

    cdef Py_ssize_t apply_bucket(self, int32_t* s, Py_ssize_t n) noexcept:
        """The same greedy BPE in O(n + ranks), for a monotone table (see _bucket_run); needs
        work buffers for n symbols."""
        if not self._bucket_run(s, n, NULL):
            return n                      # nothing merges
        return linked_tokens(s, s, self.aux1, n)

    cdef bint _bucket_run(self, int32_t* s, Py_ssize_t n, Py_ssize_t* frontier) noexcept:
        """Rank buckets over s[:n] (monotone table; work buffers for n symbols). BPE then takes
        the ranks in increasing order, and rank r merges every occurrence of its one pair
        (a, b), leftmost first. Positions of pairs go to a bucket per rank (a linked list in a
        pool: each merge adds at most two entries, so the pool holds at most 3n); rank r's
        bucket is read once, skipping stale entries. For a != b its occurrences are disjoint, so
        their order does not matter; for a == b a run of a's pairs from its left end, so only
        the entry at a run's start walks the run. Merges at rank r create pairs of higher rank
        only (monotone).

        Leaves the result as a linked list: s[i] the token starting at base position i
        (NOT_FOUND inside a token), nxt = aux1 (next token's start, -1 after the last), prv =
        aux2. Returns False when nothing merged and frontier is NULL (then the lists are not
        built and s is unchanged).

        frontier != NULL: s[:n] is a window cut out of a longer piece T = s[:n] + more, and on
        return frontier[0] = F, a token boundary of the window such that the window's tokens
        before F are T's tokens (0 when no such F > 0 was found). The invariant, kept rank by
        rank: the tokens before F are the same in both and F is a boundary in both. At rank r,
        before its merges: the window's last token z before F may merge across F in T (whose
        symbols after F are unknown) only if z == left part of r; then F moves to z's start.
        Nothing else differs: a merge (y, z) with z the right part happens in both (for
        a != b, z cannot also be merged rightward at rank r; for a == b, a run pairs from its
        left end, which is before F in both); merges wholly before F see the same symbols. A
        token of the window that grows across F (a run pairing over it) moves F to its start.
        F moves by at most one token per rank, so F >= n - (sum over ranks of the left part's
        length) and is near n in practice."""
        cdef int32_t* nxt = self.aux1
        cdef int32_t* prv = self.aux2
        cdef uint64_t* pool = self.heap
        cdef int32_t* head = self.bucket_head
        cdef Py_ssize_t i, F = n, last
        cdef uint32_t pk = 0, k
        cdef int32_t r, lo = NO_RANK, hi = -1, rk, a, b, m, p, q, nq, pp, merged = 0, fz, e
        cdef uint64_t ent
        cdef bint track = frontier != NULL
        for i in range(n - 1):
            rk = merge_rank(&self.merges, s[i], s[i + 1], &merged)
            if rk != NO_RANK:
                pool[pk] = ((<uint64_t>i) << 32) | <uint32_t>head[rk]
                head[rk] = <int32_t>pk
                pk += 1
                if rk < lo:
                    lo = rk
                if rk > hi:
                    hi = rk
        if pk == 0 and not track:
            return False                  # nothing merges: leave the lists unbuilt
        for i in range(n):
            nxt[i] = <int32_t>(i + 1) if i + 1 < n else -1
            prv[i] = <int32_t>(i - 1)
        if track:
            # every rank can move the frontier, also those with empty buckets; buckets of ranks
            # above hi are empty (-1), so the loop below passes over them at no cost
            r = 0
            last = self.n_ranks - 1
            fz = <int32_t>(n - 1)         # the start of the token that ends at F
        else:
            r = lo
            last = hi
            fz = -1
        while r <= last:
            if fz >= 0:
                # the token ending at F: fz's token, or the one that absorbed it
                while True:
                    while s[fz] == NOT_FOUND:
                        fz = prv[fz]
                    e = nxt[fz]
                    if (e if e >= 0 else n) == F:
                        break
                    F = fz                # fz's token grew across F: F moves to its start
                    fz = prv[fz]
                    if fz < 0:
                        break
                if fz >= 0 and s[fz] == self.rank_a[r]:
                    F = fz                # it may merge across F in the longer piece
                    fz = prv[fz]
            if head[r] < 0:
                r += 1
                continue
            k = <uint32_t>head[r]
            head[r] = -1
            a = self.rank_a[r]
            b = self.rank_b[r]
            m = self.rank_m[r]
            while k != 0xFFFFFFFFu:
                ent = pool[k]
                p = <int32_t>(ent >> 32)
                k = <uint32_t>(ent & 0xFFFFFFFFu)
                if s[p] != a:
                    continue
                q = nxt[p]
                if q < 0 or s[q] != b:
                    continue
                if a == b:
                    pp = prv[p]
                    if pp >= 0 and s[pp] == a:
                        continue          # not the run's start: that entry walks this run
                while True:
                    s[p] = m
                    s[q] = NOT_FOUND      # dead
                    nq = nxt[q]
                    nxt[p] = nq
                    if nq >= 0:
                        prv[nq] = p
                    pp = prv[p]
                    if pp >= 0:
                        rk = merge_rank(&self.merges, s[pp], m, &merged)
                        if rk != NO_RANK:
                            pool[pk] = ((<uint64_t>pp) << 32) | <uint32_t>head[rk]
                            head[rk] = <int32_t>pk
                            pk += 1
                            if rk > hi:
                                hi = rk
                    if nq >= 0 and not (a == b and s[nq] == a and nxt[nq] >= 0 and s[nxt[nq]] == a):
                        # (in a run the next two a's merge right away: that pair would be stale)
                        rk = merge_rank(&self.merges, m, s[nq], &merged)
                        if rk != NO_RANK:
                            pool[pk] = ((<uint64_t>p) << 32) | <uint32_t>head[rk]
                            head[rk] = <int32_t>pk
                            pk += 1
                            if rk > hi:
                                hi = rk
                    if a != b:
                        break
                    # the run goes on: pair the next two a's
                    p = nq
                    if p < 0 or s[p] != a:
                        break
                    q = nxt[p]
                    if q < 0 or s[q] != a:
                        break
            if not track:
                last = hi                 # (this rank's merges added entries up to rank hi)
            r += 1
        if track:
            # the last rank's merges may have grown a token across F
            while fz >= 0:
                while s[fz] == NOT_FOUND:
                    fz = prv[fz]
                e = nxt[fz]
                if (e if e >= 0 else n) == F:
                    break
                F = fz
                fz = prv[fz]
            frontier[0] = F if fz >= 0 else 0
        return True

    cdef Py_ssize_t window_step(self, const int32_t* s, Py_ssize_t wmax, Py_ssize_t window,
                                int32_t* dst, Py_ssize_t* nout) except -1:
        """One window of a long piece s[:wmax] + more (monotone table): the rank buckets on a
        copy of s[:w] (wsym; w = window, doubled up to wmax while no token is final), and the
        tokens before its frontier (_bucket_run), which are final, written to dst (nout[0] of
        them; dst may overlap s). Returns the frontier, the symbols of s consumed (a boundary
        of the piece's tokens: the rest encodes on its own, no merge crosses it), or 0 when
        even s[:wmax] has no final token."""
        cdef Py_ssize_t w = min(window, wmax), F = 0
        cdef int32_t* ws
        nout[0] = 0
        while w > 0:
            if w > self.work_cap:
                self._ensure_work(w)
            ws = self.wsym
            memcpy(ws, s, w * sizeof(int32_t))
            self._bucket_run(ws, w, &F)
            if F > 0:
                nout[0] = linked_tokens(dst, ws, self.aux1, F)
                return F
            if w >= wmax:
                break
            w = min(2 * w, wmax)          # no final token yet: a larger window
        return 0

    cdef Py_ssize_t apply_windowed(self, int32_t* s, Py_ssize_t n, Py_ssize_t window) except -1:
        """The same greedy BPE of s[:n] (monotone table), window by window (window_step); a
        window never reaches the piece's end. The rest, about a window (with the piece's end,
        and the end-of-word marker if any), goes to apply_piece. Work buffers: `window`
        symbols (more only if a window is doubled)."""
        cdef Py_ssize_t c0 = 0, wo = 0, F, k = 0, got
        while n - c0 > window:
            F = self.window_step(s + c0, n - c0 - 1, window, s + wo, &k)
            if F == 0:
                break
            c0 += F
            wo += k
        got = n - c0
        if got > self.work_cap:
            self._ensure_work(got)
        got = self.apply_piece(s + c0, got)
        if wo != c0:
            move_i32(s + wo, s + c0, got)
        return wo + got

    cdef inline Py_ssize_t apply_piece(self, int32_t* s, Py_ssize_t n) noexcept:
        """One of the whole-piece kernels by size (work buffers for n symbols)."""
        if n < 2:
            return n
        if n <= NAIVE_MAX:
            return self.apply_naive(s, n)
        if n <= HEAP_MAX or not self.monotone:
            return self.apply_heap(s, n)
        return self.apply_bucket(s, n)

    cdef inline Py_ssize_t apply_segment(self, int32_t* s, Py_ssize_t n) except -1:
        """apply_piece, or windows for a long piece under a monotone table (work buffers for
        min(n, WINDOW) symbols then, else n)."""
        if n > WINDOW and self.monotone:
            return self.apply_windowed(s, n, WINDOW)
        return self.apply_piece(s, n)

    cdef Py_ssize_t apply_long(self, int32_t* s, Py_ssize_t n) except -1:
        """A long word: cut it between base symbols that no merge can join across (see
        _junction_pairs), apply the merges to each piece, and close up the pieces."""
        cdef Py_ssize_t i, k, start = 0, w = 0, got
        if not self.cut_ok:
            return self.apply_segment(s, n)
        for i in range(n):
            if i + 1 < n and self.junction(s[i], s[i + 1]):
                continue
            # a piece ends at i
            got = i + 1 - start
            if got > 1:
                got = self.apply_segment(s + start, got)
            if w != start:
                if got == 1:
                    s[w] = s[start]
                else:
                    move_i32(s + w, s + start, got)
            w += got
            start = i + 1
        return w

    cdef inline Py_ssize_t apply(self, int32_t* s, Py_ssize_t n) except -1:
        """The merges applied to one word s[:n] in place; returns the new length."""
        if n < 2 or self.n_merges == 0:
            return n
        if n > self.work_cap:
            self._ensure_work(min(n, WINDOW) if self.monotone else n)
        if n <= NAIVE_MAX:
            return self.apply_short(s, n) if self.cut_ok else self.apply_naive(s, n)
        return self.apply_long(s, n)

    cdef Py_ssize_t apply_short(self, int32_t* s, Py_ssize_t n) noexcept:
        """A word of at most NAIVE_MAX symbols, cut as apply_long cuts (between base symbols no
        merge joins across): its pieces are a few symbols each, so most of the rank scan's
        lookups and moves are never made. A two-symbol piece is one lookup; pieces of up to
        PIECE_KEY symbols recur across words (stems, endings), so their results are kept in a
        direct-mapped table (self.pieces, emptied with the word cache)."""
        cdef Py_ssize_t i, k, start = 0, w = 0, got
        cdef int32_t a, b, merged = 0
        cdef uint64_t h
        cdef PieceSlot* ps
        for i in range(n):
            if i + 1 < n and self.junction(s[i], s[i + 1]):
                continue
            got = i + 1 - start
            if got == 1:
                s[w] = s[start]
            elif got == 2:
                a = s[start]
                b = s[start + 1]
                if merge_rank(&self.merges, a, b, &merged) != NO_RANK:
                    s[w] = merged
                    got = 1
                else:
                    s[w] = a
                    s[w + 1] = b
            elif got <= PIECE_KEY:
                h = <uint64_t>got
                for k in range(got):
                    h = (h ^ <uint32_t>s[start + k]) * <uint64_t>0x100000001B3ULL
                ps = &self.pieces[mix64(h) & (PIECE_SLOTS - 1)]
                if ps.klen == got and same_u32(<const uint32_t*>ps.key, <const uint32_t*>(s + start), got):
                    for k in range(ps.nout):
                        s[w + k] = ps.out[k]
                    got = ps.nout
                else:
                    for k in range(got):
                        ps.key[k] = s[start + k]
                    got = self.apply_naive(s + start, got)
                    for k in range(got):
                        ps.out[k] = s[start + k]
                        s[w + k] = s[start + k]   # w <= start: a forward copy
                    ps.klen = <int32_t>(i + 1 - start)
                    ps.nout = <int32_t>got
            else:
                got = self.apply_naive(s + start, got)
                for k in range(got):
                    s[w + k] = s[start + k]
            w += got
            start = i + 1
        return w

    def _apply_merges_memview(self, symbols, str method="auto", Py_ssize_t window=WINDOW):
        """Test twin: apply the merges to a list of symbol ids with 'naive', 'heap', 'bucket'
        (monotone tables only), 'window' (apply_windowed with windows of `window` symbols;
        monotone tables only), 'cut' (pieces between non-junctions, each by 'auto' rules) or
        'auto' (what encode does)."""
        cdef Py_ssize_t n = len(symbols), i
        if method not in ("naive", "heap", "bucket", "window", "cut", "auto"):
            raise ValueError(f"method must be 'naive', 'heap', 'bucket', 'window', 'cut' or 'auto', got {method!r}")
        if method in ("bucket", "window") and not self.monotone:
            raise ValueError(f"method {method!r} needs a monotone merge table")
        if window < 1:
            raise ValueError(f"window must be at least 1 symbol, got {window}")
        self._ensure_sym(n + 1)
        for i in range(n):
            self.sym[i] = symbols[i]
        if n > 1 and self.n_merges > 0:
            if method == "window":
                self._ensure_work(min(n, window))
                n = self.apply_windowed(self.sym, n, window)
            elif method != "auto" and method != "cut":
                self._ensure_work(n)
                if method == "naive":
                    n = self.apply_naive(self.sym, n)
                elif method == "heap":
                    n = self.apply_heap(self.sym, n)
                else:
                    n = self.apply_bucket(self.sym, n)
            elif method == "cut":
                self._ensure_work(min(n, WINDOW) if self.monotone else n)
                n = self.apply_long(self.sym, n)
            else:
                n = self.apply(self.sym, n)
        return [self.sym[i] for i in range(n)]

    # ---- encode

    def encode(self, str text, bint bpe):
        """Ids of text: <BOS>, tokens, <EOS>. Raises TokenizerError on a character with no
        token and no byte tokens to fall back to."""
        self._encode_into(text, bpe)
        return self._take_out_list()

    def encode_array(self, str text, bint bpe):
        """encode() as a numpy int32 array (one memcpy; no Python int per id)."""
        self._encode_into(text, bpe)
        return self._take_out_array()

    cdef int _encode_into(self, str text, bint bpe) except -1:
        """Encode into self.out[:self.out_n]."""
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text)
        cdef unsigned int kind = PyUnicode_KIND(text)
        cdef void* data = PyUnicode_DATA(text)
        cdef int rc
        self.out_n = 0
        self._ensure_out(2)
        self.out[self.out_n] = self.bos_id
        self.out_n += 1
        try:
            if kind == PyUnicode_1BYTE_KIND:
                rc = _encode_text(self, <const uint8_t*>data, n, bpe)
            elif kind == PyUnicode_2BYTE_KIND:
                rc = _encode_text(self, <const uint16_t*>data, n, bpe)
            else:
                rc = _encode_text(self, <const uint32_t*>data, n, bpe)
        finally:
            if self.sym_cap > 4 * STREAM:    # a huge word was encoded: do not keep its scratch
                self._free_sym()
            if self.work_cap > (1 << 16):    # (a table that is not monotone, or doubled windows)
                self._free_work()
        if rc == -2:
            ch = chr(self.err_cp)
            raise TokenizerError(
                f"character {ch!r} (U+{self.err_cp:04X}) has no token and this tokenizer has no "
                f"byte tokens to spell it; call enable_byte_fallback() once (it appends the byte "
                f"tokens and returns the new vocabulary size) so that every string encodes")
        self._ensure_out(1)
        self.out[self.out_n] = self.eos_id
        self.out_n += 1
        return 0

    cdef object _take_out_array(self):
        """The output ids as a numpy int32 array; the buffer is detached while the array is
        created (as in _take_out_list)."""
        cdef int32_t* buf = self.out
        cdef Py_ssize_t n = self.out_n, cap = self.out_cap
        cdef int32_t[::1] view
        self.out = NULL
        self.out_n = self.out_cap = 0
        try:
            arr = _np.empty(n, dtype=_np.int32)
            if n:
                view = arr
                memcpy(&view[0], buf, n * sizeof(int32_t))
        finally:
            if self.out == NULL and cap <= (1 << 20):
                self.out = buf
                self.out_cap = cap
            else:
                free(buf)
        return arr

    cdef object _take_out_list(self):
        """The output ids as a list. The buffer is detached first: creating the list may run a
        garbage collection, hence finalizers, hence another thread's encode on this core."""
        cdef int32_t* buf = self.out
        cdef Py_ssize_t i, n = self.out_n, cap = self.out_cap
        cdef PyObject* item
        self.out = NULL
        self.out_n = self.out_cap = 0
        try:
            lst = PyList_New(n)
            for i in range(n):
                item = PyLong_FromLong(buf[i])
                if item == NULL:
                    raise MemoryError()
                PyList_SET_ITEM_STEAL(lst, i, item)
        finally:
            if self.out == NULL and cap <= (1 << 20):    # keep a modest buffer for the next call
                self.out = buf
                self.out_cap = cap
            else:
                free(buf)
        return lst

    # ---- decode

    def decode_bytes(self, ids):
        """The concatenated surfaces of ids: <BOS>/<PAD> skipped, stop at <EOS>.
        Raises TokenizerError on an id outside the vocabulary."""
        cdef Py_ssize_t n = 0, cap = 256, total = 0, k, nb
        cdef long t
        cdef int64_t* tids = <int64_t*>xrealloc(NULL, cap * sizeof(int64_t))
        cdef uint8_t* buf = NULL
        try:
            # 1. collect the ids: iterating may run Python code (a generator, __index__), so
            #    nothing that set_vocab may replace is read here
            for obj in ids:
                # exactly int (or anything with __index__, like numpy ints); never truncate a float
                try:
                    t = obj if PyLong_CheckExact(obj) else PyNumber_Index(obj)
                except OverflowError:  # beyond a C long: outside any vocabulary, not an overflow
                    raise TokenizerError(
                        f"token id {PyNumber_Index(obj)} is outside the vocabulary (size {self.vocab_size}); "
                        f"decode only ids this tokenizer produced") from None
                if n == cap:
                    cap *= 2
                    tids = <int64_t*>xrealloc(tids, cap * sizeof(int64_t))
                tids[n] = t
                n += 1
                if t == self.eos_id:
                    break
            # 2. no Python code from here on: atomic under the GIL
            for k in range(n):
                t = tids[k]
                if t < 0 or t >= self.vocab_size:
                    raise TokenizerError(
                        f"token id {t} is outside the vocabulary (size {self.vocab_size}); "
                        f"decode only ids this tokenizer produced")
                total += self.surf_off[t + 1] - self.surf_off[t]
            buf = <uint8_t*>xrealloc(NULL, total)
            total = 0
            for k in range(n):
                t = tids[k]
                if t == self.eos_id:
                    break
                nb = self.surf_off[t + 1] - self.surf_off[t]   # <BOS>/<PAD> have none
                memcpy(buf + total, self.surf + self.surf_off[t], nb)
                total += nb
            return PyBytes_FromStringAndSize(<const char*>buf, total)
        finally:
            free(tids)
            free(buf)

    # ---- training

    def train(self, lines, Py_ssize_t num_merges, merged_id, bint segmented=False):
        """Learn up to num_merges merges from the whitespace-split words of lines.

        merged_id(left, right) -> id is called once per merge and returns the token of the merged
        symbol (an existing token with the same text, or a new one); right may be EOW.
        Returns the merges as (left, right, merged) triples, in rank order. Ties between pairs of
        equal count go to the pair met first when scanning the distinct words in first-occurrence
        order, symbols left to right (the original's rule).
        segmented: the words are counted as this core's merges segment them (base symbols
        otherwise), so the merges learned continue the current table instead of replacing it.
        """
        cdef _Trainer tr = _Trainer()
        tr.segmented = segmented
        for line in lines:
            tr.count_line(self, line)
        tr.init_pairs()
        return tr.run(num_merges, merged_id)


cdef inline void _sift_down(uint64_t* h, Py_ssize_t n, Py_ssize_t i) noexcept nogil:
    cdef Py_ssize_t c
    cdef uint64_t x = h[i]
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        if c + 1 < n and h[c + 1] < h[c]:
            c += 1
        if h[c] >= x:
            break
        h[i] = h[c]
        i = c
    h[i] = x


cdef inline void _sift_up(uint64_t* h, Py_ssize_t i) noexcept nogil:
    cdef uint64_t x = h[i]
    cdef Py_ssize_t p
    while i > 0:
        p = (i - 1) >> 1
        if h[p] <= x:
            break
        h[i] = h[p]
        i = p
    h[i] = x


cdef int _encode_text(BPECore c, const char_t* data, Py_ssize_t n, bint bpe) except -1:
    """Strip, then char mode (one token per character) or BPE mode (words, space between).
    Returns 0, or -2 when a character has no base symbols (its code point in c.err_cp)."""
    cdef Py_ssize_t start = 0, end = n, i, j, k, klen, before, nids
    cdef uint32_t cp, meta
    cdef uint64_t hash, key, key1, slot
    cdef ShortSlot* ss = NULL
    cdef int32_t* dst
    cdef bint first = True
    cdef int got
    while start < end and is_space(data[start]):
        start += 1
    while end > start and is_space(data[end - 1]):
        end -= 1
    if not bpe:
        for i in range(start, end):
            if c.out_n + 4 > c.out_cap:
                c._ensure_out(4)
            got = c.base_symbols(data[i], c.out + c.out_n)
            if got == 0:
                return -2
            c.out_n += got
        return 0
    i = start
    while i < end:
        while i < end and is_space(data[i]):
            i += 1
        if i >= end:
            break
        j = i
        while j < end and not is_space(data[j]):
            j += 1
        if c.out_n + SHORT_IDS + 1 > c.out_cap:
            c._ensure_out(SHORT_IDS + 1)
        if not first:
            if c.space_id < 0:
                c.err_cp = 0x20
                return -2
            c.out[c.out_n] = c.space_id
            c.out_n += 1
        first = False
        klen = j - i
        if klen <= SHORT_KEY and c.cache_max > 0:
            # the short-word table: one 64-byte slot (a cache line) holds the key and the ids
            key = 0
            key1 = 0
            for k in range(klen):
                if data[i + k] > 0xFF:
                    break
                if k < 8:
                    key |= (<uint64_t>data[i + k]) << (8 * k)
                else:
                    key1 |= (<uint64_t>data[i + k]) << (8 * (k - 8))
            else:
                meta = <uint32_t>klen
                if c.swt == NULL:
                    c._swt_grow()
                slot = _short_hash(key, key1, meta) & c.swt_mask
                while True:
                    ss = &c.swt[slot]
                    if ss.meta == 0:
                        break
                    if ss.key0 == key and ss.key1 == key1 and (ss.meta & 0xFF) == meta:
                        dst = c.out + c.out_n
                        nids = ss.meta >> 8
                        for k in range(SHORT_IDS):   # fixed count: the out buffer has room for it
                            dst[k] = ss.ids[k]
                        c.out_n += nids
                        c.cache_hits += 1
                        break
                    slot = (slot + 1) & c.swt_mask
                if ss.meta != 0:
                    i = j
                    continue
                c.cache_misses += 1
                before = c.out_n
                if _emit_word(c, data + i, klen, 0, False) == -2:
                    return -2
                nids = c.out_n - before
                if nids <= SHORT_IDS:
                    if c.swt_n + c.cache_n >= c.cache_max:     # full: start over
                        c._reset_cache()
                        c.cache_resets += 1
                    if 2 * (c.swt_n + 1) > <Py_ssize_t>(c.swt_mask + 1):
                        c._swt_grow()
                    slot = _short_hash(key, key1, meta) & c.swt_mask
                    while c.swt[slot].meta:
                        slot = (slot + 1) & c.swt_mask
                    ss = &c.swt[slot]
                    ss.key0 = key
                    ss.key1 = key1
                    ss.meta = meta | (<uint32_t>nids << 8)
                    for k in range(nids):
                        ss.ids[k] = c.out[before + k]
                    for k in range(nids, SHORT_IDS):
                        ss.ids[k] = 0
                    c.swt_n += 1
                i = j
                continue
        if klen > STREAM and c.monotone and c.n_merges > 0:
            if _emit_long(c, data + i, klen) == -2:     # (never cached: longer than CACHE_KEY)
                return -2
            i = j
            continue
        hash = FNV_SEED
        for k in range(i, j):
            hash = (hash ^ data[k]) * FNV_PRIME
        if _emit_word(c, data + i, klen, mix64(hash) | 1, True) == -2:
            return -2
        i = j
    return 0


cdef inline uint64_t _short_hash(uint64_t key0, uint64_t key1, uint32_t klen) noexcept nogil:
    return mix64(key0 ^ (key1 * <uint64_t>0x9E3779B97F4A7C15ULL) ^ (<uint64_t>klen << 59))


cdef inline bint _same_key(const uint32_t* key, const char_t* w, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if key[i] != w[i]:
            return False
    return True


cdef int _emit_word(BPECore c, const char_t* w, Py_ssize_t klen, uint64_t hash, bint use_cache) except -1:
    """Append the ids of one word (code points w[:klen], read in place) to c.out, through the
    cache when use_cache (key: the code points as uint32, whatever the str's kind). Returns -2
    when a character has no base symbols."""
    cdef Py_ssize_t i, n = 0, nout
    cdef uint64_t slot = 0
    cdef int32_t ei
    cdef CacheEntry* e
    cdef bint cacheable = use_cache and klen <= CACHE_KEY and c.cache_max > 0
    cdef int got
    cdef int32_t* s
    cdef int32_t* dst
    cdef const uint32_t* src
    cdef uint32_t* key
    if cacheable:
        if c.cache_slots == NULL:
            c._ensure_cache()
        slot = hash & c.cache_mask
        while True:
            ei = c.cache_slots[slot]
            if ei < 0:
                break
            e = &c.cache_entries[ei]
            if e.hash == hash and e.klen == klen and _same_key(c.cache_arena + e.off, w, klen):
                if c.out_n + e.nids > c.out_cap:
                    c._ensure_out(e.nids)
                dst = c.out + c.out_n
                src = c.cache_arena + e.off + klen
                for i in range(e.nids):
                    dst[i] = <int32_t>src[i]
                c.out_n += e.nids
                c.cache_hits += 1
                return 0
            slot = (slot + 1) & c.cache_mask
        c.cache_misses += 1
    c._ensure_sym(klen + 1)
    for i in range(klen):
        if n + 5 > c.sym_cap:            # a character takes up to 4 byte symbols
            c._ensure_sym(n + 5)
        got = c.base_symbols(w[i], c.sym + n)
        if got == 0:
            return -2
        n += got
    s = c.sym
    s[n] = EOW
    n += 1
    n = c.apply(s, n)
    if c.out_n + n > c.out_cap:
        c._ensure_out(n)
    dst = c.out + c.out_n
    nout = ids_without_eow(dst, s, n)
    if cacheable:
        if c.cache_n + c.swt_n >= c.cache_max:      # full: start over (the slot is free then)
            c._reset_cache()
            c.cache_resets += 1
            slot = hash & c.cache_mask
        c._cache_reserve(klen + nout)
        e = &c.cache_entries[c.cache_n]
        e.hash = hash
        e.off = c.cache_arena_n
        e.klen = <int32_t>klen
        e.nids = <int32_t>nout
        key = c.cache_arena + e.off
        for i in range(klen):
            key[i] = w[i]
        memcpy(key + klen, c.out + c.out_n, nout * sizeof(int32_t))
        c.cache_arena_n += klen + nout
        c.cache_slots[slot] = <int32_t>c.cache_n
        c.cache_n += 1
    c.out_n += nout
    return 0



cdef int _emit_long(BPECore c, const char_t* w, Py_ssize_t klen) except -1:
    """Append the ids of a long word (code points w[:klen], monotone merge table) to c.out, as
    _emit_word does, streaming it through a buffer of about STREAM symbols (c.sym) so that its
    scratch stays the same size whatever the word's length: base symbols are read until the
    buffer is full; if some boundary in it is a cut (no merge joins across it, see
    _junction_pairs), the symbols before the last cut are encoded (apply) and emitted, else the
    final tokens of one window (window_step). Either way what is emitted ends at a boundary of
    the word's tokens, so the rest encodes on its own. Returns -2 when a character has no base
    symbols."""
    cdef Py_ssize_t cap = STREAM + 5, n = 0, i = 0, j, k, known = 0, nout = 0
    cdef int got
    cdef int32_t* s
    # the output buffer at once, for as many ids as code points (more only with byte symbols),
    # rather than doubling it (and copying what it holds) a dozen times along the word
    c._ensure_out(klen + 1)
    while True:
        c._ensure_sym(cap)
        s = c.sym
        while i < klen and n + 5 <= cap:  # a character takes up to 4 symbols; room for EOW
            got = c.base_symbols(w[i], s + n)
            if got == 0:
                return -2
            n += got
            i += 1
        if i == klen:
            s[n] = EOW
            n = c.apply(s, n + 1)
            c._ensure_out(n)
            c.out_n += ids_without_eow(c.out + c.out_n, s, n)
            return 0
        # the last cut in s[:n]; s[:known] has none (what followed the previous last cut)
        k = 0
        if c.cut_ok:
            j = n - 1
            while j >= known and j > 0:
                if not c.junction(s[j - 1], s[j]):
                    k = j
                    break
                j -= 1
        c._ensure_out(n)
        if k > 0:
            nout = c.apply(s, k)
            move_i32(c.out + c.out_n, s, nout)
        else:
            k = c.window_step(s, n, WINDOW, c.out + c.out_n, &nout)
            if k == 0:                    # not one final token in the buffer: read more
                cap *= 2
                known = n
                continue
        c.out_n += nout
        move_i32(s, s + k, n - k)
        n -= k
        known = n                         # no cut after the last one


# ---------------------------------------------------------------------------------------------
# Training with incremental pair counts.
#
# words: the distinct words in first-occurrence order, each a run of symbols in one arena,
#        with its frequency (int64). A merge rewrites a word in place (it only shrinks).
# pairs: (left, right) -> Pair: count over the corpus (word frequency times occurrences,
#        overlapping, as the original counts them), the words that contain it (a list that may
#        hold stale entries and duplicates; cleaned when read), the first word containing it.
# heap:  lazy max-heap of (count, first word) per pair; an entry is live while its version
#        equals the pair's version (bumped whenever count or first word changes).
# Tie rule: the original takes, among pairs of maximal count, the first one met scanning the
#        words in order, symbols left to right: smallest (first word, position in that word).
#        The heap orders by (count desc, first word asc); pairs tied on both are compared by
#        their first position in that word, computed when the tie occurs.

cdef struct Pair:
    int32_t left
    int32_t right
    int64_t count
    int32_t first_word       # INT32_MAX when the pair occurs nowhere
    uint32_t version
    int32_t* wl              # words containing the pair (superset; may repeat)
    int32_t wl_n
    int32_t wl_cap
    uint32_t st_before       # word stamp: pair occurred in the word being rewritten, before
    uint32_t st_after        # ... after the rewrite
    uint32_t touched         # round stamp: already in this round's touched list
    int64_t snap_count       # count and first word when first touched this round
    int32_t snap_first
    int32_t rescan           # lost its first word this round; recompute from wl

cdef struct HeapEntry:
    int64_t count
    int32_t first_word
    int32_t pid
    uint32_t version


cdef inline bint _better(const HeapEntry* a, const HeapEntry* b) noexcept nogil:
    if a.count != b.count:
        return a.count > b.count
    if a.first_word != b.first_word:
        return a.first_word < b.first_word
    return a.pid < b.pid


@cython.final
cdef class _Trainer:
    # words
    cdef int32_t* arena
    cdef Py_ssize_t arena_n, arena_cap
    cdef int64_t* w_off
    cdef int32_t* w_len
    cdef int64_t* w_freq
    cdef uint64_t* w_hash
    cdef uint32_t* w_mark
    cdef Py_ssize_t n_words, words_cap
    cdef int32_t* wmap          # word table: slot -> word index or -1
    cdef uint64_t wmap_mask
    # pairs
    cdef Pair* pairs
    cdef Py_ssize_t n_pairs, pairs_cap
    cdef uint64_t* pkeys        # pair table: slot -> key (EMPTY64 = free)
    cdef int32_t* pvals         # slot -> pair index
    cdef uint64_t pmap_mask
    # heap
    cdef HeapEntry* heap
    cdef Py_ssize_t heap_n, heap_cap
    # scratch
    cdef int32_t* scratch
    cdef int32_t* oldp
    cdef Py_ssize_t scratch_cap
    cdef int32_t* touched
    cdef Py_ssize_t touched_n, touched_cap
    cdef uint32_t word_stamp, round_stamp, mark_stamp
    cdef Py_ssize_t max_word_len
    cdef bint segmented         # words counted after the core's merges (see BPECore.train)

    def __cinit__(self):
        self.arena = NULL
        self.w_off = NULL
        self.w_len = NULL
        self.w_freq = NULL
        self.w_hash = NULL
        self.w_mark = NULL
        self.wmap = NULL
        self.pairs = NULL
        self.pkeys = NULL
        self.pvals = NULL
        self.heap = NULL
        self.scratch = NULL
        self.oldp = NULL
        self.touched = NULL
        self.wmap_mask = 1023
        self.wmap = <int32_t*>xrealloc(NULL, 1024 * sizeof(int32_t))
        memset(self.wmap, 0xFF, 1024 * sizeof(int32_t))
        self.word_stamp = 0
        self.round_stamp = 0
        self.mark_stamp = 0

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.pairs != NULL:
            for i in range(self.n_pairs):
                free(self.pairs[i].wl)
        free(self.arena)
        free(self.w_off)
        free(self.w_len)
        free(self.w_freq)
        free(self.w_hash)
        free(self.w_mark)
        free(self.wmap)
        free(self.pairs)
        free(self.pkeys)
        free(self.pvals)
        free(self.heap)
        free(self.scratch)
        free(self.oldp)
        free(self.touched)

    # ---- counting distinct words

    cdef int _ensure_scratch(self, Py_ssize_t n) except -1:
        cdef Py_ssize_t cap
        if n > self.scratch_cap:
            cap = max(n, 2 * self.scratch_cap, 256)
            self.scratch = <int32_t*>xrealloc(self.scratch, cap * sizeof(int32_t))
            self.oldp = <int32_t*>xrealloc(self.oldp, cap * sizeof(int32_t))
            self.scratch_cap = cap
        return 0

    cdef int count_line(self, BPECore core, str line) except -1:
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(line)
        cdef unsigned int kind = PyUnicode_KIND(line)
        cdef void* data = PyUnicode_DATA(line)
        if kind == PyUnicode_1BYTE_KIND:
            return _count_words(self, core, <const uint8_t*>data, n)
        elif kind == PyUnicode_2BYTE_KIND:
            return _count_words(self, core, <const uint16_t*>data, n)
        return _count_words(self, core, <const uint32_t*>data, n)

    cdef int add_word(self, const int32_t* s, Py_ssize_t n) except -1:
        """Count one occurrence of the word whose base symbols (with EOW) are s[:n]."""
        cdef uint64_t h = FNV_SEED
        cdef uint64_t i
        cdef Py_ssize_t k
        cdef int32_t w
        cdef Py_ssize_t cap
        for k in range(n):
            h = (h ^ <uint32_t>s[k]) * FNV_PRIME
        h = mix64(h)
        i = h & self.wmap_mask
        while True:
            w = self.wmap[i]
            if w < 0:
                break
            if self.w_hash[w] == h and self.w_len[w] == n and \
                    memcmp(self.arena + self.w_off[w], s, n * sizeof(int32_t)) == 0:
                self.w_freq[w] += 1
                return 0
            i = (i + 1) & self.wmap_mask
        # a new word
        if self.n_words == self.words_cap:
            cap = max(1024, 2 * self.words_cap)
            self.w_off = <int64_t*>xrealloc(self.w_off, cap * sizeof(int64_t))
            self.w_len = <int32_t*>xrealloc(self.w_len, cap * sizeof(int32_t))
            self.w_freq = <int64_t*>xrealloc(self.w_freq, cap * sizeof(int64_t))
            self.w_hash = <uint64_t*>xrealloc(self.w_hash, cap * sizeof(uint64_t))
            self.words_cap = cap
        if self.arena_n + n > self.arena_cap:
            cap = max(self.arena_n + n, 2 * self.arena_cap, 4096)
            self.arena = <int32_t*>xrealloc(self.arena, cap * sizeof(int32_t))
            self.arena_cap = cap
        w = <int32_t>self.n_words
        memcpy(self.arena + self.arena_n, s, n * sizeof(int32_t))
        self.w_off[w] = self.arena_n
        self.w_len[w] = <int32_t>n
        self.w_freq[w] = 1
        self.w_hash[w] = h
        self.arena_n += n
        self.n_words += 1
        if n > self.max_word_len:
            self.max_word_len = n
        self.wmap[i] = w
        if 2 * self.n_words > <Py_ssize_t>self.wmap_mask:
            self._grow_wmap()
        return 0

    cdef int _grow_wmap(self) except -1:
        cdef uint64_t cap = 2 * (self.wmap_mask + 1), i
        cdef Py_ssize_t w
        self.wmap = <int32_t*>xrealloc(self.wmap, cap * sizeof(int32_t))
        memset(self.wmap, 0xFF, cap * sizeof(int32_t))
        self.wmap_mask = cap - 1
        for w in range(self.n_words):
            i = self.w_hash[w] & self.wmap_mask
            while self.wmap[i] >= 0:
                i = (i + 1) & self.wmap_mask
            self.wmap[i] = <int32_t>w
        return 0

    # ---- pairs

    cdef int32_t pair_get(self, int32_t a, int32_t b) noexcept:
        cdef uint64_t key = pair_key(a, b)
        cdef uint64_t i = mix64(key) & self.pmap_mask
        while self.pkeys[i] != EMPTY64:
            if self.pkeys[i] == key:
                return self.pvals[i]
            i = (i + 1) & self.pmap_mask
        return -1

    cdef int32_t pair_get_or_add(self, int32_t a, int32_t b) except -1:
        cdef uint64_t key = pair_key(a, b)
        cdef uint64_t i = mix64(key) & self.pmap_mask
        cdef int32_t pid
        cdef Pair* p
        cdef Py_ssize_t cap
        while self.pkeys[i] != EMPTY64:
            if self.pkeys[i] == key:
                return self.pvals[i]
            i = (i + 1) & self.pmap_mask
        if self.n_pairs == self.pairs_cap:
            cap = max(1024, 2 * self.pairs_cap)
            self.pairs = <Pair*>xrealloc(self.pairs, cap * sizeof(Pair))
            self.pairs_cap = cap
        pid = <int32_t>self.n_pairs
        p = &self.pairs[pid]
        memset(p, 0, sizeof(Pair))
        p.left = a
        p.right = b
        p.first_word = INT32_MAX
        self.n_pairs += 1
        self.pkeys[i] = key
        self.pvals[i] = pid
        if 2 * self.n_pairs > <Py_ssize_t>self.pmap_mask:
            self._grow_pmap(2 * (self.pmap_mask + 1))
        return pid

    cdef int _grow_pmap(self, uint64_t cap) except -1:
        cdef uint64_t i, key
        cdef Py_ssize_t pid
        self.pkeys = <uint64_t*>xrealloc(self.pkeys, cap * sizeof(uint64_t))
        self.pvals = <int32_t*>xrealloc(self.pvals, cap * sizeof(int32_t))
        memset(self.pkeys, 0xFF, cap * sizeof(uint64_t))
        self.pmap_mask = cap - 1
        for pid in range(self.n_pairs):
            key = pair_key(self.pairs[pid].left, self.pairs[pid].right)
            i = mix64(key) & self.pmap_mask
            while self.pkeys[i] != EMPTY64:
                i = (i + 1) & self.pmap_mask
            self.pkeys[i] = key
            self.pvals[i] = <int32_t>pid
        return 0

    cdef int wl_append(self, int32_t pid, int32_t w) except -1:
        cdef Pair* p = &self.pairs[pid]
        cdef int32_t cap
        if p.wl_n > 0 and p.wl[p.wl_n - 1] == w:
            return 0
        if p.wl_n == p.wl_cap:
            cap = max(4, 2 * p.wl_cap)
            p.wl = <int32_t*>xrealloc(p.wl, cap * sizeof(int32_t))
            p.wl_cap = cap
        p.wl[p.wl_n] = w
        p.wl_n += 1
        return 0

    cdef int init_pairs(self) except -1:
        cdef Py_ssize_t w, i
        cdef int32_t pid
        cdef int32_t* s
        cdef Pair* p
        self._grow_pmap(pow2_at_least(2 * self.arena_n + 16))
        self.w_mark = <uint32_t*>xrealloc(NULL, (self.n_words + 1) * sizeof(uint32_t))
        memset(self.w_mark, 0, (self.n_words + 1) * sizeof(uint32_t))
        self._ensure_scratch(self.max_word_len + 1)
        for w in range(self.n_words):
            s = self.arena + self.w_off[w]
            for i in range(self.w_len[w] - 1):
                pid = self.pair_get_or_add(s[i], s[i + 1])
                p = &self.pairs[pid]
                p.count += self.w_freq[w]
                if p.first_word == INT32_MAX:
                    p.first_word = <int32_t>w
                self.wl_append(pid, <int32_t>w)
        self.heap_cap = max(1024, 2 * self.n_pairs)
        self.heap = <HeapEntry*>xrealloc(NULL, self.heap_cap * sizeof(HeapEntry))
        self.heap_n = 0
        for i in range(self.n_pairs):
            p = &self.pairs[i]
            p.version = 1
            self.heap[self.heap_n].count = p.count
            self.heap[self.heap_n].first_word = p.first_word
            self.heap[self.heap_n].pid = <int32_t>i
            self.heap[self.heap_n].version = 1
            self.heap_n += 1
        i = self.heap_n // 2 - 1
        while i >= 0:
            self.sift_down(i)
            i -= 1
        return 0

    # ---- heap of pairs

    cdef void sift_down(self, Py_ssize_t i) noexcept:
        cdef HeapEntry x = self.heap[i]
        cdef Py_ssize_t c, n = self.heap_n
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and _better(&self.heap[c + 1], &self.heap[c]):
                c += 1
            if not _better(&self.heap[c], &x):
                break
            self.heap[i] = self.heap[c]
            i = c
        self.heap[i] = x

    cdef int push(self, int32_t pid) except -1:
        cdef Pair* p = &self.pairs[pid]
        cdef HeapEntry x
        cdef Py_ssize_t i, par
        if self.heap_n == self.heap_cap:
            self.heap_cap *= 2
            self.heap = <HeapEntry*>xrealloc(self.heap, self.heap_cap * sizeof(HeapEntry))
        x.count = p.count
        x.first_word = p.first_word
        x.pid = pid
        x.version = p.version
        i = self.heap_n
        self.heap_n += 1
        while i > 0:
            par = (i - 1) >> 1
            if not _better(&x, &self.heap[par]):
                break
            self.heap[i] = self.heap[par]
            i = par
        self.heap[i] = x
        return 0

    cdef inline bint live(self, const HeapEntry* e) noexcept:
        return self.pairs[e.pid].version == e.version and self.pairs[e.pid].count > 0

    cdef HeapEntry pop(self) noexcept:
        cdef HeapEntry top = self.heap[0]
        self.heap_n -= 1
        if self.heap_n > 0:
            self.heap[0] = self.heap[self.heap_n]
            self.sift_down(0)
        return top

    cdef Py_ssize_t first_pos(self, int32_t pid) noexcept:
        """Index of the first occurrence of the pair in its first word."""
        cdef Pair* p = &self.pairs[pid]
        cdef int32_t* s = self.arena + self.w_off[p.first_word]
        cdef Py_ssize_t i
        for i in range(self.w_len[p.first_word] - 1):
            if s[i] == p.left and s[i + 1] == p.right:
                return i
        return INT32_MAX

    cdef int32_t pop_best(self) except -2:
        """The pair to merge next (max count, then first occurrence), or -1 when none is left."""
        cdef HeapEntry best, e
        cdef Py_ssize_t i, n_ties = 0, bpos, pos
        cdef list ties = None
        while self.heap_n > 0 and not self.live(&self.heap[0]):
            self.pop()
        if self.heap_n == 0:
            return -1
        best = self.pop()
        # pairs tied on (count, first word): decide by position in that word
        while self.heap_n > 0:
            if not self.live(&self.heap[0]):
                self.pop()
                continue
            e = self.heap[0]
            if e.count != best.count or e.first_word != best.first_word:
                break
            self.pop()
            if ties is None:
                ties = []
            ties.append((e.pid, e.version))
        if ties is not None:
            bpos = self.first_pos(best.pid)
            for pid, version in ties:
                pos = self.first_pos(pid)
                if pos < bpos:
                    self.push(best.pid)
                    best.pid = pid
                    bpos = pos
                else:
                    self.push(pid)
        return best.pid

    cdef inline void touch(self, int32_t pid) noexcept:
        cdef Pair* p = &self.pairs[pid]
        if p.touched != self.round_stamp:
            p.touched = self.round_stamp
            p.snap_count = p.count
            p.snap_first = p.first_word
            self.touched[self.touched_n] = pid
            self.touched_n += 1

    cdef int _ensure_touched(self, Py_ssize_t extra) except -1:
        cdef Py_ssize_t cap
        if self.touched_n + extra > self.touched_cap:
            cap = max(self.touched_n + extra, 2 * self.touched_cap, 1024)
            self.touched = <int32_t*>xrealloc(self.touched, cap * sizeof(int32_t))
            self.touched_cap = cap
        return 0

    cdef bint word_has(self, int32_t w, int32_t a, int32_t b) noexcept:
        cdef int32_t* s = self.arena + self.w_off[w]
        cdef Py_ssize_t i
        for i in range(self.w_len[w] - 1):
            if s[i] == a and s[i + 1] == b:
                return True
        return False

    cdef int rewrite_word(self, int32_t w, int32_t a, int32_t b, int32_t m) except -1:
        """Merge every (a, b) in word w left to right; move its pair counts from the old
        symbols to the new ones and keep word lists and first words right."""
        cdef int32_t* s = self.arena + self.w_off[w]
        cdef Py_ssize_t n = self.w_len[w], i, j, n_old
        cdef int64_t f = self.w_freq[w]
        cdef int32_t pid
        cdef Pair* p
        cdef uint32_t st
        self.word_stamp += 1
        st = self.word_stamp
        self._ensure_touched(2 * n)
        # 1. subtract the old pairs
        n_old = n - 1
        for i in range(n_old):
            pid = self.pair_get(s[i], s[i + 1])
            self.oldp[i] = pid
            self.touch(pid)
            p = &self.pairs[pid]
            p.count -= f
            p.st_before = st
        # 2. merge in place, left to right, non-overlapping
        j = 0
        i = 0
        while i < n:
            if i + 1 < n and s[i] == a and s[i + 1] == b:
                s[j] = m
                i += 2
            else:
                s[j] = s[i]
                i += 1
            j += 1
        n = j
        self.w_len[w] = <int32_t>n
        # 3. add the new pairs
        for i in range(n - 1):
            pid = self.pair_get_or_add(s[i], s[i + 1])
            self.touch(pid)
            p = &self.pairs[pid]
            p.count += f
            if p.st_after != st:
                p.st_after = st
                if p.st_before != st:      # newly present in w
                    self.wl_append(pid, w)
                    if w < p.first_word:
                        p.first_word = w
        # 4. pairs that left w: if w was their first word, find the new one after the round
        for i in range(n_old):
            p = &self.pairs[self.oldp[i]]
            if p.st_after != st and p.first_word == w:
                p.rescan = 1
        return 0

    cdef int rescan_first(self, int32_t pid) noexcept:
        """Recompute the first word of a pair from its word list, compacting the list."""
        cdef Pair* p = &self.pairs[pid]
        cdef int32_t k, w, first = INT32_MAX, keep = 0
        self.mark_stamp += 1
        for k in range(p.wl_n):
            w = p.wl[k]
            if self.w_mark[w] == self.mark_stamp:
                continue
            self.w_mark[w] = self.mark_stamp
            if self.word_has(w, p.left, p.right):
                p.wl[keep] = w
                keep += 1
                if w < first:
                    first = w
        p.wl_n = keep
        p.first_word = first
        return 0

    cdef list run(self, Py_ssize_t num_merges, merged_id):
        cdef list merges = []
        cdef int32_t best, a, b, m, w
        cdef Py_ssize_t k, t, n_wl
        cdef int32_t* wl
        cdef Pair* p
        for _ in range(num_merges):
            best = self.pop_best()
            if best < 0:
                break
            a = self.pairs[best].left
            b = self.pairs[best].right
            m = merged_id(a, b)
            merges.append((a, b, m))
            self.round_stamp += 1
            self.touched_n = 0
            self.mark_stamp += 1
            # the merged pair's word list is not appended to during its own round: a new pair
            # contains m, which is neither a nor b
            wl = self.pairs[best].wl
            n_wl = self.pairs[best].wl_n
            for k in range(n_wl):
                w = wl[k]
                if self.w_mark[w] == self.mark_stamp:
                    continue
                self.w_mark[w] = self.mark_stamp
                if self.word_has(w, a, b):
                    self.rewrite_word(w, a, b, m)
                    wl = self.pairs[best].wl      # pairs may have moved (realloc)
            for t in range(self.touched_n):
                p = &self.pairs[self.touched[t]]
                if p.count == 0:
                    p.wl_n = 0
                    p.first_word = INT32_MAX
                    p.rescan = 0
                    p.version += 1
                    continue
                if p.rescan:
                    p.rescan = 0
                    self.rescan_first(self.touched[t])
                    p = &self.pairs[self.touched[t]]
                if p.count != p.snap_count or p.first_word != p.snap_first:
                    p.version += 1
                    self.push(self.touched[t])
        return merges


cdef int _count_words(_Trainer tr, BPECore core, const char_t* data, Py_ssize_t n) except -1:
    cdef Py_ssize_t i = 0, j, k, m
    cdef int got
    while i < n:
        while i < n and is_space(data[i]):
            i += 1
        if i >= n:
            break
        j = i
        while j < n and not is_space(data[j]):
            j += 1
        tr._ensure_scratch(4 * (j - i) + 1)
        m = 0
        for k in range(i, j):
            got = core.base_symbols(data[k], tr.scratch + m)
            if got == 0:
                ch = chr(core.err_cp)
                raise TokenizerError(
                    f"character {ch!r} (U+{core.err_cp:04X}) in the training text has no token and "
                    f"this tokenizer has no byte tokens; call enable_byte_fallback() first")
            m += got
        tr.scratch[m] = EOW
        m += 1
        if tr.segmented:
            m = core.apply(tr.scratch, m)
        tr.add_word(tr.scratch, m)
        i = j
    return 0
