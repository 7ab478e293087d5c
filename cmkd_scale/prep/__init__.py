"""Raw AudioSet (or ESC-50, FSD50K, any labelled CSV: ``--format``) + downloaded audio ->
webdataset shards for DALI and webdataset.

``python -m cmkd_scale.prep --help``; in Python: ``run_prep(PrepConfig(...))``, ``finalize``,
``verify``.
"""

from .config import DEFAULT_SHARD_SIZE, FORMATS, ConfigError, PrepConfig
from .decoders import WorkerDied
from .manifest import FinalizeError, finalize
from .plan import PlanError
from .run import run_prep
from .segments import SegmentsError
from .verify import verify

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "ConfigError",
    "FinalizeError",
    "PlanError",
    "PrepConfig",
    "SegmentsError",
    "WorkerDied",
    "finalize",
    "run_prep",
    "verify",
]
