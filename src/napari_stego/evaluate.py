"""Scores of clusters against ground truth (clusters matched to classes one-to-one, Hungarian):
of folders of labels files (``napari-stego evaluate``, :func:`evaluate_folders`) and of
arrays or layers (the Evaluate widget, :func:`evaluate_arrays`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from . import __version__
from .batch.inputs import TIFF_SUFFIXES, _base_name, _is_tiff, _short
from .batch.reports import Log
from .batch.writes import _atomic_write
from .errors import Cancelled, StegoError
from .io import META_KEY

__all__ = ["evaluate_arrays", "evaluate_folders"]


def _read_labels(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".zarr":
        import zarr

        node = zarr.open(str(path), mode="r")
        if not hasattr(node, "shape"):  # an OME-Zarr output: level 0
            node = node["0"]
        return np.asarray(node[...])
    if _is_tiff(path):
        import tifffile

        return tifffile.imread(str(path))
    from skimage.io import imread

    return imread(str(path))


def _label_offset(path: Path) -> int:
    """The ``label_offset`` napari-stego recorded in a prediction (0 when none: a map of
    0-based cluster indices, e.g. from Python or another tool)."""
    from .labels import read_own_metadata

    try:
        if path.suffix.lower() == ".zarr":
            import zarr

            meta = dict(zarr.open(str(path), mode="r").attrs).get(META_KEY)
        else:
            import tifffile

            with tifffile.TiffFile(str(path)) as tif:
                meta = read_own_metadata(tif)
    except Exception:
        return 0
    offset = meta.get("label_offset") if isinstance(meta, dict) else None
    return int(offset) if isinstance(offset, int) and offset > 0 else 0


def _label_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not p.name.lower().endswith(suffixes):
            continue
        stem = _base_name(p) if _is_tiff(p) else p.name[:-len(".ome.zarr")] \
            if p.name.lower().endswith(".ome.zarr") else p.name.rsplit(".", 1)[0]
        if stem.endswith("_proba"):
            continue
        found.setdefault(stem, p)
    return found


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, *,
                     n_classes: int | None = None, ignore_index: int = 255,
                     out: str | os.PathLike | None = None, log: Log | None = None) -> dict:
    """Score predicted cluster maps against ground-truth class maps, matched by base name.

    All matched pairs are pooled into one confusion matrix; clusters are matched to classes
    one-to-one (Hungarian) as in :func:`napari_stego.metrics.hungarian_scores`.

    Writes ``evaluation.json`` (mIoU, accuracy, per-class IoU, assignment, confusion
    matrix, class names when the ground truth folder gives them, per-file scores, unmatched
    files) and ``confusion.png`` (:func:`napari_stego.figures.confusion_figure`: rows the
    true classes, columns the matched clusters, percentages of each row) into ``out``
    (default ``pred_dir``). Returns the JSON content plus its paths.

    Raises:
        StegoError: a folder is missing, or no prediction has a ground truth of its name.
    """
    from .figures import find_class_names
    from .metrics import confusion_matrix, hungarian_scores

    say = log or (lambda msg: None)
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    for d, what in ((pred_dir, "prediction"), (gt_dir, "ground-truth")):
        if not d.is_dir():
            raise StegoError(f"{what} folder {d} does not exist")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise StegoError(f"--out {out} is a file: evaluate writes evaluation.json and "
                         "confusion.png into a folder")
    preds = _label_files(pred_dir, (*TIFF_SUFFIXES, ".zarr"))
    gts = _label_files(gt_dir, (*TIFF_SUFFIXES, ".png"))
    pairs = [(k, preds[k], gts[k]) for k in preds if k in gts]
    if not pairs:
        raise StegoError(f"no prediction in {pred_dir} has a ground truth of the same base "
                         f"name in {gt_dir}")
    problems = [f"{preds[k]}: no ground truth named {k}.* in {gt_dir}" for k in preds
                if k not in gts]
    problems += [f"{gts[k]}: no prediction named {k}.* in {pred_dir}" for k in gts
                 if k not in preds]
    loaded = []
    for key, p, g in pairs:
        try:
            pred, gt = _read_labels(p).astype(np.int64), _read_labels(g)
        except Exception as exc:
            problems.append(f"{p}: cannot read ({_short(exc, 100)})")
            continue
        if gt.ndim == pred.ndim + 1 and gt.shape[-1] in (3, 4):
            problems.append(f"{g}: ground truth is RGB; class maps must be integer images")
            continue
        if pred.shape != gt.shape:
            problems.append(f"{p}: shape {pred.shape} differs from its ground truth {gt.shape}")
            continue
        bad = _class_map_problem(gt, ignore_index)
        if bad:
            problems.append(f"{g}: {bad}")
            continue
        gt = gt.astype(np.int64)
        offset = _label_offset(p)
        if offset:  # napari-stego's ids 1..K: back to indices, 0 (no data) left out
            gt = np.where(pred < offset, ignore_index, gt)
            pred = np.maximum(pred - offset, 0)
        loaded.append((key, p, g, pred, gt))
    for msg in problems:
        say(f"warning: {msg}")
    if not loaded:
        raise StegoError("no prediction could be compared with its ground truth: "
                         + "; ".join(problems))
    n_clusters = max(int(pred.max()) + 1 for *_, pred, _ in loaded)
    if n_classes is None:
        tops = [int(gt[(gt != ignore_index) & (gt >= 0)].max(initial=-1)) for *_, gt in loaded]
        n_classes = max(tops) + 1
    if n_classes < 1:
        raise StegoError("the ground truth holds no class ids (only ignore_index)")
    top = max(int(gt[gt != ignore_index].max(initial=-1)) for *_, gt in loaded)
    if top >= n_classes:
        raise StegoError(f"the ground truth holds class ids up to {top}, but n_classes "
                         f"(--n-classes) is {n_classes}: pass at least {top + 1}, or leave it "
                         "out to count the classes")
    conf = np.zeros((n_clusters, n_classes), np.int64)
    per_file = []
    for key, p, g, pred, gt in loaded:
        c = confusion_matrix(pred, gt, n_clusters, n_classes, ignore_index)
        conf += c
        s = hungarian_scores(c)
        per_file.append({"name": key, "prediction": str(p), "ground_truth": str(g),
                         "pixels": int(c.sum()), "miou": _num(s["miou"]),
                         "accuracy": _num(s["accuracy"])})
    scores = hungarian_scores(conf)
    out = Path(out) if out is not None else pred_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StegoError(f"cannot create the folder {out}: {exc.strerror or exc}") from None
    result = {
        "miou": _num(scores["miou"]), "accuracy": _num(scores["accuracy"]),
        "iou_per_class": [_num(v) for v in scores["iou_per_class"]],
        "assignment": [int(a) for a in scores["assignment"]],
        "n_clusters": n_clusters, "n_classes": n_classes, "ignore_index": ignore_index,
        "class_names": find_class_names(gt_dir, n_classes),
        "confusion": conf.tolist(), "files": per_file, "problems": problems,
        "package_version": __version__,
    }
    json_path, png_path = out / "evaluation.json", out / "confusion.png"
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    from .figures import confusion_figure

    title = (f"mIoU {result['miou']:.1f} %, accuracy {result['accuracy']:.1f} % over "
             f"{len(per_file)} files" if result["miou"] is not None else "")
    _atomic_write(png_path, lambda tmp: confusion_figure(
        conf, scores["assignment"], tmp, class_names=result["class_names"], title=title))
    return dict(result, json=str(json_path), png=str(png_path))


def _class_map_problem(gt: np.ndarray, ignore_index: int) -> str | None:
    """Why ``gt`` is not a map of class ids (non-integer or negative values), or ``None``."""
    if gt.dtype.kind not in "biuf":
        return f"ground truth of dtype {gt.dtype}: class maps must be integer images"
    if gt.dtype.kind == "f" and not (np.isfinite(gt).all() and (gt == np.round(gt)).all()):
        return (f"ground truth holds non-integer values ({gt.dtype}): class maps must hold "
                "integer class ids")
    low = gt[gt != ignore_index].min(initial=0)
    if low < 0:
        return (f"ground truth holds negative class ids (down to {low:g}): class ids start "
                "at 0; mark pixels to leave out with the ignore index (--ignore-index)")
    return None


def _num(v) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 4)


def evaluate_arrays(pred, gt, *, pred_offset: int, gt_zero_unlabelled: bool, n_clusters=None,
                    progress=None, cancel=None) -> dict:
    """Hungarian-matched scores of cluster labels against ground truth, slice by slice.

    Parameters
    ----------
    pred : (..., H, W) integer array (numpy or dask); value - ``pred_offset`` is the cluster
        id, values below ``pred_offset`` (0 for napari-stego layers: not segmented) are left
        out.
    gt : (..., H, W) integer array of the same shape; with ``gt_zero_unlabelled`` 0 means
        "no label" and class ids are value - 1.

    Returns
    -------
    dict of :func:`napari_stego.metrics.hungarian_scores` plus ``confusion``
    ``(n_clusters, n_classes)``, ``pixels`` (pixels counted), ``class_values`` and
    ``cluster_values`` (the label values of each row / column).
    """
    from .metrics import confusion_matrix, hungarian_scores

    if tuple(pred.shape) != tuple(gt.shape):
        raise StegoError(f"ground truth shape {tuple(gt.shape)} differs from the clusters' shape "
                         f"{tuple(pred.shape)}: choose layers of the same image")
    lead = tuple(pred.shape[:-2])
    indices = list(np.ndindex(*lead)) if lead else [()]
    gt_off = 1 if gt_zero_unlabelled else 0
    conf = np.zeros((max(int(n_clusters or 1), 1), 1), np.int64)
    for i, idx in enumerate(indices):  # one pass, slice by slice (lazy stacks stay lazy)
        if cancel is not None and cancel.is_set():
            raise Cancelled("evaluation cancelled")
        p = np.asarray(pred[idx]).astype(np.int64).ravel() - pred_offset
        g = np.asarray(gt[idx]).astype(np.int64).ravel() - gt_off
        keep = (p >= 0) & (g >= 0)
        if keep.any():
            p, g = p[keep], g[keep]
            k, c = max(conf.shape[0], int(p.max()) + 1), max(conf.shape[1], int(g.max()) + 1)
            if (k, c) != conf.shape:
                conf = np.pad(conf, ((0, k - conf.shape[0]), (0, c - conf.shape[1])))
            conf += confusion_matrix(p, g, k, c)
        if progress is not None:
            progress("evaluate", i + 1, len(indices))
    if conf.sum() == 0:
        raise StegoError("no pixel has both a cluster and a ground-truth label: segment the "
                         "image first, and check that the ground truth is not all 0")
    scores = hungarian_scores(conf)
    scores.update(confusion=conf, pixels=int(conf.sum()),
                  class_values=np.arange(conf.shape[1]) + gt_off,
                  cluster_values=np.arange(conf.shape[0]) + pred_offset)
    return scores
