"""Training state of the score-matching trainer: optimizer, EMA, initialisation and state files.

A `kind='train_state'` file (see `ncsn_jax.checkpoint`) contains everything needed to continue a run:

    params                  the raw model parameters (Flax tree)
    extra['sigmas']         the noise ladder, largest first
    extra['ema_params']     the EMA shadow (absent when the run has no EMA)
    extra['adam']           {'count', 'mu', 'nu'} and, with amsgrad, 'nu_max': the Adam state with
                            torch's meaning (exp_avg, exp_avg_sq, max_exp_avg_sq, step)
    extra['rng_key']        the run's base PRNG key data (trainer runs only)
    metadata                architecture, ngf, channels, num_classes, step, epoch, the optimizer's
                            torch param group ('optimizer'), the seed and the data position

The trainer writes these files, and `convert/torch_to_flax.py --train-state` writes them from an
official PyTorch checkpoint.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct, traverse_util

from ncsn_jax import checkpoint
from ncsn_jax.errors import UserError

ADAM_BETA2 = 0.999  # the official NCSNv2 `get_optimizer` fixes Adam's beta2


@struct.dataclass
class TrainState:
    """Parameters, optimizer state and EMA shadow after `step` completed optimizer steps."""

    step: jnp.ndarray
    params: dict
    opt_state: tuple
    ema_params: dict | None


# ---------------------------------------------------------------------------------------------
# Optimizer


@dataclasses.dataclass(frozen=True)
class AdamSettings:
    """Hyperparameters of `torch.optim.Adam` as the official NCSNv2 code sets them."""

    lr: float
    beta1: float = 0.9
    beta2: float = ADAM_BETA2
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    @classmethod
    def from_config(cls, optim) -> 'AdamSettings':
        """Read the `optim` config section; only Adam is implemented."""
        if optim.optimizer != 'Adam':
            raise UserError(f'optim.optimizer {optim.optimizer!r} is not supported by the trainer; '
                            "set optim.optimizer to 'Adam'")
        return cls(lr=optim.lr, beta1=optim.beta1, eps=optim.eps,
                   weight_decay=optim.weight_decay, amsgrad=optim.amsgrad)

    def torch_param_group(self) -> dict:
        """Return the hyperparameters as torch 2.x stores them in an Adam param group."""
        return {'lr': self.lr, 'betas': [self.beta1, self.beta2], 'eps': self.eps,
                'weight_decay': self.weight_decay, 'amsgrad': self.amsgrad, 'maximize': False,
                'foreach': None, 'capturable': False, 'differentiable': False, 'fused': None,
                'decoupled_weight_decay': False}


class TorchAmsgradState(struct.PyTreeNode):
    count: jnp.ndarray
    mu: dict
    nu: dict
    nu_max: dict


def _bias_correction(beta: float, step):
    """Return 1 - beta**step in float32 to about 1e-7 relative error.

    Computed as -expm1(step * log(beta)) with log(beta) taken in float64 on the host, because
    1 - 0.999**step in float32 loses four digits to cancellation (torch computes it in float64).
    """
    if beta == 0:
        return jnp.ones_like(step)
    return -jnp.expm1(step * math.log(beta))


def scale_by_torch_adam(b1: float, b2: float, eps: float,
                        amsgrad: bool = False) -> optax.GradientTransformation:
    """Adam and AMSGrad with the arithmetic of `torch.optim.Adam` (torch 2.x, single tensor).

    update = (mu / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps), with v = nu, or with AMSGrad
    the running maximum of the raw nu. `optax.scale_by_adam` differs slightly because it puts the
    bias correction inside the square root and computes 1 - b2^t in float32.
    `optax.scale_by_amsgrad` takes the maximum of the bias-corrected moment instead. The state is
    `optax.ScaleByAdamState`, or `TorchAmsgradState` with AMSGrad.
    """

    def init_fn(params):
        zeros = lambda: jax.tree.map(jnp.zeros_like, params)
        count = jnp.zeros([], jnp.int32)
        if amsgrad:
            return TorchAmsgradState(count=count, mu=zeros(), nu=zeros(), nu_max=zeros())
        return optax.ScaleByAdamState(count=count, mu=zeros(), nu=zeros())

    def update_fn(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
        count = optax.safe_increment(state.count)
        step = count.astype(jnp.float32)
        bias_correction1 = _bias_correction(b1, step)
        bias_correction2_sqrt = jnp.sqrt(_bias_correction(b2, step))
        second = nu
        if amsgrad:
            second = jax.tree.map(jnp.maximum, state.nu_max, nu)
        updates = jax.tree.map(
            lambda m, v: (m / bias_correction1) / (jnp.sqrt(v) / bias_correction2_sqrt + eps),
            mu, second)
        if amsgrad:
            return updates, TorchAmsgradState(count=count, mu=mu, nu=nu, nu_max=second)
        return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(settings: AdamSettings) -> optax.GradientTransformation:
    """Return an optax chain with the arithmetic of `torch.optim.Adam`.

    Weight decay is torch's L2 form: wd * param is added to the gradient before the moments are
    updated (not AdamW's decoupled decay). The chain always has three elements, so the Adam state
    is `opt_state[1]` whatever the settings.
    """
    decay = (optax.add_decayed_weights(settings.weight_decay) if settings.weight_decay > 0
             else optax.identity())
    adam = scale_by_torch_adam(settings.beta1, settings.beta2, settings.eps, settings.amsgrad)
    return optax.chain(decay, adam, optax.scale(-settings.lr))


def adam_state_to_tree(opt_state) -> dict:
    """Return the Adam part of `opt_state` as {'count', 'mu', 'nu'[, 'nu_max']} NumPy trees."""
    adam = opt_state[1]
    tree = {'count': np.asarray(adam.count, np.int64), 'mu': to_numpy(adam.mu),
            'nu': to_numpy(adam.nu)}
    if isinstance(adam, TorchAmsgradState):
        tree['nu_max'] = to_numpy(adam.nu_max)
    return tree


def opt_state_from_tree(optimizer: optax.GradientTransformation, params, adam: dict):
    """Build the state of `make_optimizer`'s chain from a tree written by `adam_state_to_tree`."""
    template = optimizer.init(params)
    old = template[1]
    count = jnp.asarray(int(np.asarray(adam['count'])), jnp.int32)
    mu = _like(adam['mu'], old.mu, 'mu')
    nu = _like(adam['nu'], old.nu, 'nu')
    if isinstance(old, TorchAmsgradState):
        if 'nu_max' not in adam:
            raise UserError('the stored Adam state has no max_exp_avg_sq (it was not made with '
                            'amsgrad), but optim.amsgrad is true; set optim.amsgrad to false')
        new = TorchAmsgradState(count=count, mu=mu, nu=nu, nu_max=_like(adam['nu_max'], old.nu_max,
                                                                        'nu_max'))
    else:
        if 'nu_max' in adam:
            raise UserError('the stored Adam state was made with amsgrad, but optim.amsgrad is '
                            'false; set optim.amsgrad to true')
        new = old._replace(count=count, mu=mu, nu=nu)
    return (template[0], new, template[2])


def _like(tree, template, what):
    """Convert `tree` to jnp arrays, checking that it has the structure and shapes of `template`."""
    try:
        converted = jax.tree.map(lambda value, ref: jnp.asarray(value, ref.dtype), tree, template)
    except ValueError as exc:
        raise UserError(f'the stored Adam {what} does not match the model parameters: {exc}') \
            from None
    for (path, value), ref in zip(jax.tree_util.tree_leaves_with_path(converted),
                                  jax.tree.leaves(template)):
        if value.shape != ref.shape:
            raise UserError(f'the stored Adam {what} at {jax.tree_util.keystr(path)} has shape '
                            f'{value.shape}, the model parameter {ref.shape}')
    return converted


# ---------------------------------------------------------------------------------------------
# Parameters and EMA


def init_params(module, key, image_size: int, channels: int) -> dict:
    """Return fresh parameters of `module`, drawn as the official PyTorch NCSNv2 draws them.

    Convolution kernels and biases come from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with
    fan_in = kh * kw * in_channels (the default of torch's `nn.Conv2d`, which the official layers
    keep), InstanceNorm++ alpha and gamma from N(1, 0.02) and beta is zero. Flax's own default
    (LeCun normal kernel, zero bias) has three times the kernel variance. The draws use NumPy on
    the host, seeded with the key's data, because running the network's initialiser op by op or
    compiling it takes many seconds.
    """
    dummy = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, key, dummy)['params'])
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    params = {}
    for path, spec in shapes.items():
        name = path[-1]
        if name in ('kernel', 'bias'):
            kernel_shape = shapes[path[:-1] + ('kernel',)].shape
            bound = 1.0 / math.sqrt(math.prod(kernel_shape[:-1]))
            value = rng.uniform(-bound, bound, spec.shape)
        elif name in ('alpha', 'gamma'):
            value = rng.normal(1.0, 0.02, spec.shape)
        elif name == 'beta':
            value = np.zeros(spec.shape)
        else:
            raise ValueError(f'no PyTorch initialisation known for parameter {"/".join(path)}')
        params[path] = jnp.asarray(value, spec.dtype)
    return traverse_util.unflatten_dict(params)


def update_ema(ema_params, params, rate: float):
    """Return shadow <- rate * shadow + (1 - rate) * param, as the official EMAHelper computes it."""
    return jax.tree.map(lambda shadow, param: (1.0 - rate) * param + rate * shadow,
                        ema_params, params)


def create_train_state(params, optimizer, *, ema: bool, step: int = 0, opt_state=None,
                       ema_params=None) -> TrainState:
    """Assemble a TrainState; the EMA shadow starts as a copy of the parameters unless given."""
    params = jax.tree.map(jnp.asarray, params)
    if opt_state is None:
        opt_state = optimizer.init(params)
    if ema and ema_params is None:
        ema_params = jax.tree.map(jnp.array, params)
    elif ema:
        ema_params = _like(ema_params, params, 'EMA shadow')
    else:
        ema_params = None
    return TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=opt_state,
                      ema_params=ema_params)


def to_numpy(tree):
    return jax.tree.map(lambda value: np.asarray(value), tree)


# ---------------------------------------------------------------------------------------------
# Files


def write_train_state_file(path, *, params, sigmas, metadata: dict, ema_params=None, adam=None,
                           rng_key=None, overwrite: bool = False):
    """Write a `kind='train_state'` file atomically (layout in the module docstring)."""
    extra = {'sigmas': np.asarray(sigmas, np.float32)}
    if ema_params is not None:
        extra['ema_params'] = to_numpy(ema_params)
    if adam is not None:
        extra['adam'] = adam
    if rng_key is not None:
        extra['rng_key'] = np.asarray(rng_key)
    return checkpoint.write_params_file(path, kind='train_state', params=to_numpy(params),
                                        metadata=metadata, extra=extra, overwrite=overwrite)


def read_train_state_file(path) -> dict:
    """Read a `kind='train_state'` file; return its payload, checking the required parts."""
    payload = checkpoint.read_params_file(path, kind='train_state')
    metadata, extra = payload['metadata'], payload['extra']
    for key in ('architecture', 'ngf', 'channels', 'step'):
        if key not in metadata:
            raise UserError(f'{path}: the train_state file has no {key!r} in its metadata; '
                            're-create it')
    if 'sigmas' not in extra:
        raise UserError(f'{path}: the train_state file has no sigma table; re-create it')
    return payload
