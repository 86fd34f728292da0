"""Fuzz target: bytes piped into the command line's chat (`python -m molecule_gpt ... chat`).

What it is: `fuzz_one(data)` turns `data` into up to MAX_LINES lines of stdin (random bytes,
invalid UTF-8, encoded surrogates, control characters, Unicode whitespace that str.strip and
str.splitlines treat specially, lines longer than the memory keeps, commands starting with "/"),
runs one chat process on a fresh home with a tiny config and checks the contract:
- exit status 0, and stderr holds neither "internal error" nor a traceback;
- every line that is not empty and not a command is stored as a message of the person ("H")
  in the home's memory, in order, as molecule_gpt.text defines it: decoded as UTF-8 with each
  undecodable byte one U+FFFD, stripped, cut to the memory's max_message_chars.
`run_chat(stdin, home, config)` is the same check on a given home, so a test can chat with
one organism several times (each run after the first loads the checkpoint the last one saved).

Commands that change what is stored are left out of the random lines: "/forget" (it deletes
messages, by design) becomes "/help"; "/quit", "/exit" and "/q" end the chat, and the expected
messages stop there, as the chat does.

What it is not: coverage-guided. Each input is a process that runs for about a second, so
atheris sees none of it (its coverage is of this process); the script runs the seeded random
driver. Nor does it check the replies (they are samples) or a terminal (tests/test_cli.py
drives the chat in a pseudo-terminal).

Run: `python tests/fuzz/fuzz_chat.py --runs 20` (random driver only).
"""
from __future__ import annotations

import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import fuzz_common
from fuzz_common import Choices, FuzzFailure

from molecule_gpt import Memory
from molecule_gpt.text import replace_invalid

CONFIG = {"warmup_steps": 10, "eval_interval": 5, "n_layer": 1, "n_embd": 16, "n_head": 2,
          "head_types": ["content", "hybrid"]}
MAX_LINES = 12
TIMEOUT = 120  # seconds for one chat process: past it, it hangs
# the command line opens the memory with its default message length
MAX_MESSAGE_CHARS = inspect.signature(Memory).parameters["max_message_chars"].default
QUIT = ("/quit", "/exit", "/q")

# Bytes that decoders, str.strip/split and terminals treat specially.
ODD = [b"\xff", b"\xfe", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xf0\x9f\x98", b"\x80",
       b"\x00", b"\x1b[2J", b"\x1b]0;x\x07", b"\r", b"\x08", b"\x7f", b"\x1c", b"\x1d\x1e\x1f", b"\x0b\x0c",
       b"\xc2\x85", b"\xc2\xa0", b"\xe2\x80\xa8", b"\xe2\x80\xa9", b"\xef\xbb\xbf", b"\xef\xbf\xbd", b"\t",
       "\U0001f600".encode(), "caf\u00e9".encode(), b"H:", b"A:", b"</w>", b"<EOS>", b"'", b'"', b"%s", b"\\"]
WORDS = [b"hello", b"the", b"cat", b"sat", b"what", b"is", b"a", b"river", b"?", b".", b"!", b"how", b"are", b"you"]
COMMANDS = [b"/help", b"/status", b"/growth", b"/save", b"/quarantine", b"/release", b"/", b"//", b"/nope",
            b"/status extra words", b"/help\xff", b"/ help", b"/\x00", b"/save now"]


def chat_input(data: bytes) -> bytes:
    """Stdin for one chat: lines chosen by `data` (the last one sometimes without a newline)."""
    ch = Choices(data)
    lines = []
    for _ in range(1 + ch.below(MAX_LINES)):
        kind = ch.below(10)
        if kind == 0:  # raw bytes from the input (newlines in them make more lines)
            line = ch.take(1 + ch.below(80))
        elif kind == 1:  # very long: past the memory's limit, or past what one window holds
            unit = ch.pick(WORDS + ODD) + b" "
            line = unit * ((ch.pick([300, 2000, MAX_MESSAGE_CHARS + 10, 3 * MAX_MESSAGE_CHARS]) // len(unit)) + 1)
        elif kind == 2:
            line = ch.pick(COMMANDS)
        elif kind == 3:  # whitespace only, of every kind
            line = b"".join(ch.pick([b" ", b"\t", b"\r", b"\x0b", b"\x0c", b"\xc2\x85", b"\xe2\x80\xa8", b"\x1c"])
                            for _ in range(ch.below(6)))
        else:  # words mixed with odd bytes
            line = b" ".join(ch.pick(WORDS + ODD) for _ in range(1 + ch.below(10)))
        if ch.chance(10):
            line = ch.pick([b"  ", b"\t", b"/"]) + line
        lines.append(line)
    out = b"\n".join(sanitized(x) for x in b"\n".join(lines).split(b"\n"))
    return out if ch.chance(15) else out + b"\n"


def sanitized(line: bytes) -> bytes:
    """The line, unless it is a /forget command (which deletes stored messages): then /help."""
    text = replace_invalid(line.decode("utf-8", "surrogateescape").strip())[0]
    return b"/help" if text.partition(" ")[0] == "/forget" else line


def expected_messages(stdin: bytes) -> list[str]:
    """What the chat stores for the person, line by line, as cli._chat_loop and Memory do."""
    out = []
    lines = stdin.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline ends the last line; no empty line after it
    for raw in lines:
        text = replace_invalid(raw.decode("utf-8", "surrogateescape").strip())[0]
        if not text:
            continue
        if text.startswith("/"):
            if text.partition(" ")[0] in QUIT:
                break
            continue
        out.append(text[:MAX_MESSAGE_CHARS])
    return out


def person_messages(home: pathlib.Path) -> list[str]:
    path = home / "memory.sqlite"
    if not path.exists():
        return []
    memory = Memory(path)
    try:
        return [m.text for m in memory.messages() if m.role == "H"]
    finally:
        memory.close()


def run_chat(stdin: bytes, home: pathlib.Path, config: pathlib.Path) -> str:
    """One chat process on `home`; raises FuzzFailure unless the contract (module doc) holds."""
    before = person_messages(home)
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    env.pop("MOLECULE_GPT_TRACEBACK", None)
    try:
        proc = subprocess.run([sys.executable, "-m", "molecule_gpt", "--home", str(home), "--config", str(config),
                               "chat"], input=stdin, capture_output=True, timeout=TIMEOUT, env=env)
    except subprocess.TimeoutExpired:
        raise FuzzFailure(f"the chat ran past {TIMEOUT} s on stdin {stdin[:200]!r}...") from None
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode != 0 or "internal error" in err or "Traceback" in err:
        raise FuzzFailure(f"chat exited {proc.returncode}; stderr: {err[-2000:]}\nstdin: {stdin[:500]!r}")
    want = expected_messages(stdin)
    got = person_messages(home)
    if got[:len(before)] != before or got[len(before):] != want:
        raise FuzzFailure(f"stored messages {[x[:60] for x in got[len(before):]]} but typed {[x[:60] for x in want]}"
                          f"\nstdin: {stdin[:500]!r}")
    return f"exit 0, {len(want)} message(s) stored"


def write_config(directory: pathlib.Path) -> pathlib.Path:
    path = directory / "config.json"
    path.write_text(json.dumps(CONFIG))
    return path


def fuzz_one(data: bytes) -> str:
    root = pathlib.Path(tempfile.mkdtemp(prefix="fuzz-chat-"))
    try:
        return run_chat(chat_input(data), root / "home", write_config(root))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(fuzz_common.main(fuzz_one, default_runs=20, atheris_ok=False))
