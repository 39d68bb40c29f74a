"""`ScoreModel`: a Flax score network with its parameters and the checkpoint's σ table."""

import flax.linen as nn
import jax.numpy as jnp
from flax import struct

from ncsn_jax import checkpoint
from ncsn_jax.errors import UserError
from ncsn_jax.models import create_model


@struct.dataclass
class ScoreModel:
    """Callable score model s(x, σ) = network(x) / σ.

    A pytree (parameters and σ table are leaves, the module is static), so it can be passed to
    jitted functions as an argument instead of being baked into the compiled program as constants.
    """

    module: nn.Module = struct.field(pytree_node=False)
    params: dict
    sigmas: jnp.ndarray

    def __call__(self, x, sigma):
        """Return the score for images `x` (N, H, W, C) in [0, 1] at noise level `sigma`.

        `sigma` is a scalar or one value per sample (N,).
        """
        out = self.module.apply({'params': self.params}, x)
        sigma = jnp.asarray(sigma, out.dtype)
        if sigma.ndim == 1:
            sigma = sigma[:, None, None, None]
        return out / sigma


def load_score_model(path, ema: bool | None = None) -> ScoreModel:
    """Load a converted score-model file.

    `ema=None` takes the weights the file was converted with; True or False insists on the EMA or
    the raw weights and raises UserError when the file contains the other kind.
    """
    payload = checkpoint.read_params_file(path, kind='score_model')
    metadata = payload['metadata']
    if ema is not None and bool(ema) != bool(metadata.get('ema')):
        have = 'EMA' if metadata.get('ema') else 'raw'
        flag = '' if ema else ' --no-ema'
        raise UserError(f'{path} contains the {have} weights but ema={ema} was requested; re-convert '
                        f'with convert/torch_to_flax.py{flag} or pass ema=None')
    module = create_model(metadata['architecture'], metadata['ngf'], metadata['channels'])
    params = jax_tree(payload['params'])
    return ScoreModel(module=module, params=params,
                      sigmas=jnp.asarray(payload['extra']['sigmas'], jnp.float32))


def jax_tree(tree):
    if isinstance(tree, dict):
        return {k: jax_tree(v) for k, v in tree.items()}
    return jnp.asarray(tree)
