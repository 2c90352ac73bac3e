"""Where a fit in the napari panel spends time that the same fit from the console does not.

Usage (needs a display; the viewer is shown, as a user's is):

    xvfb-run -a -s "-screen 0 1280x1024x24" python benchmarks/gui_progress.py --steps 60 --pairs 2

Fits the offline backbone on the immunohistochemistry sample (nine 256 px tiles, as the demo)
with the same seed, after a one-step warm-up fit, in interleaved pairs (console, GUI, then
GUI, console ...) so that the load of a shared machine weighs on both alike:

* console: ``StegoModel.fit`` in the main thread on what the Fit tab passes it
  (``fit_sources`` of the tiles layer: one source with its axes; ``--console-input list``
  gives the nine arrays as a list instead, the older, different computation);
* GUI: the Fit tab of the napari-stego panel (a napari ``thread_worker``) while the main
  thread runs a Qt event loop (``--wait exec``, as napari's own; ``--wait poll`` processes
  events every 5 ms, as this script did before).

For every fit it reports the wall time of each stage (from the progress callback), the CPU
seconds of the process, of the main thread, of the thread running ``StegoModel.fit``, of the
X server (Xvfb) and of the process's threads by name (OpenMP's take their creator's: "python"
or "Thread (pooled)"; Mesa's software OpenGL "llvmpipe-N"), ``torch.get_num_threads()`` in
the fitting thread, and for the GUI the progress signals, updates drawn and drawing time.
``--hide-canvas`` hides the viewer's canvas (no OpenGL redraws); ``--spinner off`` stops
napari's animated activity indicator. Prints one JSON object. Results and what they showed: docs/benchmarks.md, "GUI fit vs console
fit".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time


def _xvfb_pid() -> int | None:
    display = os.environ.get("DISPLAY", "")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"Xvfb") and display.encode() in args:
            return int(pid)
    return None


def _cpu_of(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` (0 when unknown)."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _threads() -> dict[int, tuple[str, float]]:
    """``{tid: (name, CPU seconds)}`` of this process's threads now."""
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:  # the thread ended meanwhile
            continue
        fields = tail.split()
        out[int(tid)] = (head.split("(", 1)[1],
                         (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return out


class ThreadSampler:
    """CPU seconds per thread name (``comm``: "python" for Python and OpenMP threads,
    "llvmpipe-N" for Mesa's software renderer, "QXcbEventQueue" ...) used during a fit,
    sampled every 0.25 s so that threads which end before the fit does are counted too."""

    def __init__(self) -> None:
        self.first = _threads()
        self.last = dict(self.first)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.last.update(_threads())

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.last.update(_threads())
        by_name: dict[str, float] = {}
        for tid, (name, cpu) in self.last.items():
            used = cpu - self.first.get(tid, (name, 0.0))[1]
            if used >= 0.05:
                by_name[name] = round(by_name.get(name, 0.0) + used, 2)
        return dict(sorted(by_name.items(), key=lambda kv: -kv[1]))


class Probe:
    """Times one fit: stages (first progress call of each), CPU of the threads involved."""

    def __init__(self, xvfb: int | None) -> None:
        self.xvfb = xvfb
        self.marks: list[tuple[str, float]] = []
        self.fit_thread: dict = {}

    def progress(self, stage, *_a, **_k) -> None:
        if not self.marks or self.marks[-1][0] != stage:
            self.marks.append((stage, time.perf_counter()))

    def start(self) -> None:
        self.t0 = time.perf_counter()
        self.cpu0 = sum(os.times()[:2])
        self.main0 = time.thread_time()
        self.x0 = _cpu_of(self.xvfb)
        self.sampler = ThreadSampler()

    def stop(self) -> dict:
        wall = time.perf_counter() - self.t0
        per_thread = self.sampler.stop()
        stages: dict[str, float] = {}
        ends = [t for _, t in self.marks[1:]] + [self.t0 + wall]
        if self.marks:
            stages["before_features"] = self.marks[0][1] - self.t0
        for (stage, t), end in zip(self.marks, ends):
            stages[stage] = stages.get(stage, 0.0) + end - t
        return {
            "wall_s": round(wall, 2),
            "stages_s": {k: round(v, 2) for k, v in stages.items()},
            "process_cpu_s": round(sum(os.times()[:2]) - self.cpu0, 2),
            "main_thread_cpu_s": round(time.thread_time() - self.main0, 2),
            "fit_thread_cpu_s": round(self.fit_thread.get("cpu", 0.0), 2),
            "fit_thread": self.fit_thread.get("name"),
            "torch_threads_in_fit_thread": self.fit_thread.get("torch_threads"),
            "xvfb_cpu_s": round(_cpu_of(self.xvfb) - self.x0, 2),
            "cpu_s_by_thread_name": per_thread,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--pairs", type=int, default=2, help="console + GUI fits, interleaved")
    parser.add_argument("--console-input", choices=("layer", "list"), default="layer")
    parser.add_argument("--console-thread", action="store_true",
                        help="run the console fit in a plain Python thread (joined at once)")
    parser.add_argument("--wait", choices=("exec", "poll"), default="exec")
    parser.add_argument("--hide-canvas", action="store_true")
    parser.add_argument("--spinner", choices=("on", "off"), default="on",
                        help="off: stop the animated 'in progress' indicator napari's "
                             "activity button starts with every napari progress bar (the "
                             "widgets opened one per job before 488c96a; now they draw their "
                             "own bar and this changes nothing)")
    args = parser.parse_args()

    import napari
    import numpy as np
    import torch
    from qtpy.QtCore import QEventLoop
    from qtpy.QtWidgets import QApplication

    from napari_stego import StegoModel
    from napari_stego import model as model_module
    from napari_stego._widgets import _common
    from napari_stego._widgets._fit import _spread, fit_sources
    from napari_stego._widgets._panel import StegoPanel
    from napari_stego.samples import immunohistochemistry
    from napari_stego.train import TrainConfig

    image = immunohistochemistry()
    tiles = np.stack([image[y:y + 256, x:x + 256] for y in (0, 128, 256) for x in (0, 128, 256)])
    probe: Probe | None = None
    real_fit = StegoModel.fit.__func__

    def fit(cls, *a, **k):  # records the fitting thread's CPU time and torch threads
        c0 = time.thread_time()
        try:
            return real_fit(cls, *a, **k)
        finally:
            if probe is not None:
                probe.fit_thread = {"cpu": time.thread_time() - c0,
                                    "name": threading.current_thread().name,
                                    "torch_threads": torch.get_num_threads()}

    model_module.StegoModel.fit = classmethod(fit)

    StegoModel.fit(list(tiles[:1]), 3, backbone="efficientnet_lite0", seed=0, device="cpu",
                   train=TrainConfig(steps=1))  # warm-up: imports, first backbone load

    slot = {"calls": 0, "draws": 0, "seconds": 0.0}
    relay = _common.ProgressRelay
    call, update, draw = relay.__call__, relay._update, relay._draw

    def relayed(self, stage, *a, **k):  # in the worker thread
        if probe is not None:
            probe.progress(stage)
        return call(self, stage, *a, **k)

    def counted(self, *a):
        slot["calls"] += 1
        return update(self, *a)

    def timed(self, *a):  # every drawn update, at once or after the throttle's interval
        t = time.perf_counter()
        try:
            return draw(self, *a)
        finally:
            slot["draws"] += 1
            slot["seconds"] += time.perf_counter() - t

    relay.__call__, relay._update, relay._draw = relayed, counted, timed
    if args.spinner == "off":
        from napari._qt.dialogs.qt_activity_dialog import QtActivityDialog

        add_bar = QtActivityDialog.add_progress_bar

        def add_without_spinner(self, *a, **k):
            add_bar(self, *a, **k)
            self._toggleButton._inProgressIndicator.movie().stop()

        QtActivityDialog.add_progress_bar = add_without_spinner
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1280, 1024)
    layer = viewer.add_image(tiles, name="ihc tiles", rgb=True)
    panel = StegoPanel(viewer)
    viewer.window.add_dock_widget(panel, name="napari-stego", area="right")
    canvas = viewer.window._qt_viewer.canvas.native
    if args.hide_canvas:
        canvas.setVisible(False)
    fit_tab = panel.fit
    fit_tab.backbone.value, fit_tab.n_clusters.value = "efficientnet_lite0", 3
    fit_tab.steps.value, fit_tab.device.value = args.steps, "cpu"
    app = QApplication.instance()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    xvfb = _xvfb_pid()

    def console_fit() -> dict:
        nonlocal probe
        probe = Probe(xvfb)
        probe.start()
        if args.console_input == "list":
            images = list(tiles)
        else:
            src = fit_tab.picker.sources()[0]
            images = fit_sources([(src, _spread(src.indices(), int(fit_tab.max_slices.value)))],
                                 threading.Event())
        def run() -> None:
            StegoModel.fit(images, 3, backbone="efficientnet_lite0", seed=0, device="cpu",
                           train=TrainConfig(steps=args.steps), progress=probe.progress)

        if args.console_thread:
            thread = threading.Thread(target=run, name="console-fit")
            thread.start()
            thread.join()
        else:
            run()
        return probe.stop()

    def gui_fit() -> dict:
        nonlocal probe
        probe = Probe(xvfb)
        slot.update(calls=0, draws=0, seconds=0.0)
        probe.start()
        job = fit_tab.fit()
        if args.wait == "exec":
            loop = QEventLoop()
            job.worker.finished.connect(loop.quit)
            if not job.finished:
                loop.exec_()
            while not job.finished:  # the job's own finished slot runs after ours
                app.processEvents()
        else:
            while not job.finished:
                app.processEvents()
                time.sleep(0.005)
        out = probe.stop()
        assert job.error is None, job.error
        out.update(progress_signals=slot["calls"], progress_draws=slot["draws"],
                   progress_draw_s=round(slot["seconds"], 2))
        return out

    runs = []
    for i in range(args.pairs):  # console first in even pairs, GUI first in odd ones
        if i % 2:
            gui = gui_fit()
            runs.append({"order": "gui, console", "console": console_fit(), "gui": gui})
        else:
            runs.append({"order": "console, gui", "console": console_fit(), "gui": gui_fit()})
    viewer.close()
    console = [r["console"]["wall_s"] for r in runs]
    gui = [r["gui"]["wall_s"] for r in runs]
    print(json.dumps({
        "benchmark": "gui_progress", "steps": args.steps, "pairs": args.pairs,
        "console_input": args.console_input, "console_thread": args.console_thread,
        "wait": args.wait,
        "hide_canvas": args.hide_canvas, "spinner": args.spinner,
        "layer_visible": bool(layer.visible),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch_threads_main": torch.get_num_threads(),
        "console_fit_s": console, "gui_fit_s": gui,
        "gui_over_console_median": round(statistics.median(g / c for g, c in zip(gui, console)),
                                         2),
        "runs": runs,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
