"""Take the screenshots of the napari-stego widgets shown in README.md and docs/plugin.md.

Run under a (virtual) display, from the repository root:

    xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshots.py

Everything is offline (the sample images and the ``efficientnet_lite0`` backbone) and runs
on the CPU in a few minutes. The PNGs go to ``docs/images/`` (palette PNGs, < 300 KB).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent / "images"
SIZE = (1500, 900)
MAX_BYTES = 300_000


def wait_for(app, cond, timeout=900.0):
    t0 = time.time()
    while not cond():
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout:
            raise TimeoutError("the job did not finish")


def settle(app, seconds=0.6):
    t0 = time.time()
    while time.time() - t0 < seconds:
        app.processEvents()
        time.sleep(0.02)


def save(viewer, app, name: str) -> Path:
    """Grab the whole window, store it as a palette PNG under the size limit."""
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from PIL import Image

    viewer.window._qt_window.resize(*SIZE)
    for toast in viewer.window._qt_window.findChildren(NapariQtNotification):
        toast.close()  # pictures of the widgets, not of passing messages
    settle(app)
    img = viewer.screenshot(canvas_only=False, flash=False)
    pil = Image.fromarray(np.asarray(img)[..., :3])
    path = OUT / f"{name}.png"
    for colours, scale in ((256, 1.0), (128, 1.0), (128, 0.85), (64, 0.75)):
        out = pil if scale == 1.0 else pil.resize((int(pil.width * scale), int(pil.height * scale)),
                                                  Image.LANCZOS)
        out.quantize(colors=colours, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
        if path.stat().st_size < MAX_BYTES:
            break
    print(f"{path} {path.stat().st_size // 1024} KB")
    return path


def _class_colours(image, labels) -> None:
    """Print each cluster's share and mean hematoxylin / DAB stain (skimage's colour
    deconvolution), to describe the segment pictures in docs/plugin.md."""
    from skimage.color import rgb2hed

    hed = rgb2hed(image)
    for k in np.unique(labels):
        m = labels == k
        print(f"cluster {k}: {m.mean():.1%} of the image, hematoxylin {hed[..., 0][m].mean():.4f}, "
              f"DAB {hed[..., 2][m].mean():.4f}, mean RGB {image[m].mean(0).round().tolist()}")


def new_viewer(napari, title):
    viewer = napari.Viewer(title=title)
    viewer.window._qt_window.resize(*SIZE)
    return viewer


def main() -> int:
    import os
    import tempfile

    # a throw-away napari settings file: no toasts in the pictures, the user's settings untouched
    os.environ["NAPARI_CONFIG"] = os.path.join(tempfile.mkdtemp(), "settings.yaml")
    import napari
    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"
    from qtpy.QtWidgets import QApplication

    from napari_stego._widgets import model_store

    OUT.mkdir(parents=True, exist_ok=True)
    app = QApplication.instance() or QApplication(sys.argv)

    # 1. Fit STEGO on the immunohistochemistry sample (K = 3, the demo's 150 steps, up-sample
    # 2 for the small nuclei; appearance on, the default), caught while training
    viewer = new_viewer(napari, "napari-stego: Fit STEGO")
    viewer.open_sample("napari-stego", "immunohistochemistry")
    _, fit = viewer.window.add_plugin_dock_widget("napari-stego", "Fit STEGO")
    fit.backbone.value = "efficientnet_lite0"
    fit.n_clusters.value, fit.steps.value, fit.upsample.value = 3, 150, 2
    fit._fold.expand(animate=False)
    job = fit.fit()
    wait_for(app, lambda: job.progress.stage == "train" and job.progress.done >= 40)
    save(viewer, app, "fit")
    wait_for(app, lambda: job.finished)
    model = fit.model
    assert model is not None, job.error
    save(viewer, app, "fit_summary")  # cluster shares and the loss curve of the fit
    print(f"fit: cluster shares {model.info.get('cluster_shares')}, appearance weight "
          f"{model.info.get('appearance', {}).get('weight')}")

    # 2. Segment: clusters and CRF layers over the image
    _, seg = viewer.window.add_plugin_dock_widget("napari-stego", "Segment")
    viewer.window.remove_dock_widget(fit.native)
    seg.crf.value = True
    seg._fold.expand(animate=False)
    job = seg.segment()
    wait_for(app, lambda: job.finished)
    viewer.layers["immunohistochemistry clusters"].opacity = 0.5
    viewer.layers["immunohistochemistry CRF"].visible = False
    save(viewer, app, "segment")
    _class_colours(viewer.layers["immunohistochemistry"].data,
                   viewer.layers["immunohistochemistry clusters"].data)
    viewer.layers["immunohistochemistry clusters"].visible = False
    viewer.layers["immunohistochemistry CRF"].visible = True
    viewer.layers["immunohistochemistry CRF"].opacity = 0.6
    save(viewer, app, "segment_crf")
    viewer.close()

    # 3. Feature correspondences on the texture stack, before any fitting
    viewer = new_viewer(napari, "napari-stego: Feature correspondences")
    viewer.open_sample("napari-stego", "texture_stack")
    viewer.layers["texture classes (ground truth)"].visible = False
    _, cor = viewer.window.add_plugin_dock_widget("napari-stego", "Feature correspondences")
    cor.image.value = viewer.layers["texture mosaics"]
    cor.source.value = "efficientnet_lite0"
    cor.neighbours.value = 3
    cor.pick()
    viewer.dims.set_current_step(0, 1)
    viewer.layers["texture mosaics query"].add([1, 60, 40])
    wait_for(app, lambda: cor.job is not None and cor.job.finished)
    save(viewer, app, "correspondences")

    # 4. Evaluate: fit on the stack, segment, score against the ground truth
    _, fit = viewer.window.add_plugin_dock_widget("napari-stego", "Fit STEGO")
    fit.picker.layers.value = [viewer.layers["texture mosaics"]]
    fit.backbone.value = "efficientnet_lite0"
    fit.n_clusters.value, fit.steps.value, fit.batch_size.value = 3, 100, 8
    job = fit.fit()
    wait_for(app, lambda: job.finished)
    assert model_store(viewer).model is not None, job.error
    _, seg = viewer.window.add_plugin_dock_widget("napari-stego", "Segment")
    seg.picker.layers.value = [viewer.layers["texture mosaics"]]
    job = seg.segment()
    wait_for(app, lambda: job.finished)
    for widget in (fit, seg, cor):
        viewer.window.remove_dock_widget(widget.native)
    for layer in list(viewer.layers):
        if layer.name.endswith(("similarity", "query")):
            viewer.layers.remove(layer)
    _, ev = viewer.window.add_plugin_dock_widget("napari-stego", "Evaluate")
    ev.gt.value = viewer.layers["texture classes (ground truth)"]
    ev.pred.value = viewer.layers["texture mosaics clusters"]
    ev.matched.value = True
    job = ev.evaluate()
    wait_for(app, lambda: job.finished)
    viewer.layers["texture classes (ground truth)"].visible = False
    viewer.layers["texture mosaics clusters"].visible = False
    viewer.layers["texture mosaics clusters matched"].opacity = 0.45
    save(viewer, app, "evaluate")
    print(f"scores: mIoU {ev.scores['miou']:.1f}%, accuracy {ev.scores['accuracy']:.1f}%")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
