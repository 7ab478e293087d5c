"""A run's data loaders: the training stream, and the val / eval sets it is scored on.

With ``data.val`` training evaluates on it and the eval set is opened only for the report at
the end (:meth:`RunLoaders.for_report`); without one the eval set gives the monitoring curves.
Every split must hold the training set's class index.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cmkd_scale.config import Config
from cmkd_scale.dist import DistEnv
from cmkd_scale.train.scale import ScalePlan

if TYPE_CHECKING:  # the data package loads DALI: imported when a run starts
    from cmkd_scale.data import EvalLoader, TrainLoader

log = logging.getLogger(__name__)


@dataclass
class RunLoaders:
    cfg: Config
    plan: ScalePlan
    env: DistEnv
    device: str  # "gpu" | "cpu": where DALI runs
    train: TrainLoader
    val: EvalLoader | None = None
    eval: EvalLoader | None = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    def open_split(self, split: str) -> EvalLoader:
        """An EvalLoader on ``data.<split>`` (``val`` or ``eval``), checked against train."""
        from cmkd_scale.data import EvalLoader

        loader = EvalLoader(
            self.cfg.data,
            micro_batch=self.cfg.deepspeed.eval_batch or self.plan.micro_batch,
            rank=self.env.rank,
            world_size=self.env.world_size,
            device=self.device,
            url=getattr(self.cfg.data, split),
        )
        if loader.num_classes != self.num_classes:
            loader.close()
            raise ValueError(
                f"data.train has {self.num_classes} classes but data.{split} has "
                f"{loader.num_classes}: prep every split with the same class index"
            )
        return loader

    def for_report(self) -> EvalLoader:
        """The eval set's loader: opened only now when training evaluated on data.val."""
        if self.eval is None:
            log.info("report: reading the eval set now (data.eval=%s)", self.cfg.data.eval)
            self.eval = self.open_split("eval")
        return self.eval

    def close(self) -> None:
        """Release the DALI pipelines."""
        self.train.close()
        for loader in (self.val, self.eval):
            if loader is not None:
                loader.close()


def open_loaders(cfg: Config, plan: ScalePlan, env: DistEnv, *, on_gpu: bool) -> RunLoaders:
    """The training loader and the set training evaluates on (val, else eval)."""
    from cmkd_scale.data import TrainLoader

    device = "gpu" if on_gpu else "cpu"
    train = TrainLoader(
        cfg.data,
        micro_batch=plan.micro_batch,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.run.seed,
        device=device,
        exact=bool(cfg.teacher.cache),  # a teacher cache has logits of planned samples only
    )
    loaders = RunLoaders(cfg, plan, env, device, train)
    if cfg.data.val:
        loaders.val = loaders.open_split("val")
        _warn_if_eval_absent(cfg, env)
    else:
        loaders.eval = loaders.open_split("eval")
    return loaders


def _warn_if_eval_absent(cfg: Config, env: DistEnv) -> None:
    """data.eval is read only at the end: say now when a local one is not there (yet)."""
    where = cfg.data.eval
    if env.is_main and "://" not in where and not os.path.exists(where):
        log.warning(
            "data.eval %s does not exist (yet): it is read only for the report at the end of "
            "training, and must be there by then",
            where,
        )
