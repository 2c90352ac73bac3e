"""The ``napari-stego`` command.

Each sub-command parses its arguments, then makes one keyword call into the core; heavy
imports (torch, timm) happen after parsing so ``--help`` answers at once. Errors a user can
cause are printed on one line and give exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _progress_printer(quiet: bool):
    """A ``progress(stage, done, total)`` callback drawing tqdm bars, one per stage."""
    if quiet:
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    return progress


def cmd_demo(args: argparse.Namespace) -> int:
    """Fit on the bundled IHC sample with the offline backbone, segment, write the results."""
    import numpy as np
    import tifffile
    from skimage.color import label2rgb
    from skimage.io import imsave

    from .model import StegoModel
    from .samples import immunohistochemistry

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = immunohistochemistry()
    tiles = [image[y:y + 256, x:x + 256] for y in (0, 128, 256) for x in (0, 128, 256)]
    model = StegoModel.fit(tiles, args.n_clusters, backbone="efficientnet_lite0", steps=args.steps,
                           device=args.device, seed=args.seed, progress=_progress_printer(args.quiet))
    labels = model.predict(image, crf=args.crf)
    model_path = model.save(out / "ihc.stego")
    labels_path = out / "ihc_labels.tif"
    tifffile.imwrite(labels_path, labels, compression="zlib",
                     metadata={"napari_stego": repr(model)})
    overlay = label2rgb(labels.astype(np.int32), image=image, alpha=0.35, bg_label=-1)
    overlay_path = out / "ihc_overlay.png"
    imsave(overlay_path, (np.clip(overlay, 0, 1) * 255).astype(np.uint8), check_contrast=False)
    print(f"model:   {model_path}\nlabels:  {labels_path}\noverlay: {overlay_path}")
    counts = np.bincount(labels.ravel(), minlength=model.n_clusters) / labels.size * 100
    print("cluster areas: " + ", ".join(f"{k}: {c:.1f}%" for k, c in enumerate(counts)))
    return 0


def cmd_weights(args: argparse.Namespace) -> int:
    """List, pre-fetch or locate backbone weights (for offline clusters)."""
    from .backbones import create_backbone, get_spec, list_backbones, weights_location

    if args.action == "list":
        for name in list_backbones():
            where = weights_location(name)
            print(f"{name:20s} {get_spec(name).description:55s} {where or 'not downloaded'}")
        return 0
    if not args.name:
        raise SystemExit(f"napari-stego weights {args.action}: name a backbone")
    if args.action == "download":
        create_backbone(args.name)  # fetches into the Hugging Face cache
    where = weights_location(args.name)
    if where is None:
        print(f"napari-stego: weights of {args.name} are not on this machine; run "
              f"`napari-stego weights download {args.name}` where there is a network", file=sys.stderr)
        return 1
    print(where)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="napari-stego", description="Unsupervised semantic segmentation (STEGO) of image stacks.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fit and segment the bundled sample image (offline)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--out", default="stego-demo", help="output folder")
    demo.add_argument("--n-clusters", type=int, default=3)
    demo.add_argument("--steps", type=int, default=150, help="training steps")
    demo.add_argument("--device", default="auto")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    weights = sub.add_parser("weights", help="list, download or locate backbone weights",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    weights.add_argument("action", choices=["list", "download", "path"])
    weights.add_argument("name", nargs="?", help="backbone name (see `weights list`)")
    weights.set_defaults(func=cmd_weights)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .errors import Cancelled, StegoError

    try:
        return args.func(args)
    except StegoError as exc:
        print(f"napari-stego: error: {exc}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("napari-stego: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
