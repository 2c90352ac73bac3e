"""The npe2 manifest: valid, and every ``python_name`` resolves (no Qt event loop needed)."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys

import pytest

npe2 = pytest.importorskip("npe2")


@pytest.fixture(scope="module")
def manifest():
    return npe2.PluginManifest.from_distribution("napari-stego")


def test_every_python_name_imports(manifest):
    assert manifest.contributions.commands
    for command in manifest.contributions.commands:
        module, _, attr = command.python_name.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        assert callable(obj), command.python_name


def test_contributions(manifest):
    c = manifest.contributions
    widgets = {w.display_name for w in c.widgets}
    assert widgets == {"napari-stego", "Fit STEGO", "Segment", "Feature correspondences",
                       "Evaluate", "Suggest number of clusters"}
    assert c.widgets[0].display_name == "napari-stego"  # the tabbed panel comes first
    assert {s.key for s in c.sample_data} == {"immunohistochemistry", "hubble_deep_field",
                                              "texture_stack"}
    assert c.readers[0].filename_patterns[0] == "*.tif"
    assert c.writers[0].layer_types == ["labels"]
    segment_menu = [item.command for item in c.menus["napari/layers/segment"]]
    assert segment_menu == [w.command for w in c.widgets]  # every widget, in Layers > Segment


def test_npe2_validate():
    exe = shutil.which("npe2")
    cmd = [exe] if exe else [sys.executable, "-m", "npe2"]
    result = subprocess.run([*cmd, "validate", "napari-stego"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout
