"""The napari-stego panel: five tools as tabs of one dock that fits a 1280 x 1024 screen.

The screenshot goes to the test's temporary folder, or to ``$NAPARI_STEGO_SCREENSHOT_DIR``
when set (``NAPARI_STEGO_SCREENSHOT_DIR=docs/images`` refreshes ``docs/images/panel.png``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

pytestmark = pytest.mark.gui

SCREEN = (1280, 1024)


def test_panel_has_five_tabs_and_fits_a_1280x1024_screen(make_napari_viewer, qtbot, tmp_path):
    from qtpy.QtWidgets import QApplication

    from napari_stego import DEFAULT_N_CLUSTERS
    from napari_stego._widgets import FitWidget, model_store
    from napari_stego._widgets._panel import StegoPanel

    viewer = make_napari_viewer(show=True)
    viewer.open_sample("napari-stego", "immunohistochemistry")
    dock, panel = viewer.window.add_plugin_dock_widget("napari-stego", "napari-stego")
    assert isinstance(panel, StegoPanel)
    titles = [panel.tabs.tabText(i) for i in range(panel.tabs.count())]
    assert titles == ["Fit", "Segment", "Explore", "Evaluate", "Suggest K"]
    assert isinstance(panel.fit, FitWidget) and panel.fit.n_clusters.value == DEFAULT_N_CLUSTERS
    assert panel.fit.store is panel.segment.store is panel.suggest.store is model_store(viewer)
    for tool in (panel.fit, panel.segment, panel.explore, panel.evaluate, panel.suggest):
        fold = getattr(tool, "_fold", None)
        if fold is not None:
            fold.expand(animate=False)  # every section open
    window = viewer.window._qt_window
    window.showNormal()
    window.resize(*SCREEN)
    heights = {}
    for i, title in enumerate(titles):
        panel.tabs.setCurrentIndex(i)
        qtbot.wait(150)
        QApplication.processEvents()
        heights[title] = panel.tabs.currentWidget().widget().sizeHint().height()
    panel.show_tab("Fit")
    qtbot.wait(300)
    assert window.height() <= SCREEN[1] and window.width() <= SCREEN[0]
    assert dock.height() <= SCREEN[1]
    assert panel.minimumSizeHint().height() < 400, panel.minimumSizeHint()  # tabs scroll
    canvas = viewer.window._qt_viewer.canvas.native
    assert canvas.height() >= 0.6 * window.height(), (canvas.height(), heights)
    assert dock.width() <= 400 and canvas.width() >= 0.4 * window.width(), canvas.width()
    out = Path(os.environ.get("NAPARI_STEGO_SCREENSHOT_DIR") or tmp_path)
    shot = np.asarray(viewer.screenshot(canvas_only=False, flash=False))
    assert shot.shape[0] <= SCREEN[1] and shot.shape[1] <= SCREEN[0]
    from imageio.v3 import imwrite

    imwrite(out / "panel.png", shot[..., :3])
    assert (out / "panel.png").stat().st_size > 10_000
