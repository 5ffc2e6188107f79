"""The nnU-Net memory estimate against measured predictions (peak RSS of a separate process)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from nnunet_factory import dataset, plans, write_folder, write_image
from PTQLogic.inference.nnunet.memory import network_grid, prediction_bytes
from PTQLogic.inference.nnunet.predict import runner_for
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.samples.phantom import make_phantom
from PTQLogic.core.memory import ENGINE_WORKING_BYTES

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent (here pytest, which
# can be larger than the whole prediction); VmHWM is the peak of this process's own address space
MEASURE = """
import json, sys
import psutil, torch
from PTQLogic.pipeline import segment
torch.set_num_threads(2)
base = psutil.Process().memory_info().rss
segment(sys.argv[1], sys.argv[2], sys.argv[3], runtime="torch", precision="fp32")
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"added": peak - base}))
"""


@pytest.mark.parametrize("shape, spacing, folds, grid", [
    ((160, 192, 192), (0.8, 0.8, 1.5), 1, (160, 102, 102)),  # logits resampled back to the input grid
    ((144, 144, 144), (1.5, 1.5, 1.5), 2, (144, 144, 144)),  # native grid: the sliding window is the peak
])
def test_estimate_covers_a_measured_prediction_without_wasting_gigabytes(tmp_path, shape, spacing, folds, grid):
    classes = ["background"] + [f"organ{i}" for i in range(1, 40)]
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [64, 64, 64]), dataset(classes), folds=tuple(range(folds)))
    volume = make_phantom(1, shape, spacing)[0]
    image = write_image(volume, tmp_path / "ct.nii.gz")
    runner = runner_for(open_nnunet_model(folder))
    assert network_grid(runner, volume) == grid
    estimate = prediction_bytes(runner, volume, folds=folds)
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(image), str(tmp_path / "out.nii.gz")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    added = json.loads(done.stdout.strip().splitlines()[-1])["added"]
    # measured (2 cores): 0.57 GiB added against 0.88 estimated (first case); five larger cases 0.24-0.38 GiB
    # under the estimate (docs/nnunet.md, Memory)
    assert added <= estimate and estimate - ENGINE_WORKING_BYTES - added < 0.5 * 2**30, (added, estimate)
