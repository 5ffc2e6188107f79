"""How much of INT8's disagreement with FP32 sits in a few windows: the organ part's sliding window on the test CT's
network grid (nnunetv2's window positions at step 0.8 and Gaussian weights), OpenVINO FP32 and INT8 per window;
then the agreement when the k windows INT8 is least sure of (share of voxels whose top-2 logit margin is small)
are taken from FP32 instead, k = 0..all. Agreement: mean Dice over the classes FP32 or INT8 gives, on the grid."""
import json, sys, time
from pathlib import Path
import numpy as np
sys.path[:0] = ["/work/main/benchmarks/nnunet", "/work/main/benchmarks/training"]
import openvino as ov
from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
import train_totalseg_phantoms as T
import totalseg_shapes as shapes
from PTQLogic.inference.nnunet.predict import NnUNetRunner

q = Path(sys.argv[1])  # the quantized organ part's fold_0 (fp32.onnx, int8.onnx)
out = Path(sys.argv[2])
margin = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
args = T.parse_args(["--out", "/tmp/unused", "--config", "total", "--work", "/work/wct",
                     "--labels", "/work/shared/data/totalsegmentator_total_labels.json"])
cts, models, parts, plans = T.part_setup(args)
part = parts[0]
runner = NnUNetRunner(plans, shapes.part_dataset(part, shapes.label_names(args.labels)), "3d_fullres")
image, _ = T.draw_phantom(0, cts, models.spacing, "ct")
data, _ = runner.preprocess(image)
data = data[None].astype(np.float32)  # (1, 1, K, J, I)
patch = plans["configurations"]["3d_fullres"]["patch_size"]
steps = compute_steps_for_sliding_window(data.shape[2:], patch, 0.8)
slices = [tuple(slice(a, a + p) for a, p in zip((x, y, z), patch)) for x in steps[0] for y in steps[1] for z in steps[2]]
g = compute_gaussian(tuple(patch), sigma_scale=1 / 8, value_scaling_factor=10, device="cpu").numpy()
import torch
from PTQLogic.engines.openvino_engine import OpenVINOEngine

engines = {k: OpenVINOEngine(q / f"{k}.onnx", k) for k in ("fp32", "int8")}  # the product's engines (its rewrites)
nets = {k: (lambda e: lambda feed: [e(torch.from_numpy(feed[0])).numpy()])(e) for k, e in engines.items()}
C = part.classes + 1
acc = {k: np.zeros((C, *data.shape[2:]), np.float32) for k in nets}
norm = np.zeros(data.shape[2:], np.float32)
deltas, unsure, wrong, started = [], [], [], time.time()
for s in slices:
    x = np.ascontiguousarray(data[(0, slice(None)) + s][None])
    logits = {k: n({0: x})[0][0] for k, n in nets.items()}
    for k in nets:
        acc[k][(slice(None),) + s] += logits[k] * g
    norm[s] += g
    top2 = np.sort(logits["int8"], axis=0)[-2:]
    unsure.append(float(((top2[1] - top2[0]) < margin).mean()))
    wrong.append(float((logits["fp32"].argmax(0) != logits["int8"].argmax(0)).mean()))
    deltas.append(((logits["fp32"] - logits["int8"]) * g).astype(np.float16))
    print(f"window {len(deltas)}/{len(slices)} unsure {unsure[-1]:.5f} ({time.time() - started:.0f} s)", flush=True)
ref = acc["fp32"].argmax(0)

from whole_ct_report import agreement as _agreement
big = [c for c in range(1, C) if (ref == c).sum() >= 1000]  # the classes FP32 really gives (the phantom's organs)


def agreement(labels):
    a = _agreement(ref, labels)
    mean_big = float(np.mean([a["per_class"][str(c)]["dice"] for c in big if str(c) in a["per_class"]]))
    return a["dice"], {"voxels": a["voxels"], "dice_big_classes": mean_big, "per_class": a["per_class"]}

def replaced(order):
    rows, current = [], acc["int8"].copy()
    for k in range(len(slices) + 1):
        if k:
            w = order[k - 1]
            current[(slice(None),) + slices[w]] += deltas[w].astype(np.float32)
        d, extra = agreement(current.argmax(0))
        rows.append({"k": k, "window": None if not k else int(order[k - 1]), "agreement": d, **extra})
        print(rows[-1], flush=True)
    return rows

orders = {"int8_unsure": [int(i) for i in np.argsort(unsure)[::-1]], "oracle_disagreement": [int(i) for i in np.argsort(wrong)[::-1]]}
results = {name: replaced(order) for name, order in orders.items()}
out.write_text(json.dumps({"part": part.name, "big_classes": big, "classes": C, "windows": len(slices), "patch": patch, "step": 0.8,
                           "margin": margin, "unsure_share": unsure, "window_disagreement": wrong, "orders": orders,
                           "rows": results, "fp32_onnx": str(q / "fp32.onnx"), "int8_onnx": str(q / "int8.onnx")}, indent=1))
