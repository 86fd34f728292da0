"""Build the Cython extensions of molecule_gpt.

Every `src/molecule_gpt/*.pyx` becomes the extension `molecule_gpt.<stem>`; C sources it needs
from `csrc/` are listed in C_SOURCES. Directives are set once, here.

Environment switches (all off by default, so wheels are portable and results match the
reference bit for bit):
  MOLECULE_GPT_DEBUG_CYTHON=1   boundscheck on, -O0 -g
  MOLECULE_GPT_NATIVE=1         -march=native
  MOLECULE_GPT_FAST_MATH=1      -ffast-math
  MOLECULE_GPT_ONLY=_core,_bpe  build only these extensions (development convenience)
  MOLECULE_GPT_SANITIZE=1       AddressSanitizer + UndefinedBehaviorSanitizer (gcc/clang):
                                -fsanitize=address,undefined,float-cast-overflow -fno-wrapv
                                -fno-omit-frame-pointer -g -O1 on compile and link. Python is
                                not instrumented, so the runtimes must be preloaded to import
                                it (see .ci/sanitize). It builds under build/sanitize/ and
                                always from scratch, so no object is shared with a normal build
                                (after `build_ext --inplace` with it, rebuild with --force)
"""
import os
import pathlib

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).parent
PKG = ROOT / "src" / "molecule_gpt"
DEBUG = os.environ.get("MOLECULE_GPT_DEBUG_CYTHON", "0") == "1"
SANITIZE = os.environ.get("MOLECULE_GPT_SANITIZE", "0") == "1"
# float-cast-overflow (a float out of an integer's range converted to it) is UB that gcc leaves
# out of `undefined`; -fno-wrapv undoes the -fwrapv of Python's CFLAGS, which makes signed
# overflow defined and so switches UBSan's check of it off (a wrapped index is a bug here)
SANITIZE_FLAGS = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-wrapv", "-fno-omit-frame-pointer", "-g"]

DIRECTIVES = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": False,
    "initializedcheck": DEBUG,
    "nonecheck": False,
    "cdivision": True,
    "embedsignature": True,
}

# extension stem -> C files from csrc/ compiled into it
C_SOURCES = {
    "_core": ["csrc/arena.c", "csrc/pool.c"],
    "_decode": ["csrc/pool.c"],
}


def compile_args():
    # -fno-math-errno: sqrt/exp need not set errno; -fno-trapping-math: compares may be executed
    # speculatively (nothing here enables FP traps). Both let branchy loops (clamps, relu) become
    # vectorized selects and neither changes any computed value, unlike -ffast-math.
    # -fopenmp-simd: honour `omp simd` pragmas (csrc/rows.h) even in a build without OpenMP
    args = ["-O0", "-g"] if DEBUG else ["-O3", "-fno-math-errno", "-fno-trapping-math"]
    if SANITIZE:
        # -O1 (last -O wins): keeps reports close to the source and the run fast enough for CI
        args += SANITIZE_FLAGS + ([] if DEBUG else ["-O1"])
    args.append("-fopenmp-simd")
    if os.environ.get("MOLECULE_GPT_NATIVE", "0") == "1":
        args.append("-march=native")
    if os.environ.get("MOLECULE_GPT_FAST_MATH", "0") == "1":
        args.append("-ffast-math")
    return args


def extensions():
    exts = []
    only = {s for s in os.environ.get("MOLECULE_GPT_ONLY", "").split(",") if s}
    for pyx in sorted(PKG.glob("*.pyx")):
        stem = pyx.stem
        if only and stem not in only:
            continue
        sources = [str(pyx.relative_to(ROOT))] + C_SOURCES.get(stem, [])
        exts.append(
            Extension(
                f"molecule_gpt.{stem}",
                sources,
                include_dirs=["csrc", numpy.get_include()],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_9_API_VERSION")],
                extra_compile_args=compile_args(),
                extra_link_args=SANITIZE_FLAGS if SANITIZE else [],
            )
        )
    return exts


class BuildExt(build_ext):
    """build_ext that never reuses an object built with other flags under MOLECULE_GPT_SANITIZE.
    No OpenMP runtime is linked: threads come from csrc/pool.c; `omp simd` needs only
    -fopenmp-simd (compile_args)."""

    def finalize_options(self):
        super().finalize_options()
        if SANITIZE:
            # build_ext skips extensions whose output is newer than their sources: never reuse
            # an object or library built with other flags (an in-place build shares src/)
            self.force = True


setup(
    ext_modules=cythonize(extensions(), compiler_directives=DIRECTIVES),
    cmdclass={"build_ext": BuildExt},
    # a sanitized build keeps its objects and libraries apart from the normal build's build/lib*
    options={"build": {"build_base": "build/sanitize"}} if SANITIZE else {},
)
