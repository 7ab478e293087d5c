"""Corrupt or missing shards: a clear error naming shard, key and fix, or a counted skip."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cmkd_scale.config import DataConfig
from cmkd_scale.data import DataError, EvalLoader, TrainLoader
from cmkd_scale.data.manifest import ShardSet
from tests.fixtures.data import NUM_CLIPS

VERIFY = "python -m cmkd_scale.prep verify"


def _cfg(shards, **kw) -> DataConfig:
    base = dict(
        train=str(shards),
        eval=str(shards),
        target_length=160,
        num_threads=1,
        mixup=0.5,
        freqm=8,
        timem=16,
    )
    base.update(kw)
    return DataConfig(**base)


def _train(cfg: DataConfig) -> TrainLoader:
    # world 1, micro 1: every clip is read in every epoch
    return TrainLoader(cfg, micro_batch=1, rank=0, world_size=1, seed=0, device="cpu")


def _damage(shards, index: int, *, where: str) -> tuple[str, str]:
    """Overwrite bytes of sample ``index``'s FLAC member: its magic, or its audio frames."""
    table = ShardSet(str(shards)).table
    shard = f"shard-{int(table.shard[index]):06d}.tar"
    offset, size = (int(v) for v in table.flac[index])
    start, length = (offset, 4) if where == "magic" else (offset + size // 3, size // 3)
    with open(shards / shard, "r+b") as f:
        f.seek(start)
        f.write(np.random.default_rng(index).integers(0, 256, length, np.uint8).tobytes())
    return shard, table.keys[index]


@pytest.mark.parametrize("where", ["magic", "frames"])
def test_corrupt_member_error_names_shard_key_and_fix(shard_copy, where):
    """Caught by the header check ("magic") or when DALI fails to decode ("frames")."""
    shard, key = _damage(shard_copy, 5, where=where)
    loader = _train(_cfg(shard_copy, corrupt_policy="error"))
    with pytest.raises(DataError) as err:
        for _ in loader.epoch_batches(0):
            pass
    message = str(err.value)
    assert shard in message and key in message and VERIFY in message
    assert "corrupt_policy=skip" in message


@pytest.mark.parametrize("where", ["magic", "frames"])
def test_corrupt_member_is_replaced_and_counted_with_skip(shard_copy, where, caplog):
    _, key = _damage(shard_copy, 5, where=where)
    loader = _train(_cfg(shard_copy, corrupt_policy="skip"))
    with caplog.at_level(logging.WARNING, logger="cmkd_scale.data.loader"):
        for epoch in range(2):
            batches = list(loader.epoch_batches(epoch))
            assert len(batches) == loader.steps_per_epoch == NUM_CLIPS
            used = {k for b in batches for k in b.keys + b.mixed_with}
            assert key not in used
    assert loader.skipped == 1  # found once, remembered
    assert key in caplog.text and "skipping" in caplog.text
    assert loader.state_dict()["bad"] == [5]


def test_corrupt_eval_member_names_shard_and_key(shard_copy):
    shard, key = _damage(shard_copy, 9, where="frames")
    loader = EvalLoader(_cfg(shard_copy), micro_batch=4, rank=0, world_size=1, device="cpu")
    with pytest.raises(DataError) as err:
        for _ in loader.batches():
            pass
    assert shard in str(err.value) and key in str(err.value) and VERIFY in str(err.value)


def test_missing_shard_fails_fast_naming_it(shard_copy):
    (shard_copy / "shard-000002.tar").unlink()
    for make in (
        lambda cfg: _train(cfg),
        lambda cfg: EvalLoader(cfg, micro_batch=2, rank=0, world_size=1, device="cpu"),
    ):
        with pytest.raises(DataError) as err:
            make(_cfg(shard_copy, corrupt_policy="error"))
        assert "shard-000002.tar" in str(err.value) and VERIFY in str(err.value)


def test_missing_shard_is_left_out_with_skip(shard_copy):
    (shard_copy / "shard-000001.tar").unlink()
    loader = _train(_cfg(shard_copy, corrupt_policy="skip"))
    lost = {
        k
        for k, s in zip(loader.shards.table.keys, loader.shards.table.shard, strict=True)
        if s == 1
    }
    batches = list(loader.epoch_batches(0))
    assert len(batches) == NUM_CLIPS
    assert not lost & {k for b in batches for k in b.keys + b.mixed_with}


def test_truncated_shard_is_named(shard_copy):
    tar = shard_copy / "shard-000003.tar"
    tar.write_bytes(tar.read_bytes()[:1024])
    loader = _train(_cfg(shard_copy))
    with pytest.raises(DataError, match=r"shard-000003\.tar.*truncated"):
        for _ in loader.epoch_batches(0):
            pass


def test_bad_shard_set_paths_say_what_to_do(tmp_path, shard_copy):
    with pytest.raises(DataError, match="no manifest"):
        _train(_cfg(tmp_path))
    with pytest.raises(DataError, match=r"set data\.train"):
        _train(_cfg(""))
    (shard_copy / "shard-000000.idx").unlink()
    with pytest.raises(DataError, match=r"shard-000000\.idx: index file missing"):
        _train(_cfg(shard_copy))
