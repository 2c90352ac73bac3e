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


def test_fit_shows_cluster_shares_and_loss_curve_in_the_theme(make_napari_viewer, qtbot):
    from matplotlib.colors import to_hex

    from napari_stego._widgets._panel import StegoPanel
    from napari_stego._widgets._plots import theme_colours
    from napari_stego.samples import texture_mosaics

    viewer = make_napari_viewer()
    images, _ = texture_mosaics(n=2, size=64, seed=1)
    viewer.add_image(images, name="tex")
    panel = StegoPanel(viewer)
    fit = panel.fit
    assert not fit.summary_canvas.isVisible() and fit.summary.value == ""
    fit.backbone.value = "efficientnet_lite0"
    fit.n_clusters.value, fit.steps.value, fit.batch_size.value = 3, 6, 2
    job = fit.fit()
    qtbot.waitUntil(lambda: job.finished, timeout=240_000)
    assert job.error is None, job.error
    info = fit.model.info
    assert len(info["cluster_shares"]) == 3 and abs(sum(info["cluster_shares"]) - 1) < 1e-3
    assert 1 <= len(info["loss_curve"]) <= 6
    assert "final loss" not in fit.status.value and "K = 3" in fit.status.value
    # the Labels layers' ids 1..K, not 0-based indices
    assert fit.summary.value.startswith("cluster shares of the training pixels: 1: ")
    bars, curve = fit.summary_figure.axes
    assert len(bars.patches) == 3 and len(curve.lines) == 1
    assert [t.get_text() for t in bars.get_xticklabels()] == ["1", "2", "3"]
    dark = theme_colours(viewer)["background"]
    assert to_hex(fit.summary_figure.get_facecolor()) == dark.lower()
    assert to_hex(panel.suggest.figure.get_facecolor()) == dark.lower()
    viewer.theme = "light" if viewer.theme != "light" else "dark"
    light = theme_colours(viewer)["background"]
    assert light != dark
    for fig in (fit.summary_figure, panel.suggest.figure):  # restyled with the theme
        assert to_hex(fig.get_facecolor()) == light.lower()


def test_missing_weights_advice_is_whole_and_in_the_widgets_words(make_napari_viewer, qtbot,
                                                                  monkeypatch):
    """Offline without cached DINO weights: the Fit tab shows the fix first, naming its own
    field, and the whole advice (it was cut at 200 characters before the fix)."""
    import napari_stego.backbones as backbones
    from napari_stego._widgets import FitWidget

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr(backbones, "weights_location", lambda name: None)  # nothing cached
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((64, 64)), name="img")
    fit = FitWidget(viewer)
    fit.backbone.value = "dino_vits8"
    job = fit.fit()
    qtbot.waitUntil(lambda: job.finished, timeout=120_000)
    assert job.error is not None
    status = fit.status.value
    assert status.startswith("failed: Give a local weights file with the 'weights file' field "
                             "of Fit STEGO"), status
    assert status.endswith("which needs no download.") and "weights=" not in status
    assert "napari-stego weights download dino_vits8" in status
