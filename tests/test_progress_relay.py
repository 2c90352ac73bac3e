"""The progress relay of the widgets' background jobs draws at most ~10 updates a second per
stage, yet never loses a stage change, a finished stage or the latest state."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from magicgui.widgets import Label  # noqa: E402

from napari_stego._widgets._progress import PROGRESS_INTERVAL_S, ProgressRelay  # noqa: E402


def test_a_burst_of_steps_is_drawn_a_few_times_and_the_latest_state_at_the_end(qtbot):
    from qtpy.QtWidgets import QProgressBar

    status, bar = Label(), QProgressBar()
    bar.setVisible(False)
    relay = ProgressRelay("Fit", status, bar)
    try:
        for step in range(1, 301):  # the training reports every step, much faster than 10/s
            relay("train", step, 500, loss=-0.01 * step)
        # the first is drawn at once, the others wait for the interval
        assert 1 <= relay.draws <= 3
        assert status.value.startswith("training the STEGO head 1/500")
        qtbot.waitUntil(lambda: relay.done == 300, timeout=int(PROGRESS_INTERVAL_S * 1000) * 20)
        assert relay.draws <= 4
        assert status.value == "training the STEGO head 300/500, loss -3.000"
        assert not bar.isHidden() and (bar.value(), bar.maximum()) == (300, 500)
        # a new stage and a finished stage are drawn at once
        drawn = relay.draws
        relay("cluster", 0, 1)
        assert relay.draws == drawn + 1 and relay.stage == "cluster"
        relay("cluster", 1, 1)
        assert relay.draws == drawn + 2 and relay.done == 1
        # the features' end is the KNN gap (drawn at once, as before)
        relay("features", 2, 2)
        assert relay.stage == "knn" and status.value.startswith("finding nearest-neighbour")
        assert (bar.value(), bar.maximum()) == (0, 1)
    finally:
        relay.close()
    assert bar.isHidden()  # the job is over


def test_a_pending_update_is_dropped_after_close(qtbot):
    relay = ProgressRelay("Fit")
    relay("train", 1, 10)
    relay("train", 2, 10)  # pending
    relay.close()
    qtbot.wait(int(PROGRESS_INTERVAL_S * 1000) * 3)
    assert relay.done == 1 and relay.draws == 1
