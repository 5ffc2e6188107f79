"""Experiment: SmoothQuant-style channel equalization (alpha 0.5) of a PlainConvUNet nnU-Net folder, exact in FP32:
each IN->LeakyReLU output channel (and each transposed-conv output channel) is divided by s_c and its consumers'
input-channel weights multiplied by s_c, s_c = sqrt(a_c / w_c) (a_c: the channel's max |activation| on calibration
windows, w_c: the largest |weight| its consumers give it). argv: SRC_SET DST_SET CALIBRATION_CT [ALPHA]"""
import json, shutil, sys
from pathlib import Path
import numpy as np, torch

sys.path.insert(0, "/work/main")
from PTQLogic.io.volumes import read_volume
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.inference.nnunet.predict import runner_for

src, dst, cal = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
alpha = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5
folder = next(src.glob("Dataset291_*/*__3d_fullres"))
model = open_nnunet_model(folder)
net = model.networks[0].eval()
runner = runner_for(model)
data, _ = runner.preprocess(read_volume(cal))
x = torch.from_numpy(data)[None]
patch = model.spec.patch_size
rng = np.random.default_rng(0)
windows = []
for _ in range(4):  # random windows inside the grid
    start = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(x.shape[2:], patch)]
    windows.append(x[(slice(None), slice(None)) + tuple(slice(a, a + p) for a, p in zip(start, patch))].contiguous())

enc, dec = net.encoder, net.decoder
stages = [enc.stages[i][0].convs for i in range(len(enc.stages))]  # list of ConvDropoutNormReLU lists
dstages = [dec.stages[s].convs for s in range(len(dec.stages))]
n = len(stages)
# (producer kind, module, consumers [(weight tensor, in-axis, channel offset)])
groups = []
for i, blocks in enumerate(stages):
    for j, block in enumerate(blocks):
        if j < len(blocks) - 1:
            cons = [(blocks[j + 1].conv.weight, 1, 0)]
        else:
            cons = []
            if i + 1 < n:
                cons.append((stages[i + 1][0].conv.weight, 1, 0))
            if i < n - 1:
                s = n - 2 - i
                cons.append((dstages[s][0].conv.weight, 1, dec.transpconvs[s].weight.shape[1]))
            else:
                cons.append((dec.transpconvs[0].weight, 0, 0))
        groups.append(("in", block, cons))
for s, blocks in enumerate(dstages):
    for j, block in enumerate(blocks):
        if j < len(blocks) - 1:
            cons = [(blocks[j + 1].conv.weight, 1, 0)]
        else:
            cons = [(dec.seg_layers[s].weight, 1, 0)]
            if s + 1 < len(dstages):
                cons.append((dec.transpconvs[s + 1].weight, 0, 0))
        groups.append(("in", block, cons))
for s, t in enumerate(dec.transpconvs):
    groups.append(("tconv", t, [(dstages[s][0].conv.weight, 1, 0)]))

amax = {}
hooks = []
for k, (kind, module, _) in enumerate(groups):
    target = module.nonlin if kind == "in" else module
    def hook(_, __, out, k=k):
        m = out.detach().abs().amax(dim=(0, 2, 3, 4))
        amax[k] = torch.maximum(amax[k], m) if k in amax else m
    hooks.append(target.register_forward_hook(hook))
with torch.no_grad():
    before = [net(w) for w in windows[:1]]
    for w in windows:
        net(w)
for h in hooks:
    h.remove()

stats = []
with torch.no_grad():
    for k, (kind, module, cons) in enumerate(groups):
        a = amax[k].double()
        C = a.numel()
        wmax = torch.zeros(C, dtype=torch.float64)
        for weight, axis, off in cons:
            w = weight.detach().abs().double()
            w = w.transpose(0, axis) if axis else w
            wmax = torch.maximum(wmax, w[off:off + C].reshape(C, -1).amax(1))
        s = (a.clamp_min(1e-6) ** alpha) / (wmax.clamp_min(1e-6) ** (1 - alpha))
        s = torch.where((a < 1e-6) | (wmax < 1e-6), torch.ones_like(s), s).clamp(1e-3, 1e3)
        sf = s.float()
        if kind == "in":
            module.norm.weight.div_(sf); module.norm.bias.div_(sf)
        else:
            shape = [1, C] + [1] * (module.weight.ndim - 2)
            module.weight.div_(sf.view(shape)); module.bias.div_(sf)
        for weight, axis, off in cons:
            shape = [1] * weight.ndim; shape[axis] = C
            idx = [slice(None)] * weight.ndim; idx[axis] = slice(off, off + C)
            weight[tuple(idx)] *= sf.view(shape)
        spread_before = float(a.max() / a.clamp_min(1e-6).median())
        spread_after = float((a / s).max() / (a / s).clamp_min(1e-6).median())
        stats.append({"group": k, "kind": kind, "channels": C, "spread_before": spread_before, "spread_after": spread_after})
    after = [net(w) for w in windows[:1]]
diff = float((after[0] - before[0]).abs().max()); scale = float(before[0].abs().max())
print("FP32 max abs change", diff, "of", scale, "argmax same", float((after[0].argmax(1) == before[0].argmax(1)).float().mean()))

out = next(iter([dst / folder.relative_to(src)]))
shutil.copytree(folder, out, dirs_exist_ok=True)
ck_path = out / "fold_0" / "checkpoint_final.pth"
ck = torch.load(folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
state = net.state_dict()
missing = [k for k in ck["network_weights"] if k not in state]
ck["network_weights"] = {k: (state[k].clone() if k in state else v) for k, v in ck["network_weights"].items()}
torch.save(ck, ck_path)
json.dump({"alpha": alpha, "fp32_change": diff, "logit_scale": scale, "groups": stats, "keys_not_in_state": missing},
          open(dst / "cle.json", "w"), indent=1)
print("wrote", ck_path, "keys not in state:", len(missing))
