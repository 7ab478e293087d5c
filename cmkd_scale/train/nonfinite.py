"""A NaN/Inf loss: stop naming the clips (default), or skip the batch on every rank."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from cmkd_scale import dist
from cmkd_scale.config import Config
from cmkd_scale.train.checkpoint import CheckpointManager, TrainerState

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf (and run.nonfinite_loss says stop, or the skip budget is spent)."""


def handle_nonfinite(
    cfg: Config,
    state: TrainerState,
    keys: Sequence[str],
    *,
    finite_here: bool,
    ckpt: CheckpointManager,
) -> None:
    """Called on every rank: raise with the offending keys of all ranks, or count a skip."""
    reports = dist.all_gather_objects(None if finite_here else list(keys))
    bad = {rank: keys for rank, keys in enumerate(reports) if keys is not None}
    where = (
        f"optimizer step {state.global_step + 1} (epoch {state.epoch}, "
        f"micro-batch {state.batch_in_epoch})"
    )
    if cfg.run.nonfinite_loss == "stop" or state.nonfinite_skips >= cfg.run.max_nonfinite_skips:
        budget = (
            f"the skip budget run.max_nonfinite_skips={cfg.run.max_nonfinite_skips} is spent"
            if cfg.run.nonfinite_loss == "skip"
            else "set run.nonfinite_loss=skip to skip such batches"
        )
        raise NonFiniteLossError(
            f"non-finite loss at {where}; clips by rank: {bad}. Check those clips and "
            f"optim.lr; {budget}. Last good checkpoint: "
            f"{ckpt.latest_tag() or 'none yet'} in {ckpt.ckpt_dir}"
        )
    state.nonfinite_skips += 1
    log.warning(
        "skipped non-finite loss at %s (clips %s); %d skipped so far",
        where,
        bad,
        state.nonfinite_skips,
    )
