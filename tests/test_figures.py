"""The confusion figure of `napari-stego evaluate`: readable, with numbers and class names."""

import json

import numpy as np
import tifffile
from imageio.v3 import imread

from napari_stego.evaluate import evaluate_folders
from napari_stego.figures import confusion_figure, find_class_names


def _dataset(root, names=("background", "cytoplasm", "nucleus")):
    """Two 40x40 ground-truth maps of 3 classes and predictions with clusters permuted."""
    (root / "labels").mkdir(parents=True)
    (root / "pred").mkdir()
    (root / "meta.json").write_text(json.dumps({"class_names": list(names)}))
    rng = np.random.default_rng(0)
    for i in range(2):
        gt = rng.integers(0, 3, (40, 40)).astype(np.uint8)
        pred = (gt + 1) % 3  # cluster k+1 is class k
        pred[:4] = 0  # a few wrong pixels
        tifffile.imwrite(root / "labels" / f"im{i}.tif", gt)
        tifffile.imwrite(root / "pred" / f"im{i}.tif", pred)
    return root / "pred", root / "labels"


def test_evaluate_writes_a_readable_figure_with_class_names(tmp_path):
    pred, gt = _dataset(tmp_path)
    result = evaluate_folders(pred, gt)
    assert result["class_names"] == ["background", "cytoplasm", "nucleus"]
    png = imread(result["png"])
    assert png.shape[0] >= 250 and png.shape[1] >= 350  # was 72 x 72 px of bare colour
    assert png.shape[2] == 3
    assert json.loads((pred / "evaluation.json").read_text())["class_names"][2] == "nucleus"


def test_figure_has_axes_numbers_and_names(tmp_path):
    conf = np.array([[0, 5, 90], [80, 10, 0], [20, 85, 10]])  # (clusters, classes)
    assignment = np.array([2, 0, 1])  # cluster 0 -> class 2, ...
    fig = confusion_figure(conf, assignment, tmp_path / "c.png",
                           class_names=["sky", "road", "car"])
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert rows[0].startswith("sky") and "(100 px)" in rows[0]
    assert cols == ["cluster 1\n→ sky", "cluster 2\n→ road", "cluster 0\n→ car"]  # diagonal
    cells = [t.get_text() for t in ax.texts]
    assert cells[:3] == ["80", "20", "0"]  # sky: 80 of its 100 px in cluster 1
    assert ax.get_xlabel() and ax.get_ylabel()
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_class_names_from_classes_txt_or_meta_and_only_when_they_fit(tmp_path):
    (tmp_path / "gt").mkdir()
    assert find_class_names(tmp_path / "gt", 2) is None
    (tmp_path / "meta.json").write_text(json.dumps({"class_names": ["a", "b", "c"]}))
    assert find_class_names(tmp_path / "gt", 3) == ["a", "b", "c"]
    assert find_class_names(tmp_path / "gt", 2) is None  # wrong length: not these classes
    (tmp_path / "gt" / "classes.txt").write_text("cell\nmembrane\n")
    assert find_class_names(tmp_path / "gt", 2) == ["cell", "membrane"]
