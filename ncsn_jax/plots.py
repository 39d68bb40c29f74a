"""PNG image grids of samples and plots of the sampler's per-step record.

Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so
importing this module changes no global matplotlib state and needs no display. Files are written
atomically by `ncsn_jax.fileio`.
"""

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ncsn_jax.fileio import atomic_write_bytes

GRID_PADDING = 2

# Panels of `plot_record`: title and the record keys drawn in it, all on a log y axis.
RECORD_PANELS = (
    ('norms per step', ('grad_norms', 'e_int_norms', 'e_diff_norms', 'PID_term_norms',
                        'noise_term_norms', 'delta_term_norms', 'image_norms')),
    ('P, I and D term norms', ('P_term_norms', 'I_term_norms', 'D_term_norms')),
    ('I/P and D/P ratios and SNR', ('IP_ratios', 'DP_ratios', 'snrs')),
)

MAX_LEVEL_LINES = 50


def make_image_grid(images, nrow: int = 8) -> np.ndarray:
    """Return the images tiled into one uint8 array of shape (height, width, C).

    `images` is (N, H, W, C) with C 1 or 3 and values in [0, 1]. The layout is that of
    torchvision's `make_grid` with padding 2 and pad value 0: min(nrow, N) columns,
    ceil(N / columns) rows, 2 black pixels between tiles and around the border. Values are
    clipped to [0, 1] and NaN becomes 0 before the conversion x -> floor(255 x + 0.5),
    which is what torchvision's `save_image` computes.
    """
    images = np.asarray(images, dtype=np.float64)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'images must have shape (N, H, W, C) with C 1 or 3, got {images.shape}')
    if images.shape[0] == 0:
        raise ValueError(f'images must contain at least one image, got shape {images.shape}')
    if nrow < 1:
        raise ValueError(f'nrow must be >= 1, got {nrow}')

    count, height, width, channels = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_height = height + GRID_PADDING
    cell_width = width + GRID_PADDING

    pixels = np.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
    pixels = np.floor(np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    grid = np.zeros((rows * cell_height + GRID_PADDING, columns * cell_width + GRID_PADDING, channels),
                    dtype=np.uint8)
    for index in range(count):
        row, column = divmod(index, columns)
        top = row * cell_height + GRID_PADDING
        left = column * cell_width + GRID_PADDING
        grid[top:top + height, left:left + width] = pixels[index]
    return grid


def save_image_grid(path, images, nrow: int = 8, *, overwrite: bool = False) -> Path:
    """Write the images as one PNG grid (see `make_image_grid`) and return the path.

    Single-channel images are saved as an 8-bit grayscale PNG (mode 'L'), three-channel images as
    RGB. Raises FileExistsError when `path` exists and `overwrite` is false.
    """
    grid = make_image_grid(images, nrow)
    if grid.shape[-1] == 1:
        picture = Image.fromarray(grid[..., 0], mode='L')
    else:
        picture = Image.fromarray(grid, mode='RGB')

    buffer = io.BytesIO()
    picture.save(buffer, format='PNG')
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def _positive_or_nan(values: np.ndarray) -> np.ndarray:
    """Replace values that a log axis cannot show (<= 0, NaN, infinite) by NaN, leaving gaps."""
    values = values.astype(np.float64, copy=True)
    values[~np.isfinite(values) | (values <= 0)] = np.nan
    return values


def _level_stride(level_count: int) -> int:
    """Return k such that marking every k-th level boundary draws at most MAX_LEVEL_LINES lines."""
    return max(1, math.ceil(level_count / MAX_LEVEL_LINES))


def _level_starts(step_count: int, n_steps_each: int) -> range:
    """Return the global steps at which the marked noise levels begin.

    Every level except the first is marked, or every k-th level as `_level_stride` chooses.
    """
    stride = _level_stride(math.ceil(step_count / n_steps_each))
    return range(stride * n_steps_each, step_count, stride * n_steps_each)


def _record_series(record, key) -> np.ndarray | None:
    if key not in record:
        return None
    values = np.asarray(record[key], dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f'record[{key!r}] must be 1-D with one value per global step, got shape {values.shape}')
    return values


def plot_record(path, record, n_steps_each: int, *, overwrite: bool = False) -> Path:
    """Write a PNG of the sampler record, one panel per group of quantities, and return the path.

    `record` maps names (grad_norms, P_term_norms, snrs, ...) to 1-D arrays with one value per
    global step. Missing names are skipped, and names outside RECORD_PANELS (such as 'snapshots')
    are ignored. Every panel has a log y axis, on which values <= 0 or non-finite are left out.
    A series with no positive value is listed in the legend as such. Thin vertical lines mark
    where noise levels begin, every `n_steps_each` steps (a subset when there are more than
    MAX_LEVEL_LINES levels). Raises FileExistsError when `path` exists and `overwrite` is false.
    """
    if isinstance(n_steps_each, bool) or not isinstance(n_steps_each, (int, np.integer)) or n_steps_each < 1:
        raise ValueError(f'n_steps_each must be a positive integer, got {n_steps_each!r}')
    if Path(path).exists() and not overwrite:
        # Checked before drawing, the slow part. atomic_write_bytes checks again when writing.
        raise FileExistsError(str(path))

    series = {}
    for _, keys in RECORD_PANELS:
        for key in keys:
            values = _record_series(record, key)
            if values is not None:
                series[key] = values
    step_count = max((len(values) for values in series.values()), default=0)

    figure = Figure(figsize=(10, 10), constrained_layout=True)
    FigureCanvasAgg(figure)
    axes_list = figure.subplots(len(RECORD_PANELS), 1, sharex=True)
    level_count = math.ceil(step_count / n_steps_each)
    stride = _level_stride(level_count)
    lines = 'start of each level' if stride == 1 else f'start of every {stride} levels'
    figure.suptitle(f'sampler record: {step_count} steps, {level_count} noise levels x {n_steps_each} steps '
                    f'(vertical lines: {lines})')

    for axes, (title, keys) in zip(axes_list, RECORD_PANELS):
        _draw_panel(axes, title, keys, series)
        for start in _level_starts(step_count, n_steps_each):
            axes.axvline(start, color='0.6', linewidth=0.5, zorder=0)
    if step_count > 0:
        axes_list[-1].set_xlim(0, max(step_count - 1, 1))

    buffer = io.BytesIO()
    figure.savefig(buffer, format='png', dpi=100)
    return atomic_write_bytes(path, buffer.getvalue(), overwrite=overwrite)


def _draw_panel(axes, title, keys, series):
    axes.set_title(title)
    axes.set_xlabel('global step')
    axes.set_yscale('log')

    labelled = False
    for key in keys:
        if key not in series:
            continue
        values = _positive_or_nan(series[key])
        steps = np.arange(len(values))
        if np.isnan(values).all():
            # An empty line still gets a legend entry, so the reader sees that the series exists.
            axes.plot([], [], label=f'{key} (no positive values)')
        else:
            axes.plot(steps, values, linewidth=0.8, label=key)
        labelled = True
    if labelled:
        axes.legend(loc='best', fontsize='small')
    else:
        axes.text(0.5, 0.5, 'no data', transform=axes.transAxes, ha='center', va='center')
