"""Every configs/*.yaml loads; the paper recipes are complete, sourced and chain together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cmkd_scale.config import load_config
from cmkd_scale.train.report import reported_checkpoint, reported_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STUDIES = sorted(CONFIGS.glob("study_*.yaml"))  # study configs (cmkd_scale.study), not recipes
ALL = sorted(set(CONFIGS.glob("*.yaml")) - set(STUDIES))
ARCH = {"cnn": "efficientnet", "ast": "ast"}
RECIPE = re.compile(r"(audioset_(?:full|balanced)|fsd50k|esc50)_(?:(cnn|ast)2)?(cnn|ast)")
PAPER = sorted(p for p in ALL if RECIPE.fullmatch(p.stem))
# keys whose value needs no source
UNSOURCED = {"name", "seed", "grad_accum", "wa_end_epoch"}


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_every_config_loads(path):
    load_config(path)


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_every_study_config_loads_with_its_recipe(path):
    from cmkd_scale.study.config import load_study

    study = load_study(path)
    load_config(CONFIGS.parent / study.recipe)


def test_the_issue_s_recipes_exist():
    names = {p.stem for p in PAPER}
    for subset in ("full", "balanced"):
        for pair in ("cnn2ast", "ast2cnn", "cnn2cnn", "ast2ast", "cnn", "ast"):
            assert f"audioset_{subset}_{pair}" in names
    for dataset in ("fsd50k", "esc50"):
        for pair in ("cnn2ast", "ast2cnn", "cnn", "ast"):
            assert f"{dataset}_{pair}" in names


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_recipe_matches_its_name_and_its_teacher_recipe(path):
    prefix, teacher, student = RECIPE.fullmatch(path.stem).groups()
    cfg = load_config(path)
    assert cfg.model.arch == ARCH[student]
    assert cfg.distill.loss == ("kl" if prefix == "esc50" else "bce")
    assert cfg.distill.lambda_ == 0.5
    if teacher is None:
        assert cfg.teacher.arch == "none"
        return
    assert cfg.teacher.arch == ARCH[teacher]
    # the teacher checkpoint is the model the teacher-training recipe reports
    teacher_recipe = load_config(CONFIGS / f"{prefix}_{teacher}.yaml")
    reported = reported_checkpoint(teacher_recipe)  # models/best.pt, wa.pt or final.pt
    assert cfg.teacher.checkpoint == f"{teacher_recipe.run.dir}/{reported}"
    # consistent teaching: the teacher was trained on the features the student sees
    for key in ("target_length", "num_mel_bins", "norm_mean", "norm_std"):
        assert getattr(cfg.data, key) == getattr(teacher_recipe.data, key), key
    teacher_model = teacher_recipe.model
    for key in ("name", "pooling", "cla_activation", "fstride", "tstride"):
        assert getattr(cfg.teacher, key) == getattr(teacher_model, key), key


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_every_value_names_its_source(path):
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = re.match(r"  (\w+): (.*)$", line)
        if not match or match.group(1) in UNSOURCED:
            continue
        assert "  # " in match.group(2), f"{path.name}:{number}: {line.strip()} has no source"


def test_esc50_fold_placeholder_is_documented():
    for path in CONFIGS.glob("esc50_*.yaml"):
        text = path.read_text()
        cfg = load_config(path)
        assert "{fold}" in cfg.data.train and "{fold}" in cfg.data.eval
        assert "for f in 1 2 3 4 5" in text
        fold = load_config(path, ["data.train=data/esc50/shards/fold-3/train"])
        assert fold.data.train.endswith("fold-3/train")


# what each dataset's recipes report: best.pt chosen on FSD50K's val split (PSLA), AudioSet's
# weight average (AST: no val split), ESC-50's final model per fold (one epoch for all folds
# is chosen afterwards by `python -m cmkd_scale.evaluate folds`)
REPORTS = {"audioset": "wa", "fsd50k": "best", "esc50": "final"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.name)
def test_recipe_reports_its_dataset_s_model_chosen_on_val_only(path):
    prefix = RECIPE.fullmatch(path.stem).group(1)
    cfg = load_config(path)
    dataset = prefix.split("_")[0]
    assert reported_model(cfg) == REPORTS[dataset]
    assert bool(cfg.data.val) == (dataset == "fsd50k")
    if cfg.data.val:
        assert cfg.data.val != cfg.data.eval
    assert cfg.eval.select_metric == ("acc" if dataset == "esc50" else "mAP")
    if dataset == "audioset":
        assert 1 <= cfg.eval.wa_start_epoch <= cfg.eval.wa_end_epoch <= cfg.run.epochs
    # a fine-tuning start (ESC-50 from AudioSet) is the model that AudioSet recipe reports
    if cfg.model.checkpoint.startswith("runs/"):
        source = cfg.model.checkpoint.split("/")[1]
        source_recipe = load_config(CONFIGS / f"{source}.yaml")
        assert source_recipe.run.dir == f"runs/{source}"
        assert cfg.model.checkpoint == f"runs/{source}/{reported_checkpoint(source_recipe)}"
