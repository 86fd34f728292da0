"""`molecule-gpt serve --ray` end to end in a subprocess: a local Ray instance, a new organism born
and warmed up on its host, the openai client chatting with it through Ray Serve, Ctrl-C saving it
to the shared storage. That one is slow (a Ray instance of its own): CI runs the colony through
tests/test_colony.py instead, and here only the usage errors (which start no Ray). A second slow
test points the command at a Ray cluster of two nodes."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("ray")
openai = pytest.importorskip("openai")

from molecule_gpt.colony_store import Store  # noqa: E402

TINY = {"n_embd": 32, "n_layer": 1, "warmup_steps": 60, "eval_interval": 30, "autosave_turns": 1}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(tmp_path, *ray_address: str, hosts: int):
    """`molecule-gpt serve --ray [ADDRESS] --home SHARED/pet` with the TINY config in a
    subprocess; yields (port, process, its output lines) once it serves, and stops it with
    Ctrl-C on leaving."""
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    port = free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "molecule_gpt", "serve", "--ray", *ray_address,
                             "--home", str(tmp_path / "shared" / "pet"), "--config", str(cfg), "--port", str(port),
                             "--hosts", str(hosts)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    lines = []
    ready = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Serving "):
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(300), "".join(lines[-40:])
        yield port, proc, lines
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise


def chat_client(port: int):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.mark.slow
def test_serve_ray_command(tmp_path):
    shared = tmp_path / "shared"
    with serving(tmp_path, hosts=1) as (port, proc, lines):
        client = chat_client(port)
        assert [m.id for m in client.models.list().data] == ["pet"]
        r = client.chat.completions.create(model="pet", messages=[{"role": "user", "content": "hello pet"}],
                                           max_tokens=8, seed=1)
        assert r.model == "pet"
        before = Store(shared).current("pet").number
        deadline = time.monotonic() + 120  # learning follows the reply; autosave_turns 1 ships it
        while Store(shared).current("pet").number == before and time.monotonic() < deadline:
            time.sleep(0.2)
        assert Store(shared).current("pet").number > before
    out = "".join(lines)
    assert proc.returncode == 0, out[-3000:]
    assert "A new organism pet is born" in out and "through Ray Serve" in out and "Saved " in out
    assert Store(shared).names() == ["pet"]


@pytest.mark.slow
def test_serve_ray_pointed_at_a_cluster_spreads_its_hosts_over_the_nodes(tmp_path):
    """`serve --ray ADDRESS` against a Ray cluster of two nodes (two raylets on this machine,
    ray.cluster_utils): one host actor on each node, and the organism answers through Serve."""
    import ray
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        worker = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        with serving(tmp_path, cluster.address, hosts=2) as (port, proc, lines):
            ray.init(address=cluster.address, namespace="molecule-gpt", log_to_driver=False)
            hosts = [ray.get_actor(f"molecule-gpt-host-{i}") for i in range(2)]
            nodes = {ray.get(h.ping.remote(), timeout=120)["node_id"] for h in hosts}
            assert nodes == {cluster.head_node.node_id, worker.node_id}
            r = chat_client(port).chat.completions.create(model="pet", messages=[{"role": "user", "content": "hello"}],
                                                          max_tokens=8, seed=1)
            assert r.model == "pet" and r.choices[0].message.content is not None
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert "the Ray cluster at" in "".join(lines)


def test_serve_ray_refuses_bad_usage(tmp_path):
    r = subprocess.run([sys.executable, "-m", "molecule_gpt", "serve", "--hosts", "2", "--home", str(tmp_path / "p")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--hosts is for --ray" in r.stderr
    r = subprocess.run([sys.executable, "-m", "molecule_gpt", "serve", "--ray", "--homes", str(tmp_path / "none")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a directory" in r.stderr
