"""Choosing K: the scores (ARI, cosine silhouette, Calinski-Harabasz) against direct
computations, planted clusters found, codes without clusters called unclear, the model-level
helper and the ``suggest-k`` command."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from napari_stego.choose_k import (
    ChooseKConfig,
    KScore,
    KScores,
    adjusted_rand_index,
    best_k,
    calinski_harabasz,
    cosine_silhouette,
    sample_model_codes,
    suggest_for_model,
    suggest_n_clusters,
)
from napari_stego.cluster import ClusterConfig
from napari_stego.errors import Cancelled, StegoError

# fewer k-means restarts for the bigger synthetic cases (the scores, not k-means, are tested)
FAST = ChooseKConfig(cluster=ClusterConfig(n_init=3))


def planted(n_clusters: int, *, dim: int = 16, per: int = 300, noise: float = 0.15,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_clusters`` orthogonal directions on the sphere plus Gaussian noise: ``(N, dim)``
    points and their ``(N,)`` true labels."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.eye(dim)[:n_clusters] * 2.0  # any norm: the scores normalise
    x = torch.cat([d + noise * 2.0 * torch.randn(per, dim, generator=g) for d in dirs])
    return x, torch.arange(n_clusters).repeat_interleave(per)


def blobs(n_clusters: int, *, dim: int = 32, n: int = 1500, noise: float = 0.3,
          seed: int = 0) -> torch.Tensor:
    """Gaussian blobs around random centres (not orthogonal, not on the sphere), of uneven
    sizes (weights 1..4): ``(n, dim)``."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, dim, generator=g)
    weights = torch.linspace(1, 4, n_clusters)
    labels = torch.multinomial(weights / weights.sum(), n, replacement=True, generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g)


# ------------------------------------------------------------------------------------ ARI
def test_ari_known_values():
    # values from the adjusted Rand index's definition (Hubert & Arabie), as scikit-learn
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 1, 1], [7, 7, 3, 3]) == 1.0  # renaming does not matter
    assert adjusted_rand_index([0, 0, 0], [1, 1, 1]) == 1.0  # both trivial
    assert adjusted_rand_index(torch.tensor([0, 1, 1, 2]), np.array([0, 1, 1, 2])) == 1.0


def test_ari_of_independent_labelings_is_near_zero_and_matches_pair_counting():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 4000), rng.integers(0, 5, 4000)
    assert abs(adjusted_rand_index(a, b)) < 0.01
    # brute force on a small case: pair counts -> ARI
    a, b = rng.integers(0, 3, 40), rng.integers(0, 4, 40)
    i, j = np.triu_indices(40, 1)
    same_a, same_b = a[i] == a[j], b[i] == b[j]
    index, sa, sb, total = (same_a & same_b).sum(), same_a.sum(), same_b.sum(), len(i)
    expected = sa * sb / total
    ari = (index - expected) / ((sa + sb) / 2 - expected)
    assert adjusted_rand_index(a, b) == pytest.approx(ari, abs=1e-12)


# ------------------------------------------------------------------------------ silhouette
def _direct_silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    d = cdist(x, x, "cosine")
    out = []
    for i in range(len(x)):
        own = labels == labels[i]
        if own.sum() == 1:
            out.append(0.0)
            continue
        a = d[i, own].sum() / (own.sum() - 1)  # d[i, i] = 0
        b = min(d[i, labels == c].mean() for c in np.unique(labels) if c != labels[i])
        out.append((b - a) / max(a, b))
    return float(np.mean(out))


@pytest.mark.parametrize("seed", [0, 1])
def test_cosine_silhouette_matches_the_direct_pairwise_computation(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(37, 5))
    labels = rng.integers(0, 4, 37)
    labels[0] = 9  # a singleton cluster (counts 0) and non-contiguous ids
    expected = _direct_silhouette(x, labels)
    got = cosine_silhouette(torch.tensor(x), torch.tensor(labels))
    assert got == pytest.approx(expected, abs=1e-10)


def test_silhouette_is_high_for_true_labels_and_nan_for_one_cluster():
    x, truth = planted(3, per=50)
    assert cosine_silhouette(x, truth) > 0.6
    shuffled = truth[torch.randperm(len(truth), generator=torch.Generator().manual_seed(0))]
    assert abs(cosine_silhouette(x, shuffled)) < 0.1
    assert math.isnan(cosine_silhouette(x, torch.zeros(len(x), dtype=torch.long)))


# ----------------------------------------------------------------------- Calinski-Harabasz
def _direct_ch(x: np.ndarray, labels: np.ndarray) -> float:
    """trace(B) / trace(W) * (N - K) / (K - 1) from the scatter matrices, on unit rows."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = x.mean(0)
    ids = np.unique(labels)
    between = np.zeros((x.shape[1], x.shape[1]))
    within = np.zeros_like(between)
    for c in ids:
        members = x[labels == c]
        d = members.mean(0) - mean
        between += len(members) * np.outer(d, d)
        centred = members - members.mean(0)
        within += centred.T @ centred
    n, k = len(x), len(ids)
    return float(np.trace(between) / np.trace(within) * (n - k) / (k - 1))


@pytest.mark.parametrize("seed", [0, 1])
def test_calinski_harabasz_matches_the_scatter_matrices(seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(53, 6)) * rng.uniform(0.5, 3, size=(53, 1))  # any norm
    labels = rng.integers(0, 4, 53) * 3 + 1  # non-contiguous ids
    got = calinski_harabasz(torch.tensor(x), torch.tensor(labels))
    assert got == pytest.approx(_direct_ch(x, labels), rel=1e-10)
    # renaming the clusters changes nothing; one cluster or N <= K: NaN
    assert calinski_harabasz(torch.tensor(x), torch.tensor(10 - labels)) == pytest.approx(got)
    assert math.isnan(calinski_harabasz(torch.tensor(x), torch.zeros(53, dtype=torch.long)))
    assert math.isnan(calinski_harabasz(torch.tensor(x[:3]), torch.arange(3)))
    x3, truth = planted(3, per=50)
    assert calinski_harabasz(x3, truth) > 10 * calinski_harabasz(
        x3, truth[torch.randperm(150, generator=torch.Generator().manual_seed(0))])


# ------------------------------------------------------------------------- planted clusters
@pytest.mark.parametrize("k_true", [4, 6])
def test_planted_clusters_give_best_k(k_true):
    x, _ = planted(k_true, seed=k_true)
    scores = suggest_n_clusters(x, range(2, 10))
    assert scores.best == k_true, scores.table()
    assert scores.unclear == ""
    assert scores.k_values == list(range(2, 10))
    ch = {r.k: r.calinski_harabasz for r in scores.rows}
    assert max(ch, key=ch.get) == k_true
    sil = {r.k: r.silhouette for r in scores.rows}
    assert max(sil, key=sil.get) == k_true
    stab = {r.k: r.stability for r in scores.rows}
    assert stab[k_true] > 0.95
    for wrong in (k_true - 1, k_true + 1, k_true + 2):
        assert stab[k_true] > stab[wrong] + 0.05, scores.table()
    assert scores.row(k_true).smallest == pytest.approx(1 / k_true, abs=0.03)


@pytest.mark.parametrize(("k_true", "noise"), [(2, 0.6), (3, 0.6), (5, 0.3), (8, 0.3)])
def test_blobs_of_uneven_size_give_their_number(k_true, noise):
    """Blobs of known count in code space, sizes 1:4: the suggestion is their number, and
    clear (unlike the previous rule, K = 2 is not just a default: 3, 5 and 8 are found)."""
    scores = suggest_n_clusters(blobs(k_true, noise=noise, seed=k_true), range(2, 11),
                                config=FAST)
    assert scores.best == k_true, scores.table()
    assert scores.unclear == "", scores.table()


@pytest.mark.parametrize("shape", ["one Gaussian", "uniform on the sphere"])
def test_codes_without_clusters_say_no_clear_k(shape):
    """No clusters at all: whatever K scores highest, the k-means runs disagree about its
    partition, and the suggestion says so plainly instead of pretending."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1500, 32, generator=g) + (2.0 if shape == "one Gaussian" else 0.0)
    scores = suggest_n_clusters(x, range(2, 9), config=FAST)
    assert scores.unclear.startswith("no clear K:"), scores.table()
    assert "disagree" in scores.unclear or "hardly changes" in scores.unclear
    assert scores.unclear in scores.table()
    assert scores.to_dict()["unclear"] == scores.unclear


def test_scores_are_reproducible_and_depend_on_the_seed():
    x, _ = planted(3, noise=0.5, per=200)
    a = suggest_n_clusters(x, [2, 5], seed=3)
    b = suggest_n_clusters(x, [2, 5], config=ChooseKConfig(seed=3))
    assert a == b
    c = suggest_n_clusters(x, [2, 5], seed=4)
    assert [r.stability for r in c.rows] != [r.stability for r in a.rows]


def test_max_points_subsamples_and_single_seed_has_no_stability():
    x, _ = planted(4, per=500)
    scores = suggest_n_clusters(x, [3, 4, 5], max_points=600, seeds=1)
    assert scores.n_points == 600 and scores.seeds == 1
    assert all(math.isnan(r.stability) for r in scores.rows)
    assert scores.best == 4 and scores.unclear == ""  # no stability: not checked


def _row(k, ch, stab=0.95, sil=0.3):
    return KScore(k, sil, stab, stab, 0.1, ch)


def test_best_k_rule():
    rows = [_row(2, 100.0), _row(3, 180.0), _row(4, 180.0), _row(5, 150.0, sil=0.9)]
    assert best_k(rows) == 3  # the highest CH, ties to the smaller K; not the silhouette
    assert best_k([_row(2, float("nan")), _row(3, 50.0)]) == 3
    assert best_k([_row(4, float("nan")), _row(3, float("nan"))]) == 3  # none: smallest
    with pytest.raises(ValueError):
        best_k([])


def test_bad_arguments_progress_and_cancel():
    x, _ = planted(2, per=20)
    with pytest.raises(StegoError, match="at least 2"):
        suggest_n_clusters(x, [1, 2])
    with pytest.raises(StegoError, match="more than the 40"):
        suggest_n_clusters(x, [2, 41])
    with pytest.raises(StegoError, match="non-empty"):
        suggest_n_clusters(torch.zeros(0, 4), [2])
    with pytest.raises(StegoError, match="seeds"):
        suggest_n_clusters(x, [2], seeds=0)
    calls = []
    suggest_n_clusters(x, [2, 3, 4], progress=lambda *a: calls.append(a))
    assert calls == [("score", 1, 3), ("score", 2, 3), ("score", 3, 3)]
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        suggest_n_clusters(x, [2, 3], cancel=event)


def test_unclear_curves_are_said_plainly():
    """CH rising to the end of the range, falling from its start above 2, runs that
    disagree at the suggested K, or a flat silhouette: no number of classes; a peak inside
    the range with stable runs is one."""
    def scores(chs, *, start=2, stab=0.95, sils=None):
        sils = sils or [0.2 + 0.05 * i for i in range(len(chs))]
        rows = tuple(_row(k, c, stab, s) for k, c, s in zip(range(start, 99), chs, sils))
        return KScores(rows, best_k(rows), 1000, 3, "rule")

    rising = scores([100, 120, 130, 135, 140])
    assert rising.best == 6 and rising.unclear.startswith("no clear K: the suggested K (6) is "
                                                          "the largest one scored")
    assert rising.unclear in rising.table() and rising.to_dict()["unclear"] == rising.unclear
    falling = scores([200, 150, 120], start=4)
    assert falling.best == 4 and "smallest one scored; score smaller K" in falling.unclear
    assert scores([200, 150, 120]).unclear == ""  # K = 2 at the start: nothing smaller
    shaky = scores([100, 180, 150, 120], stab=0.5)
    assert shaky.best == 3 and "disagree at K = 3 (stability 0.50, under 0.8)" in shaky.unclear
    assert scores([100, 180, 150, 120], stab=float("nan")).unclear == ""  # one run
    flat = scores([100, 180, 150, 120], sils=[0.300, 0.305, 0.301, 0.299])
    assert "hardly changes" in flat.unclear
    peak = scores([100, 180, 150, 120])
    assert peak.best == 3 and peak.unclear == "" and peak.to_dict()["unclear"] is None
    strict = KScores(peak.rows, 3, 1000, 3, "rule", min_stability=0.99)
    assert "under 0.99" in strict.unclear
    x, _ = planted(4, per=100)
    assert suggest_n_clusters(x, range(2, 7)).unclear == ""  # planted clusters: clear


def test_table_and_json():
    x, _ = planted(4, per=100)
    scores = suggest_n_clusters(x, range(2, 7), current=3)
    table = scores.table()
    best_line = next(line for line in table.splitlines() if "<- best" in line)
    assert best_line.split()[0] == "4"
    assert table.splitlines()[0].split()[:3] == ["K", "CH", "silhouette"]
    assert float(best_line.split()[1]) == pytest.approx(scores.row(4).calinski_harabasz,
                                                       abs=0.5)
    assert "(model)" in next(line for line in table.splitlines() if line.split()[0] == "3")
    data = json.loads(json.dumps(scores.to_dict()))
    assert data["best"] == 4 and data["current"] == 3 and data["min_stability"] == 0.8
    assert [r["k"] for r in data["rows"]] == [2, 3, 4, 5, 6]
    assert data["rows"][2]["calinski_harabasz"] == scores.row(4).calinski_harabasz


# ------------------------------------------------------------------------------ from a model
class _FakeModel:
    """``codes(image)``: the image itself as a ``(1, h, w)`` code (one value per cell)."""

    n_clusters = 2

    def codes(self, image):
        return torch.as_tensor(np.asarray(image, np.float32))[None]


def test_code_sample_is_uniform_over_all_cells_and_bounded():
    model = _FakeModel()
    big, small = np.zeros((60, 50)), np.ones((20, 50))  # 3000 and 1000 cells
    sample = sample_model_codes(model, [big, small], max_points=1000, seed=0)
    assert sample.shape == (1000, 1)
    share_small = float(sample.mean())
    assert 0.21 < share_small < 0.29  # 1000 / 4000 of all cells (a per-image quota gives 0.5)
    # all cells when there are fewer than max_points; stacks and lazy items work
    stack = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    items = iter([stack, [], [stack[0]]])  # a generator-like iterable, an empty item
    allc = sample_model_codes(model, items, max_points=10_000)
    assert sorted(allc[:, 0].tolist()) == sorted(stack.ravel().tolist() + stack[0].ravel().tolist())
    calls = []
    sample_model_codes(model, stack, progress=lambda *a: calls.append(a))
    assert calls == [("codes", 1, 2), ("codes", 2, 2)]
    with pytest.raises(StegoError):
        sample_model_codes(model, [[]])


@pytest.fixture(scope="module")
def tiny_model(offline_backbone):
    from napari_stego import StegoModel
    from napari_stego.samples import texture_mosaics
    from napari_stego.train import TrainConfig

    images, _ = texture_mosaics(n=3, size=64, seed=1)
    model = StegoModel.fit(list(images), 3, backbone=offline_backbone,
                           train=TrainConfig(steps=4, batch_size=2), seed=0)
    return model, list(images)


def test_suggest_for_model_on_real_codes(tiny_model):
    model, images = tiny_model
    code = model.codes(images[0])
    cells = code.shape[1] * code.shape[2]
    stages = []
    scores = suggest_for_model(model, images, range(2, 6), max_points=2 * cells, seeds=2,
                               progress=lambda s, d, t: stages.append((s, d, t)))
    assert scores.current == 3 and scores.k_values == [2, 3, 4, 5]
    assert scores.n_points == 2 * cells  # 3 images' cells, sampled down
    assert scores.best in scores.k_values
    for r in scores.rows:
        assert -1 <= r.silhouette <= 1 and -1 <= r.stability <= 1
        assert r.calinski_harabasz > 0
    assert ("codes", 3, 3) in stages and stages[-1] == ("score", 4, 4)
    # the sample really is the model's codes: all vectors when max_points is large
    full = sample_model_codes(model, images, max_points=10 * cells)
    assert full.shape == (3 * cells, code.shape[0])
    own = code.flatten(1).T
    dist = torch.cdist(own, full, compute_mode="donot_use_mm_for_euclid_dist")
    assert float(dist.min(1).values.max()) < 1e-5


# ------------------------------------------------------------------------------ CLI
def test_cli_suggest_k_table_json_and_errors(tiny_model, tmp_path, capsys):
    import tifffile

    from napari_stego.cli import main

    model, images = tiny_model
    path = model.save(tmp_path / "m.stego")
    data = tmp_path / "data"
    data.mkdir()
    tifffile.imwrite(data / "a.tif", images[0])
    tifffile.imwrite(data / "stack.tif", np.stack(images[1:]), photometric="minisblack")
    args = ["suggest-k", str(path), str(data), "--k-max", "4", "--seeds", "2",
            "--device", "cpu"]
    assert main([*args, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "<- best" in out and "CH" in out and "silhouette" in out and "best K =" in out
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["k"] for r in result["rows"]] == [2, 3, 4] and result["current"] == 3
    assert result["best"] in (2, 3, 4)
    # a missing input: the rest is used, exit 1; no inputs at all: exit 2
    (data / "broken.tif").write_bytes(b"not a tiff")
    assert main([*args[:3], str(tmp_path / "nope.tif"), *args[3:], "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "nope.tif" in err and "broken.tif" in err
    assert main(["suggest-k", str(path), str(tmp_path / "none*.tif")]) == 2
    assert main(["suggest-k", str(path), str(data), "--k-min", "1"]) == 2


def test_imports_without_napari_qt_or_matplotlib_and_is_exported():
    import subprocess
    import sys

    code = ("import sys, napari_stego.choose_k, napari_stego\n"
            "assert napari_stego.suggest_n_clusters is napari_stego.choose_k.suggest_n_clusters\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in "
            "('napari', 'qtpy', 'PyQt5', 'magicgui', 'vispy', 'matplotlib')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
