"""The study config: one dataset, one base training recipe, the CMKD grid's rows and seeds.

A study YAML (``configs/study_*.yaml``) is a small typed tree; ``key.sub=value`` overrides on
the command line change it as they change a training config. Unknown keys and wrong types are
errors naming the key (the training config's own checks, :mod:`cmkd_scale.config`). Every
training the study will launch is composed (recipe + overrides) and validated by the training
config loader before the first one starts, so a typo in ``cnn:`` fails in a second, not after
the baselines have trained for a day.

Layout (every key but ``recipe`` and ``data.train``/``data.eval`` has a default)::

    name: esc10                      # study name: MLflow parent run, plot title
    out: studies/esc10               # OUT: runs/, logs/, study.json, study.png (--out)
    seeds: 3                         # seeds 0..N-1 per row (--seeds)
    rows: [cnn, ast, cnn2ast, ast2cnn, cnn2cnn, ast2ast]
    metric: mAP                      # headline metric of the table and gains: mAP or acc
    recipe: configs/esc50_ast.yaml   # base training recipe (any cmkd_scale.train YAML)
    data: {train: ..., val: ..., eval: ...}
    train: {run.epochs: 25, ...}     # overrides of the recipe for every training
    cnn: {model.arch: efficientnet, model.name: efficientnet_b0, ...}  # CNN student/baseline
    ast: {model.arch: ast, ...}                                         # AST student/baseline
    distill: {lambda_: 0.5, temperature: 1.0, loss: kl}                 # the KD rows' loss
    teacher: {dtype: auto}           # teacher.* for the KD rows (arch/checkpoint set by study)
    teacher_cache: {views: 0, top_k: 0}  # views > 0: one cache pass per teacher, KD rows read it
    launch: {mode: local, nproc: 1, sbatch_args: [...], poll_s: 30}
    tracking: {uri: "", experiment: ""}

Mappings of overrides take dotted keys (``model.name: x``) or nested sections
(``model: {name: x}``); both mean the same.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cmkd_scale.config import (
    ConfigError,
    _coerce,
    _set_dotted,
    parse_overrides,
    read_yaml_mapping,
)

ROOT = Path(__file__).resolve().parents[2]

FAMILIES = ("cnn", "ast")
# row -> (student family, teacher family or None), in training order: baselines first
ROWS: dict[str, tuple[str, str | None]] = {
    "cnn": ("cnn", None),
    "ast": ("ast", None),
    "cnn2ast": ("ast", "cnn"),
    "ast2cnn": ("cnn", "ast"),
    "cnn2cnn": ("cnn", "cnn"),
    "ast2ast": ("ast", "ast"),
}
TITLES = {
    "cnn": "CNN (no KD)",
    "ast": "AST (no KD)",
    "cnn2ast": "AST <- CNN teacher (CMKD)",
    "ast2cnn": "CNN <- AST teacher (CMKD)",
    "cnn2cnn": "CNN <- CNN teacher (same family)",
    "ast2ast": "AST <- AST teacher (same family)",
}
FAMILY_NAMES = {"cnn": "CNN", "ast": "AST"}
# keys the study sets itself for every training (a value given for them is replaced)
STUDY_KEYS = (
    "run.dir",
    "run.name",
    "run.seed",
    "data.train",
    "data.val",
    "data.eval",
    "teacher.arch",
    "teacher.name",
    "teacher.checkpoint",
    "teacher.cache",
    "data.views",
    "tracking.enabled",
    "tracking.uri",
    "tracking.experiment",
    "tracking.parent_run_id",
)


@dataclass(kw_only=True)
class StudyData:
    train: str = ""  # shard dir / manifest / URL
    val: str = ""  # model selection set ("" = the trainer selects on eval, said in the table)
    eval: str = ""  # the set every reported number is measured on

    def __post_init__(self) -> None:
        _need(bool(self.train), "data.train", "the training shards are required")
        _need(bool(self.eval), "data.eval", "the evaluation shards are required")


@dataclass(kw_only=True)
class StudyLaunch:
    mode: Literal["local", "slurm"] = "local"
    nproc: int = 1  # local: ranks per training (>1: torch.distributed.run --nproc_per_node)
    sbatch_args: list[str] = field(default_factory=list)  # slurm: e.g. --nodes=1 --gpus...
    poll_s: float = 30.0  # slurm: seconds between squeue polls

    def __post_init__(self) -> None:
        _need(self.nproc >= 1, "launch.nproc", "must be >= 1")
        _need(self.poll_s > 0, "launch.poll_s", "must be > 0")


@dataclass(kw_only=True)
class StudyTeacherCache:
    """Teacher once, students many: one cache pass per teacher, every KD row reads it."""

    views: int = 0  # 0 = the teachers run online; V > 0: data.views=V for every training
    top_k: int = 0  # 0 = full fp16 logits
    batch_size: int = 32  # the cache pass's teacher batch

    def __post_init__(self) -> None:
        _need(self.views >= 0, "teacher_cache.views", "must be >= 0 (0 = online teachers)")
        _need(self.top_k >= 0, "teacher_cache.top_k", "must be >= 0 (0 = full logits)")
        _need(self.batch_size >= 1, "teacher_cache.batch_size", "must be >= 1")


@dataclass(kw_only=True)
class StudyTracking:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite:///OUT/mlflow.db
    experiment: str = ""  # "" = the recipe's tracking.experiment


@dataclass(kw_only=True)
class StudyConfig:
    name: str = "study"
    out: str = ""  # "" = studies/<name>
    seeds: int = 1
    rows: list[str] = field(default_factory=lambda: list(ROWS))
    metric: Literal["mAP", "acc"] = "mAP"
    recipe: str = ""
    data: StudyData = field(default_factory=StudyData)
    train: dict[str, Any] = field(default_factory=dict)
    cnn: dict[str, Any] = field(default_factory=dict)
    ast: dict[str, Any] = field(default_factory=dict)
    distill: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    launch: StudyLaunch = field(default_factory=StudyLaunch)
    tracking: StudyTracking = field(default_factory=StudyTracking)
    teacher_cache: StudyTeacherCache = field(default_factory=StudyTeacherCache)

    def __post_init__(self) -> None:
        _need(bool(self.recipe), "recipe", "name the base training recipe (configs/*.yaml)")
        _need(self.seeds >= 1, "seeds", "must be >= 1")
        _need(bool(self.rows), "rows", f"name at least one of {list(ROWS)}")
        for row in self.rows:
            _need(row in ROWS, "rows", f"unknown row {row!r}; rows are {list(ROWS)}")
        _need(len(set(self.rows)) == len(self.rows), "rows", "a row is named twice")
        self.rows = [r for r in ROWS if r in self.rows]  # training order: baselines first
        self.train = _flat(self.train, "train")
        self.cnn = _flat(self.cnn, "cnn")
        self.ast = _flat(self.ast, "ast")
        self.distill = {f"distill.{k}": v for k, v in _flat(self.distill, "distill").items()}
        self.teacher = {f"teacher.{k}": v for k, v in _flat(self.teacher, "teacher").items()}
        if not self.out:
            self.out = f"studies/{self.name}"

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def family_overrides(self, family: str) -> dict[str, Any]:
        return self.cnn if family == "cnn" else self.ast


def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"study key '{key}': {msg}")


def _flat(tree: Any, prefix: str) -> dict[str, Any]:
    """``{model: {name: x}}`` and ``{model.name: x}`` both become ``{"model.name": x}``."""
    if not isinstance(tree, dict):
        raise ConfigError(f"study key '{prefix}': expected a mapping of overrides, got {tree!r}")
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"study key '{prefix}': bad key {key!r}")
        if isinstance(value, dict):
            for sub, v in _flat(value, f"{prefix}.{key}").items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A dataclass from a mapping: unknown keys refused, scalars checked by config._coerce."""
    if not isinstance(data, dict):
        raise ConfigError(f"study key '{prefix or '(top)'}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown study key '{dotted}' (known here: {', '.join(names)})")
        hint = hints[key]
        origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted)
        elif origin is list:
            if isinstance(value, str):  # rows=cnn,ast on the command line
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list):
                raise ConfigError(f"study key '{dotted}': expected a list, got {value!r}")
            kwargs[key] = [_coerce(v, str, f"{dotted}[{i}]") for i, v in enumerate(value)]
        elif origin is dict:
            kwargs[key] = {} if value is None else value
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML and apply ``key.sub=value`` overrides (``cnn.model.name=x`` too)."""
    path = Path(path)
    tree = read_yaml_mapping(path, "study config")
    for key, value in parse_overrides(overrides or []):
        section = key.split(".", 1)[0]
        if section in ("train", "cnn", "ast", "distill", "teacher") and "." in key:
            # the rest of the key is a training-config key: keep it dotted, whole
            tree.setdefault(section, {})
            if not isinstance(tree[section], dict):
                raise ConfigError(f"study key '{section}': expected a mapping")
            tree[section][key.split(".", 1)[1]] = value
        else:
            _set_dotted(tree, key, value)
    return _build(StudyConfig, tree, "")


def cli_value(value: Any) -> str:
    """A value as a ``key=value`` override reads it back (YAML scalars; JSON for the rest)."""
    if isinstance(value, str):
        try:
            same = yaml.safe_load(value) == value
        except yaml.YAMLError:
            same = False
        return value if same and value.strip() == value else json.dumps(value)
    return json.dumps(value)


def resolve_path(value: str, *, base: Path | None = None) -> str:
    """A local path made absolute (from ``base``, else the working directory); URLs as they
    are."""
    if not value or "://" in value:
        return value
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = (base or Path.cwd()) / p
    return str(p.resolve())


def find_recipe(recipe: str) -> Path:
    """The recipe from the working directory, else from the repository root."""
    for candidate in (Path(recipe), ROOT / recipe):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"study key 'recipe': {recipe} not found (from {Path.cwd()} or {ROOT})")
