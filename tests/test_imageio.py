"""`image_grid`: tiles in place, and column titles that stay inside their own column."""

from __future__ import annotations

import numpy as np
import pytest

from facereward.data.imageio import image_grid, layout_titles, wrap_title

TITLES = ["LQ", "base", "ReFL w/o dynamic FRM", "ReFL w/o reg. + structural", "GT"]


def _tiles(n_cols: int, size: int = 32, n_rows: int = 2) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(0)
    return [[rng.random((size, size, 3)).astype(np.float32) for _ in range(n_cols)] for _ in range(n_rows)]


def _header_height(grid: np.ndarray, tile: int, n_rows: int, pad: int) -> int:
    return grid.shape[0] - pad - n_rows * (tile + pad)


def _ink_columns(grid: np.ndarray, header: int) -> np.ndarray:
    """x positions with any non-white pixel in the header band."""
    return np.flatnonzero((grid[:header] < 1.0).any(axis=(0, 2)))


@pytest.mark.parametrize("tile, scale", [(32, 1), (32, 2), (64, 2)])
def test_every_title_stays_inside_its_own_column(tile, scale):
    pad, n_rows = 2, 2
    rows = _tiles(len(TITLES), tile, n_rows)
    w = tile * scale
    full = image_grid(rows, column_titles=TITLES, pad=pad, scale=scale)
    header = _header_height(full, w, n_rows, pad)
    assert header >= 14
    # the gaps between tiles stay white through the header band and the pad below it
    span = header + pad
    for c in range(len(TITLES) + 1):
        gap = slice(c * (w + pad), c * (w + pad) + pad)
        assert (full[:span, gap] == 1.0).all(), f"ink in the gap left of column {c}"
    # each title alone: all its ink within its own column's span, and some ink there
    for c, title in enumerate(TITLES):
        alone = image_grid(rows, column_titles=["" if k != c else title for k in range(len(TITLES))], pad=pad, scale=scale)
        ink = _ink_columns(alone, _header_height(alone, w, n_rows, pad))
        x0 = pad + c * (w + pad)
        assert ink.size, f"title {title!r} drew nothing"
        assert ink.min() >= x0 and ink.max() < x0 + w, f"{title!r} runs past its column [{x0}, {x0 + w})"


def test_short_titles_keep_the_one_line_header_and_tiles_sit_below_it():
    rows = _tiles(3, 64, 1)
    grid = image_grid(rows, column_titles=["LQ", "base", "GT"], pad=2, scale=1)
    assert _header_height(grid, 64, 1, 2) == 14
    assert np.array_equal(grid[16 : 16 + 64, 2 + 66 : 2 + 66 + 64], rows[0][1])
    plain = image_grid(rows, pad=2)
    assert plain.shape[0] == 2 + 64 + 2 and np.array_equal(plain[2:66, 2:66], rows[0][0])


def test_long_titles_wrap_onto_more_lines_and_lose_no_character():
    font_scale, lines = layout_titles(TITLES, 64)
    assert max(len(t) for t in lines) >= 2
    for title, title_lines in zip(TITLES, lines):
        assert "".join(title_lines).replace(" ", "") == title.replace(" ", "")
    one, two = (image_grid(_tiles(len(TITLES), 64, 1), column_titles=t, scale=1) for t in (["a"] * 5, TITLES))
    assert two.shape[0] > one.shape[0]


def test_a_word_wider_than_the_column_shrinks_then_splits():
    font_scale, _ = layout_titles(["structural"], 50)
    assert font_scale < 0.35  # shrunk so the word fits unbroken
    lines = wrap_title("supercalifragilistic", 20, 0.25)
    assert len(lines) > 1 and "".join(lines) == "supercalifragilistic"
    assert wrap_title("", 20, 0.35) == []
