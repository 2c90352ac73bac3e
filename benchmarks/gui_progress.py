"""Where a fit in the napari widget spends time the console fit does not: the GUI thread.

Usage (needs a display; the viewer is shown, as a user's is):

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/gui_progress.py --steps 60

Fits the offline backbone on the immunohistochemistry sample (nine 256 px tiles, as the demo)
twice with the same seed (after a one-step warm-up fit): once with ``StegoModel.fit`` and a
no-op progress callback, once through the Fit tab of the napari-stego panel. For the GUI fit
it counts the progress signals and the updates drawn (status label, napari progress bar; at
most ~10 a second per stage since the relay's throttle), times the drawing in the main
thread and reports its share of the fit's wall time. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_stego import StegoModel
    from napari_stego._widgets import _common
    from napari_stego._widgets._panel import StegoPanel
    from napari_stego.samples import immunohistochemistry
    from napari_stego.train import TrainConfig

    image = immunohistochemistry()
    tiles = np.stack([image[y:y + 256, x:x + 256] for y in (0, 128, 256) for x in (0, 128, 256)])

    StegoModel.fit(list(tiles[:1]), 3, backbone="efficientnet_lite0", seed=0, device="cpu",
                   train=TrainConfig(steps=1))  # warm-up: imports, first backbone load
    t0 = time.perf_counter()
    StegoModel.fit(list(tiles), 3, backbone="efficientnet_lite0", seed=0, device="cpu",
                   train=TrainConfig(steps=args.steps), progress=lambda *a, **k: None)
    console_s = time.perf_counter() - t0

    slot = {"calls": 0, "draws": 0, "seconds": 0.0}
    relay = _common.ProgressRelay
    update, draw = relay._update, relay._draw

    def counted(self, *a):
        slot["calls"] += 1
        return update(self, *a)

    def timed(self, *a):  # every drawn update, at once or after the throttle's interval
        t = time.perf_counter()
        try:
            return draw(self, *a)
        finally:
            slot["draws"] += 1
            slot["seconds"] += time.perf_counter() - t

    relay._update, relay._draw = counted, timed
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 1024)
    viewer.add_image(tiles, name="ihc tiles", rgb=True)
    panel = StegoPanel(viewer)
    viewer.window.add_dock_widget(panel, name="napari-stego", area="right")
    fit = panel.fit
    fit.backbone.value, fit.n_clusters.value, fit.steps.value = "efficientnet_lite0", 3, args.steps
    fit.device.value = "cpu"
    app = QApplication.instance()
    t0 = time.perf_counter()
    job = fit.fit()
    while not job.finished:
        app.processEvents()
        time.sleep(0.005)
    gui_s = time.perf_counter() - t0
    assert job.error is None, job.error
    viewer.close()
    print(json.dumps({
        "benchmark": "gui_progress", "steps": args.steps, "machine": platform.processor()
        or platform.machine(), "console_fit_s": round(console_s, 1), "gui_fit_s": round(gui_s, 1),
        "gui_over_console": round(gui_s / console_s, 2), "progress_signals": slot["calls"],
        "progress_draws": slot["draws"], "progress_draw_s": round(slot["seconds"], 2),
        "progress_draw_share_of_gui_fit": round(slot["seconds"] / gui_s, 3),
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
