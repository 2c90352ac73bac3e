"""Draw docs/images/guided_upsampling.png: one drawn two-channel cells image
(``benchmarks/standins.py``), its clusters with the codes up-sampled bilinearly and with the
scores up-sampled guided by the image (the default), from one fitted model.

    python docs/guided_figure.py MODEL.stego

``MODEL``: a fit on the stand-in (``python benchmarks/standins.py --kinds cells --seeds 0
--save DIR`` writes ``DIR/cells_s0.stego``). Cluster borders are drawn in white over the
image.
"""

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from standins import two_channel_cells  # noqa: E402

from napari_stego import StegoModel  # noqa: E402
from napari_stego.predict import PredictConfig  # noqa: E402


def main(model_path: str, out: str = "docs/images/guided_upsampling.png") -> None:
    model = StegoModel.load(model_path)
    images, labels = two_channel_cells(n=16, seed=100)  # the stand-in's seed-0 images
    image, truth = images[0], labels[0]
    preds = {}
    for name, guide in (("bilinear (before)", None), ("guided (default)", 0.05)):
        model.predict_config = PredictConfig(guide=guide)
        preds[name] = model.predict(image)
    ys, xs = np.nonzero(truth == 2)  # centre the crop on a nucleus
    cy, cx = int(np.median(ys)), int(np.median(xs))
    half = 64
    y0 = min(max(cy - half, 0), image.shape[0] - 2 * half)
    x0 = min(max(cx - half, 0), image.shape[1] - 2 * half)
    crop = (slice(y0, y0 + 2 * half), slice(x0, x0 + 2 * half))
    rgb = image[crop].astype(np.float32)
    rgb = rgb / max(float(rgb.max()), 1e-6)
    panels = [("image", rgb, truth[crop])] + [(n, rgb, p[crop]) for n, p in preds.items()]
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    for ax, (title, im, lab) in zip(axes, panels):
        shown = im.copy()
        shown[find_boundaries(lab, mode="inner")] = 1.0
        ax.imshow(shown, interpolation="nearest")
        ax.set_title(title if title != "image" else "image, true borders", fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:])
