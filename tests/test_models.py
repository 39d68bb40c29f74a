import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import FORWARD_CASES, GOLDEN, relative_l2
from ncsn_jax import load_score_model
from ncsn_jax.models import ARCHITECTURES, check_image_size, create_model
from ncsn_jax.models.layers import max_pool_same


@pytest.mark.parametrize('ema', [True, False], ids=['ema', 'raw'])
@pytest.mark.parametrize('name', sorted(FORWARD_CASES))
def test_forward_matches_reference(converted_models, name, ema):
    golden = np.load(GOLDEN / f'forward_{name}.npz')
    model = load_score_model(converted_models[name, ema])
    np.testing.assert_allclose(np.asarray(model.sigmas), golden['sigmas'], rtol=1e-7)
    x = golden['x'].transpose(0, 2, 3, 1)
    sigma = np.asarray(model.sigmas)[golden['labels']]
    with jax.default_matmul_precision('highest'):
        out = np.asarray(model(x, sigma)).transpose(0, 3, 1, 2)
    expected = golden['out_ema' if ema else 'out_params']
    error = relative_l2(out, expected)
    assert error <= 1e-5, error


def test_scalar_sigma_equals_per_sample_sigma(converted_models):
    model = load_score_model(converted_models['digits_ngf16', True])
    x = jax.random.uniform(jax.random.key(0), (3, 32, 32, 1))
    np.testing.assert_allclose(model(x, 0.5), model(x, jnp.full((3,), 0.5)), rtol=1e-6)


@pytest.mark.parametrize('architecture,size', [('NCSNv2', 28), ('NCSNv2Deeper', 28),
                                               ('NCSNv2', 48), ('NCSNv2Deepest', 32)])
def test_accepted_image_sizes_run(architecture, size):
    assert check_image_size(architecture, size) is None
    module = create_model(architecture, ngf=4, channels=1)
    x = jnp.zeros((1, size, size, 1))
    params = module.init(jax.random.key(0), x)
    out = module.apply(params, x)
    assert out.shape == x.shape


@pytest.mark.parametrize('architecture,size', [('NCSNv2', 27), ('NCSNv2Deeper', 30),
                                               ('NCSNv2Deepest', 28)])
def test_unsupported_image_sizes_explained(architecture, size):
    reason = check_image_size(architecture, size)
    assert reason is not None
    assert str(size) in reason


def test_unknown_architecture_rejected():
    with pytest.raises(ValueError, match='unknown architecture'):
        create_model('NCSNv3', 8, 3)
    assert set(ARCHITECTURES) == {'NCSNv2', 'NCSNv2Deeper', 'NCSNv2Deepest'}


@pytest.mark.parametrize('height,width', [(7, 7), (2, 3), (16, 9)])
def test_max_pool_same_equals_torch(height, width):
    torch = pytest.importorskip('torch')
    # All values negative, so a zero padding would win at the borders and fail the comparison.
    x = -np.abs(np.random.default_rng(height * width).standard_normal((2, height, width, 3)))
    x = x.astype(np.float32) - 1.0
    expected = torch.nn.functional.max_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                                              kernel_size=5, stride=1, padding=2)
    actual = np.asarray(max_pool_same(jnp.asarray(x), 5))
    np.testing.assert_array_equal(actual, expected.numpy().transpose(0, 2, 3, 1))


def test_max_pool_same_gradient_equals_torch():
    torch = pytest.importorskip('torch')
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 9, 7, 3)).astype(np.float32)
    # PyTorch sends each window's gradient to its first maximum, which matters in this block of
    # equal values.
    x[0, 2:5, 1:4, 0] = 5.0
    weights = rng.standard_normal(x.shape).astype(np.float32)
    ours = jax.grad(lambda v: jnp.sum(max_pool_same(v, 5) * weights))(jnp.asarray(x))

    source = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
    pooled = torch.nn.functional.max_pool2d(source, kernel_size=5, stride=1, padding=2)
    torch.sum(pooled * torch.from_numpy(weights.transpose(0, 3, 1, 2))).backward()
    expected = source.grad.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=0, atol=1e-5)
