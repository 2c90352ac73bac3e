"""Shared fixtures: the offline backbone and small synthetic texture images."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def offline_backbone():
    from napari_stego.backbones import create_backbone

    return create_backbone("efficientnet_lite0")


@pytest.fixture(scope="session")
def mosaics():
    """Six 160 px grey two-texture images and their class maps."""
    from napari_stego.samples import texture_mosaics

    images, labels = texture_mosaics()
    return list(images), list(labels)


@pytest.fixture(scope="module")
def untrained_model(offline_backbone):
    """A 3-cluster model on the offline backbone with a seeded untrained head (16-dim codes)
    and random centroids: batch tests need a model's outputs, not good ones (one per test
    module, so no module sees another's changes)."""
    from napari_stego import StegoModel
    from napari_stego.head import SegmentationHead

    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = SegmentationHead(offline_backbone.dim, 16)
    centroids = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=1)
    return StegoModel(offline_backbone, head, centroids, device="cpu")


_EXIT: dict = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT["status"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """After the GUI tests, leave without the interpreter's teardown.

    Qt objects of the widget tests (napari windows, matplotlib canvases) destroyed in arbitrary
    order at interpreter exit crashed the process once in about seven runs, after every result
    was in; the exit status must be pytest's, not the crash's.
    """
    import os
    import sys

    if "status" in _EXIT and any(m in sys.modules for m in ("PyQt5", "PyQt6", "PySide6")):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT["status"])
