"""Interchange with the original single-file implementation's JSON checkpoint.

The original writes one JSON object: "cfg" (its config), "tokenizer" (tokens, bpe_enabled,
merges, trained_chars), "base" (parameter name -> nested lists), "alpha" (one float per delta
module), "init_embed_snapshot" (wte rows at birth) and "deltas" (one object per module:
base name -> {"A": ..., "B": ...}). Differences handled here:
- the original unties wte/lm_head on load; we tie them again when the file's two matrices are
  identical, and import untied (with a warning) when its training has already split them, so
  the imported math is the original's either way;
- its cfg may list fewer head types than heads: the rest are content heads there, so we pad.
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np

from .config import Config
from .errors import CheckpointError
from .model import Model


def load_original_checkpoint(path: str | os.PathLike, dtype: str = "float64"):
    """Read the original implementation's JSON checkpoint; returns (model, tokenizer)."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the original JSON checkpoint: {exc}") from exc
    return model_from_original(doc, dtype=dtype, source=str(path)), tokenizer_from_original(doc, source=str(path))


def _require(doc: dict, key: str, kind, source: str):
    if not isinstance(doc, dict) or key not in doc:
        raise CheckpointError(f"{source}: missing field {key!r} (not an original molecule checkpoint?)")
    if not isinstance(doc[key], kind):
        raise CheckpointError(f"{source}: field {key!r} should be {kind.__name__}, got {type(doc[key]).__name__}")
    return doc[key]


def config_from_original(cfg: dict[str, Any], *, tie: bool | None = None) -> Config:
    """Map the original "cfg" object onto Config (unknown runtime keys such as paths dropped)."""
    cfg = dict(cfg)
    n_head = int(cfg.get("n_head", Config.n_head))
    types = list(cfg.get("head_types", []))[:n_head]
    cfg["head_types"] = types + ["content"] * (n_head - len(types))
    cfg.setdefault("mlp_activation", "relu")
    if tie is not None:
        cfg["tie_embeddings"] = tie
    return Config.from_dict(cfg, strict=False)


def model_from_original(doc: dict, dtype: str = "float64", source: str = "<checkpoint>") -> Model:
    cfg = _require(doc, "cfg", dict, source)
    tok = _require(doc, "tokenizer", dict, source)
    base = _require(doc, "base", dict, source)
    alphas = _require(doc, "alpha", list, source)
    deltas = _require(doc, "deltas", list, source)
    if len(alphas) != len(deltas):
        raise CheckpointError(f"{source}: {len(alphas)} delta alphas for {len(deltas)} delta modules")
    vocab = len(_require(tok, "tokens", list, source))
    arrays = {name: _array(value, f"base.{name}", source) for name, value in base.items()}
    tie = bool(cfg.get("tie_embeddings", True))
    if tie and "lm_head" in arrays and "wte" in arrays and not np.array_equal(arrays["lm_head"], arrays["wte"]):
        warnings.warn(f"{source}: tie_embeddings is set but wte and lm_head differ (the original unties them "
                      "on load); importing them untied to keep the original's math", stacklevel=3)
        tie = False
    try:
        config = config_from_original(cfg, tie=tie)
    except ValueError as exc:
        raise CheckpointError(f"{source}: its cfg is not a valid config: {exc}") from exc
    model = Model(config, vocab, dtype=dtype)
    for _ in deltas:
        model.add_delta_module()
    for k, alpha in enumerate(alphas):
        model.set_delta_alpha(k, float(alpha))
    params = model.params()
    expected = dict(model.groups["base"].shapes)
    if tie:
        expected["lm_head"] = expected["wte"]
    for name, shape in expected.items():
        if name not in arrays:
            raise CheckpointError(f"{source}: base parameter {name!r} is missing")
        if arrays[name].shape != tuple(shape):
            raise CheckpointError(f"{source}: base.{name} has shape {arrays[name].shape}, the config implies {tuple(shape)}")
        if not (tie and name == "lm_head"):
            params[name][...] = arrays[name]
    extra = sorted(set(arrays) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected base parameter(s) {', '.join(extra)}")
    adapted = model.adapted_shapes()
    for k, module in enumerate(deltas):
        if not isinstance(module, dict) or set(module) != set(adapted):
            got = sorted(module) if isinstance(module, dict) else type(module).__name__
            raise CheckpointError(f"{source}: delta module {k} adapts {got}, expected {sorted(adapted)}")
        for name, (nout, nin) in adapted.items():
            for part, shape in (("A", (nout, config.delta_rank)), ("B", (config.delta_rank, nin))):
                arr = _array(_require(module[name], part, list, source), f"deltas[{k}].{name}.{part}", source)
                if arr.shape != shape:
                    raise CheckpointError(f"{source}: deltas[{k}].{name}.{part} has shape {arr.shape}, expected {shape}")
                params[f"delta{k}.{name}.{part}"][...] = arr
    if "init_embed_snapshot" in doc:
        snap = _array(doc["init_embed_snapshot"], "init_embed_snapshot", source)
        if snap.ndim != 2 or snap.shape[1] != config.n_embd or snap.shape[0] > vocab:
            raise CheckpointError(f"{source}: init_embed_snapshot has shape {snap.shape}, expected (<= {vocab}, {config.n_embd})")
        model.init_embed_snapshot[: snap.shape[0]] = snap
    return model


def tokenizer_from_original(doc: dict, source: str = "<checkpoint>"):
    """The original's "tokenizer" object as an EvolvingTokenizer (same ids for known text)."""
    from .tokenizer import EvolvingTokenizer

    tok = _require(doc, "tokenizer", dict, source)
    try:
        return EvolvingTokenizer.from_original(tok)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{source}: its tokenizer cannot be imported: {exc}") from exc


def _array(value, what: str, source: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{source}: {what} is not a numeric matrix ({exc})") from None
    if arr.ndim != 2:
        raise CheckpointError(f"{source}: {what} should be a matrix, got {arr.ndim} dimension(s)")
    if not np.all(np.isfinite(arr)):
        raise CheckpointError(f"{source}: {what} holds non-finite values")
    return arr
