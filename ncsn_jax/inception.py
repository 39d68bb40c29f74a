"""The FID Inception v3 network of pytorch-fid 0.3.0 in Flax, and its weight mapping.

The network is torchvision's Inception v3 with the changes that pytorch-fid makes to match the
TensorFlow graph behind the published FID numbers (`pt_inception-2015-12-05-6726825d.pth`):

- every convolution has no bias and is followed by batch norm with eps 0.001 (inference, running
  statistics) and a ReLU;
- the pool branch of Mixed_5b-5d, Mixed_6b-6e and Mixed_7b is a 3x3 average pool with stride 1 and
  padding 1 that does not count the padded pixels (count_include_pad=False);
- the pool branch of Mixed_7c is a 3x3 max pool with stride 1 and padding 1;
- there is no auxiliary head, and `fc` has 1008 outputs.

Layout is NHWC. `preprocess` maps images in [0, 1] to the network input as pytorch-fid's
`InceptionV3(resize_input=True, normalize_input=True)` does: a bilinear resize to 299x299 with
align_corners=False and no antialiasing, and 2x - 1. pytorch-fid resizes first and this module
scales first. The results agree up to float rounding because the resize weights of each output
pixel sum to 1.

Module and parameter names follow the PyTorch state dict (`Mixed_5b.branch1x1.conv.weight` is
`params/Mixed_5b/branch1x1/conv/kernel`), so the mapping below is mechanical. The variables are
`{'params': ..., 'batch_stats': ...}`, and the batch-norm running mean and variance are in
`batch_stats`, as in `flax.linen.BatchNorm`.
"""

import functools
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ncsn_jax.errors import UserError

INPUT_SIZE = 299
POOL_FEATURES = 2048
NUM_CLASSES = 1008
BATCH_NORM_EPS = 1e-3

# Written to the metadata of converted files and checked when they are loaded.
ARCHITECTURE = 'pytorch_fid_inception_v3'

# A state dict holding all three keys is taken to be an FID Inception state dict.
_SIGNATURE_KEYS = ('Conv2d_1a_3x3.conv.weight', 'Mixed_7c.branch_pool.conv.weight', 'fc.weight')

# How many key names an error message lists before it only counts the rest.
_MAX_KEYS_LISTED = 5


# ---------------------------------------------------------------------------------------------
# Resizing


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Return the (out_size, in_size) float32 matrix of PyTorch's bilinear resize along one axis.

    This is `torch.nn.functional.interpolate(mode='bilinear', align_corners=False,
    antialias=False)`. Output pixel i samples the input at (i + 0.5) * in_size / out_size - 0.5,
    clamped below at 0, and mixes the two nearest input pixels (the last pixel repeats at the far
    edge). Downsampling uses the same two-tap rule, so it aliases, as the reference does.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f'sizes must be positive, got in_size={in_size}, out_size={out_size}')
    scale = in_size / out_size
    source = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    source = np.maximum(source, 0.0)
    lower = np.floor(source).astype(np.int64)
    lower = np.minimum(lower, in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    upper_weight = source - lower
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, lower), 1.0 - upper_weight)
    np.add.at(matrix, (rows, upper), upper_weight)
    return matrix.astype(np.float32)


def resize_bilinear(images, size: int = INPUT_SIZE, precision=jax.lax.Precision.HIGHEST):
    """Resize NHWC `images` to (size, size) with `bilinear_resize_matrix` along H and W."""
    height, width = images.shape[1], images.shape[2]
    if height == size and width == size:
        return images  # the matrices would be the identity
    rows = jnp.asarray(bilinear_resize_matrix(height, size))
    cols = jnp.asarray(bilinear_resize_matrix(width, size))
    images = jnp.einsum('oh,nhwc->nowc', rows, images, precision=precision)
    return jnp.einsum('pw,nowc->nopc', cols, images, precision=precision)


def preprocess(images, precision=jax.lax.Precision.HIGHEST):
    """Map NHWC images in [0, 1] with 1 or 3 channels to the 299x299x3 network input in [-1, 1]."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f'expected images of shape (N, H, W, 1 or 3), got {images.shape}')
    if images.shape[-1] == 1:
        images = jnp.repeat(images, 3, axis=-1)
    return resize_bilinear(2.0 * images - 1.0, INPUT_SIZE, precision=precision)


# ---------------------------------------------------------------------------------------------
# Network


def _pad(padding):
    """Turn torch's symmetric (pad_h, pad_w) into Flax's ((top, bottom), (left, right))."""
    return ((padding[0], padding[0]), (padding[1], padding[1]))


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 0.001, running statistics) and ReLU."""
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    precision: object = None

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel_size, strides=self.strides,
                    padding=_pad(self.padding), use_bias=False, precision=self.precision,
                    name='conv')(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=BATCH_NORM_EPS, name='bn')(x)
        return nn.relu(x)


def _average_pool_3x3(x):
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_stride_2(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')


class InceptionA(nn.Module):
    """Mixed_5b-5d: 1x1, 5x5, double 3x3 and average-pool branches."""
    pool_features: int
    precision: object = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(64, (1, 1), name='branch1x1')(x)

        branch5x5 = conv(48, (1, 1), name='branch5x5_1')(x)
        branch5x5 = conv(64, (5, 5), padding=(2, 2), name='branch5x5_2')(branch5x5)

        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_3')(branch3x3dbl)

        branch_pool = conv(self.pool_features, (1, 1), name='branch_pool')(_average_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    """Mixed_6a: grid reduction from 35x35 to 17x17."""
    precision: object = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(384, (3, 3), strides=(2, 2), name='branch3x3')(x)

        branch3x3dbl = conv(64, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(96, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = conv(96, (3, 3), strides=(2, 2), name='branch3x3dbl_3')(branch3x3dbl)

        branch_pool = _max_pool_3x3_stride_2(x)
        return jnp.concatenate([branch3x3, branch3x3dbl, branch_pool], axis=-1)


class InceptionC(nn.Module):
    """Mixed_6b-6e: factorized 7x7 branches and an average-pool branch."""
    channels_7x7: int
    precision: object = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        branch1x1 = conv(192, (1, 1), name='branch1x1')(x)

        branch7x7 = conv(c7, (1, 1), name='branch7x7_1')(x)
        branch7x7 = conv(c7, (1, 7), padding=(0, 3), name='branch7x7_2')(branch7x7)
        branch7x7 = conv(192, (7, 1), padding=(3, 0), name='branch7x7_3')(branch7x7)

        branch7x7dbl = conv(c7, (1, 1), name='branch7x7dbl_1')(x)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_2')(branch7x7dbl)
        branch7x7dbl = conv(c7, (1, 7), padding=(0, 3), name='branch7x7dbl_3')(branch7x7dbl)
        branch7x7dbl = conv(c7, (7, 1), padding=(3, 0), name='branch7x7dbl_4')(branch7x7dbl)
        branch7x7dbl = conv(192, (1, 7), padding=(0, 3), name='branch7x7dbl_5')(branch7x7dbl)

        branch_pool = conv(192, (1, 1), name='branch_pool')(_average_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    """Mixed_7a: grid reduction from 17x17 to 8x8."""
    precision: object = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch3x3 = conv(192, (1, 1), name='branch3x3_1')(x)
        branch3x3 = conv(320, (3, 3), strides=(2, 2), name='branch3x3_2')(branch3x3)

        branch7x7x3 = conv(192, (1, 1), name='branch7x7x3_1')(x)
        branch7x7x3 = conv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(branch7x7x3)
        branch7x7x3 = conv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(branch7x7x3)
        branch7x7x3 = conv(192, (3, 3), strides=(2, 2), name='branch7x7x3_4')(branch7x7x3)

        branch_pool = _max_pool_3x3_stride_2(x)
        return jnp.concatenate([branch3x3, branch7x7x3, branch_pool], axis=-1)


class InceptionE(nn.Module):
    """Mixed_7b (average-pool branch) and Mixed_7c (max-pool branch), as pytorch-fid has them."""
    pool: str  # 'avg' (Mixed_7b) or 'max' (Mixed_7c)
    precision: object = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        branch1x1 = conv(320, (1, 1), name='branch1x1')(x)

        branch3x3 = conv(384, (1, 1), name='branch3x3_1')(x)
        branch3x3 = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name='branch3x3_2a')(branch3x3),
            conv(384, (3, 1), padding=(1, 0), name='branch3x3_2b')(branch3x3),
        ], axis=-1)

        branch3x3dbl = conv(448, (1, 1), name='branch3x3dbl_1')(x)
        branch3x3dbl = conv(384, (3, 3), padding=(1, 1), name='branch3x3dbl_2')(branch3x3dbl)
        branch3x3dbl = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name='branch3x3dbl_3a')(branch3x3dbl),
            conv(384, (3, 1), padding=(1, 0), name='branch3x3dbl_3b')(branch3x3dbl),
        ], axis=-1)

        if self.pool == 'avg':
            pooled = _average_pool_3x3(x)
        elif self.pool == 'max':
            pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        else:
            raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
        branch_pool = conv(192, (1, 1), name='branch_pool')(pooled)
        return jnp.concatenate([branch1x1, branch3x3, branch3x3dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception v3 on preprocessed NHWC input; returns (pool (N, 2048), logits (N, 1008)).

    Apply it to the output of `preprocess` (299x299, values in [-1, 1]), or use `apply_inception`,
    which does both. `precision` goes to every convolution and to `fc`, and None follows
    jax.default_matmul_precision.
    """
    precision: object = None

    @nn.compact
    def __call__(self, x):
        conv = functools.partial(BasicConv2d, precision=self.precision)
        x = conv(32, (3, 3), strides=(2, 2), name='Conv2d_1a_3x3')(x)
        x = conv(32, (3, 3), name='Conv2d_2a_3x3')(x)
        x = conv(64, (3, 3), padding=(1, 1), name='Conv2d_2b_3x3')(x)
        x = _max_pool_3x3_stride_2(x)
        x = conv(80, (1, 1), name='Conv2d_3b_1x1')(x)
        x = conv(192, (3, 3), name='Conv2d_4a_3x3')(x)
        x = _max_pool_3x3_stride_2(x)

        x = InceptionA(32, precision=self.precision, name='Mixed_5b')(x)
        x = InceptionA(64, precision=self.precision, name='Mixed_5c')(x)
        x = InceptionA(64, precision=self.precision, name='Mixed_5d')(x)
        x = InceptionB(precision=self.precision, name='Mixed_6a')(x)
        x = InceptionC(128, precision=self.precision, name='Mixed_6b')(x)
        x = InceptionC(160, precision=self.precision, name='Mixed_6c')(x)
        x = InceptionC(160, precision=self.precision, name='Mixed_6d')(x)
        x = InceptionC(192, precision=self.precision, name='Mixed_6e')(x)
        x = InceptionD(precision=self.precision, name='Mixed_7a')(x)
        x = InceptionE('avg', precision=self.precision, name='Mixed_7b')(x)
        x = InceptionE('max', precision=self.precision, name='Mixed_7c')(x)

        pool = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_CLASSES, precision=self.precision, name='fc')(pool)
        return pool, logits


def apply_inception(variables, images, precision=None):
    """Compute (pool (N, 2048), logits (N, 1008)) for NHWC images in [0, 1] with 1 or 3 channels.

    `variables` are those of `FIDInceptionV3`. `precision` goes to the network's convolutions and
    `fc`, and None follows jax.default_matmul_precision. The resize always runs at HIGHEST.
    """
    x = preprocess(images)
    return FIDInceptionV3(precision=precision).apply(variables, x)


# ---------------------------------------------------------------------------------------------
# PyTorch state dict <-> Flax variables


@functools.lru_cache(maxsize=1)
def _expected_variable_shapes() -> dict:
    """Map each (collection, path) of FIDInceptionV3's variables to its shape."""
    abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                              jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    shapes = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        keys = tuple(entry.key for entry in path)
        shapes[(keys[0], keys[1:])] = tuple(leaf.shape)
    return shapes


_BATCH_NORM_NAMES = {  # Flax (collection, name) -> torch name
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def _torch_key(collection: str, path: tuple) -> str:
    """Return the state-dict key of the Flax variable at (collection, path)."""
    *modules, name = path
    if modules and modules[-1] == 'bn':
        name = _BATCH_NORM_NAMES[(collection, name)]
    elif name == 'kernel':
        name = 'weight'
    return '.'.join([*modules, name])


def _torch_shape(flax_shape: tuple) -> tuple:
    """Return the torch shape of a Flax kernel: HWIO conv -> OIHW, dense (in, out) -> (out, in)."""
    if len(flax_shape) == 4:
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    if len(flax_shape) == 2:
        return (flax_shape[1], flax_shape[0])
    return flax_shape


def _to_flax_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return array


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return np.ascontiguousarray(array.transpose(3, 2, 0, 1))
    if array.ndim == 2:
        return np.ascontiguousarray(array.T)
    return array


def _expected_state_dict_layout() -> dict:
    """Map each state-dict key (without num_batches_tracked) to (collection, path, torch shape)."""
    return {_torch_key(collection, path): (collection, path, _torch_shape(shape))
            for (collection, path), shape in _expected_variable_shapes().items()}


def _list_keys(keys) -> str:
    keys = sorted(keys)
    text = ', '.join(keys[:_MAX_KEYS_LISTED])
    if len(keys) > _MAX_KEYS_LISTED:
        text += f' and {len(keys) - _MAX_KEYS_LISTED} more'
    return text


def is_inception_state_dict(state_dict) -> bool:
    """Return True when `state_dict` has the keys of pytorch-fid's FID Inception weights.

    Only a few characteristic keys are checked, so a damaged or foreign variant (such as
    torchvision's own Inception v3 with its AuxLogits) is recognised too and then rejected with a
    specific message by `inception_params_from_state_dict`.
    """
    return isinstance(state_dict, Mapping) and all(key in state_dict for key in _SIGNATURE_KEYS)


def inception_params_from_state_dict(state_dict: Mapping) -> dict:
    """Convert a pytorch-fid FID Inception state dict of NumPy arrays to FIDInceptionV3 variables.

    Conv weights go from OIHW to HWIO, `fc.weight` is transposed, and the batch-norm weight, bias,
    running mean and running variance become `scale`, `bias` (in 'params') and `mean`, `var` (in
    'batch_stats'). Every array is cast to float32. `num_batches_tracked` entries are ignored and
    may be absent. Raises UserError naming the first few missing or unexpected keys, or the first
    few arrays of the wrong shape.
    """
    layout = _expected_state_dict_layout()
    keys = {key for key in state_dict if not key.endswith('.num_batches_tracked')}
    missing = layout.keys() - keys
    unexpected = keys - layout.keys()
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys ({_list_keys(missing)})')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys ({_list_keys(unexpected)})')
    if problems:
        raise UserError('not a pytorch-fid FID Inception state dict: ' + '; '.join(problems)
                        + '; expected the layout of pt_inception-2015-12-05-6726825d.pth')

    wrong_shapes = [f'{key} {tuple(np.shape(state_dict[key]))} (expected {shape})'
                    for key, (_, _, shape) in sorted(layout.items())
                    if tuple(np.shape(state_dict[key])) != shape]
    if wrong_shapes:
        raise UserError(f'{len(wrong_shapes)} arrays of the FID Inception state dict have the '
                        f'wrong shape: {", ".join(wrong_shapes[:_MAX_KEYS_LISTED])}')

    variables = {'params': {}, 'batch_stats': {}}
    for key, (collection, path, _) in layout.items():
        array = _to_flax_layout(np.asarray(state_dict[key], dtype=np.float32))
        node = variables[collection]
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = array
    return variables


def inception_state_dict_from_params(variables: Mapping) -> dict:
    """Convert FIDInceptionV3 variables back to a pytorch-fid state dict of NumPy arrays.

    This inverts `inception_params_from_state_dict` and adds `num_batches_tracked` (an int64 zero)
    for every batch norm, as the original file has.
    """
    check_inception_variables(variables)
    state_dict = {}
    for (collection, path) in _expected_variable_shapes():
        node = variables[collection]
        for name in path:
            node = node[name]
        key = _torch_key(collection, path)
        state_dict[key] = _to_torch_layout(np.asarray(node, dtype=np.float32))
        if key.endswith('.bn.running_var'):
            state_dict[key.removesuffix('running_var') + 'num_batches_tracked'] = np.zeros(
                (), dtype=np.int64)
    return state_dict


def check_inception_variables(variables, source: str = 'the Inception variables') -> None:
    """Raise UserError unless `variables` has exactly the FIDInceptionV3 tree and shapes."""
    if not isinstance(variables, Mapping):
        raise UserError(f'{source}: expected a dict of variables, got {type(variables).__name__}')
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
        keys = tuple(str(getattr(entry, 'key', entry)) for entry in path)
        found[(keys[0], keys[1:])] = tuple(np.shape(leaf))
    expected = _expected_variable_shapes()

    def names(entries):
        return _list_keys('/'.join((collection, *path)) for collection, path in entries)

    missing = expected.keys() - found.keys()
    if missing:
        raise UserError(f'{source}: {len(missing)} missing variables ({names(missing)})')
    unexpected = found.keys() - expected.keys()
    if unexpected:
        raise UserError(f'{source}: {len(unexpected)} unexpected variables ({names(unexpected)})')
    wrong = [entry for entry in expected if found[entry] != expected[entry]]
    if wrong:
        first = wrong[0]
        raise UserError(f'{source}: {len(wrong)} variables have the wrong shape, first '
                        f'{"/".join((first[0], *first[1]))} {found[first]} '
                        f'(expected {expected[first]})')
