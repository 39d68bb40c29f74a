"""Time one training step of ncsn-jax against the PyTorch port of the official step.

    python bench/train_step.py [--batch N] [--repeats N] [--torch-threads N]

The model is the bundled digits NCSNv2 (ngf 16, 1x32x32, 100 noise levels) loaded from
model_weights/digits/digits_ngf16.pth into both frameworks (raw weights). A step is the official
one: the denoising score-matching loss, its gradients, Adam (lr 5e-4) and the EMA update (rate
0.999). Both sides use the same batch of random images, labels and noise, which stay fixed.

Three steps are timed, taking turns within each repetition so that all see the same load.
They are PyTorch (eager, float32), ncsn-jax's step compiled as the trainer compiles it, and the
same step compiled with XLA's default options. On the CPU the last differs from the trainer's in
one option: platform-dependent math is on. Reported times are medians. The last lines print the
time ratios; a JAX/PyTorch ratio below 1 means that JAX is faster.
"""

import argparse
import functools
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tests'))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

import torch_reference  # noqa: E402
from sampler import load_text  # noqa: E402  (bench/sampler.py, next to this script)
from ncsn_jax import convert, train, train_state  # noqa: E402
from ncsn_jax.models import create_model  # noqa: E402

CHECKPOINT = ROOT / 'model_weights' / 'digits' / 'digits_ngf16.pth'
LR = 5e-4
EMA_RATE = 0.999
ANNEAL_POWER = 2.0


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch', type=int, default=64, help='images per step (default 64, as '
                        'configs/digits.yml trains)')
    parser.add_argument('--repeats', type=int, default=5, help='timed steps of each kind '
                        '(default 5)')
    parser.add_argument('--torch-threads', type=int, help='torch intra-op threads (default: '
                        "torch's choice)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error('--batch and --repeats must be >= 1')
    return args


def torch_step_fn(batch):
    """Return a function that runs one official PyTorch training step on `batch`."""
    model, _ = torch_reference.load_official_checkpoint(CHECKPOINT, ema=False)
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.999), eps=1e-8)
    shadow = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, labels, z, sigmas = (torch.from_numpy(batch[k]) for k in ('x', 'labels', 'z', 'sigmas'))

    def step():
        loss = torch_reference.dsm_loss_torch(model, x, labels, z, sigmas, ANNEAL_POWER)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for name, param in model.named_parameters():
                shadow[name].mul_(EMA_RATE).add_(param, alpha=1 - EMA_RATE)
        return loss.item()

    return step


def jax_step_fns(batch):
    """Return {name: function running one compiled ncsn-jax step on `batch`}."""
    payload = convert.train_state_from_checkpoint(
        convert.split_checkpoint(convert.load_torch_file(CHECKPOINT), CHECKPOINT), CHECKPOINT)
    metadata = payload['metadata']
    module = create_model(metadata['architecture'], metadata['ngf'], metadata['channels'])
    optimizer = train_state.make_optimizer(train_state.AdamSettings(lr=LR))
    state = train_state.create_train_state(jax.tree.map(jnp.asarray, payload['params']),
                                           optimizer, ema=True)
    step = functools.partial(train.apply_step, module=module, optimizer=optimizer,
                             anneal_power=ANNEAL_POWER, ema_rate=EMA_RATE)
    arrays = (jnp.asarray(batch['x'].transpose(0, 2, 3, 1)), jnp.asarray(batch['labels']),
              jnp.asarray(batch['z'].transpose(0, 2, 3, 1)), jnp.asarray(batch['sigmas']))
    options = {'trainer': train.step_compiler_options(jax.default_backend()),
               'XLA defaults': {}}
    functions = {}
    for name, compiler_options in options.items():
        compiled = jax.jit(step, compiler_options=compiler_options)
        holder = {'state': state}

        def run(compiled=compiled, holder=holder):
            holder['state'], loss = compiled(holder['state'], *arrays)
            return float(loss)

        started = time.perf_counter()
        run()
        print(f'JAX ({name}): first call (compilation included) '
              f'{time.perf_counter() - started:.1f} s')
        functions[f'JAX ({name})'] = run
    return functions


def main(argv=None):
    args = parse_args(argv)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    print(f'CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; '
          f'jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} '
          f'({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print(f'model: digits NCSNv2 (ngf 16, 1x32x32), batch {args.batch}, float32')
    print(load_text())

    rng = np.random.default_rng(0)
    sigmas = np.asarray(torch.load(CHECKPOINT, map_location='cpu', weights_only=True)[0]
                        ['module.sigmas'], np.float32)
    batch = {'x': rng.uniform(size=(args.batch, 1, 32, 32)).astype(np.float32),
             'labels': rng.integers(0, len(sigmas), args.batch),
             'z': rng.standard_normal((args.batch, 1, 32, 32)).astype(np.float32),
             'sigmas': sigmas}
    steps = {'PyTorch': torch_step_fn(batch)}
    steps['PyTorch']()  # warm-up
    steps.update(jax_step_fns(batch))

    times = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    print(load_text())
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        runs = ', '.join(f'{v:.3f}' for v in values)
        print(f'{name}: median {medians[name]:.3f} s/step (runs: {runs})')
    print('JAX (XLA defaults)/JAX (trainer) time ratio: '
          f'{medians["JAX (XLA defaults)"] / medians["JAX (trainer)"]:.3f}')
    print('JAX (XLA defaults)/PyTorch time ratio: '
          f'{medians["JAX (XLA defaults)"] / medians["PyTorch"]:.3f}')
    print(f'JAX (trainer)/PyTorch time ratio: {medians["JAX (trainer)"] / medians["PyTorch"]:.3f}')


if __name__ == '__main__':
    main()
