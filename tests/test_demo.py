"""Quality check of the bundled demo: PID samples look like digits, plain Langevin samples do not.

A classifier trained on scikit-learn's 8x8 digits (passed through the same 8 -> 32 -> 8 resizing
as the samples) should be confident on PID samples and unsure on plain annealed Langevin samples
drawn with the same budget of 100 levels x 1 step.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from ncsn_jax import geometric_sigmas, load_score_model, pid_ald
from ncsn_jax.experiment import initial_samples, sample_keys

N_SAMPLES = 32


def to_8x8(images):
    """Clip to [0, 1] and average 4x4 blocks: (N, 32, 32, 1) -> (N, 64)."""
    images = np.clip(np.asarray(images, np.float64), 0.0, 1.0)[..., 0]
    return images.reshape(-1, 8, 4, 8, 4).mean(axis=(2, 4)).reshape(-1, 64)


@pytest.fixture(scope='module')
def classifier():
    digits = load_digits()
    upsampled = jax.image.resize(jnp.asarray(digits.images / 16.0)[..., None],
                                 (len(digits.images), 32, 32, 1), 'bilinear')
    # NOTE: SVC's built-in Platt scaling is deprecated from scikit-learn 1.9 (removed in 1.11). A
    # CalibratedClassifierCV replacement was tried and is confident on noise, so it cannot tell the
    # two samplers apart. The test extra therefore pins scikit-learn below 1.11.
    model = SVC(probability=True, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return model.fit(to_8x8(upsampled), digits.target)


@pytest.fixture(scope='module')
def demo_samples(digits_model_path):
    model = load_score_model(digits_model_path)
    sigmas = geometric_sigmas(17.0, 0.01, 100)
    init_keys, noise_keys = sample_keys(1234, np.arange(N_SAMPLES))
    x_init = initial_samples(init_keys, (32, 32, 1))
    common = dict(key=noise_keys, n_steps_each=1, step_lr=2e-5)
    pid, _ = pid_ald(model, x_init, sigmas, k_p=2.0, k_i=0.5, k_d=4.5, **common)
    plain, _ = pid_ald(model, x_init, sigmas, k_p=1.0, k_i=0.0, k_d=0.0, **common)
    return np.asarray(pid), np.asarray(plain)


def test_pid_samples_are_confident_digits(classifier, demo_samples):
    pid, _ = demo_samples
    confidence = classifier.predict_proba(to_8x8(pid)).max(axis=1)
    assert np.median(confidence) > 0.7, confidence
    assert len(set(classifier.predict(to_8x8(pid)))) >= 5


def test_plain_langevin_samples_are_not(classifier, demo_samples):
    _, plain = demo_samples
    confidence = classifier.predict_proba(to_8x8(plain)).max(axis=1)
    assert np.median(confidence) < 0.45, confidence


def test_plain_langevin_leaves_values_far_outside_range(demo_samples):
    pid, plain = demo_samples
    assert np.abs(plain).max() > 3.0
    assert pid.min() > -0.5
    assert pid.max() < 1.5
