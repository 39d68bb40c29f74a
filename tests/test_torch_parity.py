"""Randomized parity between the PyTorch port (torch_reference.py) and the converted Flax models.

Each case builds a small torch network with a random geometric sigma table and perturbs every
weight, InstanceNorm++ alpha, gamma and beta included. The test saves it as a bare state dict or
in the official list layout `[model_state, optimizer_state, epoch, step, ema_shadow]`, converts
the file with `convert_file`, and compares the forwards and the stored weights. A short PIDLD run
compares the two samplers.
"""

import copy
from typing import NamedTuple

import jax
import numpy as np
import pytest
import torch

import torch_reference as ref
from conftest import relative_l2
from ncsn_jax import checkpoint, load_score_model, pid_ald
from ncsn_jax.convert import convert_file, state_dict_from_params
from ncsn_jax.models import check_image_size

TOLERANCE = 1e-5
BATCH = 3
NORM_PARAMETERS = ('alpha', 'gamma', 'beta')


class ParityCase(NamedTuple):
    architecture: str
    ngf: int
    channels: int
    image_size: int
    layout: str  # 'bare' (a state dict without prefix) or 'list' (the official checkpoint list)

    @property
    def id(self):
        return (f'{self.architecture}-ngf{self.ngf}-c{self.channels}-{self.image_size}px-'
                f'{self.layout}')


# Every architecture at each size it accepts among 28, 32 and 64, in both file layouts, with ngf 2,
# 4 and 6 and 1 or 3 channels. NCSNv2Deepest halves the resolution three times, so it rejects 28.
CASES = (
    ParityCase('NCSNv2', 2, 1, 28, 'bare'),
    ParityCase('NCSNv2', 6, 3, 32, 'list'),
    ParityCase('NCSNv2Deeper', 4, 3, 28, 'list'),
    ParityCase('NCSNv2Deeper', 2, 1, 64, 'bare'),
    ParityCase('NCSNv2Deepest', 6, 1, 32, 'list'),
    ParityCase('NCSNv2Deepest', 4, 3, 64, 'bare'),
)


class ConvertedFile(NamedTuple):
    """One converted file with the torch model and state dict it must reproduce."""

    path: object
    ema: bool  # whether the file is expected to hold EMA weights
    torch_model: torch.nn.Module
    state_dict: dict  # expected parameters as NumPy arrays, without prefix and without sigmas


@pytest.fixture(scope='module', autouse=True)
def single_torch_thread():
    # With one intra-op thread the torch results do not depend on the machine's thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@jax.jit
def jax_score(model, x, sigma):
    return model(x, sigma)


def random_sigma_ladder(rng, num_classes, begin_range, end_range):
    """Draw a float32 geometric ladder with log-uniform endpoints in the given ranges."""
    sigma_begin = np.exp(rng.uniform(*np.log(begin_range)))
    sigma_end = np.exp(rng.uniform(*np.log(end_range)))
    return np.geomspace(sigma_begin, sigma_end, num_classes).astype(np.float32)


def perturbed_copy(parameters, generator):
    """Return a copy of each parameter with Gaussian noise added.

    InstanceNorm++ parameters get noise of std 0.2, so they move away from their initial values
    (about 1 for alpha and gamma, exactly 0 for beta). Other parameters get noise with a std of
    half their mean absolute value.
    """
    result = {}
    for name, value in parameters.items():
        if name.rsplit('.', 1)[-1] in NORM_PARAMETERS:
            scale = 0.2
        else:
            scale = 0.5 * float(value.detach().abs().mean())
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        result[name] = value.detach() + scale * noise
    return result


def build_perturbed_model(architecture, ngf, channels, sigmas, image_size, seed):
    """Build a torch score network in eval mode whose parameters are all perturbed."""
    torch.manual_seed(seed)
    model = ref.build_model(architecture, ngf, channels, sigmas, image_size=image_size)
    generator = torch.Generator().manual_seed(seed + 1)
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in perturbed_copy(parameters, generator).items():
            parameters[name].copy_(value)
    return model.eval()


def numpy_state(state_dict):
    return {k: v.detach().numpy().copy() for k, v in state_dict.items() if k != 'sigmas'}


@pytest.fixture(scope='module', params=CASES, ids=[case.id for case in CASES])
def converted_case(request, tmp_path_factory):
    """Build, save and convert one case. Returns (case, sigmas, {weights kind: ConvertedFile})."""
    case = request.param
    seed = 1000 + 10 * CASES.index(case)
    rng = np.random.default_rng(seed)
    num_classes = int(rng.integers(4, 13))
    sigmas = random_sigma_ladder(rng, num_classes, (1.0, 50.0), (0.005, 0.1))
    model = build_perturbed_model(case.architecture, case.ngf, case.channels, sigmas,
                                  case.image_size, seed)
    folder = tmp_path_factory.mktemp(case.id)
    source = folder / 'checkpoint.pth'
    files = {}

    if case.layout == 'bare':
        torch.save(model.state_dict(), source)
        out = folder / 'bare.msgpack'
        convert_file(source, out)
        files['raw'] = ConvertedFile(out, False, model, numpy_state(model.state_dict()))
        return case, sigmas, files

    # The official training loop saves the DataParallel state dict (keys prefixed with `module.`)
    # and an EMA shadow keyed by the unwrapped parameter names, without the sigmas buffer.
    generator = torch.Generator().manual_seed(seed + 2)
    shadow = perturbed_copy(dict(model.named_parameters()), generator)
    prefixed = {f'module.{k}': v for k, v in model.state_dict().items()}
    optimizer_state = torch.optim.Adam(model.parameters(), lr=1e-4).state_dict()
    epoch, step = int(rng.integers(0, 100)), int(rng.integers(0, 10_000))
    torch.save([prefixed, optimizer_state, epoch, step, shadow], source)

    for kind, ema in (('ema', True), ('raw', False)):
        out = folder / f'{kind}.msgpack'
        convert_file(source, out, ema=ema)
        torch_model, meta = ref.load_official_checkpoint(source, ema=ema)
        assert meta['ema'] == ema
        expected = {k: v.numpy().copy() for k, v in shadow.items()} if ema else numpy_state(
            model.state_dict())
        files[kind] = ConvertedFile(out, ema, torch_model, expected)
    return case, sigmas, files


def test_case_table_image_sizes_accepted():
    for case in CASES:
        reason = check_image_size(case.architecture, case.image_size)
        assert reason is None, f'{case.id}: {reason}'


def test_deepest_rejects_28_in_both_ports():
    reason = check_image_size('NCSNv2Deepest', 28)
    assert reason is not None, 'check_image_size accepted NCSNv2Deepest at 28x28'
    assert '28' in reason, f'the message does not name the size: {reason}'

    model = ref.build_model('NCSNv2Deepest', 2, 1, np.ones(4, np.float32))
    with torch.no_grad(), pytest.raises(RuntimeError):
        model(torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long))


def test_forward_matches_torch(converted_case):
    case, sigmas, files = converted_case
    rng = np.random.default_rng(7)
    x = rng.uniform(size=(BATCH, case.channels, case.image_size, case.image_size))
    x = x.astype(np.float32)
    # Distinct labels, so each sample of the batch is divided by a different sigma.
    labels = rng.choice(len(sigmas), size=BATCH, replace=False)

    outputs = {}
    for kind, converted in files.items():
        with torch.no_grad():
            expected = converted.torch_model(torch.from_numpy(x), torch.from_numpy(labels))
        expected = expected.numpy().transpose(0, 2, 3, 1)

        model = load_score_model(converted.path, ema=converted.ema)
        with jax.default_matmul_precision('highest'):
            actual = np.asarray(jax_score(model, x.transpose(0, 2, 3, 1), model.sigmas[labels]))

        assert actual.shape == expected.shape, f'{kind}: shape {actual.shape} != {expected.shape}'
        error = relative_l2(actual, expected)
        assert error <= TOLERANCE, f'{case.id} {kind} weights: relative L2 error {error:.3e}'
        outputs[kind] = expected

    if 'ema' in outputs:
        # The EMA shadow differs from the weights, so a converter that ignored it would fail above.
        difference = relative_l2(outputs['ema'], outputs['raw'])
        assert difference > 1e-3, f'EMA and raw outputs differ only by {difference:.3e}'


def test_converted_weights_round_trip(converted_case):
    case, sigmas, files = converted_case
    for kind, converted in files.items():
        payload = checkpoint.read_params_file(converted.path, kind='score_model')
        exported = state_dict_from_params(payload['params'])

        assert exported.keys() == converted.state_dict.keys(), (
            f'{kind}: keys differ: {sorted(exported.keys() ^ converted.state_dict.keys())[:5]}')
        for key, value in converted.state_dict.items():
            np.testing.assert_array_equal(exported[key], value, err_msg=f'{case.id} {kind}: {key}')
        np.testing.assert_array_equal(payload['extra']['sigmas'], sigmas,
                                      err_msg=f'{case.id} {kind}: sigmas')

        norm_values = np.concatenate([value.ravel() for key, value in converted.state_dict.items()
                                      if key.rsplit('.', 1)[-1] in NORM_PARAMETERS])
        assert np.abs(norm_values).min() > 0.0, f'{kind}: some InstanceNorm++ parameter is 0'


def test_pid_ald_matches_torch(tmp_path):
    seed = 2024
    rng = np.random.default_rng(seed)
    architecture, ngf, channels, image_size = 'NCSNv2', 2, 3, 28
    training_sigmas = random_sigma_ladder(rng, 10, (1.0, 50.0), (0.005, 0.1))
    model = build_perturbed_model(architecture, ngf, channels, training_sigmas, image_size, seed)
    source = tmp_path / 'model.pth'
    torch.save(model.state_dict(), source)
    convert_file(source, tmp_path / 'model.msgpack')
    jax_model = load_score_model(tmp_path / 'model.msgpack')

    n_levels, n_steps_each = 3, 2
    sigmas = random_sigma_ladder(rng, n_levels, (0.5, 2.0), (0.02, 0.1))
    settings = dict(
        n_steps_each=n_steps_each, step_lr=float(rng.uniform(1e-4, 5e-4)),
        k_p=float(rng.uniform(0.5, 1.5)), k_i=float(rng.uniform(0.1, 1.0)),
        k_d=float(rng.uniform(0.1, 1.0)), k_i_decay=float(rng.uniform(0.5, 0.95)),
        k_d_decay=float(rng.uniform(0.5, 0.95)), denoise=True)
    x_init = rng.uniform(size=(BATCH, channels, image_size, image_size)).astype(np.float32)
    noise = rng.standard_normal((n_levels * n_steps_each,) + x_init.shape).astype(np.float32)

    # pid_ald_torch passes the level index as the label, so the torch network divides by the
    # sampling ladder's sigma at that index, as the JAX model divides by the sigma value.
    sampler_model = copy.deepcopy(model)
    sampler_model.sigmas = torch.from_numpy(sigmas)
    expected_x, expected_record = ref.pid_ald_torch(
        sampler_model, torch.from_numpy(x_init), sigmas, noise=torch.from_numpy(noise), **settings)
    expected_x = expected_x.numpy().transpose(0, 2, 3, 1)

    with jax.default_matmul_precision('highest'):
        actual_x, actual_record = pid_ald(
            jax_model, x_init.transpose(0, 2, 3, 1), sigmas,
            noise=noise.transpose(0, 1, 3, 4, 2), **settings)

    error = relative_l2(actual_x, expected_x)
    assert error <= TOLERANCE, f'final samples: relative L2 error {error:.3e}'
    assert set(actual_record) == set(expected_record), (
        f'record names differ: {sorted(set(actual_record) ^ set(expected_record))}')
    for name, expected in expected_record.items():
        assert actual_record[name].shape == expected.shape, (
            f'{name}: shape {actual_record[name].shape} != {expected.shape}')
        error = relative_l2(actual_record[name], expected)
        assert error <= TOLERANCE, f'record {name}: relative L2 error {error:.3e}'
