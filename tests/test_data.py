"""The shipped seed corpus and the per-user home directory (molecule_gpt.data)."""
from __future__ import annotations

import pathlib

import pytest

from molecule_gpt import data
from molecule_gpt.config import Config
from molecule_gpt.reservoir import Reservoir, is_chat_line


def test_seed_corpus_is_shipped_and_fits_the_corpus_rules():
    lines = data.seed_corpus_lines()
    assert len(lines) >= 300
    assert all(line and line == line.strip() for line in lines)
    assert max(len(line) for line in lines) <= 240 == Config().max_line_chars
    assert all(line.isascii() and line.isprintable() for line in lines)
    assert len({line.casefold() for line in lines}) == len(lines)  # the reservoir would drop duplicates
    assert not [line for line in lines if is_chat_line(line)]  # forget() must never take seed lines
    # it passes through the reservoir unchanged (no line is split, merged or dropped)
    assert Reservoir(lines, max_lines=Config().max_corpus_lines, rng=0).lines == lines
    text = " ".join(lines).lower()
    for topic in ("molecule", "burst", "delta module", "vocabulary", "immune system", "checkpoint", "forget",
                  "hello", "thank you"):
        assert topic in text, topic


def test_default_home_precedence(monkeypatch, tmp_path):
    home = tmp_path / "user"
    monkeypatch.setattr(pathlib.Path, "home", classmethod(lambda cls: home))
    for var in ("MOLECULE_GPT_HOME", "XDG_DATA_HOME", "LOCALAPPDATA"):
        monkeypatch.delenv(var, raising=False)

    monkeypatch.setattr(data.sys, "platform", "linux")
    assert data.default_home() == home / ".local" / "share" / "molecule-gpt"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/dir")  # ignored, as the XDG spec says
    assert data.default_home() == home / ".local" / "share" / "molecule-gpt"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data.default_home() == tmp_path / "xdg" / "molecule-gpt"

    monkeypatch.setattr(data.sys, "platform", "darwin")
    assert data.default_home() == home / "Library" / "Application Support" / "molecule-gpt"

    monkeypatch.setattr(data.sys, "platform", "win32")
    assert data.default_home() == home / "AppData" / "Local" / "molecule-gpt"
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert data.default_home() == tmp_path / "local" / "molecule-gpt"

    monkeypatch.setenv("MOLECULE_GPT_HOME", str(tmp_path / "explicit"))  # wins everywhere
    for platform in ("win32", "darwin", "linux"):
        monkeypatch.setattr(data.sys, "platform", platform)
        assert data.default_home() == tmp_path / "explicit"
    assert not (tmp_path / "explicit").exists()  # computed, never created
    monkeypatch.setenv("MOLECULE_GPT_HOME", "~/mg")
    assert data.default_home() == pathlib.Path("~/mg").expanduser()


def test_removed_lines_can_come_back_and_held_lines_stay_deduplicated():
    """remove() forgets exactly the removed lines for deduplication: one of them (in any case)
    is new again, a line still held is still refused in any case, and asking to remove a line
    that differs only in case from a held one removes nothing."""
    r = Reservoir(["The cat sits.", "A dog runs.", "Birds sing."], max_lines=100, rng=0)
    assert r.remove(["a dog runs."]) == 0  # not held as such: nothing removed
    assert r.add(["A DOG RUNS."]) == []  # and "A dog runs." still deduplicates it
    assert r.remove(["A dog runs.", "Not here."]) == 1
    assert r.lines == ["The cat sits.", "Birds sing."]
    assert r.add(["a dog RUNS."]) == ["a dog RUNS."]
    assert r.add(["THE CAT SITS.", "birds sing."]) == []
