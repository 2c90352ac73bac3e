"""The *Evaluate* dock widget: clusters vs a ground-truth Labels layer (Hungarian matching)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import CheckBox, ComboBox, Container
from qtpy.QtCore import Qt
from qtpy.QtGui import QBrush, QColor, QFont
from qtpy.QtWidgets import QAbstractItemView, QHeaderView, QTableWidget, QTableWidgetItem

from ..errors import StegoError
from ..evaluate import evaluate_arrays
from ..io import META_KEY
from ._common import (
    JobMixin,
    finish_layout,
    insert_after,
    notify_error,
    run_buttons,
    text,
    warm_imports,
)
from ._layers import output_layer

if TYPE_CHECKING:
    import napari


def _labels_choices(viewer):
    from napari.layers import Labels

    return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, Labels)]


def _offset(layer) -> int:
    """Label value - cluster id of a layer (1 for napari-stego's layers, else 0)."""
    meta = layer.metadata.get(META_KEY)
    return int(meta.get("label_offset", 0)) if isinstance(meta, dict) else 0


class ConfusionTable(QTableWidget):
    """The confusion matrix as a heat map: rows clusters, columns ground-truth classes; a
    cell's shade is its share of the class's pixels, matched pairs are bold and framed."""

    def __init__(self) -> None:
        super().__init__()
        self.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.setMinimumHeight(120)
        self.setMaximumHeight(320)

    def show_scores(self, scores: dict) -> None:
        conf = scores["confusion"]
        k, c = conf.shape
        self.clear()
        self.setRowCount(k)
        self.setColumnCount(c)
        self.setHorizontalHeaderLabels([f"class {v}" for v in scores["class_values"]])
        self.setVerticalHeaderLabels([f"cluster {v}" for v in scores["cluster_values"]])
        share = conf / np.maximum(conf.sum(0, keepdims=True), 1)
        bold = QFont()
        bold.setBold(True)
        for i in range(k):
            for j in range(c):
                item = QTableWidgetItem(f"{share[i, j] * 100:.0f}%")
                item.setToolTip(f"{conf[i, j]} pixels: {share[i, j] * 100:.1f}% of class "
                                f"{scores['class_values'][j]}")
                item.setTextAlignment(Qt.AlignCenter)
                v = float(share[i, j])
                item.setBackground(QBrush(QColor.fromRgbF(1 - 0.8 * v, 1 - 0.55 * v, 1 - 0.2 * v)))
                item.setForeground(QBrush(QColor("white" if v > 0.55 else "black")))
                if scores["assignment"][i] == j:
                    item.setFont(bold)
                self.setItem(i, j, item)


class EvaluateWidget(Container, JobMixin):
    """Score clusters against a ground-truth Labels layer.

    Clusters are matched one-to-one to classes (Hungarian, as in the STEGO paper); shows
    mIoU, pixel accuracy, per-class IoU and the confusion matrix, and can add a layer of
    the clusters renamed to their matched classes. The last scores are in ``.scores``.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        warm_imports()
        self.viewer = napari_viewer
        self.scores: dict | None = None
        self.gt = ComboBox(label="ground truth", choices=self._choices,
                           tooltip="A Labels layer of true classes (painted or loaded).")
        self.pred = ComboBox(label="clusters", choices=self._choices,
                             tooltip="The clusters to score, e.g. '<image> clusters' or "
                                     "'<image> CRF' from the Segment widget.")
        self.gt_zero = CheckBox(text="ground truth 0 = unlabelled (ignored)", value=True,
                                tooltip="napari's convention: label 0 is background / not "
                                        "painted. Untick if 0 is a real class.")
        self.matched = CheckBox(text="add a layer of clusters as matched classes", value=False)
        self.run_button, self.cancel_button = run_buttons("Evaluate", "Compute the scores.")
        self.status = text()
        self.summary = text()
        self.table = ConfusionTable()
        self.per_class = text()
        buttons = Container(widgets=[self.run_button, self.cancel_button], layout="horizontal",
                            labels=False)
        form = Container(widgets=[self.gt, self.pred])
        self._table_title = text("Confusion matrix (share of each class's pixels; matched "
                                 "pairs in bold):")
        super().__init__(widgets=[form, self.gt_zero, self.matched, buttons, self.status,
                                  self.summary, self.per_class, self._table_title], labels=False)
        insert_after(self, self._table_title, self.table)
        finish_layout(self)
        self.run_button.changed.connect(self.evaluate)
        self.cancel_button.changed.connect(self.cancel)
        ev = napari_viewer.layers.events
        for e in (ev.inserted, ev.removed, ev.moved):
            e.connect(self._refresh)
        self._refresh()

    def _choices(self, _widget=None):
        return _labels_choices(self.viewer)

    def _refresh(self, _event=None) -> None:
        self.gt.reset_choices()
        self.pred.reset_choices()
        layers = [v for _, v in _labels_choices(self.viewer)]
        ours = [lyr for lyr in layers if isinstance(lyr.metadata.get(META_KEY), dict)
                and lyr.metadata[META_KEY].get("label_offset") is not None]
        others = [lyr for lyr in layers if lyr not in ours]
        if ours and (self.pred.value is None or self.pred.value not in ours):
            self.pred.value = ours[-1]
        if others and (self.gt.value is None or self.gt.value in ours):
            self.gt.value = others[0]
        if self.pred.value is self.gt.value:  # never both the same layer by default
            rest = [lyr for lyr in layers if lyr is not self.gt.value]
            if rest:
                self.pred.value = rest[-1]

    def evaluate(self):
        """Start the evaluation in the background; returns the :class:`Job` (or ``None``)."""
        gt, pred = self.gt.value, self.pred.value
        try:
            if gt is None or pred is None:
                raise StegoError("choose a ground-truth Labels layer and a clusters Labels layer "
                                 "(segment an image first)")
            if gt is pred:
                raise StegoError("ground truth and clusters are the same layer: choose two")
        except StegoError as exc:
            notify_error(exc, "Evaluate")
            return None
        offset, zero = _offset(pred), bool(self.gt_zero.value)
        top = None
        meta = pred.metadata.get(META_KEY)
        if isinstance(meta, dict) and isinstance(meta.get("model"), dict):
            top = int(meta["model"]["n_clusters"])
        pred_data, gt_data = pred.data, gt.data

        def work(progress, cancel):
            return evaluate_arrays(pred_data, gt_data, pred_offset=offset, gt_zero_unlabelled=zero,
                                   n_clusters=top, progress=progress, cancel=cancel)

        def done(scores) -> None:
            self.scores = scores
            self.status.value = f"{scores['pixels']:,} pixels compared"
            self.summary.value = (f"<b>mIoU {scores['miou']:.1f}%</b> &nbsp; "
                                  f"<b>accuracy {scores['accuracy']:.1f}%</b> (Hungarian-matched)")
            rows = []
            for j, iou in enumerate(scores["iou_per_class"]):
                match = np.flatnonzero(scores["assignment"] == j)
                who = (f"cluster {scores['cluster_values'][match[0]]}" if match.size
                       else "no cluster")
                rows.append(f"class {scores['class_values'][j]}: IoU "
                            + ("–" if np.isnan(iou) else f"{iou:.1f}%") + f" ({who})")
            self.per_class.value = "<br>".join(rows)
            self.table.show_scores(scores)
            if self.matched.value:
                self._add_matched(pred, scores)

        return self._start_job("Evaluate", work, on_done=done)

    def _add_matched(self, pred, scores) -> None:
        """Clusters relabelled to their matched class values (unmatched clusters -> 0)."""
        values = scores["cluster_values"]
        top = int(max(values.max(), np.asarray(pred.data).max())) + 1
        lut = np.zeros(top, np.int64)
        for i, cls in enumerate(scores["assignment"]):
            if cls >= 0:
                lut[values[i]] = scores["class_values"][cls]
        data = np.asarray(pred.data)
        out = lut[data].astype(np.uint16 if lut.max() > 255 else np.uint8)
        layer = output_layer(self.viewer, f"matched:{pred.name}", "labels",
                             f"{pred.name} matched", out.shape, out.dtype,
                             dict(made_by="napari-stego Evaluate", source=[pred.name],
                                  label_offset=None, miou=scores["miou"],
                                  accuracy=scores["accuracy"]), pred)
        layer.data = out
