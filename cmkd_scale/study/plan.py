"""Which trainings a study runs, in which order, and each one's training-config overrides.

Phase 1 trains the no-KD baselines (every requested baseline row x seed, plus the seed-0
baseline of every family that teaches a KD row, even when that baseline row was not asked
for). Phase 2 trains the KD rows; each loads as its frozen teacher the reported model
(``eval/report_summary.json``) of the seed-0 baseline run of the teacher's family.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmkd_scale.config import Config, ConfigError, DataConfig, load_config
from cmkd_scale.study.config import ROWS, STUDY_KEYS, StudyConfig, cli_value, resolve_path

TEACHER_SEED = 0


@dataclass(frozen=True)
class Training:
    name: str  # the row: cnn, ast, cnn2ast, ast2cnn, cnn2cnn, ast2ast
    seed: int
    student: str  # family of the trained model
    teacher: str | None  # family of the frozen teacher (None: no KD)
    run_dir: Path
    requested: bool = True  # False: a teacher baseline the rows did not ask for

    @property
    def id(self) -> str:
        return f"{self.name}-seed{self.seed}"

    @property
    def phase(self) -> int:
        return 1 if self.teacher is None else 2


def run_dir(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed-{seed}"


def plan(study: StudyConfig, out: Path) -> list[Training]:
    """Every training of the study: baselines (phase 1) first, then the KD rows (phase 2)."""
    trainings: list[Training] = []
    teacher_families = {ROWS[r][1] for r in study.rows if ROWS[r][1] is not None}
    for family in ("cnn", "ast"):
        requested = family in study.rows
        seeds = range(study.seeds) if requested else [TEACHER_SEED]
        if requested or family in teacher_families:
            for seed in seeds:
                trainings.append(
                    Training(
                        family, seed, family, None, run_dir(out, family, seed), requested=requested
                    )
                )
    for row in study.rows:
        student, teacher = ROWS[row]
        if teacher is None:
            continue
        for seed in range(study.seeds):
            trainings.append(Training(row, seed, student, teacher, run_dir(out, row, seed)))
    return trainings


def teacher_run(out: Path, training: Training) -> Path | None:
    """The run directory of ``training``'s teacher (the seed-0 baseline of its family)."""
    if training.teacher is None:
        return None
    return run_dir(out, training.teacher, TEACHER_SEED)


def has_val_split() -> bool:
    """Whether the trainer takes a model-selection set (``data.val``)."""
    return "val" in {f.name for f in dataclasses.fields(DataConfig)}


@dataclass(frozen=True)
class Setting:
    """Where the runs report: the same tracking store and experiment for all of them."""

    uri: str
    experiment: str
    parent_run_id: str = ""


def overrides(
    study: StudyConfig,
    training: Training,
    *,
    setting: Setting,
    teacher_checkpoint: str = "",
    teacher_arch: tuple[str, str] = ("", ""),
    teacher_cache: str = "",
) -> list[str]:
    """The ``key=value`` overrides of the recipe that make this training."""
    values: dict[str, Any] = {}
    values.update(study.train)
    values.update(study.family_overrides(training.student))
    values.update(study.distill)
    if training.teacher is not None:
        values.update(study.teacher)
    for key in STUDY_KEYS:  # the study's own keys win over anything above
        values.pop(key, None)
    if training.teacher is None:
        values = {k: v for k, v in values.items() if not k.startswith("teacher.")}
    items = [f"{k}={cli_value(v)}" for k, v in values.items()]
    items += [
        f"run.dir={training.run_dir}",
        f"run.name={study.name}-{training.id}",
        f"run.seed={training.seed}",
        f"data.train={cli_value(resolve_path(study.data.train))}",
        f"data.eval={cli_value(resolve_path(study.data.eval))}",
    ]
    if study.data.val:
        if not has_val_split():
            raise ConfigError(
                "study key 'data.val': this trainer has no data.val (model selection set); "
                "leave data.val empty"
            )
        items.append(f"data.val={cli_value(resolve_path(study.data.val))}")
    if study.teacher_cache.views:  # every row, baselines too: the same augmentation scheme
        items.append(f"data.views={study.teacher_cache.views}")
    if training.teacher is None:
        items.append("teacher=none")
    else:
        arch, name = teacher_arch
        items += [
            f"teacher.arch={arch}",
            f"teacher.name={cli_value(name)}",
            f"teacher.checkpoint={cli_value(teacher_checkpoint)}",
        ]
        if teacher_cache:
            items.append(f"teacher.cache={cli_value(teacher_cache)}")
    if study.tracking.enabled:  # the study's switch wins over the recipe's
        items += ["tracking.enabled=true", f"tracking.uri={cli_value(setting.uri)}"]
        if setting.experiment:  # "" = the recipe's
            items.append(f"tracking.experiment={cli_value(setting.experiment)}")
        if setting.parent_run_id:
            items.append(f"tracking.parent_run_id={setting.parent_run_id}")
    else:
        items.append("tracking.enabled=false")
    return items


def compose(recipe: Path, items: list[str]) -> Config:
    """The training config exactly as the trainer will build it (errors name the key)."""
    return load_config(recipe, items)


def validate(
    study: StudyConfig, recipe: Path, out: Path, setting: Setting, *, check_files: bool = True
) -> dict[str, Config]:
    """Compose every training's config before anything runs; errors name the training.
    ``check_files``: also look for the data and weight files each training reads."""
    configs: dict[str, Config] = {}
    families: dict[str, Config] = {}
    for training in plan(study, out):
        teacher_arch = ("", "")
        if training.teacher is not None:
            base = families[training.teacher]
            teacher_arch = (base.model.arch, base.model.name)
        items = overrides(
            study,
            training,
            setting=setting,
            teacher_checkpoint=str(run_dir(out, training.teacher or "x", 0) / "models/best.pt"),
            teacher_arch=teacher_arch,
        )
        try:
            cfg = compose(recipe, items)
        except ConfigError as exc:
            raise ConfigError(f"training {training.id} (recipe {recipe}): {exc}") from exc
        configs[training.id] = cfg
        if training.teacher is None:
            families.setdefault(training.student, cfg)
        if check_files:
            _check_inputs(cfg, training)
    return configs


def _check_inputs(cfg: Config, training: Training) -> None:
    """Files the training reads at start (besides its teacher, trained by the study)."""
    for key in ("model.checkpoint", "model.imagenet_weights"):
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and "://" not in value and not Path(value).exists():
            raise ConfigError(
                f"training {training.id}: {key}={value} does not exist (set it in the study's "
                f"'{training.student}:' or 'train:' overrides, or to \"\" to start from scratch)"
            )
    for key in ("train", "eval", "val"):
        value = getattr(cfg.data, key, "")
        if value and "://" not in value and not Path(value).exists():
            raise ConfigError(f"training {training.id}: data.{key}={value} does not exist")
