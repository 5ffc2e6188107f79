"""Issue 8 item 12: output side tables and .seg.nrrd headers, calibration input checks, MR warnings,
no folders left by an interrupted demo/benchmark, one device wording in the benchmark, demo output
outside the checkout."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from PTQLogic.quantization.calibration import load_calibration_volumes
from PTQLogic.app.cli import build_parser, main
from PTQLogic.core.errors import Cancelled, InputError, InputWarning
from PTQLogic.io.volumes import label_table_paths, read_volume, write_labelmap
from PTQLogic.core.progress import Monitor, parse_progress_line
from PTQLogic.core.spec import ClassInfo, load_spec
from PTQLogic.core.volume import Volume

from conftest import ROOT, SAMPLE_UNET


def _write_image(array_kji: np.ndarray, ijk_to_ras: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk

    from PTQLogic.io.volumes import to_sitk_image

    sitk.WriteImage(to_sitk_image(array_kji, ijk_to_ras), str(path))


def test_side_tables_of_two_formats_do_not_collide(tmp_path):
    nii, nrrd_ = label_table_paths(tmp_path / "x.nii.gz"), label_table_paths(tmp_path / "x.nrrd")
    assert not set(nii) & set(nrrd_)
    assert nii[0].name == "x.nii.gz.labels.json" and nrrd_[1].name == "x.nrrd.labels.csv"


def test_seg_nrrd_carries_slicer_segment_metadata(tmp_path):
    import nrrd

    labels = np.zeros((4, 5, 6), np.uint8)  # K, J, I
    labels[1:3, 2:4, 1:5] = 1
    labels[3, 0, 5] = 2
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    classes = [ClassInfo("background", (0, 0, 0)), ClassInfo("liver", (221, 130, 101)),
               ClassInfo("spleen", (157, 108, 162)), ClassInfo("pancreas", (249, 180, 111))]
    path = tmp_path / "case.seg.nrrd"
    write_labelmap(Volume(labels, affine), path, classes)
    data, header = nrrd.read(str(path))
    np.testing.assert_array_equal(data.transpose(2, 1, 0), labels)  # voxels unchanged (pynrrd reads I, J, K)
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segment0_Name"] == "liver" and header["Segment1_Name"] == "spleen"
    assert header["Segment2_Name"] == "pancreas" and header["Segment2_Extent"] == "0 -1 0 -1 0 -1"  # absent
    assert [header[f"Segment{n}_LabelValue"] for n in range(3)] == ["1", "2", "3"]
    assert all(header[f"Segment{n}_Layer"] == "0" for n in range(3))
    np.testing.assert_allclose([float(v) for v in header["Segment0_Color"].split()],
                               np.array([221, 130, 101]) / 255, atol=1e-5)
    assert header["Segment0_Extent"] == "1 4 2 3 1 2"  # i0 i1 j0 j1 k0 k1, inclusive
    assert header["Segment1_Extent"] == "5 5 0 0 3 3"
    assert read_volume(path).same_grid(Volume(labels, affine))


def test_calibration_refuses_a_label_map_and_says_which(phantom_files):
    spec = load_spec(SAMPLE_UNET)
    with pytest.raises(InputError, match="looks like a label map") as exc:
        load_calibration_volumes([phantom_files["calibration"][0], phantom_files["truth"]], spec)
    assert str(phantom_files["truth"]) in str(exc.value)


def test_calibration_warns_about_an_image_unlike_ct(phantom_files, tmp_path):
    """A CT stored without HU rescaling (all values >= 0) looks like an MR to a CT-window model."""
    ct = read_volume(phantom_files["calibration"][0])
    shifted = Volume((ct.array.astype(np.int32) + 1024).astype(np.int16), ct.ijk_to_ras)
    path = tmp_path / "no_hu.nii.gz"
    _write_image(shifted.array, shifted.ijk_to_ras, path)
    spec = load_spec(SAMPLE_UNET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volumes = load_calibration_volumes([phantom_files["calibration"][0], path], spec)
    assert len(volumes) == 2
    messages = [str(w.message) for w in caught if issubclass(w.category, InputWarning)]
    assert len(messages) == 1 and str(path) in messages[0] and "Hounsfield" in messages[0]


def test_real_mr_is_warned_about_at_calibration(shared_data):
    spec = load_spec(SAMPLE_UNET)
    with pytest.warns(InputWarning, match="looks like an MR"):
        load_calibration_volumes([shared_data / "example_mr_sm.nii.gz"], spec)
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        load_calibration_volumes([shared_data / "example_ct_sm.nii.gz"], spec)  # a real CT: no warning
    with pytest.raises(InputError, match="label map"):
        load_calibration_volumes([shared_data / "example_seg.nii.gz"], spec)


def test_quantize_lists_its_calibration_inputs(quantized_unet, phantom_files):
    report = json.loads((quantized_unet / "quantization.json").read_text())
    assert report["calibration"]["inputs"] == [str(p) for p in phantom_files["calibration"]]


def test_segment_warns_when_an_mr_like_volume_meets_a_ct_model(quantized_unet, phantom_files, tmp_path, capsys):
    ct = read_volume(phantom_files["image"])
    mr_like = tmp_path / "mr_like.nii.gz"
    array = np.clip(ct.array.astype(np.float32) + 1000.0, 0, None) * 0.5  # dark background at 0, no HU
    _write_image(array, ct.ijk_to_ras, mr_like)
    code = main(["segment", "--model", str(quantized_unet), "--input", str(mr_like), "--output",
                 str(tmp_path / "l.nii.gz"), "--runtime", "onnxruntime", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert any("looks like an MR" in note for note in json.loads(out)["notes"])
    assert "warning: input '" in err and "mr_like.nii.gz" in err


def test_benchmark_device_column_is_consistent_and_cancel_leaves_no_folder(quantized_unet, phantom_files, tmp_path):
    from PTQLogic.app.benchmark import run_benchmark

    out = tmp_path / "bench"
    summary = run_benchmark(quantized_unet, phantom_files["image"], out, runtimes=["onnxruntime", "openvino"],
                            precisions=["fp32"], repeats=1, warmup=0)
    assert {row["device"] for row in summary["rows"]} == {"CPU"}
    assert {row["device"] for row in json.loads((out / "benchmark.json").read_text())["rows"]} == {"CPU"}

    class CancelInWindow(Monitor):
        def update(self, stage, done, total):
            if stage == "sliding window" and done >= 1:
                self.cancel()
            super().update(stage, done, total)

    cancelled = tmp_path / "cancelled"
    with pytest.raises(Cancelled):
        run_benchmark(quantized_unet, phantom_files["image"], cancelled, runtimes=["onnxruntime"],
                      precisions=["fp32"], repeats=1, warmup=0, monitor=CancelInWindow())
    assert not cancelled.exists()


def test_demo_default_folder_is_outside_the_checkout(monkeypatch, tmp_path):
    from PTQLogic.app.demo import default_demo_dir

    assert build_parser().parse_args(["demo"]).out is None
    monkeypatch.delenv("PTQSEG_DEMO_DIR", raising=False)
    folder = default_demo_dir().resolve()
    assert ROOT not in folder.parents and folder != ROOT and Path.cwd().resolve() not in folder.parents
    monkeypatch.setenv("PTQSEG_DEMO_DIR", str(tmp_path / "d"))
    assert default_demo_dir() == tmp_path / "d"


def test_demo_refuses_a_folder_with_other_files(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "already holds other files" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["mine.txt"]


def test_interrupted_demo_leaves_no_folder(tmp_path):
    parent = tmp_path / "work"
    parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "PTQLogic", "demo", "--out", str(parent / "demo"), "--progress-lines"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    for line in proc.stderr:  # wait until the demo has written files (calibration patches are sampled)
        event = parse_progress_line(line)
        if (event and event[0] == "calibration patches") or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert list(parent.iterdir()) == []
