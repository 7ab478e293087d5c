"""A finished 2-rank training run as MLflow shows it: a training experiment, its eval summary
and KD setup columns, the shard sets as dataset inputs, and the reported model logged, registered
and loadable with ``mlflow.pyfunc.load_model`` (tagging a file as ``cmkd_scale.infer`` does).

The browser test drives Debian's Chromium (playwright) against the real server; its
screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from cmkd_scale.tracking.mlflow_tracker import VIEW_COLUMNS
from cmkd_scale.tracking.remote import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    VIEW_TAG,
    experiment_url,
)
from tests.fixtures.train import ROOT, torchrun, train_env

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]

EXPERIMENT = "cmkd-training-view"
REGISTERED = "cmkd-test-tagger"
CHROMIUM = Path("/usr/bin/chromium")
SHOTS = ROOT / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def tracked(data: dict[str, Path], mlflow_server, tmp_path_factory) -> dict:
    """2 ranks, random CNN teacher -> tiny AST, chosen on a val split, tracked on the real
    server, its model registered."""
    from mlflow import MlflowClient

    run_dir = tmp_path_factory.mktemp("tracked") / "run"
    torchrun(
        run_dir,
        data,
        "teacher.arch=efficientnet",
        "teacher.name=random:efficientnet_b0",
        "teacher.checkpoint=",
        f"data.val={data['eval']}",  # a validation split: chooses best.pt, a third dataset
        "tracking.enabled=true",
        f"tracking.uri={mlflow_server.uri}",
        f"tracking.experiment={EXPERIMENT}",
        f"tracking.register={REGISTERED}",
        "tracking.system_metrics=false",
        "tracking.log_checkpoint=false",
        "tracking.flush_every_s=1",
    )
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    run_id = (run_dir / "tracker_run_id").read_text().strip()
    run = client.get_run(run_id)
    return {"run_dir": run_dir, "client": client, "run": run, "uri": mlflow_server.uri}


def test_a_training_experiment_with_its_table_view(tracked) -> None:
    client, run = tracked["client"], tracked["run"]
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    view = json.loads(experiment.tags[VIEW_TAG])
    assert view["selectedColumns"] == list(VIEW_COLUMNS)
    # every column of the view has a value on the run
    report = json.loads((tracked["run_dir"] / "eval" / "report_summary.json").read_text())
    assert run.data.metrics["report/mAP"] == pytest.approx(report["mAP"])
    for key in ("report/mAUC", "report/dprime", "report/acc", "report/epoch"):
        assert key in run.data.metrics, key
    for key in ("distill.lambda_", "distill.temperature", "effective.global_batch"):
        assert key in run.data.params, key
    assert run.data.tags["student"].startswith("ast:")
    assert run.data.tags["teacher"] == "efficientnet:random:efficientnet_b0"
    assert run.data.tags["mlflow.source.name"] == "cmkd_scale.train"


def test_shard_sets_are_dataset_inputs(tracked, data) -> None:
    inputs = {i.tags[0].value: i.dataset for i in tracked["run"].inputs.dataset_inputs if i.tags}
    # data.val is data.eval here: one dataset input in both roles
    assert set(inputs) == {"training", "validation, evaluation"}
    for context, split in (("training", "train"), ("validation, evaluation", "eval")):
        dataset = inputs[context]
        manifest = json.loads((data[split] / "manifest.json").read_text())
        from cmkd_scale import sha256_of

        with open(data[split] / "manifest.json", "rb") as fh:
            sha = sha256_of(fh)[0]
        assert dataset.name == split
        assert json.loads(dataset.source) == {"uri": str(data[split].resolve())}
        assert dataset.digest == sha[:16]
        profile = json.loads(dataset.profile)
        assert profile["num_samples"] == manifest["num_samples"]
        assert profile["num_classes"] == manifest["num_classes"]
        assert profile["manifest_sha256"] == sha


def test_registered_model_tags_files_as_infer_does(tracked, tmp_path: Path) -> None:
    import mlflow.pyfunc
    import pandas as pd

    client, run = tracked["client"], tracked["run"]
    outputs = [o.model_id for o in run.outputs.model_outputs]
    # the logged model belongs to the run's experiment (the runs table's Models column)
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert [m.model_id for m in logged] == outputs and logged[0].source_run_id == run.info.run_id
    version = client.search_model_versions(f"name = '{REGISTERED}'")[0]
    assert version.run_id == run.info.run_id
    # a clip of a class the run learned (data's synthetic AudioSet tones) and plain noise
    rng = np.random.default_rng(3)
    clip = tmp_path / "clip.wav"
    sf.write(clip, (rng.standard_normal(16000 * 3) * 0.1).astype(np.float32), 16000)

    mlflow.set_tracking_uri(tracked["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED}/{version.version}")
    got = model.predict(pd.DataFrame({"audio": [str(clip)]}), params={"top_k": 3})

    report = json.loads((tracked["run_dir"] / "eval" / "report_summary.json").read_text())
    checkpoint = tracked["run_dir"] / report["checkpoint"]
    infer = [sys.executable, "-m", "cmkd_scale.infer", "--checkpoint", str(checkpoint)]
    proc = subprocess.run(
        [*infer, str(clip), "--json", "--top-k", "3"],
        cwd=ROOT,
        env=train_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    want = json.loads(proc.stdout)["results"][0]["top"]
    assert list(got.loc[0, "labels"]) == [t["label"] for t in want]
    assert np.allclose(got.loc[0, "probs"], [t["prob"] for t in want], atol=1e-5)
    # a waveform instead of a path: the same answer
    wave = sf.read(clip, dtype="float32")[0]
    again = model.predict(pd.DataFrame({"waveform": [wave]}), params={"top_k": 3})
    assert list(again.loc[0, "labels"]) == list(got.loc[0, "labels"])


def test_upload_again_sends_no_second_model_or_dataset(tracked) -> None:
    """The upload command replays inputs and models from the journal: nothing is doubled."""
    from cmkd_scale.tracking.upload import upload

    report = upload(tracked["run_dir"])
    assert report.models == 0 and report.models_present == 1
    run = tracked["client"].get_run(tracked["run"].info.run_id)
    assert len(run.inputs.dataset_inputs) == len(tracked["run"].inputs.dataset_inputs)
    assert len(run.outputs.model_outputs) == 1


def _close_panels(page) -> None:
    """Close the UI's assistant side panel and any announcement dialog (both "Close")."""
    for _ in range(3):
        buttons = page.get_by_role("button", name="Close", exact=True).all()
        visible = [b for b in buttons if b.is_visible()]
        if not visible:
            return
        visible[-1].click()
        page.wait_for_timeout(500)


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} absent (Debian chromium)")
def test_ui_shows_runs_table_datasets_and_model(tracked) -> None:
    from playwright.sync_api import sync_playwright

    uri, run = tracked["uri"], tracked["run"]
    eid, rid = run.info.experiment_id, run.info.run_id
    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 2400, "height": 1000})
            # the link the tracker prints: the runs table with our columns
            page.goto(experiment_url(uri, eid))
            page.get_by_text("report/mAP").first.wait_for(timeout=120_000)
            page.get_by_text(run.info.run_name).first.wait_for(timeout=60_000)
            assert "/runs" in page.url and "traces" not in page.url
            _close_panels(page)
            # the Models column: the logged model (fetched after the table)
            models_cell = page.get_by_role("link", name="model", exact=True)
            models_cell.or_(page.get_by_text(REGISTERED)).first.wait_for(timeout=60_000)
            page.screenshot(path=str(SHOTS / "mlflow_runs_table.png"))
            # the run page: its datasets
            page.goto(f"{uri}/#/experiments/{eid}/runs/{rid}?workflowType=machine_learning")
            page.get_by_text("Datasets").first.wait_for(timeout=120_000)
            page.get_by_text("train (").first.wait_for(timeout=60_000)
            _close_panels(page)
            page.screenshot(path=str(SHOTS / "mlflow_run_datasets.png"), full_page=True)
            # the model registry
            page.goto(f"{uri}/#/models?workflowType=machine_learning")
            page.get_by_text(REGISTERED).first.wait_for(timeout=120_000)
            _close_panels(page)
            page.screenshot(path=str(SHOTS / "mlflow_registered_model.png"))
        finally:
            browser.close()
