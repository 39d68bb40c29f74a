"""Building blocks of the NCSNv2 RefineNet, in NHWC layout.

Parameter names follow the attribute names of the official PyTorch modules, so that a PyTorch key
such as `res2.0.conv2.conv.weight` maps to the Flax path `res2_0/conv2/conv/kernel` (see
`ncsn_jax.convert`).
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

NORM_EPS = 1e-5


def _conv(features, kernel_size=3, *, dilation=1, use_bias=True, name=None):
    pad = dilation * (kernel_size // 2)
    return nn.Conv(features, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)),
                   kernel_dilation=(dilation, dilation), use_bias=use_bias, name=name)


def _normal_around_one(key, shape, dtype=jnp.float32):
    """N(1, 0.02), the PyTorch initialisation of the InstanceNorm++ scales."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class InstanceNormPlus(nn.Module):
    """InstanceNorm++: instance norm plus a learned term for the normalised channel means.

    The channel means are normalised across channels with the unbiased variance (as
    `torch.var` computes it) plus 1e-5; the instance norm uses the biased variance and eps 1e-5.
    """

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        alpha = self.param('alpha', _normal_around_one, (features,))
        gamma = self.param('gamma', _normal_around_one, (features,))
        beta = self.param('beta', nn.initializers.zeros, (features,))

        means = jnp.mean(x, axis=(1, 2))
        means = (means - means.mean(-1, keepdims=True)) / jnp.sqrt(
            jnp.var(means, axis=-1, ddof=1, keepdims=True) + NORM_EPS)
        centred = x - jnp.mean(x, axis=(1, 2), keepdims=True)
        h = centred / jnp.sqrt(jnp.mean(centred * centred, axis=(1, 2), keepdims=True) + NORM_EPS)
        h = h + means[:, None, None, :] * alpha
        return gamma * h + beta


class ConvMeanPool(nn.Module):
    """A convolution followed by the mean of the four 2x2-strided subsamples (halves H and W)."""

    features: int
    kernel_size: int = 3

    @nn.compact
    def __call__(self, x):
        h = _conv(self.features, self.kernel_size, name='conv')(x)
        return (h[:, ::2, ::2] + h[:, 1::2, ::2] + h[:, ::2, 1::2] + h[:, 1::2, 1::2]) / 4.0


class ResidualBlock(nn.Module):
    """InstanceNorm++ -> ELU -> conv1 -> InstanceNorm++ -> ELU -> conv2, plus a shortcut.

    `down` halves the resolution when `dilation` is 1; a dilated "down" block keeps it and only
    changes the channel count, as in the official code.
    """

    features: int
    down: bool = False
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        in_features = x.shape[-1]
        h = nn.elu(InstanceNormPlus(name='normalize1')(x))
        if self.down:
            h = _conv(in_features, dilation=self.dilation, name='conv1')(h)
            h = nn.elu(InstanceNormPlus(name='normalize2')(h))
            if self.dilation > 1:
                h = _conv(self.features, dilation=self.dilation, name='conv2')(h)
                shortcut = _conv(self.features, dilation=self.dilation, name='shortcut')(x)
            else:
                h = ConvMeanPool(self.features, 3, name='conv2')(h)
                shortcut = ConvMeanPool(self.features, 1, name='shortcut')(x)
            return shortcut + h

        h = _conv(self.features, dilation=self.dilation, name='conv1')(h)
        h = nn.elu(InstanceNormPlus(name='normalize2')(h))
        h = _conv(self.features, dilation=self.dilation, name='conv2')(h)
        if in_features == self.features:
            shortcut = x
        elif self.dilation > 1:
            shortcut = _conv(self.features, dilation=self.dilation, name='shortcut')(x)
        else:
            shortcut = _conv(self.features, 1, name='shortcut')(x)
        return shortcut + h


class RCUBlock(nn.Module):
    """Residual conv units: `n_blocks` residual units of `n_stages` (ELU -> 3x3 conv, no bias)."""

    n_blocks: int
    n_stages: int = 2

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        for i in range(self.n_blocks):
            residual = x
            for j in range(self.n_stages):
                x = _conv(features, use_bias=False, name=f'{i + 1}_{j + 1}_conv')(nn.elu(x))
            x = x + residual
        return x


def max_pool_same(x, size: int):
    """Max pooling of NHWC `x` over size x size windows, stride 1, output the size of the input.

    The padding is -inf, so padded positions never win, as in PyTorch's `max_pool2d`. Two 1-D
    passes (rows, then columns) give exactly the values of one 2-D window because max is exact.
    On XLA's CPU backend (jax 0.10.2, 2-core AMD EPYC) they took about 1 ms where one 5x5
    `reduce_window` took 20 ms, for (64, 32, 32, 16) and (8, 32, 32, 128) inputs. The gradient
    goes to the first maximum of each window, as in PyTorch.

    NOTE: the gradient is a `jax.custom_vjp`, so forward-mode differentiation (`jax.jvp`,
    `jax.jacfwd`) of the score network raises an error. Reverse mode works.
    """
    return _max_same_1d(_max_same_1d(x, size, 1), size, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _max_same_1d(x, size: int, axis: int):
    """Return the max over windows of `size` along `axis`, stride 1, padded with -inf."""
    pad = size // 2
    window = [1] * x.ndim
    window[axis] = size
    padding = [(0, 0)] * x.ndim
    padding[axis] = (pad, pad)
    # A Python scalar init value (not a traced array) lets JAX recognise the max monoid.
    return jax.lax.reduce_window(x, -np.inf, jax.lax.max, tuple(window), (1,) * x.ndim,
                                 tuple(padding))


def _max_same_1d_forward(x, size, axis):
    y = _max_same_1d(x, size, axis)
    return y, (x, y)


def _max_same_1d_backward(size, axis, residuals, grad_y):
    """Send each output's gradient to the first position of its window with the maximum value.

    This is PyTorch's rule (the first maximum wins). The loop over the `size` window offsets
    uses only padding, slicing and elementwise operations, which XLA fuses. It replaces JAX's own
    gradient of `reduce_window`, which XLA:CPU runs as an iota, a scatter and a reduce_window.
    """
    x, y = residuals
    pad = size // 2
    length = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    padded = jnp.pad(x, widths, constant_values=-np.inf)
    assigned = jnp.zeros(y.shape, bool)
    grad_padded = jnp.zeros(padded.shape, grad_y.dtype)
    for offset in range(size):
        # At this offset, output position i compares with padded position i + offset.
        candidate = jax.lax.slice_in_dim(padded, offset, offset + length, axis=axis)
        hit = (candidate == y) & ~assigned
        assigned = assigned | hit
        widths[axis] = (offset, size - 1 - offset)
        grad_padded = grad_padded + jnp.pad(jnp.where(hit, grad_y, 0), widths)
    return (jax.lax.slice_in_dim(grad_padded, pad, pad + length, axis=axis),)


_max_same_1d.defvjp(_max_same_1d_forward, _max_same_1d_backward)


class CRPBlock(nn.Module):
    """Chained residual pooling: ELU, then stages of 5x5 max pool (stride 1) -> 3x3 conv, summed."""

    n_stages: int = 2

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        x = nn.elu(x)
        path = x
        for i in range(self.n_stages):
            path = max_pool_same(path, 5)
            path = _conv(features, use_bias=False, name=f'convs_{i}')(path)
            x = path + x
        return x


def _interpolation_matrix(size_out: int, size_in: int) -> np.ndarray:
    """Linear interpolation weights (size_out, size_in) with align_corners=True."""
    if size_out == 1:
        coords = np.zeros(1)
    else:
        coords = np.arange(size_out) * ((size_in - 1) / (size_out - 1))
    low = np.clip(np.floor(coords).astype(int), 0, size_in - 1)
    high = np.minimum(low + 1, size_in - 1)
    frac = coords - low
    weights = np.zeros((size_out, size_in), np.float64)
    weights[np.arange(size_out), low] += 1.0 - frac
    weights[np.arange(size_out), high] += frac
    return weights.astype(np.float32)


def resize_bilinear_align_corners(x, height: int, width: int):
    """Bilinear resize of NHWC `x` with align_corners=True (`jax.image.resize` has no such mode)."""
    if x.shape[1:3] == (height, width):
        return x
    rows = jnp.asarray(_interpolation_matrix(height, x.shape[1]))
    cols = jnp.asarray(_interpolation_matrix(width, x.shape[2]))
    x = jnp.einsum('oh,nhwc->nowc', rows, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum('pw,nowc->nopc', cols, x, precision=jax.lax.Precision.HIGHEST)


class MSFBlock(nn.Module):
    """Multi-resolution fusion: 3x3 convs of each input, resized to `shape` and summed."""

    features: int

    @nn.compact
    def __call__(self, xs: Sequence[jnp.ndarray], shape):
        total = 0.0
        for i, x in enumerate(xs):
            h = _conv(self.features, name=f'convs_{i}')(x)
            total = total + resize_bilinear_align_corners(h, *shape)
        return total


class RefineBlock(nn.Module):
    """RefineNet block: RCU per input, fusion to the first input's size, CRP, output RCU."""

    features: int
    start: bool = False
    end: bool = False

    @nn.compact
    def __call__(self, xs: Sequence[jnp.ndarray]):
        hs = [RCUBlock(2, 2, name=f'adapt_convs_{i}')(x) for i, x in enumerate(xs)]
        if len(hs) > 1:
            h = MSFBlock(self.features, name='msf')(hs, xs[0].shape[1:3])
        else:
            h = hs[0]
        h = CRPBlock(2, name='crp')(h)
        return RCUBlock(3 if self.end else 1, 2, name='output_convs')(h)
