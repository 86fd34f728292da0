"""The organism's status: one JSON-able document, produced here and only here, for the chat's
`/status`, the server's `GET /v1/organisms/{name}/status` and the web page.

    doc = status_document(org, memory)     # a dict (schema below)
    print(status_text(doc))                # the terminal's rendering of the same document

Schema (every key always present; numbers that do not exist yet are None):

    steps, warmup_steps, warmed_up        optimizer steps in all, of them in the warmup
    bursts         {"total", "accepted", "rolled_back"}
    loss           last training loss (nats per token)
    val_loss, best_val_loss, heard_val_loss   held-out loss (nats per character): birth text, its
                   best, text heard lately
    vocab_size, bpe, parameters, model_alpha
    tokenizer_growth {"declined_in_a_row", "next_trial_chars"}  growth trials declined since the
                   last growth and the corpus size (characters) at which the next is tried
                   (None: on the tokenizer's own schedule)
    delta_modules  [{"index", "state", "alpha", "bursts", "steps"}]
    corpus         {"lines", "chars", "held_out_lines", "heard_held_out_lines", "quarantine_lines"}
    next_burst     what the next background burst waits for, in words
    trainer        {"running", "tokens_per_second", "error"}
    memory         {"messages", "snapshots", "retrieval"} or None without a memory
    decoding       {"steps", "tokens", "largest"}  batched forwards of the decode loop that
                   serves concurrent requests, the tokens they sampled, the most sequences in one
    decode_weights {"precision", "heldout_change", "measured_at_step"}  Config.decode_precision
                   and what it cost held-out loss (a fraction) when last measured
                   (Organism.decode_precision_report), at which step
    history        {"val_loss": [[step, nats/char], ...]  held-out loss on the birth text over
                                                          time (warmup evaluations, then the
                                                          value each burst left)
                    "bursts": [{"step", "time", "accepted", "reason", "loss_before",
                                "loss_after"}, ...]        the newest HISTORY_BURSTS bursts}

`history` comes from the organism's in-memory telemetry (`Organism.telemetry`), after the
`earlier` records a caller passes (e.g. read back from a home's telemetry.jsonl at start).
"""
from __future__ import annotations

import math
from typing import Iterable

__all__ = ["status_document", "status_text", "history_records", "HISTORY_POINTS", "HISTORY_BURSTS"]

HISTORY_POINTS = 200  # held-out loss points kept in history.val_loss (the newest)
HISTORY_BURSTS = 20  # bursts kept in history.bursts (the newest)


def history_records(records: Iterable[dict]) -> list[dict]:
    """The telemetry records the history is made of (warmup evaluations and burst ends), the
    newest HISTORY_POINTS of them: what a server keeps of a home's telemetry.jsonl."""
    kept = [r for r in records if isinstance(r, dict) and _is_history(r)]
    return kept[-HISTORY_POINTS:]


def _is_history(r: dict) -> bool:
    return (r.get("phase") == "warmup_eval" and r.get("val_loss") is not None) or r.get("phase") == "burst_end"


def _finite(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _history(records: list[dict]) -> dict:
    val, bursts = [], []
    for r in records:
        step = r.get("step")
        if r.get("phase") == "warmup_eval":
            val.append([step, _finite(r.get("val_loss"))])
        else:
            # a rolled-back burst restored the weights: the loss it leaves is the one before it
            after = r.get("loss_after") if r.get("accepted") else r.get("loss_before")
            if after is not None:
                val.append([step, _finite(after)])
            bursts.append({"step": step, "time": r.get("time"), "accepted": bool(r.get("accepted")),
                           "reason": r.get("reason"), "loss_before": _finite(r.get("loss_before")),
                           "loss_after": _finite(r.get("loss_after"))})
    return {"val_loss": val[-HISTORY_POINTS:], "bursts": bursts[-HISTORY_BURSTS:]}


def status_document(org, memory=None, earlier: Iterable[dict] = ()) -> dict:
    """The status of `org` now (see the module docstring for the schema). `memory`: the
    molecule_gpt.Memory to count (default: the organism's own, if any); `earlier`: telemetry
    records from before this process (history only)."""
    s = org.stats()
    memory = org.memory if memory is None else memory
    mem = None
    if memory is not None:
        c = memory.counts()
        mem = {"messages": c["messages"], "snapshots": c["snapshots"], "retrieval": memory.retrieval_mode}
    records = [r for r in list(earlier) + list(org.telemetry) if _is_history(r)]
    dp = s["decode_precision"]
    report = dp["report"] or {}
    return {
        "steps": s["steps"], "warmup_steps": s["warmup_steps"], "warmed_up": s["warmed_up"],
        "bursts": {"total": s["bursts"], "accepted": s["accepted_bursts"], "rolled_back": s["rolled_back_bursts"]},
        "loss": _finite(s["loss"]), "val_loss": _finite(s["val_loss"]), "best_val_loss": _finite(s["best_val_loss"]),
        "heard_val_loss": _finite(s["heard_val_loss"]),
        "vocab_size": s["vocab_size"], "bpe": s["bpe"], "parameters": s["parameters"],
        "model_alpha": s["model_alpha"],
        "tokenizer_growth": dict(s["tokenizer_growth"]),
        "delta_modules": [{k: m[k] for k in ("index", "state", "alpha", "bursts", "steps")}
                          for m in s["delta_modules"]],
        "corpus": dict(s["corpus"]),
        "next_burst": s["quantum_buffer"]["next_burst"],
        "trainer": {"running": s["background"]["running"], "tokens_per_second": _finite(s["tokens_per_second"]),
                    "error": s["background"]["error"]},
        "memory": mem,
        "decoding": dict(s["decoding"]),
        "decode_weights": {"precision": dp["weights"], "heldout_change": _finite(report.get("change")),
                           "measured_at_step": report.get("step")},
        "history": _history(records),
    }


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _growth(doc: dict) -> str:
    g = doc["tokenizer_growth"]
    if not g["declined_in_a_row"]:
        return ""
    return (f"; growth declined {g['declined_in_a_row']} time(s) in a row (it raised old-text loss or found nothing to merge), "
            f"next try at {g['next_trial_chars']:,} corpus chars")


def status_text(doc: dict) -> str:
    """The terminal's `/status`: the document as aligned lines."""
    mods = doc["delta_modules"]
    states: dict[str, int] = {}
    for m in mods:
        states[m["state"]] = states.get(m["state"], 0) + 1
    b, corpus, trainer = doc["bursts"], doc["corpus"], doc["trainer"]
    lines = [
        f"steps          {doc['steps']} ({doc['warmup_steps']} warmup{'' if doc['warmed_up'] else ', unfinished'}), "
        f"bursts {b['total']}: {b['accepted']} accepted, {b['rolled_back']} rolled back",
        f"loss           {_fmt(doc['loss'])} per token in training; held-out {_fmt(doc['val_loss'])} nats/char on "
        f"the birth text, {_fmt(doc['heard_val_loss'])} on text heard lately",
        f"vocabulary     {doc['vocab_size']} tokens ({'BPE' if doc['bpe'] else 'characters'})" + _growth(doc),
        f"parameters     {doc['parameters']:,}",
        f"delta modules  {len(mods)}" + (f" ({', '.join(f'{n} {k}' for k, n in sorted(states.items()))})" if mods else ""),
        f"corpus         {corpus['lines']} lines, {corpus['chars']:,} chars; "
        f"{corpus['held_out_lines']} + {corpus['heard_held_out_lines']} held out; "
        f"{corpus['quarantine_lines']} quarantined (rolled back)",
        f"next burst     {doc['next_burst']}",
        f"model weight   {doc['model_alpha']:.2f} (the rest is the corpus field)",
        f"trainer        {'running' if trainer['running'] else 'idle'}"
        + (f", {trainer['tokens_per_second']:,.0f} tok/s" if trainer["tokens_per_second"] else ""),
    ]
    if trainer["error"]:
        lines.append(f"trainer error  {trainer['error']}")
    d = doc["decoding"]
    if d["steps"]:
        lines.append(f"decoding       {d['tokens']:,} tokens in {d['steps']:,} batched steps "
                     f"(mean batch {d['tokens'] / d['steps']:.1f}, largest {d['largest']})")
    w = doc["decode_weights"]
    if w["precision"] != "model":
        cost = "not measured yet" if w["measured_at_step"] is None else \
            f"held-out loss {w['heldout_change']:+.3%} against the model's own weights at step {w['measured_at_step']}"
        lines.append(f"decode weights {w['precision']} ({cost})")
    if doc["memory"] is not None:
        m = doc["memory"]
        lines.append(f"memory         {m['messages']} messages, {m['snapshots']} snapshots ({m['retrieval']})")
    return "\n".join(lines)
