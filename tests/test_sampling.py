import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GOLDEN, relative_l2
from ncsn_jax import geometric_sigmas, load_score_model, pid_ald, sampling


@pytest.fixture(scope='module')
def golden_run():
    return np.load(GOLDEN / 'pid_ald_digits.npz')


@pytest.fixture(scope='module')
def digits_model(digits_model_path):
    return load_score_model(digits_model_path)


def _replay(model, golden, **overrides):
    params = json.loads(str(golden['params']))
    kwargs = {name: params[name] for name in ('n_steps_each', 'step_lr', 'k_p', 'k_i', 'k_d',
                                              'k_i_decay', 'k_d_decay', 'denoise')}
    kwargs.update(overrides)
    with jax.default_matmul_precision('highest'):
        return pid_ald(model, golden['x_init'].transpose(0, 2, 3, 1), golden['sigmas'],
                       noise=golden['noise'].transpose(0, 1, 3, 4, 2), **kwargs)


def test_replay_final_samples_match_reference(digits_model, golden_run):
    x, _ = _replay(digits_model, golden_run)
    error = relative_l2(np.asarray(x).transpose(0, 3, 1, 2), golden_run['final'])
    assert error <= 1e-5, error


@pytest.mark.parametrize('name', sampling.RECORD_NAMES)
def test_replay_record_matches_reference(digits_model, golden_run, name):
    _, record = _replay(digits_model, golden_run)
    assert record[name].shape == golden_run['record_' + name].shape
    error = relative_l2(record[name], golden_run['record_' + name])
    assert error <= 1e-5, error


def test_gain_sweep_compiles_once(digits_model, golden_run):
    _replay(digits_model, golden_run)
    before = sampling.trace_count
    for k_p, k_i, k_d, step_lr in [(1.0, 0.0, 0.0, 1e-5), (3.0, 0.2, 1.0, 3e-5)]:
        x, _ = _replay(digits_model, golden_run, k_p=k_p, k_i=k_i, k_d=k_d, step_lr=step_lr,
                       k_i_decay=0.99, k_d_decay=0.9)
        assert np.all(np.isfinite(np.asarray(x)))
    assert sampling.trace_count == before


def test_gains_change_the_result(digits_model, golden_run):
    x_pid, _ = _replay(digits_model, golden_run)
    x_plain, record = _replay(digits_model, golden_run, k_p=1.0, k_i=0.0, k_d=0.0)
    assert relative_l2(x_plain, x_pid) > 1e-3
    np.testing.assert_array_equal(record['I_term_norms'], 0.0)
    np.testing.assert_array_equal(record['D_term_norms'], 0.0)


def test_decays_multiply_gains_after_each_step(digits_model, golden_run):
    _, record = _replay(digits_model, golden_run, k_i_decay=0.5, k_d_decay=0.25)
    _, undecayed = _replay(digits_model, golden_run, k_i_decay=1.0, k_d_decay=1.0)
    # The first step uses the initial gains, so the first I and D terms agree.
    np.testing.assert_allclose(record['I_term_norms'][0], undecayed['I_term_norms'][0], rtol=1e-6)
    np.testing.assert_allclose(record['D_term_norms'][0], undecayed['D_term_norms'][0], rtol=1e-6)
    assert record['I_term_norms'][1] < undecayed['I_term_norms'][1]


def test_snapshots_hold_samples_after_given_steps(digits_model, golden_run):
    total = golden_run['noise'].shape[0]
    x_short, _ = _replay(digits_model, golden_run, denoise=False)
    _, record = _replay(digits_model, golden_run, denoise=False, snapshot_steps=[0, total - 1])
    assert record['snapshots'].shape == (2,) + x_short.shape
    np.testing.assert_allclose(record['snapshots'][1], np.asarray(x_short), rtol=0, atol=1e-6)
    assert relative_l2(record['snapshots'][0], x_short) > 1e-3


def test_per_sample_keys_do_not_depend_on_batch(digits_model):
    sigmas = geometric_sigmas(17.0, 0.01, 6)
    keys = jax.random.split(jax.random.key(7), 6)
    x_init = jax.vmap(lambda k: jax.random.uniform(k, (32, 32, 1)))(keys)
    kwargs = dict(n_steps_each=2, step_lr=2e-5, k_p=2.0, k_i=0.5, k_d=4.5)
    with jax.default_matmul_precision('highest'):
        full, _ = pid_ald(digits_model, x_init, sigmas, key=keys, **kwargs)
        head, _ = pid_ald(digits_model, x_init[:2], sigmas, key=keys[:2], **kwargs)
        tail, _ = pid_ald(digits_model, x_init[2:], sigmas, key=keys[2:], **kwargs)
    np.testing.assert_allclose(np.concatenate([head, tail]), full, rtol=0, atol=1e-5)


def test_shared_key_is_reproducible(digits_model):
    sigmas = geometric_sigmas(17.0, 0.01, 4)
    x_init = jnp.full((2, 32, 32, 1), 0.5)
    first, _ = pid_ald(digits_model, x_init, sigmas, key=jax.random.key(1), n_steps_each=1,
                       step_lr=2e-5)
    second, _ = pid_ald(digits_model, x_init, sigmas, key=jax.random.key(1), n_steps_each=1,
                        step_lr=2e-5)
    other, _ = pid_ald(digits_model, x_init, sigmas, key=jax.random.key(2), n_steps_each=1,
                       step_lr=2e-5)
    np.testing.assert_array_equal(first, second)
    assert relative_l2(other, first) > 1e-3


def test_rejects_bad_arguments(digits_model):
    sigmas = geometric_sigmas(17.0, 0.01, 3)
    x_init = jnp.zeros((2, 32, 32, 1))
    with pytest.raises(ValueError, match='n_steps_each'):
        pid_ald(digits_model, x_init, sigmas, key=jax.random.key(0), n_steps_each=0, step_lr=1e-5)
    with pytest.raises(ValueError, match='noise must have shape'):
        pid_ald(digits_model, x_init, sigmas, noise=np.zeros((2, 2, 32, 32, 1)), n_steps_each=1,
                step_lr=1e-5)
    with pytest.raises(ValueError, match='key'):
        pid_ald(digits_model, x_init, sigmas, n_steps_each=1, step_lr=1e-5)
    with pytest.raises(ValueError, match='3 keys for 2 samples'):
        pid_ald(digits_model, x_init, sigmas, key=jax.random.split(jax.random.key(0), 3),
                n_steps_each=1, step_lr=1e-5)


def test_geometric_sigmas_endpoints():
    sigmas = geometric_sigmas(50.0, 0.01, 232)
    assert sigmas.shape == (232,)
    np.testing.assert_allclose([sigmas[0], sigmas[-1]], [50.0, 0.01], rtol=1e-6)
    ratios = sigmas[1:] / sigmas[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-5)
