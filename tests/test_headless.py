"""The core install (no napari extra) works: the package, the model, the CLI and the demo run
in a process where napari, Qt and the widget toolkit cannot be imported."""

import os
import subprocess
import sys

BLOCKED = ("napari", "magicgui", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "npe2",
           "vispy", "superqt", "app_model")

BLOCKER = f"""
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def run_blocked(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", BLOCKER + code], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)


def test_the_blocker_blocks(tmp_path):
    out = run_blocked("import napari\n", tmp_path)
    assert out.returncode != 0 and "blocked by the test" in out.stderr


def test_cli_help_demo_and_model_run_without_napari(tmp_path):
    code = """
import contextlib, io, sys
import numpy as np
import napari_stego
from napari_stego import StegoModel, StegoError
from napari_stego.cli import main

buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    try:
        main(["--help"])
    except SystemExit as exc:
        assert exc.code == 0, exc.code
assert "demo" in buf.getvalue()

assert main(["demo", "--out", "demo", "--steps", "2", "--quiet"]) == 0
model = StegoModel.load("demo/ihc.stego")
image = np.random.default_rng(0).random((64, 80, 3)).astype(np.float32)
assert model.predict(image).shape == (64, 80)
assert model.predict_proba(image).shape == (model.n_clusters, 64, 80)
gui = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print("GUI MODULES", gui)
""" % (BLOCKED,)
    out = run_blocked(code, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GUI MODULES []" in out.stdout
    for name in ("ihc.stego", "ihc_labels.tif", "ihc_overlay.png"):
        assert (tmp_path / "demo" / name).is_file()


def test_core_dependencies_leave_out_the_gui():
    """pyproject: napari, magicgui, npe2 and a Qt binding only come with the napari extra,
    which the `all` and `test` extras include."""
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    core = " ".join(meta["dependencies"]).lower()
    for name in ("napari", "magicgui", "npe2", "pyqt", "pyside", "vispy"):
        assert name not in core, name
    extras = meta["optional-dependencies"]
    gui = " ".join(extras["napari"]).lower()
    assert "napari[pyqt5]" in gui and "magicgui" in gui and "npe2" in gui
    assert any("[napari" in d for d in extras["all"]) and "crf" in " ".join(extras["all"])
    assert any("[napari" in d for d in extras["test"]) and "pytest-qt" in extras["test"]
