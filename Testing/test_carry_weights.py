"""benchmarks/training/carry_weights.py: a trained nnU-Net set packed into small chunks on one machine and unpacked
on another is the very network the first machine runs after packing (fp16 values); damage is caught."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks" / "training"))

from carry_weights import main, pack, unpack  # noqa: E402

torch = pytest.importorskip("torch")


def _part(root: Path, name: str, seed: int) -> Path:
    """A results folder with a real PlainConvUNet checkpoint (its decoder holds the encoder's tensors again)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    torch.manual_seed(seed)
    net = PlainConvUNet(1, 3, (4, 8, 16), torch.nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 3, (1, 1), True,
                        torch.nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU)
    folder = root / f"Dataset29{seed}_TotalSegShape_{name}" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps({"name": name}))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0}}))
    torch.save({"trainer_name": "nnUNetTrainer", "init_args": {"fold": 0}, "network_weights": net.state_dict()},
               folder / "fold_0" / "checkpoint_final.pth")
    return folder


def _weights(folder: Path) -> dict:
    return torch.load(folder / "fold_0" / "checkpoint_final.pth", weights_only=True)["network_weights"]


def test_unpacked_weights_equal_the_packing_machines_rounded_ones(tmp_path):
    trained = [_part(tmp_path / "set", "organs", 1), _part(tmp_path / "set", "ribs", 5)]
    before = {f.parent.name: _weights(f) for f in trained}
    manifest = pack(tmp_path / "set", tmp_path / "packs", chunk_mib=0.005)
    assert sum(len(p["chunks"]) for p in manifest["parts"].values()) > 2  # split into several chunks
    assert all((tmp_path / "packs" / c).stat().st_size <= 0.005 * 2**20
               for p in manifest["parts"].values() for c in p["chunks"])
    written = unpack(tmp_path / "packs", tmp_path / "there")
    assert [w.relative_to(tmp_path / "there") for w in written] == [f.relative_to(tmp_path / "set") for f in trained]
    for folder, arrived in zip(trained, written):
        here, there, original = _weights(folder), _weights(arrived), before[folder.parent.name]
        assert list(there) == list(original)  # every key, aliased ones too, in the checkpoint's order
        for key, value in original.items():
            assert torch.equal(here[key], there[key])  # the packing machine runs what arrives
            assert torch.equal(there[key], value.half().float() if value.is_floating_point() else value)
        assert (arrived / "plans.json").read_text() == (folder / "plans.json").read_text()


def test_shared_tensors_travel_once(tmp_path):
    folder = _part(tmp_path / "set", "organs", 1)
    weights = _weights(folder)
    assert any(k.startswith("decoder.encoder.") for k in weights)
    pack(tmp_path / "set", tmp_path / "packs")
    packed = (tmp_path / "packs" / "Dataset291_TotalSegShape_organs.tar.000").stat().st_size
    fp16_bytes = sum(v.numel() * 2 for k, v in weights.items() if not k.startswith("decoder.encoder."))
    assert packed < 1.2 * fp16_bytes + 64 * 1024


def test_only_the_named_parts_are_packed_and_later_packs_add_to_the_manifest(tmp_path):
    _part(tmp_path / "set", "organs", 1)
    _part(tmp_path / "set", "ribs", 5)
    assert list(pack(tmp_path / "set", tmp_path / "packs", only=["ribs"])["parts"]) == ["Dataset295_TotalSegShape_ribs"]
    main(["pack", str(tmp_path / "set"), str(tmp_path / "packs"), "--only", "organs"])
    parts = json.loads((tmp_path / "packs" / "manifest.json").read_text())["parts"]
    assert sorted(parts) == ["Dataset291_TotalSegShape_organs", "Dataset295_TotalSegShape_ribs"]


def test_a_damaged_or_missing_chunk_is_refused_before_anything_is_written(tmp_path):
    _part(tmp_path / "set", "organs", 1)
    _part(tmp_path / "set", "ribs", 5)
    manifest = pack(tmp_path / "set", tmp_path / "packs", chunk_mib=0.005)
    chunks = manifest["parts"]["Dataset295_TotalSegShape_ribs"]["chunks"]  # the second part: the first is intact
    damaged = tmp_path / "packs" / chunks[1]
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="sha256 differs"):
        unpack(tmp_path / "packs", tmp_path / "there")
    damaged.unlink()
    with pytest.raises(SystemExit, match=f"missing chunk.*{chunks[1]}"):
        unpack(tmp_path / "packs", tmp_path / "there")
    assert not (tmp_path / "there").exists()


def test_nothing_to_pack_says_where_it_looked(tmp_path):
    with pytest.raises(SystemExit, match="no Dataset.*checkpoint_final.pth under"):
        pack(tmp_path, tmp_path / "packs")
