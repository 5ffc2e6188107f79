"""nnU-Net results folders through `ptqseg quantize` and `ptqseg segment`: per-fold ONNX, every runtime,
INT8 agreement, and TotalSegmentator-style parts merged into one named label map."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

os.environ.setdefault("nnUNet_def_n_proc", "1")

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_factory import (FOLDER_NAME, dataset, one_thread, plans, write_folder,  # noqa: F401 (autouse fixture)
                             write_image)
from PTQLogic.app.cli import main
from PTQLogic.core.errors import InputError
from PTQLogic.io.volumes import label_table_paths, read_volume
from PTQLogic.samples.phantom import make_phantom
from PTQLogic.models.model_files import choose_model_source

LABELS = ["background", "liver", "spleen", "kidney_right"]


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_images")
    calibration = [write_image(make_phantom(s, (36, 36, 36), (1.5, 1.5, 1.5))[0], root / f"cal_{s}.nii.gz")
                   for s in (11, 12)]
    test = write_image(make_phantom(13, (34, 38, 40), (1.4, 1.4, 1.6))[0], root / "test.nii.gz")
    return {"calibration": [str(c) for c in calibration], "image": str(test)}


def _quantize(folder, out, images, capsys, patches=4):
    code = main(["quantize", "--model", str(folder), "--calibration", *images["calibration"], "--out", str(out),
                 "--patches", str(patches), "--no-guard", "--json"])  # random weights: agreement is not the point
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def _segment(model, image, output, capsys, *extra):
    models = [a for m in ([model] if not isinstance(model, list) else model) for a in ("--model", str(m))]
    code = main(["segment", *models, "--input", image, "--output", str(output), "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_quantize_two_folds_and_segment_with_every_runtime(tmp_path, images, capsys):
    folder = write_folder(tmp_path, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS), folds=(0, 1))
    before = _digest(folder)
    found = choose_model_source(folder)  # what the Slicer Model field shows and quantizes
    assert found.kind == "nnunet" and found.quantizable and found.spec_path == str(folder)
    assert "PlainConvUNet" in found.description and "3 classes" in found.description and "folds 0, 1" in found.description
    out = tmp_path / "int8"
    summary = _quantize(folder, out, images, capsys)
    assert summary["qdq_ok"] and summary["source"] == "nnunet" and len(summary["int8_onnx"]) == 2
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"nnunet_model.json", "spec.json", "plans.json", "dataset.json", "quantization.json",
            "fold_0/fp32.onnx", "fold_0/int8.onnx", "fold_0/weights.pt", "fold_1/int8.onnx"} <= names
    assert _digest(folder) == before  # the original folder is never modified
    found = choose_model_source(out)
    assert found.kind == "model_dir" and found.segmentable and "liver" in found.description

    original = _segment(folder, images["image"], tmp_path / "original.nii.gz", capsys, "--runtime", "torch",
                        "--precision", "fp32")
    assert original["patches"] == 2 * 8  # both folds ran the whole sliding window
    reference = read_volume(tmp_path / "original.nii.gz")
    assert reference.same_grid(read_volume(images["image"]))
    assert len(np.unique(reference.array)) == 4
    torch_fp32 = _segment(out, images["image"], tmp_path / "torch.nii.gz", capsys, "--runtime", "torch",
                          "--precision", "fp32")
    assert torch_fp32["runtime"] == "torch"
    assert np.array_equal(read_volume(tmp_path / "torch.nii.gz").array, reference.array)
    _segment(out, images["image"], tmp_path / "ort.nii.gz", capsys, "--runtime", "onnxruntime", "--precision", "fp32")
    assert np.mean(read_volume(tmp_path / "ort.nii.gz").array == reference.array) > 0.999
    for runtime in ("openvino", "onnxruntime"):
        result = _segment(out, images["image"], tmp_path / f"{runtime}8.nii.gz", capsys, "--runtime", runtime,
                          "--precision", "int8", "--compare")
        assert result["precision"] == "int8" and result["agreement_dice"] > 0.85, result
        assert result["fp32_latency_ms"] > 0 and result["fp32_seconds"] > 0  # FP32's time, as for other models
        slower = result["fp32_latency_ms"] / result["latency_ms"] < 1.1
        assert any("does not pay off in speed" in w for w in result["warnings"]) == slower
    table = json.loads(label_table_paths(tmp_path / "openvino8.nii.gz")[0].read_text())
    assert [row["name"] for row in table["labels"]] == LABELS
    # Dice against a reference pairs classes as `evaluate` does: by name through the label tables, else --label-map
    truth = str(tmp_path / "original.nii.gz")
    same = _segment(out, images["image"], tmp_path / "t1.nii.gz", capsys, "--runtime", "torch", "--precision", "fp32",
                    "--reference", truth)
    assert same["reference_dice"] == 1.0 and not same["warnings"]
    swapped = _segment(out, images["image"], tmp_path / "t2.nii.gz", capsys, "--runtime", "torch", "--precision",
                       "fp32", "--reference", truth, "--label-map", "1=2,2=1")
    assert swapped["reference_dice"] < 0.5 and swapped["reference_per_class"]["3 kidney_right"] == 1.0
    code = main(["segment", "--model", str(out), "--input", truth, "--output", str(tmp_path / "x.nii.gz")])
    assert code == 2 and "looks like a label map" in capsys.readouterr().err  # refused, as for other models
    _segment(out, images["image"], tmp_path / "openvino8.seg.nrrd", capsys, "--runtime", "openvino")
    header = sitk.ReadImage(str(tmp_path / "openvino8.seg.nrrd"))  # Slicer's segment names are the classes
    assert [header.GetMetaData(f"Segment{i}_Name") for i in range(3)] == LABELS[1:]
    shutil.copytree(out, tmp_path / "copied")  # a copy that lost one fold's ONNX: said so, not "no fold 1"
    (tmp_path / "copied" / "fold_1" / "fp32.onnx").unlink()
    code = main(["segment", "--model", str(tmp_path / "copied"), "--input", images["image"],
                 "--output", str(tmp_path / "c.nii.gz")])
    err = capsys.readouterr().err
    assert code != 0 and "incomplete: fold_1/fp32.onnx is missing" in err and "no fold" not in err, err
    assert not (tmp_path / "c.nii.gz").exists()


def test_totalsegmentator_style_parts_merge_into_one_named_map(tmp_path, images, capsys):
    """Two part folders (own labels each, like Dataset291..295), quantized, segmented together."""
    parts = {"part_organs": ["background", "spleen", "kidney_right"], "part_more": ["background", "liver", "stomach"]}
    quantized = []
    for seed, (name, labels) in enumerate(parts.items()):
        folder = write_folder(tmp_path / name, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(labels), seed=10 * seed)
        quantized.append(tmp_path / f"{name}-int8")
        _quantize(folder, quantized[-1], images, capsys, patches=2)
    run = ("--runtime", "openvino", "--precision", "int8")
    singles = []
    for index, model in enumerate(quantized):
        _segment(model, images["image"], tmp_path / f"single{index}.nii.gz", capsys, *run)
        singles.append(read_volume(tmp_path / f"single{index}.nii.gz").array)

    _segment(quantized, images["image"], tmp_path / "merged.nii.gz", capsys, *run)
    merged = read_volume(tmp_path / "merged.nii.gz").array
    table = [row["name"] for row in json.loads(label_table_paths(tmp_path / "merged.nii.gz")[0].read_text())["labels"]]
    assert table == ["background", "spleen", "kidney_right", "liver", "stomach"]
    expected = singles[0].copy()
    expected[singles[1] > 0] = singles[1][singles[1] > 0] + 2  # later parts overwrite, as TotalSegmentator does
    assert np.array_equal(merged, expected) and len(np.unique(merged)) >= 4

    # a parts file with TotalSegmentator's class values (a subset of its "total" map)
    total = {"1": "spleen", "2": "kidney_right", "5": "liver", "6": "stomach"}
    parts_file = tmp_path / "total_parts.json"
    parts_file.write_text(json.dumps({"parts": [q.name for q in quantized], "labels": total}))
    _segment(parts_file, images["image"], tmp_path / "total.nii.gz", capsys, *run)
    total_map = read_volume(tmp_path / "total.nii.gz").array
    lookup = np.array([0, 1, 2, 5, 6])
    assert np.array_equal(total_map, lookup[merged])
    names = {row["value"]: row["name"] for row in json.loads(label_table_paths(tmp_path / "total.nii.gz")[0].read_text())["labels"]}
    assert all(names[int(k)] == v for k, v in total.items())


def test_a_part_whose_int8_misses_the_target_runs_in_fp32_with_on_miss_fp32(tmp_path, images, capsys):
    """quantize --on-miss fp32: the folder keeps FP32 only and says why; segment runs that part in FP32 beside the
    INT8 parts and says so, with the labels FP32 gives."""
    organs = write_folder(tmp_path / "organs", plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS))
    more = write_folder(tmp_path / "more", plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(["background", "stomach"]),
                        seed=10)
    int8_part = tmp_path / "more-int8"
    _quantize(more, int8_part, images, capsys, patches=2)
    kept = tmp_path / "organs-q"
    code = main(["quantize", "--model", str(organs), "--calibration", *images["calibration"], "--out", str(kept),
                 "--patches", "2", "--min-agreement", "1.0", "--max-kept-layers", "1", "--guard-runtime",
                 "onnxruntime", "--on-miss", "fp32", "--json"])  # random weights: INT8 cannot agree perfectly
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads(captured.out)
    assert "misses the accuracy target on onnxruntime" in data["int8_fallback"]["reason"]
    assert data["int8_onnx"] == [] and data["guard"]["met"] is False and len(data["calibration_inputs"]) == 2
    assert (kept / "fold_0" / "fp32.onnx").is_file() and not list((kept / "fold_0").glob("int8*"))
    from PTQLogic.slicer import support  # the Slicer panel's results table says it too

    rows = dict(support.results_rows(data))
    assert rows["INT8"].startswith("not kept") and "INT8 ONNX size" not in rows
    assert rows["Accuracy guard"].startswith("target 1.000 missed on onnxruntime")
    report = json.loads((kept / "quantization.json").read_text())
    assert report["int8_fallback"]["precision"] == "fp32" and report["folds"]["0"]["path"] is None
    assert report["folds"]["0"]["guard"]["steps"] and report["qdq"]["ok"] is None

    run = ("--runtime", "openvino", "--precision", "int8")
    alone = _segment(kept, images["image"], tmp_path / "alone.nii.gz", capsys, *run)
    _segment(kept, images["image"], tmp_path / "fp32.nii.gz", capsys, "--runtime", "openvino", "--precision", "fp32")
    assert alone["precision"] == "fp32"
    assert any("ran in FP32, not INT8" in w and "< 1.0000 on onnxruntime" in w for w in alone["warnings"])
    fp32_labels = read_volume(tmp_path / "fp32.nii.gz").array
    assert np.array_equal(read_volume(tmp_path / "alone.nii.gz").array, fp32_labels)

    both = _segment([kept, int8_part], images["image"], tmp_path / "both.nii.gz", capsys, *run)
    assert both["precision"] == "int8"  # the parts that have INT8 ran it
    assert sum("ran in FP32, not INT8" in w for w in both["warnings"]) == 1
    _segment(int8_part, images["image"], tmp_path / "more.nii.gz", capsys, *run)
    expected = fp32_labels.copy()
    more_labels = read_volume(tmp_path / "more.nii.gz").array
    expected[more_labels > 0] = more_labels[more_labels > 0] + len(LABELS) - 1
    assert np.array_equal(read_volume(tmp_path / "both.nii.gz").array, expected)

    # without --on-miss fp32 the same miss is an error and nothing is written
    code = main(["quantize", "--model", str(organs), "--calibration", *images["calibration"], "--out",
                 str(tmp_path / "refused"), "--patches", "2", "--min-agreement", "1.0", "--max-kept-layers", "1",
                 "--guard-runtime", "onnxruntime"])
    assert code != 0 and "misses the accuracy target" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


def test_on_miss_fp32_is_refused_for_models_that_are_not_nnunet_folders(tmp_path, images, capsys):
    from pathlib import Path

    import PTQLogic

    spec = Path(PTQLogic.__file__).parent / "samples" / "data" / "phantom_unet.json"
    code = main(["quantize", "--model", str(spec), "--calibration", *images["calibration"], "--out",
                 str(tmp_path / "out"), "--on-miss", "fp32"])
    err = capsys.readouterr().err
    assert code == 2 and "--on-miss fp32 is for nnU-Net folders" in err and "--precision fp32" in err, err
    assert not (tmp_path / "out").exists()


def test_a_dataset_folder_given_for_its_results_folder_names_it(tmp_path, capsys):
    """TotalSegmentator keeps each part as DatasetNNN_name/<trainer>__<plans>__<configuration>/: a user who picks
    the Dataset folder, or the folder of all parts, is told which folder(s) to give instead."""
    parts = tmp_path / "results"
    for name in ("Dataset291_organs", "Dataset292_vertebrae"):
        write_folder(parts / name, plans([1.5, 1.5, 1.5], [32, 32, 32]), dataset(LABELS))
    organs = parts / "Dataset291_organs"
    inner = organs / FOLDER_NAME
    assert choose_model_source(inner).kind == "nnunet"
    with pytest.raises(InputError, match="give that folder") as one:
        choose_model_source(organs)
    assert f"'{inner}'" in str(one.value)
    with pytest.raises(InputError, match="give one of them") as both:
        choose_model_source(parts)
    assert f"'{inner}'" in str(both.value) and f"'{parts / 'Dataset292_vertebrae' / FOLDER_NAME}'" in str(both.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError) as none:
        choose_model_source(empty)
    assert "It holds" not in str(none.value)
    assert main(["quantize", "--model", str(organs), "--calibration", str(organs), "--out", str(tmp_path / "q")]) == 2
    assert str(inner) in capsys.readouterr().err and not (tmp_path / "q").exists()
    image = write_image(make_phantom(0, (24, 24, 24), (1.5, 1.5, 1.5))[0], tmp_path / "ct.nii.gz")  # segment: same
    assert main(["segment", "--model", str(organs), "--input", str(image), "--output", str(tmp_path / "s.nii.gz"),
                 "--precision", "fp32"]) == 2
    assert str(inner) in capsys.readouterr().err and not list(tmp_path.glob("s.nii.gz*"))
