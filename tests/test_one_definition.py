"""Invariants of the native layer's structure (issue 13): each code, each op and each size is
defined in one place, and every path that needs it reads that one definition."""
import pathlib
import re

import pytest

from molecule_gpt import _core, _decode

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "molecule_gpt"
CSRC = ROOT / "csrc"


def native_sources():
    """(path, text) of every hand-written native source: csrc/ and the Cython files."""
    files = sorted(CSRC.glob("*.[ch]")) + sorted(SRC.glob("*.pyx")) + sorted(SRC.glob("*.pxi")) + sorted(SRC.glob("*.pxd"))
    return [(f, f.read_text()) for f in files]


def test_codes_are_the_same_tables_in_both_extensions():
    assert _core.HEAD_TYPES == _decode.HEAD_TYPES == {"content": 0, "rrpram": 1, "hybrid": 2}
    assert _core.ACTIVATIONS == _decode.ACTIVATIONS == {"relu": 0, "silu": 1}
    assert set(_core.OP_CODES) == {"embed", "rmsnorm", "linear", "rope", "attention", "gate", "add",
                                   "cross_entropy"}
    assert len(set(_core.OP_CODES.values())) == len(_core.OP_CODES)


def test_codes_are_defined_once():
    """The head-type, activation and op codes have one definition (csrc/codes.h); no other file
    gives them a value, compares a head type with a bare number or maps names to codes itself."""
    definition = re.compile(r"\b(MG_)?(HEAD_(CONTENT|RRPRAM|HYBRID)|ACT_(RELU|SILU)|OP_[A-Z]+)\b\s*=\s*\d")
    define = re.compile(r"#define\s+MG_(HEAD|ACT|OP)_")
    bare_kind = re.compile(r"\bkind\s*[!=]=\s*\d")
    name_map = re.compile(r"""["'](content|rrpram|hybrid)["']\s*:\s*\d""")
    fused = re.compile(r"ctypedef\s+fused\s+floating")
    where = {"definition": [], "fused floating": []}
    for path, text in native_sources():
        if definition.search(text) or define.search(text):
            where["definition"].append(path.name)
        if fused.search(text):
            where["fused floating"].append(path.name)
        assert not bare_kind.search(text), f"{path.name} compares a head type with a bare number"
        assert not name_map.search(text), f"{path.name} maps head-type names to codes itself"
    assert where["definition"] == ["codes.h"]
    assert where["fused floating"] == ["_molecule.pxd"]


def test_decoder_cimports_the_shared_declarations():
    """_decode.pyx declares none of the shared C headers itself: it cimports _molecule.pxd."""
    text = (SRC / "_decode.pyx").read_text()
    for header in ("fastmath.h", "rows.h", "codes.h", "elementwise.h"):
        assert f'cdef extern from "{header}"' not in text
    assert "from ._molecule cimport" in text


def test_unknown_codes_are_named():
    with pytest.raises(ValueError, match="unknown head type 'sideways'"):
        _core.Engine(1, 8, 2, 4, 10, ["content", "sideways"], "relu", False, 2)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        _core.Engine(1, 8, 2, 4, 10, ["content", "content"], "gelu", False, 2)
