"""Where the INT8 organ part faults memory in: ru_minflt / ru_stime / wall at every progress event (exploration)."""
import json, resource, sys, time, os
os.environ.setdefault("PTQSEG_CACHE_DIR", "/work/wct/models-d1d9a2f1cf/engine-cache")
from PTQLogic.core.progress import Monitor
from PTQLogic.pipeline import segment
spec = json.load(open("/work/wct/models-d1d9a2f1cf/row-spec.json"))
t0 = time.perf_counter(); last = [None]
def usage():
    r = resource.getrusage(resource.RUSAGE_SELF); return r.ru_minflt, r.ru_stime, r.ru_utime
base = usage()
def on(stage, done, total):
    f, s, u = usage()
    key = (stage, done == total)
    if done in (0, total) or done % 9 == 0:
        print(f"{time.perf_counter() - t0:7.1f}s faults {(f - base[0]) / 1e6:6.2f}M sys {s - base[1]:6.1f} user {u - base[2]:6.1f}  {stage} {done}/{total}", flush=True)
out = segment(spec["parts_file"], spec["ct"], "/tmp/faults_out.nii.gz", runtime="openvino", precision="int8",
              step_size=spec["step_size"], mirroring=False, monitor=Monitor(on_progress=on))
on("end", 1, 1)
