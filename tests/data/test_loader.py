"""TrainLoader / EvalLoader on prep-made shards: ranks, resume, augmentation, eval coverage."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cmkd_scale.config import DataConfig
from cmkd_scale.data import EvalLoader, TrainLoader
from cmkd_scale.data.manifest import ShardSet
from cmkd_scale.data.members import MemberReader
from cmkd_scale.data.reference import ast_features, decode
from tests.fixtures.data import NUM_CLIPS

TARGET = 160  # frames: the 1.5 s clips (148 frames) get padded
TOLERANCE = 0.05  # on the raw log-mel; divided by 2*std after normalisation


def _cfg(shards, **kw) -> DataConfig:
    base = dict(
        train=str(shards),
        eval=str(shards),
        target_length=TARGET,
        freqm=24,
        timem=40,
        mixup=0.5,
        num_threads=1,
        prefetch=2,
    )
    base.update(kw)
    return DataConfig(**base)


def _train(cfg: DataConfig, rank: int = 0, world: int = 2, micro: int = 3, seed: int = 1):
    return TrainLoader(cfg, micro_batch=micro, rank=rank, world_size=world, seed=seed, device="cpu")


def _keys_of_epoch(loader: TrainLoader, epoch: int, start: int = 0) -> list[list[str]]:
    return [b.keys for b in loader.epoch_batches(epoch, start)]


def test_train_ranks_read_disjoint_parts_of_every_epoch(synth_shards):
    cfg = _cfg(synth_shards)
    loaders = [_train(cfg, rank) for rank in range(2)]
    assert loaders[0].steps_per_epoch == loaders[1].steps_per_epoch == NUM_CLIPS // 6
    assert loaders[0].num_classes == 527 and len(loaders[0].class_names) == 527
    epochs = []
    for epoch in range(2):
        per_rank = [
            [i for b in ld.epoch_batches(epoch) for i in b.index.tolist()] for ld in loaders
        ]
        assert len(per_rank[0]) == len(per_rank[1]) == 2 * 3
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        assert len(set(per_rank[0] + per_rank[1])) == 12  # 12 of 13 clips, none twice
        epochs.append(per_rank[0])
    assert epochs[0] != epochs[1]  # reshuffled


def test_balanced_ranks_draw_from_the_weights(synth_shards):
    cfg = _cfg(synth_shards, balanced=True, mixup=0.0)
    draws = [
        [i for e in range(3) for b in _train(cfg, r).epoch_batches(e) for i in b.index.tolist()]
        for r in range(2)
    ]
    assert draws[0] != draws[1]
    weights = ShardSet(str(synth_shards)).weights()
    assert all(weights[i] > 0 for d in draws for i in d)


def _collect(batches) -> list[tuple]:
    return [
        (b.keys, b.mixed_with, b.lam.tolist(), b.fbank.clone(), b.labels.clone()) for b in batches
    ]


def test_resume_continues_exactly(synth_shards):
    """Keys, partners, lambdas, features and labels with and without an interruption."""
    cfg = _cfg(synth_shards, balanced=False)
    straight = _train(cfg, rank=1, micro=2)
    steps = straight.steps_per_epoch
    reference = _collect(straight.epoch_batches(0)) + _collect(straight.epoch_batches(1))

    first = _train(cfg, rank=1, micro=2)
    got = []
    for batch in first.epoch_batches(0):  # stop in the middle of epoch 0
        got += _collect([batch])
        if len(got) == 2:
            break
    state = first.state_dict()
    assert (state["epoch"], state["step"]) == (0, 2)
    del first  # "restart"
    resumed = _train(cfg, rank=1, micro=2)
    resumed.load_state_dict(state)
    got += _collect(resumed.epoch_batches(resumed.epoch, resumed.step))
    assert (resumed.epoch, resumed.step) == (1, 0)
    got += _collect(resumed.epoch_batches(resumed.epoch, resumed.step))
    assert len(got) == len(reference) == 2 * steps
    for ours, ref in zip(got, reference, strict=True):
        assert ours[:3] == ref[:3]
        torch.testing.assert_close(ours[3], ref[3], rtol=0, atol=0)
        torch.testing.assert_close(ours[4], ref[4], rtol=0, atol=0)


def test_resume_refuses_another_setup(synth_shards):
    cfg = _cfg(synth_shards)
    state = _train(cfg, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        _train(cfg, seed=2).load_state_dict(state)


def test_augmented_batch_equals_ast_reference(synth_shards):
    """Mixup on the waveform, labels mixed with the same lambda, SpecAugment masks in the
    raw log-mel before normalising: the DALI batch equals AST's code fed the same draws."""
    cfg = _cfg(synth_shards, mixup=0.8, norm_mean=-3.0, norm_std=3.5)
    loader = _train(cfg, world=1, micro=6)
    reader = MemberReader(loader.shards)
    keys = loader.shards.table.keys
    masked_value = (0.0 - cfg.norm_mean) / (2 * cfg.norm_std)
    mixed = masked = 0
    for step, batch in enumerate(loader.epoch_batches(0)):
        plan = loader.sampler.plan(0, step)
        for i in range(len(batch.keys)):
            main = reader.read(int(plan.index[i]))
            assert batch.keys[i] == keys[plan.index[i]]
            partner = lam = None
            expected_labels = main.labels
            if plan.partner[i] >= 0:
                other = reader.read(int(plan.partner[i]))
                lam = float(plan.lam[i])
                assert batch.mixed_with[i] == other.key and batch.lam[i] == pytest.approx(lam)
                partner = decode(other.flac)
                expected_labels = lam * main.labels + (1 - lam) * other.labels
                mixed += 1
            else:
                assert batch.mixed_with[i] is None and batch.lam[i] == 1.0
            np.testing.assert_allclose(batch.labels[i].numpy(), expected_labels, atol=1e-6)
            ref = ast_features(
                decode(main.flac),
                partner=partner,
                lam=lam or 1.0,
                target_length=TARGET,
                norm_mean=cfg.norm_mean,
                norm_std=cfg.norm_std,
                freq_mask=tuple(plan.freq_mask[i]),
                time_mask=tuple(plan.time_mask[i]),
            )
            got = batch.fbank[i]
            torch.testing.assert_close(got, ref, rtol=0, atol=TOLERANCE / (2 * cfg.norm_std))
            (f0, fw), (t0, tw) = plan.freq_mask[i], plan.time_mask[i]
            assert torch.all(got[:, f0 : f0 + fw] == masked_value)
            assert torch.all(got[t0 : t0 + tw, :] == masked_value)
            masked += int(fw > 0 and tw > 0)
    assert mixed >= 2 and masked >= 2  # the draws exercised both paths


def test_eval_covers_every_clip_once_in_order(synth_shards):
    cfg = _cfg(synth_shards)
    reader = MemberReader(ShardSet(str(synth_shards)))
    for world, micro in ((2, 3), (3, 2)):
        loaders = [
            EvalLoader(cfg, micro_batch=micro, rank=r, world_size=world, device="cpu")
            for r in range(world)
        ]
        assert len({ld.steps for ld in loaders}) == 1
        seen = []
        for ld in loaders:
            batches = list(ld.batches())
            assert len(batches) == ld.steps
            for b in batches:
                assert b.fbank.shape == (micro, TARGET, 128)
                assert torch.all(b.index[~b.valid] == -1)
                seen += b.index[b.valid].tolist()
                for i, ok, feats, labels in zip(b.index, b.valid, b.fbank, b.labels, strict=True):
                    if not ok:
                        continue
                    sample = reader.read(int(i))
                    ref = ast_features(
                        decode(sample.flac),
                        target_length=TARGET,
                        norm_mean=cfg.norm_mean,
                        norm_std=cfg.norm_std,
                    )
                    torch.testing.assert_close(
                        feats, ref, rtol=0, atol=TOLERANCE / (2 * cfg.norm_std)
                    )
                    np.testing.assert_array_equal(labels.numpy(), sample.labels)
        assert seen == list(range(NUM_CLIPS))  # every clip once, in global order


def test_eval_rank_without_clips_yields_padding(synth_shards):
    cfg = _cfg(synth_shards)
    world = NUM_CLIPS + 1  # rank 0 gets nothing
    empty = EvalLoader(cfg, micro_batch=2, rank=0, world_size=world, device="cpu")
    last = EvalLoader(cfg, micro_batch=2, rank=world - 1, world_size=world, device="cpu")
    assert empty.steps == last.steps == 1
    (pad,) = list(empty.batches())
    (real,) = list(last.batches())
    assert not pad.valid.any() and pad.index.tolist() == [-1, -1]
    assert real.valid.tolist() == [True, False] and real.index.tolist() == [NUM_CLIPS - 1, -1]


def test_config_device_auto_is_cpu_here(synth_shards):
    cfg = dataclasses.replace(_cfg(synth_shards), device="auto")
    loader = EvalLoader(cfg, micro_batch=4, rank=0, world_size=1, device=cfg.device)
    assert loader.device == ("gpu" if torch.cuda.is_available() else "cpu")


def _snapshot(batches) -> list[tuple]:
    return [
        (b.index.tolist(), b.valid.tolist(), b.fbank.clone(), b.labels.clone()) for b in batches
    ]


def _assert_same(got: list[tuple], want: list[tuple]) -> None:
    assert len(got) == len(want)
    for (gi, gv, gf, gl), (wi, wv, wf, wl) in zip(got, want, strict=True):
        assert gi == wi and gv == wv
        torch.testing.assert_close(gf, wf, rtol=0, atol=0)
        torch.testing.assert_close(gl, wl, rtol=0, atol=0)


def test_eval_pipeline_kept_between_passes_repeats_them_exactly(synth_shards):
    """The kept reader pipeline (with the next pass already prefetched) gives every pass the
    same batches; a pass left after one batch does not shift the next one."""
    cfg = _cfg(synth_shards)
    for rank in (0, 1):
        loader = EvalLoader(cfg, micro_batch=3, rank=rank, world_size=2, device="cpu")
        first = _snapshot(loader.batches())
        assert loader._runner is not None  # kept for the next pass
        _assert_same(_snapshot(loader.batches()), first)
        next(iter(loader.batches()))  # left early: the pipeline is dropped, not reused
        assert loader._runner is None
        _assert_same(_snapshot(loader.batches()), first)
        fresh = EvalLoader(cfg, micro_batch=3, rank=rank, world_size=2, device="cpu")
        _assert_same(_snapshot(fresh.batches()), first)


def test_train_pipeline_kept_across_epochs_equals_fresh_loaders(synth_shards):
    """Epoch after epoch on one pipeline gives what a new loader gives for that epoch."""
    cfg = _cfg(synth_shards, mixup=0.8)
    kept = _train(cfg, world=1, micro=4)
    runs = [_snapshot(kept.epoch_batches(epoch)) for epoch in range(3)]
    assert kept._runner is not None
    for epoch in (1, 2):
        _assert_same(runs[epoch], _snapshot(_train(cfg, world=1, micro=4).epoch_batches(epoch)))
