"""Organism: the public face of molecule_gpt: a model, its tokenizer, its corpus and its memory,
which speaks, listens and keeps learning (design.md §4-§8).

What it is: the facade that owns the data and the threads and delegates the rest:
generation to `generation.Generator` (native KV-cache decoding, `_decode`), n-gram statistics to
`field.CorpusField`, training policy to `trainer.Trainer`, files to `checkpoint`.

    org = Organism(Config(), corpus="corpus.txt", memory="memory.sqlite")  # or a list of lines
    org.generate("hello")          # speaks from the corpus field before any training
    org.warmup()                   # 1200 steps by default, with a schedule and held-out loss
    org.observe("what is a river?", speaker="H")   # reservoir + quantum buffer + memory
    reply = org.generate("what is a river?")
    org.observe(reply, speaker="A")
    org.train_burst()              # a checked, possibly rolled-back burst
    with org.background():         # a trainer thread; generate() keeps working meanwhile
        ...
    org.forget("river")            # chat lines and messages containing it
    org.save("org.ckpt"); Organism.load("org.ckpt")
    Organism.from_original("molecule_ckpt.json", corpus="nonames.txt")  # adopt the original program's

Data (design.md §7): the birth corpus is split once into training lines (the reservoir,
molecule_gpt.Reservoir) and held-out lines (`val_fraction`, none below 10 lines). `observe`
adds sentences to the reservoir (tagged "H: "/"A: " when a speaker is given; case-insensitive
dedup; when it exceeds max_corpus_lines the newest half is kept and older lines are sampled to
fill it), to the memory (molecule_gpt.Memory: messages, corpus events, growth snapshots) and
to the quantum buffer,
which fires a burst in the background when new bytes >= qb_min_bytes or novelty (unique/total
new tokens) >= qb_min_novelty, once qb_cooldown_seconds have passed since the last burst. A
burst trains on the buffer's new lines mixed with replayed reservoir lines (replay_ratio).

Field/model blend (design.md §5): model_alpha is the model's weight a in the blend generation
samples, a p_model + (1 - a) p_field, chosen so that the blend predicts the held-out lines (old
and heard) best: least cross-entropy over their targets at temperature 1 (field.best_blend_weight,
on each target's model nats and CorpusField.blend_probs). 0 before any training (the organism
speaks from the field alone; an organism adopted from the original program counts as trained),
1 when the model alone predicts better than any mixture. Without a held-out split the first
training lines stand in (the field's counts leaving each position's own occurrence out).
`Config.field_blend = False` gives 0 before training and 1 after.

Threads (design.md §8.7): generate/stream may be called from any number of threads, also while the
background trainer runs; the trainer takes the model lock per optimizer step, generation takes
it only to copy the weights when they changed. Vocabulary growth (BPE) runs between bursts
under a writer lock; generation holds it as a reader only while it encodes the prompt and starts.
Thread counts: training steps use Config.train_threads workers (0: every core for a foreground
warmup or burst, all but one while the background trainer runs, so that chat keeps a core);
BLAS is single-threaded inside steps (the Model) and, while the background trainer runs,
process-wide (Config.blas_threads); one generation uses Config.decode_threads (1) and no BLAS.

Persistence: `save` writes one checkpoint (molecule_gpt.checkpoint) holding the model with its
optimizer state, the tokenizer and the organism's state (trainer counters and RNG, module
lifecycle, immune history, reservoir with its RNG, held-out lines, quantum buffer); `load`
continues bit for bit (the corpus field and encodings are recomputed from the lines).
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import math
import numbers
import os
import re
import threading
import time
import zlib
from typing import AbstractSet, Any, Callable, Iterator, Sequence

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .errors import CheckpointError, CorpusError, GenerationError, OrganismError, TrainingError
from .field import CorpusField, best_blend_weight
from .generation import (DecodeLoop, GenerationResult, Generator, SubmittedGeneration, check_decode_precision,
                         decoded_nats, fold_weights)
from .heldout import HeldOut
from .memory import Memory
from .model import Model, default_threads, delta_group
from .reservoir import Reservoir, _check_phrase, _pieces, is_chat_line
from .telemetry import JsonlLog
from .text import valid_lines, valid_text
from .tokenizer import EvolvingTokenizer, read_corpus
from .trainer import BurstReport, Projection, Trainer

__all__ = ["Organism", "QuantumBuffer"]

STATE_FORMAT = "molecule_gpt.organism"
STATE_VERSION = 2  # 2 adds heard_val_lines and quarantine; version 1 loads with both empty
_GROWTH_BACKOFF_MAX = 5  # a declined tokenizer growth waits at most 2**5 retrain intervals
_SENTENCE = re.compile(r"(?<=[.!?])\s+")  # the reservoir's sentence split, for untagged text


# ---------------------------------------------------------------------------------------------
# corpus reservoir and quantum buffer


class QuantumBuffer:
    """New text since the last burst: bytes, tokens, distinct tokens, lines (design.md §7)."""

    def __init__(self):
        self.bytes = 0
        self.tokens = 0
        self.unique: set[int] = set()
        self.lines: list[str] = []
        self.held: list[str] = []  # lines heard since the last burst but held out (not trained)
        self.last_burst = time.monotonic()

    def feed(self, lines: Sequence[str], ids: Sequence[Sequence[int]]) -> None:
        self.lines.extend(lines)
        self.bytes += sum(len(line.encode("utf-8", "surrogatepass")) for line in lines)
        for seq in ids:
            self.tokens += len(seq)
            self.unique.update(seq)

    @property
    def novelty(self) -> float:
        return len(self.unique) / self.tokens if self.tokens else 0.0

    def ready(self, config: Config, now: float | None = None) -> bool:
        """New text is there, (bytes >= qb_min_bytes or novelty >= qb_min_novelty) and the
        cooldown since the last burst has passed."""
        now = time.monotonic() if now is None else now
        if not self.lines:
            return False
        trigger = self.bytes >= config.qb_min_bytes or self.novelty >= config.qb_min_novelty
        return trigger and now - self.last_burst >= config.qb_cooldown_seconds

    def trigger(self, config: Config, now: float | None = None) -> str:
        """What starts the next background burst, in words (for /status): ready() decides, this
        says what it waits for."""
        now = time.monotonic() if now is None else now
        if self.ready(config, now):
            return "ready: the next tick"
        if not self.lines:
            return "new text: nothing heard since the last burst"
        if self.bytes < config.qb_min_bytes and self.novelty < config.qb_min_novelty:
            return (f"{config.qb_min_bytes - self.bytes} more bytes or novelty {config.qb_min_novelty:.2f} "
                    f"(now {self.novelty:.2f})")
        return f"the cooldown: {config.qb_cooldown_seconds - (now - self.last_burst):.0f} s"

    def take(self) -> list[str]:
        """The buffered lines; the buffer empties and the cooldown restarts."""
        lines = self.lines
        self.__init__()
        return lines

    def to_dict(self) -> dict:
        return {"bytes": self.bytes, "tokens": self.tokens, "lines": list(self.lines), "held": list(self.held)}


# ---------------------------------------------------------------------------------------------
# helpers


def _jsonable(value: Any) -> Any:
    """A copy JSON round-trips exactly: non-finite floats -> None, tuples -> lists, numpy -> Python."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _split_sentences(text: str) -> list[str]:
    return [sentence for raw in text.splitlines() for sentence in _SENTENCE.split(" ".join(raw.split())) if sentence]


def _cores() -> int:
    return default_threads()


class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no starvation)."""

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0

    @contextlib.contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ---------------------------------------------------------------------------------------------
# the organism


class Organism:
    """A continually learning language organism. See the module docstring.

    Organism(config=None, corpus=None, *, seed=0, dtype="float32", memory=None, telemetry_path=None,
             telemetry_max_bytes=None)
      config          a Config (default Config()); fields may be changed between bursts
      corpus          a list of lines or a path to a UTF-8 text file (one line per line)
      seed            seeds the model init, the data sampling and the corpus split
      dtype           "float32" or "float64"
      memory          a molecule_gpt.Memory, or the path of its SQLite file, receiving observed chat
                      messages, corpus events and growth snapshots (None: no log)
      telemetry_path  path of a JSONL file receiving every telemetry record (None: memory only)
      telemetry_max_bytes  cap on that file: past it the older half is dropped (None: no cap)
    """

    def __init__(self, config: Config | None = None, corpus: Sequence[str] | str | os.PathLike | None = None, *,
                 seed: int = 0, dtype: str = "float32", memory: "str | os.PathLike | Memory | None" = None,
                 telemetry_path: str | os.PathLike | None = None, telemetry_max_bytes: int | None = None,
                 _restore: dict | None = None, _adopt: dict | None = None):
        config = Config() if config is None else config
        if not isinstance(config, Config):
            raise TypeError(f"config must be a molecule_gpt.Config, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.seed = int(seed)
        # two streams: the organism's (corpus split, reservoir) and the trainer's (batches, growth),
        # which run in different threads
        seq_org, seq_train = np.random.SeedSequence(self.seed).spawn(2)
        self._rng = np.random.default_rng(seq_org)
        self._train_rng = np.random.default_rng(seq_train)
        self._lock = threading.RLock()  # organism bookkeeping (reservoir, buffer, caches)
        self._structure = _RWLock()  # vocabulary growth (writer) vs starting generations and saving (readers)
        self._train_lock = threading.Lock()  # one warmup/burst at a time
        # the blend weight (model_alpha): the last measurement as ((model key, field key), weight),
        # and its two parts (each target's model nats, field probabilities) by key; current while
        # neither key changed (weights version or field changes, and the lines measured on)
        self._blend: tuple | None = None
        self._blend_parts: dict = {}
        self._field_changes = 0
        self._blend_lock = threading.Lock()  # one measurement at a time
        # after declined tokenizer growth trials: (trials declined in a row, reservoir characters
        # at the last of them); None while the tokenizer's own schedule decides
        self._growth_retry: tuple[int, int] | None = None
        self.telemetry: collections.deque = collections.deque(maxlen=2000)
        self._telemetry_log = JsonlLog(telemetry_path, telemetry_max_bytes) if telemetry_path is not None else None
        self._own_memory = memory is not None and not isinstance(memory, Memory)
        self.memory = Memory(memory) if self._own_memory else memory
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._thread_error: BaseException | None = None
        self._blas_limiter = None
        self._decode_loop: DecodeLoop | None = None  # the thread that decodes submit()ted generations together
        self._decode_report: dict | None = None  # the last decode_precision_report(), with its step
        self._decode_loop_lock = threading.Lock()

        # three ways to come about, built from the same pieces (_split_corpus, _attach): born
        # from a corpus, restored from a checkpoint, or adopted from the original program
        try:
            if _restore is not None:
                self._init_restored(_restore)
            elif _adopt is not None:
                self._init_adopted(_adopt, corpus)
            else:
                self._init_born(corpus, dtype)
        except BaseException:
            if self._own_memory:
                self.memory.close()
            if self._telemetry_log is not None:
                self._telemetry_log.close()
            raise

    def _init_born(self, corpus, dtype: str) -> None:
        config = self.config
        check_decode_precision(config, dtype)
        lines = self._read_corpus(corpus)
        train = self._split_corpus(lines)
        self.tokenizer = EvolvingTokenizer(lines, config)
        self.tokenizer.maybe_enable_bpe(train)
        self.model = Model(config, self.tokenizer.vocab_size, dtype=dtype, seed=self.seed,
                           n_threads=self._train_threads(background=False))
        birth = self.model.init_embed_snapshot if config.tie_embeddings else self.model.params()["lm_head"]
        self._attach(Reservoir(train, config.max_corpus_lines, self._rng, max_line_chars=config.max_line_chars),
                     self.model.vocab_size, np.array(birth, dtype=np.float64))
        self._rebuild_data()
        if self.memory is not None:
            self.memory.add_corpus_event("birth", len(lines), sum(len(x) for x in lines),
                                         f"{len(train)} train, {len(self.val_lines)} held out")
            self._log_growth("birth")

    # ---- construction helpers

    def _split_corpus(self, lines: list[str]) -> list[str]:
        """Split a new organism's corpus once: the held-out lines (val_fraction of them, none
        below 10 lines) become val_lines, the rest is returned for training; nothing heard or
        quarantined yet. Draws the permutation from the organism's RNG (first, at birth)."""
        order = self._rng.permutation(len(lines))
        n_val = int(round(len(lines) * self.config.val_fraction)) if len(lines) >= 10 else 0
        self.val_lines = [lines[i] for i in sorted(order[:n_val])]
        self.heard_val_lines: list[str] = []  # held out of what it heard since birth, newest last
        self.quarantine: list[str] = []  # lines of rolled-back bursts, kept out of training
        return [lines[i] for i in sorted(order[n_val:])]

    def _attach(self, reservoir: Reservoir, birth_vocab: int, birth_rows: np.ndarray) -> None:
        """The parts every organism has around its model and tokenizer (set before): the
        reservoir, an empty quantum buffer, the birth reference of the output embedding and a
        trainer (fresh counters; a restored organism loads its own next)."""
        self.reservoir = reservoir
        self.buffer = QuantumBuffer()
        self.birth_vocab = int(birth_vocab)
        self._birth_rows = birth_rows
        self.trainer = Trainer(self.model, self.config, self._train_rng, self._birth_rows, emit=self._emit,
                               on_restore=self._weights_restored, pace=self._yield_to_generations)
        self._ids_cache: dict[str, list] = {}

    def _read_corpus(self, corpus) -> list[str]:
        if corpus is None:
            return []
        is_path = isinstance(corpus, os.PathLike) or (isinstance(corpus, str) and "\n" not in corpus
                                                        and os.path.isfile(corpus))
        if is_path:
            try:
                return self._fit_lines(read_corpus(corpus).lines)
            except OSError as exc:
                raise CorpusError(f"cannot read the corpus file {os.fspath(corpus)!r}: {exc}") from exc
        if isinstance(corpus, str):
            raise CorpusError(f"corpus {corpus[:60]!r} is a string but not an existing file; pass a path to a "
                              f"text file or a list of lines")
        if isinstance(corpus, (bytes, bytearray)):
            raise CorpusError("corpus must be a list of str lines or a path, got bytes; decode it first")
        try:
            items = list(corpus)
        except TypeError:
            raise CorpusError(f"corpus must be a list of lines or a path, got {type(corpus).__name__}") from None
        for i, line in enumerate(items):
            if not isinstance(line, str):
                raise CorpusError(f"corpus[{i}] is a {type(line).__name__}; every line must be str")
        return self._fit_lines(valid_lines(items, "the corpus", stacklevel=4))

    def _fit_lines(self, lines: Sequence[str]) -> list[str]:
        """Whitespace-normalized, non-empty lines; one longer than max_line_chars becomes several
        (as the reservoir splits them), so nothing of the corpus is dropped."""
        out = []
        for line in lines:
            out.extend(_pieces(" ".join(line.split()), self.config.max_line_chars))
        return out

    def _train_threads(self, background: bool) -> int:
        c = self.config.train_threads
        if c:
            return c
        cores = _cores()
        return max(1, cores - 1) if background else cores

    def _encode(self, line: str) -> list:
        ids = self._ids_cache.get(line)
        if ids is None:
            ids = self.tokenizer.encode(line)
            self._ids_cache[line] = ids
        return ids

    def _rebuild_data(self, retokenize: bool = True) -> None:
        """Re-derive encoded sequences, the held-out subset and the field (after birth, growth,
        loading; retokenize=False when the tokenizer did not change, so encodings are reused).
        Holds the organism lock."""
        with self._lock:
            if retokenize:
                self._ids_cache = {}
            self._train_ids = None
            val = self.val_lines[:self.config.val_max_sequences]
            self._val_ids = [self._encode(x) for x in val]
            self._old_heldout = self._heldout(val, getattr(self, "_old_heldout", None))
            # every held-out line of the old text, for the immune system's close calls
            self._old_heldout_all = (self._heldout(self.val_lines, getattr(self, "_old_heldout_all", None))
                                     if len(self.val_lines) > len(val) else None)
            self._heard_heldout = self._heldout(self.heard_val_lines, getattr(self, "_heard_heldout", None))
            self.field = CorpusField(self.tokenizer.vocab_size, self._reservoir_ids())
            self._field_changed()
            previous = getattr(self, "_generator", None)
            self._generator = Generator(self.model, self.tokenizer, self.field, self.config,
                                        weights=previous.weights if previous is not None else None,
                                        in_flight=previous.in_flight if previous is not None else None)

    def _reservoir_ids(self) -> list:
        """The reservoir's lines encoded, in its order; encoded again after the reservoir or
        the tokenizer changed (on the first use, not on every observe())."""
        with self._lock:
            if self._train_ids is None:
                self._train_ids = [self._encode(x) for x in self.reservoir.lines]
            return self._train_ids

    def _heldout(self, lines: Sequence[str], current: HeldOut | None = None) -> HeldOut:
        """A held-out set of `lines` scored with the tokenizer of the moment; `current` is kept
        when it holds the same lines (its cached losses stay valid: it re-encodes by itself
        when the tokenizer changes)."""
        if current is not None and current.lines == [x for x in lines if x.split()]:
            return current
        return HeldOut(lines, lambda line: self.tokenizer.encode(line), lambda: self.tokenizer.version)

    def heldout_loss(self, lines: Sequence[str] | None = None) -> float | None:
        """Held-out loss of the model now, in nats per character (molecule_gpt.heldout): on
        `lines` when given, else on the organism's held-out slice of its birth corpus. None
        without lines."""
        held = self._old_heldout if lines is None else self._heldout(list(lines))
        return held.loss(self.model) if len(held) else None

    def decode_precision_report(self, lines: Sequence[str] | None = None) -> dict | None:
        """What decoding with `Config.decode_precision` costs in prediction: the held-out loss
        (nats per character, molecule_gpt.heldout) of generation's own decoder run a token at a
        time over the held-out lines (or `lines`), with the model's weights and with the
        decode precision's. Returns {"decode_precision", "heldout_model", "heldout_decode",
        "change"} (change: heldout_decode / heldout_model - 1), also kept for the status and
        written to the telemetry; None without lines. Costs one decode step per held-out token."""
        held = self._old_heldout if lines is None else self._heldout(list(lines))
        if not len(held):
            return None
        precision = self.config.decode_precision
        windows = held.windows(self.config.block_size)
        own = fold_weights(self.model, "model")
        decoded = own if precision == "model" else fold_weights(self.model, precision)
        model_nats = decoded_nats(own, windows)
        decode_nats = model_nats if decoded is own else decoded_nats(decoded, windows)
        report = {"decode_precision": precision, "heldout_model": float(model_nats / held.chars),
                  "heldout_decode": float(decode_nats / held.chars), "change": float(decode_nats / model_nats - 1.0)}
        self._decode_report = dict(report, step=self.trainer.steps)
        self._emit(dict(report, phase="decode_precision", step=self.trainer.steps))
        return report

    def _trained(self) -> bool:
        """Whether the weights carry training: steps taken here, or a finished warmup (an
        organism adopted from the original program counts as warmed up: the original trained it)."""
        return self.trainer.steps > 0 or self.trainer.warmed_up

    def _weights_restored(self) -> None:
        """A rollback wrote parameters back in place and put Model.version back, so the decoder's
        cache (keyed by it) is right either way; it is dropped all the same, so that weights
        written in place without Model.refresh() before the burst are not served from it."""
        self._generator.weights.invalidate()

    # ---- telemetry

    def _emit(self, record: dict) -> None:
        record = dict(record, time=time.time())
        self.telemetry.append(record)
        if self._telemetry_log is not None:
            self._telemetry_log.write(_jsonable(record))

    def _log_growth(self, note: str) -> None:
        if self.memory is None:
            return
        g = self.gamma_stats()
        self.memory.add_snapshot(self.trainer.steps, self.model.vocab_size, self.model.num_params(), self.model.n_delta,
                                 self.reservoir.chars, self.trainer.last_loss, g["sparsity"], g["magnitude"], note)

    # ---- generation

    def model_alpha(self) -> float:
        """The model's weight in the field blend now: the one under which the blend predicts the
        held-out lines best (see the module docstring)."""
        with self._structure.read():  # not between a tokenizer growth and the model's
            return self._model_alpha(wait=True)

    def _model_alpha(self, wait: bool) -> float:
        """model_alpha(), for a caller holding the structure lock (as a reader); without wait,
        while another thread measures it or a burst trains, the previous measurement serves (a
        generation does not queue behind it)."""
        if not self._trained():
            return 0.0
        if not self.config.field_blend:
            return 1.0
        alpha = self._blend_weight(wait)
        return 1.0 if alpha is None else alpha

    def _field_changed(self) -> None:
        """The field or the held-out text changed: the blend weight is measured again."""
        with self._lock:
            self._field_changes += 1

    def _blend_weight(self, wait: bool) -> float | None:
        """best_blend_weight on the held-out lines, old and heard (without a held-out split, on
        the first training lines): each target's model nats (from the trainer's evaluations
        where they scored these weights) and field probability. Each part is kept until the
        weights, the field or the lines change. Measured outside the organism lock (observe()
        goes on meanwhile), one measurement at a time; without wait, a thread that finds one
        under way, a burst training (weights in mid-change) or a step holding the model lock
        takes the previous result. None when the field has nothing to blend with."""
        last = self._blend
        if not wait and last is not None and self._train_lock.locked():
            return last[1]
        if not self._blend_lock.acquire(blocking=wait):
            if last is not None:
                return last[1]
            self._blend_lock.acquire()
        try:
            with self._lock:
                field, T = self.field, self.config.block_size
                held = [h for h in (self._old_heldout, self._heard_heldout) if h is not None and len(h)]
                seqs = None if held else [s for s in self._reservoir_ids()[:self.config.val_max_sequences] if len(s) >= 2]
                lines = tuple(h.key() for h in held) if held else ("training", self._field_changes, self.tokenizer.version)
                model_key, field_key = (self.model.version, lines), (self._field_changes, lines)
                last = self._blend
                if last is not None and last[0] == (model_key, field_key):
                    return last[1]
            if field.total_tokens == 0 or not (held or seqs):
                return None
            # both parts on one set of windows (a tokenizer growth may re-encode the lines meanwhile)
            ws = [w for h in held for w in h.windows(T)] if held else seqs
            fresh = not held or tuple(h.key() for h in held) == lines
            nats = self._blend_parts.get(model_key) if fresh else None
            if nats is None:  # the model's part under one set of weights, kept under their version
                if not self.model.lock.acquire(blocking=wait):
                    if last is not None:  # a training step holds the weights: the previous serves
                        return last[1]
                    self.model.lock.acquire()
                try:
                    model_key = (self.model.version, lines)
                    nats = self.trainer.target_nats(ws) if held else np.concatenate(self.model.token_nats(seqs))
                finally:
                    self.model.lock.release()
            q = self._blend_parts.get(field_key) if fresh else None
            if q is None:
                q = field.blend_probs(ws, T, leave_one_out=not held)  # the field counted training lines
            alpha = 0.0 if np.isnan(nats).any() else best_blend_weight(nats, q)  # a broken model: the field speaks
            if fresh:
                with self._lock:
                    self._blend_parts = {model_key: nats, field_key: q}
                    self._blend = ((model_key, field_key), alpha)
            return alpha
        finally:
            self._blend_lock.release()

    def _overrides(self, overrides: dict) -> dict:
        if overrides.get("model_alpha") is None:
            overrides["model_alpha"] = self._model_alpha(wait=False)
        if overrides["model_alpha"] == 0.0 and "max_gen_tokens" not in overrides:
            overrides["max_gen_tokens"] = min(self.config.max_gen_tokens, self.config.corpus_gen_max_tokens)
        if overrides["model_alpha"] == 0.0 and self.field.total_tokens == 0:
            overrides["model_alpha"] = 1.0  # nothing to say from: the (untrained) model speaks
        return overrides

    def generate(self, prompt: str | Sequence[int] = "", n: int | None = None, **overrides) -> str | list[str]:
        """Text generated after `prompt` (not including it). Overrides: any SamplingParams field
        (temperature, top_k, top_p, min_p, typical_p, entropy_*, max_gen_tokens, min_gen_tokens,
        repetition_guard, frequency_penalty, stop, seed, model_alpha, logits_processors).
        n: a list of n continuations instead, decoded together (see run())."""
        if n is None:
            return self.run(prompt, **overrides).text
        return [r.text for r in self.run(prompt, n=n, **overrides)]

    def run(self, prompt: str | Sequence[int] = "", n: int | None = None,
            **overrides) -> GenerationResult | list[GenerationResult]:
        """Like generate(), returning ids, text and the stop reason.

        n: return a list of n results, decoded together in one batch (each step reads the
        weights once for all n, which is several times the tokens per second of n calls on a
        model whose weights do not fit in cache). Continuation k uses the seed `seed + k` when a
        seed is given (fresh entropy for each when seed is None), so result k equals
        run(prompt, seed=seed + k, **the other overrides), token for token; `generate -n` and
        the server's `n` follow the same rule."""
        if n is None:
            gen, dec, params = self._begin(prompt, overrides)
            return gen.run_begun(dec, params)
        gen, decs, params = self._begin_n(prompt, n, overrides)
        return gen.run_begun_many(decs, params)

    def submit(self, prompt: str | Sequence[int] = "", n: int | None = None,
               **overrides) -> SubmittedGeneration | list[SubmittedGeneration]:
        """Start a generation that is decoded together with every other one submitted to this
        organism, from any thread: each step of the organism's decode thread advances all of
        them by one token, those on the same weights in one batched forward (DecodeLoop). The
        prompt is encoded and prefilled here; the returned SubmittedGeneration yields the
        reply's pieces (or sends them to a listener) and gives the GenerationResult, equal token
        for token to run() with the same arguments and seed. n: a list of n, begun as run(n=)
        begins them. This is how the server answers concurrent requests."""
        if n is None:
            gen, dec, params = self._begin(prompt, overrides)
            return self._decoding().join(gen, dec, params)
        gen, decs, params = self._begin_n(prompt, n, overrides)
        return self._decoding().join_all([(gen, dec, p) for dec, p in zip(decs, params)])

    def _begin_n(self, prompt, n, overrides: dict):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
            raise GenerationError(f"n must be a positive int (the number of continuations), got {n!r}")
        with self._structure.read():
            overrides = self._overrides(dict(overrides))
            gen = self._generator
            base = gen.params(**overrides)
            seed = base.seed
            params = [base if seed is None or k == 0 else dataclasses.replace(base, seed=seed + k) for k in range(n)]
            return gen, gen.begin_many([prompt] * n, params), params

    def _decoding_counts(self) -> dict:
        """What the decode loop of submit() did: batched forwards, the tokens they sampled (one
        per sequence per forward), the most sequences in one."""
        loop = self._decode_loop
        return {"steps": loop.steps, "tokens": loop.rows, "largest": loop.largest} if loop is not None else \
            {"steps": 0, "tokens": 0, "largest": 0}

    def _decoding(self) -> DecodeLoop:
        with self._decode_loop_lock:
            if self._decode_loop is None:
                self._decode_loop = DecodeLoop(self.config.decode_threads)
            return self._decode_loop

    def stream(self, prompt: str | Sequence[int] = "", **overrides) -> Iterator[str]:
        """Yield the reply in pieces as it is generated; "".join(pieces) == generate(...)."""
        gen, dec, params = self._begin(prompt, overrides)
        return gen.stream_begun(dec, params)

    def _begin(self, prompt, overrides: dict):
        with self._structure.read():
            overrides = self._overrides(dict(overrides))
            gen = self._generator
            params = gen.params(**overrides)
            return gen, gen.begin(prompt, params), params

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (n, V) at every position of the last block_size ids of `ids` (full forward)."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be a non-empty flat sequence of int token ids, got shape {arr.shape}")
        return self.model.logits(arr[-self.config.block_size:])

    # ---- listening

    def observe(self, text: str | Sequence[str], speaker: str | None = None) -> int:
        """Add text to the corpus: its sentences go into the reservoir (tagged "H: "/"A: " when
        speaker is "H" (the person) or "A" (the organism); deduplicated case-insensitively) and
        into the quantum buffer, and the field counts them. With a speaker the text is also a
        chat message in the memory. A chat turn is observe(user, "H"), then
        reply = generate(...), then observe(reply, "A"). A list of str is a corpus: each item
        is one line (not split into sentences; no speaker). Returns the number of new lines.

        What is not valid Unicode (lone surrogates) becomes U+FFFD, with an InvalidTextWarning.
        Every chat turn is stored in the memory, also one whose lines the corpus already holds
        (deduplication is a corpus policy); the memory is written first, so a turn it refuses
        (MemoryStoreError) is not half-stored in the corpus."""
        if isinstance(text, str):
            text, lines = valid_text(text, "observe()", stacklevel=3), None
        elif isinstance(text, (list, tuple)) and all(isinstance(x, str) for x in text):
            if speaker is not None:
                raise ValueError("a list of lines is corpus text and takes no speaker; observe chat turns one at a time")
            lines = valid_lines(text, "observe()", stacklevel=3)
        else:
            raise TypeError(f"observe() takes str or a list of str, got {type(text).__name__}")
        if speaker not in (None, "H", "A"):
            raise ValueError(f"speaker must be 'H' (the person), 'A' (the organism) or None, got {speaker!r}")
        return self._take_in([(speaker, text, lines)])

    def observe_turns(self, turns: Sequence[tuple[str, str]]) -> int:
        """Several chat turns [(speaker, text), ...] at once: stored and learned as
        observe(text, speaker) for each in order would, with one memory transaction for all of
        them (all stored, or none and nothing learned) and one update of the corpus field.
        Returns the number of new corpus lines."""
        if isinstance(turns, (str, bytes)) or not isinstance(turns, (list, tuple)):
            raise TypeError(f"observe_turns() takes a list of (speaker, text) pairs, got {type(turns).__name__}")
        items = []
        for turn in turns:
            if not isinstance(turn, (list, tuple)) or len(turn) != 2 or not isinstance(turn[1], str):
                raise TypeError(f"a turn must be a (speaker, text) pair with text a str, got {turn!r:.80}")
            speaker, text = turn
            if speaker not in ("H", "A"):
                raise ValueError(f"speaker must be 'H' (the person) or 'A' (the organism), got {speaker!r}")
            items.append((speaker, valid_text(text, "observe_turns()", stacklevel=3), None))
        return self._take_in(items)

    def _take_in(self, items: list[tuple[str | None, str, list[str] | None]]) -> int:
        """observe() for (speaker, text, lines) items in order: the memory first (one
        transaction), then the corpus under one lock."""
        if self.memory is not None:
            turns = [(speaker, text) for speaker, text, lines in items if speaker is not None and text.strip()]
            if turns:
                self.memory.add_messages(turns)
        new_lines: list[str] = []
        new_ids: list = []
        with self._structure.read(), self._lock:  # never between a tokenizer change and the rebuild
            for speaker, text, lines in items:
                if lines is not None:
                    added = self.reservoir.add(lines)
                elif speaker is None:
                    added = self.reservoir.add(_split_sentences(text))
                else:
                    added = self.reservoir.add_message(speaker, text)
                if not added:
                    continue
                held = self._hold_out(added)
                trained = [x for x in added if x not in held] if held else added
                ids = [self._encode(x) for x in trained]
                self.buffer.held.extend(x for x in added if x in held)
                self.buffer.feed(trained, ids)
                new_lines += added
                new_ids += ids
            if not new_lines:
                return 0
            lines = self.reservoir.lines
            if len(self._ids_cache) > 2 * (self.config.max_corpus_lines + len(self.val_lines)):
                keep = set(lines) | set(self.val_lines)  # forget evicted lines
                self._ids_cache = {k: v for k, v in self._ids_cache.items() if k in keep}
            self._train_ids = None  # encoded again when training or scoring needs them
            self.field.add(new_ids)
            self._field_changed()
        if self.memory is not None:
            self.memory.add_corpus_event("observe", len(new_lines), sum(len(x) for x in new_lines))
        return len(new_lines)

    def _hold_out(self, added: list[str]) -> set:
        """Hold out a slice (about Config.heard_val_fraction) of newly heard lines: they leave the
        reservoir and join the held-out set of heard text (the newest heard_val_max_lines),
        which measures what bursts learn. Holds the organism lock."""
        frac = self.config.heard_val_fraction
        if frac <= 0:
            return set()
        # chosen by the line's text, not by a random draw: the same line is always held out or
        # always trained, and what one observe() holds out does not shift the next one's choice
        # (a rolled-back burst leaves no trace in what later text trains)
        held = {x for x in added if zlib.crc32(x.encode("utf-8", "surrogatepass")) < frac * 2 ** 32}
        if held:
            self.reservoir.remove(held)
            keep = self.config.heard_val_max_lines
            self.heard_val_lines = (self.heard_val_lines + [x for x in added if x in held])[-keep:]
            self._heard_heldout = self._heldout(self.heard_val_lines)
        return held

    def release_quarantine(self) -> int:
        """Give the lines of rolled-back bursts (see stats()["quarantine"]) back to the organism:
        they are observed again, as new text for the next burst. Returns how many came back."""
        with self._lock:
            lines, self.quarantine = self.quarantine, []
        return self.observe(lines) if lines else 0

    def forget(self, phrase: str | None = None, *, chat_only: bool = True):
        """Forget chat: reservoir lines (and, with a memory, messages and their search-index
        rows) containing `phrase` (case-insensitive), or all of them with phrase=None. With
        chat_only (the default) only chat lines ("H: ..."/"A: ...") are candidates, so the birth
        corpus stays. The field is recounted from what remains; what the weights learned stays.
        Returns a molecule_gpt.ForgetCounts (messages, index_rows, reservoir_lines, erased_from_disk)."""
        from .memory import ForgetCounts
        if isinstance(phrase, str):
            phrase = valid_text(phrase, "forget()", stacklevel=3)
        with self._structure.write(), self._lock:
            if self.memory is not None:
                counts = self.memory.forget(phrase, reservoir=self.reservoir, chat_only=chat_only)
            else:
                counts = ForgetCounts(0, 0, self.reservoir.forget(phrase, chat_only=chat_only), True)
            # the lines kept beside the reservoir (held out, quarantined) forget the same way
            needle = _check_phrase(phrase)

            def keep(line: str) -> bool:
                return not ((not chat_only or is_chat_line(line)) and (needle is None or needle in line.casefold()))

            aside = (self.heard_val_lines, self.quarantine, self.buffer.held)
            self.heard_val_lines, self.quarantine, self.buffer.held = ([x for x in lines if keep(x)] for lines in aside)
            dropped_aside = sum(map(len, aside)) - len(self.heard_val_lines) - len(self.quarantine) - len(self.buffer.held)
            if counts.reservoir_lines or dropped_aside:
                gone = set(self.buffer.lines) - set(self.reservoir.lines)
                self.buffer.lines = [x for x in self.buffer.lines if x not in gone]
                self._rebuild_data()
        if self.memory is not None and counts.reservoir_lines:
            self.memory.add_corpus_event("forget", counts.reservoir_lines, 0, "" if phrase is None else f"phrase of {len(phrase)} chars")
        return counts

    def _maybe_grow_tokenizer(self, untrained: AbstractSet[str] = frozenset()) -> bool:
        """Enable, retrain or extend BPE when the reservoir has grown enough (design.md §1, §8.13);
        grows the model and rebuilds the field and encodings. Returns True when the tokenizer
        changed.

        Before any training the change is free (the merges are retrained). Afterwards the
        existing merges stay and Config.bpe_growth_merges new ones are appended while the
        vocabulary is below Config.bpe_max_vocab (BPE enabled for the first time when it was
        not yet), so old text segments as before except where a new merge joins two tokens.
        The grown tokenizer is tried on a copy of the model: its new rows start from the tokens
        they merge (`_init_merged_rows`), are trained alone for Config.bpe_growth_steps steps
        (`_fit_new_rows`), and the growth is kept only if held-out loss on the old text rises
        by at most Config.bpe_growth_max_rise. Otherwise it is declined, and the next trial
        waits for bpe_retrain_every_chars more characters, twice as many after each further
        decline in a row (up to 2**_GROWTH_BACKOFF_MAX times): a tokenizer whose growth keeps
        hurting the old text is not grown and scored at every burst. Reservoir lines in
        `untrained` (see _checked_burst) are left out: a growth is learned from, and due
        after, text the model has trained on."""
        with self._lock:  # one snapshot: what decides whether a growth is due is what it learns from
            lines = [x for x in self.reservoir.lines if x not in untrained]
            held = self._old_heldout
        next_trial = self._growth_next_trial()
        if next_trial is not None and sum(len(x) for x in lines) < next_trial:
            return False
        if not self.tokenizer.growth_due(lines):
            return False
        if not (self._trained() and len(held) > 0):
            # before any training the change is free: made in place, generation excluded
            with self._structure.write():
                update = self._grow_tokenizer(self.tokenizer, lines)
                if update is None:
                    return False
                self._grow_model(self.model, self.tokenizer, update)
                self._rebuild_data()
            self._emit(self._growth_record(update))
            self._log_growth(f"tokenizer {update.event}")
            return True
        # checked: the trial (a grown copy of the tokenizer, scored on a grown copy of the
        # model) runs beside generation; only the change itself excludes it. The caller holds
        # the train lock, so the model does not train meanwhile.
        tok = self.tokenizer
        room = self.config.bpe_max_vocab - tok.vocab_size
        if tok.bpe_enabled and room <= 0:
            return False
        candidate = EvolvingTokenizer.from_dict(tok.to_dict())
        if candidate.bpe_enabled:
            update = candidate.extend_bpe(lines, min(self.config.bpe_growth_merges, room))
        else:
            update = candidate.maybe_enable_bpe(lines)
        if update is None:
            return False
        record = self._growth_record(update)
        if update.num_merges == len(tok.merges) and not update.grew:
            # no pair left to merge: nothing to try; waits as a declined growth does
            self._decline_growth(record, "nothing to merge", lines)
            return False
        before = self.trainer.evaluate(held)
        trial = Model.from_state(*self.model.export_state())
        self._grow_model(trial, candidate, update)
        if update.grew:
            self._fit_new_rows(trial, candidate, update, lines)
        # the same lines, segmented by the candidate tokenizer, scored by the grown copy
        after = HeldOut(held.lines, candidate.encode, lambda: candidate.version).loss(trial, self.trainer.pace)
        record.update(loss_before=before, loss_after=after)
        if not after <= before * (1.0 + self.config.bpe_growth_max_rise):
            self._decline_growth(record, "old-text loss rose", lines)
            return False
        with self._structure.write():
            if self.tokenizer is not tok or self.model.vocab_size != update.old_vocab_size:
                return False  # changed meanwhile (a load, a forget): the next burst tries again
            self.tokenizer = candidate
            self._growth_retry = None
            self._grow_model(self.model, self.tokenizer, update)
            self._adopt_rows(trial, update)
            self._rebuild_data()
        self._emit(record)
        self._log_growth(f"tokenizer {update.event}")
        return True

    def _decline_growth(self, record: dict, reason: str, lines: list[str]) -> None:
        """A growth trial on `lines` not kept: the back-off counts it, telemetry says why."""
        declines = 1 if self._growth_retry is None else self._growth_retry[0] + 1
        self._growth_retry = (declines, sum(len(x) for x in lines))
        record.update(event=f"{record['event']} declined", reason=reason, vocab_size=self.tokenizer.vocab_size,
                      next_trial_chars=self._growth_next_trial())
        self._emit(record)

    def _growth_next_trial(self) -> int | None:
        """Reservoir characters at which the next growth trial is due after declined ones (see
        _maybe_grow_tokenizer); None when none was declined since the last growth."""
        retry = self._growth_retry
        if retry is None:
            return None
        declines, at_chars = retry
        return at_chars + max(1, self.config.bpe_retrain_every_chars << min(declines - 1, _GROWTH_BACKOFF_MAX))

    @staticmethod
    def _grow_tokenizer(tok: EvolvingTokenizer, lines: list[str]):
        return tok.maybe_enable_bpe(lines) or tok.maybe_retrain_bpe(lines)

    @staticmethod
    def _growth_record(update) -> dict:
        return {"phase": "tokenizer", "event": update.event, "vocab_size": update.new_vocab_size,
                "merges": update.num_merges}

    @staticmethod
    def _grow_model(model: Model, tokenizer: EvolvingTokenizer, update) -> None:
        if update.grew:
            model.grow_vocab(update.new_vocab_size)
            Organism._init_merged_rows(model, tokenizer, update.old_vocab_size)

    @staticmethod
    def _init_merged_rows(model: Model, tokenizer: EvolvingTokenizer, first_new: int) -> None:
        """Embedding rows of merged tokens born at ids >= first_new start as the mean of the
        rows of the two tokens they merge (the token alone for an end-of-word merge), in
        rank order so that parts born in the same growth are set first: the model reads a
        new token roughly as it read its parts, instead of as noise."""
        with model.lock:
            params = model.params()  # live views; with tied embeddings lm_head is wte
            mats = [params["wte"]] + ([params["lm_head"]] if "lm_head" in params else [])
            for a, b, m in tokenizer.merges:
                if m < first_new:
                    continue
                for E in mats:
                    E[m] = E[a] if b < 0 else 0.5 * (E[a] + E[b])
            model.refresh()

    def _fit_new_rows(self, trial: Model, tokenizer: EvolvingTokenizer, update, lines: list[str]) -> None:
        """Train the embedding rows a growth added to `trial` (ids old_vocab_size and up, of wte
        and of an untied lm_head), everything else fixed: Adam at Config.learning_rate over
        Config.bpe_growth_steps batches of reservoir lines as `tokenizer` encodes them, windows
        of block_size + 1 ids from longer ones. The batches come from a generator seeded by the
        organism's seed and the reservoir's size, so a trial is repeatable and the trainer's
        own random stream is left as it was."""
        c = self.config
        seqs = [ids for ids in (tokenizer.encode(x) for x in lines) if len(ids) >= 2]
        if c.bpe_growth_steps == 0 or not seqs:
            return
        rng = np.random.default_rng([self.seed, sum(len(x) for x in lines)])
        if not trial.trainable["base"]:
            trial.set_trainable("base", True)
        trial.n_threads = self.model.n_threads
        rows = slice(update.old_vocab_size, update.new_vocab_size)
        params = trial.params()
        names = ["wte"] + (["lm_head"] if "lm_head" in params else [])
        mean = {k: np.zeros(params[k][rows].shape) for k in names}
        square = {k: np.zeros(params[k][rows].shape) for k in names}
        b1, b2, T = c.beta1, c.beta2, c.block_size
        for step in range(1, c.bpe_growth_steps + 1):
            t0 = time.perf_counter()
            batch = []
            for i in rng.integers(0, len(seqs), c.batch_size):
                ids = seqs[int(i)]
                if len(ids) > T + 1:
                    start = int(rng.integers(0, len(ids) - T))
                    ids = ids[start:start + T + 1]
                batch.append(ids)
            _, grads = trial.loss_and_grads(batch)
            for k in names:
                g = np.clip(grads[k][rows].astype(np.float64), -c.grad_clip, c.grad_clip)
                mean[k] = b1 * mean[k] + (1 - b1) * g
                square[k] = b2 * square[k] + (1 - b2) * g * g
                m_hat, v_hat = mean[k] / (1 - b1 ** step), square[k] / (1 - b2 ** step)
                change = (c.learning_rate * m_hat / (np.sqrt(v_hat) + c.eps_adam)).astype(params[k].dtype)
                # through write_rows: frozen modules on lm_head fold the (tied) embedding into
                # a cached copy, which must see the new rows at the next step
                trial.write_rows(k, rows, params[k][rows] - change)
            self.trainer.pace(time.perf_counter() - t0)

    def _adopt_rows(self, trial: Model, update) -> None:
        """Copy the rows `_fit_new_rows` trained from the accepted trial into the model (grown
        to the same vocabulary)."""
        if not update.grew:
            return
        rows = slice(update.old_vocab_size, update.new_vocab_size)
        trained = trial.params()
        for k in ("wte", "lm_head"):
            if k in trained:
                self.model.write_rows(k, rows, trained[k][rows])

    # ---- training

    def warmup(self, steps: int | None = None, progress: Callable[[dict], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> dict:
        """Train the base on the corpus with linear warmup then cosine decay, held-out loss every
        eval_interval steps, early stop on a plateau (Config.patience); the base is frozen
        afterwards when Config.freeze_base_after_warmup.

        steps=None runs the configured warmup (Config.warmup_steps), or the rest of it when an
        earlier one was cut short (by should_stop or a stopped background trainer): the schedule
        continues where it stopped. An int runs that many steps on a schedule of their own.
        progress(record) is called after every step with {"step", "of", "loss", "lr"} (plus
        "val_loss" and "collapsed_layers" at evaluations). should_stop() is asked before every
        step; when it says True the warmup ends after the step in flight and stays unfinished
        (steps=None resumes it). Returns a summary: steps, stopped_early, loss, val_loss,
        seconds, finished."""
        if steps is None:
            total, start = self.config.warmup_steps, self.trainer.warmup_steps_done
            if self.trainer.warmed_up or start >= total:
                start = 0
            summary = self._warmup(total - start, progress, start=start, total=total, should_stop=should_stop)
        else:
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"steps must be a non-negative int, got {steps!r}")
            summary = self._warmup(steps, progress, should_stop=should_stop)
        return summary

    def _warmup(self, steps: int, progress=None, start: int = 0, total: int | None = None,
                finish: bool = True, should_stop: Callable[[], bool] | None = None) -> dict:
        with self._train_lock:
            self._sync_threads()
            with self._lock:
                train, val = list(self._reservoir_ids()), self._old_heldout
            if not train:
                raise TrainingError("nothing to train on: give the organism a corpus or observe() text first")
            summary = self.trainer.warmup(train, val, steps, progress, self._collapse_probe, start=start,
                                          total=total, finish=finish,
                                          should_stop=self._stopper(should_stop))
        summary["finished"] = self.trainer.warmed_up
        self._log_growth("warmup" if summary["finished"] else "warmup interrupted")
        return summary

    def _collapse_probe(self) -> list:
        """Layers whose hidden-state std on a held-out line is below Config.collapse_std_bound."""
        from . import _decode
        seqs = self._val_ids or self._reservoir_ids()
        if not seqs:
            return []
        w = self._generator.weights.get()
        dec = _decode.Decoder(w, w.vocab_size, w.block_size)
        stds = dec.hidden_std(max(seqs[:8], key=len))
        return [i for i in range(1, len(stds)) if stds[i] < self.config.collapse_std_bound]

    def train_burst(self, lr: float | None = None) -> BurstReport:
        """One burst (Config.micro_steps steps) on the quantum buffer's new lines mixed with
        replayed lines the organism knew before them, checked by the immune system (rolled back
        if it fails: its lines then go to the quarantine), then maybe a new delta module. Works
        without new text too (replay only). lr overrides the learning rate of this burst
        (default Config.burst_learning_rate times the rollback back-off)."""
        with self._train_lock:
            with self._lock:
                held = self.buffer.held
                new_lines = self.buffer.take()
            return self._checked_burst(new_lines, lr, held)

    def _checked_burst(self, new_lines: list[str], lr: float | None = None, held: Sequence[str] = (),
                       untrained: AbstractSet[str] = frozenset()) -> BurstReport:
        """A burst on `new_lines` (in the reservoir, no longer in the buffer); `held` are the
        lines held out of the same text, quarantined with it on a rollback; `untrained` are
        reservoir lines heard with them that later bursts take (learn()): neither replay nor
        the tokenizer's growth counts them as known yet. The caller holds the train lock."""
        self._sync_threads()
        self._sync_config()
        self._maybe_grow_tokenizer(untrained)
        with self._lock:
            new = [self._encode(x) for x in new_lines]
            # replay draws from what the organism knew before this text
            fresh = set(new_lines)
            replay = [ids for line, ids in zip(self.reservoir.lines, self._reservoir_ids())
                      if line not in fresh and line not in untrained]
            old, heard, old_all = self._old_heldout, self._heard_heldout, self._old_heldout_all
        if not replay and not new:
            raise TrainingError("nothing to train on: give the organism a corpus or observe() text first")
        if not self.trainer.warmed_up:
            self.trainer.warmed_up = True  # a burst before warmup: from now on the base follows the config
        report = self.trainer.burst(new, replay, old, heard, lr=lr, old_all=old_all)
        if not report.accepted and (new_lines or held):
            self._quarantine(list(new_lines), list(held))
        if self.memory is not None:
            note = f"burst {'accepted' if report.accepted else 'rolled back: ' + report.reason}"
            if report.grew_module is not None:
                note += f"; module {report.retired_module} {report.retired_as}, module {report.grew_module} born"
            self._log_growth(note)
        # what the next generation needs, made here instead of on its path: the folded weights
        # (a module's birth refolds the fossils) and the blend weight
        self._generator.weights.get()
        self.model_alpha()
        return report

    def learn(self, lines: Sequence[str], *, max_passes: int = 3, patience: int = 2,
              progress: Callable[[dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
        """Learn a whole text: its lines join the corpus (a slice held out, as observe() does),
        then checked bursts take them in turn, each on as many new lines as its batches draw
        (micro_steps * batch_size * (1 - replay_ratio)), until held-out loss on the held-out
        slice of recently heard text has not improved in `patience` bursts in a row (judged once
        every line was taken), or after `max_passes` passes over the text.
        progress(record) is called after every burst with {"burst", "of", "accepted",
        "heard_val_loss", "val_loss"}; should_stop() is asked before every burst (the text not
        yet taken stays in the corpus for later bursts). Returns a summary: bursts, accepted,
        rolled_back, heard_val_loss (first, last), val_loss (first, last), lines, seconds,
        stopped."""
        if isinstance(lines, str):
            raise TypeError("learn() takes a list of lines; use text.splitlines()")
        t0 = time.perf_counter()
        self.observe(list(lines))
        c = self.config
        per_burst = max(1, int(c.micro_steps * c.batch_size * (1.0 - c.replay_ratio)))
        with self._train_lock:
            with self._lock:
                pending = self.buffer.take()
            chunks = [pending[i:i + per_burst] for i in range(0, len(pending), per_burst)]
            total = len(chunks) * max_passes
            first_heard = self.trainer.evaluate(self._heard_heldout)
            first_old = self.trainer.evaluate(self._old_heldout)
            best, stale, done, accepted, stopped = first_heard, 0, 0, 0, False
            untrained = set(pending)
            for i in range(total):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                quarantined = set(self.quarantine)
                chunk = [x for x in chunks[i % len(chunks)] if x not in quarantined]
                untrained.difference_update(chunks[i % len(chunks)])
                report = self._checked_burst(chunk, untrained=untrained)
                done += 1
                accepted += report.accepted
                heard = self.trainer.evaluate(self._heard_heldout)
                if progress is not None:
                    progress({"burst": done, "of": total, "accepted": report.accepted, "reason": report.reason,
                              "heard_val_loss": heard, "val_loss": self.trainer.last_val})
                if heard is None or best is None or heard < best * (1.0 - 1e-3):
                    best, stale = heard, 0
                elif done >= len(chunks):  # judged once every line was taken at least once
                    stale += 1
                    if stale >= patience:
                        break
            if stopped:  # what no burst took yet waits in the buffer for the next bursts
                rest = [x for chunk in chunks[done:] for x in chunk] if done < len(chunks) else []
                with self._lock:
                    ids = [self._encode(x) for x in rest]
                    self.buffer.feed(rest, ids)
        return {"bursts": done, "accepted": accepted, "rolled_back": done - accepted, "lines": len(pending),
                "heard_val_loss": (first_heard, self.trainer.evaluate(self._heard_heldout)),
                "val_loss": (first_old, self.trainer.evaluate(self._old_heldout)),
                "seconds": time.perf_counter() - t0, "stopped": stopped}

    def _quarantine(self, lines: list[str], held: list[str]) -> None:
        """Take a rolled-back burst's lines out of the reservoir and the field (replay never
        draws them again), and the lines held out of the same text out of the held-out set of
        heard text (they do not measure learning). Kept aside (the newest max_quarantine_lines)
        until release_quarantine()."""
        with self._structure.write(), self._lock:
            self.reservoir.remove(lines)
            if held:
                gone = set(held)
                self.heard_val_lines = [x for x in self.heard_val_lines if x not in gone]
            cap = self.config.max_quarantine_lines
            self.quarantine = (self.quarantine + lines + held)[-cap:] if cap else []
            self._rebuild_data(retokenize=False)
        self._emit({"phase": "quarantine", "lines": len(lines) + len(held), "held": len(self.quarantine)})

    def _sync_config(self) -> None:
        """Config fields that live in the tokenizer and the reservoir follow the config (they
        may be changed between bursts, also on a loaded organism)."""
        c, tok = self.config, self.tokenizer
        tok.enable_bpe_after_chars = c.enable_bpe_after_chars
        tok.bpe_num_merges = c.bpe_num_merges
        tok.bpe_retrain_every_chars = c.bpe_retrain_every_chars
        if (self.reservoir.max_lines, self.reservoir.max_line_chars) != (c.max_corpus_lines, c.max_line_chars):
            with self._lock:
                self.reservoir.set_limits(c.max_corpus_lines, c.max_line_chars)

    def _sync_threads(self) -> None:
        want = self._train_threads(background=self._thread is not None and self._thread.is_alive())
        if self.model.n_threads != want:
            self.model.n_threads = want

    # ---- identity

    def gamma_stats(self) -> dict:
        """Identity drift (design.md §6, measured on the effective output embedding): sparsity
        (fraction of |gamma| <= gamma_sparsity_threshold), magnitude (Frobenius norm), the 10
        tokens whose rows moved most, and the contrastive projection's norm."""
        g = self.trainer.gamma()
        norms = np.linalg.norm(g, axis=1)
        top = np.argsort(-norms, kind="stable")[:10]
        proj = g.mean(axis=0)
        return {"sparsity": float(np.mean(np.abs(g) <= self.config.gamma_sparsity_threshold)),
                "magnitude": float(np.linalg.norm(g)),
                "top_tokens": [(self.tokenizer.tokens[i], float(norms[i])) for i in top],
                "projection_magnitude": float(np.linalg.norm(proj))}

    def projection(self) -> Projection:
        """The contrastive projection of the identity now (unit direction and magnitude)."""
        return self.trainer.projection()

    def immune_check(self, before: Projection | None = None) -> dict:
        """The identity-drift check of design.md §6 between `before` (default: the projection at the
        end of the last accepted burst or warmup, i.e. `last_projection`) and now. A diagnostic:
        bursts are accepted or rolled back by held-out loss alone (on every attack measured the
        drift check never caught a burst the loss check let through). Returns
        {"passed", "cosine" (None when skipped), "magnitude_before", "magnitude_after"}."""
        before = self.last_projection if before is None else before
        after = self.projection()
        ok, cos = self.trainer.drift_check(before, after)
        return {"passed": ok, "cosine": cos, "magnitude_before": before.magnitude, "magnitude_after": after.magnitude}

    @property
    def last_projection(self) -> Projection:
        proj = getattr(self.trainer, "accepted_projection", None)
        return proj if proj is not None else Projection(np.zeros(self.config.n_embd), 0.0)

    # ---- stats

    def stats(self) -> dict:
        """Counters and state: steps, losses, vocabulary, parameters, delta modules, arena use,
        training throughput, blend weight, corpus and buffer sizes, submitted generations'
        decoding, background status."""
        t, m = self.trainer, self.model
        modules = []
        for st in t.modules:
            modules.append({"index": st.index, "state": st.state, "alpha": m.delta_alphas[st.index],
                            "bursts": st.bursts, "steps": m.groups[delta_group(st.index)].step,
                            "trainable": m.trainable[delta_group(st.index)], "counterfactual": st.counterfactual})
        c = self.config
        with self._lock:
            buffer = {"bytes": self.buffer.bytes, "tokens": self.buffer.tokens, "novelty": self.buffer.novelty,
                      "lines": len(self.buffer.lines), "next_burst": self.buffer.trigger(c)}
            corpus = {"lines": len(self.reservoir.lines), "chars": self.reservoir.chars,
                      "held_out_lines": len(self.val_lines), "heard_held_out_lines": len(self.heard_val_lines),
                      "quarantine_lines": len(self.quarantine)}
        return {"steps": t.steps, "warmup_steps": t.warmup_steps_done, "warmed_up": t.warmed_up,
                "bursts": t.bursts, "accepted_bursts": t.accepted, "rolled_back_bursts": t.rolled_back,
                "lr_scale": t.lr_scale, "loss": t.last_loss, "val_loss": t.last_val, "best_val_loss": t.best_val,
                "heard_val_loss": t.last_new_val,
                "vocab_size": m.vocab_size, "bpe": self.tokenizer.bpe_enabled, "parameters": m.num_params(),
                "tokenizer_growth": {"declined_in_a_row": 0 if self._growth_retry is None else self._growth_retry[0],
                                     "next_trial_chars": self._growth_next_trial()},
                "delta_modules": modules, "base_trainable": m.trainable["base"],
                "arena_high_water": m.arena_high_water, "arena_capacity": m.arena_capacity,
                "tokens_per_second": t.tokens_per_second, "model_alpha": self.model_alpha(),
                "corpus": corpus, "quantum_buffer": buffer, "decoding": self._decoding_counts(),
                "decode_precision": {"weights": self.config.decode_precision, "report": self._decode_report},
                "background": {"running": self._thread is not None and self._thread.is_alive(),
                               "error": repr(self._thread_error) if self._thread_error else None}}

    # ---- background training

    def start_background(self) -> None:
        """Start the trainer thread: it finishes the warmup if needed, then runs a burst whenever
        the quantum buffer is ready (checked every train_tick_seconds). Raises OrganismError if
        it already runs."""
        if self._thread is not None and self._thread.is_alive():
            raise OrganismError("the background trainer is already running; call stop() first")
        self._stop_event.clear()
        self._thread_error = None
        if self.config.blas_threads and self._blas_limiter is None:
            from threadpoolctl import threadpool_limits
            self._blas_limiter = threadpool_limits(limits=self.config.blas_threads, user_api="blas")
        self._thread = threading.Thread(target=self._background_loop, name="molecule-gpt-trainer", daemon=True)
        self._thread.start()

    def _background_loop(self) -> None:
        try:
            if not self.trainer.warmed_up:
                self._warmup_interruptible(max(0, self.config.warmup_steps - self.trainer.warmup_steps_done))
            while not self._stop_event.wait(self.config.train_tick_seconds):
                with self._lock:
                    ready = self.buffer.ready(self.config)
                if ready:
                    self.train_burst()
        except BaseException as exc:  # reported by stop() and stats()
            self._thread_error = exc

    def _yield_to_generations(self, step_seconds: float) -> None:
        """After a piece of the background trainer's compute (a step, a piece of a held-out
        evaluation) that took step_seconds: while generations are in flight, pause so that its
        compute takes at most Config.train_share_while_generating of the wall time (a request
        then waits for at most one piece, and the cores go to generating); the pause ends early
        when the last generation finishes or stop() is called. Foreground training (a caller's
        warmup, train_burst or learn) never pauses."""
        share = self.config.train_share_while_generating
        if share >= 1.0 or threading.current_thread() is not self._thread:
            return
        in_flight = self._generator.in_flight
        deadline = time.monotonic() + step_seconds * (1.0 / share - 1.0)
        while len(in_flight) and not self._stop_event.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or in_flight.wait_until_idle(min(left, 0.05)):
                return

    def _stop_requested(self) -> bool:
        return self._stop_event.is_set() and threading.current_thread() is self._thread

    def _stopper(self, should_stop: Callable[[], bool] | None) -> Callable[[], bool]:
        if should_stop is None:
            return self._stop_requested
        return lambda: self._stop_requested() or bool(should_stop())

    def _warmup_interruptible(self, steps: int) -> None:
        """The rest of the warmup schedule, in pieces of eval_interval steps (the train lock is
        released between pieces, so a foreground burst or save can interleave)."""
        total = self.config.warmup_steps
        chunk = max(1, self.config.eval_interval)
        while steps > 0 and not self._stop_event.is_set() and not self.trainer.warmed_up:
            n = min(chunk, steps)
            start = self.trainer.warmup_steps_done
            self._warmup(n, start=start, total=total, finish=n == steps)
            steps -= n

    def stop(self, timeout: float | None = None) -> None:
        """Stop the trainer thread (it finishes the current step or burst first). Raises
        TrainingError if the thread died with an exception (chained)."""
        thread = self._thread
        if thread is not None:
            self._stop_event.set()
            thread.join(timeout)
            if thread.is_alive():
                raise TrainingError(f"the background trainer did not stop within {timeout} s")
            self._thread = None
        if self._blas_limiter is not None:
            self._blas_limiter.restore_original_limits()
            self._blas_limiter = None
        if self._train_lock.acquire(timeout=0 if timeout == 0 else -1):
            try:
                self._sync_threads()
            finally:
                self._train_lock.release()
        err, self._thread_error = self._thread_error, None
        if err is not None:
            raise TrainingError(f"the background trainer failed: {err!r}") from err

    @contextlib.contextmanager
    def background(self) -> Iterator["Organism"]:
        """`with organism.background():` runs the trainer thread for the block."""
        self.start_background()
        try:
            yield self
        finally:
            self.stop()

    # ---- persistence

    def state_dict(self) -> dict:
        """Everything but the model and tokenizer (which the checkpoint stores itself), JSON-able."""
        with self._lock:
            state = {
                "format": STATE_FORMAT, "format_version": STATE_VERSION, "seed": self.seed,
                "config": self.config.to_dict(),
                "trainer": self.trainer.state_dict(),
                "organism_rng": self._rng.bit_generator.state,
                "val_lines": list(self.val_lines),
                "heard_val_lines": list(self.heard_val_lines),
                "quarantine": list(self.quarantine),
                "growth_retry": None if self._growth_retry is None else list(self._growth_retry),
                "reservoir": self.reservoir.to_dict(),
                "buffer": self.buffer.to_dict(),
                "birth_vocab": self.birth_vocab,
                "birth_rows": None if self.config.tie_embeddings else
                base64.b64encode(self._birth_rows.astype("<f8").tobytes()).decode("ascii"),
            }
        return _jsonable(state)

    def save(self, path: str | os.PathLike) -> None:
        """Write the organism to one checkpoint file, atomically (see molecule_gpt.checkpoint).
        Safe while the background trainer runs: it waits for the current burst (or warmup
        piece) to end, so the model, its optimizer state and the trainer's counters are one
        consistent moment; generation is not blocked."""
        with self._train_lock, self._structure.read():
            state = self.state_dict()
            save_checkpoint(path, self.model, self.tokenizer, state)

    @classmethod
    def load(cls, path: str | os.PathLike, *, memory: "str | os.PathLike | Memory | None" = None,
             telemetry_path: str | os.PathLike | None = None,
             telemetry_max_bytes: int | None = None) -> "Organism":
        """An organism from a file written by save(); it continues exactly where it stopped."""
        return cls.from_checkpoint(load_checkpoint(path), memory=memory, telemetry_path=telemetry_path,
                                   telemetry_max_bytes=telemetry_max_bytes)

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", *, memory: "str | os.PathLike | Memory | None" = None,
                        telemetry_path: str | os.PathLike | None = None,
                        telemetry_max_bytes: int | None = None) -> "Organism":
        """An organism from a Checkpoint already loaded by molecule_gpt.load_checkpoint (which
        it takes over: its model becomes the organism's)."""
        state, path = ckpt.state, ckpt.path
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise OrganismError(f"{path}: this checkpoint holds a model but no organism state; load it with "
                                f"molecule_gpt.checkpoint.load_checkpoint instead")
        if state.get("format_version") not in (1, STATE_VERSION):
            raise OrganismError(f"{path}: organism state version {state.get('format_version')} is not "
                                f"supported (this molecule-gpt reads version {STATE_VERSION})")
        damaged = (f"{path}: the organism state in this checkpoint is damaged or does not match its model; "
                   f"load an intact copy (organism.ckpt.prev, or one in checkpoints/)")
        try:
            config = Config.from_dict(state["config"], strict=False)
            differ = [f for f in Model._SHAPE_FIELDS if getattr(config, f) != getattr(ckpt.model.config, f)]
            if differ:
                raise CheckpointError(f"{damaged}: its config says {', '.join(f'{f}={getattr(config, f)!r}' for f in differ)} "
                                      f"but the model was built with "
                                      f"{', '.join(f'{f}={getattr(ckpt.model.config, f)!r}' for f in differ)}")
            return cls(config, seed=state["seed"], memory=memory, telemetry_path=telemetry_path,
                       telemetry_max_bytes=telemetry_max_bytes,
                       _restore={"ckpt": ckpt, "state": state})
        # OverflowError: numpy's generators refuse a state integer outside their C range with it
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"{damaged} ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def from_original(cls, path: str | os.PathLike, *, corpus: Sequence[str] | str | os.PathLike | None = None,
                      seed: int = 0, memory: "str | os.PathLike | Memory | None" = None,
                      config: "Config | dict | None" = None, dtype: str = "float64",
                      telemetry_path: str | os.PathLike | None = None,
                      telemetry_max_bytes: int | None = None) -> "Organism":
        """Adopt an organism of the original single-file program from its JSON checkpoint
        (molecule_gpt.compat): a living organism that chats and keeps learning from there.

        It gets the original's model, weights exactly (its delta modules become fossils; bursts
        train a new module beside the base, as Config.freeze_base_after_warmup says), and its
        tokenizer with byte fallback enabled, so that no character is ever dropped: the byte
        tokens are appended after the original's ids and the model grows rows for them. It
        counts as warmed up (the original trained it). With a corpus (a list of lines or a
        path, as for Organism()), the corpus is split into training and held-out lines as a
        new organism's is; without one it starts with an empty corpus and learns what it hears.

          config  None: the original's cfg; a dict: the original's cfg with these Config fields
                  changed; a Config: used as is. Its architecture fields must be the
                  original's (ConfigError names those that differ).
          dtype   "float64" (default: the original's precision, so the weights are exactly its
                  own) or "float32" (rounded, faster)
          seed, memory, telemetry_path, telemetry_max_bytes  as for Organism()
        Raises CheckpointError when the file is not an original checkpoint."""
        from . import compat
        from .errors import ConfigError
        source = os.fspath(path)
        doc = compat.read_original(source)
        model = compat.model_from_original(doc, dtype=dtype, source=source)
        if config is None:
            config = model.config
        elif isinstance(config, dict):
            config = Config.from_dict({**model.config.to_dict(), **config})
        elif not isinstance(config, Config):
            raise TypeError(f"config must be None, a dict of Config fields or a molecule_gpt.Config, "
                            f"got {type(config).__name__}")
        differ = [f for f in Model._SHAPE_FIELDS if getattr(config, f) != getattr(model.config, f)]
        if differ:
            raise ConfigError(f"{source}: the config sets {', '.join(f'{f}={getattr(config, f)!r}' for f in differ)} "
                              f"but the original's model has "
                              f"{', '.join(f'{f}={getattr(model.config, f)!r}' for f in differ)}; an adopted "
                              f"organism keeps the original's architecture: leave these fields out")
        tokenizer = compat.tokenizer_from_original(doc, source=source, config=config, byte_fallback=True)
        return cls(config, corpus, seed=seed, memory=memory, telemetry_path=telemetry_path,
                   telemetry_max_bytes=telemetry_max_bytes,
                   _adopt={"model": model, "tokenizer": tokenizer, "source": source})

    def _init_adopted(self, adopt: dict, corpus) -> None:
        self.model, self.tokenizer = adopt["model"], adopt["tokenizer"]
        self.model.config = self.config  # one Config object drives model and organism
        check_decode_precision(self.config, self.model.dtype)
        birth_vocab = self.model.vocab_size  # the original's tokens; the byte tokens came after
        # the birth reference: the original's snapshot (rows born later in the original are
        # zero there, and count whole, as they do here)
        birth_rows = np.array(self.model.init_embed_snapshot[:birth_vocab], dtype=np.float64)
        self.model.grow_vocab(self.tokenizer.vocab_size)  # rows for the byte tokens
        self.model.n_threads = self._train_threads(background=False)
        lines = self._read_corpus(corpus)
        train = self._split_corpus(lines)
        c = self.config
        self._attach(Reservoir(train, c.max_corpus_lines, self._rng, max_line_chars=c.max_line_chars),
                     birth_vocab, birth_rows)
        self._rebuild_data()
        t = self.trainer
        t.warmed_up = True  # the original trained it: chat and bursts go on from here
        t.accepted_projection = t.projection()  # its weights stand as accepted
        # what the model's share of the field blend and the first burst's check compare with:
        # held-out loss on the held-out lines, and (standing in for a training loss) its loss
        # on the training lines the field is scored on when there are none held out
        t.last_val = t.best_val = t.evaluate(self._old_heldout)
        seqs = [ids for ids in self._reservoir_ids()[:c.val_max_sequences] if len(ids) >= 2]
        if seqs:
            t.last_loss = float(np.mean(self.model.sequence_losses(seqs)))
        self._emit({"phase": "adopt", "source": adopt["source"], "vocab_size": self.model.vocab_size,
                    "original_vocab_size": birth_vocab, "val_loss": t.last_val, "loss": t.last_loss})
        if self.memory is not None:
            self.memory.add_corpus_event("adopt", len(lines), sum(len(x) for x in lines),
                                         f"original {os.path.basename(adopt['source'])}: {len(train)} train, "
                                         f"{len(self.val_lines)} held out")
            self._log_growth("adopted from the original")

    def _init_restored(self, restore: dict) -> None:
        ckpt, state = restore["ckpt"], restore["state"]
        self.model = ckpt.model
        self.model.config = self.config  # one Config object drives model and organism
        if ckpt.tokenizer is None:
            raise OrganismError("the checkpoint holds no tokenizer; an organism needs one")
        self.tokenizer = ckpt.tokenizer
        if self.tokenizer.vocab_size != self.model.vocab_size:
            raise CheckpointError(f"{ckpt.path}: the tokenizer has {self.tokenizer.vocab_size} tokens but the model "
                                  f"{self.model.vocab_size} rows; load an intact copy")
        for key in ("val_lines", "heard_val_lines", "quarantine"):
            value = state.get(key, [])
            if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
                raise CheckpointError(f"{ckpt.path}: organism state {key!r} must be a list of str; load an intact copy")
        self._rng.bit_generator.state = state["organism_rng"]
        self.val_lines = list(state["val_lines"])
        self.heard_val_lines = list(state.get("heard_val_lines", []))  # absent in version 1
        self.quarantine = list(state.get("quarantine", []))
        retry = state.get("growth_retry")  # absent before the retry back-off: the tokenizer's schedule
        if retry is not None and not (isinstance(retry, list) and len(retry) == 2 and
                                      all(type(x) is int for x in retry) and retry[0] >= 1 and retry[1] >= 0):
            raise CheckpointError(f"{ckpt.path}: organism state 'growth_retry' must be null or [declines >= 1, "
                                  f"chars >= 0]; load an intact copy")
        self._growth_retry = None if retry is None else (retry[0], retry[1])
        birth_vocab = int(state["birth_vocab"])
        if state["birth_rows"] is None:
            birth_rows = np.array(self.model.init_embed_snapshot[:birth_vocab], dtype=np.float64)
        else:
            raw = base64.b64decode(state["birth_rows"])
            birth_rows = np.frombuffer(raw, "<f8").reshape(-1, self.config.n_embd).copy()
        self._attach(Reservoir.from_dict(state["reservoir"], rng=self._rng), birth_vocab, birth_rows)
        self.trainer.load_state_dict(state["trainer"])
        if len(self.trainer.modules) != self.model.n_delta or self._birth_rows.shape != (self.birth_vocab, self.config.n_embd) \
                or not 0 < self.birth_vocab <= self.model.vocab_size:
            raise CheckpointError(f"{ckpt.path}: the organism state's delta modules or birth rows do not match the "
                                  f"model ({len(self.trainer.modules)} modules for {self.model.n_delta}, birth rows "
                                  f"{self._birth_rows.shape} for vocabulary {self.birth_vocab}); load an intact copy")
        self.trainer.accepted_projection = self.trainer.projection()  # the weights are the last accepted ones
        self._rebuild_data()
        if state["format_version"] == 1 and self.trainer.last_val is not None:
            # version 1 kept held-out losses per token: measure once in today's unit (per character)
            self.trainer.last_val = self.trainer.best_val = self.trainer.evaluate(self._old_heldout)
        buf = state["buffer"]
        if buf["lines"]:
            ids = [self._encode(x) for x in buf["lines"]]
            self.buffer.feed(buf["lines"], ids)
        held = buf.get("held", [])  # absent in version 1
        if not isinstance(held, list) or not all(isinstance(x, str) for x in held):
            raise CheckpointError(f"{ckpt.path}: organism state 'buffer.held' must be a list of str; load an intact copy")
        self.buffer.held = list(held)
        self.model.n_threads = self._train_threads(background=False)

    def close(self) -> None:
        """Stop the background trainer (if running) and the decode thread (generations submitted
        and not finished end with GenerationError), and close the memory and telemetry files."""
        self.stop()
        with self._decode_loop_lock:
            loop, self._decode_loop = self._decode_loop, None
        if loop is not None:
            loop.close()
        if self.memory is not None and self._own_memory:
            self.memory.close()
        if self._telemetry_log is not None:
            self._telemetry_log.close()

    def __repr__(self) -> str:
        t = self.trainer
        return (f"Organism(vocab_size={self.model.vocab_size}, steps={t.steps}, bursts={t.bursts}, "
                f"delta_modules={self.model.n_delta}, val_loss={t.last_val})")
