"""Tests of the trainer: official loss and step parity, Adam and EMA arithmetic, exact resume,
continuing official checkpoints, and one-line errors for bad input."""

import functools
import logging
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml

from conftest import CHECKPOINTS, GOLDEN, ROOT, relative_l2
from main_runs import cpu_env
from ncsn_jax import convert, train, train_state
from ncsn_jax.cli import run_main
from ncsn_jax.errors import UserError
from ncsn_jax.models import create_model

TRAIN = [sys.executable, '-m', 'ncsn_jax.train']
CIFAR_RANDOM = CHECKPOINTS / 'cifar10_ngf16_random.pth'
CIFAR_AFTER_STEP = CHECKPOINTS / 'cifar10_ngf16_after_step.pth'

# A tiny model on the built-in digits: NCSNv2 ngf 4 at 16x16, 10 noise levels, batch 8.
TINY_CONFIG = {
    'data': {'dataset': 'digits', 'image_size': 16, 'channels': 1, 'random_flip': True,
             'uniform_dequantization': True},
    'model': {'architecture': 'NCSNv2', 'ngf': 4, 'sigma_begin': 10.0, 'sigma_end': 0.05,
              'num_classes': 10, 'ema_rate': 0.9},
    'sampling': {'batch_size': 4, 'step_lr': 1e-4, 'n_steps_each': 1},
    'training': {'batch_size': 8, 'n_iters': 4, 'snapshot_freq': 2, 'snapshot_sampling': False},
    'optim': {'lr': 1e-3},
}

# The geometry of cifar10_ngf16_random.pth, for continuing it.
CIFAR_CONFIG = {
    'data': {'dataset': 'CIFAR10', 'image_size': 32, 'channels': 3, 'random_flip': False},
    'model': {'architecture': 'NCSNv2', 'ngf': 16, 'sigma_begin': 50.0, 'sigma_end': 0.01,
              'num_classes': 232, 'ema_rate': 0.999},
    'sampling': {'batch_size': 4, 'step_lr': 6.2e-6, 'n_steps_each': 1},
    'training': {'batch_size': 6, 'n_iters': 4, 'snapshot_freq': 1000, 'snapshot_sampling': False},
    'optim': {'lr': 1e-3},
}


def write_config(path, base=TINY_CONFIG, **sections):
    config = {name: dict(values) for name, values in base.items()}
    for name, values in sections.items():
        config[name].update(values)
    path.write_text(yaml.safe_dump(config))
    return path


def run_train(*args, cwd, devices=None):
    """Run the trainer in a subprocess, on `devices` CPU devices when given."""
    env = dict(cpu_env(devices) if devices else os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(TRAIN + [str(a) for a in args], capture_output=True, text=True, cwd=cwd,
                          env=env)


def only_run_dir(exp):
    runs = sorted(p for p in exp.iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def read_state(path):
    return train_state.read_train_state_file(path)


def assert_trees_equal(actual, expected):
    actual_leaves = jax.tree_util.tree_leaves_with_path(actual)
    expected_leaves = jax.tree.leaves(expected)
    assert len(actual_leaves) == len(expected_leaves)
    for (path, a), b in zip(actual_leaves, expected_leaves):
        assert np.array_equal(np.asarray(a), np.asarray(b)), jax.tree_util.keystr(path)


def tree_relative_l2(actual, expected):
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(v, np.float64))
                                        for v in jax.tree.leaves(tree)])
    return relative_l2(flat(actual), flat(expected))


def payload_of(path):
    return convert.train_state_from_checkpoint(
        convert.split_checkpoint(convert.load_torch_file(path), path), path)


# ---------------------------------------------------------------------------------------------
# Parity with one official training step


@pytest.fixture(scope='module', params=['eager', 'jit'])
def official_step(request):
    """One JAX step from cifar10_ngf16_random.pth on the stored batch, labels and noise.

    'eager' runs `apply_step` op by op, 'jit' compiles it as the trainer does.
    """
    golden = np.load(GOLDEN / 'train_step_cifar10_ngf16.npz')
    before = payload_of(CIFAR_RANDOM)
    after = payload_of(CIFAR_AFTER_STEP)
    optimizer = train_state.make_optimizer(train_state.AdamSettings(lr=1e-3))
    state = train.state_from_payload(before, optimizer, ema=True)
    metadata = before['metadata']
    module = create_model(metadata['architecture'], metadata['ngf'], metadata['channels'])
    step = functools.partial(train.apply_step, module=module, optimizer=optimizer,
                             anneal_power=float(golden['anneal_power']),
                             ema_rate=float(golden['ema_rate']))
    if request.param == 'jit':
        step = jax.jit(step, compiler_options=train.step_compiler_options(jax.default_backend()))
    with jax.default_matmul_precision('highest'):
        new_state, loss = step(state, jnp.asarray(golden['x'].transpose(0, 2, 3, 1)),
                               jnp.asarray(golden['labels']),
                               jnp.asarray(golden['z'].transpose(0, 2, 3, 1)),
                               jnp.asarray(before['extra']['sigmas']))
    return {'golden': golden, 'before': before, 'after': after, 'state': new_state,
            'loss': float(loss), 'adam': train_state.adam_state_to_tree(new_state.opt_state),
            'mode': request.param}


def test_loss_matches_official_loss(official_step):
    expected = float(official_step['golden']['loss'])
    assert abs(official_step['loss'] - expected) / expected <= 1e-5


def test_step_params_match_official(official_step):
    error = tree_relative_l2(official_step['state'].params, official_step['after']['params'])
    assert error <= 1e-5, error


def test_step_update_matches_official(official_step):
    # The change of the parameters is about 1e-3 of their size, so compare it on its own too.
    before = official_step['before']['params']
    ours = jax.tree.map(lambda a, b: np.asarray(a) - b, official_step['state'].params, before)
    theirs = jax.tree.map(lambda a, b: a - b, official_step['after']['params'], before)
    assert tree_relative_l2(ours, theirs) <= 1e-5


@pytest.mark.parametrize('name', ['mu', 'nu'])
def test_step_adam_moments_match_official(official_step, name):
    error = tree_relative_l2(official_step['adam'][name],
                             official_step['after']['extra']['adam'][name])
    assert error <= 1e-5, error


def test_compiled_gradients_match_float64():
    golden = np.load(GOLDEN / 'train_step_cifar10_ngf16.npz')
    before = payload_of(CIFAR_RANDOM)
    metadata = before['metadata']
    module = create_model(metadata['architecture'], metadata['ngf'], metadata['channels'])
    loss_and_grad = jax.value_and_grad(
        lambda params, x, labels, z, sigmas: train.dsm_loss(module, params, x, labels, z, sigmas,
                                                            float(golden['anneal_power'])))
    inputs = (before['params'], golden['x'].transpose(0, 2, 3, 1), golden['labels'],
              golden['z'].transpose(0, 2, 3, 1), before['extra']['sigmas'])

    def gradients(dtype, **jit_options):
        cast = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, dtype), tree)
        arguments = [cast(inputs[0]), cast(inputs[1]), jnp.asarray(inputs[2]), cast(inputs[3]),
                     cast(inputs[4])]
        with jax.default_matmul_precision('highest'):
            return jax.tree.map(np.asarray, jax.jit(loss_and_grad, **jit_options)(*arguments)[1])

    with jax.enable_x64(True):
        exact = gradients(jnp.float64)
    options = train.step_compiler_options(jax.default_backend())
    assert tree_relative_l2(gradients(jnp.float32, compiler_options=options), exact) <= 1e-5


def test_step_adam_count_matches_official(official_step):
    assert int(official_step['adam']['count']) == 4
    assert int(official_step['after']['extra']['adam']['count']) == 4
    assert int(official_step['state'].step) == official_step['after']['metadata']['step'] == 4


def test_step_ema_matches_official(official_step):
    error = tree_relative_l2(official_step['state'].ema_params,
                             official_step['after']['extra']['ema_params'])
    assert error <= 1e-5, error


# ---------------------------------------------------------------------------------------------
# Optimizer and EMA arithmetic


@pytest.mark.parametrize('amsgrad', [False, True])
def test_adam_matches_torch_adam(amsgrad):
    rng = np.random.default_rng(0)
    initial = {'a': rng.normal(size=(3, 4)).astype(np.float32),
               'b': rng.normal(size=(5,)).astype(np.float32)}
    grads = [{name: rng.normal(size=value.shape).astype(np.float32) * scale
              for name, value in initial.items()} for scale in (1.0, 0.1, 3.0, 0.01, 1.0)]
    settings = train_state.AdamSettings(lr=1e-2, beta1=0.8, eps=1e-6, weight_decay=0.1,
                                        amsgrad=amsgrad)

    tensors = {name: torch.nn.Parameter(torch.from_numpy(value.copy()))
               for name, value in initial.items()}
    torch_adam = torch.optim.Adam(tensors.values(), lr=settings.lr, betas=(0.8, 0.999), eps=1e-6,
                                  weight_decay=0.1, amsgrad=amsgrad)
    optimizer = train_state.make_optimizer(settings)
    params = jax.tree.map(jnp.asarray, initial)
    opt_state = optimizer.init(params)
    for grad in grads:
        for name, tensor in tensors.items():
            tensor.grad = torch.from_numpy(grad[name].copy())
        torch_adam.step()
        updates, opt_state = optimizer.update(jax.tree.map(jnp.asarray, grad), opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    for name, tensor in tensors.items():
        np.testing.assert_allclose(np.asarray(params[name]), tensor.detach().numpy(), rtol=1e-6,
                                   atol=1e-7)
        torch_state = torch_adam.state[tensor]
        adam = train_state.adam_state_to_tree(opt_state)
        np.testing.assert_allclose(adam['mu'][name], torch_state['exp_avg'].numpy(), rtol=1e-6)
        np.testing.assert_allclose(adam['nu'][name], torch_state['exp_avg_sq'].numpy(), rtol=1e-6)
        if amsgrad:
            np.testing.assert_allclose(adam['nu_max'][name],
                                       torch_state['max_exp_avg_sq'].numpy(), rtol=1e-6)
        assert int(adam['count']) == int(torch_state['step'])


def test_ema_update_known_values():
    shadow = {'w': jnp.array([1.0, -2.0, 0.0])}
    params = {'w': jnp.array([3.0, 2.0, 10.0])}
    updated = train_state.update_ema(shadow, params, 0.9)
    np.testing.assert_allclose(np.asarray(updated['w']), [1.2, -1.6, 1.0], rtol=1e-6)


def test_ema_after_step_mixes_shadow_and_params(official_step):
    rate = float(official_step['golden']['ema_rate'])
    expected = jax.tree.map(lambda shadow, param: rate * shadow + (1 - rate) * np.asarray(param),
                            official_step['before']['extra']['ema_params'],
                            official_step['state'].params)
    assert tree_relative_l2(official_step['state'].ema_params, expected) <= 1e-6


def test_other_optimizers_rejected():
    from ncsn_jax.config import config_from_dict
    config = config_from_dict(dict(TINY_CONFIG, optim={'optimizer': 'RMSProp', 'lr': 1e-3}))
    with pytest.raises(UserError, match="optim.optimizer 'RMSProp' is not supported"):
        train_state.AdamSettings.from_config(config.optim)


def test_init_params_follow_pytorch_defaults():
    module = create_model('NCSNv2', 4, 1)
    params = train_state.init_params(module, jax.random.key(0), 16, 1)
    again = train_state.init_params(module, jax.random.key(0), 16, 1)
    assert_trees_equal(params, again)

    kernel = np.asarray(params['res2_0']['conv1']['kernel'])
    bound = 1 / np.sqrt(3 * 3 * 4)
    assert kernel.shape == (3, 3, 4, 4)
    assert np.abs(kernel).max() <= bound
    assert np.abs(kernel).max() > 0.9 * bound
    bias = np.asarray(params['res2_0']['conv1']['bias'])
    assert np.abs(bias).max() <= bound
    assert np.abs(bias).max() > 0
    alpha = np.asarray(params['normalizer']['alpha'])
    assert alpha.min() > 0.9
    assert alpha.max() < 1.1
    assert alpha.std() > 0
    np.testing.assert_array_equal(np.asarray(params['normalizer']['beta']), 0.0)
    # The tree has exactly the module's parameters, so the network runs on it.
    out = module.apply({'params': params}, jnp.zeros((1, 16, 16, 1)))
    assert out.shape == (1, 16, 16, 1)


# ---------------------------------------------------------------------------------------------
# Runs, resume and continuing official checkpoints


@pytest.fixture(scope='module')
def tiny_config(tmp_path_factory):
    return write_config(tmp_path_factory.mktemp('config') / 'tiny.yml')


def train_in_process(*args):
    assert run_main(train.main, [str(a) for a in args]) == 0


def test_killed_run_resumes_bitwise(tmp_path, tiny_config):
    killed_exp = tmp_path / 'killed'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(TRAIN + ['--config', str(tiny_config), '--exp', str(killed_exp),
                                        '--n_iters', '100000', '--seed', '7'],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    latest = None
    while time.monotonic() < deadline and process.poll() is None:
        runs = list(killed_exp.glob('*/checkpoints/checkpoint.msgpack'))
        if runs:
            latest = runs[0]
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest is not None, 'no checkpoint appeared within 120 s'
    assert process.returncode == -signal.SIGKILL

    run_dir = latest.parent.parent
    killed_at = read_state(latest)['metadata']['step']
    assert killed_at >= 2
    assert killed_at % 2 == 0
    final = killed_at + 2
    train_in_process('--resume', run_dir, '--n_iters', final)
    straight_exp = tmp_path / 'straight'
    train_in_process('--config', tiny_config, '--exp', straight_exp, '--n_iters', final,
                     '--seed', 7)

    straight_dir = only_run_dir(straight_exp)
    ours = read_state(run_dir / 'checkpoints' / f'checkpoint_{final}.msgpack')
    reference = read_state(straight_dir / 'checkpoints' / f'checkpoint_{final}.msgpack')
    assert ours['metadata']['step'] == reference['metadata']['step'] == final
    assert_trees_equal(ours['params'], reference['params'])
    assert_trees_equal(ours['extra']['ema_params'], reference['extra']['ema_params'])
    assert_trees_equal(ours['extra']['adam'], reference['extra']['adam'])
    assert ours['metadata']['data'] == reference['metadata']['data']
    log_lines = (run_dir / 'train_log.csv').read_text().splitlines()
    assert log_lines == (straight_dir / 'train_log.csv').read_text().splitlines()
    assert len(log_lines) == final + 1


def test_clean_stop_then_resume_bitwise(tmp_path, tiny_config):
    train_in_process('--config', tiny_config, '--exp', tmp_path / 'a', '--n_iters', 2)
    run_dir = only_run_dir(tmp_path / 'a')
    train_in_process('--resume', run_dir, '--n_iters', 4)
    train_in_process('--config', tiny_config, '--exp', tmp_path / 'b')

    ours = read_state(run_dir / 'checkpoints' / 'checkpoint.msgpack')
    reference = read_state(only_run_dir(tmp_path / 'b') / 'checkpoints' / 'checkpoint.msgpack')
    assert ours['metadata']['step'] == 4
    assert_trees_equal(ours['params'], reference['params'])
    assert_trees_equal(ours['extra']['adam'], reference['extra']['adam'])
    assert_trees_equal(ours['extra']['ema_params'], reference['extra']['ema_params'])

    # The run's score model loads as main.py loads it and contains the EMA weights.
    from ncsn_jax import load_score_model
    model = load_score_model(run_dir / 'score_model.msgpack', ema=True)
    assert_trees_equal(model.params, ours['extra']['ema_params'])


def test_resume_with_other_seed_rejected(tmp_path, tiny_config, caplog):
    train_in_process('--config', tiny_config, '--exp', tmp_path / 'a', '--n_iters', 2)
    run_dir = only_run_dir(tmp_path / 'a')
    before = sorted(p.name for p in run_dir.rglob('*'))
    status, errors = run_in_process(['--resume', run_dir, '--seed', 99], caplog)
    assert status == 2
    assert len(errors) == 1
    assert '--seed 1234' in errors[0]
    assert sorted(p.name for p in run_dir.rglob('*')) == before


def test_run_writes_samples_when_snapshot_sampling(tmp_path):
    config = write_config(tmp_path / 'sampling.yml', training={'n_iters': 2,
                                                               'snapshot_sampling': True})
    assert run_main(train.main, ['--config', str(config), '--exp', str(tmp_path / 'exp')]) == 0
    grid = only_run_dir(tmp_path / 'exp') / 'samples' / 'image_grid_2.png'
    from PIL import Image
    with Image.open(grid) as image:
        assert image.mode == 'L'
        assert image.size == (6 * 18 + 2, 6 * 18 + 2)


@pytest.fixture(scope='module')
def cifar_data(tmp_path_factory):
    path = tmp_path_factory.mktemp('cifar_data') / 'images.npz'
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.savez(path, images=images)
    return path


def test_init_from_official_checkpoint_continues(tmp_path, cifar_data):
    config = write_config(tmp_path / 'cifar.yml', base=CIFAR_CONFIG)
    common = ['--config', str(config), '--data', str(cifar_data), '--seed', '3']
    assert run_main(train.main, common + ['--init-from', str(CIFAR_RANDOM),
                                          '--exp', str(tmp_path / 'pth')]) == 0

    converted = tmp_path / 'state.msgpack'
    convert.convert_train_state_file(CIFAR_RANDOM, converted)
    assert run_main(train.main, common + ['--init-from', str(converted),
                                          '--exp', str(tmp_path / 'msgpack')]) == 0

    from_pth = read_state(only_run_dir(tmp_path / 'pth') / 'checkpoints' / 'checkpoint.msgpack')
    from_msgpack = read_state(only_run_dir(tmp_path / 'msgpack') / 'checkpoints' /
                              'checkpoint.msgpack')
    # The official checkpoint stopped at step 3 (Adam count 3); n_iters 4 adds one step.
    assert from_pth['metadata']['step'] == 4
    assert int(from_pth['extra']['adam']['count']) == 4
    assert_trees_equal(from_pth['params'], from_msgpack['params'])
    assert_trees_equal(from_pth['extra']['adam'], from_msgpack['extra']['adam'])
    start = payload_of(CIFAR_RANDOM)
    assert tree_relative_l2(from_pth['params'], start['params']) > 0


def test_data_path_key_matches_flag(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    images = np.random.default_rng(1).integers(0, 256, (10, 16, 16, 1), dtype=np.uint8)
    np.savez(tmp_path / 'gray.npz', images=images)
    flag_config = write_config(tmp_path / 'flag.yml', data={'dataset': 'gray'},
                               training={'n_iters': 2})
    key_config = write_config(tmp_path / 'key.yml', training={'n_iters': 2},
                              data={'dataset': 'gray', 'path': str(tmp_path / 'gray.npz')})
    assert run_main(train.main, ['--config', str(flag_config), '--data',
                                 str(tmp_path / 'gray.npz'), '--exp', str(tmp_path / 'flag')]) == 0
    assert run_main(train.main, ['--config', str(key_config), '--exp', str(tmp_path / 'key')]) == 0
    from_flag = read_state(only_run_dir(tmp_path / 'flag') / 'checkpoints' / 'checkpoint.msgpack')
    from_key = read_state(only_run_dir(tmp_path / 'key') / 'checkpoints' / 'checkpoint.msgpack')
    assert from_key['metadata']['data'] == from_flag['metadata']['data']
    assert_trees_equal(from_key['params'], from_flag['params'])
    # Records logged before the run folder existed reach its log too.
    log_text = (only_run_dir(tmp_path / 'key') / 'stdout.txt').read_text()
    assert 'training data: 10 images of 16x16x1 from' in log_text
    assert 'trained 2 steps' in log_text


def test_resume_keeps_recorded_data(tmp_path, monkeypatch, caplog):
    rng = np.random.default_rng(2)
    (tmp_path / 'data').mkdir()
    for name in ('config_data', 'flag_data'):
        np.savez(tmp_path / 'data' / f'{name}.npz',
                 images=rng.integers(0, 256, (10, 16, 16, 1), dtype=np.uint8))
    config = write_config(tmp_path / 'gray.yml', training={'n_iters': 2},
                          data={'dataset': 'gray', 'path': str(tmp_path / 'data' / 'config_data.npz')})
    # A relative --data path, given in one folder, and a resume started from another.
    monkeypatch.chdir(tmp_path)
    train_in_process('--config', config, '--data', 'data/flag_data.npz', '--exp', tmp_path / 'exp')
    run_dir = only_run_dir(tmp_path / 'exp')
    assert yaml.safe_load((run_dir / 'args.yml').read_text())['data'] == str(
        tmp_path / 'data' / 'flag_data.npz')
    other = tmp_path / 'other'
    other.mkdir()
    monkeypatch.chdir(other)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='ncsn_jax'):
        train_in_process('--resume', run_dir, '--n_iters', 4)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    state = read_state(run_dir / 'checkpoints' / 'checkpoint.msgpack')
    assert state['metadata']['step'] == 4
    assert state['metadata']['data']['source'] == str(tmp_path / 'data' / 'flag_data.npz')


def test_two_devices_match_one_device(tmp_path, tiny_config):
    runs = {}
    for devices in (1, 2):
        exp = tmp_path / f'exp_{devices}'
        result = run_train('--config', tiny_config, '--exp', exp, '--n_iters', 1, cwd=tmp_path,
                           devices=devices)
        assert result.returncode == 0, result.stderr
        assert f'on {devices} device(s), batch 8' in result.stderr
        runs[devices] = read_state(only_run_dir(exp) / 'checkpoints' / 'checkpoint.msgpack')
    # Each device takes half of the batch, and the gradients are summed across the two. The runs
    # take one step because Adam's first updates are close to lr * sign(gradient), so rounding
    # differences in near-zero gradients grow. After 3 steps the parameters differed by 1.2e-5
    # and Adam's first moments by 6e-4, while the losses still agreed to 1e-7.
    assert runs[2]['metadata']['step'] == 1
    for name in ('mu', 'nu'):
        error = tree_relative_l2(runs[2]['extra']['adam'][name], runs[1]['extra']['adam'][name])
        assert error <= 1e-5, (name, error)
    assert tree_relative_l2(runs[2]['params'], runs[1]['params']) <= 1e-6


def test_batch_not_divisible_by_devices_rejected(tmp_path):
    config = write_config(tmp_path / 'odd.yml', training={'batch_size': 7})
    result = run_train('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path, devices=2)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'training.batch_size 7 is not divisible by the 2 local devices' in lines[0]
    assert not (tmp_path / 'exp').exists()


# ---------------------------------------------------------------------------------------------
# Bad input: one-line errors, exit status 2, nothing written


def run_in_process(argv, caplog):
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger='ncsn_jax'):
        status = run_main(train.main, [str(a) for a in argv])
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    return status, errors


def assert_rejected(tmp_path, argv, caplog, *fragments):
    exp = tmp_path / 'exp'
    status, errors = run_in_process(list(argv) + ['--exp', exp], caplog)
    assert status == 2
    assert len(errors) == 1, errors
    assert '\n' not in errors[0]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not exp.exists() or not any(exp.iterdir())


def test_cli_empty_image_folder_one_line(tmp_path, tiny_config):
    empty = tmp_path / 'empty'
    empty.mkdir()
    result = run_train('--config', tiny_config, '--data', empty, '--exp', tmp_path / 'exp',
                       cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    assert 'no images found' in lines[0]
    assert not (tmp_path / 'exp').exists()


def test_file_that_is_not_an_image_rejected(tmp_path, tiny_config, caplog):
    folder = tmp_path / 'images'
    folder.mkdir()
    (folder / 'notes.png').write_text('this is not a PNG file')
    assert_rejected(tmp_path, ['--config', tiny_config, '--data', folder], caplog,
                    'cannot read image', 'notes.png')


def test_channels_contradicting_data_rejected(tmp_path, caplog):
    config = write_config(tmp_path / 'rgb.yml', data={'channels': 3})
    assert_rejected(tmp_path, ['--config', config], caplog, 'data.channels is 3',
                    'has 1 channel(s)')


def test_colour_folder_with_one_channel_rejected(tmp_path, tiny_config, caplog):
    from PIL import Image
    folder = tmp_path / 'colour'
    folder.mkdir()
    pixels = np.zeros((16, 16, 3), np.uint8)
    pixels[..., 0] = 255
    Image.fromarray(pixels).save(folder / 'red.png')
    assert_rejected(tmp_path, ['--config', tiny_config, '--data', folder], caplog,
                    'data.channels is 1', 'colour images', 'red.png')


def test_dataset_without_path_rejected(tmp_path, caplog):
    config = write_config(tmp_path / 'gray.yml', data={'dataset': 'gray'})
    assert_rejected(tmp_path, ['--config', config], caplog, "data.dataset 'gray'",
                    'set data.path', '--data')


def test_missing_data_path_names_its_origin(tmp_path, caplog):
    config = write_config(tmp_path / 'gray.yml', data={'dataset': 'gray', 'path': 'absent.npz'})
    assert_rejected(tmp_path, ['--config', config], caplog, 'training data not found: absent.npz',
                    'data.path of', 'gray.yml')
    assert_rejected(tmp_path, ['--config', config, '--data', tmp_path / 'gone'], caplog,
                    'training data not found', 'from --data')


def test_unsupported_optimizer_rejected(tmp_path, caplog):
    config = write_config(tmp_path / 'sgd.yml', optim={'optimizer': 'SGD'})
    assert_rejected(tmp_path, ['--config', config], caplog, "optim.optimizer 'SGD'")


def test_init_from_mismatched_model_rejected(tmp_path, tiny_config, caplog):
    assert_rejected(tmp_path, ['--config', tiny_config, '--init-from', CIFAR_RANDOM], caplog,
                    'ngf 16', 'use the matching config')


def test_init_from_mismatched_sigmas_rejected(tmp_path, cifar_data, caplog):
    config = write_config(tmp_path / 'cifar.yml', base=CIFAR_CONFIG, model={'num_classes': 100})
    assert_rejected(tmp_path, ['--config', config, '--data', cifar_data, '--init-from',
                               CIFAR_RANDOM], caplog, '232 noise levels', 'num_classes')


def test_batch_larger_than_data_rejected(tmp_path, cifar_data, caplog):
    config = write_config(tmp_path / 'cifar.yml', base=CIFAR_CONFIG,
                          training={'batch_size': 64})
    assert_rejected(tmp_path, ['--config', config, '--data', cifar_data], caplog,
                    '6 images', 'training.batch_size 64')


def test_resume_without_checkpoint_rejected(tmp_path, tiny_config, caplog):
    run_dir = tmp_path / 'run'
    run_dir.mkdir()
    (run_dir / 'config.yml').write_text(tiny_config.read_text())
    status, errors = run_in_process(['--resume', run_dir], caplog)
    assert status == 2
    assert len(errors) == 1
    assert 'has no checkpoint yet' in errors[0]
    assert sorted(p.name for p in run_dir.iterdir()) == ['config.yml']


def test_missing_config_rejected(tmp_path, caplog):
    assert_rejected(tmp_path, [], caplog, '--config')


def test_nonpositive_n_iters_rejected(tmp_path, tiny_config, caplog):
    assert_rejected(tmp_path, ['--config', tiny_config, '--n_iters', 0], caplog, '--n_iters')
