"""FID / IS / KID from main.py with the stand-in Inception weights and digits statistics."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from sklearn.datasets import load_digits

from conftest import ROOT, assert_one_line_error, run_main_py
from ncsn_jax import fid


@pytest.fixture(scope='module')
def digits_stats(tmp_path_factory, inception_weights):
    """Statistics of 24 training digits (32x32), written by the stats tool with KID features."""
    tmp = tmp_path_factory.mktemp('digits_stats')
    digits = load_digits().images[:24] / 16.0
    images = np.asarray(jax.image.resize(jnp.asarray(digits)[..., None], (24, 32, 32, 1),
                                         'bilinear'))
    np.savez(tmp / 'digits.npz', images=np.clip(images, 0, 1).astype(np.float32))
    stats = tmp / 'stats.npz'
    result = subprocess.run([sys.executable, '-m', 'ncsn_jax.fid_stats', tmp / 'digits.npz',
                             '--out', stats, '--inception', inception_weights[1],
                             '--batch-size', '8'], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return stats


def write_config(path, params_path, inception_path, stats_path, **evaluation):
    raw = yaml.safe_load((ROOT / 'configs' / 'digits.yml').read_text())
    raw['model'].update(params_path=str(params_path), num_classes=3)
    raw['sampling'].update(n_samples=5, batch_size=3)
    raw['visualization'].update(last_only=True)
    raw['evaluation'].update(evaluate=True, inception_params_path=str(inception_path),
                             inception_stats_path=str(stats_path), batch_size=4, freq=4,
                             last_only=False)
    raw['evaluation'].update(evaluation)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stats_file_holds_kid_features(digits_stats):
    with np.load(digits_stats) as data:
        assert sorted(data.files) == ['features', 'mu', 'sigma']
        assert data['features'].shape == (24, 2048)


@pytest.fixture(scope='module')
def evaluated_run(tmp_path_factory, digits_model_path, inception_weights, digits_stats):
    tmp = tmp_path_factory.mktemp('evaluated_run')
    config = write_config(tmp / 'c.yml', digits_model_path, inception_weights[1], digits_stats)
    result = run_main_py('--config', config, '--exp', tmp / 'exp', '-T', 2, cwd=tmp)
    assert result.returncode == 0, result.stderr
    folder, = (tmp / 'exp').iterdir()
    return folder, result


def test_metric_record_lists_each_evaluation(evaluated_run):
    folder, _ = evaluated_run
    record = json.loads((folder / 'metric_record_dict.json').read_text())
    # 3 levels x 2 steps: evaluations after global steps 0 and 4 and of the final samples (6).
    assert record['steps'] == [0, 4, 6]
    assert record['n_samples'] == [5, 5, 5]
    for key in ('fids', 'is_means', 'is_stds', 'kid_means', 'kid_stds'):
        assert len(record[key]) == 3, key
        assert all(np.isfinite(v) for v in record[key]), key


def test_final_metrics_match_direct_computation(evaluated_run, inception_weights, digits_stats):
    folder, _ = evaluated_run
    record = json.loads((folder / 'metric_record_dict.json').read_text())
    samples = np.load(folder / 'image_samples' / 'samples_final.npz')['samples']
    network = fid.load_inception(inception_weights[1], batch_size=4)
    pool, logits = network(np.clip(samples, 0, 1))
    mu, sigma = fid.compute_statistics(pool)
    ref_mu, ref_sigma = fid.load_stats(digits_stats)
    expected_fid = fid.frechet_distance(mu, sigma, ref_mu, ref_sigma)
    np.testing.assert_allclose(record['fids'][-1], expected_fid, rtol=1e-4)
    expected_is, _ = fid.inception_score(logits, splits=1)
    np.testing.assert_allclose(record['is_means'][-1], expected_is, rtol=1e-4)
    expected_kid, _ = fid.kernel_inception_distance(pool, fid.load_reference_features(digits_stats))
    np.testing.assert_allclose(record['kid_means'][-1], expected_kid, rtol=1e-4, atol=1e-7)


def test_log_states_sample_count_and_bias(evaluated_run):
    folder, result = evaluated_run
    log = (folder / 'stdout.txt').read_text()
    assert 'N = 5' in log
    assert 'biased upward' in log


@pytest.mark.parametrize('missing', ['inception', 'stats'])
def test_missing_evaluation_file_reported_before_sampling(tmp_path, digits_model_path,
                                                          inception_weights, digits_stats, missing):
    inception_path = tmp_path / 'none.msgpack' if missing == 'inception' else inception_weights[1]
    stats_path = tmp_path / 'none.npz' if missing == 'stats' else digits_stats
    config = write_config(tmp_path / 'c.yml', digits_model_path, inception_path, stats_path)
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert_one_line_error(result, 'none.', 'evaluation.evaluate: false')
    assert not (tmp_path / 'exp').exists()


def test_unreadable_stats_file_reported(tmp_path, digits_model_path, inception_weights):
    stats = tmp_path / 'broken.npz'
    stats.write_bytes(b'not a zip file')
    config = write_config(tmp_path / 'c.yml', digits_model_path, inception_weights[1], stats)
    result = run_main_py('--config', config, '--exp', tmp_path / 'exp', cwd=tmp_path)
    assert_one_line_error(result, 'broken.npz')
    assert not (tmp_path / 'exp').exists()
