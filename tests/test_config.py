import dataclasses

import pytest

from packkv import PackKVConfig


def test_defaults_are_valid_and_frozen():
    config = PackKVConfig()
    assert config.block_size % config.pack_size == 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k_rel = 0.5  # type: ignore[misc]


def test_round_trip_dict():
    config = PackKVConfig(k_rel=0.05, repack="median", min_bits=0)
    assert PackKVConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "field, value",
    [
        ("block_size", 48),
        ("block_size", 0),
        ("block_size", 2048),
        ("block_size", 64.0),
        ("buffer_size", -1),
        ("pack_size", 16),
        ("k_rel", 0.0),
        ("k_rel", 1.5),
        ("v_rel", float("nan")),
        ("v_rel", "0.1"),
        ("k_grouping", "head"),
        ("v_grouping", None),
        ("repack", "random"),
        ("min_bits", 2),
        ("min_bits", True),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        PackKVConfig(**{field: value})


def test_unknown_field_in_dict():
    with pytest.raises(ValueError, match="bogus"):
        PackKVConfig.from_dict({"bogus": 1})
