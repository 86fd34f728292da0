"""The built wheel installs into a fresh virtualenv and runs with no compiler on PATH: the
API trains a model and the `molecule-gpt` console script generates text."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SMOKE = textwrap.dedent("""
    import numpy as np, molecule_gpt as mg
    model = mg.Model(mg.Config(n_layer=1, n_embd=16, n_head=2, head_types=("content", "hybrid"),
                               block_size=8, batch_size=2), 20, seed=0)
    batch = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    first = model.train_step(batch, 0.01)
    for _ in range(20):
        last = model.train_step(batch, 0.01)
    assert np.isfinite(last) and last < first, (first, last)
    print("ok", mg.__file__)
""")


@pytest.mark.skipif(not (ROOT / "setup.py").exists(), reason="needs the source tree")
def test_wheel_installs_into_fresh_venv_without_compiler(tmp_path):
    wheels = tmp_path / "wheels"
    # the suite may run with PYTHONPATH=src: pip must see neither that tree nor our variables
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MOLECULE_GPT"))}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(wheels), str(ROOT)],
                           capture_output=True, text=True, timeout=900, env=clean)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    wheel = next(wheels.glob("molecule_gpt-*.whl"))
    names = subprocess.run([sys.executable, "-m", "zipfile", "-l", str(wheel)], capture_output=True, text=True).stdout
    assert "_core" in names and ".pyx" not in names and ".c " not in names
    # the chat page of `molecule-gpt serve` ships whole: it loads nothing from elsewhere
    for page_file in ("index.html", "app.js", "style.css"):
        assert f"molecule_gpt/web/{page_file}" in names, page_file

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    install = subprocess.run([str(py), "-m", "pip", "install", str(wheel)], capture_output=True, text=True,
                             timeout=900, env=clean)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]

    # no compiler reachable: PATH holds only the venv, and CC points nowhere
    env = {k: v for k, v in clean.items() if not k.startswith(("CC", "CXX"))}
    env.update(PATH=str(venv / "bin"), CC="/nonexistent/cc", CXX="/nonexistent/c++")
    assert shutil.which("gcc", path=env["PATH"]) is None
    run = subprocess.run([str(py), "-c", SMOKE], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert str(venv) in run.stdout  # imported from the venv, not the source tree

    # the console script: a newborn organism speaks from the seed corpus statistics
    script = venv / "bin" / "molecule-gpt"
    gen = subprocess.run([str(script), "--home", str(tmp_path / "home"), "generate", "hello", "--seed", "1"],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert gen.returncode == 0, gen.stdout + gen.stderr
    assert gen.stdout.strip() and "Traceback" not in gen.stderr
