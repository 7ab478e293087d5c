"""A real 2-process run: each rank builds its own loaders, as under torchrun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from cmkd_scale.config import DataConfig
from cmkd_scale.data import EvalLoader, TrainLoader
from tests.fixtures.data import NUM_CLIPS

WORLD = 2


def _cfg(shards: str) -> DataConfig:
    return DataConfig(train=shards, eval=shards, target_length=160, num_threads=1)


def _rank_main(rank: int, shards: str, out: str) -> None:
    """One rank: the keys it trains on (2 epochs) and the eval indices it produces."""
    cfg = _cfg(shards)
    train = TrainLoader(cfg, micro_batch=2, rank=rank, world_size=WORLD, seed=4, device="cpu")
    evals = EvalLoader(cfg, micro_batch=4, rank=rank, world_size=WORLD, device="cpu")
    result = {
        "steps": train.steps_per_epoch,
        "train": [[k for b in train.epoch_batches(e) for k in b.keys] for e in range(2)],
        "eval_steps": evals.steps,
        "eval": [i for b in evals.batches() for i in b.index[b.valid].tolist()],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow  # two fresh interpreters import torch + DALI
def test_two_processes_split_train_and_eval(synth_shards, tmp_path):
    mp.spawn(_rank_main, args=(str(synth_shards), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == NUM_CLIPS // (WORLD * 2)
    for epoch in range(2):
        a, b = (set(r["train"][epoch]) for r in ranks)
        assert not a & b and len(a) + len(b) == WORLD * 2 * ranks[0]["steps"]
    assert ranks[0]["train"][0] != ranks[0]["train"][1]
    assert ranks[0]["eval_steps"] == ranks[1]["eval_steps"]
    assert ranks[0]["eval"] + ranks[1]["eval"] == list(range(NUM_CLIPS))
    # the same as two loaders in one process: nothing depends on the process
    cfg = _cfg(str(synth_shards))
    for rank, got in enumerate(ranks):
        local = TrainLoader(cfg, micro_batch=2, rank=rank, world_size=WORLD, seed=4, device="cpu")
        assert [k for b in local.epoch_batches(1) for k in b.keys] == got["train"][1]
