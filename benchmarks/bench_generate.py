"""Generation tokens/s at batch 1: molecule_gpt beside plain numpy and PyTorch eager, same run;
and batched decoding (`--batch 16`): 16 sequences at once against one.

    python benchmarks/bench_generate.py --corpus CORPUS.txt [--repeats 7] [--tokens 180] [--quick]
    python benchmarks/bench_generate.py --batch 16 --batch-only --cases default-trained,larger,larger-2t

All three implementations decode with a key/value cache, the same window rule (keep the last
half and re-prefill it when the window is full), the same effective weights (delta modules
folded in) and the same sampling stack (design.md §4: entropy-adaptive temperature, min-p, top-k,
typical-p, top-p at the config's defaults); each generates `--tokens` tokens after a corpus
prompt (EOS banned, no early stop) and is timed end to end (prompt encoding, prefill,
sampling, detokenization for ours). Medians of interleaved repeats. One line per (case, impl).

Cases: "default" (Config(), a BPE tokenizer trained on the corpus: V about 630, random init),
"default-trained" (the same after `--train-steps` warmup steps: peaked distributions, the
realistic sampling load), "larger" (6 layers, C 256, 8 heads, block 256, 4 content + 4 hybrid
heads, V about 1800: 27 MB of weights streamed per token; "larger-trained" after training); a name
ending in "-2t" ("larger-2t", "default-trained-2t") is that case with Config.decode_threads=2,
torch with 2 threads and numpy's BLAS with 2 threads. Results are checked after timing: both baselines reproduce
Model.logits(window) at every step of a decode that crosses window refills, and our greedy
continuation equals the numpy baseline's.

Batched (`--batch B`, after the batch-1 table, or alone with `--batch-only`): in paired rounds,
one `Generator.run` of `--tokens` tokens and one `Generator.run_many` of B prompts with B seeds
(each sequence `--tokens` tokens: EOS banned, no early stop), timed end to end; tokens/s of each
and the ratio (medians over the rounds of the per-round figures). The threads are the case's
`decode_threads` for both (the batch deals its sequences over them). After timing, every batched
sequence is checked to equal its single run (ids).

Ceilings, measured in the same run: batch 1 reads every product matrix once a token, so its
limit is the memory wall, the packed matrices' bytes (`Weights.matrix_bytes`) read at the rate
`_core.read_bandwidth` measures for a buffer of that size on the case's threads (from the cache
level it fits in, as the weights are read again every token); a batch reads them once a step
for all its sequences, so its limit is the FMA ceiling, two FLOPs per matrix element at the
threads' probed FMA peak (`_core.fma_peak`). The batch-1 line and the batched table give the
share of each that we reach (attention, norms and sampling come on top of the products).

Decode precision (`--precision`, alone): in paired rounds, the same model decoded with its own
float32 weights and with bfloat16 ones (Config.decode_precision), batch 1 and, with `--batch B`,
B at once; and what bfloat16 costs in prediction: held-out loss (nats per character,
molecule_gpt.heldout) of the decoder a token at a time over the corpus's last 200 lines, which
no case trains on.

The numpy and torch decoders below are what a careful user would write: batched prefill,
per-token matvecs, heads vectorized where the head type allows, float32, torch under no_grad
with torch.set_num_threads(1) and BLAS limited to one thread for numpy, like ours (threads only
slow batch-1 decoding down at the default size); the "-2t" case gives all three 2 threads.
"""
from __future__ import annotations

import argparse
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import molecule_gpt as mg  # noqa: E402
from molecule_gpt.generation import Generator, decoded_nats, fold_weights  # noqa: E402
from molecule_gpt.heldout import HeldOut  # noqa: E402
from molecule_gpt.tokenizer import EvolvingTokenizer, read_corpus  # noqa: E402

try:
    import torch
except ImportError:  # torch is optional: pip install torch==2.13.0
    torch = None

LARGER = dict(n_layer=6, n_embd=256, n_head=8, block_size=256, head_types=("content",) * 4 + ("hybrid",) * 4)
HELDOUT_LINES = 200  # the corpus's last lines: no case trains on them (--precision scores them)
TARGET_TOK_S = 20_000
TARGET_VS_TORCH = 5.0
TARGET_BATCHED_DEFAULT_TOK_S = 400_000  # issue 14: 16 sequences at once, default config, in all
TARGET_BATCHED_LARGER_RATIO = 8.0  # issue 14: 16 sequences at once, larger config, vs one


# ---------------------------------------------------------------------------------------------
# effective weights as plain arrays (what the baselines decode with)


def effective(model: mg.Model) -> dict:
    c = model.config
    p = model.params()

    def eff(name):
        W = p["wte" if (name == "lm_head" and c.tie_embeddings) else name].astype(np.float64)
        for k, a in enumerate(model.delta_alphas):
            W = W + a * (p[f"delta{k}.{name}.A"].astype(np.float64) @ p[f"delta{k}.{name}.B"])
        return W.astype(np.float32)

    out = {"wte": p["wte"].astype(np.float32), "wpe": p["wpe"].astype(np.float32), "lm": eff("lm_head"), "layers": []}
    for i in range(c.n_layer):
        layer = {m: eff(f"l{i}.{m}") for m in ("wq", "wk", "wv", "wo", "fc_g", "fc_v", "fc2")}
        layer["pat"] = {h: eff(f"l{i}.h{h}.w_pattern") for h, t in enumerate(c.head_types) if t != "content"}
        layer["mix"] = {h: 1 / (1 + math.exp(-float(p[f"l{i}.h{h}.alpha"][0, 0])))
                        for h, t in enumerate(c.head_types) if t == "hybrid"}
        out["layers"].append(layer)
    return out


def rope_tables(T, d):
    inv = np.array([1.0 / (10000.0 ** (2 * i / d)) for i in range(d // 2)])
    ang = np.arange(T)[:, None] * inv[None, :]
    return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# plain numpy decoding


class NumpyDecoder:
    """KV-cache decoding in numpy, float32."""

    def __init__(self, config: mg.Config, W: dict):
        self.c = config
        self.W = W
        C, T = config.n_embd, config.block_size
        self.H, self.d = config.n_head, config.head_dim
        self.cos, self.sin = rope_tables(T, self.d)
        self.K = np.zeros((config.n_layer, T, C), np.float32)
        self.V = np.zeros((config.n_layer, T, C), np.float32)
        for layer in W["layers"]:
            layer["wqkv"] = np.concatenate([layer["wq"], layer["wk"], layer["wv"]])
            layer["fcgv"] = np.concatenate([layer["fc_g"], layer["fc_v"]])
        self.content = [h for h, t in enumerate(config.head_types) if t != "rrpram"]
        self.window = []

    def _rms(self, x):
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + 1e-5).astype(np.float32)

    def _rope(self, x, pos):  # x (N, H, d), pos (N,)
        c, s = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out

    def _act(self, g):
        return np.maximum(g, 0) if self.c.mlp_activation == "relu" else g / (1 + np.exp(-g))

    def prefill(self, ids):
        ids = list(ids)[-self.c.block_size:]
        N, C, H, d = len(ids), self.c.n_embd, self.H, self.d
        pos = np.arange(N)
        x = self.W["wte"][ids] + self.W["wpe"][:N]
        mask = np.triu(np.full((N, N), -np.inf, np.float32), 1)
        for l, L in enumerate(self.W["layers"]):
            h = self._rms(x)
            qkv = h @ L["wqkv"].T
            q = self._rope(qkv[:, :C].reshape(N, H, d), pos)
            k = self._rope(qkv[:, C:2 * C].reshape(N, H, d), pos)
            v = qkv[:, 2 * C:].reshape(N, H, d)
            self.K[l, :N] = k.reshape(N, C)
            self.V[l, :N] = v.reshape(N, C)
            scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
            for hh, Wp in L["pat"].items():
                pat = h[:, hh * d:(hh + 1) * d] @ Wp[:N].T
                a = L["mix"].get(hh, 1.0)
                scores[hh] = (1 - a) * scores[hh] + a * pat if hh in L["mix"] else pat
            scores = scores + mask
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = scores / scores.sum(-1, keepdims=True)
            y = np.einsum("hts,shd->thd", att, v).reshape(N, C)
            x = x + y @ L["wo"].T
            h = self._rms(x)
            gv = h @ L["fcgv"].T
            F = gv.shape[1] // 2
            x = x + (self._act(gv[:, :F]) * gv[:, F:]) @ L["fc2"].T
        self.window = ids
        return self.W["lm"] @ self._rms(x[-1])

    def step(self, tok):
        pos = len(self.window)
        C, H, d = self.c.n_embd, self.H, self.d
        x = self.W["wte"][tok] + self.W["wpe"][pos]
        n = pos + 1
        for l, L in enumerate(self.W["layers"]):
            h = self._rms(x)
            qkv = L["wqkv"] @ h
            q = self._rope(qkv[:C].reshape(1, H, d), [pos])[0]
            k = self._rope(qkv[C:2 * C].reshape(1, H, d), [pos])[0]
            self.K[l, pos] = k.reshape(C)
            self.V[l, pos] = qkv[2 * C:]
            Kh = self.K[l, :n].reshape(n, H, d)
            Vh = self.V[l, :n].reshape(n, H, d)
            scores = np.einsum("shd,hd->hs", Kh, q) / np.sqrt(d)
            for hh, Wp in L["pat"].items():
                pat = Wp[:n] @ h[hh * d:(hh + 1) * d]
                scores[hh] = (1 - L["mix"][hh]) * scores[hh] + L["mix"][hh] * pat if hh in L["mix"] else pat
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            att = scores / scores.sum(-1, keepdims=True)
            y = np.einsum("hs,shd->hd", att, Vh).reshape(C)
            x = x + L["wo"] @ y
            h = self._rms(x)
            gv = L["fcgv"] @ h
            F = gv.shape[0] // 2
            x = x + L["fc2"] @ (self._act(gv[:F]) * gv[F:])
        self.window.append(tok)
        return self.W["lm"] @ self._rms(x)

    def feed(self, tok):
        T = self.c.block_size
        if len(self.window) < T:
            return self.step(tok)
        return self.prefill(self.window[T - T // 2:] + [tok])


def numpy_sample(z, cfg: mg.Config, rng):
    """design.md §4 stack in numpy (z: float64 logits, banned = -inf)."""
    def softmax(t):
        e = np.exp((z - z.max()) / t)
        return e / e.sum()

    p = softmax(cfg.temperature)
    nz = p > 0
    H = float(-(p[nz] * np.log(p[nz])).sum())
    t = cfg.temperature * (cfg.entropy_temp_boost if H < cfg.entropy_low else
                           cfg.entropy_temp_focus if H > cfg.entropy_high else 1.0)
    if t != cfg.temperature:
        p = softmax(t)
    idx = np.flatnonzero(p >= cfg.min_p * p.max())
    if cfg.top_k and len(idx) > cfg.top_k:
        idx = idx[np.argpartition(-p[idx], cfg.top_k - 1)[:cfg.top_k]]
    idx = idx[np.argsort(-p[idx], kind="stable")]
    if cfg.typical_p < 1 and len(idx) > 1:
        q = p[idx] / p[idx].sum()
        order = np.argsort(np.abs(-np.log(p[idx]) - H), kind="stable")
        keep = np.searchsorted(np.cumsum(q[order]), cfg.typical_p) + 1
        idx = idx[np.sort(order[:keep])]
    if cfg.top_p < 1 and len(idx) > 1:
        q = p[idx] / p[idx].sum()
        idx = idx[:np.searchsorted(np.cumsum(q), cfg.top_p) + 1]
    q = p[idx] / p[idx].sum()
    return int(idx[rng.choice(len(idx), p=q)])


def numpy_generate(dec: NumpyDecoder, tok: EvolvingTokenizer, prompt: str, n: int, cfg, seed: int, banned):
    rng = np.random.default_rng(seed)
    ids = tok.encode(prompt)[:-1]
    logits = dec.prefill(ids)
    out = []
    for i in range(n):
        z = logits.astype(np.float64)
        z[banned] = -np.inf
        t = numpy_sample(z, cfg, rng)
        out.append(t)
        if i + 1 < n:
            logits = dec.feed(t)
    return tok.decode(out)


# ---------------------------------------------------------------------------------------------
# PyTorch eager decoding


class TorchDecoder(NumpyDecoder):
    """The same decoder with torch tensors (float32, no_grad)."""

    def __init__(self, config, W):
        super().__init__(config, W)
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
        self.T = {"wte": t(W["wte"]), "wpe": t(W["wpe"]), "lm": t(W["lm"]), "layers": []}
        for L in W["layers"]:
            self.T["layers"].append({"wqkv": t(L["wqkv"]), "wo": t(L["wo"]), "fcgv": t(L["fcgv"]), "fc2": t(L["fc2"]),
                                     "pat": {h: t(w) for h, w in L["pat"].items()}, "mix": dict(L["mix"])})
        self.cos_t, self.sin_t = t(self.cos), t(self.sin)
        self.Kt = torch.zeros(self.K.shape)
        self.Vt = torch.zeros(self.V.shape)

    def _trms(self, x):
        return x * torch.rsqrt((x.double() ** 2).mean(-1, keepdim=True) + 1e-5).float()

    def _trope(self, x, pos):  # x (N, H, d)
        c, s = self.cos_t[pos][:, None, :], self.sin_t[pos][:, None, :]
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack([a * c - b * s, a * s + b * c], dim=-1).flatten(-2)

    def _tact(self, g):
        return torch.relu(g) if self.c.mlp_activation == "relu" else torch.nn.functional.silu(g)

    @(torch.no_grad() if torch is not None else (lambda f: f))
    def prefill(self, ids):
        ids = list(ids)[-self.c.block_size:]
        N, C, H, d = len(ids), self.c.n_embd, self.H, self.d
        pos = torch.arange(N)
        x = self.T["wte"][ids] + self.T["wpe"][:N]
        mask = torch.triu(torch.full((N, N), float("-inf")), 1)
        for l, L in enumerate(self.T["layers"]):
            h = self._trms(x)
            qkv = h @ L["wqkv"].T
            q = self._trope(qkv[:, :C].reshape(N, H, d), pos)
            k = self._trope(qkv[:, C:2 * C].reshape(N, H, d), pos)
            v = qkv[:, 2 * C:].reshape(N, H, d)
            self.Kt[l, :N] = k.reshape(N, C)
            self.Vt[l, :N] = v.reshape(N, C)
            scores = torch.einsum("thd,shd->hts", q, k) / math.sqrt(d)
            for hh, Wp in L["pat"].items():
                pat = h[:, hh * d:(hh + 1) * d] @ Wp[:N].T
                scores[hh] = (1 - L["mix"][hh]) * scores[hh] + L["mix"][hh] * pat if hh in L["mix"] else pat
            att = torch.softmax(scores + mask, dim=-1)
            y = torch.einsum("hts,shd->thd", att, v).reshape(N, C)
            x = x + y @ L["wo"].T
            h = self._trms(x)
            gv = h @ L["fcgv"].T
            F = gv.shape[1] // 2
            x = x + (self._tact(gv[:, :F]) * gv[:, F:]) @ L["fc2"].T
        self.window = ids
        return self.T["lm"] @ self._trms(x[-1])

    @(torch.no_grad() if torch is not None else (lambda f: f))
    def step(self, tok):
        pos = len(self.window)
        C, H, d = self.c.n_embd, self.H, self.d
        x = self.T["wte"][tok] + self.T["wpe"][pos]
        n = pos + 1
        for l, L in enumerate(self.T["layers"]):
            h = self._trms(x)
            qkv = L["wqkv"] @ h
            q = self._trope(qkv[:C].reshape(1, H, d), [pos])[0]
            k = self._trope(qkv[C:2 * C].reshape(1, H, d), [pos])[0]
            self.Kt[l, pos] = k.reshape(C)
            self.Vt[l, pos] = qkv[2 * C:]
            Kh = self.Kt[l, :n].reshape(n, H, d)
            Vh = self.Vt[l, :n].reshape(n, H, d)
            scores = torch.einsum("shd,hd->hs", Kh, q) / math.sqrt(d)
            for hh, Wp in L["pat"].items():
                pat = Wp[:n] @ h[hh * d:(hh + 1) * d]
                scores[hh] = (1 - L["mix"][hh]) * scores[hh] + L["mix"][hh] * pat if hh in L["mix"] else pat
            att = torch.softmax(scores, dim=-1)
            y = torch.einsum("hs,shd->hd", att, Vh).reshape(C)
            x = x + L["wo"] @ y
            h = self._trms(x)
            gv = L["fcgv"] @ h
            F = gv.shape[0] // 2
            x = x + L["fc2"] @ (self._tact(gv[:F]) * gv[F:])
        self.window.append(tok)
        return self.T["lm"] @ self._trms(x)


def torch_sample(z, cfg: mg.Config, gen):
    """design.md §4 stack with torch ops (z: float64 tensor, banned = -inf)."""
    p = torch.softmax(z / cfg.temperature, -1)
    nz = p > 0
    H = float(-(p[nz] * torch.log(p[nz])).sum())
    t = cfg.temperature * (cfg.entropy_temp_boost if H < cfg.entropy_low else
                           cfg.entropy_temp_focus if H > cfg.entropy_high else 1.0)
    if t != cfg.temperature:
        p = torch.softmax(z / t, -1)
    idx = torch.nonzero(p >= cfg.min_p * p.max()).flatten()
    if cfg.top_k and len(idx) > cfg.top_k:
        idx = idx[torch.topk(p[idx], cfg.top_k).indices]
    idx = idx[torch.argsort(-p[idx], stable=True)]
    if cfg.typical_p < 1 and len(idx) > 1:
        q = p[idx] / p[idx].sum()
        order = torch.argsort(torch.abs(-torch.log(p[idx]) - H), stable=True)
        keep = int(torch.searchsorted(torch.cumsum(q[order], 0), torch.tensor(cfg.typical_p, dtype=q.dtype))) + 1
        idx = idx[torch.sort(order[:keep]).values]
    if cfg.top_p < 1 and len(idx) > 1:
        q = p[idx] / p[idx].sum()
        idx = idx[:int(torch.searchsorted(torch.cumsum(q, 0), torch.tensor(cfg.top_p, dtype=q.dtype))) + 1]
    q = p[idx] / p[idx].sum()
    return int(idx[torch.multinomial(q, 1, generator=gen)])


@torch.no_grad() if torch is not None else (lambda f: f)
def torch_generate(dec: TorchDecoder, tok, prompt, n, cfg, seed, banned):
    gen = torch.Generator().manual_seed(seed)
    ids = tok.encode(prompt)[:-1]
    logits = dec.prefill(ids)
    banned_t = torch.tensor(banned)
    out = []
    for i in range(n):
        z = logits.double()
        z[banned_t] = float("-inf")
        t = torch_sample(z, cfg, gen)
        out.append(t)
        if i + 1 < n:
            logits = dec.feed(t)
    return tok.decode(out)


# ---------------------------------------------------------------------------------------------
# cases, checks, timing


def synthetic_corpus(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    words = ("the a cat dog river moon garden teacher market quiet small old red runs sees likes finds calls "
             "helps watches follows under over near with and but because when then later now").split()
    return [" ".join(rng.choice(words, rng.integers(5, 16))).capitalize() + "." for _ in range(n)]


def case_threads(name: str) -> int:
    return 2 if name.endswith("-2t") else 1


def build_case(name, lines, train_steps):
    big = name.startswith("larger")
    threads = case_threads(name)
    cfg = mg.Config(**LARGER, decode_threads=threads) if big else mg.Config(decode_threads=threads)
    merges = 1536 if big else cfg.bpe_num_merges
    tok = EvolvingTokenizer(lines, cfg, bpe_num_merges=merges)
    tok.maybe_enable_bpe(lines)
    model = mg.Model(cfg, tok.vocab_size, seed=0, n_threads=1)
    model.add_delta_module(alpha=1.0)
    if "trained" in name:
        rng = np.random.default_rng(0)
        data = [tok.encode(x) for x in lines[:-HELDOUT_LINES]]
        for s in range(train_steps):
            batch = [data[i][:cfg.block_size + 1] for i in rng.integers(0, len(data), cfg.batch_size)]
            model.train_step(batch, cfg.learning_rate)
    return cfg, tok, model


def check(cfg, tok, model, prompt):
    """Baselines reproduce Model.logits(window) at every step across window refills; our greedy
    continuation equals the numpy one. Returns the worst relative logit difference."""
    W = effective(model)
    dec_np = NumpyDecoder(cfg, {**W, "layers": [dict(L) for L in W["layers"]]})
    decs = [dec_np]
    if torch is not None:
        decs.append(TorchDecoder(cfg, {**W, "layers": [dict(L) for L in W["layers"]]}))
    ids = tok.encode(prompt)[:-1]
    steps = cfg.block_size + cfg.block_size // 2 + 4  # crosses at least one refill
    rng = np.random.default_rng(1)
    worst = 0.0
    outs = [np.asarray(d.prefill(ids)) for d in decs]
    window = list(ids)[-cfg.block_size:]
    for s in range(steps):
        ref = model.logits(window)[-1]
        scale = max(1.0, np.abs(ref).max())
        for o in outs:
            worst = max(worst, float(np.abs(np.asarray(o, np.float64) - ref).max() / scale))
        t = int(rng.integers(0, model.vocab_size))
        outs = [np.asarray(d.feed(t)) for d in decs]
        window = window + [t] if len(window) < cfg.block_size else window[cfg.block_size - cfg.block_size // 2:] + [t]
    assert worst < 1e-3, f"baseline logits differ from Model.logits by {worst:.3g}"
    g = Generator(model, tok)
    ours = g.run(prompt, temperature=0.0, max_gen_tokens=40, min_gen_tokens=40, repetition_guard=0).ids
    banned = [tok.bos_id, tok.pad_id, tok.eos_id]
    dec = NumpyDecoder(cfg, {**W, "layers": [dict(L) for L in W["layers"]]})
    logits = dec.prefill(ids)
    theirs = []
    for i in range(40):
        z = logits.astype(np.float64)
        z[banned] = -np.inf
        theirs.append(int(np.argmax(z)))
        logits = dec.feed(theirs[-1])
    assert ours == theirs, "greedy continuations differ"
    return worst


def ceilings(gen, threads) -> tuple[float, float, float]:
    """(MB of packed matrices a token streams, the memory wall in tok/s: those bytes read at the
    rate the read probe measures for a buffer of that size on `threads` threads, the FMA ceiling
    in tok/s: two FLOPs per matrix element at `threads` x the probed FMA peak of one core), all
    measured now. Batch 1 streams every matrix once per token (the wall bounds it); a batch
    reads them once per step for all its sequences (the FMA ceiling bounds it)."""
    from molecule_gpt import _core
    w = gen.weights.get()
    nbytes = w.matrix_bytes
    flops = 2.0 * nbytes / (2 if w.bf16 else np.dtype(w.dtype).itemsize)
    peak = max(_core.fma_peak(x) for x in ("avx2", "avx512") if _supports(x)) * 1e9
    # the best of a few probes spread over half a second, before the case's timed runs: on a
    # virtual machine a second thread does not always get a core of its own at once
    rates = []
    for _ in range(5):
        rates.append(_core.read_bandwidth(nbytes, threads))
        time.sleep(0.1)
    rate = max(rates)
    return nbytes / 1e6, rate * 1e9 / nbytes, threads * peak / flops


def _supports(width: str) -> bool:
    from molecule_gpt import _core
    try:
        _core.fma_peak(width, 1)
    except ValueError:
        return False
    return True


def bench_batched(name, cfg, tok, model, prompts, tokens, batch, rounds):
    """(tok/s of one sequence, tok/s of `batch` sequences at once, median per-round ratio, the same
    ratio in tokens per CPU second of this process), paired rounds; then every batched sequence is
    checked against its single run. (On a shared machine the CPU-time ratio shows what the batch
    saves in work, whatever share of the cores the process got.)"""
    gen = Generator(model, tok, config=cfg)
    fixed = dict(max_gen_tokens=tokens, min_gen_tokens=tokens, repetition_guard=0)
    group = [prompts[i % len(prompts)] for i in range(batch)]

    def params(r):
        return [gen.params(seed=1000 * r + k, **fixed) for k in range(batch)]

    gen.run(group[0], seed=0, **fixed)  # warm-up: weights folded, decoders pooled
    gen.run_many(group, params(0))
    one, many, ratio, cpu_ratio = [], [], [], []
    for r in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        gen.run(group[r % batch], seed=r, **fixed)
        t1, c1 = time.perf_counter(), time.process_time()
        gen.run_many(group, params(r))
        t2, c2 = time.perf_counter(), time.process_time()
        one.append(tokens / (t1 - t0))
        many.append(batch * tokens / (t2 - t1))
        ratio.append(many[-1] / one[-1])
        cpu_ratio.append(batch * (c1 - c0) / (c2 - c1))  # tokens per CPU second, batched / one
    p = params(rounds)
    got = gen.run_many(group, p)
    singles, rows = [], 0
    for q, pk in zip(group, p):
        dec = gen.begin(q, pk)
        singles.append(gen.run_begun(dec, pk).ids)
        rows += dec.rows  # positions the model ran: the prompt's, one a token, each window refill's
    assert [g.ids for g in got] == singles, f"{name}: a batched sequence differs from its single run"
    assert all(len(g.ids) == tokens for g in got)
    return (statistics.median(one), statistics.median(many), statistics.median(ratio), statistics.median(cpu_ratio),
            rows / (batch * tokens))


def bench_precision(name, cfg, tok, model, prompts, tokens, batch, rounds, heldout_lines):
    """Paired rounds of the same generations with the model's float32 decode weights and with
    bfloat16 ones: (tok/s float32, tok/s bfloat16, median per-round ratio) at batch 1, the same at
    `batch` sequences at once (None without), and the held-out loss of each (nats/char)."""
    gens = {p: Generator(model, tok, config=cfg.replace(decode_precision=p)) for p in ("model", "bfloat16")}
    fixed = dict(max_gen_tokens=tokens, min_gen_tokens=tokens, repetition_guard=0)
    group = [prompts[i % len(prompts)] for i in range(batch)]
    tps = {(p, b): [] for p in gens for b in (1, batch) if b}
    for g in gens.values():  # warm-up: weights folded, decoders pooled
        g.run(prompts[0], seed=0, **fixed)
        if batch:
            g.run_many(group, [g.params(seed=k, **fixed) for k in range(batch)])
    for r in range(rounds):
        for p, g in (gens.items() if r % 2 == 0 else reversed(gens.items())):
            t0 = time.perf_counter()
            g.run(prompts[r % len(prompts)], seed=r, **fixed)
            tps[p, 1].append(tokens / (time.perf_counter() - t0))
            if batch:
                t0 = time.perf_counter()
                g.run_many(group, [g.params(seed=1000 * r + k, **fixed) for k in range(batch)])
                tps[p, batch].append(batch * tokens / (time.perf_counter() - t0))

    def paired(b):
        if not b:
            return None
        ratios = [x16 / x32 for x32, x16 in zip(tps["model", b], tps["bfloat16", b])]
        return statistics.median(tps["model", b]), statistics.median(tps["bfloat16", b]), statistics.median(ratios)
    held = HeldOut(heldout_lines, tok.encode, lambda: tok.version)
    windows = held.windows(cfg.block_size)
    losses = [decoded_nats(fold_weights(model, p), windows) / held.chars for p in gens]
    return paired(1), paired(batch), losses


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", help="UTF-8 text, one line per line (default: a synthetic corpus)")
    ap.add_argument("--tokens", type=int, default=180)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--cases", default="default,default-trained,larger,larger-2t")
    ap.add_argument("--quick", action="store_true", help="default case, 3 repeats")
    ap.add_argument("--batch", type=int, default=0, metavar="B", help="also measure B sequences at once against one")
    ap.add_argument("--batch-only", action="store_true", help="only the batched measurement (needs --batch)")
    ap.add_argument("--precision", action="store_true",
                    help="only float32 against bfloat16 decode weights (speed and held-out loss)")
    args = ap.parse_args()
    if args.batch_only and args.batch < 1:
        ap.error("--batch-only needs --batch B")
    lines = read_corpus(args.corpus).lines if args.corpus else synthetic_corpus()
    cases = ["default"] if args.quick else args.cases.split(",")
    repeats = 3 if args.quick else args.repeats
    if torch is not None:
        torch.set_num_threads(1)
    from threadpoolctl import threadpool_limits
    threadpool_limits(1, user_api="blas")  # numpy's matvecs too: BLAS threads only slow down batch-1 decoding
    print(f"# machine: {platform.machine()} {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, python "
          f"{platform.python_version()}, numpy {np.__version__}, torch {torch.__version__ if torch else 'not installed'}"
          f"; corpus {len(lines)} lines; {args.tokens} tokens per call, medians of {repeats}")
    if not args.batch_only and not args.precision:
        print(f"{'case':16} {'V':>5} {'thr':>3} {'impl':12} {'ms/call':>9} {'tok/s':>9} {'vs torch':>9} {'vs numpy':>9}")
    if args.precision:
        print(f"# decode weights float32 against bfloat16, paired rounds (medians of {repeats}); held-out loss of "
              f"the decoder on the corpus's last {HELDOUT_LINES} lines (nats/char)")
        print(f"{'case':16} {'V':>5} {'thr':>3} {'batch':>5} {'f32 tok/s':>10} {'bf16 tok/s':>11} {'ratio':>7} "
              f"{'held-out f32':>13} {'bf16':>9} {'change':>9}")
        for name in cases:
            threads = case_threads(name)
            cfg, tok, model = build_case(name, lines, args.train_steps)
            prompts = [x[:60] for x in lines[1:-HELDOUT_LINES:max(1, len(lines) // 50)]][:50]
            one, many, (l32, l16) = bench_precision(name, cfg, tok, model, prompts, args.tokens, args.batch, repeats,
                                                    lines[-HELDOUT_LINES:])
            for b, row in ((1, one), (args.batch, many)):
                if row:
                    print(f"{name:16} {model.vocab_size:5d} {threads:3d} {b:5d} {row[0]:10.0f} {row[1]:11.0f} "
                          f"{row[2]:6.2f}x {l32:13.5f} {l16:9.5f} {l16 / l32 - 1:+9.4%}")
        return
    summary, batched = [], []
    for name in cases:
        threads = case_threads(name)
        if torch is not None:
            torch.set_num_threads(threads)
        threadpool_limits(threads, user_api="blas")
        cfg, tok, model = build_case(name, lines, args.train_steps)
        prompts = [x[:60] for x in lines[1::max(1, len(lines) // 50)]][:50]
        limits = ceilings(Generator(model, tok, config=cfg), threads)
        if args.batch:
            batched.append((name, model.vocab_size, threads,
                            *bench_batched(name, cfg, tok, model, prompts, args.tokens, args.batch, repeats),
                            *limits))
            if args.batch_only:
                continue
        banned = [tok.bos_id, tok.pad_id, tok.eos_id]
        gen = Generator(model, tok)
        W = effective(model)
        impls = {"molecule": lambda p, s: gen.generate(p, seed=s, max_gen_tokens=args.tokens,
                                                       min_gen_tokens=args.tokens, repetition_guard=0)}
        dnp = NumpyDecoder(cfg, {**W, "layers": [dict(L) for L in W["layers"]]})
        impls["numpy"] = lambda p, s: numpy_generate(dnp, tok, p, args.tokens, cfg, s, banned)
        if torch is not None:
            dt = TorchDecoder(cfg, {**W, "layers": [dict(L) for L in W["layers"]]})
            impls["torch-eager"] = lambda p, s: torch_generate(dt, tok, p, args.tokens, cfg, s, banned)
        for fn in impls.values():  # warm-up
            fn(prompts[0], 0)
        times = {k: [] for k in impls}
        for r in range(repeats):
            for impl, fn in impls.items():
                p = prompts[r % len(prompts)]
                t0 = time.perf_counter()
                fn(p, r)
                times[impl].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        worst = check(cfg, tok, model, prompts[0])
        for impl, sec in med.items():
            vs_t = f"{med['torch-eager'] / sec:8.1f}x" if "torch-eager" in med else "        -"
            print(f"{name:16} {model.vocab_size:5d} {threads:3d} {impl:12} {sec * 1e3:9.2f} {args.tokens / sec:9.0f} {vs_t} "
                  f"{med['numpy'] / sec:8.1f}x")
        print(f"# {name}: baselines match Model.logits to {worst:.1e} (relative) at every step; greedy continuations equal")
        mb, wall, fma = limits
        print(f"# {name}: {mb:.1f} MB of matrices a token; memory wall {wall:.0f} tok/s (read probe, {threads} "
              f"thread(s)): ours {args.tokens / med['molecule'] / wall:.0%} of it")
        summary.append((name, args.tokens / med["molecule"], med.get("torch-eager", float("nan")) / med["molecule"]))
    for name, tps, vs in summary:
        want = f">= {TARGET_TOK_S} tok/s -> {tps:.0f}; " if name.startswith("default") else ""
        print(f"# target {name}: {want}>= {TARGET_VS_TORCH}x torch eager -> {vs:.1f}x")
    if batched:
        print(f"\n# batched: {args.batch} sequences at once vs one (paired rounds, medians of {repeats}); "
              f"every batched sequence equals its single run")
        print("# x1 as a share of the memory wall (the matrices read once a token at the read probe's rate),"
              " the batch as a share of the FMA ceiling (2 FLOPs per matrix element for each position the model"
              " runs at the probed peak; rows/tok: positions run per generated token, the prompt's and each"
              " window refill's included)")
        print(f"{'case':16} {'V':>5} {'thr':>3} {'x1 tok/s':>10} {'x' + str(args.batch) + ' tok/s':>11} {'ratio':>7} "
              f"{'cpu ratio':>9} {'MB':>6} {'wall tok/s':>10} {'x1/wall':>7} {'rows/tok':>8} {'FMA tok/s':>10} "
              f"{'batch/FMA':>9}")
        for name, V, threads, one, many, ratio, cpu, rows, mb, wall, fma in batched:
            print(f"{name:16} {V:5d} {threads:3d} {one:10.0f} {many:11.0f} {ratio:6.2f}x {cpu:8.2f}x {mb:6.1f} "
                  f"{wall:10.0f} {one / wall:7.0%} {rows:8.2f} {fma / rows:10.0f} {many * rows / fma:9.0%}")
        for name, V, threads, one, many, ratio, cpu, rows, mb, wall, fma in batched:
            fma /= rows
            if name.startswith("default"):
                print(f"# target {name}: >= {TARGET_BATCHED_DEFAULT_TOK_S} tok/s in all -> {many:.0f} "
                      f"(the FMA ceiling: {fma:.0f})")
            else:
                print(f"# target {name}: >= {TARGET_BATCHED_LARGER_RATIO}x one sequence -> {ratio:.2f}x (that "
                      f"would be {TARGET_BATCHED_LARGER_RATIO * one:.0f} tok/s = "
                      f"{TARGET_BATCHED_LARGER_RATIO * one / fma:.0%} of the FMA ceiling)")


if __name__ == "__main__":
    main()
