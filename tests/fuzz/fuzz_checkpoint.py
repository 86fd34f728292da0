"""Fuzz target: the checkpoint loader (molecule_gpt.load_checkpoint and Organism.load).

What it is: `fuzz_one(data)` takes one of three intact files (an organism with BPE and two
delta modules, an untied float64 organism, a model-only file without optimizer state), damages
it in a way `data` chooses, writes it and loads it. Damage comes in layers, so it reaches every
check of docs/checkpoint-format.md ("Reading"): raw bytes (flips, truncation, appended bytes),
the framing (header length, padding, text spliced into the header), the tensor table (dtype,
shape, data_offsets), consistent tensor surgery (a tensor dropped, added, renamed, reshaped,
retyped, filled with NaN, the buffer reordered), the __metadata__ and checksums entries, the
metadata document, the organism state inside it and the tokenizer inside it. Checksums are
re-signed after most mutations, as tests/test_checkpoint.py does with edit_document: a
mutation must reach the checks behind the checksums, or it only tests sha256.

The contract checked: the load succeeds, or raises CheckpointError whose message names the
file; Organism.load may also raise OrganismError (exactly that class) for the three cases its
code documents: a file with no organism state, an unsupported organism state version, no
tokenizer. Any other exception is a failure; so is a crash or a hang (see fuzz_common).

What it is not: a check of what a successful load holds (tests/test_checkpoint.py pins exact
round trips), nor of files on a failing disk.

Run: `python tests/fuzz/fuzz_checkpoint.py` (atheris when installed, see README.md).
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import warnings

import numpy as np

import fuzz_common
from fuzz_common import Choices, FuzzFailure, mutate_json

with fuzz_common.instrumented():
    import molecule_gpt as mg
    from molecule_gpt.errors import CheckpointError, OrganismError

# OrganismError is acceptable only with these messages (organism.py raises it on purpose there)
ORGANISM_ERRORS = ("holds a model but no organism state", "organism state version", "holds no tokenizer")
LOADERS = ("load_checkpoint", "Organism.load")


# ---------------------------------------------------------------------------------------------
# the intact files (built once per process, a fraction of a second)

_BASES: dict[str, bytes] = {}
_DIR: list[str] = []


def _config(**kw) -> mg.Config:
    base = dict(n_layer=1, n_embd=16, n_head=2, head_types=("content", "hybrid"), block_size=16, delta_rank=2,
                warmup_steps=6, eval_interval=3, micro_steps=2, batch_size=2, train_threads=1, delta_grow_prob=1.0,
                max_delta_modules=2, enable_bpe_after_chars=100, bpe_num_merges=12, val_max_sequences=8,
                lr_warmup_steps=2, qb_cooldown_seconds=0.0)
    base.update(kw)
    return mg.Config(**base)


def workdir() -> str:
    if not _DIR:
        _DIR.append(tempfile.mkdtemp(prefix="fuzz-checkpoint-"))
        atexit.register(shutil.rmtree, _DIR[0], True)
    return _DIR[0]


def bases() -> dict[str, bytes]:
    """name -> the bytes of an intact checkpoint."""
    if _BASES:
        return _BASES
    lines = mg.seed_corpus_lines()[:80]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        org = mg.Organism(_config(), lines, seed=1)  # BPE at birth (enable_bpe_after_chars=100)
        org.warmup()
        org.observe("hello there, how are you?", speaker="H")
        org.train_burst()  # a burst, and a delta module grown after it
        untied = mg.Organism(_config(tie_embeddings=False, enable_bpe_after_chars=10 ** 6, delta_grow_prob=0.0,
                                     head_types=("rrpram", "hybrid")), lines[:30], seed=2, dtype="float64")
        untied.warmup(3)
    for name, obj in (("organism", org), ("untied", untied)):
        path = os.path.join(workdir(), name + ".ckpt")
        obj.save(path)
        _BASES[name] = open(path, "rb").read()
        obj.close()
    path = os.path.join(workdir(), "model.ckpt")
    mg.save_checkpoint(path, org.model, org.tokenizer, state={"step": 1}, optimizer_state=False)
    _BASES["model"] = open(path, "rb").read()
    return _BASES


# ---------------------------------------------------------------------------------------------
# the file as parts: header dict, tensors, and back (the layout of docs/checkpoint-format.md)


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(header: dict, data: bytes, *, ensure_ascii: bool = True, pad: bytes = b" ") -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")
    text += pad * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def tensors_of(header: dict, data: bytes) -> dict[str, list]:
    """name -> [dtype, shape, bytes] of an intact header, in buffer order."""
    items = sorted(((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0])
    return {k: [v["dtype"], list(v["shape"]), data[v["data_offsets"][0]:v["data_offsets"][1]]] for k, v in items}


def pack(meta: dict, tensors: dict[str, list]) -> tuple[dict, bytes]:
    """A header and buffer holding `tensors` in their dict order, checksums re-signed."""
    header, chunks, offset = {"__metadata__": meta}, [], 0
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    data = b"".join(chunks)
    resign(header, data)
    return header, data


def resign(header: dict, data: bytes, document: bool = True, tensors: bool = True) -> None:
    """Recompute the checksums the format defines (document, and every tensor whose span is a
    valid range of the buffer), where the header's structure still allows it."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return
    try:
        sums = json.loads(meta["checksums"])
        if document and isinstance(meta.get("document"), str):
            sums["document"] = hashlib.sha256(meta["document"].encode("utf-8", "surrogatepass")).hexdigest()
        if tensors:
            table = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                try:
                    b, e = entry["data_offsets"]
                    ok = type(b) is int and type(e) is int and 0 <= b <= e <= len(data)
                except (TypeError, KeyError, ValueError):
                    ok = False
                table[name] = hashlib.sha256(data[b:e] if ok else b"").hexdigest()
            sums["tensors"] = table
        meta["checksums"] = json.dumps(sums, separators=(",", ":"))
    except (KeyError, TypeError, ValueError, AttributeError):
        return  # the checksums entry itself was the mutation: leave it as it is


# ---------------------------------------------------------------------------------------------
# mutations


def mutate_raw(raw: bytes, ch: Choices) -> bytes:
    """Bytes anywhere: flips, a truncation, an insertion or deletion, appended bytes."""
    buf = bytearray(raw)
    for _ in range(1 + ch.below(4)):
        op = ch.below(6)
        at = ch.below(len(buf) + 1) if ch.chance(50) else ch.below(min(len(buf), 4096) + 1)  # the header often
        if op == 0 and buf:
            buf[at % len(buf)] ^= 1 << ch.below(8)
        elif op == 1:
            del buf[at:]
        elif op == 2:
            buf[at:at] = ch.take(1 + ch.below(16))
        elif op == 3:
            del buf[at:at + 1 + ch.below(64)]
        elif op == 4:
            buf += ch.take(1 + ch.below(64)) or b"\0"
        elif buf:
            buf[at % len(buf)] = ch.pick([0x00, 0x20, 0x22, 0x2C, 0x5B, 0x5D, 0x7B, 0x7D, 0x5C, 0xFF, 0x80])
    return bytes(buf)


def mutate_framing(raw: bytes, ch: Choices) -> bytes:
    """The 8-byte length and the header text around the JSON (padding, splices)."""
    (n,) = struct.unpack("<Q", raw[:8])
    text, data = raw[8:8 + n], raw[8 + n:]
    op = ch.below(6)
    if op == 0:  # a wrong length
        new = ch.pick([0, 1, 7, n - 1, n + 1, n - 8, n + 8, len(raw) - 8, len(raw), 2 ** 63, 2 ** 64 - 1,
                       100_000_001, n + len(data)])
        return struct.pack("<Q", max(0, min(new, 2 ** 64 - 1))) + raw[8:]
    if op == 1:  # other padding: JSON whitespace, NUL, or none
        body = text.rstrip(b" ")
        pad = ch.pick([b"", b"\n", b"\t", b"\r\n", b"\0", b"  \0", b" " * 9])
        body += pad
        return struct.pack("<Q", len(body)) + body + data
    if op == 2:  # a splice inside the header text (keeps the length consistent)
        at = ch.below(len(text) + 1)
        ins = ch.pick([b",", b"}", b"{", b'"', b"\\", b"]", b"[", b'"":0,', b"\xff", b"\xc3", b"\xe2\x82",
                       b"\xed\xa0\x80", b"NaN", b"1e999", b"-0", b"9" * 5000, b"\x00"])
        body = text[:at] + ins + text[at + ch.below(3):]
        return struct.pack("<Q", len(body)) + body + data
    if op == 3:  # something after the JSON object inside the header
        body = text.rstrip(b" ") + ch.pick([b"{}", b",", b"x", b" {", b"\n\n", b"]"])
        return struct.pack("<Q", len(body)) + body + data
    if op == 4:  # a byte order mark, or leading whitespace
        body = ch.pick([b"\xef\xbb\xbf", b" ", b"\n"]) + text
        return struct.pack("<Q", len(body)) + body + data
    header, data = split(raw)  # a duplicate key (the last one would win in a plain dict)
    key = ch.pick(list(header))
    js = json.dumps(header, separators=(",", ":"))
    body = (js[:-1] + "," + json.dumps(key) + ":" + json.dumps(header[key]) + "}").encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def mutate_table(header: dict, data: bytes, ch: Choices) -> tuple[dict, bytes]:
    """Hostile values in the tensor entries (dtype, shape, data_offsets) or the table's keys."""
    names = [k for k in header if k != "__metadata__"]
    name = ch.pick(names)
    if ch.chance(60):
        entry = header[name]
        field = ch.pick(["dtype", "shape", "data_offsets"])
        header[name] = mutate_json(entry, ch, prefer=(field,))
    else:
        other = ch.pick(names)
        op = ch.below(4)
        if op == 0:  # two tensors swap their spans (sizes differ, or the data is wrong)
            header[name]["data_offsets"], header[other]["data_offsets"] = \
                header[other]["data_offsets"], header[name]["data_offsets"]
        elif op == 1:  # shape and span of another tensor
            header[name] = dict(header[other])
        elif op == 2:  # a whole entry of the wrong type
            header[name] = fuzz_common.hostile(ch)
        else:
            header[ch.pick(["__metadata__ ", "", "__metadata", name + "\0", "\ud800"])] = header.pop(name)
    if ch.chance(70):
        resign(header, data, document=False)
    return header, data


_FILL = {"F32": np.float32, "F64": np.float64}


def mutate_tensors(header: dict, data: bytes, ch: Choices) -> tuple[dict, bytes]:
    """Consistent surgery: the file stays well framed and signed, the model it describes does not."""
    meta = header["__metadata__"]
    tens = tensors_of(header, data)
    names = list(tens)
    name = ch.pick(names)
    dtype, shape, raw = tens[name]
    op = ch.below(8)
    if op == 0:  # a tensor missing
        del tens[name]
    elif op == 1:  # an unknown tensor of any dtype (ignored with a warning, still checksummed)
        new_dtype = ch.pick(["F32", "F64", "F16", "BF16", "I8", "U8", "BOOL", "I64", "C64", "F8_E5M2"])
        itemsize = {"F64": 8, "I64": 8, "C64": 8, "F32": 4, "F16": 2, "BF16": 2}.get(new_dtype, 1)
        new_shape = ch.pick([[0], [1], [3, 2], [], [2, 0, 5]])
        tens[ch.pick(["extra", name + ".x", "adam.m.extra", "delta9.wq.A", "l7.wq", ""])] = \
            [new_dtype, new_shape, bytes(itemsize * math.prod(new_shape))]
    elif op == 2:  # renamed
        tens[ch.pick([name + "_", name.upper(), "l1" + name[2:], name.replace("delta", "delta1"), "x"])] = tens.pop(name)
    elif op == 3:  # another shape, with the data of that size
        new_shape = ch.pick([shape[::-1], shape + [1], shape[:-1], [s + 1 for s in shape], [0] * len(shape), [1, 1]])
        width = 8 if dtype == "F64" else 4
        tens[name] = [dtype, new_shape, bytes(width * math.prod(new_shape))]
    elif op == 4:  # the other float dtype, converted
        src, dst = (np.float32, np.float64) if dtype == "F32" else (np.float64, np.float32)
        tens[name] = ["F64" if dtype == "F32" else "F32", shape, np.frombuffer(raw, src).astype(dst).tobytes()]
    elif op == 5 and raw:  # values no training produces
        arr = np.frombuffer(raw, _FILL.get(dtype, np.float32)).copy()
        arr[ch.below(arr.size)::1 + ch.below(7)] = ch.pick([np.nan, np.inf, -np.inf, 1e30, 0.0, -0.0, 1e-45])
        tens[name] = [dtype, shape, arr.tobytes()]
    elif op == 6:  # the buffer in another order (valid: readers must not assume one)
        order = names[:]
        for i in range(len(order) - 1, 0, -1):
            j = ch.below(i + 1)
            order[i], order[j] = order[j], order[i]
        tens = {k: tens[k] for k in order}
    else:  # every tensor of a delta module gone (the document still lists it)
        k = ch.below(3)
        tens = {n: v for n, v in tens.items() if f"delta{k}." not in n}
    return pack(meta, tens)


def mutate_metadata(header: dict, data: bytes, ch: Choices) -> tuple[dict, bytes]:
    """__metadata__: magic, version, extra keys, and the checksums entry's own structure."""
    meta = header["__metadata__"]
    op = ch.below(4)
    if op == 0:
        meta["format_version"] = ch.pick(["0", "2", "01", "1 ", " 1", "+1", "1.0", "", "\u0661", "\u00b2", "99999999999",
                                          "-1", "1\0", 1, None])
    elif op == 1:
        meta["format"] = ch.pick(["", "molecule-gpt ", "Molecule-gpt", "molecule_gpt", None, "pt"])
    elif op == 2:
        sums = json.loads(meta["checksums"])
        sums = mutate_json(sums, ch)
        meta["checksums"] = json.dumps(sums) if ch.chance(90) else "\ud800" + json.dumps(sums)
    else:
        header["__metadata__"] = mutate_json(meta, ch)
    return header, data


def mutate_document(header: dict, data: bytes, ch: Choices, prefer: tuple | None = None) -> tuple[dict, bytes]:
    """The metadata document (config, model fields, tokenizer, organism state), re-signed."""
    meta = header["__metadata__"]
    doc = json.loads(meta["document"])
    if prefer is None:
        prefer = ch.pick([("model", "config"), ("model",), ("tokenizer",), ("state",), ("optimizer_state",), ()])
    if ch.chance(85):
        doc = mutate_json(doc, ch, prefer=prefer)
        text = json.dumps(doc, ensure_ascii=ch.chance(80), allow_nan=True, separators=(",", ":"))
    else:  # text the json module would never write: deep nesting, huge numbers, duplicate keys
        text = json.dumps(doc, separators=(",", ":"))
        depth = ch.pick([10, 100, 990, 1100, 5000, 100_000])
        junk = ch.pick(["[" * depth + "]" * depth, '{"a":' * depth + "0" + "}" * depth, "9" * 5000, "1e999",
                        "-1e999", '{"x":1,"x":2}', "[" + ",".join(["{}"] * 600_000) + "]"])
        key = '"state":' if '"state":' in text and ch.chance(70) else '"tokenizer":'
        at = text.find(key)
        if at >= 0:  # replaces the start of that value; the rest of the text is kept, JSON or not
            at += len(key)
            text = text[:at] + junk + ("," + text[at:].split(",", 1)[1] if ch.chance(50) and "," in text[at:] else text[at:])
    meta["document"] = text
    if ch.chance(95):
        resign(header, data, tensors=False)
    return header, data


# state sections an Organism reads, to aim the mutation at them more often than at random nodes
STATE_PATHS = [("state", k) for k in ("config", "trainer", "organism_rng", "val_lines", "heard_val_lines",
                                      "quarantine", "reservoir", "buffer", "birth_vocab", "birth_rows", "seed",
                                      "format", "format_version")]


def _document_parses(header: dict) -> bool:
    try:
        json.loads(header["__metadata__"]["document"])
        return True
    except (KeyError, TypeError, ValueError, RecursionError):
        return False


def mutate(raw: bytes, ch: Choices) -> bytes:
    layer = ch.below(10)
    if layer == 0:
        return mutate_raw(raw, ch)
    if layer == 1:
        return mutate_framing(raw, ch)
    header, data = split(raw)
    if layer == 2:
        header, data = mutate_table(header, data, ch)
    elif layer == 3:
        header, data = mutate_tensors(header, data, ch)
    elif layer == 4:
        header, data = mutate_metadata(header, data, ch)
    elif layer in (5, 6):
        header, data = mutate_document(header, data, ch)
    else:  # 7-9: the organism state and tokenizer inside the document, where most logic is
        header, data = mutate_document(header, data, ch, prefer=ch.pick(STATE_PATHS + [("tokenizer",)]))
    if ch.chance(15) and _document_parses(header):  # a second, independent mutation on top
        header, data = mutate_document(header, data, ch)
    out = join(header, data, ensure_ascii=ch.chance(90))
    return mutate_raw(out, ch) if ch.chance(5) else out


# ---------------------------------------------------------------------------------------------
# the target

_LABEL_NOISE = re.compile(r"'[^']*'|\"[^\"]*\"|\([^()]*\)|\[[^\[\]]*\]|-?\d[\d.e+-]*")


def label(exc: BaseException, path: str) -> str:
    """A short name of an error's kind: the message without the file, numbers and quoted parts."""
    text = str(exc).split(". The previous checkpoint")[0].replace(path, "")
    return f"{type(exc).__name__}: {_LABEL_NOISE.sub('_', text).strip(': ')[:70]}"


def fuzz_one(data: bytes) -> str:
    ch = Choices(data)
    base_name = ch.pick(["organism", "untied", "model"])
    raw = mutate(bases()[base_name], ch)
    loader = ch.pick(LOADERS)
    path = os.path.join(workdir(), "fuzzed.ckpt")
    with open(path, "wb") as f:
        f.write(raw)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CheckpointWarning for unknown fields is expected
            if loader == "load_checkpoint":
                ckpt = mg.load_checkpoint(path)
                if ckpt.tokenizer is not None and ckpt.tokenizer.vocab_size != ckpt.model.vocab_size:
                    raise FuzzFailure(f"loaded a tokenizer of {ckpt.tokenizer.vocab_size} tokens for a model of "
                                      f"{ckpt.model.vocab_size} rows")
            else:
                mg.Organism.load(path).close()
        return f"{loader}: loaded"
    except CheckpointError as exc:
        if path not in str(exc):
            raise FuzzFailure(f"CheckpointError does not name the file: {exc}") from exc
        return label(exc, path)
    except OrganismError as exc:
        if loader == "Organism.load" and type(exc) is OrganismError and any(m in str(exc) for m in ORGANISM_ERRORS):
            return label(exc, path)
        raise FuzzFailure(f"{loader} raised {type(exc).__name__}, which its contract does not allow: {exc}") from exc
    except Exception as exc:
        raise FuzzFailure(f"{loader} raised {type(exc).__name__}: {exc}") from exc


if __name__ == "__main__":
    bases()  # before atheris starts: building them is not what is fuzzed
    sys.exit(fuzz_common.main(fuzz_one))
