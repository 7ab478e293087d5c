"""What one finished training reports, and the study's record of all of them (study.json).

The trainer ends every run by writing ``RUN_DIR/eval/report_summary.json``::

    {"model": "best"|"wa"|"final", "checkpoint": "models/best.pt", "selected_on": "val"|...,
     "select_metric": "mAP", "epoch": 5, "step": 80, "mAP": .., "mAUC": .., "dprime": ..,
     "acc": .., "val": {...} | null}

(the metrics are the eval set's, of the reported model). A run directory from a trainer that
predates that file is read the old way: ``models/best.pt`` and the best of the per-evaluation
summaries ``eval/{epoch,step}-*_summary.json`` (selected on the eval set itself).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

REPORT = Path("eval") / "report_summary.json"
STUDY_RUN = "study_run.json"  # the study's note in each run dir: command, wall time
METRICS = ("mAP", "mAUC", "dprime", "acc")


class ResultError(RuntimeError):
    """A training finished without the results the study needs."""


def is_done(run_dir: Path) -> bool:
    """The training has finished: its report exists (an older trainer: final.pt, written last)."""
    return (run_dir / REPORT).is_file() or (run_dir / "models" / "final.pt").is_file()


def read_report(run_dir: Path) -> dict[str, Any]:
    """The run's report (see the module doc), with ``checkpoint`` made absolute."""
    path = run_dir / REPORT
    if path.is_file():
        report = json.loads(path.read_text())
        missing = [k for k in ("checkpoint", "mAP") if k not in report]
        if missing:
            raise ResultError(f"{path} lacks {missing}")
    else:
        report = _legacy_report(run_dir)
    report["checkpoint"] = str((run_dir / report["checkpoint"]).resolve())
    if not Path(report["checkpoint"]).is_file():
        raise ResultError(f"{path}: the reported model {report['checkpoint']} does not exist")
    return report


def _legacy_report(run_dir: Path) -> dict[str, Any]:
    """A trainer without report_summary.json: models/best.pt and its evaluation."""
    summaries = sorted((run_dir / "eval").glob("*_summary.json"))
    scored = []
    for p in summaries:
        if p.name.startswith(("teacher", "report")):
            continue
        tag = p.name.removesuffix("_summary.json")
        scored.append((tag, json.loads(p.read_text())))
    if not scored:
        raise ResultError(
            f"no evaluation in {run_dir / 'eval'}: the training did not finish (see its log)"
        )
    tag, best = max(scored, key=lambda item: item[1]["mAP"])  # the trainer's best.pt rule
    epoch = int(tag.split("-")[1]) if tag.startswith("epoch-") else None
    step = int(tag.split("-")[1]) if tag.startswith("step-") else None
    return {
        "model": "best",
        "checkpoint": "models/best.pt",
        "selected_on": "eval",
        "select_metric": "mAP",
        "epoch": epoch,
        "step": step,
        **{k: best.get(k) for k in METRICS},
        "val": None,
    }


def entry(training: Any, report: dict[str, Any], *, teacher: str | None, wall_s: float) -> dict:
    """One study.json entry."""
    out = {
        "name": training.name,
        "seed": training.seed,
        "student": training.student,
        "teacher_family": training.teacher,
        "requested": training.requested,
    }
    out.update({k: _num(report.get(k)) for k in METRICS})
    out.update(
        {
            "model": report.get("model"),
            "checkpoint": report["checkpoint"],
            "selected_on": report.get("selected_on"),
            "select_metric": report.get("select_metric"),
            "epoch": report.get("epoch"),
            "step": report.get("step"),
            "val": report.get("val"),
            "run_dir": str(training.run_dir),
            "teacher": teacher,
            "epochs": total_epochs(training.run_dir),
            "wall_s": None if wall_s is None else round(float(wall_s), 1),
        }
    )
    return out


def _num(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def read_note(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STUDY_RUN
    return json.loads(path.read_text()) if path.is_file() else {}


def write_note(run_dir: Path, note: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STUDY_RUN).write_text(json.dumps(note, indent=2) + "\n")


def total_epochs(run_dir: Path) -> int | None:
    """``run.epochs`` of the run (its config.yaml), for the below-baseline diagnosis."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text()) or {}
    return (cfg.get("run") or {}).get("epochs")
