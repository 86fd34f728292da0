"""A size-capped JSON-lines log: the organism's telemetry file.

What it is: an append-only file of one JSON object per line, written by whichever thread emits a
record (the background trainer, mostly), never larger than about `max_bytes`. When an append
takes it past the cap, the older half is dropped: the newest whole lines that fit in
`max_bytes // 2` are rewritten to a temporary file beside it, which replaces the log
atomically, so a reader (or a crash) sees either the old file or the trimmed one, never a
partial line. What it is not: a database; `read_records` parses the file back for the command
line (`molecule-gpt inspect`, `growth`), skipping lines it cannot parse.

    log = JsonlLog(home / "telemetry.jsonl", max_bytes=16 << 20)
    log.write({"phase": "warmup", "step": 1, "loss": 4.5})
    log.close()
    records = read_records(home / "telemetry.jsonl")
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from typing import Iterator

__all__ = ["JsonlLog", "read_records", "trim_jsonl"]


class JsonlLog:
    """Append JSON records to `path`, keeping the file under about `max_bytes` (None: no cap).
    Thread-safe; the file is opened on the first write."""

    def __init__(self, path: str | os.PathLike, max_bytes: int | None = None):
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1024):
            raise ValueError(f"max_bytes must be None or an int >= 1024, got {max_bytes!r}")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._file = None
        self._size = 0

    def write(self, record: dict) -> None:
        line = json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                self._file = open(self.path, "a", encoding="utf-8")
                self._size = self._file.tell()
            self._file.write(line)
            self._file.flush()
            self._size += len(line.encode("utf-8"))
            if self.max_bytes is not None and self._size > self.max_bytes:
                self._file.close()
                self._file = None
                trim_jsonl(self.path, self.max_bytes // 2)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def trim_jsonl(path: str | os.PathLike, keep_bytes: int) -> int:
    """Keep the newest whole lines of `path` that fit in `keep_bytes`, atomically. Returns the
    new size in bytes (the file is left alone when it already fits)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size <= keep_bytes:
        return size
    with open(path, "rb") as f:
        f.seek(size - keep_bytes)
        tail = f.read()
    cut = tail.find(b"\n")
    tail = tail[cut + 1:] if cut >= 0 else b""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(tail)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return len(tail)


def read_records(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a JSONL log in file order; lines that are not JSON objects are skipped."""
    try:
        f = open(path, "r", encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    with f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                yield record
