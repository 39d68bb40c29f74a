"""Tests of exporting ncsn-jax files to the official PyTorch checkpoint layout, and of the
train_state conversion of official checkpoints (Adam state, EMA shadow, epoch, step)."""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import CHECKPOINTS, ROOT, relative_l2
from ncsn_jax import convert, load_score_model, train, train_state
from ncsn_jax.cli import run_main
from ncsn_jax.errors import UserError
from ncsn_jax.models import create_model
from test_train import write_config
from torch_reference import build_model, dsm_loss_torch, load_official_checkpoint

TO_FLAX = [sys.executable, str(ROOT / 'convert' / 'torch_to_flax.py')]
TO_TORCH = [sys.executable, str(ROOT / 'convert' / 'flax_to_torch.py')]
CIFAR_RANDOM = CHECKPOINTS / 'cifar10_ngf16_random.pth'


def run_cli(command, *args):
    return subprocess.run(command + [str(a) for a in args], capture_output=True, text=True)


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def assert_same_tensors(actual: dict, expected: dict):
    assert list(actual) == list(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        assert torch.equal(actual[key], value), key


def assert_same_optimizer_state(actual: dict, expected: dict):
    assert actual['param_groups'] == expected['param_groups']
    assert sorted(actual['state']) == sorted(expected['state'])
    for index, entry in expected['state'].items():
        assert sorted(actual['state'][index]) == sorted(entry), index
        for name, value in entry.items():
            assert torch.equal(actual['state'][index][name], value), (index, name)
            assert actual['state'][index][name].dtype == value.dtype, (index, name)


def round_trip(tmp_path, source):
    """torch -> train_state file -> torch, through the functions behind the two converters."""
    converted = tmp_path / 'state.msgpack'
    exported = tmp_path / 'exported.pth'
    assert convert.convert_train_state_file(source, converted) == 'written'
    convert.export_file(converted, exported)
    return converted, torch.load(exported, weights_only=True)


def test_train_state_cli_round_trip_is_identity(tmp_path):
    original = torch.load(CIFAR_RANDOM, weights_only=True)
    converted = tmp_path / 'state.msgpack'
    exported = tmp_path / 'exported.pth'
    result = run_cli(TO_FLAX, CIFAR_RANDOM, '--out', converted, '--train-state')
    assert result.returncode == 0, result.stderr
    result = run_cli(TO_TORCH, converted, '--out', exported)
    assert result.returncode == 0, result.stderr
    exported = torch.load(exported, weights_only=True)
    assert_same_tensors(exported[0], original[0])
    assert_same_optimizer_state(exported[1], original[1])
    assert exported[2:4] == original[2:4]
    assert_same_tensors(exported[4], original[4])


def test_train_state_round_trip_is_identity(tmp_path):
    original = torch.load(CIFAR_RANDOM, weights_only=True)
    _, exported = round_trip(tmp_path, CIFAR_RANDOM)
    assert len(exported) == len(original) == 5
    assert_same_tensors(exported[0], original[0])
    assert_same_optimizer_state(exported[1], original[1])
    assert exported[2] == original[2]
    assert exported[3] == original[3]
    assert_same_tensors(exported[4], original[4])


def test_train_state_conversion_up_to_date_and_force(tmp_path):
    out = tmp_path / 'state.msgpack'
    assert convert.convert_train_state_file(CIFAR_RANDOM, out) == 'written'
    written = out.read_bytes()
    assert convert.convert_train_state_file(CIFAR_RANDOM, out) == 'up-to-date'
    assert out.read_bytes() == written

    other = CHECKPOINTS / 'cifar10_ngf16_after_step.pth'
    with pytest.raises(UserError, match='already exists and differs'):
        convert.convert_train_state_file(other, out)
    assert out.read_bytes() == written
    assert convert.convert_train_state_file(other, out, force=True) == 'written'
    assert train_state.read_train_state_file(out)['metadata']['step'] == 4


def test_score_model_round_trip_keeps_ema_weights(tmp_path):
    original = torch.load(CIFAR_RANDOM, weights_only=True)
    converted = tmp_path / 'model.msgpack'
    convert.convert_file(CIFAR_RANDOM, converted, ema=True)
    exported = tmp_path / 'model.pth'
    convert.export_file(converted, exported)
    model_state, optimizer_state, epoch, step, shadow = torch.load(exported, weights_only=True)

    assert_same_tensors(shadow, original[4])
    assert torch.equal(model_state['module.sigmas'], original[0]['module.sigmas'])
    assert list(model_state) == list(original[0])
    for key, value in original[4].items():
        assert torch.equal(model_state['module.' + key], value), key
    assert optimizer_state == {'state': {}, 'param_groups': []}
    assert (epoch, step) == (original[2], original[3])


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A two-step run of the trainer with the tiny digits config of test_train."""
    folder = tmp_path_factory.mktemp('tiny_run')
    config = write_config(folder / 'tiny.yml', training={'n_iters': 2})
    assert run_main(train.main, ['--config', str(config), '--exp', str(folder / 'exp')]) == 0
    return next((folder / 'exp').iterdir())


@pytest.mark.parametrize('name', ['score_model.msgpack', 'checkpoints/checkpoint.msgpack'])
def test_trained_model_loads_in_pytorch_with_same_forward(tmp_path, tiny_run, name):
    exported = tmp_path / 'exported.pth'
    convert.export_file(tiny_run / name, exported)
    torch_model, meta = load_official_checkpoint(exported, ema=True)
    assert (meta['architecture'], meta['ngf'], meta['channels'], meta['step']) == \
        ('NCSNv2', 4, 1, 2)

    jax_model = load_score_model(tiny_run / 'score_model.msgpack')
    x = np.random.default_rng(1).uniform(size=(3, 16, 16, 1)).astype(np.float32)
    labels = np.array([0, 4, 9])
    with jax.default_matmul_precision('highest'):
        ours = np.asarray(jax_model(jnp.asarray(x), jax_model.sigmas[labels]))
    with torch.no_grad():
        theirs = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2)),
                             torch.from_numpy(labels)).numpy()
    assert relative_l2(ours.transpose(0, 3, 1, 2), theirs) <= 1e-5


def test_trained_train_state_round_trip_is_identity(tmp_path, tiny_run):
    exported = tmp_path / 'first.pth'
    convert.export_file(tiny_run / 'checkpoints' / 'checkpoint.msgpack', exported)
    first = torch.load(exported, weights_only=True)
    assert first[1]['param_groups'][0]['lr'] == 1e-3
    assert first[1]['param_groups'][0]['betas'] == (0.9, 0.999)
    assert float(first[1]['state'][0]['step']) == 2.0

    _, second = round_trip(tmp_path, exported)
    assert_same_tensors(second[0], first[0])
    assert_same_optimizer_state(second[1], first[1])
    assert second[2:4] == first[2:4]
    assert_same_tensors(second[4], first[4])


@pytest.fixture(scope='module')
def amsgrad_checkpoint(tmp_path_factory):
    """An official-layout checkpoint after two torch AMSGrad steps with weight decay."""
    torch.manual_seed(0)
    sigmas = np.exp(np.linspace(np.log(10.0), np.log(0.05), 10)).astype(np.float32)
    model = build_model('NCSNv2', 4, 1, sigmas)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=1e-3, amsgrad=True)
    shadow = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(2):
        x = torch.rand(4, 1, 16, 16)
        loss = dsm_loss_torch(model, x, torch.randint(0, 10, (4,)), torch.randn_like(x), sigmas)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, p in model.named_parameters():
            shadow[name] = 0.1 * p.detach() + 0.9 * shadow[name]
    state = {'module.' + k: v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp('amsgrad') / 'amsgrad.pth'
    torch.save([state, optimizer.state_dict(), 0, 2, shadow], path)
    return path, model, optimizer, sigmas


def test_amsgrad_state_round_trip_is_identity(tmp_path, amsgrad_checkpoint):
    path = amsgrad_checkpoint[0]
    original = torch.load(path, weights_only=True)
    assert 'max_exp_avg_sq' in original[1]['state'][0]
    _, exported = round_trip(tmp_path, path)
    assert_same_tensors(exported[0], original[0])
    assert_same_optimizer_state(exported[1], original[1])
    assert_same_tensors(exported[4], original[4])


def test_amsgrad_step_continues_like_torch(tmp_path, amsgrad_checkpoint):
    path, model, optimizer, sigmas = amsgrad_checkpoint
    payload = convert.train_state_from_checkpoint(
        convert.split_checkpoint(convert.load_torch_file(path), path), path)
    settings = train_state.AdamSettings(lr=1e-3, weight_decay=1e-3, amsgrad=True)
    jax_optimizer = train_state.make_optimizer(settings)
    state = train.state_from_payload(payload, jax_optimizer, ema=True)

    generator = np.random.default_rng(5)
    x = generator.uniform(size=(4, 1, 16, 16)).astype(np.float32)
    z = generator.normal(size=(4, 1, 16, 16)).astype(np.float32)
    labels = np.array([0, 3, 6, 9])
    loss = dsm_loss_torch(model, torch.from_numpy(x), torch.from_numpy(labels),
                          torch.from_numpy(z), sigmas)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    module = create_model('NCSNv2', 4, 1)
    step = jax.jit(functools.partial(train.apply_step, module=module, optimizer=jax_optimizer,
                                     anneal_power=2.0, ema_rate=0.9))
    with jax.default_matmul_precision('highest'):
        new_state, jax_loss = step(state, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                   jnp.asarray(labels), jnp.asarray(z.transpose(0, 2, 3, 1)),
                                   jnp.asarray(sigmas))
    torch_loss = float(loss.detach())
    assert abs(float(jax_loss) - torch_loss) / torch_loss <= 1e-5

    torch_params = {k: v.detach().numpy() for k, v in model.named_parameters()}
    ours = convert.state_dict_from_params(jax.tree.map(np.asarray, new_state.params))
    keys = sorted(torch_params)
    assert relative_l2(np.concatenate([ours[k].ravel() for k in keys]),
                       np.concatenate([torch_params[k].ravel() for k in keys])) <= 1e-6
    adam = train_state.adam_state_to_tree(new_state.opt_state)
    nu_max = convert.state_dict_from_params(adam['nu_max'])
    torch_nu_max = {name: optimizer.state[p]['max_exp_avg_sq'].numpy()
                    for name, p in model.named_parameters()}
    assert relative_l2(np.concatenate([nu_max[k].ravel() for k in keys]),
                       np.concatenate([torch_nu_max[k].ravel() for k in keys])) <= 1e-5
    assert int(adam['count']) == 3


# ---------------------------------------------------------------------------------------------
# Command-line errors


def test_export_refuses_existing_output_without_force(tmp_path, tiny_run):
    out = tmp_path / 'model.pth'
    out.write_bytes(b'keep me')
    result = run_cli(TO_TORCH, tiny_run / 'score_model.msgpack', '--out', out)
    assert_one_line_error(result, 'already exists', '--force')
    assert out.read_bytes() == b'keep me'

    convert.export_file(tiny_run / 'score_model.msgpack', out, force=True)
    assert len(torch.load(out, weights_only=True)) == 5


def test_export_rejects_file_that_is_not_ncsn_jax(tmp_path):
    source = tmp_path / 'random.msgpack'
    source.write_bytes(os.urandom(256))
    out = tmp_path / 'out.pth'
    assert_one_line_error(run_cli(TO_TORCH, source, '--out', out), 'not an ncsn-jax parameter file')
    assert not out.exists()


def test_export_rejects_pytorch_and_truncated_files(tmp_path, tiny_run):
    out = tmp_path / 'out.pth'
    assert_one_line_error(run_cli(TO_TORCH, CIFAR_RANDOM, '--out', out), 'is a PyTorch file',
                          'torch_to_flax.py')
    truncated = tmp_path / 'truncated.msgpack'
    truncated.write_bytes((tiny_run / 'score_model.msgpack').read_bytes()[:5000])
    assert_one_line_error(run_cli(TO_TORCH, truncated, '--out', out), 'truncated or damaged')
    assert not out.exists()


def test_export_without_torch_one_line(tmp_path, tiny_run):
    out = tmp_path / 'out.pth'
    # None in sys.modules makes `import torch` raise ImportError, as if torch were not installed.
    code = ('import runpy, sys; sys.modules["torch"] = None; '
            f'sys.argv = ["flax_to_torch.py", {str(tiny_run / "score_model.msgpack")!r}, '
            f'"--out", {str(out)!r}]; '
            f'runpy.run_path({str(ROOT / "convert" / "flax_to_torch.py")!r}, run_name="__main__")')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert_one_line_error(result, 'writing PyTorch checkpoints needs torch', 'torch==2.13.0')
    assert not out.exists()


def test_train_state_sampling_hint(tiny_run):
    with pytest.raises(UserError, match="'train_state' file, expected 'score_model'; .*"
                                        'score_model.msgpack'):
        load_score_model(tiny_run / 'checkpoints' / 'checkpoint.msgpack')


def test_export_rejects_missing_file(tmp_path):
    out = tmp_path / 'out.pth'
    with pytest.raises(UserError, match='not found'):
        convert.export_file(tmp_path / 'missing.msgpack', out)
    assert not out.exists()


def test_train_state_converter_rejects_no_ema_flag(tmp_path):
    out = tmp_path / 'state.msgpack'
    result = run_cli(TO_FLAX, CIFAR_RANDOM, '--out', out, '--train-state', '--no-ema')
    assert_one_line_error(result, '--no-ema')
    assert not out.exists()


def test_train_state_converter_rejects_foreign_optimizer_state(tmp_path):
    original = torch.load(CIFAR_RANDOM, weights_only=True)
    del original[1]['state'][5]
    source = tmp_path / 'broken.pth'
    torch.save(original, source)
    out = tmp_path / 'state.msgpack'
    with pytest.raises(UserError, match='no entry for parameter 5'):
        convert.convert_train_state_file(source, out)
    assert not out.exists()


def test_package_imports_torch_only_in_convert():
    sources = sorted((ROOT / 'ncsn_jax').rglob('*.py'))
    importing = [p.relative_to(ROOT).as_posix() for p in sources
                 if 'import torch' in p.read_text()]
    assert importing == ['ncsn_jax/convert.py']
    code = ('import sys, ncsn_jax.train, ncsn_jax.data, ncsn_jax.train_state, ncsn_jax.convert; '
            'sys.exit(1 if "torch" in sys.modules else 0)')
    result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr
