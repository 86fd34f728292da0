"""The organism's SQLite memory (design.md §7): chat messages, corpus events and growth snapshots,
plus the retrieval that fills the chat prompt and the `forget` that takes things back.

What it is: one `Memory` object per database file, safe to share between the chat thread and
the background trainer. What it is not: the training corpus. The corpus reservoir belongs to
the Organism and is saved in its checkpoint (molecule_gpt.reservoir); Memory keeps no copy of
it, so a line that `forget` removed cannot come back from a second store. `forget` prunes the
live reservoir when it is handed one.

    mem = Memory(home / "memory.sqlite")      # or Memory() for a private in-memory database
    mem.add_message("H", "my cat is called Pixel")
    mem.add_message("A", "Pixel is a good name.")
    recall = mem.recall("what is my cat called?", recent=6, k=4)
    prompt_lines = recall.lines()             # relevant earlier turns, then the recent ones
    mem.add_snapshot(step=1200, vocab_size=90, n_params=150_000, n_delta=1, corpus_chars=40_000,
                     loss=1.9, gamma_sparsity=0.2, gamma_magnitude=3.1, note="warmup")
    mem.forget("pixel", reservoir=organism.reservoir)   # -> ForgetCounts(messages=2, ...)

Concurrency. The file is in WAL mode with a busy timeout. Writes go through one connection
under one lock (one writer), each a `BEGIN IMMEDIATE` transaction, so writers in other
processes queue on the busy timeout instead of failing at commit. Reads use a second
connection (their own lock), each a read transaction: in WAL a reader sees the last commit
and never waits for the writer. An in-memory database has a single connection for both.

Retrieval. `recall(text)` returns the `recent` newest messages and up to `k` earlier ones,
never a recent one twice (nor two with the same text). With FTS5 the earlier ones are those
most relevant to `text` by bm25 over a porter-stemmed index; without FTS5 (`fts=False`, or a
SQLite built without it) they are simply the next newest, and `retrieval_mode` says so.

Schema (normative; `PRAGMA user_version` = SCHEMA_VERSION, upgraded by `_MIGRATIONS` in one
transaction when an older file is opened; a newer file is refused):

    messages       (id INTEGER PRIMARY KEY AUTOINCREMENT, role TEXT 'H'|'A', text TEXT, time REAL)
    corpus_events  (id, time, kind TEXT, lines INTEGER, chars INTEGER, note TEXT)
    growth         (id, time, step, vocab_size, n_params, n_delta, corpus_chars,
                    loss REAL NULL, gamma_sparsity REAL NULL, gamma_magnitude REAL NULL, note TEXT)
    messages_fts   FTS5(text), rowid = messages.id. Derived data, not versioned: present iff
                   FTS5 was in use at the last open; checked (FTS5 integrity-check) and rebuilt
                   from `messages` when missing or inconsistent, dropped when FTS5 is off.

`time` is Unix seconds; ids are increasing, so order by id is the order things happened.
Non-finite losses and gamma values are stored as NULL.

Caps: every table is bounded (max_messages, max_events, max_snapshots); the oldest rows go
in the same transaction as the insert that exceeds the cap. Message text is capped at
max_message_chars.

Forgetting is meant to erase: `secure_delete` zeroes freed pages, the search index is
re-merged (`optimize`) so no old segment still holds the words, and the WAL is checkpointed
and truncated. `ForgetCounts.erased_from_disk` is False when another connection's open read
kept the checkpoint from finishing (the next checkpoint completes the erasure).

Readers. `Memory(path, read_only=True)` opens an existing file for reading only (SQLite
`mode=ro`): it creates no directory, file or table, switches no journal mode, migrates
nothing, and every write method raises MemoryStoreError; it is what commands that only look
(`molecule-gpt growth`) use, so they work on a home they cannot write. A WAL-mode file needs
its shared-memory index (`-shm`) to be read; where that cannot be created (a read-only
directory) the file is opened `immutable`, as a snapshot of what is in the database file
itself (a writer could not be working there either).

Errors a person can hit (locked by another process, corrupt or foreign file, disk full,
read-only or missing directory) raise MemoryStoreError naming the file and the fix; a failed
write leaves the database as it was (the transaction is rolled back).
"""
from __future__ import annotations

import contextlib
import math
import os
import pathlib
import re
import sqlite3
import threading
import time as _time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .errors import MemoryStoreError
from .reservoir import Reservoir, _check_phrase, _check_role
from .text import valid_text

__all__ = ["Memory", "Message", "Recall", "ForgetCounts", "CorpusEvent", "GrowthSnapshot", "SCHEMA_VERSION",
           "fts5_available"]

SCHEMA_VERSION = 1

# (version reached, statements). Each step runs inside the opening transaction; executescript
# is not used because it commits first.
_MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        """CREATE TABLE messages (
            id   INTEGER PRIMARY KEY AUTOINCREMENT,
            role TEXT NOT NULL CHECK (role IN ('H', 'A')),
            text TEXT NOT NULL,
            time REAL NOT NULL)""",
        """CREATE TABLE corpus_events (
            id    INTEGER PRIMARY KEY AUTOINCREMENT,
            time  REAL NOT NULL,
            kind  TEXT NOT NULL,
            lines INTEGER NOT NULL,
            chars INTEGER NOT NULL,
            note  TEXT NOT NULL DEFAULT '')""",
        """CREATE TABLE growth (
            id              INTEGER PRIMARY KEY AUTOINCREMENT,
            time            REAL NOT NULL,
            step            INTEGER NOT NULL,
            vocab_size      INTEGER NOT NULL,
            n_params        INTEGER NOT NULL,
            n_delta         INTEGER NOT NULL,
            corpus_chars    INTEGER NOT NULL,
            loss            REAL,
            gamma_sparsity  REAL,
            gamma_magnitude REAL,
            note            TEXT NOT NULL DEFAULT '')""",
    )),
]
assert _MIGRATIONS[-1][0] == SCHEMA_VERSION

_TABLES = ("messages", "corpus_events", "growth")
_FTS_TABLE = "messages_fts"
_FTS_SHADOWS = tuple(f"{_FTS_TABLE}_{s}" for s in ("data", "idx", "content", "docsize", "config"))
_FTS_CREATE = f"CREATE VIRTUAL TABLE {_FTS_TABLE} USING fts5(text, tokenize = 'porter unicode61')"

# SQLite primary result codes (sqlite3.h) used to classify errors
_BUSY, _LOCKED, _READONLY, _IOERR, _CORRUPT, _FULL, _CANTOPEN, _NOTADB = 5, 6, 8, 10, 11, 13, 14, 26

# ---------------------------------------------------------------------------------------------
# records


@dataclass(frozen=True)
class Message:
    """One chat turn. `score` is the bm25 relevance (higher is better) when it came from search."""
    id: int
    role: str  # "H" (the person) or "A" (the organism)
    text: str
    time: float  # Unix seconds
    score: float | None = None

    @property
    def line(self) -> str:
        """The turn as a prompt/corpus line: "H: text"."""
        return f"{self.role}: {self.text}"


@dataclass(frozen=True)
class CorpusEvent:
    id: int
    time: float
    kind: str  # e.g. "birth", "observe", "forget"
    lines: int
    chars: int
    note: str


@dataclass(frozen=True)
class GrowthSnapshot:
    id: int
    time: float
    step: int
    vocab_size: int
    n_params: int
    n_delta: int
    corpus_chars: int
    loss: float | None
    gamma_sparsity: float | None
    gamma_magnitude: float | None
    note: str


@dataclass(frozen=True)
class Recall:
    """What `Memory.recall` found for one prompt.

    recent    the newest messages, oldest first
    relevant  earlier messages, most relevant first (mode "fts5") or newest first ("recency");
              none of them is in `recent`, no two share a text
    mode      "fts5" or "recency"
    """
    recent: list[Message]
    relevant: list[Message]
    mode: str

    def lines(self) -> list[str]:
        """Prompt lines: the relevant messages in the order they happened, then the recent ones."""
        return [m.line for m in sorted(self.relevant, key=lambda m: m.id)] + [m.line for m in self.recent]


@dataclass(frozen=True)
class ForgetCounts:
    """How much `Memory.forget` removed, per store."""
    messages: int
    index_rows: int
    reservoir_lines: int
    erased_from_disk: bool = field(default=True, compare=False)

    @property
    def total(self) -> int:
        return self.messages + self.index_rows + self.reservoir_lines

    def __str__(self) -> str:
        return (f"forgot {_plural(self.messages, 'message')}, {_plural(self.index_rows, 'search-index row')} "
                f"and {_plural(self.reservoir_lines, 'corpus line')}")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------------------------------------
# search query

_WORD = re.compile(r"\w+")
# words that match nearly every chat line; bm25 would give them ~0 weight anyway, but a match on
# "the" alone would still make a message "relevant"
_STOP = frozenset("""a about all am an and any are as at be been but by can could did do does for from
had has have he her here him his how i if in into is it its just me my no not of on or our she so
than that the their them then there these they this those to too us was we were what when where
which who whom why will with would you your yours""".split())


def _fts_query(text: str, max_terms: int = 24) -> str:
    """An FTS5 query OR-ing the distinct content words of `text`, each quoted (so no user text
    is ever parsed as FTS syntax). Empty when there is no content word."""
    terms: list[str] = []
    for word in _WORD.findall(text.casefold()):
        if word in _STOP or (len(word) < 2 and not word.isdigit()) or word in terms:
            continue
        terms.append(word)
        if len(terms) == max_terms:
            break
    return " OR ".join(f'"{w}"' for w in terms)


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _contains(text: str, needle: str) -> bool:
    """SQL function mg_contains(text, needle): the phrase rule of forget (whitespace-collapsed,
    casefolded substring), the same as Reservoir.forget's."""
    return needle in _normalized(text)


def fts5_available(conn: sqlite3.Connection | None = None) -> bool:
    """Whether this Python's SQLite can create an FTS5 table (checked by creating one in the
    temp schema, which is the only reliable test: FTS5 may be built in or loaded)."""
    own = conn is None
    conn = sqlite3.connect(":memory:") if own else conn
    try:
        conn.execute("CREATE VIRTUAL TABLE temp._mg_fts5_probe USING fts5(x)")
        conn.execute("DROP TABLE temp._mg_fts5_probe")
        return True
    except sqlite3.Error:
        return False
    finally:
        if own:
            conn.close()


# ---------------------------------------------------------------------------------------------
# the memory


class Memory:
    """SQLite log of messages, corpus events and growth snapshots, with retrieval and forget.
    Thread-safe. See the module docstring.

    Memory(path=":memory:", *, max_messages=10000, max_events=10000, max_snapshots=10000,
           max_message_chars=8000, busy_timeout=5.0, fts=None, read_only=False)
      path               database file (its directory is created), or ":memory:"
      max_messages       messages kept (oldest go first); likewise max_events, max_snapshots
      max_message_chars  longer message texts are cut to this length
      busy_timeout       seconds to wait for another process's write lock before failing
      fts                None: FTS5 retrieval when available; False: recency only;
                         True: require FTS5 (MemoryStoreError without it)
      read_only          open an existing file for reading only; writes raise MemoryStoreError
                         (see "Readers" in the module docstring)

    Opening a file creates its directory, switches it to WAL (`journal_mode` says what SQLite
    granted: "wal", or e.g. "delete" on a filesystem without shared memory; "memory" for an
    in-memory database), runs `PRAGMA quick_check` (the stores are capped, so this is quick and
    a damaged file is reported at once rather than mid-chat), upgrades the schema and checks or
    rebuilds the search index. Opened read_only it only checks: the file must exist and hold
    this schema version, and recall uses the search index only if it is there and consistent.
    """

    def __init__(self, path: str | os.PathLike = ":memory:", *, max_messages: int = 10_000,
                 max_events: int = 10_000, max_snapshots: int = 10_000, max_message_chars: int = 8000,
                 busy_timeout: float = 5.0, fts: bool | None = None, read_only: bool = False):
        for name, value in (("max_messages", max_messages), ("max_events", max_events),
                            ("max_snapshots", max_snapshots), ("max_message_chars", max_message_chars)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(busy_timeout, bool) or not isinstance(busy_timeout, (int, float)) \
                or not 0 <= busy_timeout < math.inf:
            raise ValueError(f"busy_timeout must be a number of seconds >= 0, got {busy_timeout!r}")
        if fts not in (None, True, False):
            raise ValueError(f"fts must be None (auto), True or False, got {fts!r}")
        if not isinstance(read_only, bool):
            raise ValueError(f"read_only must be True or False, got {read_only!r}")
        self.path = os.fspath(path)
        self.read_only = read_only
        self.max_messages = int(max_messages)
        self.max_events = int(max_events)
        self.max_snapshots = int(max_snapshots)
        self.max_message_chars = int(max_message_chars)
        self.busy_timeout = float(busy_timeout)
        self._in_memory = self.path == ":memory:" or self.path == ""
        if read_only and self._in_memory:
            raise ValueError("a read-only in-memory database would always be empty; give the path of a memory file")
        self._where = "the in-memory database" if self._in_memory else self.path
        self._write_lock = threading.RLock()
        self._read_lock = self._write_lock if self._in_memory else threading.RLock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._closed = False
        self._fts = False
        try:
            if read_only:
                self._open_read_only(fts)
            else:
                self._open(fts)
        except BaseException:
            self._close_connections()
            raise

    # ---- opening

    def _open(self, fts: bool | None) -> None:
        if not self._in_memory:
            directory = os.path.dirname(os.path.abspath(self.path))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise MemoryStoreError(f"{self.path}: cannot create the directory {directory} ({exc.strerror or exc}); "
                                       f"create it or choose another home directory (--home)") from exc
        self._writer = self._connect()
        with self._guard("opening"):
            self.journal_mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower()
            self._writer.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; WAL keeps it consistent
            if not self._in_memory:
                problem = self._writer.execute("PRAGMA quick_check(1)").fetchone()[0]
                if problem != "ok":
                    raise self._corrupt(problem)
        self._migrate()
        self._setup_index(fts)
        if not self._in_memory:
            self._reader = self._connect()
            with self._guard("opening"):
                self._reader.execute("PRAGMA query_only=ON")
        else:
            self._reader = self._writer

    def _open_read_only(self, fts: bool | None) -> None:
        """Open the file with a read-only connection: check it, never change it."""
        if not os.path.isfile(self.path):
            raise MemoryStoreError(f"{self.path}: no memory database there (a read-only Memory never creates one); "
                                   f"check the path, or let a command that writes (e.g. molecule-gpt chat) create it")
        conn = self._reader = self._connect(mode="ro")
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorcode", None)
            low = str(exc).lower()
            if not (code is not None and code & 0xFF in (_READONLY, _CANTOPEN)) and "readonly" not in low \
                    and "unable to open" not in low:
                raise self._error(exc, "opening") from exc
            # a WAL file whose -shm index cannot be created here (read-only directory): read the
            # database file as it is
            conn.close()
            conn = self._reader = self._connect(mode="ro&immutable=1")
        with self._guard("opening"):
            conn.execute("PRAGMA query_only=ON")
            self.journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0].lower()
            problem = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
            if problem != "ok":
                raise self._corrupt(problem)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise self._newer(version)
            if version < SCHEMA_VERSION:
                tables = self._user_tables(conn)
                if version == 0 and tables:
                    raise self._foreign(tables)
                raise MemoryStoreError(f"{self._where} holds no molecule-gpt memory of this version yet (schema "
                                       f"{version}; this molecule-gpt reads {SCHEMA_VERSION}) and was opened "
                                       f"read-only, which cannot create or upgrade it; open it once for writing "
                                       f"(any command that writes, e.g. molecule-gpt chat)")
            present = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (_FTS_TABLE,)).fetchone() is not None
            available = fts is not False and fts5_available()
            if fts is True and not available:
                raise MemoryStoreError(f"this Python's SQLite {sqlite3.sqlite_version} has no FTS5, which fts=True "
                                       f"requires; pass fts=None to fall back to recency retrieval")
            consistent = False
            if available and present:
                with contextlib.suppress(sqlite3.Error):  # an index FTS5 cannot read: recency instead
                    ours = conn.execute("SELECT count(*), coalesce(sum(id), 0) FROM messages").fetchone()
                    theirs = conn.execute(f"SELECT count(*), coalesce(sum(rowid), 0) FROM {_FTS_TABLE}").fetchone()
                    consistent = tuple(ours) == tuple(theirs)
            if fts is True and not consistent:
                raise MemoryStoreError(f"{self._where} has no consistent search index, and a read-only Memory cannot "
                                       f"build one; pass fts=None for recency retrieval, or open it once for writing")
            self._fts = consistent

    def _connect(self, mode: str | None = None) -> sqlite3.Connection:
        """A connection with this Memory's settings; `mode` ("ro", "ro&immutable=1") opens the
        file through a URI with that mode (read-only connections)."""
        if mode is None:
            target, uri = self.path or ":memory:", False
        else:
            target, uri = pathlib.Path(os.path.abspath(self.path)).as_uri() + f"?mode={mode}", True
        try:
            conn = sqlite3.connect(target, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False, uri=uri)
        except sqlite3.Error as exc:
            raise self._error(exc, "opening") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
            conn.execute("PRAGMA secure_delete=ON")  # forget() erases; freed pages are zeroed
            conn.create_function("mg_contains", 2, _contains, deterministic=True)
        except sqlite3.Error as exc:
            conn.close()
            raise self._error(exc, "opening") from exc
        return conn

    def _migrate(self) -> None:
        with self._transaction("opening") as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise self._newer(version)
            if version == 0:
                tables = self._user_tables(conn)
                if tables:
                    raise self._foreign(tables)
            for target, statements in _MIGRATIONS:
                if version < target:
                    for statement in statements:
                        conn.execute(statement)
                    version = target
            conn.execute(f"PRAGMA user_version = {version}")

    @staticmethod
    def _user_tables(conn: sqlite3.Connection) -> list[str]:
        return [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]

    def _newer(self, version: int) -> MemoryStoreError:
        return MemoryStoreError(f"{self._where} was written by a newer molecule-gpt (memory schema {version}; this "
                                f"version reads up to {SCHEMA_VERSION}); upgrade molecule-gpt, or choose another "
                                f"home directory (--home)")

    def _foreign(self, tables: list[str]) -> MemoryStoreError:
        return MemoryStoreError(f"{self._where} is an SQLite database but not a molecule-gpt memory (it has tables "
                                f"{', '.join(sorted(tables)[:5])} and no schema version); move it aside or choose "
                                f"another file")

    def _setup_index(self, fts: bool | None) -> None:
        available = fts is not False and fts5_available(self._writer)
        if fts is True and not available:
            raise MemoryStoreError(f"this Python's SQLite {sqlite3.sqlite_version} has no FTS5, which fts=True "
                                   f"requires; pass fts=None to fall back to recency retrieval")
        edited = False
        with self._transaction("opening") as conn:
            present = conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (_FTS_TABLE,)).fetchone() is not None
            if present and not (available and self._index_consistent(conn)):
                # FTS off: the index would not be maintained, so it goes (rebuilt from messages at
                # the next open with FTS) and never holds text that forget() cannot reach.
                # FTS on but the index is inconsistent: it is rebuilt below.
                edited = self._drop_index(conn)
                present = False
        if edited:  # the writer's cached schema predates a writable_schema edit
            self._writer.close()
            self._writer = self._connect()
        if available and not present:
            with self._transaction("opening") as conn:
                conn.execute(_FTS_CREATE)
                conn.execute(f"INSERT INTO {_FTS_TABLE} (rowid, text) SELECT id, text FROM messages")
        self._fts = available

    @staticmethod
    def _index_consistent(conn: sqlite3.Connection) -> bool:
        """The index holds exactly the messages' rows and FTS5 finds its own structure sound."""
        conn.execute("SAVEPOINT mg_check")
        try:
            ours = conn.execute("SELECT count(*), coalesce(sum(id), 0) FROM messages").fetchone()
            theirs = conn.execute(f"SELECT count(*), coalesce(sum(rowid), 0) FROM {_FTS_TABLE}").fetchone()
            if tuple(ours) != tuple(theirs):
                return False
            conn.execute(f"INSERT INTO {_FTS_TABLE} ({_FTS_TABLE}) VALUES ('integrity-check')")
            return True
        except sqlite3.Error:
            return False
        finally:
            conn.execute("ROLLBACK TO mg_check")
            conn.execute("RELEASE mg_check")

    @staticmethod
    def _drop_index(conn: sqlite3.Connection) -> bool:
        """Remove the FTS table. When FTS5 cannot even construct it (module missing, structure
        corrupt), DROP TABLE fails; then its shadow tables are dropped as plain tables and its
        schema row is deleted. Returns True when the schema was edited that way."""
        conn.execute("SAVEPOINT mg_drop")
        try:
            conn.execute(f"DROP TABLE {_FTS_TABLE}")
            conn.execute("RELEASE mg_drop")
            return False
        except sqlite3.Error:
            conn.execute("ROLLBACK TO mg_drop")
            conn.execute("RELEASE mg_drop")
        for shadow in _FTS_SHADOWS:
            conn.execute(f"DROP TABLE IF EXISTS {shadow}")
        conn.execute("PRAGMA writable_schema=ON")
        try:
            conn.execute("DELETE FROM sqlite_master WHERE type = 'table' AND name = ?", (_FTS_TABLE,))
        finally:
            conn.execute("PRAGMA writable_schema=OFF")
        return True

    # ---- plumbing

    @contextlib.contextmanager
    def _guard(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise self._error(exc, action) from exc

    @contextlib.contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """One write transaction on the writer connection, under the writer lock; rolled back
        on any exception (a KeyboardInterrupt included)."""
        with self._write_lock:
            self._check_open()
            if self.read_only:
                raise MemoryStoreError(f"{self._where} was opened read-only (Memory(read_only=True)), so "
                                       f"{action} is not possible; open it without read_only to write")
            conn = self._writer
            with self._guard(action):
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def _reading(self, action: str = "reading") -> Iterator[sqlite3.Connection]:
        """One read transaction (a consistent snapshot) on the reader connection."""
        with self._read_lock:
            self._check_open()
            conn = self._reader
            with self._guard(action):
                try:
                    conn.execute("BEGIN")
                    yield conn
                finally:
                    if conn.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("COMMIT")

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("this Memory is closed")

    def _error(self, exc: sqlite3.Error, action: str) -> MemoryStoreError:
        code = getattr(exc, "sqlite_errorcode", None)  # Python >= 3.11
        primary = code & 0xFF if isinstance(code, int) else None
        text = str(exc)
        low = text.lower()
        where = self._where
        if primary in (_BUSY, _LOCKED) or "database is locked" in low or "database table is locked" in low:
            msg = (f"{where} is locked by another process (waited {self.busy_timeout:g} s while {action}); "
                   f"close the other molecule-gpt session using this home directory and retry, or use another "
                   f"home directory (--home)")
        elif primary == _FULL or "disk is full" in low:
            msg = (f"{where}: the disk is full (while {action}); nothing was written. Free some disk space and "
                   f"retry, or use a home directory on another disk (--home)")
        elif primary in (_CORRUPT, _NOTADB) or "malformed" in low or "not a database" in low:
            return self._corrupt(text)
        elif primary == _READONLY or "readonly" in low or "read-only" in low:
            msg = (f"{where} is read-only (while {action}); check the permissions of the file and of its "
                   f"directory, or use another home directory (--home)")
        elif primary == _CANTOPEN or "unable to open" in low:
            msg = (f"cannot open {where} ({text}); check that its directory exists and is writable, or use "
                   f"another home directory (--home)")
        elif primary == _IOERR or "disk i/o error" in low:
            msg = (f"{where}: disk I/O error while {action} ({text}); check free space and the drive, then retry, "
                   f"or use another home directory (--home)")
        else:
            msg = f"{where}: SQLite error while {action}: {text}"
        return MemoryStoreError(msg)

    def _corrupt(self, detail: str) -> MemoryStoreError:
        return MemoryStoreError(f"{self._where} is corrupt or not an SQLite database ({detail}); move it aside "
                                f"(e.g. rename it to {os.path.basename(self.path)}.bad) and a new, empty memory "
                                f"will be created in its place")

    # ---- properties

    @property
    def fts_enabled(self) -> bool:
        """True when retrieval ranks earlier messages with FTS5/bm25."""
        return self._fts

    @property
    def retrieval_mode(self) -> str:
        """"fts5" (relevance by bm25) or "recency" (FTS5 missing or turned off)."""
        return "fts5" if self._fts else "recency"

    @property
    def schema_version(self) -> int:
        with self._reading() as conn:
            return conn.execute("PRAGMA user_version").fetchone()[0]

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"retrieval={self.retrieval_mode}"
        if self.read_only and not self._closed:
            state += ", read-only"
        return f"Memory({self.path!r}, {state})"

    # ---- messages

    def add_message(self, role: str, text: str, *, time: float | None = None) -> int:
        """Store one chat turn (role "H" or "A"); returns its id. Whitespace at the ends is
        stripped and text beyond max_message_chars is cut; empty text is refused; what is not
        valid Unicode becomes U+FFFD (InvalidTextWarning, see molecule_gpt.text)."""
        return self._add_messages([(role, text)], "Memory.add_message()", time)[0]

    def add_messages(self, turns, *, time: float | None = None) -> list[int]:
        """Store several chat turns [(role, text), ...] in order, in one transaction (all of them
        or, on an error, none); returns their ids. Each turn as add_message() takes it."""
        if isinstance(turns, (str, bytes)) or not isinstance(turns, (list, tuple)):
            raise TypeError(f"turns must be a list of (role, text) pairs, got {type(turns).__name__}")
        return self._add_messages(turns, "Memory.add_messages()", time)

    def _add_messages(self, turns, where: str, time: float | None) -> list[int]:
        rows = []
        for turn in turns:
            if not isinstance(turn, (list, tuple)) or len(turn) != 2:
                raise TypeError(f"a turn must be a (role, text) pair, got {turn!r:.80}")
            role, text = _check_role(turn[0]), turn[1]
            if not isinstance(text, str):
                raise TypeError(f"text must be str, got {type(text).__name__}")
            text = valid_text(text, where, stacklevel=4).strip()[:self.max_message_chars]
            if not text:
                raise ValueError("text is empty; there is nothing to remember")
            rows.append((role, text))
        stamp = _time.time() if time is None else float(time)
        ids = []
        if not rows:
            return ids
        with self._transaction("saving a message" if len(rows) == 1 else f"saving {len(rows)} messages") as conn:
            for role, text in rows:
                mid = conn.execute("INSERT INTO messages (role, text, time) VALUES (?, ?, ?)",
                                   (role, text, stamp)).lastrowid
                if self._fts:
                    conn.execute(f"INSERT INTO {_FTS_TABLE} (rowid, text) VALUES (?, ?)", (mid, text))
                ids.append(mid)
            cutoff = self._cap(conn, "messages", self.max_messages)
            if cutoff is not None and self._fts:
                conn.execute(f"DELETE FROM {_FTS_TABLE} WHERE rowid <= ?", (cutoff,))
        return ids

    def messages(self, limit: int | None = None) -> list[Message]:
        """The stored messages, oldest first; with `limit`, only the newest `limit` of them."""
        limit = _limit(limit)
        with self._reading() as conn:
            rows = conn.execute("SELECT id, role, text, time FROM messages ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Message(*r) for r in reversed(rows)]

    def recall(self, text: str, *, recent: int = 6, k: int = 4) -> Recall:
        """The prompt's memory for the person's `text`: the `recent` newest messages and up to
        `k` earlier ones (most relevant by bm25 with FTS5, else the next newest). No message
        appears twice, and an earlier message whose text equals one already chosen is skipped."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        for name, value in (("recent", recent), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        with self._reading("recalling messages") as conn:
            rows = conn.execute("SELECT id, role, text, time FROM messages ORDER BY id DESC LIMIT ?", (recent,)).fetchall()
            recent_msgs = [Message(*r) for r in reversed(rows)]
            before = recent_msgs[0].id if recent_msgs else 2 ** 63 - 1
            seen = {_normalized(m.text) for m in recent_msgs}
            relevant: list[Message] = []
            if k == 0:
                candidates = []
            elif self._fts:
                query = _fts_query(text)
                # over-fetch so that duplicates of chosen texts can be skipped
                candidates = [] if not query else conn.execute(
                    f"SELECT m.id, m.role, m.text, m.time, -bm25({_FTS_TABLE}) FROM {_FTS_TABLE} "
                    f"JOIN messages AS m ON m.id = {_FTS_TABLE}.rowid "
                    f"WHERE {_FTS_TABLE} MATCH ? AND {_FTS_TABLE}.rowid < ? "
                    f"ORDER BY bm25({_FTS_TABLE}), m.id DESC LIMIT ?", (query, before, 4 * k + len(seen))).fetchall()
            else:
                candidates = conn.execute("SELECT id, role, text, time FROM messages WHERE id < ? ORDER BY id DESC "
                                          "LIMIT ?", (before, 4 * k + len(seen))).fetchall()
        for row in candidates:
            key = _normalized(row[2])
            if key in seen:
                continue
            seen.add(key)
            relevant.append(Message(*row))
            if len(relevant) == k:
                break
        return Recall(recent_msgs, relevant, self.retrieval_mode)

    # ---- corpus events and growth snapshots

    def add_corpus_event(self, kind: str, lines: int, chars: int, note: str = "", *, time: float | None = None) -> int:
        """Record a change of the corpus (e.g. "birth", "observe", "forget"); returns its id."""
        if not isinstance(kind, str) or not kind.strip():
            raise ValueError(f"kind must be a non-empty str, got {kind!r}")
        row = (_time.time() if time is None else float(time), kind.strip(), _count("lines", lines),
               _count("chars", chars), _note(note))
        with self._transaction("saving a corpus event") as conn:
            eid = conn.execute("INSERT INTO corpus_events (time, kind, lines, chars, note) VALUES (?, ?, ?, ?, ?)",
                               row).lastrowid
            self._cap(conn, "corpus_events", self.max_events)
        return eid

    def corpus_events(self, limit: int | None = None) -> list[CorpusEvent]:
        """Corpus events, oldest first (the newest `limit` with a limit)."""
        limit = _limit(limit)
        with self._reading() as conn:
            rows = conn.execute("SELECT id, time, kind, lines, chars, note FROM corpus_events ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [CorpusEvent(*r) for r in reversed(rows)]

    def add_snapshot(self, step: int, vocab_size: int, n_params: int, n_delta: int, corpus_chars: int,
                     loss: float | None, gamma_sparsity: float | None, gamma_magnitude: float | None,
                     note: str = "", *, time: float | None = None) -> int:
        """Record a growth snapshot (design.md §7); returns its id. None or non-finite floats are
        stored as NULL."""
        row = (_time.time() if time is None else float(time), _count("step", step), _count("vocab_size", vocab_size),
               _count("n_params", n_params), _count("n_delta", n_delta), _count("corpus_chars", corpus_chars),
               _real("loss", loss), _real("gamma_sparsity", gamma_sparsity),
               _real("gamma_magnitude", gamma_magnitude), _note(note))
        with self._transaction("saving a growth snapshot") as conn:
            sid = conn.execute("INSERT INTO growth (time, step, vocab_size, n_params, n_delta, corpus_chars, loss, "
                               "gamma_sparsity, gamma_magnitude, note) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                               row).lastrowid
            self._cap(conn, "growth", self.max_snapshots)
        return sid

    def snapshots(self, limit: int | None = None) -> list[GrowthSnapshot]:
        """Growth snapshots, oldest first (the newest `limit` with a limit)."""
        limit = _limit(limit)
        with self._reading() as conn:
            rows = conn.execute("SELECT id, time, step, vocab_size, n_params, n_delta, corpus_chars, loss, "
                                "gamma_sparsity, gamma_magnitude, note FROM growth ORDER BY id DESC LIMIT ?",
                                (limit,)).fetchall()
        return [GrowthSnapshot(*r) for r in reversed(rows)]

    @staticmethod
    def _cap(conn: sqlite3.Connection, table: str, cap: int) -> int | None:
        """Delete the oldest rows beyond `cap`; returns the largest deleted id (or None)."""
        row = conn.execute(f"SELECT id FROM {table} ORDER BY id DESC LIMIT 1 OFFSET ?", (cap,)).fetchone()
        if row is None:
            return None
        conn.execute(f"DELETE FROM {table} WHERE id <= ?", (row[0],))
        return row[0]

    def counts(self) -> dict[str, int]:
        """Rows per store: messages, index_rows (0 without FTS5), corpus_events, snapshots."""
        with self._reading() as conn:
            out = {name: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                   for name, table in (("messages", "messages"), ("corpus_events", "corpus_events"),
                                       ("snapshots", "growth"))}
            out["index_rows"] = conn.execute(f"SELECT count(*) FROM {_FTS_TABLE}").fetchone()[0] if self._fts else 0
        return out

    # ---- forgetting

    def forget(self, phrase: str | None = None, *, reservoir: Reservoir | None = None,
               chat_only: bool = True) -> ForgetCounts:
        """Delete messages and their search-index rows: all of them, or those containing `phrase`
        (case-insensitive, whitespace-collapsed). When `reservoir` is given, its lines go by the
        same rule (Reservoir.forget; with chat_only only chat lines, so the birth corpus stays);
        the caller holds whatever lock guards that reservoir, and saves it afterwards.

        The database part is one transaction: on an error nothing is deleted there and the
        reservoir is left untouched."""
        needle = _check_phrase(phrase)
        if reservoir is not None and not isinstance(reservoir, Reservoir):
            raise TypeError(f"reservoir must be a molecule_gpt.reservoir.Reservoir, got {type(reservoir).__name__}")
        with self._transaction("forgetting") as conn:
            if needle is None:
                n_messages = conn.execute("DELETE FROM messages").rowcount
                n_index = conn.execute(f"DELETE FROM {_FTS_TABLE}").rowcount if self._fts else 0
            else:
                n_messages = conn.execute("DELETE FROM messages WHERE mg_contains(text, ?)", (needle,)).rowcount
                n_index = conn.execute(f"DELETE FROM {_FTS_TABLE} WHERE mg_contains(text, ?)",
                                       (needle,)).rowcount if self._fts else 0
            if n_index:
                # rewrite the index into one segment: deleted rows leave their terms behind in
                # older segments until a merge
                conn.execute(f"INSERT INTO {_FTS_TABLE} ({_FTS_TABLE}) VALUES ('optimize')")
        n_lines = reservoir.forget(phrase, chat_only=chat_only) if reservoir is not None else 0
        erased = True
        if not self._in_memory and (n_messages or n_index):
            with self._write_lock, self._guard("forgetting"):
                busy, _, _ = self._writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            erased = busy == 0
        return ForgetCounts(n_messages, n_index, n_lines, erased)

    # ---- closing

    def close(self) -> None:
        """Close the database (idempotent). Later calls raise ValueError."""
        with self._write_lock, self._read_lock:
            if self._closed:
                return
            self._closed = True
            self._close_connections()

    def _close_connections(self) -> None:
        for conn in {id(c): c for c in (self._reader, self._writer) if c is not None}.values():
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._reader = self._writer = None

    def __enter__(self) -> "Memory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# argument checks


def _limit(limit: int | None) -> int:
    if limit is None:
        return -1  # SQLite: no limit
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0:
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
    return int(limit)


def _count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


def _real(name: str, value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number or None, got {value!r}")
    value = float(value)
    return value if math.isfinite(value) else None


def _note(note: object) -> str:
    if not isinstance(note, str):
        raise ValueError(f"note must be str, got {type(note).__name__}")
    return note

