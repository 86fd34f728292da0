"""Trainer: warmup with a schedule, held-out evaluation, telemetry, and bursts with the delta
module lifecycle, the immune system and exact rollback (design.md §3, §6, §7, §8.3-§8.5, §8.7).

What it is: the policy of continual learning over a `Model`. The arithmetic (forward, backward,
Adam) is `Model.train_step`; this module decides what to train, when, with which learning rate,
and whether to keep the result. The Organism owns the data (train and held-out sequences) and
hands them in; the trainer never touches text.

Held-out loss is molecule_gpt.heldout's: nats per character of lines never trained on, so a
value before and after a tokenizer change compare. The organism hands in two sets: the old
text (held out of the birth corpus) and the new (a slice held out of what it heard lately).

Delta-module lifecycle (design.md §8.3): a module is born an exact no-op (its A factors are zero),
is the only module that trains, and its alpha rises linearly to 1 over its first
`delta_ramp_bursts` bursts (1 by default: a module born a no-op needs no ramp, and a ramp
changes what the model computes between two checked bursts). When a new module is grown
(probability `delta_grow_prob` after a burst, up to `max_delta_modules`) the active one is
retired: it is dropped (alpha 0 for good) only when setting its alpha to 0 lowers held-out
loss on the old text and on the new text alike (it helped neither), otherwise it becomes a
fossil; either way it is frozen for good (`set_trainable(..., False)`, which lets the Model
fold it into cached effective weights). The last allowed module keeps training.

Immune system (design.md §6, §8.4): a burst is one checked unit. Held-out loss on the old text is
measured before anything of the burst changes the model (alpha ramp included) and after its
steps; the burst is rolled back when that loss rose by more than `immune_max_rise` (a
fraction), or when any loss, gradient or parameter was non-finite. Harm is judged by effect on
what the organism knew, not by the kind of text: new-domain text that leaves the old loss in
place is learned, whatever its style. A rollback copies the pre-burst parameters, Adam moments
and step counters, alphas and trainable flags back in place: the model is bit-identical to
before. `max_consecutive_rollbacks` rollbacks in a row multiply the burst learning rate by
`rollback_lr_backoff`; each accepted burst divides one factor back out (up to 1). The identity
drift (`projection`, `drift_check`) is measured and reported, but decides nothing: on every
attack tried it never caught a burst the loss check let through.

Locking (design.md §8.7): every optimizer step takes the model lock (inside Model.train_step), never
a whole burst, so a generating thread waits for at most one step. A rollback restores under the
lock in one go; held-out evaluation releases it between batches. `train_lock` (owned by the
Organism) serializes whole bursts and warmups against each other.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from .config import Config
from .errors import TrainingError
from .heldout import window_target_nats
from .model import Model, delta_group, fold_delta_terms

__all__ = ["ActivationCollapseWarning", "BurstReport", "ModuleState", "Projection", "Trainer", "lr_schedule"]


class ActivationCollapseWarning(UserWarning):
    """A layer's hidden-state std on held-out text fell below Config.collapse_std_bound: the
    residual stream is dying (usually a too-high learning rate). Also in the telemetry record
    {"phase": "warning", "kind": "activation_collapse", "layers": [...]}."""


# ---------------------------------------------------------------------------------------------
# records


@dataclass
class BurstReport:
    """What one burst did. loss_before/loss_after are held-out losses on the old text and
    new_loss_before/new_loss_after on the newly heard text, in nats per character (None
    without such lines); train_loss_first/last the first and last step's batch loss."""
    steps: int
    loss_before: float | None
    loss_after: float | None
    train_loss_first: float | None
    train_loss_last: float | None
    accepted: bool
    reason: str  # "accepted", "non_finite" or "val_loss_rose" (held-out loss on the old text)
    drift_cosine: float | None  # identity drift, reported only (None when not measurable)
    lr: float
    module: int  # index of the module that trained
    grew_module: int | None = None  # index of the module appended after the burst
    retired_module: int | None = None  # index of the module frozen after the burst
    retired_as: str | None = None  # "fossil" or "dropped"
    lr_backoff: bool = False  # this rollback completed a streak and lowered the learning rate
    seconds: float = 0.0
    new_loss_before: float | None = None
    new_loss_after: float | None = None
    # a close call judged again on every held-out line of the old text: [before, after] there
    second_look: list | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ModuleState:
    """Lifecycle of delta module `index`: "active" (training), "fossil" (frozen) or "dropped"
    (frozen with alpha 0 after failing the counterfactual check)."""
    index: int
    state: str = "active"
    bursts: int = 0  # accepted bursts it trained in
    counterfactual: dict | None = None  # {"with", "without", "new_with", "new_without", "alpha"} at retirement

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Projection:
    """Contrastive projection: unit vector of mean(current rows) - mean(birth rows), and its norm."""
    direction: np.ndarray
    magnitude: float


def _merged(slices: list) -> list:
    """(start, stop) ranges sorted, with touching ones joined."""
    out: list = []
    for a, b in sorted(slices):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def lr_schedule(step: int, total: int, base_lr: float, warmup_steps: int, min_ratio: float) -> float:
    """Linear warmup over the first `warmup_steps` steps (capped at half the run), then cosine
    decay from base_lr to base_lr * min_ratio at the last step."""
    warm = min(warmup_steps, total // 2)
    if step < warm:
        return base_lr * (step + 1) / warm
    span = max(1, total - 1 - warm)
    progress = min(1.0, (step - warm) / span)
    return base_lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------------------------------------
# exact snapshots


class Snapshot:
    """Copies of every trainable group's parameters, Adam moments and step counter, plus the
    alphas, trainable flags and weights versions. `restore` writes them back in place
    (bit-identical) and puts the versions back (Model.restore_versions): a held-out loss cached
    before the burst is valid again, one cached during it never matches later weights."""

    def __init__(self, model: Model):
        with model.lock:
            self.groups = {name: (g.flat.copy(), g.m.copy(), g.v.copy(), g.step, g)
                           for name, g in model.groups.items() if model.trainable[name]}
            self.alphas = list(model.delta_alphas)
            self.trainable = dict(model.trainable)
            self.versions = model.versions()

    def restore(self, model: Model) -> None:
        with model.lock:
            for name, (flat, m, v, step, group) in self.groups.items():
                g = model.groups[name]
                if g is not group:
                    raise TrainingError(f"cannot roll back: parameter group {name!r} was reallocated during the burst")
                g.flat[...] = flat
                g.m[...] = m
                g.v[...] = v
                g.step = step
            for k, a in enumerate(self.alphas):
                if model.delta_alphas[k] != a:
                    model.set_delta_alpha(k, a)
            for name, flag in self.trainable.items():
                if model.trainable.get(name) != flag:
                    model.set_trainable(name, flag)
            model.refresh()  # folded weights cache frozen parameters; re-derive them
            model.restore_versions(self.versions)


# ---------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    """Training policy for one Model. Construct with the model, the organism's config, a numpy
    Generator for sampling and the birth reference of the output embedding."""

    def __init__(self, model: Model, config: Config, rng: np.random.Generator, birth_rows: np.ndarray,
                 emit: Callable[[dict], None] | None = None, on_restore: Callable[[], None] | None = None,
                 pace: Callable[[float], None] | None = None):
        self.model = model
        self.config = config
        self.rng = rng
        self.birth_rows = birth_rows  # (V_birth, C) output embedding at birth
        self.emit = emit or (lambda record: None)
        self.on_restore = on_restore or (lambda: None)  # parameters were written back in place
        # called after each piece of compute (an optimizer step, a piece of a held-out
        # evaluation) with its seconds: the organism's background trainer gives way there
        self.pace = pace or (lambda seconds: None)
        self.steps = 0  # optimizer steps taken (warmup and bursts)
        self.warmup_steps_done = 0
        self._warmup_best = None  # (held-out loss, Snapshot, held-out set) of the warmup's best evaluation
        self.warmed_up = False
        self.bursts = 0
        self.accepted = 0
        self.rolled_back = 0
        self.consecutive_rollbacks = 0
        self.lr_scale = 1.0
        self.best_val: float | None = None
        self.last_val: float | None = None  # held-out loss on the old text (nats per character)
        self.last_new_val: float | None = None  # held-out loss on recently heard text, after the last accepted burst
        self.last_loss: float | None = None
        self.tokens_per_second: float | None = None  # exponential average over steps
        self.modules: list[ModuleState] = [ModuleState(k, "fossil") for k in range(model.n_delta)]
        self.history: list[dict] = []  # immune decisions, newest last (bounded)
        # (held-out set and tokenizer, Model.version) -> loss; a rollback restores the version
        # of weights whose key is still here, so the next burst's "before" costs nothing
        self._val_cache: dict = {}
        # Model.version -> {window ids: its targets' nats} for the newest few versions: a held-out
        # set that gained a few lines (text heard since the last burst) evaluates only those, and
        # target_nats after evaluate runs no forward pass; guarded by its lock (generation
        # threads read it through target_nats)
        self._window_nats: dict = {}
        self._window_nats_lock = threading.Lock()
        self.accepted_projection: Projection | None = None  # after the last warmup / accepted burst
        self._components = None  # (structure key, slices per component)

    # ---- evaluation

    def evaluate(self, held) -> float | None:
        """Held-out loss (nats per character) of a molecule_gpt.heldout.HeldOut set, cached
        while neither the weights, nor the set, nor the tokenizer changed. None without lines."""
        if held is None or not len(held):
            return None
        version = self.model.version
        key = (held.key(), version)
        loss = self._val_cache.get(key)
        if loss is None:
            loss = held.loss(self.model, self.pace, self._known_nats(version))
            if len(self._val_cache) >= 16:
                del self._val_cache[next(iter(self._val_cache))]  # the oldest
            self._val_cache[key] = loss
        return loss

    def target_nats(self, windows: Sequence[Sequence[int]]) -> np.ndarray:
        """Every target's nats of held-out windows (heldout.windows) under the current weights,
        window after window, from what evaluate() scored under these weights where it did (no
        forward pass for those windows). Any thread: it holds the model lock throughout, so
        what it adds to the windows kept for these weights is of these weights."""
        with self.model.lock:
            parts = window_target_nats(self.model, windows, None, self._known_nats(self.model.version))
        return np.concatenate(parts) if parts else np.zeros(0)

    def _known_nats(self, version: int) -> dict | None:
        """The window nats kept for weights `version` (made the newest; the oldest beyond four
        dropped), or None where a window's nats depend on its batch (not Model.rows_independent)."""
        if not self.model.rows_independent:
            return None
        with self._window_nats_lock:
            known = self._window_nats.pop(version, None) or {}
            self._window_nats[version] = known  # the newest last
            while len(self._window_nats) > 4:
                del self._window_nats[next(iter(self._window_nats))]
            return known

    # ---- identity

    def output_rows(self) -> np.ndarray:
        """The effective output embedding (V, C) in float64: the base output matrix (wte when
        tied) plus every delta module's lm_head term."""
        m = self.model
        with m.lock:
            p = m.groups["base"].params
            E = np.array(p["wte"] if m.config.tie_embeddings else p["lm_head"], dtype=np.float64)
            modules = [(a, m.groups[delta_group(k)].params) for k, a in enumerate(m.delta_alphas)]
            term = fold_delta_terms(modules, ["lm_head"]).get("lm_head")
            if term is not None:
                E += term
        return E

    def gamma(self) -> np.ndarray:
        """gamma = effective output rows - rows at birth (later-born rows count whole)."""
        E = self.output_rows()
        nb = min(len(self.birth_rows), len(E))
        E[:nb] -= self.birth_rows[:nb]
        return E

    def projection(self) -> Projection:
        g = self.gamma()
        v = g.mean(axis=0)
        norm = float(np.linalg.norm(v))
        return Projection(v / norm if norm > 0 else v, norm)

    def drift_check(self, before: Projection, after: Projection) -> tuple[bool, float | None]:
        """(passes, cosine): fails when the cosine of the directions is below
        noise_drift_threshold; the check is skipped (passes, None) while either magnitude is
        below gamma_min_magnitude."""
        c = self.config
        if before.magnitude < c.gamma_min_magnitude or after.magnitude < c.gamma_min_magnitude:
            return True, None
        cos = float(np.dot(before.direction, after.direction))
        return cos >= c.noise_drift_threshold, cos

    # ---- telemetry helpers

    def _component_slices(self):
        m = self.model
        key = (m.vocab_size, m.groups["base"])  # the slices follow the base group (a growth makes a new one)
        if self._components is not None and self._components[0] == key:
            return self._components[1]
        c = m.config
        base = m.groups["base"]
        C, d = c.n_embd, c.head_dim

        def rng(name, rows=None):
            o = base.offsets[name]
            shape = base.shapes[name]
            width = int(np.prod(shape[1:]))
            if rows is None:
                return (o, o + int(np.prod(shape)))
            return (o + rows[0] * width, o + rows[1] * width)

        comps = {"embeddings": [rng("wte"), rng("wpe")] + ([rng("lm_head")] if "lm_head" in base.offsets else []),
                 "content_heads": [], "rrpram_heads": [], "hybrid_heads": [], "hybrid_alphas": [],
                 "attn_out": [], "mlp": []}
        kinds = {"content": "content_heads", "rrpram": "rrpram_heads", "hybrid": "hybrid_heads"}
        for i in range(c.n_layer):
            for h, kind in enumerate(c.head_types):
                comp = comps[kinds[kind]]
                for w in ("wq", "wk", "wv"):
                    comp.append(rng(f"l{i}.{w}", (h * d, (h + 1) * d)))
                if kind != "content":
                    comp.append(rng(f"l{i}.h{h}.w_pattern"))
                if kind == "hybrid":
                    comps["hybrid_alphas"].append(rng(f"l{i}.h{h}.alpha"))
            comps["attn_out"].append(rng(f"l{i}.wo"))
            comps["mlp"] += [rng(f"l{i}.fc_g"), rng(f"l{i}.fc_v"), rng(f"l{i}.fc2")]
        comps = {name: _merged(slices) for name, slices in comps.items()}  # fewer, longer dot products
        covered = sum(b - a for slices in comps.values() for a, b in slices)
        if covered != base.size:  # the finiteness check relies on the components covering the base
            raise AssertionError(f"gradient components cover {covered} of {base.size} base parameters")
        self._components = (key, comps)
        return comps

    def grad_norms(self, active: str | None) -> dict:
        """Gradient L2 norm per component of the last step (None for frozen parts)."""
        m = self.model
        out = {}
        base_on = m.trainable["base"]
        grad = m.groups["base"].grad
        for name, slices in self._component_slices().items():
            if not base_on or not slices:
                out[name] = None if not base_on else 0.0
                continue
            out[name] = math.sqrt(sum(float(np.dot(grad[a:b], grad[a:b])) for a, b in slices))
        if active is not None and m.trainable.get(active):
            g = m.groups[active].grad
            out["active_delta"] = float(np.sqrt(np.dot(g, g)))
        else:
            out["active_delta"] = None
        return out

    def _sample(self, pool: Sequence[Sequence[int]], n: int) -> list:
        """n sequences drawn uniformly with replacement; longer than block_size + 1 -> a random
        window of block_size + 1 tokens."""
        T = self.model.config.block_size
        out = []
        for i in self.rng.integers(0, len(pool), n):
            seq = pool[int(i)]
            if len(seq) > T + 1:
                s = int(self.rng.integers(0, len(seq) - T))
                seq = seq[s:s + T + 1]
            out.append(seq)
        return out

    def _step(self, batch, lr: float, phase: str, active: str | None, extra: dict | None = None) -> tuple[float, bool]:
        """One optimizer step with telemetry; returns (loss, every trainable gradient finite).
        Finiteness comes from the per-component norms the telemetry computes anyway (a sum of
        squares is finite only if every term is), so it costs no extra pass."""
        t0 = time.perf_counter()
        loss = self.model.train_step(batch, lr)  # a new Model.version
        dt = time.perf_counter() - t0
        T = self.model.config.block_size
        n_tok = sum(min(T, len(s) - 1) for s in batch)
        tps = n_tok / dt if dt > 0 else float("inf")
        self.tokens_per_second = tps if self.tokens_per_second is None else 0.9 * self.tokens_per_second + 0.1 * tps
        self.steps += 1
        self.last_loss = loss
        norms = self.grad_norms(active)
        record = {"phase": phase, "step": self.steps, "loss": loss, "lr": lr, "tokens_per_s": tps,
                  "seconds": dt, "grad_norm": norms}
        if extra:
            record.update(extra)
        self.emit(record)
        self.pace(dt)
        finite = all(v is None or math.isfinite(v) for v in norms.values())
        return loss, finite

    # ---- warmup

    def warmup(self, train: Sequence[Sequence[int]], val, steps: int,
               progress: Callable[[dict], None] | None = None, collapse_probe: Callable[[], list] | None = None,
               start: int = 0, total: int | None = None, finish: bool = True,
               should_stop: Callable[[], bool] | None = None) -> dict:
        """`steps` steps of batch_size sequences drawn uniformly from `train` with the schedule
        lr_schedule(start + s, total, learning_rate, lr_warmup_steps, lr_min_ratio) (total
        defaults to steps; a warmup run in pieces passes start/total); held-out loss every
        eval_interval steps and at the end; early stop when `patience` evaluations in a row do
        not improve the best by min_delta. With warmup_keep_best the finished warmup goes back
        to the weights of its best evaluation when a later one was worse (overfitting a small
        corpus). should_stop() is asked before each step; when it
        says True the loop ends there and the warmup stays unfinished. Otherwise, with finish,
        the warmup is complete afterwards and the base is frozen when configured."""
        c = self.config
        total = steps if total is None else total
        if not train:
            raise TrainingError("no training sequences: give the organism a corpus (or observe() text) first")
        m = self.model
        if not m.trainable["base"]:
            m.set_trainable("base", True)
        for k in range(m.n_delta):  # warmup trains the base only; modules keep their state
            if m.trainable[delta_group(k)]:
                m.set_trainable(delta_group(k), False)
        done, bad_evals, stopped_early, interrupted = 0, 0, False, False
        if start == 0:
            self._warmup_best = None  # a new warmup, not the rest of an interrupted one
        t_start = time.perf_counter()
        for s in range(steps):
            if should_stop is not None and should_stop():
                interrupted = True  # the warmup stays unfinished: a later call resumes the schedule
                break
            lr = lr_schedule(start + s, total, c.learning_rate, c.lr_warmup_steps, c.lr_min_ratio)
            batch = self._sample(train, c.batch_size)
            extra = {}
            last = s == steps - 1
            evaluate = val is not None and len(val) and ((start + s + 1) % c.eval_interval == 0 or (last and finish))
            loss, finite = self._step(batch, lr, "warmup", None)
            done += 1
            self.warmup_steps_done += 1
            if not math.isfinite(loss) or not finite:
                raise TrainingError(f"warmup diverged at step {self.steps} (loss {loss}); lower Config.learning_rate "
                                    f"(now {c.learning_rate}) or Config.grad_clip")
            if evaluate:
                v = self.evaluate(val)
                self.last_val = v
                extra["val_loss"] = v
                if c.warmup_keep_best and (self._warmup_best is None or v < self._warmup_best[0]):
                    self._warmup_best = (v, Snapshot(m), val)
                if self.best_val is None or v < self.best_val - c.min_delta:
                    self.best_val = v
                    bad_evals = 0
                else:
                    bad_evals += 1
                if collapse_probe is not None:
                    extra["collapsed_layers"] = collapse_probe()
                    if extra["collapsed_layers"]:
                        self.emit({"phase": "warning", "kind": "activation_collapse", "step": self.steps,
                                   "layers": extra["collapsed_layers"]})
                        warnings.warn(f"activation collapse at step {self.steps}: the hidden-state std of layer(s) "
                                      f"{extra['collapsed_layers']} is below Config.collapse_std_bound="
                                      f"{c.collapse_std_bound}; lower Config.learning_rate",
                                      ActivationCollapseWarning, stacklevel=3)
                self.emit(dict({"phase": "warmup_eval", "step": self.steps}, **extra))
                if c.patience and bad_evals >= c.patience:
                    stopped_early = True
            if progress is not None:
                progress(dict({"step": start + s + 1, "of": total, "loss": loss, "lr": lr}, **extra))
            if stopped_early:
                break
        if (finish and not interrupted) or stopped_early:
            best = self._warmup_best
            self._warmup_best = None
            # only a best measured on the same held-out set, of the same parameter arrays (a
            # growth between the pieces of an interrupted warmup reallocates them)
            comparable = best is not None and best[2] is val and all(
                m.groups.get(name) is group for name, (*_, group) in best[1].groups.items())
            if comparable and self.last_val is not None and best[0] < self.last_val:
                best[1].restore(m)  # back to the best evaluation's weights, moments and versions
                self.emit({"phase": "warmup_best", "step": self.steps, "val_loss": best[0],
                           "last_val_loss": self.last_val})
                self.last_val = best[0]
                self.on_restore()
            self.warmed_up = True
            self.accepted_projection = self.projection()
            if c.freeze_base_after_warmup:
                m.set_trainable("base", False)
        return {"steps": done, "stopped_early": stopped_early, "loss": self.last_loss, "val_loss": self.last_val,
                "seconds": time.perf_counter() - t_start}

    # ---- bursts

    def active_module(self) -> int | None:
        for st in self.modules:
            if st.state == "active":
                return st.index
        return None

    def _ensure_active(self) -> int:
        m = self.model
        k = self.active_module()
        if k is None:
            if m.n_delta >= self.config.max_delta_modules and m.n_delta > 0:
                k = m.n_delta - 1  # at the cap, the newest module keeps training
                self.modules[k].state = "active"
            else:
                k = m.add_delta_module(alpha=1.0 / self.config.delta_ramp_bursts, zero_output=True)
                self.modules.append(ModuleState(k))
        for j in range(m.n_delta):
            flag = j == k
            if m.trainable[delta_group(j)] != flag:
                m.set_trainable(delta_group(j), flag)
        want_base = not (self.warmed_up and self.config.freeze_base_after_warmup)
        if m.trainable["base"] != want_base:
            m.set_trainable("base", want_base)
        return k

    def _second_look(self, before: Snapshot, held) -> tuple[float, float]:
        """Held-out loss of `held` under the weights before the burst and under the burst's own:
        the burst's weights are put aside while the earlier ones are scored, then written back
        (with their versions, so what is cached under them stays valid)."""
        m = self.model
        after = Snapshot(m)
        before.restore(m)
        self.on_restore()
        try:
            loss_before = self.evaluate(held)
        finally:
            after.restore(m)
            self.on_restore()
        return loss_before, self.evaluate(held)

    def burst(self, new: Sequence[Sequence[int]], replay: Sequence[Sequence[int]], old=None, heard=None,
              lr: float | None = None, old_all=None) -> BurstReport:
        """micro_steps steps on batches mixing `new` sequences with `replay` ones (each slot is
        replay with probability replay_ratio, always when there is nothing new), checked by the
        immune system on `old` (a HeldOut set of the old text), then maybe a new module;
        `heard` (a HeldOut set of recently heard text) is measured for the report and judges
        retirement. `old_all` (every held-out line of the old text, a superset of `old`) judges
        close calls again: a rise on `old` at most Config.immune_second_look below the bound is
        decided by the rise on `old_all`. See the module docstring."""
        m = self.model
        if not new and not replay:
            raise TrainingError("nothing to train on: the corpus is empty")
        t0 = time.perf_counter()
        k = self._ensure_active()
        state = self.modules[k]
        snap = Snapshot(m)  # before the alpha ramp: a rollback undoes the whole burst
        rng_state = self.rng.bit_generator.state  # and the batches it drew: the next burst draws as if it never ran
        # measured before anything of the burst changes what the model computes
        loss_before = self.evaluate(old)
        new_before = self.evaluate(heard)
        guard = {"settled": False}
        try:
            alpha = min(1.0, (state.bursts + 1) / self.config.delta_ramp_bursts)
            if m.delta_alphas[k] != alpha:
                m.set_delta_alpha(k, alpha)
            return self._burst(new, replay, old, heard, lr, t0, k, state, (snap, rng_state), loss_before,
                               new_before, guard, old_all)
        except BaseException:
            # an exception or Ctrl-C before the burst's outcome is settled: leave the model as it
            # was before the burst (afterwards the accepted or rolled-back state stands)
            if not guard["settled"]:
                snap.restore(m)
                self.on_restore()
            raise

    def _burst(self, new, replay, old, heard, lr, t0, k, state, before, loss_before, new_before,
               guard, old_all=None) -> BurstReport:
        c = self.config
        snap, rng_state = before
        m = self.model
        lr_used = (c.burst_learning_rate * self.lr_scale) if lr is None else float(lr)
        first = last = None
        reason = "accepted"
        steps = 0
        active = delta_group(k)
        proj_before = self.accepted_projection
        for _ in range(c.micro_steps):
            n_replay = int(self.rng.binomial(c.batch_size, c.replay_ratio)) if new else c.batch_size
            if not replay:
                n_replay = 0
            batch = self._sample(replay, n_replay) + self._sample(new, c.batch_size - n_replay)
            loss, finite = self._step(batch, lr_used, "burst", active)
            steps += 1
            first = loss if first is None else first
            last = loss
            if not math.isfinite(loss) or not finite:
                reason = "non_finite"
                break
        loss_after = new_after = cos = second = None
        if reason == "accepted":
            params_ok = all(bool(np.isfinite(g.flat).all()) for n, g in m.groups.items() if m.trainable[n])
            if not params_ok:
                reason = "non_finite"
        if reason == "accepted" and loss_before is not None:
            loss_after = self.evaluate(old)
            if not math.isfinite(loss_after):
                reason = "non_finite"
            else:
                rise = loss_after / loss_before - 1.0
                # a close call about to be accepted is judged again on every line (a rejection
                # costs little: its text waits in the quarantine)
                if (old_all is not None and c.immune_second_look > 0
                        and c.immune_max_rise - c.immune_second_look <= rise <= c.immune_max_rise):
                    second = self._second_look(snap, old_all)
                    rise = second[1] / second[0] - 1.0
                if rise > c.immune_max_rise:
                    reason = "val_loss_rose"
        proj_after = None
        if reason == "accepted":
            new_after = self.evaluate(heard)
            proj_after = self.projection()
            if proj_before is not None:
                cos = self.drift_check(proj_before, proj_after)[1]
        accepted = reason == "accepted"
        backoff = False
        self.bursts += 1
        if accepted:
            self.accepted += 1
            self.consecutive_rollbacks = 0
            self.lr_scale = min(1.0, self.lr_scale / c.rollback_lr_backoff)
            state.bursts += 1
            if loss_after is not None:
                self.last_val = loss_after
            if new_after is not None:
                self.last_new_val = new_after
            self.accepted_projection = proj_after
        else:
            snap.restore(m)
            self.rng.bit_generator.state = rng_state
            self.on_restore()
            self.rolled_back += 1
            self.consecutive_rollbacks += 1
            if self.consecutive_rollbacks >= max(1, c.max_consecutive_rollbacks):
                self.lr_scale *= c.rollback_lr_backoff
                self.consecutive_rollbacks = 0
                backoff = True
        report = BurstReport(steps=steps, loss_before=loss_before, loss_after=loss_after, train_loss_first=first,
                             train_loss_last=last, accepted=accepted, reason=reason, drift_cosine=cos, lr=lr_used,
                             module=k, lr_backoff=backoff, new_loss_before=new_before, new_loss_after=new_after,
                             second_look=None if second is None else list(second))
        guard["settled"] = True
        if accepted and self.rng.random() < c.delta_grow_prob and m.n_delta < c.max_delta_modules:
            report.retired_module, report.retired_as = k, self.retire(k, old, heard)
            report.grew_module = self._ensure_active()
        report.seconds = time.perf_counter() - t0
        self.history.append({"burst": self.bursts, "step": self.steps, "accepted": accepted, "reason": reason,
                             "drift_cosine": cos, "loss_before": loss_before, "loss_after": loss_after,
                             "new_loss_before": new_before, "new_loss_after": new_after,
                             "second_look": report.second_look})
        del self.history[:-200]
        self.emit(dict({"phase": "burst_end", "step": self.steps}, **report.to_dict()))
        return report

    def retire(self, k: int, old=None, heard=None) -> str:
        """Freeze module k for good. It is dropped (alpha stays 0) only when held-out loss
        without it is no higher on the old text (`old`) and on the recently heard text
        (`heard`) alike: a module that learned the new text is kept even when the old text
        alone would not miss it. Otherwise it becomes a fossil."""
        m = self.model
        state = self.modules[k]
        verdict = "fossil"
        if old is not None and len(old):
            with m.lock:  # the model is briefly evaluated without the module: keep others out
                alpha = m.delta_alphas[k]
                with_old, with_new = self.evaluate(old), self.evaluate(heard)
                m.set_delta_alpha(k, 0.0)
                without_old, without_new = self.evaluate(old), self.evaluate(heard)
                state.counterfactual = {"with": with_old, "without": without_old, "new_with": with_new,
                                        "new_without": without_new, "alpha": alpha}
                if without_old <= with_old and (with_new is None or without_new <= with_new):
                    verdict = "dropped"
                else:
                    m.set_delta_alpha(k, alpha)
        m.set_trainable(delta_group(k), False)
        state.state = verdict
        return verdict

    # ---- state

    def state_dict(self) -> dict:
        return {"steps": self.steps, "warmup_steps_done": self.warmup_steps_done, "warmed_up": self.warmed_up,
                "bursts": self.bursts, "accepted": self.accepted, "rolled_back": self.rolled_back,
                "consecutive_rollbacks": self.consecutive_rollbacks, "lr_scale": self.lr_scale,
                "best_val": self.best_val, "last_val": self.last_val, "last_new_val": self.last_new_val,
                "last_loss": self.last_loss,
                "modules": [s.to_dict() for s in self.modules], "history": self.history[-50:],
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict) -> None:
        for name in ("steps", "warmup_steps_done", "warmed_up", "bursts", "accepted", "rolled_back",
                     "consecutive_rollbacks", "lr_scale", "best_val", "last_val", "last_loss"):
            setattr(self, name, d[name])
        self.last_new_val = d.get("last_new_val")
        self.modules = [ModuleState(**s) for s in d["modules"]]
        self.history = list(d["history"])
        self.rng.bit_generator.state = d["rng"]
