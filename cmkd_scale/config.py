"""One typed config tree for training: YAML presets + ``key.sub=value`` overrides.

Every section is a ``@dataclass(kw_only=True)``; ``load_config`` merges a YAML preset with
command-line overrides, refuses unknown keys and wrong types with the key's dotted name, and
validates each section in ``__post_init__``.  The resolved tree is saved with every run
(run dir, checkpoints, MLflow) through ``to_dict`` / ``to_yaml``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or holds an invalid value."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': {msg}")


@dataclass(kw_only=True)
class RunConfig:
    dir: str = "runs/default"
    name: str = ""  # run name shown in MLflow; defaults to the run dir's basename
    seed: int = 0
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = run all epochs
    log_every_steps: int = 10
    eval_every_steps: int = 0  # 0 = evaluate at the end of every epoch only
    checkpoint_every_steps: int = 0  # 0 = checkpoint at epoch ends only
    keep_checkpoints: int = 2  # step checkpoints kept besides epoch-end and best ones
    # epoch-end training states kept (the newest N; 0 = every one). The epoch exports in
    # models/ (weight averaging) are kept regardless.
    keep_epoch_checkpoints: int = 2
    # a rank that dies or hangs ends the job; it restarts from the newest intact checkpoint
    # this many times (torchrun --max-restarts via cmkd_scale.train.launch; SLURM requeues in
    # launch/train.sbatch), then stops with a summary of the failures
    max_restarts: int = 3
    # a collective that waits longer raises (a hung or SIGSTOPped rank): longer than the
    # slowest work one rank does while the others wait (rank 0's export of a checkpoint)
    collective_timeout_s: float = 1800.0
    nonfinite_loss: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10
    deterministic: bool = False
    # write each rank's batch keys + loss per micro-batch to run.dir/samples/rank<r>.jsonl
    # (resume checks: same samples seen); off for real runs
    record_samples: bool = False

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "run.epochs", "must be >= 1")
        _check(self.max_steps >= 0, "run.max_steps", "must be >= 0 (0 = all epochs)")
        _check(self.log_every_steps >= 1, "run.log_every_steps", "must be >= 1")
        _check(self.keep_epoch_checkpoints >= 0, "run.keep_epoch_checkpoints", ">= 0 (0 = all)")
        _check(self.max_restarts >= 0, "run.max_restarts", "must be >= 0")
        _check(self.collective_timeout_s > 0, "run.collective_timeout_s", "must be > 0")


@dataclass(kw_only=True)
class DataConfig:
    train: str = ""  # shard dir, manifest.json path or fsspec URL
    eval: str = ""  # the report's set: read once, at the end, for the reported model only
    # validation split (shard dir / manifest / URL): every evaluation during training scores
    # it, and models/best.pt is chosen on it by eval.select_metric; "" = no model is chosen
    # (the report is eval.wa_* 's weight average, else the final model)
    val: str = ""
    target_length: int = 1024  # frames after pad/crop (AudioSet: 1024 = 10.24 s)
    num_mel_bins: int = 128
    norm_mean: float = -4.2677393  # AST's AudioSet stats
    norm_std: float = 4.5689974
    freqm: int = 48  # SpecAugment max frequency mask width (bins)
    timem: int = 192  # SpecAugment max time mask width (frames)
    mixup: float = 0.5  # probability that a training clip is mixed with another
    mixup_alpha: float = 10.0  # lambda ~ Beta(alpha, alpha)
    balanced: bool = False  # draw with replacement by AST's per-clip weights
    # training shuffle: each epoch permutes the shards, then permutes the samples of each group
    # of this many shards together (every window mixes several shards, whatever order they
    # were written in; reads stay within the group); 0 = a full per-epoch permutation
    shuffle_shards: int = 16
    # augmentation views per training sample (0 = drawn afresh for every epoch position). With
    # V > 0 each draw of a sample picks one of its V views, and a view's mixup partner, lambda
    # and masks are fixed by (seed, sample, view): what a teacher cache (teacher.cache) stores
    views: int = 0
    # the seed of the views' augmentation draws, apart from run.seed: students of every seed
    # see the same V views of a sample, so one teacher cache serves them all
    view_seed: int = 0
    num_threads: int = 4
    prefetch: int = 2
    corrupt_policy: Literal["error", "skip"] = "error"
    device: Literal["auto", "cpu", "gpu"] = "auto"

    def __post_init__(self) -> None:
        _check(self.target_length > 0, "data.target_length", "must be > 0")
        _check(self.norm_std > 0, "data.norm_std", "must be > 0")
        _check(0.0 <= self.mixup <= 1.0, "data.mixup", "is a probability in [0, 1]")
        _check(self.freqm >= 0 and self.timem >= 0, "data.freqm/timem", "must be >= 0")
        _check(self.shuffle_shards >= 0, "data.shuffle_shards", "must be >= 0 (0 = full shuffle)")
        _check(self.views >= 0, "data.views", "must be >= 0 (0 = no fixed views)")


@dataclass(kw_only=True)
class ModelConfig:
    arch: Literal["ast", "efficientnet", "timm", "none"] = "ast"
    # timm backbone: e.g. vit_base_patch16_384 / deit_base_distilled_patch16_384 for AST,
    # efficientnet_b0..b2 for the CNN, any timm name for arch=timm.
    name: str = "deit_base_distilled_patch16_384"
    pooling: Literal["attention", "mean"] = "attention"  # CNN only (PSLA attention pooling)
    fstride: int = 10
    tstride: int = 10
    imagenet_weights: str = ""  # path to an ImageNet timm state dict (no downloads)
    checkpoint: str = ""  # AST / PSLA / CMKD / our export to start from
    drop_path: float = 0.0
    # tiny-model knobs for tests and the demo (0 = the backbone's own)
    embed_dim: int = 0
    depth: int = 0
    num_heads: int = 0
    # CNN attention pooling (PSLA EffNetAttention): number of heads (PSLA default 4; 1 = single
    # head) and the per-frame class activation: linear = logits (CMKD), sigmoid = PSLA's
    # released models, whose probabilities the model turns back into logits.
    attention_heads: int = 4
    cla_activation: Literal["linear", "sigmoid"] = "linear"
    # AST's LayerNorm epsilon; 0 = the timm backbone's (1e-6). Hugging Face AST checkpoints
    # carry theirs (layer_norm_eps, 1e-12), set when one is loaded (models/hf_ast.py)
    layer_norm_eps: float = 0.0

    def __post_init__(self) -> None:
        _check(self.fstride > 0 and self.tstride > 0, "model.fstride/tstride", "must be > 0")
        _check(self.attention_heads >= 1, "model.attention_heads", "must be >= 1")


@dataclass(kw_only=True)
class TeacherConfig(ModelConfig):
    arch: Literal["ast", "efficientnet", "timm", "none"] = "none"
    name: str = "efficientnet_b2"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # The teacher's own input, when it differs from the student's data.*: our exports carry it
    # (their data.*); these keys describe a released teacher (PSLA .pth files carry no settings;
    # PSLA's AudioSet models: 128 bins, 1056 frames, mean -4.6476, std 4.5699). 0 / null = the
    # export's, else the student's. The student's input is adapted exactly (distill/teacher.py).
    num_mel_bins: int = 0
    target_length: int = 0
    norm_mean: float | None = None
    norm_std: float | None = None
    # a teacher that takes more frames than data.target_length gets the student's input padded,
    # which equals its own dataloader's only for clips of at most data.target_length frames:
    # true states that they are (AudioSet's 10 s clips: 998 frames); false refuses the teacher
    pad_input: bool = False
    # a teacher cache (python -m cmkd_scale.teacher_cache): the teacher's logits of every
    # (training sample, view) are read from it and the teacher is not built; "" = online
    cache: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.arch == "none" or bool(self.checkpoint) or self.name.startswith("random:"),
            "teacher.checkpoint",
            "a teacher needs trained weights: set teacher.checkpoint=PATH (or teacher=none)",
        )
        _check(self.num_mel_bins >= 0, "teacher.num_mel_bins", "must be >= 0 (0 = unstated)")
        _check(self.target_length >= 0, "teacher.target_length", "must be >= 0 (0 = unstated)")
        _check(self.norm_std is None or self.norm_std > 0, "teacher.norm_std", "must be > 0")


@dataclass(kw_only=True)
class DistillConfig:
    lambda_: float = 0.5  # weight of the label loss; 1 - lambda_ goes to the KD loss
    temperature: float = 1.0
    loss: Literal["bce", "ce", "kl"] = "bce"  # bce: multi-label; ce/kl: single-label

    def __post_init__(self) -> None:
        _check(0.0 <= self.lambda_ <= 1.0, "distill.lambda_", "must be in [0, 1]")
        _check(self.temperature > 0, "distill.temperature", "must be > 0")


@dataclass(kw_only=True)
class OptimConfig:
    lr: float = 1e-5
    betas: tuple[float, float] = (0.95, 0.999)
    eps: float = 1e-8
    weight_decay: float = 5e-7
    grad_clip: float = 0.0  # 0 = no clipping
    warmup_steps: int = 1000
    schedule: Literal["step", "cosine", "constant"] = "step"
    # AST step decay: from epoch decay_start_epoch, multiply lr by decay_rate every
    # decay_every_epochs epochs.
    decay_start_epoch: int = 2
    decay_every_epochs: int = 1
    decay_rate: float = 0.5
    min_lr: float = 0.0  # cosine floor
    # the global batch (clips per optimizer step, all ranks) that lr and warmup_steps were tuned
    # for: the recipe's reference batch; 0 = not stated (no scaling, no warning)
    reference_batch: int = 0
    # a global batch other than reference_batch: none = lr and warm-up as given (a warning says
    # so); linear / sqrt = lr (and min_lr) x k or sqrt(k), k = global / reference, and the
    # warm-up keeps its clips (warmup_steps / k steps). See cmkd_scale/train/scale.py.
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.reference_batch >= 0, "optim.reference_batch", "must be >= 0 (0 = none)")
        _check(len(self.betas) == 2, "optim.betas", "must be two numbers")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")


@dataclass(kw_only=True)
class DeepSpeedConfig:
    zero_stage: int = 2
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 CPU
    # clips per optimizer step over all ranks: the recipe's reference total batch. grad_accum
    # then follows from the world size (global = micro x accum x world); a world size that
    # cannot reach it exactly is refused. 0 = micro_batch x grad_accum x world, as given.
    global_batch: int = 0
    # clips per rank per forward pass. With global_batch (and grad_accum 0): the largest one a
    # rank may take (memory knob): the run uses the largest divisor of global/world <= it.
    micro_batch: int = 12
    # micro-batches per optimizer step; 0 = derived from global_batch (1 when that is 0).
    # Set with global_batch, micro_batch x grad_accum x world must equal it.
    grad_accum: int = 0
    eval_batch: int = 0  # 0 = micro_batch

    def __post_init__(self) -> None:
        _check(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        _check(self.micro_batch >= 1, "deepspeed.micro_batch", "must be >= 1")
        _check(self.grad_accum >= 0, "deepspeed.grad_accum", "must be >= 0 (0 = derived)")
        _check(self.global_batch >= 0, "deepspeed.global_batch", "must be >= 0 (0 = derived)")


@dataclass(kw_only=True)
class EvalConfig:
    teacher: bool = True  # also evaluate the frozen teacher (once) and log it beside the student
    wa_start_epoch: int = 0  # weight averaging range (1-based, inclusive); 0 = off
    wa_end_epoch: int = 0
    # what chooses models/best.pt on data.val: mAP (multi-label sets), acc (single-label, ESC-50)
    select_metric: Literal["mAP", "acc"] = "mAP"


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI, else sqlite under run.dir
    experiment: str = "cmkd_scale"
    log_checkpoint: bool = True  # upload the exported student (else log its path)
    # the reported model as the run's MLflow model (a pyfunc that tags audio files) ...
    log_model: bool = True
    # ... and registered in the model registry under this name ("" = not registered)
    register: str = ""
    request_timeout_s: float = 5.0
    max_retries: int = 1
    system_metrics: bool = True
    system_metrics_interval_s: float = 10.0  # CPU/memory/GPU sampling period
    flush_every_s: float = 5.0  # metrics are sent in one log_batch per this interval
    finish_timeout_s: float = 300.0  # longest wait at finish() for the last records to upload
    # MLflow run id of a parent run (a study's): the run carries the tag mlflow.parentRunId and
    # shows nested under it; "" = a top-level run. Set by `python -m cmkd_scale.study`.
    parent_run_id: str = ""


@dataclass(kw_only=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(self.model.arch != "none", "model.arch", "the student needs an architecture")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Flatten to dotted keys (``optim.lr``), e.g. for MLflow params."""
        out: dict[str, Any] = {}
        for section, values in self.to_dict().items():
            for key, value in values.items():
                out[f"{section}.{key}"] = value
        return out


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- building from dicts


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint``; convert only where lossless (int->float)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        allowed = typing.get_args(hint)
        _check(value in allowed, key, f"got {value!r}, expected one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': {value!r} does not match {hint}")
    if origin is tuple:
        args = typing.get_args(hint)
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        _check(len(value) == len(args), key, f"expected {len(args)} items, got {len(value)}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in pairs)
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, key, f"expected a number, got {value!r}")
        return float(value)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        _check(ok, key, f"expected an integer, got {value!r}")
        return value
    if hint is bool:
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if hint is str:
        _check(isinstance(value, str), key, f"expected a string, got {value!r}")
        return value
    if hint is type(None):
        _check(value is None, key, f"expected null, got {value!r}")
        return None
    raise ConfigError(f"config key '{key}': unsupported type {hint}")


# Keys that were replaced, with what to write instead.
RENAMED = {
    "data.shuffle_buffer": "use data.shuffle_shards (how many whole shards are shuffled "
    "together; 0 = a full per-epoch permutation)",
}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix}': expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in names:
            if dotted in RENAMED:
                raise ConfigError(f"config key '{dotted}' is gone: {RENAMED[dotted]}")
            near = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {near})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, dotted)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"config section '{prefix}': {exc}") from exc


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _normalise_shorthands(tree: dict[str, Any]) -> dict[str, Any]:
    """``teacher: none`` in YAML (or ``teacher=none``) means ``teacher.arch: none``."""
    teacher = tree.get("teacher")
    if "teacher" in tree and (teacher is None or teacher == "none"):
        tree["teacher"] = {"arch": "none"}
    return tree


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars/lists."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        out.append((key, yaml.safe_load(raw) if raw.strip() else ""))
    return out


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping a YAML file holds; ``what`` names the file in errors ("config file")."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{what} {path}: the top level must be a mapping")
    return loaded


def from_dict(tree: dict[str, Any]) -> Config:
    return _build(Config, _normalise_shorthands(dict(tree)), "")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply overrides."""
    tree = read_yaml_mapping(path, "config file") if path is not None else {}
    tree = _normalise_shorthands(tree)
    for key, value in parse_overrides(overrides or []):
        if key == "teacher" and value == "none":
            tree["teacher"] = {"arch": "none"}
            continue
        _set_dotted(tree, key, value)
    return from_dict(tree)
