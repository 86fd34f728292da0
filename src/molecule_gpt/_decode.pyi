"""Type stubs of the compiled decoding core (C types in trailing comments)."""
from typing import Callable, Sequence

import numpy as np

HEAD_TYPES: dict[str, int]  # csrc/codes.h MG_HEAD_* (the same table as _core.HEAD_TYPES)
ACTIVATIONS: dict[str, int]  # csrc/codes.h MG_ACT_* (the same table as _core.ACTIVATIONS)
STOP_REASONS: tuple  # (None, "eos", "max_tokens", "sentence", "repetition"), indexed by the C enum

def simd_path() -> str: ...  # "avx2" or "portable" (MOLECULE_GPT_NO_AVX2=1 forces portable)

class Weights:
    is_double: bool
    dtype: np.dtype
    def __init__(self, n_layer: int, n_embd: int, n_head: int, block_size: int, head_types: Sequence[str],
                 activation: str,
                 wte: np.ndarray,      # const floating[V, C]
                 wpe: np.ndarray,      # const floating[T, C]
                 lm: np.ndarray,       # const floating[V, C]  effective output matrix
                 cos_t: np.ndarray,    # const floating[T, d/2]
                 sin_t: np.ndarray,    # const floating[T, d/2]
                 layers: Sequence[dict]  # wqkv [3C, C], wo [C, C], fcgv [2F, C], fc2 [C, F], pat [H] of [T, d] | None, mix [H] double
                 ) -> None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...

class Field:
    def __init__(self, vocab_size: int,
                 uni: np.ndarray,         # const double[V]
                 bi_keys: np.ndarray,     # const int64_t[n_bi] sorted a*V+b
                 bi_counts: np.ndarray,   # const double[n_bi]
                 tri_keys: np.ndarray,    # const int64_t[n_tri] sorted (a*V+b)*V+c
                 tri_counts: np.ndarray,  # const double[n_tri]
                 ) -> None: ...
    @property
    def vocab_size(self) -> int: ...
    def distribution(self, context: Sequence[int], temperature: float = 1.0,
                     min_level: int = 1) -> tuple[np.ndarray, int]: ...

class Decoder:
    is_double: bool
    last_logits_array: np.ndarray  # floating[V]: the forward writes the logits here (it owns its memory)
    n_threads: int  # int: threads large products are split over
    def __init__(self, weights: Weights | None, vocab_size: int, block_size: int, n_threads: int = 1) -> None: ...
    def prefill(self, ids: Sequence[int]) -> np.ndarray: ...  # int32 ids; returns last_logits_array (overwritten by the next call)
    def feed(self, token: int) -> np.ndarray: ...
    def hidden_std(self, ids: Sequence[int]) -> np.ndarray: ...  # double[L + 1]
    @property
    def weights(self) -> Weights | None: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def window(self) -> list[int]: ...
    @property
    def logits(self) -> np.ndarray: ...
    def begin(self, prompt_ids: Sequence[int], *, temperature: float, entropy_low: float, entropy_high: float,
              boost: float, focus: float, min_p: float, typical_p: float, top_p: float, top_k: int,
              freq_penalty: float, model_alpha: float, field: Field | None, max_new: int, min_new: int,
              rep_guard: int, eos: int,
              banned: np.ndarray,        # uint8_t[V]
              sentence_end: np.ndarray,  # uint8_t[V]
              seed: int | None) -> None: ...  # uint64_t
    def run(self, limit: int, processors: Sequence[Callable[[np.ndarray, np.ndarray], np.ndarray]] | None = None
            ) -> tuple[list[int], str | None]: ...
    @property
    def generated(self) -> list[int]: ...

def _sample_stack_memview(z: np.ndarray, q: np.ndarray | None, temperature: float, entropy_low: float,
                          entropy_high: float, boost: float, focus: float, min_p: float, typical_p: float,
                          top_p: float, top_k: int, model_alpha: float = 1.0) -> tuple[list[int], np.ndarray]: ...
