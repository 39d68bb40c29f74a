"""The fid_stats command line on image folders and .npz files written by the tests."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncsn_jax.errors import UserError
from ncsn_jax.fid import compute_statistics, load_inception, load_stats
from ncsn_jax.image_io import iter_image_batches, open_image_source

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / 'tests' / 'data'
BATCH_SIZE = 3


@pytest.fixture(scope='module')
def network(inception_weights):
    return load_inception(inception_weights[1], batch_size=BATCH_SIZE)


def run_fid_stats(*args):
    return subprocess.run([sys.executable, '-m', 'ncsn_jax.fid_stats', *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def random_pixels(rng, height, width, channels):
    return rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)


def write_mixed_folder(root: Path, rng, sizes) -> list[Path]:
    """Write RGB, grayscale, RGBA and palette PNGs and a JPEG in nested folders; return the paths.

    Each file is listed in the order of the sizes given.
    """
    (root / 'a' / 'b').mkdir(parents=True)
    files = []
    for index, (height, width) in enumerate(sizes):
        kind = index % 5
        if kind == 0:
            image, name = Image.fromarray(random_pixels(rng, height, width, 3), 'RGB'), 'rgb.png'
        elif kind == 1:
            image, name = Image.fromarray(random_pixels(rng, height, width, 1)[:, :, 0], 'L'), \
                'a/gray.png'
        elif kind == 2:
            image, name = Image.fromarray(random_pixels(rng, height, width, 4), 'RGBA'), \
                'a/b/rgba.png'
        elif kind == 3:
            image, name = Image.fromarray(random_pixels(rng, height, width, 3), 'RGB'), \
                'a/b/photo.JPG'
        else:
            image = Image.fromarray(random_pixels(rng, height, width, 3), 'RGB').convert('P')
            name = 'a/palette.png'
        path = root / name.replace('.', f'_{index}.', 1)
        image.save(path)
        files.append(path)
    (root / 'notes.txt').write_text('not an image and not an image extension')
    return files


def read_as_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert('RGB'), dtype=np.float32) / 255.0


def assert_stats_close(path, mu, sigma):
    loaded_mu, loaded_sigma = load_stats(path)
    np.testing.assert_allclose(loaded_mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(loaded_sigma, sigma, rtol=1e-5, atol=1e-6)


def test_folder_reader_order_and_modes(tmp_path):
    rng = np.random.default_rng(4)
    files = write_mixed_folder(tmp_path, rng, [(8, 6)] * 5)
    gray16 = np.array([[0, 65535, 257], [1000, 30000, 65534]], np.uint16)
    Image.fromarray(gray16).resize((6, 8), Image.NEAREST).save(tmp_path / 'a' / 'gray16.png')
    sixteen_bit = tmp_path / 'a' / 'gray16.png'
    with Image.open(sixteen_bit) as image:
        assert image.mode == 'I;16'
        expected_gray16 = np.asarray(image, np.float32) / 65535.0

    batches = list(iter_image_batches(tmp_path, batch_size=4))

    assert [batch.shape for batch in batches] == [(4, 8, 6, 3), (2, 8, 6, 3)]
    images = np.concatenate(batches)
    assert images.dtype == np.float32
    ordered = sorted([*files, sixteen_bit], key=lambda path: path.relative_to(tmp_path).as_posix())
    for image, path in zip(images, ordered):
        if path == sixteen_bit:
            np.testing.assert_allclose(image, np.repeat(expected_gray16[:, :, None], 3, axis=2),
                                       rtol=1e-6)
        else:
            np.testing.assert_array_equal(image, read_as_rgb(path), err_msg=str(path))


def test_folder_reader_mixed_sizes(tmp_path):
    rng = np.random.default_rng(5)
    write_mixed_folder(tmp_path, rng, [(8, 8), (12, 10)])
    source = open_image_source(tmp_path)

    assert source.image_shape is None
    with pytest.raises(UserError, match='have different sizes') as error:
        next(source.batches(2))
    assert 'is 10x12' in str(error.value)

    resized = next(source.batches(2, size=16))
    assert resized.shape == (2, 16, 16, 3)
    assert resized.min() >= 0.0
    assert resized.max() <= 1.0


def test_npz_reader_checks_dtype(tmp_path):
    np.savez(tmp_path / 'int16.npz', images=np.zeros((2, 8, 8, 3), np.int16))
    np.savez(tmp_path / 'nan.npz', images=np.full((2, 8, 8, 1), np.nan, np.float32))

    with pytest.raises(UserError, match='dtype int16'):
        open_image_source(tmp_path / 'int16.npz')
    with pytest.raises(UserError, match='NaN or infinite'):
        open_image_source(tmp_path / 'nan.npz')
    with pytest.raises(UserError, match='image folder or .npz file not found'):
        open_image_source(tmp_path / 'absent.npz')


def test_folder_matches_direct_features(tmp_path, inception_weights, network):
    rng = np.random.default_rng(0)
    files = write_mixed_folder(tmp_path / 'images', rng, [(32, 32)] * 5)
    out = tmp_path / 'stats.npz'

    result = run_fid_stats(tmp_path / 'images', '--out', out, '--inception',
                           inception_weights[1], '--batch-size', BATCH_SIZE)

    assert result.returncode == 0, result.stderr
    assert 'wrote FID statistics of 5 images' in result.stderr
    pool, _ = network(np.stack([read_as_rgb(path) for path in files]))
    assert_stats_close(out, *compute_statistics(pool))


def test_folder_of_mixed_sizes(tmp_path, inception_weights, network):
    rng = np.random.default_rng(1)
    files = write_mixed_folder(tmp_path / 'images', rng, [(32, 32), (40, 36), (32, 32)])
    out = tmp_path / 'stats.npz'

    result = run_fid_stats(tmp_path / 'images', '--out', out, '--inception',
                           inception_weights[1], '--batch-size', BATCH_SIZE)

    assert result.returncode == 0, result.stderr
    assert 'different sizes' in result.stderr
    # Each image on its own, resized by the network itself.
    pool = np.concatenate([network(read_as_rgb(path)[None])[0] for path in files])
    assert_stats_close(out, *compute_statistics(pool))


def test_npz_uint8_and_float(tmp_path, inception_weights, network):
    rng = np.random.default_rng(2)
    images_uint8 = rng.integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
    images_float = images_uint8.astype(np.float32) / 255.0
    np.savez(tmp_path / 'uint8.npz', images=images_uint8)
    np.savez(tmp_path / 'float.npz', images=images_float.astype(np.float64))

    for name in ('uint8', 'float'):
        result = run_fid_stats(tmp_path / f'{name}.npz', '--out', tmp_path / f'{name}_stats.npz',
                               '--inception', inception_weights[1], '--batch-size', BATCH_SIZE)
        assert result.returncode == 0, f'{name}: {result.stderr}'
        assert 'wrote FID statistics of 4 images' in result.stderr

    mu, sigma = compute_statistics(network(images_float)[0])
    assert_stats_close(tmp_path / 'uint8_stats.npz', mu, sigma)
    assert_stats_close(tmp_path / 'float_stats.npz', mu, sigma)


def test_force_replaces_existing_output(tmp_path, inception_weights):
    rng = np.random.default_rng(3)
    np.savez(tmp_path / 'images.npz', images=rng.integers(0, 256, (2, 16, 16, 1), np.uint8))
    out = tmp_path / 'stats.npz'
    out.write_bytes(b'old')

    result = run_fid_stats(tmp_path / 'images.npz', '--out', out, '--inception',
                           inception_weights[1], '--batch-size', 2, '--force')

    assert result.returncode == 0, result.stderr
    mu, sigma = load_stats(out)
    assert mu.shape == (2048,)
    assert sigma.shape == (2048, 2048)


def make_empty_folder(tmp_path):
    (tmp_path / 'input' / 'sub').mkdir(parents=True)
    (tmp_path / 'input' / 'readme.txt').write_text('no images here')
    return tmp_path / 'input'


def make_fake_png(tmp_path):
    folder = tmp_path / 'input'
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / 'good.png')
    (folder / 'broken.png').write_bytes(b'this is text, not a PNG')
    return folder


def make_npz_without_images(tmp_path):
    np.savez(tmp_path / 'input.npz', samples=np.zeros((2, 8, 8, 3), np.uint8))
    return tmp_path / 'input.npz'


def make_npz_out_of_range(tmp_path):
    np.savez(tmp_path / 'input.npz', images=np.full((2, 8, 8, 3), 255.0, np.float32))
    return tmp_path / 'input.npz'


def make_npz_nchw(tmp_path):
    np.savez(tmp_path / 'input.npz', images=np.zeros((2, 3, 8, 8), np.uint8))
    return tmp_path / 'input.npz'


@pytest.mark.parametrize('make_input,expected', [
    (make_empty_folder, 'no images found in'),
    (make_fake_png, 'cannot read image'),
    (make_npz_without_images, 'has no array named images (it has samples)'),
    (make_npz_out_of_range, 'must lie in [0, 1], found values in [255, 255]'),
    (make_npz_nchw, 'It looks like NCHW'),
])
def test_bad_input_fails_cleanly(tmp_path, inception_weights, make_input, expected):
    source = make_input(tmp_path)
    out = tmp_path / 'out' / 'stats.npz'

    result = run_fid_stats(source, '--out', out, '--inception', inception_weights[1])

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists()


def test_fake_png_is_named(tmp_path, inception_weights):
    folder = make_fake_png(tmp_path)

    result = run_fid_stats(folder, '--out', tmp_path / 'stats.npz', '--inception',
                           inception_weights[1])

    assert result.returncode == 2
    assert str(folder / 'broken.png') in result.stderr


def test_existing_output_needs_force(tmp_path, inception_weights):
    np.savez(tmp_path / 'images.npz', images=np.zeros((2, 8, 8, 3), np.uint8))
    out = tmp_path / 'stats.npz'
    out.write_bytes(b'keep me')

    result = run_fid_stats(tmp_path / 'images.npz', '--out', out, '--inception',
                           inception_weights[1])

    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f'ERROR: {out} already exists; pass --force to '
                                                  'replace it']
    assert out.read_bytes() == b'keep me'
    assert sorted(path.name for path in tmp_path.iterdir()) == ['images.npz', 'stats.npz']


def test_missing_inception_file(tmp_path):
    np.savez(tmp_path / 'images.npz', images=np.zeros((2, 8, 8, 3), np.uint8))
    out = tmp_path / 'stats.npz'

    result = run_fid_stats(tmp_path / 'images.npz', '--out', out, '--inception',
                           tmp_path / 'absent.msgpack')

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'converted parameter file not found' in lines[0]
    assert not out.exists()
