"""whole_ct.py's report and row runner when a row is stopped by --row-timeout: the stopped row shows as taking longer
than the limit, and the other rows' speedups over it as lower bounds."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "nnunet"))

import pytest  # noqa: E402
import torch  # noqa: E402

import whole_ct  # noqa: E402
import whole_ct_report as report  # noqa: E402
import whole_ct_rows as rows  # noqa: E402


def _row(seconds: float) -> dict:
    return {"seconds": seconds, "stages": {s: seconds / 5 for s in report.STAGES}, "peak_rss_bytes": 2**30,
            "windows": 8}


def test_a_stopped_nnunetv2_row_gives_lower_bounds():
    stopped = {"error": "stopped after 400 s (--row-timeout)", "stopped_after": 400.0}
    repeats = [{"rows": {"nnunetv2": stopped, "int8": _row(10.0), "fp32": _row(16.0)}, "reference": None},
               {"rows": {"nnunetv2": stopped, "int8": _row(12.5), "fp32": _row(15.0)}, "reference": None}]
    summary = report.summarize(repeats, ["nnunetv2", "int8", "fp32"])
    assert summary["nnunetv2"]["seconds"] is None and summary["nnunetv2"]["stopped_after"]["min"] == 400
    assert summary["int8"]["speedup_vs_nnunetv2"] is None
    assert summary["int8"]["speedup_at_least"] == {"median": 36.0, "min": 32.0, "max": 40.0, "n": 2}
    line = report._row_line("nnunetv2", summary["nnunetv2"])
    assert "> 400 (stopped; 2 repeat(s))" in line
    assert "| > 32.0x |" in report._row_line("int8", summary["int8"])
    assert "| > 25.0x |" in report._row_line("fp32", summary["fp32"])
    # a lower bound is rounded down: 285.9 / 58.57 = 4.88 shows as > 4.8x, 46 / 10 as > 4.6x
    for stopped_after, seconds, shown in ((285.9, 58.57, "> 4.8x"), (46.0, 10.0, "> 4.6x")):
        bound = [{"rows": {"nnunetv2": dict(stopped, stopped_after=stopped_after), "int8": _row(seconds)}}]
        assert f"| {shown} |" in report._row_line("int8", report.summarize(bound, ["nnunetv2", "int8"])["int8"])


def test_a_finished_nnunetv2_row_gives_plain_ratios():
    repeats = [{"rows": {"nnunetv2": _row(100.0), "int8": _row(10.0)}, "reference": "nnunetv2"}]
    summary = report.summarize(repeats, ["nnunetv2", "int8"])
    assert summary["int8"]["speedup_vs_nnunetv2"]["median"] == 10.0 and summary["int8"]["speedup_at_least"] is None
    assert "| 10.00x |" in report._row_line("int8", summary["int8"])


def test_run_child_stops_a_row_at_the_timeout(tmp_path):
    """A real child process (the row runner) stopped before its clock started (still importing): recorded, with
    no lower bound, not raised."""
    spec = {"row": "fp32", "threads": 1, "cpus": None}
    result = whole_ct.run_child("row", spec, tmp_path, 1, timeout=0.05)
    assert result["error"] == "stopped after 0.05 s (--row-timeout)" and "stopped_after" not in result
    assert set(result["cpu"]) == set(report.CPU_USAGE)  # the killed child's usage: small, but counted
    assert result["cpu"]["user_s"] >= 0 and result["cpu"]["minor_faults"] > 0
    assert not (tmp_path / "row-result.json").exists()


def test_each_rows_cpu_time_and_page_faults_are_said_under_the_table():
    """Medians over every repeat that ran the row (a stopped row's usage too, a carried one's not counted twice);
    the kernel's share of the CPU time tells a machine faulting memory in slowly from a slow row."""
    cpu = [{"user_s": u, "system_s": k, "minor_faults": f, "major_faults": 0}
           for u, k, f in ((400.0, 100.0, 2_000_000), (300.0, 100.0, 1_000_000))]
    stopped = {"error": "stopped after 900 s (--row-timeout)", "stopped_after": 885.1, "cpu": cpu[0]}
    repeats = [{"rows": {"int8": dict(_row(10.0), cpu=cpu[0]), "nnunetv2": stopped}},
               {"rows": {"int8": dict(_row(12.0), cpu=cpu[1]),
                         "nnunetv2": {"stopped_after": 885.1, "error": "not run again", "carried": True}}}]
    summary = report.summarize(repeats, ["int8", "nnunetv2"])
    assert summary["int8"]["cpu"]["user_s"] == {"median": 350.0, "min": 300.0, "max": 400.0, "n": 2}
    assert summary["nnunetv2"]["cpu"]["minor_faults"]["n"] == 1
    text = "\n".join(report.cpu_usage_lines(summary))
    assert "OpenVINO INT8 (f32 remainder) 350 s + 100 s (22% in the kernel), 1.50 M minor and 0 major" in text
    assert "nnunetv2 `nnUNetPredictor`, PyTorch FP32 400 s + 100 s (20% in the kernel), 2.00 M minor" in text
    old = report.summarize([{"rows": {"int8": _row(10.0)}}], ["int8"])  # a result from before rows recorded it
    assert report.cpu_usage_lines(old) == []


@pytest.mark.slow
def test_a_row_stopped_while_running_gets_the_seconds_its_clock_ran(tmp_path):
    """nnunetv2's row reading a CT that never arrives (a named pipe with no writer) blocks after its imports, its
    clock running: the bound is the time since the clock started, not the process's (imports excluded)."""
    import os

    pipe = tmp_path / "ct.nii.gz"
    os.mkfifo(pipe)
    spec = {"row": "nnunetv2", "ct": str(pipe), "threads": 1, "cpus": None, "folders": [], "labels": {},
            "output": str(tmp_path / "out.nii.gz"), "step_size": 0.5}
    result = whole_ct.run_child("row", spec, tmp_path, 1, timeout=30)
    assert result["error"].startswith("stopped after 30 s (--row-timeout), ")
    assert 0 < result["stopped_after"] < 30  # its imports took the rest


def test_every_row_has_a_title_runtime_and_precision():
    assert set(report.ROW_TITLES) == set(whole_ct.ROWS + whole_ct.GPU_ROWS)
    project = [r for r in whole_ct.ROWS + whole_ct.GPU_ROWS if r not in rows.BASELINE_ROWS]
    assert all(r in rows.RUNTIME and r in rows.PRECISION for r in project)
    assert {r for r, d in rows.DEVICE.items() if d == "cuda"} == {"nnunetv2-cuda", "totalseg-cuda", "fp32-torch-cuda",
                                                                  "fp16-torch-cuda"}


def test_the_fp32_reference_on_a_gpu_runs_without_tf32_and_outranks_nnunetv2s_autocast():
    """nnunetv2's predictor runs CUDA under autocast (FP16): its labels are no FP32 reference. fp32-torch-cuda, with
    TF32 off, is taken before it; the CPU rows before both."""
    order = report.REFERENCES
    assert order.index("nnunetv2") < order.index("fp32-torch") < order.index("fp32-torch-cuda") < order.index(
        "nnunetv2-cuda")
    assert "autocast" in report.ROW_TITLES["nnunetv2-cuda"] and "FP32" not in report.ROW_TITLES["nnunetv2-cuda"]
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        rows.strict_fp32("fp16-torch-cuda")
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
        rows.strict_fp32("fp32-torch-cuda")
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_only_rows_that_run_onnx_files_make_the_run_quantize():
    """PyTorch rows run the original nnU-Net folders (FP32 on the CPU, FP16 on CUDA): a GPU table of nnunetv2 and
    PyTorch FP16 needs no ModelOpt on the GPU machine; any OpenVINO or TensorRT row does."""
    import argparse
    from whole_ct_setup import needs_onnx

    def needs(*names):
        return needs_onnx(argparse.Namespace(rows=list(names)))

    assert not needs("nnunetv2-cuda", "fp16-torch-cuda", "fp32-torch", "fp32-torch-cuda", "totalseg", "nnunetv2")
    assert all(needs("fp16-torch-cuda", row) for row in ("int8", "fp32", "int8-bf16", "fp16-tensorrt", "int8-tensorrt"))


def test_the_gpu_table_compares_with_nnunetv2_on_cuda():
    repeats = [{"rows": {"nnunetv2-cuda": _row(30.0), "fp16-tensorrt": _row(3.0)}, "reference": "nnunetv2-cuda"}]
    assert report.baseline_of(repeats) == "nnunetv2-cuda"
    summary = report.summarize(repeats, ["nnunetv2-cuda", "fp16-tensorrt"])
    assert summary["fp16-tensorrt"]["speedup_vs_nnunetv2"]["median"] == 10.0
    both = [{"rows": {"nnunetv2": _row(60.0), "nnunetv2-cuda": _row(30.0), "int8": _row(6.0)}}]
    assert report.baseline_of(both) == "nnunetv2"  # the CPU predictor where it ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_gpu_rows_are_refused_up_front_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as stop:
        whole_ct.parse_args(["--config", "fast", "--rows", "int8", "fp16-torch-cuda", "--out", "x.json"])
    assert stop.value.code == 2
    assert "rows fp16-torch-cuda need an NVIDIA GPU with CUDA" in capsys.readouterr().err
    assert whole_ct.gpu_rows_missing(["int8", "fp32"]) is None


def test_a_row_timeout_must_be_positive(capsys):
    with pytest.raises(SystemExit) as stop:
        whole_ct.parse_args(["--config", "fast", "--row-timeout", "0", "--out", "x.json"])
    assert stop.value.code == 2 and "--row-timeout: must be a positive number of seconds" in capsys.readouterr().err


def test_row_timeouts_for_every_row_or_one():
    args = whole_ct.parse_args(["--config", "fast", "--rows", "nnunetv2", "int8", "--row-timeout", "900",
                                "nnunetv2=300", "--out", "x.json"])
    assert args.row_timeout == {"*": 900.0, "nnunetv2": 300.0}
    with pytest.raises(ValueError, match="fp32 is not one of --rows"):
        whole_ct.row_timeouts(["fp32=10"], ["int8"])
    with pytest.raises(ValueError, match="is not SECONDS or ROW=SECONDS"):
        whole_ct.row_timeouts(["int8=soon"], ["int8"])


def test_a_row_stopped_once_is_not_run_again(tmp_path, monkeypatch):
    """The run spends --row-timeout on a stopped row once: later repeats carry its bound without running it, and
    the table counts the one real stop."""
    from types import SimpleNamespace

    ran = []

    def child(mode, spec, work, threads, timeout=None):
        ran.append(spec["row"])
        if spec["row"] == "nnunetv2":
            return {"error": "stopped after 300 s (--row-timeout)", "stopped_after": 299.5}
        return _row(10.0)

    monkeypatch.setattr(whole_ct, "run_child", child)
    config = {"name": "fast", "rows": ["nnunetv2", "int8"], "folders": [], "labels": {}, "quantized": [],
              "parts_file": "p", "torch_parts_file": "t", "models": SimpleNamespace(step_size=0.8)}
    args = SimpleNamespace(threads=1, row_timeout={"nnunetv2": 300.0}, once=[], reference_labels=None,
                           fp32_windows=0.25)
    saved = []  # what the run writes after each row: a run cut off keeps every finished row
    repeats = [whole_ct.run_repeat(config, k, {"test": "ct.nii.gz"}, args, tmp_path,
                                   on_row=lambda partial: saved.append(sorted(partial["rows"]))) for k in range(3)]
    assert saved[:2] == [["nnunetv2"], ["int8", "nnunetv2"]] and len(saved) == 4  # 2, then int8 alone twice
    assert ran.count("nnunetv2") == 1 and ran.count("int8") == 3
    assert repeats[2]["rows"]["nnunetv2"]["error"] == "not run again: stopped in repeat 1"
    summary = report.summarize(repeats, ["nnunetv2", "int8"])
    assert summary["int8"]["speedup_at_least"]["n"] == 3 and summary["int8"]["speedup_at_least"]["min"] == 29.95
    assert "> 299.5 (stopped; 1 repeat(s))" in report._row_line("nnunetv2", summary["nnunetv2"])


def test_once_rows_run_in_the_first_repeat_and_stay_the_reference(tmp_path, monkeypatch):
    """--once: a long baseline (here TotalSegmentator's way and the reference labels) runs in the first repeat only;
    every repeat's speedup uses its one time and every repeat's agreement its labels."""
    from types import SimpleNamespace

    import numpy as np
    import SimpleITK as sitk

    seconds = {"totalseg": 60.0, "fp32-torch": 40.0, "int8": 10.0}
    ran = []

    def child(mode, spec, work, threads, timeout=None):
        ran.append(spec["row"])
        labels = np.zeros((4, 4, 4), np.uint8)
        labels[:2] = 1 if spec["row"] != "int8" else 2 - (len(ran) > 3)  # int8 differs from the reference once
        sitk.WriteImage(sitk.GetImageFromArray(labels), spec["output"])
        return _row(seconds[spec["row"]])

    monkeypatch.setattr(whole_ct, "run_child", child)
    config = {"name": "fast", "rows": ["totalseg", "fp32-torch", "int8"], "folders": [], "labels": {},
              "quantized": [], "parts_file": "p", "torch_parts_file": "t", "models": SimpleNamespace(step_size=0.8)}
    args = SimpleNamespace(threads=1, row_timeout={}, once=["totalseg", "fp32-torch"], reference_labels=None,
                           fp32_windows=0.25)
    repeats = [whole_ct.run_repeat(config, k, {"test": "ct.nii.gz"}, args, tmp_path) for k in range(3)]
    assert sorted(ran) == ["fp32-torch", "int8", "int8", "int8", "totalseg"]
    assert [r["reference"] for r in repeats] == ["fp32-torch"] * 3
    assert [r["rows"]["int8"]["agreement"]["dice"] for r in repeats] == [0.0, 1.0, 1.0]
    summary = report.summarize(repeats, ["totalseg", "fp32-torch", "int8"])
    assert summary["int8"]["speedup_vs_totalseg"] == {"median": 6.0, "min": 6.0, "max": 6.0, "n": 3}
    assert summary["totalseg"]["seconds"]["n"] == 1
    assert "| 6.00x (6.00x-6.00x) |" in report._row_line("int8", summary["int8"])


def test_reference_labels_from_an_earlier_run_where_no_reference_row_runs(tmp_path, monkeypatch):
    """--reference-labels: nnunetv2's FP32 labels of the same CT from an earlier run are the agreement reference of
    a run that leaves the long reference rows out; a reference row that does run takes precedence, and labels of
    another shape are refused."""
    from types import SimpleNamespace

    import numpy as np
    import SimpleITK as sitk

    given = np.zeros((4, 4, 4), np.uint8)
    given[:2] = 1
    sitk.WriteImage(sitk.GetImageFromArray(given), str(tmp_path / "earlier.nii.gz"))

    def child(mode, spec, work, threads, timeout=None):
        labels = given.copy()
        labels[0] = 2 if spec["row"] == "int8" else 1  # int8 differs from the given labels in one slab
        sitk.WriteImage(sitk.GetImageFromArray(labels), spec["output"])
        return _row(10.0)

    monkeypatch.setattr(whole_ct, "run_child", child)
    config = {"name": "fast", "rows": ["int8"], "folders": [], "labels": {}, "quantized": [], "parts_file": "p",
              "torch_parts_file": "t", "models": SimpleNamespace(step_size=0.8)}
    args = SimpleNamespace(threads=1, row_timeout={}, once=[], reference_labels=tmp_path / "earlier.nii.gz",
                           fp32_windows=0.25)
    result = whole_ct.run_repeat(config, 0, {"test": "ct.nii.gz"}, args, tmp_path / "a")
    assert result["reference"] == report.GIVEN
    assert result["rows"]["int8"]["agreement"]["voxels"] == pytest.approx(0.75)
    assert result["rows"]["int8"]["agreement"]["per_class"] == {  # label 2: in the int8 map only
        "1": {"dice": 0.66667, "reference_voxels": 32, "voxels": 16},
        "2": {"dice": 0.0, "reference_voxels": 0, "voxels": 16}}
    config["rows"] = ["fp32-torch", "int8"]
    result = whole_ct.run_repeat(config, 0, {"test": "ct.nii.gz"}, args, tmp_path / "b")
    assert result["reference"] == "fp32-torch" and result["rows"]["int8"]["agreement"]["voxels"] == 0.75
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4, 5), np.uint8)), str(tmp_path / "earlier.nii.gz"))
    config["rows"] = ["int8"]
    with pytest.raises(SystemExit, match="not the same CT"):
        whole_ct.run_repeat(config, 0, {"test": "ct.nii.gz"}, args, tmp_path / "c")
    # and the run refuses it before any work: the CT's shape is known once it is written
    assert "not the same CT" in whole_ct.reference_shape_error(tmp_path / "earlier.nii.gz", (4, 4, 4))
    assert whole_ct.reference_shape_error(tmp_path / "earlier.nii.gz", (4, 4, 5)) is None
    assert whole_ct.reference_shape_error(None, (4, 4, 4)) is None
    with pytest.raises(SystemExit):
        whole_ct.parse_args(["--config", "fast", "--reference-labels", str(tmp_path / "none.nii.gz"), "--out", "x"])


def test_exports_beside_the_sliding_window_are_said_under_the_table():
    runs = [dict(_row(10.0), export_beside_network=3.0) for _ in range(2)]
    summary = report.summarize([{"rows": {"int8": r}} for r in runs], ["int8"])
    assert summary["int8"]["export_beside_network"]["median"] == 3.0
    config = {"plans": {"spacing": [1.5], "patch_size": [128, 128, 128], "features_per_stage": [32]},
              "ct": {"shape_xyz": [4, 4, 4], "spacing_xyz": [1, 1, 1]}, "parts": ["a", "b"], "step_size": 0.5,
              "network_grid_kji": [4, 4, 4], "windows_per_part": 1, "summary": summary, "window_seconds": {},
              "not_run": {}, "estimate_minutes": None, "repeats": []}
    text = "\n".join(report.config_table("total", config))
    assert "sliding window (within the network column), for 3.0 (3.0-3.0) s (this project, OpenVINO INT8" in text
    summary["int8"]["export_beside_network"] = None
    assert "beside the next part" not in "\n".join(report.config_table("total", config))


def test_no_probe_cannot_go_with_max_minutes(capsys):
    with pytest.raises(SystemExit) as stop:
        whole_ct.parse_args(["--config", "fast", "--no-probe", "--max-minutes", "5", "--out", "x.json"])
    assert stop.value.code == 2 and "--max-minutes needs the probe's estimate" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        whole_ct.parse_args(["--config", "fast", "--rows", "int8", "--once", "fp32", "--out", "x.json"])
    assert "every row named there must be one of --rows" in capsys.readouterr().err


def test_agreement_of_label_maps_from_other_runs(tmp_path, capsys):
    """``whole_ct_report.py --agreement REFERENCE MAP ...``: each map's agreement, mean and per label, as JSON."""
    import json

    import numpy as np
    import SimpleITK as sitk

    reference = np.zeros((4, 4, 4), np.uint8)
    reference[:2] = 1
    other = reference.copy()
    other[3, 0, 0] = 3  # one voxel of a label the reference never has
    for name, labels in (("ref", reference), ("same", reference), ("other", other)):
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(tmp_path / f"{name}.nii.gz"))
    report.main(["--agreement", *(str(tmp_path / f"{n}.nii.gz") for n in ("ref", "same", "other"))])
    scores = json.loads(capsys.readouterr().out)["maps"]
    same, other_score = scores[str(tmp_path / "same.nii.gz")], scores[str(tmp_path / "other.nii.gz")]
    assert same["identical"] and same["dice"] == 1.0
    assert other_score["dice"] == 0.5 and other_score["per_class"]["3"] == {"dice": 0.0, "reference_voxels": 0,
                                                                            "voxels": 1}


def test_the_guard_of_each_part_and_parts_kept_in_fp32_are_said_under_the_table(tmp_path):
    import json

    note = "'/m/organs' ran in FP32, not INT8: when it was quantized, its INT8 missed the accuracy target (...)"
    runs = [dict(_row(10.0), warnings=[note]), dict(_row(11.0), warnings=[note])]
    summary = report.summarize([{"rows": {"int8": r}} for r in runs], ["int8"])
    organs, ribs = tmp_path / "organs", tmp_path / "ribs"
    guard = {"agreement": 0.971, "initial_agreement": 0.962, "threshold": 0.98, "met": False,
             "kept": ["a", "b"], "held_out": "whole volume calibration_103", "runtime": "openvino", "isa": "vnni"}
    for folder, data in ((organs, {"folds": {"0": {"guard": guard}}, "int8_fallback": {"fold": "0"}}),
                         (ribs, {"folds": {"0": {"guard": dict(guard, agreement=0.999, met=True, kept=[])}}})):
        folder.mkdir()
        (folder / "quantization.json").write_text(json.dumps(data))
    guards = {"organs": whole_ct.part_guard(organs), "ribs": whole_ct.part_guard(ribs),
              "vertebrae": whole_ct.part_guard(tmp_path / "missing")}
    assert guards["organs"]["int8"] is False and guards["organs"]["kept_layers"] == 2
    assert guards["ribs"]["int8"] is True and guards["vertebrae"] is None
    config = {"plans": {"spacing": [1.5], "patch_size": [128, 128, 128], "features_per_stage": [32]},
              "ct": {"shape_xyz": [4, 4, 4], "spacing_xyz": [1, 1, 1]}, "parts": ["organs", "ribs"], "step_size": 0.5,
              "network_grid_kji": [4, 4, 4], "windows_per_part": 1, "summary": summary, "window_seconds": {},
              "not_run": {}, "estimate_minutes": None, "part_guards": guards,
              "repeats": [{"rows": {"int8": r}} for r in runs]}
    text = "\n".join(report.config_table("total", config))
    assert ("on whole volume calibration_103): organs 0.9620 -> 0.9710 with 2 layer(s) in FP32, target 0.98 missed: "
            "kept in FP32; ribs 0.9620 -> 0.9990 with 0 layer(s) in FP32, target 0.98 met.") in text
    assert text.count(note) == 1 and "Parts that ran in FP32 in an INT8 row" in text
