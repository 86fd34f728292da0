"""Many organisms on a Ray cluster, behind the same OpenAI-compatible API (`molecule-gpt serve --ray`).

    pip install "molecule-gpt[serve,ray]"
    molecule-gpt serve --ray --homes /shared/organisms          # a local Ray instance on this machine
    molecule-gpt serve --ray ray://head:10001 --homes /shared/organisms   # a cluster

    from molecule_gpt.colony import Colony
    colony = Colony("/shared/organisms")          # starts local Ray (or Colony(..., address=...))
    colony.create("alice", config={"warmup_steps": 300})   # born and warmed up on its host
    alice = colony.get("alice")
    alice.generate("the river", seed=1, temperature=0)
    alice.observe("what is a river?", speaker="H")
    colony.list(); colony.remove("alice"); colony.shutdown()
    colony.serve(port=8000)                       # the HTTP API and page through Ray Serve

How it is built:

Hosts. An OrganismHost is a Ray actor holding several organisms (a process per organism would
cost 100-200 MB each). Each organism is a local home (molecule_gpt.cli.Home: its checkpoint,
memory.sqlite, telemetry, its lock) in the host's local directory, worked on by that host only.
The host generates for it (a thread per generation, as the single-process server does), learns
what it is told (the server's Served bookkeeping: every conversation turn once) and trains it
with checked bursts when its quantum buffer is ready, as `Organism.start_background` would, but
from one trainer per host: a host holds one training slot, requested from Ray as `host_cpus`
CPUs (default 1), so Ray places hosts so that at most one organism trains per reserved core,
however many organisms the hosts hold. Thread counts are set, not inherited: Config.train_threads
= max(1, host_cpus), decode_threads = 1, BLAS single-threaded in the whole host process.

Which host holds an organism: rendezvous hashing of its name over the colony's `hosts` named
actors, so every ingress replica and the Python API agree without asking anyone.

Saves. A host saves an organism every `autosave_turns` learned turns (as `chat`), when it
releases it and at shutdown: it writes the checkpoint locally, makes a SQLite backup of the
memory, and ships both whole (with the conversation keys it has learned and the status history)
to the shared storage under a new generation number (molecule_gpt.colony_store). Loading an
organism claims the next generation, so a stale host (one on a node declared dead) cannot
overwrite a newer save.

Idle release. An organism not asked for `idle_seconds` is saved (when it changed) and dropped
from memory; at most `max_loaded` stay loaded per host (the least recently used go first). Its
next request loads it again from the shared storage.

Failures. Hosts restart (max_restarts=-1), on another node when theirs died; a restarted host
loads each organism from its last save at its next request. What is lost: the turns learned
since that save (at most autosave_turns - 1 of them, and bursts trained since), and the requests
in flight, which get an error. Memory and corpus come from the same save, so they agree.

Nothing here imports Ray until a Colony is made or a host runs.
"""
from __future__ import annotations

import asyncio
import collections.abc
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import pathlib
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from typing import Any, Iterable, Sequence

from .colony_store import StaleGeneration, Store, valid_name
from .errors import MoleculeError

__all__ = ["Colony", "OrganismHandle", "ColonyError", "init_ray", "host_for", "colony_app", "NAMESPACE"]

log = logging.getLogger("molecule_gpt.colony")

NAMESPACE = "molecule-gpt"  # the Ray namespace of the colony's named actors
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ColonyError(MoleculeError):
    """A colony operation that cannot be done (unknown organism, a host that died, no Ray)."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ColonyError("the colony runs on Ray, which is not installed: pip install 'molecule-gpt[ray]'") from None
    return ray


def init_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect to Ray: `address` (a cluster's "host:port", "auto", or "ray://host:10001"), or, when
    None, start a local instance bound to 127.0.0.1 without the dashboard and usage reporting.
    Nothing happens when Ray is initialized already."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray = _ray()
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE, _node_ip_address="127.0.0.1",
                 log_to_driver=False)


def host_for(name: str, hosts: int) -> int:
    """The host index that holds `name`: rendezvous hashing (every caller agrees; changing the
    number of hosts moves only the organisms whose best host changed)."""
    return max(range(hosts), key=lambda i: hashlib.sha256(f"{i}\0{name}".encode()).digest())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# the host actor (a plain class; Colony wraps it with ray.remote)


class _Hosted:
    """One organism in a host: its home, organism, memory and what the schedule needs."""

    def __init__(self, name: str):
        self.name = name
        self.state = "loading"  # loading -> ready -> releasing (then gone); or failed
        self.event = threading.Event()  # set when loading or releasing ends
        self.error: str | None = None
        self.users = 0  # requests in flight (never released while > 0)
        self.last_used = time.monotonic()
        self.state_lock = threading.RLock()  # observe and save: a save is one moment of organism + memory
        self.train_mutex = threading.Lock()  # held while it trains (release waits for it)
        self.stack = contextlib.ExitStack()  # the home's lock, the memory, the organism
        self.dir: str = ""
        self.home = self.org = self.memory = self.served = None
        self.generation = 0
        self.sha = ""  # of the checkpoint last loaded or shipped
        self.dirty = False  # changed since the last save
        self.turns_since_save = 0
        self.train_error: str | None = None


class OrganismHost:
    """A Ray actor holding organisms (see the module docstring). `spec`: store, index, config,
    settings, learn, idle_seconds, max_loaded, host_cpus, local_dir."""

    def __init__(self, spec: dict):
        for k, v in THREAD_ENV.items():
            os.environ.setdefault(k, v)
        from threadpoolctl import threadpool_limits
        self._blas = threadpool_limits(limits=1, user_api="blas")  # generation and steps own the cores
        from . import cli
        self.cli = cli
        self.spec = dict(spec)
        self.index = int(spec.get("index", 0))
        self.store = Store(spec["store"])
        self.options = cli.Options(dict(spec.get("config") or {}), {**cli.SETTINGS, **(spec.get("settings") or {})})
        self.learn = bool(spec.get("learn", True))
        self.idle_seconds = float(spec.get("idle_seconds", 300.0))
        self.max_loaded = int(spec.get("max_loaded", 64))
        self.train_threads = max(1, int(spec.get("host_cpus", 1)))
        self.owner = f"host{self.index}@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.local = tempfile.mkdtemp(prefix=f"molecule-gpt-host{self.index}-", dir=spec.get("local_dir"))
        self.hosted: dict[str, _Hosted] = {}
        self._lock = threading.Lock()  # the hosted dict and each entry's state
        self._slot = threading.Lock()  # the training slot: one warmup or burst at a time in this host
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=int(spec.get("threads", 64)),
                                                           thread_name_prefix="molecule-gpt-host")
        self._start_threads()
        log.info("host %d (%s) up, local directory %s", self.index, self.owner, self.local)

    def _start_threads(self) -> None:
        """The trainer (the host's training slot) and the reaper (idle release)."""
        self._stop.clear()
        self._trainer = threading.Thread(target=self._train_loop, name="molecule-gpt-host-trainer", daemon=True)
        self._trainer.start()
        self._reaper = threading.Thread(target=self._reap_loop, name="molecule-gpt-host-reaper", daemon=True)
        self._reaper.start()

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # ---- loading and releasing (in worker threads)

    def _acquire(self, name: str) -> _Hosted:
        """The loaded organism `name`, loading it from the store if needed; counts a user (pair
        with _done)."""
        valid_name(name)
        while True:
            with self._lock:
                h = self.hosted.get(name)
                if h is not None and h.state == "ready":
                    h.users += 1
                    h.last_used = time.monotonic()
                    return h
                mine = h is None
                if mine:
                    h = self.hosted[name] = _Hosted(name)
            if not mine:
                h.event.wait()
                if h.state == "failed":  # the load this request waited for failed: say why
                    raise ColonyError(f"organism {name!r} failed to load: {h.error}")
                continue  # loaded (or released meanwhile): look again
            try:
                self._load(h)
            except BaseException as exc:
                missing = isinstance(exc, KeyError)
                h.error = "it has no save" if missing else (getattr(exc, "message", None)
                                                            or f"{type(exc).__name__}: {exc}")
                h.stack.close()
                if h.dir:
                    shutil.rmtree(h.dir, ignore_errors=True)
                with self._lock:
                    h.state = "failed"
                    del self.hosted[name]  # the next request tries again
                h.event.set()
                if missing:
                    raise ColonyError(f"no organism named {name!r} in {self.store.url}") from None
                raise
            with self._lock:
                h.state = "ready"
            h.event.set()
            self._evict_over_capacity(keep=name)

    def _done(self, h: _Hosted) -> None:
        with self._lock:
            h.users -= 1
            h.last_used = time.monotonic()

    def _fresh_dir(self, name: str) -> str:
        path = os.path.join(self.local, name)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    def _load(self, h: _Hosted) -> None:
        t0 = time.perf_counter()
        h.dir = self._fresh_dir(h.name)
        gen, paths = self.store.open(h.name, self.owner, h.dir)
        h.generation, h.sha = gen.number, _sha256(paths["organism.ckpt"])
        home = self.cli.Home(h.dir, self.options)
        h.stack.enter_context(home.locked())  # the home stays local and locked while this host owns it
        memory = h.stack.enter_context(home.memory())
        org = home.open(memory=memory)
        h.stack.callback(org.close)
        self._attach(h, home, memory, org, paths)
        if not org.trainer.warmed_up:  # a home that was never warmed up, as the server warms it
            with self._slot:
                org.warmup()
            h.dirty = True
        log.info("host %d: loaded %s (generation %d) in %.3f s", self.index, h.name, gen.number,
                 time.perf_counter() - t0)

    def _attach(self, h: _Hosted, home, memory, org, paths: dict) -> None:
        from .server import Served
        from .status import history_records
        org.config.train_threads = self.train_threads  # set, not inherited from the machine
        org.config.decode_threads = 1
        org.config.blas_threads = 0  # the host limits BLAS process-wide already
        h.home, h.memory, h.org = home, memory, org
        h.served = Served(h.name, organism=org, learn=self.learn, settings=self.options.settings)
        if "seen.keys" in paths:
            with open(paths["seen.keys"], "rb") as f:
                raw = f.read()
            for i in range(0, len(raw) - len(raw) % 32, 32):
                h.served._mark(raw[i:i + 32])
        if "history.json" in paths:
            with open(paths["history.json"], encoding="utf-8") as f:
                h.served.earlier = history_records(json.load(f))

    def _release(self, h: _Hosted, save: bool = True) -> bool:
        """Save (if it changed) and drop `h`; False when it is in use or not ready."""
        with self._lock:
            if h.state != "ready" or h.users > 0 or self.hosted.get(h.name) is not h:
                return False
            h.state = "releasing"
            h.event = threading.Event()
        try:
            with h.train_mutex, h.state_lock:
                if save and h.dirty:
                    self._save(h, "release")
        except Exception as exc:
            log.error("host %d: could not save %s before releasing it: %s", self.index, h.name, exc)
        finally:
            h.stack.close()
            shutil.rmtree(h.dir, ignore_errors=True)
            with self._lock:
                del self.hosted[h.name]
            h.event.set()
        log.info("host %d: released %s (generation %d)", self.index, h.name, h.generation)
        return True

    def _evict_over_capacity(self, keep: str) -> None:
        with self._lock:
            ready = [h for h in self.hosted.values() if h.state == "ready" and h.users == 0 and h.name != keep]
            over = len([h for h in self.hosted.values() if h.state in ("ready", "loading")]) - self.max_loaded
        for h in sorted(ready, key=lambda x: x.last_used)[:max(0, over)]:
            self._release(h)

    def _reap_loop(self) -> None:
        period = max(0.2, min(5.0, self.idle_seconds / 4))
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                idle = [h for h in self.hosted.values()
                        if h.state == "ready" and h.users == 0 and now - h.last_used >= self.idle_seconds]
            for h in idle:
                try:
                    self._release(h)
                except Exception as exc:  # the reaper must keep running
                    log.error("host %d: releasing %s failed: %s", self.index, h.name, exc)

    # ---- saving

    def _save(self, h: _Hosted, reason: str = "save") -> int:
        """Ship organism + memory as the next generation (caller holds h.state_lock)."""
        from .status import history_records
        h.home.save(h.org)
        ship = os.path.join(h.dir, ".ship")
        shutil.rmtree(ship, ignore_errors=True)
        os.makedirs(ship)
        files = {"organism.ckpt": str(h.home.checkpoint)}
        backup = os.path.join(ship, "memory.sqlite")
        src = sqlite3.connect(str(h.home.memory_path))
        dst = sqlite3.connect(backup)
        try:
            src.backup(dst)  # a consistent copy of the live database (WAL included)
        finally:
            dst.close()
            src.close()
        files["memory.sqlite"] = backup
        with h.served._seen_lock:
            keys = b"".join(h.served._seen.keys())
        with open(os.path.join(ship, "seen.keys"), "wb") as f:
            f.write(keys)
        files["seen.keys"] = os.path.join(ship, "seen.keys")
        with open(os.path.join(ship, "history.json"), "w", encoding="utf-8") as f:
            json.dump(history_records(list(h.served.earlier) + list(h.org.telemetry)), f)
        files["history.json"] = os.path.join(ship, "history.json")
        try:
            gen = self.store.commit(h.name, h.generation, files, self.owner, reason)
        except StaleGeneration as exc:
            # another host owns it now (this one was presumed dead): never overwrite its saves
            log.error("host %d: %s: not saved, another owner took it over (%s)", self.index, h.name, exc)
            h.dirty = False
            raise ColonyError(f"{h.name}: another host took this organism over; this host's changes since "
                              f"generation {h.generation} are not saved") from None
        h.generation, h.sha = gen.number, _sha256(files["organism.ckpt"])
        h.dirty, h.turns_since_save = False, 0
        self.store.prune(h.name, max(1, self.options.settings["keep_checkpoints"]))
        return gen.number

    # ---- training (one slot per host)

    def _train_loop(self) -> None:
        turn = 0
        while not self._stop.is_set():
            with self._lock:
                ready = [h for h in self.hosted.values() if h.state == "ready"]
            trained = False
            if self.learn and ready:
                ready = ready[turn % len(ready):] + ready[:turn % len(ready)]  # round robin
                turn += 1
                for h in ready:
                    if self._stop.is_set() or not h.train_mutex.acquire(blocking=False):
                        continue
                    try:
                        org = h.org
                        if h.state != "ready" or org is None:
                            continue
                        with org._lock:
                            due = org.buffer.ready(org.config)
                        if due:
                            with self._slot:
                                org.train_burst()
                            h.dirty = trained = True
                    except Exception as exc:  # reported by status; the others keep training
                        h.train_error = f"{type(exc).__name__}: {exc}"
                        log.error("host %d: %s: burst failed: %s", self.index, h.name, h.train_error)
                    finally:
                        h.train_mutex.release()
            if not trained:
                tick = min((h.org.config.train_tick_seconds for h in ready if h.org is not None), default=0.25)
                self._stop.wait(tick)

    # ---- the actor's methods

    async def ping(self) -> dict:
        import ray
        return {"index": self.index, "owner": self.owner, "pid": os.getpid(), "node": socket.gethostname(),
                "node_id": ray.get_runtime_context().get_node_id(), "store": self.store.url,
                "learn": self.learn}

    async def create(self, name: str, corpus: list[str] | None, config: dict | None, seed: int,
                     checkpoint: bytes | None, warm: bool) -> dict:
        return await self._run(self._create, name, corpus, config, seed, checkpoint, warm)

    def _create(self, name, corpus, config, seed, checkpoint, warm) -> dict:
        valid_name(name)
        if self.store.current(name) is not None:
            raise ColonyError(f"an organism named {name!r} exists already in {self.store.url}")
        with self._lock:
            if name in self.hosted:
                raise ColonyError(f"an organism named {name!r} exists already on host {self.index}")
            h = self.hosted[name] = _Hosted(name)
        try:
            h.dir = self._fresh_dir(name)
            options = self.cli.Options({**self.options.config, **(config or {})},
                                       {**self.options.settings, "seed": int(seed)})
            home = self.cli.Home(h.dir, options)
            h.stack.enter_context(home.locked())
            memory = h.stack.enter_context(home.memory())
            if checkpoint is not None:
                with open(home.checkpoint, "wb") as f:
                    f.write(checkpoint)
                org = home.open(memory=memory)
            else:
                corpus_path = None
                if corpus is not None:
                    corpus_path = os.path.join(h.dir, "birth-corpus.txt")
                    with open(corpus_path, "w", encoding="utf-8") as f:
                        f.write("\n".join(corpus) + "\n")
                org, _ = home.birth(corpus_path, memory=memory)
            h.stack.callback(org.close)
            self._attach(h, home, memory, org, {})
            if warm and not org.trainer.warmed_up:
                with self._slot:
                    org.warmup()
            with h.state_lock:
                self._save(h, "create")
        except BaseException:
            h.stack.close()
            shutil.rmtree(h.dir, ignore_errors=True)
            with self._lock:
                del self.hosted[name]
            h.event.set()
            raise
        with self._lock:
            h.state = "ready"
        h.event.set()
        self._evict_over_capacity(keep=name)
        return self._info(h)

    def _info(self, h: _Hosted) -> dict:
        return {"name": h.name, "host": self.index, "owner": self.owner, "generation": h.generation,
                "checkpoint_sha256": h.sha, "dirty": h.dirty, "turns_since_save": h.turns_since_save,
                "state": h.state}

    async def info(self, name: str) -> dict:
        """What this host knows of `name` without loading it: {"state": "released"} when it is not loaded."""
        with self._lock:
            h = self.hosted.get(name)
        if h is None or h.state != "ready":
            return {"name": name, "host": self.index, "state": "released" if h is None else h.state}
        return self._info(h)

    async def loaded(self) -> list[str]:
        with self._lock:
            return sorted(n for n, h in self.hosted.items() if h.state == "ready")

    @contextlib.contextmanager
    def _using(self, name: str):
        h = self._acquire(name)
        try:
            yield h
        finally:
            self._done(h)

    async def run_all(self, name: str, prompts: list[str], sampling) -> dict:
        """The server's non-streamed generation on `name`: {"results", "prompt_tokens"} or
        {"error": OpenAI error body, "status"} for a request the organism refuses."""
        from .server import ApiError, _App

        def work():
            with self._using(name) as h:
                try:
                    results, tokens = _App._run_all(h.org, prompts, sampling)
                except ApiError as exc:
                    return {"error": exc.body(), "status": exc.status}
                return {"results": results, "prompt_tokens": tokens}
        return await self._run(work)

    async def check_sampling(self, name: str, sampling) -> dict | None:
        """None when the organism takes these sampling settings, else {"error", "status"} (a 400)."""
        from .server import ApiError, _check_sampling

        def work():
            with self._using(name) as h:
                try:
                    _check_sampling(h.org, sampling)
                except ApiError as exc:
                    return {"error": exc.body(), "status": exc.status}
                return None
        return await self._run(work)

    async def stream(self, name: str, prompt: str, overrides: dict):
        """The server's streamed generation on `name`: text pieces (joined when they came
        together), then {"box": {...}} (prompt_tokens, ids, reason), or {"error": message}."""
        from .server import _generated
        h = await self._run(self._acquire, name)
        try:
            box: dict = {}
            try:
                async for text in _generated(h.org, prompt, overrides, box):
                    yield text
            except (MoleculeError, ValueError, TypeError) as exc:  # as the server's own stream reports it
                yield {"error": str(exc)}
                return
            yield {"box": box}
        finally:
            self._done(h)

    async def learn(self, name: str, messages: list, reply: str | None) -> int:
        """Learn a chat request's turns not learned before (and its finished reply), as the
        single-process server does; saves every autosave_turns turns. Returns messages learned."""
        if not self.learn:
            return 0
        from .server import learn_turns

        def work():
            with self._using(name) as h, h.state_lock:
                turns = h.served.new_turns(messages)
                if reply is not None and reply.strip():
                    h.served.mark_reply(messages, reply)
                    turns.append(("A", reply.strip()))
                learn_turns(h.org, turns, f"host {self.index}: {name}")
                if turns:
                    h.org.model_alpha()  # measured here once, not in the next request's way (as the server)
                    h.dirty = True
                    h.turns_since_save += 1
                    if h.turns_since_save >= self.options.settings["autosave_turns"]:
                        self._save(h, "autosave")
                return len(turns)
        return await self._run(work)

    async def observe(self, name: str, text, speaker: str | None) -> int:
        def work():
            with self._using(name) as h, h.state_lock:
                n = h.org.observe(text, speaker=speaker)
                h.dirty = True
                return n
        return await self._run(work)

    async def generate(self, name: str, prompt: str, overrides: dict):
        def work():
            with self._using(name) as h:
                return h.org.run(prompt, **overrides)
        return await self._run(work)

    async def status(self, name: str) -> dict:
        def work():
            with self._using(name) as h:
                doc = h.served.status()
                doc["trainer"]["running"] = self.learn and self._trainer.is_alive()
                if h.train_error and not doc["trainer"]["error"]:
                    doc["trainer"]["error"] = h.train_error
                doc["colony"] = self._info(h)
                return doc
        return await self._run(work)

    async def heldout_loss(self, name: str, lines: list[str]) -> float | None:
        def work():
            with self._using(name) as h:
                return h.org.heldout_loss(lines)
        return await self._run(work)

    async def train_burst(self, name: str) -> dict:
        """One checked burst now (in this host's training slot)."""
        def work():
            with self._using(name) as h, h.train_mutex, self._slot:
                rep = h.org.train_burst()
                h.dirty = True
                return {"accepted": rep.accepted, "reason": rep.reason}
        return await self._run(work)

    async def memory_and_corpus(self, name: str) -> dict:
        """The chat messages of the memory and the chat lines of the corpus ("H: "/"A: "): the
        reservoir's, those held out to measure learning, and those quarantined by a rollback."""
        def work():
            with self._using(name) as h, h.state_lock:
                messages = [(m.role, m.text) for m in h.memory.messages()]
                org = h.org
                with org._lock:
                    lines = [x for x in org.reservoir.lines + org.heard_val_lines + org.quarantine
                             if x[:3] in ("H: ", "A: ")]
                return {"messages": messages, "chat_lines": lines}
        return await self._run(work)

    async def save(self, name: str) -> dict:
        def work():
            with self._using(name) as h, h.train_mutex, h.state_lock:
                if h.dirty:
                    self._save(h, "save")
                return self._info(h)
        return await self._run(work)

    async def release(self, name: str) -> bool:
        def work():
            with self._lock:
                h = self.hosted.get(name)
            deadline = time.monotonic() + 60
            while h is not None and not self._release(h):
                if time.monotonic() > deadline:
                    raise ColonyError(f"{name}: still in use after 60 s; not released")
                time.sleep(0.05)
                with self._lock:
                    h = self.hosted.get(name)
            return h is not None
        return await self._run(work)

    async def remove(self, name: str) -> None:
        def work():
            with self._lock:
                h = self.hosted.get(name)
            if h is not None:
                deadline = time.monotonic() + 60
                while not self._release(h, save=False):
                    if time.monotonic() > deadline:
                        raise ColonyError(f"{name}: still in use after 60 s; not removed")
                    time.sleep(0.05)
            self.store.remove(name)
        return await self._run(work)

    async def shutdown(self) -> list[str]:
        """Save every loaded organism that changed and release it. The host goes on serving:
        organisms load again at their next call, and its trainer and reaper start again."""
        def work():
            self._stop.set()
            self._trainer.join()
            self._reaper.join()
            saved = []
            with self._lock:
                entries = list(self.hosted.values())
            for h in entries:
                dirty = h.dirty
                deadline = time.monotonic() + 60
                while h.state == "ready" and not self._release(h) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if dirty:
                    saved.append(h.name)
            self._start_threads()
            return saved
        return await self._run(work)


# ---------------------------------------------------------------------------------------------
# the driver's side


class OrganismHandle:
    """An organism of the colony, from Python: each method is a call to the host that holds it."""

    def __init__(self, colony: "Colony", name: str):
        self.colony, self.name = colony, name

    @property
    def _host(self):
        return self.colony._host(self.name)

    def _get(self, ref):
        return self.colony._get(ref)

    def generate(self, prompt: str = "", **overrides) -> str:
        """A reply (Organism.generate's text) to `prompt`; keyword overrides as Organism.run."""
        return self._get(self._host.generate.remote(self.name, prompt, overrides)).text

    def run(self, prompt: str = "", **overrides):
        """Organism.run on the host: a GenerationResult (ids, text, stop_reason)."""
        return self._get(self._host.generate.remote(self.name, prompt, overrides))

    def observe(self, text: str | Sequence[str], speaker: str | None = None) -> int:
        """Organism.observe on the host (bursts follow in the host's trainer)."""
        return self._get(self._host.observe.remote(self.name, text if isinstance(text, str) else list(text), speaker))

    def chat(self, messages: Sequence[tuple[str, str]], reply: str | None = None) -> int:
        """Learn a conversation's (role, text) messages as the server learns a chat request."""
        return self._get(self._host.learn.remote(self.name, [tuple(m) for m in messages], reply))

    def status(self) -> dict:
        """The status document (molecule_gpt.status), plus "colony": host, generation, ..."""
        return self._get(self._host.status.remote(self.name))

    def heldout_loss(self, lines: Sequence[str]) -> float | None:
        return self._get(self._host.heldout_loss.remote(self.name, list(lines)))

    def train_burst(self) -> dict:
        return self._get(self._host.train_burst.remote(self.name))

    def save(self) -> dict:
        """Ship a save now (when it changed); returns the host's info (generation, checksum)."""
        return self._get(self._host.save.remote(self.name))

    def release(self) -> bool:
        """Save (when changed) and drop it from its host's memory; False when it was not loaded."""
        return self._get(self._host.release.remote(self.name))

    def info(self) -> dict:
        return self._get(self._host.info.remote(self.name))

    def memory_and_corpus(self) -> dict:
        return self._get(self._host.memory_and_corpus.remote(self.name))

    def __repr__(self) -> str:
        return f"OrganismHandle({self.name!r}, host {host_for(self.name, self.colony.hosts)})"


class Colony:
    """Organisms on Ray (see the module docstring).

    Colony(store, *, address=None, hosts=None, host_cpus=1.0, config=None, settings=None,
           learn=True, idle_seconds=300, max_loaded=64, local_dir=None, name="molecule-gpt",
           num_cpus=None, timeout=300)
      store        shared storage every node reaches: a directory or an fsspec URL
      address      a Ray cluster ("host:port", "auto", "ray://..."); None: local Ray (127.0.0.1)
      hosts        host actors (default: the cluster's CPUs / host_cpus, at least 1)
      host_cpus    CPUs each host reserves: its training slot (fractions allowed)
      config       Config fields every organism gets (a dict, or a config file as --config)
      settings     command-line settings (autosave_turns, recall_recent, ...) over the defaults
      idle_seconds an organism unused this long is saved and released from memory
      max_loaded   organisms a host keeps in memory at most (least recently used released first)
      timeout      seconds a call waits for its host (a loaded 2-core machine starts slowly)
    """

    def __init__(self, store: str | os.PathLike, *, address: str | None = None, hosts: int | None = None,
                 host_cpus: float = 1.0, config: dict | str | os.PathLike | None = None,
                 settings: dict | None = None, learn: bool = True, idle_seconds: float = 300.0,
                 max_loaded: int = 64, local_dir: str | None = None, name: str = "molecule-gpt",
                 num_cpus: int | None = None, timeout: float = 300.0):
        from . import cli
        if not (isinstance(host_cpus, (int, float)) and host_cpus > 0):
            raise ValueError(f"host_cpus must be a number > 0, got {host_cpus!r}")
        if hosts is not None and (isinstance(hosts, bool) or not isinstance(hosts, int) or hosts < 1):
            raise ValueError(f"hosts must be an int >= 1, got {hosts!r}")
        if not idle_seconds > 0 or not (isinstance(max_loaded, int) and max_loaded >= 1):
            raise ValueError("idle_seconds must be > 0 and max_loaded an int >= 1")
        if isinstance(config, (str, os.PathLike)):
            options = cli.load_options(os.fspath(config))
            config, settings = options.config, {**{k: options.settings[k] for k in options.given}, **(settings or {})}
        unknown = set(settings or {}) - set(cli.SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings {sorted(unknown)}; these exist: {sorted(cli.SETTINGS)}")
        self.store = Store(store)
        self.timeout = float(timeout)
        init_ray(address, num_cpus=num_cpus)
        ray = _ray()
        if hosts is None:
            hosts = max(1, int(ray.cluster_resources().get("CPU", 1) // host_cpus))
        self.name, self.hosts, self.learn = name, hosts, learn
        self.spec = {"store": self.store.url, "config": dict(config or {}), "settings": dict(settings or {}),
                     "learn": learn, "idle_seconds": float(idle_seconds), "max_loaded": max_loaded,
                     "host_cpus": host_cpus, "local_dir": local_dir}
        actor = ray.remote(OrganismHost)
        self._handles = []
        for i in range(hosts):
            self._handles.append(actor.options(
                name=f"{name}-host-{i}", namespace=NAMESPACE, get_if_exists=True, lifetime=None,
                num_cpus=host_cpus, max_restarts=-1, max_task_retries=0, max_concurrency=1000,
                scheduling_strategy="SPREAD", runtime_env={"env_vars": THREAD_ENV},
            ).remote({**self.spec, "index": i}))
        # up (or an error now, not at the first request); hosts of this name that exist already
        # (get_if_exists) must be serving the same storage
        for info in self._get([h.ping.remote() for h in self._handles]):
            if (info["store"], info["learn"]) != (self.store.url, learn):
                raise ColonyError(f"the hosts named {name!r} in this Ray cluster serve {info['store']} (learning "
                                  f"{'on' if info['learn'] else 'off'}); give this colony another name=")

    def _get(self, ref):
        ray = _ray()
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, (ColonyError, ValueError, MoleculeError)):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise ColonyError(f"the organism's host died ({exc.__class__.__name__}); it restarts and loads the "
                              f"organism from its last save at the next call") from None

    def _host(self, name: str):
        return self._handles[host_for(valid_name(name), self.hosts)]

    def hosts_info(self) -> list[dict]:
        """Each host's index, process, machine and Ray node id."""
        return self._get([h.ping.remote() for h in self._handles])

    def host_handle(self, index: int):
        """The Ray actor handle of host `index` (for tests and operations: ray.kill restarts it)."""
        return self._handles[index]

    def spec_for_router(self) -> dict:
        return {"name": self.name, "hosts": self.hosts, "store": self.store.url, "learn": self.learn,
                "settings": self.spec["settings"], "timeout": self.timeout}

    # ---- organisms

    def create(self, name: str, *, corpus: Iterable[str] | str | os.PathLike | None = None,
               config: dict | None = None, seed: int = 0, checkpoint: str | os.PathLike | None = None,
               warm: bool = True) -> OrganismHandle:
        """A new organism `name` on its host: born from `corpus` (lines or a text file; default
        the seed corpus) with `config` (Config fields) and warmed up, or adopted from an
        organism checkpoint file (`checkpoint=`); shipped as generation 1."""
        valid_name(name)
        if corpus is not None and checkpoint is not None:
            raise ValueError("give corpus= (a new organism) or checkpoint= (an existing one), not both")
        if isinstance(corpus, (str, os.PathLike)):
            from .cli import read_text_lines
            corpus = read_text_lines(os.fspath(corpus))
        data = pathlib.Path(checkpoint).read_bytes() if checkpoint is not None else None
        self._get(self._host(name).create.remote(name, None if corpus is None else list(corpus), config, int(seed),
                                                 data, warm))
        return OrganismHandle(self, name)

    def list(self) -> list[str]:
        """Every organism with a save in the shared storage."""
        return self.store.names()

    def get(self, name: str) -> OrganismHandle:
        if self.store.current(valid_name(name)) is None:
            raise ColonyError(f"no organism named {name!r} in {self.store.url}")
        return OrganismHandle(self, name)

    def remove(self, name: str) -> None:
        """Drop `name` from its host and delete its saves from the shared storage."""
        if self.store.current(valid_name(name)) is None:
            raise ColonyError(f"no organism named {name!r} in {self.store.url}")
        self._get(self._host(name).remove.remote(name))

    def loaded(self) -> dict[int, list[str]]:
        """The organisms each host holds in memory now."""
        return dict(enumerate(self._get([h.loaded.remote() for h in self._handles])))

    def shutdown(self) -> list[str]:
        """Save every changed organism and release it; returns their names. The hosts stay up
        (and the colony usable: organisms load again at their next call)."""
        saved = []
        for names in self._get([h.shutdown.remote() for h in self._handles]):
            saved += names
        return saved

    # ---- HTTP

    def app(self, *, api_key: str | None = None, limits=None, only: Sequence[str] | None = None):
        """The OpenAI-compatible ASGI app (molecule_gpt.server's routes and page) over this
        colony, for any process connected to the same Ray cluster."""
        return colony_app(self.spec_for_router(), api_key=api_key, limits=limits, only=only)

    def serve(self, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, limits=None,
              only: Sequence[str] | None = None, replicas: int = 1) -> str:
        """Serve the app through Ray Serve on host:port; returns the base URL. serve.shutdown() stops it."""
        from ray import serve
        serve.start(http_options={"host": host, "port": port})
        deployment = _ingress_deployment().options(num_replicas=replicas)
        serve.run(deployment.bind(self.spec_for_router(), api_key, limits, None if only is None else list(only)),
                  name="molecule-gpt", route_prefix="/", blocking=False)
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"


# ---------------------------------------------------------------------------------------------
# the HTTP side: molecule_gpt.server's app, its organisms served by hosts


def _served_class():
    from .server import ApiError, Served

    class RemoteServed(Served):
        """An organism of the colony behind the server's routes: generation, learning and status
        are calls to the host that holds it (the hooks Served.run_all / Served.generated)."""

        def __init__(self, name: str, router: "_Router"):
            super().__init__(name, organism=None, learn=router.learn, settings=router.settings)
            self.state = "ready"  # the host loads it at its first request (callers wait, no 503)
            self.router = router

        def _host(self):
            return self.router.host(self.name)

        def start_learning(self) -> None:  # the host learns and trains
            pass

        def new_turns(self, messages):
            # the host decides which turns are new (its conversation keys survive a release)
            return list(messages) if self.learn else []

        def learn_turns(self, turns, messages=None, reply=None) -> None:
            if self.learn and messages:
                self._host().learn.remote(self.name, list(messages), reply)  # after the reply; not awaited

        async def check_sampling(self, sampling) -> None:
            ray = _ray()
            try:
                out = await self._host().check_sampling.remote(self.name, sampling)
            except ray.exceptions.RayActorError:
                raise ApiError(503, f"the host of '{self.name}' died; it restarts from the organism's last save, "
                                    f"retry", code="model_restarting", headers={"Retry-After": "2"}) from None
            except ray.exceptions.RayTaskError as exc:
                raise ApiError(503, f"'{self.name}': {_cause(exc)}", code="model_failed") from None
            if out is not None:
                e = out["error"]["error"]
                raise ApiError(out["status"], e["message"], param=e.get("param"), code=e.get("code"))

        async def run_all(self, prompts, sampling):
            ray = _ray()
            try:
                out = await self._host().run_all.remote(self.name, list(prompts), sampling)
            except ray.exceptions.RayActorError:
                raise ApiError(503, f"the host of '{self.name}' died; it restarts from the organism's last save, "
                                    f"retry", code="model_restarting", headers={"Retry-After": "2"}) from None
            except ray.exceptions.RayTaskError as exc:
                raise ApiError(503, f"'{self.name}': {_cause(exc)}", code="model_failed") from None
            if "error" in out:
                e = out["error"]["error"]
                raise ApiError(out["status"], e["message"], param=e.get("param"), code=e.get("code"))
            return out["results"], out["prompt_tokens"]

        async def generated(self, prompt, overrides, box):
            ray = _ray()
            gen = self._host().stream.remote(self.name, prompt, overrides)
            try:
                async for ref in gen:
                    item = await ref
                    if isinstance(item, str):
                        yield item
                    elif "error" in item:
                        raise ColonyError(item["error"])
                    else:
                        box.update(item["box"])
            except ray.exceptions.RayActorError:
                raise ColonyError(f"the host of '{self.name}' died mid-reply; it restarts from the organism's "
                                  f"last save") from None
            except ray.exceptions.RayTaskError as exc:
                raise ColonyError(f"'{self.name}': {_cause(exc)}") from None
            finally:
                with contextlib.suppress(Exception):
                    ray.cancel(gen)  # the client went away: stop generating at the next piece

        def status(self) -> dict:
            ray = _ray()
            try:
                return ray.get(self._host().status.remote(self.name), timeout=self.router.timeout)
            except ray.exceptions.RayActorError:
                raise ApiError(503, f"the host of '{self.name}' died; it restarts, retry",
                               code="model_restarting") from None
            except ray.exceptions.RayTaskError as exc:
                raise ApiError(503, f"'{self.name}': {_cause(exc)}", code="model_failed") from None

    return RemoteServed


def _cause(exc) -> str:
    cause = getattr(exc, "cause", None)
    return str(cause) if cause is not None else str(exc).strip().splitlines()[-1]


class _Router:
    """Where each organism is: the host actors by name (looked up once), the names from the store."""

    def __init__(self, spec: dict, only: Sequence[str] | None = None):
        self.spec = spec
        self.hosts = int(spec["hosts"])
        self.learn = bool(spec.get("learn", True))
        self.settings = {**_default_settings(), **(spec.get("settings") or {})}
        self.timeout = float(spec.get("timeout", 300.0))
        self.store = Store(spec["store"])
        self.only = None if only is None else [valid_name(n) for n in only]
        self._handles: dict[int, Any] = {}
        self._lock = threading.Lock()

    def host(self, name: str):
        i = host_for(name, self.hosts)
        with self._lock:
            h = self._handles.get(i)
            if h is None:
                h = self._handles[i] = _ray().get_actor(f"{self.spec['name']}-host-{i}", namespace=NAMESPACE)
        return h

    def names(self) -> list[str]:
        names = self.store.names()
        return names if self.only is None else [n for n in names if n in self.only]


def _default_settings() -> dict:
    from .cli import SETTINGS
    return dict(SETTINGS)


class _ColonyModels(collections.abc.Mapping):
    """The server's {model id: Served} over the colony: the names the store holds now (read at
    most every `ttl` seconds, and at once for a name not seen), each a RemoteServed."""

    def __init__(self, router: _Router, ttl: float = 2.0):
        self.router, self.ttl = router, ttl
        self._served: dict[str, Any] = {}
        self._names: list[str] = []
        self._read_at = -1e9
        self._cls = _served_class()

    def _current(self, fresh: bool = False) -> list[str]:
        now = time.monotonic()
        if fresh or now - self._read_at > self.ttl:
            self._names, self._read_at = self.router.names(), now
        return self._names

    def __getitem__(self, name):
        if not isinstance(name, str):
            raise KeyError(name)
        if name not in self._current() and name not in self._current(fresh=True):
            raise KeyError(name)
        s = self._served.get(name)
        if s is None:
            s = self._served[name] = self._cls(name, self.router)
        return s

    def __iter__(self):
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())

    def __contains__(self, name) -> bool:
        return isinstance(name, str) and (name in self._current() or name in self._current(fresh=True))


def colony_app(spec: dict, *, api_key: str | None = None, limits=None, only: Sequence[str] | None = None):
    """molecule_gpt.server's application (routes, errors, page) over a colony's organisms."""
    from .server import Limits, _build
    return _build(_ColonyModels(_Router(spec, only)), api_key, limits or Limits())


def _ingress_deployment():
    """The Ray Serve deployment whose replicas run colony_app (built in the replica)."""
    from ray import serve

    class ColonyIngress:
        def __init__(self, spec: dict, api_key: str | None, limits, only):
            self._args = (spec, api_key, limits, only)

        def __serve_build_asgi_app__(self):
            spec, api_key, limits, only = self._args
            return colony_app(spec, api_key=api_key, limits=limits, only=only)

    return serve.deployment(serve.ingress()(ColonyIngress), name="molecule-gpt",
                            ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": THREAD_ENV}},
                            max_ongoing_requests=1000)
