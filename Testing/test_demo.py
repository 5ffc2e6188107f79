"""`ptqseg demo --json`: the main job on the built-in default, through the real command line."""
import json
import subprocess
import sys

from conftest import ROOT


def test_demo_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "PTQLogic", "demo", "--json", "--out", str(tmp_path / "demo")],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    fp32, int8 = result["fp32"], result["int8"]
    for entry in (fp32, int8):
        assert {"dice", "size_mb", "latency_ms"} <= set(entry)
        assert entry["latency_ms"] > 0
    assert fp32["dice"] > 0.85
    assert int8["dice"] >= fp32["dice"] - 0.01
    assert int8["agreement_dice"] >= 0.98
    assert int8["size_mb"] <= 0.35 * fp32["size_mb"]
    assert result["qdq_ok"] is True
    assert (tmp_path / "demo" / "results" / "labels_{}_int8.nii.gz".format(int8["runtime"])).is_file()


def test_demo_summary_names_the_placement_and_u8_is_not_called_a_failure():
    from PTQLogic.app.demo import format_demo

    line = "Q/DQ placement: cpu --activations u8 --subpixel (auto: INT8 runs on onnxruntime here)"
    text = format_demo({"markdown": "", "quantize_seconds": 1.0, "qdq_ok": False, "output_dir": "out",
                        "placement": {"placement": "cpu", "activations": "u8", "subpixel": True, "auto": line}})
    assert "INT8 runs on onnxruntime here" in text and "not met: u8 activations" in text and "FAIL" not in text
