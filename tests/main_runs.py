"""Helpers for tests that run main.py as a subprocess on CPU devices and compare experiment folders.

`reference_run` draws one small run per test session and shares it between test modules.
"""

import json
import os
import subprocess
import sys

import numpy as np
import yaml

from conftest import ROOT
from ncsn_jax.sampling import RECORD_NAMES

N_SAMPLES = 7
REFERENCE_BATCH = 3
SNAPSHOT_STEPS = (0, 2)   # 3 levels x 1 step, a snapshot every 2 global steps
RUN_TIMEOUT = 300

_reference_runs = {}


def write_config(path, params_path, *, n_samples=N_SAMPLES, batch_size=REFERENCE_BATCH):
    raw = yaml.safe_load((ROOT / 'configs' / 'digits.yml').read_text())
    raw['model'].update(params_path=str(params_path), num_classes=3)
    raw['sampling'].update(n_samples=n_samples, batch_size=batch_size, n_steps_each=1,
                           last_only=False, freq=2)
    raw['visualization'].update(freq=2, nrow=2)
    path.write_text(yaml.safe_dump(raw))
    return path


def cpu_env(devices=1, **extra):
    """Return the environment of a main.py subprocess on `devices` CPU devices."""
    env = dict(os.environ, JAX_PLATFORMS='cpu', **extra)
    flags = [flag for flag in env.get('XLA_FLAGS', '').split()
             if not flag.startswith('--xla_force_host_platform_device_count')]
    env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={devices}'])
    return env


def main_command(*args):
    return [sys.executable, str(ROOT / 'main.py')] + [str(a) for a in args]


def run_main(*args, cwd, devices=1, check=True):
    result = subprocess.run(main_command(*args), capture_output=True, text=True, cwd=cwd,
                            env=cpu_env(devices), timeout=RUN_TIMEOUT)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def only_folder(exp_root):
    folders = list(exp_root.iterdir())
    assert len(folders) == 1, folders
    return folders[0]


def load_samples(folder, name='samples_final.npz'):
    with np.load(folder / 'image_samples' / name) as data:
        return data['samples']


def load_record(folder):
    return json.loads((folder / 'sampler_record_dict.json').read_text())


def output_names(folder):
    return ['samples_final.npz'] + [f'samples_step_{step}.npz' for step in SNAPSHOT_STEPS]


def assert_same_run(folder, reference):
    """Check samples and snapshots within 1e-5 (max abs difference), record within 1e-5 relative."""
    assert load_samples(folder).shape == (N_SAMPLES, 32, 32, 1)
    for name in output_names(folder):
        np.testing.assert_allclose(load_samples(folder, name), load_samples(reference, name),
                                   rtol=0, atol=1e-5, err_msg=name)
    ours, theirs = load_record(folder), load_record(reference)
    assert sorted(ours) == sorted(RECORD_NAMES)
    for name in RECORD_NAMES:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, err_msg=name)


def assert_identical_run(folder, reference):
    """Check that samples, snapshots and record are bitwise equal."""
    for name in output_names(folder):
        assert np.array_equal(load_samples(folder, name), load_samples(reference, name)), name
    assert load_record(folder) == load_record(reference)


def reference_run(tmp_path_factory, params_path):
    """Return the folder of a run in chunks of REFERENCE_BATCH on 1 device, made once a session."""
    if params_path not in _reference_runs:
        tmp = tmp_path_factory.mktemp('reference_run')
        config = write_config(tmp / 'reference.yml', params_path)
        run_main('--config', config, '--exp', tmp / 'exp', cwd=tmp)
        _reference_runs[params_path] = only_folder(tmp / 'exp')
    return _reference_runs[params_path]
