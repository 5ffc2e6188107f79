"""Several nnU-Net parts with each part's export beside the next part's sliding window (segment.py): the same
labels as one after another, the export really in its own thread, a cancel or a failure in either thread stops
both and leaves nothing, and no overlap where its memory does not fit."""
from __future__ import annotations

import os
import threading
import time

os.environ.setdefault("nnUNet_def_n_proc", "1")

import numpy as np
import pytest

from nnunet_factory import dataset, one_thread, plans, write_folder  # noqa: F401 (autouse fixture)
from test_nnunet_parts_estimate import PARTS, _image_with_zero_border, write_image
from PTQLogic.core.errors import Cancelled, ModelError
from PTQLogic.core.memory import MEMORY_ENV
from PTQLogic.core.progress import Monitor
from PTQLogic.inference.nnunet import segment as segment_module
from PTQLogic.inference.nnunet.memory import export_bytes, overlap_fits, peak_bytes_per_part
from PTQLogic.inference.nnunet.predict import runner_for
from PTQLogic.io.volumes import read_volume
from PTQLogic.models.nnunet.model_dir import open_nnunet_model
from PTQLogic.pipeline import segment


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet_overlap")
    folders = [write_folder(root / name, plan, dataset(labels), seed=3 + i)
               for i, (name, (plan, labels)) in enumerate(PARTS.items())]
    image = write_image(_image_with_zero_border(21, (30, 32, 34), (1.5, 1.5, 1.5)), root / "ct_0000.nii.gz")
    models = [open_nnunet_model(f) for f in folders]
    return models, [runner_for(m) for m in models], read_volume(image), image


def _run(parts, overlap: bool, monitor: Monitor | None = None):
    models, runners, volume, _ = parts
    return segment_module._run_all(models, runners, volume, "torch", "fp32", "cpu", False, monitor or Monitor(),
                                   overlap=overlap)


def test_overlapped_exports_give_the_same_labels_from_their_own_thread(parts):
    threads: dict[str, set[str]] = {}

    def on_progress(stage, done, total):
        threads.setdefault(stage.split(": ")[1], set()).add(threading.current_thread().name)

    one_by_one = _run(parts, overlap=False)
    overlapped = _run(parts, overlap=True, monitor=Monitor(on_progress=on_progress))
    assert len(overlapped.parts) == len(one_by_one.parts) == 3
    for mine, theirs in zip(overlapped.parts, one_by_one.parts):
        assert np.array_equal(mine, theirs) and len(np.unique(theirs)) > 1
    assert threads["sliding window"] == {threading.main_thread().name}
    assert len(threads["export"]) == 1 and threads["export"] != threads["sliding window"]
    assert overlapped.patches == one_by_one.patches and one_by_one.beside_seconds == 0.0


def test_time_hidden_behind_the_next_sliding_window_counts_once(parts, monkeypatch):
    """Exports of 0.3 s beside sliding windows of 0.5 s: the first two are hidden, the last one is waited for."""
    runner_class = type(parts[1][0])
    export, logits = runner_class.export, runner_class.predict_logits

    def slow_logits(*args, **kwargs):
        time.sleep(0.5)
        return logits(*args, **kwargs)

    def slow_export(*args, **kwargs):
        labels, seconds = export(*args, **kwargs)
        time.sleep(0.3)
        return labels, seconds + 0.3

    monkeypatch.setattr(runner_class, "predict_logits", slow_logits)
    monkeypatch.setattr(runner_class, "export", slow_export)
    one_by_one, overlapped = _run(parts, overlap=False), _run(parts, overlap=True)
    assert one_by_one.beside_seconds == 0.0
    assert 0.45 < overlapped.beside_seconds < 0.7  # about 2 x 0.3 s
    assert one_by_one.seconds - overlapped.seconds > 0.45


@pytest.mark.parametrize("where", ["export thread", "main thread"])
def test_a_cancel_in_either_thread_stops_both(parts, where):
    monitor, seen = Monitor(), []

    def on_progress(stage, done, total):
        seen.append(stage)
        if where == "export thread" and stage == "part 1/3 (a): export" and done == 0:
            monitor.cancel()
        if where == "main thread" and stage == "part 2/3 (b): sliding window" and done == 1:
            monitor.cancel()

    monitor.on_progress = on_progress
    with pytest.raises(Cancelled):
        _run(parts, overlap=True, monitor=monitor)
    assert not any(s.startswith("part 3/3") for s in seen)
    assert not [t for t in threading.enumerate() if t.name.startswith("nnunet-export")]


def test_a_failing_sliding_window_stops_the_export_beside_it(parts, monkeypatch):
    models, runners, volume, _ = parts
    export_stopped = threading.Event()

    def slow_export(self, predicted, monitor=None, stage=None):
        try:
            while True:  # until the main thread's failure reaches this thread's monitor
                monitor.check()
                time.sleep(0.01)
        except Cancelled:
            export_stopped.set()
            raise

    def failing(self, *args, **kwargs):
        raise ModelError("the engine failed on a patch")

    monkeypatch.setattr(type(runners[0]), "export", slow_export)
    calls = {"n": 0}
    logits = type(runners[0]).predict_logits

    def second_fails(self, *args, **kwargs):
        calls["n"] += 1
        return logits(self, *args, **kwargs) if calls["n"] == 1 else failing(self)

    monkeypatch.setattr(type(runners[0]), "predict_logits", second_fails)
    user = Monitor()
    with pytest.raises(ModelError, match="failed on a patch"):
        _run(parts, overlap=True, monitor=user)
    assert export_stopped.is_set() and not user.cancel_event.is_set()  # the user's monitor is left as it was


def test_overlap_only_where_two_parts_fit(parts, monkeypatch):
    models, runners, volume, _ = parts
    folds = [len(m.folds) for m in models]
    sizes = peak_bytes_per_part(runners, volume, folds)
    overlapped = max(sizes[i] + export_bytes(runners[i - 1], volume) for i in (1, 2))
    assert overlapped > max(sizes) and overlapped == max(peak_bytes_per_part(runners, volume, folds, overlap=True))
    monkeypatch.setenv(MEMORY_ENV, str(overlapped / 2**30))
    assert overlap_fits(runners, volume, folds)
    monkeypatch.setenv(MEMORY_ENV, str((overlapped - 2**20) / 2**30))
    assert not overlap_fits(runners, volume, folds)
    assert not overlap_fits(runners[:1], volume, folds[:1])  # one part: nothing to overlap


def test_segment_overlaps_parts_and_says_how_long_the_exports_ran_beside(parts, tmp_path, monkeypatch):
    models, _, _, image = parts
    calls = []
    run_all = segment_module._run_all

    def spy(*args, **kwargs):
        calls.append(args[9] if len(args) > 9 else kwargs.get("overlap"))
        return run_all(*args, **kwargs)

    monkeypatch.setattr(segment_module, "_run_all", spy)
    outcome = segment([m.root for m in models], image, tmp_path / "o.nii.gz", runtime="torch", precision="fp32")
    assert calls == [True] and outcome.to_dict()["overlapped_seconds"] == outcome.overlapped_seconds
    runners = parts[1]  # the peak said before the run counts the export beside the next part's sliding window
    assert outcome.estimate["peak_bytes"] == max(peak_bytes_per_part(runners, parts[2], [1, 1, 1], overlap=True))
    monkeypatch.setenv(MEMORY_ENV, str(max(peak_bytes_per_part(
        parts[1], parts[2], [1, 1, 1])) / 2**30))  # enough for one part at a time only
    segment([m.root for m in models], image, tmp_path / "p.nii.gz", runtime="torch", precision="fp32")
    assert calls == [True, False]
    assert np.array_equal(read_volume(tmp_path / "o.nii.gz").array, read_volume(tmp_path / "p.nii.gz").array)


def test_ctrl_c_reaches_the_main_thread_while_it_waits_for_an_export():
    """The CLI delivers Ctrl-C with ``_thread.interrupt_main`` (core/interrupts.py), which a blocking wait would
    hold back until the export ends; the wait is in short steps, so it comes at once."""
    import _thread
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        release = threading.Event()
        exporting = pool.submit(lambda: (release.wait(5), (np.zeros(1), 0.0))[1])
        threading.Timer(0.2, _thread.interrupt_main).start()
        started = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            segment_module._collect(exporting, segment_module._Run())
        assert time.perf_counter() - started < 1.5
        release.set()
