"""Tests of ncsn_jax.config: the shipped configs, validation messages, lookup and overrides."""

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml

from ncsn_jax.config import (
    Config,
    apply_overrides,
    available_config_names,
    config_to_dict,
    default_architecture,
    load_config,
    repository_config_dir,
    resolve_config_path,
    sigma_ladder,
)
from ncsn_jax.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_DIR = REPO_ROOT / 'tests' / 'data' / 'golden'

SHIPPED_CONFIGS = ('bedroom.yml', 'celeba.yml', 'church.yml', 'cifar10.yml', 'digits.yml', 'ffhq.yml',
                   'tower.yml')

# Official NCSNv2 sampling settings: image size, sigma_begin, levels, step_lr, steps per level,
# architecture.
OFFICIAL_SETTINGS = {
    'church.yml': (64, 140.0, 788, 4.9e-6, 4, 'NCSNv2Deeper'),
    'bedroom.yml': (128, 190.0, 1086, 1.8e-6, 3, 'NCSNv2Deeper'),
    'tower.yml': (128, 190.0, 1086, 1.8e-6, 3, 'NCSNv2Deeper'),
    'ffhq.yml': (256, 348.0, 2311, 9e-7, 3, 'NCSNv2Deepest'),
}
OFFICIAL_SAMPLING_BATCH = {'church.yml': 96, 'bedroom.yml': 36, 'tower.yml': 36, 'ffhq.yml': 36}

MINIMAL_CONFIG = """\
data:
  dataset: CIFAR10
  image_size: 32
  channels: 3
model:
  ngf: 8
  sigma_begin: 50
  sigma_end: 0.01
  num_classes: 10
sampling:
  batch_size: 4
  step_lr: 0.0000062
  n_steps_each: 2
"""


def write_config(folder: Path, text: str, name: str = 'test.yml') -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text), encoding='utf-8')
    return path


def config_text(**replacements) -> str:
    """Return MINIMAL_CONFIG as YAML with the given values set, each key written 'section.key'."""
    raw = yaml.safe_load(MINIMAL_CONFIG)
    for dotted, value in replacements.items():
        section, key = dotted.split('.')
        raw.setdefault(section, {})[key] = value
    return yaml.safe_dump(raw, sort_keys=False)


def load_error(tmp_path: Path, text: str) -> str:
    path = write_config(tmp_path, text)
    with pytest.raises(UserError) as excinfo:
        load_config(path)
    message = str(excinfo.value)
    assert '\n' not in message
    assert message.startswith(f'{path}: ')
    return message


# ---------------------------------------------------------------------------------------------
# Shipped configs


def test_shipped_configs_all_present():
    present = {p.name for p in repository_config_dir().glob('*.yml')}
    assert set(SHIPPED_CONFIGS) <= present


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_shipped_config_loads(name):
    config = load_config(repository_config_dir() / name)

    assert isinstance(config, Config)
    assert config.model.sigma_end == 0.01
    assert config.model.ema is True
    assert config.model.ema_rate == 0.999
    assert config.sampling.n_samples >= 1
    assert config.model.architecture == default_architecture(config.data.dataset)


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_shipped_config_paths_under_model_weights(name):
    config = load_config(repository_config_dir() / name)
    folder = f'model_weights/{Path(name).stem}/'

    assert config.model.score_model_state_dict_path.startswith(folder)
    assert config.model.score_model_state_dict_path.endswith('.pth')
    assert config.model.params_path.startswith(folder)
    assert config.model.params_path.endswith('.msgpack')
    assert config.evaluation.inception_params_path == \
        'model_weights/inception/pt_inception-2015-12-05-6726825d.msgpack'
    assert config.evaluation.inception_stats_path.startswith('model_weights/fid_stats/')


@pytest.mark.parametrize('name', SHIPPED_CONFIGS)
def test_shipped_config_round_trip(tmp_path, name):
    config = load_config(repository_config_dir() / name)
    dumped = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    path = write_config(tmp_path, dumped)

    assert load_config(path) == config


@pytest.mark.parametrize('name', sorted(OFFICIAL_SETTINGS))
def test_large_configs_official_values(name):
    config = load_config(repository_config_dir() / name)
    image_size, sigma_begin, levels, step_lr, steps, architecture = OFFICIAL_SETTINGS[name]

    assert config.data.image_size == image_size
    assert config.model.sigma_begin == sigma_begin
    assert config.model.num_classes == levels
    assert config.sampling.step_lr == step_lr
    assert config.sampling.n_steps_each == steps
    assert config.sampling.batch_size == OFFICIAL_SAMPLING_BATCH[name]
    assert config.model.architecture == architecture
    assert config.model.ngf == 128
    assert config.sampling.last_only is True
    assert config.visualization.last_only is True


def test_cifar10_config_pidld_values():
    config = load_config(repository_config_dir() / 'cifar10.yml')

    assert (config.data.image_size, config.data.channels) == (32, 3)
    assert (config.model.sigma_begin, config.model.num_classes) == (50.0, 232)
    assert config.sampling.step_lr == 6.2e-6
    assert config.sampling.n_steps_each == 5
    assert config.sampling.batch_size == 128
    assert config.sampling.n_samples == 10000
    assert (config.sampling.k_p, config.sampling.k_i, config.sampling.k_d) == (1.0, 0.0, 0.0)
    assert config.evaluation.evaluate is True


def test_celeba_config_pidld_values():
    config = load_config(repository_config_dir() / 'celeba.yml')

    assert config.data.image_size == 64
    assert (config.model.sigma_begin, config.model.num_classes) == (90.0, 500)
    assert config.sampling.step_lr == 3.3e-6
    assert config.sampling.n_steps_each == 5
    assert config.sampling.batch_size == 64


def test_digits_config_demo_values():
    config = load_config(repository_config_dir() / 'digits.yml')
    sampling = config.sampling

    assert (config.data.dataset, config.data.channels, config.data.image_size) == ('digits', 1, 32)
    assert (config.model.architecture, config.model.ngf) == ('NCSNv2', 16)
    assert (config.model.sigma_begin, config.model.num_classes) == (17.0, 100)
    assert (sampling.n_steps_each, sampling.step_lr) == (1, 2e-5)
    assert (sampling.k_p, sampling.k_i, sampling.k_d) == (2.0, 0.5, 4.5)
    assert (sampling.k_i_decay, sampling.k_d_decay) == (1.0, 1.0)
    assert sampling.denoise is True
    assert (sampling.n_samples, sampling.batch_size) == (64, 64)
    assert config.evaluation.evaluate is False
    assert config.visualization.nrow == 8
    assert config.model.score_model_state_dict_path == 'model_weights/digits/digits_ngf16.pth'
    assert config.model.params_path == 'model_weights/digits/digits_ngf16.msgpack'
    assert (config.training.batch_size, config.training.n_iters) == (64, 4000)
    assert (config.optim.optimizer, config.optim.lr) == ('Adam', 5e-4)


# ---------------------------------------------------------------------------------------------
# Sigma ladder


@pytest.mark.parametrize('config_name, golden_file', [
    ('digits.yml', 'forward_digits_ngf16.npz'),
    ('cifar10.yml', 'forward_cifar10_ngf16_random.npz'),
    ('church.yml', 'forward_church_ngf8_random.npz'),
    ('ffhq.yml', 'forward_deepest_ffhq_ngf4_random.npz'),
])
def test_sigma_ladder_matches_official(config_name, golden_file):
    config = load_config(repository_config_dir() / config_name)
    expected = np.load(GOLDEN_DIR / golden_file)['sigmas']

    ladder = sigma_ladder(config)

    assert ladder.dtype == np.float32
    np.testing.assert_array_equal(ladder, expected)


def test_sigma_ladder_after_num_classes_override():
    config = load_config(repository_config_dir() / 'digits.yml')
    expected = np.load(GOLDEN_DIR / 'pid_ald_digits.npz')['sigmas']

    ladder = sigma_ladder(apply_overrides(config, num_classes=len(expected)))

    np.testing.assert_array_equal(ladder, expected)


# ---------------------------------------------------------------------------------------------
# Validation


def test_minimal_config_defaults(tmp_path):
    config = load_config(write_config(tmp_path, MINIMAL_CONFIG))

    assert config.model.architecture == 'NCSNv2'
    assert config.model.sigma_dist == 'geometric'
    assert config.sampling.n_samples == config.sampling.batch_size
    assert (config.sampling.k_p, config.sampling.k_i, config.sampling.k_d) == (1.0, 0.0, 0.0)
    assert config.evaluation.evaluate is False
    assert config.evaluation.inception_params_path == \
        'model_weights/inception/pt_inception-2015-12-05-6726825d.msgpack'
    assert config.fast_fid is None
    assert isinstance(config.sampling.step_lr, float)


@pytest.mark.parametrize('dataset, architecture', [
    ('CIFAR10', 'NCSNv2'), ('CELEBA', 'NCSNv2'), ('digits', 'NCSNv2'), ('MNIST', 'NCSNv2'),
    ('LSUN', 'NCSNv2Deeper'), ('FFHQ', 'NCSNv2Deepest'),
])
def test_default_architecture_by_dataset(tmp_path, dataset, architecture):
    text = config_text(**{'data.dataset': dataset, 'data.image_size': 64})

    config = load_config(write_config(tmp_path, text))

    assert config.model.architecture == architecture


def test_step_lr_negative_message(tmp_path):
    path = write_config(tmp_path, config_text(**{'sampling.step_lr': -1.0}))

    with pytest.raises(UserError) as excinfo:
        load_config(path)

    assert str(excinfo.value) == f'{path}: sampling.step_lr must be > 0, got -1.0'


@pytest.mark.parametrize('replacements, expected', [
    ({'sampling.n_steps_each': 0}, 'sampling.n_steps_each must be > 0, got 0'),
    ({'sampling.n_steps_each': 'five'}, "sampling.n_steps_each must be an integer, got 'five'"),
    ({'sampling.n_steps_each': 2.5}, 'sampling.n_steps_each must be an integer, got 2.5'),
    ({'sampling.batch_size': True}, 'sampling.batch_size must be an integer, got True'),
    ({'sampling.batch_size': -4}, 'sampling.batch_size must be > 0, got -4'),
    ({'sampling.n_samples': 0}, 'sampling.n_samples must be > 0, got 0'),
    ({'sampling.freq': 0}, 'sampling.freq must be > 0, got 0'),
    ({'sampling.k_i_decay': 0}, 'sampling.k_i_decay must be > 0, got 0.0'),
    ({'sampling.k_d_decay': -0.5}, 'sampling.k_d_decay must be > 0, got -0.5'),
    ({'sampling.k_p': 'high'}, "sampling.k_p must be a number, got 'high'"),
    ({'sampling.k_d': float('nan')}, 'sampling.k_d must be a number, got nan'),
    ({'sampling.denoise': 'yes please'}, "sampling.denoise must be true or false, got 'yes please'"),
    ({'sampling.interpolation': True}, 'sampling.interpolation must be false or absent'),
    ({'data.channels': 2}, 'data.channels must be 1 or 3, got 2'),
    ({'data.image_size': 0}, 'data.image_size must be > 0, got 0'),
    ({'data.dataset': None}, 'data.dataset must be a string, got null'),
    ({'data.rescaled': True}, 'data.rescaled must be false'),
    ({'model.num_classes': 1}, 'model.num_classes must be >= 2'),
    ({'model.ngf': 0}, 'model.ngf must be > 0, got 0'),
    ({'model.sigma_end': 0}, 'model.sigma_end must be > 0, got 0.0'),
    ({'model.sigma_begin': 0.005}, 'model.sigma_begin must be > model.sigma_end (0.01), got 0.005'),
    ({'model.sigma_begin': 0.01}, 'model.sigma_begin must be > model.sigma_end (0.01), got 0.01'),
    ({'model.sigma_dist': 'uniform'}, "model.sigma_dist must be 'geometric'"),
    ({'model.architecture': 'NCSN'}, "model.architecture must be one of 'NCSNv2', 'NCSNv2Deeper', 'NCSNv2Deepest', got 'NCSN'"),
    ({'model.ema_rate': 1.0}, 'model.ema_rate must be in (0, 1), got 1.0'),
    ({'model.spec_norm': True}, 'model.spec_norm must be false'),
    ({'model.normalization': 'BatchNorm'}, "model.normalization must be 'InstanceNorm++'"),
    ({'model.nonlinearity': 'relu'}, "model.nonlinearity must be 'elu'"),
    ({'visualization.nrow': 0}, 'visualization.nrow must be > 0, got 0'),
    ({'visualization.freq': -1}, 'visualization.freq must be > 0, got -1'),
    ({'evaluation.batch_size': 0}, 'evaluation.batch_size must be > 0, got 0'),
    ({'evaluation.evaluate': True}, 'evaluation.inception_stats_path is required when evaluation.evaluate is true'),
    ({'evaluation.evaluate': True, 'evaluation.inception_stats_path': 'stats.npz',
      'evaluation.inception_params_path': None},
     'evaluation.inception_params_path is required when evaluation.evaluate is true'),
    ({'training.n_iters': 0}, 'training.n_iters must be > 0, got 0'),
    ({'optim.optimizer': 'adam'}, "optim.optimizer must be one of 'Adam', 'RMSProp', 'SGD', got 'adam'"),
    ({'optim.lr': 0}, 'optim.lr must be > 0, got 0.0'),
])
def test_invalid_value_message(tmp_path, replacements, expected):
    message = load_error(tmp_path, config_text(**replacements))

    assert expected in message


@pytest.mark.parametrize('architecture, image_size, factor', [
    ('NCSNv2', 31, 2), ('NCSNv2Deeper', 30, 4), ('NCSNv2Deeper', 36, None), ('NCSNv2Deepest', 28, 8),
    ('NCSNv2Deepest', 36, 8), ('NCSNv2', 28, None), ('NCSNv2Deeper', 28, None), ('NCSNv2Deepest', 32, None),
])
def test_image_size_divisibility(tmp_path, architecture, image_size, factor):
    text = config_text(**{'model.architecture': architecture, 'data.image_size': image_size})

    if factor is None:
        config = load_config(write_config(tmp_path, text))
        assert config.data.image_size == image_size
    else:
        message = load_error(tmp_path, text)
        assert f'data.image_size must be divisible by {factor} for {architecture}' in message
        assert f'got {image_size}' in message


def test_unknown_key_names_known_keys(tmp_path):
    message = load_error(tmp_path, MINIMAL_CONFIG + '  setp_lr: 0.1\n')

    assert 'unknown key sampling.setp_lr' in message
    assert "did you mean 'step_lr'?" in message
    assert 'Known keys: batch_size, step_lr, n_steps_each' in message


def test_unknown_section_names_known_sections(tmp_path):
    message = load_error(tmp_path, MINIMAL_CONFIG + 'sampler:\n  k_p: 1.0\n')

    assert "unknown section 'sampler'" in message
    assert 'Known sections: data, model, sampling, visualization' in message


def test_missing_required_key(tmp_path):
    text = MINIMAL_CONFIG.replace('  ngf: 8\n', '')

    message = load_error(tmp_path, text)

    assert message.endswith('missing required key model.ngf')


def test_missing_required_section(tmp_path):
    text = MINIMAL_CONFIG[:MINIMAL_CONFIG.index('sampling:')]

    message = load_error(tmp_path, text)

    assert message.endswith("missing required section 'sampling'")


def test_duplicate_key_rejected(tmp_path):
    message = load_error(tmp_path, MINIMAL_CONFIG + '  n_steps_each: 3\n')

    assert "duplicate key 'n_steps_each'" in message
    assert 'line 14' in message


def test_invalid_yaml_reports_line(tmp_path):
    message = load_error(tmp_path, MINIMAL_CONFIG + '  step_lr: [1, 2\n')

    assert 'invalid YAML at line' in message


def test_empty_file_rejected(tmp_path):
    message = load_error(tmp_path, '')

    assert 'the config is empty' in message


def test_section_not_mapping(tmp_path):
    message = load_error(tmp_path, MINIMAL_CONFIG + 'optim: 3\n')

    assert "section 'optim' must be a mapping" in message


def test_exponent_without_dot_accepted(tmp_path):
    # PyYAML reads 2e-5 as a string, which the loader converts for float keys.
    text = MINIMAL_CONFIG.replace('step_lr: 0.0000062', 'step_lr: 2e-5')

    config = load_config(write_config(tmp_path, text))

    assert config.sampling.step_lr == 2e-5


def test_integral_float_accepted_for_int(tmp_path):
    config = load_config(write_config(tmp_path, config_text(**{'sampling.n_samples': 1.0e4})))

    assert config.sampling.n_samples == 10000
    assert isinstance(config.sampling.n_samples, int)


def test_official_ncsnv2_layout_loads(tmp_path):
    text = MINIMAL_CONFIG + textwrap.dedent("""\
          data_init: false
          ckpt_id: 300000
          final_only: true
          fid: false
          denoise: true
          num_samples4fid: 10000
          inpainting: false
          interpolation: false
          n_interpolations: 15
        fast_fid:
          batch_size: 1000
          begin_ckpt: 5000
        test:
          begin_ckpt: 5000
          end_ckpt: 300000
        training:
          batch_size: 128
          n_iters: 300001
        optim:
          optimizer: Adam
          eps: 0.00000001
        """)

    config = load_config(write_config(tmp_path, text))

    assert config.sampling.ckpt_id == 300000
    assert config.fast_fid == {'batch_size': 1000, 'begin_ckpt': 5000}
    assert config.test['end_ckpt'] == 300000
    assert config.training.snapshot_freq == 5000
    assert config_to_dict(config)['fast_fid'] == config.fast_fid


def test_pidld_layout_loads(tmp_path):
    text = MINIMAL_CONFIG + textwrap.dedent("""\
          k_p: 1.0
          k_i: 0.2
          k_d: 4.0
        evaluation:
          inception_stats_path: "model_weights/fid_stats/stats.npz"
          num_workers: 0
          evaluate: true
        visualization:
          nrow: 4
          verbose: true
        """)

    config = load_config(write_config(tmp_path, text))

    assert (config.sampling.k_p, config.sampling.k_i, config.sampling.k_d) == (1.0, 0.2, 4.0)
    assert config.evaluation.evaluate is True
    assert config.visualization.nrow == 4


def test_config_is_frozen(tmp_path):
    config = load_config(write_config(tmp_path, MINIMAL_CONFIG))

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sampling.k_p = 2.0


# ---------------------------------------------------------------------------------------------
# Lookup by name


def test_lookup_prefers_working_directory(tmp_path, monkeypatch):
    (tmp_path / 'configs').mkdir()
    write_config(tmp_path / 'configs', MINIMAL_CONFIG.replace('ngf: 8', 'ngf: 12'), 'cifar10.yml')
    monkeypatch.chdir(tmp_path)

    config = load_config('cifar10.yml')

    assert config.model.ngf == 12
    assert config.source == str(Path('configs') / 'cifar10.yml')


def test_lookup_falls_back_to_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    config = load_config('digits.yml')

    assert config.model.ngf == 16
    assert resolve_config_path('digits.yml') == repository_config_dir() / 'digits.yml'


def test_lookup_adds_yml_suffix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    assert resolve_config_path('digits') == repository_config_dir() / 'digits.yml'


def test_lookup_unknown_name_lists_available(tmp_path, monkeypatch):
    (tmp_path / 'configs').mkdir()
    write_config(tmp_path / 'configs', MINIMAL_CONFIG, 'local_only.yml')
    monkeypatch.chdir(tmp_path)

    with pytest.raises(UserError) as excinfo:
        load_config('cifar100.yml')

    message = str(excinfo.value)
    assert "config 'cifar100.yml' not found" in message
    assert 'cifar10.yml' in message
    assert 'local_only.yml' in message
    assert 'local_only.yml' in available_config_names()


def test_path_used_as_is(tmp_path):
    path = write_config(tmp_path, MINIMAL_CONFIG, 'elsewhere.yml')

    assert load_config(path).source == str(path)


def test_missing_path_rejected(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_config(tmp_path / 'absent.yml')

    assert str(excinfo.value) == f'config file not found: {tmp_path / "absent.yml"}'


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrides_set_values():
    config = load_config(repository_config_dir() / 'cifar10.yml')

    updated = apply_overrides(config, k_p=1.0, k_i=0.2, k_d=4, k_i_decay=0.99, k_d_decay=0.98,
                              n_steps_each=1, num_classes=100, n_samples=16, batch_size=8,
                              step_lr=1e-5, denoise=False)

    assert (updated.sampling.k_p, updated.sampling.k_i, updated.sampling.k_d) == (1.0, 0.2, 4.0)
    assert isinstance(updated.sampling.k_d, float)
    assert (updated.sampling.k_i_decay, updated.sampling.k_d_decay) == (0.99, 0.98)
    assert updated.sampling.n_steps_each == 1
    assert updated.model.num_classes == 100
    assert (updated.sampling.n_samples, updated.sampling.batch_size) == (16, 8)
    assert updated.sampling.step_lr == 1e-5
    assert updated.sampling.denoise is False
    assert updated.source == config.source
    assert len(sigma_ladder(updated)) == 100


def test_overrides_accept_numpy_scalars():
    config = load_config(repository_config_dir() / 'cifar10.yml')

    updated = apply_overrides(config, k_d=np.float32(4.5), num_classes=np.int64(100))

    assert updated.sampling.k_d == 4.5
    assert type(updated.sampling.k_d) is float
    assert updated.model.num_classes == 100
    assert type(updated.model.num_classes) is int


def test_overrides_none_keeps_values():
    config = load_config(repository_config_dir() / 'cifar10.yml')

    updated = apply_overrides(config, k_i=0.5)

    assert updated.sampling.k_i == 0.5
    assert dataclasses.replace(updated.sampling, k_i=0.0) == config.sampling
    assert updated.model == config.model
    assert apply_overrides(config) == config


@pytest.mark.parametrize('overrides, expected', [
    ({'k_i_decay': 0.0}, 'sampling.k_i_decay must be > 0, got 0.0'),
    ({'n_steps_each': 0}, 'sampling.n_steps_each must be > 0, got 0'),
    ({'num_classes': 1}, 'model.num_classes must be >= 2'),
    ({'k_p': float('inf')}, 'sampling.k_p must be a number, got inf'),
])
def test_overrides_validated(overrides, expected):
    config = load_config(repository_config_dir() / 'cifar10.yml')

    with pytest.raises(UserError) as excinfo:
        apply_overrides(config, **overrides)

    message = str(excinfo.value)
    assert message.startswith(f'{config.source} with overrides: ')
    assert expected in message
