"""Running a segment job's tasks: the pool (threads, processes or dask.distributed)
and the dispatcher that feeds it planes, tiles and assemblies."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
from dataclasses import dataclass

from ..errors import StegoError
from .inputs import _describe, _merge_ranges, _range_reason, _short
from .models import _ModelRef
from .plan import _fail, _FileJob, _part_path, _skip
from .reports import BatchReport, Log, Progress
from .tasks import (_AssembleTask, _PlaneResult, _PlaneTask, _run_assemble, _run_plane,
                    _run_stats, _run_tile, _Settings, _StatsTask, _TileTask)
from .writes import _tile_part_path


class _Pool:
    """A ``concurrent.futures`` executor over threads, processes or a dask.distributed
    cluster, and how many tasks it can run at once."""

    def __init__(self, scheduler, workers: int) -> None:
        self.client = None
        self.owns_client = False
        self.local = False
        if scheduler is None or scheduler == "threads":
            self.executor = cf.ThreadPoolExecutor(max_workers=workers,
                                                  thread_name_prefix="napari-stego")
            self.local = True
            self._slots = workers
        elif scheduler == "processes":
            import multiprocessing as mp

            from .._workers import init_worker, silenced

            threads = max(1, (os.cpu_count() or 1) // workers)
            self.executor = cf.ProcessPoolExecutor(
                max_workers=workers, mp_context=mp.get_context("spawn"),
                initializer=init_worker, initargs=(threads, os.getpid(), silenced()))
            self._slots = workers
        else:
            try:
                from distributed import Client
            except ImportError:
                raise StegoError("a dask scheduler address needs dask.distributed: "
                                 "pip install distributed") from None
            if isinstance(scheduler, Client):
                self.client = scheduler
            elif isinstance(scheduler, str) and (":" in scheduler):
                import dask

                try:
                    self.client = Client(scheduler, timeout=dask.config.get(
                        "distributed.comm.timeouts.connect", "30s"))
                except Exception as exc:
                    raise StegoError(f"cannot reach the dask scheduler at {scheduler} "
                                     f"({_short(exc, 100)})") from None
                self.owns_client = True
            else:
                raise StegoError(f"unknown scheduler {scheduler!r}: use 'threads', 'processes', "
                                 "a dask scheduler address (tcp://host:8786) or a Client")
            self.executor = self.client.get_executor(pure=False)
            self._slots = 0

    @property
    def slots(self) -> int:
        if self.client is None:
            return self._slots
        workers = self.client.scheduler_info().get("workers", {})
        return max(1, sum(w.get("nthreads", 1) for w in workers.values()))

    def submit(self, fn, *args) -> cf.Future:
        return self.executor.submit(fn, *args)

    def close(self, cancel_pending: bool) -> None:
        if self.client is None:
            self.executor.shutdown(wait=True, cancel_futures=cancel_pending)
        elif self.owns_client:
            self.client.close()


def _local_dask(pool: _Pool):
    """With an in-process pool, dask work inside the planes uses local threads even when a
    distributed ``Client`` exists in this process (it would otherwise get the graphs)."""
    if not pool.local:
        return contextlib.nullcontext()
    import dask

    return dask.config.set(scheduler="threads")


class _Tally:
    """``done`` / ``total`` of one progress stage, reported on every change."""

    def __init__(self, stage: str, progress: Progress | None, done: int, total: int) -> None:
        self.stage, self.progress, self.done, self.total = stage, progress, done, total

    def report(self) -> None:
        if self.progress is not None:
            self.progress(self.stage, self.done, self.total)

    def add(self, n: int = 1) -> None:
        self.done += n
        self.report()

    def drop(self, n: int = 1) -> None:
        """``n`` units that will not run (their file failed)."""
        if n:
            self.total -= n
            self.report()


@dataclass
class _Item:
    """One task of the dispatcher: ``kind`` is ``"plane"`` (a plane predicted whole),
    ``"stats"`` or ``"tile"`` (of a tiled plane), or ``"assemble"`` (a file's output)."""

    kind: str
    job: _FileJob
    flat: int = -1
    tile: tuple[int, int] | None = None
    stats: tuple | None = None


def _dispatch(pool: _Pool, jobs: list[_FileJob], ref: _ModelRef, model, settings: _Settings,
              report: BatchReport, say: Log, cancel, planes: _Tally, tiles: _Tally) -> bool:
    """Run every job's planes or tiles (then its assembly) on the pool; True if cancelled.

    A tiled plane runs as a statistics task, then (when it is back) one task per tile; the
    tiles of a plane are queued next, so a plane's parts are finished before the next
    plane's start. At most about two tasks per worker thread are in flight.
    """
    queue: list[_Item] = []
    for j in jobs:
        if not j.done:
            for f in j.todo:
                if j.grid is None:
                    queue.append(_Item("plane", j, f))
                elif j.stats is None:  # a lone tiled plane: measure its mapping first
                    queue.append(_Item("stats", j, f))
                else:  # a stack's mapping is known: straight to the tiles
                    queue.extend(_Item("tile", j, f, t, j.stats) for t in j.tiles[f])
            j.pending = len(j.todo)
    queue.reverse()  # pop() from the end = file order
    running: dict[cf.Future, _Item] = {}
    workers: set[str] = set()
    intensity = model.feature_config.intensity
    crf_intensity = settings.crf_settings.intensity if settings.crf else None

    def submit(item: _Item) -> None:
        job = item.job
        if item.kind == "stats":
            task = _StatsTask(job.result.input, job.layout, item.flat, intensity, crf_intensity)
            running[pool.submit(_run_stats, task)] = item
        elif item.kind == "tile":
            task = _TileTask(ref, settings, job.result.input, job.layout, item.flat, item.tile,
                             job.grid, item.stats,
                             str(_tile_part_path(job.work, item.flat, item.tile)))
            running[pool.submit(_run_tile, task)] = item
        else:
            if job.layout.n_planes == 1:  # write the outputs straight away
                where = dict(labels_out=str(job.labels_out),
                             meta=dict(job.meta, blank_planes=[]),
                             proba_out=None if job.proba_out is None else str(job.proba_out))
            else:
                where = dict(part=str(_part_path(job, item.flat)))
            task = _PlaneTask(ref, settings, job.result.input, job.layout, item.flat, **where,
                              stats=job.stats)
            running[pool.submit(_run_plane, task)] = item

    def submit_assemble(job: _FileJob) -> None:
        if job.result.status == "failed":
            return
        job.assembling = True
        if len(job.blank) == job.layout.n_planes:
            _skip(job, next(iter(job.blank.values())), say)
            shutil.rmtree(job.work, ignore_errors=True)
            return
        parts = () if job.grid is not None else tuple(
            str(_part_path(job, i)) for i in range(job.layout.n_planes))
        task = _AssembleTask(settings, job.layout, model.n_clusters, parts,
                             str(job.labels_out), None if job.proba_out is None
                             else str(job.proba_out), dict(job.meta,
                                                           blank_planes=sorted(job.blank)),
                             str(job.work), None if job.grid is None else job.grid.cores)
        running[pool.submit(_run_assemble, task)] = _Item("assemble", job)

    def tile_over(job: _FileJob, flat: int) -> None:
        """One tile of plane ``flat`` finished or dropped; the plane is done after its last."""
        job.left[flat] -= 1
        if job.left[flat] > 0:
            return
        if job.done:  # its file failed: the plane will not be written
            planes.drop()
            return
        planes.add()
        reason = _range_reason(job.ranges.get(flat))
        if reason:
            job.blank[flat] = reason
        job.pending -= 1
        if job.pending == 0:
            submit_assemble(job)

    def drop(item: _Item) -> None:
        """An item of a file that failed already: it will not run."""
        if item.kind == "plane":
            planes.drop()
        elif item.kind == "stats":
            planes.drop()
            tiles.drop(len(item.job.tiles[item.flat]))
        elif item.kind == "tile":
            tiles.drop()
            tile_over(item.job, item.flat)

    for j in jobs:
        if not j.done and not j.todo:
            submit_assemble(j)

    while queue or running:
        if cancel is not None and cancel.is_set():
            for f in running:
                f.cancel()
            return True
        limit = 2 * pool.slots + 2
        while queue and len(running) < limit:
            item = queue.pop()
            if item.job.done:  # its file failed already: this will not run
                drop(item)
                continue
            submit(item)
        if not running:
            continue
        finished, _ = cf.wait(list(running), timeout=0.25, return_when=cf.FIRST_COMPLETED)
        for fut in finished:
            item = running.pop(fut)
            job, flat = item.job, item.flat
            try:
                res: _PlaneResult = fut.result()
            except cf.CancelledError:
                continue
            except Exception as exc:  # the worker died (e.g. killed for memory)
                res = _PlaneResult(flat, ok=False, message=_describe(exc, "on the worker"))
            if res.worker:
                workers.add(res.worker)
            job.result.seconds += res.seconds
            if item.kind == "assemble":
                job.done = True
                if res.ok:
                    job.result.status = "written"
                    if job.blank:
                        say(f"note: {job.result.input}: {len(job.blank)} of "
                            f"{job.layout.n_planes} planes are blank (all NaN or constant); "
                            "their labels are what the model makes of an empty field")
                else:
                    _fail(job, res.message, say)
                continue
            if item.kind == "stats":
                if not job.done and not res.ok:
                    _fail(job, res.message, say)
                if job.done:
                    drop(item)
                    continue
                queue.extend(reversed([_Item("tile", job, flat, t, res.stats)
                                       for t in job.tiles[flat]]))
                continue
            if item.kind == "tile":
                tiles.add()
                if not job.done:
                    if res.ok:
                        job.result.pixels += res.pixels
                        job.ranges[flat] = _merge_ranges(job.ranges.get(flat), res.range)
                    else:
                        _fail(job, res.message, say)
                tile_over(job, flat)
                continue
            planes.add()
            if job.done:
                continue
            if not res.ok:
                _fail(job, res.message, say)
                continue
            job.result.pixels += res.pixels
            if res.blank is not None:
                job.blank[flat] = res.blank
            if job.layout.n_planes == 1:
                job.done = True
                if res.wrote:
                    job.result.status = "written"
                else:
                    _skip(job, res.blank or "nothing to segment", say)
                continue
            job.pending -= 1
            if job.pending == 0:
                submit_assemble(job)
    report.workers = sorted(workers)
    return False
