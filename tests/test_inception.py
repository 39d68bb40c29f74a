"""The Flax FID Inception against pytorch-fid 0.3.0 outputs for seeded stand-in weights."""

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ncsn_jax import inception
from ncsn_jax.checkpoint import read_params_file, write_params_file
from ncsn_jax.errors import UserError
from ncsn_jax.fid import load_inception

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / 'tests' / 'data'
MAX_RELATIVE_ERROR = 1e-4


def load_torch_state_dict(path) -> dict:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
    return {key: value.numpy() for key, value in loaded.items()}


@pytest.fixture(scope='module')
def state_dict(inception_weights):
    return load_torch_state_dict(inception_weights[0])


@pytest.fixture(scope='module')
def golden():
    data = np.load(DATA / 'golden' / 'inception_32px.npz')
    return {
        'images': data['images'].transpose(0, 2, 3, 1),  # NCHW -> NHWC
        'pool': data['pool'],
        'logits': data['logits'],
    }


@pytest.fixture(scope='module')
def network_batch4(inception_weights):
    return load_inception(inception_weights[1], batch_size=4)


def relative_error(actual, expected) -> float:
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_network_matches_pytorch_fid(network_batch4, golden):
    with jax.default_matmul_precision('highest'):
        pool, logits = network_batch4(golden['images'])

    chex.assert_shape(pool, (4, 2048))
    chex.assert_shape(logits, (4, 1008))
    assert pool.dtype == np.float32
    assert relative_error(pool, golden['pool']) <= MAX_RELATIVE_ERROR
    assert relative_error(logits, golden['logits']) <= MAX_RELATIVE_ERROR


def test_partial_batch_matches_full_batch(inception_weights, network_batch4, golden):
    network_batch3 = load_inception(inception_weights[1], batch_size=3)
    with jax.default_matmul_precision('highest'):
        pool4, logits4 = network_batch4(golden['images'])
        pool3, logits3 = network_batch3(golden['images'])  # batches of 3 and 1 (+2 padding)
        pool1, logits1 = network_batch3(golden['images'][2:3])  # fewer images than one batch

    chex.assert_shape(pool3, (4, 2048))
    np.testing.assert_allclose(pool3, pool4, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits3, logits4, rtol=1e-5, atol=1e-5)
    chex.assert_shape(pool1, (1, 2048))
    np.testing.assert_allclose(pool1, pool4[2:3], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits1, logits4[2:3], rtol=1e-5, atol=1e-5)


def test_one_channel_equals_repeated_rgb(network_batch4, golden):
    gray = golden['images'][:2].mean(axis=-1, keepdims=True)
    with jax.default_matmul_precision('highest'):
        pool_gray, logits_gray = network_batch4(gray)
        pool_rgb, logits_rgb = network_batch4(np.repeat(gray, 3, axis=-1))

    np.testing.assert_array_equal(pool_gray, pool_rgb)
    np.testing.assert_array_equal(logits_gray, logits_rgb)


def test_network_rejects_bad_images(network_batch4):
    with pytest.raises(ValueError, match='C 1 or 3'):
        network_batch4(np.zeros((1, 32, 32, 4), np.float32))
    with pytest.raises(ValueError, match='divide uint8 images by 255'):
        network_batch4(np.zeros((1, 32, 32, 3), np.uint8))

    pool, logits = network_batch4(np.zeros((0, 32, 32, 3), np.float32))
    chex.assert_shape(pool, (0, 2048))
    chex.assert_shape(logits, (0, 1008))


@pytest.mark.parametrize('in_size,out_size', [(32, 299), (7, 13), (40, 17), (500, 299), (9, 9)])
def test_resize_matches_torch_interpolate(in_size, out_size):
    rng = np.random.default_rng(in_size * 1000 + out_size)
    images = rng.uniform(size=(2, in_size, in_size + 3, 3)).astype(np.float32)

    # Torch in float64: in float32 its source coordinates lose about 6e-8 * in_size, which shows
    # as errors up to 4e-5 at in_size 500.
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(images.transpose(0, 3, 1, 2)).double(), size=(out_size, out_size),
        mode='bilinear', align_corners=False).numpy().transpose(0, 2, 3, 1)
    actual = np.asarray(inception.resize_bilinear(jnp.asarray(images), out_size))

    np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-6)


def test_state_dict_without_num_batches_tracked(state_dict):
    full = inception.inception_params_from_state_dict(state_dict)
    older = {key: value for key, value in state_dict.items()
             if not key.endswith('num_batches_tracked')}
    assert len(older) < len(state_dict)

    chex.assert_trees_all_equal(inception.inception_params_from_state_dict(older), full)


def test_state_dict_round_trip(state_dict):
    variables = inception.inception_params_from_state_dict(state_dict)
    kernel = variables['params']['Mixed_6b']['branch7x7_2']['conv']['kernel']
    assert kernel.shape == (1, 7, 128, 128)  # OIHW (128, 128, 1, 7) -> HWIO
    assert variables['params']['fc']['kernel'].shape == (2048, 1008)
    np.testing.assert_array_equal(variables['batch_stats']['Mixed_7c']['branch_pool']['bn']['var'],
                                  state_dict['Mixed_7c.branch_pool.bn.running_var'])

    back = inception.inception_state_dict_from_params(variables)

    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        assert back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_is_inception_state_dict(state_dict):
    assert inception.is_inception_state_dict(state_dict)
    assert not inception.is_inception_state_dict({'module.begin_conv.weight': np.zeros(1)})
    assert not inception.is_inception_state_dict([state_dict])


def test_missing_key_is_named(state_dict):
    damaged = dict(state_dict)
    del damaged['Mixed_6c.branch7x7_2.conv.weight']

    with pytest.raises(UserError, match=r'1 missing keys \(Mixed_6c\.branch7x7_2\.conv\.weight\)'):
        inception.inception_params_from_state_dict(damaged)


def test_unexpected_keys_are_named(state_dict):
    damaged = dict(state_dict)
    damaged['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)

    with pytest.raises(UserError, match=r'1 unexpected keys \(AuxLogits\.fc\.weight\)'):
        inception.inception_params_from_state_dict(damaged)


def test_wrong_shape_is_named(state_dict):
    damaged = dict(state_dict)
    damaged['fc.weight'] = np.zeros((1000, 2048), np.float32)
    damaged['fc.bias'] = np.zeros((1000,), np.float32)

    with pytest.raises(UserError, match=r'fc\.bias \(1000,\) \(expected \(1008,\)\)'):
        inception.inception_params_from_state_dict(damaged)


def test_load_inception_rejects_bad_files(tmp_path, inception_weights):
    with pytest.raises(UserError, match='not found'):
        load_inception(tmp_path / 'absent.msgpack')

    score_model = tmp_path / 'score_model.msgpack'
    write_params_file(score_model, kind='score_model', params={'w': np.zeros(2)}, metadata={})
    with pytest.raises(UserError, match="expected 'inception'"):
        load_inception(score_model)

    payload = read_params_file(inception_weights[1])
    del payload['params']['params']['Mixed_7c']
    truncated = tmp_path / 'truncated.msgpack'
    write_params_file(truncated, kind='inception', params=payload['params'], metadata={})
    with pytest.raises(UserError, match='missing variables'):
        load_inception(truncated)

    with pytest.raises(ValueError, match='batch_size'):
        load_inception(inception_weights[1], batch_size=0)
