"""Text corpora built from what every Python installation ships, so benchmarks need no download.

Two domains that differ clearly in style and vocabulary:
- `doc_sentences()`: English prose, the sentences of the standard library's documentation
  (pydoc's text of every public stdlib module), one sentence per line;
- `code_lines()`: Python source, the non-blank, non-comment lines of the standard library's
  own .py files, stripped.

Both are deterministic for a given Python version, deduplicated, 20-240 characters a line.
Command line: `python benchmarks/corpora.py docs OUT.txt [--min-bytes N]` or
`python benchmarks/corpora.py code OUT.txt`. With --min-bytes the unique lines are repeated in
shuffled order (fixed seed) until the file reaches N bytes (for throughput benchmarks).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import pkgutil
import pydoc
import random
import re
import sys
import sysconfig
import warnings

SKIP = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "venv", "antigravity", "this", "__")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _stdlib_module_names() -> list[str]:
    names = []
    for top in sorted(n for n in sys.stdlib_module_names if not n.startswith(SKIP)):
        names.append(top)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mod = __import__(top)
        except BaseException:
            continue
        if hasattr(mod, "__path__"):
            names += [m.name for m in pkgutil.walk_packages(mod.__path__, top + ".", onerror=lambda _: None)]
    return [n for n in names if not n.startswith(SKIP) and not any(p.startswith("_") for p in n.split("."))]


def doc_sentences(max_lines: int | None = None) -> list[str]:
    """Sentences of pydoc's text of the stdlib modules, in module order, each once: 20-240
    characters, starting upper-case, ending in . ! or ?, no table bars."""
    seen, out = set(), []
    for name in _stdlib_module_names():
        buf = io.StringIO()
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(buf), \
                    contextlib.redirect_stderr(io.StringIO()):
                warnings.simplefilter("ignore")
                pydoc.help(name)
        except BaseException:
            continue
        for para in re.split(r"\n\s*\n", buf.getvalue()):
            for s in _SENTENCE_END.split(" ".join(para.split())):
                if 20 <= len(s) <= 240 and s[0].isupper() and s[-1] in ".!?" and "|" not in s and s not in seen:
                    seen.add(s)
                    out.append(s)
                    if max_lines is not None and len(out) >= max_lines:
                        return out
    return out


def code_lines(max_lines: int | None = None) -> list[str]:
    """Stripped source lines of the stdlib's top-level .py files (sorted by name), each once:
    20-240 characters, not comments, not inside docstrings."""
    root = sysconfig.get_paths()["stdlib"]
    seen, out = set(), []
    for fname in sorted(os.listdir(root)):
        if not fname.endswith(".py") or fname.startswith(SKIP):
            continue
        try:
            with open(os.path.join(root, fname), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError):
            continue
        in_doc = False
        for raw in text.splitlines():
            line = raw.strip()
            quotes = line.count('"""') + line.count("'''")
            if in_doc:
                in_doc = quotes % 2 == 0
                continue
            if line.startswith(('"""', "'''")):
                in_doc = quotes % 2 == 1
                continue
            if not (20 <= len(line) <= 240) or line.startswith("#") or line in seen:
                continue
            seen.add(line)
            out.append(line)
            if max_lines is not None and len(out) >= max_lines:
                return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("domain", choices=("docs", "code"))
    ap.add_argument("out")
    ap.add_argument("--min-bytes", type=int, default=0)
    a = ap.parse_args()
    lines = doc_sentences() if a.domain == "docs" else code_lines()
    out, size, rng = list(lines), sum(len(s.encode()) + 1 for s in lines), random.Random(0)
    while size < a.min_bytes:
        extra = lines[:]
        rng.shuffle(extra)
        out += extra
        size += sum(len(s.encode()) + 1 for s in extra)
    with open(a.out, "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    print(f"{len(lines)} unique lines, {len(out)} lines, {size} bytes -> {a.out}")


if __name__ == "__main__":
    main()
