"""Figures the command line writes (matplotlib, drawn off-screen; no GUI toolkit).

:func:`confusion_figure` draws the confusion matrix of ``napari-stego evaluate``: true
classes down, the clusters across in the order of the class they were matched to, each cell
the percentage of its class's pixels, with class names when the ground truth folder names
them (:func:`find_class_names`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def find_class_names(gt_dir: str | Path, n_classes: int) -> list[str] | None:
    """Class names of a ground-truth folder, or ``None`` when none are given.

    Looked up in ``classes.txt`` (one name per line, class 0 first) in the folder, then in
    the ``class_names`` list of a ``meta.json`` in the folder or its parent (the layout of
    labelled datasets with ``images/`` and ``labels/``). Lists of the wrong length are
    ignored.
    """
    gt_dir = Path(gt_dir)
    candidates: list[list[str]] = []
    txt = gt_dir / "classes.txt"
    if txt.is_file():
        candidates.append([ln.strip() for ln in txt.read_text().splitlines() if ln.strip()])
    for meta in (gt_dir / "meta.json", gt_dir.parent / "meta.json"):
        if meta.is_file():
            try:
                names = json.loads(meta.read_text()).get("class_names")
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(names, list):
                candidates.append([str(n) for n in names])
    for names in candidates:
        if len(names) == n_classes:
            return names
    return None


def confusion_figure(conf: np.ndarray, assignment, path: str | Path, *,
                     class_names: list[str] | None = None, title: str = ""):
    """Write a confusion-matrix figure (PNG) of ``conf`` ``(clusters, classes)`` pixel
    counts; returns the matplotlib ``Figure``.

    Rows are the true classes (named when ``class_names`` is given), columns the clusters,
    ordered by the class they were matched to (``assignment[k]``, ``-1``: unmatched, last),
    so a good result is a bright diagonal; each cell shows its share of the row's pixels in
    percent, and each row label its pixel count.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    conf = np.asarray(conf, np.int64)
    n_clusters, n_classes = conf.shape
    assignment = np.asarray(assignment)
    order = sorted(range(n_clusters), key=lambda k: (assignment[k] < 0, assignment[k], k))
    m = conf[order].T.astype(np.float64)  # (classes, clusters)
    rows = m.sum(1, keepdims=True)
    frac = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0) * 100
    names = class_names or [f"class {c}" for c in range(n_classes)]
    col_labels = [f"cluster {k}" + (f"\n→ {names[assignment[k]]}" if assignment[k] >= 0
                                    and class_names else "") for k in order]
    row_labels = [f"{names[c]}\n({int(rows[c, 0]):,} px)" for c in range(n_classes)]
    width = min(max(4.0, 1.0 + 0.9 * n_clusters + 0.12 * max(len(n) for n in names)), 24.0)
    height = min(max(3.0, 1.4 + 0.6 * n_classes), 24.0)
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(frac, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(n_clusters), col_labels, fontsize=8)
    ax.set_yticks(range(n_classes), row_labels, fontsize=8)
    ax.set_xlabel("predicted cluster (ordered by matched class)")
    ax.set_ylabel("true class")
    if n_clusters * n_classes <= 400:
        for c in range(n_classes):
            for k in range(n_clusters):
                ax.text(k, c, f"{frac[c, k]:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if frac[c, k] > 60 else "white")
    fig.colorbar(image, ax=ax, label="% of the class's pixels")
    ax.set_title(title or "confusion matrix (rows sum to 100 %)", fontsize=10)
    canvas.draw()  # an RGB PNG (no alpha channel), like the other pictures of the CLI
    import imageio.v3 as iio

    iio.imwrite(str(path), np.asarray(canvas.buffer_rgba())[..., :3], extension=".png")
    return fig
