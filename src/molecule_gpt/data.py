"""Data that ships with the package and where per-user data lives.

- `seed_corpus_lines()`: the seed corpus (`data/seed_corpus.txt`, written for this package: who
  the organism is, how it learns, everyday conversation), what `molecule-gpt chat` trains on at
  its first run on a fresh machine. Read through importlib.resources, so it works from a wheel,
  a zip or a source tree.
- `default_home()`: the per-user directory holding the checkpoint, the memory database, the
  corpus reservoir and the telemetry log. It is only computed here, never created.

Note: the module `data.py` and the resource directory `data/` share a name. That is fine for
Python (a plain module wins over a directory without `__init__.py`, which setuptools does not
package as code) and for importlib.resources, which reads `data/` relative to the package.
"""
from __future__ import annotations

import os
import pathlib
import sys
from importlib import resources

__all__ = ["seed_corpus_lines", "default_home", "SEED_CORPUS"]

SEED_CORPUS = "data/seed_corpus.txt"  # inside the molecule_gpt package
APP_NAME = "molecule-gpt"


def seed_corpus_lines() -> list[str]:
    """The shipped seed corpus: its non-empty lines, stripped, in file order."""
    text = resources.files("molecule_gpt").joinpath(SEED_CORPUS).read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def default_home() -> pathlib.Path:
    """The per-user data directory of molecule-gpt, first match wins:

    1. $MOLECULE_GPT_HOME, when set and non-empty;
    2. Windows: %LOCALAPPDATA%\\molecule-gpt (else ~\\AppData\\Local\\molecule-gpt);
    3. macOS: ~/Library/Application Support/molecule-gpt;
    4. elsewhere: $XDG_DATA_HOME/molecule-gpt when XDG_DATA_HOME is an absolute path (the XDG
       spec says relative values are to be ignored), else ~/.local/share/molecule-gpt.

    `~` is expanded. The directory is not created."""
    env = os.environ.get("MOLECULE_GPT_HOME", "").strip()
    if env:
        return pathlib.Path(env).expanduser()
    if sys.platform == "win32":
        local = os.environ.get("LOCALAPPDATA", "").strip()
        base = pathlib.Path(local) if local else pathlib.Path.home() / "AppData" / "Local"
        return base / APP_NAME
    if sys.platform == "darwin":
        return pathlib.Path.home() / "Library" / "Application Support" / APP_NAME
    xdg = os.environ.get("XDG_DATA_HOME", "").strip()
    if xdg and os.path.isabs(os.path.expanduser(xdg)):
        return pathlib.Path(xdg).expanduser() / APP_NAME
    return pathlib.Path.home() / ".local" / "share" / APP_NAME
