"""Principal-mask refinement of the centroids (napari_stego.refine)."""

import torch
import torch.nn.functional as F

from napari_stego.refine import principal_masks, refine_centroids


def _directions(c: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(c, k, generator=g))[0].T  # (k, c) orthonormal


def _image(groups: list[int], dirs: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [dirs[j] + noise * torch.randn(n, dirs.shape[1], generator=g)
             for j, n in enumerate(groups) if n]
    return F.normalize(torch.cat(parts), dim=1)


def test_principal_masks_find_each_group_of_an_image():
    dirs = _directions(16, 3)
    x = _image([600, 300, 100], dirs, 0.15, seed=1)
    truth = torch.cat([torch.full((n,), j) for j, n in enumerate([600, 300, 100])])
    masks = principal_masks(x)
    assert 3 <= len(masks) <= 8
    covered = torch.stack(masks).any(0)
    assert covered.float().mean() > 0.95
    for m in masks:  # disjoint, each within one group
        assert torch.bincount(truth[m], minlength=3).max() >= 0.95 * int(m.sum())
    assert int(torch.stack(masks).sum(0).max()) == 1
    assert {int(torch.bincount(truth[m]).argmax()) for m in masks} == {0, 1, 2}


def test_refinement_assigns_masks_as_units_and_recovers_the_groups():
    dirs = _directions(16, 2, seed=3)
    images = [_image([400 + 50 * i, 200], dirs, 0.2, seed=10 + i) for i in range(4)]
    # centroids far off (a bad k-means optimum): both between the groups, one leaning each way
    start = F.normalize(torch.stack([dirs[0] + 0.9 * dirs[1], 0.9 * dirs[0] + dirs[1]]), dim=1)
    theta, report = refine_centroids(images, start)
    cos = theta @ dirs.T  # (2 centroids, 2 groups)
    assert sorted(cos.argmax(1).tolist()) == [0, 1]
    assert float(cos.max(1).values.min()) > 0.95
    assert report["iterations"] >= 2 and report["moved"] > 0.05
    assert theta.norm(dim=1).allclose(torch.ones(2), atol=1e-5)


def test_refinement_keeps_good_centroids_and_accepts_maps():
    dirs = _directions(8, 2, seed=5)
    maps = [_image([300, 100], dirs, 0.1, seed=s).T.reshape(8, 20, 20) for s in range(3)]
    theta, report = refine_centroids(maps, dirs.clone())
    assert float((theta * dirs).sum(1).min()) > 0.98
    assert report["masks_per_image"] >= 2


def test_fit_refines_by_default_reports_it_and_round_trips(offline_backbone, mosaics, tmp_path):
    import numpy as np

    from napari_stego import StegoModel
    from napari_stego.cluster import ClusterConfig
    from napari_stego.features import FeatureConfig
    from napari_stego.metrics import confusion_matrix, hungarian_scores
    from napari_stego.train import TrainConfig

    images, labels = mosaics
    kwargs = dict(backbone=offline_backbone, train=TrainConfig(steps=30, batch_size=8), seed=0,
                  features=FeatureConfig(min_side=224))
    plain = StegoModel.fit(images, 3, cluster=ClusterConfig(refine=False), **kwargs)
    model = StegoModel.fit(images, 3, **kwargs)  # refined by default
    assert "refine" not in plain.info
    report = model.info["refine"]
    assert report["masks_per_image"] >= 1 and report["iterations"] >= 1
    # the same head (same seed): refinement changes the centroids only
    assert torch.equal(plain.head.linear.weight, model.head.linear.weight)
    conf = sum(confusion_matrix(model.predict(im), gt, 3, 3) for im, gt in zip(images, labels))
    assert hungarian_scores(conf)["accuracy"] > 85
    back = StegoModel.load(model.save(tmp_path / "m.stego"))
    assert back.cluster_config.refine is True
    assert torch.allclose(back.centroids.cpu(), model.centroids.cpu())
    np.testing.assert_array_equal(back.predict(images[0]), model.predict(images[0]))


def test_model_files_from_before_the_refinement_load_as_unrefined(untrained_model, tmp_path):
    """A file written before ``ClusterConfig.refine`` existed has no such key: its centroids
    were not refined (nor given Lloyd passes, ``lloyd_iter``, which came later), and the
    loaded model must say so (not take today's default)."""
    import json

    from safetensors.torch import load_file, save_file

    from napari_stego import StegoModel
    from napari_stego.cluster import ClusterConfig
    from napari_stego.io import META_KEY
    from napari_stego.predict import PredictConfig

    path = untrained_model.save(tmp_path / "new.stego")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    assert meta["cluster_config"]["refine"] is True
    del meta["cluster_config"]["refine"], meta["cluster_config"]["refine_maps"]
    del meta["cluster_config"]["lloyd_iter"]
    del meta["predict_config"]["guide"]  # nor up-sampled their scores guided by the image
    old = tmp_path / "old.stego"
    save_file(load_file(str(path)), str(old), metadata={META_KEY: json.dumps(meta)})
    back = StegoModel.load(old)
    assert back.cluster_config.refine is False
    assert back.cluster_config.lloyd_iter == 0  # nor given the Lloyd passes
    assert StegoModel.load(path).cluster_config.refine is True
    assert StegoModel.load(path).cluster_config.lloyd_iter == ClusterConfig().lloyd_iter > 0
    assert back.predict_config.guide is None
    assert StegoModel.load(path).predict_config.guide == PredictConfig().guide > 0


def test_degenerate_codes_keep_finite_unit_centroids():
    """Flat images (every code the same), one cluster, and an image with a single cell."""
    flat = [F.normalize(torch.ones(5, 6, 6), dim=0) for _ in range(2)]
    one = [torch.randn(5, 1, 1)]
    for codes, k in ((flat, 2), (flat, 1), (one, 2)):
        start = F.normalize(torch.randn(k, 5, generator=torch.Generator().manual_seed(k)), dim=1)
        theta, report = refine_centroids(codes, start)
        assert theta.shape == (k, 5) and torch.isfinite(theta).all()
        assert theta.norm(dim=1).allclose(torch.ones(k), atol=1e-5)
        assert report["masks_per_image"] >= 1
    assert refine_centroids([], start)[0].shape == start.shape


def test_cancel_stops_the_fit_during_the_kmeans_restarts_and_during_the_refinement(
        offline_backbone, mosaics):
    """The "cluster" stage (k-means restarts, then the refinement) takes seconds to tens of
    seconds; Cancel set in it stops the fit there instead of after it."""
    import threading

    import pytest

    from napari_stego import StegoModel
    from napari_stego.errors import Cancelled
    from napari_stego.features import FeatureConfig
    from napari_stego.refine import refine_for_head
    from napari_stego.train import TrainConfig

    images, _ = mosaics
    kwargs = dict(backbone=offline_backbone, train=TrainConfig(steps=4, batch_size=4), seed=0,
                  features=FeatureConfig(min_side=224))
    for when in ("restart", "refinement"):
        cancel, seen = threading.Event(), []

        def progress(stage, done, total):
            seen.append((stage, done, total))
            # 1 = the codes; then 1 + i after restart i; total - 1: the last restart, just
            # before the refinement
            if stage == "cluster" and done == (2 if when == "restart" else total - 1):
                cancel.set()

        with pytest.raises(Cancelled):
            StegoModel.fit(images, 3, progress=progress, cancel=cancel, **kwargs)
        done = [d for s, d, t in seen if s == "cluster"]
        total = [t for s, d, t in seen if s == "cluster"][0]
        assert done[-1] == (2 if when == "restart" else total - 1)  # stopped right there
    # and the refinement on its own
    cancel = threading.Event()
    cancel.set()
    head = torch.nn.Conv2d(4, 3, 1)
    maps = [torch.randn(4, 6, 6) for _ in range(2)]
    with pytest.raises(Cancelled):
        refine_for_head(head, maps, F.normalize(torch.randn(2, 3), dim=1), cancel=cancel)
