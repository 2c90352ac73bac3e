"""The napari widgets end to end with the offline backbone, under a (virtual) display.

Run with ``xvfb-run -a python -m pytest tests/test_widgets.py``. Images are tiny (three
64 px slices) and training runs a handful of steps, so the file takes about a minute on
two CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_stego._widgets import (  # noqa: E402
    CorrespondenceWidget,
    EvaluateWidget,
    FitWidget,
    SegmentWidget,
    model_store,
)
from napari_stego._widgets._layers import layer_source  # noqa: E402
from napari_stego.errors import StegoError  # noqa: E402

pytestmark = pytest.mark.gui

WAIT_MS = 240_000


@pytest.fixture(scope="module")
def stack():
    from napari_stego.samples import texture_mosaics

    images, labels = texture_mosaics(n=3, size=64, seed=1)
    return images, labels


@pytest.fixture(scope="module")
def fitted(stack, offline_backbone):
    """A model fitted through the core (the GUI fit has its own test)."""
    from napari_stego import StegoModel
    from napari_stego.train import TrainConfig

    return StegoModel.fit(stack[0], 3, backbone=offline_backbone,
                          train=TrainConfig(steps=8, batch_size=4), seed=0)


@pytest.fixture
def viewer(make_napari_viewer, stack):
    v = make_napari_viewer()
    v.add_image(stack[0], name="tex")
    v.add_labels(stack[1] + 1, name="truth")
    return v


def wait(qtbot, widget, timeout=WAIT_MS):
    qtbot.waitUntil(lambda: not widget.busy, timeout=timeout)
    return widget.job


def run(qtbot, start, *args):
    """Start a widget's job (``start`` is e.g. ``seg.segment``), wait, check it succeeded."""
    job = start(*args)
    assert job is not None, "the job did not start"
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    assert job.error is None, job.error
    return job


def errors_shown():
    from napari.utils.notifications import notification_manager

    return [str(r.message) for r in notification_manager.records
            if str(getattr(r, "severity", "")).lower().endswith("error")]


# --------------------------------------------------------------------------- building
def test_widgets_dock_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for name, cls in (("Fit STEGO", FitWidget), ("Segment", SegmentWidget),
                      ("Feature correspondences", CorrespondenceWidget),
                      ("Evaluate", EvaluateWidget)):
        _dock, widget = viewer.window.add_plugin_dock_widget("napari-stego", name)
        assert isinstance(widget, cls)
    docked = viewer.window.dock_widgets
    fit = next(w for w in docked.values() if isinstance(w, FitWidget))
    seg = next(w for w in docked.values() if isinstance(w, SegmentWidget))
    assert fit.store is seg.store is model_store(viewer)  # one model per viewer


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-stego", "texture_stack")
    viewer.open_sample("napari-stego", "immunohistochemistry")
    viewer.open_sample("napari-stego", "hubble_deep_field")
    names = [layer.name for layer in viewer.layers]
    assert names == ["texture mosaics", "texture classes (ground truth)", "immunohistochemistry",
                     "hubble deep field"]
    assert viewer.layers["immunohistochemistry"].rgb
    truth = viewer.layers["texture classes (ground truth)"].data
    assert truth.min() == 1 and truth.max() == 3  # 0 stays "unlabelled"


# ------------------------------------------------------------------------------- fit
def test_fit_in_the_gui_then_segment_evaluate_save_load(viewer, qtbot, tmp_path):
    fit, seg, ev = FitWidget(viewer), SegmentWidget(viewer), EvaluateWidget(viewer)
    assert fit.picker.layers.value == [viewer.layers["tex"]]
    fit.backbone.value = "efficientnet_lite0"
    fit.n_clusters.value, fit.steps.value, fit.batch_size.value = 3, 4, 2
    fit.tile_size.value, fit.upsample.value = 512, 2
    stages, losses = [], []
    job = fit.fit()
    job.progress._changed.connect(lambda s, d, t, loss: (stages.append(s), losses.append(loss)))
    assert fit.cancel_button.enabled and not fit.run_button.enabled
    wait(qtbot, fit)
    assert job.error is None, job.error
    assert fit.model is not None and fit.model.n_clusters == 3
    assert fit.model.tile_config.tile == 512
    assert fit.model.feature_config.upsample == 2 and fit.model.backbone.stride == 4
    assert {"features", "train", "cluster"} <= set(stages)
    assert any(loss is not None for loss in losses)  # the loss is shown live while training
    assert fit.run_button.enabled and not fit.cancel_button.enabled and fit.save_button.enabled
    assert "efficientnet_lite0" in seg.model_label.value  # shared with the Segment widget

    n_layers = len(viewer.layers)
    run(qtbot, seg.segment)
    clusters = viewer.layers["tex clusters"]
    assert len(viewer.layers) == n_layers + 1
    assert clusters.data.shape == (3, 64, 64) and clusters.data.dtype == np.uint8
    assert clusters.data.min() >= 1 and clusters.data.max() <= 3  # cluster id + 1, all done
    meta = clusters.metadata["napari_stego"]
    assert meta["model"]["backbone"] == "efficientnet_lite0" and meta["model"]["n_clusters"] == 3
    assert meta["crf"] is None and meta["complete"] is True and meta["label_offset"] == 1
    expected = fit.model.predict(viewer.layers["tex"].data[1]) + 1
    np.testing.assert_array_equal(clusters.data[1], expected)

    clusters.name = "renamed by the user"  # re-running updates the layer it made
    run(qtbot, seg.segment)
    assert len(viewer.layers) == n_layers + 1 and viewer.layers[-1] is clusters

    ev.gt.value, ev.pred.value = viewer.layers["truth"], clusters
    run(qtbot, ev.evaluate)
    scores = ev.scores
    assert scores["confusion"].shape == (3, 3) and scores["pixels"] == 3 * 64 * 64
    assert 0 <= scores["miou"] <= 100 and "mIoU" in ev.summary.value
    assert ev.table.rowCount() == 3 and ev.table.columnCount() == 3

    path = fit.save_model(tmp_path / "tex.stego")
    assert path.is_file()
    before = fit.model
    run(qtbot, seg.load_model, path)
    assert fit.model is not before and "loaded from tex.stego" in fit.model_label.value
    image = viewer.layers["tex"].data[2]
    np.testing.assert_array_equal(fit.model.predict(image), before.predict(image))


def test_cancel_fit_keeps_nothing_and_the_gui_responsive(viewer, qtbot):
    from qtpy.QtCore import QTimer

    fit = FitWidget(viewer)
    fit.backbone.value = "efficientnet_lite0"
    fit.steps.value, fit.batch_size.value = 5000, 2
    layers = [layer.name for layer in viewer.layers]
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(1))
    timer.start(20)
    job = fit.fit()
    qtbot.waitUntil(lambda: job.progress.stage == "train" and job.progress.done >= 1,
                    timeout=WAIT_MS)
    n_ticks = len(ticks)
    qtbot.wait(300)
    assert len(ticks) > n_ticks + 3  # the event loop kept running during training
    # progress is drawn in the tool's own bar; napari's animated "in progress" indicator (it
    # starts with any napari progress bar) stays off: each of its frames recomposed the whole
    # window through OpenGL, which halved the speed of a fit under software OpenGL
    from qtpy.QtGui import QMovie

    indicator = viewer.window._qt_window._activity_dialog._toggleButton._inProgressIndicator
    assert indicator.movie().state() != QMovie.Running
    bar = fit.progress_bar
    assert not bar.isHidden() and bar.maximum() == 5000 and 1 <= bar.value() <= 5000
    fit.cancel_button.clicked.emit()  # as a click
    qtbot.waitUntil(lambda: job.finished, timeout=60_000)
    timer.stop()
    from napari_stego.errors import Cancelled

    assert isinstance(job.error, Cancelled)
    assert job.progress.done < 5000
    assert fit.model is None and model_store(viewer).model is None
    assert [layer.name for layer in viewer.layers] == layers
    assert fit.run_button.enabled and not fit.cancel_button.enabled
    assert fit.status.value == "cancelled" and fit.progress_bar.isHidden()
    fit.n_clusters.value = 5  # still usable
    assert fit.n_clusters.value == 5


def test_user_mistakes_become_notifications(viewer, qtbot, monkeypatch):
    from napari_stego._widgets import _layers

    shown = []
    monkeypatch.setattr("napari.utils.notifications.show_error", shown.append)
    seg = SegmentWidget(viewer)
    assert seg.segment() is None and "no model yet" in shown[-1]
    fit = FitWidget(viewer)
    fit.picker.layers.value = []
    assert fit.fit() is None and "no image layer chosen" in shown[-1]
    with pytest.raises(StegoError, match="Labels layer: choose an Image layer"):
        layer_source(viewer.layers["truth"])
    fit.picker.layers.value = [viewer.layers["tex"]]
    fit.picker.as_channels.value = True
    with pytest.raises(StegoError, match="2 or 3 grey layers"):
        _layers.channel_source([viewer.layers["tex"]])

    fit.backbone.value = "dino_vits8"  # weights missing offline -> how to get them
    fit.weights.value = "/nonexistent/dino.pth"
    fit.steps.value = 1
    job = fit.fit()
    wait(qtbot, fit)
    assert isinstance(job.error, StegoError) and "does not exist" in shown[-1]
    assert fit.model is None and fit.run_button.enabled


# --------------------------------------------------------------------------- segment
def test_segment_stack_current_slice_first_with_crf(viewer, qtbot, fitted):
    model_store(viewer).set(fitted, "test")
    seg = SegmentWidget(viewer)
    viewer.dims.set_current_step(0, 2)
    seg.crf.value = True
    seg.crf_iterations.value = 3
    order = []
    job = seg.segment()
    job.worker.yielded.connect(lambda item: order.append(item[1]))
    wait(qtbot, seg)
    assert job.error is None, job.error
    assert order == [(2,), (1,), (0,)]
    crf = viewer.layers["tex CRF"]
    assert crf.data.shape == (3, 64, 64) and crf.data.dtype == np.uint8
    assert crf.data.min() >= 1 and crf.data.max() <= 3
    assert crf.metadata["napari_stego"]["crf"]["iterations"] == 3

    seg.slices.value = "shown slice only"
    seg.crf.value = False
    viewer.dims.set_current_step(0, 1)
    run(qtbot, seg.segment)
    clusters = viewer.layers["tex clusters"]
    assert clusters.data[1].min() >= 1 and clusters.data[0].max() == 0  # others not done
    assert clusters.metadata["napari_stego"]["complete"] is False


def test_segment_small_rgb_and_channel_layers(make_napari_viewer, qtbot, fitted):
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    viewer.add_image(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), name="tiny rgb",
                     rgb=True)  # napari guesses "stack" for so small an image
    viewer.add_image(rng.random((40, 36)).astype(np.float32), name="a", scale=(2, 2))
    viewer.add_image(rng.integers(0, 4000, (40, 36), dtype=np.uint16), name="b", scale=(2, 2))
    model_store(viewer).set(fitted)
    seg = SegmentWidget(viewer)
    seg.picker.layers.value = [viewer.layers["tiny rgb"]]
    run(qtbot, seg.segment)
    tiny = viewer.layers["tiny rgb clusters"]
    assert tiny.data.shape == (20, 30) and tiny.data.dtype == np.uint8 and tiny.data.min() >= 1
    seg.picker.layers.value = [viewer.layers["a"], viewer.layers["b"]]
    seg.picker.as_channels.value = True
    run(qtbot, seg.segment)
    both = viewer.layers["a+b clusters"]
    assert both.data.shape == (40, 36) and tuple(both.scale) == (2, 2)
    assert both.metadata["napari_stego"]["source"] == ["a", "b"]


# -------------------------------------------------------------------- correspondences
def test_correspondences_before_fitting_and_with_codes(viewer, qtbot, fitted):
    cor = CorrespondenceWidget(viewer)
    cor.image.value = viewer.layers["tex"]
    cor.source.value = "efficientnet_lite0"
    cor.neighbours.value = 3
    cor.pick()
    query = viewer.layers["tex query"]
    assert viewer.layers.selection.active is query and query.mode == "add"
    query.add([1, 40, 12])  # what a click does
    wait(qtbot, cor)
    sim = viewer.layers["tex similarity"]
    assert sim.data.shape == (3, 64, 64) and sim.data.dtype == np.float32
    here = sim.data[1]  # a point is (nearly) most similar to itself
    assert here[40, 12] >= np.percentile(here, 90)
    assert cor.last["index"] == (1,)
    assert sorted(i for i, _ in cor.last["neighbours"]) == [(0,), (2,)]  # the other slices
    assert cor.neighbour_list.count() == 2
    assert viewer.layers[-1] is query  # the point stays visible on top
    cor._go_to(cor.neighbour_list.item(0))
    assert viewer.dims.current_step[0] == cor.last["neighbours"][0][0][0]

    query.add([2, 5, 5])  # a second click replaces the point
    wait(qtbot, cor)
    assert len(query.data) == 1 and cor.last["index"] == (2,)

    model_store(viewer).set(fitted)
    cor.source.value = "codes"
    cor.neighbours.value = 0
    run(qtbot, cor.query, (0, 10, 50))
    assert sim.metadata["napari_stego"]["compare"] == "STEGO codes"
    here = sim.data[0]
    assert here[10, 50] >= np.percentile(here, 90)
    assert len(viewer.layers) == 4


def test_correspondences_on_a_2d_rgb_image(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[:, 32:] = (200, 40, 40)  # two flat halves
    viewer.add_image(rgb, name="halves", rgb=True)
    cor = CorrespondenceWidget(viewer)
    cor.source.value = "efficientnet_lite0"
    run(qtbot, cor.query, (20, 50))
    sim = viewer.layers["halves similarity"].data
    assert sim.shape == (48, 64) and cor.neighbour_list.count() == 0
    assert sim[:, 40:].mean() > sim[:, :24].mean()  # the clicked half is the similar one


def test_evaluate_arrays_counts_and_refuses_mismatches():
    from napari_stego._widgets import evaluate_arrays

    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 0]])
    pred = np.array([[2, 2, 1, 1], [2, 2, 1, 0]])  # cluster ids + 1, 0 = not segmented
    scores = evaluate_arrays(pred, gt, pred_offset=1, gt_zero_unlabelled=True)
    assert scores["pixels"] == 7 and scores["accuracy"] == 100.0 and scores["miou"] == 100.0
    assert list(scores["class_values"]) == [1, 2] and list(scores["cluster_values"]) == [1, 2]
    with pytest.raises(StegoError, match="differs"):
        evaluate_arrays(pred[:, :3], gt, pred_offset=1, gt_zero_unlabelled=True)
    with pytest.raises(StegoError, match="no pixel"):
        evaluate_arrays(np.zeros_like(pred), gt, pred_offset=1, gt_zero_unlabelled=True)


def test_similarity_helpers_on_a_known_grid():
    import torch

    from napari_stego.similarity import (
        descriptor,
        grid_cell,
        nearest,
        query_vector,
        similarity_map,
    )

    fmap = torch.zeros(2, 4, 4)
    fmap[0, :, :2] = 1  # left half points one way, right half the other
    fmap[1, :, 2:] = 1
    # a 32 x 32 image (min_side 32: no up-sampling), stride 8: pixel (5, 27) is cell (0, 3)
    assert grid_cell((5, 27), (32, 32), (4, 4), 8, 32) == (0, 3)
    q = query_vector(fmap, (5, 27), (32, 32), 8, 32)
    sim = similarity_map(fmap, q, (32, 32), 8, 32)
    assert sim.shape == (32, 32) and sim.dtype == np.float32
    assert np.allclose(sim[:, 20:], 1) and np.allclose(sim[:, :12], 0)
    left = fmap.clone()
    left[1] = 0  # only the first feature: further from the query slice than a scaled copy
    descs = {(0,): descriptor(fmap), (1,): descriptor(left), (2,): descriptor(fmap * 2)}
    near = nearest(descs[(0,)], descs, 2, exclude=(0,))
    assert [k for k, _ in near] == [(2,), (1,)] and near[0][1] > near[1][1]
