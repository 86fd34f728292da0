"""PyTorch eager reference of the design.md §2 model (autograd backward, clipped Adam).

The "what a user would write" baseline of the training benchmarks and a second, independent
cross-check (its backward is torch autograd, not a hand derivation). Not part of the package:
torch is never a dependency; importing this module raises ImportError when torch is absent.

Same constructor and methods as numpy_model.NumpyGPT (see there for the math and the dims
legend). A batch is padded to (B, T) with per-position loss weights 1 / (n_b * B), causal
attention masks the padding (it sits at the end of each row). Heads are batched: content
logits for all heads in one matmul, rrpram logits for the pattern heads in one matmul, the mix
(1 - sigmoid(alpha)) content + sigmoid(alpha) rrpram through per-head weight vectors.
Adam: torch.optim.Adam (betas cfg beta1/beta2, eps cfg eps_adam) after clamping every gradient
element to +-grad_clip, which is what the original's per-element clipping is.

fast=True is the benchmarks' peer at its fastest (no delta modules): q/k/v and gate/value weights
fused into one matrix each (one product instead of three or two), gradients clamped with
_foreach ops and Adam's fused CPU kernel (foreach where that is missing). compile=True also
runs the loss through torch.compile (inductor, default mode); the first call compiles.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from original_ckpt import head_type_of

RMS_EPS = 1e-5
ROPE_BASE = 10000.0


def rmsnorm(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def rope(x, cos, sin):
    """Rotate interleaved pairs (2i, 2i+1) of x (B, H, T, d) by pos * 10000^(-2i/d)."""
    xe, xo = x[..., 0::2], x[..., 1::2]
    return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2)


class TorchGPT:
    """design.md §2 model in PyTorch eager; params are numpy arrays (copied into torch tensors)."""

    def __init__(self, cfg: dict, params: dict, delta_alphas, dtype=np.float64, fast: bool = False,
                 compile: bool = False):
        self.cfg = dict(cfg)
        self.fused = bool(fast or compile)
        if self.fused and len(delta_alphas):
            raise ValueError("fast/compile peers carry no delta modules")
        self.tdtype = {np.dtype(np.float64): torch.float64,
                       np.dtype(np.float32): torch.float32}[np.dtype(dtype)]
        self.n_layer = int(cfg["n_layer"])
        self.C = int(cfg["n_embd"])
        self.H = int(cfg["n_head"])
        self.block_size = int(cfg["block_size"])
        if self.C % self.H or (self.C // self.H) % 2:
            raise ValueError("n_embd must be a multiple of n_head with an even head dim")
        self.d = self.C // self.H
        self.tied = bool(cfg.get("tie_embeddings", True))
        self.act = cfg.get("mlp_activation", "relu")
        if self.act not in ("relu", "silu"):
            raise ValueError(f"mlp_activation must be 'relu' or 'silu', not {self.act!r}")
        self.delta_alphas = [float(a) for a in delta_alphas]

        params = {n: a for n, a in params.items() if not (self.tied and n == "lm_head")}
        if self.fused:
            for i in range(self.n_layer):
                params[f"l{i}.wqkv"] = np.concatenate([params.pop(f"l{i}.{w}") for w in ("wq", "wk", "wv")])
                params[f"l{i}.fc_gv"] = np.concatenate([params.pop(f"l{i}.{w}") for w in ("fc_g", "fc_v")])
        self.params = {n: torch.tensor(np.asarray(a), dtype=self.tdtype).requires_grad_(True)
                       for n, a in params.items()}
        if not self.tied and "lm_head" not in self.params:
            raise ValueError("tie_embeddings is false but params has no 'lm_head'")
        self.V = self.params["wte"].shape[0]

        self.kinds = [head_type_of(cfg, h) for h in range(self.H)]
        for kind in self.kinds:
            if kind not in ("content", "rrpram", "hybrid"):
                raise ValueError(f"unknown head type {kind!r}")
        self.pidx = [h for h, k in enumerate(self.kinds) if k != "content"]
        self.pidx_t = torch.tensor(self.pidx, dtype=torch.long)
        self.adapters: dict[str, list] = {}
        for k in range(len(self.delta_alphas)):
            prefix = f"delta{k}."
            for name in self.params:
                if name.startswith(prefix) and name.endswith(".A"):
                    base = name[len(prefix):-2]
                    self.adapters.setdefault(base, []).append(
                        (self.delta_alphas[k], self.params[name], self.params[prefix + base + ".B"]))

        inv = ROPE_BASE ** (-(2.0 * np.arange(self.d // 2)) / self.d)
        ang = np.arange(self.block_size)[:, None] * inv[None, :]
        self.cos = torch.tensor(np.cos(ang), dtype=self.tdtype)          # (block_size, d/2)
        self.sin = torch.tensor(np.sin(ang), dtype=self.tdtype)

        adam = dict(lr=float(cfg.get("learning_rate", 0.01)),
                    betas=(float(cfg.get("beta1", 0.9)), float(cfg.get("beta2", 0.99))),
                    eps=float(cfg.get("eps_adam", 1e-8)))
        if self.fused:
            try:
                self.opt = torch.optim.Adam(list(self.params.values()), fused=True, **adam)
            except (RuntimeError, TypeError):
                self.opt = torch.optim.Adam(list(self.params.values()), foreach=True, **adam)
        else:
            self.opt = torch.optim.Adam(list(self.params.values()), **adam)
        self.clip = float(cfg.get("grad_clip", 1.0))
        self.loss_fn = torch.compile(self._loss_tensors) if compile else self._loss_tensors

    # -----------------------------------------------------------------------------------------

    def _lin(self, x, base):
        """W x + sum_k alpha_k A_k (B_k x) over the last axis of x."""
        W = self.params["wte" if base == "lm_head" and self.tied else base]
        y = x @ W.T
        for a, A, B in self.adapters.get(base, ()):
            y = y + a * ((x @ B.T) @ A.T)
        return y

    def _prepare(self, batch_ids):
        if not batch_ids:
            raise ValueError("batch_ids is empty")
        ns = [min(self.block_size, len(s) - 1) for s in batch_ids]
        if min(ns) < 1:
            raise ValueError("every sequence needs at least 2 ids (one input, one target)")
        B, T = len(batch_ids), max(ns)
        inp = np.zeros((B, T), dtype=np.int64)
        tgt = np.zeros((B, T), dtype=np.int64)
        w = np.zeros((B, T))
        for b, (s, n) in enumerate(zip(batch_ids, ns)):
            arr = np.asarray(s[:n + 1], dtype=np.int64)
            inp[b, :n], tgt[b, :n] = arr[:n], arr[1:]
            w[b, :n] = 1.0 / (n * B)
        return (torch.from_numpy(inp), torch.from_numpy(tgt),
                torch.tensor(w, dtype=self.tdtype))

    def _forward(self, inp):
        """inp (B, T) long -> logits (B, T, V)."""
        P = self.params
        B, T = inp.shape
        C, H, d = self.C, self.H, self.d
        cos, sin = self.cos[:T], self.sin[:T]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        x = P["wte"][inp] + P["wpe"][:T]                                    # (B, T, C)
        for i in range(self.n_layer):
            h = rmsnorm(x)
            if self.fused:
                q, k, v = (h @ P[f"l{i}.wqkv"].T).split(C, dim=-1)
            else:
                q, k, v = self._lin(h, f"l{i}.wq"), self._lin(h, f"l{i}.wk"), self._lin(h, f"l{i}.wv")
            q = q.reshape(B, T, H, d).transpose(1, 2)                       # (B, H, T, d)
            k = k.reshape(B, T, H, d).transpose(1, 2)
            v = v.reshape(B, T, H, d).transpose(1, 2)
            att = (rope(q, cos, sin) @ rope(k, cos, sin).transpose(-1, -2)) / math.sqrt(d)
            if self.pidx:
                # per-head weights of the content and rrpram logits
                one = torch.ones((), dtype=self.tdtype)
                mix = [one if self.kinds[hd] == "rrpram"
                       else torch.sigmoid(P[f"l{i}.h{hd}.alpha"][0, 0]) for hd in self.pidx]
                rw = torch.stack(mix)                                       # (Pn,)
                cw = torch.ones(H, dtype=self.tdtype).index_put(
                    (self.pidx_t,), 1.0 - rw)                               # (H,)
                hh = h.view(B, T, H, d)[:, :, self.pidx].transpose(1, 2)    # (B, Pn, T, d)
                Wp = torch.stack([P[f"l{i}.h{hd}.w_pattern"] for hd in self.pidx])[:, :T]
                sr = hh @ Wp.transpose(1, 2)                                # (B, Pn, T, T)
                for k_ in range(len(self.delta_alphas)):
                    names = [f"delta{k_}.l{i}.h{hd}.w_pattern" for hd in self.pidx]
                    if names[0] + ".A" not in P:
                        continue
                    A = torch.stack([P[n + ".A"] for n in names])[:, :T]    # (Pn, T, r)
                    Bm = torch.stack([P[n + ".B"] for n in names])          # (Pn, r, d)
                    sr = sr + self.delta_alphas[k_] * ((hh @ Bm.transpose(1, 2))
                                                       @ A.transpose(1, 2))
                att = (att * cw.view(1, H, 1, 1)).index_add(
                    1, self.pidx_t, sr * rw.view(1, -1, 1, 1))
            att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            y = (att @ v).transpose(1, 2).reshape(B, T, C)
            x = x + self._lin(y, f"l{i}.wo")
            h2 = rmsnorm(x)
            if self.fused:
                g, val = (h2 @ P[f"l{i}.fc_gv"].T).chunk(2, dim=-1)
            else:
                g, val = self._lin(h2, f"l{i}.fc_g"), self._lin(h2, f"l{i}.fc_v")
            g = F.relu(g) if self.act == "relu" else F.silu(g)
            x = x + self._lin(g * val, f"l{i}.fc2")
        return self._lin(rmsnorm(x), "lm_head")

    def _loss_tensors(self, inp, tgt, w):
        logits = self._forward(inp)
        nll = F.cross_entropy(logits.reshape(-1, self.V), tgt.reshape(-1), reduction="none")
        return (nll * w.reshape(-1)).sum()

    def _loss(self, batch_ids):
        return self.loss_fn(*self._prepare(batch_ids))

    # -----------------------------------------------------------------------------------------
    # public API (same as NumpyGPT)

    def loss(self, batch_ids) -> float:
        with torch.no_grad():
            return float(self._loss(batch_ids))

    def loss_and_grads(self, batch_ids):
        for p in self.params.values():
            p.grad = None
        loss = self._loss(batch_ids)
        loss.backward()
        return float(loss.detach()), {n: p.grad.detach().numpy().copy()
                                      for n, p in self.params.items()}

    def logits(self, ids) -> np.ndarray:
        T = len(ids)
        if not 1 <= T <= self.block_size:
            raise ValueError(f"logits() takes 1..block_size={self.block_size} ids, got {T}")
        with torch.no_grad():
            out = self._forward(torch.tensor([list(ids)], dtype=torch.long))
        return out[0].numpy()

    def numpy_params(self) -> dict:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}

    def train_step(self, batch_ids, lr: float) -> float:
        """Forward, autograd backward, clamp each element to +-grad_clip, Adam step."""
        self.opt.zero_grad(set_to_none=True)
        loss = self._loss(batch_ids)
        loss.backward()
        grads = [p.grad for p in self.params.values() if p.grad is not None]
        if self.fused:
            torch._foreach_clamp_min_(grads, -self.clip)
            torch._foreach_clamp_max_(grads, self.clip)
        else:
            for g in grads:
                g.clamp_(-self.clip, self.clip)
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return float(loss.detach())
