"""Shards -> DALI -> AST log-mel batches: the training and evaluation data pipeline."""

from cmkd_scale.data.loader import Batch, EvalLoader, TrainLoader
from cmkd_scale.data.manifest import DataError, read_manifest

__all__ = ["Batch", "DataError", "EvalLoader", "TrainLoader", "read_manifest"]
