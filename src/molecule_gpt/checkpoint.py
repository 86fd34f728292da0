"""Checkpoint: one safetensors file per organism, written atomically, validated before it is read.

What it is: `save_checkpoint(path, model, tokenizer=None, state=None)` writes the whole organism
(every parameter under its name (design.md §2), the Adam moments and step counters, the birth embedding
snapshot, the model's RNG, the delta modules' alphas and trainable flags, the tokenizer and a
caller-owned JSON `state`) to ONE file that standard tools read: a safetensors container whose
`__metadata__` carries a JSON document. `load_checkpoint(path)` returns a `Checkpoint` whose
model continues training bit for bit as if it had never stopped. The layout is normative and
written down in docs/checkpoint-format.md (the README's "Format" section).

What it is not: no pickle, no code execution, no in-place writes, no partial loads. A file is
read only after its header has been checked against itself and the config it carries (every
size bounded by the file size, every shape implied by the config), so a truncated, corrupt or
hostile file raises `CheckpointError` (a ValueError) naming the file, the cause and, where a
`<path>.prev` exists, how to fall back to it; it never allocates what the header claims first,
and it counts the structure of every JSON text before parsing it (docs/checkpoint-format.md,
"Limits"), so a hostile 100 MB header costs a bounded scan, not gigabytes of Python objects.

Write path (atomic): tensors and document -> a file inside the directory
`<path>.tmp-<pid>-<token>` next to `path` (our own safetensors writer, in the model's memory
order, one gathered write), size check, fsync; the
current file is hard-linked to `<path>.prev` (atomically, through the same directory);
`os.replace` onto `path`; fsync of the directory. At every instant `path` is either the complete
previous file or the complete new one; a killed saver leaves only its temporary directory, which
the next save removes once its pid is gone.

Notes (the figures and the alternatives measured: benchmarks/RESULTS.md, "Design measurements"):
- Reading: tensors are read with readinto() straight into the Model's arrays, from the one file
  descriptor whose header was validated; tensors stored next to each other whose destinations
  are adjacent too are read in one call (files we write keep each group's parameters, then m,
  then v, in memory order: Model.state_layout). Not safetensors' own loaders (they take a path,
  so a concurrent save could swap the file between validation and reading, and they copy
  twice); not mmap (a file truncated by someone else while mapped kills the process with
  SIGBUS, and loading must never crash).
- Checksums: sha256 per tensor: a content identifier that `sha256sum` can check, fast with
  SHA-NI, computed on the reading thread (a worker thread costs more than it overlaps on two
  shared cores).
- Model construction skips the random init (every value comes from the file): Model.empty.
  The engines are not bound at load (the first step binds them, as for a new Model): the
  arena check uses a bound from the shapes and asks Model for the exact plan, which binds,
  only when that bound does not fit in memory.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import struct
import warnings
from typing import Any, Callable

import numpy as np

from .config import RETIRED_FIELDS, Config
from .errors import CheckpointError, ConfigError
from .model import Model, delta_group

__all__ = ["Checkpoint", "CheckpointWarning", "FORMAT_NAME", "FORMAT_VERSION", "load_checkpoint", "save_checkpoint"]

# ---------------------------------------------------------------------------------------------
# Format constants (see docs/checkpoint-format.md)

FORMAT_NAME = "molecule-gpt"  # __metadata__["format"]: the magic
FORMAT_VERSION = 1  # __metadata__["format_version"]; bump on any incompatible change
MAX_HEADER_BYTES = 100_000_000  # the safetensors package refuses larger headers; so do we
CHECKSUM_ALGORITHM = "sha256"
_METADATA_KEYS = ("format", "format_version", "document", "checksums")
_DOCUMENT_KEYS = ("producer", "model", "optimizer_state", "tokenizer", "state")
_MODEL_KEYS = ("config", "vocab_size", "dtype", "delta_alphas", "trainable", "adam_steps", "rng")
_MODEL_DTYPES = {"float32": "F32", "float64": "F64"}
# Byte width of every safetensors dtype (an unknown tensor of a known dtype is skipped with a
# warning; an unknown dtype makes the layout uncheckable, so it is an error).
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
             "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
_MAX_DELTA_MODULES = 4096  # sanity bound checked before allocating (tensors are bounded by the file too)
_MAX_LAYER_HEADS = 1_000_000  # Model's own shape tables loop over every (layer, head) pair too
# Structural limits of the JSON texts, checked by a scan of the raw bytes before json.loads
# builds anything (docs/checkpoint-format.md, "Limits"): the header may be 100 MB, and json.loads
# of a hostile 100 MB text builds gigabytes of objects before anything could be checked
# (benchmarks/RESULTS.md). Every tensor a model
# needs holds at least one 4-byte element, so data_size // 4 bounds those; others (ignored with
# a warning) are capped. The document's bounds are far above an organism's (its state is mostly
# a few long lists of strings: 8000 reservoir lines are 8000 elements) and bound what json
# builds (3 million short strings are about 200 MB).
_MAX_TENSORS = 200_000  # tensor entries in a header, whatever the data size
_MAX_UNKNOWN_TENSORS = 1024  # tensors the config does not imply (a newer writer's), any size
_HEADER_DEPTH = 3  # {name: {"shape": [...]}}: the header nests no deeper
_DOCUMENT_CONTAINERS = 500_000  # objects + arrays
_DOCUMENT_ELEMENTS = 3_000_000  # values in objects and arrays


class CheckpointWarning(UserWarning):
    """A checkpoint loaded, but something in it was ignored (an unknown key from a newer writer)."""


@dataclasses.dataclass
class Checkpoint:
    """What `load_checkpoint` returns. `metadata` is the (migrated) metadata document: producer,
    model meta (config, vocab_size, dtype, delta_alphas, trainable, adam_steps, rng),
    optimizer_state, tokenizer (its to_dict()) and state."""

    path: str
    model: Model
    tokenizer: Any  # molecule_gpt.tokenizer.EvolvingTokenizer, or None when saved without one
    state: Any  # the `state` passed to save_checkpoint, as JSON gives it back (None if none)
    metadata: dict
    format_version: int  # the version the file was written in (before migration)

    @property
    def config(self) -> Config:
        return self.model.config


# ---------------------------------------------------------------------------------------------
# Migrations. _MIGRATIONS[v] turns a version-v header into a version-(v+1) one:
#     fn(document: dict, tensors: dict[str, TensorEntry]) -> (document, tensors)
# It may rename or drop tensor entries (the checksum stays attached to each entry's stored
# name) and rewrite the document; it runs after the checksums of the stored document have been
# verified and before any validation against the current layout. Version 1 is the first
# version, so the table is empty; the mechanism is tested with a registered test migration.

_MIGRATIONS: dict[int, Callable[[dict, dict], tuple[dict, dict]]] = {}


@dataclasses.dataclass(slots=True)
class TensorEntry:
    stored_name: str  # name in the file (checksums are keyed by it)
    dtype: str  # safetensors dtype code, e.g. "F32"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data buffer (after the header)
    end: int


# ---------------------------------------------------------------------------------------------
# Save


def save_checkpoint(path: str | os.PathLike, model: Model, tokenizer=None, state: Any = None, *,
                    optimizer_state: bool = True) -> None:
    """Write model (+ tokenizer, + JSON-able `state`) to `path` atomically; the file previously at
    `path`, if any, is kept as `<path>.prev`.

    `state` must survive a JSON round trip unchanged (dicts with str keys, lists, str, finite
    floats, ints, bools, None); it is stored verbatim. optimizer_state=False leaves out the Adam
    moments (a file about a third the size, for sharing or inference): loading it gives zero
    moments and zero step counters, so training restarts Adam instead of resuming exactly.
    Raises CheckpointError (nothing at `path` changes) when anything cannot be written."""
    path = os.fspath(path)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a molecule_gpt.Model, got {type(model).__name__}")
    tok_doc = None
    if tokenizer is not None:
        if not hasattr(tokenizer, "to_dict"):
            raise TypeError(f"tokenizer must have a to_dict() method (EvolvingTokenizer), got {type(tokenizer).__name__}")
        tok_doc = tokenizer.to_dict()
        _check_json(tok_doc, "tokenizer.to_dict()", path)
    _check_json(state, "state", path)

    with model.lock:  # one consistent snapshot even while another thread trains
        if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
            raise CheckpointError(
                f"{path}: not saved: the tokenizer has {tokenizer.vocab_size} tokens but the model has vocab_size "
                f"{model.vocab_size}; grow the model (model.grow_vocab(tokenizer.vocab_size)) before saving")
        meta, tensors = model.export_state()
        layout = model.state_layout()
    # the model's memory order: a load then reads each parameter group's arrays in one call
    tensors = {**{k: tensors[k] for k in layout if k in tensors}, **tensors}
    if not optimizer_state:
        tensors = {k: v for k, v in tensors.items() if not k.startswith("adam.")}
        meta["adam_steps"] = {name: 0 for name in meta["adam_steps"]}
    from . import __version__

    document = {"producer": f"molecule-gpt {__version__}", "model": meta, "optimizer_state": bool(optimizer_state),
                "tokenizer": tok_doc, "state": state}
    try:
        doc_text = json.dumps(document, allow_nan=False, ensure_ascii=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:  # model meta is ours; _check_json covered the rest
        raise CheckpointError(f"{path}: not saved: the metadata document is not JSON: {exc}") from exc
    tensors = {k: _little_endian(v) for k, v in tensors.items()}
    checksums = {"algorithm": CHECKSUM_ALGORITHM,
                 "document": hashlib.sha256(doc_text.encode("utf-8")).hexdigest(),
                 "tensors": _hash_all(tensors)}
    metadata = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "document": doc_text,
                "checksums": json.dumps(checksums, separators=(",", ":"))}
    data_bytes = sum(a.nbytes for a in tensors.values())
    _atomic_write(path, lambda tmp: _write_safetensors(tmp, tensors, metadata), data_bytes)


_ST_DTYPES = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64"}


def _write_safetensors(tmp: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file with the tensors' data in the dict's order (the format leaves the
    order to the writer; safetensors.numpy.save_file sorts by dtype and name, which scatters a
    group's arrays and is slower, benchmarks/RESULTS.md). The header is padded with spaces to a
    multiple of 8 bytes, as save_file does."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, arr in tensors.items():
        header[name] = {"dtype": _ST_DTYPES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    raw += b" " * (-len(raw) % 8)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        _write_all(fd, [struct.pack("<Q", len(raw)), raw] + [memoryview(a).cast("B") for a in tensors.values()])
    finally:
        os.close(fd)


def _write_all(fd: int, bufs: list) -> None:
    """Write the buffers in order with gathered writes (os.writev: one system call per up to
    IOV_MAX buffers instead of one per tensor), resuming after a short write."""
    if not hasattr(os, "writev"):  # not POSIX
        for b in bufs:
            view = memoryview(b)
            while len(view):
                view = view[os.write(fd, view):]
        return
    i = 0
    while i < len(bufs):
        batch = bufs[i:i + _IOV_MAX]
        n = os.writev(fd, batch)
        if n == 0 and any(len(b) for b in batch):
            raise OSError(f"write returned 0 with {sum(len(b) for b in batch)} bytes left (disk full?)")
        for b in batch:  # skip what was written; keep the rest of a partly written buffer
            if n >= len(b):
                n -= len(b)
                i += 1
            else:
                bufs[i] = memoryview(b)[n:]
                break


try:
    _IOV_MAX = max(16, min(1024, os.sysconf("SC_IOV_MAX")))
except (ValueError, OSError, AttributeError):
    _IOV_MAX = 16


def _atomic_write(path: str, write: Callable[[str], None], min_data_bytes: int | None = None,
                  keep_prev: bool = True) -> None:
    """write(tmp) into a temporary file beside `path`, fsync it, keep the current file as
    `<path>.prev` (if keep_prev), os.replace onto `path`, fsync the directory.

    Everything temporary lives in one directory `<path>.tmp-<pid>-<token>` next to `path` (same
    filesystem, so the renames are atomic): a writer may make its own temporary files beside the
    name it is given (safetensors' save_file does), and a saver killed mid-write then leaves one
    directory that the next save removes, instead of stray files."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"{path}: not saved: directory {directory} does not exist; create it first")
    _remove_stale_temporaries(path)
    work = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp = os.path.join(work, "new")
    try:
        os.mkdir(work)
        write(tmp)
        fd = os.open(tmp, os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if min_data_bytes is not None and size < 8 + min_data_bytes:
                raise OSError(f"short write: {size} bytes on disk, at least {8 + min_data_bytes} expected (disk full?)")
            os.fsync(fd)
        finally:
            os.close(fd)
        if keep_prev and os.path.isfile(path):
            # `path` must exist at every instant, so the old file is linked (not moved) to .prev.
            prev_tmp = os.path.join(work, "prev")
            try:
                os.link(path, prev_tmp)
            except OSError:  # no hard links on this filesystem: copy instead
                shutil.copyfile(path, prev_tmp)
                _fsync_path(prev_tmp)
            os.replace(prev_tmp, f"{path}.prev")
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(exc, OSError):
            raise CheckpointError(f"{path}: not saved ({exc}); the file at {path} is unchanged") from exc
        if isinstance(exc, Exception) and not isinstance(exc, CheckpointError):
            raise CheckpointError(f"{path}: not saved ({type(exc).__name__}: {exc}); the file at {path} is unchanged") from exc
        raise
    shutil.rmtree(work, ignore_errors=True)
    try:
        _fsync_dir(directory)
    except OSError as exc:
        raise CheckpointError(f"{path}: saved, but the directory {directory} could not be synced ({exc}); the new "
                              f"file may not survive a power loss") from exc


def _remove_stale_temporaries(path: str) -> None:
    """Delete `<path>.tmp-<pid>-<token>` directories left by a saver that was killed (its pid is
    gone)."""
    if os.name != "posix":  # os.kill(pid, 0) is a probe only on POSIX
        return
    for name in glob.glob(glob.escape(path) + ".tmp-*"):
        try:
            pid = int(name[len(path) + 5:].split("-", 1)[0])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # still alive: maybe saving right now
        except ProcessLookupError:
            pass
        except OSError:
            continue  # exists but not ours to signal
        if os.path.isdir(name) and not os.path.islink(name):
            shutil.rmtree(name, ignore_errors=True)


def _fsync_path(name: str) -> None:
    fd = os.open(name, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _little_endian(arr: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(arr)
    return arr if arr.dtype.byteorder in ("<", "|") or (arr.dtype.byteorder == "=" and np.little_endian) \
        else arr.astype(arr.dtype.newbyteorder("<"))


def _hash_all(tensors: dict[str, np.ndarray]) -> dict[str, str]:
    """sha256 hex digest of every tensor's raw little-endian bytes, by name."""
    return {name: _sha256_hex(tensors[name]) for name in sorted(tensors)}


def _sha256_hex(buf) -> str:
    return hashlib.sha256(buf).hexdigest()


def _check_json(value: Any, where: str, path: str) -> None:
    """Raise CheckpointError unless json.loads(json.dumps(value)) == value (exactly what the
    loader gives back): dicts with str keys, lists, str, int, finite float, bool, None."""
    stack = [(value, where)]
    while stack:
        v, at = stack.pop()
        if v is None or isinstance(v, (str, bool, int)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                raise CheckpointError(f"{path}: not saved: {at} is {v!r}; JSON has no NaN/Infinity, store None or a string")
            continue
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise CheckpointError(f"{path}: not saved: {at} has key {k!r} of type {type(k).__name__}; "
                                          f"JSON keys are strings, convert it with str()")
                stack.append((item, f"{at}[{k!r}]"))
            continue
        if isinstance(v, list):
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(v))
            continue
        hint = "convert it with .item()/.tolist()" if isinstance(v, (np.generic, np.ndarray)) else \
            "use a list (tuples load back as lists)" if isinstance(v, tuple) else "convert it to JSON types"
        raise CheckpointError(f"{path}: not saved: {at} is a {type(v).__name__}, which does not round-trip through "
                              f"JSON; {hint}")


# ---------------------------------------------------------------------------------------------
# Load


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint written by save_checkpoint (any known format version) and rebuild the
    model, tokenizer and state. Raises CheckpointError naming the file and the cause."""
    path = os.fspath(path)
    try:
        fh = open(path, "rb", buffering=0)
    except OSError as exc:
        raise _error(path, f"cannot open it ({exc.strerror or exc})") from exc
    with fh:
        try:
            file_size = os.fstat(fh.fileno()).st_size
            header, n_header = _read_header(path, fh, file_size)
        except OSError as exc:
            raise _error(path, f"cannot read it ({exc})") from exc
        meta_strs = _check_metadata(path, header)
        version = meta_strs["__version"]
        # checksums of what is stored come before everything that interprets it
        n_entries = len(header) - 1  # tensors (the header scan bounded them)
        _check_structure(path, meta_strs["checksums"].encode("utf-8", "surrogatepass"), "the checksums entry",
                         containers=16, elements=n_entries + 64, depth=2)
        checksums = _parse_checksums(path, meta_strs["checksums"])
        doc_text = meta_strs["document"]
        doc_bytes = doc_text.encode("utf-8", "surrogatepass")
        if hashlib.sha256(doc_bytes).hexdigest() != checksums["document"]:
            raise _error(path, "the metadata document does not match its sha256 checksum: the header is corrupt")
        _check_structure(path, doc_bytes, "the metadata document", containers=_DOCUMENT_CONTAINERS,
                         elements=_DOCUMENT_ELEMENTS)
        del doc_bytes  # a copy as large as the document: not kept while json builds it
        document = _loads(path, doc_text, "the metadata document")
        data_size = file_size - 8 - n_header
        entries = _check_tensor_table(path, header, data_size)
        missing = sorted(set(entries) - set(checksums["tensors"]))
        if missing:
            raise _error(path, f"no checksum for tensor(s) {', '.join(missing[:5])}: the header is corrupt")
        stray = sorted(set(checksums["tensors"]) - set(entries))
        if stray:
            raise _error(path, f"checksums name tensor(s) the file does not hold ({', '.join(stray[:5])}): the header is corrupt")
        for v in range(version, FORMAT_VERSION):
            try:
                document, entries = _MIGRATIONS[v](document, entries)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise _error(path, f"it cannot be migrated from format_version {v} to {v + 1} "
                                   f"({type(exc).__name__}: {exc}): the header is corrupt") from None
        model, dests, tokenizer = _build(path, document, entries)
        _read_tensors(path, fh, 8 + n_header, entries, dests, checksums["tensors"])
    # Re-derive whatever Model caches from parameter values (folded frozen modules): only now do
    # the arrays hold the file's values. Then bind the engines, once, and bound the training
    # arenas they plan (allocated at the first step) by this machine's memory.
    model.refresh()
    _check_arenas(path, model)
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, state=document.get("state"), metadata=document,
                      format_version=version)


def _error(path: str, what: str) -> CheckpointError:
    """CheckpointError naming the file, the cause and the fallback when `<path>.prev` exists."""
    msg = reason = f"{path}: {what}"
    prev = f"{path}.prev"
    if not path.endswith(".prev") and os.path.isfile(prev):
        msg += f". The previous checkpoint {prev} exists: load_checkpoint({prev!r}) gets the organism as of the save before"
    error = CheckpointError(msg)
    error.reason = reason  # without the Python hint (the command line gives its own)
    return error


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate key {k!r}")
            seen.add(k)
    return out


def _loads(path: str, text: str, what: str):
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise _error(path, f"{what} is not valid JSON ({exc}): the header is corrupt") from None


# The structure scan (no Python per token, chunks of 1 MB, stopping at the first chunk over a
# limit, so a hostile text costs one chunk, not the file):
# 1. upper bounds: every "{", "[" and "," counted, inside strings too (numpy compares, about
#    the cheap pass); a real document passes here (its text holds few of them);
# 2. otherwise the exact count: quotes after an odd run of backslashes are escaped, the others
#    pair up into strings, and only the brackets and commas outside them count (over ten
#    times the cost; chunks inside one long string, a document in a header, are skipped); it also
#    gives the nesting depth.
# Where this reading and json.loads could disagree the text is not JSON, and json.loads fails
# at the first such byte, having built no more than was counted before it. Nesting the scan
# does not check is bounded by json.loads itself (RecursionError past Python's limit).
_SCAN_CHUNK = 1 << 20
_BACKSLASHES = re.compile(rb"\\*")
_OPEN, _CLOSE = (0x7B, 0x5B), (0x7D, 0x5D)  # { [   } ]
_COMMA, _QUOTE, _BACKSLASH = 0x2C, 0x22, 0x5C


def _check_structure(path: str, data: bytes, what: str, *, containers: int, elements: int,
                     depth: int | None = None, why: str = "") -> None:
    """Raise CheckpointError unless the JSON text `data` has at most `containers` objects and
    arrays and `elements` values in them (counted as containers + commas). Strings are
    skipped: their content never counts. `depth` (None: any) is checked when the exact count
    runs: a text within the upper bounds is cheap to parse at any depth (json.loads stops at
    Python's recursion limit), and what reads it checks its shape. `why`, if given, says in
    the error where the limits come from."""
    opens = commas = 0
    for start in range(0, len(data), _SCAN_CHUNK):
        a = np.frombuffer(data, np.uint8, min(_SCAN_CHUNK, len(data) - start), start)
        opens += int(np.count_nonzero(a == _OPEN[0])) + int(np.count_nonzero(a == _OPEN[1]))
        commas += int(np.count_nonzero(a == _COMMA))
        if opens > containers or opens + commas > elements:
            break
    else:
        return
    _check_structure_exactly(path, data, what, containers, elements, depth, why)


def _check_structure_exactly(path: str, data: bytes, what: str, containers: int, elements: int,
                             depth: int | None, why: str = "") -> None:
    why = f": {why}" if why else ""
    n, start = len(data), 0
    opened = closed = values = 0
    in_string = False  # the chunks so far ended inside a string
    outside = []  # per chunk, the brackets and commas outside strings (bounded by the limits once kept)
    while start < n:
        stop = min(start + _SCAN_CHUNK, n)
        if data[stop - 1] == _BACKSLASH:  # never split a run of backslashes from the byte it escapes
            stop = min(_BACKSLASHES.match(data, stop).end() + 1, n)
        a = np.frombuffer(data, np.uint8, stop - start, start)
        start = stop
        quote = a == _QUOTE
        if in_string and a.size > 2:
            # inside a long string (a document in a header): skip the chunk if every quote in it
            # follows exactly one backslash (bool arrays only, no positions)
            slash = a == _BACKSLASH
            one = slash[1:-1] & ~slash[:-2]
            if not (quote[0] or (quote[1] and not slash[0]) or np.any(quote[2:] & ~one)):
                continue
        quotes = np.flatnonzero(quote)
        if quotes.size:
            # a quote is escaped when the run of backslashes before it is odd (a chunk never starts
            # inside a run, so a quote at 0 is not escaped and every run starts in the chunk)
            escaped = (a.take(quotes - 1, mode="clip") == _BACKSLASH) & (quotes > 0)
            longer = escaped & (a.take(quotes - 2, mode="clip") == _BACKSLASH) & (quotes > 1)  # runs of 2+: rare
            if longer.any():
                cand = quotes[longer]
                slash = a == _BACKSLASH
                runs = np.flatnonzero(slash[1:] & ~slash[:-1]) + 1  # where runs start (but at 0)
                if slash[0]:
                    runs = np.concatenate(([0], runs))
                first = runs[np.searchsorted(runs, cand - 1, side="right") - 1]
                escaped[longer] = (cand - first) % 2 == 1
            quotes = quotes[~escaped]
        if in_string and not quotes.size:
            continue  # the whole chunk lies inside one string (a long document string in a header)
        marks = np.flatnonzero((a == _OPEN[0]) | (a == _OPEN[1]) | (a == _CLOSE[0]) | (a == _CLOSE[1]) | (a == _COMMA))
        if in_string or quotes.size:
            if in_string:  # the string open at the chunk's start: a quote just before it
                quotes = np.concatenate(([-1], quotes))
            in_string = bool(quotes.size % 2)
            marks = marks[np.searchsorted(quotes, marks) % 2 == 0]  # after an odd number of quotes: in a string
        codes = a[marks]
        opens = int(np.count_nonzero(codes == _OPEN[0])) + int(np.count_nonzero(codes == _OPEN[1]))
        opened += opens
        closed += int(np.count_nonzero(codes == _CLOSE[0])) + int(np.count_nonzero(codes == _CLOSE[1]))
        values += opens + int(np.count_nonzero(codes == _COMMA))
        if opened > containers or closed > containers:
            raise _error(path, f"{what} is not valid JSON for this format (over {containers} objects and arrays, "
                               f"more than a checkpoint holds{why}): the header is corrupt")
        if values > elements:
            raise _error(path, f"{what} is not valid JSON for this format (over {elements} values in objects and "
                               f"arrays, more than a checkpoint holds{why}): the header is corrupt")
        outside.append(codes)
    codes = np.concatenate(outside) if outside else np.zeros(0, np.uint8)
    level = np.cumsum(np.isin(codes, _OPEN).view(np.int8) - np.isin(codes, _CLOSE).view(np.int8), dtype=np.int32)
    deepest = int(level.max()) if level.size else 0
    if depth is not None and deepest > depth:
        raise _error(path, f"{what} is not valid JSON for this format (objects and arrays nested {deepest} deep, more "
                           f"than the {depth} a checkpoint needs): the header is corrupt")


def _read_header(path: str, fh, file_size: int) -> tuple[dict, int]:
    if file_size == 0:
        raise _error(path, "the file is empty (a save that never completed?)")
    head = fh.read(8)
    if head[:1] == b"{":
        raise _error(path, "this is a JSON file, not a molecule-gpt checkpoint; if it is the original "
                           "implementation's checkpoint, import it with molecule_gpt.compat.load_original_checkpoint")
    if len(head) < 8:
        raise _error(path, f"the file is {file_size} bytes long, too short for a checkpoint (it starts with an 8-byte header length)")
    (n,) = struct.unpack("<Q", head)
    if n > file_size - 8:
        raise _error(path, f"the header length field says {n} bytes but only {file_size - 8} follow: the file is truncated "
                           f"or is not a safetensors file")
    if n > MAX_HEADER_BYTES:
        raise _error(path, f"the header length field says {n} bytes, above the {MAX_HEADER_BYTES}-byte limit: not a "
                           f"molecule-gpt checkpoint")
    raw = _read_exact(fh, n)
    if len(raw) != n:
        raise _error(path, f"the file ended inside the header ({len(raw)} of {n} bytes): it is truncated")
    if raw[:1] != b"{":
        raise _error(path, "the header does not start with '{': not a safetensors file")
    if not raw.isascii() and n > MAX_HEADER_BYTES // 4:
        # decoded, a character beyond U+FFFF takes 4 bytes: this bounds the text by 100 MB too
        raise _error(path, f"the header is {n} bytes and not ASCII; a header with non-ASCII bytes may be at most "
                           f"{MAX_HEADER_BYTES // 4} bytes (molecule-gpt writes ASCII): not a molecule-gpt checkpoint")
    # Every tensor the model needs holds at least 4 bytes of data (unknown ones may hold none):
    # the header's size in tensor entries, each an object with two arrays and about 8 values.
    data_size = max(file_size - 8 - n, 0)
    max_tensors = min(_MAX_TENSORS, data_size // 4 + _MAX_UNKNOWN_TENSORS)
    why = (f"a file with {data_size} bytes of data lists at most {max_tensors} tensors, as every tensor a model needs "
           f"holds 4 bytes or more" if max_tensors < _MAX_TENSORS else f"a file lists at most {_MAX_TENSORS} tensors")
    _check_structure(path, raw, "the header", containers=2 + 3 * max_tensors, elements=10 * max_tensors + 64,
                     depth=_HEADER_DEPTH, why=why)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _error(path, f"the header is not UTF-8 ({exc}): the header is corrupt") from None
    del raw  # json.loads gets the text: the bytes are not kept while it builds the header
    header = _loads(path, text, "the header")
    if not isinstance(header, dict):
        raise _error(path, f"the header is a JSON {type(header).__name__}, not an object: not a safetensors file")
    if len(header) - 1 > max_tensors:  # before any per-entry work
        raise _error(path, f"the header lists {len(header) - 1} tensors, more than the {max_tensors}: {why}: "
                           f"the header is corrupt")
    return header, n


def _read_exact(fh, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = fh.read(n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _check_metadata(path: str, header: dict) -> dict:
    """Magic and version first (like llm.c's gpt2_build_from_checkpoint), then the rest."""
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _error(path, "it is not a molecule-gpt checkpoint: its safetensors header has no __metadata__ string map "
                           "(a plain safetensors file?)")
    fmt = meta.get("format")
    if fmt != FORMAT_NAME:
        raise _error(path, f"it is not a molecule-gpt checkpoint: __metadata__ format is {fmt!r}, expected {FORMAT_NAME!r}")
    raw_version = meta.get("format_version")
    try:
        version = int(raw_version) if raw_version is not None and raw_version.isdigit() else None
    except ValueError:
        version = None
    if version is None:
        raise _error(path, f"its format_version {raw_version!r} is not a version number: the header is corrupt")
    if version > FORMAT_VERSION:
        raise _error(path, f"it has format_version {version}, newer than this molecule-gpt reads (up to {FORMAT_VERSION}); "
                           f"upgrade molecule-gpt to load it")
    oldest = min([FORMAT_VERSION] + [v for v in _MIGRATIONS if all(w in _MIGRATIONS for w in range(v, FORMAT_VERSION))])
    if version < oldest:
        raise _error(path, f"it has format_version {version}, older than any this molecule-gpt can migrate "
                           f"(oldest {oldest}); load and re-save it with the molecule-gpt release that wrote it")
    for key in ("document", "checksums"):
        if key not in meta:
            raise _error(path, f"__metadata__ has no {key!r} entry: the header is corrupt")
    unknown = sorted(set(meta) - set(_METADATA_KEYS))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown __metadata__ key(s) {', '.join(unknown)} (written by a newer molecule-gpt?)",
                      CheckpointWarning, stacklevel=3)
    out = dict(meta)
    out["__version"] = version
    return out


def _parse_checksums(path: str, text: str) -> dict:
    ck = _loads(path, text, "the checksums entry")
    if not isinstance(ck, dict) or ck.get("algorithm") != CHECKSUM_ALGORITHM:
        algo = ck.get("algorithm") if isinstance(ck, dict) else None
        raise _error(path, f"the checksum algorithm is {algo!r}; this molecule-gpt verifies {CHECKSUM_ALGORITHM!r} only")
    doc, tens = ck.get("document"), ck.get("tensors")
    # every tensor digest 64 hex digits: lengths one by one, digits in one regex pass
    if not _is_hex_digest(doc) or not isinstance(tens, dict) or \
            not all(type(v) is str and len(v) == 64 for v in tens.values()) or \
            not _HEX_DIGITS.fullmatch("".join(tens.values())):
        raise _error(path, "the checksums entry is malformed (expected sha256 hex digests): the header is corrupt")
    return ck


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_HEX_DIGITS = re.compile(r"[0-9a-f]*")
_ENTRY_KEYS = frozenset(("dtype", "shape", "data_offsets"))


def _is_hex_digest(value) -> bool:
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


def _check_tensor_table(path: str, header: dict, data_size: int) -> dict[str, TensorEntry]:
    """Every entry well formed, its byte length equal to its shape times its dtype's width, and
    the entries tiling [0, data_size) exactly (no hole, no overlap, nothing after): every size
    the header claims is then bounded by the file size before anything is allocated."""
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if type(info) is not dict or info.keys() != _ENTRY_KEYS:
            raise _error(path, f"tensor {name!r} has a malformed entry in the header: the header is corrupt")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        itemsize = _ITEMSIZE.get(dtype) if type(dtype) is str else None
        if itemsize is None:
            raise _error(path, f"tensor {name!r} has unknown dtype {dtype!r}: the header is corrupt")
        count = 1
        for s in shape if type(shape) is list else (None,):
            if type(s) is not int or s < 0:
                raise _error(path, f"tensor {name!r} has a malformed shape {shape!r}: the header is corrupt")
            count *= s
        if type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or \
                type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1]:
            raise _error(path, f"tensor {name!r} has malformed data_offsets {offsets!r}: the header is corrupt")
        begin, end = offsets
        nbytes = count * itemsize
        if end - begin != nbytes:
            raise _error(path, f"tensor {name!r} claims shape {tuple(shape)} ({count} elements of {dtype}, "
                               f"{nbytes} bytes) but data_offsets {offsets} span {end - begin} bytes: "
                               f"the header is corrupt")
        if end > data_size:
            raise _error(path, f"tensor {name!r} of shape {tuple(shape)} ({nbytes} bytes) ends at byte {end} of the data "
                               f"but the file holds only {max(data_size, 0)} bytes of data: the file is truncated")
        entries[name] = TensorEntry(name, dtype, tuple(shape), begin, end)
    end = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != end:
            what = "overlaps the previous tensor" if e.begin < end else f"leaves a hole of {e.begin - end} bytes before it"
            raise _error(path, f"tensor {e.stored_name!r} at data_offsets [{e.begin}, {e.end}] {what}: the header is corrupt")
        end = e.end
    if end != data_size:
        raise _error(path, f"{data_size - end} bytes follow the last tensor's data: the file is corrupt or was appended to")
    return entries


# ---------------------------------------------------------------------------------------------
# Load: validate the document against the tensor table, then build the model


def _build(path: str, document: Any, entries: dict[str, TensorEntry]):
    if not isinstance(document, dict):
        raise _error(path, "the metadata document is not a JSON object: the header is corrupt")
    for key in ("model", "optimizer_state"):
        if key not in document:
            raise _error(path, f"the metadata document has no {key!r} field: the header is corrupt")
    unknown = sorted(set(document) - set(_DOCUMENT_KEYS))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown metadata document field(s) {', '.join(unknown)} (written by a newer "
                      f"molecule-gpt?)", CheckpointWarning, stacklevel=4)
    meta = document["model"]
    if not isinstance(meta, dict):
        raise _error(path, "the document's 'model' field is not an object: the header is corrupt")
    missing = [k for k in _MODEL_KEYS if k not in meta]
    if missing:
        raise _error(path, f"the document's model section lacks {', '.join(missing)}: the header is corrupt")
    unknown = sorted(set(meta) - set(_MODEL_KEYS))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown model field(s) {', '.join(unknown)} (written by a newer molecule-gpt?)",
                      CheckpointWarning, stacklevel=4)
    optimizer_state = document["optimizer_state"]
    if not isinstance(optimizer_state, bool):
        raise _error(path, f"optimizer_state is {optimizer_state!r}, not a bool: the header is corrupt")

    # ---- config, dtype, vocabulary, delta modules: plain values checked before any shape maths
    config = _config(path, meta["config"])
    dtype = meta["dtype"]
    if dtype not in _MODEL_DTYPES:
        raise _error(path, f"model dtype is {dtype!r}; only 'float32' and 'float64' exist")
    vocab = meta["vocab_size"]
    if type(vocab) is not int or vocab < 1:
        raise _error(path, f"vocab_size is {vocab!r}, not a positive int: the header is corrupt")
    alphas = meta["delta_alphas"]
    if not isinstance(alphas, list) or not all(type(a) in (int, float) and math.isfinite(a) for a in alphas):
        raise _error(path, "delta_alphas is not a list of finite numbers: the header is corrupt")
    if len(alphas) > _MAX_DELTA_MODULES:
        raise _error(path, f"{len(alphas)} delta modules, more than the {_MAX_DELTA_MODULES} the core supports")
    groups = ["base"] + [delta_group(k) for k in range(len(alphas))]
    for key, kind in (("trainable", bool), ("adam_steps", int)):
        table = meta[key]
        if not isinstance(table, dict) or sorted(table) != sorted(groups) or \
                not all(type(v) is kind and (kind is bool or v >= 0) for v in table.values()):
            raise _error(path, f"model {key} must map each of the groups {', '.join(groups)} to a "
                               f"{'bool' if kind is bool else 'non-negative int'}, got {table!r:.200}: the header is corrupt")
    if not optimizer_state and any(meta["adam_steps"].values()):
        raise _error(path, "the file holds no optimizer state but non-zero Adam step counters: the header is corrupt")
    # The tensor count in closed form, before any per-layer loop: a hostile config (a million
    # layers, 64 modules) must not make the shape tables below take hours or gigabytes.
    count = _expected_count(config, len(alphas), optimizer_state)
    if count > len(entries):
        raise _error(path, f"the config (n_layer={config.n_layer}, n_head={config.n_head}) with {len(alphas)} delta "
                           f"module(s) implies {count} tensors but the file holds {len(entries)}")
    if len(entries) - count > _MAX_UNKNOWN_TENSORS:
        raise _error(path, f"the file holds {len(entries)} tensors, {len(entries) - count} more than the config implies; "
                           f"this reader ignores at most {_MAX_UNKNOWN_TENSORS} unknown tensors: the header is corrupt")
    if config.n_layer * config.n_head > _MAX_LAYER_HEADS:
        raise _error(path, f"the config has n_layer * n_head = {config.n_layer * config.n_head}, beyond the "
                           f"{_MAX_LAYER_HEADS} this reader accepts")

    # ---- every expected tensor present with the right dtype and shape (before allocating)
    expected = _expected_shapes(config, vocab, len(alphas), optimizer_state)
    st_dtype = _MODEL_DTYPES[dtype]
    for name, shape in expected.items():
        e = entries.get(name)
        if e is None:
            raise _error(path, f"tensor {name!r} is missing (the config and delta count imply {len(expected)} tensors)")
        if e.dtype != st_dtype:
            raise _error(path, f"tensor {name!r} is {e.dtype} but the model dtype is {dtype} ({st_dtype})")
        if e.shape != shape:
            raise _error(path, f"tensor {name!r} has shape {e.shape} but the config (n_layer={config.n_layer}, "
                               f"n_embd={config.n_embd}, n_head={config.n_head}, block_size={config.block_size}, "
                               f"delta_rank={config.delta_rank}) and vocab_size={vocab} imply {shape}")
    extra = sorted(set(entries) - set(expected))
    if extra:
        warnings.warn(f"{path}: ignoring {len(extra)} unknown tensor(s) {', '.join(extra[:5])}"
                      f"{' ...' if len(extra) > 5 else ''} (written by a newer molecule-gpt?)", CheckpointWarning, stacklevel=4)

    # ---- tokenizer (small, bounded by the header) before the model (large)
    tokenizer = None
    if document.get("tokenizer") is not None:
        tokenizer = _tokenizer(path, document["tokenizer"], vocab)
    if "state" in document:
        _ = document["state"]  # verbatim; the Organism interprets it

    # ---- the model: shapes are now known to match the file, so its memory is bounded by it
    try:
        model = Model.empty(config, vocab, dtype, alphas, trainable=meta["trainable"])
        model.rng.bit_generator.state = meta["rng"]
    except (ValueError, TypeError, KeyError) as exc:
        raise _error(path, f"the model cannot be rebuilt from its metadata ({type(exc).__name__}: {exc})") from None
    except (MemoryError, OverflowError) as exc:
        raise _error(path, _memory_message(config, vocab, exc)) from None
    model.set_adam_steps(meta["adam_steps"])  # trainable flags: Model.empty set them
    dests = _state_destinations(model, optimizer_state)
    if set(dests) != set(expected) or any(dests[k].shape != expected[k] for k in expected):
        # _expected_shapes mirrors Model's layout; tests pin the two together
        raise _error(path, "internal layout mismatch between this checkpoint reader and Model; please report it")
    return model, dests, tokenizer


def _memory_message(config: Config, vocab: int, exc: BaseException) -> str:
    return (f"not enough memory to build its model (batch_size={config.batch_size}, block_size={config.block_size}, "
            f"vocab_size={vocab}): {exc}")


def _check_arenas(path: str, model: Model) -> None:
    """The training arenas the config plans (allocated lazily, at the first step) must fit in
    this machine's memory: a header claiming batch_size 2^40 fails here, not at the first step.

    The exact figure, Model.planned_arena_bytes, binds the engines to plan them (a good part of
    a load's time at the default config: benchmarks/RESULTS.md). So it is asked only when an
    upper bound from the shapes alone does not already fit: a file is refused exactly when the
    exact figure exceeds memory, and an ordinary model stays lazily bound (its first step binds,
    as a freshly built one does)."""
    memory = _physical_memory()
    if _arena_bytes_bound(model.config, model.vocab_size, model.n_delta, model.dtype.itemsize,
                          model.n_threads) <= memory:
        return
    try:
        arena = model.planned_arena_bytes
        if arena > memory:
            raise MemoryError(f"its training arenas would need {arena} bytes, more than this machine has")
    except (ValueError, TypeError, KeyError) as exc:
        raise _error(path, f"the model cannot be rebuilt from its metadata ({type(exc).__name__}: {exc})") from None
    except (MemoryError, OverflowError) as exc:
        raise _error(path, _memory_message(model.config, model.vocab_size, exc)) from None


def _arena_bytes_bound(config: Config, vocab_size: int, n_delta: int, itemsize: int, n_threads: int) -> int:
    """An upper bound of Model.planned_arena_bytes, from shapes alone (no arrays, no binding):
    the arena _core plans for the same shapes with every delta module unfolded on every part of
    every linear (a bound engine carries only the unfolded ones), values plus gradients, for
    every part of a step. It is the tape's own plan (_core.plan_arena runs `record`, as
    Engine.plan does), so it follows every change of the tape's sizes."""
    from . import _core

    N, SS = _core.worker_step(config.batch_size, config.block_size, n_threads)
    value_bytes, _ = _core.plan_arena(config.n_layer, config.n_embd, config.n_head, config.block_size, vocab_size,
                                      config.head_types, config.delta_rank, n_delta, itemsize == 8, N, SS)
    return 2 * n_threads * value_bytes


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound beyond the allocator's
        return 1 << 62


def _config(path: str, raw: Any) -> Config:
    if not isinstance(raw, dict):
        raise _error(path, "the model config is not an object: the header is corrupt")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(raw) - names - set(RETIRED_FIELDS))  # retired ones: written by an older version
    if unknown:
        warnings.warn(f"{path}: ignoring unknown config field(s) {', '.join(unknown)} (written by a newer molecule-gpt?)",
                      CheckpointWarning, stacklevel=5)
    try:
        return Config.from_dict({k: v for k, v in raw.items() if k in names})
    except (ConfigError, TypeError, ValueError) as exc:
        raise _error(path, f"its config is invalid: {exc}") from None


def _expected_count(config: Config, n_delta: int, optimizer_state: bool) -> int:
    """len(_expected_shapes(...)) without building it (O(n_head))."""
    n_pattern = sum(kind != "content" for kind in config.head_types)  # rrpram and hybrid heads
    n_hybrid = sum(kind == "hybrid" for kind in config.head_types)
    base = 2 + (0 if config.tie_embeddings else 1) + config.n_layer * (7 + n_pattern + n_hybrid)
    adapted = config.n_layer * (7 + n_pattern) + 1  # + lm_head
    params = base + n_delta * 2 * adapted
    return params * (3 if optimizer_state else 1) + 1  # + init_embed_snapshot


def _expected_shapes(config: Config, vocab_size: int, n_delta: int, optimizer_state: bool) -> dict[str, tuple]:
    """Every tensor name -> shape the file must hold, from the config alone (no allocation)."""
    shapes = Model.expected_state_shapes(config, vocab_size, n_delta)
    if not optimizer_state:
        shapes = {k: v for k, v in shapes.items() if not k.startswith("adam.")}
    return shapes


@dataclasses.dataclass(slots=True)
class _Dest:
    """Where a tensor's bytes go: flat[start:start + size] of one of the model's 1-D arrays."""
    flat: np.ndarray  # 1-D, C-contiguous, the model's own (group.flat, .m, .v, the snapshot)
    start: int  # elements
    shape: tuple[int, ...]


def _state_destinations(model: Model, optimizer_state: bool) -> dict[str, _Dest]:
    """Every tensor export_state() produces, by the same names, as a span of the model's flat
    arrays (no views built: consecutive spans of one array are read in one call)."""
    dests = {name: _Dest(*span) for name, span in model.state_spans(optimizer_state).items()}
    snap = model.init_embed_snapshot
    for d in dests.values():  # the spans must be the model's memory, not copies
        if d.flat.ndim != 1 or not d.flat.flags.c_contiguous or d.start + math.prod(d.shape) > d.flat.size:
            raise AssertionError("checkpoint reader and Model disagree on the memory layout")
    if not np.shares_memory(dests["init_embed_snapshot"].flat, snap):
        raise AssertionError("init_embed_snapshot is not C-contiguous")
    return dests


def _tokenizer(path: str, doc: Any, vocab_size: int):
    try:
        from .tokenizer import EvolvingTokenizer
    except ImportError as exc:
        raise _error(path, f"it holds a tokenizer but molecule_gpt.tokenizer cannot be imported ({exc})") from None
    try:
        tok = EvolvingTokenizer.from_dict(doc)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _error(path, f"its tokenizer cannot be rebuilt ({type(exc).__name__}: {exc})") from None
    if tok.vocab_size != vocab_size:
        raise _error(path, f"its tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}: "
                           f"the header is corrupt")
    return tok


def _read_tensors(path: str, fh, data_start: int, entries: dict[str, TensorEntry], dests: dict[str, _Dest],
                  digests: dict[str, str]) -> None:
    """Read every tensor straight into the model's arrays (one copy, no mmap: a file truncated
    under us is a short read, not a SIGBUS) and check each tensor's sha256. Tensors stored next
    to each other whose destinations are adjacent too (a whole parameter group, in files this
    module writes) are read with one call."""
    bad = []
    # runs of entries, in file order: (destination or None, [entries])
    runs: list[tuple[_Dest | None, list[TensorEntry]]] = []
    prev_end = None
    for name, e in sorted(entries.items(), key=lambda item: item[1].begin):
        d = dests.get(name)  # by the (migrated) current name; checksums by the stored one
        if runs and d is not None and runs[-1][0] is not None:
            rd, members = runs[-1]
            if rd.flat is d.flat and prev_end == d.start:
                members.append(e)
                prev_end = d.start + math.prod(d.shape)
                continue
        runs.append((d, [e]))
        prev_end = None if d is None else d.start + math.prod(d.shape)
    try:
        fh.seek(data_start)
        for d, members in runs:
            if d is None:  # an ignored tensor: still checksummed, in bounded chunks
                e = members[0]
                h = hashlib.sha256()
                left = e.end - e.begin
                while left:
                    chunk = fh.read(min(left, 1 << 24))
                    if not chunk:
                        raise _error(path, f"the file ended inside tensor {e.stored_name!r}: it is truncated")
                    h.update(chunk)
                    left -= len(chunk)
                if h.hexdigest() != digests[e.stored_name]:
                    bad.append(e.stored_name)
                continue
            first, last = members[0], members[-1]
            itemsize = d.flat.itemsize
            span = d.flat[d.start:d.start + (last.end - first.begin) // itemsize]
            buf = memoryview(span).cast("B")
            got = 0
            while got < len(buf):
                n = fh.readinto(buf[got:])
                if not n:
                    at = next(e for e in members if e.end - first.begin > got)
                    raise _error(path, f"the file ended inside tensor {at.stored_name!r}: it is truncated")
                got += n
            for e in members:  # over the stored (little-endian) bytes
                if hashlib.sha256(buf[e.begin - first.begin:e.end - first.begin]).hexdigest() != digests[e.stored_name]:
                    bad.append(e.stored_name)
            if not np.little_endian:
                span.byteswap(inplace=True)
    except OSError as exc:
        raise _error(path, f"cannot read it ({exc})") from exc
    if bad:
        raise _error(path, f"tensor data does not match its sha256 checksum ({', '.join(map(repr, bad[:5]))}"
                           f"{' ...' if len(bad) > 5 else ''}): the file is corrupt")
