"""The *Suggest number of clusters* widget end to end with the offline backbone, under a
(virtual) display: ``xvfb-run -a python -m pytest tests/test_suggest_widget.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")
pytest.importorskip("matplotlib")

from napari_stego._widgets import model_store  # noqa: E402
from napari_stego._widgets._suggest import CURRENT_SLICE, SuggestKWidget  # noqa: E402

pytestmark = pytest.mark.gui

WAIT_MS = 240_000


@pytest.fixture(scope="module")
def stack():
    from napari_stego.samples import texture_mosaics

    images, _ = texture_mosaics(n=3, size=64, seed=1)
    return images


@pytest.fixture(scope="module")
def fitted(stack, offline_backbone):
    from napari_stego import StegoModel
    from napari_stego.train import TrainConfig

    return StegoModel.fit(stack, 3, backbone=offline_backbone,
                          train=TrainConfig(steps=4, batch_size=2), seed=0)


@pytest.fixture
def viewer(make_napari_viewer, stack):
    v = make_napari_viewer()
    v.add_image(stack, name="tex")
    return v


def errors_shown() -> list[str]:
    from napari.utils.notifications import notification_manager

    return [str(r.message) for r in notification_manager.records
            if str(getattr(r, "severity", "")).lower().endswith("error")]


def test_docks_from_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-stego",
                                                         "Suggest number of clusters")
    assert isinstance(widget, SuggestKWidget)
    assert widget.store is model_store(viewer)


def test_without_a_model_it_says_so(viewer):
    widget = SuggestKWidget(viewer)
    assert widget.suggest() is None
    assert any("no model yet" in e for e in errors_shown())


def test_scores_plot_and_progress(viewer, fitted, qtbot):
    from napari_stego.choose_k import suggest_for_model

    model_store(viewer).set(fitted, "test")
    widget = SuggestKWidget(viewer)
    assert widget.picker.layers.value == [viewer.layers["tex"]]
    assert "K=3" in widget.model_label.value
    widget.k_min.value, widget.k_max.value, widget.seeds.value = 2, 5, 2
    widget.max_points.value = 1000
    stages = []
    job = widget.suggest()
    assert job is not None
    job.progress._changed.connect(lambda s, d, t, loss: stages.append((s, d, t)))
    assert widget.cancel_button.enabled and not widget.run_button.enabled
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    assert job.error is None, job.error
    assert widget.run_button.enabled and not widget.cancel_button.enabled

    scores = widget.scores
    assert scores is not None and scores.k_values == [2, 3, 4, 5] and scores.current == 3
    # the same computation through the core gives the same scores (the widget adds nothing)
    direct = suggest_for_model(fitted, list(viewer.layers["tex"].data), range(2, 6),
                               seeds=2, max_points=1000)
    assert direct == scores
    # the plot shows both curves and the suggested K
    ax = widget.figure.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["silhouette"].get_ydata(),
                               [r.silhouette for r in scores.rows])
    np.testing.assert_allclose(lines["stability"].get_ydata(),
                               [r.stability for r in scores.rows])
    top = max(r.calinski_harabasz for r in scores.rows)
    np.testing.assert_allclose(lines["Calinski-Harabasz / max"].get_ydata(),
                               [r.calinski_harabasz / top for r in scores.rows])
    assert list(lines["silhouette"].get_xdata()) == [2, 3, 4, 5]
    best = lines["top CH (no clear K)" if scores.unclear else "suggested K"]
    assert list(best.get_xdata()) == [scores.best, scores.best]
    if scores.unclear:
        assert "No clear K" in widget.result.value
    else:
        assert f"Suggested K = {scores.best}" in widget.result.value
    assert any(s.startswith("computing codes") and d == t == 3 for s, d, t in stages)
    assert ("k-means runs per K", 4, 4) in stages


def test_message_and_mark_follow_the_rule(viewer):
    """A clear peak of CH is suggested; runs that disagree at the top K are called no clear
    K, with the K marked as the top score only, never as a suggestion."""
    from napari_stego.choose_k import KScore, KScores, best_k

    widget = SuggestKWidget(viewer)

    def show(stab):
        rows = tuple(KScore(k, 0.2 + 0.05 * k, stab, stab, 0.1, ch)
                     for k, ch in zip(range(2, 7), [100.0, 180.0, 150.0, 130.0, 120.0]))
        scores = KScores(rows, best_k(rows), 1000, 3, "highest CH")
        widget.plot(scores)
        return {line.get_label(): line for line in widget.figure.axes[0].get_lines()}

    lines = show(0.95)
    assert list(lines["suggested K"].get_xdata()) == [3, 3]
    assert "Suggested K = 3" in widget.result.value and "no clear" not in widget.result.value
    lines = show(0.4)
    assert "suggested K" not in lines
    assert list(lines["top CH (no clear K)"].get_xdata()) == [3, 3]
    assert widget.result.value.startswith("<b>No clear K: the k-means runs disagree at K = 3")
    assert "Suggested" not in widget.result.value


def test_shown_slice_only_and_one_run(viewer, fitted, qtbot):
    model_store(viewer).set(fitted, "test")
    widget = SuggestKWidget(viewer)
    widget.slices.value = CURRENT_SLICE
    widget.k_min.value, widget.k_max.value, widget.seeds.value = 2, 3, 1
    job = widget.suggest()
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    assert job.error is None, job.error
    cells = fitted.codes(viewer.layers["tex"].data[0]).shape[1:]
    assert widget.scores.n_points == cells[0] * cells[1]  # one slice's cells only
    assert all(math.isnan(r.stability) for r in widget.scores.rows)
    labels = [line.get_label() for line in widget.figure.axes[0].get_lines()]
    assert "stability" not in labels and "silhouette" in labels


def test_cancel(viewer, fitted, qtbot):
    model_store(viewer).set(fitted, "test")
    widget = SuggestKWidget(viewer)
    widget.k_max.value, widget.max_points.value = 20, 5000
    job = widget.suggest()
    widget.cancel()
    qtbot.waitUntil(lambda: job.finished, timeout=WAIT_MS)
    from napari_stego.errors import Cancelled

    assert isinstance(job.error, Cancelled)
    assert widget.status.value == "cancelled" and widget.scores is None
    assert widget.run_button.enabled
