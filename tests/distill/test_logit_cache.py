"""The teacher cache's values: full fp16 logits, top-K with the mean of the rest, its files."""

from __future__ import annotations

import numpy as np
import pytest

from cmkd_scale.distill.logit_cache import (
    CacheKey,
    decode,
    encode,
    part_dtype,
    part_is_complete,
    write_atomically,
)


def test_full_logits_round_trip_at_fp16_precision():
    logits = np.random.default_rng(0).normal(0, 4, size=(5, 3, 527)).astype(np.float32)
    rows = encode(logits, top_k=0)
    assert rows.dtype == part_dtype(527, 0).base and rows.shape == (5, 3, 527)
    np.testing.assert_allclose(decode(rows, 527, 0), logits, rtol=1e-3, atol=1e-3)


def test_top_k_keeps_the_largest_and_fills_the_rest_with_their_mean():
    rng = np.random.default_rng(1)
    logits = rng.normal(-5, 2, size=(4, 2, 50)).astype(np.float32)
    rows = encode(logits, top_k=5)
    assert rows.shape == (4, 2) and rows.dtype == part_dtype(50, 5)
    back = decode(rows, 50, 5)
    flat, got = logits.reshape(-1, 50), back.reshape(-1, 50)
    for want, have in zip(flat, got, strict=True):
        top = np.argsort(-want)[:5]
        np.testing.assert_allclose(have[top], want[top], rtol=1e-3, atol=1e-3)
        rest = np.setdiff1d(np.arange(50), top)
        np.testing.assert_allclose(have[rest], want[rest].mean(), rtol=1e-3, atol=1e-3)
        assert have[rest].max() <= want[top].min() + 1e-2  # every filled class below the K-th
        assert have.sum() == pytest.approx(want.sum(), rel=1e-3, abs=0.05)
    with pytest.raises(ValueError, match="below the 50 classes"):
        encode(logits, top_k=50)


def test_parts_are_written_whole_or_not_at_all(tmp_path):
    dtype = part_dtype(10, 3)
    path = tmp_path / "part-000000-v000-002.npy"
    assert not part_is_complete(path, 4, 2, dtype)
    path.write_bytes(b"\x93NUMPY truncated")  # what a torn write would leave
    assert not part_is_complete(path, 4, 2, dtype)
    write_atomically(path, encode(np.zeros((4, 2, 10), np.float32), 3))
    assert part_is_complete(path, 4, 2, dtype)
    assert not part_is_complete(path, 5, 2, dtype)  # another shard size: not this part
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_key_names_every_field_that_differs():
    key = CacheKey("s", "t", {"target_length": 1024}, {"mixup": 0.5}, view_seed=0, views=4)
    other = CacheKey("s", "t", {"target_length": 998}, {"mixup": 0.5}, view_seed=1, views=4)
    assert key.mismatches(key) == []
    assert key.mismatches(other) == [
        "features: cache {'target_length': 1024}, this run {'target_length': 998}",
        "view_seed: cache 0, this run 1",
    ]


def test_full_logit_parts_are_recognised_complete(tmp_path):
    path = tmp_path / "part-000001-v000-003.npy"
    write_atomically(path, encode(np.ones((6, 3, 7), np.float32), 0))
    assert part_is_complete(path, 6, 3, part_dtype(7, 0))
    assert not part_is_complete(path, 6, 3, part_dtype(8, 0))
