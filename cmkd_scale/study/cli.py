"""``python -m cmkd_scale.study``: the CMKD grid on one dataset, N seeds, one table.

    python -m cmkd_scale.study --config configs/study_esc10.yaml [key=value ...]
        [--out OUT] [--seeds N] [--launch local|slurm] [--nproc K]

Trains the no-KD baselines (CNN, AST) first, then the KD rows (cnn2ast: AST student <- CNN
teacher, ast2cnn, and the same-family cnn2cnn, ast2ast), each KD row with the seed-0 baseline
of its teacher's family as the frozen teacher. Writes OUT/study.json (one entry per training),
OUT/study.txt (the table), OUT/study.png, and groups every training's MLflow run under one
parent run. Rerunning the command skips trainings whose report exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cmkd_scale.config import ConfigError
from cmkd_scale.study.config import ROWS, StudyConfig, find_recipe, load_study, resolve_path
from cmkd_scale.study.plan import (
    Setting,
    Training,
    overrides,
    plan,
    teacher_run,
    validate,
)
from cmkd_scale.study.results import entry, is_done, read_note, read_report
from cmkd_scale.study.runner import Job, StudyError, run_local, run_slurm
from cmkd_scale.study.teacher_caches import cache_dir, ensure_cache

log = logging.getLogger(__name__)
Echo = Callable[[str], None]


def _echo(text: str) -> None:
    print(text, flush=True)


def run_study(
    study: StudyConfig,
    *,
    echo: Echo = _echo,
    extra_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or finish) the study; returns the study.json dict (also written to OUT)."""
    started = time.monotonic()
    out = Path(resolve_path(study.out))
    out.mkdir(parents=True, exist_ok=True)
    recipe = find_recipe(study.recipe)
    trainings = plan(study, out)

    # Compose and check every training's config before anything runs.
    from cmkd_scale.study.parent import ParentRun, resolve_study_uri

    uri = resolve_study_uri(study.tracking.uri, out)
    probe = validate(study, recipe, out, Setting(uri, study.tracking.experiment, "probe"))
    experiment = study.tracking.experiment or next(iter(probe.values())).tracking.experiment
    parent = ParentRun(uri, experiment, f"study-{study.name}", out / "study_state.json")
    parent_id = ""
    if study.tracking.enabled:
        parent_id = parent.open({"cmkd.study": study.name, "cmkd.study_out": str(out)})
    setting = Setting(uri, experiment, parent_id)
    status = "FAILED"
    try:
        _train_all(study, recipe, out, trainings, setting, echo, probe)
        result = _assemble(study, recipe, out, trainings, setting, extra_info or {})
        result["wall_s"] = round(time.monotonic() - started, 1)
        _write_outputs(result, out, parent, echo)
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        parent.finish(status)


def _train_all(
    study: StudyConfig,
    recipe: Path,
    out: Path,
    trainings: list[Training],
    setting: Setting,
    echo: Echo,
    configs: dict[str, Any],
) -> None:
    todo = [t for t in trainings if not is_done(t.run_dir)]
    for t in trainings:
        if t not in todo:
            echo(f"{t.id}: finished before (report in {t.run_dir}), skipped")
            changed = _changed_keys(t.run_dir, configs[t.id])
            if changed:
                echo(
                    f"  note: {t.id} was trained with other values of {', '.join(changed[:8])}"
                    f"{' ...' if len(changed) > 8 else ''} than this study config gives; its "
                    f"results are kept (delete {t.run_dir} to train it again)"
                )
    counter = [0, len(todo)]
    for phase in (1, 2):
        jobs = []
        for t in (t for t in todo if t.phase == phase):
            teacher_ckpt, teacher_arch = "", ("", "")
            if t.teacher is not None:
                teacher_ckpt, teacher_arch = _teacher(out, t)
            items = overrides(
                study,
                t,
                setting=setting,
                teacher_checkpoint=teacher_ckpt,
                teacher_arch=teacher_arch,
            )
            if t.teacher is not None and study.teacher_cache.views:
                cache = cache_dir(out, t, configs[t.id])  # its data.*, composed before
                ensure_cache(study, recipe, items, cache, out / "logs" / f"{cache.name}.log", echo)
                items.append(f"teacher.cache={cache}")
            jobs.append(Job(t, items, out / "logs" / f"{t.id}.log"))
        if not jobs:
            continue
        if study.launch.mode == "slurm":
            run_slurm(
                jobs,
                recipe,
                study.launch.sbatch_args,
                study.launch.poll_s,
                echo,
                counter,
                study.name,
            )
        else:
            run_local(jobs, recipe, study.launch.nproc, echo, counter)


def _changed_keys(run_dir: Path, cfg: Any) -> list[str]:
    """Config keys whose value in the finished run differs from what the study would set now
    (tracking and the teacher's checkpoint path left out)."""
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except OSError:
        return []
    now = yaml.safe_load(cfg.to_yaml())
    changed = []
    for section, values in now.items():
        if section == "tracking":
            continue
        for key, value in values.items():
            if f"{section}.{key}" == "teacher.checkpoint":
                continue
            if (saved.get(section) or {}).get(key, value) != value:
                changed.append(f"{section}.{key}")
    return changed


def _teacher(out: Path, t: Training) -> tuple[str, tuple[str, str]]:
    """The KD row's teacher: the reported model of its family's seed-0 baseline."""
    run = teacher_run(out, t)
    assert run is not None
    report = read_report(run)
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return report["checkpoint"], (cfg["model"]["arch"], cfg["model"]["name"])


def _assemble(
    study: StudyConfig,
    recipe: Path,
    out: Path,
    trainings: list[Training],
    setting: Setting,
    extra: dict[str, Any],
) -> dict[str, Any]:
    entries = []
    for t in trainings:
        report = read_report(t.run_dir)
        teacher = None
        if t.teacher is not None:
            run = teacher_run(out, t)
            assert run is not None
            teacher = read_report(run)["checkpoint"]
        note = read_note(t.run_dir)
        entries.append(entry(t, report, teacher=teacher, wall_s=note.get("wall_s")))
    selected = _reported(entries)
    return {
        "name": study.name,
        "metric": study.metric,
        "seeds": study.seeds,
        "rows": study.rows,
        "recipe": str(recipe),
        "data": {
            "train": resolve_path(study.data.train),
            "val": resolve_path(study.data.val),
            "eval": resolve_path(study.data.eval),
            "train_clips": _num_samples(study.data.train),
            "eval_clips": _num_samples(study.data.eval),
        },
        "selected_on": selected,
        "chance": _chance(study.data.eval),
        "mlflow": {
            "uri": setting.uri,
            "experiment": setting.experiment,
            "parent_run_id": setting.parent_run_id or None,
        },
        "study_config": study.to_dict(),
        **extra,
        "entries": entries,
    }


def _reported(entries: list[dict[str, Any]]) -> str:
    """Which models the scores are of, in words: 'best on val by mAP', 'final', ..."""
    kinds = set()
    for e in entries:
        model, on = e.get("model") or "best", e.get("selected_on")
        if model == "best" and on:
            kinds.add(f"best on {on} by {e.get('select_metric') or 'mAP'}")
        elif model == "best":
            kinds.add("best on eval")
        elif model == "wa":
            kinds.add("weight average, no val set")
        else:
            kinds.add(f"{model}, no val set")
    return " / ".join(sorted(kinds)) or "?"


def _manifest(location: str) -> dict[str, Any] | None:
    path = Path(resolve_path(location))
    if "://" in location:
        return None
    path = path if path.name == "manifest.json" else path / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _num_samples(location: str) -> int | None:
    manifest = _manifest(location)
    return int(manifest["num_samples"]) if manifest and "num_samples" in manifest else None


def _chance(location: str) -> dict[str, float] | None:
    """mAP of a random scorer (mean prevalence of the present classes), its mAUC (0.5) and the
    majority-class accuracy, from the eval manifest's class counts."""
    manifest = _manifest(location)
    if not manifest or "class_counts" not in manifest or not manifest.get("num_samples"):
        return None
    n = manifest["num_samples"]
    counts = [c for c in manifest["class_counts"] if c > 0]
    if not counts:
        return None
    return {"mAP": sum(counts) / len(counts) / n, "mAUC": 0.5, "acc": max(counts) / n}


def _write_outputs(result: dict[str, Any], out: Path, parent: Any, echo: Echo) -> None:
    from cmkd_scale.study.plot import plot_study
    from cmkd_scale.study.table import format_table, rows

    table, verdicts = format_table(result)
    result["verdicts"] = [
        {"row": v.row, "gain": v.gain, "se": v.se, "below": v.below, "line": v.line}
        for v in verdicts
    ]
    (out / "study.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "study.txt").write_text(table + "\n")
    png = out / "study.png"
    try:
        plot_study(result, png)
    except Exception as exc:  # a plot is never a reason to lose the table
        log.warning("study.png not written: %s", exc)
    echo("")
    echo(table)
    echo("")
    echo(f"study.json, study.txt, study.png in {out}")
    params = {
        "study.name": result["name"],
        "study.metric": result["metric"],
        "study.seeds": result["seeds"],
        "study.rows": ",".join(result["rows"]),
        "study.recipe": result["recipe"],
        "study.selected_on": result["selected_on"],
        **{f"study.data.{k}": v for k, v in result["data"].items()},
    }
    metrics: dict[str, float] = {}
    for name, st in rows(result).items():
        for metric in ("mAP", "acc", "mAUC"):
            mean, std = st.mean(metric), st.std(metric)
            if mean is not None:
                metrics[f"{name}/{metric}_mean"] = mean
                metrics[f"{name}/{metric}_std"] = std or 0.0
        metrics[f"{name}/n"] = st.n
    for v in verdicts:
        if v.gain is not None:
            metrics[f"{v.row}/gain_{result['metric']}"] = v.gain
            metrics[f"{v.row}/below_baseline"] = float(v.below)
    parent.record(params, metrics, [out / "study.json", png, out / "study.txt"])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cmkd_scale.study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--config", type=Path, required=True, help="study YAML (configs/study_*.yaml)")
    p.add_argument("--out", help="output folder (study key 'out')")
    p.add_argument("--seeds", type=int, help="seeds per row (study key 'seeds')")
    p.add_argument("--launch", choices=("local", "slurm"), help="study key 'launch.mode'")
    p.add_argument("--nproc", type=int, help="ranks per local training (launch.nproc)")
    p.add_argument("--rows", help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("overrides", nargs="*", help="study key=value, e.g. train.run.epochs=2")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from cmkd_scale.logs import setup_logging

    args = _parse(argv)
    setup_logging()
    items = list(args.overrides)
    for key, value in (
        ("out", args.out),
        ("seeds", args.seeds),
        ("launch.mode", args.launch),
        ("launch.nproc", args.nproc),
        ("rows", args.rows),
    ):
        if value is not None:
            items.append(f"{key}={value}")
    try:
        study = load_study(args.config, items)
        run_study(study)
    except ConfigError as exc:
        print(f"study: config error: {exc}", file=sys.stderr)
        return 2
    except StudyError as exc:
        print(f"study: {exc}", file=sys.stderr)
        return 1
    return 0
