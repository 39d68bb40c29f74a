"""FID, Inception Score, KID and statistics files against pytorch-fid and direct evaluations."""

import itertools
import logging
from pathlib import Path

import numpy as np
import pytest

from ncsn_jax import fid
from ncsn_jax.errors import UserError

GOLDEN = Path(__file__).resolve().parent / 'data' / 'golden' / 'metrics.npz'
MAX_RELATIVE_ERROR = 1e-6


@pytest.fixture(scope='module')
def golden():
    with np.load(GOLDEN) as data:
        return {key: data[key] for key in data.files}


def relative_error(actual, expected) -> float:
    return abs(actual - float(expected)) / abs(float(expected))


def test_fid_matches_pytorch_fid(golden):
    mu_a, sigma_a = fid.compute_statistics(golden['features_a'])
    mu_b, sigma_b = fid.compute_statistics(golden['features_b'])

    distance = fid.frechet_distance(mu_a, sigma_a, mu_b, sigma_b)

    assert isinstance(distance, float)
    assert relative_error(distance, golden['fid']) <= MAX_RELATIVE_ERROR


def test_inception_score_matches_reference(golden):
    mean, std = fid.inception_score(golden['logits'], splits=10)

    assert relative_error(mean, golden['is_mean']) <= MAX_RELATIVE_ERROR
    assert relative_error(std, golden['is_std']) <= MAX_RELATIVE_ERROR


def test_inception_score_drops_remainder(golden, caplog):
    rng = np.random.default_rng(1)
    logits = np.concatenate([golden['logits'], rng.normal(size=(7, 1008))])

    with caplog.at_level(logging.WARNING, logger='ncsn_jax.fid'):
        score = fid.inception_score(logits, splits=10)

    assert score == fid.inception_score(golden['logits'], splits=10)
    assert 'the last 7 are left out' in caplog.text


def test_inception_score_bad_input():
    with pytest.raises(ValueError, match='at least 10 samples'):
        fid.inception_score(np.zeros((9, 1008)), splits=10)
    with pytest.raises(ValueError, match='splits'):
        fid.inception_score(np.zeros((9, 1008)), splits=0)


def test_inception_score_uniform_predictions():
    # Identical predictions everywhere: every KL term is 0, so each split scores exp(0) = 1.
    mean, std = fid.inception_score(np.zeros((20, 1008)), splits=4)

    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def polynomial_kernel(x, y):
    return (float(np.dot(x, y)) / len(x) + 1.0) ** 3


def unbiased_mmd2_by_loops(a, b):
    """The unbiased MMD² estimator written out term by term."""
    m = len(a)
    within_a = sum(polynomial_kernel(a[i], a[j])
                   for i, j in itertools.product(range(m), repeat=2) if i != j)
    within_b = sum(polynomial_kernel(b[i], b[j])
                   for i, j in itertools.product(range(m), repeat=2) if i != j)
    across = sum(polynomial_kernel(a[i], b[j]) for i, j in itertools.product(range(m), repeat=2))
    return (within_a + within_b) / (m * (m - 1)) - 2.0 * across / (m * m)


def test_kid_whole_sets_match_loops():
    rng = np.random.default_rng(2)
    features_a = rng.normal(size=(6, 4))
    features_b = rng.normal(0.5, 1.5, size=(6, 4))

    mean, std = fid.kernel_inception_distance(features_a, features_b, num_subsets=3,
                                              max_subset_size=100, seed=0)

    # Every subset is a permutation of both whole sets, and MMD² does not depend on the order.
    assert mean == pytest.approx(unbiased_mmd2_by_loops(features_a, features_b), rel=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_subsets_match_loops():
    rng = np.random.default_rng(3)
    features_a = rng.normal(size=(9, 5))
    features_b = rng.normal(0.3, 1.2, size=(7, 5))
    subset_size, num_subsets, seed = 4, 5, 11

    mean, std = fid.kernel_inception_distance(features_a, features_b, num_subsets=num_subsets,
                                              max_subset_size=subset_size, seed=seed)

    # The documented draw: per subset, rows of a, then rows of b, without replacement.
    draw = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        rows_a = draw.choice(len(features_a), subset_size, replace=False)
        rows_b = draw.choice(len(features_b), subset_size, replace=False)
        estimates.append(unbiased_mmd2_by_loops(features_a[rows_a], features_b[rows_b]))
    assert mean == pytest.approx(np.mean(estimates), rel=1e-12)
    assert std == pytest.approx(np.std(estimates), rel=1e-9)
    assert std > 0


def test_kid_bad_input():
    with pytest.raises(ValueError, match='same D'):
        fid.kernel_inception_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match='at least 2 samples'):
        fid.kernel_inception_distance(np.zeros((1, 3)), np.zeros((5, 3)))


def test_frechet_distance_diagonal_closed_form():
    # For commuting (diagonal) covariances, d² = |mu1 - mu2|² + Σ (√s1 - √s2)².
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = 1.0 + 4.0 + (1.0 - 3.0) ** 2 + (2.0 - 1.0) ** 2

    distance = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))

    assert distance == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_identical_is_zero(golden):
    mu, sigma = fid.compute_statistics(golden['features_a'])

    assert fid.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_imaginary_error():
    # sqrtm(diag(-4, 1)) = diag(2j, 1): the imaginary part sits on the diagonal.
    with pytest.raises(ValueError, match=r'imaginary component \(largest 2\)'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-4.0, 1.0]))


def test_frechet_distance_singular_product_retries(caplog):
    # The product [[0, 1], [0, 0]] has no square root (sqrtm returns inf), so eps is added.
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])

    with caplog.at_level(logging.WARNING, logger='ncsn_jax.fid'):
        distance = fid.frechet_distance(np.zeros(2), nilpotent, np.zeros(2), np.eye(2))

    assert np.isfinite(distance)
    assert 'adding 1e-06 to their diagonals' in caplog.text


def test_frechet_distance_shape_mismatch():
    with pytest.raises(ValueError, match='covariances must be'):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))


def test_stats_round_trip(tmp_path, golden):
    mu, sigma = fid.compute_statistics(golden['features_a'])
    path = tmp_path / 'stats.npz'

    fid.save_stats(path, mu, sigma)
    loaded_mu, loaded_sigma = fid.load_stats(path)

    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    with np.load(path) as data:  # the way pytorch-fid reads a statistics file
        assert sorted(data.files) == ['mu', 'sigma']


def test_save_stats_existing_file(tmp_path):
    path = tmp_path / 'stats.npz'
    fid.save_stats(path, np.zeros(2), np.eye(2))

    with pytest.raises(UserError, match='already exists'):
        fid.save_stats(path, np.ones(2), np.eye(2))
    np.testing.assert_array_equal(fid.load_stats(path)[0], np.zeros(2))

    fid.save_stats(path, np.ones(2), np.eye(2), overwrite=True)
    np.testing.assert_array_equal(fid.load_stats(path)[0], np.ones(2))


def assert_one_line_naming(error, path):
    message = str(error.value)
    assert '\n' not in message
    assert str(path) in message


def test_load_stats_missing_file(tmp_path):
    path = tmp_path / 'absent.npz'

    with pytest.raises(UserError, match='not found') as error:
        fid.load_stats(path)
    assert_one_line_naming(error, path)
    assert 'ncsn_jax.fid_stats' in str(error.value)


def test_load_stats_unreadable_file(tmp_path):
    path = tmp_path / 'garbage.npz'
    path.write_bytes(b'PK\x03\x04 this is not a zip archive')

    with pytest.raises(UserError, match='not a valid .npz') as error:
        fid.load_stats(path)
    assert_one_line_naming(error, path)


def test_load_stats_missing_sigma(tmp_path):
    path = tmp_path / 'mu_only.npz'
    np.savez(path, mu=np.zeros(3))

    with pytest.raises(UserError, match=r'no sigma array \(it has mu\)') as error:
        fid.load_stats(path)
    assert_one_line_naming(error, path)


def test_load_stats_npy_file(tmp_path):
    path = tmp_path / 'array.npy'
    np.save(path, np.zeros(3))

    with pytest.raises(UserError, match='single .npy array') as error:
        fid.load_stats(path)
    assert_one_line_naming(error, path)


def test_load_stats_shape_mismatch(tmp_path):
    path = tmp_path / 'mismatch.npz'
    np.savez(path, mu=np.zeros(3), sigma=np.eye(2))

    with pytest.raises(UserError, match='do not fit') as error:
        fid.load_stats(path)
    assert_one_line_naming(error, path)
