"""nnU-Net's cubic resampling of a whole CT, with its spline prefilter spread over the CPU's cores, bit for bit.

nnunetv2 resamples the image with scikit-image's ``resize(order=3)``, which calls ``scipy.ndimage.zoom``: it pads
the volume (``_prepad_for_spline_filter``) and runs the cubic B-spline prefilter (``spline_filter``) single-threaded
over the full-resolution array; on a 512x512x300 CT that was 5 of the 10 s of preprocessing on the 2-core
development machine. Both are per-line operations: the prefilter filters every line along one axis, then the next
axis; the padding copies edge values. Split along another axis, each line is computed exactly as before, so the
threads write the same bits (``scipy.ndimage`` releases the GIL in these loops). :func:`parallel_prefilter`
swaps both functions inside ``scipy.ndimage.zoom`` for the duration of a block; anything they do not cover (other
modes, orders, dtypes) goes to SciPy's own.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
from scipy import ndimage
from scipy.ndimage import _interpolation

_LOCK = threading.Lock()
MIN_VOXELS = 1 << 22  # below ~4M voxels threads cost more than they save
PAD = 12  # SciPy's prepadding for mode "nearest" (and "grid-constant")


def _chunks(size: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, size, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _along(axis: int, ndim: int, lo: int, hi: int) -> tuple[slice, ...]:
    index = [slice(None)] * ndim
    index[axis] = slice(lo, hi)
    return tuple(index)


def spline_filter(pool: ThreadPoolExecutor, threads: int, stock, input, order=3, output=np.float64, mode="mirror"):
    """``scipy.ndimage.spline_filter`` with each axis pass split along the longest other axis."""
    array = np.asarray(input)
    if (order < 2 or order > 5 or array.ndim < 2 or np.iscomplexobj(array) or array.size < MIN_VOXELS
            or output is not np.float64):
        return stock(input, order, output, mode)
    result = np.empty(array.shape, np.float64)
    source = array
    for axis in range(array.ndim):
        split = max((a for a in range(array.ndim) if a != axis), key=lambda a: array.shape[a])

        def run(bounds, source=source, axis=axis, split=split):
            index = _along(split, array.ndim, *bounds)
            ndimage.spline_filter1d(source[index], order, axis, output=result[index], mode=mode)

        list(pool.map(run, _chunks(array.shape[split], threads * 2)))
        source = result
    return result


def prepad(pool: ThreadPoolExecutor, threads: int, stock, input, mode, cval):
    """``_prepad_for_spline_filter`` for mode "nearest" (``np.pad(input, 12, mode="edge")``) with the copy split
    along the first axis; other modes go to SciPy's own."""
    array = np.asarray(input)
    if mode != "nearest" or array.size < MIN_VOXELS or array.ndim < 2:
        return stock(input, mode, cval)
    padded = np.empty(tuple(s + 2 * PAD for s in array.shape), array.dtype)
    inner = tuple(slice(PAD, PAD + s) for s in array.shape)

    def copy(bounds):
        lo, hi = bounds
        padded[(slice(PAD + lo, PAD + hi), *inner[1:])] = array[lo:hi]

    list(pool.map(copy, _chunks(array.shape[0], threads * 2)))
    for axis in range(array.ndim):  # each side's pad repeats its edge plane (corners included, as np.pad does)
        size = array.shape[axis]
        low, high = _along(axis, array.ndim, 0, PAD), _along(axis, array.ndim, PAD + size, size + 2 * PAD)
        padded[low] = padded[_along(axis, array.ndim, PAD, PAD + 1)]
        padded[high] = padded[_along(axis, array.ndim, PAD + size - 1, PAD + size)]
    return padded, PAD


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def parallel_prefilter(threads: int | None = None) -> Iterator[None]:
    """Inside this block ``scipy.ndimage.zoom`` (and so scikit-image's ``resize``) prefilters with ``threads``
    threads (default: the usable cores). One block at a time; others wait. Results are identical to SciPy's."""
    threads = threads or default_threads()
    stock_filter = getattr(_interpolation, "spline_filter", None)
    stock_pad = getattr(_interpolation, "_prepad_for_spline_filter", None)
    if threads < 2 or stock_filter is None or stock_pad is None:
        yield
        return
    with _LOCK, ThreadPoolExecutor(threads, thread_name_prefix="ptqseg-prefilter") as pool:
        _interpolation.spline_filter = lambda *a, **k: spline_filter(pool, threads, stock_filter, *a, **k)
        _interpolation._prepad_for_spline_filter = lambda *a, **k: prepad(pool, threads, stock_pad, *a, **k)
        try:
            yield
        finally:
            _interpolation.spline_filter, _interpolation._prepad_for_spline_filter = stock_filter, stock_pad
