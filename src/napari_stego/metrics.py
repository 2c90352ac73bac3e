"""Unsupervised-segmentation scores: confusion matrix and Hungarian-matched mIoU / accuracy.

Matching as the STEGO reference (one-to-one, maximising matched pixels), with one
difference: pixels predicted as an unmatched (extra) cluster still count, as errors.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment


def confusion_matrix(pred: np.ndarray, target: np.ndarray, n_clusters: int, n_classes: int,
                     ignore_index: int = 255) -> np.ndarray:
    """Count pixels per (predicted cluster, true class).

    Parameters
    ----------
    pred : (...) integer ndarray of cluster ids in ``[0, n_clusters)``
    target : (...) integer ndarray of class ids in ``[0, n_classes)``, same shape;
        ``ignore_index`` (and anything outside the range) is left out.

    Returns
    -------
    (n_clusters, n_classes) int64 ndarray; rows are clusters, columns classes.
    """
    pred = np.asarray(pred).ravel().astype(np.int64)
    target = np.asarray(target).ravel().astype(np.int64)
    if pred.shape != target.shape:
        raise ValueError(f"pred and target differ in size: {pred.size} vs {target.size}")
    keep = (target != ignore_index) & (target >= 0) & (target < n_classes)
    pred, target = pred[keep], target[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= n_clusters):
        raise ValueError(f"cluster ids must lie in [0, {n_clusters}), got {pred.min()}..{pred.max()}")
    counts = np.bincount(pred * n_classes + target, minlength=n_clusters * n_classes)
    return counts.reshape(n_clusters, n_classes)


def hungarian_scores(confusion: np.ndarray) -> dict:
    """Match clusters to classes one-to-one and score the matched segmentation.

    Parameters
    ----------
    confusion : (n_clusters, n_classes) ndarray from :func:`confusion_matrix`

    Returns
    -------
    dict with
        ``miou`` : mean IoU over classes present in target or prediction, percent;
        ``accuracy`` : matched pixels / all counted pixels, percent;
        ``assignment`` : (n_clusters,) int array, the class of each cluster or -1 if unmatched;
        ``iou_per_class`` : (n_classes,) float array, percent (NaN where a class never occurs
        and is never predicted).
    """
    conf = np.asarray(confusion, dtype=np.float64)
    n_clusters, n_classes = conf.shape
    rows, cols = linear_sum_assignment(conf, maximize=True)
    assignment = np.full(n_clusters, -1, dtype=np.int64)
    assignment[rows] = cols

    total = conf.sum()
    cluster_of_class = np.full(n_classes, -1, dtype=np.int64)
    cluster_of_class[cols] = rows
    iou = np.full(n_classes, np.nan)
    tp_sum = 0.0
    for c in range(n_classes):
        gt = conf[:, c].sum()
        k = cluster_of_class[c]
        tp = conf[k, c] if k >= 0 else 0.0
        predicted = conf[k].sum() if k >= 0 else 0.0
        union = gt + predicted - tp
        if union > 0:
            iou[c] = tp / union
        tp_sum += tp
    miou = float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else float("nan")
    accuracy = float(tp_sum / total * 100) if total > 0 else float("nan")
    return dict(miou=miou, accuracy=accuracy, assignment=assignment, iou_per_class=iou * 100)
