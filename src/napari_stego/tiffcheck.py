"""Sizes a TIFF's header claims, checked against the file's bytes before anything is planned.

A header is a few bytes that can claim anything: a damaged or forged file that says
2**31 - 1 pixels a side would make a job plan billions of tiles (and run out of memory) or
a viewer allocate exabytes. :func:`claimed_size_problem` compares the claimed pixels with
the bytes that can hold them -- uncompressed pixels need their full size in the file;
no lossless codec packs more than :data:`MAX_RATIO` to one -- and with a sane limit on a
plane (:data:`MAX_SIDE`, :data:`MAX_PLANE_PIXELS`), before any pixel is read.
"""

from __future__ import annotations

import math
import os

MAX_SIDE = 2**20            # px, one side of a plane (1,048,576)
MAX_PLANE_PIXELS = 2**36    # px in one plane (68.7 G: e.g. 262,144 x 262,144)
MAX_RATIO = 2**16           # deflate peaks near 1,032:1, zstd / lzma below this on any data


def plane_size_problem(plane: tuple[int, int], shape: tuple[int, ...]) -> str | None:
    """Why a plane of ``plane = (Y, X)`` pixels (of a series of ``shape``) is refused, or
    ``None``."""
    if max(plane) > MAX_SIDE or math.prod(plane) > MAX_PLANE_PIXELS:
        return (f"its header claims planes of {plane[0]} x {plane[1]} pixels (shape "
                f"{' x '.join(map(str, shape))}): larger than napari-stego handles "
                f"({MAX_SIDE} px a side, {MAX_PLANE_PIXELS:,} px a plane), or a corrupt header")
    return None


def claimed_size_problem(series, path: str | os.PathLike) -> str | None:
    """Why the pixels ``series`` (a tifffile series) claims cannot be in the file at
    ``path``, or ``None``."""
    shape = tuple(int(s) for s in series.shape)
    page = series.keyframe
    bits = math.prod(shape) * max(1, int(getattr(page, "bitspersample", 8) or 8))
    size = os.path.getsize(path)
    counts = getattr(page, "databytecounts", ()) or ()
    packed = int(getattr(page, "compression", 1)) != 1 or any(c == 0 for c in counts)
    if bits > 8 * size * (MAX_RATIO if packed else 1):
        return (f"truncated or corrupt TIFF: its header claims {' x '.join(map(str, shape))} "
                f"pixels of {series.dtype} ({bits / 8:.3g} bytes"
                f"{' uncompressed' if packed else ''}) but the file has {size:,} bytes")
    return None
