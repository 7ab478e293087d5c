"""Tracker without a server: the embedded SQLite store, run states, resume, no-op ranks, journal."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from cmkd_scale.config import load_config
from cmkd_scale.tracking import Tracker, make_tracker, plots, sysinfo
from cmkd_scale.tracking.__main__ import main as tracking_main
from cmkd_scale.tracking.journal import JournalError, read_journal
from cmkd_scale.tracking.mlflow_tracker import MlflowTracker
from cmkd_scale.tracking.upload import UploadError, upload
from tests.fixtures.mlflow_server import free_port

CLASSES = [f"class {i}" for i in range(8)]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _cfg(*overrides: str):
    return load_config(
        None,
        [
            "model.arch=ast",
            "tracking.flush_every_s=0.2",
            "tracking.system_metrics_interval_s=0.2",
            *overrides,
        ],
    )


def _stats(seed: int, mean: float) -> dict:
    rng = np.random.default_rng(seed)
    ap = np.clip(rng.normal(mean, 0.2, len(CLASSES)), 0, 1)
    ap[3] = np.nan  # a class without positives in the eval set
    return {"mAP": mean, "mAUC": 0.9, "dprime": 1.8, "AP": ap, "AUC": np.full(len(CLASSES), 0.9)}


def _only_run(uri: str, run_dir: Path):
    """The one run this run directory made (the store may hold other tests' runs)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmkd_scale")
    runs = client.search_runs([exp.experiment_id], f"tags.`cmkd.run_dir` = '{run_dir.resolve()}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return client, runs[0]


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the small tests (creating one costs 5-20 s of migrations)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()
    return uri


def test_embedded_sqlite_run_has_params_metrics_tags_artifacts(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = _cfg("optim.lr=0.00025", "teacher.arch=efficientnet", "teacher.checkpoint=t.pt")
    tracker = make_tracker(cfg, rank=0, run_dir=run_dir)
    assert isinstance(tracker, MlflowTracker)
    calls: list[int] = []
    real_send = tracker.remote.send_metrics
    tracker.remote.send_metrics = lambda pts: (calls.append(len(pts)), real_send(pts))[1]
    with tracker:
        tracker.log_params(cfg.flat())
        for step in range(1, 201):
            tracker.log_metrics({"loss": 1 / step, "kd_loss": 0.5 / step, "lr": 1e-3}, step)
        tracker.log_eval(_stats(0, 0.30), 100, 1, CLASSES)
        tracker.log_eval(_stats(1, 0.45), 200, 2, CLASSES)
        tracker.log_eval(_stats(2, 0.60), 200, 2, CLASSES, prefix="teacher")
        tracker.log_dict({"zero_optimization": {"stage": 2}}, "deepspeed.json")
        ckpt = run_dir / "models" / "final.pt"
        ckpt.parent.mkdir(parents=True)
        ckpt.write_bytes(b"weights")
        tracker.log_checkpoint(ckpt)
        time.sleep(0.6)  # a few system-metric samples
    client, run = _only_run(f"sqlite:///{run_dir.resolve() / 'mlflow.db'}", run_dir)
    assert run.info.status == "FINISHED"
    assert run.info.run_id == tracker.run_id
    assert run.data.params["optim.lr"] == "0.00025"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    loss = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 201))
    # batched: 600 step points arrive in a handful of log_batch calls, not 600 HTTP calls
    assert sum(calls) >= 600 and len(calls) < 40, calls
    assert [m.value for m in client.get_metric_history(run.info.run_id, "eval/best_mAP")] == [
        0.30,
        0.45,
    ]
    assert run.data.metrics["teacher/mAP"] == 0.60
    assert run.data.metrics["system/cpu_utilization_percentage"] >= 0
    tags = run.data.tags
    assert tags["student"] == "ast:deit_base_distilled_patch16_384"
    assert tags["teacher"] == "efficientnet:efficientnet_b2"
    assert len(tags["git_commit"].split("-")[0]) == 40
    assert "pytest" in tags["command"] or "py" in tags["command"]
    assert tags["checkpoint_path"] == str(ckpt.resolve())
    # artifacts land under RUN_DIR/mlartifacts
    art = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "dl")))
    assert str(run_dir.resolve() / "mlartifacts") in run.info.artifact_uri
    assert "optim:" in (art / "config.yaml").read_text()
    assert json.loads((art / "deepspeed.json").read_text())["zero_optimization"]["stage"] == 2
    assert (art / "checkpoint" / "final.pt").read_bytes() == b"weights"
    with (art / "eval" / "eval_class_ap_epoch002_step200.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(CLASSES) and rows[0]["rank"] == "1"
    assert {r["display_name"] for r in rows} == set(CLASSES)
    assert rows[-1]["display_name"] == "class 3" and rows[-1]["AP"] == "nan"
    for png in ("training_curves", "map_per_epoch", "eval_class_ap_epoch002"):
        assert (art / "plots" / f"{png}.png").read_bytes()[:8] == PNG_MAGIC


def test_exception_marks_the_run_failed(tmp_path: Path, store: str) -> None:
    cfg = _cfg("tracking.system_metrics=false", f"tracking.uri={store}")
    tracker = make_tracker(cfg, rank=0, run_dir=tmp_path)
    with pytest.raises(RuntimeError, match="loss is NaN"), tracker:
        tracker.log_metrics({"loss": 1.0}, 1)
        raise RuntimeError("loss is NaN at step 2")
    _, run = _only_run(store, tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "RuntimeError: loss is NaN at step 2"


def test_killed_run_is_continued_by_resume(tmp_path: Path, store: str) -> None:
    cfg = _cfg("tracking.system_metrics=false", f"tracking.uri={store}")
    first = make_tracker(cfg, rank=0, run_dir=tmp_path)
    first.log_params(cfg.flat())
    for step in (1, 2, 3):
        first.log_metrics({"loss": 1.0 / step}, step)
    first.finish("KILLED", note="resume from checkpoints/step-3 at step 3")
    client, run = _only_run(store, tmp_path)
    assert run.info.status == "KILLED"
    assert run.data.tags["resume_point"] == "resume from checkpoints/step-3 at step 3"

    second = make_tracker(cfg, rank=0, run_dir=tmp_path, resume_run_id=first.run_id)
    assert second.run_id == first.run_id
    assert client.get_run(first.run_id).info.status == "RUNNING"
    for step in (4, 5):
        second.log_metrics({"loss": 1.0 / step}, step)
    second.finish()
    client, run = _only_run(store, tmp_path)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    journal = list(read_journal(tmp_path / "tracking" / "journal.jsonl"))
    assert [r["t"] for r in journal].count("start") == 2


def test_fresh_run_in_a_used_directory_is_a_new_run(tmp_path: Path, store: str) -> None:
    cfg = _cfg("tracking.system_metrics=false", f"tracking.uri={store}")
    first = make_tracker(cfg, rank=0, run_dir=tmp_path)
    first.finish()
    second = make_tracker(cfg, rank=0, run_dir=tmp_path)  # no resume id: a new run
    second.finish()
    assert first.run_id != second.run_id
    assert len(list((tmp_path / "tracking").glob("journal-*.jsonl"))) == 1


def test_other_ranks_and_disabled_tracking_hold_a_noop(tmp_path: Path) -> None:
    for rank, overrides in ((1, []), (0, ["tracking.enabled=false"])):
        tracker = make_tracker(_cfg(*overrides), rank=rank, run_dir=tmp_path / str(rank))
        assert type(tracker) is Tracker and tracker.run_id is None
        with tracker:
            tracker.log_params({"a": 1})
            tracker.log_metrics({"loss": 1.0}, 1)
            tracker.log_eval(_stats(0, 0.3), 1, 1, CLASSES)
            tracker.log_text("x", "x.txt")
        assert not (tmp_path / str(rank)).exists()


def test_bad_calls_raise_errors_that_say_what_to_fix(tmp_path: Path, store: str) -> None:
    cfg = _cfg("tracking.system_metrics=false", f"tracking.uri={store}")
    tracker = make_tracker(cfg, rank=0, run_dir=tmp_path)
    with pytest.raises(ValueError, match="8 per-class APs but 3 class names"):
        tracker.log_eval(_stats(0, 0.3), 1, 1, CLASSES[:3])
    with pytest.raises(ValueError, match="lack 'mAP'"):
        tracker.log_eval({"mAUC": 0.5}, 1, 1, CLASSES)
    with pytest.raises(ValueError, match="use one of"):
        tracker.finish("DONE")
    tracker.finish()


def test_journal_skips_a_torn_last_line_and_names_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.jsonl"
    good = json.dumps({"t": "metrics", "ts": 1, "step": 1, "values": {"loss": 1.0}})
    path.write_text(f'{good}\n{good}\n{{"t": "metr')
    with caplog.at_level(logging.WARNING):
        assert len(list(read_journal(path))) == 2
    assert "torn last record" in caplog.text
    path.write_text(f"{good}\nnot json\n{good}\n")
    with pytest.raises(JournalError, match=r"journal.jsonl:2: not a JSON record"):
        list(read_journal(path))


def test_plots_refuse_mismatched_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3 APs but 2 class names"):
        plots.class_ap_extremes([0.1, 0.2, 0.3], ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match="no metric"):
        plots.training_curves({"loss": []}, tmp_path / "y.png")
    out = plots.class_ap_extremes([np.nan, 0.2, 0.9], ["a", "b", "c"], tmp_path / "z.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_offline_run_uploads_into_a_local_store_by_the_cli(
    tmp_path: Path, store: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()  # nothing listens: the run is tracked offline
    cfg = _cfg("tracking.system_metrics=false", f"tracking.uri=http://127.0.0.1:{port}")
    tracker = make_tracker(cfg, rank=0, run_dir=tmp_path / "run")
    with tracker:
        tracker.log_params(cfg.flat())
        for step in range(1, 11):
            tracker.log_metrics({"loss": 1 / step, "top[1] acc": 0.1 * step}, step)
    assert "logged as 'top_1_ acc'" in caplog.text  # a name MLflow refuses is renamed once
    cmd = [
        sys.executable,
        "-m",
        "cmkd_scale.tracking",
        "upload",
        "--run-dir",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run([*cmd, "--uri", store], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'metric_points': 20" in proc.stderr
    client, run = _only_run(store, tmp_path / "run")
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "top_1_ acc")] == list(
        range(1, 11)
    )
    again = upload(tmp_path / "run", store)  # idempotent: nothing new to send
    assert (again.metric_points, again.metric_points_present, again.params) == (0, 20, 0)


def test_upload_of_a_directory_without_a_journal_says_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(UploadError, match=r"has no tracking journal .* pass the run directory"):
        upload(tmp_path)
    assert tracking_main(["upload", "--run-dir", str(tmp_path)]) == 2
    assert tracking_main(["download"]) == 2


def test_exit_without_finish_marks_the_run_failed(tmp_path: Path, store: str) -> None:
    script = (
        "from pathlib import Path\n"
        "from cmkd_scale.config import load_config\n"
        "from cmkd_scale.tracking import make_tracker\n"
        f"cfg = load_config(None, ['model.arch=ast', 'tracking.uri={store}'])\n"
        f"tracker = make_tracker(cfg, rank=0, run_dir=Path({str(tmp_path)!r}))\n"
        "tracker.log_metrics({'loss': 0.5}, 1)\n"  # then exit: no finish(), no with-block
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr
    _, run = _only_run(store, tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["failure"] == "process exited without calling Tracker.finish()"
    assert run.data.metrics["loss"] == 0.5


@pytest.mark.gpu
def test_gpu_type_tag_and_gpu_system_metrics() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    assert torch.cuda.get_device_name(0) in sysinfo.gpu_name()
    sampler = sysinfo.SystemSampler()
    try:
        sample = sampler.sample()
    finally:
        sampler.close()
    assert 0 <= sample["system/gpu_0_utilization_percentage"] <= 100
    assert sample["system/gpu_0_memory_usage_megabytes"] > 0
