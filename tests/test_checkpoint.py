"""The checkpoint file: exact round trip and resume, atomic save, and a loader that turns every
damaged or hostile file into CheckpointError (never MemoryError, never a crash).

Files are damaged by rewriting their safetensors header here, independently of the module under
test (8-byte LE length, JSON header, data), so the tests also pin the documented layout."""
import hashlib
import json
import os
import pathlib
import random
import signal
import struct
import subprocess
import sys
import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import molecule_gpt as mg
from molecule_gpt import checkpoint as ck
from molecule_gpt.compat import load_original_checkpoint, save_original_checkpoint
from molecule_gpt.checkpoint import Checkpoint, CheckpointWarning, load_checkpoint, save_checkpoint
from molecule_gpt.errors import CheckpointError
from molecule_gpt.tokenizer import EvolvingTokenizer

SRC = pathlib.Path(mg.__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
DTYPES = ["float32", "float64"]


def small_config(**overrides):
    base = dict(n_layer=2, n_embd=16, n_head=4, block_size=12, head_types=("content", "rrpram", "hybrid", "hybrid"),
                batch_size=3, delta_rank=2)
    base.update(overrides)
    return mg.Config(**base)


def batch(rng, V, n=3):
    return [rng.integers(0, V, size=int(rng.integers(3, 16))).tolist() for _ in range(n)]


def train(model, data_rng, steps, lr=0.01):
    for _ in range(steps):
        model.train_step(batch(data_rng, model.vocab_size, model.config.batch_size), lr)


CORPUS = ["the cat sat on the mat.", "a dog ate the bone, then the dog slept.", "the end is near; the end is here!",
          "then the cat and the dog sat on the mat together."]


def organism(dtype="float32", seed=3):
    """(model, tokenizer) that have used every piece of state: a trained base that is then
    frozen, two delta modules with their own alphas, trainable flags and Adam steps, and a
    vocabulary grown by BPE merges (char mode first, BPE mode after)."""
    tok = EvolvingTokenizer(CORPUS, byte_fallback=False)
    model = mg.Model(small_config(), tok.vocab_size, dtype=dtype, seed=seed)
    data = np.random.default_rng(seed + 100)
    train(model, data, 3)
    model.add_delta_module(alpha=0.7)
    model.set_trainable("base", False)
    train(model, data, 2)
    update = tok.train_bpe(CORPUS, num_merges=6)  # BPE mode from here on
    assert update.grew and tok.bpe_enabled
    model.grow_vocab(update.new_vocab_size)
    model.set_trainable("delta0", False)
    model.add_delta_module(alpha=1.3)
    train(model, data, 2)
    return model, tok


def assert_same_model(a: mg.Model, b: mg.Model):
    meta_a, ten_a = a.export_state()
    meta_b, ten_b = b.export_state()
    assert meta_a == meta_b
    assert sorted(ten_a) == sorted(ten_b)
    for name in ten_a:
        assert ten_a[name].dtype == ten_b[name].dtype, name
        assert ten_a[name].shape == ten_b[name].shape, name
        assert ten_a[name].tobytes() == ten_b[name].tobytes(), name


# --------------------------------------------------------------------------------------------- header surgery


def read_parts(path):
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_parts(path, header, data):
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)


def edit_document(path, edit, fix_checksum=True):
    header, data = read_parts(path)
    meta = header["__metadata__"]
    doc = json.loads(meta["document"])
    edit(doc)
    meta["document"] = json.dumps(doc)
    if fix_checksum:
        sums = json.loads(meta["checksums"])
        sums["document"] = hashlib.sha256(meta["document"].encode()).hexdigest()
        meta["checksums"] = json.dumps(sums)
    write_parts(path, header, data)


def expect_error(path, match=None) -> str:
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    if match is not None:
        assert match in msg, msg
    return msg


@pytest.fixture
def saved(tmp_path):
    """(path, model): a trained float32 organism saved once."""
    model, tok = organism()
    path = str(tmp_path / "org.ckpt")
    save_checkpoint(path, model, state={"step": 7})
    return path, model


# --------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_field_by_field_identical(tmp_path, dtype):
    model, tok = organism(dtype)
    state = {"step": 1234, "schedule": {"lr": 0.01, "warmup_done": True}, "immune": [[0.5, -0.2], [0.1, None]],
             "rng": np.random.default_rng(9).bit_generator.state, "note": "héllo ✓ \ud800 <EOS>"}
    path = tmp_path / "org.ckpt"
    save_checkpoint(path, model, tok, state=state)
    ckpt = load_checkpoint(path)
    assert isinstance(ckpt, Checkpoint) and ckpt.path == str(path) and ckpt.format_version == ck.FORMAT_VERSION
    assert_same_model(model, ckpt.model)
    assert ckpt.state == state
    assert ckpt.metadata["state"] == state and ckpt.metadata["optimizer_state"] is True
    assert ckpt.model.dtype == np.dtype(dtype) and ckpt.config == model.config
    assert ckpt.tokenizer.to_dict() == tok.to_dict() and ckpt.tokenizer.bpe_enabled
    for line in CORPUS:
        assert ckpt.tokenizer.encode(line) == tok.encode(line)
    # every delta module's alpha and trainable flag, the RNG and each group's Adam step
    assert ckpt.model.delta_alphas == [0.7, 1.3]
    assert ckpt.model.trainable == {"base": False, "delta0": False, "delta1": True}
    assert {n: g.step for n, g in ckpt.model.groups.items()} == {"base": 3, "delta0": 2, "delta1": 2}
    assert ckpt.model.rng.random() == model.rng.random()
    ids = tok.encode(CORPUS[2])[:12]
    assert ckpt.model.logits(ids).tobytes() == model.logits(ids).tobytes()
    # saved without a tokenizer and without state
    save_checkpoint(path, model)
    bare = load_checkpoint(path)
    assert bare.tokenizer is None and bare.state is None


@pytest.mark.parametrize("dtype", DTYPES)
def test_loaded_model_keeps_training_identically(tmp_path, dtype):
    model, _ = organism(dtype)
    save_checkpoint(tmp_path / "a", model)
    loaded = load_checkpoint(tmp_path / "a").model
    train(model, np.random.default_rng(5), 3)
    train(loaded, np.random.default_rng(5), 3)
    model.add_delta_module()  # draws its init from the restored model RNG
    loaded.add_delta_module()
    train(model, np.random.default_rng(6), 2)
    train(loaded, np.random.default_rng(6), 2)
    assert_same_model(model, loaded)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head_types", [("content",) * 4, ("rrpram", "hybrid", "content", "hybrid")])
@pytest.mark.parametrize("n_delta", [0, 1, 3])
def test_expected_shapes_are_the_models(tied, head_types, n_delta):
    """The loader sizes every tensor from the config before it builds a Model; both must agree."""
    model = mg.Model(small_config(tie_embeddings=tied, head_types=head_types), 11)
    for _ in range(n_delta):
        model.add_delta_module()
    model.grow_vocab(13)
    assert ck._expected_shapes(model.config, 13, n_delta, True) == model.state_shapes()
    no_adam = {k: v for k, v in model.state_shapes().items() if not k.startswith("adam.")}
    assert ck._expected_shapes(model.config, 13, n_delta, False) == no_adam
    assert ck._expected_count(model.config, n_delta, True) == len(model.state_shapes())
    assert ck._expected_count(model.config, n_delta, False) == len(no_adam)


def test_file_is_a_standard_safetensors_file(saved):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    from safetensors import safe_open

    path, model = saved
    _, tensors = model.export_state()
    loaded = safetensors_numpy.load_file(path)
    assert sorted(loaded) == sorted(tensors)
    for name, arr in tensors.items():
        assert loaded[name].dtype == arr.dtype and loaded[name].tobytes() == arr.tobytes()
    with safe_open(path, framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "molecule-gpt" and meta["format_version"] == "1"
    doc = json.loads(meta["document"])
    assert doc["model"]["config"] == model.config.to_dict() and doc["state"] == {"step": 7}
    sums = json.loads(meta["checksums"])
    assert sums["algorithm"] == "sha256"
    assert sums["document"] == hashlib.sha256(meta["document"].encode()).hexdigest()
    assert sums["tensors"] == {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in tensors.items()}
    # the documented layout: 8-byte LE header length, header padded to 8 bytes, data with no holes
    header, data = read_parts(path)
    spans = sorted(tuple(v["data_offsets"]) for k, v in header.items() if k != "__metadata__")
    assert spans[0][0] == 0 and spans[-1][1] == len(data)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert (len(pathlib.Path(path).read_bytes()) - 8 - len(data)) % 8 == 0


def test_data_is_stored_in_the_models_memory_order(saved):
    """Each parameter group's parameters, then their m, then v, as the model lays them out, so a
    load reads a group's array in one call (readers must not rely on it: see the next test)."""
    path, model = saved
    header, _ = read_parts(path)
    by_offset = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    assert [k for _, k in by_offset] == model.state_layout()


@pytest.mark.parametrize("dtype", DTYPES)
def test_files_in_another_tensor_order_load(tmp_path, monkeypatch, dtype):
    """Files written by safetensors' own writer (which sorts tensors by dtype and name, as
    molecule-gpt 0.1.0 did) load to the same model, frozen modules' folded weights included."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    model, tok = organism(dtype)
    monkeypatch.setattr(ck, "_write_safetensors",
                        lambda tmp, tensors, metadata: safetensors_numpy.save_file(tensors, tmp, metadata=metadata))
    path = tmp_path / "org.ckpt"
    save_checkpoint(path, model, tok)
    header, _ = read_parts(path)
    by_offset = [k for _, k in sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")]
    assert by_offset != model.state_layout()  # really another order
    ckpt = load_checkpoint(path)
    assert_same_model(model, ckpt.model)
    ids = tok.encode("the cat sat")
    assert ckpt.model.logits(ids).tobytes() == model.logits(ids).tobytes()


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    """os.writev may write less than asked: the writer continues where it stopped."""
    real = os.writev
    calls = []

    def dribble(fd, bufs):
        calls.append(len(bufs))
        first = memoryview(bufs[0]).cast("B") if len(bufs[0]) else b""
        return real(fd, [first[:1000]] + ([] if len(first) else list(bufs[1:2])))

    monkeypatch.setattr(os, "writev", dribble)
    model, tok = organism()
    path = tmp_path / "org.ckpt"
    save_checkpoint(path, model, tok)
    assert len(calls) > os.path.getsize(path) // 1000
    monkeypatch.undo()
    assert_same_model(model, load_checkpoint(path).model)


def test_no_pickle_anywhere():
    source = pathlib.Path(ck.__file__).read_text()
    assert "pickle" not in source.replace("no pickle", "") and "np.load(" not in source


def test_optimizer_state_can_be_left_out(tmp_path):
    model, tok = organism()
    save_checkpoint(tmp_path / "full", model)
    save_checkpoint(tmp_path / "lite", model, optimizer_state=False)
    full, lite = (os.path.getsize(tmp_path / n) for n in ("full", "lite"))
    assert lite < 0.45 * full
    ckpt = load_checkpoint(tmp_path / "lite")
    assert ckpt.metadata["optimizer_state"] is False
    for name, arr in model.params().items():
        assert ckpt.model.params()[name].tobytes() == arr.tobytes()
    for group in ckpt.model.groups.values():
        assert group.step == 0 and not group.m.any() and not group.v.any()
    assert ckpt.model.init_embed_snapshot.tobytes() == model.init_embed_snapshot.tobytes()


# --------------------------------------------------------------------------------------------- save


def test_save_keeps_the_previous_file_as_prev(tmp_path):
    path = tmp_path / "org.ckpt"
    model, tok = organism()
    for step in range(3):
        save_checkpoint(path, model, state={"step": step})
    assert load_checkpoint(path).state == {"step": 2}
    assert load_checkpoint(f"{path}.prev").state == {"step": 1}
    assert sorted(os.listdir(tmp_path)) == ["org.ckpt", "org.ckpt.prev"]


def test_failed_save_leaves_the_file_unchanged(tmp_path, monkeypatch):
    path = tmp_path / "org.ckpt"
    model, tok = organism()
    save_checkpoint(path, model, state={"step": 1})
    before = path.read_bytes()

    def half_write(tmp, tensors, metadata):
        pathlib.Path(tmp).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck, "_write_safetensors", half_write)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, model, state={"step": 2})
    assert str(info.value) == f"{path}: not saved ([Errno 28] No space left on device); the file at {path} is unchanged"
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["org.ckpt"]


def test_short_write_is_detected(tmp_path, monkeypatch):
    path = tmp_path / "org.ckpt"
    real = ck._write_safetensors

    def truncating(tmp, tensors, metadata):
        real(tmp, tensors, metadata)
        with open(tmp, "r+b") as f:
            f.truncate(100)

    monkeypatch.setattr(ck, "_write_safetensors", truncating)
    with pytest.raises(CheckpointError, match="short write: 100 bytes on disk"):
        save_checkpoint(path, organism()[0])
    assert os.listdir(tmp_path) == []


def test_save_into_missing_directory(tmp_path):
    path = tmp_path / "nope" / "org.ckpt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, organism()[0])
    assert str(info.value) == f"{path}: not saved: directory {tmp_path / 'nope'} does not exist; create it first"


def test_stale_temporaries_of_dead_savers_are_removed(tmp_path):
    path = tmp_path / "org.ckpt"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a pid that no longer runs
    stale = tmp_path / f"org.ckpt.tmp-{child.pid}-0badc0de"
    stale.mkdir()
    (stale / ".tmpAbC123").write_bytes(b"left by a killed save")
    live = tmp_path / f"org.ckpt.tmp-{os.getppid()}-1234abcd"  # a live process: maybe saving now
    live.mkdir()
    save_checkpoint(path, organism()[0])
    assert not stale.exists() and live.is_dir()


@pytest.mark.parametrize("state, where, problem", [
    ({"loss": float("nan")}, "state['loss'] is nan", "JSON has no NaN/Infinity, store None or a string"),
    ({"hist": [1, float("inf")]}, "state['hist'][1] is inf", "JSON has no NaN/Infinity, store None or a string"),
    ({"counts": {3: 1}}, "state['counts'] has key 3 of type int", "JSON keys are strings, convert it with str()"),
    ({"shape": (1, 2)}, "state['shape'] is a tuple, which does not round-trip through JSON",
     "use a list (tuples load back as lists)"),
    ({"n": np.int64(3)}, "state['n'] is a int64, which does not round-trip through JSON", "convert it with .item()/.tolist()"),
    ({"s": {1, 2}}, "state['s'] is a set, which does not round-trip through JSON", "convert it to JSON types"),
])
def test_state_must_survive_json_unchanged(tmp_path, state, where, problem):
    path = tmp_path / "org.ckpt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, organism()[0], state=state)
    assert str(info.value) == f"{path}: not saved: {where}; {problem}"
    assert not path.exists()


def test_tokenizer_and_model_vocabulary_must_agree(tmp_path):
    model, _ = organism()
    tok = EvolvingTokenizer(CORPUS)  # byte fallback: more tokens than the model has rows
    path = tmp_path / "org.ckpt"
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, model, tok)
    assert str(info.value) == (f"{path}: not saved: the tokenizer has {tok.vocab_size} tokens but the model has "
                               f"vocab_size {model.vocab_size}; grow the model (model.grow_vocab(tokenizer.vocab_size)) "
                               f"before saving")
    assert not path.exists()


def test_corrupt_tokenizer_document(tmp_path):
    model, tok = organism()
    path = tmp_path / "org.ckpt"
    save_checkpoint(path, model, tok)
    raw = path.read_bytes()
    edit_document(path, lambda doc: doc["tokenizer"]["tokens"].append("zz"))
    assert expect_error(str(path)) == (f"{path}: its tokenizer cannot be rebuilt (TokenizerError: tokens, token_bytes "
                                       f"and token_kinds differ in length)")
    path.write_bytes(raw)

    def shrink(doc):
        t = doc["tokenizer"]
        t["tokens"], t["token_bytes"], t["token_kinds"] = t["tokens"][:-1], t["token_bytes"][:-1], t["token_kinds"][:-1]
        t["merges"] = [m for m in t["merges"] if max(m) < len(t["tokens"])]
        t["token_eow"] = [i for i in t["token_eow"] if i < len(t["tokens"])]  # ids in range (from_dict checks)
    edit_document(path, shrink)
    assert expect_error(str(path)) == (f"{path}: its tokenizer has {tok.vocab_size - 1} tokens but the model's "
                                       f"vocab_size is {model.vocab_size}: the header is corrupt")


# --------------------------------------------------------------------------------------------- damaged files


def test_truncation_at_twenty_offsets(saved):
    path, _ = saved
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    data = len(raw) - 8 - n
    offsets = sorted({0, 1, 7, 8, 9, 8 + n // 3, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, 8 + n + 4,
                      8 + n + data // 5, 8 + n + data // 3, 8 + n + data // 2, 8 + n + 2 * data // 3,
                      8 + n + 4 * data // 5, len(raw) - 8, len(raw) - 4, len(raw) - 2, len(raw) - 1})
    assert len(offsets) == 20
    for cut in offsets:
        pathlib.Path(path).write_bytes(raw[:cut])
        msg = expect_error(path)
        if cut == 0:
            assert msg == f"{path}: the file is empty (a save that never completed?)"
        elif cut < 8:
            assert msg == (f"{path}: the file is {cut} bytes long, too short for a checkpoint (it starts with an "
                           f"8-byte header length)")
        elif cut < 8 + n:
            assert msg == (f"{path}: the header length field says {n} bytes but only {cut - 8} follow: the file is "
                           f"truncated or is not a safetensors file")
        else:
            assert "the file is truncated" in msg, msg


def test_truncated_data_error_text(saved):
    path, _ = saved
    header, data = read_parts(path)
    raw = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(raw[:-10])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    info = header[last]
    nbytes = info["data_offsets"][1] - info["data_offsets"][0]
    assert expect_error(path) == (f"{path}: tensor {last!r} of shape {tuple(info['shape'])} ({nbytes} bytes) ends at byte "
                                  f"{info['data_offsets'][1]} of the data but the file holds only {len(data) - 10} "
                                  f"bytes of data: the file is truncated")


def test_random_byte_flips_in_header_and_data(saved):
    path, _ = saved
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    rng = random.Random(1234)
    positions = [rng.randrange(0, 8) for _ in range(4)] + [rng.randrange(8, 8 + n) for _ in range(60)] + \
                [rng.randrange(8 + n, len(raw)) for _ in range(60)]
    for pos in positions:
        flipped = bytearray(raw)
        flipped[pos] ^= rng.randrange(1, 256)
        pathlib.Path(path).write_bytes(bytes(flipped))
        msg = expect_error(path)
        if pos >= 8 + n:
            assert "does not match its sha256 checksum" in msg and "the file is corrupt" in msg, msg


def test_corrupt_tensor_is_named(saved):
    path, _ = saved
    header, data = read_parts(path)
    begin, _ = header["l1.fc2"]["data_offsets"]
    data = bytearray(data)
    data[begin + 3] ^= 0x40
    write_parts(path, header, bytes(data))
    assert expect_error(path) == f"{path}: tensor data does not match its sha256 checksum ('l1.fc2'): the file is corrupt"


def test_errors_point_to_prev_when_it_exists(tmp_path):
    path = tmp_path / "org.ckpt"
    model, tok = organism()
    save_checkpoint(path, model, state={"step": 1})
    save_checkpoint(path, model, state={"step": 2})
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    msg = expect_error(path)
    assert msg.endswith(f". The previous checkpoint {path}.prev exists: load_checkpoint('{path}.prev') gets the "
                        f"organism as of the save before")
    assert load_checkpoint(f"{path}.prev").state == {"step": 1}


def test_wrong_magic(saved, tmp_path):
    path, _ = saved
    header, data = read_parts(path)
    header["__metadata__"]["format"] = "molecule-gpx"
    write_parts(path, header, data)
    assert expect_error(path) == (f"{path}: it is not a molecule-gpt checkpoint: __metadata__ format is 'molecule-gpx', "
                                  f"expected 'molecule-gpt'")
    del header["__metadata__"]
    write_parts(path, header, data)
    assert expect_error(path) == (f"{path}: it is not a molecule-gpt checkpoint: its safetensors header has no "
                                  f"__metadata__ string map (a plain safetensors file?)")
    other = tmp_path / "random.bin"
    other.write_bytes(bytes(range(256)) * 4)
    assert expect_error(str(other)).startswith(f"{other}: the header length field says ")
    original = tmp_path / "original.json"
    original.write_text(json.dumps({"cfg": {}, "base": {}}))
    assert expect_error(str(original)) == (
        f"{original}: this is a JSON file, not a molecule-gpt checkpoint; if it is the original implementation's "
        f"checkpoint, import it with molecule_gpt.compat.load_original_checkpoint")


def test_wrong_version(saved):
    path, _ = saved
    header, data = read_parts(path)
    for version, text in [
        ("2", f"{path}: it has format_version 2, newer than this molecule-gpt reads (up to 1); upgrade molecule-gpt to load it"),
        ("0", f"{path}: it has format_version 0, older than any this molecule-gpt can migrate (oldest 1); load and "
              f"re-save it with the molecule-gpt release that wrote it"),
        ("v1", f"{path}: its format_version 'v1' is not a version number: the header is corrupt"),
    ]:
        header["__metadata__"]["format_version"] = version
        write_parts(path, header, data)
        assert expect_error(path) == text


def test_shape_inconsistent_metadata(saved):
    path, model = saved
    V = model.vocab_size
    raw = pathlib.Path(path).read_bytes()

    def widen(doc):
        doc["model"]["config"]["n_embd"] = 24
    edit_document(path, widen)
    assert expect_error(path) == (f"{path}: tensor 'wte' has shape ({V}, 16) but the config (n_layer=2, "
                                  f"n_embd=24, n_head=4, block_size=12, delta_rank=2) and vocab_size={V} imply ({V}, 24)")

    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"].update(vocab_size=V + 1))
    assert expect_error(path) == (f"{path}: tensor 'wte' has shape ({V}, 16) but the config (n_layer=2, n_embd=16, "
                                  f"n_head=4, block_size=12, delta_rank=2) and vocab_size={V + 1} imply ({V + 1}, 16)")

    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"]["delta_alphas"].append(1.0))
    assert expect_error(path, "model trainable must map each of the groups base, delta0, delta1, delta2")

    pathlib.Path(path).write_bytes(raw)
    header, data = read_parts(path)
    header["l0.fc2"]["shape"] = header["l0.fc2"]["shape"][::-1]  # same byte count, transposed
    write_parts(path, header, data)
    assert expect_error(path) == (f"{path}: tensor 'l0.fc2' has shape (64, 16) but the config (n_layer=2, n_embd=16, "
                                  f"n_head=4, block_size=12, delta_rank=2) and vocab_size={V} imply (16, 64)")

    pathlib.Path(path).write_bytes(raw)
    header, data = read_parts(path)
    header["wpe"]["dtype"] = "F64"
    write_parts(path, header, data)
    assert expect_error(path, "tensor 'wpe' claims shape (12, 16) (192 elements of F64, 1536 bytes)")


def test_document_edited_without_checksum_is_rejected(saved):
    path, _ = saved
    edit_document(path, lambda doc: doc["model"]["config"].update(learning_rate=0.5), fix_checksum=False)
    assert expect_error(path) == f"{path}: the metadata document does not match its sha256 checksum: the header is corrupt"


def test_huge_tensor_claim_never_allocates(saved):
    path, _ = saved
    header, data = read_parts(path)
    raw = pathlib.Path(path).read_bytes()
    side = 1 << 20  # 2^40 elements, 4 TiB of float32
    header["wte"] = {"dtype": "F32", "shape": [side, side], "data_offsets": [0, 4 * side * side]}
    write_parts(path, header, data)
    tracemalloc.start()
    try:
        msg = expect_error(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert msg == (f"{path}: tensor 'wte' of shape ({side}, {side}) ({4 * side * side} bytes) ends at byte {4 * side * side} of the "
                   f"data but the file holds only {len(data)} bytes of data: the file is truncated")
    assert peak < 8 * len(raw)  # what the header claims is never allocated
    # the same claim in the config (a 2^20-token vocabulary) with a consistent-looking table
    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"].update(vocab_size=side * side))
    assert "vocab_size=1099511627776 imply" in expect_error(path)
    # a header length field of 2^40
    pathlib.Path(path).write_bytes(struct.pack("<Q", 1 << 40) + raw[8:])
    assert expect_error(path) == (f"{path}: the header length field says {1 << 40} bytes but only {len(raw) - 8} follow: "
                                  f"the file is truncated or is not a safetensors file")


def test_hostile_headers(saved):
    path, _ = saved
    raw = pathlib.Path(path).read_bytes()
    header, data = read_parts(path)
    text = json.dumps(header, separators=(",", ":"))
    # a duplicated tensor name (JSON would silently keep the last one)
    dup = text[:-1] + ',"wpe":' + json.dumps(header["wpe"]) + "}"
    body = dup.encode() + b" " * (-len(dup) % 8)
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(body)) + body + data)
    assert expect_error(path) == (f"{path}: the header is not valid JSON (duplicate key 'wpe'): the header is corrupt")
    # deeply nested JSON
    deep = ("[" * 100000 + "]" * 100000).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(deep)) + deep)
    assert expect_error(path) == f"{path}: the header does not start with '{{': not a safetensors file"
    deep = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(deep)) + deep)
    assert expect_error(path, "the header is not valid JSON")
    # overlapping tensors
    header["wpe"]["data_offsets"] = [0, header["wpe"]["data_offsets"][1] - header["wpe"]["data_offsets"][0]]
    write_parts(path, header, data)
    assert expect_error(path, "overlaps the previous tensor")
    # an absurd n_layer or n_head that would make the shape tables loop for ever
    n_tensors = len(header) - 1
    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"]["config"].update(n_layer=10 ** 12))
    assert expect_error(path) == (f"{path}: the config (n_layer={10 ** 12}, n_head=4) with 2 delta module(s) implies "
                                  f"{ck._expected_count(small_config(n_layer=10 ** 12), 2, True)} tensors but the file "
                                  f"holds {n_tensors}")
    pathlib.Path(path).write_bytes(raw)
    heads = 2 * 10 ** 6  # content heads add no tensor, only loop iterations

    def many_heads(doc):
        doc["model"]["config"].update(n_head=heads, n_embd=2 * heads, head_types=["content"] * heads)
    edit_document(path, many_heads)
    t0 = time.perf_counter()
    assert expect_error(path) == (f"{path}: the config has n_layer * n_head = {2 * heads}, beyond the 1000000 this "
                                  f"reader accepts")
    assert time.perf_counter() - t0 < 10
    # an invalid config value
    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"]["config"].update(n_head=3))
    assert expect_error(path, "its config is invalid: Config.n_embd (16) must be divisible by Config.n_head (3)")
    # a broken RNG state
    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"]["rng"].update(bit_generator="MT19937"))
    assert expect_error(path, "the model cannot be rebuilt from its metadata (ValueError")
    # a huge batch_size: the training arena is sized from it, but never past memory silently
    pathlib.Path(path).write_bytes(raw)
    edit_document(path, lambda doc: doc["model"]["config"].update(batch_size=1 << 40))
    msg = expect_error(path)
    assert "not enough memory to build its model (batch_size=1099511627776" in msg



# --------------------------------------------------------------------------------------------- hostile sizes
# Files whose framing is valid (length, magic, checksums) so the loader reaches its JSON parsers,
# filled with cheap-to-write structure that is expensive to parse: before the structural
# limits, a 100 MB header of empty objects took 2.5 GB and 6.4 s to reject.

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
HOSTILE_SHAPES = ["objects", "lists", "strings", "deep", "tensors"]


def hostile_json(shape, size):
    """JSON text of about `size` bytes: millions of empty objects, empty lists or short strings
    in an array, or one array nested size/2 levels deep."""
    if shape == "deep":
        return "[" * (size // 2) + "]" * (size // 2)
    item = {"objects": "{}", "lists": "[]", "strings": '"ab"'}[shape]
    return "[" + ",".join([item] * (size // (len(item) + 1))) + "]"


def write_hostile(path, where, shape, size):
    """Rewrite the checkpoint at `path` (valid framing and checksums) with about `size` bytes of
    hostile structure in the header itself ("header") or in the document's state ("state");
    shape "tensors" adds size/150 zero-size tensors with valid checksums to the header."""
    header, data = read_parts(path)
    meta = header["__metadata__"]
    if where == "state":
        doc = json.loads(meta["document"])
        doc["state"] = "\0"  # a stand-in, replaced by the hostile text below
        if shape == "tensors":  # the same shape as a tensor table, inside the state
            junk = "{" + ",".join(f'"z{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'
                                  for i in range(size // 70)) + "}"
        else:  # stored in a JSON string, each quote takes two bytes
            junk = hostile_json(shape, size * 5 // 7 if shape == "strings" else size)
        meta["document"] = json.dumps(doc, separators=(",", ":")).replace('"\\u0000"', junk)
        sums = json.loads(meta["checksums"])
        sums["document"] = hashlib.sha256(meta["document"].encode()).hexdigest()
        meta["checksums"] = json.dumps(sums)
        text = json.dumps(header, separators=(",", ":"))
    elif shape == "tensors":
        n = size // 150
        sums = json.loads(meta["checksums"])
        sums["tensors"].update({f"z{i}": EMPTY_SHA256 for i in range(n)})
        meta["checksums"] = json.dumps(sums, separators=(",", ":"))
        text = json.dumps(header, separators=(",", ":"))[:-1] + "," + ",".join(
            f'"z{i}":{{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}' for i in range(n)) + "}"
    else:
        text = json.dumps(header, separators=(",", ":"))[:-1] + ',"junk":' + hostile_json(shape, size) + "}"
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    assert len(raw) <= ck.MAX_HEADER_BYTES
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return len(raw)


_MEASURE = """
import resource, sys, time
sys.path[:0] = [{src!r}]
from molecule_gpt.checkpoint import load_checkpoint
from molecule_gpt.errors import CheckpointError
wall, cpu = time.perf_counter(), time.process_time()
try:
    load_checkpoint(sys.argv[1])
    outcome = "loaded"
except CheckpointError as exc:
    outcome = "CheckpointError: " + str(exc)[:300]
cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
print(repr((outcome, cpu, wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def measure_load(path):
    """(outcome, cpu seconds, wall seconds, peak RSS bytes) of load_checkpoint(path) in a fresh
    interpreter (the peak is the whole process's, imports included). It is started by a small
    intermediate interpreter: on Linux, ru_maxrss survives execve, so a child forked straight
    from this (large) test process would report this process's size as its own peak."""
    child = [sys.executable, "-c", _MEASURE.format(src=str(SRC)), str(path)]
    out = subprocess.run([sys.executable, "-c", f"import subprocess, sys; sys.exit(subprocess.call({child!r}))"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return eval(out.stdout.strip().splitlines()[-1])


def check_hostile(saved, where, shape, size):
    path, _ = saved
    n = write_hostile(path, where, shape, size)
    outcome, cpu, wall, peak = measure_load(path)
    assert outcome.startswith("CheckpointError: "), outcome
    # CPU time, not wall time: the test machine may be shared; the target is 1 s either way
    assert cpu <= 1.0, f"{where} {shape} ({n} bytes of header): {cpu:.2f} s CPU ({wall:.2f} s wall) to reject"
    assert peak <= 400e6, f"{where} {shape} ({n} bytes of header): {peak / 1e6:.0f} MB peak RSS to reject"
    return outcome


@pytest.mark.parametrize("where", ["header", "state"])
@pytest.mark.parametrize("shape", HOSTILE_SHAPES)
def test_hostile_structure_is_rejected_cheaply(saved, where, shape):
    check_hostile(saved, where, shape, 60_000_000)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["header", "state"])
@pytest.mark.parametrize("shape", HOSTILE_SHAPES)
def test_hostile_structure_at_the_header_limit_is_rejected_cheaply(saved, where, shape):
    check_hostile(saved, where, shape, 99_000_000)



def test_non_ascii_headers_are_bounded(saved):
    """Decoded, a header with one character beyond U+FFFF takes 4 bytes per character: such a
    header may be a quarter of the limit (molecule-gpt writes ASCII headers)."""
    path, _ = saved
    header, data = read_parts(path)
    header["__metadata__"]["note"] = "\U0001d11e" + "a" * (ck.MAX_HEADER_BYTES // 4)
    text = json.dumps(header, ensure_ascii=False).encode()
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text + data)
    assert expect_error(path) == (f"{path}: the header is {len(text)} bytes and not ASCII; a header with non-ASCII "
                                  f"bytes may be at most {ck.MAX_HEADER_BYTES // 4} bytes (molecule-gpt writes ASCII): "
                                  f"not a molecule-gpt checkpoint")


def add_tensors(path, n, nbytes):
    """Append n unknown F32 tensors of nbytes each (zeros) with valid checksums."""
    header, data = read_parts(path)
    sums = json.loads(header["__metadata__"]["checksums"])
    digest = hashlib.sha256(bytes(nbytes)).hexdigest()
    for i in range(n):
        header[f"future.{i}"] = {"dtype": "F32", "shape": [nbytes // 4],
                                 "data_offsets": [len(data) + i * nbytes, len(data) + (i + 1) * nbytes]}
        sums["tensors"][f"future.{i}"] = digest
    header["__metadata__"]["checksums"] = json.dumps(sums)
    write_parts(path, header, data + bytes(n * nbytes))


def test_tensor_counts_are_bounded_before_per_entry_work(saved):
    path, model = saved
    raw = pathlib.Path(path).read_bytes()
    header, data = read_parts(path)
    n_model = len(header) - 1
    # unknown tensors are ignored with a warning, up to a limit
    add_tensors(path, ck._MAX_UNKNOWN_TENSORS, 4)
    with pytest.warns(CheckpointWarning, match=f"ignoring {ck._MAX_UNKNOWN_TENSORS} unknown tensor"):
        assert_same_model(model, load_checkpoint(path).model)
    pathlib.Path(path).write_bytes(raw)
    add_tensors(path, ck._MAX_UNKNOWN_TENSORS + 1, 4)
    assert expect_error(path) == (f"{path}: the file holds {n_model + ck._MAX_UNKNOWN_TENSORS + 1} tensors, "
                                  f"{ck._MAX_UNKNOWN_TENSORS + 1} more than the config implies; this reader ignores at "
                                  f"most {ck._MAX_UNKNOWN_TENSORS} unknown tensors: the header is corrupt")
    # empty tensors do not count as data: the header may list data_size // 4 + 1024 tensors,
    # which the structure scan sees before json.loads builds them
    max_tensors = len(data) // 4 + ck._MAX_UNKNOWN_TENSORS
    why = (f"a file with {len(data)} bytes of data lists at most {max_tensors} tensors, as every tensor a model "
           f"needs holds 4 bytes or more")
    pathlib.Path(path).write_bytes(raw)
    add_tensors(path, max_tensors - n_model + 1, 0)
    assert expect_error(path) == (f"{path}: the header is not valid JSON for this format (over {2 + 3 * max_tensors} "
                                  f"objects and arrays, more than a checkpoint holds: {why}): the header is corrupt")
    # members that are not objects pass the scan (they are cheap to parse) and are counted after it
    text = json.dumps(header, separators=(",", ":"))[:-1] + "".join(f',"z{i}":0' for i in range(max_tensors)) + "}"
    pathlib.Path(path).write_bytes(struct.pack("<Q", len(text)) + text.encode() + data)
    assert expect_error(path) == (f"{path}: the header lists {n_model + max_tensors} tensors, more than the "
                                  f"{max_tensors}: {why}: the header is corrupt")


def reservoir_lines(n, seed=0):
    """Lines like an organism's reservoir (up to 240 chars), with the characters JSON escapes or
    that look like structure: commas, brackets, quotes, backslashes, non-ASCII."""
    rng = random.Random(seed)
    words = 'the river runs past trees, and [birds] {sing} "loudly" at dawn; é ✓ \\ ok.'.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))[:239] + "." for _ in range(n)]


def test_a_full_organism_reservoir_loads(tmp_path):
    """The structural limits leave room for real states: an organism with its 8000 reservoir
    lines saves and loads."""
    org = mg.Organism(mg.Config(max_corpus_lines=8000), corpus=reservoir_lines(9000))
    assert len(org.reservoir.lines) == 8000
    org.save(tmp_path / "org.ckpt")
    back = mg.Organism.load(tmp_path / "org.ckpt")
    assert back.reservoir.lines == org.reservoir.lines
    assert back.state_dict() == org.state_dict()


def test_a_state_of_tens_of_megabytes_loads(tmp_path):
    """100k reservoir-like lines (about 14 MB of state, in a file whose small model makes the
    header's tensor bounds tight, so both scans count exactly) load unchanged."""
    model, tok = organism()
    lines = reservoir_lines(100_000)
    state = {"reservoir": {"lines": lines}, "val_lines": lines[:800], "counters": {"steps": 12}}
    save_checkpoint(tmp_path / "org.ckpt", model, tok, state=state)
    assert load_checkpoint(tmp_path / "org.ckpt").state == state

def json_shape(value, level=0):
    """(containers, containers + commas, depth) of a JSON value, from the value itself."""
    if isinstance(value, (dict, list)):
        items = list(value.values()) if isinstance(value, dict) else value
        shapes = [json_shape(v, level + 1) for v in items]
        return (1 + sum(s[0] for s in shapes), 1 + max(len(items) - 1, 0) + sum(s[1] for s in shapes),
                max([level + 1] + [s[2] for s in shapes]))
    return 0, 0, level


TRICKY_TEXT = st.text(st.sampled_from('ab"\\{}[],:\n é✓'), max_size=12)
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | TRICKY_TEXT,
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TRICKY_TEXT, inner, max_size=5),
                           max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(JSON_VALUES, st.integers(1, 9), st.booleans(), st.booleans())
def test_structure_scan_counts_exactly_what_json_holds(value, chunk, ascii, nested):
    """The exact scan (strings skipped, escapes followed, chunk boundaries anywhere) finds the
    containers, values and depth of the value, and the limits reject one less of each."""
    if nested:  # as the document is stored in the header: JSON text inside a JSON string
        value = {"__metadata__": {"document": json.dumps(value, ensure_ascii=ascii)}, "x": value}
    data = json.dumps(value, ensure_ascii=ascii).encode()
    containers, elements, depth = json_shape(value)
    old = ck._SCAN_CHUNK
    ck._SCAN_CHUNK = chunk
    try:
        ck._check_structure_exactly("f", data, "it", containers, elements, depth)
        if containers:
            with pytest.raises(CheckpointError, match="objects and arrays, more than"):
                ck._check_structure_exactly("f", data, "it", containers - 1, elements, depth)
            with pytest.raises(CheckpointError, match="values in objects and arrays"):
                ck._check_structure_exactly("f", data, "it", containers, elements - 1, depth)
            with pytest.raises(CheckpointError, match=f"nested {depth} deep, more than the {depth - 1}"):
                ck._check_structure_exactly("f", data, "it", containers, elements, depth - 1)
        # the quick upper bounds never pass what the exact count rejects
        ck._check_structure("f", data, "it", containers=containers, elements=elements)
    finally:
        ck._SCAN_CHUNK = old

def test_arena_bound_is_above_the_exact_plan():
    """_arena_bytes_bound lets a load skip the engine binding that the exact figure needs; it
    must never be below Model.planned_arena_bytes (which plans what the first step allocates)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for _ in range(60):
        n_head = int(rng.choice([1, 2, 4]))
        cfg = mg.Config(n_layer=int(rng.integers(1, 4)), n_embd=n_head * 2 * int(rng.integers(1, 5)), n_head=n_head,
                        block_size=int(rng.integers(2, 40)), batch_size=int(rng.integers(1, 10)),
                        head_types=tuple(rng.choice(["content", "rrpram", "hybrid"], size=n_head).tolist()),
                        tie_embeddings=bool(rng.integers(2)), delta_rank=int(rng.integers(1, 5)),
                        mlp_activation=str(rng.choice(["relu", "silu"])))
        n_delta = int(rng.integers(0, 5))
        trainable = {f"delta{k}": bool(rng.integers(2)) for k in range(n_delta)}
        trainable["base"] = bool(rng.integers(2))
        dtype = str(rng.choice(DTYPES))
        model = mg.Model.empty(cfg, int(rng.integers(3, 80)), dtype, [1.0] * n_delta,
                               n_threads=int(rng.integers(1, 4)), trainable=trainable)
        exact = model.planned_arena_bytes
        bound = ck._arena_bytes_bound(cfg, model.vocab_size, n_delta, model.dtype.itemsize, model.n_threads)
        assert exact <= bound, (cfg, n_delta, trainable, dtype, model.n_threads)
        worst = max(worst, bound / exact)
    assert worst < 10  # a bound, but not a vacuous one


def test_arenas_are_refused_exactly_above_memory(saved, monkeypatch):
    """A load fails exactly when the planned arenas exceed memory, whether or not the cheap
    bound let it skip the exact figure."""
    path, model = saved
    exact = load_checkpoint(path).model.planned_arena_bytes
    monkeypatch.setattr(ck, "_physical_memory", lambda: exact)
    load_checkpoint(path)
    monkeypatch.setattr(ck, "_physical_memory", lambda: exact - 1)
    msg = expect_error(path)
    assert f"its training arenas would need {exact} bytes, more than this machine has" in msg


def test_missing_file(tmp_path):
    path = tmp_path / "none.ckpt"
    assert expect_error(str(path)) == f"{path}: cannot open it (No such file or directory)"


# --------------------------------------------------------------------------------------------- forward compatibility


def test_unknown_keys_are_ignored_with_a_warning(saved):
    path, model = saved
    header, data = read_parts(path)
    header["__metadata__"]["comment"] = "from the future"
    extra = np.arange(6, dtype=np.float32).tobytes()
    header["future.tensor"] = {"dtype": "F32", "shape": [2, 3], "data_offsets": [len(data), len(data) + len(extra)]}
    sums = json.loads(header["__metadata__"]["checksums"])
    sums["tensors"]["future.tensor"] = hashlib.sha256(extra).hexdigest()
    header["__metadata__"]["checksums"] = json.dumps(sums)
    write_parts(path, header, data + extra)

    def future(doc):
        doc["telemetry"] = {"x": 1}
        doc["model"]["lr_schedule"] = "cosine"
        doc["model"]["config"]["attention_sink"] = True
    edit_document(path, future)
    with pytest.warns(CheckpointWarning) as record:
        ckpt = load_checkpoint(path)
    messages = sorted(str(w.message) for w in record)
    assert messages == sorted([
        f"{path}: ignoring unknown __metadata__ key(s) comment (written by a newer molecule-gpt?)",
        f"{path}: ignoring unknown metadata document field(s) telemetry (written by a newer molecule-gpt?)",
        f"{path}: ignoring unknown model field(s) lr_schedule (written by a newer molecule-gpt?)",
        f"{path}: ignoring unknown config field(s) attention_sink (written by a newer molecule-gpt?)",
        f"{path}: ignoring 1 unknown tensor(s) future.tensor (written by a newer molecule-gpt?)",
    ])
    assert_same_model(model, ckpt.model)
    # an ignored tensor is still checksummed
    corrupt = bytearray(pathlib.Path(path).read_bytes())
    corrupt[-2] ^= 0xFF
    pathlib.Path(path).write_bytes(bytes(corrupt))
    with pytest.warns(CheckpointWarning):
        assert expect_error(path).endswith("('future.tensor'): the file is corrupt")


def test_older_versions_migrate(saved, monkeypatch):
    """A version-0 layout (moments named adam_m./adam_v., the model meta under "net") loads through
    the migration registered for version 0."""
    path, model = saved
    header, data = read_parts(path)
    meta = header["__metadata__"]
    sums = json.loads(meta["checksums"])
    for name in [k for k in header if k.startswith("adam.")]:
        old = name.replace("adam.m.", "adam_m.").replace("adam.v.", "adam_v.")
        header[old] = header.pop(name)
        sums["tensors"][old] = sums["tensors"].pop(name)
    doc = json.loads(meta["document"])
    doc["net"] = doc.pop("model")
    meta["document"] = json.dumps(doc)
    sums["document"] = hashlib.sha256(meta["document"].encode()).hexdigest()
    meta["checksums"] = json.dumps(sums)
    meta["format_version"] = "0"
    write_parts(path, header, data)

    def v0_to_v1(document, tensors):
        document = dict(document, model=document["net"])
        del document["net"]
        renamed = {k.replace("adam_m.", "adam.m.").replace("adam_v.", "adam.v."): e for k, e in tensors.items()}
        return document, renamed

    monkeypatch.setitem(ck._MIGRATIONS, 0, v0_to_v1)
    ckpt = load_checkpoint(path)
    assert ckpt.format_version == 0
    assert_same_model(model, ckpt.model)
    # a version-0 file the migration cannot make sense of
    edit_document(path, lambda doc: doc.pop("net"))
    assert expect_error(path) == (f"{path}: it cannot be migrated from format_version 0 to 1 (KeyError: 'net'): the "
                                  f"header is corrupt")


# --------------------------------------------------------------------------------------------- crash safety


def _saver_loop(path, wfd, start):
    """Save in a loop; report 'B<i>' before and 'E<i>' after each save on the pipe."""
    model = mg.Model(small_config(n_embd=32, n_layer=2), 64, seed=1)
    model.add_delta_module()
    i = start
    while True:
        model.params()["wpe"][0, 0] = i
        os.write(wfd, f"B{i}\n".encode())
        save_checkpoint(path, model, state={"i": i})
        os.write(wfd, f"E{i}\n".encode())
        i += 1


def _check_after_kill(path, last_begun, last_ended):
    ckpt = load_checkpoint(path)  # never raises: path is always a complete file
    i = ckpt.state["i"]
    assert i in (last_ended, last_begun), (i, last_begun, last_ended)
    assert ckpt.model.params()["wpe"][0, 0] == i  # tensors and state come from the same save
    if os.path.exists(f"{path}.prev"):
        j = load_checkpoint(f"{path}.prev").state["i"]
        assert j in (i - 1, i), (i, j)
    return i


def _kill_loop(tmp_path, kills, spawn):
    path = str(tmp_path / "org.ckpt")
    model = mg.Model(small_config(n_embd=32, n_layer=2), 64, seed=1)
    model.add_delta_module()
    model.params()["wpe"][0, 0] = 0
    t0 = time.perf_counter()
    save_checkpoint(path, model, state={"i": 0})
    save_time = time.perf_counter() - t0
    rng = random.Random(42)
    last, mid_save = 0, 0
    for _ in range(kills):
        kill, rfd = spawn(path, last + 1)
        time.sleep(rng.uniform(0, 5 * save_time))
        kill()
        lines = b""
        while True:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            lines += chunk
        os.close(rfd)
        events = lines.decode().split()
        begun = [int(e[1:]) for e in events if e[0] == "B"]
        ended = [int(e[1:]) for e in events if e[0] == "E"]
        last_begun = begun[-1] if begun else last
        last_ended = ended[-1] if ended else last
        mid_save += bool(begun) and last_begun != last_ended
        last = _check_after_kill(path, last_begun, last_ended)
    save_checkpoint(path, model, state={"i": -1})  # a clean save sweeps the killed savers' temporaries
    assert sorted(os.listdir(tmp_path)) == ["org.ckpt", "org.ckpt.prev"]
    return mid_save


def _fork_saver(path, start):
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        try:
            os.close(rfd)
            _saver_loop(path, wfd, start)
        finally:
            os._exit(1)
    os.close(wfd)

    def kill():
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return kill, rfd


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")
def test_sigkill_during_saves_always_leaves_a_loadable_file(tmp_path):
    kills = 40
    mid_save = _kill_loop(tmp_path, kills, _fork_saver)
    assert mid_save >= kills // 4, f"only {mid_save} of {kills} kills landed inside a save"


def _spawn_saver(path, start):
    """A fresh interpreter (nothing shared with the test process) running _saver_loop."""
    rfd, wfd = os.pipe()
    code = (f"import sys; sys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]; import test_checkpoint as t; "
            f"sys.stdout.write('R'); sys.stdout.flush(); t._saver_loop({path!r}, {wfd}, {start})")
    proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(wfd,), stdout=subprocess.PIPE)
    os.close(wfd)
    assert proc.stdout.read(1) == b"R"  # imports done: from here on it only saves
    proc.stdout.close()

    def kill():
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return kill, rfd


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="needs SIGKILL")
def test_sigkill_fresh_interpreters_many_times(tmp_path):
    kills = 120
    mid_save = _kill_loop(tmp_path, kills, _spawn_saver)
    assert mid_save >= kills // 4


# --------------------------------------------------------------------------------------------- exact resume


def _resume_run(model, data_rng, first, last):
    """Steps first..last-1 of a fixed schedule; growth (a new module, a larger vocabulary, a
    frozen base) happens at fixed steps, whichever process runs them."""
    for step in range(first, last):
        if step == 3:
            model.add_delta_module(alpha=0.9)
            model.set_trainable("base", False)
        if step == 5:
            model.grow_vocab(model.vocab_size + 2)
        train(model, data_rng, 1, lr=0.02)


def _resume_child(path_in, path_out, first, last):
    ckpt = load_checkpoint(path_in)
    data = np.random.default_rng()
    data.bit_generator.state = ckpt.state["data_rng"]
    _resume_run(ckpt.model, data, first, last)
    save_checkpoint(path_out, ckpt.model, state={"data_rng": data.bit_generator.state})


@pytest.mark.parametrize("dtype", DTYPES)
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, dtype):
    N, M = 3, 4  # the child adds the module at step 3 and grows the vocabulary at step 5
    model = mg.Model(small_config(), 20, dtype=dtype, seed=11)
    data = np.random.default_rng(12)
    _resume_run(model, data, 0, N)
    save_checkpoint(tmp_path / "at_n.ckpt", model, state={"data_rng": data.bit_generator.state})
    code = (f"import sys; sys.path[:0] = [{str(SRC)!r}, {str(TESTS)!r}]; import test_checkpoint as t; "
            f"t._resume_child({str(tmp_path / 'at_n.ckpt')!r}, {str(tmp_path / 'resumed.ckpt')!r}, {N}, {N + M})")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    _resume_run(model, data, N, N + M)  # the uninterrupted run
    resumed = load_checkpoint(tmp_path / "resumed.ckpt")
    assert_same_model(model, resumed.model)
    assert resumed.state["data_rng"] == data.bit_generator.state
    assert resumed.model.n_delta == 1 and resumed.model.vocab_size == 22


# --------------------------------------------------------------------------------------------- concurrency


def test_save_while_another_thread_trains(tmp_path):
    import threading

    model, tok = organism()
    stop = threading.Event()

    def trainer():
        data = np.random.default_rng(1)
        while not stop.is_set():
            train(model, data, 1)

    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        for k in range(5):
            save_checkpoint(tmp_path / "org.ckpt", model, state={"k": k})
            assert load_checkpoint(tmp_path / "org.ckpt").state == {"k": k}
    finally:
        stop.set()
        thread.join()
    save_checkpoint(tmp_path / "org.ckpt", model)
    assert_same_model(model, load_checkpoint(tmp_path / "org.ckpt").model)


# --------------------------------------------------------------------------------------------- the original's JSON format

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "anchor-small"  # see fixtures/README.md


def test_original_export_reproduces_the_original_file(tmp_path):
    """import(fixture) then export gives back the fixture's object: every cfg key, token, merge,
    matrix (tied wte stored twice), alpha and snapshot row, each float exactly."""
    original = json.loads((FIXTURE / "checkpoint.json").read_text())
    model, tok = load_original_checkpoint(FIXTURE / "checkpoint.json")
    save_original_checkpoint(tmp_path / "out.json", model, tok)
    exported = json.loads((tmp_path / "out.json").read_text())
    assert list(exported) == list(original)
    assert list(exported["cfg"]) == list(original["cfg"]) and exported["cfg"] == original["cfg"]
    assert list(exported["base"]) == list(original["base"])
    assert exported == original


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tied", [True, False])
def test_original_export_then_import_gives_identical_logits(tmp_path, dtype, tied):
    model, tok = organism(dtype)  # BPE mode, two delta modules, a grown vocabulary
    if not tied:
        untied = mg.Model(small_config(tie_embeddings=False), model.vocab_size, dtype=dtype, seed=5)
        untied.add_delta_module(alpha=0.4)
        train(untied, np.random.default_rng(2), 3)
        model = untied
    path = tmp_path / "orig.json"
    save_original_checkpoint(path, model, tok)
    back, back_tok = load_original_checkpoint(path, dtype=dtype)
    assert back.config == model.config and back.vocab_size == model.vocab_size
    assert back.delta_alphas == model.delta_alphas
    assert back.init_embed_snapshot.tobytes() == model.init_embed_snapshot.tobytes()
    for name, arr in model.params().items():
        assert back.params()[name].tobytes() == arr.tobytes(), name
    # trainable flags are not part of the original format (it decides freezing itself); a frozen
    # module may be computed differently (folded into its base matrix), so restore them first
    for group, flag in model.trainable.items():
        back.set_trainable(group, flag)
    for line in CORPUS:
        ids = tok.encode(line)
        assert back_tok.encode(line) == ids
        assert back.logits(ids[:12]).tobytes() == model.logits(ids[:12]).tobytes()


def test_original_export_refuses_what_the_original_cannot_hold(tmp_path):
    path = tmp_path / "orig.json"
    model, tok = organism()
    silu = mg.Model(small_config(mlp_activation="silu"), tok.vocab_size)
    with pytest.raises(CheckpointError) as info:
        save_original_checkpoint(path, silu, tok)
    assert str(info.value) == f"{path}: not exported: the original only has the relu MLP, this model uses mlp_activation='silu'"
    with pytest.raises(CheckpointError, match="the original format needs the tokenizer"):
        save_original_checkpoint(path, model, None)
    with_bytes = EvolvingTokenizer(CORPUS)  # byte tokens right after the specials, inside the model's rows
    grown = mg.Model(small_config(), with_bytes.vocab_size)
    with pytest.raises(CheckpointError) as info:
        save_original_checkpoint(path, grown, with_bytes)
    first_byte = with_bytes.to_dict()["token_kinds"].index("b")
    assert str(info.value) == (
        f"{path}: not exported: token {first_byte} ({with_bytes.tokens[first_byte]!r}) is a byte-fallback token, which "
        f"the original format cannot represent; an organism meant for export needs a tokenizer built with "
        f"byte_fallback=False")
    small = mg.Model(small_config(), tok.vocab_size - 2)  # merged tokens the model has no rows for
    with pytest.raises(CheckpointError, match=rf"has no row in the model yet; grow the model to the tokenizer first "
                                              rf"\(model.grow_vocab\({tok.vocab_size}\)\)"):
        save_original_checkpoint(path, small, tok)
    assert not path.exists()
