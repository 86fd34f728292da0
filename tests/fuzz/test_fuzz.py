"""The fuzz targets of tests/fuzz as tests: each on a fixed, seeded corpus of inputs for a few
seconds (the short runs CI makes), longer campaigns marked slow, and checks that each oracle
can fail at all (a harness that passes whatever the package does tests nothing).

What it is not: the coverage-guided runs; those are the fuzz_*.py scripts (README.md).
"""
from __future__ import annotations

import json
import os
import random
import time

import pytest

import fuzz_chat
import fuzz_checkpoint
import fuzz_common
import fuzz_tokenizer
from fuzz_common import FuzzFailure

SEED = 20261206


def fuzz(target, tmp_path, runs, seconds, seed=SEED):
    """run_random with the failing input kept in tmp_path; prints the figures (pytest -s)."""
    stats = fuzz_common.run_random(target.fuzz_one, seed=seed, runs=runs, seconds=seconds, crash_dir=tmp_path)
    print(f"\n{target.__name__}: {stats['runs']} inputs in {stats['seconds']:.1f} s, "
          f"{len(stats['outcomes'])} distinct outcomes")
    return stats


def kinds(stats, prefix):
    return sum(n for label, n in stats["outcomes"].items() if label.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# the checkpoint loader


def check_checkpoint_stats(stats, min_runs):
    assert stats["runs"] >= min_runs, stats["runs"]  # a slower machine still runs a useful share
    out = stats["outcomes"]
    # the mutations reach every stage: loads, framing, tensor table, document, organism state
    assert kinds(stats, "load_checkpoint: loaded") and kinds(stats, "Organism.load: loaded"), out
    for stage in ("the header", "tensor ", "its config is invalid", "the organism state", "its tokenizer cannot"):
        assert kinds(stats, f"CheckpointError: {stage}"), (stage, out)
    assert len(out) >= 25, out


def test_checkpoint_loader_fuzz(tmp_path):
    stats = fuzz(fuzz_checkpoint, tmp_path, runs=1000, seconds=25)
    check_checkpoint_stats(stats, min_runs=250)


@pytest.mark.slow
def test_checkpoint_loader_fuzz_long(tmp_path):
    check_checkpoint_stats(fuzz(fuzz_checkpoint, tmp_path, runs=30_000, seconds=600, seed=SEED + 1), 5000)


def test_checkpoint_oracle_rejects_other_exceptions(tmp_path, monkeypatch):
    data = random.Random(1).randbytes(300)

    def overflow(path):
        raise OverflowError("Python integer -1 out of bounds for uint64")
    monkeypatch.setattr(fuzz_checkpoint.mg, "load_checkpoint", overflow)
    monkeypatch.setattr(fuzz_checkpoint.mg.Organism, "load", overflow)
    with pytest.raises(FuzzFailure, match="OverflowError"):
        fuzz_checkpoint.fuzz_one(data)
    def undocumented(path):  # an OrganismError, but not one of the three organism.py documents
        raise fuzz_checkpoint.OrganismError("the trainer died")
    monkeypatch.setattr(fuzz_checkpoint.mg.Organism, "load", undocumented)
    monkeypatch.setattr(fuzz_checkpoint, "LOADERS", ("Organism.load",))
    with pytest.raises(FuzzFailure, match="OrganismError"):
        fuzz_checkpoint.fuzz_one(data)


def test_resigned_mutations_pass_the_checksums():
    """Re-signed files reach the checks behind the checksums: a document edit that keeps the
    file valid loads, and one that breaks the config is reported as such, not as a bad sum."""
    raw = fuzz_checkpoint.bases()["organism"]
    header, data = fuzz_checkpoint.split(raw)
    meta = header["__metadata__"]
    doc = json.loads(meta["document"])
    doc["model"]["config"]["n_head"] = 3
    meta["document"] = json.dumps(doc)
    fuzz_checkpoint.resign(header, data)
    path = os.path.join(fuzz_checkpoint.workdir(), "resigned.ckpt")
    with open(path, "wb") as f:
        f.write(fuzz_checkpoint.join(header, data))
    with pytest.raises(fuzz_checkpoint.CheckpointError, match="its config is invalid"):
        fuzz_checkpoint.mg.load_checkpoint(path)
    tens = fuzz_checkpoint.tensors_of(*fuzz_checkpoint.split(raw))
    header, data = fuzz_checkpoint.pack(meta, dict(reversed(list(tens.items()))))  # another order, re-signed
    doc["model"]["config"]["n_head"] = 2
    header["__metadata__"]["document"] = json.dumps(doc)
    fuzz_checkpoint.resign(header, data)
    with open(path, "wb") as f:
        f.write(fuzz_checkpoint.join(header, data))
    fuzz_checkpoint.mg.Organism.load(path).close()


# ---------------------------------------------------------------------------------------------
# tokenizer documents


def check_tokenizer_stats(stats, min_runs):
    assert stats["runs"] >= min_runs, stats["runs"]
    out = stats["outcomes"]
    for name in ("chars", "bpe", "strict", "unicode"):
        assert kinds(stats, f"{name}: loaded"), (name, out)
    assert kinds(stats, "TokenizerError: corrupt tokenizer dict: merge"), out  # the deepest checks ran
    assert kinds(stats, "TokenizerError: corrupt tokenizer dict: tokens"), out


def test_tokenizer_documents_fuzz(tmp_path):
    check_tokenizer_stats(fuzz(fuzz_tokenizer, tmp_path, runs=2000, seconds=15), min_runs=500)


@pytest.mark.slow
def test_tokenizer_documents_fuzz_long(tmp_path):
    check_tokenizer_stats(fuzz(fuzz_tokenizer, tmp_path, runs=100_000, seconds=600, seed=SEED + 1), 10_000)


def test_tokenizer_oracle_catches_a_lossy_round_trip(monkeypatch):
    tok = fuzz_tokenizer.EvolvingTokenizer.from_dict(fuzz_tokenizer.bases()["bpe"])
    fuzz_tokenizer.check(tok, fuzz_common.Choices(b""))  # intact: passes
    original = fuzz_tokenizer.EvolvingTokenizer.decode
    monkeypatch.setattr(fuzz_tokenizer.EvolvingTokenizer, "decode", lambda self, ids: original(self, ids[:-2]))
    with pytest.raises(FuzzFailure, match="decode"):
        fuzz_tokenizer.check(tok, fuzz_common.Choices(b""))


# ---------------------------------------------------------------------------------------------
# the chat's stdin

# every kind of line once: invalid UTF-8, an encoded surrogate, control characters, Unicode
# whitespace (NEL, LINE SEPARATOR), a byte order mark, commands (also with invalid bytes and
# leading blanks), a line longer than the memory keeps, and a last line without a newline
TOUR = (b"hello there\ncaf\xe9 au lait \xff\xfe\n\xed\xa0\x80 surrogate\n\x00\x01\x1b[2J ctrl\r\n   \t  \n"
        b"\xc2\x85 nel \xe2\x80\xa8 ls\n/status\n/nope \xff\n  /help\n" + b"long " * 2000 + b"\n"
        b"\xef\xbb\xbfbom\nlast without newline")


def test_expected_messages_follow_the_chat_rules():
    assert fuzz_chat.expected_messages(b"caf\xe9 au lait\n\xff\xfe\n  \n/status\n hi \n/quit\nafter\n") == \
        ["caf\ufffd au lait", "\ufffd\ufffd", "hi"]
    assert fuzz_chat.expected_messages(b"x" * 9000) == ["x" * fuzz_chat.MAX_MESSAGE_CHARS]
    assert fuzz_chat.sanitized(b"  /forget cat") == b"/help"


def test_chat_stdin_fuzz(tmp_path):
    """One organism, four chats: the tour, then three random inputs (each run after the first
    loads the checkpoint the previous one saved)."""
    home, config = tmp_path / "home", fuzz_chat.write_config(tmp_path)
    rng = random.Random(SEED)
    inputs = [TOUR] + [fuzz_chat.chat_input(rng.randbytes(400)) for _ in range(3)]
    start = time.perf_counter()
    for stdin in inputs:
        fuzz_common.run_one(lambda data: fuzz_chat.run_chat(data, home, config), stdin, timeout=300,
                            crash_dir=tmp_path)
    print(f"\nfuzz_chat: {len(inputs)} chats in {time.perf_counter() - start:.1f} s")
    assert len(fuzz_chat.expected_messages(TOUR)) == 8  # 12 lines: a blank one and three commands
    assert len(fuzz_chat.person_messages(home)) == sum(len(fuzz_chat.expected_messages(x)) for x in inputs)


@pytest.mark.slow
def test_chat_stdin_fuzz_long(tmp_path):
    stats = fuzz(fuzz_chat, tmp_path, runs=40, seconds=600, seed=SEED + 1)
    assert stats["runs"] >= 10
