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

from .config import RETIRED_FIELDS, Config
from .errors import CheckpointError
from .model import Model, base_shapes, delta_group


def load_original_checkpoint(path: str | os.PathLike, dtype: str = "float64"):
    """Read the original implementation's JSON checkpoint; returns (model, tokenizer).
    (Organism.from_original adopts one as a living organism.)"""
    doc = read_original(path)
    return model_from_original(doc, dtype=dtype, source=str(path)), tokenizer_from_original(doc, source=str(path))


def read_original(path: str | os.PathLike) -> dict:
    """The original's JSON checkpoint as a document (checked field by field by
    model_from_original and tokenizer_from_original); CheckpointError if it cannot be read."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the original JSON checkpoint: {exc}") from exc
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: holds a JSON {type(doc).__name__}, not the original checkpoint's object")
    return doc


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
    expected = dict(base_shapes(config, vocab))
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
                params[f"{delta_group(k)}.{name}.{part}"][...] = arr
    if "init_embed_snapshot" in doc:
        snap = _array(doc["init_embed_snapshot"], "init_embed_snapshot", source)
        if snap.ndim != 2 or snap.shape[1] != config.n_embd or snap.shape[0] > vocab:
            raise CheckpointError(f"{source}: init_embed_snapshot has shape {snap.shape}, expected (<= {vocab}, {config.n_embd})")
        model.init_embed_snapshot[: snap.shape[0]] = snap
    model.refresh()  # the values were written in place
    return model


def tokenizer_from_original(doc: dict, source: str = "<checkpoint>", *, config: Config | None = None,
                            byte_fallback: bool = False):
    """The original's "tokenizer" object as an EvolvingTokenizer (same ids for known text).
    `config` gives its BPE thresholds (default Config()'s)."""
    from .tokenizer import EvolvingTokenizer

    tok = _require(doc, "tokenizer", dict, source)
    try:
        # byte_fallback=False: exactly the original's vocabulary, so the model's rows and the
        # tokenizer agree and the math is the original's; an unknown character raises
        # TokenizerError (never dropped). byte_fallback=True (adopting it for learning, see
        # Organism.from_original) appends the byte tokens: grow the model's rows to match
        return EvolvingTokenizer.from_original(tok, config, byte_fallback=byte_fallback)
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


# ---------------------------------------------------------------------------------------------
# Export back to the original's JSON format

# The original's "cfg" keys, in its order (tests/fixtures/anchor-small/checkpoint.json). The first
# three are its runtime paths, which Config does not carry: they are written with the
# original's defaults; fields Config no longer has (RETIRED_FIELDS) are written with the values
# they had. Config fields the original lacks (mlp_activation, init_std,
# delta_init_std) are not written; the importer fills them with Config's defaults.
_ORIGINAL_RUNTIME = {"corpus_path": "nonames.txt", "db_path": "memory.sqlite3", "ckpt_path": "molecule_ckpt.json"}
_ORIGINAL_CFG_KEYS = (
    "corpus_path", "db_path", "ckpt_path", "max_corpus_lines", "max_line_chars", "min_new_chars_to_train",
    "tie_embeddings", "n_layer", "n_embd", "n_head", "block_size", "warmup_steps", "micro_steps", "learning_rate",
    "beta1", "beta2", "eps_adam", "grad_clip", "freeze_base_after_warmup", "batch_size", "delta_rank",
    "max_delta_modules", "delta_grow_prob", "temperature", "top_k", "top_p", "min_p", "typical_p", "max_gen_tokens",
    "min_gen_tokens", "repetition_guard", "enable_bpe_after_chars", "bpe_num_merges", "bpe_retrain_every_chars",
    "train_tick_seconds", "head_types", "hybrid_alpha_init", "gamma_sparsity_threshold", "noise_drift_threshold",
    "gamma_min_magnitude", "entropy_low", "entropy_high", "entropy_temp_boost", "entropy_temp_focus",
    "corpus_gen_max_tokens", "qb_min_bytes", "qb_min_novelty", "qb_cooldown_seconds")


def save_original_checkpoint(path: str | os.PathLike, model: Model, tokenizer) -> None:
    """Write `model` and `tokenizer` in the original implementation's JSON checkpoint format
    (float64 nested lists), atomically. load_original_checkpoint(path) gives back a model with
    identical logits (in the model's dtype) and a tokenizer with the same ids.

    Only what the original can represent is exported: the relu MLP, and a tokenizer whose ids
    the model covers made of characters, the three specials and merged tokens. Byte-fallback
    tokens have no counterpart there: those beyond the model's rows (not yet grown into the
    model, as after importing an original checkpoint) are left out, any inside it raise.
    Adam state, trainable flags and the corpus/organism state are not part of that format.
    Raises CheckpointError naming the first thing that cannot be exported."""
    path = os.fspath(path)
    doc = original_document(model, tokenizer, source=path)
    text = json.dumps(doc)  # float64 repr: every value reads back exactly
    from .checkpoint import _atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()

    _atomic_write(path, write, keep_prev=False)


def original_document(model: Model, tokenizer, source: str = "<checkpoint>") -> dict:
    """The original's checkpoint object for (model, tokenizer); see save_original_checkpoint."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be a molecule_gpt.Model, got {type(model).__name__}")
    c = model.config
    if c.mlp_activation != "relu":
        raise CheckpointError(f"{source}: not exported: the original only has the relu MLP, this model uses "
                              f"mlp_activation={c.mlp_activation!r}")
    if tokenizer is None:
        raise CheckpointError(f"{source}: not exported: the original format needs the tokenizer (its tokens fix the "
                              f"vocabulary); pass the EvolvingTokenizer")
    tok = _original_tokenizer(tokenizer, model.vocab_size, source)
    values = {**RETIRED_FIELDS, **c.to_dict()}
    cfg = {key: _ORIGINAL_RUNTIME[key] if key in _ORIGINAL_RUNTIME else values[key] for key in _ORIGINAL_CFG_KEYS}
    with model.lock:  # one consistent snapshot
        params = {name: arr.astype(np.float64).tolist() for name, arr in model.params().items()}
        snapshot = model.init_embed_snapshot.astype(np.float64).tolist()
        alphas = [float(a) for a in model.delta_alphas]
    base, deltas = {}, [{} for _ in alphas]
    for name, value in params.items():
        if name.startswith("delta"):
            k, rest = name.split(".", 1)
            base_name, part = rest.rsplit(".", 1)
            deltas[int(k[5:])].setdefault(base_name, {})[part] = value
            continue
        base[name] = value
        if name == "wpe" and c.tie_embeddings:
            base["lm_head"] = params["wte"]  # the original stores the tied matrix twice
    return {"cfg": cfg, "tokenizer": tok, "base": base, "alpha": alphas, "init_embed_snapshot": snapshot,
            "deltas": deltas}


def _original_tokenizer(tokenizer, vocab_size: int, source: str) -> dict:
    """The original's "tokenizer" object: the first vocab_size tokens, which must be characters,
    then <PAD> <BOS> <EOS>, then merged tokens; tokens past vocab_size may only be byte-fallback
    tokens the model has not grown rows for."""
    d = tokenizer.to_dict()
    tokens, kinds = d["tokens"], d["token_kinds"]
    if len(tokens) < vocab_size:
        raise CheckpointError(f"{source}: not exported: the model has {vocab_size} vocabulary rows but the tokenizer only "
                              f"{len(tokens)} tokens")
    from .tokenizer import BYTE, CHAR, EOW, MERGED, SPECIAL

    for i in range(vocab_size, len(tokens)):
        if kinds[i] != BYTE:
            raise CheckpointError(f"{source}: not exported: token {i} ({tokens[i]!r}) has no row in the model yet; grow "
                                  f"the model to the tokenizer first (model.grow_vocab({len(tokens)}))")
    kinds = kinds[:vocab_size]
    for i, kind in enumerate(kinds):
        if kind == BYTE:
            raise CheckpointError(f"{source}: not exported: token {i} ({tokens[i]!r}) is a byte-fallback token, which the "
                                  f"original format cannot represent; an organism meant for export needs a tokenizer "
                                  f"built with byte_fallback=False")
    n_chars = kinds.find(SPECIAL)
    layout_ok = (n_chars >= 0 and kinds[:n_chars] == CHAR * n_chars and kinds[n_chars:n_chars + 3] == SPECIAL * 3
                 and kinds[n_chars + 3:] == MERGED * (vocab_size - n_chars - 3))
    if not layout_ok:
        raise CheckpointError(f"{source}: not exported: the original needs its characters first, then <PAD> <BOS> <EOS>, "
                              f"then merged tokens; this vocabulary is laid out {kinds!r}")
    for a, b, m in d["merges"]:
        if max(a, b, m) >= vocab_size:
            raise CheckpointError(f"{source}: not exported: merge {[a, b, m]} uses a token beyond the model's "
                                  f"{vocab_size} rows")
        if b != EOW and b < 0:
            raise CheckpointError(f"{source}: not exported: merge {[a, b, m]} is malformed")
    return {"tokens": tokens[:vocab_size], "bpe_enabled": bool(d["bpe_enabled"]), "merges": tokenizer.merge_strings(),
            "trained_chars": int(d["trained_chars"])}
