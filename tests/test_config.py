"""The typed config: unknown and replaced keys are refused with the key and the fix."""

from __future__ import annotations

import pytest

from cmkd_scale.config import ConfigError, from_dict


def test_unknown_key_names_the_key_and_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'data\.shufle_shards'.*shuffle"):
        from_dict({"data": {"shufle_shards": 4}})


def test_replaced_key_names_its_successor() -> None:
    with pytest.raises(ConfigError, match=r"'data\.shuffle_buffer' is gone: use data\.shuffle_sh"):
        from_dict({"data": {"shuffle_buffer": 1000}})


def test_shuffle_shards_defaults_to_a_group_and_refuses_negatives() -> None:
    assert from_dict({}).data.shuffle_shards == 16
    with pytest.raises(ConfigError, match=r"data\.shuffle_shards"):
        from_dict({"data": {"shuffle_shards": -1}})
