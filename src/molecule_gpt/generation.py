"""Generation: sampling parameters, effective weights per model version, and the Generator.

What it is: the policy half of design.md §4 (the arithmetic is in `_decode`). `Generator(model,
tokenizer, field=None)` turns a prompt into text with a key/value cache; `SamplingParams`
validates every knob (from the Config, overridable per call); `WeightCache` folds the delta
modules into effective weights once per model version, under the model lock, so generation
never sees a half-updated model and never holds the lock for more than a copy.

What it is not: training, or the decision of how much to trust the corpus field (the Organism
passes `model_alpha`).

Sampling, per token (design.md §4, in `_decode.sample_stack`):
  1. logits z; BOS/PAD are never sampled; EOS is not sampled before `min_gen_tokens`;
     z -= frequency_penalty * (times the token was generated in this call).
  2. temperature 0: the most probable token (of the blend, below). Otherwise p = softmax(z/T0)
     gives the entropy H (nats); T = T0 * entropy_temp_boost if H < entropy_low,
     T0 * entropy_temp_focus if H > entropy_high; p = softmax(z/T).
  3. blend with the corpus field when model_alpha < 1 and the field knows the context (a seen
     trigram or bigram): p = model_alpha p + (1 - model_alpha) q, q ∝ count^(1/T).
  4. min-p (drop p < min_p * max p), top-k (0 = off), typical-p (sort by |-log p - H|, keep
     until the kept mass reaches typical_p; 1 = off), top-p (by p descending, keep until the
     mass reaches top_p; 1 = off); sample from the kept tokens ∝ p with the call's own
     xoshiro256** stream (seed=None: fresh entropy).
  5. logits_processors, if any: each `f(ids, logits) -> logits` in order, on the stack's result
     as logits (log of the kept, renormalized probabilities; -inf for dropped tokens); the
     token is then drawn from softmax of what the last one returns (argmax at temperature 0).
     `ids` is the prompt (without EOS) plus the tokens generated so far.
With model_alpha == 0 the model is not run: tokens come from the field alone (trigram ->
bigram -> unigram back-off, ∝ count^(1/T)), which is how an untrained organism speaks.

Stop rules: EOS (not included in the output); max_gen_tokens; after min_gen_tokens, a token
whose text ends in . ! or ?; a repetition (the last repetition_guard tokens equal the ones
before them; the repeat is kept, so streamed and returned text always agree); a stop string
(text is cut before it; only with `stop=`). `"".join(stream(...)) == generate(...)` for the
same arguments and seed.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import numbers
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from . import _decode
from .config import DECODE_PRECISIONS, Config
from .errors import ConfigError, GenerationError
from .model import Model, _rope_tables, delta_group, fold_delta_terms
from .text import replace_invalid

__all__ = ["DecodeLoop", "GenerationResult", "Generator", "SamplingParams", "SubmittedGeneration", "WeightCache",
           "decoded_nats", "fold_weights"]

log = logging.getLogger("molecule_gpt.generation")

LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------
# sampling parameters

@dataclass(frozen=True)
class SamplingParams:
    """Every knob of one generation call. Defaults come from a Config (`from_config`); any field
    can be overridden per call by keyword."""
    temperature: float = 0.85  # 0 = greedy
    top_k: int = 40  # 0 = off
    top_p: float = 0.92  # 1 = off
    min_p: float = 0.06  # 0 = off
    typical_p: float = 0.95  # 1 = off
    entropy_low: float = 0.5  # nats; below: temperature x entropy_temp_boost
    entropy_high: float = 1.5  # nats; above: temperature x entropy_temp_focus
    entropy_temp_boost: float = 1.2
    entropy_temp_focus: float = 0.8
    max_gen_tokens: int = 180  # hard cap on generated tokens
    min_gen_tokens: int = 16  # no EOS and no sentence-end stop before this many tokens
    repetition_guard: int = 4  # stop when the last n tokens repeat the n before them (0 = off)
    frequency_penalty: float = 0.0  # subtracted from a token's logit per earlier occurrence
    stop: tuple = ()  # stop strings: the text is cut before the first one that appears
    seed: int | None = None  # same seed + same weights -> same text
    model_alpha: float | None = None  # model weight in the field blend (None: the owner decides)
    logits_processors: tuple = ()  # callables (ids, logits) -> logits, after the built-in stack

    _CONFIG_FIELDS = Config.fields_of("sampling")  # the knobs a Config gives defaults for

    @classmethod
    def from_config(cls, config: Config, **overrides) -> "SamplingParams":
        """The config's sampling fields, then `overrides` (validated; unknown names raise)."""
        base = {name: getattr(config, name) for name in cls._CONFIG_FIELDS if hasattr(config, name)}
        return cls.make(base, overrides)

    @classmethod
    def make(cls, base: dict, overrides: dict) -> "SamplingParams":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise GenerationError(f"unknown generation parameter(s): {', '.join(unknown)}; "
                                  f"valid ones are {', '.join(sorted(names))}")
        values = dict(base)
        values.update(overrides)
        params = cls(**values)
        params.validate()
        return params

    def validate(self) -> None:
        """Raise GenerationError naming the first invalid parameter."""
        def real(name, lo=-math.inf, hi=math.inf, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise GenerationError(f"{name} must be a finite number, got {v!r}")
            if v < lo or v > hi or (lo_open and v == lo):
                rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise GenerationError(f"{name} must be in {rng}, got {v!r}")

        def integer(name, lo=0):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
                raise GenerationError(f"{name} must be an int >= {lo}, got {v!r}")

        real("temperature", 0.0)
        for name in ("top_p", "min_p", "typical_p"):
            real(name, 0.0, 1.0)
        real("entropy_low")
        real("entropy_high")
        if self.entropy_low > self.entropy_high:
            raise GenerationError(f"entropy_low ({self.entropy_low}) must not exceed entropy_high ({self.entropy_high})")
        real("entropy_temp_boost", 0.0, lo_open=True)
        real("entropy_temp_focus", 0.0, lo_open=True)
        real("frequency_penalty")
        for name in ("top_k", "max_gen_tokens", "min_gen_tokens", "repetition_guard"):
            integer(name)
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)):
            raise GenerationError(f"seed must be an int or None, got {self.seed!r}")
        if self.model_alpha is not None:
            real("model_alpha", 0.0, 1.0)
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise GenerationError(f"stop must be a non-empty string or a sequence of them, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(stop))
        procs = self.logits_processors
        if callable(procs):
            procs = (procs,)
        if not isinstance(procs, (tuple, list)) or not all(callable(p) for p in procs):
            raise GenerationError(f"logits_processors must be a sequence of callables (ids, logits) -> logits, "
                                  f"got {self.logits_processors!r}")
        object.__setattr__(self, "logits_processors", tuple(procs))


@dataclass
class GenerationResult:
    """ids: generated token ids (no EOS); text: their decoded text (cut before a stop string);
    stop_reason: "eos", "max_tokens", "sentence", "repetition" or "stop_string"."""
    ids: list
    text: str
    stop_reason: str


# ---------------------------------------------------------------------------------------------
# effective weights

def _copy_group(group) -> dict[str, np.ndarray]:
    flat = group.flat.copy()
    return {k: flat[o:o + int(np.prod(s))].reshape(s) for (k, s), o in zip(group.shapes.items(), group.offsets.values())}


def _snapshot(model: Model) -> tuple:
    """Copies of everything generation reads, taken under the model lock (one memcpy per group)."""
    with model.lock:
        base = _copy_group(model.groups["base"])
        deltas = [(float(a), _copy_group(model.groups[delta_group(k)])) for k, a in enumerate(model.delta_alphas)
                  if a != 0.0]
        return model.config, model.dtype, base, deltas


def fold_weights(model: Model, precision: str | None = None) -> _decode.Weights:
    """Effective weights of `model` now: every adapted matrix W + sum_k alpha_k A_k B_k (modules
    with alpha 0 skipped), ready for decoding, with the matrices in `precision` (a
    Config.decode_precision; default: the model's config's). Holds the model lock only while
    copying."""
    config, dtype, base, deltas = _snapshot(model)
    return _build_weights(config, dtype, base, deltas, precision=precision)


def check_decode_precision(config: Config, dtype) -> None:
    """ConfigError unless a model of `dtype` can decode with `config.decode_precision`."""
    _decode_precision(config, dtype, None)


def _decode_precision(config: Config, dtype, precision: str | None) -> bool:
    """Whether the decoder's matrices are bfloat16 for `precision` (default: the config's)."""
    precision = config.decode_precision if precision is None else precision
    if precision not in DECODE_PRECISIONS:
        raise ConfigError(f"decode precision {precision!r}: use {' or '.join(map(repr, DECODE_PRECISIONS))}")
    if precision == "bfloat16" and np.dtype(dtype) != np.float32:
        raise ConfigError(f"Config.decode_precision 'bfloat16' needs a float32 model; this one is "
                          f"{np.dtype(dtype).name} (use 'model')")
    return precision == "bfloat16"


def _delta_sum(config: Config, deltas: list) -> dict[str, np.ndarray]:
    """sum_k alpha_k A_k B_k per adapted matrix, in float64 (added to W before the one rounding
    to the model's type, as the Model folds its frozen modules)."""
    return fold_delta_terms(deltas, _adapted_names(config))


def _adapted_names(config: Config) -> list[str]:
    names = []
    for i in range(config.n_layer):
        names += [f"l{i}.{m}" for m in ("wq", "wk", "wv", "wo", "fc_g", "fc_v", "fc2")]
        names += [f"l{i}.h{h}.w_pattern" for h, kind in enumerate(config.head_types) if kind != "content"]
    return names + ["lm_head"]


def _build_weights(config: Config, dtype, base: dict, deltas: list,
                   frozen: dict[str, np.ndarray] | None = None, precision: str | None = None) -> _decode.Weights:
    """Decoder weights from copied parameters: W + (frozen, a precomputed sum of modules) +
    sum over `deltas` of alpha A B; the products' matrices in `precision` (see fold_weights).
    Each sum of terms (float64) is added to W in float64 and rounded once to the model's type:
    with every module frozen these are the Model's own folded weights, bit for bit."""
    c = config
    bf16 = _decode_precision(config, dtype, precision)
    live = _delta_sum(config, deltas) if deltas else {}

    def eff(name: str) -> np.ndarray:
        W = base["wte" if (name == "lm_head" and c.tie_embeddings) else name]
        for t in ((frozen or {}).get(name), live.get(name)):
            if t is not None:
                W = (W + t).astype(dtype)
        return W

    layers = []
    for i in range(c.n_layer):
        pat, mix = [], []
        for h, kind in enumerate(c.head_types):
            pat.append(np.ascontiguousarray(eff(f"l{i}.h{h}.w_pattern")) if kind != "content" else None)
            mix.append(1.0 / (1.0 + math.exp(-float(base[f"l{i}.h{h}.alpha"][0, 0]))) if kind == "hybrid" else 0.0)
        layers.append({
            "wqkv": np.concatenate([eff(f"l{i}.wq"), eff(f"l{i}.wk"), eff(f"l{i}.wv")]),
            "wo": np.ascontiguousarray(eff(f"l{i}.wo")),
            "fcgv": np.concatenate([eff(f"l{i}.fc_g"), eff(f"l{i}.fc_v")]),
            "fc2": np.ascontiguousarray(eff(f"l{i}.fc2")),
            "pat": pat,
            "mix": mix,
        })
    cos_t, sin_t = _rope_tables(c.block_size, c.head_dim, dtype)
    return _decode.Weights(c.n_layer, c.n_embd, c.n_head, c.block_size, list(c.head_types), c.mlp_activation,
                           np.ascontiguousarray(base["wte"]), np.ascontiguousarray(base["wpe"]),
                           np.ascontiguousarray(eff("lm_head")), cos_t, sin_t, layers, bf16=bf16)


def decoded_nats(weights: _decode.Weights, windows: Sequence[Sequence[int]]) -> float:
    """Summed cross-entropy (nats) of every target of `windows` (heldout.windows: each window
    fits the context) as the decoder predicts them on `weights`, a token at a time: what
    generation computes, in whatever precision the weights are."""
    dec = _decode.Decoder(weights, weights.vocab_size, weights.block_size)
    total = 0.0
    for w in windows:
        logits = dec.prefill(list(w[:1]))
        for i in range(1, len(w)):
            z = logits.astype(np.float64)
            top = z.max()
            total += top + math.log(np.exp(z - top).sum()) - z[w[i]]
            if i + 1 < len(w):
                logits = dec.feed(int(w[i]))
    return total


@contextlib.contextmanager
def _unless_busy(lock, wait: bool) -> Iterator[bool]:
    """Hold `lock` for the block if it is free (or, with wait, once it is); yields whether it is held."""
    held = lock.acquire(blocking=wait)
    try:
        yield held
    finally:
        if held:
            lock.release()


class WeightCache:
    """The effective weights of one model, refolded only when the model changed.

    The key (read under the model lock, with the snapshot) is `Model.version`, the counter
    bumped by `invalidate()` and the decode precision (of `config`, default the model's): any
    train_step, growth, alpha change, refresh or precision change refolds. Frozen
    modules (fossils) never change, so their summed term is kept and reused while the set of
    frozen modules, their alphas and their groups' versions stay the same: a refold after a
    training step costs the base copy and the active module only, however many fossils there are.
    Call `invalidate()` (or `Model.refresh()`) after writing parameters in place (the Organism
    does after a rollback; it takes no lock, so it may be called while holding the model lock).
    Thread-safe; the returned Weights are read-only and shared."""

    def __init__(self, model: Model, config: Config | None = None):
        self.model = model
        self._config = config  # whose decode_precision the weights follow (None: the model's config)
        self._version = 0
        self._key = None
        self._weights = None
        self._frozen_key = None
        self._frozen_terms: dict[str, np.ndarray] | None = None
        self._lock = threading.Lock()
        self.folds = 0  # how many times weights were (re)built

    def invalidate(self) -> None:
        self._version += 1

    def _precision(self) -> str:
        return (self._config or self.model.config).decode_precision

    def _key_now(self) -> tuple:
        return (self._version, self.model.version, self._precision())

    def get(self) -> _decode.Weights:
        m = self.model
        # a generation does not wait for a training step or for another thread's refold: while
        # one holds the model lock or this cache's, the weights folded before serve; a cache
        # that has none, or whose vocabulary the model has outgrown (its tokenizer and field are
        # the new ones), waits
        weights = self._weights
        stale = weights is None or weights.vocab_size != m.vocab_size
        if not self._lock.acquire(blocking=stale):
            return weights
        try:
            stale = self._weights is None or self._weights.vocab_size != m.vocab_size
            with _unless_busy(m.lock, wait=stale) as held:
                if not held:
                    return self._weights
                key = self._key_now()
                if key == self._key:
                    return self._weights
                frozen = [k for k, a in enumerate(m.delta_alphas) if a != 0.0 and not m.trainable[delta_group(k)]]
                frozen_key = (self._version, m.vocab_size,
                              tuple((k, m.delta_alphas[k], m.groups[delta_group(k)].version) for k in frozen))
                need_frozen = frozen_key != self._frozen_key
                frozen_copies = [(float(m.delta_alphas[k]), _copy_group(m.groups[delta_group(k)])) for k in frozen] \
                    if need_frozen else None
                live = [(float(a), _copy_group(m.groups[delta_group(k)])) for k, a in enumerate(m.delta_alphas)
                        if a != 0.0 and m.trainable[delta_group(k)]]
                config, dtype, base = m.config, m.dtype, _copy_group(m.groups["base"])
            if need_frozen:
                self._frozen_terms = _delta_sum(config, frozen_copies) if frozen_copies else {}
                self._frozen_key = frozen_key
            self._weights = _build_weights(config, dtype, base, live, self._frozen_terms, key[2])
            self._key = key
            self.folds += 1
            return self._weights
        finally:
            self._lock.release()


class InFlight:
    """The generations started and not yet finished, over every generator that shares this
    object (an organism's generator is rebuilt when its tokenizer grows; generations begun on
    the old one still count). A generation counts from the moment it takes a decoder to the
    moment it gives it back; one abandoned without finishing stops counting when its decoder
    is collected. The background trainer paces itself while any is in flight. Thread-safe."""

    def __init__(self):
        self._live: weakref.WeakSet = weakref.WeakSet()
        self._changed = threading.Condition()

    def started(self, dec: _decode.Decoder) -> None:
        with self._changed:
            self._live.add(dec)

    def finished(self, dec: _decode.Decoder) -> None:
        with self._changed:
            self._live.discard(dec)
            if not self._live:
                self._changed.notify_all()

    def __len__(self) -> int:
        return len(self._live)

    def wait_until_idle(self, timeout: float) -> bool:
        """Wait until no generation is in flight or `timeout` seconds passed; True if idle."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._live, timeout)


# ---------------------------------------------------------------------------------------------
# the generator

class Generator:
    """Text generation for a Model and its tokenizer, optionally blended with a corpus field.

    `generate(prompt, **overrides) -> str`, `stream(prompt, **overrides)` yielding text pieces,
    `run(prompt, **overrides) -> GenerationResult`, `run_many(prompts, params)` for several
    generations decoded together (each result equals its own run()). Overrides are
    SamplingParams fields. Safe to call from several threads at once (each call has its own
    cache and random state; the effective weights are shared)."""

    def __init__(self, model: Model, tokenizer, field=None, config: Config | None = None,
                 weights: WeightCache | None = None, in_flight: InFlight | None = None):
        if not isinstance(model, Model):
            raise TypeError(f"model must be a molecule_gpt.Model, got {type(model).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.field = field
        self.config = config if config is not None else model.config
        # a generator rebuilt for a new tokenizer or field keeps the model's folded weights: a
        # cache without any would make the next generation wait for a training step's lock
        self.weights = weights if weights is not None and weights.model is model else WeightCache(model, config)
        self._tables_key = None
        self._tables = None
        self._pool: list = []
        self._pool_lock = threading.Lock()
        self.in_flight = in_flight if in_flight is not None else InFlight()

    # ---- setup per call

    def params(self, **overrides) -> SamplingParams:
        return SamplingParams.from_config(self.config, **overrides)

    def _token_tables(self, V: int) -> tuple[np.ndarray, np.ndarray]:
        """banned (BOS, PAD) and sentence_end (text ends in . ! ?) flags per token id."""
        tok = self.tokenizer
        key = (id(tok), V)
        tables = self._tables
        if self._tables_key == key and tables is not None:
            return tables
        banned = np.zeros(V, np.uint8)
        banned[[tok.bos_id, tok.pad_id]] = 1
        ends = np.zeros(V, np.uint8)
        for i in range(V):
            surface = tok.token_bytes(i).rstrip()
            if surface[-1:] in (b".", b"!", b"?"):
                ends[i] = 1
        self._tables = (banned, ends)
        self._tables_key = key
        return banned, ends

    def encode_prompt(self, prompt) -> list[int]:
        """Token ids of a prompt: a str is encoded without its EOS (design.md §4); a list of ids is
        used as is (validated against the vocabulary)."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            ids = tok.encode(prompt)
            return ids[:-1] if ids and ids[-1] == tok.eos_id else ids
        if isinstance(prompt, (bytes, bytearray)):
            raise GenerationError("prompt must be str or a sequence of token ids, got bytes; decode it first")
        try:
            ids = [int(i) for i in prompt]
        except (TypeError, ValueError):
            raise GenerationError(f"prompt must be str or a sequence of token ids, got {type(prompt).__name__}") from None
        V = self.model.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise GenerationError(f"prompt holds token id {bad[0]}, outside the vocabulary [0, {V})")
        if not ids:
            raise GenerationError("a prompt of token ids must hold at least one id (e.g. [tokenizer.bos_id])")
        return ids

    def begin(self, prompt, params: SamplingParams) -> _decode.Decoder:
        """Encode the prompt, take the current weights and prefill: the started generation, to
        pass to run_begun/stream_begun. (Split from run so a caller can hold a lock for just
        this part: after it, the generation uses its own snapshot.)"""
        return self._begin(prompt, params)

    def run_begun(self, dec: _decode.Decoder, params: SamplingParams) -> GenerationResult:
        """Finish a generation started by begin()."""
        if params.stop:  # checked after every token, as a batch of one does
            return self.run_begun_many([dec], [params])[0]
        if params.max_gen_tokens == 0:
            self._release(dec)
            return GenerationResult([], "", "max_tokens")
        try:
            ids, reason = dec.run(params.max_gen_tokens, params.logits_processors or None)
        finally:
            self._release(dec)
        return GenerationResult(ids, _said(self.tokenizer.decode(ids)), reason)

    def stream_begun(self, dec: _decode.Decoder, params: SamplingParams) -> Iterator[str]:
        """Stream a generation started by begin()."""
        return self._pieces(dec, params)

    def _begin(self, prompt, params: SamplingParams, weights: _decode.Weights | None = None) -> _decode.Decoder:
        ids = self.encode_prompt(prompt)
        alpha = 1.0 if params.model_alpha is None else float(params.model_alpha)
        field = self.field
        native_field = field.native() if (field is not None and alpha < 1.0) else None
        if alpha < 1.0 and native_field is None:
            if alpha == 0.0:
                raise GenerationError("model_alpha=0 generates from the corpus field alone, but this generator has none")
            alpha = 1.0
        if alpha > 0.0:
            weights = self.weights.get() if weights is None else weights
            V, T = weights.vocab_size, weights.block_size
        else:
            weights, V, T = None, native_field.vocab_size, self.config.block_size
        if native_field is not None and native_field.vocab_size != V:
            raise GenerationError(f"the corpus field has vocab_size {native_field.vocab_size} but the model has {V}; "
                                  f"rebuild the field after growing the vocabulary")
        if max(ids) >= V:
            raise GenerationError(f"prompt holds token id {max(ids)}, outside the vocabulary [0, {V})")
        banned, ends = self._token_tables(V)
        dec = self._acquire(weights, V, T)
        p = params
        dec.begin(ids, temperature=p.temperature, entropy_low=p.entropy_low, entropy_high=p.entropy_high,
                  boost=p.entropy_temp_boost, focus=p.entropy_temp_focus, min_p=p.min_p, typical_p=p.typical_p,
                  top_p=p.top_p, top_k=p.top_k, freq_penalty=p.frequency_penalty, model_alpha=alpha,
                  field=native_field, max_new=p.max_gen_tokens, min_new=p.min_gen_tokens,
                  rep_guard=p.repetition_guard, eos=self.tokenizer.eos_id, banned=banned, sentence_end=ends,
                  seed=p.seed)
        return dec

    # ---- decoder pool: a Decoder's scratch is large (its KV cache and buffers); reusing idle
    # ones saves the allocation and page faults of every call (benchmarks/RESULTS.md)

    def _acquire(self, weights, V: int, T: int) -> _decode.Decoder:
        threads = getattr(self.config, "decode_threads", 1)
        dec = None
        with self._pool_lock:
            while self._pool:
                dec = self._pool.pop()
                if dec.weights is weights and dec.vocab_size == V:
                    dec.n_threads = threads
                    break
                dec = None
        if dec is None:
            dec = _decode.Decoder(weights, V, T, threads)
        self.in_flight.started(dec)
        return dec

    def _release(self, dec: _decode.Decoder) -> None:
        self.in_flight.finished(dec)
        with self._pool_lock:
            if len(self._pool) < 8:
                self._pool.append(dec)

    # ---- public calls

    def run(self, prompt="", **overrides) -> GenerationResult:
        """Generate and return ids, text and the stop reason."""
        params = self.params(**overrides)
        return self.run_begun(self.begin(prompt, params), params)

    def generate(self, prompt="", **overrides) -> str:
        """The generated text (without the prompt)."""
        return self.run(prompt, **overrides).text

    def stream(self, prompt="", **overrides) -> Iterator[str]:
        """Yield the text as it is generated, one piece per token that completes text (pieces
        never split a UTF-8 character; whitespace is collapsed as decode() does)."""
        params = self.params(**overrides)
        return self._pieces(self.begin(prompt, params), params)

    def _pieces(self, dec: _decode.Decoder, params: SamplingParams) -> Iterator[str]:
        """A begun generation's pieces, one token at a time on this thread (the bookkeeping of
        SubmittedGeneration, without a decode loop)."""
        job = SubmittedGeneration(self, dec, params)
        came: list = []
        job.listen(came.append)
        procs = params.logits_processors or None
        try:
            if not job._ended_before_step():
                while not job.done:
                    job._advance(*dec.run(1, procs))
                    yield from (piece for piece in came if piece is not None)
                    came.clear()
        finally:
            job._end("cancelled")  # left early, or failed: the decoder goes back (a no-op once done)

    # ---- several generations at once

    def run_many(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 **overrides) -> list[GenerationResult]:
        """One GenerationResult per prompt, generated together in one batched decode
        (`_decode.Batch`: each step reads every weight matrix once for all sequences).

        params: one SamplingParams for every prompt, or a sequence of one per prompt; None:
        `self.params(**overrides)` for every prompt (overrides only go with params=None). Result
        i is exactly `run(prompts[i])` with params i: the same ids, text and stop reason for the
        same seed, whatever the other sequences do. The seed is per sequence, so prompts
        repeated with one seed repeat one continuation (Organism.run(n=N) gives sequence k the
        seed seed + k)."""
        prompts = list(prompts) if not isinstance(prompts, (str, bytes)) else None
        if not prompts:
            raise GenerationError("run_many takes a non-empty list of prompts (str or lists of token ids)")
        plist = self._params_list(len(prompts), params, overrides)
        return self.run_begun_many(self.begin_many(prompts, plist), plist)

    def _params_list(self, n: int, params, overrides: dict) -> list[SamplingParams]:
        if params is None:
            return [self.params(**overrides)] * n
        if overrides:
            raise GenerationError("pass either params or keyword overrides to run_many, not both")
        plist = [params] * n if isinstance(params, SamplingParams) else list(params)
        if len(plist) != n or not all(isinstance(p, SamplingParams) for p in plist):
            raise GenerationError(f"params must be a SamplingParams or a sequence of {n} of them (one per prompt)")
        return plist

    def begin_many(self, prompts: Sequence, params: Sequence[SamplingParams]) -> list[_decode.Decoder]:
        """begin() for every prompt, all on one snapshot of the weights: the started
        generations, to pass to run_begun_many."""
        need_model = any(p.model_alpha is None or p.model_alpha > 0 for p in params)
        weights = self.weights.get() if need_model else None
        decs: list = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                decs.append(self._begin(prompt, p, weights))
        except BaseException:
            for dec in decs:
                self._release(dec)
            raise
        return decs

    def run_begun_many(self, decs: Sequence[_decode.Decoder], params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """Finish generations started by begin_many(), advancing them together. Sequences with
        stop strings are checked after every step (as stream() does); the others run to their
        stop rules without returning to Python."""
        joined = [SubmittedGeneration(self, dec, p) for dec, p in zip(decs, params, strict=True)]
        try:
            live = [j for j in joined if not j._ended_before_step()]
            if live:
                batch = _decode.Batch([j.dec for j in live], getattr(self.config, "decode_threads", 1))
                procs = [j.params.logits_processors or None for j in live]
                step = 1 if any(j.params.stop for j in live) else max(j.params.max_gen_tokens for j in live)
                while not all(j.done for j in live):
                    for j, (new, reason) in zip(live, batch.run(step, procs)):
                        if not j.done:
                            j._advance(new, reason)
            return [j.result() for j in joined]
        finally:
            for j in joined:
                j._end(None, GenerationError("the batch this generation was in failed"))


class SubmittedGeneration:
    """One generation advanced by a DecodeLoop (or run_begun_many) together with others
    (what Organism.submit returns).

    Its text arrives in pieces as the steps run (the pieces stream() yields). Read them by
    iterating (each next() waits for a piece; the iteration ends with the generation, and
    leaving it early cancels the generation), or give `listen(callback)` a callable: it then
    gets every piece (first those that came before), on the loop's thread and in order, and
    None once at the end. `result()` waits for the end and returns the GenerationResult, or
    raises what ended it; `cancel()` ends it at the loop's next step (stop reason "cancelled").
    Thread-safe."""

    def __init__(self, gen: "Generator", dec: _decode.Decoder, params: SamplingParams):
        self.gen, self.dec, self.params = gen, dec, params
        self._text = _StopText(gen.tokenizer, params.stop)
        self._ids: list[int] = []
        self._pieces: list[str] = []
        self._cond = threading.Condition()
        self._unread: collections.deque = collections.deque()
        self._listener: Callable[[str | None], None] | None = None
        self._cancelled = False
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self.done = False

    # ---- the reader's side

    def __iter__(self) -> Iterator[str]:
        if self._listener is not None:
            raise GenerationError("this generation's pieces go to its listener; read result() instead")
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._unread)
                    piece = self._unread.popleft()
                if piece is None:
                    self.result()  # raises what ended it, if anything did
                    return
                yield piece
        finally:
            self.cancel()

    def listen(self, callback: Callable[[str | None], None]) -> None:
        """Send the pieces to `callback` (called with None after the last one) instead of
        keeping them for iteration."""
        with self._cond:
            if self._listener is not None:
                raise GenerationError("this generation already has a listener")
            self._listener = callback
            while self._unread:
                callback(self._unread.popleft())

    def result(self, timeout: float | None = None) -> GenerationResult:
        """The finished generation (waits for it; GenerationError after `timeout` seconds)."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise GenerationError(f"the generation did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def cancel(self) -> None:
        """End the generation at the next step (a no-op once it ended)."""
        self._cancelled = True

    # ---- the stepping side (one thread at a time)

    def _ended_before_step(self) -> bool:
        """Before each step: True when the generation ends without it (cancelled, or nothing
        to generate)."""
        if self._cancelled or self.params.max_gen_tokens == 0:
            self._end("cancelled" if self._cancelled else "max_tokens")
        return self.done

    def _advance(self, new: list[int], reason: str | None) -> None:
        """Take one step's tokens and stop reason (Decoder.run's)."""
        self._ids.extend(new)
        piece = self._text.add(new, reason)
        if self._text.stopped:
            self.dec.finish()
            reason = "stop_string"
        if piece:
            self._pieces.append(piece)
            self._deliver(piece)
        if reason == "no_token":
            self._end(None, _decode._no_token_error())
        elif reason is not None:
            self._end(reason)

    def _end(self, reason: str | None, error: BaseException | None = None) -> None:
        """Finish: give the decoder back and wake the reader (a no-op once done)."""
        if self.done:
            return
        self.gen._release(self.dec)
        self._result = GenerationResult(self._ids, "".join(self._pieces), reason) if error is None else None
        self._error = error
        with self._cond:
            self.done = True
            self._cond.notify_all()
        self._deliver(None)

    def _deliver(self, piece: str | None) -> None:
        with self._cond:
            if self._listener is None:
                self._unread.append(piece)
                self._cond.notify_all()
                return
            try:
                self._listener(piece)
            except Exception:  # a listener that fails is not listening any more
                log.exception("a generation's listener failed; the generation is cancelled")
                self._cancelled = True


class DecodeLoop:
    """Generations begun by any number of threads, decoded together on one thread.

    `join(generator, decoder, params)` (after Generator.begin) returns a SubmittedGeneration:
    from the next step on, every step advances each live generation by one token, those that
    share a Weights in one batched forward (`_decode.Batch`), so concurrent callers read each
    weight matrix once per step between them instead of once each. A generation leaves when it
    stops. Each one produces exactly the tokens it would alone (Batch's guarantee): its text
    equals Generator.run's and stream's for the same seed and weights. Generations with logits
    processors (Python callables that may raise) step in a batch of their own. Generations
    begun on weights from before a training step keep them, in a batch of their own, until
    they end.

    threads: the Batch's threads (Config.decode_threads). The thread starts with the first
    generation and ends after `idle_seconds` without any. `steps` counts the batched forwards
    and `rows` the sequences they advanced (rows / steps: the mean batch). Thread-safe."""

    def __init__(self, threads: int = 1, idle_seconds: float = 2.0):
        self.threads = threads
        self.idle_seconds = idle_seconds
        self.steps = 0
        self.rows = 0
        self.largest = 0  # the most sequences one forward advanced
        self._joining: list[SubmittedGeneration] = []
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False

    def join(self, gen: "Generator", dec: _decode.Decoder, params: SamplingParams) -> SubmittedGeneration:
        """Add a begun generation; it advances from the loop's next step."""
        return self.join_all([(gen, dec, params)])[0]

    def join_all(self, begun: Sequence[tuple]) -> list[SubmittedGeneration]:
        """Add several begun generations at once (they take their first step together)."""
        joined = [SubmittedGeneration(gen, dec, params) for gen, dec, params in begun]
        with self._changed:
            if self._closed:
                for j in joined:
                    j._end(None, GenerationError("the decode loop is closed"))
                return joined
            self._joining += joined
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="molecule-gpt-decode", daemon=True)
                self._thread.start()
            self._changed.notify()
        return joined

    def close(self) -> None:
        """Stop the thread; generations not finished end with GenerationError, and so does
        any joined afterwards."""
        with self._changed:
            self._closed = True
            thread = self._thread
            self._changed.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _take_joining(self, live: list[SubmittedGeneration]) -> bool:
        """Move new generations into `live`, waiting while there is nothing to do; False: stop
        (closed, or idle for idle_seconds)."""
        with self._changed:
            if not live and not self._joining:
                self._changed.wait_for(lambda: self._joining or self._closed, self.idle_seconds)
            live += self._joining
            self._joining = []
            if live and not self._closed:
                return True
            self._thread = None  # from here on, a join starts a new thread
            return False

    def _run(self) -> None:
        live: list[SubmittedGeneration] = []
        batches: dict = {}  # group key -> (its members, their Batch)
        why = "the decode loop was closed before this generation finished"
        try:
            while self._take_joining(live):
                groups: dict = {}
                for j in live:
                    if not j._ended_before_step():
                        key = (j.dec.weights, id(j) if j.params.logits_processors else None)
                        groups.setdefault(key, []).append(j)
                batches = {key: self._step(members, batches.get(key)) for key, members in groups.items()}
                live = [j for j in live if not j.done]
        except Exception as exc:
            log.exception("the decode loop failed")
            why = f"the decode loop failed: {exc!r}"
        finally:  # closed, idle, or failed: what is left ends here
            with self._changed:
                if self._thread is threading.current_thread():  # failed: no other thread takes these
                    self._thread = None
                    live += self._joining
                    self._joining = []
            for j in live:
                j._end(None, GenerationError(why))

    def _step(self, members: list[SubmittedGeneration], cached: tuple | None) -> tuple:
        """One token for each of `members` in one batched forward; returns (members, Batch)."""
        batch = cached[1] if cached is not None and cached[0] == members else None
        procs = [j.params.logits_processors or None for j in members]
        try:
            if batch is None:
                batch = _decode.Batch([j.dec for j in members], self.threads)
            out = batch.run(1, procs, raise_failed=False)
        except Exception as exc:  # a logits processor that failed (its generation steps alone)
            for j in members:
                j._end(None, exc)
            return members, batch
        self.steps += 1
        self.rows += len(members)
        self.largest = max(self.largest, len(members))
        for j, (new, reason) in zip(members, out):
            j._advance(new, reason)
        return members, batch


class _StopText:
    """The text of one generation as its tokens arrive: stream-decoded (pieces never split a
    UTF-8 character), held back while it may be the start of a stop string, and cut before the
    first stop string that appears (then `stopped` is set and nothing more comes)."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.sd = tokenizer.stream_decoder()
        self.stops = tuple(stops)
        self.longest = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.stopped = False

    def add(self, new: Sequence[int], reason: str | None) -> str:
        """The text that is final after the tokens `new` (reason: the generation's stop reason,
        None while it goes on)."""
        text = self.sd.feed_many(new)
        if reason is not None:
            text += self.sd.flush()
        text = _said(text)
        if not self.stops:
            return text
        held = self.held + text
        cut = min((i for i in (held.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.held = ""
            return held[:cut]
        keep = _stop_prefix_len(held, self.stops, self.longest) if reason is None else 0
        self.held = held[len(held) - keep:] if keep else ""
        return held[:len(held) - keep]


def _said(text: str) -> str:
    """Generated text as the organism says it: valid Unicode. The tokenizer spells any byte
    sequence its tokens form, and three byte tokens can form the UTF-8-style encoding of a lone
    surrogate (U+D800-U+DFFF), which no UTF-8 writer accepts; each becomes U+FFFD, as invalid
    bytes already do. Stream pieces never split a character, so replacing piece by piece gives
    the whole text's replacement."""
    return replace_invalid(text)[0]


def _stop_prefix_len(text: str, stops: Sequence[str], longest: int) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    for k in range(min(len(text), longest - 1), 0, -1):
        tail = text[-k:]
        if any(s.startswith(tail) for s in stops):
            return k
    return 0
