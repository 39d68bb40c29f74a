"""Tests of ncsn_jax.plots: PNG grid layout and pixel values, and record plots."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncsn_jax.plots import MAX_LEVEL_LINES, _level_starts, make_image_grid, plot_record, save_image_grid

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT / 'tests' / 'data' / 'golden'

RECORD_KEYS = ('grad_norms', 'e_int_norms', 'e_diff_norms', 'P_term_norms', 'I_term_norms', 'D_term_norms',
               'IP_ratios', 'DP_ratios', 'PID_term_norms', 'noise_term_norms', 'delta_term_norms', 'snrs',
               'image_norms')


def distinct_images(count, size, channels):
    """Return images whose tile k is filled with the value (k + 1) / (count + 1) in every channel."""
    values = (np.arange(count) + 1.0) / (count + 1.0)
    return np.broadcast_to(values[:, None, None, None], (count, size, size, channels)).copy()


def expected_byte(value):
    return int(np.floor(value * 255.0 + 0.5))


def open_png(path):
    with Image.open(path) as image:
        image.load()
    assert image.format == 'PNG'
    return image


# ---------------------------------------------------------------------------------------------
# Image grids


def test_grid_size_ten_images_nrow_four(tmp_path):
    path = save_image_grid(tmp_path / 'grid.png', distinct_images(10, 32, 3), nrow=4)

    image = open_png(path)

    # 4 columns and 3 rows of 32 px tiles with 2 px padding around and between them.
    assert image.size == (4 * 34 + 2, 3 * 34 + 2)
    assert image.mode == 'RGB'


def test_grid_tile_corner_pixels(tmp_path):
    images = distinct_images(10, 32, 3)
    image = np.asarray(open_png(save_image_grid(tmp_path / 'grid.png', images, nrow=4)))

    # Tile 5 is in row 1, column 1, so its top-left pixel is at (2 + 34, 2 + 34).
    assert tuple(image[36, 36]) == (expected_byte(images[5, 0, 0, 0]),) * 3
    assert tuple(image[36 + 31, 36 + 31]) == (expected_byte(images[5, 0, 0, 0]),) * 3
    assert tuple(image[2, 2]) == (expected_byte(images[0, 0, 0, 0]),) * 3
    # Padding is black: the row above tile 5 and the border.
    assert tuple(image[35, 36]) == (0, 0, 0)
    assert tuple(image[0, 0]) == (0, 0, 0)
    # Tiles 10 and 11 of the last row do not exist and stay black.
    assert tuple(image[2 + 2 * 34, 2 + 3 * 34]) == (0, 0, 0)


def test_grid_single_channel_grayscale(tmp_path):
    images = distinct_images(3, 8, 1)

    image = open_png(save_image_grid(tmp_path / 'gray.png', images, nrow=8))

    assert image.mode == 'L'
    assert image.size == (3 * 10 + 2, 1 * 10 + 2)
    assert image.getpixel((2 + 10, 2)) == expected_byte(images[1, 0, 0, 0])


def test_grid_channel_order_kept(tmp_path):
    images = np.zeros((1, 4, 4, 3))
    images[..., 0] = 1.0
    images[..., 2] = 0.5

    image = open_png(save_image_grid(tmp_path / 'red.png', images))

    assert image.getpixel((2, 2)) == (255, 0, 128)


def test_grid_clips_and_replaces_nan():
    images = np.array([-0.5, 1.5, np.nan, 0.25]).reshape(4, 1, 1, 1)

    grid = make_image_grid(images, nrow=4)

    assert grid.dtype == np.uint8
    assert [int(grid[2, 2 + 3 * k, 0]) for k in range(4)] == [0, 255, 0, 64]


def test_grid_rejects_bad_shapes():
    with pytest.raises(ValueError, match='C 1 or 3'):
        make_image_grid(np.zeros((2, 4, 4, 2)))
    with pytest.raises(ValueError, match='C 1 or 3'):
        make_image_grid(np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match='at least one image'):
        make_image_grid(np.zeros((0, 4, 4, 3)))
    with pytest.raises(ValueError, match='nrow'):
        make_image_grid(np.zeros((1, 4, 4, 3)), nrow=0)


def test_grid_refuses_overwrite(tmp_path):
    path = save_image_grid(tmp_path / 'grid.png', distinct_images(2, 4, 3))
    before = path.read_bytes()

    with pytest.raises(FileExistsError):
        save_image_grid(path, distinct_images(5, 4, 3))

    assert path.read_bytes() == before
    save_image_grid(path, distinct_images(5, 4, 3), overwrite=True)
    assert open_png(path).size == (5 * 6 + 2, 6 + 2)


# ---------------------------------------------------------------------------------------------
# Record plots


def synthetic_record(levels, n_steps_each):
    steps = levels * n_steps_each
    rng = np.random.default_rng(0)
    record = {key: rng.uniform(0.1, 10.0, steps) for key in RECORD_KEYS}
    record['I_term_norms'] = np.zeros(steps)
    record['IP_ratios'] = np.zeros(steps)
    record['D_term_norms'][:3] = [0.0, -1.0, np.nan]
    record['snrs'][-1] = np.inf
    record['snapshots'] = np.zeros((2, 3, 4, 4, 3))
    del record['e_diff_norms']
    return record


def test_plot_record_writes_png(tmp_path):
    path = plot_record(tmp_path / 'record.png', synthetic_record(levels=6, n_steps_each=5), n_steps_each=5)

    image = open_png(path)

    assert image.size == (1000, 1000)


def test_plot_record_official_record(tmp_path):
    golden = np.load(GOLDEN_DIR / 'pid_ald_digits.npz')
    record = {key: golden[f'record_{key}'] for key in RECORD_KEYS}

    path = plot_record(tmp_path / 'record.png', record, n_steps_each=2)

    assert open_png(path).size == (1000, 1000)


def test_plot_record_empty_and_list_input(tmp_path):
    assert open_png(plot_record(tmp_path / 'empty.png', {}, n_steps_each=1)).format == 'PNG'
    record = {'grad_norms': [1.0, 2.0, 3.0], 'snrs': [0.0, 0.0, 0.0]}
    assert open_png(plot_record(tmp_path / 'lists.png', record, n_steps_each=3)).format == 'PNG'


def test_plot_record_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match='n_steps_each'):
        plot_record(tmp_path / 'bad.png', {'grad_norms': [1.0]}, n_steps_each=0)
    with pytest.raises(ValueError, match='1-D'):
        plot_record(tmp_path / 'bad.png', {'grad_norms': np.ones((2, 2))}, n_steps_each=1)
    assert not (tmp_path / 'bad.png').exists()


def test_plot_record_refuses_overwrite(tmp_path):
    path = plot_record(tmp_path / 'record.png', synthetic_record(2, 2), n_steps_each=2)

    with pytest.raises(FileExistsError):
        plot_record(path, synthetic_record(2, 2), n_steps_each=2)

    assert plot_record(path, synthetic_record(3, 2), n_steps_each=2, overwrite=True) == path


def test_level_lines_every_level_when_few():
    assert list(_level_starts(step_count=12, n_steps_each=3)) == [3, 6, 9]
    assert list(_level_starts(step_count=1, n_steps_each=1)) == []


def test_level_lines_subset_when_many():
    starts = list(_level_starts(step_count=2311 * 3, n_steps_each=3))

    assert 0 < len(starts) <= MAX_LEVEL_LINES
    assert all(start % 3 == 0 for start in starts)


def test_plot_record_many_levels(tmp_path):
    record = {'grad_norms': np.linspace(1.0, 100.0, 2311), 'snrs': np.full(2311, 0.5)}

    path = plot_record(tmp_path / 'long.png', record, n_steps_each=1)

    assert open_png(path).format == 'PNG'


def test_import_leaves_pyplot_unloaded():
    code = 'import sys, ncsn_jax.plots; print("matplotlib.pyplot" in sys.modules)'

    result = subprocess.run([sys.executable, '-c', code], cwd=REPO_ROOT, capture_output=True, text=True,
                            check=True)

    assert result.stdout.strip() == 'False'
