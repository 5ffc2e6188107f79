"""benchmarks/nnunet/whole_ct.py end to end at a tiny size: two TotalSegmentator-style parts (nnunetv2's planner,
widths / 8) on a 32x32x24 CT, every row in its own process, the raw JSON and the Markdown table it writes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "nnunet" / "whole_ct.py"
ROWS = ["nnunetv2", "fp32", "int8", "int8-bf16", "int8-fp32w", "int8-bf16-fp32w", "fp32-torch"]
STAGES = {"build", "preprocess", "network", "export", "other"}


pytestmark = pytest.mark.slow  # about a minute: five processes that each import torch, nnunetv2 and OpenVINO


def _run(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--config", "total", "--parts", "2", "--shape", "32", "32", "24",
               "--spacing", "1.5", "1.5", "1.5", "--tiny-networks", "--repeats", "1", "--calibration-patches", "4",
               "--threads", "1", "--rows", *ROWS, "--fp32-windows", "1", "--work", str(folder / "work"),
               "--out", str(out), *extra]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole-ct")
    out = folder / "result" / "whole_ct.json"
    refused = _run(folder, out, "--max-minutes", "0")  # measures, estimates, refuses; the rerun reuses its files
    done = _run(folder, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"result": json.loads(out.read_text()), "markdown": out.with_suffix(".md").read_text(),
            "stdout": done.stdout, "work": folder / "work", "refused": refused}


def test_rows_stages_and_windows(smoke):
    result = smoke["result"]
    assert result["smoke"] is True and result["settings"]["weights"] == "random"
    config = result["configs"]["total"]
    assert config["parts"] == ["organs", "vertebrae"] and config["step_size"] == 0.8
    assert config["plans"]["spacing"] == [1.5, 1.5, 1.5]  # nnunetv2's planner at TotalSegmentator's spacing
    rows = config["repeats"][0]["rows"]
    ran = [r for r in ROWS if r not in config["not_run"]]
    assert set(rows) == set(ran) and {"nnunetv2", "fp32", "int8", "fp32-torch"} <= set(ran)
    for name in ran:
        row = rows[name]
        assert row["seconds"] > 0 and row["peak_rss_bytes"] > 100 * 2**20, (name, row)
        assert set(row["stages"]) == STAGES and row["stages"]["network"] > 0, (name, row["stages"])
        # the project's rows: two parts, the first part's export beside the second part's sliding window
        assert name == "nnunetv2" or ("export_beside_network" in row and row["stages"]["export"] >= 0), name
        assert sum(row["stages"].values()) == pytest.approx(row["seconds"], rel=0.05)
        assert row["windows"] == 2 * config["windows_per_part"]  # one window per part at this size
        # the row's own process (importing torch alone faults in tens of thousands of pages)
        assert row["cpu"]["user_s"] > 1 and row["cpu"]["minor_faults"] > 10_000, (name, row["cpu"])
        assert config["window_seconds"][name] > 0
    for name in ("int8-bf16", "int8-bf16-fp32w"):  # run only where OpenVINO has bf16 natively
        assert name not in config["not_run"] or "bf16" in config["not_run"][name]
    assert config["summary"]["nnunetv2"]["speedup_vs_nnunetv2"]["median"] == pytest.approx(1.0)


def test_agreement_with_nnunetv2(smoke):
    rows = smoke["result"]["configs"]["total"]["repeats"][0]["rows"]
    # the project's pipeline with nnunetv2's arithmetic (PyTorch FP32): the same label map, voxel for voxel
    same = rows["fp32-torch"]["agreement"]
    assert (same["dice"], same["voxels"], same["identical"]) == (1.0, 1.0, True) and same["classes"] > 1
    assert all(c["dice"] == 1.0 and c["voxels"] == c["reference_voxels"] for c in same["per_class"].values())
    assert len(same["per_class"]) == same["classes"]
    # OpenVINO FP32 differs from PyTorch only where two classes nearly tie (nnunetv2 sums windows in fp16)
    assert rows["fp32"]["agreement"]["voxels"] > 0.995 and rows["fp32"]["agreement"]["dice"] > 0.98
    assert 0 < rows["int8"]["agreement"]["dice"] <= 1.0  # random weights: a number, not a fidelity claim
    # INT8 with the unsure windows from FP32 (at most all: one window per part here)
    taken = rows["int8-fp32w"]["fp32_windows"]
    assert taken["of"] == 2 and taken["max_share"] == 1.0 and sum(taken["per_part"]) == taken["windows"] <= 2
    assert taken["float_precision"] in (None, "f32")  # None: no window was unsure enough to open FP32
    if "int8-bf16-fp32w" in rows:  # the bf16 remainder's row: the FP32 graph's float layers in bf16 too
        assert rows["int8-bf16-fp32w"]["fp32_windows"]["float_precision"] in (None, "bf16")
    assert "windows taken from FP32" in smoke["markdown"]
    assert smoke["result"]["settings"]["fp32_windows"] == 1.0
    assert smoke["result"]["settings"]["equalize"] is False  # quantize --equalize only on request (--equalize)


def test_merged_label_map(smoke):
    import SimpleITK as sitk

    ct = sitk.ReadImage(str(next(smoke["work"].glob("ct-*/ct.nii.gz"))))
    labels = sitk.ReadImage(str(next(smoke["work"].glob("models-*/labels/total/nnunetv2.nii.gz"))))
    assert labels.GetSize() == ct.GetSize() and labels.GetSpacing() == pytest.approx(ct.GetSpacing())
    values = np.unique(sitk.GetArrayFromImage(labels))
    assert values.max() <= 24 + 26 and len(values) > 10  # organs 1-24, vertebrae 25-50 (TotalSegmentator's map)


def test_markdown_and_estimate(smoke):
    text = smoke["markdown"]
    assert text.startswith("# SMOKE RUN (not a result)")
    assert "nnunetv2 `nnUNetPredictor`, PyTorch FP32" in text and "this project, OpenVINO INT8 (f32 remainder)" in text
    assert "says nothing about its fidelity" in text
    assert "estimated run:" in smoke["stdout"] and "one window" in smoke["stdout"]
    assert "One window per row before the run (first part, batch 1): nnunetv2 " in text
    assert "CPU time (user + kernel, medians over the repeats that ran the row" in text


def test_max_minutes_refuses(smoke):
    refused = smoke["refused"]
    assert refused.returncode == 3 and "exceeds --max-minutes 0" in refused.stderr
    assert "estimated run:" in refused.stdout


def test_peak_rss_is_the_rows_own():
    """A row's peak RSS must not include the parent's (Linux carries the parent's ru_maxrss through fork+exec)."""
    held = np.ones(64 * 2**20)  # 512 MiB in the parent
    code = ("import sys; sys.path.insert(0, 'benchmarks/nnunet'); from whole_ct_rows import peak_rss_bytes; "
            "print(peak_rss_bytes())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 0 < int(done.stdout) < held.nbytes / 2


def test_guard_calibration_cts_and_fp32_nodes_key_the_quantized_parts(tmp_path):
    """A guarded run, or one with other calibration CTs or nodes kept in FP32, never reuses INT8 parts quantized
    otherwise; the committed runs' settings (no guard, two CTs, nothing kept) keep their folders."""
    sys.path[:0] = [str(ROOT / "benchmarks" / "nnunet")]
    import argparse

    from whole_ct_setup import calibration_seeds, models_key_extra, work_dir

    assert calibration_seeds() == (101, 102) and calibration_seeds(3) == (101, 102, 103)
    folders = set()
    for weights, no_guard, count, kept in ((None, False, 2, []), ("w", True, 2, []), ("w", False, 2, []),
                                           ("w", False, 3, []), ("w", True, 2, ["seg_layers"])):
        args = argparse.Namespace(work=tmp_path, weights=weights, no_guard=no_guard, calibration_cts=count,
                                  exclude_nodes=kept, target_cpu="vnni")
        folders.add(work_dir(args, "models", "same inputs", *models_key_extra(args)))
    assert len(folders) == 4  # random weights and --no-guard: both unguarded, two CTs, the same key
    # target_cpu "vnni": the committed VNNI/AMX runs' parts; "auto" would resolve to this machine's CPU
    args = argparse.Namespace(work=tmp_path, weights="w", no_guard=True, calibration_cts=2, exclude_nodes=[],
                              target_cpu="vnni")
    assert models_key_extra(args) == ()
    assert models_key_extra(argparse.Namespace(**dict(vars(args), target_cpu="avx2"))) == ("target_cpu=avx2",)
    defaults = dict(vars(args), method="entropy", percentile=None, bias_correction=False)
    assert models_key_extra(argparse.Namespace(**defaults)) == ()  # the committed runs' folders are found again
    others = [models_key_extra(argparse.Namespace(**dict(defaults, **change)))
              for change in ({"method": "max"}, {"method": "percentile", "percentile": 99.9}, {"bias_correction": True})]
    assert len(set(others)) == 3 and () not in others
    from whole_ct_setup import guard_target

    guarded = argparse.Namespace(**dict(defaults, no_guard=False, min_agreement=None, max_kept_layers=None))
    assert guard_target(guarded).min_agreement == 0.98 and guard_target(argparse.Namespace(**defaults)) is None
    stricter = argparse.Namespace(**dict(vars(guarded), min_agreement=0.995, max_kept_layers=16))
    assert (guard_target(stricter).min_agreement, guard_target(stricter).max_kept) == (0.995, 16)
    assert models_key_extra(stricter) == ("guard", "min_agreement=0.995", "max_kept_layers=16")
    assert models_key_extra(guarded) == ("guard",)  # the committed guarded runs keep their folders


def test_parts_quantized_for_an_avx2_cpu_are_kept_apart(monkeypatch):
    """quantize's "auto" target follows the CPU, an emulated one too (ONEDNN_MAX_CPU_ISA=AVX2: 7-bit weights), so a
    run on such a CPU must not reuse 8-bit parts of a VNNI run in the same --work, nor leave its own for one, unless
    --target-cpu vnni asks for them."""
    sys.path[:0] = [str(ROOT / "benchmarks" / "nnunet")]
    import argparse

    from whole_ct_setup import models_key_extra

    from PTQLogic.core.sysinfo import cpu_int8_target

    args = argparse.Namespace(weights="w", no_guard=True, calibration_cts=2, exclude_nodes=[])
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert models_key_extra(args) == ("target_cpu=avx2",)
    args.target_cpu = "vnni"  # asked for: the VNNI parts on the emulated CPU (the same folder on both ISAs)
    assert models_key_extra(args) == ()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    args.target_cpu = "auto"
    assert models_key_extra(args) == (() if cpu_int8_target() == "vnni" else ("target_cpu=avx2",))
    args.target_cpu = "avx2"
    assert models_key_extra(args) == ("target_cpu=avx2",)
    import whole_ct

    assert whole_ct.parse_args(["--out", "r.json", "--target-cpu", "avx2"]).target_cpu == "avx2"
    assert whole_ct.parse_args(["--out", "r.json"]).target_cpu == "auto"


def test_int8_parts_quantized_elsewhere_must_all_be_there_and_open(tmp_path, capsys, monkeypatch):
    """--quantized-from is checked before anything is drawn or quantized: every part of the run, one config, each a
    folder the INT8 row can open (a copy without fold_0/fp32.onnx stopped a lent machine's table at its first row)."""
    import shutil

    from nnunet_factory import dataset, plans, write_folder, write_image
    from PTQLogic.app.cli import main
    from PTQLogic.samples.phantom import make_phantom

    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import whole_ct

    source = write_folder(tmp_path / "src", plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(["background", "liver"]))
    image = write_image(make_phantom(1, (32, 32, 32), (1.5, 1.5, 1.5))[0], tmp_path / "cal.nii.gz")
    parts = tmp_path / "int8"
    assert main(["quantize", "--model", str(source), "--calibration", str(image), "--out", str(parts / "organs"),
                 "--patches", "2", "--no-guard"]) == 0
    base = ["--config", "total", "--out", str(tmp_path / "r.json"), "--quantized-from", str(parts)]
    assert whole_ct.parse_args(base + ["--parts", "1"]).quantized_from == parts
    with pytest.raises(SystemExit):
        whole_ct.parse_args(base)  # vertebrae, cardiac, muscles and ribs are not there
    assert "no quantized part ['vertebrae', 'cardiac', 'muscles', 'ribs']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        whole_ct.parse_args(["--config", "both", "--out", "x", "--quantized-from", str(parts)])
    assert "use it with one --config" in capsys.readouterr().err

    shutil.copytree(parts / "organs", tmp_path / "copy" / "organs", ignore=shutil.ignore_patterns("fp32.onnx"))
    with pytest.raises(SystemExit):
        whole_ct.parse_args(["--config", "total", "--parts", "1", "--out", "x", "--quantized-from",
                             str(tmp_path / "copy")])
    err = capsys.readouterr().err
    assert "part 'organs'" in err and "fold_0/fp32.onnx is missing" in err, err
    (tmp_path / "copy" / "organs" / "nnunet_model.json").write_text("{}")
    with pytest.raises(SystemExit):
        whole_ct.parse_args(["--config", "total", "--parts", "1", "--out", "x", "--quantized-from",
                             str(tmp_path / "copy")])
    assert "is damaged (nnunet_model.json lacks 'configuration')" in capsys.readouterr().err


def test_out_is_required_except_when_only_preparing_parts(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import whole_ct

    assert whole_ct.parse_args(["--config", "total", "--prepare-parts", "organs"]).out is None
    with pytest.raises(SystemExit):
        whole_ct.parse_args(["--config", "total"])
    assert "--out is required" in capsys.readouterr().err


def test_prepare_parts_quantizes_only_the_named_parts_and_a_later_run_reuses_them(tmp_path):
    """--prepare-parts: a part is quantized while another still trains; the later run quantizes only the rest."""
    out = tmp_path / "result" / "whole_ct.json"
    early = _run(tmp_path, out, "--prepare-parts", "vertebrae")
    assert early.returncode == 0, early.stderr[-3000:]
    assert "prepared vertebrae" in early.stdout and "_organs" not in early.stdout
    made = {p.parent.name for p in (tmp_path / "work").glob("models-*/total/quantized/*/nnunet_model.json")}
    assert made == {"vertebrae"}
    later = _run(tmp_path, out, "--prepare-only")
    assert later.returncode == 0, later.stderr[-3000:]
    assert "quantizing Dataset291_TotalSegShape_organs" in later.stdout and "_vertebrae" not in later.stdout
    made = {p.parent.name for p in (tmp_path / "work").glob("models-*/total/quantized/*/nnunet_model.json")}
    assert made == {"organs", "vertebrae"}
    wrong = _run(tmp_path / "other", out, "--prepare-parts", "lungs")  # refused before any CT is drawn
    assert wrong.returncode != 0 and "no part ['lungs']" in wrong.stderr and not (tmp_path / "other").exists()
