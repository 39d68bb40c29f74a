"""PID-controlled annealed Langevin dynamics (PIDLD) as one compiled `lax.scan`.

At level i of the ladder σ_1 > … > σ_L, each of T steps computes the score g_t = s(x, σ_i) and

    e_int  = mean of every score so far (all levels, the current one included)
    e_diff = g_t − g_{t−1}                      (g_{−1} = 0, so at the first step e_diff = g_0)
    ε_i    = step_lr · (σ_i / σ_L)²
    x     ← x + ε_i (k_p g_t + k_i e_int + k_d e_diff) + √(2ε_i) ξ

after which k_i and k_d are multiplied by their decays. An optional final denoising step returns
x + σ_L² s(x, σ_L). With k_i = k_d = 0 this is plain annealed Langevin dynamics.
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

# Per-sample norms computed at each step; the batch means of these are the record series.
NORM_NAMES = ('grad_norms', 'e_int_norms', 'e_diff_norms', 'P_term_norms', 'I_term_norms',
              'D_term_norms', 'PID_term_norms', 'noise_term_norms', 'delta_term_norms',
              'image_norms')
RATIO_NAMES = ('IP_ratios', 'DP_ratios', 'snrs')
RECORD_NAMES = ('grad_norms', 'e_int_norms', 'e_diff_norms', 'P_term_norms', 'I_term_norms',
                'D_term_norms', 'IP_ratios', 'DP_ratios', 'PID_term_norms', 'noise_term_norms',
                'delta_term_norms', 'snrs', 'image_norms')

# How many times the sampler body was traced; tests use it to check that a gain sweep reuses one
# compilation.
trace_count = 0


def geometric_sigmas(sigma_begin: float, sigma_end: float, num_classes: int) -> np.ndarray:
    """Return the geometric σ ladder of NCSNv2, from `sigma_begin` down to `sigma_end` (float32)."""
    return np.exp(np.linspace(np.log(sigma_begin), np.log(sigma_end), num_classes)).astype(np.float32)


def _norms(x):
    """Frobenius norm of each sample of a (N, H, W, C) batch."""
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def _is_key_batch(key) -> bool:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key.ndim == 1
    return key.ndim == 2


def _step_noise(noise_source, mode, step, shape, dtype):
    if mode == 'per_sample_keys':
        draw = lambda key: jax.random.normal(jax.random.fold_in(key, step), shape[1:], dtype)
        return jax.vmap(draw)(noise_source)
    return jax.random.normal(jax.random.fold_in(noise_source, step), shape, dtype)


@functools.partial(jax.jit, static_argnames=('n_steps_each', 'denoise', 'noise_mode',
                                             'n_snapshots'))
def pid_ald_per_sample(score_fn, x_init, sigmas, step_lr, gains, noise_source, snapshot_slots, *,
                       n_steps_each: int, denoise: bool, noise_mode: str, n_snapshots: int):
    """Run the compiled sampler. Returns (x, snapshots, per-sample norms of shape (L·T, N) by name).

    `score_fn` is a pytree callable (such as `ScoreModel`) so that its parameters are arguments.
    `gains` is (k_p, k_i, k_d, k_i_decay, k_d_decay). `noise_source` is the replayed noise
    (L, T, N, H, W, C), one PRNG key, or one key per sample, as `noise_mode` selects.
    `snapshot_slots[k]` is the snapshot index to fill after global step k, or −1.
    Per-sample norms let a caller drop padded samples and average over chunks exactly.
    """
    global trace_count
    trace_count += 1

    n_levels = sigmas.shape[0]
    k_p, k_i0, k_d0, k_i_decay, k_d_decay = (jnp.asarray(g, x_init.dtype) for g in gains)
    sigma_last = sigmas[-1]
    snapshots0 = jnp.zeros((n_snapshots,) + x_init.shape, x_init.dtype)

    def step(carry, inputs):
        x, g_prev, g_sum, k_i, k_d, snapshots = carry
        sigma, t, noise_t = inputs
        g = score_fn(x, sigma)
        g_sum = g_sum + g
        e_int = g_sum / (t + 1).astype(x.dtype)
        e_diff = g - g_prev
        eps = step_lr * (sigma / sigma_last) ** 2
        p_term = eps * k_p * g
        i_term = eps * k_i * e_int
        d_term = eps * k_d * e_diff
        pid_term = p_term + i_term + d_term
        if noise_mode == 'replay':
            xi = noise_t
        else:
            xi = _step_noise(noise_source, noise_mode, t, x.shape, x.dtype)
        noise_term = jnp.sqrt(2.0 * eps) * xi
        delta = pid_term + noise_term
        x = x + delta
        if n_snapshots:
            slot = snapshot_slots[t]
            snapshots = jax.lax.cond(slot >= 0, lambda s: s.at[slot].set(x), lambda s: s, snapshots)
        norms = dict(zip(NORM_NAMES, (_norms(v) for v in (
            g, e_int, e_diff, p_term, i_term, d_term, pid_term, noise_term, delta, x))))
        carry = (x, g, g_sum, k_i * k_i_decay, k_d * k_d_decay, snapshots)
        return carry, norms

    def level(carry, inputs):
        sigma, level_index, level_noise = inputs
        steps = level_index * n_steps_each + jnp.arange(n_steps_each)
        step_inputs = (jnp.broadcast_to(sigma, (n_steps_each,)), steps, level_noise)
        return jax.lax.scan(step, carry, step_inputs)

    if noise_mode == 'replay':
        level_noise = noise_source
    else:
        # Noise is drawn from the keys inside the step, so the scan inputs carry placeholders.
        level_noise = jnp.zeros((n_levels, n_steps_each), x_init.dtype)

    carry = (x_init, jnp.zeros_like(x_init), jnp.zeros_like(x_init), k_i0, k_d0, snapshots0)
    carry, norms = jax.lax.scan(level, carry, (sigmas, jnp.arange(n_levels), level_noise))
    x, snapshots = carry[0], carry[-1]
    if denoise:
        x = x + sigma_last ** 2 * score_fn(x, sigma_last)
    norms = {name: value.reshape((-1,) + value.shape[2:]) for name, value in norms.items()}
    return x, snapshots, norms


def record_from_norm_sums(norm_sums: dict, count) -> dict:
    """Turn per-step sums of per-sample norms over `count` samples into the record series."""
    record = {name: np.asarray(norm_sums[name], np.float64) / count for name in NORM_NAMES}
    with np.errstate(divide='ignore', invalid='ignore'):
        record['IP_ratios'] = record['I_term_norms'] / record['P_term_norms']
        record['DP_ratios'] = record['D_term_norms'] / record['P_term_norms']
        record['snrs'] = record['PID_term_norms'] / record['noise_term_norms']
    return {name: record[name].astype(np.float32) for name in RECORD_NAMES}


def snapshot_slot_table(snapshot_steps, total_steps: int) -> np.ndarray:
    """Map each global step to its snapshot index (or −1)."""
    slots = np.full(total_steps, -1, np.int32)
    for index, step in enumerate(snapshot_steps):
        if not 0 <= step < total_steps:
            raise ValueError(f'snapshot step {step} is outside [0, {total_steps})')
        slots[step] = index
    return slots


def pid_ald(model: Callable, x_init, sigmas, *, n_steps_each: int, step_lr: float, k_p: float = 1.0,
            k_i: float = 0.0, k_d: float = 0.0, k_i_decay: float = 1.0, k_d_decay: float = 1.0,
            denoise: bool = True, key=None, noise=None, snapshot_steps=()):
    """Run PID-controlled annealed Langevin dynamics from `x_init` (N, H, W, C).

    Noise comes from `noise` (L·T, N, H, W, C), one slice per global step, for exact replay.
    Otherwise it comes from `key`: one PRNG key, or one key per sample, so that each sample's
    noise does not depend on the batch it is drawn in. Returns (x, record): record maps each name of
    `RECORD_NAMES` to one value per global step (means over the batch), plus 'snapshots'
    (len(snapshot_steps), N, H, W, C) with the samples after the given global steps when any are
    requested. Gains, `step_lr` and σ values are runtime arguments: changing them reuses the
    compiled program.
    """
    if n_steps_each < 1:
        raise ValueError(f'n_steps_each must be >= 1, got {n_steps_each}')
    x_init = jnp.asarray(x_init, jnp.float32)
    sigmas = jnp.asarray(sigmas, jnp.float32)
    total = sigmas.shape[0] * n_steps_each
    if noise is not None:
        noise = jnp.asarray(noise, x_init.dtype)
        if noise.shape != (total,) + x_init.shape:
            raise ValueError(f'noise must have shape {(total,) + x_init.shape} (L·T, N, H, W, C), '
                             f'got {noise.shape}')
        noise_source = noise.reshape((sigmas.shape[0], n_steps_each) + x_init.shape)
        mode = 'replay'
    elif key is not None:
        noise_source = key
        mode = 'per_sample_keys' if _is_key_batch(key) else 'shared_key'
        if mode == 'per_sample_keys' and key.shape[0] != x_init.shape[0]:
            raise ValueError(f'got {key.shape[0]} keys for {x_init.shape[0]} samples')
    else:
        raise ValueError('pass either `key` or `noise`')

    gains = jnp.asarray([k_p, k_i, k_d, k_i_decay, k_d_decay], jnp.float32)
    slots = jnp.asarray(snapshot_slot_table(snapshot_steps, total))
    x, snapshots, norms = pid_ald_per_sample(
        model, x_init, sigmas, jnp.float32(step_lr), gains, noise_source, slots,
        n_steps_each=n_steps_each, denoise=denoise, noise_mode=mode,
        n_snapshots=len(snapshot_steps))
    sums = {name: np.asarray(value).sum(axis=1) for name, value in norms.items()}
    record = record_from_norm_sums(sums, x_init.shape[0])
    if len(snapshot_steps):
        record['snapshots'] = np.asarray(snapshots)
    return x, record
