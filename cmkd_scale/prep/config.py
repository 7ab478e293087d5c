"""``PrepConfig``: every option of a prep run, typed and checked once.

The command line builds one from argparse (``cli.py``); Python callers build one directly::

    from cmkd_scale.prep import PrepConfig, run_prep
    run_prep(PrepConfig(segments=["eval_segments.csv"], class_labels="class_labels_indices.csv",
                        audio_dir="/data/audio", out="shards/eval"))

Each check's message names the command-line option and says how to fix it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

from .decoders import DEFAULT_TIMEOUT_S

DEFAULT_SHARD_SIZE = 1000
DEFAULT_ORDER_SEED = 0
# --format: how --segments and --class-labels are read (formats.py)
FORMATS = ("audioset", "esc50", "fsd50k", "csv")
FSD50K_SPLITS = ("train", "val")


class PlanError(ValueError):
    """The output already holds a different plan, or the task split is invalid."""


class ConfigError(PlanError):
    """An option value that cannot work; the message names the option and the fix."""


def _paths(value: object, option: str) -> tuple[Path, ...]:
    if isinstance(value, (str, Path)):
        value = [value]
    if not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{option}: give at least one file (got {value!r})")
    return tuple(Path(v) for v in value)


@dataclass(frozen=True, kw_only=True)
class PrepConfig:
    """The options of ``python -m cmkd_scale.prep`` (same names, ``-`` -> ``_``)."""

    segments: tuple[Path, ...]  # --segments, concatenated in this order
    audio_dir: Path  # --audio-dir
    class_labels: Path | None = None  # --class-labels (not used by --format esc50)
    out: str = "shards"  # --out: folder or fsspec URL
    format: str = "audioset"  # --format
    folds: tuple[int, ...] | None = None  # --folds (esc50, csv)
    esc10: bool = False  # --esc10 (esc50)
    split: str | None = None  # --split (fsd50k dev.csv)
    order_seed: int = DEFAULT_ORDER_SEED  # --order-seed
    keep_order: bool = False  # --keep-order
    workers: int = 1  # --workers
    shard_size: int = DEFAULT_SHARD_SIZE  # --shard-size
    skip_bad_lines: bool = False  # --skip-bad-lines
    decode_timeout_s: float = DEFAULT_TIMEOUT_S  # --decode-timeout
    num_tasks: int = 1  # --num-tasks
    task_id: int = 0  # --task-id
    progress_every_s: float = 10.0  # --progress-every

    def __post_init__(self) -> None:
        def fix(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        fix("segments", _paths(self.segments, "--segments"))
        fix("audio_dir", Path(self.audio_dir))
        if self.class_labels is not None:
            fix("class_labels", Path(self.class_labels))
        fix("out", str(self.out))
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format!r} is unknown: use one of {FORMATS}")
        if self.format == "esc50":
            if self.class_labels is not None:
                raise ConfigError(
                    "--class-labels is not used with --format esc50 (the classes are the "
                    "target/category columns of esc50.csv): leave it out"
                )
        elif self.class_labels is None:
            what = {
                "audioset": "class_labels_indices.csv",
                "fsd50k": "FSD50K.ground_truth/vocabulary.csv",
                "csv": "a file of class names",
            }[self.format]
            raise ConfigError(f"--format {self.format} needs --class-labels ({what})")
        if self.folds is not None:
            if self.format not in ("esc50", "csv"):
                raise ConfigError(
                    f"--folds applies to --format esc50 or csv, not {self.format}: leave it out"
                )
            folds = tuple(self.folds)
            if not folds or any(not isinstance(f, int) or isinstance(f, bool) for f in folds):
                raise ConfigError(f"--folds must be integers like 1,2,3,4, got {self.folds!r}")
            fix("folds", tuple(sorted(set(folds))))
        if self.esc10 and self.format != "esc50":
            raise ConfigError(f"--esc10 applies to --format esc50, not {self.format}")
        if self.split is not None:
            if self.format != "fsd50k":
                raise ConfigError(f"--split applies to --format fsd50k, not {self.format}")
            if self.split not in FSD50K_SPLITS:
                raise ConfigError(f"--split must be one of {FSD50K_SPLITS}, got {self.split!r}")
        for name, option in (("order_seed", "--order-seed"), ("workers", "--workers")):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{option} must be an integer, got {value!r}")
        if self.keep_order and self.order_seed != DEFAULT_ORDER_SEED:
            raise ConfigError(
                "--order-seed has no effect with --keep-order (input order): pass one of them"
            )
        if not 0 <= self.order_seed < 2**63:
            raise ConfigError(f"--order-seed must be in [0, 2**63), got {self.order_seed}")
        if self.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {self.workers}")
        if not isinstance(self.shard_size, int) or self.shard_size < 1:
            raise ConfigError(f"--shard-size must be >= 1, got {self.shard_size}")
        if not (isinstance(self.decode_timeout_s, (int, float)) and self.decode_timeout_s > 0):
            raise ConfigError(
                f"--decode-timeout must be > 0 seconds, got {float(self.decode_timeout_s)}"
            )
        if not self.progress_every_s >= 0:  # 0: a line after every clip
            raise ConfigError(f"--progress-every must be >= 0 seconds, got {self.progress_every_s}")
        if self.num_tasks < 1 or not 0 <= self.task_id < self.num_tasks:
            raise ConfigError(
                f"need 0 <= --task-id < --num-tasks, got task {self.task_id} of {self.num_tasks}"
            )

    @property
    def order(self) -> int | None:
        """The seed of the written order, None for input order (--keep-order)."""
        return None if self.keep_order else self.order_seed

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
