"""molecule_gpt.colony_store: the shared storage of a colony (no Ray needed): saves under new
generation numbers, fenced claims that keep a stale owner from overwriting a newer save, a
single-process home as generation 0, pruning, names."""
import hashlib
import json
import os
import threading

import pytest

from molecule_gpt.colony_store import PLAIN_HOME, StaleGeneration, Store, valid_name


def files(tmp_path, tag: str) -> dict:
    d = tmp_path / f"local-{tag}"
    d.mkdir(exist_ok=True)
    (d / "organism.ckpt").write_bytes(f"checkpoint {tag}".encode())
    (d / "memory.sqlite").write_bytes(f"memory {tag}".encode())
    return {"organism.ckpt": str(d / "organism.ckpt"), "memory.sqlite": str(d / "memory.sqlite")}


def test_commit_open_and_fencing(tmp_path):
    store = Store(tmp_path / "shared")
    assert store.current("pet") is None and store.names() == []
    g1 = store.commit("pet", 0, files(tmp_path, "a"), "host-a", "create")
    assert g1.number == 1 and store.current("pet") == g1 and store.names() == ["pet"]
    assert store.read("pet") == b"checkpoint a"

    # host B takes it over (host A presumed dead): it claims generation 2 for the save it loaded
    got, paths = store.open("pet", "host-b", str(tmp_path / "b"))
    assert got.number == 2 and got.dir == g1.dir and got.reason == "open"
    assert open(paths["organism.ckpt"], "rb").read() == b"checkpoint a"
    # host A, still alive somewhere, saves on top of what it held (1): refused, nothing written
    before = sorted(os.listdir(tmp_path / "shared" / "pet" / "generations"))
    with pytest.raises(StaleGeneration):
        store.commit("pet", 1, files(tmp_path, "stale"), "host-a")
    assert sorted(os.listdir(tmp_path / "shared" / "pet" / "generations")) == before
    assert store.read("pet") == b"checkpoint a"
    # host B's save goes through and is what the next owner loads
    g3 = store.commit("pet", 2, files(tmp_path, "b2"), "host-b")
    assert g3.number == 3 and store.read("pet") == b"checkpoint b2"
    assert store.read("pet", "memory.sqlite") == b"memory b2"
    with pytest.raises(ValueError):
        store.read("pet", "../etc/passwd")


def test_concurrent_claims_of_one_generation_one_wins(tmp_path):
    store = Store(tmp_path / "shared")
    store.commit("pet", 0, files(tmp_path, "a"), "h0")
    results = []

    def save(tag):
        try:
            results.append(("ok", store.commit("pet", 1, files(tmp_path, tag), tag).number))
        except StaleGeneration:
            results.append(("stale", tag))

    threads = [threading.Thread(target=save, args=(f"h{i}",)) for i in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r for r in results if r[0] == "ok"] == [("ok", 2)]
    assert len(results) == 8
    # exactly one directory per claimed generation remains: the losers removed their uploads
    claims = sorted(os.listdir(tmp_path / "shared" / "pet" / "claims"))
    assert claims == ["00000001.json", "00000002.json"]
    winner = json.loads((tmp_path / "shared" / "pet" / "claims" / "00000002.json").read_text())
    assert sorted(os.listdir(tmp_path / "shared" / "pet" / "generations")) == sorted(
        [store.current("pet").dir, json.loads((tmp_path / "shared" / "pet" / "claims" / "00000001.json").read_text())["dir"]])
    assert store.read("pet") == f"checkpoint {winner['owner']}".encode()


def test_single_process_home_is_generation_zero_and_stays_untouched(tmp_path):
    root = tmp_path / "homes"
    (root / "old").mkdir(parents=True)
    (root / "old" / "organism.ckpt").write_bytes(b"home checkpoint")
    (root / "old" / "memory.sqlite").write_bytes(b"home memory")
    (root / "not a name").mkdir()
    (root / "empty").mkdir()
    (root / "stray-file.txt").write_text("not an organism")
    store = Store(root)
    assert store.names() == ["old"]
    g = store.current("old")
    assert g.number == 0 and g.dir == PLAIN_HOME
    got, paths = store.open("old", "h", str(tmp_path / "local"))
    assert got.number == 1 and open(paths["memory.sqlite"], "rb").read() == b"home memory"
    store.commit("old", 1, files(tmp_path, "new"), "h")
    assert store.read("old") == b"checkpoint new"
    assert (root / "old" / "organism.ckpt").read_bytes() == b"home checkpoint"
    store.remove("old")
    assert (root / "old" / "organism.ckpt").read_bytes() == b"home checkpoint"
    assert store.current("old").number == 0


def test_prune_keeps_the_newest_generations(tmp_path):
    store = Store(tmp_path / "shared")
    for i in range(6):
        store.commit("pet", i, files(tmp_path, str(i)), "h")
    store.prune("pet", keep=2)
    gens = sorted(os.listdir(tmp_path / "shared" / "pet" / "generations"))
    assert len(gens) == 2 and gens[-1] == store.current("pet").dir
    assert sorted(os.listdir(tmp_path / "shared" / "pet" / "claims")) == ["00000005.json", "00000006.json"]
    assert store.read("pet") == b"checkpoint 5"
    # an upload not yet claimed (a save in flight) is left alone
    (tmp_path / "shared" / "pet" / "generations" / "g00000007-inflight").mkdir()
    store.prune("pet", keep=1)
    assert "g00000007-inflight" in os.listdir(tmp_path / "shared" / "pet" / "generations")


def test_fsspec_url_store(tmp_path):
    pytest.importorskip("fsspec")
    store = Store("memory://colony-test-" + hashlib.sha1(str(tmp_path).encode()).hexdigest()[:8])
    g = store.commit("pet", 0, files(tmp_path, "m"), "h")
    assert store.names() == ["pet"] and store.current("pet") == g
    with pytest.raises(StaleGeneration):
        store.commit("pet", 0, files(tmp_path, "x"), "other")
    got, paths = store.open("pet", "h2", str(tmp_path / "dl"))
    assert got.number == 2 and open(paths["organism.ckpt"], "rb").read() == b"checkpoint m"


@pytest.mark.parametrize("bad", ["", ".", "..", "../x", "a/b", "-x", "x" * 65, None, 3, "a b"])
def test_names_are_validated(bad, tmp_path):
    with pytest.raises(ValueError):
        valid_name(bad)
    with pytest.raises(ValueError):
        Store(tmp_path).commit(bad, 0, files(tmp_path, "a"), "h")


def test_a_save_needs_its_checkpoint(tmp_path):
    store = Store(tmp_path / "s")
    with pytest.raises(ValueError, match="organism.ckpt"):
        store.commit("pet", 0, {"memory.sqlite": files(tmp_path, "a")["memory.sqlite"]}, "h")
    with pytest.raises(ValueError):
        store.commit("pet", 0, {**files(tmp_path, "a"), "evil.sh": "/bin/sh"}, "h")


def test_nothing_of_ray_is_imported_unless_used():
    import subprocess
    import sys
    code = ("import sys, molecule_gpt, molecule_gpt.cli, molecule_gpt.server, molecule_gpt.colony, "
            "molecule_gpt.colony_store; print(sorted(m for m in ('ray', 'fsspec') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
