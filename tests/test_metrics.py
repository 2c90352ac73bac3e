"""Hungarian-matched scores on hand-made confusion matrices."""

import numpy as np
import pytest

from napari_stego.metrics import confusion_matrix, hungarian_scores


def test_confusion_matrix_counts_and_ignores():
    pred = np.array([[0, 0, 1], [1, 2, 2]])
    target = np.array([[1, 1, 0], [255, 0, 1]])
    conf = confusion_matrix(pred, target, n_clusters=3, n_classes=2)
    np.testing.assert_array_equal(conf, [[0, 2], [1, 0], [1, 1]])


def test_confusion_matrix_rejects_out_of_range_clusters():
    with pytest.raises(ValueError, match="cluster ids"):
        confusion_matrix(np.array([3]), np.array([0]), 3, 2)


def test_perfect_permuted_clustering_scores_100():
    conf = np.array([[0, 50, 0], [0, 0, 30], [20, 0, 0]])
    s = hungarian_scores(conf)
    assert s["miou"] == pytest.approx(100)
    assert s["accuracy"] == pytest.approx(100)
    np.testing.assert_array_equal(s["assignment"], [1, 2, 0])


def test_hand_computed_scores():
    # rows clusters, cols classes
    conf = np.array([[8, 2], [1, 9]])
    s = hungarian_scores(conf)
    # class 0 <- cluster 0: tp 8, fp 2, fn 1 -> 8/11; class 1 <- cluster 1: tp 9, fp 1, fn 2 -> 9/12
    assert s["iou_per_class"] == pytest.approx([800 / 11, 900 / 12])
    assert s["miou"] == pytest.approx((800 / 11 + 900 / 12) / 2)
    assert s["accuracy"] == pytest.approx(85.0)


def test_extra_cluster_pixels_count_as_errors():
    # 3 clusters, 2 classes: cluster 2 is unmatched and holds 10 class-1 pixels
    conf = np.array([[10, 0], [0, 10], [0, 10]])
    s = hungarian_scores(conf)
    assert s["assignment"].tolist()[2] == -1
    assert s["accuracy"] == pytest.approx(20 / 30 * 100)
    assert s["iou_per_class"] == pytest.approx([100.0, 50.0])  # fn of class 1 includes them
    assert s["miou"] == pytest.approx(75.0)


def test_fewer_clusters_than_classes_gives_zero_iou_for_unmatched_class():
    conf = np.array([[5, 5, 0]])
    s = hungarian_scores(conf)
    assert s["iou_per_class"][2] != s["iou_per_class"][2]  # never seen, never predicted: NaN
    assert sorted(np.nan_to_num(s["iou_per_class"][:2]).tolist()) == [0.0, 50.0]
    assert s["miou"] == pytest.approx(25.0)
    assert s["accuracy"] == pytest.approx(50.0)
