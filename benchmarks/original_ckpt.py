"""Read the original program's JSON checkpoint, and make design.md §2 initial parameters.

Shared by the two reference baselines (`numpy_model.py`, `torch_model.py`). Needs only numpy
and the standard library; it does not import the molecule_gpt package, so the baselines keep
working (and keep cross-checking it) even where the extension is not built.

Parameter names are the design.md §2 names:
  wte (V, C)  wpe (block_size, C)  lm_head (V, C; absent when cfg["tie_embeddings"])
  l{i}.wq l{i}.wk l{i}.wv l{i}.wo (C, C)  l{i}.fc_g l{i}.fc_v (4C, C)  l{i}.fc2 (C, 4C)
  l{i}.h{h}.w_pattern (block_size, d)     for rrpram and hybrid heads
  l{i}.h{h}.alpha (1, 1)                  for hybrid heads (the mix is sigmoid(alpha))
  delta{k}.{base}.A (nout, r)  delta{k}.{base}.B (r, nin)  for every base but wte/wpe/alpha
Matrices map x to W @ x. The delta modules' scalar alphas are returned separately.
"""
from __future__ import annotations

import json

import numpy as np

# ---------------------------------------------------------------------------------------------
# Config helpers shared by the baselines


def head_type_of(cfg: dict, h: int) -> str:
    """Type of head h; heads beyond len(head_types) are content heads, as in the original."""
    types = list(cfg.get("head_types", ()))
    return types[h] if h < len(types) else "content"


def base_shapes(cfg: dict, vocab_size: int) -> dict[str, tuple[int, int]]:
    """Every base parameter name -> shape, in a fixed order (lm_head only when untied)."""
    C, H, T = int(cfg["n_embd"]), int(cfg["n_head"]), int(cfg["block_size"])
    d = C // H
    shapes: dict[str, tuple[int, int]] = {"wte": (vocab_size, C), "wpe": (T, C)}
    if not cfg.get("tie_embeddings", True):
        shapes["lm_head"] = (vocab_size, C)
    for i in range(int(cfg["n_layer"])):
        for w in ("wq", "wk", "wv", "wo"):
            shapes[f"l{i}.{w}"] = (C, C)
        shapes[f"l{i}.fc_g"] = (4 * C, C)
        shapes[f"l{i}.fc_v"] = (4 * C, C)
        shapes[f"l{i}.fc2"] = (C, 4 * C)
        for h in range(H):
            kind = head_type_of(cfg, h)
            if kind in ("rrpram", "hybrid"):
                shapes[f"l{i}.h{h}.w_pattern"] = (T, d)
            if kind == "hybrid":
                shapes[f"l{i}.h{h}.alpha"] = (1, 1)
    return shapes


def adapted_shapes(cfg: dict, vocab_size: int) -> dict[str, tuple[int, int]]:
    """Base names that carry a delta adapter in every module -> (nout, nin).

    Every base matrix except wte, wpe and the hybrid alphas; lm_head is included even when the
    embeddings are tied (its adapter then acts on the output use of wte only)."""
    C = int(cfg["n_embd"])
    out = {}
    for name, shape in base_shapes(cfg, vocab_size).items():
        if name in ("wte", "wpe", "lm_head") or name.endswith(".alpha"):
            continue
        out[name] = shape
    out["lm_head"] = (vocab_size, C)
    return out


# ---------------------------------------------------------------------------------------------
# Original JSON checkpoint


def load_original(path) -> tuple[dict, dict[str, np.ndarray], list[float]]:
    """Read the original program's JSON checkpoint.

    Returns (cfg, params, delta_alphas): cfg is the file's "cfg" dict (with "mlp_activation"
    set to "relu", the original's activation, when absent); params maps parameter names (design.md §2) to float64
    arrays; delta_alphas[k] is module k's scalar alpha (file field "alpha").

    Tied embeddings: the original unties wte/lm_head on load, but the file stores both; when
    cfg tie_embeddings is true we keep only "wte" (one array, one gradient) after checking
    that the stored lm_head equals it.
    """
    with open(path, encoding="utf-8") as f:
        ck = json.load(f)
    for field in ("cfg", "base", "alpha", "deltas"):
        if field not in ck:
            raise ValueError(f"{path}: not an original checkpoint, field {field!r} is missing")
    cfg = dict(ck["cfg"])
    cfg.setdefault("mlp_activation", "relu")
    tied = bool(cfg.get("tie_embeddings", True))

    params: dict[str, np.ndarray] = {}
    for name, rows in ck["base"].items():
        params[name] = np.array(rows, dtype=np.float64)
    if tied and "lm_head" in params:
        lm = params.pop("lm_head")
        if lm.shape != params["wte"].shape or not np.array_equal(lm, params["wte"]):
            raise ValueError(
                f"{path}: cfg says tie_embeddings but the stored lm_head differs from wte; "
                "load it with tie_embeddings set to false")
    expected = base_shapes(cfg, params["wte"].shape[0])
    for name, shape in expected.items():
        if name not in params:
            raise ValueError(f"{path}: base parameter {name!r} is missing")
        if params[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {params[name].shape}, expected {shape}")

    delta_alphas = [float(a) for a in ck["alpha"]]
    if len(delta_alphas) != len(ck["deltas"]):
        raise ValueError(f"{path}: {len(ck['deltas'])} delta modules but "
                         f"{len(delta_alphas)} alphas")
    for k, module in enumerate(ck["deltas"]):
        for base, ab in module.items():
            params[f"delta{k}.{base}.A"] = np.array(ab["A"], dtype=np.float64)
            params[f"delta{k}.{base}.B"] = np.array(ab["B"], dtype=np.float64)
    return cfg, params, delta_alphas


# ---------------------------------------------------------------------------------------------
# design.md §2 initialisation


def init_params(cfg: dict, vocab_size: int, n_delta: int, seed: int,
                dtype=np.float64) -> dict[str, np.ndarray]:
    """Fresh parameters with the init of design.md §2.

    Base matrices N(0, cfg init_std = 0.08), hybrid alphas cfg hybrid_alpha_init (0.5), delta
    factors A (nout, r) and B (r, nin) N(0, cfg delta_init_std = 0.02), r = cfg delta_rank, for
    n_delta modules. Module alphas are not parameters: pass e.g. [1.0] * n_delta to the model.
    Drawn from np.random.default_rng(seed) in the order of base_shapes, then module by module.
    """
    rng = np.random.default_rng(seed)
    std = float(cfg.get("init_std", 0.08))
    dstd = float(cfg.get("delta_init_std", 0.02))
    r = int(cfg.get("delta_rank", 8))
    params: dict[str, np.ndarray] = {}
    for name, shape in base_shapes(cfg, vocab_size).items():
        if name.endswith(".alpha"):
            params[name] = np.full(shape, float(cfg.get("hybrid_alpha_init", 0.5)), dtype=dtype)
        else:
            params[name] = rng.normal(0.0, std, size=shape).astype(dtype)
    for k in range(n_delta):
        for base, (nout, nin) in adapted_shapes(cfg, vocab_size).items():
            params[f"delta{k}.{base}.A"] = rng.normal(0.0, dstd, size=(nout, r)).astype(dtype)
            params[f"delta{k}.{base}.B"] = rng.normal(0.0, dstd, size=(r, nin)).astype(dtype)
    return params
