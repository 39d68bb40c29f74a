"""Tests of the training data: loaders, cropping and resizing, epoch order and augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ncsn_jax.config import DataConfig
from ncsn_jax.data import Augmentation, EpochOrder, crop_and_resize, load_dataset, load_digits
from ncsn_jax.errors import UserError


def data_config(**values):
    values = {'dataset': 'images', 'image_size': 16, 'channels': 3, **values}
    return DataConfig(**values)


def test_digits_shape_and_range():
    images = load_digits(32)
    assert images.shape == (1797, 32, 32, 1)
    assert images.dtype == np.float32
    assert images.min() == 0.0
    assert images.max() <= 1.0
    assert images.max() > 0.9


def test_digits_resize_is_bilinear_of_scaled_values():
    from sklearn.datasets import load_digits as sklearn_digits
    source = sklearn_digits().images[0].astype(np.float32) / 16.0
    ours = load_digits(8)[0, :, :, 0]
    np.testing.assert_array_equal(ours, source)
    upsampled = load_digits(16)[0, :, :, 0]
    # Half-pixel centres: output pixel 1 of 16 lies at source coordinate 0.25 between 0 and 1.
    np.testing.assert_allclose(upsampled[0, 1], 0.75 * source[0, 0] + 0.25 * source[0, 1],
                               rtol=1e-6)


def test_builtin_name_is_case_insensitive():
    dataset = load_dataset(data_config(dataset='Digits', channels=1, image_size=8))
    assert dataset.count == 1797
    assert dataset.batch([0, 5]).shape == (2, 8, 8, 1)


def test_unknown_dataset_without_path_rejected():
    with pytest.raises(UserError, match="data.dataset 'CIFAR10' is not built in"):
        load_dataset(data_config(dataset='CIFAR10'))


def test_crop_and_resize_uint8_matches_pillow():
    pixels = np.random.default_rng(0).integers(0, 256, (40, 20, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).crop((0, 10, 20, 30))
                          .resize((16, 16), Image.BILINEAR))
    result = crop_and_resize(pixels, 16)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, expected)


def test_crop_and_resize_float_keeps_float():
    image = np.random.default_rng(1).uniform(size=(10, 14, 1)).astype(np.float32)
    result = crop_and_resize(image, 5)
    assert result.shape == (5, 5, 1)
    assert result.dtype == np.float32
    assert result.min() >= 0.0
    assert result.max() <= 1.0
    np.testing.assert_array_equal(crop_and_resize(image, 10), image[:, 2:12])


def write_png(path, pixels):
    Image.fromarray(pixels).save(path)


def test_grayscale_folder_gives_one_channel(tmp_path):
    write_png(tmp_path / 'a.png', np.full((20, 20), 255, np.uint8))
    write_png(tmp_path / 'b.png', np.zeros((32, 24), np.uint8))
    dataset = load_dataset(data_config(channels=1), tmp_path)
    assert dataset.images.shape == (2, 16, 16, 1)
    assert dataset.images.dtype == np.uint8
    np.testing.assert_array_equal(dataset.batch([0]), 1.0)
    np.testing.assert_array_equal(dataset.batch([1]), 0.0)


def test_colour_folder_gives_three_channels(tmp_path):
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 2] = 128
    write_png(tmp_path / 'blue.png', pixels)
    dataset = load_dataset(data_config(), tmp_path)
    assert dataset.images.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(dataset.batch([0])[0, 0, 0], [0.0, 0.0, 128 / 255], rtol=1e-6)


def test_grayscale_folder_with_three_channels_rejected(tmp_path):
    write_png(tmp_path / 'a.png', np.zeros((16, 16), np.uint8))
    with pytest.raises(UserError, match='data.channels is 3 but .* has 1 channel'):
        load_dataset(data_config(channels=3), tmp_path)


def test_npz_uint8_kept_and_resized(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (3, 20, 20, 3), dtype=np.uint8)
    np.savez(tmp_path / 'images.npz', images=images)
    dataset = load_dataset(data_config(), tmp_path / 'images.npz')
    assert dataset.images.dtype == np.uint8
    assert dataset.images.shape == (3, 16, 16, 3)
    np.testing.assert_array_equal(dataset.images[1], crop_and_resize(images[1], 16))


def test_npz_channel_mismatch_rejected(tmp_path):
    np.savez(tmp_path / 'gray.npz', images=np.zeros((2, 16, 16, 1), np.float32))
    with pytest.raises(UserError, match='data.channels is 3 but .*gray.npz has 1 channel'):
        load_dataset(data_config(), tmp_path / 'gray.npz')


def test_fingerprint_changes_with_content():
    dataset = load_dataset(data_config(dataset='digits', channels=1, image_size=8))
    first = dataset.fingerprint()
    dataset.images = dataset.images.copy()
    assert dataset.fingerprint() == first
    dataset.images[0, 0, 0, 0] += 0.5
    assert dataset.fingerprint() != first


def test_epoch_order_visits_each_image_once_per_epoch():
    order = EpochOrder(jax.random.key(0), count=10, batch_size=3)
    assert order.steps_per_epoch == 3
    first_epoch = np.concatenate([order.indices(step) for step in range(3)])
    assert len(set(first_epoch.tolist())) == 9
    second_epoch = np.concatenate([order.indices(step) for step in range(3, 6)])
    assert len(set(second_epoch.tolist())) == 9
    assert not np.array_equal(first_epoch, second_epoch)
    assert order.position(4) == (1, 1)


def test_epoch_order_depends_only_on_key_and_step():
    a = EpochOrder(jax.random.key(3), count=50, batch_size=8)
    b = EpochOrder(jax.random.key(3), count=50, batch_size=8)
    # b is queried in another order, so its cached permutation differs at each call.
    later, earlier = b.indices(13), b.indices(2)
    np.testing.assert_array_equal(a.indices(2), earlier)
    np.testing.assert_array_equal(a.indices(13), later)
    other = EpochOrder(jax.random.key(4), count=50, batch_size=8)
    assert not np.array_equal(other.indices(2), earlier)


def test_epoch_order_rejects_batch_larger_than_data():
    with pytest.raises(UserError, match='10 images, fewer than training.batch_size 16'):
        EpochOrder(jax.random.key(0), count=10, batch_size=16)


def test_augmentation_flip_mirrors_whole_images():
    x = jnp.asarray(np.random.default_rng(3).uniform(size=(64, 4, 4, 1)), jnp.float32)
    flipped = Augmentation(random_flip=True)(jax.random.key(1), x)
    mirrored = [bool(jnp.array_equal(f, o[:, ::-1])) for f, o in zip(flipped, x)]
    kept = [bool(jnp.array_equal(f, o)) for f, o in zip(flipped, x)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 < sum(mirrored) < 48


def test_augmentation_uniform_dequantization_formula():
    x = jnp.asarray(np.random.default_rng(4).integers(0, 256, (8, 4, 4, 1)) / 255.0, jnp.float32)
    out = Augmentation(uniform_dequantization=True)(jax.random.key(2), x)
    noise = np.asarray(out) * 256.0 - np.asarray(x) * 255.0
    assert noise.min() >= -1e-4
    assert noise.max() < 1.0 + 1e-4
    assert 0.4 < noise.mean() < 0.6


def test_augmentation_gaussian_dequantization_std():
    x = jnp.full((16, 16, 16, 1), 0.5, jnp.float32)
    out = Augmentation(gaussian_dequantization=True)(jax.random.key(3), x)
    assert abs(float(jnp.std(out - x)) - 0.01) < 0.001


def test_augmentation_off_is_identity():
    x = jnp.asarray(np.random.default_rng(5).uniform(size=(2, 4, 4, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(Augmentation()(jax.random.key(0), x)), np.asarray(x))
