"""Shared storage of a colony (molecule_gpt.colony): where every organism's saves live so that any
node can load them, with generation numbers that keep a stale actor from overwriting a newer save.

    store = Store("/mnt/shared/organisms")       # a directory every node mounts
    store = Store("s3://bucket/organisms")       # or any fsspec URL (fsspec and its backend)

Layout under the root, per organism NAME:

    NAME/generations/g00000007-1f3a.../organism.ckpt   the files of one save, under a new name
                                       memory.sqlite    (a SQLite backup of the memory), ...
    NAME/claims/00000007.json          {"generation": 7, "dir": "g00000007-1f3a...", "owner", "reason", "time"}

A save uploads its files whole into a new directory first, and only then claims the next
generation number by creating NAME/claims/<n>.json exclusively (on a local or mounted file
system: a link that fails if the name exists, so the claim appears complete or not at all; on
an object store through fsspec: an exclusive "xb" open where the backend supports one). The
organism's current state is the claim with the highest number. An actor that takes an organism
over first claims the next number for the save it loaded ("open"), so the generation moves past
anything an earlier owner (a stale actor on a node that was declared dead) could still claim:
its next save finds its number taken and is refused (StaleGeneration) instead of overwriting.

A home of the single-process layout (NAME/organism.ckpt, NAME/memory.sqlite, as `molecule-gpt
serve --homes DIR` serves them) counts as generation 0 of NAME when NAME has no claims yet, so
`serve --ray --homes DIR` serves the same homes; those files are read, never written.
"""
from __future__ import annotations

import json
import os
import posixpath
import re
import time
import uuid
from typing import NamedTuple

__all__ = ["Store", "Generation", "StaleGeneration", "valid_name", "FILES"]

# the files one save ships (those that exist are shipped; organism.ckpt always does)
FILES = ("organism.ckpt", "memory.sqlite", "seen.keys", "history.json")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_CLAIM = re.compile(r"(\d{8})\.json\Z")
PLAIN_HOME = ""  # the dir of generation 0 when it is a single-process home's own files


def valid_name(name) -> str:
    """An organism's name: the model id of the API and a folder name (no path escapes)."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"organism name {name!r}: use 1-64 letters, digits, '.', '_' and '-', starting with a "
                         f"letter or digit")
    return name


class StaleGeneration(Exception):
    """Someone else claimed this generation first: the caller no longer owns the organism."""


class Generation(NamedTuple):
    number: int
    dir: str  # under NAME/generations/ ("" for a single-process home's own files)
    owner: str
    reason: str


class Store:
    """Shared storage at `root`: a local path (or file:// URL) or any fsspec URL."""

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        if not root:
            raise ValueError("the shared storage needs a directory or URL")
        self.url = root
        if "://" in root and not root.startswith("file://"):
            try:
                import fsspec
            except ImportError:
                raise ValueError(f"shared storage {root!r} is a URL: it needs fsspec (pip install "
                                 f"'molecule-gpt[ray]') and the backend of its scheme") from None
            self.fs, self.root = fsspec.core.url_to_fs(root)
            self.local = False
        else:
            path = root[len("file://"):] if root.startswith("file://") else root
            self.fs, self.root = None, os.path.abspath(os.path.expanduser(path))
            self.local = True
            os.makedirs(self.root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---- paths and primitives (local file system, or fsspec)

    def _join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts) if self.local else posixpath.join(self.root, *parts)

    def _exists(self, path: str) -> bool:
        return os.path.exists(path) if self.local else self.fs.exists(path)

    def _listdir(self, path: str) -> list[str]:
        if self.local:
            try:
                return sorted(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                return []
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _read(self, path: str) -> bytes:
        if self.local:
            with open(path, "rb") as f:
                return f.read()
        with self.fs.open(path, "rb") as f:
            return f.read()

    def _put(self, local_path: str, path: str) -> None:
        if self.local:
            import shutil
            os.makedirs(os.path.dirname(path), exist_ok=True)
            shutil.copyfile(local_path, path)
        else:
            self.fs.put_file(local_path, path)

    def _get(self, path: str, local_path: str) -> None:
        if self.local:
            import shutil
            shutil.copyfile(path, local_path)
        else:
            self.fs.get_file(path, local_path)

    def _rmtree(self, path: str) -> None:
        if self.local:
            import shutil
            shutil.rmtree(path, ignore_errors=True)
        elif self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def _create_exclusive(self, path: str, data: bytes) -> bool:
        """Create `path` holding `data` unless it exists; False when it did. Atomic on a local
        or mounted file system (a complete temporary file linked to the name)."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
            return True
        except FileExistsError:
            return False
        except (ValueError, NotImplementedError, TypeError):
            # a backend without exclusive creation: check, then write (a narrow race remains,
            # which README's storage section states)
            if self.fs.exists(path):
                return False
            with self.fs.open(path, "wb") as f:
                f.write(data)
            return True

    # ---- organisms

    def names(self) -> list[str]:
        """Organisms with a save: a claim, or a single-process home's checkpoint."""
        out = []
        for entry in self._listdir(self.root):
            if _NAME.match(entry) and (self._claims(entry) or self._exists(self._join(entry, "organism.ckpt"))):
                out.append(entry)
        return out

    def _claims(self, name: str) -> list[int]:
        return sorted(int(m.group(1)) for m in map(_CLAIM.match, self._listdir(self._join(name, "claims"))) if m)

    def current(self, name: str) -> Generation | None:
        """The newest save of `name` (None: none)."""
        valid_name(name)
        claims = self._claims(name)
        if not claims:
            if self._exists(self._join(name, "organism.ckpt")):
                return Generation(0, PLAIN_HOME, "", "home")
            return None
        n = claims[-1]
        doc = json.loads(self._read(self._join(name, "claims", f"{n:08d}.json")))
        return Generation(n, doc["dir"], doc.get("owner", ""), doc.get("reason", ""))

    def _files_dir(self, name: str, dir: str) -> str:
        return self._join(name) if dir == PLAIN_HOME else self._join(name, "generations", dir)

    def claim(self, name: str, number: int, dir: str, owner: str, reason: str) -> Generation:
        """Claim generation `number` for the save in `dir`; StaleGeneration if it is taken or a
        newer one exists."""
        newest = self._claims(name)
        if newest and newest[-1] >= number:
            raise StaleGeneration(f"{name}: generation {newest[-1]} exists; this owner's save would be {number}")
        doc = {"generation": number, "dir": dir, "owner": owner, "reason": reason, "time": time.time()}
        if not self._create_exclusive(self._join(name, "claims", f"{number:08d}.json"),
                                      json.dumps(doc).encode()):
            raise StaleGeneration(f"{name}: generation {number} was claimed by another owner")
        return Generation(number, dir, owner, reason)

    def open(self, name: str, owner: str, dest: str) -> tuple[Generation, dict]:
        """Take `name` over: download its newest save into the local directory `dest` and claim
        the next generation for it (fencing out any earlier owner). Returns (the claimed
        generation, {file name: local path}). KeyError when `name` has no save."""
        for _ in range(8):  # another owner may claim in between: read again
            gen = self.current(name)
            if gen is None:
                raise KeyError(name)
            paths = self.download(name, gen, dest)
            try:
                return self.claim(name, gen.number + 1, gen.dir, owner, "open"), paths
            except StaleGeneration:
                continue
        raise StaleGeneration(f"{name}: could not take it over (its generation kept moving)")

    def download(self, name: str, gen: Generation, dest: str) -> dict:
        os.makedirs(dest, exist_ok=True)
        src = self._files_dir(name, gen.dir)
        paths = {}
        for f in FILES:
            if self._exists(self._join(src, f)):
                local = os.path.join(dest, f)
                self._get(self._join(src, f), local + ".part")
                os.replace(local + ".part", local)
                paths[f] = local
        if "organism.ckpt" not in paths:
            raise FileNotFoundError(f"{name}: generation {gen.number} has no organism.ckpt in {src}")
        return paths

    def read(self, name: str, file: str = "organism.ckpt") -> bytes:
        """The bytes of `file` in the newest save of `name` (KeyError: no save)."""
        if file not in FILES:
            raise ValueError(f"a save holds {FILES}, not {file!r}")
        gen = self.current(name)
        if gen is None:
            raise KeyError(name)
        return self._read(self._join(self._files_dir(name, gen.dir), file))

    def commit(self, name: str, base: int, files: dict, owner: str, reason: str = "save") -> Generation:
        """Ship `files` ({file name: local path}) as the save after generation `base` (the one
        this owner holds): upload into a new directory, then claim base + 1. StaleGeneration
        (and the upload removed) when someone else got there first."""
        valid_name(name)
        unknown = set(files) - set(FILES)
        if unknown or "organism.ckpt" not in files:
            raise ValueError(f"a save ships organism.ckpt and any of {FILES}, got {sorted(files)}")
        newest = self._claims(name)
        if newest and newest[-1] > base:
            raise StaleGeneration(f"{name}: generation {newest[-1]} exists; this owner holds {base}")
        dir = f"g{base + 1:08d}-{uuid.uuid4().hex[:12]}"
        target = self._files_dir(name, dir)
        try:
            for f, local in files.items():
                self._put(local, self._join(target, f))
            return self.claim(name, base + 1, dir, owner, reason)
        except BaseException:
            self._rmtree(target)
            raise

    def prune(self, name: str, keep: int = 3) -> None:
        """Delete generation directories other than those of the newest `keep` claims (uploads
        numbered past the newest claim stay: a save may be in flight), and the older claims."""
        claims = self._claims(name)
        kept_numbers = claims[-max(1, keep):]
        kept_dirs = set()
        for n in kept_numbers:
            try:
                kept_dirs.add(json.loads(self._read(self._join(name, "claims", f"{n:08d}.json")))["dir"])
            except (FileNotFoundError, ValueError, KeyError):
                continue
        if not kept_dirs:
            return
        low = min(kept_numbers)
        for entry in self._listdir(self._join(name, "generations")):
            m = re.match(r"g(\d{8})-", entry)
            if entry in kept_dirs or m is None:
                continue
            # an upload numbered past the newest claim may be a save in flight: leave it
            if int(m.group(1)) > claims[-1]:
                continue
            self._rmtree(self._join(name, "generations", entry))
        for n in claims:
            if n < low:
                path = self._join(name, "claims", f"{n:08d}.json")
                if self.local:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                else:
                    self.fs.rm(path)

    def remove(self, name: str) -> None:
        """Delete everything of `name` the colony wrote (a single-process home's own files stay)."""
        valid_name(name)
        self._rmtree(self._join(name, "generations"))
        self._rmtree(self._join(name, "claims"))
        if self.local:
            try:
                os.rmdir(self._join(name))
            except OSError:
                pass
