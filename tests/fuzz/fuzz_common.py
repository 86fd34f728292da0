"""What the fuzz targets in tests/fuzz share: reading decisions from the fuzz input, mutating
JSON values, and the two drivers (atheris when it is installed, a seeded random one always).

What it is: every target is `fuzz_one(data: bytes)`. It reads its decisions (which base file,
which mutation, where, what value) from `data` through `Choices`, so a coverage-guided fuzzer
that mutates bytes steers the mutations, and random bytes give random mutations. `main()` is
the command line of each `fuzz_*.py` script: libFuzzer's arguments go to atheris when it can be
imported (coverage of molecule_gpt's Python code, see README.md), `--random` (or no atheris)
runs the seeded random driver, and file arguments replay saved inputs. `run_random()` is what
the pytest tests call.

What it is not: an oracle. Each target decides itself what outcomes are acceptable; a target
fails by raising (FuzzFailure or whatever escaped the code under test). It does not fork: a
crash (a signal in the C or Cython code) ends the process, and a hang is caught by a watchdog
that dumps every thread's traceback and exits (faulthandler, so it fires inside C code too).
"""
from __future__ import annotations

import argparse
import contextlib
import faulthandler
import hashlib
import math
import os
import pathlib
import random
import sys
import time
from typing import Any, Callable

HERE = pathlib.Path(__file__).resolve().parent

try:
    import atheris
except ImportError:  # the random driver still works
    atheris = None


class FuzzFailure(AssertionError):
    """A target saw an outcome its contract does not allow."""


def _atheris_wanted() -> bool:
    """True when the process was started as one of the fuzz_*.py scripts with atheris available
    and without --random or replay files: then molecule_gpt is imported under instrumentation."""
    main = getattr(sys.modules.get("__main__"), "__file__", None) or ""
    return (atheris is not None and pathlib.Path(main).name.startswith("fuzz_")
            and "--random" not in sys.argv and not any(os.path.isfile(a) for a in sys.argv[1:]))


def instrumented():
    """Context manager for a target's imports of molecule_gpt: atheris instruments the package's
    Python bytecode (not its compiled _core/_bpe/_decode extensions) when it drives the run."""
    if _atheris_wanted():
        _compare_arrays_in_python()
        return atheris.instrument_imports(include=["molecule_gpt"])
    return contextlib.nullcontext()


def _compare_arrays_in_python() -> None:
    """Instrumented code calls atheris._trace_cmp(a, b, op, counter, is_const) for every
    comparison. atheris 3.0's native one keeps the result alive when it is not a bool: each
    `array == value` in checkpoint.py's structure scan leaked its boolean array (tracemalloc:
    about 250 KB per input, 6 GB and libFuzzer's out-of-memory stop after 20,000 inputs). Numpy
    operands are compared here instead (nothing to learn from them for libFuzzer's value
    profile anyway); everything else still goes to the native hook. The instrumented bytecode
    looks the hook up on the atheris module at each call, so replacing it there is enough."""
    import operator

    import numpy as np
    from atheris.instrument_bytecode import CMP_OP_SHIFT_AMOUNT

    native = atheris._trace_cmp
    ops = (operator.lt, operator.le, operator.eq, operator.ne, operator.gt, operator.ge)

    def trace_cmp(obj1, obj2, op, counter, is_const):
        if isinstance(obj1, np.ndarray) or isinstance(obj2, np.ndarray):
            # op is dis.cmp_op's index, shifted on Python >= 3.12 except for reversed constants
            return ops[op if op < len(ops) else op >> CMP_OP_SHIFT_AMOUNT](obj1, obj2)
        return native(obj1, obj2, op, counter, is_const)

    atheris._trace_cmp = trace_cmp


# ---------------------------------------------------------------------------------------------
# decisions from bytes


class Choices:
    """Decisions read from the front of the fuzz input; past its end every decision is 0 (the
    first option), so a short input means few, simple mutations."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def _int(self, nbytes: int) -> int:
        chunk = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return int.from_bytes(chunk, "little")

    def below(self, n: int) -> int:
        """An int in [0, n) (n >= 1): one byte for up to 256 options, more for more."""
        if n <= 1:
            return 0
        nbytes = 1 if n <= 256 else 2 if n <= 65536 else 4
        return self._int(nbytes) % n

    def chance(self, percent: int) -> bool:
        return self.below(100) < percent

    def pick(self, options):
        return options[self.below(len(options))]

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return max(len(self.data) - self.pos, 0)


# ---------------------------------------------------------------------------------------------
# JSON mutations (the checkpoint's header, document and organism state, the tokenizer's dict)

# Values a reader must survive in any place: wrong types, signs, sizes; non-finite floats (json
# writes NaN/Infinity and Python's json reads them back); a lone surrogate (ensure_ascii writes
# "\ud800", which reads back as a str no UTF-8 codec encodes); a NUL; empty containers.
HOSTILE = [None, True, False, 0, 1, -1, 2, 7, 255, 256, 2 ** 31, 2 ** 32 + 1, 2 ** 63, 2 ** 64, -(2 ** 63), 10 ** 30,
           0.0, -0.0, 0.5, 1e-300, 1e308, math.nan, math.inf, -math.inf, "", "0", "1", "-1", "x", "\u0000",
           "\ud800", "\u00e9", "\U0001f600", "float32", "float64", "F32", "F64", "content", "hybrid", "rrpram",
           [], {}, [0], [-1], [0, 0], [1, 2, 3], {"": None}, [[]], "a" * 300]


def hostile(ch: Choices) -> Any:
    v = ch.pick(HOSTILE)
    return v.copy() if isinstance(v, (list, dict)) else v


def nodes(value: Any, path=(), out=None, limit: int = 4000) -> list[tuple]:
    """Paths to the nodes of a JSON value (the root first), breadth-limited to `limit` nodes."""
    out = [] if out is None else out
    stack = [(value, path)]
    while stack and len(out) < limit:
        v, p = stack.pop()
        out.append(p)
        if isinstance(v, dict):
            stack.extend((v[k], p + (k,)) for k in reversed(list(v)))
        elif isinstance(v, list):
            stack.extend((v[i], p + (i,)) for i in reversed(range(len(v))))
    return out


def get(value: Any, path: tuple) -> Any:
    for k in path:
        value = value[k]
    return value


def put(value: Any, path: tuple, new: Any) -> Any:
    """`value` with the node at `path` replaced (the root when path is empty)."""
    if not path:
        return new
    get(value, path[:-1])[path[-1]] = new
    return value


def tweak(v: Any, ch: Choices, donor: Callable[[], Any]) -> Any:
    """A mutated version of one JSON value: a neighbour of the same type most of the time (so
    checks deeper than the type check are reached), a hostile value or another node otherwise."""
    op = ch.below(10)
    if op == 0:
        return hostile(ch)
    if op == 1:
        return donor()
    if isinstance(v, bool):
        return ch.pick([not v, int(v), None])
    if isinstance(v, int):
        return ch.pick([v + 1, v - 1, -v, 2 * v, v // 2, 0, v + 2 ** 32, float(v), str(v), v * 10 ** 6])
    if isinstance(v, float):
        return ch.pick([-v, 2 * v, 0.0, math.nan, math.inf, int(v) if math.isfinite(v) else 0, v + 1e-9, str(v)])
    if isinstance(v, str):
        i = ch.below(len(v) + 1)
        return ch.pick([v[:i], v[i:], v[:i] + chr(ch.below(0x250)) + v[i:], v[:i] + v[i + 1:], v * 2, v.upper(),
                        v + "\ud800", v[:i] + "\x00" + v[i:], "", v[::-1]])
    if isinstance(v, list):
        v = list(v)
        i = ch.below(len(v) + 1)
        sub = ch.below(8)
        if sub == 0 and v:
            del v[i % len(v)]
        elif sub == 1 and v:
            v.insert(i, v[ch.below(len(v))])
        elif sub == 2:
            v.insert(i, hostile(ch))
        elif sub == 3 and len(v) > 1:
            j = ch.below(len(v))
            i %= len(v)
            v[i], v[j] = v[j], v[i]
        elif sub == 4:
            v = v[:i]
        elif sub == 5:
            v = v[::-1]
        elif sub == 6:
            v = v + v
        else:
            v = []
        return v
    if isinstance(v, dict):
        v = dict(v)
        keys = list(v)
        sub = ch.below(5)
        if sub == 0 and keys:
            del v[ch.pick(keys)]
        elif sub == 1:
            v["fuzz" + str(ch.below(4))] = hostile(ch)
        elif sub == 2 and keys:
            k = ch.pick(keys)
            v[k + ch.pick(["_", "", " "])] = v.pop(k)
        elif sub == 3:
            return list(v.values())
        else:
            return {}
        return v
    return hostile(ch)


def mutate_json(value: Any, ch: Choices, times: int | None = None, prefer: tuple | None = None) -> Any:
    """`value` (copied as needed: the caller's object is modified in place except at the root)
    after 1-4 tweaks at nodes chosen by `ch`; with `prefer`, the first tweak lands at or under
    that path when it exists."""
    times = 1 + ch.below(4) if times is None else times
    for n in range(times):
        paths = nodes(value)
        if prefer is not None and n == 0:
            under = [p for p in paths if p[:len(prefer)] == prefer]
            paths = under or paths
        path = ch.pick(paths)
        value = put(value, path, tweak(get(value, path), ch, lambda: _copy(get(value, ch.pick(paths)))))
    return value


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_copy(x) for x in v]
    return v


# ---------------------------------------------------------------------------------------------
# drivers


def run_random(fuzz_one: Callable[[bytes], Any], *, seed: int, runs: int, seconds: float | None = None,
               max_len: int = 512, timeout: float = 60.0, crash_dir: str | os.PathLike | None = None,
               keep_going: bool = False) -> dict:
    """Run fuzz_one on `runs` inputs from random.Random(seed) (lengths up to max_len; every
    tenth input shorter than 16 bytes), stopping early after `seconds`. An input that fails is
    saved as crash-<sha1> in crash_dir (default: the current directory) and the error re-raised
    with its path (with keep_going: counted under "FAILED: ..." and the run goes on); one that
    runs past `timeout` seconds ends the process with tracebacks.
    Returns {"runs", "seconds", "outcomes": {label: count}} (labels are what fuzz_one returns)."""
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    done = 0
    for done in range(1, runs + 1):
        n = rng.randrange(16) if done % 10 == 0 else rng.randrange(max_len + 1)
        data = rng.randbytes(n)
        try:
            label = run_one(fuzz_one, data, timeout=timeout, crash_dir=crash_dir)
        except FuzzFailure as exc:
            if not keep_going:
                raise
            label = f"FAILED: {exc.__cause__ and type(exc.__cause__).__name__}: {str(exc)[:300]}"
        outcomes[str(label)] = outcomes.get(str(label), 0) + 1
        if seconds is not None and time.perf_counter() - start > seconds:
            break
    return {"runs": done, "seconds": time.perf_counter() - start, "outcomes": outcomes}


def run_one(fuzz_one: Callable[[bytes], Any], data: bytes, *, timeout: float = 60.0,
            crash_dir: str | os.PathLike | None = None) -> Any:
    """fuzz_one(data) under the hang watchdog; a failing input is saved for replay."""
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        return fuzz_one(data)
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        where = pathlib.Path(crash_dir or ".") / f"crash-{hashlib.sha1(data).hexdigest()}"
        with contextlib.suppress(OSError):
            where.write_bytes(data)
        raise FuzzFailure(f"input {where} ({len(data)} bytes) failed: {type(exc).__name__}: {exc}") from exc
    finally:
        faulthandler.cancel_dump_traceback_later()


def main(fuzz_one: Callable[[bytes], Any], argv: list[str] | None = None, *, default_runs: int = 10_000,
         atheris_ok: bool = True) -> int:
    """Command line of a fuzz_*.py script (see README.md). Files among the arguments are replayed
    once each; otherwise atheris runs (libFuzzer arguments such as -atheris_runs=N,
    -max_total_time=S, a corpus directory) when installed, and the random driver when not, or
    with --random [--runs N] [--seconds S] [--seed K] [--keep-going]."""
    argv = list(sys.argv if argv is None else argv)
    files = [a for a in argv[1:] if os.path.isfile(a)]
    if files:
        for f in files:
            label = run_one(fuzz_one, pathlib.Path(f).read_bytes())
            print(f"{f}: {label}")
        return 0
    if atheris_ok and _atheris_wanted():
        atheris.Setup(argv, fuzz_one)
        atheris.Fuzz()  # does not return
    parser = argparse.ArgumentParser(description="seeded random driver (atheris is not installed, or --random)")
    parser.add_argument("--random", action="store_true")
    parser.add_argument("--runs", type=int, default=default_runs)
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--keep-going", action="store_true", help="count failures and go on (crash-* files kept)")
    args, unknown = parser.parse_known_args(argv[1:])
    if unknown:
        print(f"ignoring {' '.join(unknown)} (libFuzzer arguments; atheris is "
              f"{'not installed' if atheris is None else 'not used with --random'})", file=sys.stderr)
    stats = run_random(fuzz_one, seed=args.seed, runs=args.runs, seconds=args.seconds, max_len=args.max_len,
                       keep_going=args.keep_going)
    failed = sum(n for k, n in stats["outcomes"].items() if k.startswith("FAILED"))
    print(f"{stats['runs']} inputs in {stats['seconds']:.1f} s, {failed or 'no'} failure(s); outcomes:")
    for label, count in sorted(stats["outcomes"].items(), key=lambda kv: -kv[1]):
        print(f"{count:8d}  {label.encode('utf-8', 'backslashreplace').decode('utf-8')}")
    return 1 if failed else 0
