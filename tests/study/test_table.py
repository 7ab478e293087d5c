"""The study table from fabricated study.json numbers: means, gains, and the below-baseline
lines with reasons computed from those numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cmkd_scale.study.config import ROOT, ConfigError, load_study
from cmkd_scale.study.table import format_table, rows, verdict


def _entry(name: str, seed: int, m: float, acc: float, **extra) -> dict:
    from cmkd_scale.study.config import ROWS

    student, teacher = ROWS[name]
    return {
        "name": name,
        "seed": seed,
        "student": student,
        "teacher_family": teacher,
        "requested": True,
        "mAP": m,
        "mAUC": 0.8,
        "dprime": 1.0,
        "acc": acc,
        "model": "best",
        "checkpoint": f"/runs/{name}/seed-{seed}/models/best.pt",
        "epoch": extra.pop("epoch", 3),
        "epochs": extra.pop("epochs", 5),
        "step": 30,
        "run_dir": f"/runs/{name}/seed-{seed}",
        "teacher": None if teacher is None else f"/runs/{teacher}/seed-0/models/best.pt",
        "wall_s": 10.0,
        **extra,
    }


def _study(values: dict[str, list[float]], **extra) -> dict:
    entries = [
        _entry(name, seed, m, 0.5 + m / 2)
        for name, seeds in values.items()
        for seed, m in enumerate(seeds)
    ]
    return {
        "name": "fab",
        "metric": "mAP",
        "seeds": max(len(v) for v in values.values()),
        "rows": list(values),
        "data": {"train_clips": 256},
        "chance": {"mAP": 0.2, "mAUC": 0.5, "acc": 0.3},
        "entries": entries,
        **extra,
    }


def test_means_stds_and_gains_per_row():
    study = _study(
        {
            "cnn": [0.60, 0.62, 0.64],
            "ast": [0.50, 0.52, 0.54],
            "cnn2ast": [0.60, 0.61, 0.62],  # +0.09 over ast, well beyond noise
            "ast2cnn": [0.63, 0.62, 0.61],  # +0.00: not below
        }
    )
    stats = rows(study)
    assert stats["cnn"].mean("mAP") == pytest.approx(0.62)
    assert stats["cnn"].std("mAP") == pytest.approx(0.02)
    v = verdict(study, stats, "cnn2ast", "mAP")
    assert v is not None and not v.below
    assert v.gain == pytest.approx(0.09)
    assert v.se == pytest.approx((0.01**2 / 3 + 0.02**2 / 3) ** 0.5)
    assert "beats its CNN teacher (0.600)" in v.line  # the seed-0 cnn run taught it
    table, verdicts = format_table(study)
    assert [x.row for x in verdicts] == ["cnn2ast", "ast2cnn"]
    assert "0.620 ± 0.020" in table  # cnn mean ± std
    assert "+0.090 ± 0.013 vs ast" in table
    assert "BELOW" not in table
    assert "CNN: mAP 0.600" in table  # the teacher's own score
    assert "chance" in table


def test_below_baseline_with_a_weaker_teacher_says_so_with_its_numbers():
    study = _study({"cnn": [0.45], "ast": [0.50], "cnn2ast": [0.46]})
    table, verdicts = format_table(study)
    (v,) = verdicts
    assert v.below and v.gain == pytest.approx(-0.04)
    assert v.reasons[0].startswith("the CNN teacher (0.450 mAP) is weaker than the AST baseline")
    assert "(0.500)" in v.reasons[0]
    # one seed: the line says the noise is unknown
    assert any("one seed" in r for r in v.reasons)
    line = next(x for x in table.splitlines() if "BELOW" in x)
    assert line.lstrip().startswith("! AST <- CNN teacher (CMKD) [cnn2ast] is 0.040 mAP BELOW")
    assert "1 seed" in line and "256 training clips" in line and "5 epochs" in line
    assert "-0.040 vs ast (below)" in table


def test_below_baseline_within_seed_noise_is_called_noise_first():
    study = _study(
        {
            "cnn": [0.70, 0.72, 0.74],
            "ast": [0.50, 0.58, 0.54],
            "cnn2ast": [0.53, 0.49, 0.57],  # -0.01, sd 0.04 on both sides
        }
    )
    _, verdicts = format_table(study)
    (v,) = verdicts
    assert v.below
    assert v.reasons[0].startswith("the gap is within seed noise")
    assert f"{v.se:.3f}" in v.reasons[0]


def test_below_baseline_teacher_near_chance_and_still_improving():
    study = _study({"ast": [0.40], "ast2cnn": [0.30], "cnn": [0.35]})
    for e in study["entries"]:
        if e["name"] == "ast2cnn":
            e["epoch"], e["epochs"] = 5, 5
    _, verdicts = format_table(study)
    (v,) = verdicts
    assert v.below and v.gain == pytest.approx(-0.05)
    text = " ".join(v.reasons)
    # teacher 0.40 > CNN baseline 0.35, but only 0.20 above chance 0.20 (25% of the way)
    assert "weaker" not in v.reasons[0]
    assert "only 0.200 above chance (0.200), 25% of the way" in text
    assert "last epoch in 1 of 1 run(s)" in text
    assert "its baseline had peaked earlier" in text  # the cnn baseline's best was epoch 3


def test_kd_row_without_its_baseline_row():
    study = _study({"cnn": [0.6], "cnn2ast": [0.5]})
    study["rows"] = ["cnn", "cnn2ast"]
    _, verdicts = format_table(study)
    assert "gain unknown" in verdicts[0].line and not verdicts[0].below


def test_study_config_refuses_unknown_keys_naming_them(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text(
        json.dumps({"recipe": "configs/demo.yaml", "data": {"train": "a", "eval": "b"}})
    )
    study = load_study(path, ["seeds=2", "rows=cnn,cnn2ast", "cnn.model.name=x"])
    assert study.seeds == 2 and study.rows == ["cnn", "cnn2ast"]
    assert study.cnn == {"model.name": "x"}
    with pytest.raises(ConfigError, match="unknown study key 'sedes'"):
        load_study(path, ["sedes=2"])
    with pytest.raises(ConfigError, match=r"unknown study key 'launch\.mod'"):
        load_study(path, ["launch.mod=slurm"])
    with pytest.raises(ConfigError, match="unknown row 'cnn3ast'"):
        load_study(path, ["rows=cnn,cnn3ast"])
    with pytest.raises(ConfigError, match=r"'launch\.mode'"):
        load_study(path, ["launch.mode=cloud"])


def test_a_final_model_is_not_called_still_improving():
    study = _study({"ast": [0.40], "ast2cnn": [0.30], "cnn": [0.35]})
    for e in study["entries"]:
        e["model"], e["epoch"], e["epochs"] = "final", 5, 5  # no val set: the last epoch's model
    _, verdicts = format_table(study)
    assert not any("last epoch" in r for r in verdicts[0].reasons)


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs").glob("study_*.yaml")), ids=lambda p: p.name
)
def test_every_training_of_every_study_config_composes(path: Path, tmp_path: Path):
    """The trainer's own loader accepts every training the study configs would launch."""
    from cmkd_scale.study.config import find_recipe
    from cmkd_scale.study.plan import Setting, plan, validate

    study = load_study(path)
    configs = validate(
        study, find_recipe(study.recipe), tmp_path, Setting("sqlite:///x.db", "", "p"),
        check_files=False,
    )  # fmt: skip
    assert len(configs) == len(plan(study, tmp_path))
    kd = [c for c in configs.values() if c.teacher.arch != "none"]
    assert all(c.tracking.parent_run_id == "p" for c in configs.values())
    assert {c.model.arch for c in kd} <= {"ast", "efficientnet", "timm"} and kd
