"""AST/PSLA weight averaging ("WA"): the mean of several epoch exports of one student."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from cmkd_scale.config import ConfigError
from cmkd_scale.models.exported import Export, epoch_tag


def average_weights(paths: Sequence[Path]) -> Export:
    """AST/PSLA weight averaging: the mean of several exports of one architecture."""
    first = Export.load(paths[0])
    total = {k: v.double() if v.is_floating_point() else v for k, v in first.state_dict.items()}
    for path in paths[1:]:
        sd = Export.load(path).state_dict
        same = sd.keys() == total.keys() and all(sd[k].shape == total[k].shape for k in sd)
        if not same:
            raise ValueError(f"{path} has different parameters than {paths[0]}; cannot average")
        for k, v in sd.items():
            if v.is_floating_point():
                total[k] += v.double()
    averaged = {
        k: (v / len(paths)).float() if v.is_floating_point() else v for k, v in total.items()
    }
    return dataclasses.replace(
        first, state_dict=averaged, source_checkpoint=[str(p) for p in paths]
    )


def wa_paths(run_dir: Path, start: int, end: int) -> list[Path]:
    """The epoch exports ``models/epoch-<e>.pt`` for epochs start..end (inclusive)."""
    if not 1 <= start <= end:
        raise ConfigError(f"weight averaging range {start}..{end}: need 1 <= start <= end")
    paths = [run_dir / "models" / f"{epoch_tag(e)}.pt" for e in range(start, end + 1)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"weight averaging needs {missing}; did those epochs finish?")
    return paths
