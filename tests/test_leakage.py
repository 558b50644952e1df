"""RETRO's filtered bits per byte (§2.6): overlap ratios against a brute-force reference, and
bpb(alpha) against the plain bits per byte and hand sums."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from burrow.eval.leakage import (
    ALPHAS,
    filtered_bits_per_byte,
    longest_common_substring,
    overlap_ratios,
    plot_filtered,
)


def brute_force(chunk: list[int], neighbours: list[list[int]]) -> int:
    """Every substring of the chunk, longest first, looked for in every neighbour."""
    for length in range(len(chunk), 0, -1):
        for start in range(len(chunk) - length + 1):
            piece = chunk[start:start + length]
            for row in neighbours:
                if any(row[p:p + length] == piece for p in range(len(row) - length + 1)):
                    return length
    return 0


TOKENS = st.lists(st.integers(0, 3), min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(TOKENS, st.lists(st.lists(st.integers(0, 3), min_size=16, max_size=16), min_size=1,
                        max_size=3))
def test_longest_common_substring_matches_brute_force(chunk, neighbours):
    assert longest_common_substring(np.array(chunk), np.array(neighbours)) == brute_force(
        chunk, neighbours)


def test_a_chunk_found_whole_in_a_neighbour_has_ratio_one():
    rng = np.random.default_rng(0)
    chunks = rng.integers(100, 200, size=(3, 64))
    neighbours = rng.integers(200, 300, size=(3, 2, 128))
    neighbours[0, 1, 10:74] = chunks[0]          # copied whole
    neighbours[1, 0, 50:58] = chunks[1, 20:28]   # 8 tokens: 12.5% of the chunk
    ratios = overlap_ratios(chunks, neighbours)
    assert ratios.tolist() == [1.0, 8 / 64, 0.0]


def test_filtered_bits_per_byte_keeps_the_chunks_at_or_below_alpha():
    nats = np.array([10.0, 20.0, 30.0, 40.0])
    num_bytes = np.array([8, 16, 24, 32])
    ratios = np.array([0.0, 0.125, 0.5, 1.0])
    result = filtered_bits_per_byte(nats, num_bytes, ratios)
    assert list(result) == ["0", "0.125", "0.25", "0.5", "1"]
    assert [entry["chunks"] for entry in result.values()] == [1, 2, 2, 3, 4]
    assert result["1"]["bits_per_byte"] == pytest.approx(100 / math.log(2) / 80)
    assert result["0.125"]["bits_per_byte"] == pytest.approx(30 / math.log(2) / 24)
    none = filtered_bits_per_byte(nats, num_bytes, np.full(4, 0.9), alphas=[0.5])
    assert none["0.5"] == {"bits_per_byte": None, "chunks": 0}
    with pytest.raises(ValueError, match="one entry per chunk"):
        filtered_bits_per_byte(nats, num_bytes[:3], ratios)


def test_the_plot_is_a_png(tmp_path):
    curve = filtered_bits_per_byte(np.ones(4), np.ones(4), np.array([0, 0.1, 0.3, 1.0]))
    path = plot_filtered({"retro": curve, "dense": curve}, tmp_path / "bpb.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ALPHAS[0] == 0.0 and ALPHAS[-1] == 1.0
