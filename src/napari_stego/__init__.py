"""napari-stego: unsupervised semantic segmentation (STEGO) for image stacks, in napari.

The core (everything without a leading underscore) imports without napari or Qt.
"""

__version__ = "0.1.0"

from .errors import Cancelled, StegoError  # noqa: E402
from .model import StegoModel  # noqa: E402
from .batch import BatchReport, evaluate_folders, fit_files, segment_files  # noqa: E402

__all__ = ["StegoModel", "StegoError", "Cancelled", "__version__", "segment_files", "fit_files",
           "evaluate_folders", "BatchReport"]
