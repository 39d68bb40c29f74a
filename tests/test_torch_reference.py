"""Checks of the PyTorch port in torch_reference.py against outputs of the official code."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import torch_reference as ref

TESTS_DIR = Path(__file__).resolve().parent
DATA_DIR = TESTS_DIR / 'data'
GOLDEN_DIR = DATA_DIR / 'golden'
DIGITS_CHECKPOINT = TESTS_DIR.parent / 'model_weights' / 'digits' / 'digits_ngf16.pth'
TOLERANCE = 1e-5

CHECKPOINTS = {
    'cifar10_ngf16_random': DATA_DIR / 'checkpoints' / 'cifar10_ngf16_random.pth',
    'church_ngf8_random': DATA_DIR / 'checkpoints' / 'church_ngf8_random.pth',
    'deepest_ffhq_ngf4_random': DATA_DIR / 'checkpoints' / 'deepest_ffhq_ngf4_random.pth',
    'digits_ngf16': DIGITS_CHECKPOINT,
}

# (architecture, ngf, channels, num_classes, step) of each checkpoint file.
CHECKPOINT_META = {
    'cifar10_ngf16_random': ('NCSNv2', 16, 3, 232, 3),
    'cifar10_ngf16_after_step': ('NCSNv2', 16, 3, 232, 4),
    'church_ngf8_random': ('NCSNv2Deeper', 8, 3, 788, 3),
    'deepest_ffhq_ngf4_random': ('NCSNv2Deepest', 4, 3, 2311, 3),
    'digits_ngf16': ('NCSNv2', 16, 1, 100, 4000),
}

MANIFESTS = ('cifar10', 'celeba', 'church', 'bedroom', 'tower', 'ffhq')


@pytest.fixture(autouse=True)
def single_torch_thread():
    # The networks here are tiny, so intra-op threads cost more than they gain. On a 2-core
    # machine with other jobs running, the sampler replay took 6.7 s with 2 threads and 2.5 s with 1.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def checkpoint_path(name):
    return CHECKPOINTS.get(name, DATA_DIR / 'checkpoints' / f'{name}.pth')


def replay_pid_golden(score_batch_size=None):
    golden = np.load(GOLDEN_DIR / 'pid_ald_digits.npz')
    params = json.loads(str(golden['params']))
    model, _ = ref.load_official_checkpoint(DIGITS_CHECKPOINT, ema=params['use_ema'])
    # The original sampler replaces the network's sigma table with the sampling ladder, so the
    # label of level i selects sigmas[i] of the 12-level ladder, not of the 100 training levels.
    model.sigmas = torch.from_numpy(golden['sigmas'])
    x_final, record = ref.pid_ald_torch(
        model, torch.from_numpy(golden['x_init']), golden['sigmas'],
        n_steps_each=params['n_steps_each'], step_lr=params['step_lr'],
        k_p=params['k_p'], k_i=params['k_i'], k_d=params['k_d'],
        k_i_decay=params['k_i_decay'], k_d_decay=params['k_d_decay'],
        denoise=params['denoise'], noise=torch.from_numpy(golden['noise']),
        score_batch_size=score_batch_size)
    return golden, x_final, record


@pytest.mark.parametrize('name', sorted(CHECKPOINTS))
@pytest.mark.parametrize('use_ema', [False, True], ids=['params', 'ema'])
def test_forward_matches_golden(name, use_ema):
    golden = np.load(GOLDEN_DIR / f'forward_{name}.npz')
    model, _ = ref.load_official_checkpoint(checkpoint_path(name), ema=use_ema)

    with torch.no_grad():
        out = model(torch.from_numpy(golden['x']), torch.from_numpy(golden['labels']))

    np.testing.assert_array_equal(model.sigmas.numpy(), golden['sigmas'])
    expected = golden['out_ema' if use_ema else 'out_params']
    assert out.shape == expected.shape
    assert relative_error(out.numpy(), expected) <= TOLERANCE


@pytest.mark.parametrize('name', sorted(CHECKPOINT_META))
def test_checkpoint_metadata_inferred(name):
    architecture, ngf, channels, num_classes, step = CHECKPOINT_META[name]
    _, meta = ref.load_official_checkpoint(checkpoint_path(name), ema=True)

    assert meta['architecture'] == architecture
    assert meta['ngf'] == ngf
    assert meta['channels'] == channels
    assert meta['num_classes'] == num_classes
    assert meta['step'] == step
    assert meta['ema'] is True


def test_checkpoint_ema_loads_shadow_over_params():
    path = CHECKPOINTS['cifar10_ngf16_random']
    raw_model, _ = ref.load_official_checkpoint(path, ema=False)
    ema_model, _ = ref.load_official_checkpoint(path, ema=True)
    model_state, _, _, _, shadow = torch.load(path, weights_only=True)

    for name, param in raw_model.named_parameters():
        torch.testing.assert_close(param, model_state[f'module.{name}'], rtol=0, atol=0)
    for name, param in ema_model.named_parameters():
        torch.testing.assert_close(param, shadow[name], rtol=0, atol=0)
    torch.testing.assert_close(ema_model.sigmas, model_state['module.sigmas'], rtol=0, atol=0)
    assert not torch.equal(raw_model.begin_conv.weight, ema_model.begin_conv.weight)


def test_pid_replay_matches_golden():
    golden, x_final, record = replay_pid_golden()

    assert relative_error(x_final.numpy(), golden['final']) <= TOLERANCE
    assert set(record) == set(ref.RECORD_NAMES)
    for name in ref.RECORD_NAMES:
        expected = golden[f'record_{name}']
        assert record[name].shape == expected.shape, name
        assert relative_error(record[name], expected) <= TOLERANCE, name


def test_pid_chunked_score_matches_golden():
    golden, x_final, record = replay_pid_golden(score_batch_size=3)

    assert relative_error(x_final.numpy(), golden['final']) <= TOLERANCE
    for name in ref.RECORD_NAMES:
        assert relative_error(record[name], golden[f'record_{name}']) <= TOLERANCE, name


def gaussian_score(x, labels):
    """Score of a standard normal distribution, for sampler checks that need no network."""
    return -x


def test_pid_gains_decay_after_each_step():
    sigmas = np.array([4.0, 2.0, 1.0], dtype=np.float32)
    n_steps_each, step_lr, k_i, k_d = 2, 1e-3, 0.5, 3.0
    k_i_decay, k_d_decay = 0.5, 0.9
    generator = torch.Generator().manual_seed(0)
    x_init = torch.rand(3, 1, 4, 4, generator=generator)

    _, record = ref.pid_ald_torch(gaussian_score, x_init, sigmas, n_steps_each=n_steps_each,
                                  step_lr=step_lr, k_i=k_i, k_d=k_d, k_i_decay=k_i_decay,
                                  k_d_decay=k_d_decay, generator=generator)

    step_sizes = np.repeat(step_lr * (sigmas / sigmas[-1]) ** 2, n_steps_each)
    steps = np.arange(len(step_sizes))
    expected_i = step_sizes * k_i * k_i_decay ** steps * record['e_int_norms']
    expected_d = step_sizes * k_d * k_d_decay ** steps * record['e_diff_norms']
    np.testing.assert_allclose(record['I_term_norms'], expected_i, rtol=1e-5)
    np.testing.assert_allclose(record['D_term_norms'], expected_d, rtol=1e-5)
    # The derivative term starts from a zero previous score, and the running mean from the score.
    assert record['e_diff_norms'][0] == record['grad_norms'][0]
    assert record['e_int_norms'][0] == record['grad_norms'][0]


def test_pid_generator_run_is_reproducible():
    sigmas = np.array([2.0, 1.0], dtype=np.float32)
    x_init = torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    kwargs = dict(n_steps_each=3, step_lr=1e-2, k_p=1.0, k_i=0.2, k_d=0.1)

    first, _ = ref.pid_ald_torch(gaussian_score, x_init, sigmas,
                                 generator=torch.Generator().manual_seed(7), **kwargs)
    second, _ = ref.pid_ald_torch(gaussian_score, x_init, sigmas,
                                  generator=torch.Generator().manual_seed(7), **kwargs)

    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_pid_rejects_short_noise():
    sigmas = np.array([2.0, 1.0], dtype=np.float32)
    x_init = torch.zeros(1, 1, 2, 2)
    noise = torch.zeros(3, 1, 1, 2, 2)

    with pytest.raises(ValueError, match='noise has 3 steps'):
        ref.pid_ald_torch(gaussian_score, x_init, sigmas, n_steps_each=2, step_lr=1e-2,
                          noise=noise)


def test_dsm_loss_matches_golden():
    golden = np.load(GOLDEN_DIR / 'train_step_cifar10_ngf16.npz')
    inputs = [torch.from_numpy(golden[key]) for key in ('x', 'labels', 'z')]
    expected = float(golden['loss'])

    raw_model, _ = ref.load_official_checkpoint(CHECKPOINTS['cifar10_ngf16_random'], ema=False)
    raw_model.train()
    loss = ref.dsm_loss_torch(raw_model, *inputs, raw_model.sigmas,
                              anneal_power=float(golden['anneal_power']))

    assert loss.requires_grad
    assert abs(loss.detach().item() - expected) / expected <= TOLERANCE

    # The EMA shadow gives a clearly different loss, so the golden step used the raw weights.
    ema_model, _ = ref.load_official_checkpoint(CHECKPOINTS['cifar10_ngf16_random'], ema=True)
    with torch.no_grad():
        ema_loss = ref.dsm_loss_torch(ema_model, *inputs, ema_model.sigmas)
    assert abs(ema_loss.item() - expected) / expected > 1e-2


@pytest.mark.parametrize('dataset', MANIFESTS)
def test_manifest_layout_matches_build(dataset):
    manifest = json.loads((DATA_DIR / 'manifests' / f'ncsnv2_{dataset}.json').read_text())
    sigmas = np.geomspace(manifest['sigma_begin'], manifest['sigma_end'], manifest['num_classes'])
    with torch.device('meta'):
        model = ref.build_model(manifest['architecture'], manifest['ngf'], manifest['channels'],
                                sigmas, image_size=manifest['image_size'])

    expected_state = [(key.removeprefix('module.'), shape, dtype)
                      for key, shape, dtype in manifest['model_state_dict']]
    actual_state = [(key, list(value.shape), str(value.dtype).removeprefix('torch.'))
                    for key, value in model.state_dict().items()]
    assert actual_state == expected_state

    expected_ema = [(key, shape) for key, shape in manifest['ema_shadow']]
    actual_ema = [(key, list(param.shape)) for key, param in model.named_parameters()]
    assert actual_ema == expected_ema

    assert sum(param.numel() for param in model.parameters()) == manifest['parameter_count']


def test_cifar10_parameter_count():
    with torch.device('meta'):
        model = ref.build_model('NCSNv2', 128, 3, np.geomspace(50, 0.01, 232))

    assert sum(param.numel() for param in model.parameters()) == 29_694_083


def test_adjust_padding_at_28_changes_nothing():
    sigmas = np.geomspace(10.0, 0.01, 5)
    torch.manual_seed(3)
    model_28 = ref.build_model('NCSNv2', 4, 1, sigmas, image_size=28).eval()
    model_32 = ref.build_model('NCSNv2', 4, 1, sigmas, image_size=32).eval()
    model_32.load_state_dict(model_28.state_dict(), strict=True)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 4])

    with torch.no_grad():
        out_28 = model_28(x, labels)
        out_32 = model_32(x, labels)

    assert not any(isinstance(module, ref.ConvMeanPool) for module in model_28.res4.modules())
    assert list(model_28.state_dict()) == list(model_32.state_dict())
    torch.testing.assert_close(out_28, out_32, rtol=0, atol=0)


def test_conv_mean_pool_adjust_padding_layout():
    pool = ref.ConvMeanPool(2, 3, 3, adjust_padding=True)
    x = torch.rand(1, 2, 7, 7, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        out = pool(x)
        padded = torch.nn.functional.pad(x, (1, 0, 1, 0))
        conv = pool.conv[1](padded)
        expected = (conv[:, :, ::2, ::2] + conv[:, :, 1::2, ::2]
                    + conv[:, :, ::2, 1::2] + conv[:, :, 1::2, 1::2]) / 4

    assert sorted(pool.state_dict()) == ['conv.1.bias', 'conv.1.weight']
    assert out.shape == (1, 3, 4, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
