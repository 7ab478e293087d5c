"""The MLflow UI in a real headless Chromium shows a tracked run's loss chart.

Needs Debian's chromium (``apt-get install -y --no-install-recommends chromium``); Python
playwright drives it (no browser download). The screenshot goes to test-artifacts/.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from cmkd_scale.config import load_config
from cmkd_scale.tracking import make_tracker

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = [  # from shared/notes/feasibility.md: quiet, sandbox-free headless Chromium
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.mlflow_server,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} absent (Debian chromium)"),
]


def _metric_page(uri: str, run_id: str, experiment_id: str, metric: str) -> str:
    """The UI's metric page route (MLflow 3: #/metric?runs=[..]&metric=".." ...)."""
    q = lambda obj: urllib.parse.quote(json.dumps(obj))  # noqa: E731
    return (
        f"{uri}/#/metric?runs={q([run_id])}&metric={q(metric)}&experiments={q([experiment_id])}"
        f"&plot_metric_keys={q([metric])}&plot_layout={q({})}&x_axis=step&y_axis_scale=linear"
        "&line_smoothness=1&show_point=false&deselected_curves=[]&last_linear_y_axis_range=[]"
    )


def test_ui_renders_the_loss_chart(mlflow_server, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    cfg = load_config(
        None,
        ["model.arch=ast", f"tracking.uri={mlflow_server.uri}", "tracking.system_metrics=false"],
    )
    tracker = make_tracker(cfg, rank=0, run_dir=tmp_path / "run")
    losses = [2.0 / (1 + 0.25 * step) for step in range(40)]
    with tracker:
        for step, loss in enumerate(losses):
            tracker.log_metrics({"loss": loss}, step)
    url = _metric_page(mlflow_server.uri, tracker.run_id, tracker.remote.experiment_id, "loss")

    SHOTS.mkdir(exist_ok=True)
    shot = SHOTS / "mlflow_loss_chart.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            page.goto(url)
            trace = page.locator(".js-plotly-plot .scatterlayer .trace path.js-line").first
            trace.wait_for(state="visible", timeout=120_000)
            path = trace.get_attribute("d") or ""
            # the metric table under the chart shows the last value the tracker sent
            page.get_by_text(f"{losses[-1]!r}"[:7]).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    # the line has a vertex per plotted step (Plotly may merge a few collinear ones)
    assert path.startswith("M") and path.count("L") >= 20, path[:200]
    assert shot.stat().st_size > 10_000
