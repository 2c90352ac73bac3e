"""``StegoModel``: fit a STEGO head on a user's images, predict clusters, save and load.

Composes the stages in data-flow order: features (once, cached) -> KNN windows -> head
training -> spherical k-means on the codes -> per-pixel probabilities (-> CRF).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .backbones import Backbone, create_backbone
from .cluster import ClusterConfig, spherical_kmeans
from .device import resolve_device
from .errors import StegoError
from .features import FeatureConfig, extract_all, extract_features
from .head import SegmentationHead
from .io import IntensityConfig, image_list
from .loss import LossConfig
from .shifts import AutoShiftConfig
from .predict import PredictConfig, cluster_probabilities, upsample_code
from .train import TrainConfig, train_head

Progress = Callable[[str, int, int], None]
FORMAT_VERSION = 1
_META_KEY = "napari_stego"


class StegoModel:
    """A fitted STEGO model: frozen backbone, trained head and cluster centroids.

    Build one with :meth:`fit` or :meth:`load`. ``predict`` / ``predict_proba`` work on any
    image (also ones not used for fitting), at the image's own resolution.
    """

    def __init__(self, backbone: Backbone, head: SegmentationHead, centroids: torch.Tensor, *,
                 feature_config: FeatureConfig = FeatureConfig(),
                 train_config: TrainConfig = TrainConfig(),
                 cluster_config: ClusterConfig = ClusterConfig(),
                 predict_config: PredictConfig = PredictConfig(),
                 device: str | torch.device | None = None, info: dict | None = None) -> None:
        self.device = resolve_device(device)
        self.backbone = backbone.to(self.device)
        self.head = head.to(self.device).eval()
        self.centroids = centroids.to(self.device, torch.float32)
        self.feature_config = feature_config
        self.train_config = train_config
        self.cluster_config = cluster_config
        self.predict_config = predict_config
        self.info = dict(info or {})

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, images, n_clusters: int, *, backbone: str | Backbone = "dino_vits8",
            weights: str | Path | None = None, steps: int | None = None,
            code_dim: int | None = None, device: str | torch.device | None = None,
            seed: int = 0, train: TrainConfig | None = None, loss: LossConfig | None = None,
            features: FeatureConfig | None = None, cluster: ClusterConfig | None = None,
            progress: Progress | None = None, cancel=None) -> StegoModel:
        """Fit a head and ``n_clusters`` centroids on unlabelled images.

        Args:
            images: a list of ``(H, W)`` grey or ``(H, W, 3)`` arrays of any (differing) sizes,
                or an ``(N, H, W[, 3])`` stack.
            n_clusters: number of clusters ``K``.
            backbone: a registered name (see :func:`~napari_stego.backbones.list_backbones`) or a
                built :class:`~napari_stego.backbones.Backbone`.
            weights: a local weights file for the backbone (offline machines).
            steps, code_dim: shortcuts for the same fields of ``train``.
            device: ``None``/"auto" (CUDA > MPS > CPU), or a device name.
            seed: makes the fit reproducible on the CPU.
            train, loss, features, cluster: stage configs (defaults: the reference's values).
            progress: ``progress(stage, done, total)`` with stages "features", "train",
                "cluster".
            cancel: anything with ``is_set()`` (e.g. ``threading.Event``) to stop early.

        Raises:
            StegoError: bad images, unknown backbone, missing weights, bad ``n_clusters``.
            Cancelled: ``cancel`` was set.
        """
        if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise StegoError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        imgs = image_list(images)
        dev = resolve_device(device)
        train = train or TrainConfig()
        overrides = {k: v for k, v in dict(steps=steps, code_dim=code_dim, loss=loss).items()
                     if v is not None}
        train = replace(train, **overrides)
        features = features or FeatureConfig()
        cluster = cluster or ClusterConfig()
        net = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
        net = net.to(dev)

        maps = extract_all(net, imgs, features, dev, progress, cancel)
        result = train_head(maps, train, stride=net.stride, device=dev, seed=seed,
                            n_clusters=int(n_clusters), progress=progress, cancel=cancel)
        if progress is not None:
            progress("cluster", 0, 1)
        codes = _codes_of_maps(result.head, maps, dev)
        centroids = spherical_kmeans(codes, int(n_clusters), seed=seed, config=cluster)
        if progress is not None:
            progress("cluster", 1, 1)
        train = replace(train, loss=result.loss)  # record the shifts actually used
        info = dict(seed=seed, n_images=len(imgs), shifts=result.shift_report,
                    final_loss=float(np.mean(result.losses[-50:])) if result.losses else None)
        return cls(net, result.head, centroids, feature_config=features, train_config=train,
                   cluster_config=cluster, device=dev, info=info)

    # --------------------------------------------------------------- prediction
    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def features(self, image: np.ndarray) -> torch.Tensor:
        """Backbone features ``(D, h, w)`` of one image (float16, CPU)."""
        return extract_features(self.backbone, _one_image(image), self.feature_config, self.device)

    @torch.inference_mode()
    def codes(self, image: np.ndarray) -> torch.Tensor:
        """Head codes ``(K_code, h, w)`` of one image on the backbone grid (float32, CPU)."""
        feats = self.features(image).to(self.device, torch.float32)
        return self.head(feats[None])[0].cpu()

    @torch.inference_mode()
    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Cluster probabilities ``(K, H, W)`` float32 at the image's resolution."""
        image = _one_image(image)
        code = self.codes(image).to(self.device)[None]
        work = _work_size(image.shape[:2], self.feature_config.min_side)
        code = upsample_code(code, self.backbone.stride, work, image.shape[:2])
        probs = cluster_probabilities(code, self.centroids, self.predict_config.alpha)
        return probs[0].cpu().numpy().astype(np.float32)

    def predict(self, image: np.ndarray, *, crf: bool = False) -> np.ndarray:
        """Cluster labels ``(H, W)`` (uint8, or uint16 for more than 255 clusters).

        ``crf=True`` refines the probabilities with the dense CRF
        (:func:`napari_stego.crf.dense_crf`) before the argmax.
        """
        image = _one_image(image)
        probs = self.predict_proba(image)
        if crf:
            from .crf import dense_crf

            probs = dense_crf(image, probs)
        dtype = np.uint8 if self.n_clusters <= 256 else np.uint16
        return probs.argmax(0).astype(dtype)

    # -------------------------------------------------------------- persistence
    def metadata(self) -> dict:
        """Everything that says how this model was made (stored in the model file)."""
        return dict(
            format_version=FORMAT_VERSION,
            package_version=__version__,
            backbone=self.backbone.spec.name,
            weights_source=self.backbone.weights_source,
            weights_fingerprint=self.backbone.fingerprint(),
            in_dim=self.head.in_dim,
            code_dim=self.head.code_dim,
            n_clusters=self.n_clusters,
            feature_config=asdict(self.feature_config),
            train_config=asdict(self.train_config),
            cluster_config=asdict(self.cluster_config),
            predict_config=asdict(self.predict_config),
            info=self.info,
        )

    def save(self, path: str | Path) -> Path:
        """Write one portable file (safetensors tensors + JSON metadata); returns the path.

        The file is written under a temporary name and renamed, so a crash never leaves a
        half-written model.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        tensors["centroids"] = self.centroids.detach().cpu().contiguous()
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(self.metadata())})
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, *, weights: str | Path | None = None,
             device: str | torch.device | None = None) -> StegoModel:
        """Read a model written by :meth:`save`.

        Args:
            weights: the backbone weights file, when the one recorded at fit time is not on
                this machine.

        Raises:
            StegoError: unreadable file, a newer format, or backbone weights that differ from
                the ones the model was fitted with (the message names both).
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StegoError(f"model file {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})[_META_KEY])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise StegoError(f"{path} is not a napari-stego model file ({exc})") from None
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise StegoError(f"{path} was written by napari-stego {meta.get('package_version')}, "
                             f"newer than this {__version__}: upgrade napari-stego")
        recorded = meta["weights_source"]
        if weights is None and recorded.startswith("file:") and Path(recorded[5:]).is_file():
            weights = recorded[5:]
        backbone = create_backbone(meta["backbone"], weights)
        if backbone.fingerprint() != meta["weights_fingerprint"]:
            raise StegoError(
                f"{path} was fitted with {meta['backbone']} weights from {recorded}, but the "
                f"weights loaded now ({backbone.weights_source}) are different; pass "
                "weights=<the file used for fitting>"
            )
        head = SegmentationHead(meta["in_dim"], meta["code_dim"], meta["train_config"]["dropout"])
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        return cls(backbone, head, tensors["centroids"],
                   feature_config=_feature_config(meta["feature_config"]),
                   train_config=_train_config(meta["train_config"]),
                   cluster_config=ClusterConfig(**meta["cluster_config"]),
                   predict_config=PredictConfig(**meta["predict_config"]),
                   device=device, info=meta.get("info"))

    def __repr__(self) -> str:
        return (f"StegoModel(backbone={self.backbone.spec.name!r}, n_clusters={self.n_clusters}, "
                f"code_dim={self.head.code_dim}, device={str(self.device)!r})")


def _one_image(image) -> np.ndarray:
    imgs = image_list(image)
    if len(imgs) != 1:
        raise StegoError(f"expected one image, got a stack of {len(imgs)}: predict each slice")
    return imgs[0]


def _work_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The size an image is resized to before the backbone (see ``backbone_input``)."""
    h, w = size
    short = min(h, w)
    if short >= min_side:
        return h, w
    scale = min_side / short
    return max(round(h * scale), 1), max(round(w * scale), 1)


@torch.inference_mode()
def _codes_of_maps(head: SegmentationHead, maps, device) -> torch.Tensor:
    """Codes of all feature maps as one ``(N, K)`` matrix of vectors (for clustering)."""
    out = []
    for m in maps:
        code = head(m.to(device, torch.float32)[None])[0]
        out.append(code.flatten(1).T)
    return torch.cat(out)


def _feature_config(d: dict) -> FeatureConfig:
    intensity = IntensityConfig(percentiles=tuple(d["intensity"]["percentiles"]))
    return FeatureConfig(min_side=d["min_side"], dtype=d["dtype"], intensity=intensity)


def _train_config(d: dict) -> TrainConfig:
    d = dict(d)
    d["loss"] = LossConfig(**d["loss"])
    if d.get("auto_shifts") is not None:
        d["auto_shifts"] = AutoShiftConfig(**d["auto_shifts"])
    return TrainConfig(**d)
