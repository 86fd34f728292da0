"""SQLite memory and corpus reservoir (design.md §7): WAL and one writer under concurrent threads and
connections, FTS5/bm25 recall against the recency fallback, exact forget counts (and erasure
from the file), caps, schema versioning, the typed errors a person can hit (corrupt, locked,
disk full), and the reservoir's rules (bound, dedup, newest half, seeded determinism, JSON)."""
from __future__ import annotations

import glob
import json
import os
import sqlite3
import threading

import numpy as np
import pytest

import molecule_gpt as mg
from molecule_gpt.errors import MemoryStoreError, MoleculeError
from molecule_gpt.memory import SCHEMA_VERSION, ForgetCounts, Memory, fts5_available
from molecule_gpt.reservoir import Reservoir

needs_fts5 = pytest.mark.skipif(not fts5_available(), reason="this SQLite has no FTS5")

FILLER = [
    "the weather is mild today and the sky is grey",
    "I went for a walk along the river this morning",
    "we talked about trains and how late they run",
    "a cup of tea helps when the afternoon is long",
    "the bakery on the corner sells warm bread",
    "my sister plays the piano on sundays",
]


def fill(mem: Memory, n: int, start: int = 0) -> list[int]:
    return [mem.add_message("H" if i % 2 == 0 else "A", f"{FILLER[i % len(FILLER)]} ({i})")
            for i in range(start, start + n)]


def file_bytes(path) -> bytes:
    return b"".join(open(p, "rb").read() for p in sorted(glob.glob(str(path) + "*")))


# ---------------------------------------------------------------------------------------------
# storage basics


def test_wal_schema_and_reopen(tmp_path):
    path = tmp_path / "home" / "memory.sqlite"  # the directory is created
    with Memory(path, busy_timeout=2.5) as mem:
        assert mem.journal_mode == "wal"
        assert mem.schema_version == SCHEMA_VERSION
        mid = mem.add_message("H", "  hello there  ")
        mem.add_corpus_event("birth", 10, 400, "seed")
        mem.add_snapshot(0, 90, 1234, 1, 400, float("nan"), 0.25, np.float32(1.5), "birth")
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    raw.close()
    with Memory(path) as mem:
        [m] = mem.messages()
        assert (m.id, m.role, m.text, m.line) == (mid, "H", "hello there", "H: hello there")
        [e] = mem.corpus_events()
        assert (e.kind, e.lines, e.chars, e.note) == ("birth", 10, 400, "seed")
        [s] = mem.snapshots()
        assert (s.step, s.vocab_size, s.n_params, s.n_delta, s.corpus_chars) == (0, 90, 1234, 1, 400)
        assert s.loss is None and s.gamma_sparsity == 0.25 and s.gamma_magnitude == 1.5 and s.note == "birth"


def test_argument_checks_and_closed():
    mem = Memory()
    with pytest.raises(ValueError, match="role must be 'H'"):
        mem.add_message("user", "hi")
    with pytest.raises(ValueError, match="empty"):
        mem.add_message("H", "   ")
    with pytest.raises(ValueError, match="phrase is empty"):
        mem.forget("  ")
    with pytest.raises(ValueError, match="step"):
        mem.add_snapshot(-1, 1, 1, 1, 1, 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="max_messages"):
        Memory(max_messages=0)
    mem.close()
    mem.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        mem.add_message("H", "hi")


def test_message_text_is_capped():
    with Memory(max_message_chars=50) as mem:
        mem.add_message("A", "x" * 500)
        assert mem.messages()[0].text == "x" * 50


# ---------------------------------------------------------------------------------------------
# concurrency: one writer, readers never blocked, other connections queue on the busy timeout


def test_concurrent_writer_reader_threads_and_second_connection(tmp_path):
    path = tmp_path / "memory.sqlite"
    mem = Memory(path, busy_timeout=10)
    other = Memory(path, busy_timeout=10)  # as if a second process had the same home open
    errors: list[BaseException] = []
    done = threading.Event()
    n_writer, n_other = 200, 100

    def guarded(fn):
        def run():
            try:
                fn()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
        return run

    def writer():  # the background trainer and the chat thread share `mem`
        for i in range(n_writer):
            mem.add_message("H" if i % 2 else "A", f"writer message {i} about rivers and tea")
            if i % 4 == 0:
                mem.add_snapshot(i, 90 + i, 1000, 1, 100 * i, 2.0, 0.1, 1.0)

    def other_writer():
        for i in range(n_other):
            other.add_message("A", f"other connection message {i} about bread")

    def reader():
        last = 0
        while not done.is_set():
            recall = mem.recall("rivers tea bread", recent=5, k=3)
            ids = [m.id for m in recall.recent]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)
            assert not set(ids) & {m.id for m in recall.relevant}
            assert all(m.id < ids[0] for m in recall.relevant)
            count = mem.counts()["messages"]
            assert count >= last  # a reader sees commits in order, never a partial write
            last = count

    threads = [threading.Thread(target=guarded(f)) for f in (writer, other_writer)]
    read_thread = threading.Thread(target=guarded(reader))
    read_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    read_thread.join()
    assert not errors, errors
    counts = mem.counts()
    assert counts["messages"] == n_writer + n_other
    assert counts["index_rows"] == (n_writer + n_other if mem.fts_enabled else 0)
    assert counts["snapshots"] == n_writer // 4
    ids = [m.id for m in mem.messages()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    other.close()
    mem.close()


# ---------------------------------------------------------------------------------------------
# retrieval


@needs_fts5
def test_fts_ranking_beats_recency_on_a_planted_old_message(tmp_path):
    planted = "my cat is called Pixel and she sleeps on the piano"
    path = tmp_path / "memory.sqlite"
    with Memory(path) as mem:
        assert mem.fts_enabled and mem.retrieval_mode == "fts5"
        pid = mem.add_message("H", planted)
        fill(mem, 60)
        recall = mem.recall("What is my cat called?", recent=6, k=3)
        assert recall.mode == "fts5"
        assert recall.relevant[0].id == pid and recall.relevant[0].score > 0
        assert recall.lines()[0] == "H: " + planted
        assert len(recall.recent) == 6 and recall.recent[-1].id == pid + 60
    # the same file with FTS forced off: recency alone, which cannot reach the planted message
    with Memory(path, fts=False) as mem:
        assert not mem.fts_enabled and mem.retrieval_mode == "recency"
        recall = mem.recall("What is my cat called?", recent=6, k=3)
        assert recall.mode == "recency"
        assert [m.id for m in recall.relevant] == [pid + 54, pid + 53, pid + 52]  # the next newest
        assert pid not in {m.id for m in recall.relevant + recall.recent}


@needs_fts5
def test_recall_never_returns_a_recent_turn_twice():
    with Memory() as mem:
        old = mem.add_message("H", "tell me about the lighthouse keeper")
        fill(mem, 10)
        dup = mem.add_message("H", "Tell me about the   LIGHTHOUSE keeper")  # same text as `old`
        mem.add_message("A", "the lighthouse keeper lit the lamp every night")
        recent_ids = [mem.add_message("H", "the lighthouse is tall"), mem.add_message("A", "lighthouse lighthouse")]
        recall = mem.recall("lighthouse keeper", recent=2, k=5)
        assert [m.id for m in recall.recent] == recent_ids
        got = [m.id for m in recall.relevant]
        assert not set(got) & set(recent_ids)
        assert len({" ".join(m.text.split()).casefold() for m in recall.relevant}) == len(got)
        assert (old in got) != (dup in got)  # one of the two equal texts, not both
        assert mem.recall("lighthouse", recent=0, k=1).relevant  # no recent window: everything is earlier
        assert mem.recall("the and of", recent=2, k=4).relevant == []  # no content word, nothing relevant
        assert mem.recall("lighthouse", recent=2, k=0).relevant == []
        assert mem.recall('"quoted" OR NEAR( -minus* ^caret', recent=1, k=2).mode == "fts5"  # never parsed as syntax


def test_fallback_when_fts_is_off_then_index_rebuilt_on_reopen(tmp_path):
    path = tmp_path / "memory.sqlite"
    with Memory(path, fts=False) as mem:
        assert mem.counts()["index_rows"] == 0
        pid = mem.add_message("H", "the password for the shed is marmalade")
        fill(mem, 20)
        recall = mem.recall("what is the shed password", recent=4, k=2)
        assert recall.mode == "recency" and pid not in {m.id for m in recall.relevant}
    if not fts5_available():
        return
    with Memory(path) as mem:  # FTS back on: the index is built from the messages written without it
        assert mem.counts()["index_rows"] == 21
        assert mem.recall("what is the shed password", recent=4, k=2).relevant[0].id == pid
    with Memory(path, fts=False):  # turning it off drops the unmaintained index
        pass
    names = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert "messages_fts" not in names


@needs_fts5
def test_index_with_missing_module_or_corrupt_structure_is_replaced(tmp_path):
    path = tmp_path / "memory.sqlite"
    with Memory(path) as mem:
        pid = mem.add_message("H", "the zebracorn lives in the garden")
        fill(mem, 10)
    # 1. the index names a module this SQLite lacks (as when a file moves to a build without
    #    FTS5): it can be neither read nor dropped with DROP TABLE
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("PRAGMA writable_schema=ON")
    raw.execute("UPDATE sqlite_master SET sql = replace(sql, 'fts5', 'fts5_missing') WHERE name = 'messages_fts'")
    raw.close()
    with Memory(path, fts=False) as mem:
        assert mem.counts()["messages"] == 11
        mem.forget("zebracorn")
    assert b"zebracorn" not in file_bytes(path)  # no orphaned copy of the text survives
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not [r for r in raw.execute("SELECT name FROM sqlite_master WHERE name LIKE 'messages_fts%'")]
    raw.close()
    with Memory(path) as mem:
        pid = mem.add_message("H", "the zebracorn came back")
        fill(mem, 5, start=10)
    # 2. the index's structure record is damaged: rebuilt from the messages at open
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("DELETE FROM messages_fts_data")
    raw.close()
    with Memory(path) as mem:
        assert mem.counts()["index_rows"] == mem.counts()["messages"] == 16
        assert mem.recall("zebracorn", recent=2, k=1).relevant[0].id == pid


# ---------------------------------------------------------------------------------------------
# forget and caps


def test_forget_counts_are_exact_and_text_leaves_the_file(tmp_path):
    path = tmp_path / "memory.sqlite"
    mem = Memory(path)
    res = Reservoir(["Pixel is a name for a cat.", "The sea is wide."], 100, 0)  # birth corpus
    texts = [("H", "my cat is called PIXEL"), ("A", "pixel is a lovely name"), ("H", "what about the sea?"),
             ("A", "the sea is wide and blue"), ("H", "does   pixel like the sea?")]
    for role, text in texts:
        mem.add_message(role, text)
        res.add_message(role, text)
    fill(mem, 4)
    fts = mem.fts_enabled
    assert b"PIXEL" in file_bytes(path)

    counts = mem.forget("Pixel", reservoir=res)
    assert (counts.messages, counts.index_rows, counts.reservoir_lines) == (3, 3 if fts else 0, 3)
    assert counts.total == (9 if fts else 6) and counts.erased_from_disk
    assert str(counts) == ("forgot 3 messages, 3 search-index rows and 3 corpus lines" if fts else
                           "forgot 3 messages, 0 search-index rows and 3 corpus lines")
    assert "Pixel is a name for a cat." in res.lines  # chat_only: the birth corpus stays
    assert mem.counts()["messages"] == 6 and mem.counts()["index_rows"] == (6 if fts else 0)
    blob = file_bytes(path).lower()
    assert b"pixel" not in blob and b"the sea is wide and blue" in blob

    assert mem.forget("no such phrase", reservoir=res) == ForgetCounts(0, 0, 0)
    counts = mem.forget(reservoir=res)
    assert (counts.messages, counts.index_rows, counts.reservoir_lines) == (6, 6 if fts else 0, 2)
    assert res.lines == ["Pixel is a name for a cat.", "The sea is wide."]
    assert mem.counts()["messages"] == 0 and mem.recall("sea").recent == []
    assert b"blue" not in file_bytes(path)
    assert res.forget("pixel", chat_only=False) == 1 and res.lines == ["The sea is wide."]
    mem.close()


def test_caps_are_enforced_on_insert(tmp_path):
    with Memory(tmp_path / "m.sqlite", max_messages=20, max_events=5, max_snapshots=7) as mem:
        ids = fill(mem, 50)
        for i in range(12):
            mem.add_corpus_event("observe", i, 10 * i)
            mem.add_snapshot(i, 90, 1000, 1, 10 * i, 1.0, 0.5, 0.5)
        counts = mem.counts()
        assert counts["messages"] == 20 and counts["corpus_events"] == 5 and counts["snapshots"] == 7
        assert counts["index_rows"] == (20 if mem.fts_enabled else 0)
        assert [m.id for m in mem.messages()] == ids[-20:]  # the newest are kept
        assert [s.step for s in mem.snapshots()] == list(range(5, 12))
        assert [e.lines for e in mem.corpus_events(limit=2)] == [10, 11]
        recall = mem.recall(FILLER[0], recent=3, k=10)
        assert all(m.id >= ids[-20] for m in recall.relevant + recall.recent)


# ---------------------------------------------------------------------------------------------
# schema versions and the errors a person can hit


def _newer_database(path):
    """A memory file whose schema version is from a molecule-gpt newer than this one."""
    Memory(path).close()
    raw = sqlite3.connect(path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    return path


def test_newer_or_foreign_database_is_refused(tmp_path):
    newer = _newer_database(tmp_path / "newer.sqlite")
    with pytest.raises(MemoryStoreError, match="newer molecule-gpt.*upgrade"):
        Memory(newer)
    foreign = tmp_path / "foreign.sqlite"
    raw = sqlite3.connect(foreign)
    raw.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, ts REAL, role TEXT, text TEXT)")
    raw.commit()
    raw.close()
    with pytest.raises(MemoryStoreError, match="not a molecule-gpt memory"):
        Memory(foreign)


def test_corrupt_file_gives_the_typed_error_naming_the_file(tmp_path):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not an SQLite database at all\n" * 200)
    with pytest.raises(MemoryStoreError) as info:
        Memory(garbage)
    assert isinstance(info.value, MoleculeError)
    assert str(garbage) in str(info.value) and "move it aside" in str(info.value)

    damaged = tmp_path / "damaged.sqlite"
    with Memory(damaged, fts=False) as mem:
        fill(mem, 400)
    size = damaged.stat().st_size
    assert size > 8 * 4096
    with open(damaged, "r+b") as f:  # page 1 (the schema) intact, the table pages overwritten
        f.seek(2 * 4096)
        f.write(b"\xa5" * (size - 2 * 4096))
    with pytest.raises(MemoryStoreError, match="corrupt") as info:
        Memory(damaged)
    assert str(damaged) in str(info.value)


def test_locked_database_gives_the_typed_error_and_nothing_is_half_written(tmp_path):
    path = tmp_path / "memory.sqlite"
    mem = Memory(path, busy_timeout=0.2)
    mem.add_message("H", "before the lock")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process is writing and does not let go
    try:
        with pytest.raises(MemoryStoreError, match="locked by another process.*--home") as info:
            mem.add_message("H", "during the lock")
        assert str(path) in str(info.value)
        with pytest.raises(MemoryStoreError, match="locked"):
            mem.forget()
        assert [m.text for m in mem.messages()] == ["before the lock"]  # WAL: reads still work
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    mem.add_message("H", "after the lock")
    assert [m.text for m in mem.messages()] == ["before the lock", "after the lock"]
    mem.close()


def test_disk_full_gives_the_typed_error_and_rolls_back(tmp_path):
    path = tmp_path / "memory.sqlite"
    mem = Memory(path)
    mem.add_message("H", "small")
    pages = mem._writer.execute("PRAGMA page_count").fetchone()[0]
    mem._writer.execute(f"PRAGMA max_page_count = {pages + 2}")  # the file cannot grow: SQLITE_FULL
    with pytest.raises(MemoryStoreError, match="disk is full.*nothing was written") as info:
        for i in range(200):
            mem.add_message("A", f"{i} " + "long text that fills pages " * 40)
    assert str(path) in str(info.value)
    before = mem.counts()["messages"]
    mem._writer.execute("PRAGMA max_page_count = 1073741823")
    mem.add_message("H", "space again")
    assert mem.counts()["messages"] == before + 1
    assert mem._writer.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    mem.close()


def test_interrupted_write_is_rolled_back(monkeypatch):
    mem = Memory()
    mem.add_message("H", "kept")

    def interrupt(*args):
        raise KeyboardInterrupt  # Ctrl-C after the insert, before the cap and the commit

    monkeypatch.setattr(Memory, "_cap", staticmethod(interrupt))
    with pytest.raises(KeyboardInterrupt):
        mem.add_message("A", "half written")
    monkeypatch.undo()
    assert [m.text for m in mem.messages()] == ["kept"]
    assert mem.counts()["index_rows"] == (1 if mem.fts_enabled else 0)
    mem.add_message("A", "next")  # the connection is usable: no transaction left open
    assert [m.text for m in mem.messages()] == ["kept", "next"]
    mem.close()


def test_unwritable_location_gives_the_typed_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(MemoryStoreError, match="cannot create the directory"):
        Memory(blocker / "sub" / "memory.sqlite")


@needs_fts5
def test_read_only_memory_reads_everything_and_never_writes(tmp_path):
    path = tmp_path / "memory.sqlite"
    mem = Memory(path)
    fill(mem, 12)
    mem.add_message("H", "my cat is called Pixel")
    mem.add_corpus_event("birth", 10, 300)
    mem.add_snapshot(5, 40, 1000, 1, 300, 2.5, 0.1, 0.3, "warmup")
    want = (mem.messages(), mem.corpus_events(), mem.snapshots(), mem.counts(),
            mem.recall("what is my cat called?", recent=2, k=2))
    mem.close()
    before = path.read_bytes()
    ro = Memory(path, read_only=True)
    assert ro.read_only and ro.fts_enabled and "read-only" in repr(ro)
    got = (ro.messages(), ro.corpus_events(), ro.snapshots(), ro.counts(),
           ro.recall("what is my cat called?", recent=2, k=2))
    assert got == want
    for write in (lambda: ro.add_message("H", "hello"), lambda: ro.add_corpus_event("observe", 1, 5),
                  lambda: ro.add_snapshot(6, 40, 1000, 1, 300, 2.4, 0.1, 0.3), lambda: ro.forget("pixel")):
        with pytest.raises(MemoryStoreError, match="read-only.*without read_only"):
            write()
    # the connection itself is SQLite's read-only mode (mode=ro), not just a Python-side refusal
    conn = ro._reader
    conn.execute("PRAGMA query_only=OFF")
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("INSERT INTO messages (role, text, time) VALUES ('H', 'sneaked in', 0)")
    ro.close()
    assert path.read_bytes() == before
    assert [m.text for m in Memory(path).messages()][-1] == "my cat is called Pixel"


def test_read_only_memory_creates_nothing_and_refuses_what_it_cannot_read(tmp_path):
    missing = tmp_path / "no" / "such" / "memory.sqlite"
    with pytest.raises(MemoryStoreError, match="no memory database there"):
        Memory(missing, read_only=True)
    assert not (tmp_path / "no").exists()  # no directory, no file
    empty = tmp_path / "empty.sqlite"
    sqlite3.connect(empty).close()  # an SQLite file without our schema: not created or migrated here
    with pytest.raises(MemoryStoreError, match="open it once for writing"):
        Memory(empty, read_only=True)
    assert empty.stat().st_size == 0
    newer = _newer_database(tmp_path / "newer.sqlite")
    with pytest.raises(MemoryStoreError, match="newer molecule-gpt"):
        Memory(newer, read_only=True)
    with pytest.raises(ValueError, match="in-memory"):
        Memory(read_only=True)
    with pytest.raises(ValueError, match="read_only"):
        Memory(empty, read_only="yes")


# ---------------------------------------------------------------------------------------------
# the corpus reservoir


def test_reservoir_bound_dedup_and_newest_half():
    res = Reservoir(max_lines=10, rng=0, max_line_chars=40)
    assert res.add(["Hello world", "hello   WORLD", "  ", "hello world\n"]) == ["Hello world"]  # dedup, casefold
    assert "HELLO WORLD" in res and len(res) == 1
    history = ["Hello world"]
    rng = np.random.default_rng(1)
    for step in range(200):
        batch = [f"line {step} {j}" for j in range(int(rng.integers(1, 8)))]
        batch += [batch[0].upper()]  # a case variant inside the batch: skipped
        added = res.add(batch)
        assert added == batch[:-1]
        history += added
        lines = res.lines
        assert len(lines) == min(10, len(history))  # bounded, and full once there is enough
        assert lines[-5:] == history[-5:]  # the newest half is always kept, in order
        it = iter(history)
        assert all(x in it for x in lines)  # what is kept is in the order it came
        assert len({x.casefold() for x in lines}) == len(lines)


def test_reservoir_keeps_newest_half_and_samples_older_in_order():
    res = Reservoir([f"old {i}" for i in range(8)], max_lines=8, rng=3)
    assert len(res) == 8
    res.add([f"new {i}" for i in range(3)])
    lines = res.lines
    assert len(lines) == 8
    assert lines[-4:] == ["old 7", "new 0", "new 1", "new 2"]  # newest max_lines // 2, in order
    older = lines[:4]
    assert all(x.startswith("old ") for x in older)
    assert [int(x.split()[1]) for x in older] == sorted(int(x.split()[1]) for x in older)  # order kept
    tiny = Reservoir(max_lines=1, rng=0)
    for i in range(5):
        tiny.add([f"line {i}"])
        assert tiny.lines == [f"line {i}"]  # a cap of one keeps the newest line


def test_reservoir_is_deterministic_with_a_seed_and_round_trips_through_json(tmp_path):
    def run(seed, split_at=None):
        res = Reservoir([f"seed line {i}" for i in range(30)], max_lines=16, rng=seed)
        for i in range(40):
            if i == split_at:
                res = Reservoir.from_json(json.loads(json.dumps(res.to_json())))
            res.add_message("H" if i % 2 else "A", f"Message {i}. It has two sentences {i}!")
        return res.lines

    assert run(7) == run(7)
    assert run(7) != run(8)
    assert run(7, split_at=13) == run(7)  # the RNG state travels with the JSON

    res = Reservoir(["a b c"], max_lines=4, rng=5, max_line_chars=12)
    res.save(tmp_path / "reservoir.json")
    back = Reservoir.load(tmp_path / "reservoir.json")
    assert back.to_dict() == res.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == ["reservoir.json"]  # no temporary file left
    shared = np.random.default_rng(0)
    assert Reservoir.from_dict(res.to_dict(), rng=shared).rng is shared
    with pytest.raises(ValueError, match="not a molecule_gpt reservoir"):
        Reservoir.from_dict({"lines": []})
    bad = res.to_dict()
    bad["rng"] = {"bit_generator": "os.system"}
    with pytest.raises(ValueError, match="unknown RNG"):
        Reservoir.from_dict(bad)


def test_reservoir_caps_line_length_without_dropping_text():
    res = Reservoir(max_lines=100, rng=0, max_line_chars=20)
    text = "one two three four five six seven eight nine ten " + "x" * 45
    added = res.add([text])
    assert all(len(x) <= 20 for x in added)
    assert "".join(added).replace(" ", "") == text.replace(" ", "")  # every character kept
    added = res.add_message("A", "Short one. And then a much longer second sentence follows here!")
    assert added[0] == "A: Short one."
    assert all(x.startswith("A: ") and len(x) <= 20 for x in added)
    assert " ".join(x[3:] for x in added[1:]) == "And then a much longer second sentence follows here!"
    with pytest.raises(ValueError, match="role"):
        res.add_message("B", "hi")
    with pytest.raises(TypeError, match="one str"):
        res.add("a single string")
    with pytest.raises(ValueError, match="max_lines"):
        Reservoir(max_lines=0)


def test_text_that_is_not_valid_unicode_is_replaced_and_the_turn_stored(tmp_path):
    """Lone surrogates (undecodable bytes read with surrogateescape) at every entrance: replaced
    with U+FFFD, an InvalidTextWarning, the turn stored whole in memory and corpus."""
    org = mg.Organism(mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=16, head_types=("content", "hybrid"),
                                warmup_steps=0),
                      ["a first line of text.", "a second line of text."], memory=tmp_path / "m.sqlite")
    with pytest.warns(mg.InvalidTextWarning, match=r"observe\(\): 1 character"):
        assert org.observe("hello \udcff world", speaker="H") == 1
    assert org.memory.messages()[-1].text == "hello \ufffd world"
    assert "H: hello \ufffd world" in org.reservoir.lines + org.heard_val_lines
    with pytest.warns(mg.InvalidTextWarning, match="2 character"):
        org.observe(["caf\udce9 one", "caf\udce9 two"])
    with pytest.warns(mg.InvalidTextWarning):
        org.forget("caf\udce9")
    with pytest.warns(mg.InvalidTextWarning):
        org.memory.add_message("A", "\ud800 alone")
    with pytest.warns(mg.InvalidTextWarning, match="the corpus"):
        mg.Organism(mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=16, head_types=("content", "hybrid")),
                    ["x\udcff y"])
    org.save(tmp_path / "o.ckpt")  # everything stored is writable
    org.close()


def test_repeated_chat_turns_all_reach_the_memory(tmp_path):
    """Deduplication is the corpus's policy; every turn is a message."""
    org = mg.Organism(mg.Config(n_layer=1, n_embd=16, n_head=2, block_size=16, head_types=("content", "hybrid")),
                      ["some corpus line here.", "another corpus line."], memory=tmp_path / "m.sqlite")
    turns = ["yes", "ok then", "yes", "Yes", "ok then"]
    for t in turns:
        org.observe(t, speaker="H")
    assert [m.text for m in org.memory.messages()] == turns
    assert sum(1 for x in org.reservoir.lines + org.heard_val_lines if x.lower() in ("h: yes", "h: ok then")) == 2
    org.close()


def test_add_messages_stores_all_in_order_or_none(tmp_path):
    """add_messages stores several turns in one transaction: all of them, in order, with the
    rules of add_message; a bad turn anywhere stores none."""
    mem = mg.Memory(tmp_path / "m.sqlite")
    ids = mem.add_messages([("H", "  hello there "), ("A", "hi"), ("H", "bye")])
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [(m.role, m.text) for m in mem.messages()] == [("H", "hello there"), ("A", "hi"), ("H", "bye")]
    for bad, error in (([("H", "fine"), ("X", "who")], ValueError), ([("H", "fine"), ("A", "   ")], ValueError),
                       ([("H", "fine"), ("A", 3)], TypeError), ([("H", "fine"), ("A",)], TypeError),
                       ("H: fine", TypeError)):
        with pytest.raises(error):
            mem.add_messages(bad)
        assert len(mem.messages()) == 3
    assert mem.add_messages([]) == []
    mem.close()
