"""A real uvicorn server on a free loopback port, in a thread of the test process (used by the
server tests and benchmarks/bench_serve.py)."""
import socket
import threading
import time

import uvicorn


class LiveServer:
    """`with LiveServer(app) as srv:` serves `app` at srv.url (http://127.0.0.1:PORT) until the
    block ends; the app's lifespan (loading, saving) runs as under `molecule-gpt serve`."""

    def __init__(self, app, start_timeout: float = 60.0):
        self.app = app
        self.start_timeout = start_timeout
        self.server = None
        self.thread = None
        self.url = None

    def __enter__(self) -> "LiveServer":
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        assert not self.thread.is_alive(), "the test server did not stop"


def pace_streams(monkeypatch, delay: float = 0.01) -> None:
    """Make the decode loop pause `delay` seconds before each generated token it hands on. A
    small test organism writes a reply in about a millisecond, faster than the event loop
    sends it (the server then joins the pieces that queued up into one event); paced, a test
    sees the reply arrive piece by piece, as it does from a larger model."""
    from molecule_gpt.generation import SubmittedGeneration
    real = SubmittedGeneration._advance

    def paced(self, new, reason):
        time.sleep(delay)
        real(self, new, reason)

    monkeypatch.setattr(SubmittedGeneration, "_advance", paced)
