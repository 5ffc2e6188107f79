"""nnU-Net's label export for order-1 resampling, resampling exactly only where the answer is in doubt.

nnunetv2 resamples every class's logits to the input grid (``resample_data_or_seg_to_shape``: SciPy's order-1
zoom, or per slice plus nearest along a separate low-resolution axis) and takes the argmax: about 10 s per class
on one core for a 512 x 512 x 300 CT, ~25 classes per TotalSegmentator part. Order-1 values are convex
combinations of the 2**rank grid voxels around the output voxel ("corners"). Where every corner has the same top
class ``c``, ahead of the runner-up by more than one unit in the last place of the logits' dtype at the corners'
magnitude, ``c`` is ahead after interpolation and after rounding back to that dtype, so it is nnunetv2's label.
Only the other voxels (class borders, near-ties) are resampled, with SciPy's arithmetic reproduced bit for bit:
coordinate ``((k + 0.5) * zoom) - 0.5``, weights ``1 - x`` and ``1 - (1 - x)``, edge indices clamped, corners
summed in C order of ``((v * w0) * w1) * w2``, clipped to the class's range (per slice on the separate-z path) as
skimage does, rounded by NumPy. Of those, only classes that can win are evaluated: a class whose largest value
on the corners is below another class's smallest cannot be the argmax (many-class networks, noisy logits).
The labels equal nnunetv2's (tested against its export).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...core.progress import Monitor

CHUNK = 1 << 18  # doubtful voxels evaluated at once (x classes x float64)
CANDIDATES = (4, 16)  # classes evaluated per doubtful voxel (fewest, most) where no more can win in its block
SLAB_VOXELS = 1 << 21  # output voxels gathered at once (their masks and up to 24 bytes of coordinates each)


@dataclass(frozen=True)
class _Axis:
    """Where each output index of one axis reads (two grid indices) and with which weights."""

    index: tuple[torch.Tensor, torch.Tensor]
    weight: tuple[torch.Tensor, torch.Tensor]
    changes: bool


def _linear_axis(n_in: int, n_out: int) -> _Axis:
    zoom = np.divide(np.array([n_in]), np.array([n_out]))[0]
    cc = ((np.arange(n_out, dtype=np.float64) + 0.5) * zoom) - 0.5
    start = np.floor(cc)
    w0 = 1.0 - (cc - start)
    first = start.astype(np.int64)
    index = (np.clip(first, 0, n_in - 1), np.clip(first + 1, 0, n_in - 1))
    return _Axis(tuple(torch.from_numpy(i) for i in index), (torch.from_numpy(w0), torch.from_numpy(1.0 - w0)),
                 n_in != n_out)


def _nearest_axis(n_in: int, n_out: int) -> torch.Tensor:
    """map_coordinates(order=0, mode="nearest") along the separate axis, as nnunetv2 computes its coordinates."""
    cc = float(n_in) / n_out * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
    return torch.from_numpy(np.clip(np.floor(cc + 0.5).astype(np.int64), 0, n_in - 1))


def order_one_kwargs(configuration: dict[str, Any]) -> dict[str, Any] | None:
    """``{"force_separate_z": ...}`` when the plans resample probabilities with SciPy at order 1 (nearest along a
    separate axis), which this module reproduces; None otherwise."""
    if configuration.get("resampling_fn_probabilities") != "resample_data_or_seg_to_shape":
        return None
    kwargs = dict(configuration.get("resampling_fn_probabilities_kwargs") or {})
    if kwargs.pop("is_seg", False) or kwargs.pop("order", 3) != 1 or kwargs.pop("order_z", 0) != 0:
        return None
    force = kwargs.pop("force_separate_z", False)
    return None if kwargs else {"force_separate_z": force}


class _Plan:
    """The resampling of one export: per-axis tables, which axes interpolate, the separate axis if any."""

    def __init__(self, grid: Sequence[int], shape: Sequence[int], separate_axis: int | None):
        self.rank = len(grid)
        self.grid = tuple(int(g) for g in grid)
        self.separate = separate_axis
        self.axes = {a: _linear_axis(grid[a], shape[a]) for a in range(self.rank) if a != separate_axis}
        self.nearest = None if separate_axis is None else _nearest_axis(grid[separate_axis], shape[separate_axis])
        self.corner_axes = [a for a, axis in self.axes.items() if axis.changes]

    @classmethod
    def of(cls, logits: torch.Tensor, shape: Sequence[int], current_spacing: Sequence[float],
           new_spacing: Sequence[float], force_separate_z: bool | None) -> "_Plan":
        """nnunetv2's choice of a separate low-resolution axis, then the tables for it."""
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis

        separate, axis = determine_do_sep_z_and_axis(force_separate_z, current_spacing, new_spacing)
        return cls(logits.shape[1:], shape, axis if separate else None)

    def start(self, a: int) -> torch.Tensor:
        """The grid index each output index of axis ``a`` reads first (its block's origin)."""
        return self.nearest if a == self.separate else self.axes[a].index[0]


def resampled_labels(logits: torch.Tensor, shape: Sequence[int], current_spacing: Sequence[float],
                     new_spacing: Sequence[float], force_separate_z: bool | None, dtype,
                     monitor: Monitor | None = None, stage: str = "export",
                     counts: dict[str, int] | None = None) -> np.ndarray:
    """argmax over classes of ``resample_data_or_seg_to_shape(logits, shape, ..., order=1, order_z=0)``;
    progress: the grid pass, then each slab of output slices; cancel between them and between the grid pass's
    classes (a many-class part's pass takes seconds). ``counts``, if given,
    receives the output voxels, how many of them were resampled exactly, and how many of those were decided
    among their block's candidate classes only."""
    monitor = monitor or Monitor()
    rows = max(1, SLAB_VOXELS // int(np.prod(shape[1:])))
    slabs = range(0, shape[0], rows)
    monitor.check()
    monitor.update(stage, 0, len(slabs) + 1)
    plan = _Plan.of(logits, shape, current_spacing, new_spacing, force_separate_z)
    top, certain = _certain_on_grid(logits, plan, monitor.check)
    doubt = ~certain
    bounds, by_voxel, candidates, flat_logits = _class_ranges(logits, plan), None, None, None
    origins = [plan.start(a) for a in range(plan.rank)]
    labels = np.empty(tuple(shape), dtype=dtype)
    resampled = by_candidates = 0
    for done, first in enumerate(slabs, start=1):
        monitor.check()
        monitor.update(stage, done, len(slabs) + 1)
        # each output voxel's block origin on the grid, one axis at a time (torch's gathers use every core)
        labels[first:first + rows] = _gather(top, [origins[0][first:first + rows], *origins[1:]]).numpy()
        doubtful = torch.nonzero(_gather(doubt, [origins[0][first:first + rows], *origins[1:]]))
        doubtful[:, 0] += first
        resampled += len(doubtful)
        for chunk in range(0, len(doubtful), CHUNK):
            if candidates is None and logits.shape[0] > 2 * CANDIDATES[0]:
                candidates = _block_candidates(logits, plan, monitor.check)
                flat_logits = logits.reshape(-1)  # a view if contiguous
            where = doubtful[chunk:chunk + CHUNK]
            chosen, many = _chosen(candidates, plan, where)
            if chosen is not None:
                labels[tuple(where[~many].T.numpy())] = _candidate_labels(flat_logits, logits.dtype, plan,
                                                                          where[~many], bounds, chosen)
                by_candidates += len(chosen)
                where = where[many]
            if len(where):
                by_voxel = _by_voxel(logits) if by_voxel is None else by_voxel
                labels[tuple(where.T.numpy())] = _exact_values(by_voxel, plan, where, bounds).argmax(axis=1)
    monitor.update(stage, len(slabs) + 1, len(slabs) + 1)
    if counts is not None:
        counts.update(voxels=int(np.prod(shape)), resampled=resampled, by_candidates=by_candidates)
    return labels


def resampled_values(logits: torch.Tensor, shape: Sequence[int], current_spacing: Sequence[float],
                     new_spacing: Sequence[float], force_separate_z: bool | None, where: torch.Tensor) -> np.ndarray:
    """(classes, n) values of ``resample_data_or_seg_to_shape(logits, shape, ..., order=1, order_z=0)`` at the
    output voxels ``where`` (n, rank), bit for bit, in the logits' dtype."""
    plan = _Plan.of(logits, shape, current_spacing, new_spacing, force_separate_z)
    return _exact_values(_by_voxel(logits), plan, where, _class_ranges(logits, plan)).T


def _gather(grid: torch.Tensor, indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``grid[np.ix_(*indices)]``, one axis at a time."""
    for axis, index in enumerate(indices):
        grid = grid.index_select(axis, index)
    return grid


def _certain_on_grid(logits: torch.Tensor, plan: _Plan,
                     check: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top class per grid voxel, and whether every block of corners starting there keeps it ahead by > 1 ulp;
    ``check`` is called before each class (it raises to cancel)."""
    info = np.finfo(torch.empty(0, dtype=logits.dtype).numpy().dtype)
    if logits.shape[0] == 1:
        return torch.zeros(logits.shape[1:], dtype=torch.uint8), torch.ones(logits.shape[1:], dtype=torch.bool)
    top, first, second, lowest = _top_two(logits, check)  # (its float32 buffers are ours to overwrite)
    margin = first.double().sub_(second)
    threshold = torch.maximum(first.abs_(), lowest.abs_()).double()
    threshold.mul_(float(info.eps) + 2.0**-40).add_(float(info.smallest_subnormal))
    # each block: the grid voxel and its successors along every interpolated axis; one spare buffer per dtype
    low, spare = _over_block(top.clone(), plan, torch.minimum, torch.empty_like(top))
    high, _ = _over_block(top.clone(), plan, torch.maximum, spare)
    margin, spare = _over_block(margin, plan, torch.minimum, torch.empty_like(margin))
    threshold, _ = _over_block(threshold, plan, torch.maximum, spare)
    return top.to(torch.uint8 if logits.shape[0] < 256 else torch.int16), (low == high) & (margin > threshold)


def _top_two(logits: torch.Tensor, check: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, ...]:
    """Per grid voxel: index of the first largest class, the largest and second largest value (equal on a tie)
    and the smallest, in float32 (exact for fp16), one class at a time (torch.topk over classes is slow) in
    buffers made once: fresh ones per class brought in gigabytes of new pages per part."""
    first = logits[0].to(torch.float32, copy=True)  # never the caller's tensor: it is updated in place
    top = torch.zeros(first.shape, dtype=torch.int16)
    second = torch.full_like(first, float("-inf"))
    lowest = first.clone()
    value, runner = torch.empty_like(first), torch.empty_like(first)
    better = torch.empty(first.shape, dtype=torch.bool)
    for k in range(1, logits.shape[0]):
        check()
        value.copy_(logits[k])
        torch.gt(value, first, out=better)
        torch.maximum(second, torch.where(better, first, value, out=runner), out=second)
        torch.maximum(first, value, out=first)
        top.masked_fill_(better, k)
        torch.minimum(lowest, value, out=lowest)
    return top, first, second, lowest


def _by_voxel(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(logits.shape[0], -1).T.contiguous()


def _class_ranges(logits: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """What skimage clips to: each class's min and max, over the volume or (separate axis) over each slice."""
    flat = logits.movedim(plan.separate + 1, 1).flatten(2) if plan.separate is not None else logits.flatten(1)
    return flat.amin(dim=-1).double(), flat.amax(dim=-1).double()


def _over_block(values: torch.Tensor, plan: _Plan, reduce, spare: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``reduce`` of each voxel with its successors along the interpolated axes (``reduce(v, v[i + 1])``, the last
    entry reduced with itself, so as it is), passed back and forth between ``values`` and ``spare`` (same shape
    and dtype; both are overwritten). Returns (the result, the other buffer, free for the caller's next use)."""
    for a in plan.corner_axes:
        n = values.shape[a]
        reduce(values.narrow(a, 0, n - 1), values.narrow(a, 1, n - 1), out=spare.narrow(a, 0, n - 1))
        spare.narrow(a, n - 1, 1).copy_(values.narrow(a, n - 1, 1))
        values, spare = spare, values
    return values, spare


def _block_candidates(logits: torch.Tensor, plan: _Plan,
                      check: Callable[[], None] = lambda: None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block of corners (by its grid origin): how many classes can be the argmax somewhere in it, and the first
    k of them in class order (the rest of a row repeats its first); k grows with the classes, within CANDIDATES.
    A class cannot win where its largest corner value is below another class's smallest: interpolated values lie
    between their corners' (up to float64 rounding, far below the logits' ulp), the corners are numbers of the
    logits' dtype, and the clip keeps each class within its own range, so after rounding back to that dtype the
    one is at most its largest corner and the other at least its smallest: strictly below, never a tie."""
    wide = torch.promote_types(logits.dtype, torch.float32)  # exact: fp16 and fp32 values as they are
    # two buffers for every class's block bounds (fresh tensors per class brought in gigabytes of new pages)
    first, second = (torch.empty(logits.shape[1:], dtype=wide) for _ in range(2))
    floor = None
    for c in range(logits.shape[0]):
        check()
        low, _ = _over_block(first.copy_(logits[c]), plan, torch.minimum, second)
        floor = low.clone() if floor is None else torch.maximum(floor, low, out=floor)
    k = min(CANDIDATES[1], max(CANDIDATES[0], logits.shape[0] // 6))  # 24 classes: 4, 96 or more: 16
    count = torch.zeros(logits.shape[1:].numel(), dtype=torch.int16)
    chosen = torch.zeros((k, count.numel()), dtype=torch.uint8 if logits.shape[0] <= 256 else torch.int16)
    can, room = (torch.empty(count.numel(), dtype=torch.bool) for _ in range(2))
    step = torch.empty_like(count)  # count += can would make a fresh int16 copy of can for every class
    for c in range(logits.shape[0]):
        check()
        high, _ = _over_block(first.copy_(logits[c]), plan, torch.maximum, second)
        torch.ge(high.flatten(), floor.flatten(), out=can)
        hit = torch.nonzero(torch.logical_and(can, torch.lt(count, k, out=room), out=room)).squeeze(1)
        chosen[count[hit].long(), hit] = c  # few blocks per class: write only those
        count += step.copy_(can)
    for slot in range(1, k):
        chosen[slot] = torch.where(count > slot, chosen[slot], chosen[0])
    return count, chosen


def _chosen(candidates, plan: _Plan, where: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The candidate classes (n', k) of the voxels ``where`` whose block has few enough, and which
    voxels have more (evaluated with every class)."""
    if candidates is None:
        return None, torch.ones(len(where), dtype=torch.bool)
    count, chosen = candidates
    origin, _ = next(_corners(plan, where))  # the first corner is the block's origin
    many = count[origin] > chosen.shape[0]
    return chosen[:, origin[~many]].T.long(), many


def _candidate_labels(flat_logits: torch.Tensor, dtype: torch.dtype, plan: _Plan, where: torch.Tensor, bounds,
                      chosen: torch.Tensor) -> np.ndarray:
    """The argmax label at output voxels ``where`` among their ``chosen`` classes (n, k, ascending, so the
    first largest is the first largest over every class), each value computed as :func:`_exact_values` does;
    ``flat_logits``: the (classes, *grid) logits flattened."""
    offset = chosen * int(np.prod(plan.grid))
    total = _interpolated(lambda flat: flat_logits[offset + flat.unsqueeze(1)], plan, where)
    low, high = bounds
    if plan.separate is not None:
        slices = plan.nearest[where[:, plan.separate]].unsqueeze(1).expand_as(chosen)
        low, high = low[chosen, slices], high[chosen, slices]
    else:
        low, high = low[chosen], high[chosen]
    values = torch.minimum(torch.maximum(total, low), high).numpy().astype(_numpy_dtype(dtype))
    return chosen.numpy()[np.arange(len(chosen)), values.argmax(axis=1)]


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


def _corners(plan: _Plan, where: torch.Tensor):
    """(flat grid index, weights in axis order) of each corner of the output voxels ``where``, in SciPy's order
    (the first: the block's origin)."""
    strides = np.cumprod((1, *plan.grid[:0:-1]))[::-1]
    base = torch.zeros(where.shape[0], dtype=torch.int64)
    offsets, weights = {}, {}
    for a in range(plan.rank):
        at = where[:, a]
        if a == plan.separate:
            base += plan.nearest[at] * int(strides[a])
        elif a not in plan.corner_axes:  # the same for every corner
            base += plan.axes[a].index[0][at] * int(strides[a])
        else:
            for side in (0, 1):
                offsets[a, side] = plan.axes[a].index[side][at] * int(strides[a])
                weights[a, side] = plan.axes[a].weight[side][at].unsqueeze(1)
    for corner in itertools.product((0, 1), repeat=len(plan.corner_axes)):
        flat = base
        for a, side in zip(plan.corner_axes, corner):
            flat = flat + offsets[a, side]
        yield flat, [weights[a, side] for a, side in zip(plan.corner_axes, corner)]


def _interpolated(gather, plan: _Plan, where: torch.Tensor) -> torch.Tensor:
    """Sum over the corners of ``gather(flat grid index)`` (n, m) times its weights, in float64, with SciPy's order
    of operations (weights multiplied in axis order, corners summed in C order)."""
    total = None
    for flat, weights in _corners(plan, where):
        term = gather(flat).double()
        for weight in weights:
            term *= weight
        total = term if total is None else total.add_(term)
    return total


def _exact_values(by_voxel: torch.Tensor, plan: _Plan, where: torch.Tensor, bounds) -> np.ndarray:
    """(voxels, classes) resampled values at output voxels ``where`` (n, rank), in the logits' dtype;
    ``by_voxel``: the logits as (grid voxels, classes), so that each gather reads one voxel's classes at once."""
    total = _interpolated(lambda flat: by_voxel.index_select(0, flat), plan, where)
    low, high = bounds
    if plan.separate is not None:
        slices = plan.nearest[where[:, plan.separate]]
        low, high = low[:, slices].T, high[:, slices].T
    total = torch.minimum(torch.maximum(total, low), high)
    return total.numpy().astype(_numpy_dtype(by_voxel.dtype))


def working_bytes(classes: int, grid_voxels: float) -> int:
    """Peak bytes of :func:`resampled_labels` beyond the logits and the label map: the logits by voxel, the grid
    pass (top-two values in float32, margins and thresholds in float64 with their shifted copies), the candidate
    classes per block (counts, up to 16 classes, the best smallest value, one class's block bounds), one slab and
    one chunk of doubtful voxels (classes x float64, a few copies)."""
    return int(classes * grid_voxels * 2 + grid_voxels * 80 + SLAB_VOXELS * 26 + CHUNK * classes * 8 * 4)
