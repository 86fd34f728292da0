"""Model: the GPT of design.md §2 on the native core, with growable vocabulary and delta modules.

Policy lives here (validation, packing a batch, sizing the arena, parameter storage, Adam
bookkeeping); the arithmetic is in `_core` (kernels + tape). Parameters are grouped: "base"
and one group per delta module ("delta0", "delta1", ...). Each group is one flat array with
named views, its gradient, and its own Adam moments and step counter, so Adam is one loop per
group and a module's optimizer state can never drift out of alignment with its parameters.

Batches are lists of token-id lists. A sequence of L ids trains positions 0..n-1 with
n = min(block_size, L - 1) (input ids[t], target ids[t+1]); the batch loss is the mean of the
sequence means. Sequences are packed back to back without padding; attention never crosses
from one to another.
"""
from __future__ import annotations

import itertools
import math
import os
import threading
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import _core
from .config import Config
from .errors import ArenaOverflowError, ConfigError


def default_threads() -> int:
    """Cores this process may run on (the default number of workers of a step)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _SerialBLAS:
    """Context: BLAS single-threaded while a step runs, restored after.

    Each worker of a step runs its share of the batch on its own pool thread and calls BLAS
    from there; BLAS threads on top would oversubscribe the cores (their threads spin). scikit-learn
    wraps its OpenMP loops the same way. A step that calls no BLAS (the AVX2 kernels of
    csrc/gemm.h and attention.h) leaves the libraries alone (the setter calls would cost a
    noticeable share of a small step). Re-entrant across threads: the first step in sets the
    limit, the last one out restores it. Figures: benchmarks/RESULTS.md, "Design measurements"."""

    def __init__(self):
        self._lock = threading.Lock()
        self._depth = 0
        self._libs = None  # threadpoolctl's controllers of the BLAS libraries, found once
        self._saved = []

    def __enter__(self):
        with self._lock:
            if self._depth == 0 and _core.step_uses_blas():
                if self._libs is None:
                    from threadpoolctl import ThreadpoolController
                    self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
                # the libraries' own setters, not ThreadpoolController.limit: same effect, and a
                # step pays two C calls per library instead of building a limiter
                self._saved = [lib.num_threads for lib in self._libs]
                for lib in self._libs:
                    lib.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for lib, n in zip(self._libs or (), self._saved):
                    lib.set_num_threads(n)
                self._saved = []


_serial_blas = _SerialBLAS()

# Weights versions: one process-wide counter, so a version names one state of one model's
# weights (a value cached under it is valid exactly while the model still has that version).
_VERSIONS = itertools.count(1)


def delta_group(k: int) -> str:
    """The name of delta module k's parameter group ("delta{k}"), also the prefix of its
    parameters' names ("delta{k}.l0.wq.A"); design.md §2."""
    return f"delta{k}"


def fold_delta_terms(modules, names) -> dict[str, np.ndarray]:
    """The delta modules' contribution to the effective weights, written once (design.md §2):
    {name: sum_k alpha_k A_k B_k} in float64 for every adapted matrix in `names`, over `modules`,
    (alpha_k, parameters of module k by name) pairs. A module with alpha 0 adds nothing; a name
    no module contributes to is left out. Used by the Model (frozen modules folded into the
    training weights), generation (the decoder's weights) and the trainer (identity)."""
    out = {}
    for name in names:
        total = None
        for alpha, params in modules:
            if alpha == 0.0:
                continue
            term = alpha * (params[f"{name}.A"].astype(np.float64) @ params[f"{name}.B"])
            if total is None:
                total = term
            else:
                total += term
        if total is not None:
            out[name] = total
    return out


class ParamGroup:
    """Named parameters stored in one flat array, with gradient and Adam moments alike."""

    def __init__(self, name: str, shapes: dict[str, tuple[int, ...]], dtype: np.dtype):
        self.name = name
        self.shapes = dict(shapes)
        self.offsets = {}
        total = 0
        for key, shape in self.shapes.items():
            self.offsets[key] = total
            total += math.prod(shape)
        self.size = total
        # one allocation for the four arrays (a fresh large block costs an mmap, whatever its
        # size), in the order a checkpoint stores a group: parameters, m, v, then the gradient
        block = np.zeros(4 * total, dtype)
        self.flat, self.m, self.v, self.grad = (block[i * total:(i + 1) * total] for i in range(4))
        self.step = 0  # Adam steps taken by this group
        self.version = next(_VERSIONS)  # changes when the values may have (see Model.version)
        self.params = self._views(self.flat)
        self._grads: dict[str, np.ndarray] | None = None

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """Views of the gradient by name (built on first use: most groups never need them)."""
        if self._grads is None:
            self._grads = self._views(self.grad)
        return self._grads

    def _views(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return {k: flat[o:o + math.prod(s)].reshape(s) for (k, s), o in zip(self.shapes.items(), self.offsets.values())}

    def moments(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        return self._views(self.m), self._views(self.v)

    def regrown(self, shapes: dict[str, tuple[int, ...]], init) -> "ParamGroup":
        """A copy with new shapes: old entries keep their rows (and moments); new rows come from
        init(name, shape_of_new_rows) for parameters, zeros for the moments."""
        new = ParamGroup(self.name, shapes, self.flat.dtype)
        new.step = self.step
        old_m, old_v = self.moments()
        new_m, new_v = new.moments()
        for key, shape in shapes.items():
            old = self.params.get(key)
            if old is None:
                new.params[key][...] = init(key, shape)
                continue
            rows = old.shape[0]
            new.params[key][:rows] = old
            new_m[key][:rows] = old_m[key]
            new_v[key][:rows] = old_v[key]
            if shape[0] > rows:
                new.params[key][rows:] = init(key, (shape[0] - rows,) + tuple(shape[1:]))
        return new


def _deal(lengths: Sequence[int], workers: int) -> list[list[int]]:
    """The sequences (by index) each worker of a run takes: longest first, each to the worker
    with the fewest positions so far (the lowest-numbered on a tie). A step ends when its
    busiest worker does, and positions are what a worker's time grows with (the products);
    dealing in turn leaves the busiest worker further above the mean when lines differ in
    length. Equal lengths are dealt in turn either way."""
    n = min(workers, len(lengths))
    shares: list[list[int]] = [[] for _ in range(n)]
    load = [0] * n
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        w = load.index(min(load))
        shares[w].append(i)
        load[w] += lengths[i]
    return shares


class Model:
    """The transformer of design.md §2. `Model(config, vocab_size, dtype="float32", seed=0)`."""

    def __init__(self, config: Config, vocab_size: int, dtype: str | np.dtype = "float32", seed: int = 0,
                 n_threads: int | None = None, *, _random_init: bool = True):
        if not isinstance(config, Config):
            raise TypeError(f"config must be a molecule_gpt.Config, got {type(config).__name__}")
        config.validate()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
            raise ConfigError(f"vocab_size must be a positive int, got {vocab_size!r}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ConfigError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
        self.config = config
        self.vocab_size = int(vocab_size)
        self.rng = np.random.default_rng(seed)
        self.delta_alphas: list[float] = []
        self.trainable: dict[str, bool] = {"base": True}
        self.groups: dict[str, ParamGroup] = {}
        self._lock = threading.RLock()
        self._engines = []
        self._last_workers = 1  # workers the last step ran on
        self._arenas_ready = False
        self._rebind_pending, self._rebuild_engines = False, False
        self._folded_modules, self._fold_delta, self._fold_weight, self._fold_views = [], {}, {}, {}
        if n_threads is not None and (isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1):
            raise ConfigError(f"n_threads must be a positive int or None (one per core), got {n_threads!r}")
        self._n_threads = default_threads() if n_threads is None else n_threads
        self._arena_batch_size = config.batch_size
        self._shape_key = self._config_shape_key()
        self._random_init = _random_init
        base = ParamGroup("base", self._base_shapes(), self.dtype)
        if _random_init:
            for key, shape in base.shapes.items():
                base.params[key][...] = self._init_base(key, shape)
        self.groups["base"] = base
        self.init_embed_snapshot = base.params["wte"].copy()  # rows at birth (gamma's origin)
        self._rebuild()

    # ---------------------------------------------------------------------------- structure

    @property
    def n_delta(self) -> int:
        return len(self.delta_alphas)

    def _base_shapes(self) -> dict[str, tuple[int, int]]:
        return base_shapes(self.config, self.vocab_size)

    def adapted_shapes(self) -> dict[str, tuple[int, int]]:
        """(nout, nin) of every base matrix that carries delta adapters, in module order."""
        return adapted_shapes(self.config, self.vocab_size)

    def _delta_shapes(self) -> dict[str, tuple[int, int]]:
        return delta_shapes(self.config, self.vocab_size)

    @classmethod
    def empty(cls, config: Config, vocab_size: int, dtype: str | np.dtype = "float32",
              delta_alphas: Sequence[float] = (), n_threads: int | None = None,
              trainable: dict[str, bool] | None = None) -> "Model":
        """A model of the given shapes whose parameters are all zero, built without drawing a
        random init (for loaders that overwrite every value next). trainable: flags by group
        name (default: everything trains)."""
        model = cls(config, vocab_size, dtype=dtype, n_threads=n_threads, _random_init=False)
        for k, alpha in enumerate(delta_alphas):  # all groups first, then one rebind
            model.groups[delta_group(k)] = ParamGroup(delta_group(k), model._delta_shapes(), model.dtype)
            model.delta_alphas.append(float(alpha))
            model.trainable[delta_group(k)] = True
        for name, flag in (trainable or {}).items():
            if name not in model.groups:
                raise KeyError(f"trainable names group {name!r}, which this model does not have")
            model.trainable[name] = bool(flag)
        model._check_trainable_modules(sum(model.trainable[delta_group(k)] for k in range(model.n_delta)))
        if delta_alphas or trainable:
            model._rebuild()
        model._random_init = True  # modules added later get the usual init
        return model

    @staticmethod
    def expected_state_shapes(config: Config, vocab_size: int, n_delta: int) -> dict[str, tuple[int, ...]]:
        """What state_shapes() of such a model returns, computed without building it."""
        params = dict(base_shapes(config, vocab_size))
        delta = delta_shapes(config, vocab_size)
        for k in range(n_delta):
            params.update({f"{delta_group(k)}.{key}": shape for key, shape in delta.items()})
        shapes = {}
        for name, shape in params.items():
            shapes[name] = tuple(shape)
            shapes["adam.m." + name] = tuple(shape)
            shapes["adam.v." + name] = tuple(shape)
        shapes["init_embed_snapshot"] = (vocab_size, config.n_embd)
        return shapes

    def _init_base(self, key: str, shape) -> np.ndarray:
        if key.endswith(".alpha"):
            return np.full(shape, self.config.hybrid_alpha_init)
        return self.rng.normal(0.0, self.config.init_std, size=shape)

    def _init_delta(self, key: str, shape) -> np.ndarray:
        return self.rng.normal(0.0, self.config.delta_init_std, size=shape)

    def add_delta_module(self, alpha: float = 1.0, zero_output: bool = False) -> int:
        """Append a delta module (adapters on every adapted matrix) and return its index.
        zero_output=True starts its A factors at zero, so the module is an exact no-op until it
        trains. Its Adam state starts fresh; every other group's state is untouched."""
        with self._lock:
            k = self.n_delta
            self._check_trainable_modules(sum(self.trainable[delta_group(j)] for j in range(k)) + 1)
            group = ParamGroup(delta_group(k), self._delta_shapes(), self.dtype)
            if self._random_init:
                for key, shape in group.shapes.items():
                    group.params[key][...] = 0.0 if (zero_output and key.endswith(".A")) else self._init_delta(key, shape)
            self.groups[group.name] = group
            self.delta_alphas.append(float(alpha))
            self.trainable[group.name] = True
            self._rebuild()
            return k

    # a fused linear carries one adapter per trainable module and part (q, k, v); frozen modules
    # are folded into the weight and cost nothing, so only the trainable ones are bounded
    MAX_TRAINABLE_MODULES = _core.MAX_ADAPTERS // 3

    def _check_trainable_modules(self, count: int) -> None:
        if count > self.MAX_TRAINABLE_MODULES:
            raise ConfigError(f"at most {self.MAX_TRAINABLE_MODULES} delta modules can train at once (this would "
                              f"make {count}); freeze older ones with set_trainable('delta<k>', False) first: "
                              f"frozen modules are folded into the weights and have no limit")

    def set_delta_alpha(self, k: int, alpha: float) -> None:
        """Set module k's mixing weight alpha_k (its output is alpha_k A_k B_k x)."""
        with self._lock:
            self.delta_alphas[k] = float(alpha)
            self._rebuild(reallocate=False)

    def set_trainable(self, group: str, flag: bool) -> None:
        """Freeze (False) or unfreeze a parameter group: "base" or "delta{k}"."""
        with self._lock:
            if group not in self.groups:
                raise KeyError(f"no parameter group {group!r}; groups are {', '.join(self.groups)}")
            if flag and group != "base" and not self.trainable[group]:
                self._check_trainable_modules(sum(self.trainable[delta_group(j)] for j in range(self.n_delta)) + 1)
            self.trainable[group] = bool(flag)
            if not flag:
                self.groups[group].grad.fill(0.0)  # steps no longer touch it; leave no stale values
            self._rebuild(reallocate=False)

    def grow_vocab(self, new_vocab_size: int) -> None:
        """Grow every vocabulary-sized matrix to new_vocab_size rows; existing rows, their Adam
        moments and every other parameter are untouched. New embedding rows are drawn like at
        init (their init_embed_snapshot rows are zero: gamma counts them whole); new rows of
        delta A factors of lm_head start at zero (no-op for the new tokens)."""
        with self._lock:
            if new_vocab_size < self.vocab_size:
                raise ValueError(f"the vocabulary only grows: {new_vocab_size} < {self.vocab_size}")
            if new_vocab_size == self.vocab_size:
                return
            old_v = self.vocab_size
            self.vocab_size = int(new_vocab_size)
            self.groups["base"] = self.groups["base"].regrown(self._base_shapes(), self._init_base)
            for k in range(self.n_delta):
                name = delta_group(k)
                self.groups[name] = self.groups[name].regrown(self._delta_shapes(), lambda key, shape: np.zeros(shape))
            # gamma = wte - snapshot, and design.md §6 counts rows born after birth whole: their
            # snapshot rows are zero (as in the original, whose snapshot has only the birth rows,
            # and as compat's import leaves them), not their init values
            snap = np.zeros((self.vocab_size, self.config.n_embd), self.dtype)
            snap[:old_v] = self.init_embed_snapshot
            self.init_embed_snapshot = snap
            self._rebuild()

    # ---------------------------------------------------------------------------- engine
    #
    # A step is dealt into n_threads parts: part w gets every n_threads-th sequence (longest
    # first), its own engine (tape + arena) and, for w > 0, its own gradient buffers, which are
    # added into the model's in part order after backward. One parallel region per step (forward
    # and backward together), each part taken by whichever pool thread is free first: a thread
    # that wakes late or lost its core finds its part done by another instead of holding the step
    # up, and results do not depend on which thread ran what. (More parts than threads would
    # cost a gradient buffer each: at the default config that traffic cost 5% of a quiet step and
    # did not help beside a busy process; benchmarks/RESULTS.md.) Fine-grained per-kernel
    # threading collapses when another process shares the cores.

    def _rebuild(self, reallocate: bool = True) -> None:
        """Mark the engines for rebinding to the current arrays (reallocate: rebuild them too).
        The work happens once, at the next use (_ensure_ready), however many structural changes
        came before it: building a model, adding its modules and loading its values bind once.
        Every such change may change what the model computes: the weights version changes."""
        self._version = next(_VERSIONS)
        self._rebind_pending = True
        self._rebuild_engines = self._rebuild_engines or reallocate

    def _bind_pending(self) -> None:
        """Bind the engines if a structural change is pending."""
        if self._rebind_pending:
            self._rebind_pending = False
            reallocate, self._rebuild_engines = self._rebuild_engines, False
            self._bind_all(reallocate)

    def _ensure_ready(self) -> None:
        """Engines bound and arenas sized: what a step needs."""
        self._bind_pending()
        self._ensure_arenas()

    def _bind_all(self, reallocate: bool) -> None:
        c = self.config
        self._prepare_folds()
        if reallocate or not self._engines:
            self._rope = _rope_tables(c.block_size, c.head_dim, self.dtype)
            self._engines = [
                _core.Engine(c.n_layer, c.n_embd, c.n_head, c.block_size, self.vocab_size, list(c.head_types),
                             c.mlp_activation, self.dtype == np.float64, c.delta_rank)
                for _ in range(self._n_threads)]
            # part 0 accumulates into the groups' own gradients; the others into private copies
            self._worker_grads = [None] + [{name: np.zeros_like(g.grad) for name, g in self.groups.items()}
                                           for _ in range(len(self._engines) - 1)]
        for w, engine in enumerate(self._engines):
            flats = {name: (g.grad if w == 0 else self._worker_grads[w][name]) for name, g in self.groups.items()}
            self._bind(engine, flats)
            # A step writes every linear's parameter gradients (dW, dA, dB: beta-0 products) and
            # the hybrid alphas' whole; only the embeddings' scatter-adds accumulate, into
            # gradients each worker zeroes at the start of its backward (in parallel). With tied
            # embeddings lm_head's product writes wte's gradient before the embedding adds to it.
            # Frozen groups are never written (a frozen base is bound without dW, frozen modules
            # are folded into the weights).
            zeroed = []
            if self.trainable["base"]:
                views = self.groups["base"]._views(flats["base"])
                zeroed.append(views["wpe"])
                if not c.tie_embeddings:
                    zeroed.append(views["wte"])
            engine.bind_zeroed(zeroed)
        if reallocate or any(e.capacity != e.plan(*self._max_step()) for e in self._engines):
            self._allocate_arenas()  # lazily: the memory is taken at the first step

    # Folding: a frozen delta module never changes, so its term alpha_k A_k B_k is added once
    # into a cached effective weight W_eff = W + sum_{frozen k} alpha_k A_k B_k, and the engine
    # carries only the trainable adapters (a step with 11 fossils and 1 live module costs what a
    # step with 1 module costs). dW still accumulates into W's own gradient: d loss/dW equals
    # d loss/dW_eff. While the base trains, W_eff is refreshed from W at every step.

    def _prepare_folds(self) -> None:
        frozen = [k for k in range(self.n_delta) if not self.trainable[delta_group(k)]]
        self._folded_modules = frozen
        self._folded_at_step = self.groups["base"].step
        self._fold_delta, self._fold_weight, self._fold_views = {}, {}, {}
        if not frozen:
            return
        base = self.groups["base"].params
        shapes = self.adapted_shapes()
        terms = fold_delta_terms([(self.delta_alphas[k], self.groups[delta_group(k)].params) for k in frozen], shapes)
        for key, _, _, _, parts in self._linear_slots():
            rows = sum(shapes[n][0] for n in parts)
            stacked = np.empty((rows, shapes[parts[0]][1]), self.dtype)
            row0 = 0
            for name in parts:
                total = terms.get(name)
                if total is None:  # every frozen module has alpha 0
                    total = np.zeros(shapes[name])
                view = stacked[row0:row0 + shapes[name][0]]
                view[...] = base[self._base_name(name)] + total
                self._fold_delta[name] = total
                self._fold_views[name] = view
                row0 += shapes[name][0]
            self._fold_weight[key] = stacked

    def _refresh_folds(self) -> None:
        """W_eff = W + (frozen deltas), when the base has taken an optimizer step since the
        last fold (a rollback or a write through params() calls refresh(), which refolds)."""
        if not self._folded_modules or not self.trainable["base"]:
            return
        step = self.groups["base"].step
        if step == self._folded_at_step:
            return
        base = self.groups["base"].params
        for name, total in self._fold_delta.items():
            np.add(base[self._base_name(name)], total, out=self._fold_views[name], casting="unsafe")
        self._folded_at_step = step

    def refresh(self) -> None:
        """Re-derive cached state from the parameters. Call it after writing into parameters
        of frozen modules through params() (folded weights cache them). The version of every
        group and of the model changes."""
        with self._lock:
            for group in self.groups.values():
                group.version = next(_VERSIONS)
            self._rebuild(reallocate=False)

    def _linear_slots(self) -> list[tuple[str, int, str, int, list[str]]]:
        """(key, layer, engine slot, head, parameter names stacked in it) for every linear.
        q/k/v and the MLP's gate/value are fused: their weights sit next to each other in the
        base buffer, so one gemm computes all parts (larger products run faster)."""
        c = self.config
        slots = []
        for i in range(c.n_layer):
            slots.append((f"l{i}.wqkv", i, "wqkv", -1, [f"l{i}.wq", f"l{i}.wk", f"l{i}.wv"]))
            slots.append((f"l{i}.wo", i, "wo", -1, [f"l{i}.wo"]))
            slots.append((f"l{i}.fc_gv", i, "fc_gv", -1, [f"l{i}.fc_g", f"l{i}.fc_v"]))
            slots.append((f"l{i}.fc2", i, "fc2", -1, [f"l{i}.fc2"]))
            for h, kind in enumerate(c.head_types):
                if kind != "content":
                    slots.append((f"l{i}.h{h}.w_pattern", i, "w_pattern", h, [f"l{i}.h{h}.w_pattern"]))
        slots.append(("lm_head", -1, "lm_head", -1, ["lm_head"]))
        return slots

    def _base_name(self, name: str) -> str:
        """The base parameter holding adapted matrix `name` (lm_head is wte when tied)."""
        return "wte" if (name == "lm_head" and self.config.tie_embeddings) else name

    def _stacked(self, flat: np.ndarray, parts: list[str]) -> np.ndarray:
        """The rows of `parts` as one (sum of rows, nin) view of a base-layout flat buffer."""
        base = self.groups["base"]
        names = [self._base_name(n) for n in parts]
        start = base.offsets[names[0]]
        rows, nin = 0, base.shapes[names[0]][1]
        for n in names:
            if base.offsets[n] != start + rows * nin or base.shapes[n][1] != nin:
                raise AssertionError(f"{parts} are not adjacent in the base buffer")  # layout invariant
            rows += base.shapes[n][0]
        return flat[start:start + rows * nin].reshape(rows, nin)

    def _bind(self, engine, grad_flats: dict[str, np.ndarray]) -> None:
        """Point one engine at the parameters and at its gradient buffers (flat, per group)."""
        c = self.config
        base = self.groups["base"]
        p = base.params
        grads = {name: group._views(grad_flats[name]) for name, group in self.groups.items()}
        train_base = self.trainable["base"]
        g = grads["base"] if train_base else None
        grad_flat = grad_flats["base"] if train_base else None

        def grad_of(key):
            return None if g is None else g[key]

        engine.bind_embeddings(p["wte"], grad_of("wte"), p["wpe"], grad_of("wpe"), *self._rope)
        for key, layer, slot, head, parts in self._linear_slots():
            W = self._fold_weight.get(key)
            if W is None:
                W = self._stacked(base.flat, parts)
            dW = None if grad_flat is None else self._stacked(grad_flat, parts)
            adapters = []
            for k in range(self.n_delta):
                if k in self._folded_modules:
                    continue  # inside the folded weight
                group = delta_group(k)
                row0 = 0
                for name in parts:
                    A = self.groups[group].params[f"{name}.A"]
                    adapters.append((A, self.groups[group].params[f"{name}.B"], grads[group][f"{name}.A"],
                                     grads[group][f"{name}.B"], self.delta_alphas[k], row0))
                    row0 += A.shape[0]
            engine.bind_linear(key, layer, slot, head, W, dW, adapters)
        for i in range(c.n_layer):
            for h, kind in enumerate(c.head_types):
                if kind == "hybrid":
                    k = f"l{i}.h{h}.alpha"
                    engine.bind_alpha(i, h, p[k], grad_of(k))

    def _allocate_arenas(self) -> None:
        """Mark the arenas for (re)sizing; the allocation happens at the next step."""
        self._arena_batch_size = self.config.batch_size
        self._arenas_ready = False

    def _ensure_arenas(self) -> None:
        if not self._arenas_ready:
            for engine in self._engines:
                engine.allocate(*engine.plan(*self._max_step()))
            self._arenas_ready = True

    _SHAPE_FIELDS = Config.shape_fields()  # marked on Config (fixed=SHAPE)

    def _config_shape_key(self) -> tuple:
        return tuple(getattr(self.config, f) for f in self._SHAPE_FIELDS)

    def _sync_config(self) -> None:
        """Check config edits made since the last step: batch_size resizes the arenas (at the
        next step); fields that fix parameter shapes cannot change on a built model."""
        c = self.config
        if self._config_shape_key() != self._shape_key:
            changed = [f for f, old in zip(self._SHAPE_FIELDS, self._shape_key) if getattr(c, f) != old]
            raise ConfigError(f"Config field(s) {', '.join(changed)} fix the parameter shapes and cannot change "
                              f"on a built model; build a new Model (or restore the old value)")
        if c.batch_size != self._arena_batch_size:
            c.validate()
            self._allocate_arenas()

    def _max_step(self) -> tuple[int, int]:
        """(positions, sum of squared lengths) of one part's share of the largest batch."""
        return _core.worker_step(self.config.batch_size, self.config.block_size, self._n_threads)

    @property
    def n_threads(self) -> int:
        """Worker threads of a step (default: the cores this process may run on). Each worker runs
        whole sequences with single-threaded BLAS, so this is the step's whole thread budget."""
        return self._n_threads

    @n_threads.setter
    def n_threads(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"n_threads must be a positive int, got {value!r}")
        with self._lock:
            self._n_threads = value
            version = self._version
            self._rebuild()
            self._version = version  # the same weights (results agree across thread counts up to rounding)

    @property
    def planned_arena_bytes(self) -> int:
        """Bytes the arenas will take (values plus gradients), computed without allocating."""
        with self._lock:
            self._bind_pending()
            return sum(2 * e.plan(*self._max_step())[0] for e in self._engines)

    @property
    def arena_capacity(self) -> int:
        """Bytes of the workers' arenas (values plus their gradients), sized from the config."""
        with self._lock:
            self._ensure_ready()
            return sum(2 * e.capacity[0] for e in self._engines)

    @property
    def arena_high_water(self) -> int:
        """Most bytes of the arenas (values plus gradients) steps used since they were sized."""
        with self._lock:
            return sum(2 * e.high_water[0] for e in self._engines)

    @property
    def rows_independent(self) -> bool:
        """True when every sequence of a batch is computed bit for bit as it would be alone (the
        AVX2 and AVX-512 kernels: each output element is one chain of FMAs in a fixed order);
        False on the BLAS path (no AVX2), whose products may round a row differently in another
        batch. What caches a sequence's result across batches relies on it."""
        return not _core.step_uses_blas()

    @property
    def version(self) -> int:
        """The weights version: changes whenever what the model computes may have changed (an
        optimizer step, growth, an alpha or trainable flag, refresh(), loading), never repeats in
        the process except through restore_versions. Key caches of anything derived from the
        weights (held-out losses, the decoder's effective weights) by it. Each parameter group
        has its own (`model.groups[name].version`), which changes when its values may have."""
        return self._version

    def versions(self) -> tuple[int, dict[str, int]]:
        """(the model's version, every group's version), for restore_versions."""
        with self._lock:
            return self._version, {name: g.version for name, g in self.groups.items()}

    def restore_versions(self, saved: tuple[int, dict[str, int]]) -> None:
        """Put back versions taken by versions(), after writing back, bit for bit, the weights,
        alphas and trainable flags the model had then (the trainer's rollback): what was cached
        under them is valid again, and what was cached in between never matches later weights."""
        version, groups = saved
        with self._lock:
            if set(groups) != set(self.groups):
                raise ValueError(f"the saved versions name groups {sorted(groups)}, the model has {sorted(self.groups)}")
            for name, v in groups.items():
                self.groups[name].version = v
            self._version = version

    @property
    def lock(self) -> threading.RLock:
        """The model's lock. Every step holds it; hold it to read the parameters as one
        consistent snapshot while another thread trains (a step never shows half an update)."""
        return self._lock

    # ---------------------------------------------------------------------------- parameters

    def params(self) -> dict[str, np.ndarray]:
        """Every parameter by its design.md §2 name (live views: writes change the model; valid until the
        next growth). With tied embeddings lm_head is wte and appears once, as "wte"."""
        out = {}
        for group in self.groups.values():
            prefix = "" if group.name == "base" else group.name + "."
            out.update({prefix + k: v for k, v in group.params.items()})
        return out

    def write_rows(self, name: str, rows: slice, values: np.ndarray) -> None:
        """Write rows of the base matrix `name` (for example new vocabulary rows of wte) and
        keep what is cached from it in step: a folded copy (frozen delta modules on lm_head,
        which is wte when tied) gets the same rows plus their fixed delta terms. Cheaper than
        writing through params() and calling refresh() (which rebinds every engine and refolds
        every matrix); the weights version changes as there."""
        with self._lock:
            base = self.groups["base"]
            if name not in base.params or base.params[name].ndim != 2:
                raise ValueError(f"write_rows needs a base matrix, got {name!r}")
            target = base.params[name]
            target[rows] = values
            if not self._rebind_pending:  # else the next bind folds afresh from the base
                for adapted, view in self._fold_views.items():
                    if self._base_name(adapted) == name:
                        view[rows] = target[rows] + self._fold_delta[adapted][rows]
            base.version = next(_VERSIONS)
            self._version = next(_VERSIONS)

    def export_state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Everything needed to rebuild this model exactly: (JSON-able meta, tensors by name).
        Tensors: every parameter by name (design.md §2), Adam moments as "adam.m.<name>"/"adam.v.<name>",
        and "init_embed_snapshot". Gradients are not state (each step recomputes them)."""
        with self._lock:
            meta = {
                "config": self.config.to_dict(),
                "vocab_size": self.vocab_size,
                "dtype": self.dtype.name,
                "delta_alphas": list(self.delta_alphas),
                "trainable": dict(self.trainable),
                "adam_steps": {name: g.step for name, g in self.groups.items()},
                "rng": self.rng.bit_generator.state,
            }
            tensors = {}
            for group in self.groups.values():
                prefix = "" if group.name == "base" else group.name + "."
                m, v = group.moments()
                for key in group.shapes:
                    tensors[prefix + key] = group.params[key].copy()
                    tensors["adam.m." + prefix + key] = m[key].copy()
                    tensors["adam.v." + prefix + key] = v[key].copy()
            tensors["init_embed_snapshot"] = self.init_embed_snapshot.copy()
            return meta, tensors

    @classmethod
    def from_state(cls, meta: dict, tensors: dict[str, np.ndarray]) -> "Model":
        """Inverse of export_state. Raises KeyError/ValueError naming a missing or misshapen tensor."""
        config = Config.from_dict(meta["config"])
        model = cls.empty(config, int(meta["vocab_size"]), meta["dtype"], meta["delta_alphas"],
                          trainable=meta["trainable"])
        expected = model.state_shapes()
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise KeyError(f"missing tensor(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for name, shape in expected.items():
            if tuple(tensors[name].shape) != shape:
                raise ValueError(f"tensor {name!r} has shape {tuple(tensors[name].shape)}, expected {shape}")
        for group in model.groups.values():
            prefix = "" if group.name == "base" else group.name + "."
            m, v = group.moments()
            for key in group.shapes:
                group.params[key][...] = tensors[prefix + key]
                m[key][...] = tensors["adam.m." + prefix + key]
                v[key][...] = tensors["adam.v." + prefix + key]
            group.step = int(meta["adam_steps"][group.name])
        model.init_embed_snapshot[...] = tensors["init_embed_snapshot"]
        model.rng.bit_generator.state = meta["rng"]
        model._rebuild(reallocate=False)  # folded weights come from the loaded values
        return model

    def state_layout(self) -> list[str]:
        """The names export_state produces, in the order of the model's memory: per group its
        parameters, then their Adam m, then v (each one flat array, laid out in group.shapes
        order); the snapshot last. A checkpoint written in this order loads each group's arrays
        in one read."""
        names = []
        for group in self.groups.values():
            prefix = "" if group.name == "base" else group.name + "."
            for kind in ("", "adam.m.", "adam.v."):
                names.extend(kind + prefix + key for key in group.shapes)
        names.append("init_embed_snapshot")
        return names

    def state_spans(self, optimizer_state: bool = True) -> dict[str, tuple[np.ndarray, int, tuple[int, ...]]]:
        """Where each tensor of export_state lives in the model's memory, by the same names:
        (flat array, start element, shape), so a loader can write straight into the model
        (optimizer_state=False: parameters and the snapshot only). Writing through these
        spans is writing parameters in place: call refresh() afterwards on a model in use."""
        spans = {}
        for group in self.groups.values():
            prefix = "" if group.name == "base" else group.name + "."
            arrays = [("", group.flat)] + ([("adam.m.", group.m), ("adam.v.", group.v)] if optimizer_state else [])
            for kind, flat in arrays:
                for key, shape in group.shapes.items():
                    spans[kind + prefix + key] = (flat, group.offsets[key], tuple(shape))
        snap = self.init_embed_snapshot
        spans["init_embed_snapshot"] = (snap.reshape(-1), 0, tuple(snap.shape))
        return spans

    def set_adam_steps(self, steps: dict[str, int]) -> None:
        """Set every parameter group's Adam step counter (by group name, as export_state's
        meta["adam_steps"] gives them)."""
        with self._lock:
            if set(steps) != set(self.groups):
                raise KeyError(f"adam steps name groups {sorted(steps)}, the model has {sorted(self.groups)}")
            for name, step in steps.items():
                self.groups[name].step = int(step)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every tensor export_state produces (for validating a file before reading it)."""
        shapes = {}
        for group in self.groups.values():
            prefix = "" if group.name == "base" else group.name + "."
            for key, shape in group.shapes.items():
                shapes[prefix + key] = tuple(shape)
                shapes["adam.m." + prefix + key] = tuple(shape)
                shapes["adam.v." + prefix + key] = tuple(shape)
        shapes["init_embed_snapshot"] = (self.vocab_size, self.config.n_embd)
        return shapes

    def num_params(self) -> int:
        return sum(g.size for g in self.groups.values())

    # ---------------------------------------------------------------------------- batches

    def _validate(self, batch) -> list[np.ndarray]:
        if isinstance(batch, (str, bytes)) or not isinstance(batch, Iterable):
            raise TypeError(f"batch must be a list of token-id lists, got {type(batch).__name__}")
        fast = self._validate_plain(batch)
        if fast is not None:
            return fast
        seqs = []
        for s, seq in enumerate(batch):
            try:
                arr = np.asarray(seq)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"batch[{s}] is not a sequence of token ids ({exc})") from None
            if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
                raise TypeError(f"batch[{s}] must be a flat list of ints, got array of dtype {arr.dtype} and shape {arr.shape}")
            if arr.size < 2:
                raise ValueError(f"batch[{s}] has {arr.size} token(s); a training sequence needs at least 2 (input and target)")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= self.vocab_size:
                bad = lo if lo < 0 else hi
                raise ValueError(f"batch[{s}] holds token id {bad}, outside the vocabulary [0, {self.vocab_size})")
            seqs.append(np.ascontiguousarray(arr, dtype=np.intc))
        if not seqs:
            raise ValueError("batch is empty; pass at least one sequence")
        return seqs

    def _validate_plain(self, batch) -> list[np.ndarray] | None:
        """The common batch (a list of lists of valid ids, each of 2 or more) converted and
        checked in one Cython pass over the ints (plain ints only: bools, numpy scalars and the
        rest take the general path, which rejects all-bool rows) instead of np.asarray, min and
        max per sequence. None when anything differs; the per-sequence checks then name it."""
        flat_lengths = _core.ragged_ids(batch, self.vocab_size)
        if flat_lengths is None:
            return None
        flat, lengths = flat_lengths
        shortest = lengths.min()
        if shortest < 2:
            return None
        if lengths.max() == shortest:
            return list(flat.reshape(len(lengths), shortest))
        ends = np.cumsum(lengths).tolist()
        return [flat[end - n:end] for end, n in zip(ends, lengths.tolist())]

    def _run(self, seqs: list[np.ndarray], total_sequences: int, backward: bool, sum_grads: bool = True):
        """Forward (with loss) and optionally backward of `seqs` on the workers. Returns one
        (sequence indices, packed batch, per-position losses) per worker used. With backward,
        the groups' gradients hold the batch gradient afterwards (sum_grads=False: worker 0's
        part only, the others' in self._worker_grads[1:self._last_workers], for the caller to
        sum, as train_step's Adam does in its own pass)."""
        self._ensure_ready()
        self._refresh_folds()
        T = self.config.block_size
        shares = _deal([min(T, len(a) - 1) for a in seqs], len(self._engines))
        n_workers = len(shares)
        parts = []
        for w, idx in enumerate(shares):
            packed = _core.pack_batch([seqs[i] for i in idx], self.config.block_size, total_sequences)
            engine = self._engines[w]
            need, nodes = engine.plan(len(packed[0]), packed[7])
            if need > engine.capacity[0] or nodes > engine.capacity[1]:
                self._raise_overflow(len(seqs), sum(min(self.config.block_size, len(a) - 1) for a in seqs), w, packed)
            losses = np.zeros(len(packed[0]))
            engine.set_batch(*packed, losses)
            parts.append((idx, packed, losses))
        # the engines zero their gradient buffers themselves (bind_zeroed) before backward
        with _serial_blas:
            ok = _core.run(self._engines[:n_workers], True, True, backward, self._n_threads)
        if not all(ok):  # the plan check above makes this unreachable; the C check is the guarantee
            w = ok.index(False)
            self._raise_overflow(len(seqs), len(parts[w][1][0]), w, parts[w][1])
        self._last_workers = n_workers
        if backward and sum_grads:
            # only trainable groups: a frozen one is never written (see _bind_all), so its buffer
            # stays zero (set_trainable clears it on freezing)
            for w in range(1, n_workers):
                for name in self.groups:
                    if self.trainable[name]:
                        self.groups[name].grad += self._worker_grads[w][name]
        return parts

    def _raise_overflow(self, n_seq: int, N: int, worker: int, packed):
        c = self.config
        engine = self._engines[worker]
        need, nodes = engine.plan(len(packed[0]), packed[7])
        cap, node_cap = engine.capacity
        raise ArenaOverflowError(
            f"this batch ({n_seq} sequences, {N} positions) needs {2 * need} bytes and {nodes} tape nodes "
            f"on worker {worker} of {len(self._engines)}, whose arena holds {2 * cap} bytes and {node_cap} nodes: "
            f"the arenas are sized for Config.batch_size={c.batch_size} sequences of Config.block_size="
            f"{c.block_size} positions (n_layer={c.n_layer}, n_embd={c.n_embd}, n_head={c.n_head}, "
            f"vocab_size={self.vocab_size}, delta modules={self.n_delta}). Raise Config.batch_size or split the batch.")

    # ---------------------------------------------------------------------------- public steps

    def loss(self, batch_ids: Sequence[Sequence[int]]) -> float:
        """Mean over sequences of each sequence's mean next-token cross-entropy (no gradients).
        Batches larger than Config.batch_size are evaluated in chunks (same value)."""
        losses = self.sequence_losses(batch_ids)
        return float(sum(losses) / len(losses))

    def sequence_losses(self, batch_ids: Sequence[Sequence[int]]) -> list[float]:
        """Mean cross-entropy of each sequence, in order."""
        return [float(nats.mean()) for nats in self.token_nats(batch_ids)]

    def token_nats(self, batch_ids: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Cross-entropy (nats, float64) of each predicted token of each sequence, in order: for a
        sequence of L ids, its targets ids[1:n + 1], n = min(L - 1, block_size) (no gradients)."""
        with self._lock:
            self._sync_config()
            seqs = self._validate(batch_ids)
            out: list = [None] * len(seqs)
            self._ensure_ready()  # the engines the chunks are dealt to
            for start, stop in self._arena_chunks(seqs):
                chunk = seqs[start:stop]
                for idx, packed, losses in self._run(chunk, len(chunk), backward=False):
                    off, n = packed[4], packed[5]
                    for i, o, k in zip(idx, off, n):
                        out[start + i] = losses[o:o + k].copy()
            return out

    def _arena_chunks(self, seqs: list[np.ndarray]) -> Iterator[tuple[int, int]]:
        """Consecutive (start, stop) ranges of `seqs` that each fit the arenas in one run: as
        many sequences as fit, not just batch_size (short held-out lines pack several times
        more per run). A range is cut when one worker's share, dealt as _run deals it (_deal),
        would exceed the positions or squared lengths it is sized for."""
        if len(seqs) <= self.config.batch_size:  # the arenas are sized for any batch of this many
            yield 0, len(seqs)
            return
        T = self.config.block_size
        cap_n, cap_sq = self._max_step()
        workers = len(self._engines)
        lengths = [min(T, len(a) - 1) for a in seqs]
        start = 0
        while start < len(seqs):
            stop = start + 1
            while stop < len(seqs):
                part = lengths[start:stop + 1]
                if any(sum(part[i] for i in idx) > cap_n or sum(part[i] ** 2 for i in idx) > cap_sq
                       for idx in _deal(part, workers)):
                    break
                stop += 1
            yield start, stop
            start = stop

    def _loss_and_backward(self, batch_ids, sum_grads: bool = True) -> float:
        """Batch loss; the trainable groups' gradients hold the batch gradient afterwards. A
        batch larger than the arenas hold runs in arena-sized chunks whose gradients are summed
        (each sequence weighted by 1 / len(batch) as in one run: the same loss and gradient up
        to the order of the additions)."""
        self._sync_config()
        seqs = self._validate(batch_ids)
        self._ensure_ready()
        chunks = list(self._arena_chunks(seqs))
        if len(chunks) == 1:
            parts = self._run(seqs, len(seqs), backward=True, sum_grads=sum_grads)
            return float(sum(np.dot(losses, packed[3]) for _, packed, losses in parts))
        loss, summed = 0.0, {}
        for start, stop in chunks:
            parts = self._run(seqs[start:stop], len(seqs), backward=True, sum_grads=True)
            loss += float(sum(np.dot(losses, packed[3]) for _, packed, losses in parts))
            for name, group in self.groups.items():
                if self.trainable[name]:
                    if name in summed:
                        summed[name] += group.grad
                    else:
                        summed[name] = group.grad.copy()
        for name, grad in summed.items():
            self.groups[name].grad[...] = grad
        self._last_workers = 1  # the workers' parts are already in the groups' gradients
        return loss

    def loss_and_grads(self, batch_ids: Sequence[Sequence[int]]) -> tuple[float, dict[str, np.ndarray]]:
        """Batch loss and the gradient of every trainable parameter (copies, by design.md §2 name).
        With tied embeddings the one wte/lm_head matrix has one summed gradient, under "wte"."""
        with self._lock:
            loss = self._loss_and_backward(batch_ids)
            grads = {}
            for group in self.groups.values():
                if not self.trainable[group.name]:
                    continue
                prefix = "" if group.name == "base" else group.name + "."
                grads.update({prefix + k: v.copy() for k, v in group.grads.items()})
            return loss, grads

    def train_step(self, batch_ids: Sequence[Sequence[int]], lr: float) -> float:
        """Forward, backward and one clipped Adam step on every trainable group; returns the
        loss before the update."""
        if not np.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
        c = self.config
        with self._lock:
            loss = self._loss_and_backward(batch_ids, sum_grads=False)
            # one call sums the workers' gradients into each trainable group's (in the same pass
            # over memory as Adam, on n_threads threads), updates it and bumps its step counter
            # after its update (bias correction uses the new count): a Ctrl-C lands before or
            # after all of it
            trained = [group for group in self.groups.values() if self.trainable[group.name]]
            extras = [[self._worker_grads[w][group.name] for w in range(1, self._last_workers)] for group in trained]
            _core.adam_update_groups(trained, float(lr), c.beta1, c.beta2, c.eps_adam, c.grad_clip,
                                     extras, self._n_threads)
            for group in trained:
                group.version = next(_VERSIONS)
            self._version = next(_VERSIONS)
            return loss

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits (T, V) at every position of one sequence of T <= block_size token ids."""
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"ids must be a non-empty flat list of ints, got shape {arr.shape} dtype {arr.dtype}")
        T = self.config.block_size
        if arr.size > T:
            raise ValueError(f"logits() takes at most block_size={T} ids, got {arr.size}; pass the last {T}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"ids must lie in [0, {self.vocab_size}), got min {arr.min()} max {arr.max()}")
        N = arr.size
        packed = (arr.astype(np.intc), np.arange(N, dtype=np.intc), np.zeros(N, np.intc), np.zeros(N),
                  np.zeros(1, np.intc), np.array([N], np.intc), np.zeros(1, np.intp), N * N)
        out = np.empty((N, self.vocab_size), self.dtype)
        with self._lock:
            self._sync_config()
            self._ensure_ready()
            self._refresh_folds()
            engine = self._engines[0]
            engine.set_batch(*packed, np.zeros(N))
            with _serial_blas:
                ok = _core.run([engine], True, False, False, 1)
            if not ok[0]:
                self._raise_overflow(1, N, 0, packed)
            engine.copy_logits(out)
        return out


def _layer_matrices(config: Config, i: int) -> dict[str, tuple[int, int]]:
    """(nout, nin) of layer i's matrices, in storage order: q, k, v adjacent and gate, value
    adjacent (the engine runs each triple/pair as one fused product), then the patterns."""
    C, T, d, F = config.n_embd, config.block_size, config.head_dim, 4 * config.n_embd
    shapes = {f"l{i}.wq": (C, C), f"l{i}.wk": (C, C), f"l{i}.wv": (C, C), f"l{i}.wo": (C, C),
              f"l{i}.fc_g": (F, C), f"l{i}.fc_v": (F, C), f"l{i}.fc2": (C, F)}
    for h, kind in enumerate(config.head_types):
        if kind != "content":
            shapes[f"l{i}.h{h}.w_pattern"] = (T, d)
    return shapes


def base_shapes(config: Config, vocab_size: int) -> dict[str, tuple[int, int]]:
    """Shape of every base parameter, in storage order (design.md §2 names)."""
    C, T = config.n_embd, config.block_size
    shapes = {"wte": (vocab_size, C), "wpe": (T, C)}
    if not config.tie_embeddings:
        shapes["lm_head"] = (vocab_size, C)
    for i in range(config.n_layer):
        for name, shape in _layer_matrices(config, i).items():
            shapes[name] = shape
            head = name.split(".")[1] if name.endswith(".w_pattern") else None
            if head is not None and config.head_types[int(head[1:])] == "hybrid":
                shapes[f"l{i}.{head}.alpha"] = (1, 1)  # right after its pattern, as the original orders them
    return shapes


def adapted_shapes(config: Config, vocab_size: int) -> dict[str, tuple[int, int]]:
    """(nout, nin) of every base matrix that carries delta adapters, in module order."""
    shapes = {}
    for i in range(config.n_layer):
        shapes.update(_layer_matrices(config, i))
    shapes["lm_head"] = (vocab_size, config.n_embd)
    return shapes


def delta_shapes(config: Config, vocab_size: int) -> dict[str, tuple[int, int]]:
    """Shape of each factor of one delta module: "<base name>.A" (nout, r), ".B" (r, nin)."""
    r = config.delta_rank
    shapes = {}
    for name, (nout, nin) in adapted_shapes(config, vocab_size).items():
        shapes[f"{name}.A"] = (nout, r)
        shapes[f"{name}.B"] = (r, nin)
    return shapes


def _rope_tables(T: int, d: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (T, d/2) of angle pos / 10000^(2i/d) for pair i."""
    inv = np.array([1.0 / (10000.0 ** (2 * i / d)) for i in range(d // 2)])
    angles = np.arange(T, dtype=np.float64)[:, None] * inv[None, :]
    return np.ascontiguousarray(np.cos(angles), dtype), np.ascontiguousarray(np.sin(angles), dtype)

