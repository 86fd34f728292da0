"""One policy for text entering the organism: what is not valid Unicode becomes U+FFFD, and the
caller is told.

What it is: the check every entrance of text applies (Organism.observe, learn, forget and
the corpus given at birth, Memory.add_message, the command line's chat input) before anything
is stored, so a turn is stored whole or not at all. Python strings can hold lone surrogates
(U+D800-U+DFFF): bytes that were not UTF-8, read with the "surrogateescape" error handler (as
Python reads a terminal under a C locale), or half of a pair. They cannot be written as UTF-8,
so SQLite, JSON files and the tokenizer's display strings would refuse them later. Files read
with molecule_gpt.read_corpus are already cleaned the same way (invalid bytes counted and
replaced).
"""
from __future__ import annotations

import re
import warnings

from .errors import InvalidTextWarning

__all__ = ["replace_invalid", "valid_lines", "valid_text"]

_SURROGATES = re.compile("[\ud800-\udfff]")
REPLACEMENT = "\ufffd"


def replace_invalid(text: str) -> tuple[str, int]:
    """(text with every lone surrogate replaced by U+FFFD, how many were replaced)."""
    if text.isascii():
        return text, 0
    found = len(_SURROGATES.findall(text))
    return (_SURROGATES.sub(REPLACEMENT, text), found) if found else (text, 0)


def valid_text(text: str, where: str, stacklevel: int = 2) -> str:
    """`text` made valid by replace_invalid; warns InvalidTextWarning naming `where` and the
    count when anything was replaced (stacklevel as warnings.warn counts it from the caller)."""
    clean, found = replace_invalid(text)
    _warn(found, where, stacklevel + 1)
    return clean


def valid_lines(lines, where: str, stacklevel: int = 2) -> list[str]:
    """Each line made valid by replace_invalid, with one warning for all of them."""
    out, found = [], 0
    for line in lines:
        clean, n = replace_invalid(line)
        out.append(clean)
        found += n
    _warn(found, where, stacklevel + 1)
    return out


def _warn(found: int, where: str, stacklevel: int) -> None:
    if found:
        warnings.warn(f"{where}: {found} character(s) that were not valid Unicode (undecodable bytes or lone "
                      f"surrogates) were replaced with U+FFFD", InvalidTextWarning, stacklevel=stacklevel)
