"""Carry a trained TotalSegmentator-shaped set between machines whose transfers take small files (issue 25).

A lent GPU machine loses what it trained when it is given back, and its files come back in pieces of at most
16 MiB. ``pack`` rounds every part's weights to fp16 values *in place* (so the machine that packs runs the very
network that travels), keeps each distinct tensor once (nnU-Net's decoder holds the encoder's tensors a second
time) and splits each part into chunks with a sha256 manifest; ``unpack`` checks and rebuilds the results folders
(float32 tensors holding the fp16 values, as ``whole_ct.py --weights`` reads them):

    python benchmarks/training/carry_weights.py pack /root/stint/set /root/res/packs
    python benchmarks/training/carry_weights.py unpack /work/packs /work/tw/set
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

CHECKPOINT = "fold_0/checkpoint_final.pth"
FOLDER_FILES = ("plans.json", "dataset.json")


def part_folders(set_dir: Path, only: list[str] | None = None) -> list[Path]:
    """Every part's results folder (``Dataset*/<trainer>__<plans>__<config>/``) that holds a final checkpoint;
    with ``only``, those of the parts so named (``Dataset*_<name>``)."""
    found = sorted(c.parent.parent for c in Path(set_dir).glob(f"Dataset*/*/{CHECKPOINT}"))
    return [f for f in found if only is None or f.parent.name.rsplit("_", 1)[-1] in only]


def _save_atomic(obj: Any, path: Path) -> None:
    import torch

    tmp = path.with_name(path.name + ".part")
    torch.save(obj, tmp)
    tmp.replace(path)


def round_in_place(checkpoint: Path) -> dict[str, Any]:
    """Round the checkpoint's float tensors to fp16 values (stored as float32); the rounded checkpoint."""
    import torch

    record = torch.load(checkpoint, map_location="cpu", weights_only=True)
    record["network_weights"] = {k: v.half().float() if v.is_floating_point() else v
                                 for k, v in record["network_weights"].items()}
    _save_atomic(record, checkpoint)
    return record


def _shrunk(record: dict[str, Any]) -> dict[str, Any]:
    """The record with fp16 tensors, each distinct one once (``aliases``: key -> the key that holds it)."""
    keep, aliases, seen = {}, {}, {}
    for key, value in record["network_weights"].items():
        digest = (tuple(value.shape), str(value.dtype), hashlib.sha1(value.contiguous().numpy().tobytes()).hexdigest())
        if digest in seen:
            aliases[key] = seen[digest]
            continue
        seen[digest] = key
        keep[key] = value.half() if value.is_floating_point() else value
    return dict(record, network_weights=keep, aliases=aliases, order=list(record["network_weights"]))


def _tar(files: dict[str, bytes]) -> bytes:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


def pack(set_dir: Path, out: Path, chunk_mib: float = 16, only: list[str] | None = None) -> dict[str, Any]:
    """Round, shrink and split the parts of ``set_dir`` (``only`` those named) into ``out``; the manifest (also
    ``out/manifest.json``, with the parts packed there earlier)."""
    import torch

    folders = part_folders(set_dir, only)
    if not folders:
        raise SystemExit(f"pack: no Dataset*/*/{CHECKPOINT} under {set_dir}")
    out.mkdir(parents=True, exist_ok=True)
    earlier = out / "manifest.json"
    chunk = int(chunk_mib * 2**20)
    manifest = json.loads(earlier.read_text()) if earlier.is_file() else {"parts": {}}
    for folder in folders:
        weights = io.BytesIO()
        torch.save(_shrunk(round_in_place(folder / CHECKPOINT)), weights)
        files = {n: (folder / n).read_bytes() for n in FOLDER_FILES} | {"weights16.pt": weights.getvalue()}
        data, name = _tar(files), folder.parent.name
        chunks = []
        for i in range(0, len(data), chunk):
            chunks.append(f"{name}.tar.{i // chunk:03d}")
            (out / chunks[-1]).write_bytes(data[i:i + chunk])
        manifest["parts"][name] = {"folder": str(folder.relative_to(set_dir)), "chunks": chunks,
                                   "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        print(f"packed {name}: {len(data) / 2**20:.1f} MiB in {len(chunks)} chunk(s)", flush=True)
    tmp = earlier.with_name("manifest.json.part")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(earlier)  # written last: a manifest names only chunks that are complete
    return manifest


def unpack(packs: Path, set_dir: Path) -> list[Path]:
    """Check every part of ``packs/manifest.json`` and write its results folder under ``set_dir``."""
    import torch

    manifest = json.loads((packs / "manifest.json").read_text())
    missing = [c for p in manifest["parts"].values() for c in p["chunks"] if not (packs / c).is_file()]
    if missing:
        raise SystemExit(f"unpack: missing chunk(s) in {packs}: {', '.join(missing)}")
    archives = {}
    for name, part in manifest["parts"].items():  # every part checked before any is written
        archives[name] = b"".join((packs / c).read_bytes() for c in part["chunks"])
        if hashlib.sha256(archives[name]).hexdigest() != part["sha256"]:
            raise SystemExit(f"unpack: {name}: sha256 differs from the manifest (a chunk is damaged or missing)")
    written = []
    for name, part in manifest["parts"].items():
        with tarfile.open(fileobj=io.BytesIO(archives[name])) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        folder = set_dir / part["folder"]
        (folder / "fold_0").mkdir(parents=True, exist_ok=True)
        for file in FOLDER_FILES:
            (folder / file).write_bytes(files[file])
        record = torch.load(io.BytesIO(files["weights16.pt"]), map_location="cpu", weights_only=True)
        keep, aliases = record.pop("network_weights"), record.pop("aliases")
        record["network_weights"] = {k: (lambda v: v.float() if v.is_floating_point() else v)(keep[aliases.get(k, k)])
                                     for k in record.pop("order")}
        _save_atomic(record, folder / CHECKPOINT)
        written.append(folder)
        print(f"unpacked {name} into {folder}", flush=True)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    packing = sub.add_parser("pack", help="round SET's weights to fp16 in place and split them into OUT")
    packing.add_argument("set", type=Path)
    packing.add_argument("out", type=Path)
    packing.add_argument("--chunk-mib", type=float, default=16)
    packing.add_argument("--only", nargs="+", metavar="PART", help="only these parts (Dataset*_PART)")
    unpacking = sub.add_parser("unpack", help="check PACKS and write the results folders into SET")
    unpacking.add_argument("packs", type=Path)
    unpacking.add_argument("set", type=Path)
    args = p.parse_args(argv)
    if args.command == "pack":
        pack(args.set, args.out, args.chunk_mib, args.only)
    else:
        unpack(args.packs, args.set)
    return 0


if __name__ == "__main__":
    sys.exit(main())
