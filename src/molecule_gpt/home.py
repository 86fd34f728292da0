"""The home: the directory that holds one organism, and what a command needs to use it.

What it is: the storage layer of the command line (and of anything else that keeps an
organism on disk the same way): the layout below, the settings of a home (a JSON config file
whose keys are Config fields or SETTINGS), the writer lock, opening (with recovery from a
damaged save), birth and adoption, saving, archiving and trimming. What it is not: the
command line's terminal output, REPL or argument parsing (molecule_gpt.cli), nor the
organism itself (molecule_gpt.organism).

Layout (`Home(path, options)`; the command line's `--home DIR`, default
molecule_gpt.default_home()):

    organism.ckpt        the checkpoint (molecule_gpt.checkpoint: model, optimizer, tokenizer,
                         organism state, which includes the corpus reservoir); organism.ckpt.prev
                         is the save before it
    checkpoints/         older checkpoints, one per command that saved (keep_checkpoints kept)
    memory.sqlite        messages, corpus events, growth snapshots (molecule_gpt.Memory)
    telemetry.jsonl      one JSON record per training step or event (max_telemetry_mb)
    .lock                held while a command that writes runs (chat, train, import, forget)

Every store is capped: corpus lines (Config.max_corpus_lines), messages (max_messages),
telemetry size (max_telemetry_mb), old checkpoints (keep_checkpoints).

Config fields fixed at birth (FIXED_AT_BIRTH, marked on Config itself) can only be set when an
organism is born; the other Config fields also apply to an existing organism and are saved
with it. Errors a person can fix are HomeError (one line, a hint, an exit code); the command
line prints them (it calls them CLIError).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import errno
import json
import math
import os
import pathlib
import re
import sys
from typing import Any, Callable, Iterator, NamedTuple

from .config import RETIRED_FIELDS, Config
from .data import seed_corpus_lines
from .errors import CheckpointError, ConfigError, MoleculeError
from .generation import check_decode_precision
from .memory import Memory
from .organism import Organism
from .telemetry import trim_jsonl
from .tokenizer import read_corpus

__all__ = ["ARCHIVE", "CHECKPOINT", "CONFIG_FIELDS", "FIXED_AT_BIRTH", "LOCK", "MEMORY", "SETTINGS", "TELEMETRY",
           "SETTING_TABLE", "Home", "HomeError", "Options", "Setting", "load_options",
           "read_text_lines"]

CHECKPOINT = "organism.ckpt"
MEMORY = "memory.sqlite"
TELEMETRY = "telemetry.jsonl"
ARCHIVE = "checkpoints"
LOCK = ".lock"

class Setting(NamedTuple):
    """A setting of the home (not of the model): its default, what values it takes (a test and
    the words for it) and what it does."""
    default: Any
    valid: Callable[[Any], bool]
    takes: str
    doc: str


# The settings of a home, one row each; a config file may set them beside Config fields.
SETTING_TABLE: dict[str, Setting] = {
    "seed": Setting(0, lambda v: _is_int(v) and v >= 0, "an int >= 0",
                    "seeds a new organism (init, corpus split, sampling of batches)"),
    "dtype": Setting("float32", lambda v: v in ("float32", "float64"), '"float32" or "float64"',
                     "of a new organism's parameters (import: float64 unless set)"),
    "corpus": Setting(None, lambda v: v is None or isinstance(v, str), "a path or null",
                      "a text file a new organism is born from (default: the shipped seed corpus)"),
    "max_messages": Setting(10_000, lambda v: _is_int(v) and v >= 1, "an int >= 1",
                            "chat messages kept in memory.sqlite (oldest go first)"),
    "max_telemetry_mb": Setting(16.0, lambda v: _is_number(v) and 0.01 <= v < math.inf, "a number >= 0.01",
                                "telemetry.jsonl is cut to its newer half past this size"),
    "keep_checkpoints": Setting(3, lambda v: _is_int(v) and v >= 0, "an int >= 0", "old checkpoints kept in checkpoints/"),
    "autosave_turns": Setting(4, lambda v: _is_int(v) and v >= 1, "an int >= 1",
                              "chat saves the organism every this many turns (and at /save, /quit)"),
    "recall_recent": Setting(6, lambda v: _is_int(v) and v >= 0, "an int >= 0", "chat prompt: the newest messages ..."),
    "recall_relevant": Setting(4, lambda v: _is_int(v) and v >= 0, "an int >= 0",
                               "... plus this many earlier ones most relevant to what you said"),
}
# views of the table by column (the names the command line has always exported)
SETTINGS: dict[str, Any] = {name: s.default for name, s in SETTING_TABLE.items()}
_SETTING_CHECKS: dict[str, Callable[[Any], bool]] = {name: s.valid for name, s in SETTING_TABLE.items()}
_SETTING_HELP: dict[str, str] = {name: s.takes for name, s in SETTING_TABLE.items()}
# the shapes of the parameters and how they were drawn: an organism keeps them for life (marked
# on Config itself)
FIXED_AT_BIRTH = Config.fixed_at_birth()
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(Config))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class HomeError(Exception):
    """An error a person can fix: one line, a hint, an exit code."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1):
        super().__init__(message)
        self.message, self.hint, self.code = message, hint, code


# ---------------------------------------------------------------------------------------------
# options: config file + flags


@dataclasses.dataclass
class Options:
    config: dict  # Config fields from the file (validated against Config)
    settings: dict  # SETTINGS, file values over defaults
    given: frozenset = frozenset()  # the SETTINGS the file set (the rest are defaults)


def load_options(path: str | None) -> Options:
    """Read and validate `--config FILE.json`; no file gives the defaults."""
    settings = dict(SETTINGS)
    if path is None:
        return Options({}, settings)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise HomeError(f"cannot read the config file {path}: {exc.strerror or exc}",
                       "pass --config a readable JSON file") from None
    except UnicodeDecodeError:
        raise HomeError(f"the config file {path} is not UTF-8 text", "save it as UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise HomeError(f"the config file {path} is not valid JSON: {exc}", "fix the JSON syntax at that place") from None
    if not isinstance(data, dict):
        raise HomeError(f"the config file {path} must hold a JSON object ({{...}}), not a {type(data).__name__}")
    config, problems = {}, []
    for key, value in data.items():
        if key in SETTINGS:
            if not _SETTING_CHECKS[key](value):
                problems.append(f"{key!r} must be {_SETTING_HELP[key]}, got {value!r}")
            settings[key] = value
        elif key in CONFIG_FIELDS:
            config[key] = value
        elif key in RETIRED_FIELDS:
            pass  # a field earlier versions had: accepted, ignored
        else:
            near = difflib.get_close_matches(key, list(CONFIG_FIELDS) + list(SETTINGS), n=1)
            problems.append(f"unknown option {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""))
    # Config names the first bad field; set it aside and validate again, so every one is named
    trial = dict(config)
    while True:
        try:
            Config.from_dict(trial)
            break
        except (MoleculeError, TypeError) as exc:
            problems.append(str(exc))
            named = [k for k in re.findall(r"Config\.(\w+)", str(exc)) if k in trial]
            if not named:
                break
            del trial[named[0]]
    if problems:
        raise HomeError(f"{path}: " + "; ".join(problems),
                       "keys are molecule_gpt.Config fields or command-line settings; see `molecule-gpt --help`")
    return Options(config, settings, frozenset(k for k in data if k in SETTINGS))


# ---------------------------------------------------------------------------------------------
# the home directory


class Home:
    """One organism's directory: paths, the writer lock, opening and saving (see module doc)."""

    def __init__(self, path: str | os.PathLike, options: Options):
        self.path = pathlib.Path(path).expanduser()
        self.options = options
        self.settings = options.settings
        self.checkpoint = self.path / CHECKPOINT
        self.memory_path = self.path / MEMORY
        self.telemetry = self.path / TELEMETRY
        self.archive = self.path / ARCHIVE
        self.saved = False  # whether this command saved the organism (then it is archived)

    def __str__(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.checkpoint.exists()

    def create(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HomeError(f"cannot create the home directory {self.path}: {exc.strerror or exc}",
                           "pick a writable place with --home DIR") from None

    @contextlib.contextmanager
    def locked(self) -> Iterator["Home"]:
        """Hold the writer lock: one command changes this home at a time."""
        self.create()
        try:
            import fcntl
        except ImportError:  # Windows: no advisory lock; SQLite and atomic saves still hold
            yield self
            return
        f = open(self.path / LOCK, "a+")
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise HomeError(f"{self.path} is in use by another molecule-gpt ({holder})",
                               "close the other chat or training first, or use another --home") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            yield self
        finally:
            f.close()  # closing releases the lock

    def memory(self) -> Memory:
        return Memory(self.memory_path, max_messages=self.settings["max_messages"])

    def _organism_kwargs(self, memory: Memory | None, telemetry: bool) -> dict:
        """The memory and (unless telemetry is off) the capped telemetry log of this home."""
        if not telemetry:
            return {"memory": memory}
        return {"memory": memory, "telemetry_path": self.telemetry, "telemetry_max_bytes": self.telemetry_bytes()}

    def telemetry_bytes(self) -> int:
        return max(1024, int(self.settings["max_telemetry_mb"] * (1 << 20)))

    def open(self, *, memory: Memory | None = None, telemetry: bool = True, recover: bool = False) -> Organism:
        """Load the organism of this home; a damaged checkpoint names its `.prev` (used with recover)."""
        kwargs = self._organism_kwargs(memory, telemetry)
        try:
            org = Organism.load(self.checkpoint, **kwargs)
        except CheckpointError as exc:
            damage = getattr(exc, "reason", str(exc))
            saves = self.earlier_saves()
            if not saves:
                raise HomeError(f"the checkpoint is damaged: {damage}",
                               f"no earlier save exists; move {self.checkpoint} away to start a new organism") from None
            if not recover:
                raise HomeError(f"the checkpoint is damaged: {damage}",
                               f"{len(saves)} earlier save(s) exist ({saves[0].name} is the newest): rerun with "
                               f"--recover to load the newest intact one") from None
            org = None
            for path in saves:
                try:
                    org = Organism.load(path, **kwargs)
                    break
                except CheckpointError:
                    continue
            if org is None:
                raise HomeError(f"the checkpoint and its {len(saves)} earlier save(s) are all damaged: {damage}",
                               f"move {self.checkpoint} away to start a new organism") from None
            print(f"molecule-gpt: the checkpoint was damaged; recovered {path} (step {org.trainer.steps})",
                  file=sys.stderr)
        self.apply_config(org)
        return org

    def apply_config(self, org: Organism) -> None:
        """Config fields from the file onto an existing organism (architecture fields must match)."""
        changes = self.options.config
        if not changes:
            return
        current = org.config.to_dict()
        for key in FIXED_AT_BIRTH:
            if key in changes and _normalized(changes[key]) != _normalized(current[key]):
                raise HomeError(f"the config sets {key}={changes[key]!r} but the organism in {self.path} was born with "
                               f"{key}={current[key]!r}; the shapes of its parameters are fixed for life",
                               "remove it from the config, or use a new --home for a new organism")
        try:
            merged = Config.from_dict({**current, **changes})
            if "decode_precision" in changes:
                check_decode_precision(merged, org.model.dtype)
        except MoleculeError as exc:
            raise HomeError(str(exc)) from None
        for key in changes:
            setattr(org.config, key, getattr(merged, key))

    def birth(self, corpus_path: str | None = None, *, memory: Memory | None = None,
              telemetry: bool = True) -> tuple[Organism, str]:
        """A new organism from `corpus_path` (or the config's "corpus", or the seed corpus)."""
        corpus_path = corpus_path or self.settings["corpus"]
        if corpus_path is None:
            lines, source = seed_corpus_lines(), "the seed corpus"
        else:
            lines = read_text_lines(corpus_path)
            source = corpus_path
        try:
            config = Config.from_dict(self.options.config)
            check_decode_precision(config, self.settings["dtype"])
        except MoleculeError as exc:
            raise HomeError(str(exc)) from None
        org = Organism(config, lines, seed=self.settings["seed"], dtype=self.settings["dtype"],
                       **self._organism_kwargs(memory, telemetry))
        return org, f"{len(lines)} lines of {source}"

    def adopt(self, original: str, corpus_path: str | None = None, *, memory: Memory | None = None,
              telemetry: bool = True) -> tuple[Organism, str]:
        """An organism adopted from the original program's JSON checkpoint `original`, with the
        corpus `corpus_path` (or the config's "corpus"; none: it starts with an empty corpus).
        Config fields of the config file change the original's (not its architecture); the
        parameters stay float64, the original's precision, unless the config file sets dtype."""
        corpus_path = corpus_path or self.settings["corpus"]
        lines = read_text_lines(corpus_path) if corpus_path is not None else None
        dtype = self.settings["dtype"] if "dtype" in self.options.given else "float64"
        try:
            org = Organism.from_original(original, corpus=lines, seed=self.settings["seed"], dtype=dtype,
                                         config=dict(self.options.config), **self._organism_kwargs(memory, telemetry))
        except ConfigError as exc:  # a bad field, or one the original's architecture fixes
            raise HomeError(str(exc), "fix or remove that field in the config file (an adopted organism keeps the "
                                     "original's architecture)") from None
        source = f"{original}" + (f" with {len(lines)} lines of {corpus_path}" if lines else " without a corpus")
        return org, source

    def save(self, org: Organism) -> None:
        self.create()
        try:
            org.save(self.checkpoint)
            self.saved = True
        except OSError as exc:
            raise _save_error(self.checkpoint, exc) from None
        except CheckpointError as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else None
            if cause is not None:
                raise _save_error(self.checkpoint, cause) from None
            raise

    def earlier_saves(self) -> list[pathlib.Path]:
        """organism.ckpt.prev and the archived checkpoints, newest first (by modification time),
        leaving out hard links of organism.ckpt itself."""
        found = [pathlib.Path(f"{self.checkpoint}.prev")] + (sorted(self.archive.glob("organism-*.ckpt"))
                                                              if self.archive.is_dir() else [])
        current = self.checkpoint.stat() if self.checkpoint.exists() else None

        def same_file(p: pathlib.Path) -> bool:  # a hard link of the checkpoint holds the same bytes
            st = p.stat()
            return current is not None and (st.st_dev, st.st_ino) == (current.st_dev, current.st_ino)

        found = [p for p in found if p.is_file() and not same_file(p)]
        return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)

    def archive_current(self) -> None:
        """After a command that saved, keep a copy of the checkpoint in checkpoints/ (a hard link
        when the file system allows: the next save replaces organism.ckpt with a new file, so the
        link stays intact); prune to keep_checkpoints."""
        keep = self.settings["keep_checkpoints"]
        if keep == 0 or not self.saved or not self.checkpoint.exists():
            return
        self.archive.mkdir(exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        target = self.archive / f"organism-{stamp}.ckpt"
        try:
            os.link(self.checkpoint, target)
        except OSError:
            import shutil
            shutil.copyfile(self.checkpoint, target)
        old = sorted(self.archive.glob("organism-*.ckpt"))
        for path in old[:-keep]:
            path.unlink(missing_ok=True)

    def trim_telemetry(self) -> None:
        if self.telemetry.exists() and self.telemetry.stat().st_size > self.telemetry_bytes():
            trim_jsonl(self.telemetry, self.telemetry_bytes() // 2)


def _normalized(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _save_error(path, exc: OSError) -> HomeError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return HomeError(f"the disk is full: cannot save {path}",
                        "free some space and save again; the previous checkpoint on disk is intact")
    return HomeError(f"cannot save {path}: {exc.strerror or exc}",
                    "check that the home directory is writable; the previous checkpoint on disk is intact")


def read_text_lines(path: str) -> list[str]:
    """A corpus file's non-empty lines; invalid UTF-8 is replaced (and said), an empty file refused."""
    try:
        corpus = read_corpus(path)
    except FileNotFoundError:
        raise HomeError(f"the corpus file {path} does not exist", "give the path of a UTF-8 text file") from None
    except IsADirectoryError:
        raise HomeError(f"the corpus {path} is a directory", "give the path of a UTF-8 text file") from None
    except OSError as exc:
        raise HomeError(f"cannot read the corpus file {path}: {exc.strerror or exc}") from None
    if corpus.invalid_bytes:
        print(f"molecule-gpt: {path}: {corpus.invalid_bytes} invalid UTF-8 byte(s) replaced by U+FFFD", file=sys.stderr)
    if not corpus.lines:
        raise HomeError(f"the corpus file {path} is empty (no non-blank line)", "give a text file with some lines in it")
    return corpus.lines
