"""napari-stego: unsupervised semantic segmentation (STEGO) for image stacks, in napari.

The core (everything without a leading underscore) imports without napari or Qt. The public
names below are loaded on first use, so ``import napari_stego`` (and ``napari-stego --help``)
does not pay for torch until a model is needed.
"""

from importlib import import_module

__version__ = "0.1.0"

# K when none is given: the command line's --n-clusters and the Fit widget start here
DEFAULT_N_CLUSTERS = 3

_EXPORTS = {
    "StegoModel": "model",
    "StegoError": "errors",
    "Cancelled": "errors",
    "segment_files": "batch",
    "fit_files": "batch",
    "evaluate_folders": "evaluate",
    "BatchReport": "batch",
    "suggest_n_clusters": "choose_k",
}

__all__ = [*_EXPORTS, "__version__", "DEFAULT_N_CLUSTERS"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
