"""Shards -> DALI -> AST log-mel batches: the training and evaluation data pipeline.

Lazy: ``import cmkd_scale.data.manifest`` (or any module that does not run the graph) does not
import DALI; the loaders load ``pipeline.py`` (the only ``nvidia.dali`` import) when first named.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cmkd_scale.data.eval_loader import EvalLoader
    from cmkd_scale.data.loader import Batch, TrainLoader
    from cmkd_scale.data.manifest import DataError, read_manifest

__all__ = ["Batch", "DataError", "EvalLoader", "TrainLoader", "read_manifest"]

_WHERE = {
    "Batch": "cmkd_scale.data.loader",
    "EvalLoader": "cmkd_scale.data.eval_loader",
    "TrainLoader": "cmkd_scale.data.loader",
    "DataError": "cmkd_scale.data.manifest",
    "read_manifest": "cmkd_scale.data.manifest",
}


def __getattr__(name: str) -> Any:
    """Import the module that defines ``name`` on first use (PEP 562)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'cmkd_scale.data' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
