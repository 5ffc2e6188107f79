"""`evaluate` and `segment --reference`: one Dice, class names, label maps, name matching through label
tables, warnings for differing label sets, images refused as label maps, reoriented references."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from PTQLogic.app.cli import main
from PTQLogic.evaluation.metrics import compare_label_maps, parse_label_map
from PTQLogic.core.fileio import sha256_file

from conftest import SHARED_DATA


def write(path, array, direction=None, origin=(0.0, 0.0, 0.0), spacing=(1.5, 1.5, 2.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


def labels_array(seed=0, shape=(12, 14, 16)):
    rng = np.random.default_rng(seed)
    array = np.zeros(shape, np.uint8)
    array[2:8, 3:9, 4:12] = 1
    array[6:11, 8:13, 1:6] = 2
    array[rng.random(shape) < 0.02] = 3
    return array


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_reference_and_evaluate_give_the_same_dice(quantized_unet, phantom_files, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    code, stdout, err = run(["segment", "--model", quantized_unet, "--input", phantom_files["image"], "--output", out,
                             "--reference", phantom_files["truth"], "--runtime", "onnxruntime", "--json"], capsys)
    assert code == 0, err
    segment_result = json.loads(stdout)
    code, stdout, err = run(["evaluate", "--prediction", out, "--reference", phantom_files["truth"], "--json"], capsys)
    assert code == 0, err
    evaluate_result = json.loads(stdout)
    assert evaluate_result["mean"] == pytest.approx(segment_result["reference_dice"], abs=1e-12)
    assert evaluate_result["names"]["1"] == "liver"  # from the label table segment wrote next to its output
    assert list(segment_result["reference_per_class"]) [0] == "1 liver"


def test_label_map_pairs_prediction_with_reference_labels(tmp_path, capsys):
    pred = labels_array()
    ref = np.zeros_like(pred)
    ref[pred == 1], ref[pred == 2] = 5, 1  # model liver = 1, TotalSegmentator liver = 5, spleen 1
    write(tmp_path / "pred.nii.gz", pred)
    write(tmp_path / "ref.nii.gz", ref)
    code, stdout, err = run(["evaluate", "--prediction", tmp_path / "pred.nii.gz", "--reference",
                             tmp_path / "ref.nii.gz", "--label-map", "1=5,2=1", "--labels", "1", "2", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["per_class"] == {"1": 1.0, "2": 1.0} and result["pairs"] == {"1": 5, "2": 1}
    code, stdout, err = run(["evaluate", "--prediction", tmp_path / "pred.nii.gz", "--reference",
                             tmp_path / "ref.nii.gz", "--labels", "1", "2", "--json"], capsys)
    assert json.loads(stdout)["mean"] < 0.5
    assert "warning: the reference has 1 label(s)" in err and "5" in err  # label sets differ


def test_an_explicit_label_map_wins_over_label_tables_that_disagree(tmp_path, capsys):
    """Both label tables say 1=liver, 2=spleen, but the reference voxels are swapped: --label-map 1=2,2=1 decides."""
    from PTQLogic.evaluation.metrics import evaluate_files

    pred = labels_array()
    ref = np.zeros_like(pred)
    ref[pred == 1], ref[pred == 2] = 2, 1
    write(tmp_path / "pred.nii.gz", pred)
    write(tmp_path / "ref.nii.gz", ref)
    table = {"labels": [{"value": i, "name": n} for i, n in enumerate(["background", "liver", "spleen"])]}
    (tmp_path / "pred.json").write_text(json.dumps(table))
    (tmp_path / "ref_names.json").write_text(json.dumps({"1": "liver", "2": "spleen"}))
    files = dict(prediction=tmp_path / "pred.nii.gz", reference=tmp_path / "ref.nii.gz",
                 reference_labels=tmp_path / "ref_names.json", labels=[1, 2])
    assert evaluate_files(**files).pairs == {1: 1, 2: 2}  # by name alone: the tables are read
    result = evaluate_files(**files, label_map="1=2,2=1")
    assert result.pairs == {1: 2, 2: 1} and result.dice.per_class == {1: 1.0, 2: 1.0}
    code, stdout, err = run(["evaluate", "--prediction", files["prediction"], "--reference", files["reference"],
                             "--reference-labels", files["reference_labels"], "--label-map", "1=2,2=1",
                             "--labels", "1", "2", "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["pairs"] == {"1": 2, "2": 1} and json.loads(stdout)["mean"] == 1.0


def test_names_are_matched_through_label_tables(tmp_path):
    table = (SHARED_DATA / "totalsegmentator_total_labels.json")
    ref_names = json.loads(table.read_text()) if table.is_file() else {"1": "spleen", "5": "liver", "52": "aorta"}
    ref_names = {int(k): v for k, v in ref_names.items()}
    pred = labels_array()
    ref = np.zeros_like(pred)
    ref[pred == 1], ref[pred == 2], ref[pred == 3] = 5, 1, 52
    result = compare_label_maps(pred, ref, pred_names={0: "background", 1: "Liver", 2: "spleen", 3: "aorta"},
                                ref_names=ref_names)
    assert result.pairs == {1: 5, 2: 1, 3: 52}
    assert result.dice.per_class == {1: 1.0, 2: 1.0, 3: 1.0} and result.warnings == []


@pytest.mark.parametrize("text", ["1=x", "liver", "0=3", '{"1": "a"}'])
def test_bad_label_maps_are_refused(text):
    from PTQLogic.core.errors import InputError

    with pytest.raises(InputError, match="label"):
        parse_label_map(text)


@pytest.mark.parametrize("kind", ["ct", "fractional", "many"])
def test_an_image_is_refused_as_prediction(kind, tmp_path, capsys):
    rng = np.random.default_rng(0)
    image = {"ct": rng.integers(-1000, 1500, (10, 12, 14)).astype(np.int16),
             "fractional": rng.random((10, 12, 14)).astype(np.float32),
             "many": rng.integers(0, 3000, (10, 12, 14)).astype(np.uint16)}[kind]
    pred = write(tmp_path / "ct.nii.gz", image)
    ref = write(tmp_path / "ref.nii.gz", labels_array(shape=(10, 12, 14)))
    before = sha256_file(pred)
    code, _, err = run(["evaluate", "--prediction", pred, "--reference", ref], capsys)
    assert code != 0 and "looks like an image" in err and "ct.nii.gz" in err
    assert sha256_file(pred) == before


def test_reference_with_other_axis_directions_is_reoriented(tmp_path, capsys):
    """A LAS reference of an LPS image (same voxels, J axis stored flipped) is reoriented exactly."""
    truth = labels_array()
    lps = write(tmp_path / "pred.nii.gz", truth, origin=(10.0, 20.0, 30.0))
    # same voxel centres: flip the J (row) axis and move the origin to the last row
    las_direction = (1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)
    origin = (10.0, 20.0 + 1.5 * (truth.shape[1] - 1), 30.0)
    las = write(tmp_path / "ref.nii.gz", truth[:, ::-1, :].copy(), direction=las_direction, origin=origin)
    code, stdout, err = run(["evaluate", "--prediction", lps, "--reference", las, "--json"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["mean"] == 1.0
    assert "reoriented exactly" in err and "axes LAS" in err and "with LPS" in err


def test_a_real_geometry_mismatch_shows_both_geometries(tmp_path, capsys):
    truth = labels_array()
    a = write(tmp_path / "pred.nii.gz", truth)
    b = write(tmp_path / "ref.nii.gz", truth, spacing=(1.0, 1.5, 2.0), origin=(3.0, 0.0, 0.0))
    code, _, err = run(["evaluate", "--prediction", a, "--reference", b], capsys)
    assert code != 0
    line, = [l for l in err.splitlines() if l.startswith("error:")]
    # (x, y, z) order: NIfTI x is the fastest (last) numpy axis
    assert "shape (16, 14, 12)" in line and "spacing (1, 1.5, 2)" in line and "spacing (1.5, 1.5, 2)" in line
    assert "origin" in line and "axes" in line


def test_real_totalsegmentator_reference_matched_by_name(shared_data, tmp_path, capsys):
    """A 3-class prediction (liver=1, spleen=2, aorta=3) against TotalSegmentator's 41-label mask."""
    ref_path = shared_data / "example_seg.nii.gz"
    ref = sitk.ReadImage(str(ref_path))
    ts = sitk.GetArrayFromImage(ref)
    pred = np.zeros_like(ts, dtype=np.uint8)
    pred[ts == 5], pred[ts == 1], pred[ts == 52] = 1, 2, 3
    image = sitk.GetImageFromArray(pred)
    image.CopyInformation(ref)
    sitk.WriteImage(image, str(tmp_path / "pred.nii.gz"))
    (tmp_path / "pred.json").write_text(json.dumps({"labels": [{"value": i, "name": n} for i, n in
                                                                enumerate(["background", "liver", "spleen", "aorta"])]}))
    code, stdout, err = run(["evaluate", "--prediction", tmp_path / "pred.nii.gz", "--reference", ref_path,
                             "--reference-labels", shared_data / "totalsegmentator_total_labels.json", "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["pairs"] == {"1": 5, "2": 1, "3": 52} and result["mean"] == 1.0
    assert "label(s) no predicted class pairs with" in err
