"""Command-line tests of main.py on the bundled digits model, with few steps."""

import json
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT, assert_one_line_error, run_main_py
from ncsn_jax.sampling import RECORD_NAMES


def write_config(path, params_path, **sampling):
    raw = yaml.safe_load((ROOT / 'configs' / 'digits.yml').read_text())
    raw['model']['params_path'] = str(params_path)
    raw['model']['num_classes'] = 4
    raw['sampling'].update(n_samples=6, batch_size=4, last_only=False, freq=2)
    raw['sampling'].update(sampling)
    raw['visualization'].update(freq=3, nrow=2)
    path.write_text(yaml.safe_dump(raw))
    return path


def only_folder(exp_root):
    folders = list(exp_root.iterdir())
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture(scope='module')
def demo_run(tmp_path_factory, digits_model_path):
    tmp = tmp_path_factory.mktemp('demo_run')
    config = write_config(tmp / 'small.yml', digits_model_path)
    result = run_main_py('--config', config, '--exp', tmp / 'exp', '-T', 2, '--comment',
                      'first try', cwd=tmp)
    assert result.returncode == 0, result.stderr
    return only_folder(tmp / 'exp'), config


def test_folder_name_has_time_gains_and_name(demo_run):
    folder, _ = demo_run
    assert re.fullmatch(r'experiment_\d+_2\.0_0\.5_4\.5_default', folder.name), folder.name


def test_run_writes_settings_and_log(demo_run):
    folder, _ = demo_run
    args = yaml.safe_load((folder / 'args.yml').read_text())
    assert args['comment'] == 'first try'
    assert args['n_steps_each'] == 2
    config = yaml.safe_load((folder / 'config.yml').read_text())
    assert config['sampling']['n_steps_each'] == 2
    log = (folder / 'stdout.txt').read_text()
    assert 'first try' in log
    assert 'done' in log


def test_run_writes_samples_and_snapshots(demo_run):
    folder, _ = demo_run
    images = folder / 'image_samples'
    samples = np.load(images / 'samples_final.npz')
    assert list(samples.keys()) == ['samples']
    assert samples['samples'].shape == (6, 32, 32, 1)
    assert samples['samples'].dtype == np.float32
    # 4 levels x 2 steps = 8 global steps; snapshots every 2 and grids every 3 steps.
    assert sorted(p.name for p in images.glob('samples_step_*.npz')) == [
        f'samples_step_{k}.npz' for k in (0, 2, 4, 6)]
    assert sorted(p.name for p in images.glob('grid_*.png')) == [
        'grid_final.png', 'grid_step_0.png', 'grid_step_3.png', 'grid_step_6.png']
    assert np.load(images / 'samples_step_6.npz')['samples'].shape == (6, 32, 32, 1)
    with Image.open(images / 'grid_final.png') as grid:
        assert grid.size == (2 * 34 + 2, 2 * 34 + 2)


def test_run_writes_record_and_plot(demo_run):
    folder, _ = demo_run
    record = json.loads((folder / 'sampler_record_dict.json').read_text())
    assert sorted(record) == sorted(RECORD_NAMES)
    for name in RECORD_NAMES:
        assert len(record[name]) == 8, name
    with Image.open(folder / 'sampler_record.png') as plot:
        assert plot.size[0] > 100


def test_chunk_size_does_not_change_samples(demo_run, tmp_path, digits_model_path):
    folder, _ = demo_run
    config = write_config(tmp_path / 'one_chunk.yml', digits_model_path, batch_size=6)
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', '-T', 2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    other = only_folder(tmp_path / 'exp')
    np.testing.assert_allclose(np.load(other / 'image_samples' / 'samples_final.npz')['samples'],
                               np.load(folder / 'image_samples' / 'samples_final.npz')['samples'],
                               rtol=0, atol=1e-5)
    ours = json.loads((other / 'sampler_record_dict.json').read_text())
    theirs = json.loads((folder / 'sampler_record_dict.json').read_text())
    for name in RECORD_NAMES:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, err_msg=name)


def test_runs_never_reuse_a_folder(tmp_path, digits_model_path):
    config = write_config(tmp_path / 'c.yml', digits_model_path, n_samples=2, batch_size=2,
                          last_only=True)
    for suffix in ('', '', 'sweep'):
        result = run_main_py('--config', config, '--exp', tmp_path / 'exp', '-L', 2,
                          '--exp_dir_suffix', suffix, '-P', 1, '-I', 0, '-D', 0, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    names = sorted(p.name for p in (tmp_path / 'exp').iterdir())
    assert len(names) == 3
    assert sum(bool(re.fullmatch(r'experiment_\d+_1\.0_0\.0_0\.0', n)) for n in names) == 2
    assert sum(n.endswith('_1.0_0.0_0.0_sweep') for n in names) == 1


@pytest.mark.parametrize('flags,fragment', [
    (['-T', '0'], 'n_steps_each'),
    (['-T', '-2'], 'n_steps_each'),
    (['-L', '0'], 'num_classes'),
    (['-L', '-5'], 'num_classes'),
    (['--k_i_decay', '0'], 'k_i_decay'),
])
def test_rejects_bad_flags(tmp_path, digits_model_path, flags, fragment):
    config = write_config(tmp_path / 'c.yml', digits_model_path)
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', *flags, cwd=tmp_path)
    assert_one_line_error(result, fragment)
    assert not (tmp_path / 'exp').exists()


def test_rejects_bad_step_lr(tmp_path, digits_model_path):
    config = write_config(tmp_path / 'c.yml', digits_model_path, step_lr=-1e-5)
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert_one_line_error(result, 'step_lr', 'c.yml')
    assert not (tmp_path / 'exp').exists()


def test_rejects_unknown_config_name(tmp_path):
    result = run_main_py('--config', 'cifar11.yml', '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert_one_line_error(result, 'cifar11.yml', 'digits')
    assert not (tmp_path / 'exp').exists()


def test_missing_converted_file_prints_convert_command(tmp_path):
    config = write_config(tmp_path / 'c.yml', tmp_path / 'missing.msgpack')
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert_one_line_error(result, 'missing.msgpack', 'python convert/torch_to_flax.py',
                          'model_weights/digits/digits_ngf16.pth', '--config c.yml')
    assert not (tmp_path / 'exp').exists()


def test_model_config_mismatch_rejected(tmp_path, converted_models):
    config = write_config(tmp_path / 'c.yml', converted_models['cifar10_ngf16_random', True])
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert_one_line_error(result, 'channels')
    assert not (tmp_path / 'exp').exists()


def test_diverging_run_stops_with_level_and_step(tmp_path, digits_model_path):
    config = write_config(tmp_path / 'c.yml', digits_model_path, step_lr=1e35, n_samples=2,
                          batch_size=2)
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert 'NaN or Inf' in last
    assert re.search(r'noise level \d+', last)
    assert re.search(r'step \d+ of that level', last)
    log = (only_folder(tmp_path / 'exp') / 'stdout.txt').read_text()
    assert 'NaN or Inf' in log
