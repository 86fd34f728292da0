"""Type stubs of the compiled tokenizer core (C types in trailing comments)."""
from typing import Callable, Iterable, Sequence

import numpy

EOW_ID: int              # -1: the end-of-word marker </w> as a symbol (never a token)
CACHE_KEY_LEN: int       # words longer than this (code points) bypass the word cache
NAIVE_MAX_SYMBOLS: int   # words of up to this many symbols use the O(n^2) rank scan
HEAP_MAX_SYMBOLS: int    # longer pieces of a word use the rank buckets (monotone tables)
WINDOW_SYMBOLS: int      # pieces longer than this go through the rank buckets a window at a time
STREAM_SYMBOLS: int      # words of more code points stream through a buffer of this many symbols

class BPECore:
    cache_hits: int      # uint64_t
    cache_misses: int    # uint64_t
    cache_resets: int    # uint64_t
    def __init__(self, cache_words: int = 65536) -> None: ...  # Py_ssize_t
    @property
    def cache_size(self) -> int: ...
    def set_vocab(self, chars: dict[int, int], byte_ids: Sequence[int], surfaces: Sequence[bytes],
                  space_id: int, bos_id: int, eos_id: int, pad_id: int) -> None: ...  # int32_t ids
    def set_merges(self, merges: Iterable[tuple[int, int, int]]) -> None: ...  # (left, right, merged) int32_t
    def clear_cache(self) -> None: ...
    def merge_rank(self, a: int, b: int) -> tuple[int, int] | None: ...  # (rank, merged)
    @property
    def monotone_merges(self) -> bool: ...
    def is_junction(self, a: int, b: int) -> bool: ...
    def _apply_merges_memview(self, symbols: Sequence[int], method: str = "auto",
                              window: int = ...) -> list[int]: ...  # window: Py_ssize_t, for method="window"
    def encode(self, text: str, bpe: bool) -> list[int]: ...  # PyUnicode kind 1/2/4 read in place
    def encode_array(self, text: str, bpe: bool) -> numpy.ndarray: ...  # int32, same ids as encode
    def decode_bytes(self, ids: Iterable[int]) -> bytes: ...
    def train(self, lines: Iterable[str], num_merges: int,
              merged_id: Callable[[int, int], int], segmented: bool = False) -> list[tuple[int, int, int]]: ...
