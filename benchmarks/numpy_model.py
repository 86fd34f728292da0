"""Plain-numpy reference of the design.md §2 model: forward, manual backward, clipped Adam.

This is the fair baseline of the training benchmarks and an independent cross-check of the
Cython core. It is NOT part of the package and does not import it: numpy only. A batch is
padded to the longest sequence (B, T) and everything is vectorised over sequences, positions
and heads with numpy matmul; padded positions carry zero loss weight and, attention being
causal and padding sitting at the end, they never influence a real position.

Dims legend: B sequences, T padded positions (<= block_size), C n_embd, H n_head, d = C/H head
dim, F = 4C MLP width, V vocabulary, P heads with a pattern (rrpram + hybrid), r delta rank,
N = B*T rows.

The math (design.md §2), confirmed against tests/fixtures/anchor-small/expected.json:
  x = wte[tok] + wpe[t]
  per layer: h = rmsnorm(x) (no gain, eps 1e-5 inside the root)
             q, k, v = Wq h, Wk h, Wv h                                  (all with deltas)
             content_h(t, s) = rope(q_h, t) . rope(k_h, s) / sqrt(d)
                 rope: interleaved pairs (2i, 2i+1) of the head slice rotated by
                 pos * 10000^(-2i/d), i = 0..d/2-1
             rrpram_h(t, s) = (W_pattern_h h_h(t))[s]  h_h = head slice of the normalised h
             hybrid: (1 - sigmoid(alpha)) content + sigmoid(alpha) rrpram
             causal softmax over s <= t, heads concatenated, x += Wo y
             x += fc2 (act(fc_g h2) * (fc_v h2)), h2 = rmsnorm(x), act relu (or silu)
  logits = lm_head rmsnorm(x)  (lm_head = wte when tied; its deltas apply in both cases)
  linear with deltas: W x + sum_k alpha_k A_k (B_k x)
"""
from __future__ import annotations

import math

import numpy as np

from original_ckpt import head_type_of

RMS_EPS = 1e-5
ROPE_BASE = 10000.0


# ---------------------------------------------------------------------------------------------
# Small ops (forward returns what backward needs)


def rmsnorm_forward(x):
    """y = x * (mean(x^2) + eps)^-1/2 over the last axis; returns y, rstd (..., 1)."""
    rstd = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + RMS_EPS)
    return x * rstd, rstd


def rmsnorm_backward(dy, x, rstd):
    """dx = rstd dy - x rstd^3 mean(dy * x)   (d rstd / dx_j = -rstd^3 x_j / C)."""
    return rstd * dy - x * (rstd ** 3) * np.mean(dy * x, axis=-1, keepdims=True)


def rope_tables(T, d, dtype):
    """cos, sin of pos * 10000^(-2i/d), shapes (T, d/2)."""
    inv = ROPE_BASE ** (-(2.0 * np.arange(d // 2)) / d)
    ang = np.arange(T)[:, None] * inv[None, :]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


def rope_forward(x, cos, sin):
    """Rotate interleaved pairs of x (..., T, d) by the angles of (T, d/2)."""
    xe, xo = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = xe * cos - xo * sin
    out[..., 1::2] = xe * sin + xo * cos
    return out


def rope_backward(dy, cos, sin):
    """The transpose of a rotation is the rotation by -angle."""
    de, do = dy[..., 0::2], dy[..., 1::2]
    dx = np.empty_like(dy)
    dx[..., 0::2] = de * cos + do * sin
    dx[..., 1::2] = -de * sin + do * cos
    return dx


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# ---------------------------------------------------------------------------------------------
# The model


class NumpyGPT:
    """design.md §2 model over a dict of named numpy parameters (see original_ckpt for the names).

    cfg: dict with n_layer, n_embd, n_head, block_size, head_types, tie_embeddings and
    optionally mlp_activation ("relu" default | "silu"), grad_clip, beta1, beta2, eps_adam.
    params: parameter names (design.md §2) -> arrays (copied to `dtype`); delta_alphas[k] scales module k.
    """

    def __init__(self, cfg: dict, params: dict, delta_alphas, dtype=np.float64):
        self.cfg = dict(cfg)
        self.dtype = np.dtype(dtype)
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

        self.params = {n: np.array(a, dtype=self.dtype, copy=True, order="C")
                       for n, a in params.items()}
        if self.tied:
            self.params.pop("lm_head", None)
        elif "lm_head" not in self.params:
            raise ValueError("tie_embeddings is false but params has no 'lm_head'")
        self.V = self.params["wte"].shape[0]

        # head kinds: content weight cw[h] and pattern heads pidx (rrpram + hybrid)
        self.kinds = [head_type_of(cfg, h) for h in range(self.H)]
        for kind in self.kinds:
            if kind not in ("content", "rrpram", "hybrid"):
                raise ValueError(f"unknown head type {kind!r}")
        self.pidx = np.array([h for h, k in enumerate(self.kinds) if k != "content"], dtype=int)
        self.cidx = np.array([h for h, k in enumerate(self.kinds) if k != "rrpram"], dtype=int)

        # delta adapters per base name: list of (k, A name, B name)
        self.adapters: dict[str, list] = {}
        for k in range(len(self.delta_alphas)):
            prefix = f"delta{k}."
            for name in self.params:
                if name.startswith(prefix) and name.endswith(".A"):
                    base = name[len(prefix):-2]
                    if prefix + base + ".B" not in self.params:
                        raise ValueError(f"{name} has no matching .B factor")
                    self.adapters.setdefault(base, []).append((k, name, prefix + base + ".B"))
        for name in self.params:
            if name.startswith("delta") and int(name[5:name.index(".")]) >= len(self.delta_alphas):
                raise ValueError(f"{name}: only {len(self.delta_alphas)} delta alphas given")
        pat = [f"l{i}.h{h}.w_pattern" for i in range(self.n_layer) for h in self.pidx]
        if len({tuple(k for k, _, _ in self.adapters.get(b, ())) for b in pat}) > 1:
            raise ValueError("every w_pattern needs an adapter in the same delta modules")
        self.cos, self.sin = rope_tables(self.block_size, self.d, self.dtype)

        # Adam state (one step counter: base and delta states advance together here)
        self.m = {n: np.zeros_like(a) for n, a in self.params.items()}
        self.v = {n: np.zeros_like(a) for n, a in self.params.items()}
        self.step = 0

    # -----------------------------------------------------------------------------------------
    # linear with deltas over rows: x (N, nin) -> (N, nout)

    def _weight(self, base):
        return self.params["wte" if base == "lm_head" and self.tied else base]

    def _lin(self, x, base):
        y = x @ self._weight(base).T
        zs = []
        for k, an, bn in self.adapters.get(base, ()):
            z = x @ self.params[bn].T                                   # (N, r)
            y += self.delta_alphas[k] * (z @ self.params[an].T)
            zs.append(z)
        return y, (x, zs)

    def _lin_back(self, dy, base, cache, grads):
        x, zs = cache
        wname = "wte" if base == "lm_head" and self.tied else base
        grads[wname] += dy.T @ x
        dx = dy @ self._weight(base)
        for (k, an, bn), z in zip(self.adapters.get(base, ()), zs):
            a = self.delta_alphas[k]
            grads[an] += a * (dy.T @ z)
            dz = a * (dy @ self.params[an])                             # (N, r)
            grads[bn] += dz.T @ x
            dx += dz @ self.params[bn]
        return dx

    # -----------------------------------------------------------------------------------------
    # forward

    def _prepare(self, batch_ids):
        if not batch_ids:
            raise ValueError("batch_ids is empty")
        ns = [min(self.block_size, len(s) - 1) for s in batch_ids]
        if min(ns) < 1:
            raise ValueError("every sequence needs at least 2 ids (one input, one target)")
        B, T = len(batch_ids), max(ns)
        inp = np.zeros((B, T), dtype=np.int64)
        tgt = np.zeros((B, T), dtype=np.int64)
        w = np.zeros((B, T), dtype=self.dtype)      # loss weight: 1 / (n_b * B) on real rows
        for b, (s, n) in enumerate(zip(batch_ids, ns)):
            arr = np.asarray(s[:n + 1], dtype=np.int64)
            inp[b, :n], tgt[b, :n] = arr[:n], arr[1:]
            w[b, :n] = 1.0 / (n * B)
        if inp.min() < 0 or max(inp.max(), tgt.max()) >= self.V:
            raise ValueError(f"token id out of range [0, {self.V})")
        return inp, tgt, w

    def _forward(self, inp):
        """inp (B, T) -> logits (N, V) and the caches of every layer."""
        P, c = self.params, self
        B, T = inp.shape
        C, H, d, N = c.C, c.H, c.d, B * T
        cos, sin = c.cos[:T], c.sin[:T]
        scale = 1.0 / math.sqrt(d)
        future = np.triu(np.ones((T, T), dtype=bool), k=1)              # s > t
        x = P["wte"][inp] + P["wpe"][:T][None]                          # (B, T, C)
        caches = []
        for i in range(c.n_layer):
            L = {}
            h, L["r1"] = rmsnorm_forward(x)
            L["x1"] = x
            hf = h.reshape(N, C)
            q, L["q"] = self._lin(hf, f"l{i}.wq")
            k, L["k"] = self._lin(hf, f"l{i}.wk")
            v, L["v"] = self._lin(hf, f"l{i}.wv")
            q = q.reshape(B, T, H, d).transpose(0, 2, 1, 3)             # (B, H, T, d)
            k = k.reshape(B, T, H, d).transpose(0, 2, 1, 3)
            v = v.reshape(B, T, H, d).transpose(0, 2, 1, 3)
            qr, kr = rope_forward(q, cos, sin), rope_forward(k, cos, sin)
            att = np.zeros((B, H, T, T), dtype=c.dtype)
            if len(c.cidx):
                sc = (qr[:, c.cidx] @ kr[:, c.cidx].transpose(0, 1, 3, 2)) * scale
                L["sc"] = sc                                            # (B, Hc, T, T)
                att[:, c.cidx] = sc
            if len(c.pidx):
                hh = h.reshape(B, T, H, d)[:, :, c.pidx].transpose(0, 2, 1, 3)  # (B, Pn, T, d)
                L["hh"] = hh
                sr, L["pz"] = self._pattern_forward(hh, i, T)           # (B, Pn, T, T)
                L["sr"] = sr
                mix = self._mix(i)                                      # (Pn,) rrpram weight
                for j, hd in enumerate(c.pidx):
                    if c.kinds[hd] == "rrpram":
                        att[:, hd] = sr[:, j]
                    else:
                        att[:, hd] = (1.0 - mix[j]) * att[:, hd] + mix[j] * sr[:, j]
            att[..., future] = -np.inf                                  # causal mask
            att -= att.max(axis=-1, keepdims=True)
            np.exp(att, out=att)
            att /= att.sum(axis=-1, keepdims=True)
            y = att @ v                                                 # (B, H, T, d)
            L.update(qr=qr, kr=kr, vh=v, p=att)
            yf = y.transpose(0, 2, 1, 3).reshape(N, C)
            o, L["o"] = self._lin(yf, f"l{i}.wo")
            x = x + o.reshape(B, T, C)
            h2, L["r2"] = rmsnorm_forward(x)
            L["x2"] = x
            h2f = h2.reshape(N, C)
            g, L["g"] = self._lin(h2f, f"l{i}.fc_g")
            u, L["u"] = self._lin(h2f, f"l{i}.fc_v")
            if c.act == "relu":
                a = np.maximum(g, 0.0)
            else:
                sg = _sigmoid(g)
                a = g * sg
                L["sg"] = sg
            L.update(gpre=g, a=a, uu=u)
            f, L["f2"] = self._lin(a * u, f"l{i}.fc2")
            x = x + f.reshape(B, T, C)
            caches.append(L)
        hfin, rf = rmsnorm_forward(x)
        logits, lmc = self._lin(hfin.reshape(N, C), "lm_head")          # (N, V)
        return logits, (x, rf, lmc, caches)

    def _mix(self, i):
        """rrpram weight of each pattern head of layer i: 1 (rrpram) or sigmoid(alpha)."""
        return np.array([1.0 if self.kinds[h] == "rrpram"
                         else _sigmoid(float(self.params[f"l{i}.h{h}.alpha"][0, 0]))
                         for h in self.pidx], dtype=self.dtype)

    def _pattern_stack(self, i, suffix):
        return np.stack([self.params[f"l{i}.h{h}.w_pattern" + suffix] for h in self.pidx])

    def _pattern_forward(self, hh, i, T):
        """sr[b, j, t, s] = (W_pattern_j h_j(b, t))[s] for s < T, with deltas."""
        W = self._pattern_stack(i, "")[:, :T]                           # (Pn, T, d)
        sr = hh @ W.transpose(0, 2, 1)                                  # (B, Pn, T, T)
        zs = []
        base0 = f"l{i}.h{self.pidx[0]}.w_pattern"
        for k, _, _ in self.adapters.get(base0, ()):
            A = np.stack([self.params[f"delta{k}.l{i}.h{h}.w_pattern.A"] for h in self.pidx])
            Bm = np.stack([self.params[f"delta{k}.l{i}.h{h}.w_pattern.B"] for h in self.pidx])
            z = hh @ Bm.transpose(0, 2, 1)                              # (B, Pn, T, r)
            sr += self.delta_alphas[k] * (z @ A[:, :T].transpose(0, 2, 1))
            zs.append((k, A, Bm, z))
        return sr, zs

    # -----------------------------------------------------------------------------------------
    # backward

    def _backward(self, inp, dlogits, fwd):
        P, c = self.params, self
        B, T = inp.shape
        C, H, d, N = c.C, c.H, c.d, B * T
        cos, sin = c.cos[:T], c.sin[:T]
        scale = 1.0 / math.sqrt(d)
        grads = {n: np.zeros_like(a) for n, a in P.items()}
        x, rf, lmc, caches = fwd
        dh = self._lin_back(dlogits, "lm_head", lmc, grads).reshape(B, T, C)
        dx = rmsnorm_backward(dh, x, rf)
        for i in reversed(range(c.n_layer)):
            L = caches[i]
            # ---- MLP: x += fc2 (act(g) * u)
            dm = self._lin_back(dx.reshape(N, C), f"l{i}.fc2", L["f2"], grads)
            g, a, u = L["gpre"], L["a"], L["uu"]
            du = dm * a
            if c.act == "relu":
                dg = dm * u * (g > 0)
            else:
                sg = L["sg"]
                dg = dm * u * (sg * (1.0 + g * (1.0 - sg)))
            dh2 = self._lin_back(dg, f"l{i}.fc_g", L["g"], grads)
            dh2 += self._lin_back(du, f"l{i}.fc_v", L["u"], grads)
            dx = dx + rmsnorm_backward(dh2.reshape(B, T, C), L["x2"], L["r2"])
            # ---- attention: x += Wo y
            dyf = self._lin_back(dx.reshape(N, C), f"l{i}.wo", L["o"], grads)
            dy = dyf.reshape(B, T, H, d).transpose(0, 2, 1, 3)          # (B, H, T, d)
            p, vh = L["p"], L["vh"]
            dv = p.transpose(0, 1, 3, 2) @ dy
            dp = dy @ vh.transpose(0, 1, 3, 2)
            datt = p * (dp - np.sum(dp * p, axis=-1, keepdims=True))    # masked entries: p = 0
            dhh_full = np.zeros((B, T, H, d), dtype=c.dtype)            # rrpram path into h
            dq = np.zeros_like(dy)
            dk = np.zeros_like(dy)
            dsc = datt[:, c.cidx].copy() if len(c.cidx) else None
            if len(c.pidx):
                mix = self._mix(i)
                dsr = datt[:, c.pidx] * mix[None, :, None, None]
                for j, hd in enumerate(c.pidx):
                    if c.kinds[hd] == "hybrid":
                        jc = int(np.where(c.cidx == hd)[0][0])
                        # d/dalpha of (1-a) sc + a sr = (sr - sc) a (1 - a)
                        # (masked entries have datt = 0: p is exactly 0 there)
                        diff = L["sr"][:, j] - L["sc"][:, jc]
                        grads[f"l{i}.h{hd}.alpha"][0, 0] += (
                            np.sum(datt[:, hd] * diff) * mix[j] * (1.0 - mix[j]))
                        dsc[:, jc] *= 1.0 - mix[j]
                dhh = self._pattern_backward(dsr, L["hh"], L["pz"], i, T, grads)
                dhh_full[:, :, c.pidx] = dhh.transpose(0, 2, 1, 3)
            if len(c.cidx):
                dsc *= scale
                qr, kr = L["qr"][:, c.cidx], L["kr"][:, c.cidx]
                dq[:, c.cidx] = rope_backward(dsc @ kr, cos, sin)
                dk[:, c.cidx] = rope_backward(dsc.transpose(0, 1, 3, 2) @ qr, cos, sin)
            flat = lambda t: t.transpose(0, 2, 1, 3).reshape(N, C)    # noqa: E731
            dh = self._lin_back(flat(dq), f"l{i}.wq", L["q"], grads)
            dh += self._lin_back(flat(dk), f"l{i}.wk", L["k"], grads)
            dh += self._lin_back(flat(dv), f"l{i}.wv", L["v"], grads)
            dh = dh.reshape(B, T, C) + dhh_full.reshape(B, T, C)
            dx = dx + rmsnorm_backward(dh, L["x1"], L["r1"])
        # ---- embeddings
        np.add.at(grads["wte"], inp.ravel(), dx.reshape(N, C))
        grads["wpe"][:T] += dx.sum(axis=0)
        return grads

    def _pattern_backward(self, dsr, hh, zs, i, T, grads):
        """dsr (B, Pn, T, T) -> d hh (B, Pn, T, d); accumulates W_pattern and delta grads."""
        W = self._pattern_stack(i, "")[:, :T]                           # (Pn, T, d)
        dsrT = dsr.transpose(0, 1, 3, 2)                                # (B, Pn, s, t)
        dW = (dsrT @ hh).sum(axis=0)                                    # (Pn, T, d)
        dhh = dsr @ W
        for j, hd in enumerate(self.pidx):
            grads[f"l{i}.h{hd}.w_pattern"][:T] += dW[j]
        for k, A, Bm, z in zs:
            a = self.delta_alphas[k]
            dA = a * (dsrT @ z).sum(axis=0)                             # (Pn, T, r)
            dz = a * (dsr @ A[:, :T])                                   # (B, Pn, T, r)
            dB = (dz.transpose(0, 1, 3, 2) @ hh).sum(axis=0)            # (Pn, r, d)
            dhh += dz @ Bm
            for j, hd in enumerate(self.pidx):
                grads[f"delta{k}.l{i}.h{hd}.w_pattern.A"][:T] += dA[j]
                grads[f"delta{k}.l{i}.h{hd}.w_pattern.B"] += dB[j]
        return dhh

    # -----------------------------------------------------------------------------------------
    # public API

    def _loss_from_logits(self, logits, tgt, w):
        z = logits - logits.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=-1))
        nll = lse - z[np.arange(z.shape[0]), tgt.ravel()]
        return float(np.sum(nll * w.ravel())), z, lse

    def loss(self, batch_ids) -> float:
        """Mean over sequences of the mean next-token cross-entropy (design.md §2)."""
        inp, tgt, w = self._prepare(batch_ids)
        logits, _ = self._forward(inp)
        return self._loss_from_logits(logits, tgt, w)[0]

    def sequence_losses(self, batch_ids) -> list[float]:
        """Loss of each sequence on its own (positions 0..n-1)."""
        inp, tgt, w = self._prepare(batch_ids)
        logits, _ = self._forward(inp)
        _, z, lse = self._loss_from_logits(logits, tgt, w)
        nll = (lse - z[np.arange(z.shape[0]), tgt.ravel()]).reshape(inp.shape)
        return [float(np.sum(nll[b] * w[b]) * len(batch_ids)) for b in range(len(batch_ids))]

    def loss_and_grads(self, batch_ids):
        """(loss, {name: dloss/dparam}); with tied embeddings 'wte' holds the summed gradient."""
        inp, tgt, w = self._prepare(batch_ids)
        logits, fwd = self._forward(inp)
        loss, z, lse = self._loss_from_logits(logits, tgt, w)
        dlogits = np.exp(z - lse[:, None])
        dlogits[np.arange(z.shape[0]), tgt.ravel()] -= 1.0
        dlogits *= w.reshape(-1, 1)
        return loss, self._backward(inp, dlogits, fwd)

    def logits(self, ids) -> np.ndarray:
        """Logits (T, V) at every position of one sequence of T <= block_size input ids."""
        T = len(ids)
        if not 1 <= T <= self.block_size:
            raise ValueError(f"logits() takes 1..block_size={self.block_size} ids, got {T}")
        inp = np.asarray(ids, dtype=np.int64)[None]
        if inp.min() < 0 or inp.max() >= self.V:
            raise ValueError(f"token id out of range [0, {self.V})")
        return self._forward(inp)[0]

    def train_step(self, batch_ids, lr: float, trainable=None) -> float:
        """Forward, backward, Adam with each gradient element clipped to +-grad_clip.

        Returns the loss before the update. trainable: optional names to update (default all)."""
        loss, grads = self.loss_and_grads(batch_ids)
        b1 = float(self.cfg.get("beta1", 0.9))
        b2 = float(self.cfg.get("beta2", 0.99))
        eps = float(self.cfg.get("eps_adam", 1e-8))
        clip = float(self.cfg.get("grad_clip", 1.0))
        self.step += 1
        c1, c2 = 1.0 - b1 ** self.step, 1.0 - b2 ** self.step
        for name in (self.params if trainable is None else trainable):
            g = np.clip(grads[name], -clip, clip)
            m, v = self.m[name], self.v[name]
            m *= b1
            m += (1.0 - b1) * g
            v *= b2
            v += (1.0 - b2) * (g * g)
            self.params[name] -= lr * (m / c1) / (np.sqrt(v / c2) + eps)
        return loss
