import json
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from conftest import (CHECKPOINTS, DATA, DIGITS_CHECKPOINT, ROOT, assert_one_line_error,
                      relative_l2)
from ncsn_jax import checkpoint, load_score_model
from ncsn_jax.convert import (convert_file, expected_param_shapes, flax_path,
                              state_dict_from_params, torch_key)
from ncsn_jax.errors import UserError

CLI = [sys.executable, str(ROOT / 'convert' / 'torch_to_flax.py')]


def run_cli(*args, cwd=ROOT):
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, cwd=cwd)


def forward(path, x):
    model = load_score_model(path)
    with jax.default_matmul_precision('highest'):
        return np.asarray(model(x, 0.3))


@pytest.fixture(scope='module')
def digits_list():
    return torch.load(DIGITS_CHECKPOINT, weights_only=True)


@pytest.fixture(scope='module')
def probe():
    return np.asarray(jax.random.uniform(jax.random.key(3), (2, 32, 32, 1)))


def test_key_mapping_round_trips():
    for key in ['res2.0.conv2.conv.weight', 'refine31.adapt_convs.1.2_1_conv.weight',
                'refine1.crp.convs.0.weight', 'normalizer.alpha', 'res31.1.conv1.bias']:
        assert torch_key(flax_path(key)) == key
    assert flax_path('res2.0.conv2.conv.weight') == ('res2_0', 'conv2', 'conv', 'kernel')


@pytest.mark.parametrize('name', ['cifar10', 'church', 'ffhq', 'celeba', 'bedroom', 'tower'])
def test_module_keys_match_official_manifest(name):
    manifest = json.loads((DATA / 'manifests' / f'ncsnv2_{name}.json').read_text())
    official = {k[len('module.'):]: tuple(shape) for k, shape, _ in manifest['model_state_dict']
                if k != 'module.sigmas'}
    ours = expected_param_shapes(manifest['architecture'], manifest['ngf'], manifest['channels'])
    assert ours == official
    assert sum(int(np.prod(s)) for s in ours.values()) == manifest['parameter_count']


def test_input_variants_convert_to_same_weights(tmp_path, digits_list, probe):
    model_state, ema_shadow = digits_list[0], digits_list[4]
    bare = {k[len('module.'):]: v for k, v in model_state.items()}
    ema_bare = dict(bare, **ema_shadow)
    variants = {
        'list': (digits_list, True),
        'list_raw': (digits_list, False),
        'bare_prefixed': (model_state, True),
        'bare': (bare, True),
        'ema_as_state_dict': (ema_bare, True),
    }
    outputs = {}
    for name, (obj, ema) in variants.items():
        source = tmp_path / f'{name}.pth'
        torch.save(obj, source)
        out = tmp_path / f'{name}.msgpack'
        assert convert_file(source, out, ema=ema) == 'written'
        outputs[name] = forward(out, probe)
    np.testing.assert_array_equal(outputs['list_raw'], outputs['bare_prefixed'])
    np.testing.assert_array_equal(outputs['list_raw'], outputs['bare'])
    np.testing.assert_array_equal(outputs['list'], outputs['ema_as_state_dict'])
    assert relative_l2(outputs['list'], outputs['list_raw']) > 1e-4


def test_metadata_records_source_and_options(tmp_path):
    out = tmp_path / 'digits.msgpack'
    convert_file(DIGITS_CHECKPOINT, out)
    payload = checkpoint.read_params_file(out, kind='score_model')
    metadata = payload['metadata']
    assert metadata['architecture'] == 'NCSNv2'
    assert metadata['ngf'] == 16
    assert metadata['channels'] == 1
    assert metadata['ema'] is True
    assert len(metadata['source_sha256']) == 64
    assert payload['extra']['sigmas'].shape == (100,)


def test_exported_state_dict_equals_source(tmp_path, digits_list):
    out = tmp_path / 'raw.msgpack'
    convert_file(DIGITS_CHECKPOINT, out, ema=False)
    params = checkpoint.read_params_file(out)['params']
    exported = state_dict_from_params(params)
    source = {k[len('module.'):]: v.numpy() for k, v in digits_list[0].items() if k != 'module.sigmas'}
    assert exported.keys() == source.keys()
    for key, value in source.items():
        np.testing.assert_array_equal(exported[key], value)


def test_load_with_other_weights_kind_rejected(tmp_path):
    out = tmp_path / 'digits.msgpack'
    convert_file(DIGITS_CHECKPOINT, out)
    load_score_model(out, ema=True)
    with pytest.raises(UserError, match='--no-ema'):
        load_score_model(out, ema=False)


def test_state_dict_without_sigmas_needs_config(tmp_path, digits_list, probe):
    bare = {k: v for k, v in digits_list[0].items() if k != 'module.sigmas'}
    source = tmp_path / 'nosigmas.pth'
    torch.save(bare, source)
    with pytest.raises(UserError, match='--config'):
        convert_file(source, tmp_path / 'a.msgpack')
    out = tmp_path / 'b.msgpack'
    convert_file(source, out, config='digits.yml')
    model = load_score_model(out)
    np.testing.assert_allclose(np.asarray(model.sigmas), digits_list[0]['module.sigmas'].numpy(),
                               rtol=1e-6)


def test_cli_converts_then_reports_up_to_date(tmp_path):
    out = tmp_path / 'digits.msgpack'
    first = run_cli(DIGITS_CHECKPOINT, '--out', out, '--config', 'digits.yml')
    assert first.returncode == 0, first.stderr
    stamp = out.stat().st_mtime_ns
    second = run_cli(DIGITS_CHECKPOINT, '--out', out, '--config', 'digits.yml')
    assert second.returncode == 0, second.stderr
    assert 'up to date' in second.stderr
    assert out.stat().st_mtime_ns == stamp


def test_cli_refuses_existing_output_without_force(tmp_path):
    out = tmp_path / 'digits.msgpack'
    assert run_cli(DIGITS_CHECKPOINT, '--out', out).returncode == 0
    content = out.read_bytes()
    result = run_cli(DIGITS_CHECKPOINT, '--out', out, '--no-ema')
    assert_one_line_error(result, str(out), '--force')
    assert out.read_bytes() == content
    forced = run_cli(DIGITS_CHECKPOINT, '--out', out, '--no-ema', '--force')
    assert forced.returncode == 0, forced.stderr
    assert checkpoint.read_params_file(out)['metadata']['ema'] is False


def test_cli_rejects_unrelated_existing_file(tmp_path):
    out = tmp_path / 'notes.msgpack'
    out.write_text('my notes')
    assert_one_line_error(run_cli(DIGITS_CHECKPOINT, '--out', out), '--force')
    assert out.read_text() == 'my notes'


def test_cli_missing_checkpoint(tmp_path):
    out = tmp_path / 'x.msgpack'
    assert_one_line_error(run_cli(tmp_path / 'nope.pth', '--out', out), 'not found', 'nope.pth')
    assert not out.exists()


def test_cli_truncated_checkpoint(tmp_path):
    source = tmp_path / 'truncated.pth'
    source.write_bytes(DIGITS_CHECKPOINT.read_bytes()[:100_000])
    out = tmp_path / 'x.msgpack'
    assert_one_line_error(run_cli(source, '--out', out), 'truncated.pth', 'damaged')
    assert list(tmp_path.iterdir()) == [source]


def test_cli_random_bytes(tmp_path):
    source = tmp_path / 'random.pth'
    source.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / 'x.msgpack'
    assert_one_line_error(run_cli(source, '--out', out), 'random.pth')
    assert list(tmp_path.iterdir()) == [source]


class _RunsCode:
    """Unpickling this object would create a marker folder, so its creation proves code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.mkdir, (self.marker,)


def test_cli_refuses_pickle_that_runs_code(tmp_path):
    marker = tmp_path / 'code_ran'
    source = tmp_path / 'evil.pth'
    torch.save({'begin_conv.weight': torch.zeros(1), 'payload': _RunsCode(str(marker))}, source,
               pickle_protocol=2)
    out = tmp_path / 'x.msgpack'
    result = run_cli(source, '--out', out)
    assert_one_line_error(result, 'evil.pth', 'refusing')
    assert not marker.exists()
    assert not out.exists()


def test_cli_rejects_config_mismatch(tmp_path):
    out = tmp_path / 'x.msgpack'
    result = run_cli(CHECKPOINTS / 'church_ngf8_random.pth', '--out', out, '--config', 'digits.yml')
    assert_one_line_error(result, 'church_ngf8_random.pth', 'digits.yml')
    assert not out.exists()


def test_cli_rejects_unknown_config(tmp_path):
    out = tmp_path / 'x.msgpack'
    result = run_cli(DIGITS_CHECKPOINT, '--out', out, '--config', 'no_such_config.yml')
    assert_one_line_error(result, 'no_such_config')
    assert not out.exists()


def test_cli_rejects_non_checkpoint_pickle(tmp_path):
    source = tmp_path / 'numbers.pth'
    torch.save({'a': [1, 2, 3]}, source)
    out = tmp_path / 'x.msgpack'
    assert_one_line_error(run_cli(source, '--out', out), 'numbers.pth')
    assert not out.exists()


def test_read_params_file_rejects_other_files(tmp_path):
    bogus = tmp_path / 'bogus.msgpack'
    bogus.write_bytes(pickle.dumps({'a': 1}))
    with pytest.raises(UserError, match='not an ncsn-jax parameter file'):
        checkpoint.read_params_file(bogus)
    with pytest.raises(UserError, match='not found'):
        checkpoint.read_params_file(tmp_path / 'missing.msgpack')


def test_rerun_without_config_is_up_to_date(tmp_path):
    out = tmp_path / 'digits.msgpack'
    assert convert_file(DIGITS_CHECKPOINT, out, config='digits.yml') == 'written'
    assert convert_file(DIGITS_CHECKPOINT, out) == 'up-to-date'


def test_existing_output_error_names_the_difference(tmp_path):
    out = tmp_path / 'digits.msgpack'
    convert_file(DIGITS_CHECKPOINT, out)
    with pytest.raises(UserError, match="no_ema was False"):
        convert_file(DIGITS_CHECKPOINT, out, ema=False)


def test_converted_file_has_default_mode(tmp_path):
    out = tmp_path / 'digits.msgpack'
    convert_file(DIGITS_CHECKPOINT, out)
    plain = tmp_path / 'plain.txt'
    plain.write_text('x')
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
