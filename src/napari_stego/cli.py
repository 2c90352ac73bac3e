"""The ``napari-stego`` command.

Each sub-command parses its arguments, then makes one keyword call into the core
(:mod:`napari_stego.batch` for fit / segment, :mod:`napari_stego.evaluate` for evaluate);
heavy imports (torch, timm) happen after parsing.

Exit codes scripts can rely on:

* 0 -- done: every input has its output;
* 1 -- the job ran, but some inputs failed or were skipped (each printed on one line, and
  summarised at the end);
* 2 -- the job could not start: bad arguments, unreadable or incompatible model, no
  inputs, ... (one line, ``napari-stego: error: ...``);
* 130 -- cancelled (Ctrl-C); finished outputs are kept and a re-run resumes.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

_UNITS = {"segment": "plane", "features": "image", "codes": "file", "score": "K"}


def _progress_printer(quiet: bool):
    """A ``progress(stage, done, total)`` callback drawing tqdm bars (with ETA), one per
    stage; work already done when a stage starts (a resumed job) does not skew the ETA."""
    if quiet:
        return None
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, initial=done if stage == "segment" else 0,
                                     desc=stage,
                                     unit=_UNITS.get(stage, "step"), leave=True,
                                     dynamic_ncols=True)
        if total != bar.total:  # planes of a failed stack that will not run
            bar.total = total
            bar.refresh()
        if done > bar.n:
            bar.update(done - bar.n)
        if done >= total and not bar.disable:
            bar.close()

    return progress


def _logger(quiet: bool):
    """One line per problem on stderr (kept clear of the progress bars); notes only when
    not ``quiet``."""
    def log(message: str) -> None:
        if quiet:  # problems are listed once at the end
            return
        try:
            from tqdm import tqdm

            tqdm.write(f"napari-stego: {message}", file=sys.stderr)
        except ImportError:  # pragma: no cover
            print(f"napari-stego: {message}", file=sys.stderr)
    return log


def _print_problems(problems, what: str = "segmented") -> None:
    if problems:
        print(f"napari-stego: {len(problems)} input(s) not {what}:", file=sys.stderr)
        for r in problems:
            print(f"  {r.status}: {r.line()}", file=sys.stderr)


def cmd_fit(args: argparse.Namespace) -> int:
    """Fit a model on TIFF files / globs / folders and save it."""
    from .batch import fit_files

    report = fit_files(args.images, args.out, n_clusters=args.n_clusters, backbone=args.backbone,
                       weights=args.weights, steps=args.steps, device=args.device,
                       seed=args.seed, upsample=args.upsample, channels=args.channels,
                       tile=args.tile_size, progress=_progress_printer(args.quiet),
                       log=_logger(args.quiet))
    if not args.quiet:
        print(f"model: {report.model} (fitted on {report.n_images} images)")
    for warning in report.warnings:
        print(f"napari-stego: warning: {warning}", file=sys.stderr)
    _print_problems(report.problems, "used")
    return report.exit_code


def cmd_segment(args: argparse.Namespace) -> int:
    """Segment files with a model; resumable; local or dask.distributed."""
    from .batch import segment_files

    report = segment_files(args.model, args.images, args.out, crf=args.crf,
                           crf_backend=args.crf_backend, probabilities=args.probabilities,
                           format=args.format, overwrite=args.overwrite, scheduler=args.scheduler,
                           workers=args.workers, weights=args.weights, device=args.device,
                           progress=_progress_printer(args.quiet), log=_logger(args.quiet))
    if not args.quiet:
        print(report.summary())
    _print_problems(report.problems)
    return report.exit_code


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Hungarian-matched scores of a folder of predictions against ground truth."""
    from .evaluate import evaluate_folders

    result = evaluate_folders(args.pred_dir, args.gt_dir, n_classes=args.n_classes,
                              ignore_index=args.ignore_index, out=args.out,
                              log=_logger(args.quiet))
    if not args.quiet:
        ious = ", ".join("-" if v is None else f"{v:.1f}" for v in result["iou_per_class"])
        miou = "n/a" if result["miou"] is None else f"{result['miou']:.2f}%"
        acc = "n/a" if result["accuracy"] is None else f"{result['accuracy']:.2f}%"
        print(f"mIoU {miou}  accuracy {acc}  over {len(result['files'])} files "
              f"({result['n_clusters']} clusters, {result['n_classes']} classes)")
        print(f"IoU per class: {ious}")
        print(f"scores: {result['json']}\nconfusion matrix: {result['png']}")
    return 1 if result["problems"] else 0


class _FilePlanes:
    """The planes of each file, read one file at a time (a failed file gives ``[]`` and a
    ``"failed"`` result); ``len`` is the number of files."""

    def __init__(self, files, results: list, log) -> None:
        self.files, self.results, self.log = list(files), results, log

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self):
        from .batch import FileResult, read_planes
        from .errors import StegoError

        for path in self.files:
            try:
                planes = read_planes(path)
            except StegoError as exc:
                self.results.append(FileResult(str(path), "failed", str(exc)))
                self.log(f"failed: {self.results[-1].line()}")
                planes = []
            yield planes


def cmd_suggest_k(args: argparse.Namespace) -> int:
    """Score K = k_min..k_max on a model's codes of the images; print a table (or JSON)."""
    import json

    from .batch import expand_inputs
    from .choose_k import ChooseKConfig, suggest_for_model
    from .errors import StegoError
    from .model import StegoModel

    if not 2 <= args.k_min <= args.k_max:
        raise StegoError(f"need 2 <= --k-min <= --k-max, got {args.k_min} and {args.k_max}")
    log = _logger(args.quiet)
    files, problems = expand_inputs(args.images)
    for p in problems:
        log(f"failed: {p.line()}")
    if not files:
        raise StegoError("no images: " + ("; ".join(p.line() for p in problems)
                                          or "no inputs given"))
    model = StegoModel.load(args.model, weights=args.weights, device=args.device)
    config = ChooseKConfig(seeds=args.seeds, max_points=args.max_points, seed=args.seed)
    scores = suggest_for_model(model, _FilePlanes(files, problems, log),
                               range(args.k_min, args.k_max + 1), config=config,
                               progress=_progress_printer(args.quiet or args.json))
    if args.json:
        print(json.dumps(scores.to_dict(), indent=2))
    else:
        print(scores.table())
    _print_problems(problems, "used")
    return 1 if problems else 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fit on the bundled IHC sample with the offline backbone, segment, write the results."""
    import numpy as np
    import tifffile
    from skimage.color import label2rgb
    from skimage.io import imsave

    from .model import StegoModel
    from .samples import immunohistochemistry
    from .segment import save_segmentation

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image = immunohistochemistry()
    tiles = [image[y:y + 256, x:x + 256] for y in (0, 128, 256) for x in (0, 128, 256)]
    model = StegoModel.fit(tiles, args.n_clusters, backbone="efficientnet_lite0", steps=args.steps,
                           device=args.device, seed=args.seed, progress=_progress_printer(args.quiet))
    model_path = model.save(out / "ihc.stego")
    labels_path = save_segmentation(
        model, image, out / "ihc_labels.tif", axes="YXC", crf=args.crf or None,
        crf_backend=args.crf_backend, name="ihc clusters",
        extra={"model": {"path": str(model_path), "backbone": model.backbone.spec.name,
                         "n_clusters": model.n_clusters}, "written_by": "napari-stego demo"})
    labels = tifffile.imread(labels_path)  # ids 1..K
    overlay = label2rgb(labels.astype(np.int32), image=image, alpha=0.35, bg_label=0)
    overlay_path = out / "ihc_overlay.png"
    imsave(overlay_path, (np.clip(overlay, 0, 1) * 255).astype(np.uint8), check_contrast=False)
    print(f"model:   {model_path}\nlabels:  {labels_path}\noverlay: {overlay_path}")
    counts = np.bincount(labels.ravel(), minlength=model.n_clusters + 1)[1:] / labels.size * 100
    print("cluster areas: " + ", ".join(f"{k}: {c:.1f}%" for k, c in enumerate(counts, 1)))
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
        from .errors import StegoError, WeightsMissing

        try:
            create_backbone(args.name)  # fetches into the Hugging Face cache
        except WeightsMissing as exc:
            raise StegoError(f"cannot download the weights of {args.name}: {exc.reason}. Run "
                             "this where the Hugging Face Hub can be reached, then copy the "
                             "cache (HF_HOME) or the file over") from None
    where = weights_location(args.name)
    if where is None:
        print(f"napari-stego: weights of {args.name} are not on this machine; run "
              f"`napari-stego weights download {args.name}` where there is a network", file=sys.stderr)
        return 1
    print(where)
    return 0


def _backbone_names() -> list[str]:
    """Registered backbone names, without importing torch (kept in step by a test)."""
    return ["dino_vits8", "dino_vits16", "dino_vitb8", "dino_vitb16", "dinov2_vits14_reg",
            "dinov2_vitb14_reg", "efficientnet_lite0"]


class _Formatter(argparse.HelpFormatter):
    """Paragraphs wrapped one by one, example lines (indented) kept as written;
    ``(default: X)`` once, only for options with a default worth showing (not for required
    ones, flags, or help that already names it)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out = []
        for para in text.split("\n\n"):
            lines = para.split("\n")
            if len(lines) > 1 and all(ln.startswith("  ") for ln in lines[1:]):
                out.append("\n".join(indent + ln for ln in lines))  # a heading and examples
            else:
                out.append(super()._fill_text(para, width, indent))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required
                or action.default is None or action.default is False
                or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


_DEVICE_HELP = "auto (CUDA > MPS > CPU), cpu, cuda:N or mps"
_CRF_BACKEND_HELP = ("CRF backend: pydensecrf (the reference C++ code, needs pydensecrf2), "
                     "torch (GPU or CPU, no compiler) or auto (torch on a CUDA GPU, else "
                     "pydensecrf when installed, else torch)")
_SEED_HELP = "random seed: the same seed and data on the same CPU give the same result"
_WEIGHTS_HELP = ("backbone weights file (.pth / .safetensors), if the one the model was fitted "
                 "with is not on this machine")


def _sub(sub, name: str, help: str, description: str = "", examples: str = ""):
    return sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:],
                          epilog=("examples:\n" + examples) if examples else None,
                          formatter_class=_Formatter)


def build_parser() -> argparse.ArgumentParser:
    from . import DEFAULT_N_CLUSTERS, __version__

    parser = argparse.ArgumentParser(
        prog="napari-stego", formatter_class=_Formatter,
        description="Unsupervised semantic segmentation (STEGO) of image stacks: fit a model "
        "on unlabelled images, then segment, evaluate and choose the number of clusters.\n\n"
        "New here? `napari-stego demo` fits and segments a bundled sample, offline, in about "
        "half a minute.\n\nExit codes: 0 done; 1 some inputs failed or were skipped; 2 the "
        "job could not start; 130 cancelled.",
        epilog="examples:\n"
        "  napari-stego demo\n"
        f"  napari-stego fit images/ --out cells.stego --n-clusters {DEFAULT_N_CLUSTERS}\n"
        "  napari-stego suggest-k cells.stego images/\n"
        "  napari-stego segment cells.stego images/ --out labels/\n"
        "  napari-stego evaluate labels/ ground_truth/\n\n"
        "Run `napari-stego COMMAND --help` for the options and examples of each command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fit = _sub(sub, "fit", "fit a model on TIFF files, globs or folders",
               examples="  napari-stego fit images/ --out cells.stego\n"
               "  napari-stego fit 'data/*.tif' --out em.stego --n-clusters 2 --upsample 2\n"
               "  napari-stego fit images/ --out cells.stego --weights "
               "dino_deitsmall8_pretrain.pth   # offline")
    fit.add_argument("images", nargs="+", help="TIFF files, globs ('data/*.tif') or folders; "
                     "every plane of a stack is used")
    fit.add_argument("--out", required=True, metavar="MODEL",
                     help="model file to write (.stego; required)")
    fit.add_argument("--n-clusters", type=int, default=DEFAULT_N_CLUSTERS, metavar="K",
                     help="number of clusters K (`suggest-k` scores K = 2..12 on a fitted model)")
    fit.add_argument("--backbone", default="dino_vits8", choices=_backbone_names(),
                     metavar="NAME", help="feature backbone: " + ", ".join(_backbone_names())
                     + " (efficientnet_lite0 needs no download)")
    fit.add_argument("--weights", metavar="PATH",
                     help="local backbone weights file (.pth / .safetensors) for machines "
                          "without a network")
    fit.add_argument("--steps", type=int, default=None,
                     help="training steps (default: the training config's)")
    fit.add_argument("--upsample", type=int, default=1, metavar="N",
                     help="run the backbone on images up-sampled N times (2 or 4): features "
                          "every stride/N pixels for thin structures, N^2 times the compute")
    fit.add_argument("--channels", default=None, metavar="A,B,C|pca",
                     help="how multichannel images (2-4 fluorescence channels, a C axis) become "
                          "the backbone's RGB: three channel indices (0,1,1 for two channels) "
                          "or pca; stored in the model, so `segment` maps them the same way "
                          "(default: grey, RGB and RGBA only)")
    fit.add_argument("--tile-size", type=int, default=None, metavar="PX",
                     help="tile side in pixels for big images (default: the backbone's, 512 "
                          "for dino_vits8, 1024 for a CNN); stored in the model and used by "
                          "`segment`")
    fit.add_argument("--device", default="auto", help=_DEVICE_HELP)
    fit.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    fit.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    fit.set_defaults(func=cmd_fit)

    seg = _sub(sub, "segment", "segment TIFF files with a model (resumable; local or "
               "dask.distributed)",
               description="Write one labels file per input (same base name, same spatial "
               "shape and axes, the input's pixel size; cluster ids 1..K, 0 = no data; "
               "uint8, or uint16 for K > 255). Re-running skips finished outputs and "
               "resumes stacks plane by plane.",
               examples="  napari-stego segment cells.stego images/ --out labels/\n"
               "  napari-stego segment cells.stego 'data/*.tif' --out labels/ --crf "
               "--workers 2\n"
               "  napari-stego segment cells.stego images/ --out labels/ --scheduler "
               "tcp://head:8786")
    seg.add_argument("model", help="model file written by `fit` or the napari widget")
    seg.add_argument("images", nargs="+", help="TIFF files, globs or folders")
    seg.add_argument("--out", required=True, metavar="DIR", help="output folder (required)")
    seg.add_argument("--crf", action="store_true", help="refine with the dense CRF "
                     "(reference settings; stored in the outputs' metadata)")
    seg.add_argument("--crf-backend", choices=["auto", "torch", "pydensecrf"], default="auto",
                     help=_CRF_BACKEND_HELP)
    seg.add_argument("--probabilities", action="store_true",
                     help="also write <name>_proba (float32 K x H x W per plane)")
    seg.add_argument("--format", choices=["tif", "zarr", "ome-zarr"], default="tif",
                     help="output files: tif (zlib-compressed ImageJ TIFF with axes and pixel "
                          "size), zarr (a <name>.zarr folder, chunked by tile; for big "
                          "planes) or ome-zarr (a <name>.ome.zarr OME-NGFF image with axes, "
                          "scale and a multiscale pyramid for big planes; needs ome-zarr)")
    seg.add_argument("--overwrite", action="store_true",
                     help="recompute and replace outputs that exist")
    seg.add_argument("--scheduler", default="threads",
                     help="threads, processes, or a dask.distributed scheduler address "
                     "(tcp://host:8786)")
    seg.add_argument("--workers", type=int, default=1,
                     help="threads or processes for the local schedulers")
    seg.add_argument("--weights", metavar="PATH", help=_WEIGHTS_HELP)
    seg.add_argument("--device", default="auto", help=_DEVICE_HELP)
    seg.add_argument("--quiet", action="store_true",
                     help="no progress bar, notes or summary; problems are still printed")
    seg.set_defaults(func=cmd_segment)

    ev = _sub(sub, "evaluate", "Hungarian-matched mIoU / accuracy against ground truth",
              description="Match clusters to classes one to one (Hungarian), print mIoU and "
              "accuracy, and write evaluation.json and a confusion figure (confusion.png).",
              examples="  napari-stego evaluate labels/ ground_truth/\n"
              "  napari-stego evaluate labels/ ground_truth/ --n-classes 3 --out scores/")
    ev.add_argument("pred_dir", help="folder of predicted labels (tif or zarr)")
    ev.add_argument("gt_dir", help="folder of ground-truth class maps with the same base names "
                    "(tif or png)")
    ev.add_argument("--n-classes", type=int, default=None,
                    help="number of classes (default: largest id in the ground truth + 1)")
    ev.add_argument("--ignore-index", type=int, default=255,
                    help="ground-truth value left out of the scores")
    ev.add_argument("--out", default=None, metavar="DIR",
                    help="folder for evaluation.json and confusion.png (default: PRED_DIR)")
    ev.add_argument("--quiet", action="store_true", help="print nothing but problems")
    ev.set_defaults(func=cmd_evaluate)

    sk = _sub(sub, "suggest-k", "score numbers of clusters K on a model's codes (no labels "
              "needed)",
              description="Sample the model's code vectors over the images, run k-means for "
              "each K with several seeds, and print each K's Calinski-Harabasz index (CH), "
              "cosine silhouette and stability (mean pairwise adjusted Rand index of the "
              "runs). Suggested K: the highest CH; 'no clear K' instead when CH still rises "
              "at the largest K, the runs disagree at that K or the silhouette is flat. "
              "Refit with it: napari-stego fit ... --n-clusters K.",
              examples="  napari-stego suggest-k cells.stego images/\n"
              "  napari-stego suggest-k cells.stego images/ --k-max 8 --json > k.json")
    sk.add_argument("model", help="model file written by `fit` or the napari widget")
    sk.add_argument("images", nargs="+", help="TIFF files, globs or folders; every plane of "
                    "a stack is used")
    sk.add_argument("--k-min", type=int, default=2, help="smallest K scored (>= 2)")
    sk.add_argument("--k-max", type=int, default=12, help="largest K scored")
    sk.add_argument("--seeds", type=int, default=3,
                    help="k-means runs per K (their agreement is the stability)")
    sk.add_argument("--max-points", type=int, default=10_000,
                    help="code vectors sampled over all images")
    sk.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    sk.add_argument("--json", action="store_true",
                    help="print the scores as JSON instead of a table (no progress bars)")
    sk.add_argument("--weights", metavar="PATH", help=_WEIGHTS_HELP)
    sk.add_argument("--device", default="auto", help=_DEVICE_HELP)
    sk.add_argument("--quiet", action="store_true", help="no progress bars or notes")
    sk.set_defaults(func=cmd_suggest_k)

    demo = _sub(sub, "demo", "fit and segment the bundled sample image (offline; start here)",
                description="Fit a model on the bundled immunohistochemistry sample with the "
                "offline backbone (efficientnet_lite0), segment it, and write the model, the "
                "labels and an overlay picture to --out.",
                examples="  napari-stego demo\n  napari-stego demo --crf --out my-demo")
    demo.add_argument("--out", default="stego-demo", metavar="DIR", help="output folder")
    demo.add_argument("--n-clusters", type=int, default=DEFAULT_N_CLUSTERS, metavar="K",
                      help="number of clusters K")
    demo.add_argument("--steps", type=int, default=150, help="training steps")
    demo.add_argument("--device", default="auto", help=_DEVICE_HELP)
    demo.add_argument("--seed", type=int, default=0, help=_SEED_HELP)
    demo.add_argument("--crf", action="store_true", help="refine with the dense CRF")
    demo.add_argument("--crf-backend", choices=["auto", "torch", "pydensecrf"], default="auto",
                      help=_CRF_BACKEND_HELP)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=cmd_demo)

    weights = _sub(sub, "weights", "list, download or locate backbone weights",
                   description="Backbone weights for offline machines: `list` shows every "
                   "backbone and where its weights are; `download NAME` fetches them into the "
                   "Hugging Face cache (HF_HOME; run it where there is a network); `path NAME` "
                   "prints the local file (to copy it, or pass it as --weights).",
                   examples="  napari-stego weights list\n"
                   "  napari-stego weights download dino_vits8\n"
                   "  napari-stego weights path dino_vits8")
    weights.add_argument("action", choices=["list", "download", "path"],
                         help="list: all backbones and their weights; download: fetch NAME's "
                              "weights; path: print where NAME's weights are")
    weights.add_argument("name", nargs="?", metavar="NAME",
                         help="backbone name (see `weights list`)")
    weights.set_defaults(func=cmd_weights)
    return parser


# counts that must be positive integers where a sub-command takes them
_POSITIVE = {"steps": "--steps", "n_clusters": "--n-clusters", "workers": "--workers",
             "tile_size": "--tile-size",
             "seeds": "--seeds", "max_points": "--max-points", "n_classes": "--n-classes",
             "upsample": "--upsample"}


def _check_counts(args: argparse.Namespace) -> None:
    from .errors import StegoError

    for attr, flag in _POSITIVE.items():
        value = getattr(args, attr, None)
        if value is not None and value < 1:
            raise StegoError(f"{flag} must be a positive number, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ._workers import silenced_while
    from .errors import Cancelled, StegoError, WeightsMissing

    # --quiet: problems only, no library warnings or log lines
    quiet = silenced_while() if getattr(args, "quiet", False) else contextlib.nullcontext()
    try:
        _check_counts(args)
        with quiet:
            return args.func(args)
    except StegoError as exc:
        text = exc.advice("cli") if isinstance(exc, WeightsMissing) else str(exc)
        print(f"napari-stego: error: {text}", file=sys.stderr)
        return 2
    except (Cancelled, KeyboardInterrupt):
        print("napari-stego: cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
