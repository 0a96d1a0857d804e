"""The tile-size rule of the fused ops' one walk (``jbce/_linear/walk.py``); the walk itself is
checked through the three ops' tests (``test_linear*.py``)."""

from __future__ import annotations

import pytest

from jbce._linear import walk


def test_defaults_per_op_pass_and_platform():
    # Cross-entropy and log-probabilities: 2048 columns, a token chunk keeping 2**23 logits.
    for op in ("cross_entropy", "log_probs"):
        t = walk.tile_sizes(8192, 32768, None, op)
        assert t.forward == t.backward == ((4096, 2048), (4096, 2048))
    # Distillation: whole rows forward; backward 2048 columns on CPU, 8192 elsewhere, with
    # 2**23 logits a tile on CPU and 2**25 elsewhere.
    t = walk.tile_sizes(8192, 32768, None, "distillation")
    assert t.forward == ((256, 32768), (1024, 32768))
    assert t.backward == ((4096, 2048), (4096, 8192))


def test_chunk_size_sets_both_passes_and_is_clipped():
    t = walk.tile_sizes(100, 50, 16, "distillation")  # an int: the vocabulary chunk
    assert t.forward == t.backward == ((100, 16), (100, 16))
    t = walk.tile_sizes(100, 50, (7, 1000), "cross_entropy")  # a pair, clipped to V
    assert t.forward == t.backward == ((7, 50), (7, 50))
    t = walk.tile_sizes(3, 5, (0, 0), "log_probs")  # at least one token and one class
    assert t.forward == ((1, 1), (1, 1))


@pytest.mark.parametrize(("n", "v", "size"), [(37, 50, 16), (5, 7, 3), (4, 8, 8)])
def test_chunks_cover_the_axis_once_with_an_overlapping_last_chunk(n, v, size):
    count = walk.num_chunks(v, size)
    starts = [int(walk.chunk_start(j, size, v)) for j in range(count)]
    assert starts[-1] == v - size and all(0 <= s <= v - size for s in starts)
    covered = set()
    for j, s in enumerate(starts):
        fresh = walk._fresh(j, s, size, v)
        cols = range(s, s + size) if fresh is None else [s + k for k in range(size) if fresh[0, k]]
        assert covered.isdisjoint(cols)
        covered |= set(cols)
    assert covered == set(range(v))
