"""The per-class export gives nnunetv2's label map exactly (its own export function as the reference)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from nnunet_factory import dataset, plans
from PTQLogic.core.errors import Cancelled
from PTQLogic.inference.nnunet.export import logits_to_labels
from PTQLogic.inference.nnunet.predict import NnUNetRunner
from PTQLogic.core.progress import Monitor


def _reference(logits, runner, properties):
    from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

    return convert_predicted_logits_to_segmentation_with_correct_shape(
        logits.clone(), runner.plans_manager, runner.config, runner.label_manager, properties)


@pytest.mark.parametrize("case", ["resampled", "anisotropic", "native", "cropped", "transposed", "transposed-thick",
                                  "ties", "torch"])
def test_per_class_export_equals_nnunets(case):
    """``transposed-thick``: an isotropic plan, thick input slices and transposed axes, so the separate-z axis
    comes from the input spacing in the network's axis order (transpose_forward, not _backward)."""
    target = {"anisotropic": [4.0, 1.0, 1.0]}.get(case, [1.5, 1.5, 1.5])
    forward = (2, 0, 1) if case.startswith("transposed") else (0, 1, 2)
    plan = plans(target, [16, 16, 16], transpose_forward=forward)
    if case == "torch":  # nnU-Net's other resampling function (newer plans)
        plan["configurations"]["3d_fullres"].update(resampling_fn_probabilities="resample_torch_fornnunet",
                                                    resampling_fn_probabilities_kwargs={"is_seg": False})
    runner = NnUNetRunner(plan, dataset(["background"] + [f"c{i}" for i in range(1, 7)]), "3d_fullres")
    cropped = (20, 23, 26)  # nnU-Net axis order, after cropping
    spacing = {"native": [1.5, 1.5, 1.5], "anisotropic": [4.0, 0.7, 0.7],
               "transposed-thick": [0.8, 0.9, 3.5]}.get(case, [1.0, 0.9, 1.2])
    grid = tuple(int(round(s * sp / t)) for s, sp, t in zip(cropped, spacing, target))
    before = (24, 23, 30) if case == "cropped" else cropped
    bbox = [[2, 22], [0, 23], [1, 27]] if case == "cropped" else [[0, s] for s in cropped]
    properties = {"spacing": [spacing[i] for i in np.argsort(forward)], "shape_before_cropping": before,
                  "bbox_used_for_cropping": bbox, "shape_after_cropping_and_before_resampling": cropped}
    generator = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn((7, *grid), generator=generator)).half()
    if case == "ties":  # equal top scores: the first class wins, as with argmax
        logits[4] = logits[2]
        logits[5] = logits.max(0).values
    ours = logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties)
    reference = _reference(logits, runner, properties)
    assert ours.shape == reference.shape and ours.dtype == reference.dtype
    assert np.array_equal(ours, reference) and len(np.unique(reference)) >= 4
    if case == "native":
        assert grid == cropped  # no resampling: nnunetv2 returns the logits as they are
    if case in ("anisotropic", "transposed-thick"):  # nnU-Net's separate-z path (in-plane per slice, then nearest
        from nnunetv2.preprocessing.resampling.default_resampling import determine_do_sep_z_and_axis  # along z)

        assert determine_do_sep_z_and_axis(None, target, spacing, 3) == (True, 0 if case == "anisotropic" else 2)


def test_export_stage_benchmark_compares_rows_with_nnunetv2(tmp_path):
    """benchmarks/nnunet/export_stage.py at a tiny size: every row timed per repeat, labels checked against nnunetv2."""
    import json
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "export_stage.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nnunet" / "export_stage.py"), "--classes", "4",
                           "--shape", "40", "36", "20", "--spacing", "0.9", "0.9", "2.0", "--repeats", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["seconds"]) == {"nnunetv2", "ptqseg"} and result["logits"] == "phantom"
    assert 0 < result["resampled_voxel_fraction"] < 1
    assert all(len(v) == 2 and min(v) > 0 for v in result["seconds"].values())
    assert all(s["labels_identical_to_nnunetv2"] for s in result["summary"].values())
    assert result["network_grid_zyx"] == [27, 22, 24] and result["machine"]["cpu"]["usable_cores"] >= 1
    assert "| this project (sparse_export.py) |" in out.with_suffix(".md").read_text()


def _resample_config(force_separate_z=None):
    plan = plans([1.5, 1.5, 1.5], [16, 16, 16])
    plan["configurations"]["3d_fullres"]["resampling_fn_probabilities_kwargs"] = {
        "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": force_separate_z}
    return NnUNetRunner(plan, dataset(["background", "a", "b"]), "3d_fullres").config


def _nnunet_labels(logits, shape, current, new, force_separate_z):
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape

    values = resample_data_or_seg_to_shape(logits, shape, current, new, is_seg=False, order=1, order_z=0,
                                           force_separate_z=force_separate_z)
    return np.argmax(values, axis=0)


def _smooth_logits(classes, grid, seed, dtype=torch.float16):
    """Blob-shaped classes (as a trained network gives): large confident regions, borders between them."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, classes, *[max(2, g // 6) for g in grid]), generator=generator)
    return (8 * torch.nn.functional.interpolate(coarse, size=grid, mode="trilinear"))[0].to(dtype)


@pytest.mark.parametrize("seed", range(12))
def test_sparse_export_gives_nnunets_labels_on_random_geometries(seed):
    """Random grids, input shapes and spacings (isotropic, separate z on either side, forced on or off), fp16 and
    fp32 logits, smooth or noisy: the labels equal argmax of nnunetv2's resampling, voxel for voxel."""
    from PTQLogic.inference.nnunet.sparse_export import resampled_labels

    rng = np.random.default_rng(seed)
    grid = tuple(int(g) for g in rng.integers(3, 14, 3))
    shape = tuple(int(s) for s in rng.integers(2, 30, 3))
    spacings = [[1.0, 1.0, 1.0], [4.0, 1.0, 1.0], [1.0, 0.8, 3.5], [1.5, 1.5, 1.5]]
    current, new = spacings[seed % 4], spacings[(seed // 4 + 1) % 4]
    force = [None, None, True, False][seed % 4]
    dtype = torch.float16 if seed % 3 else torch.float32
    logits = _smooth_logits(5, grid, seed, dtype) if seed % 2 else (4 * torch.randn((5, *grid))).to(dtype)
    counts, before = {}, logits.clone()
    ours = resampled_labels(logits, shape, current, new, force, np.uint8, counts=counts)
    assert torch.equal(logits, before)  # the caller's logits are never written
    assert np.array_equal(ours, _nnunet_labels(logits, shape, current, new, force))
    assert counts["voxels"] == np.prod(shape) and 0 <= counts["resampled"] <= counts["voxels"]


def test_confident_regions_are_not_resampled_and_near_ties_are():
    """Smooth logits at a TotalSegmentator-like upsampling: most voxels take the grid's label directly; logits one
    fp16 step apart (which rounding can tie) and exact ties are resampled, and still match nnunetv2."""
    from PTQLogic.inference.nnunet.sparse_export import resampled_labels

    grid, shape, current, new = (20, 24, 24), (20, 45, 45), [1.5, 1.5, 1.5], [1.5, 0.8, 0.8]
    logits = _smooth_logits(6, grid, 3)
    counts = {}
    ours = resampled_labels(logits, shape, current, new, None, np.uint8, counts=counts)
    assert np.array_equal(ours, _nnunet_labels(logits, shape, current, new, None))
    assert counts["resampled"] < 0.35 * counts["voxels"] and len(np.unique(ours)) >= 4
    close = logits.clone()
    close[2] = torch.nextafter(close[1], torch.full_like(close[1], 100.0))  # one fp16 step above class 1
    close[4] = close[3]  # exact ties: the first class wins
    close[:, :, :4] = 60000.0  # large magnitudes, where one step is 32
    close[1, :, :4] = 65504.0
    ties = {}
    ours = resampled_labels(close, shape, current, new, None, np.uint8, counts=ties)
    assert np.array_equal(ours, _nnunet_labels(close, shape, current, new, None))
    assert ties["resampled"] > counts["resampled"]


@pytest.mark.parametrize("seed", range(6))
def test_many_classes_are_decided_among_their_candidates_with_nnunets_labels(seed):
    """40 classes (a TotalSegmentator-sized output), smooth or noisy, fp16 or fp32, separate z or not, plus
    near-ties one fp16 step apart and exact ties among the top classes: the voxels decided among their block's
    candidate classes only get nnunetv2's labels, voxel for voxel."""
    from PTQLogic.inference.nnunet.sparse_export import resampled_labels

    rng = np.random.default_rng(200 + seed)
    grid = tuple(int(g) for g in rng.integers(6, 14, 3))
    shape = tuple(int(s) for s in rng.integers(8, 30, 3))
    current, new = [[1.5, 1.5, 1.5], [4.0, 1.0, 1.0], [1.0, 0.8, 3.5]][seed % 3], [1.0, 0.7, 0.7]
    dtype = torch.float16 if seed % 2 else torch.float32
    logits = _smooth_logits(40, grid, seed, dtype) if seed < 3 else (6 * torch.randn((40, *grid))).to(dtype)
    top = logits.float().argmax(0)
    for k in (7, 23):  # class k one step above / equal to the top class in a slab of the grid
        step = torch.nextafter(logits.max(0).values, torch.full(grid, 1e4, dtype=dtype))
        logits[k, : grid[0] // 2] = (step if k == 7 else logits.max(0).values)[: grid[0] // 2]
    counts = {}
    ours = resampled_labels(logits, shape, current, new, None, np.uint8, counts=counts)
    assert np.array_equal(ours, _nnunet_labels(logits, shape, current, new, None))
    assert 0 < counts["by_candidates"] <= counts["resampled"] and top.unique().numel() > 3


def test_the_grid_pass_allocates_no_new_memory_per_class():
    """A fresh tensor per class and per step brought in gigabytes of new pages for each part of a whole CT (6 of
    the 7 million page faults of a 25-class part, 14 s of kernel time on 2 cores), and later an int16 copy per
    class in the candidate count (a third of the rest): the grid pass and the candidate pass work in buffers made
    once. Counted as bytes torch allocates (page faults depend on what glibc's heap has free at the time)."""
    from torch.profiler import ProfilerActivity, profile

    from PTQLogic.inference.nnunet import sparse_export

    grid = (60, 64, 64)
    plan = sparse_export._Plan(grid, (80, 100, 100), None)
    assert plan.corner_axes == [0, 1, 2]

    def allocated(classes: int) -> int:  # each class ahead in its own slab, as a part's organs are in theirs
        logits = torch.full((classes, *grid), -10.0, dtype=torch.float16)
        for c, slab in enumerate(torch.arange(grid[2]).chunk(classes)):
            logits[c, :, :, slab] = 10.0
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as run:
            sparse_export._certain_on_grid(logits, plan)
            sparse_export._block_candidates(logits, plan)
        return sum(event.cpu_memory_usage for event in run.events() if event.cpu_memory_usage > 0)

    # per extra class, less than one float32 grid (the candidates' indices grow with the classes that can win;
    # before: about ten grids per class, then 1.9)
    one_grid = np.prod(grid) * 4
    assert allocated(24) - allocated(4) < 20 * one_grid


def test_a_block_reduction_stays_in_its_two_buffers():
    """Each voxel reduced with its successors along the interpolated axes (the last entry with itself), as the
    per-axis successor copies computed it, in the two buffers given."""
    from PTQLogic.inference.nnunet import sparse_export

    values = torch.randn((5, 6, 7), generator=torch.Generator().manual_seed(0))
    for axes in ([0, 1, 2], [1], []):
        plan = sparse_export._Plan((5, 6, 7), [10 if a in axes else s for a, s in enumerate((5, 6, 7))], None)
        expected = values.clone()
        for a in axes:
            n = expected.shape[a]
            successor = torch.cat((expected.narrow(a, 1, n - 1), expected.narrow(a, n - 1, 1)), dim=a)
            expected = torch.maximum(expected, successor)
        first, spare = values.clone(), torch.empty_like(values)
        result, free = sparse_export._over_block(first, plan, torch.maximum, spare)
        assert torch.equal(result, expected)
        assert {result.data_ptr(), free.data_ptr()} == {first.data_ptr(), spare.data_ptr()}


@pytest.mark.parametrize("path", ["order-1", "per-class"])
def test_export_reports_progress_and_can_be_cancelled(path):
    plan = plans([1.5, 1.5, 1.5], [16, 16, 16])
    if path == "per-class":  # any resampling but SciPy's order 1 runs class by class
        plan["configurations"]["3d_fullres"].update(resampling_fn_probabilities="resample_torch_fornnunet",
                                                    resampling_fn_probabilities_kwargs={"is_seg": False})
    runner = NnUNetRunner(plan, dataset(["background", "a", "b"]), "3d_fullres")
    properties = {"spacing": [1.0, 1.0, 1.0], "shape_before_cropping": (12, 12, 12),
                  "bbox_used_for_cropping": [[0, 12]] * 3, "shape_after_cropping_and_before_resampling": (12, 12, 12)}
    logits = torch.randn((3, 8, 8, 8)).half()
    events = []
    logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties,
                     Monitor(on_progress=lambda *e: events.append(e)))
    steps = [e[1:] for e in events if e[0] == "nnU-Net export"]
    expected = [(0, 3), (1, 3), (2, 3), (3, 3)] if path == "per-class" else [(0, 2), (1, 2), (2, 2)]
    assert steps == expected
    monitor = Monitor()
    monitor.on_progress = lambda stage, done, total: monitor.cancel() if done == 1 else None
    with pytest.raises(Cancelled):
        logits_to_labels(logits, runner.plans_manager, runner.config, runner.label_manager, properties, monitor)


class _CancelOnCheck(Monitor):
    """Cancels itself at its ``at``-th check (every update checks too)."""

    def __init__(self, at: int, **kwargs):
        super().__init__(**kwargs)
        self.at, self.checks = at, 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.at:
            self.cancel()
        super().check()


def test_export_can_be_cancelled_inside_its_grid_pass():
    """The grid pass over every class takes seconds for a 25-class part of a whole CT: a cancel there stops it
    before the first slab of labels, not after the pass."""
    from PTQLogic.inference.nnunet import sparse_export

    classes, grid, shape = 30, (6, 7, 8), (9, 10, 11)
    logits = torch.randn((classes, *grid), generator=torch.Generator().manual_seed(0)).half()
    events = []
    monitor = _CancelOnCheck(5, on_progress=lambda *e: events.append(e[1:]))  # 2 checks before the grid pass
    with pytest.raises(Cancelled):
        sparse_export.resampled_labels(logits, shape, [1.0] * 3, [0.6] * 3, None, np.uint8, monitor)
    # no slab began: it stopped at the grid pass's third class
    assert [done for done, _ in events] == [0] and monitor.checks == 5
    plan = sparse_export._Plan(grid, shape, None)
    for grid_pass in (sparse_export._certain_on_grid, sparse_export._block_candidates):
        stopper = _CancelOnCheck(classes // 2)
        with pytest.raises(Cancelled):
            grid_pass(logits, plan, stopper.check)
        assert stopper.checks == classes // 2


@pytest.mark.parametrize("seed", range(8))
def test_resampled_values_are_nnunets_bit_for_bit(seed):
    """The exact path alone, at every output voxel: the same fp16/fp32 numbers as nnunetv2's resampling (weights,
    corner order and the clip to each class's range all matter at the last bit)."""
    from nnunetv2.preprocessing.resampling.default_resampling import resample_data_or_seg_to_shape
    from PTQLogic.inference.nnunet.sparse_export import resampled_values

    rng = np.random.default_rng(100 + seed)
    grid = tuple(int(g) for g in rng.integers(2, 12, 3))
    shape = tuple(int(s) for s in rng.integers(2, 26, 3))
    current, new = [[1.0, 1.0, 1.0], [4.0, 1.0, 1.0], [1.0, 0.8, 3.5], [1.5, 1.5, 1.5]][seed % 4], [1.2, 0.9, 1.0]
    force = [None, True, None, False][seed % 4]
    dtype = torch.float32 if seed % 2 else torch.float16
    logits = (100 * torch.rand((3, *grid)) - 50).to(dtype)
    where = torch.from_numpy(np.indices(shape).reshape(3, -1).T.copy())
    ours = resampled_values(logits, shape, current, new, force, where).reshape(3, *shape)
    reference = resample_data_or_seg_to_shape(logits, shape, current, new, is_seg=False, order=1, order_z=0,
                                              force_separate_z=force)
    assert ours.dtype == reference.dtype and np.array_equal(ours, reference)
