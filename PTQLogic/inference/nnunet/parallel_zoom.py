"""nnU-Net's cubic resampling of a whole CT, spread over the CPU's cores, bit for bit.

nnunetv2 resamples the image with scikit-image's ``resize(order=3)``, which calls ``scipy.ndimage.zoom``: it pads
the volume (``_prepad_for_spline_filter``), runs the cubic B-spline prefilter (``spline_filter``) over the
full-resolution array, then interpolates every output voxel (``_nd_image.zoom_shift``), all single-threaded; on a
512x512x300 CT that was 5 of the 10 s of preprocessing on the 2-core development machine, and 2.2 s more for the
interpolation. The prefilter and the padding are per-line operations: split along another axis, each line is
computed exactly as before. The interpolation computes each output voxel from its own coordinate (output index,
plus an optional shift, times the zoom); a slab of output planes starting at plane ``lo``, given ``shift = lo``
along that axis, gets every coordinate as the same double and so the same bits. ``scipy.ndimage`` releases the GIL
in these loops. :func:`parallel_zoom` swaps the three inside ``scipy.ndimage.zoom`` for the duration of a block;
anything they do not cover (other modes, orders, dtypes, ``shift``) goes to SciPy's own.
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


class _SplitInterpolation:
    """Stands in for ``scipy.ndimage._nd_image`` inside ``_interpolation``: ``zoom_shift`` split into slabs of
    output planes; every other attribute is SciPy's."""

    def __init__(self, pool: ThreadPoolExecutor, threads: int, stock_module) -> None:
        self._pool, self._threads, self._stock = pool, threads, stock_module

    def __getattr__(self, name: str):
        return getattr(self._stock, name)

    def zoom_shift(self, input, zoom, shift, output, *args, **kwargs):
        stock = self._stock.zoom_shift
        if zoom is None or shift is not None or not isinstance(output, np.ndarray) or output.ndim < 2 \
                or output.size < MIN_VOXELS // 4 or output.shape[0] < 2:
            return stock(input, zoom, shift, output, *args, **kwargs)

        def run(bounds):
            lo, hi = bounds
            offset = np.zeros(output.ndim, np.float64)
            offset[0] = lo  # an integer: kk + lo is exact, the coordinate the whole call computes for plane lo + kk
            stock(input, zoom, offset, output[lo:hi], *args, **kwargs)

        list(self._pool.map(run, _chunks(output.shape[0], self._threads * 2)))
        return None


def in_slabs(function, arrays: tuple[np.ndarray, ...], threads: int | None = None) -> None:
    """``function(*slabs)`` for slabs of ``arrays`` (one shape) along their longest axis, on ``threads`` threads
    (default: the usable cores), for element-wise work in place (NumPy releases the GIL in its loops). Small
    arrays: one call."""
    threads = threads or default_threads()
    shape = arrays[0].shape
    axis = int(np.argmax(shape)) if shape else 0
    if threads < 2 or arrays[0].size < MIN_VOXELS or len(shape) < 1 or shape[axis] < 2:
        function(*arrays)
        return

    def run(bounds):
        index = _along(axis, len(shape), *bounds)
        function(*(a[index] for a in arrays))

    with ThreadPoolExecutor(threads, thread_name_prefix="ptqseg-slabs") as pool:
        list(pool.map(run, _chunks(shape[axis], threads * 2)))


def as_float64(array: np.ndarray) -> np.ndarray:
    """``array.astype(np.float64)`` (the same values), converted in slabs on every core."""
    wide = np.empty(array.shape, np.float64)
    in_slabs(lambda out, source: np.copyto(out, source), (wide, array))
    return wide


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@contextlib.contextmanager
def parallel_zoom(threads: int | None = None) -> Iterator[None]:
    """Inside this block ``scipy.ndimage.zoom`` (and so scikit-image's ``resize``) pads, prefilters and
    interpolates with ``threads`` threads (default: the usable cores). One block at a time; others wait. Results
    are identical to SciPy's."""
    threads = threads or default_threads()
    stock_filter = getattr(_interpolation, "spline_filter", None)
    stock_pad = getattr(_interpolation, "_prepad_for_spline_filter", None)
    stock_module = getattr(_interpolation, "_nd_image", None)
    if threads < 2 or stock_filter is None or stock_pad is None or not hasattr(stock_module, "zoom_shift"):
        yield
        return
    with _LOCK, ThreadPoolExecutor(threads, thread_name_prefix="ptqseg-zoom") as pool:
        _interpolation.spline_filter = lambda *a, **k: spline_filter(pool, threads, stock_filter, *a, **k)
        _interpolation._prepad_for_spline_filter = lambda *a, **k: prepad(pool, threads, stock_pad, *a, **k)
        _interpolation._nd_image = _SplitInterpolation(pool, threads, stock_module)
        try:
            yield
        finally:
            _interpolation.spline_filter, _interpolation._prepad_for_spline_filter = stock_filter, stock_pad
            _interpolation._nd_image = stock_module
