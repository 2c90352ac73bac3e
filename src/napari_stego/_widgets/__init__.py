"""napari dock widgets of napari-stego (the only place besides ``_reader`` / ``_writer`` /
``_sample_data`` that imports napari or Qt).

* :class:`FitWidget` — fit STEGO on Image layers (background thread, progress, cancel,
  save / load);
* :class:`SegmentWidget` — apply the model: ``"<image> clusters"`` / ``"<image> CRF"``
  Labels layers, stacks slice by slice, the shown slice first;
* :class:`CorrespondenceWidget` — cosine-similarity maps of a clicked point's features
  (the STEGO paper's Fig. 2);
* :class:`EvaluateWidget` — Hungarian-matched mIoU / accuracy against ground truth.

The widgets of one viewer share one model: ``model_store(viewer).model``.
"""

from ..evaluate import evaluate_arrays
from ..io import META_KEY
from ._common import LABEL_OFFSET, ModelStore, model_store
from ._correspondence import CorrespondenceWidget
from ._evaluate import EvaluateWidget
from ._fit import FitWidget
from ._segment import SegmentWidget

__all__ = [
    "FitWidget",
    "SegmentWidget",
    "CorrespondenceWidget",
    "EvaluateWidget",
    "ModelStore",
    "model_store",
    "evaluate_arrays",
    "LABEL_OFFSET",
    "META_KEY",
]
