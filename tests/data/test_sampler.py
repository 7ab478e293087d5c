"""Training plans: rank disjointness, coverage, balanced draws, augmentation draws, purity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio
from scipy import stats

from cmkd_scale.data.sampler import AugmentSpec, TrainSampler

AUG = AugmentSpec(
    mixup=0.5, mixup_alpha=10.0, freqm=48, timem=192, num_mel_bins=128, target_length=1024
)


def _sampler(rank: int = 0, world: int = 2, **kw) -> TrainSampler:
    args = dict(shard_sizes=[4, 4, 4, 1], micro_batch=3, seed=7, augment=AUG)
    args.update(kw)
    return TrainSampler(rank=rank, world_size=world, **args)


def _epoch(sampler: TrainSampler, epoch: int) -> np.ndarray:
    return np.stack([p.index for p in sampler.plans(epoch)])


def test_ranks_are_disjoint_and_cover_the_epoch_order():
    world = 2
    ranks = [_sampler(r, world) for r in range(world)]
    assert ranks[0].steps_per_epoch == 13 // (2 * 3) == 2  # documented arithmetic
    for epoch in range(3):
        per_rank = [_epoch(s, epoch).ravel() for s in ranks]
        both = np.concatenate(per_rank)
        assert len(set(both.tolist())) == len(both) == 2 * 2 * 3  # no sample twice
        assert set(per_rank[0]).isdisjoint(per_rank[1])
        order = ranks[0].epoch_order(epoch)
        assert sorted(order.tolist()) == list(range(13))  # a permutation of all samples
        assert sorted(both.tolist()) == sorted(order[:12].tolist())


def test_every_sample_once_per_epoch_when_the_batch_divides():
    ranks = [_sampler(r, 2, shard_sizes=[5, 5, 2], micro_batch=2) for r in range(2)]
    for epoch in range(2):
        seen = np.concatenate([_epoch(s, epoch).ravel() for s in ranks])
        assert sorted(seen.tolist()) == list(range(12))


def test_order_is_reshuffled_each_epoch_and_fixed_by_the_seed():
    s = _sampler()
    orders = [s.epoch_order(e).tolist() for e in range(4)]
    assert len({tuple(o) for o in orders}) == 4
    assert _sampler(seed=7).epoch_order(2).tolist() == orders[2]
    assert _sampler(seed=8).epoch_order(2).tolist() != orders[2]


def test_shuffle_groups_keep_reads_inside_few_shards():
    """Groups of two shards: each window of 8 samples holds exactly two shards' samples, the
    grouping changes from epoch to epoch, and every sample appears once."""
    s = _sampler(shard_sizes=[4] * 6, shuffle_shards=2)
    shard_of = np.repeat(np.arange(6), 4)
    groupings = set()
    for epoch in range(4):
        order = s.epoch_order(epoch)
        assert sorted(order.tolist()) == list(range(24))
        windows = shard_of[order].reshape(3, 8)
        groups = [frozenset(w.tolist()) for w in windows]
        assert all(len(g) == 2 for g in groups)
        assert all(
            sorted(np.bincount(w, minlength=6)[sorted(g)]) == [4, 4]
            for w, g in zip(windows, groups, strict=True)
        )
        groupings.add(frozenset(groups))
    assert len(groupings) > 1


def test_each_window_mixes_shards_written_in_class_order():
    """Shards that each hold one class (a class-sorted list packed in input order): with the
    default group of shards every batch mixes classes like a full permutation does."""
    sizes = [25] * 12  # 12 one-class shards of 25 clips
    cls = np.repeat(np.arange(12), 25)

    def mean_classes_per_batch(shuffle_shards: int) -> float:
        s = _sampler(shard_sizes=sizes, micro_batch=10, world=1, shuffle_shards=shuffle_shards)
        per_batch = [len(set(cls[p.index].tolist())) for e in range(3) for p in s.plans(e)]
        return float(np.mean(per_batch))

    full = mean_classes_per_batch(0)
    assert mean_classes_per_batch(16) == pytest.approx(full, rel=0.05)
    assert mean_classes_per_batch(12) == pytest.approx(full, rel=0.05)
    one_shard = mean_classes_per_batch(1)  # the old failure: windows of one shard
    assert one_shard < 0.4 * full


def test_negative_shuffle_shards_is_refused():
    with pytest.raises(ValueError, match="shuffle_shards"):
        _sampler(shuffle_shards=-1)


def test_plans_are_pure_functions_of_seed_epoch_rank_step():
    a, b = _sampler(1), _sampler(1)
    for step in (1, 0):  # any order, fresh instances: same plan
        pa, pb = a.plan(3, step), b.plan(3, step)
        for field in ("index", "position", "partner", "lam", "freq_mask", "time_mask"):
            np.testing.assert_array_equal(getattr(pa, field), getattr(pb, field))
    resumed = [p.index.tolist() for p in b.plans(3, start_step=1)]
    assert resumed == [p.index.tolist() for p in a.plans(3)][1:]


def _balanced_draws(rank: int, world: int, weights: np.ndarray, epochs: int) -> np.ndarray:
    s = TrainSampler(
        shard_sizes=[len(weights)],
        micro_batch=4,
        rank=rank,
        world_size=world,
        seed=3,
        augment=AUG,
        weights=weights,
    )
    return np.concatenate([s._rank_indices(e).ravel() for e in range(epochs)])


def test_balanced_draws_follow_the_weights():
    """Chi-square over samples and a binomial-std bound per class (AST's weight formula)."""
    rng = np.random.default_rng(0)
    n, classes = 24, 6
    labels = np.zeros((n, classes), dtype=bool)
    for i in range(n):  # class 0 is common, class 5 rare: balanced sampling evens them out
        labels[
            i,
            rng.choice(
                classes, size=rng.integers(1, 3), replace=False, p=[0.5, 0.2, 0.1, 0.1, 0.07, 0.03]
            ),
        ] = True
    labels[0, 5] = True
    class_weight = 1000.0 / (labels.sum(axis=0) + 0.01)
    weights = (labels * class_weight).sum(axis=1)
    for rank in range(2):
        draws = _balanced_draws(rank, 2, weights, epochs=2000)
        counts = np.bincount(draws, minlength=n)
        expected = len(draws) * weights / weights.sum()
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < stats.chi2.ppf(0.999, df=n - 1), chi2
        emitted = labels[draws].mean(axis=0)
        p = (labels * weights[:, None]).sum(axis=0) / weights.sum()
        tolerance = 5 * np.sqrt(p * (1 - p) / len(draws))
        np.testing.assert_array_less(np.abs(emitted - p), tolerance)
        uniform = labels.mean(axis=0)
        assert emitted[5] > 2 * uniform[5]  # the rare class is drawn far more than uniformly


def test_balanced_ranks_draw_independent_streams():
    weights = np.linspace(1.0, 3.0, 16)
    r0, r1 = (_balanced_draws(r, 2, weights, epochs=3) for r in range(2))
    assert len(r0) == len(r1) == 3 * (16 // 8) * 4
    assert r0.tolist() != r1.tolist()
    assert _balanced_draws(0, 2, weights, 3).tolist() == r0.tolist()  # reproducible


def _augment_draws(count: int, aug: AugmentSpec = AUG) -> dict[str, np.ndarray]:
    s = TrainSampler(
        shard_sizes=[count], micro_batch=count, rank=0, world_size=1, seed=5, augment=aug
    )
    p = s.plan(0, 0)
    return {"partner": p.partner, "lam": p.lam, "freq": p.freq_mask, "time": p.time_mask}


def _torchaudio_masks(transform: torch.nn.Module, size: tuple[int, int], axis: int, n: int):
    starts, widths = [], []
    for _ in range(n):
        masked = transform(torch.ones(size)) == 0
        hit = np.flatnonzero(masked.any(dim=1 - axis).numpy())
        starts.append(hit[0] if len(hit) else -1)
        widths.append(len(hit))
    return np.array(starts), np.array(widths)


def test_mask_draws_match_torchaudio_masking():
    """Widths ~ floor(U * param), starts ~ floor(U * (size - width)): same distribution as
    torchaudio's FrequencyMasking/TimeMasking (two-sample KS test)."""
    n = 1500
    ours = _augment_draws(n)
    torch.manual_seed(0)
    _, f_widths = _torchaudio_masks(torchaudio.transforms.FrequencyMasking(48), (128, 2), 0, n)
    _, t_widths = _torchaudio_masks(torchaudio.transforms.TimeMasking(192), (2, 1024), 1, n)
    for mine, theirs, param, size in (
        (ours["freq"], f_widths, 48, 128),
        (ours["time"], t_widths, 192, 1024),
    ):
        starts, widths = mine[:, 0], mine[:, 1]
        assert widths.min() >= 0 and widths.max() <= param - 1
        assert np.all(starts + widths <= size)
        assert stats.ks_2samp(widths, theirs).pvalue > 1e-3
        assert abs(widths.mean() - (param - 1) / 2) < 4 * param / np.sqrt(12 * n)


def test_mixup_draws_follow_ast():
    n = 4000
    ours = _augment_draws(n)
    mixed = ours["partner"] >= 0
    assert abs(mixed.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
    lam = ours["lam"][mixed]
    assert np.all(ours["lam"][~mixed] == 1.0)
    assert stats.kstest(lam, stats.beta(10.0, 10.0).cdf).pvalue > 1e-3
    partners = ours["partner"][mixed]
    assert stats.chisquare(np.bincount(partners // (n // 10), minlength=10)).pvalue > 1e-3
    none = _augment_draws(
        200,
        AugmentSpec(
            mixup=0.0, mixup_alpha=10.0, freqm=0, timem=0, num_mel_bins=128, target_length=1024
        ),
    )
    assert np.all(none["partner"] == -1) and not none["freq"].any() and not none["time"].any()


def test_too_few_samples_for_one_step_is_an_error():
    with pytest.raises(ValueError, match="micro_batch"):
        _sampler(world=4, micro_batch=4)


def test_a_views_augmentation_is_fixed_by_view_seed_sample_and_view():
    """data.views: each draw of a sample picks one of its V views; a view is augmented the
    same way in every epoch and at every position (what a teacher cache stores)."""
    views = 3
    seen: dict[tuple[int, int], tuple] = {}
    picked = []
    for epoch in range(6):
        for rank in range(2):
            sampler = _sampler(rank=rank, views=views)
            for plan in sampler.plans(epoch):
                assert plan.view is not None and plan.view.min() >= 0 and plan.view.max() < views
                picked.extend(plan.view.tolist())
                for i, v in zip(plan.index, plan.view, strict=True):
                    row = sampler.view_plan(np.array([i]), np.array([v]))
                    got = tuple(
                        getattr(plan, f)[plan.index.tolist().index(i)].tolist()
                        for f in ("partner", "lam", "freq_mask", "time_mask")
                    )
                    want = tuple(
                        getattr(row, f)[0].tolist()
                        for f in ("partner", "lam", "freq_mask", "time_mask")
                    )
                    assert got == want
                    assert seen.setdefault((int(i), int(v)), got) == got
    assert set(picked) == set(range(views))
    # different views of one sample are different augmentations
    sampler = _sampler(views=views)
    rows = sampler.view_plan(np.zeros(views, dtype=np.int64), np.arange(views))
    assert len({tuple(m) for m in rows.time_mask.tolist()}) == views
    # another view seed, other augmentations; another run seed, the same views
    zeros, each = np.zeros(views, dtype=np.int64), np.arange(views)
    other = _sampler(views=views, view_seed=8).view_plan(zeros, each)
    assert rows.time_mask.tolist() != other.time_mask.tolist()
    same = _sampler(views=views, seed=8).view_plan(zeros, each)
    assert rows.time_mask.tolist() == same.time_mask.tolist()
    with pytest.raises(IndexError, match="views must lie"):
        sampler.view_plan(np.array([0]), np.array([views]))
    assert _sampler().plan(0, 0).view is None  # no views: drawn per epoch position, as before
