"""Head training on cached feature maps: reproducible, cancellable, reports progress."""

import threading

import pytest
import torch

from napari_stego.errors import Cancelled
from napari_stego.loss import LossConfig
from napari_stego.train import TrainConfig, ema_decay, train_head

SMALL = TrainConfig(steps=6, batch_size=4, code_dim=8, window=6,
                    loss=LossConfig(feature_samples=5, neg_samples=2))


def maps(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 10 + i, 12, generator=g).half() for i in range(n)]


def test_reproducible_on_cpu_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = train_head(maps(), SMALL, seed=3, n_clusters=2)
    after = torch.rand(1)
    b = train_head(maps(), SMALL, seed=3, n_clusters=2)
    c = train_head(maps(), SMALL, seed=4, n_clusters=2)
    assert a.losses == b.losses
    assert a.losses != c.losses
    for pa, pb in zip(a.head.parameters(), b.head.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert before == after  # the global RNG stream was not consumed
    assert not a.head.training


def test_loss_decreases_on_structured_maps():
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(3, 16, generator=g)
    fmaps = []
    for i in range(4):  # maps made of three feature prototypes in vertical bands
        lab = torch.arange(18).div(6, rounding_mode="floor").roll(i * 2)
        fmaps.append((protos[lab].T[:, None, :].expand(16, 18, 18)
                      + 0.1 * torch.randn(16, 18, 18, generator=g)).half())
    cfg = TrainConfig(steps=80, batch_size=4, code_dim=8, window=12, lr=5e-3,
                      loss=LossConfig(feature_samples=6, neg_samples=2))
    losses = train_head(fmaps, cfg, seed=0, n_clusters=3).losses
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.02



def test_ema_head_is_the_running_average_of_the_trained_weights():
    """``ema_span``: the returned head holds the exponential moving average of the weights
    after each step (recomputed here from the plain run's trajectory), not the last weights."""
    from dataclasses import replace

    steps = []

    class Record(torch.optim.Adam):  # the weights after every optimiser step
        def step(self, *a, **k):
            out = super().step(*a, **k)
            steps.append([p.detach().clone() for g in self.param_groups for p in g["params"]])
            return out

    plain_adam = torch.optim.Adam
    torch.optim.Adam = Record
    try:
        plain = train_head(maps(), SMALL, seed=5, n_clusters=2)
    finally:
        torch.optim.Adam = plain_adam
    config = replace(SMALL, ema_span=0.5)  # a time constant of 3 of the 6 steps
    decay = ema_decay(config)
    assert decay == pytest.approx(2 / 3)
    ema = train_head(maps(), config, seed=5, n_clusters=2)
    assert ema.losses == plain.losses  # the average never feeds back into training
    expect = [w.clone() for w in steps[0]]  # the average starts at the first step's weights
    for weights in steps[1:]:
        expect = [decay * e + (1 - decay) * w for e, w in zip(expect, weights)]
    got = list(ema.head.parameters())
    for e, g_ in zip(expect, got):
        torch.testing.assert_close(g_, e)
    assert any(not torch.allclose(g_, p) for g_, p in zip(got, plain.head.parameters()))
    assert not ema.head.training


def test_knn_stage_reports_progress_per_chunk_and_batch_and_ends_at_total():
    """Issue 18: the mining reported 0, 1, 2 of 3, so the bar sat at 0 % while the table was
    built; now every chunk of units, of table rows and every measured batch is a step."""
    from dataclasses import replace

    from napari_stego.knn import KNN_PROGRESS_CHUNKS

    for config in (SMALL, replace(SMALL, auto_shifts=None)):
        seen = []
        train_head(maps(n=30), config, n_clusters=2,
                   progress=lambda stage, i, n: seen.append((stage, i, n)))
        knn = [(i, n) for s, i, n in seen if s == "knn"]
        done = [i for i, _ in knn]
        batches = config.auto_shifts.n_batches if config.auto_shifts else 0
        assert len(done) >= 2 * KNN_PROGRESS_CHUNKS + batches + 2
        assert done == sorted(set(done)) and done[0] == 0  # increasing, one by one
        assert {n for _, n in knn} == {done[-1]}  # one total, reached at the end
        assert seen.index(("knn", done[-1], done[-1])) < seen.index(("train", 1, config.steps))

def test_progress_and_cancel():
    seen = []
    train_head(maps(), SMALL, n_clusters=2, progress=lambda stage, i, n: seen.append((stage, i, n)))
    train = [e for e in seen if e[0] == "train"]
    assert train[0] == ("train", 1, 6) and train[-1] == ("train", 6, 6) and len(train) == 6
    knn = seen[:len(seen) - len(train)]  # nearest-neighbour mining, shifts, init: before
    assert knn and all(s == "knn" for s, _, _ in knn)
    assert knn[0][1] == 0 and knn[-1][1] == knn[-1][2]

    cancel = threading.Event()

    def stop_after_two(stage, i, n):
        if stage == "train" and i == 2:
            cancel.set()

    with pytest.raises(Cancelled, match="step 2"):
        train_head(maps(), SMALL, n_clusters=2, progress=stop_after_two, cancel=cancel)

    # and while the nearest neighbours are mined: stopped at the next "knn" step
    cancel, knn_seen = threading.Event(), []

    def stop_in_mining(stage, i, n):
        knn_seen.append((stage, i))
        if stage == "knn" and i == 1:
            cancel.set()

    with pytest.raises(Cancelled, match="preparing"):
        train_head(maps(), SMALL, n_clusters=2, progress=stop_in_mining, cancel=cancel)
    assert knn_seen[-1] == ("knn", 1)


def test_single_small_image_trains():
    result = train_head([torch.randn(16, 3, 4).half()], SMALL, n_clusters=2)
    assert len(result.losses) == 6 and all(l == l for l in result.losses)  # no NaN


def test_pca_init_keeps_feature_geometry_and_random_init_is_available():
    from napari_stego.head import SegmentationHead, init_from_features

    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=g))[0]  # features live in 4 dims
    vectors = 0.05 * torch.randn(500, 4, generator=g) @ basis.T
    head = init_from_features(SegmentationHead(32, code_dim=6).eval(), vectors)
    with torch.no_grad():
        codes = head(vectors.T[None, :, :, None])[0, :, :, 0].T
    # small-scale features: codes keep every inner product (no random bias swamps them)
    torch.testing.assert_close(codes @ codes.T, vectors @ vectors.T, atol=1e-5, rtol=1e-4)
    cfg = TrainConfig(**{**SMALL.__dict__, "init": "random", "steps": 1})
    assert len(train_head(maps(), cfg, n_clusters=2).losses) == 1


def test_loss_is_reported_live():
    seen = []
    result = train_head(maps(), SMALL, n_clusters=2, on_loss=lambda step, loss: seen.append((step, loss)))
    assert [s for s, _ in seen] == list(range(1, 7))
    assert [l for _, l in seen] == result.losses


def test_step_points_give_the_loss_of_sampled_codes_for_a_linear_head():
    """Training reads the loss's points straight from the maps and runs the head on them only:
    for a linear head (the PCA start) that is the loss of codes computed on whole windows
    (``draw_pairs``, same draws) and sampled afterwards."""
    from napari_stego.head import SegmentationHead, init_from_features
    from napari_stego.knn import draw_pairs, knn_table, make_units, unit_descriptors
    from napari_stego.loss import points_loss, sample_points
    from napari_stego.train import _sample_step

    g = torch.Generator().manual_seed(1)
    fmaps = [torch.randn(16, 8, 8 + 2 * i, generator=g).half() for i in range(4)]
    units = make_units([tuple(m.shape[-2:]) for m in fmaps])  # windows of 4: never resized
    table = knn_table(unit_descriptors(fmaps, units), 3)
    head = init_from_features(SegmentationHead(16, 6, dropout=0.0),
                              torch.cat([m.flatten(1).T.float() for m in fmaps])).eval()
    cfg = LossConfig(feature_samples=5, neg_samples=3)
    points = _sample_step(fmaps, units, table, 4, 4, cfg, torch.Generator().manual_seed(7))
    assert points.anchor.shape == (4, 16, 5, 10) and points.partner.shape == (4, 16, 5, 5)
    assert points.neg_perms.shape == (3, 4)
    got = points.loss(points.anchor, points.partner, head(points.anchor), head(points.partner), cfg)

    feats, feats_pos = draw_pairs(fmaps, units, table, 4, 4, torch.Generator().manual_seed(7))
    coords1, coords2 = points.coords
    code, code_pos = head(feats), head(feats_pos)
    g2, h2 = sample_points(feats, coords2), sample_points(code, coords2)
    negatives = [(g2[perm], h2[perm]) for perm in points.neg_perms]
    want = points_loss(sample_points(feats, coords1), sample_points(code, coords1),
                       sample_points(feats_pos, coords2), sample_points(code_pos, coords2),
                       negatives, cfg)
    for term in ("total", "self", "knn", "rand"):
        torch.testing.assert_close(getattr(got, term), getattr(want, term), rtol=1e-4, atol=1e-5)
    # the negatives are other images of the batch, sampled at the partners' points
    assert bool((points.neg_perms != torch.arange(4)).all())


def _count_host_reads(monkeypatch) -> list[int]:
    """Count, in a one-item list, every read of a tensor's values back into Python made by
    napari_stego's own code (``item``, ``tolist``, ``numpy``, ``float()``, ``int()``,
    ``bool()``, ``__index__``): each is a device synchronisation on a GPU."""
    import sys

    count = [0]
    for name in ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("napari_stego"):
                count[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return count


def test_training_loop_reads_the_host_at_most_once_every_ten_steps(monkeypatch):
    """The loop draws windows, points and negatives with tensor operations and reads the
    losses back in bursts: at most one host read per ten steps (the set-up's reads, which
    happen once per fit, cancel out in the difference of two lengths)."""
    from dataclasses import replace

    count = _count_host_reads(monkeypatch)
    reads = []
    for steps in (20, 60):
        count[0] = 0
        result = train_head(maps(), replace(SMALL, steps=steps), n_clusters=2)
        assert len(result.losses) == steps
        reads.append(count[0])
    assert (reads[1] - reads[0]) / 40 <= 0.1, reads


def test_cpu_fits_pack_float32_maps_only_up_to_the_cap(monkeypatch):
    from napari_stego import train

    small = maps()
    assert train._packed_dtype(small, torch.device("cpu")) == torch.float32
    monkeypatch.setattr(train, "CPU_FLOAT32_PACK_MB", 0)  # any real set of maps is over it
    assert train._packed_dtype(small, torch.device("cpu")) == torch.float16
    assert len(train_head(small, SMALL, n_clusters=2).losses) == SMALL.steps


def test_model_files_from_before_the_average_load_with_the_last_weights(untrained_model, tmp_path):
    """A file written before ``TrainConfig.ema_span`` existed has no such key: its head holds
    the last weights, and the loaded config must say so (not take today's default)."""
    import json
    from dataclasses import replace

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from napari_stego import StegoModel
    from napari_stego.io import META_KEY

    before = untrained_model.train_config  # the fixture is shared by the module: put it back
    untrained_model.train_config = replace(before, ema_span=0.2)
    try:
        path = untrained_model.save(tmp_path / "new.stego")
    finally:
        untrained_model.train_config = before
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[META_KEY])
    assert meta["train_config"]["ema_span"] == 0.2
    del meta["train_config"]["ema_span"]
    old = tmp_path / "old.stego"
    save_file(load_file(str(path)), str(old), metadata={META_KEY: json.dumps(meta)})
    assert StegoModel.load(old).train_config.ema_span is None
    assert StegoModel.load(path).train_config.ema_span == 0.2
