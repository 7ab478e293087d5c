"""Raw AudioSet (segment CSVs + downloaded audio) -> webdataset shards for DALI and webdataset.

``python -m cmkd_scale.prep --help``; in Python: ``run_prep``, ``finalize``, ``verify``.
"""

from .manifest import FinalizeError, finalize
from .plan import PlanError
from .run import DEFAULT_SHARD_SIZE, WorkerDied, run_prep
from .segments import SegmentsError
from .verify import verify

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FinalizeError",
    "PlanError",
    "SegmentsError",
    "WorkerDied",
    "finalize",
    "run_prep",
    "verify",
]
