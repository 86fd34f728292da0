"""EvolvingTokenizer through its public API: design.md §1 behaviour, §8.2 losslessness, the original
checkpoint's ids, growth events, serialization, streaming decode, bad input.

Expected values come from the fixture (ids the original computed) or from the pure-Python
references in tests/bpe_reference.py, never from the code under test.
Hypothesis examples per property: MOLECULE_GPT_HYPOTHESIS_EXAMPLES (default 150).
"""
import contextlib
import json
import os
import pathlib
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bpe_reference import OriginalTokenizer, ReferenceTokenizer
from molecule_gpt.config import Config
from molecule_gpt.errors import TokenizerError
from molecule_gpt.tokenizer import (EOW, EvolvingTokenizer, StreamDecoder, TokenizerUpdate, _PyCore,
                                    read_corpus)

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "anchor-small"  # see fixtures/README.md
EXAMPLES = int(os.environ.get("MOLECULE_GPT_HYPOTHESIS_EXAMPLES", "150"))
HYP = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# any code point: astral, combining marks, controls, lone surrogates, unassigned, whitespace
ANY_TEXT = st.text(st.characters(codec=None, exclude_categories=()), max_size=60)
SPACES = "".join(chr(c) for c in range(0x3001) if chr(c).isspace())
TRICKY = st.lists(st.sampled_from(list(SPACES) + ["a", "é", "e\u0301", "\u0000", "\x7f", "😀", "👩\u200d👩",
                                                   "\ud800", "\udfff", "\ud83d", "\ude00", "</w>", "<BOS>",
                                                   "\U0010ffff", "\ufffd", "ß", "ǅ"]), max_size=40).map("".join)


def fixture_lines():
    return (FIXTURE / "corpus.txt").read_text(encoding="utf-8").splitlines()


def doc_lines():
    """English prose that ships with Python: the docstrings of a few stdlib modules."""
    import collections, json as json_mod, re, string, textwrap, argparse, pathlib as pl
    out = []
    for mod in (collections, json_mod, re, string, textwrap, argparse, pl):
        out += [ln for ln in (mod.__doc__ or "").splitlines() if ln.strip()]
    return out


def collapse(s):
    return " ".join(s.split())


@pytest.fixture(scope="module")
def char_tok():
    return EvolvingTokenizer(fixture_lines())


@pytest.fixture(scope="module")
def bpe_tok():
    tok = EvolvingTokenizer(doc_lines())
    tok.train_bpe(doc_lines(), 200)
    return tok


# ----------------------------------------------------------------------------------------------
# the original checkpoint's ids


def test_fixture_probe_ids_char_mode():
    ck = json.loads((FIXTURE / "checkpoint.json").read_text())
    expected = json.loads((FIXTURE / "expected.json").read_text())
    for byte_fallback in (True, False):
        tok = EvolvingTokenizer.from_original(ck["tokenizer"], byte_fallback=byte_fallback)
        assert tok.tokens[:len(ck["tokenizer"]["tokens"])] == ck["tokenizer"]["tokens"]
        for text, ids in zip(expected["probe_texts"], expected["ids"]):
            assert tok.encode(text) == ids
            assert tok.decode(ids) == collapse(text)
    exact = EvolvingTokenizer.from_original(ck["tokenizer"], byte_fallback=False)
    assert exact.vocab_size == len(ck["tokenizer"]["tokens"])


def test_birth_matches_original():
    lines = doc_lines()
    orig = OriginalTokenizer(lines)
    tok = EvolvingTokenizer(lines)
    n = len(orig.tokens)
    assert tok.tokens[:n] == orig.tokens
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (orig.stoi["<PAD>"], orig.stoi["<BOS>"], orig.stoi["<EOS>"])
    assert tok.trained_chars == orig.trained_chars
    assert not tok.bpe_enabled
    for line in lines[:50]:
        assert tok.encode(line) == orig.encode(line)


def _original_with_history():
    """An original tokenizer that trained, then retrained on text with characters it never had
    (so its vocabulary holds stale tokens and merges over unknown characters)."""
    lines = doc_lines()
    orig = OriginalTokenizer(lines)
    orig.train_bpe(lines, 150)
    more = lines[::2] + ["Café naïve résumé — déjà vu, 😀 emoji here.", "Ünïcödé wörds wörds wörds."] * 5
    orig.train_bpe(more, 150)
    return orig, lines


@pytest.mark.parametrize("byte_fallback", [False, True])
def test_from_original_bpe_mode_matches_original_ids(byte_fallback):
    orig, lines = _original_with_history()
    tok = EvolvingTokenizer.from_original(orig.checkpoint_object(), byte_fallback=byte_fallback)
    assert tok.bpe_enabled
    assert tok.tokens[:len(orig.tokens)] == orig.tokens
    rng = random.Random(0)
    known = sorted(set("".join(lines)))
    probes = lines[:80] + [" ".join(rng.sample(lines, 3)) for _ in range(20)]
    probes += ["".join(rng.choice(known) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    for s in probes:
        assert tok.encode(s) == orig.encode(s), s


@HYP
@given(st.data())
def test_from_original_bpe_mode_property(data):
    orig, lines = _ORIG_HISTORY
    known = sorted(set("".join(lines)) | {" ", "\n", "\t"})
    s = data.draw(st.text(st.sampled_from(known), max_size=80))
    assert _FROM_ORIG.encode(s) == orig.encode(s)


_ORIG_HISTORY = _original_with_history()
_FROM_ORIG = EvolvingTokenizer.from_original(_ORIG_HISTORY[0].checkpoint_object())


def test_retraining_an_imported_original_picks_the_original_merges():
    """Same tie rule as the original: exact vocabulary import, retrain both on the same text
    of known characters, get the same merges and the same new tokens at the same ids."""
    orig, lines = _original_with_history()
    tok = EvolvingTokenizer.from_original(orig.checkpoint_object(), byte_fallback=False)
    corpus = lines[1::2] * 2 + lines[:40]
    orig.train_bpe(corpus, 300)
    update = tok.train_bpe(corpus, 300)
    assert tok.merge_strings() == [list(p) for p in orig.merges]
    assert tok.tokens == orig.tokens
    assert update.new_vocab_size == len(orig.tokens)


def test_from_original_rejects_malformed():
    ck = json.loads((FIXTURE / "checkpoint.json").read_text())["tokenizer"]
    with pytest.raises(TypeError, match="dict"):
        EvolvingTokenizer.from_original(["a"])
    with pytest.raises(TokenizerError, match="<BOS>"):
        EvolvingTokenizer.from_original({**ck, "tokens": [t for t in ck["tokens"] if t != "<BOS>"]})
    with pytest.raises(TokenizerError, match="single character"):
        EvolvingTokenizer.from_original({**ck, "tokens": ["ab"] + ck["tokens"]})
    with pytest.raises(TokenizerError, match="pair of strings"):
        EvolvingTokenizer.from_original({**ck, "merges": [["a"]]})
    with pytest.raises(TypeError, match="unexpected keyword"):
        EvolvingTokenizer.from_original(ck, bpe_num_merge=3)


# ----------------------------------------------------------------------------------------------
# nothing is dropped (§8.2)


@HYP
@given(ANY_TEXT)
def test_roundtrip_any_unicode_char_mode(s):
    assert _CHAR.decode(_CHAR.encode(s)) == collapse(s)


@HYP
@given(ANY_TEXT)
def test_roundtrip_any_unicode_bpe_mode(s):
    assert _BPE.decode(_BPE.encode(s)) == collapse(s)


@HYP
@given(TRICKY)
def test_roundtrip_whitespace_surrogates_combining(s):
    for tok in (_CHAR, _BPE, _BYTE_BPE):
        assert tok.decode(tok.encode(s)) == collapse(s)


_CHAR = EvolvingTokenizer(fixture_lines())
_BPE = EvolvingTokenizer(doc_lines())
_BPE.train_bpe(doc_lines(), 200)
# a tokenizer whose merges include byte tokens (learned from text its alphabet lacks)
_BYTE_BPE = EvolvingTokenizer(fixture_lines())
_BYTE_BPE.train_bpe(fixture_lines() + ["😀😀 über ünter 😀 naïve 👩\u200d👩 e\u0301 \ud800x"] * 8, 120)


@HYP
@given(ANY_TEXT)
def test_encode_matches_reference_design(s):
    for tok, ref in ((_CHAR, _REF_CHAR), (_BYTE_BPE, _REF_BYTE_BPE)):
        assert tok.encode(s) == ref.encode(s)


_REF_CHAR = ReferenceTokenizer(fixture_lines())
_REF_BYTE_BPE = ReferenceTokenizer(fixture_lines())
_REF_BYTE_BPE.train_bpe(fixture_lines() + ["😀😀 über ünter 😀 naïve 👩\u200d👩 e\u0301 \ud800x"] * 8, 120)


def test_byte_tokens_appended_after_specials_and_learned():
    tok = EvolvingTokenizer(["abc"])
    ref = ReferenceTokenizer(["abc"])
    assert tok.tokens == ref.tokens
    assert tok.tokens[:6] == ["\n", "a", "b", "c", "<PAD>", "<BOS>"]
    assert "<0x61>" not in tok.tokens and "<0x64>" in tok.tokens and "<0xC0>" not in tok.tokens
    ids = tok.encode("é")
    assert [tok.tokens[i] for i in ids[1:-1]] == ["<0xC3>", "<0xA9>"]
    tok.train_bpe(["é é é é b"], 3)
    merged = tok.encode("é")[1:-1]
    assert len(merged) == 1 and tok.token_bytes(merged[0]) == "é".encode()
    assert tok.tokens[merged[0]] == "é</w>"


def test_literal_end_marker_text_survives():
    tok = EvolvingTokenizer(["a </w> b"])
    tok.train_bpe(["a </w> b </w> c</w>"] * 4, 20)
    assert tok.decode(tok.encode("x</w> </w>")) == "x</w> </w>"


def test_no_byte_fallback_raises_instead_of_dropping():
    ck = json.loads((FIXTURE / "checkpoint.json").read_text())["tokenizer"]
    tok = EvolvingTokenizer.from_original(ck, byte_fallback=False)
    with pytest.raises(TokenizerError, match="enable_byte_fallback"):
        tok.encode("the café")
    with pytest.raises(TokenizerError, match="enable_byte_fallback"):
        tok.train_bpe(["zzz"], 2)
    update = tok.enable_byte_fallback()
    assert update == TokenizerUpdate("byte_fallback", 34, update.new_vocab_size, 0) and update.grew
    assert tok.enable_byte_fallback() is None
    assert tok.decode(tok.encode("the café")) == "the café"


# ----------------------------------------------------------------------------------------------
# decode and the streaming decoder


def test_decode_skips_bos_pad_and_stops_at_eos(char_tok):
    t = char_tok
    ids = [t.bos_id, t.pad_id] + t.encode("river")[1:-1] + [t.pad_id, t.eos_id] + t.encode("rain")[1:-1]
    assert t.decode(ids) == "river"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        t.decode([t.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        t.decode([-1])
    with pytest.raises(TypeError):
        t.decode("river")
    with pytest.raises(TypeError):
        t.decode([1.5])


def _stream(tok, ids):
    dec = tok.stream_decoder()
    pieces = [dec.feed(i) for i in ids]
    return pieces, pieces + [dec.flush()]


@HYP
@given(ANY_TEXT)
def test_stream_decoder_equals_decode_on_encoded_text(s):
    for tok in (_CHAR, _BYTE_BPE):
        ids = tok.encode(s)
        pieces, all_pieces = _stream(tok, ids)
        assert "".join(all_pieces) == tok.decode(ids)
        if "\ufffd" not in s:
            assert not any("\ufffd" in p for p in pieces)   # never a partial character


@HYP
@given(st.lists(st.integers(0, 10_000), max_size=60))
def test_stream_decoder_equals_decode_on_any_ids(raw):
    tok = _BYTE_BPE
    ids = [i % tok.vocab_size for i in raw]
    assert "".join(_stream(tok, ids)[1]) == tok.decode(ids)


@HYP
@given(st.lists(st.lists(st.integers(0, 10_000), max_size=12), max_size=8))
def test_stream_decoder_feeds_many_as_one_at_a_time(chunks):
    """feed_many(ids) returns what feed() returns for each id in turn, concatenated, and leaves
    the decoder in the same state (pieces split inside a character, whitespace runs, <EOS>,
    <BOS>/<PAD> included)."""
    for tok in (_CHAR, _BYTE_BPE):
        chunks_ids = [[i % tok.vocab_size for i in c] for c in chunks]
        one, many = tok.stream_decoder(), tok.stream_decoder()
        for c in chunks_ids:
            assert many.feed_many(c) == "".join(one.feed(i) for i in c)
            assert many.done == one.done
        assert many.flush() == one.flush()
    dec = _BYTE_BPE.stream_decoder()
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        dec.feed_many([_BYTE_BPE.encode("river")[1], _BYTE_BPE.vocab_size])
    assert dec.feed_many(_BYTE_BPE.encode("river")[1:-1]) + dec.flush() == "river"  # nothing was fed


def test_stream_decoder_holds_partial_utf8():
    tok = EvolvingTokenizer(["a b"])
    ids = tok.encode("a 😀 b")[1:-1]
    dec = tok.stream_decoder()
    out = [dec.feed(i) for i in ids]
    assert out == ["a", "", "", "", "", " 😀", "", " b"]    # the space waits for what follows
    assert dec.flush() == ""
    assert isinstance(dec, StreamDecoder)
    # an unfinished character at the end becomes U+FFFD on flush, as decode() does
    assert dec.feed(tok.encode("😀")[1]) == ""
    assert dec.flush() == "\ufffd" == tok.decode(tok.encode("😀")[1:2])
    # after <EOS> nothing more is emitted
    assert dec.feed(tok.eos_id) == "" and dec.feed(ids[0]) == ""


# ----------------------------------------------------------------------------------------------
# growth events and thresholds


def test_maybe_enable_and_retrain_follow_thresholds():
    lines = doc_lines()
    total = sum(len(x) for x in lines)
    tok = EvolvingTokenizer(lines[:5], enable_bpe_after_chars=total, bpe_num_merges=40, bpe_retrain_every_chars=500)
    assert tok.maybe_retrain_bpe(lines) is None            # not in BPE mode yet
    assert tok.maybe_enable_bpe(lines[:-1]) is None        # one line short of the threshold
    before = list(tok.tokens)
    update = tok.maybe_enable_bpe(lines)
    assert update.event == "enable_bpe" and update.num_merges == 40 and update.grew
    assert update.old_vocab_size == len(before) and update.new_vocab_size == tok.vocab_size
    assert tok.bpe_enabled and tok.trained_chars == total
    assert tok.tokens[:len(before)] == before
    assert tok.maybe_enable_bpe(lines) is None             # only once
    extra = ["x" * 499]
    assert tok.maybe_retrain_bpe(lines + extra) is None    # 499 new characters < 500
    before = list(tok.tokens)
    update = tok.maybe_retrain_bpe(lines + ["x" * 500])
    assert update is not None and update.event == "retrain_bpe"
    assert tok.tokens[:len(before)] == before              # grow-only


def test_thresholds_from_config():
    cfg = Config(enable_bpe_after_chars=10, bpe_num_merges=5, bpe_retrain_every_chars=7)
    tok = EvolvingTokenizer(["hello world"], cfg)
    assert (tok.enable_bpe_after_chars, tok.bpe_num_merges, tok.bpe_retrain_every_chars) == (10, 5, 7)
    assert tok.maybe_enable_bpe(["hello world"]).num_merges == 5
    tok2 = EvolvingTokenizer(["x"], cfg, bpe_num_merges=3)
    assert tok2.bpe_num_merges == 3
    with pytest.raises(TokenizerError, match="bpe_num_merges"):
        EvolvingTokenizer(["x"], bpe_num_merges=-1)
    with pytest.raises(TypeError, match="Config"):
        EvolvingTokenizer(["x"], {"bpe_num_merges": 3})


def test_vocabulary_only_grows_across_retrains():
    rng = random.Random(1)
    lines = doc_lines()
    tok = EvolvingTokenizer(lines[:20])
    history = [list(tok.tokens)]
    encoded = {}
    for round_ in range(5):
        corpus = rng.sample(lines, 60) + ["ñandú 😀 " * round_]
        tok.train_bpe(corpus, 60)
        assert tok.tokens[:len(history[-1])] == history[-1]
        history.append(list(tok.tokens))
        for s in corpus[:5]:
            ids = tok.encode(s)
            assert max(ids) < tok.vocab_size
            assert tok.decode(ids) == collapse(s)
            encoded[s] = ids
    # ids from earlier rounds still decode to the same text
    for s, ids in encoded.items():
        assert tok.decode(ids) == collapse(s)


def test_retrain_reuses_existing_tokens():
    lines = doc_lines()
    tok = EvolvingTokenizer(lines)
    first = tok.train_bpe(lines, 100)
    again = tok.train_bpe(lines, 100)
    assert first.grew and not again.grew
    assert again.new_vocab_size == first.new_vocab_size


# ----------------------------------------------------------------------------------------------
# serialization


def test_to_dict_from_dict_lossless(bpe_tok):
    for tok in (bpe_tok, _BYTE_BPE, _CHAR, _FROM_ORIG):
        d = json.loads(json.dumps(tok.to_dict()))
        back = EvolvingTokenizer.from_dict(d)
        assert back.to_dict() == tok.to_dict()
        assert back.tokens == tok.tokens and back.merges == tok.merges
        for s in doc_lines()[:20] + ["😀 é \ud800 </w>"]:
            assert back.encode(s) == tok.encode(s)
        # the restored tokenizer keeps learning the same way
        a, b = EvolvingTokenizer.from_dict(d), EvolvingTokenizer.from_dict(d)
        a.train_bpe(doc_lines()[::3], 30)
        b.train_bpe(doc_lines()[::3], 30)
        assert a.to_dict() == b.to_dict()


def test_from_dict_rejects_bad_input(bpe_tok):
    d = bpe_tok.to_dict()
    with pytest.raises(TokenizerError, match="from_original"):
        EvolvingTokenizer.from_dict({"tokens": []})
    with pytest.raises(TokenizerError, match="format_version"):
        EvolvingTokenizer.from_dict({**d, "format_version": 99})
    with pytest.raises(TokenizerError, match="corrupt"):
        EvolvingTokenizer.from_dict({k: v for k, v in d.items() if k != "merges"})
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        EvolvingTokenizer.from_dict({**d, "merges": d["merges"] + [[0, 1, 10 ** 6]]})
    with pytest.raises(TokenizerError, match="differ in length"):
        EvolvingTokenizer.from_dict({**d, "token_kinds": d["token_kinds"][:-1]})



_FROM_ORIG_EXACT = EvolvingTokenizer.from_original(_ORIG_HISTORY[0].checkpoint_object(), byte_fallback=False)
_DOCS = [t.to_dict() for t in (_BPE, _BYTE_BPE, _FROM_ORIG, _FROM_ORIG_EXACT, _CHAR)]

def test_from_dict_rejects_inconsistent_documents(bpe_tok):
    """Each fault to_dict() cannot write is a TokenizerError naming it (it used to be a
    TypeError from the core, or a tokenizer whose round trips silently broke)."""
    d = bpe_tok.to_dict()
    n = len(d["tokens"])
    merged = next(i for i, k in enumerate(d["token_kinds"]) if k == "m" and i not in d["token_eow"])
    a, b, m = next(t for t in d["merges"] if t[1] != EOW)
    other = next(t[2] for t in d["merges"] if t[2] != m)

    def kinds(i, letter):
        return d["token_kinds"][:i] + letter + d["token_kinds"][i + 1:]
    cases = [
        ({"token_kinds": list(d["token_kinds"][:-1]) + [7]}, "'token_kinds' must be a str"),
        ({"token_kinds": kinds(merged, "c")}, "must be one character whose UTF-8 is its bytes"),
        ({"token_kinds": kinds(merged, "b")}, "must have exactly one byte"),
        ({"token_kinds": kinds(merged, "x")}, "unknown kind 'x'"),
        ({"token_kinds": kinds(bpe_tok.pad_id, "m")}, f"merged token {bpe_tok.pad_id} ('<PAD>') has no bytes"),
        ({"tokens": [t if i != bpe_tok.bos_id else "<PAD>" for i, t in enumerate(d["tokens"])]},
         "special token <PAD> exactly once, found 2"),
        ({"token_kinds": kinds(0, "s")}, "special token 0 must be <PAD>, <BOS> or <EOS>"),
        ({"tokens": d["tokens"][:-1] + [None]}, "'tokens' must be a list of str"),
        ({"token_bytes": d["token_bytes"][:merged] + ["zz"] + d["token_bytes"][merged + 1:]}, "are not hex"),
        ({"token_bytes": d["token_bytes"][:merged] + [d["token_bytes"][0]] + d["token_bytes"][merged + 1:]},
         f"tokens 0 and {merged} both spell"),
        ({"token_eow": d["token_eow"] + [0]}, "only merged tokens end a word"),
        ({"token_eow": d["token_eow"] + [n]}, "'token_eow' must be a list of token ids"),
        ({"merges": d["merges"] + [[a, b, other]]}, f"joining token {a} and token {b} gives"),
        ({"merges": d["merges"] + [[a, EOW, m]]}, "joining token"),
        ({"merges": d["merges"] + [[a, b]]}, "not a [left, right, merged] triple"),
        ({"merges": d["merges"] + [[a, True, m]]}, "not a [left, right, merged] triple"),
        ({"merges": d["merges"] + [[a, bpe_tok.bos_id, m]]}, "uses the special token <BOS>"),
        ({"merges": d["merges"] + [[a, b, 2 ** 63]]}, "outside the vocabulary"),
        ({"byte_fallback": 1}, "'byte_fallback' must be true or false"),
        ({"byte_fallback": False}, "byte_fallback is False but the vocabulary holds byte tokens"),
        ({"trained_chars": "12"}, "'trained_chars' must be a non-negative int"),
    ]
    for change, message in cases:
        with pytest.raises(TokenizerError, match=re.escape(message)):
            EvolvingTokenizer.from_dict({**d, **change})
    with pytest.raises(TokenizerError, match="byte_fallback is True but the vocabulary has no byte tokens"):
        EvolvingTokenizer.from_dict({**_FROM_ORIG_EXACT.to_dict(), "byte_fallback": True})
    # a byte tokenizer missing one of its byte tokens could not spell every character
    byte_doc = EvolvingTokenizer(["ab"]).to_dict()
    i = byte_doc["tokens"].index("<0xE9>")
    for key in ("tokens", "token_bytes"):
        byte_doc[key] = byte_doc[key][:i] + byte_doc[key][i + 1:]
    byte_doc["token_kinds"] = byte_doc["token_kinds"][:i] + byte_doc["token_kinds"][i + 1:]
    with pytest.raises(TokenizerError, match="no token spells the byte\\(s\\) 0xE9"):
        EvolvingTokenizer.from_dict(byte_doc)


def _mutate(doc: dict, data) -> dict:
    """One random corruption of a to_dict() document: an id of a merge, a token's bytes or kind,
    the end-of-word list, an element of a list field, a whole field, or a missing field."""
    d = json.loads(json.dumps(doc))
    n = len(d["tokens"])
    junk = st.sampled_from([None, -1, 0, 1, n, 2 ** 63, -2 ** 63 - 1, True, 1.5, "0", "", "c", "zz", [], {}, [1, 2]])
    index = st.integers(0, n - 1)
    how = data.draw(st.sampled_from(["merge", "bytes", "kind", "eow", "element", "field", "delete"]))
    if how == "merge" and d["merges"]:
        triple = d["merges"][data.draw(st.integers(0, len(d["merges"]) - 1))]
        triple[data.draw(st.integers(0, 2))] = data.draw(st.integers(-2, n + 1) | junk)
    elif how == "bytes":  # another token's bytes, any bytes, or not hex
        d["token_bytes"][data.draw(index)] = data.draw(
            st.sampled_from(d["token_bytes"]) | st.binary(max_size=4).map(bytes.hex) | junk)
    elif how == "kind":
        i, letter = data.draw(index), data.draw(st.sampled_from("csbmx") | junk)
        kinds = list(d["token_kinds"])
        kinds[i] = letter
        d["token_kinds"] = "".join(kinds) if isinstance(letter, str) and len(letter) == 1 and data.draw(st.booleans()) \
            else kinds
    elif how == "eow":
        if d["token_eow"] and data.draw(st.booleans()):
            d["token_eow"].remove(data.draw(st.sampled_from(d["token_eow"])))
        else:
            d["token_eow"].append(data.draw(st.integers(-1, n) | junk))
    elif how == "element":
        field = data.draw(st.sampled_from(["tokens", "token_bytes", "token_eow", "merges"]))
        if d[field]:
            i = data.draw(st.integers(0, len(d[field]) - 1))
            change = data.draw(st.sampled_from(["junk", "other", "drop"]))
            if change == "drop":
                del d[field][i]
            else:
                d[field][i] = data.draw(junk) if change == "junk" else data.draw(st.sampled_from(d[field]))
    elif how == "field":
        d[data.draw(st.sampled_from(sorted(d)))] = data.draw(junk | st.booleans() | st.integers(-3, 3))
    elif how == "delete":
        del d[data.draw(st.sampled_from(sorted(d)))]
    return d


def _roundtrip_strings(tok) -> list:
    """A few strings every loaded tokenizer must round-trip: any text when it has byte tokens,
    else text over its own characters (one word unless it has a space)."""
    if tok.byte_fallback:
        return ["the river runs", "naïve 😀 über \ud800", "  a  </w> <EOS>  "]
    chars = [t for t, k in zip(tok.tokens, tok.to_dict()["token_kinds"]) if k == "c" and not t.isspace()]
    words = ["".join(chars[:12]), "".join(chars[::-1][:7]), "".join(chars[3:5] * 3)]
    return words if " " not in tok.tokens else words + [" ".join(words)]




@contextlib.contextmanager
def _core(core):
    """New tokenizers get the compiled core (when built) or the pure-Python twin inside."""
    import molecule_gpt.tokenizer as module
    compiled = module._Core
    if core == "compiled" and compiled is None:
        pytest.skip("the compiled core is not built")
    module._Core = compiled if core == "compiled" else None
    try:
        yield
    finally:
        module._Core = compiled


@pytest.mark.parametrize("core", ["compiled", "pure-python"])
@settings(max_examples=max(EXAMPLES, 400), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_documents_load_consistently_or_raise_tokenizer_error(core, data):
    """Any corruption of a to_dict() document either loads to a tokenizer that round-trips or
    raises TokenizerError; never another exception (before: TypeError from the core), never a
    tokenizer whose merges spell other bytes (before: accepted, round trips broke)."""
    doc = _DOCS[data.draw(st.integers(0, len(_DOCS) - 1))]
    mutated = _mutate(doc, data)
    with _core(core):
        try:
            tok = EvolvingTokenizer.from_dict(mutated)
        except TokenizerError:
            return
    assert type(tok._core).__name__ == ("BPECore" if core == "compiled" else "_PyCore")
    for s in _roundtrip_strings(tok):
        assert tok.decode(tok.encode(s)) == collapse(s)
        assert "".join(_stream(tok, tok.encode(s))[1]) == collapse(s)


@pytest.mark.parametrize("pure_python", [False, True])
def test_decode_of_any_int_is_tokenizer_error(char_tok, pure_python):
    """Ids beyond a C long used to raise OverflowError from the compiled decode."""
    import numpy as np
    tok = EvolvingTokenizer.from_dict(char_tok.to_dict())
    if pure_python:
        tok._core = _PyCore()
        tok._sync_core()
    for bad in (2 ** 63, 2 ** 64, -2 ** 63 - 1, 10 ** 100, np.uint64(2 ** 63), -1, tok.vocab_size):
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            tok.decode([bad])
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            tok.decode(tok.encode("river")[:-1] + [bad])
        with pytest.raises(TokenizerError, match="outside the vocabulary"):
            tok.stream_decoder().feed(bad)
    assert tok.decode(tok.encode("river")) == "river"

def test_merge_strings_round_trip_through_from_original(bpe_tok):
    """Our state exported in the original's format imports back to the same ids."""
    obj = {"tokens": bpe_tok.tokens, "bpe_enabled": True, "merges": bpe_tok.merge_strings(),
           "trained_chars": bpe_tok.trained_chars}
    back = EvolvingTokenizer.from_original(obj, byte_fallback=False)
    for s in doc_lines()[:40]:
        assert back.encode(s) == bpe_tok.encode(s)


# ----------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok"], 3.5])
def test_encode_non_str_is_type_error_naming_the_type(char_tok, bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        char_tok.encode(bad)


def test_lines_must_be_list_of_str():
    with pytest.raises(TypeError, match="single str"):
        EvolvingTokenizer("just one string")
    with pytest.raises(TypeError, match=r"lines\[1\] must be str, got int"):
        EvolvingTokenizer(["a", 1])
    with pytest.raises(TypeError, match="list of str"):
        EvolvingTokenizer(5)
    tok = EvolvingTokenizer(["a"])
    with pytest.raises(TypeError, match="bytes"):
        tok.maybe_enable_bpe(b"abc")


def test_read_corpus_replaces_and_counts_invalid_bytes(tmp_path):
    p = tmp_path / "c.txt"
    p.write_bytes(b"caf\xc3\xa9 ok\n\xff\xfe bad\n\n  spaced  \nlone \xed\xa0\x80 surrogate\nkeep \xef\xbf\xbd\n")
    got = read_corpus(p)
    assert got.invalid_bytes == 2 + 3
    assert got.lines == ["café ok", "\ufffd\ufffd bad", "spaced", "lone \ufffd\ufffd\ufffd surrogate", "keep \ufffd"]
    assert read_corpus(p, max_line_chars=3).lines[0] == "caf"
    p.write_text("plain\nascii\n")
    assert read_corpus(p) == (["plain", "ascii"], 0)


def test_empty_and_whitespace_only(char_tok, bpe_tok):
    for tok in (char_tok, bpe_tok):
        assert tok.encode("") == [tok.bos_id, tok.eos_id]
        assert tok.encode(" \n\t\u3000 ") == [tok.bos_id, tok.eos_id]
        assert tok.decode([]) == ""
    empty = EvolvingTokenizer([])
    assert empty.tokens[:4] == ["\n", "<PAD>", "<BOS>", "<EOS>"]
    assert empty.decode(empty.encode(" hi there ")) == "hi there"


# ----------------------------------------------------------------------------------------------
# the pure-Python core gives the same results as the compiled one


def test_pure_python_core_agrees():
    lines = doc_lines()[:60] + ["😀 naïve \ud800 x"] * 3
    fast = EvolvingTokenizer(lines[:10])
    slow = EvolvingTokenizer(lines[:10])
    slow._core = _PyCore()
    slow._sync_core()
    assert fast.train_bpe(lines, 80) == slow.train_bpe(lines, 80)
    assert fast.merges == slow.merges and fast.tokens == slow.tokens
    for s in lines[:30] + ["", "  a  b  ", "😀😀😀"]:
        assert fast.encode(s) == slow.encode(s)
        assert fast.decode(fast.encode(s)) == slow.decode(slow.encode(s))
    with pytest.raises(TokenizerError):
        slow.decode([10 ** 6])


def test_repr_and_eow_constant(bpe_tok):
    assert "bpe, 200 merges" in repr(bpe_tok)
    assert EOW == -1
    assert any(b == EOW for _, b, _ in bpe_tok.merges)


def test_encode_decode_while_another_thread_retrains():
    """Growth swaps the core's tables between calls; concurrent encode/decode stay lossless."""
    import sys
    import threading
    lines = doc_lines()
    tok = EvolvingTokenizer(lines[:40])
    texts = lines[:60] + ["😀 naïve \ud800 déjà vu", "a" * 300]
    failures, stop = [], threading.Event()

    def worker(seed):
        rng = random.Random(seed)
        while not stop.is_set():
            s = rng.choice(texts)
            ids = tok.encode(s)
            out = tok.decode(ids)
            dec = tok.stream_decoder()
            streamed = "".join(dec.feed(i) for i in ids) + dec.flush()
            if out != collapse(s) or streamed != out:
                failures.append(s)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    try:
        for t in threads:
            t.start()
        rng = random.Random(9)
        for k in range(8):
            tok.train_bpe(rng.sample(lines, 80) + ["ñandú 😀"] * k, 40 + 10 * k)
    finally:
        stop.set()
        for t in threads:
            t.join()
        sys.setswitchinterval(old)
    assert failures == []


def _boundaries(tok, ids) -> set:
    """Byte offsets between consecutive tokens of an encoding (BOS/EOS left out)."""
    cuts, at = set(), 0
    for t in ids[1:-1]:
        at += len(tok._surface[t])
        cuts.add(at)
    return cuts


def test_extend_bpe_keeps_the_merges_and_only_joins_tokens():
    """Appended merges are learned on the current segmentation: the old merges keep their ranks
    and ids, every string encodes to the same text, and each new token boundary was one before
    (a new merge only joins neighbours). The pure-Python core learns the same merges."""
    old_text = doc_lines()[:80]
    new_text = [f"def handler_{i}(self, request): return self.render(request, 'page_{i}')" for i in range(60)]
    fast = EvolvingTokenizer(old_text)
    fast.train_bpe(old_text, 60)
    slow = EvolvingTokenizer.from_dict(fast.to_dict())
    slow._core = _PyCore()
    slow._sync_core()
    merges0, v0 = fast.merges, fast.vocab_size
    before = {s: fast.encode(s) for s in old_text[:40] + new_text[:20]}
    update = fast.extend_bpe(old_text + new_text, 24)
    assert update == slow.extend_bpe(old_text + new_text, 24)
    assert fast.merges == slow.merges and fast.tokens == slow.tokens
    assert update.event == "extend_bpe" and update.old_vocab_size == v0
    assert fast.merges[:len(merges0)] == merges0 and len(fast.merges) == len(merges0) + 24
    assert update.new_vocab_size == fast.vocab_size > v0 and update.num_merges == len(fast.merges)
    joined = 0
    for s, old_ids in before.items():
        ids = fast.encode(s)
        assert ids == slow.encode(s) and fast.decode(ids) == fast.decode(old_ids)
        assert len(ids) <= len(old_ids)
        cuts_new, cuts_old = _boundaries(fast, ids), _boundaries(fast, old_ids)
        assert cuts_new <= cuts_old
        joined += len(old_ids) - len(ids)
    assert joined > 0  # the new text's frequent pairs were merged
    assert fast.to_dict()["merges"] == [list(m) for m in fast.merges]
    assert EvolvingTokenizer.from_dict(fast.to_dict()).encode(new_text[0]) == fast.encode(new_text[0])


def test_extend_bpe_refuses_char_mode_and_bad_counts():
    tok = EvolvingTokenizer(doc_lines()[:20])
    with pytest.raises(TokenizerError, match="needs BPE mode"):
        tok.extend_bpe(doc_lines()[:20], 4)
    tok.train_bpe(doc_lines()[:20], 10)
    for bad in (-1, True, 2.0, "3"):
        with pytest.raises(TokenizerError, match="num_merges"):
            tok.extend_bpe(doc_lines()[:20], bad)
    assert len(tok.merges) == 10
    assert tok.extend_bpe(doc_lines()[:20], 0).num_merges == 10
