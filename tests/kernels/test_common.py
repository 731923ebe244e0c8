"""The split heuristic and the count of resident programs (kernels/_common.py)."""

from types import SimpleNamespace

import pytest
import torch

from packkv.kernels._common import resident_programs, tile_splits

CPU = torch.device("cpu")  # the heuristic counts 4 multiprocessors off CUDA


@pytest.mark.parametrize("work_items", [1, 3, 8, 64])
@pytest.mark.parametrize("n_words", [1, 7, 64, 1000])
@pytest.mark.parametrize("programs_per_sm", [1, 2, 4, 8])
def test_splits_fill_at_most_one_wave_and_cover_every_tile(work_items, n_words, programs_per_sm):
    tile_words = 2
    per_split, splits = tile_splits(work_items, n_words, tile_words, CPU, None, programs_per_sm)
    n_tiles = -(-n_words // tile_words)
    assert splits >= 1 and per_split >= 1
    assert (splits - 1) * per_split < n_tiles <= splits * per_split  # every tile, no empty split
    slots = programs_per_sm * 4
    # Rounded down: the programs fit in one wave (one split each when there are more pairs).
    assert work_items * splits <= max(slots, work_items)
    wanted = max(1, min(n_tiles, slots // work_items))
    assert per_split == -(-n_tiles // wanted)


def test_splits_round_down_to_a_wave():
    # 3 pairs on 4 multiprocessors x 2 programs: 2 splits (6 programs), not 3 (9: two waves).
    assert tile_splits(3, 64, 2, CPU, None, 2) == (16, 2)
    assert tile_splits(2, 64, 2, CPU, None, 2) == (8, 4)


def test_requested_splits_and_no_words():
    assert tile_splits(8, 64, 2, CPU, 5, 2) == (7, 5)  # 32 tiles in chunks of 7
    assert tile_splits(8, 64, 2, CPU, 100, 2) == (1, 32)  # at most one split a tile
    assert tile_splits(8, 0, 2, CPU, None, 2) == (1, 0)
    with pytest.raises(ValueError, match="n_splits"):
        tile_splits(8, 64, 2, CPU, 0, 2)


H100 = SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                       shared_memory_per_multiprocessor=233472)


def kernel(regs, warps, shared=0):
    return SimpleNamespace(n_regs=regs, metadata=SimpleNamespace(num_warps=warps, shared=shared))


def test_resident_programs_by_registers_threads_and_shared_memory():
    assert resident_programs(kernel(255, 4), H100) == 2  # the attention kernel at head_dim 128
    assert resident_programs(kernel(246, 2), H100) == 4  # and at 64 (246 -> 248 a thread)
    assert resident_programs(kernel(250, 2), H100) == 4  # 250 -> 256 a thread: 65536 / (256 * 64)
    assert resident_programs(kernel(32, 4), H100) == 16  # threads bound it: 2048 / 128
    assert resident_programs(kernel(32, 4, shared=100_000), H100) == 2  # shared memory bounds it
    assert resident_programs(kernel(255, 8), H100) == 1  # never below one
    # A properties object without the fields: 64K registers, 2048 threads, no shared bound.
    assert resident_programs(kernel(128, 4, shared=100_000), SimpleNamespace()) == 4
    # Under the interpreter a "kernel" has no register count.
    assert resident_programs(SimpleNamespace(), H100) is None


def test_programs_per_sm_prefers_the_override_then_the_count_then_the_default(monkeypatch):
    from packkv.kernels import _common

    key = ("attention", torch.device("cuda", 0), (("D", 128),), ())
    monkeypatch.setattr(_common, "_RESIDENT", {})
    assert _common.programs_per_sm(2, key) == 2
    _common.count_resident(key, kernel(64, 4), CPU)  # off CUDA nothing is counted
    assert _common.programs_per_sm(2, key) == 2
    _common._RESIDENT[key] = 3
    assert _common.programs_per_sm(2, key) == 3
    assert _common.programs_per_sm(2, ("qk",) + key[1:]) == 2  # another kernel
    monkeypatch.setattr(_common, "PROGRAMS_PER_SM", 16)
    assert _common.programs_per_sm(2, key) == 16
