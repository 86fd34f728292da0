"""The `molecule-gpt` command line, end to end: every command through a subprocess, the chat
REPL in a pseudo-terminal, and the errors a person can hit (one line, a hint, non-zero exit,
no traceback, nothing lost)."""
import errno
import json
import os
import pathlib
import shutil
import signal
import sqlite3
import subprocess
import sys

import pytest

from molecule_gpt import Memory, Organism, cli
from molecule_gpt.telemetry import JsonlLog, read_records

SMALL = {"warmup_steps": 40, "eval_interval": 20}


def run_cli(*args, timeout=300, input=None, env=None):
    return subprocess.run([sys.executable, "-m", "molecule_gpt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, input=input, env=env)


def write_config(path, **fields):
    path.write_text(json.dumps(fields))
    return path


def assert_clean_error(proc, code=1, *words):
    """One error line (plus an optional hint line) on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("molecule-gpt: error:")]
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A home with an organism warmed up for 40 steps by `molecule-gpt train`."""
    root = tmp_path_factory.mktemp("cli")
    config = write_config(root / "small.json", **SMALL)
    home = root / "home"
    proc = run_cli("--home", home, "--config", config, "train")
    assert proc.returncode == 0, proc.stderr
    assert "Saved to" in proc.stdout and "loss" in proc.stderr
    return home, config


@pytest.fixture
def home_copy(trained, tmp_path):
    home, config = trained
    copy = tmp_path / "home"
    shutil.copytree(home, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy, config


# ---------------------------------------------------------------------------------------------
# every command


@pytest.mark.parametrize("command", [None, "chat", "train", "import", "generate", "inspect", "growth", "forget",
                                     "bench"])
def test_help_for_every_command(command):
    proc = run_cli(*([command] if command else []), "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: molecule-gpt" in proc.stdout
    assert "--home" in proc.stdout and "--config" in proc.stdout


def test_train_warms_up_and_saves_a_consistent_organism(trained):
    home, _ = trained
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.warmed_up and org.trainer.warmup_steps_done == SMALL["warmup_steps"]
        assert org.config.warmup_steps == SMALL["warmup_steps"]  # the config file's fields are kept
    finally:
        org.close()
    records = list(read_records(home / cli.TELEMETRY))
    assert sum(r.get("phase") == "warmup" for r in records) == SMALL["warmup_steps"]
    assert any("val_loss" in r for r in records)
    assert len(list((home / cli.ARCHIVE).glob("organism-*.ckpt"))) == 1


def test_train_steps_runs_part_of_the_warmup_and_the_next_train_continues_it(tmp_path):
    home = tmp_path / "home"
    config = write_config(tmp_path / "c.json", warmup_steps=30, eval_interval=10)
    proc = run_cli("--home", home, "--config", config, "train", "--steps", 12)
    assert proc.returncode == 0, proc.stderr
    assert "warmup is at step 12/30" in proc.stdout
    proc = run_cli("--home", home, "--config", config, "train")
    assert proc.returncode == 0, proc.stderr
    assert "Trained 18 steps" in proc.stdout
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.warmed_up and org.trainer.warmup_steps_done == 30
    finally:
        org.close()


def test_train_corpus_into_a_warm_organism_runs_checked_bursts(home_copy, tmp_path):
    home, config = home_copy
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n".join(f"note {i}: the river carries stones number {i} to the sea." for i in range(60)))
    proc = run_cli("--home", home, "--config", config, "train", corpus, "--bursts", 2)
    assert proc.returncode == 0, proc.stderr
    assert "60 new to the corpus" in proc.stdout
    assert proc.stdout.count("burst ") == 2 and ("accepted" in proc.stdout or "rolled back" in proc.stdout)
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.bursts == 2
        # learned (in the reservoir), held out to measure learning, or set aside by a rollback
        kept = org.reservoir.lines + org.heard_val_lines + org.quarantine
        assert any("stones number 7 " in line for line in kept)
    finally:
        org.close()


def test_generate_is_reproducible_with_a_seed_and_flags_override_the_config_file(trained, tmp_path):
    home, _ = trained
    a = run_cli("--home", home, "generate", "the river", "--seed", 3, "--max-tokens", 30)
    b = run_cli("--home", home, "generate", "the river", "--seed", 3, "--max-tokens", 30)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout.strip() and a.stdout == b.stdout
    hot = write_config(tmp_path / "hot.json", temperature=5.0)
    g1 = run_cli("--home", home, "--config", hot, "generate", "the river", "--greedy", "--max-tokens", 30)
    g2 = run_cli("--home", home, "--config", hot, "generate", "the river", "--greedy", "--max-tokens", 30)
    assert g1.returncode == 0, g1.stderr
    assert g1.stdout == g2.stdout  # --greedy beats the file's temperature: deterministic
    three = run_cli("--home", home, "generate", "a", "-n", 3, "--seed", 1, "--max-tokens", 20)
    assert len(three.stdout.splitlines()) == 3
    # -n decodes the three together; continuation i is the one --seed 1 + i gives alone
    alone = [run_cli("--home", home, "generate", "a", "--seed", 1 + i, "--max-tokens", 20).stdout for i in range(3)]
    assert three.stdout == "".join(alone)


def test_generate_on_a_fresh_home_speaks_from_the_seed_corpus_and_writes_nothing(tmp_path):
    home = tmp_path / "fresh"
    proc = run_cli("--home", home, "generate", "hello", "--seed", 0)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    assert "no organism" in proc.stderr
    assert not (home / cli.CHECKPOINT).exists()


def test_a_terminal_sees_control_characters_as_symbols_and_a_pipe_gets_them_raw(tmp_path):
    """Byte tokens can spell any control character and this corpus is full of them: a terminal
    running `generate` must not be recoloured, rung or cleared (it sees U+2400-U+241F), while a
    pipe gets the text exactly as generated."""
    pexpect = pytest.importorskip("pexpect")
    home, corpus = tmp_path / "home", tmp_path / "esc.txt"
    corpus.write_text("".join(f"\x1b[31malert {i}\x1b[0m the bell rings \x07 and the screen clears \x1b[2J now.\n"
                              for i in range(80)))
    assert run_cli("--home", home, "--config", write_config(tmp_path / "c.json", **SMALL), "train", corpus).returncode == 0
    args = ["-m", "molecule_gpt", "--home", str(home), "generate", "alert", "--seed", "0", "--max-tokens", "40"]
    piped = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\x1b" in piped.stdout  # the model says escape sequences: the pipe gets them
    child = pexpect.spawn(sys.executable, args, encoding="utf-8", timeout=120)
    shown = child.read()
    child.close()
    assert child.exitstatus == 0, shown
    assert "\u241b" in shown and not any(c < " " and c not in "\t\r\n" or "\x7f" <= c < "\xa0" for c in shown)
    # the same text, each control character as its symbol (the terminal turns \n into \r\n)
    assert shown.replace("\r\n", "\n") == cli._shown(piped.stdout.rstrip("\n")) + "\n"
    # the chat is a display whatever its stdout: its replies come the same way
    chat = subprocess.run([sys.executable, "-m", "molecule_gpt", "--home", str(home), "chat"], input="alert\n/quit\n",
                          capture_output=True, text=True, timeout=300)
    assert chat.returncode == 0, chat.stderr
    reply = chat.stdout.split("molecule> ", 1)[1].split("\n", 1)[0]
    assert "\u241b" in reply and not any(c < " " or "\x7f" <= c < "\xa0" for c in reply)


ORIGINAL = pathlib.Path(__file__).resolve().parent / "fixtures" / "anchor-small"  # see fixtures/README.md


def test_import_adopts_an_original_organism_into_a_new_home_and_refuses_an_existing_one(tmp_path):
    home = tmp_path / "adopted"
    proc = run_cli("--home", home, "import", ORIGINAL / "checkpoint.json", "--corpus", ORIGINAL / "corpus.txt")
    assert proc.returncode == 0, proc.stderr
    assert "adopted" in proc.stdout and "Saved to" in proc.stdout
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.warmed_up and org.tokenizer.byte_fallback and org.birth_vocab == 34
        assert org.model.vocab_size == org.tokenizer.vocab_size > 34 and len(org.reservoir.lines) == 8
        assert str(org.model.dtype) == "float64"  # the original's precision: its weights exactly
    finally:
        org.close()
    mem = Memory(home / cli.MEMORY)
    try:
        assert [e.kind for e in mem.corpus_events()] == ["adopt"]
    finally:
        mem.close()
    # a chat-ready home: generate speaks from it, growth shows the adoption
    proc = run_cli("--home", home, "generate", "The river", "--seed", 1)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    assert "no organism" not in proc.stderr
    proc = run_cli("--home", home, "growth")
    assert proc.returncode == 0 and "adopted from the original" in proc.stdout, proc.stderr
    # a home that holds an organism is refused, and left as it was
    before = (home / cli.CHECKPOINT).read_bytes()
    proc = run_cli("--home", home, "import", ORIGINAL / "checkpoint.json")
    assert_clean_error(proc, 1, "already holds an organism", "--home")
    assert (home / cli.CHECKPOINT).read_bytes() == before
    # a file that is missing or not an original checkpoint: one line, no home left behind
    proc = run_cli("--home", tmp_path / "none", "import", tmp_path / "missing.json")
    assert_clean_error(proc, 1, "missing.json", "original program")
    assert not (tmp_path / "none").exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"cfg": {}}')
    proc = run_cli("--home", tmp_path / "bad", "import", bad)
    assert_clean_error(proc, 1, "bad.json")
    assert not (tmp_path / "bad" / cli.CHECKPOINT).exists()


def test_generate_rejects_bad_sampling_values(trained):
    home, _ = trained
    assert_clean_error(run_cli("--home", home, "generate", "x", "--top-p", "1.5"), 1, "top_p")
    proc = run_cli("--home", home, "generate", "x", "--max-tokens", "0")
    assert proc.returncode == 2 and "positive int" in proc.stderr


def test_inspect_reports_config_modules_gamma_and_checksum(trained):
    home, _ = trained
    proc = run_cli("--home", home, "inspect")
    assert proc.returncode == 0, proc.stderr
    for word in ("checksum   ok", "vocabulary", "modules", "gamma", "telemetry", "warmup_steps=40"):
        assert word in proc.stdout, word
    doc = json.loads(run_cli("inspect", home / cli.CHECKPOINT, "--json").stdout)
    assert doc["trainer"]["steps"] == SMALL["warmup_steps"]
    assert doc["config"]["n_embd"] == 72 and doc["tokenizer"]["vocab_size"] > 0
    assert 0 <= doc["gamma"]["sparsity"] <= 1


def test_inspect_fails_on_a_flipped_byte(home_copy):
    home, _ = home_copy
    ckpt = home / cli.CHECKPOINT
    data = bytearray(ckpt.read_bytes())
    data[-100] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    proc = run_cli("inspect", ckpt)
    assert "checksum   FAILED" in proc.stdout
    assert_clean_error(proc, 1, "does not verify")


def test_growth_table_and_plot(trained, tmp_path):
    pytest.importorskip("matplotlib")
    home, _ = trained
    proc = run_cli("--home", home, "growth")
    assert proc.returncode == 0, proc.stderr
    assert "birth" in proc.stdout and "warmup" in proc.stdout
    png = tmp_path / "growth.png"
    proc = run_cli("--home", home, "growth", "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _without_dac_override():
    """In the child, before exec: give up CAP_DAC_OVERRIDE (root's power to write what file
    permissions forbid), so that a read-only home is read-only for a test running as root too.
    Only dropped from the bounding set: root's capabilities at exec come from it."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE) failed")


def test_growth_reads_a_read_only_home(home_copy):
    home, _ = home_copy
    (home / cli.LOCK).unlink(missing_ok=True)
    before = {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()}
    for p in [home, *home.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)  # chmod -R a-w
    try:
        preexec = _without_dac_override if os.geteuid() == 0 else None
        try:
            proc = subprocess.run([sys.executable, "-m", "molecule_gpt", "--home", str(home), "growth"],
                                  capture_output=True, text=True, timeout=120, preexec_fn=preexec)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"cannot run a child without CAP_DAC_OVERRIDE here: {exc}")
        assert proc.returncode == 0, proc.stderr
        assert "birth" in proc.stdout and "warmup" in proc.stdout
        assert {p.name: p.read_bytes() for p in home.iterdir() if p.is_file()} == before  # nothing written
    finally:
        for p in [home, *home.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)


def test_forget_a_phrase_and_everything(home_copy):
    home, _ = home_copy
    mem = Memory(home / cli.MEMORY)
    for text in ("my cat is called Pixel", "Pixel likes the garden", "the weather is mild"):
        mem.add_message("H", text)
    mem.close()
    proc = run_cli("--home", home, "forget", "pixel")
    assert proc.returncode == 0, proc.stderr
    assert "Forgot 2 messages, 2 search-index rows" in proc.stdout
    proc = run_cli("--home", home, "forget", "--all")
    assert "Forgot 1 message," in proc.stdout
    mem = Memory(home / cli.MEMORY)
    try:
        assert mem.counts()["messages"] == 0
    finally:
        mem.close()
    assert run_cli("--home", home, "forget").returncode == 2  # neither a phrase nor --all


def test_bench_prints_a_table():
    proc = run_cli("bench", "--repeats", 1, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for case in ("train step", "generation", "BPE encode", "checkpoint load"):
        assert case in proc.stdout
    rows = json.loads(run_cli("bench", "--repeats", 1, "--json", timeout=600).stdout)
    assert all(r["figure"] > 0 for r in rows)


# ---------------------------------------------------------------------------------------------
# the REPL in a pseudo-terminal


def test_chat_repl_end_to_end(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    home = tmp_path / "home"
    config = write_config(tmp_path / "c.json", **SMALL)
    child = pexpect.spawn(sys.executable, ["-m", "molecule_gpt", "--home", str(home), "--config", str(config), "chat"],
                          encoding="utf-8", timeout=180, dimensions=(40, 200))
    try:
        child.expect("born")
        child.expect(r"warmup \[")  # the progress bar
        child.expect("ETA")
        child.expect("you> ")
        child.sendline("hello, who are you?")
        child.expect("molecule> (.*)\r\n")
        answer = child.match.group(1)
        assert answer.strip()
        child.expect("you> ")
        child.sendline("/status")
        child.expect(r"steps +\d+")
        child.expect("memory +2 messages")
        child.expect("you> ")
        child.sendline("/help")
        child.expect("/forget")
        child.expect("you> ")
        child.sendline("/save")
        child.expect("Saved to")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0, child.before
    mem = Memory(home / cli.MEMORY)
    try:
        texts = [m.text for m in mem.messages()]
    finally:
        mem.close()
    assert texts[0] == "hello, who are you?" and len(texts) == 2
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.warmed_up
        assert any(line.startswith("H: hello") for line in org.reservoir.lines)
    finally:
        org.close()


def test_chat_learns_in_the_background(tmp_path):
    """With a short cooldown the background trainer runs bursts on the conversation while the
    REPL keeps answering; they show in /status and in the saved organism."""
    pexpect = pytest.importorskip("pexpect")
    home = tmp_path / "home"
    config = write_config(tmp_path / "c.json", qb_cooldown_seconds=0.0, qb_min_bytes=20, train_tick_seconds=0.02,
                          micro_steps=4, **SMALL)
    child = pexpect.spawn(sys.executable, ["-m", "molecule_gpt", "--home", str(home), "--config", str(config), "chat"],
                          encoding="utf-8", timeout=180, dimensions=(40, 200))
    bursts = 0
    try:
        for i in range(40):
            child.expect("you> ")
            if i % 2:
                child.sendline("/status")
                child.expect(r"bursts (\d+)")
                bursts = int(child.match.group(1))
                if bursts >= 2:
                    break
            else:
                child.sendline(f"tell me about the river number {i}, where does it go?")
                child.expect("molecule> ")
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0 and bursts >= 2
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.bursts >= 2 and org.model.n_delta >= 1
    finally:
        org.close()


def test_ctrl_c_during_warmup_saves_a_resumable_organism(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    home = tmp_path / "home"
    config = write_config(tmp_path / "long.json", warmup_steps=100_000, eval_interval=50)
    child = pexpect.spawn(sys.executable, ["-m", "molecule_gpt", "--home", str(home), "--config", str(config), "train"],
                          encoding="utf-8", timeout=180)
    try:
        child.expect(r"train \[[#.]+\] [1-9]\d*/100000")
        child.sendintr()
        child.expect("stopping after the current step")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130, child.before
    assert "warmup stopped at step" in child.before
    org = Organism.load(home / cli.CHECKPOINT)
    done = org.trainer.warmup_steps_done
    try:
        assert not org.trainer.warmed_up and 0 < done < 100_000
        assert org.trainer.steps == done
    finally:
        org.close()
    # the next run continues the schedule where it stopped
    rest = write_config(tmp_path / "rest.json", warmup_steps=done + 7, eval_interval=50)
    proc = run_cli("--home", home, "--config", rest, "train")
    assert proc.returncode == 0, proc.stderr
    assert f"Trained 7 steps" in proc.stdout
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        assert org.trainer.warmed_up and org.trainer.warmup_steps_done == done + 7
    finally:
        org.close()


def test_ctrl_c_during_bursts_stops_after_a_whole_burst(home_copy):
    pexpect = pytest.importorskip("pexpect")
    home, config = home_copy
    child = pexpect.spawn(sys.executable, ["-m", "molecule_gpt", "--home", str(home), "--config", str(config), "train",
                                           "--bursts", "100000"], encoding="utf-8", timeout=180)
    try:
        child.expect(r"burst 2/100000")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 130, child.before
    org = Organism.load(home / cli.CHECKPOINT)
    try:
        t = org.trainer
        assert t.bursts >= 2 and t.accepted + t.rolled_back == t.bursts
        assert t.steps == SMALL["warmup_steps"] + t.bursts * org.config.micro_steps
    finally:
        org.close()


# ---------------------------------------------------------------------------------------------
# errors a person can hit


def test_missing_and_empty_corpus(tmp_path):
    assert_clean_error(run_cli("--home", tmp_path / "h", "train", tmp_path / "nope.txt"), 1, "does not exist")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert_clean_error(run_cli("--home", tmp_path / "h", "train", empty), 1, "empty")
    assert_clean_error(run_cli("--home", tmp_path / "h", "train", tmp_path), 1, "directory")
    assert not (tmp_path / "h" / cli.CHECKPOINT).exists()


def test_invalid_utf8_corpus_is_replaced_and_counted(tmp_path):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\xe9 au lait\nthe river runs\n".encode("latin-1") * 10)
    config = write_config(tmp_path / "c.json", warmup_steps=3)
    proc = run_cli("--home", tmp_path / "h", "--config", config, "train", corpus)
    assert proc.returncode == 0, proc.stderr
    assert "10 invalid UTF-8 byte(s) replaced" in proc.stderr


def test_corrupt_checkpoint_offers_the_previous_save(home_copy):
    home, config = home_copy
    assert run_cli("--home", home, "--config", config, "train", "--steps", 2).returncode == 0  # makes a .prev
    ckpt = home / cli.CHECKPOINT
    assert pathlib.Path(f"{ckpt}.prev").exists()
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    proc = run_cli("--home", home, "generate", "x")
    assert_clean_error(proc, 1, "damaged", "--recover", ".prev")
    assert "load_checkpoint(" not in proc.stderr  # no Python call offered to a command-line user
    proc = run_cli("--home", home, "--recover", "generate", "x", "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    assert f"recovered {ckpt}.prev" in proc.stderr and proc.stdout.strip()


def test_recover_takes_the_newest_intact_save_of_all_places(home_copy):
    """organism.ckpt and organism.ckpt.prev both damaged: an intact archive in checkpoints/ is used."""
    home, config = home_copy
    for _ in range(2):
        assert run_cli("--home", home, "--config", config, "train", "--steps", 2).returncode == 0
    ckpt, prev = home / cli.CHECKPOINT, pathlib.Path(f"{home / cli.CHECKPOINT}.prev")
    archives = sorted((home / cli.ARCHIVE).glob("organism-*.ckpt"))
    assert archives
    for path in (ckpt, prev):  # a new file each (the archives are hard links of earlier saves)
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data[:1000])
    proc = run_cli("--home", home, "generate", "x")
    assert_clean_error(proc, 1, "damaged", "--recover", "earlier save")
    proc = run_cli("--home", home, "--recover", "generate", "x", "--seed", 1)
    assert proc.returncode == 0, proc.stderr
    assert "recovered" in proc.stderr and str(home / cli.ARCHIVE) in proc.stderr


def test_bad_config_files(home_copy, tmp_path):
    home, _ = home_copy
    cases = [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"warmup_step": 5}', "did you mean 'warmup_steps'"),
        ('{"n_embd": 70}', "divisible"),
        ('{"max_messages": 0}', "max_messages"),
    ]
    for text, words in cases:
        path = tmp_path / "bad.json"
        path.write_text(text)
        assert_clean_error(run_cli("--home", home, "--config", path, "generate", "x"), 1, words)
    assert_clean_error(run_cli("--home", home, "--config", tmp_path / "missing.json", "generate"), 1, "cannot read")
    wider = write_config(tmp_path / "wide.json", n_embd=96, head_types=["content"] * 4)
    assert_clean_error(run_cli("--home", home, "--config", wider, "generate", "x"), 1, "n_embd", "fixed")


def test_home_in_use_by_another_process(home_copy):
    fcntl = pytest.importorskip("fcntl")
    home, _ = home_copy
    with open(home / cli.LOCK, "a+") as f:
        f.write("pid 424242")
        f.flush()
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_clean_error(run_cli("--home", home, "forget", "--all"), 1, "in use", "pid 424242")
        assert run_cli("--home", home, "generate", "x").returncode == 0  # readers do not need the lock


def test_locked_database(home_copy):
    home, _ = home_copy
    conn = sqlite3.connect(home / cli.MEMORY, timeout=1, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        proc = run_cli("--home", home, "forget", "--all", timeout=120)
    finally:
        conn.execute("ROLLBACK")
        conn.close()
    assert_clean_error(proc, 1, "locked")


def test_disk_full_on_save_keeps_the_previous_checkpoint(home_copy, monkeypatch, capsys):
    home, config = home_copy
    before = (home / cli.CHECKPOINT).read_bytes()
    archived = sorted(p.name for p in (home / cli.ARCHIVE).iterdir())

    def full(fd, buffers):  # the checkpoint writer's gathered write hits a full disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "writev", full)
    code = cli.main(["--home", str(home), "--config", str(config), "train", "--steps", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "disk is full" in err and "intact" in err and "Traceback" not in err
    assert (home / cli.CHECKPOINT).read_bytes() == before
    assert sorted(p.name for p in (home / cli.ARCHIVE).iterdir()) == archived  # nothing archived
    assert not [p for p in home.iterdir() if ".tmp-" in p.name]  # no temporaries left behind


def test_a_failed_command_archives_nothing(home_copy):
    home, _ = home_copy
    archived = sorted(p.name for p in (home / cli.ARCHIVE).iterdir())
    ckpt = home / cli.CHECKPOINT
    ckpt.write_bytes(ckpt.read_bytes()[:500])
    assert_clean_error(run_cli("--home", home, "train", "--steps", 1), 1, "damaged")
    assert sorted(p.name for p in (home / cli.ARCHIVE).iterdir()) == archived


def test_usage_errors_exit_2():
    assert run_cli().returncode == 2
    assert run_cli("fly").returncode == 2
    assert run_cli("train", "--steps", "-3").returncode == 2


# ---------------------------------------------------------------------------------------------
# caps


def test_telemetry_log_is_capped_and_keeps_whole_newest_lines(tmp_path):
    path = tmp_path / "t.jsonl"
    log = JsonlLog(path, max_bytes=4096)
    for i in range(2000):
        log.write({"step": i, "loss": 1.0 / (i + 1), "note": "x" * (i % 7)})
    log.close()
    assert path.stat().st_size <= 4096
    records = list(read_records(path))
    assert records[-1]["step"] == 1999
    steps = [r["step"] for r in records]
    assert steps == list(range(steps[0], 2000))  # a contiguous newest run, every line whole


def test_old_checkpoints_are_capped(home_copy):
    home, _ = home_copy
    config = write_config(home.parent / "keep.json", keep_checkpoints=2, **SMALL)
    for _ in range(3):
        assert run_cli("--home", home, "--config", config, "train", "--steps", 1).returncode == 0
    kept = sorted((home / cli.ARCHIVE).glob("organism-*.ckpt"))
    assert len(kept) == 2
    assert kept[-1].read_bytes() == (home / cli.CHECKPOINT).read_bytes()


def test_console_script_is_installed_when_the_package_is():
    exe = shutil.which("molecule-gpt")
    if exe is None:
        pytest.skip("molecule-gpt is not installed as a console script here (source tree run)")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("molecule-gpt ")


def test_chat_takes_bytes_that_are_not_utf8_and_stores_the_turn(tmp_path):
    home = tmp_path / "home"
    config = write_config(tmp_path / "c.json", **SMALL)
    proc = subprocess.run([sys.executable, "-m", "molecule_gpt", "--home", str(home), "--config", str(config), "chat"],
                          input=b"caf\xe9 au lait\n\xff\xfe\n/quit\n", capture_output=True, timeout=300,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8"))
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, err
    assert "internal error" not in err and "replaced with U+FFFD" in out
    memory = Memory(home / cli.MEMORY)
    try:
        texts = [m.text for m in memory.messages() if m.role == "H"]
    finally:
        memory.close()
    assert texts == ["caf\ufffd au lait", "\ufffd\ufffd"]


def test_chat_shows_and_releases_the_quarantine(tmp_path):
    pexpect = pytest.importorskip("pexpect")
    home = tmp_path / "home"
    config = write_config(tmp_path / "c.json", burst_learning_rate=1000.0, qb_cooldown_seconds=0.0, qb_min_bytes=1,
                          train_tick_seconds=0.02, micro_steps=4, heard_val_fraction=0.0, **SMALL)
    child = pexpect.spawn(sys.executable, ["-m", "molecule_gpt", "--home", str(home), "--config", str(config), "chat"],
                          encoding="utf-8", timeout=180, dimensions=(40, 200))
    try:
        child.expect("you> ")
        child.sendline("zebra crossing number nine is closed today")
        child.expect("molecule> ")
        for _ in range(200):  # the background burst at lr 1000 is rolled back and its lines set aside
            child.expect("you> ")
            child.sendline("/quarantine")
            child.expect(r"(\d+) line\(s\) set aside")
            if int(child.match.group(1)) >= 1:
                break
        child.expect("zebra crossing number nine")
        child.expect("you> ")
        child.sendline("/release")
        child.expect(r"(\d+) line\(s\) back in the corpus")
        assert int(child.match.group(1)) >= 1
        child.expect("you> ")
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_command_line_edges(tmp_path, home_copy):
    home, config = home_copy
    # a reader that goes away: quiet, no "Broken pipe" error
    proc = subprocess.run(f"{sys.executable} -m molecule_gpt --home {home} --config {config} generate -n 40 "
                          f"--max-tokens 8 | head -c 1", shell=True, capture_output=True, text=True, timeout=300)
    assert "rror" not in proc.stderr and "Broken pipe" not in proc.stderr, proc.stderr
    # "temperature": 0 in a config file means greedy, as --temperature 0 does
    greedy = write_config(tmp_path / "g.json", temperature=0, **SMALL)
    a = run_cli("--home", home, "--config", greedy, "generate", "--max-tokens", 12, "--seed", 1)
    b = run_cli("--home", home, "--config", greedy, "generate", "--max-tokens", 12, "--seed", 2)
    assert a.returncode == 0 and a.stdout == b.stdout, (a.stderr, b.stderr)
    # every bad key of a config file is named, not only the first
    bad = write_config(tmp_path / "bad.json", temprature=1, top_p=7, learning_rate=-1)
    proc = run_cli("--home", home, "--config", bad, "inspect")
    assert_clean_error(proc, 1)
    assert "temprature" in proc.stderr and "top_p" in proc.stderr and "learning_rate" in proc.stderr
    # chat --corpus on an existing organism: a missing file is an error, an existing one a note
    proc = run_cli("--home", home, "--config", config, "chat", "--corpus", tmp_path / "missing.txt", input="/quit\n")
    assert_clean_error(proc, 1, "missing.txt")
    extra = tmp_path / "extra.txt"
    extra.write_text("a line\n")
    long_line = "word " * 2000
    proc = run_cli("--home", home, "--config", config, "chat", "--corpus", extra, input=long_line + "\n/quit\n")
    assert proc.returncode == 0, proc.stderr
    assert "read only at birth" in proc.stdout and "the conversation memory keeps the first 8,000" in proc.stdout


def test_home_module_holds_the_home_and_cli_reexports_it(tmp_path):
    """The home's storage layer lives in molecule_gpt.home; the command line re-exports the names
    it used to define (other front ends import them from either)."""
    from molecule_gpt import home
    for name in ("Home", "Options", "load_options", "read_text_lines", "SETTINGS", "FIXED_AT_BIRTH",
                 "CONFIG_FIELDS", "CHECKPOINT", "MEMORY", "TELEMETRY", "ARCHIVE", "LOCK"):
        assert getattr(cli, name) is getattr(home, name), name
    assert cli.CLIError is home.HomeError
    h = home.Home(tmp_path / "h", home.load_options(None))
    assert h.checkpoint == tmp_path / "h" / home.CHECKPOINT and not h.exists()
    with h.locked():
        assert (tmp_path / "h" / home.LOCK).read_text().startswith("pid ")
