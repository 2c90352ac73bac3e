"""Set-up of the local worker processes of ``segment_files(scheduler="processes")``.

Each worker:

* runs torch on its share of the cores;
* ends itself when the process that started it is gone (killed with SIGKILL / SIGTERM,
  crashed): a daemon thread checks every half second whether the worker was re-parented,
  and leaves with ``os._exit``. Without it a killed ``napari-stego segment`` left its
  workers (about 1 GB each) and, through them, multiprocessing's resource tracker running,
  holding the terminal's output open;
* inherits the parent's silence: with ``--quiet`` the parent ignores warnings and mutes
  tifffile's log, and the workers do the same.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings

_POLL_S = 0.5


def silenced() -> bool:
    """Whether :func:`silence` was called in this process (to hand on to workers)."""
    return logging.getLogger("tifffile").level > logging.CRITICAL


def silence() -> None:
    """No library warnings and no tifffile log lines from this process (``--quiet``)."""
    warnings.simplefilter("ignore")
    logging.getLogger("tifffile").setLevel(logging.CRITICAL + 1)


@contextlib.contextmanager
def silenced_while():
    """:func:`silence` for the duration of a ``with`` block (a ``--quiet`` command run
    in-process), then the warning filters and tifffile's log level as they were."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    with warnings.catch_warnings():
        silence()
        try:
            yield
        finally:
            logger.setLevel(level)


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent:  # re-parented: the process that started us is gone
            os._exit(1)


def init_worker(threads: int, parent: int, quiet: bool) -> None:
    """``ProcessPoolExecutor`` initializer: torch threads, parent watch, parent's silence."""
    if os.getppid() != parent:  # the parent died while this worker was starting
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="napari-stego-parent-watch").start()
    if quiet:
        silence()
    import torch

    torch.set_num_threads(max(1, threads))
