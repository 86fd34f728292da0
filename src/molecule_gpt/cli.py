"""The `molecule-gpt` command line: chat with the organism, train it, sample from it, look
inside its checkpoint, plot its growth, make it forget, benchmark it.

    molecule-gpt chat                     # first run: warm up on the seed corpus, then chat
    molecule-gpt train notes.txt          # teach it a text file (warmup, or checked bursts)
    molecule-gpt generate "the river" --temperature 0.7 --seed 1
    molecule-gpt import molecule_ckpt.json --corpus nonames.txt   # adopt the original program's organism
    molecule-gpt inspect                  # config, vocabulary, modules, gamma, checksum
    molecule-gpt growth --plot growth.png
    molecule-gpt forget "my address"      # or: molecule-gpt forget --all
    molecule-gpt bench
    molecule-gpt serve                    # OpenAI-compatible HTTP API + chat page (extra 'serve')

Home (`--home DIR`, default molecule_gpt.default_home()) holds one organism; its layout, lock,
archives and recovery are molecule_gpt.home (whose names this module re-exports).

Options come from flags and from `--config FILE.json`: one JSON object whose keys are
Config fields (molecule_gpt.Config, e.g. "warmup_steps", "temperature") or the settings in
SETTINGS (molecule_gpt.home). Flags override the file. Architecture fields (FIXED_AT_BIRTH) can only be set
when an organism is born; the other Config fields also apply to an existing organism and are
saved with it.

Errors a person can hit print one line (and a hint) on stderr and exit non-zero: 1 for an
error, 2 for bad usage, 130 for Ctrl-C. Ctrl-C during training stops after the step in flight
and saves, so the checkpoint on disk is always a consistent moment. MOLECULE_GPT_TRACEBACK=1
shows tracebacks.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import errno
import json
import math
import os
import pathlib
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from . import __version__
from .checkpoint import load_checkpoint
from .config import DECODE_PRECISIONS, Config
from .data import default_home
from .errors import CheckpointError, ConfigError, MoleculeError
from .generation import check_decode_precision
# the home's names, defined in molecule_gpt.home, are still importable from here
from .home import (ARCHIVE, CHECKPOINT, CONFIG_FIELDS, FIXED_AT_BIRTH, LOCK, MEMORY, SETTINGS,  # noqa: F401
                   TELEMETRY, Home, HomeError, Options, _is_int, _is_number, _normalized,  # noqa: F401
                   _save_error, _SETTING_CHECKS, _SETTING_HELP, load_options, read_text_lines)  # noqa: F401
from .memory import Memory
from .model import delta_group
from .organism import Organism
from .telemetry import read_records
from .text import replace_invalid

__all__ = ["main", "SETTINGS", "FIXED_AT_BIRTH"]

CLIError = HomeError  # an error a person can fix: one line, a hint, an exit code (molecule_gpt.home)


class Interrupted(Exception):
    """Ctrl-C arrived while training; the work done is saved."""


# ---------------------------------------------------------------------------------------------
# terminal output


class Progress:
    """One progress line on stderr: a bar, step/of, loss, held-out loss, tokens/s, ETA. On a
    terminal it redraws in place (at most 10 times a second); elsewhere it prints a line at
    every tenth of the way."""

    def __init__(self, label: str, total: int, stream=None, speed: Callable[[], float | None] | None = None):
        self.label, self.total = label, max(1, total)
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.speed = speed
        self.t0 = time.perf_counter()
        self.first_step: int | None = None
        self.val: float | None = None
        self._last_draw = 0.0
        self._last_tenth = -1
        self._width = 0

    def __call__(self, record: dict) -> None:
        step, total = record["step"], record.get("of", self.total)
        self.total = max(1, total)
        if self.first_step is None:
            self.first_step = step - 1
        if record.get("val_loss") is not None:
            self.val = record["val_loss"]
        now = time.perf_counter()
        done = step >= self.total
        tenth = 10 * step // self.total
        if self.tty and not done and now - self._last_draw < 0.1:
            return
        if not self.tty and not done and tenth == self._last_tenth:
            return
        self._last_draw, self._last_tenth = now, tenth
        rate = (step - self.first_step) / max(1e-9, now - self.t0)
        eta = (self.total - step) / rate if rate > 0 else 0.0
        bar_n = 24 * step // self.total
        parts = [f"{self.label} [{'#' * bar_n}{'.' * (24 - bar_n)}] {step}/{self.total}",
                 f"loss {record['loss']:.3f}"]
        if self.val is not None:
            parts.append(f"val {self.val:.3f}")
        speed = self.speed() if self.speed else None
        if speed:
            parts.append(f"{speed:,.0f} tok/s")
        parts.append(f"ETA {_duration(eta)}")
        line = "  ".join(parts)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


# Text the organism says or heard, on its way to a terminal: control characters (byte tokens can
# spell any of them, and a corpus or a heard line can hold them) would move the cursor, recolour
# or reset the terminal, so they are shown as their visible symbols (C0 as U+2400-U+241F, DEL as
# U+2421; C1, which has no symbols, as U+FFFD). Tabs and newlines are kept.
_VISIBLE_CONTROLS = {c: 0x2400 + c for c in range(0x20) if c not in (0x09, 0x0A)} | {0x7F: 0x2421} | \
    {c: 0xFFFD for c in range(0x80, 0xA0)}


def _shown(text: str) -> str:
    """`text` with its control characters made visible (_VISIBLE_CONTROLS)."""
    return text.translate(_VISIBLE_CONTROLS)


def _fmt(value, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[threading.Event]:
    """Within the block, the first Ctrl-C only sets the yielded event (training checks it between
    steps and stops cleanly); a second one raises KeyboardInterrupt at once."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()
        sys.stderr.write("\nmolecule-gpt: stopping after the current step (Ctrl-C again to quit without saving)\n")
        sys.stderr.flush()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield event
    finally:
        signal.signal(signal.SIGINT, previous)


def run_warmup(org: Organism, home: Home, steps: int | None = None, label: str = "warmup") -> dict:
    """(The rest of) the organism's warmup with a progress bar; with `steps`, only that many of
    its steps (the schedule continues at the next call). A warm organism takes `steps` more base
    steps on a schedule of their own. Ctrl-C stops after the step in flight, saves and raises
    Interrupted."""
    resume = not org.trainer.warmed_up
    progress = Progress(label, org.config.warmup_steps if resume else steps,
                        speed=lambda: org.trainer.tokens_per_second)
    taken = 0

    def on_step(record: dict) -> None:
        nonlocal taken
        taken += 1
        progress(record)

    with deferred_interrupt() as stop:
        if resume and steps is not None:
            should_stop = lambda: stop.is_set() or taken >= steps  # noqa: E731
        else:
            should_stop = stop.is_set
        try:
            summary = org.warmup(None if resume else steps, progress=on_step, should_stop=should_stop)
        finally:
            progress.close()
    if stop.is_set():
        home.save(org)
        if org.trainer.warmed_up:
            raise Interrupted("training stopped after the step in flight; the organism is saved")
        done, total = org.trainer.warmup_steps_done, org.config.warmup_steps
        raise Interrupted(f"warmup stopped at step {done}/{total}; the organism is saved and the next "
                          f"`molecule-gpt chat` or `train` continues it")
    return summary


# ---------------------------------------------------------------------------------------------
# commands


@contextlib.contextmanager
def writer_session(home: Home, args, corpus: str | None,
                   original: str | None = None) -> Iterator[tuple[Organism, Memory, str | None]]:
    """A command that changes the home: the lock, the memory, the organism (loaded, or born
    from `corpus`, or with `original` adopted from the original program's checkpoint, which
    needs a home without an organism); afterwards the organism is closed, the checkpoint
    archived and the telemetry trimmed. Yields (organism, memory, what a newborn was born
    from or None)."""
    with home.locked():
        if original is not None and home.exists():  # checked under the lock: no one creates it meanwhile
            raise CLIError(f"{home} already holds an organism ({home.checkpoint}); importing would replace it",
                           "import into a new home with --home DIR (or move this home's organism.ckpt away first)")
        home.trim_telemetry()
        memory = home.memory()
        org = None
        try:
            if original is not None:
                org, source = home.adopt(original, corpus, memory=memory)
                print(f"An organism of the original program is adopted in {home} from {source}.")
            elif home.exists():
                org, source = home.open(memory=memory, recover=args.recover), None
            else:
                org, source = home.birth(corpus, memory=memory)
                print(f"A new organism is born in {home} from {source}.")
            yield org, memory, source
        finally:
            if org is not None:
                _close_quietly(org)
            memory.close()
            home.archive_current()
            home.trim_telemetry()


def cmd_chat(args, home: Home) -> int:
    if args.corpus and home.exists():
        if not os.path.isfile(args.corpus):
            raise CLIError(f"--corpus {args.corpus}: no such file", "give an existing text file, or leave --corpus out")
        print(f"note: the organism in {home} already exists; --corpus is read only at birth (teach it "
              f"{args.corpus} with `molecule-gpt train {args.corpus}`)")
    with writer_session(home, args, args.corpus) as (org, memory, _):
        if not org.trainer.warmed_up:
            print(f"Warming up ({org.config.warmup_steps} steps; Ctrl-C stops and saves, the next run continues).")
            summary = run_warmup(org, home)
            print(f"Warm: loss {_fmt(summary['loss'])}, held-out {_fmt(summary['val_loss'])} "
                  f"in {summary['seconds']:.1f} s.")
        home.save(org)
        _chat_loop(org, memory, home)
    return 0


CHAT_HELP = """commands:
  /status          steps, losses, vocabulary, delta modules, memory
  /growth          the latest growth snapshots
  /save            save the organism now
  /forget [TEXT]   forget messages and chat lines containing TEXT (all chat without TEXT)
  /quarantine      the lines rolled-back bursts set aside (the newest 10)
  /release         give those lines back to the organism (the next burst is checked again)
  /help            this list
  /quit            save and leave (also Ctrl-D)"""


def _chat_loop(org: Organism, memory: Memory, home: Home) -> None:
    s = org.stats()
    print(f"molecule-gpt {__version__}: vocabulary {s['vocab_size']}, {s['parameters']:,} parameters, "
          f"held-out loss {_fmt(s['val_loss'])}, memory {memory.retrieval_mode}. "
          f"Type /help for commands, /quit to leave.")
    org.start_background()
    turns = 0
    settings = home.settings
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 arrive as surrogates, replaced below
        sys.stdin.reconfigure(errors="surrogateescape")
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    try:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                break
            except KeyboardInterrupt:
                print()
                break
            line, replaced = replace_invalid(line.strip())
            if replaced:
                print(f"note: {replaced} character(s) that were not valid UTF-8 text were replaced with U+FFFD")
            if len(line) > memory.max_message_chars:
                print(f"note: your message has {len(line):,} characters; the conversation memory keeps the first "
                      f"{memory.max_message_chars:,} (the corpus keeps all of it)")
            if not line:
                continue
            if line.startswith("/"):
                if _slash(line, org, memory, home) == "quit":
                    break
                continue
            _chat_turn(org, memory, line, settings)
            turns += 1
            if turns % settings["autosave_turns"] == 0:
                _save_reporting(org, home)
    finally:
        _stop_background(org)
        home.save(org)
        print(f"Saved to {home.checkpoint}.")


def _chat_turn(org: Organism, memory: Memory, text: str, settings: dict) -> str:
    recall = memory.recall(text, recent=settings["recall_recent"], k=settings["recall_relevant"])
    org.observe(text, speaker="H")
    # The prompt is plain text, as the seed corpus writes an exchange ("How are you? I am well."):
    # earlier relevant turns, the recent ones, then yours; generation keeps its last window, so
    # your words are always in it. (The "H: "/"A: " tags stay in the corpus, where they mark
    # what `forget` may take.)
    context = [m.text for m in sorted(recall.relevant, key=lambda m: m.id)] + [m.text for m in recall.recent]
    prompt = " ".join(context + [text])
    pieces = []
    sys.stdout.write("molecule> ")
    sys.stdout.flush()
    try:
        for piece in org.stream(prompt, stop=("H:", "A:")):
            pieces.append(piece)
            sys.stdout.write(_shown(piece))
            sys.stdout.flush()
    except KeyboardInterrupt:
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    reply = "".join(pieces).strip()
    if reply:
        org.observe(reply, speaker="A")
    return reply


def _slash(line: str, org: Organism, memory: Memory, home: Home) -> str | None:
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command in ("/quit", "/exit", "/q"):
        return "quit"
    if command == "/help":
        print(CHAT_HELP)
    elif command == "/status":
        print(status_text(org, memory))
    elif command == "/growth":
        print(growth_table(memory.snapshots(limit=12)))
    elif command == "/save":
        if _save_reporting(org, home):
            print(f"Saved to {home.checkpoint} ({home.checkpoint.stat().st_size / 1e6:.2f} MB).")
    elif command == "/forget":
        counts = org.forget(rest or None)
        print(f"{str(counts).capitalize()}.")
        _save_reporting(org, home)
    elif command == "/quarantine":
        lines = list(org.quarantine)
        print(f"{len(lines)} line(s) set aside by rolled-back bursts (not trained; /release gives them back)"
              + "".join(f"\n  {_shown(x)}" for x in lines[-10:]))
    elif command == "/release":
        print(f"{org.release_quarantine()} line(s) back in the corpus; the next burst trains on them, checked again.")
    else:
        print(f"unknown command {command}; /help lists them")
    return None


def _save_reporting(org: Organism, home: Home) -> bool:
    """Save; in a chat a failed save is reported and the chat goes on."""
    try:
        home.save(org)
        return True
    except CLIError as exc:
        print(f"molecule-gpt: error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return False


def _stop_background(org: Organism) -> None:
    try:
        org.stop()
    except MoleculeError as exc:
        print(f"molecule-gpt: the background trainer stopped with an error: {exc}", file=sys.stderr)


def _close_quietly(org: Organism) -> None:
    try:
        org.close()
    except MoleculeError as exc:
        print(f"molecule-gpt: {exc}", file=sys.stderr)


def status_text(org: Organism, memory: Memory | None = None) -> str:
    """`/status`: the status document (molecule_gpt.status, shared with the server) as lines."""
    from .status import status_document, status_text as render
    return render(status_document(org, memory))


def growth_table(snapshots) -> str:
    if not snapshots:
        return "no growth snapshots yet"
    rows = [(datetime.datetime.fromtimestamp(g.time).strftime("%m-%d %H:%M:%S"), g.step, g.vocab_size,
             f"{g.n_params:,}", g.n_delta, f"{g.corpus_chars:,}", _fmt(g.loss), _fmt(g.gamma_magnitude, ".4f"), g.note)
            for g in snapshots]
    return table(rows, ["time", "step", "vocab", "params", "deltas", "corpus chars", "loss", "gamma", "note"])


def cmd_train(args, home: Home) -> int:
    with writer_session(home, args, args.corpus) as (org, memory, born_from):
        learn_lines = None
        if born_from is None and args.corpus:
            lines = read_text_lines(args.corpus)
            if org.trainer.warmed_up and args.bursts is None and args.steps is None:
                learn_lines = lines  # learned whole below, in checked bursts
                print(f"Read {len(lines)} lines of {args.corpus}.")
            else:
                print(f"Read {len(lines)} lines of {args.corpus}: {org.observe(lines)} new to the corpus.")
        if not org.trainer.warmed_up or args.steps is not None:
            if org.trainer.warmed_up:
                print(f"{args.steps} more steps on the base (a schedule of their own).")
            summary = run_warmup(org, home, args.steps, label="train")
            print(f"Trained {summary['steps']} steps: loss {_fmt(summary['loss'])}, held-out "
                  f"{_fmt(summary['val_loss'])}, {summary['seconds']:.1f} s.")
            if not org.trainer.warmed_up:
                print(f"The warmup is at step {org.trainer.warmup_steps_done}/{org.config.warmup_steps}; "
                      f"`molecule-gpt train` continues it.")
        if learn_lines and args.bursts is None:
            _learn(org, home, learn_lines)
        elif args.bursts:
            _run_bursts(org, home, args.bursts)
        home.save(org)
        print(f"Saved to {home.checkpoint}.")
    return 0


def _learn(org: Organism, home: Home, lines: list[str]) -> None:
    """Organism.learn with a progress line; Ctrl-C ends it after the burst in flight (the
    lines not taken yet wait in the quantum buffer) and saves."""
    with deferred_interrupt() as stop:
        bar = Progress("learn", 1, speed=lambda: org.trainer.tokens_per_second)

        def on_burst(record: dict) -> None:
            bar({"step": record["burst"], "of": record["of"], "loss": org.trainer.last_loss or float("nan"),
                 "val_loss": record["heard_val_loss"]})

        summary = org.learn(lines, progress=on_burst, should_stop=stop.is_set)
        bar.close()
    h0, h1 = summary["heard_val_loss"]
    v0, v1 = summary["val_loss"]
    print(f"{summary['lines']} new lines: {summary['bursts']} bursts ({summary['accepted']} accepted, "
          f"{summary['rolled_back']} rolled back) in {summary['seconds']:.1f} s; held-out nats/char: new text "
          f"{_fmt(h0)} -> {_fmt(h1)}, old text {_fmt(v0)} -> {_fmt(v1)}.")
    if summary["stopped"]:
        home.save(org)
        raise Interrupted(f"stopped after {summary['bursts']} bursts; the organism is saved and the rest of "
                          f"the text waits for the next bursts")


def _run_bursts(org: Organism, home: Home, n: int) -> None:
    with deferred_interrupt() as stop:
        for i in range(n):
            if stop.is_set():
                break
            r = org.train_burst()
            verdict = "accepted" if r.accepted else f"rolled back ({r.reason.replace('_', ' ')})"
            extra = f", module {r.grew_module} born" if r.grew_module is not None else ""
            tps = org.trainer.tokens_per_second
            print(f"burst {i + 1}/{n}: {r.steps} steps, held-out {_fmt(r.loss_before)} -> {_fmt(r.loss_after)}, "
                  f"{verdict}{extra}" + (f", {tps:,.0f} tok/s" if tps else ""))
    if stop.is_set():
        home.save(org)
        raise Interrupted(f"stopped after {org.trainer.bursts} bursts; the organism is saved")


def cmd_import(args, home: Home) -> int:
    # what can be checked before the home is created (writer_session checks the home again under the lock)
    if home.exists():
        raise CLIError(f"{home} already holds an organism ({home.checkpoint}); importing would replace it",
                       "import into a new home with --home DIR (or move this home's organism.ckpt away first)")
    if not os.path.isfile(args.file):
        raise CLIError(f"the original checkpoint {args.file} does not exist or is not a file",
                       "give the JSON checkpoint the original program wrote (molecule_ckpt.json)")
    if args.corpus and not os.path.isfile(args.corpus):
        raise CLIError(f"the corpus file {args.corpus} does not exist or is not a file",
                       "give the text the original was trained on (one line per line), or leave --corpus out")
    with writer_session(home, args, args.corpus, original=args.file) as (org, memory, _):
        home.save(org)
        s = org.stats()
        print(f"Vocabulary {s['vocab_size']} tokens ({org.birth_vocab} of the original, the rest byte fallback), "
              f"{s['parameters']:,} parameters, {org.model.n_delta} delta module(s), "
              f"{s['corpus']['lines']} corpus lines + {s['corpus']['held_out_lines']} held out.")
        print(f"Saved to {home.checkpoint}; `molecule-gpt chat"
              + (f" --home {home}" if args.home else "") + "` talks to it.")
    return 0


SERVE_SWITCH_INTERVAL = 0.0005  # seconds (sys.setswitchinterval) while serving
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "frequency_penalty", "seed")


def cmd_generate(args, home: Home) -> int:
    overrides = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.greedy:
        overrides["temperature"] = 0.0
    if args.max_tokens is not None:
        overrides["max_gen_tokens"] = args.max_tokens
    if args.min_tokens is not None:
        overrides["min_gen_tokens"] = args.min_tokens
    if args.stop:
        overrides["stop"] = tuple(args.stop)
    if home.exists():
        org = home.open(telemetry=False, recover=args.recover)
    else:
        org, source = home.birth(None, telemetry=False)
        print(f"molecule-gpt: no organism in {home} yet: speaking from the statistics of {source} "
              f"(`molecule-gpt chat` or `train` teaches it)", file=sys.stderr)
    try:
        if args.decode_precision is not None:
            _use_decode_precision(org, args.decode_precision)
        # one continuation streams as it is generated; -n N decodes all N in one batch (the
        # same text: continuation i uses seed + i, as N separate calls did) and prints them
        # when the batch is done
        try:
            replies = [org.stream(args.prompt, **overrides)] if args.n == 1 else \
                [[r.text] for r in org.run(args.prompt, n=args.n, **overrides)]
        except (ValueError, TypeError) as exc:
            raise CLIError(str(exc), "see `molecule-gpt generate --help` for the sampling options") from None
        # a terminal sees control characters made visible; a pipe or a file gets the text as it is
        show = _shown if sys.stdout.isatty() else str
        for pieces in replies:
            if args.echo:
                sys.stdout.write(show(args.prompt) + " ")
            for piece in pieces:
                sys.stdout.write(show(piece))
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
    finally:
        org.close()
    return 0


def _use_decode_precision(org, precision: str) -> None:
    """Decode this run's generations with `precision`; a lower one says what it costs."""
    try:
        check_decode_precision(org.config.replace(decode_precision=precision), org.model.dtype)
    except ConfigError as exc:
        raise CLIError(str(exc), "use --decode-precision model") from None
    org.config.decode_precision = precision
    if precision == "model":
        return
    report = org.decode_precision_report()
    if report is not None:
        print(f"molecule-gpt: {precision} decode weights: held-out loss {report['heldout_model']:.4f} -> "
              f"{report['heldout_decode']:.4f} nats/char ({report['change']:+.3%})", file=sys.stderr)


def cmd_inspect(args, home: Home) -> int:
    path = pathlib.Path(args.checkpoint) if args.checkpoint else home.checkpoint
    if not path.exists():
        raise CLIError(f"no checkpoint at {path}", "give a checkpoint path, or --home DIR of an organism")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as exc:
        prev = pathlib.Path(f"{path}.prev")
        print(f"file       {path} ({path.stat().st_size:,} bytes)")
        print(f"checksum   FAILED: {exc}")
        hint = f"the previous save {prev} is kept beside it" if prev.exists() else None
        raise CLIError(f"{path} does not verify", hint) from None
    doc = _inspect_document(path, ckpt)
    if args.json:
        print(json.dumps(doc, indent=2, default=str))
        return 0
    c = doc["config"]
    print(f"file       {path} ({doc['bytes']:,} bytes, format version {doc['format_version']})")
    print(f"checksum   ok (sha256 of every tensor verified)")
    print(f"config     {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads "
          f"({', '.join(c['head_types'])}), block {c['block_size']}, {doc['dtype']}"
          + (f"; changed from defaults: {', '.join(f'{k}={v}' for k, v in doc['config_changed'].items())}"
             if doc["config_changed"] else ""))
    t = doc["tokenizer"]
    if t:
        print(f"vocabulary {t['vocab_size']} tokens, {'BPE with ' + str(t['merges']) + ' merges' if t['bpe'] else 'characters'}")
    print(f"parameters {doc['parameters']:,}")
    mods = doc["delta_modules"]
    print(f"modules    {len(mods)}" + "".join(f"\n  {delta_group(m['index'])}: {m['state']}, alpha {m['alpha']:.3f}, "
                                          f"{m['steps']} steps" for m in mods))
    if doc.get("trainer"):
        tr = doc["trainer"]
        print(f"trainer    {tr['steps']} steps ({tr['warmup_steps']} warmup{'' if tr['warmed_up'] else ', unfinished'}), "
              f"{tr['bursts']} bursts ({tr['accepted_bursts']} accepted, {tr['rolled_back_bursts']} rolled back), "
              f"loss {_fmt(tr['loss'])}, held-out {_fmt(tr['val_loss'])}")
    if doc.get("gamma"):
        g = doc["gamma"]
        tops = ", ".join(f"{tok!r} {n:.3f}" for tok, n in g["top_tokens"][:5])
        print(f"gamma      sparsity {g['sparsity']:.3f}, magnitude {g['magnitude']:.4f}; moved most: {tops}")
    if doc.get("last_telemetry"):
        print(f"telemetry  {json.dumps(doc['last_telemetry'], default=str)}")
    return 0


def _inspect_document(path: pathlib.Path, ckpt) -> dict:
    model = ckpt.model
    cfg = model.config.to_dict()
    defaults = Config().to_dict()
    doc = {"path": str(path), "bytes": path.stat().st_size, "format_version": ckpt.format_version,
           "dtype": str(model.dtype), "config": cfg,
           "config_changed": {k: v for k, v in cfg.items() if v != defaults.get(k)},
           "parameters": model.num_params(), "tokenizer": None, "delta_modules": []}
    if ckpt.tokenizer is not None:
        tok = ckpt.tokenizer
        doc["tokenizer"] = {"vocab_size": tok.vocab_size, "bpe": tok.bpe_enabled, "merges": len(tok.merges)}
    state = ckpt.state if isinstance(ckpt.state, dict) else None
    if state is not None and state.get("format") == "molecule_gpt.organism":
        org = Organism.from_checkpoint(ckpt)  # takes over ckpt.model: read what the model says first
        try:
            s = org.stats()
            doc["delta_modules"] = [{k: m[k] for k in ("index", "state", "alpha", "steps", "bursts")}
                                    for m in s["delta_modules"]]
            doc["trainer"] = {k: s[k] for k in ("steps", "warmup_steps", "warmed_up", "bursts", "accepted_bursts",
                                                "rolled_back_bursts", "loss", "val_loss")}
            doc["gamma"] = org.gamma_stats()
        finally:
            org.close()
    else:
        doc["delta_modules"] = [{"index": k, "state": "frozen" if not model.trainable[delta_group(k)] else "trainable",
                                 "alpha": model.delta_alphas[k], "steps": model.groups[delta_group(k)].step, "bursts": None}
                                for k in range(model.n_delta)]
    last = None
    for record in read_records(path.parent / TELEMETRY):
        last = record
    doc["last_telemetry"] = last
    return doc


def cmd_growth(args, home: Home) -> int:
    if not home.memory_path.exists():
        raise CLIError(f"no memory in {home} yet", "chat or train first (`molecule-gpt chat`)")
    memory = Memory(home.memory_path, read_only=True)  # a reader: works on a home it cannot write
    try:
        snapshots = memory.snapshots()
    finally:
        memory.close()
    records = list(read_records(home.telemetry))
    if args.plot:
        plot_growth(args.plot, snapshots, records)
        print(f"Wrote {args.plot} ({len(snapshots)} snapshots, {len(records)} telemetry records).")
    else:
        print(growth_table(snapshots[-args.last:] if args.last else snapshots))
    return 0


def plot_growth(out: str, snapshots, records) -> None:
    """Six panels against the global step: training loss and the held-out losses (old text and
    text heard lately, per character, after every burst), vocabulary size, delta
    modules, gamma magnitude, accepted / rolled-back bursts (cumulative), tokens/s."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CLIError("growth --plot needs matplotlib, which is not installed",
                       "pip install 'molecule-gpt[plot]'") from None
    if not snapshots and not records:
        raise CLIError("nothing to plot yet", "chat or train first (`molecule-gpt chat`)")
    steps = [r for r in records if r.get("phase") in ("warmup", "burst") and "step" in r and "loss" in r]
    bursts = [r for r in records if r.get("phase") == "burst_end" and "step" in r]
    # held-out loss: warmup evaluations, then the value each burst left (rolled-back bursts restore the one before)
    evals = sorted([(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None and "step" in r]
                   + [(r["step"], r["loss_after"] if r.get("accepted") else r.get("loss_before"))
                      for r in bursts if r.get("loss_after") is not None])
    heard = [(r["step"], r["new_loss_after"] if r.get("accepted") else r.get("new_loss_before"))
             for r in bursts if r.get("new_loss_before") is not None]
    fig, axes = plt.subplots(3, 2, figsize=(11, 9), constrained_layout=True)
    ax = axes[0][0]
    if steps:
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=0.6, alpha=0.7, label="train loss (nats/token)")
    if evals:
        ax.plot([x for x, _ in evals], [y for _, y in evals], "o-", ms=3, label="held-out, birth text (nats/char)")
    if heard:
        ax.plot([x for x, _ in heard], [y for _, y in heard], "s-", ms=3, label="held-out, text heard lately (nats/char)")
    ax.set_title("loss")
    ax.legend(loc="upper right", fontsize=8)
    snap_steps = [g.step for g in snapshots]
    for ax, values, title in ((axes[0][1], [g.vocab_size for g in snapshots], "vocabulary size"),
                              (axes[1][0], [g.n_delta for g in snapshots], "delta modules"),
                              (axes[1][1], [g.gamma_magnitude if g.gamma_magnitude is not None else float("nan")
                                            for g in snapshots], "gamma magnitude")):
        ax.step(snap_steps, values, where="post", marker=".")
        ax.set_title(title)
    ax = axes[2][0]
    acc = rej = 0
    xs, a_counts, r_counts = [], [], []
    for r in bursts:
        acc += bool(r.get("accepted"))
        rej += not r.get("accepted")
        xs.append(r["step"])
        a_counts.append(acc)
        r_counts.append(rej)
    ax.step(xs, a_counts, where="post", label="accepted")
    ax.step(xs, r_counts, where="post", label="rolled back")
    ax.set_title("bursts (cumulative)")
    ax.legend(loc="upper left")
    ax = axes[2][1]
    if steps:
        ax.plot([r["step"] for r in steps], [r.get("tokens_per_s", float("nan")) for r in steps], lw=0.6)
    ax.set_title("training tokens/s")
    for row in axes:
        for ax in row:
            ax.set_xlabel("step")
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise CLIError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def cmd_forget(args, home: Home) -> int:
    if not args.phrase and not args.all:
        raise CLIError("say what to forget: a PHRASE, or --all for every chat message", code=2)
    if args.phrase and args.all:
        raise CLIError("give a PHRASE or --all, not both", code=2)
    phrase = None if args.all else args.phrase
    with home.locked():
        memory = home.memory()
        try:
            if home.exists():
                org = home.open(memory=memory, telemetry=False, recover=args.recover)
                try:
                    counts = org.forget(phrase)
                    home.save(org)
                finally:
                    org.close()
            else:
                counts = memory.forget(phrase)
        finally:
            memory.close()
    print(f"{str(counts).capitalize()}.")
    if not counts.erased_from_disk:
        print("(another process holds the database open: the freed pages are erased at its next checkpoint)")
    return 0


def cmd_serve(args, home: Home) -> int:
    """`molecule-gpt serve`: the OpenAI-compatible API and the chat page (molecule_gpt.server)."""
    try:
        import uvicorn
        from .server import create_app, is_loopback
    except ImportError as exc:
        raise CLIError(f"serve needs the 'serve' extra ({exc.name} is not installed)",
                       "pip install 'molecule-gpt[serve]'") from None
    api_key = args.api_key or os.environ.get("MOLECULE_GPT_API_KEY") or None
    if not is_loopback(args.host) and not api_key:
        raise CLIError(f"--host {args.host} would let other machines reach the organism without a key",
                       "give --api-key KEY (or MOLECULE_GPT_API_KEY), or serve on 127.0.0.1", code=2)
    if args.homes and args.home:
        raise CLIError("give --home DIR (one organism) or --homes DIR (one per sub-folder), not both", code=2)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "ray", None) is not None:
        return _serve_ray(args, home, api_key)
    if getattr(args, "hosts", None) is not None:
        raise CLIError("--hosts is for --ray (the number of host actors)", code=2)
    try:
        app = create_app(home=None if args.homes else home.path, homes=args.homes, api_key=api_key,
                         learn=not args.no_learn, config=args.config, recover=args.recover)
    except ValueError as exc:
        raise CLIError(str(exc), code=2) from None
    names = ", ".join(app.state.served)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Serving {names} on http://{shown}:{args.port}/ (OpenAI base_url http://{shown}:{args.port}/v1"
          f"{', API key required' if api_key else ''}; learning {'off' if args.no_learn else 'on'}). "
          f"Ctrl-C stops and saves.", flush=True)
    # the event loop and the streams each need the interpreter lock for a moment per token; a
    # thread running Python for longer (the learner, the trainer between steps) hands it over
    # after this interval instead of the default 5 ms
    sys.setswitchinterval(SERVE_SWITCH_INTERVAL)
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, log_level="info", timeout_graceful_shutdown=10)
    return 0


def _serve_ray(args, home: Home, api_key: str | None) -> int:
    """`molecule-gpt serve --ray [ADDRESS]`: the organisms of --homes DIR (or the one of --home)
    on Ray actors (molecule_gpt.colony), served through Ray Serve until Ctrl-C, then saved."""
    try:
        import ray  # noqa: F401
        from ray import serve
        from .colony import Colony, ColonyError
        from .colony_store import valid_name
    except ImportError as exc:
        raise CLIError(f"serve --ray needs the 'ray' extra ({exc.name} is not installed)",
                       "pip install 'molecule-gpt[serve,ray]'") from None
    if args.recover:
        raise CLIError("--recover is for a single-process home; with --ray every save is kept under its "
                       "generation in the shared storage", code=2)
    if args.homes:
        root, only = args.homes, None
        if "://" not in root and not os.path.isdir(os.path.expanduser(root)):
            raise CLIError(f"--homes {root}: not a directory", "create it, or give the shared storage's URL", code=2)
    else:
        root, only = str(home.path.parent), [home.path.name]
        try:
            valid_name(home.path.name)
        except ValueError as exc:
            raise CLIError(f"the home folder's name is the model id: {exc}", code=2) from None
    where = f"the Ray cluster at {args.ray}" if args.ray else "a local Ray instance (127.0.0.1)"
    print(f"Starting the colony on {where}; shared storage {root}.", flush=True)
    try:
        colony = Colony(root, address=args.ray or None, hosts=args.hosts, config=args.config,
                        learn=not args.no_learn)
    except (ValueError, ColonyError) as exc:
        raise CLIError(str(exc), code=2) from None
    names = colony.list()
    if only is not None and only[0] not in names:
        print(f"A new organism {only[0]} is born in {root} and warms up on its host "
              f"({colony.spec['config'].get('warmup_steps', 'the default')} warmup steps).", flush=True)
        colony.create(only[0])
        names = [only[0]]
    elif only is not None:
        names = only
    if not names:
        raise CLIError(f"--homes {root} holds no organisms", "create one with `molecule-gpt serve --ray --home "
                                                              f"{os.path.join(root, 'pet')}` or copy homes into it")
    url = colony.serve(host=args.host, port=args.port, api_key=api_key, only=only)
    print(f"Serving {', '.join(names)} on {url}/ through Ray Serve (OpenAI base_url {url}/v1"
          f"{', API key required' if api_key else ''}; learning {'off' if args.no_learn else 'on'}; "
          f"{colony.hosts} host(s)). Ctrl-C stops and saves.", flush=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        try:
            serve.shutdown()
            saved = colony.shutdown()
            print(f"Saved {', '.join(saved) if saved else 'nothing (no changes)'} to {root}.", flush=True)
        finally:
            ray.shutdown()
    return 0


def cmd_bench(args, home: Home) -> int:
    from .quickbench import run_quick_bench
    rows = run_quick_bench(repeats=args.repeats, progress=lambda name: print(f"  {name} ...", file=sys.stderr))
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table([(r["case"], r["figure"], r["unit"], r["detail"]) for r in rows], ["case", "figure", "unit", "detail"]))
    return 0


# ---------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", metavar="DIR", default=argparse.SUPPRESS,
                        help=f"the organism's directory (default: $MOLECULE_GPT_HOME or {default_home()})")
    common.add_argument("--config", metavar="FILE.json", default=argparse.SUPPRESS,
                        help="options from a JSON object: Config fields and command-line settings; flags override it")
    common.add_argument("--recover", action="store_true", default=argparse.SUPPRESS,
                        help="if the checkpoint is damaged, load the previous save (organism.ckpt.prev)")

    parser = argparse.ArgumentParser(
        prog="molecule-gpt", parents=[common],
        description="A small GPT organism that keeps learning while it chats.",
        epilog="`molecule-gpt COMMAND --help` describes each command. Settings a config file may set: "
               + ", ".join(f"{k} (default {v!r})" for k, v in SETTINGS.items()) + ".")
    parser.add_argument("--version", action="version", version=f"molecule-gpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("chat", parents=[common], help="chat with the organism (it learns in the background)",
                       description="Chat with the organism. The first run warms it up on the seed corpus (or "
                                   "--corpus) with a progress bar; then it answers while a background trainer "
                                   "learns from the conversation. Slash commands: /status /growth /save "
                                   "/forget [TEXT] /help /quit.")
    p.add_argument("--corpus", metavar="FILE", help="a text file to be born from (first run only)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("train", parents=[common], help="warm up, or teach it a text file",
                       description="Train the organism. A new or partly warmed-up organism runs (the rest of) its "
                                   "warmup. CORPUS is born from, or, for an existing organism, added to its corpus and "
                                   "learned in checked bursts (rolled back if they damage it).")
    p.add_argument("corpus", nargs="?", metavar="CORPUS", help="a UTF-8 text file, one line per line")
    p.add_argument("--steps", type=_positive_int, metavar="N",
                   help="run N steps of the warmup now (default: all that remain); once warm, N more base steps")
    p.add_argument("--bursts", type=_non_negative_int, metavar="N",
                   help="run N checked bursts (default, on a warm organism: learn CORPUS whole, bursts until "
                        "its held-out slice stops improving)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("import", parents=[common], help="adopt an organism of the original single-file program",
                       description="Adopt the organism saved by the original single-file program (its JSON "
                                   "checkpoint) into a new home: its weights exactly, its tokenizer with byte "
                                   "fallback (no character is dropped), and the corpus given with --corpus (split "
                                   "into training and held-out lines). It counts as warmed up: `chat` talks to it "
                                   "and it keeps learning. Refuses a home that already holds an organism.")
    p.add_argument("file", metavar="FILE.json", help="the original program's checkpoint (e.g. molecule_ckpt.json)")
    p.add_argument("--corpus", metavar="FILE", help="the text it was trained on (e.g. nonames.txt), one line per line")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", parents=[common], help="continue a prompt",
                       description="Print a continuation of PROMPT (without learning from it). Without an organism "
                                   "in the home, a newborn speaks from the seed corpus statistics.")
    p.add_argument("prompt", nargs="?", default="", metavar="PROMPT")
    p.add_argument("--temperature", type=_non_negative_float, metavar="T", help="0 is greedy (default from config: 0.85)")
    p.add_argument("--greedy", action="store_true", help="same as --temperature 0")
    p.add_argument("--top-k", type=_non_negative_int, metavar="K", help="keep the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, metavar="P", help="nucleus mass (1: off)")
    p.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P x the most likely (0: off)")
    p.add_argument("--typical-p", type=float, metavar="P", help="typical sampling mass (1: off)")
    p.add_argument("--frequency-penalty", type=float, metavar="F", help="logit penalty per earlier occurrence")
    p.add_argument("--max-tokens", type=_positive_int, metavar="N", help="at most N tokens")
    p.add_argument("--min-tokens", type=_non_negative_int, metavar="N", help="no stop before N tokens")
    p.add_argument("--stop", action="append", metavar="TEXT", help="stop before TEXT (repeatable)")
    p.add_argument("--seed", type=_non_negative_int, metavar="N", help="reproducible sampling")
    p.add_argument("-n", type=_positive_int, default=1, metavar="N",
                   help="N continuations, one per line, decoded together (continuation i uses --seed + i)")
    p.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    p.add_argument("--decode-precision", choices=DECODE_PRECISIONS, metavar="P",
                   help="weights the decoder reads for this run: 'model' or 'bfloat16' (half the bytes; "
                        "prints what it costs in held-out loss)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("inspect", parents=[common], help="what a checkpoint holds, and whether it verifies",
                       description="Config, vocabulary, delta modules, gamma, last telemetry and checksum status "
                                   "of CHECKPOINT (default: the home's organism.ckpt). Exits 1 if it does not verify.")
    p.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("growth", parents=[common], help="the organism's growth over time (table or plot)",
                       description="Growth snapshots (step, vocabulary, parameters, delta modules, loss, gamma) as a "
                                   "table, or with --plot a PNG of loss, held-out loss, vocabulary size, delta "
                                   "modules, gamma magnitude and accepted/rolled-back bursts over steps.")
    p.add_argument("--plot", metavar="FILE.png", help="write the plot here (needs matplotlib)")
    p.add_argument("--last", type=_positive_int, metavar="N", help="only the last N snapshots in the table")
    p.set_defaults(func=cmd_growth)

    p = sub.add_parser("forget", parents=[common], help="delete chat messages and what was learned into the corpus",
                       description="Delete chat messages, their search-index rows and chat lines of the corpus "
                                   "reservoir that contain PHRASE (case-insensitive), or all of them with --all, and "
                                   "say how many went. The seed corpus stays; weights keep what they learned.")
    p.add_argument("phrase", nargs="?", metavar="PHRASE")
    p.add_argument("--all", action="store_true", help="forget every chat message")
    p.set_defaults(func=cmd_forget)

    p = sub.add_parser("serve", parents=[common], help="an OpenAI-compatible HTTP API and a chat page",
                       description="Serve the organism over HTTP: the OpenAI API (/v1/models, /v1/chat/completions, "
                                   "/v1/completions, streaming) and a chat page at /, while it learns from the "
                                   "conversations (unless --no-learn). A new home is born and warmed up first. "
                                   "Needs the 'serve' extra: pip install 'molecule-gpt[serve]'.")
    p.add_argument("--homes", metavar="DIR", help="serve every home in DIR, one organism per sub-folder")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; another needs --api-key)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' (default: "
                                                    "$MOLECULE_GPT_API_KEY, else none)")
    p.add_argument("--no-learn", action="store_true", help="serve without learning from the conversations")
    # --- Ray (molecule_gpt.colony): the same API and page, organisms on Ray actors behind Ray Serve
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="serve through Ray: a local Ray instance without ADDRESS, else a cluster ('HOST:PORT', "
                        "'auto' or 'ray://HOST:10001'); --homes DIR (or --home's parent) is then the shared storage "
                        "every node reaches (a mounted directory or an fsspec URL). Needs the 'ray' extra")
    p.add_argument("--hosts", type=_positive_int, metavar="N",
                   help="with --ray: host actors, one training slot each (default: one per CPU of the cluster)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", parents=[common], help="quick benchmarks of this machine, as a table",
                       description="Training steps, generation, tokenizer and checkpoint speed at the default config "
                                   "(a few seconds). The full head-to-head suites are in the repository's benchmarks/.")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N", help="timings per case (median)")
    p.add_argument("--json", action="store_true", help="print JSON rows")
    p.set_defaults(func=cmd_bench)
    return parser


def _typed(convert, test, what):
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    parse.__name__ = what
    return parse


_positive_int = _typed(int, lambda v: v > 0, "a positive int")
_non_negative_int = _typed(int, lambda v: v >= 0, "an int >= 0")
_port = _typed(int, lambda v: 0 < v < 65536, "a TCP port (1-65535)")
_non_negative_float = _typed(float, lambda v: 0 <= v < math.inf, "a number >= 0")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status (errors print one line, never a traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("home", None), ("config", None), ("recover", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    show_traceback = os.environ.get("MOLECULE_GPT_TRACEBACK", "") not in ("", "0")
    try:
        options = load_options(args.config)
        home = Home(args.home or default_home(), options)
        return args.func(args, home)
    except CLIError as exc:
        _error(exc.message, exc.hint)
        return exc.code
    except Interrupted as exc:
        print(f"molecule-gpt: interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nmolecule-gpt: interrupted (the last saved checkpoint is intact)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`... | head -1`): stop quietly, as Unix tools do; what is still
        # buffered for stdout goes to /dev/null so the interpreter's exit does not complain again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except MoleculeError as exc:  # corpus, memory store, training, checkpoint: messages say the fix
        if show_traceback:
            raise
        _error(str(exc))
        return 1
    except OSError as exc:
        if show_traceback:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            _error(f"the disk is full ({exc.filename or 'while writing'})", "free some space and try again")
        else:
            _error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 1
    except Exception as exc:  # a bug: still one line, with the way to the traceback
        if show_traceback:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc}",
               "rerun with MOLECULE_GPT_TRACEBACK=1 and report the traceback")
        return 70


def _error(message: str, hint: str | None = None) -> None:
    print(f"molecule-gpt: error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
