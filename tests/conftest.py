"""Shared fixtures: paths to the stored reference files and converted models."""

import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / 'tests' / 'data'
GOLDEN = DATA / 'golden'
CHECKPOINTS = DATA / 'checkpoints'
DIGITS_CHECKPOINT = ROOT / 'model_weights' / 'digits' / 'digits_ngf16.pth'

# Checkpoint file -> golden forward file, for every stored score model.
FORWARD_CASES = {
    'cifar10_ngf16_random': CHECKPOINTS / 'cifar10_ngf16_random.pth',
    'church_ngf8_random': CHECKPOINTS / 'church_ngf8_random.pth',
    'deepest_ffhq_ngf4_random': CHECKPOINTS / 'deepest_ffhq_ngf4_random.pth',
    'digits_ngf16': DIGITS_CHECKPOINT,
}

sys.path.insert(0, str(ROOT / 'tests'))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Compiled programs are cached on disk across test runs (and across the subprocesses of CLI tests,
# which inherit the environment variables).
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(ROOT / '.jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))


def assert_one_line_error(result, *fragments):
    """Check that a finished CLI process failed with one stderr line containing `fragments`."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert 'Traceback' not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def run_main_py(*args, cwd):
    """Run main.py in a subprocess with `args` (converted to str) from `cwd`."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / 'main.py')] + [str(a) for a in args],
                          capture_output=True, text=True, cwd=cwd)


def relative_l2(actual, expected) -> float:
    """‖actual − expected‖ / ‖expected‖ in float64."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


@pytest.fixture(scope='session')
def converted_models(tmp_path_factory):
    """Convert every stored checkpoint once per session: {(name, ema): path}."""
    from ncsn_jax.convert import convert_file
    out_dir = tmp_path_factory.mktemp('converted')
    paths = {}
    for name, source in FORWARD_CASES.items():
        for ema in (True, False):
            out = out_dir / f'{name}_{"ema" if ema else "raw"}.msgpack'
            convert_file(source, out, ema=ema)
            paths[name, ema] = out
    return paths


@pytest.fixture(scope='session')
def digits_model_path(converted_models):
    return converted_models['digits_ngf16', True]


@pytest.fixture(scope='session')
def inception_weights(tmp_path_factory):
    """(stand-in .pth in pytorch-fid's layout, its converted file), made once per session.

    The real FID Inception weights cannot be bundled, so make_inception_weights.py writes seeded
    weights in the same layout; the golden Inception outputs were computed with them.
    """
    import subprocess

    from ncsn_jax.convert import convert_file
    folder = tmp_path_factory.mktemp('fid_inception')
    torch_file = folder / 'pt_inception_stand_in.pth'
    converted = folder / 'inception.msgpack'
    subprocess.run([sys.executable, str(DATA / 'make_inception_weights.py'), str(torch_file)],
                   check=True)
    convert_file(torch_file, converted)
    return torch_file, converted
