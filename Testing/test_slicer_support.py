"""Slicer-free helpers of the PTQSegmentation module: geometry, label tables, commands, processes, deps."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from PTQLogic.slicer import support as ss
from PTQLogic.core.errors import InputError, PTQError
from PTQLogic.core.progress import progress_line
from PTQLogic.core.spec import ClassInfo
from PTQLogic.core.volume import Volume

ROOT = Path(__file__).resolve().parents[1]


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


# ---------------------------------------------------------------- geometry


def test_oblique_anisotropic_geometry_round_trip():
    directions = _rotation(0.3, -0.5, 1.1)
    spacing = (0.7, 1.3, 3.0)
    origin = (-120.5, 33.25, 400.0)
    matrix = ss.ijk_to_ras_from_geometry(origin, spacing, directions)
    # vtkMRMLVolumeNode: M[r, c] = spacing[c] * directions[r, c]; voxel (i, j, k) lands at M @ (i, j, k, 1)
    assert np.allclose(matrix @ [2, 3, 4, 1], [*(np.asarray(origin) + directions @ (np.array(spacing) * [2, 3, 4])), 1])
    back_origin, back_spacing, back_dirs = ss.geometry_from_ijk_to_ras(matrix)
    assert np.allclose(back_origin, origin) and np.allclose(back_spacing, spacing) and np.allclose(back_dirs, directions)

    array = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    volume = ss.volume_from_slicer_arrays(array, matrix)
    array[0, 0, 0] = 999  # the Volume holds a copy, like arrayFromVolume(...).copy()
    assert volume.array[0, 0, 0] == 0 and volume.spacing == pytest.approx(spacing)
    assert np.array_equal(volume.ijk_to_ras, matrix)


def test_invalid_slicer_arrays_are_rejected():
    with pytest.raises(InputError, match="IJK-to-RAS"):
        ss.volume_from_slicer_arrays(np.zeros((4, 4, 4)), np.zeros((4, 4)))
    with pytest.raises(InputError, match="3D"):
        ss.volume_from_slicer_arrays(np.zeros((4, 4)), np.eye(4))
    with pytest.raises(InputError, match="spacing"):
        ss.ijk_to_ras_from_geometry((0, 0, 0), (1, 0, 1), np.eye(3))


def test_lps_file_geometry_matches_what_slicer_shows(tmp_path):
    """An ITK (LPS) file with oblique direction: RAS = diag(-1, -1, 1) * LPS, exactly."""
    direction = _rotation(0.2, 0.4, -0.7)
    image = sitk.GetImageFromArray(np.random.default_rng(0).integers(-1000, 1000, (5, 6, 7)).astype(np.int16))
    image.SetSpacing((0.8, 1.1, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(tuple(direction.ravel()))
    path = tmp_path / "oblique.nrrd"
    sitk.WriteImage(image, str(path))

    volume = ss.load_volume_file(path)
    for index in [(0, 0, 0), (6, 0, 0), (1, 5, 4), (6, 5, 4)]:
        lps = np.array(image.TransformIndexToPhysicalPoint(index))
        ras = volume.ijk_to_ras @ [*index, 1]
        assert np.allclose(ras[:3], lps * [-1, -1, 1], atol=1e-9)
    assert np.allclose(ss.lps_to_ras(ss.ras_to_lps(volume.ijk_to_ras)), volume.ijk_to_ras)
    assert np.array_equal(volume.array, sitk.GetArrayFromImage(image))

    # Export for the engine (what the module does with a scene volume) and read it back three ways.
    exported = ss.save_volume_file(volume, tmp_path / "export.nrrd")
    again = sitk.ReadImage(str(exported))
    assert np.allclose(again.GetOrigin(), image.GetOrigin()) and np.allclose(again.GetSpacing(), image.GetSpacing())
    assert np.allclose(again.GetDirection(), image.GetDirection())
    from PTQLogic.io.volumes import read_volume

    engine_view = read_volume(exported)
    assert ss.same_grid(engine_view, volume) and np.array_equal(engine_view.array, volume.array)
    assert not list(tmp_path.glob("*.partial*"))


def test_sheared_volume_is_not_exported(tmp_path):
    matrix = np.eye(4)
    matrix[0, 1] = 0.5
    with pytest.raises(InputError, match="sheared"):
        ss.save_volume_file(Volume(np.zeros((3, 3, 3), np.int16), matrix), tmp_path / "x.nrrd")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- label table -> segments


def test_segments_from_engine_label_table(tmp_path):
    from PTQLogic.io.volumes import write_label_table
    from PTQLogic.samples.phantom import PHANTOM_CLASSES

    path = tmp_path / "labels.json"
    write_label_table(PHANTOM_CLASSES, path)
    segments = ss.segments_from_label_table(path)
    assert [s.name for s in segments] == [c.name for c in PHANTOM_CLASSES[1:]]
    assert [s.value for s in segments] == list(range(1, len(PHANTOM_CLASSES)))
    liver = segments[0]
    assert liver.color_rgb_float == pytest.approx((221 / 255, 130 / 255, 101 / 255))
    assert liver.terminology == ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical "
                                 "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    kidney_left = next(s for s in segments if s.name == "kidney_left")
    assert "SCT^64033007^Kidney~SCT^7771000^Left~" in kidney_left.terminology
    assert len(kidney_left.terminology.split("~")) == 7
    assert next(s for s in segments if s.name == "vertebra").terminology is None
    # Same answer from the spec's ClassInfo tuple and from a {value: name} mapping with gaps.
    assert ss.segments_from_label_table(PHANTOM_CLASSES) == segments
    sparse = ss.segments_from_label_table({"0": "background", "5": "Left Kidney", "2": {"name": "x", "color": [0.5, 0, 1.0]}})
    assert [(s.value, s.name) for s in sparse] == [(2, "x"), (5, "Left Kidney")]
    assert sparse[0].color_rgb_float == (0.5, 0.0, 1.0) and "Left" in sparse[1].terminology
    with pytest.raises(InputError, match="no foreground"):
        ss.segments_from_label_table([ClassInfo("background")])


def test_reference_labels_match_classes_by_name():
    masks = {"Liver": np.eye(3, dtype=bool)[None].repeat(2, 0), "tumor": np.ones((2, 3, 3), bool),
             "Kidney Left": np.zeros((2, 3, 3), bool)}
    labels, matched = ss.reference_label_array(masks, ["background", "liver", "kidney_left", "spleen"])
    assert matched == ["liver", "kidney_left"] and labels.dtype == np.uint16
    assert np.array_equal(labels, masks["Liver"].astype(np.uint16))
    with pytest.raises(InputError, match="No reference segment"):
        ss.reference_label_array({"tumor": np.ones((2, 2, 2))}, ["background", "liver"])


# ---------------------------------------------------------------- commands, progress, results


def test_command_lines_and_parsing():
    q = ss.quantize_command("py", "spec.json", ["a.nrrd", Path("b")], "out", 4, "entropy")
    assert q == ["py", "-m", "PTQLogic.app.cli", "quantize", "--model", "spec.json", "--calibration", "a.nrrd", "b",
                 "--out", "out", "--patches", "4", "--method", "entropy", "--min-agreement", "0.98",
                 "--guard-runtime", "auto", "--progress-lines", "--json"]  # the guard is on by default
    from PTQLogic.app.cli import build_parser  # the options the module passes exist in the real CLI

    parser = build_parser()
    for minimum, runtime, expected in ((0.95, "openvino", (0.95, False, "openvino")),
                                       (0.0, "onnxruntime", (None, True, "onnxruntime")),
                                       (None, "torch", (None, True, "auto"))):
        command = ss.quantize_command("py", "spec.json", ["a"], "o", 4, "max", min_agreement=minimum, runtime=runtime)
        args = parser.parse_args(command[3:-2])
        assert (args.min_agreement, args.no_guard, args.guard_runtime) == expected, command
        assert args.placement is None  # auto: the fidelity placement
    s = ss.segment_command("py", "m", "in.nrrd", "out.nrrd", "auto", "int8", True, reference="ref.nrrd")
    assert s[:4] == ["py", "-m", "PTQLogic.app.cli", "segment"] and s[-2:] == ["--progress-lines", "--json"]
    assert "--compare" in s and s[s.index("--reference") + 1] == "ref.nrrd"
    assert "--compare" not in ss.segment_command("py", "m", "i", "o", "openvino", "fp32", False)
    with pytest.raises(PTQError, match="calibration"):
        ss.quantize_command("py", "s", [], "o", 4, "max")
    percentile = ss.quantize_command("py", "spec.json", ["a"], "o", 4, "percentile", percentile=99.95)
    assert percentile[12:16] == ["--method", "percentile", "--percentile", "99.95"]
    assert parser.parse_args(percentile[3:]).percentile == 99.95
    assert "--percentile" not in ss.quantize_command("py", "spec.json", ["a"], "o", 4, "percentile")  # CLI default
    with pytest.raises(PTQError, match="--percentile must be in"):  # refused before a job starts
        ss.quantize_command("py", "s", ["a"], "o", 4, "percentile", percentile=100.0)
    with pytest.raises(PTQError, match="Calibration method must be one of"):
        ss.quantize_command("py", "s", ["a"], "o", 4, "minmax")
    for method in ("max", "entropy", "percentile"):  # opt-in, with any method; sent once, only when asked
        corrected = ss.quantize_command("py", "spec.json", ["a"], "o", 4, method, bias_correction=True)
        assert corrected.count("--bias-correction") == 1 and parser.parse_args(corrected[3:]).bias_correction
        plain = ss.quantize_command("py", "spec.json", ["a"], "o", 4, method, bias_correction=False)
        assert "--bias-correction" not in plain and not parser.parse_args(plain[3:]).bias_correction
        assert [arg for arg in corrected if arg != "--bias-correction"] == plain

    assert ss.parse_progress(progress_line("calibrate", 3, 4)) == (0.75, "calibrate 3/4")
    assert ss.parse_progress(progress_line("x", 0, 0))[0] == 0.0 and ss.parse_progress("hello") is None


def test_the_bar_never_goes_back_when_a_part_exports_beside_the_next_part():
    bar = ss.RunProgress()
    lines = [progress_line("part 1/2 (a): sliding window", 4, 4), progress_line("part 1/2 (a): export", 1, 3),
             progress_line("part 2/2 (b): sliding window", 1, 4),
             progress_line("part 1/2 (a): export", 3, 3),  # part a's export finishing beside part b's windows
             progress_line("part 2/2 (b): sliding window", 4, 4), progress_line("part 2/2 (b): export", 3, 3)]
    shown = [bar.update(line) for line in lines]
    fractions = [fraction for fraction, _ in shown]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert ss.parse_progress(lines[3])[0] < ss.parse_progress(lines[2])[0]  # what the bar alone would have shown
    assert shown[3][1] == "part 1/2 (a): export 3/3"  # the status still says what reported
    assert bar.update(progress_line("calibrate", 1, 4))[0] == 0.25 and bar.update("hello") is None  # other stages
    stdout = 'noise {not json}\n{"a": 1}\n{\n "output": "o.nrrd", "nested": {"k": [1, 2]}\n}\n'
    assert ss.parse_result(stdout) == {"output": "o.nrrd", "nested": {"k": [1, 2]}}
    with pytest.raises(PTQError, match="without printing a result"):
        ss.parse_result("nothing here")
    stderr = progress_line("a", 1, 2) + "\nwarning: x\nerror: Model spec 'x' does not exist\n" + progress_line("a", 2, 2)
    assert ss.parse_error(stderr) == "Model spec 'x' does not exist"
    assert ss.parse_error("Traceback...\nValueError: boom\n") == "ValueError: boom"


def test_results_rows():
    rows = dict(ss.results_rows({"runtime": "openvino", "runtime_reason": "no NVIDIA GPU", "precision": "int8",
                                 "engine_size_mb": 4.7213, "build_seconds": 0.52, "latency_ms": 40.83,
                                 "seconds": 3.2, "agreement_dice": 0.99512, "reference_dice": None}))
    assert rows == {"Runtime": "openvino (no NVIDIA GPU)", "Precision": "int8", "Engine size": "4.72 MB",
                    "Engine build/load time": "0.52 s", "Latency per patch": "40.8 ms", "Total time": "3.20 s",
                    "Agreement Dice (vs FP32)": "0.9951"}
    quantized = dict(ss.results_rows({"fp32_mb": 18.4, "int8_mb": 4.72, "size_ratio": 0.2565, "qdq_ok": True}))
    assert quantized == {"FP32 ONNX size": "18.40 MB", "INT8 ONNX size": "4.72 MB", "INT8/FP32 size": "0.257",
                         "TensorRT Q/DQ rules": "pass"}
    ort = dict(ss.results_rows({"qdq_ok": False, "placement": {
        "placement": "cpu", "activations": "u8", "subpixel": True,
        "auto": "Q/DQ placement: cpu --activations u8 --subpixel (auto: INT8 runs on onnxruntime here)"}}))
    assert ort == {"Q/DQ placement": "cpu --activations u8 --subpixel (auto: INT8 runs on onnxruntime here)",
                   "TensorRT Q/DQ rules": "not met: u8 activations are for ONNX Runtime"}
    explicit = dict(ss.results_rows({"qdq_ok": True, "placement": {"placement": "modelopt", "activations": "s8",
                                                                    "subpixel": False, "auto": ""}}))
    assert explicit == {"Q/DQ placement": "modelopt (s8)", "TensorRT Q/DQ rules": "pass"}


# ---------------------------------------------------------------- background process


def _write(path: Path, code: str) -> Path:
    path.write_text(textwrap.dedent(code))
    return path


def test_background_process_streams_progress_and_result(tmp_path):
    script = _write(tmp_path / "job.py", """
        import json, sys
        from PTQLogic.core.progress import line_monitor
        monitor = line_monitor()
        for i in range(1, 4):
            monitor.update("work", i, 3)
        print("log line")
        print(json.dumps({"output": "labels.nrrd", "latency_ms": 1.5}))
    """)
    env = ss.engine_environment(os.environ, ss.ptqlogic_parent_dir(ROOT / "PTQSegmentation"))
    job = ss.BackgroundProcess([sys.executable, str(script)], env=env, cwd=str(tmp_path))
    progress, deadline, code = [], time.time() + 30, None
    while code is None and time.time() < deadline:
        lines, code = job.poll()
        progress += [ss.parse_progress(line) for stream, line in lines if stream == "stderr"]
        time.sleep(0.02)
    assert code == 0, job.stderr_lines
    assert [p for p in progress if p] == [(1 / 3, "work 1/3"), (2 / 3, "work 2/3"), (1.0, "work 3/3")]
    assert ss.parse_result("\n".join(job.stdout_lines)) == {"output": "labels.nrrd", "latency_ms": 1.5}


def test_cancel_ends_the_whole_process_tree(tmp_path):
    psutil = pytest.importorskip("psutil")
    script = _write(tmp_path / "tree.py", """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    job = ss.BackgroundProcess([sys.executable, str(script)])
    deadline = time.time() + 20
    while not job.stdout_lines and time.time() < deadline:
        job.poll()
        time.sleep(0.05)
    grandchild = psutil.Process(int(job.stdout_lines[0]))
    started = time.time()
    job.cancel()
    assert time.time() - started < 1  # never blocks the GUI thread
    code = job.wait(timeout=15)
    assert code != 0 and job.cancelled
    grandchild.wait(timeout=10)
    assert not grandchild.is_running() and time.time() - started < 10


def test_cancel_kills_a_process_that_ignores_sigterm(tmp_path):
    script = _write(tmp_path / "stubborn.py", """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """)
    job = ss.BackgroundProcess([sys.executable, str(script)])
    job.kill_after_s = 0.5
    deadline = time.time() + 20
    while not job.stdout_lines and time.time() < deadline:
        job.poll()
        time.sleep(0.05)
    job.cancel()
    assert job.wait(timeout=15) == -9


def test_cancel_through_a_launcher_ends_the_engine_process(tmp_path):
    """Issue 10 item 2: PythonSlicer is a CTKAppLauncher-style parent: it starts python-real as a child, has
    no SIGTERM handler (dies at once, forwards nothing). The child here ignores SIGTERM like a process
    inside a native TensorRT build. Cancel must not report the job finished while the child still runs."""
    psutil = pytest.importorskip("psutil")
    launcher = _write(tmp_path / "launcher.py", """
        import subprocess, sys
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('engine', flush=True); "
            "time.sleep(60)"])
        print(child.pid, flush=True)
        sys.exit(child.wait())
    """)
    job = ss.BackgroundProcess([sys.executable, str(launcher)])
    job.kill_after_s = 0.5
    deadline = time.time() + 20
    while len(job.stdout_lines) < 2 and time.time() < deadline:
        job.poll()
        time.sleep(0.05)
    engine = psutil.Process(int(next(line for line in job.stdout_lines if line.isdigit())))
    started = time.time()
    job.cancel()
    code = None
    while code is None and time.time() - started < 20:
        code = job.poll()[1]
        if code is None:
            time.sleep(0.05)
            continue
        try:  # the moment the job reports an end, the engine must be gone (or a zombie awaiting its reaper)
            assert engine.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    assert code is not None and job.cancelled and time.time() - started < 10


def test_real_cli_failure_gives_one_line_reason(tmp_path):
    env = ss.engine_environment(os.environ, ROOT)
    command = ss.segment_command(sys.executable, tmp_path / "missing-model", tmp_path / "in.nrrd",
                                 tmp_path / "out.nrrd", "auto", "int8", False)
    job = ss.BackgroundProcess(command, env=env, cwd=str(tmp_path))
    assert job.wait(timeout=120) != 0
    reason = ss.parse_error("\n".join(job.stderr_lines))
    assert "missing-model" in reason and "Traceback" not in reason
    assert not (tmp_path / "out.nrrd").exists()


# ---------------------------------------------------------------- dependencies


def test_dependency_plan():
    everything = {n: "1.0" for n in ["torch", "monai", "onnx", "onnxruntime-gpu", "openvino", "nvidia-modelopt"]}
    assert not ss.dependency_plan(everything, has_nvidia_gpu=False).needed
    gpu = ss.dependency_plan(everything, has_nvidia_gpu=True)
    assert gpu.to_install == ["tensorrt>=10"] and "1.1 GB" in gpu.message

    fresh = ss.dependency_plan({"numpy": "1.26.4", "SimpleITK": "2.3.1"}, False, system="Linux", machine="x86_64")
    names = [r.split(">=")[0] for r in fresh.to_install]
    assert names == ["torch", "monai", "onnx", "openvino", "nvidia-modelopt[onnx]"]  # ORT-GPU comes with it
    assert fresh.constraints == ["numpy==1.26.4", "simpleitk==2.3.1"] and "tensorrt" not in fresh.message
    assert "onnxruntime-gpu comes with nvidia-modelopt" in fresh.message and "GB" in fresh.message

    clash = ss.dependency_plan({"onnxruntime": "1.20"}, False, system="Linux", machine="x86_64")
    assert clash.to_uninstall == ["onnxruntime"] and not any(r.startswith("onnxruntime") for r in clash.to_install)
    # nvidia-modelopt[onnx] pins onnxruntime-gpu on Windows x86-64 too: never a second ORT next to it
    windows = ss.dependency_plan({}, False, system="Windows", machine="AMD64")
    assert not any(r.startswith("onnxruntime") for r in windows.to_install)
    assert "onnxruntime-gpu comes with nvidia-modelopt" in windows.message
    mac = ss.dependency_plan({}, False, system="Darwin", machine="arm64")
    assert not any(r.startswith("onnxruntime") for r in mac.to_install)  # ModelOpt brings plain onnxruntime

    # Slicer < 5.10 has Python 3.9, which ModelOpt does not support: segment-only packages, said plainly
    old = ss.dependency_plan({}, False, system="Linux", machine="x86_64", python_version=(3, 9))
    assert not any("modelopt" in r for r in old.to_install) and "onnxruntime>=1.17" in old.to_install
    assert "Python 3.10" in old.message and not ss.quantization_supported((3, 9))
    assert ss.quantization_supported((3, 12))

    asked = ss.dependency_plan(everything, False, requested=["numpy", "SimpleITK", "openvino", "scipy"])
    assert asked.skipped_shipped == ["numpy", "scipy", "simpleitk"] and not asked.to_install

    versions = ss.installed_versions(["numpy", "surely-not-a-package-xyz"])
    assert versions["numpy"] == np.__version__ and versions["surely-not-a-package-xyz"] is None


# ---------------------------------------------------------------- model sources


def _tiny_spec(folder: Path, name: str = "tiny.json", **extra) -> Path:
    data = {"name": "tiny", "architecture": "UNet", "classes": ["background", "liver", "spleen"],
            "patch_size": [16, 16, 16], **extra}
    path = folder / name
    path.write_text(json.dumps(data))
    return path


def test_choose_model_source(tmp_path):
    import onnx
    import torch
    from onnx import TensorProto, helper

    spec = ss.choose_model_source(_tiny_spec(tmp_path))
    assert (spec.kind, spec.quantizable) == ("spec", True)
    assert "UNet" in spec.description and "2 classes (liver, spleen)" in spec.description and "16x16x16" in spec.description

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 32, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 32, 32, 32])])
    onnx.save(helper.make_model(graph), tmp_path / "net.onnx")
    bare = ss.choose_model_source(tmp_path / "net.onnx")
    assert bare.kind == "onnx" and "Nx1x32x32x32" in bare.description and not bare.quantizable
    _tiny_spec(tmp_path, "net.json", weights="net.onnx", weights_format="onnx")
    assert ss.choose_model_source(tmp_path / "net.onnx").spec_path == str(tmp_path / "net.json")

    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 2, 1)), str(tmp_path / "scripted.pt"))
    torch.save(torch.nn.Conv3d(1, 2, 1).state_dict(), tmp_path / "weights.pth")
    assert ss.choose_model_source(tmp_path / "scripted.pt").kind == "torchscript"
    assert ss.choose_model_source(tmp_path / "weights.pth").kind == "state_dict"

    bundle = tmp_path / "spleen_bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"name": "Spleen CT", "version": "0.5"}))
    found = ss.choose_model_source(bundle)
    assert found.kind == "monai_bundle" and "configs/inference.json" in found.description and not found.quantizable

    nnunet = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (nnunet / "fold_0").mkdir(parents=True)
    (nnunet / "plans.json").write_text("{}")
    (nnunet / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}}))
    found = ss.choose_model_source(nnunet)
    assert found.kind == "nnunet" and not found.quantizable and "plans.json" in found.description

    model_dir = tmp_path / "quantized"
    model_dir.mkdir()
    _tiny_spec(model_dir, "spec.json")
    (model_dir / "fp32.onnx").write_bytes(b"")
    found = ss.choose_model_source(model_dir)
    assert (found.kind, found.segmentable) == ("model_dir", True)

    for bad in (tmp_path / "missing.json", tmp_path / "empty_dir", tmp_path / "weights.h5"):
        if bad.suffix == "":
            bad.mkdir()
        elif bad.name.endswith(".h5"):
            bad.write_bytes(b"x")
        with pytest.raises(InputError):
            ss.choose_model_source(bad)
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(InputError, match="not a usable model spec"):
        ss.choose_model_source(tmp_path / "broken.json")


def test_info_command_reports_the_auto_runtime_choice():
    """The module's runtime line comes from the real `ptqseg info --json` in a separate process."""
    import subprocess
    import sys

    from PTQLogic.slicer.support import info_command, parse_result, runtime_choice_text

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(info_command(sys.executable), capture_output=True, text=True, cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr
    text = runtime_choice_text(parse_result(proc.stdout))
    lines = text.splitlines()
    assert [line.split(":")[0] for line in lines] == ["FP32", "FP16", "INT8", "AUTO precision"]
    assert lines[2].startswith("INT8: openvino - OpenVINO")  # no NVIDIA GPU here
    assert lines[1].startswith("FP16: unavailable - FP16 needs an NVIDIA GPU")
    assert lines[3].startswith("AUTO precision: int8 - openvino")  # FP16 only where TensorRT runs


def test_sample_models_are_the_shipped_specs_only():
    from PTQLogic.core.spec import load_spec

    data = Path(ss.__file__).parents[1] / "samples" / "data"
    found = ss.sample_models(data)
    names = [p.name for p in found]
    assert "phantom_unet.json" in names and "phantom_segresnet.json" in names and "ct_unet.json" in names
    assert not any("training" in n or "summary" in n for n in names)  # specs only, not training records
    assert all(load_spec(p).weights_path().is_file() for p in found)
    assert ss.sample_models(data / "missing") == []
