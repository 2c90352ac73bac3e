"""``StegoModel``: fit a STEGO head on a user's images, predict clusters, save and load.

Composes the stages in data-flow order: features (once, cached) -> KNN windows -> head
training -> spherical k-means on the codes -> per-pixel probabilities (-> CRF).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .appearance import (
    ColourSpace,
    appearance_map,
    stores_with_appearance,
    with_appearance,
    work_rgb,
)
from .backbones import Backbone, create_backbone, upsampled
from .cluster import ClusterConfig
from .device import resolve_device
from .errors import StegoError
from .feature_cache import ensure_features, feature_store
from .features import (
    FeatureConfig,
    extract_all,
    extract_features,
    is_single_tile,
    work_size,
)
from .fit_cluster import cluster_stage
from .head import SegmentationHead
from .intensity import to_rgb
from .io import ImageSource, image_list, open_image
from .labels import labels_dtype
from .loss import LossConfig
from .predict import (
    PredictConfig,
    cluster_probabilities,
    guided_probabilities,
    upsample_code,
)
from .tiling import TileConfig
from .train import TrainConfig, train_head
from .train_crops import training_maps

Progress = Callable[[str, int, int], None]
FORMAT_VERSION = 1


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
                 tile_config: TileConfig = TileConfig(),
                 device: str | torch.device | None = None, info: dict | None = None,
                 colour_space: ColourSpace | None = None,
                 colour_centroids: torch.Tensor | None = None) -> None:
        self.device = resolve_device(device)
        if backbone.upsample != feature_config.upsample:
            backbone = upsampled(backbone, int(feature_config.upsample))
        self.backbone = backbone.to(self.device)
        self.head = head.to(self.device).eval()
        self.centroids = centroids.to(self.device, torch.float32)
        # clusters decided with the cells' colours too (see appearance.ColourSpace)
        self.colour_space = colour_space if colour_space is not None and colour_space.active \
            and colour_centroids is not None else None
        self.colour_centroids = None if self.colour_space is None else \
            colour_centroids.to(self.device, torch.float32)
        self.feature_config = feature_config
        self.train_config = train_config
        self.cluster_config = cluster_config
        self.predict_config = predict_config
        self.tile_config = tile_config
        self.info = dict(info or {})
        self._compute_lock = threading.Lock()  # device work of lazy (dask) prediction

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, images, n_clusters: int, *, backbone: str | Backbone = "dino_vits8",
            weights: str | Path | None = None, steps: int | None = None,
            code_dim: int | None = None, device: str | torch.device | None = None,
            seed: int = 0, train: TrainConfig | None = None, loss: LossConfig | None = None,
            features: FeatureConfig | None = None, cluster: ClusterConfig | None = None,
            progress: Progress | None = None, cancel=None,
            on_loss=None, tiles: TileConfig | None = None,
            axes: str | None = None, rgb: bool | None = None, cache=None,
            data_hash: str = "auto") -> StegoModel:
        """Fit a head and ``n_clusters`` centroids on unlabelled images.

        Args:
            images: a list of ``(H, W)`` grey or ``(H, W, 3)`` arrays of any (differing) sizes,
                or an ``(N, H, W[, 3])`` stack (each image normalised on its own, as in 0.1).
                For big data: a dask / zarr array, a TIFF path, an
                :class:`~napari_stego.io.ImageSource`, or a list of these (each one
                normalised as a whole stack, features cached; see ``axes`` and ``cache``).
            n_clusters: number of clusters ``K``.
            backbone: a registered name (see :func:`~napari_stego.backbones.list_backbones`) or a
                built :class:`~napari_stego.backbones.Backbone`.
            weights: a local weights file for the backbone (offline machines).
            steps, code_dim: shortcuts for the same fields of ``train``.
            device: ``None``/"auto" (CUDA > MPS > CPU), or a device name.
            seed: makes the fit reproducible on the CPU.
            train, loss, features, cluster: stage configs (defaults: the reference's values).
            progress: ``progress(stage, done, total)`` with stages "features", "knn"
                (nearest-neighbour mining), "train", "cluster" (codes, then each k-means
                restart, then the principal-mask refinement).
            cancel: anything with ``is_set()`` (e.g. ``threading.Event``) to stop early.
            on_loss: ``on_loss(step, loss)`` for every training step, in bursts of ten steps
                (the loop reads losses back from the device once every ten steps).
            tiles: tiling of big images and the training crops of big feature maps
                (:class:`~napari_stego.tiling.TileConfig`); stored in the model.
            axes, rgb: the axes of array / file inputs (see :func:`~napari_stego.io.open_image`);
                giving ``axes`` makes a numpy stack one source with stack-wide intensities.
            cache: where backbone features of array / file inputs are kept: a folder,
                ``True`` (the default cache folder,
                :func:`~napari_stego.cache.default_cache_dir`), ``False`` (in memory) or
                ``None`` (in memory up to 512 MB of features, else the default folder). With a
                folder, refitting the same data with other ``n_clusters``, loss or training
                settings reuses the features without running the backbone.
            data_hash: how the cache recognises the data (``"auto"``, ``"full"``,
                ``"sample"``; see :func:`~napari_stego.io.data_fingerprint`).

        Raises:
            StegoError: bad images, unknown backbone, missing weights, bad ``n_clusters``, a
                feature cache that would not fit on its disk.
            Cancelled: ``cancel`` was set (features already cached stay cached).
        """
        if not isinstance(n_clusters, (int, np.integer)) or n_clusters < 1:
            raise StegoError(f"n_clusters must be a positive integer, got {n_clusters!r}")
        legacy = _legacy_input(images, axes, cache)
        if legacy:
            imgs = image_list(images)
        else:
            sources = _sources(images, axes, rgb)
        dev = resolve_device(device)
        train = train or TrainConfig()
        overrides = {k: v for k, v in dict(steps=steps, code_dim=code_dim, loss=loss).items()
                     if v is not None}
        train = replace(train, **overrides)
        for name in ("code_dim", "steps", "batch_size"):
            value = getattr(train, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
                    or value < (0 if name == "steps" else 1):
                raise StegoError(f"{name} must be an integer >= {0 if name == 'steps' else 1}, "
                                 f"got {value!r}")
        features = features or FeatureConfig()
        cluster = cluster or ClusterConfig()
        tiles = tiles or TileConfig()
        net = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, weights)
        net = upsampled(net, int(features.upsample)).to(dev)

        colour_channels = 0
        if legacy:
            maps = extract_all(net, imgs, features, dev, progress, cancel, tiles=tiles)
            n_images = len(imgs)
            if train.appearance.weight != 0:  # the cells' colours ride along for the target
                maps = with_appearance(maps, imgs, net.stride, features)
                colour_channels = 3
        else:
            maps, stats = _stores(net, sources, features, tiles, cache, dev, data_hash,
                                  progress, cancel)
            n_images = sum(src.n_planes for src in sources)
            if train.appearance.weight != 0:
                in_ram = stores_with_appearance(maps, sources, stats, net.stride, features)
                if in_ram is not None:
                    maps, colour_channels = in_ram, 3
        # 224 px of backbone input, as the reference's crops
        window = train.window or max(224 // (net.stride * net.upsample), 1)
        train_maps = training_maps(maps, window, tiles, seed=seed)
        result = train_head(train_maps, train, stride=net.stride, device=dev, seed=seed,
                            n_clusters=int(n_clusters), progress=progress, cancel=cancel,
                            on_loss=on_loss, appearance_channels=colour_channels)
        colours = None
        if colour_channels:
            colours = [m[-colour_channels:] for m in train_maps]
            train_maps = [m[:-colour_channels] for m in train_maps]
        train = replace(train, loss=result.loss)  # record the shifts actually used
        space = None
        if result.appearance_report:  # and the appearance weight
            report = result.appearance_report
            train = replace(train, appearance=replace(train.appearance, weight=report["weight"]))
            if report["weight"] > 0:
                space = ColourSpace(report["weight"], report["sigma"],
                                    train.appearance.n_fourier, seed)
        # "cluster": the codes, one step per k-means restart, then the refinement
        found = cluster_stage(result.head, train_maps, int(n_clusters), cluster, device=dev,
                              seed=seed, colours=colours, space=space, progress=progress,
                              cancel=cancel)
        # what a user can judge a fit by: how the codes split, how the loss went
        guard = found.guard
        info = dict(seed=seed, n_images=n_images, n_train_maps=len(train_maps),
                    shifts=result.shift_report,
                    appearance=result.appearance_report or dict(
                        weight=0.0, rule="not used (off, or features over 512 MB)"),
                    final_loss=float(np.mean(result.losses[-50:])) if result.losses else None,
                    cluster_shares=found.shares,
                    loss_curve=_thin(result.losses, 100),
                    guard=guard, warnings=[guard["warning"]] if guard.get("warning") else [],
                    colour_clustering=found.space is not None)
        if found.refine is not None:
            info["refine"] = found.refine
        if found.merged is not None:
            info["merged_clusters"] = found.merged
        return cls(net, found.head, found.centroids, feature_config=features,
                   train_config=train, cluster_config=cluster, tile_config=tiles, device=dev,
                   info=info, colour_space=found.space, colour_centroids=found.colour_centroids)

    # --------------------------------------------------------------- prediction
    @property
    def n_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def features(self, image: np.ndarray) -> torch.Tensor:
        """Backbone features ``(D, h, w)`` of one image (float16, CPU)."""
        return extract_features(self.backbone, _one_image(image), self.feature_config, self.device,
                                tiles=self.tile_config)

    @torch.inference_mode()
    def codes(self, image: np.ndarray) -> torch.Tensor:
        """Head codes ``(K_code, h, w)`` of one image on the backbone grid (float32, CPU)."""
        return self._head_code(self.features(image))[0].cpu()

    def _head_code(self, feats: torch.Tensor) -> torch.Tensor:
        """Features ``(D, h, w)`` -> codes ``(1, K_code, h, w)`` float32 on the model's device."""
        return self.head(feats.to(self.device, torch.float32)[None])

    @torch.inference_mode()
    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """Cluster probabilities ``(K, H, W)`` float32 at the image's resolution.

        Images bigger than one tile are computed tile by tile (see :meth:`predict_lazy`).
        """
        image = _one_image(image)
        if not self._single_tile(image):
            # in-process threads: never ship the model to a dask.distributed Client that
            # happens to exist (a dask worker, a napari console with a cluster)
            return self._lazy_one(image)[1].compute(scheduler="threads")
        return self.proba_from_features(self.features(image), image.shape[:2], image)

    @torch.inference_mode()
    def proba_from_features(self, feats: torch.Tensor, size: tuple[int, int],
                            image: np.ndarray | None = None) -> np.ndarray:
        """Cluster probabilities ``(K, H, W)`` float32 of an image of ``size`` ``(H, W)`` from
        its backbone features ``(D, h, w)`` (from :meth:`features` or a feature cache), so
        refitting on the same images need not run the backbone again. The ``image`` itself
        is needed too: the scores are up-sampled guided by its colours
        (``PredictConfig.guide``), and a model that clusters with colours
        (``model.colour_space``) scores them. Only a model with ``guide=None`` (files from
        before the guided up-sampling) and no colour space does without."""
        return self._proba(feats, size, image).cpu().numpy().astype(np.float32)

    def _proba(self, feats: torch.Tensor, size: tuple[int, int],
               image: np.ndarray | None = None) -> torch.Tensor:
        """:meth:`proba_from_features` as a ``(K, H, W)`` tensor on the model's device."""
        if self.predict_config.guide is not None:
            if image is None:
                raise StegoError("this model up-samples its cluster scores guided by the "
                                 "image's colours: pass the image too "
                                 "(proba_from_features(feats, size, image))")
            work = work_size(tuple(size), self.feature_config.min_side)
            rgb = work_rgb(to_rgb(_one_image(image), self.feature_config.intensity), work)
            return guided_probabilities(self._head_code(feats), rgb, tuple(size),
                                        self.backbone.stride, self.predict_config,
                                        self.score_parts)[0]
        code = self.upsampled_code(feats, size)
        if self.colour_space is None:
            return cluster_probabilities(code, self.centroids, self.predict_config.alpha)[0]
        if image is None:
            raise StegoError("this model clusters the codes with the image's colours: pass "
                             "the image too (proba_from_features(feats, size, image))")
        work = work_size(tuple(size), self.feature_config.min_side)
        colours = appearance_map(to_rgb(_one_image(image), self.feature_config.intensity),
                                 tuple(feats.shape[-2:]), self.backbone.stride, work)
        centroids, scores = self.score_parts(colours[None])
        return cluster_probabilities(code, centroids, self.predict_config.alpha,
                                     upsample_code(scores, self.backbone.stride, work,
                                                   tuple(size)))[0]

    def score_parts(self, colours: torch.Tensor | None):
        """The centroids :func:`~napari_stego.predict.cluster_scores` takes and the colour
        part of the scores ``(1, K, n, m)`` of cells with mean ``colours`` ``(1, 3, n, m)``
        (``None`` for a model that clusters the codes alone)."""
        if self.colour_space is None:
            return self.centroids, None
        scores = self.colour_space.colour_scores(colours.to(self.device), self.colour_centroids)
        return self.colour_space.code_weights(self.centroids), scores

    @torch.inference_mode()
    def upsampled_code(self, feats: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Codes ``(1, K_code, H, W)`` at the pixels of an image of ``size`` ``(H, W)`` from its
        backbone features ``(D, h, w)`` (bilinear, the padding and any up-sampling for the
        backbone undone), float32 on the model's device."""
        work = work_size(tuple(size), self.feature_config.min_side)
        return upsample_code(self._head_code(feats), self.backbone.stride, work, tuple(size))

    def predict(self, image: np.ndarray, *, crf=False, crf_backend: str | None = None
                ) -> np.ndarray:
        """0-based cluster indices ``(H, W)``: 0..K-1, the index into
        :meth:`predict_proba`'s first axis, in :func:`~napari_stego.labels.labels_dtype`.

        Files and layers hold ids 1..K instead (0 = no data): convert with
        :func:`napari_stego.labels.to_ids`, or write with
        :func:`napari_stego.labels.save_labels`.

        ``crf=True`` refines the probabilities with the dense CRF
        (:func:`napari_stego.crf.dense_crf`) before the argmax, ``crf=CRFConfig(...)`` with
        those settings; ``crf_backend``: ``None`` / ``"auto"``, ``"torch"`` or
        ``"pydensecrf"``. Images bigger than one tile are refined tile by tile in this
        process (no worker processes).

        Any real dtype and memory layout is accepted (read-only, strided, big-endian,
        memory-mapped). A constant or all-NaN image is not refused: it maps to flat grey and
        gets the labels the model gives a featureless image (the batch command skips such an
        image instead).

        Raises:
            StegoError: an empty image, a stack (predict each slice), channels that
                ``IntensityConfig.channels`` does not map to RGB, an unsupported dtype.
        """
        image = _one_image(image)
        dtype = labels_dtype(self.n_clusters)
        if not crf and not self._single_tile(image):
            return self._lazy_one(image)[0].compute(scheduler="threads")
        if crf is False or crf is None:
            return self.predict_proba(image).argmax(0).astype(dtype)
        from .crf import CRFConfig, default_backend, dense_crf, with_channels_of
        from .segment import refine

        config = CRFConfig() if crf is True else crf
        if isinstance(config, CRFConfig):
            config = with_channels_of(config, self.feature_config.intensity)
        backend = None if crf_backend == "auto" else crf_backend
        if (self._single_tile(image) and self.device.type == "cuda"
                and (backend or default_backend(self.device)) == "torch"):
            with torch.inference_mode():  # the probabilities stay on the GPU
                q = dense_crf(image, self._proba(self.features(image), image.shape[:2], image),
                              config=config, backend="torch")
                return q.argmax(0).to(torch.int32).cpu().numpy().astype(dtype)
        probs = refine(image, self.predict_proba(image), config=config, backend=backend,
                       single_tile=self._single_tile(image))
        return probs.argmax(0).astype(dtype)

    def _single_tile(self, image: np.ndarray) -> bool:
        return is_single_tile(image.shape[:2], self.backbone, self.feature_config,
                              self.tile_config)

    def _lazy_one(self, image: np.ndarray):
        """Lazy ``(indices, probs)`` of one in-memory image (its own percentiles): the one
        segmentation path, :class:`~napari_stego.segment.Segmentation`."""
        from .segment import Segmentation

        seg = Segmentation(self, ImageSource(image, "YX" if image.ndim == 2 else "YXC"))
        return seg.indices, seg.probs

    def extract(self, data, *, axes: str | None = None, rgb: bool | None = None, cache=True,
                data_hash: str = "auto", progress: Progress | None = None, cancel=None):
        """Compute (or find) the backbone features of an image or stack in the cache.

        Args:
            data: anything :func:`~napari_stego.io.open_image` opens.
            cache: a folder, ``True`` (the default folder), ``False`` (in memory) or
                ``None`` (in memory up to 512 MB, else the default folder).
            progress: ``progress("features", tiles_done, tiles_total)``.

        Returns:
            the complete :class:`~napari_stego.cache.FeatureStore`.

        Raises:
            StegoError: unreadable data, or a cache that would not fit on its disk.
            Cancelled: ``cancel`` was set (finished planes stay cached).
        """
        source = open_image(data, axes, rgb=rgb)
        store, _ = ensure_features(self.backbone, source, self.feature_config, self.tile_config,
                                   cache, self.device, data_hash=data_hash, progress=progress,
                                   cancel=cancel)
        return store

    def predict_lazy(self, data, *, axes: str | None = None, rgb: bool | None = None,
                     cache=None, proba: bool = False, data_hash: str = "auto",
                     progress: Progress | None = None, cancel=None):
        """Lazy segmentation of a big image or stack: dask arrays computed tile by tile.

        Args:
            data: an array, dask / zarr array, TIFF path or
                :class:`~napari_stego.io.ImageSource` of shape ``(Y, X)``, ``(Y, X, C)``,
                ``(Z|T, Y, X)``, ``(Z|T, Y, X, C)``, ``(C, Y, X)``, ... (``axes`` names them;
                see :func:`~napari_stego.io.open_image`). Intensities are mapped with one set
                of percentiles for the whole stack.
            cache: ``None``: each chunk runs the backbone on its tile plus halo when it is
                computed (nothing stored). A folder or ``True``: the features of every plane
                are computed now (batched, resumable) or found in the cache, and chunks only
                run the head on them.
            proba: also return the probabilities.
            progress: ``("features", done, total)`` while caching, then
                ``("segment", chunks_done, chunks_total)`` as chunks are computed.
            cancel: anything with ``is_set()``; chunks computed after it is set raise
                :class:`~napari_stego.errors.Cancelled`.

        Returns:
            ``labels``: dask array ``(*planes, Y, X)`` of 0-based cluster indices (0..K-1,
            as :meth:`predict`; files hold ids 1..K: write them with
            :func:`napari_stego.labels.save_labels`), the input's axes without ``C``, Y and X
            last; with ``proba=True``
            ``(labels, probs)``, ``probs`` ``(*planes, K, Y, X)`` float32. Write them with
            ``labels.to_zarr(path)`` or ``dask.array.store`` to keep memory flat.
        """
        from .segment import Segmentation

        seg = Segmentation(self, data, axes=axes, rgb=rgb, cache=cache, data_hash=data_hash,
                           progress=progress, cancel=cancel)
        return (seg.indices, seg.probs) if proba else seg.indices

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
            tile_config=asdict(self.tile_config),
            info=self.info,
            **({} if self.colour_space is None else
               dict(colour_space=asdict(self.colour_space))),
        )

    def save(self, path: str | Path) -> Path:
        """Write one portable file (safetensors tensors + JSON metadata); returns the path.

        The file is written under a temporary name and renamed, so a crash never leaves a
        half-written model.
        """
        from .modelfile import write_model_file

        path = Path(path)
        tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        tensors["centroids"] = self.centroids.detach().cpu().contiguous()
        if self.colour_space is not None:
            tensors["colour_centroids"] = self.colour_centroids.detach().cpu().contiguous()
        write_model_file(path, tensors, self.metadata())
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
        from .modelfile import model_colour_space, model_configs, read_model_file

        path = Path(path)
        if not path.is_file():
            raise StegoError(f"model file {path} does not exist")
        meta, tensors = read_model_file(path, FORMAT_VERSION)
        configs = model_configs(meta, path)
        recorded = meta["weights_source"]
        if weights is None and recorded.startswith("file:") and Path(recorded[5:]).is_file():
            weights = recorded[5:]
        backbone = create_backbone(meta["backbone"], weights)
        if backbone.dim != meta["in_dim"]:
            raise StegoError(f"{path} is a damaged model file: in_dim {meta['in_dim']} but "
                             f"{meta['backbone']} gives {backbone.dim} features")
        if backbone.fingerprint() != meta["weights_fingerprint"]:
            raise StegoError(
                f"{path} was fitted with {meta['backbone']} weights from {recorded}, but the "
                f"weights loaded now ({backbone.weights_source}) are different; pass "
                "weights=<the file used for fitting>"
            )
        train = configs["train_config"]
        head = SegmentationHead(meta["in_dim"], meta["code_dim"], train.dropout)
        head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")})
        return cls(backbone, head, tensors["centroids"],
                   feature_config=configs["feature_config"], train_config=train,
                   cluster_config=configs["cluster_config"],
                   predict_config=configs["predict_config"],
                   tile_config=configs["tile_config"], device=device, info=meta.get("info"),
                   colour_space=model_colour_space(meta, path),
                   colour_centroids=tensors.get("colour_centroids"))

    def __repr__(self) -> str:
        return (f"StegoModel(backbone={self.backbone.spec.name!r}, n_clusters={self.n_clusters}, "
                f"code_dim={self.head.code_dim}, device={str(self.device)!r})")


def _one_image(image) -> np.ndarray:
    imgs = image_list(image)
    if len(imgs) != 1:
        raise StegoError(f"expected one image, got a stack of {len(imgs)}: predict each slice")
    return imgs[0]


def _thin(values: list[float], n: int) -> list[float]:
    """At most ``n`` means of consecutive runs of ``values`` (a loss curve to store)."""
    if not values:
        return []
    chunks = np.array_split(np.asarray(values, np.float64), min(n, len(values)))
    return [round(float(c.mean()), 5) for c in chunks]


def _legacy_input(images, axes, cache) -> bool:
    """In-memory images without axes or cache: each image normalised alone, as in 0.1."""
    if axes is not None or cache not in (None, False):
        return False
    if isinstance(images, np.ndarray):
        return True
    return isinstance(images, (list, tuple)) and all(isinstance(im, np.ndarray) for im in images)


def _sources(images, axes, rgb) -> list[ImageSource]:
    if isinstance(images, (list, tuple)):
        if not images:
            raise StegoError("no images given: pass an array or a non-empty list of arrays")
        return [open_image(im, axes, rgb=rgb) for im in images]
    return [open_image(images, axes, rgb=rgb)]


def _stores(net, sources, features, tiles, cache, device, data_hash, progress, cancel) -> list:
    """Feature stores of all sources, computing what the cache lacks; progress over all."""
    from .features import count_tiles, extract_source

    opened = [feature_store(net, src, features, tiles, cache, data_hash=data_hash)
              for src in sources]
    todo = [len(store.missing()) * count_tiles(src, net, features, tiles)
            for src, (store, _) in zip(sources, opened)]
    total, offset = max(sum(todo), 1), 0
    for src, (store, stats), n in zip(sources, opened, todo):
        if store.missing():
            def sub(stage, done, _total, _offset=offset):
                if progress is not None:
                    progress(stage, _offset + done, total)

            extract_source(net, src, store, features, tiles, device, stats=stats,
                           progress=sub, cancel=cancel)
        offset += n
    if progress is not None:
        progress("features", total, total)
    return [store for store, _ in opened], [stats for _, stats in opened]
