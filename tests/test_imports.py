"""The core imports without napari or Qt; the package root imports without torch."""

import subprocess
import sys

CORE = ["backbones", "batch", "cache", "choose_k", "cli", "cluster", "crf", "device", "errors",
        "evaluate", "features", "figures", "head", "io", "knn", "labels", "lazy", "loss",
        "metrics", "model", "ngff", "predict", "refine", "samples", "segment", "shifts", "tiling",
        "train"]


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_core_modules_import_without_napari_or_qt():
    code = ("import importlib, sys\n"
            f"for m in {CORE!r}:\n    importlib.import_module('napari_stego.' + m)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt5', 'PySide2', 'PySide6', 'magicgui', 'vispy')))")
    assert run(code).strip() == "[]"


def test_package_root_is_light():
    code = ("import sys, napari_stego\n"
            "print('torch' in sys.modules, napari_stego.__version__)\n"
            "from napari_stego import StegoModel, StegoError, segment_files\n"
            "print(StegoModel.__name__)")
    first, second = run(code).split("\n")[:2]
    assert first.startswith("False")
    assert second == "StegoModel"
