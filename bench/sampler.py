"""Time the JAX PID sampler against the PyTorch reference sampler on the same weights.

    python bench/sampler.py [--quick] [--case both|digits|cifar] [--steps N] [--batch N]
                            [--digits-steps N] [--digits-batch N] [--repeats N] [--torch-threads N]

There are two cases. The first is the bundled digits model (NCSNv2, ngf 16, 1x32x32), converted
from model_weights/digits/digits_ngf16.pth. The second is a randomly initialised CIFAR-10-size
NCSNv2 (ngf 128, 3x32x32), built in torch, saved as a state dict and converted with
`convert_file`, so both samplers run identical weights. Both samplers replay the same noise, skip
the final denoising step (so one sampler step is one network forward per image) and record the
same 13 per-step statistics. Repetitions alternate torch, JAX, torch, JAX so that both see the
same machine load, and the reported times are medians. The last line printed is
`JAX/PyTorch time ratio: <JAX time / PyTorch time>` for the CIFAR-10-size case (below 1 means JAX
is faster).
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
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
from ncsn_jax import load_score_model, pid_ald  # noqa: E402
from ncsn_jax.convert import convert_file  # noqa: E402
from ncsn_jax.sampling import geometric_sigmas  # noqa: E402

DIGITS_CHECKPOINT = ROOT / 'model_weights' / 'digits' / 'digits_ngf16.pth'
# Multiply-adds of one 32x32 forward of the CIFAR-10 NCSNv2 (ngf 128), times 2, counting every
# kernel tap of every convolution, taps on the zero padding included.
CIFAR_COUNTED_GFLOP = 19.8
IMAGE_SIZE = 32
STEP_LR = 2e-5
GAINS = dict(k_p=2.0, k_i=0.5, k_d=4.5, k_i_decay=1.0, k_d_decay=1.0)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true',
                        help='smoke test of about a minute: small batches, 2-4 steps, 1 repetition '
                        '(explicit --steps/--batch/... options still apply)')
    parser.add_argument('--case', choices=('both', 'digits', 'cifar'), default='both',
                        help='which model to time (default: both, digits first)')
    parser.add_argument('--steps', type=int, help='sampler steps of the CIFAR-10-size case '
                        '(default 10, quick 2)')
    parser.add_argument('--batch', type=int, help='images per batch of the CIFAR-10-size case '
                        '(default 8, quick 2)')
    parser.add_argument('--digits-steps', type=int, help='sampler steps of the digits case '
                        '(default 10, quick 4)')
    parser.add_argument('--digits-batch', type=int, help='images per batch of the digits case '
                        '(default 64, the demo batch; quick 16)')
    parser.add_argument('--steps-each', type=int, default=1,
                        help='steps per noise level; the number of levels is steps / steps-each '
                        '(default 1)')
    parser.add_argument('--repeats', type=int, help='timed runs of each sampler, interleaved '
                        '(default 3, quick 1)')
    parser.add_argument('--torch-threads', type=int,
                        help='torch intra-op threads (default: the CPU cores this process may use)')
    parser.add_argument('--matmul-size', type=int, default=2048,
                        help='side of the square float32 matrices timed for the matrix-multiply '
                        'rate (default 2048)')
    args = parser.parse_args(argv)

    quick = args.quick
    defaults = dict(steps=(2 if quick else 10), batch=(2 if quick else 8),
                    digits_steps=(4 if quick else 10), digits_batch=(16 if quick else 64),
                    repeats=(1 if quick else 3))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ('steps', 'batch', 'digits_steps', 'digits_batch', 'steps_each', 'repeats'):
        if getattr(args, name) < 1:
            option = '--' + name.replace('_', '-')
            parser.error(f'{option} must be at least 1, got {getattr(args, name)}')
    step_options = {'both': ('digits_steps', 'steps'), 'digits': ('digits_steps',),
                    'cifar': ('steps',)}[args.case]
    for name in step_options:
        if getattr(args, name) % args.steps_each:
            parser.error(f'--{name.replace("_", "-")} {getattr(args, name)} is not a multiple of '
                         f'--steps-each {args.steps_each}')
    return args


# ---------------------------------------------------------------------------------------------
# Machine description and reference rates.

def cpu_model() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_text() -> str:
    one, five, fifteen = os.getloadavg()
    return f'load average {one:.2f} {five:.2f} {fifteen:.2f} (1, 5, 15 min)'


def matmul_rates(size: int, repeats: int = 5) -> dict:
    """Measure float32 matrix-multiply GFLOP/s (2·n³ per product) in JAX, NumPy and torch.

    The libraries take turns within each repetition, so all three see the same load.
    """
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    a_jax, b_jax = jnp.asarray(a), jnp.asarray(b)
    a_torch, b_torch = torch.from_numpy(a), torch.from_numpy(b)
    jax_matmul = jax.jit(jnp.matmul)
    functions = {
        'JAX': lambda: jax_matmul(a_jax, b_jax).block_until_ready(),
        'NumPy': lambda: a @ b,
        'torch': lambda: torch.matmul(a_torch, b_torch),
    }
    for function in functions.values():
        function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    flop = 2.0 * size ** 3
    return {name: flop / statistics.median(values) / 1e9 for name, values in times.items()}


# ---------------------------------------------------------------------------------------------
# FLOP counts.

def xla_forward_flops(model, channels: int) -> float:
    """Return the FLOPs of one image forward as counted by XLA's cost analysis."""
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, channels), jnp.float32)
    compiled = jax.jit(lambda m, images: m(images, 1.0)).lower(model, x).compile()
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return float(analysis['flops'])


def _sub_jaxprs(value):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def _dense_flops(jaxpr) -> float:
    total = 0.0
    for equation in jaxpr.eqns:
        if equation.primitive.name == 'conv_general_dilated':
            numbers = equation.params['dimension_numbers']
            kernel_shape = equation.invars[1].aval.shape
            out_feature_dim = numbers.rhs_spec[0]
            taps_times_inputs = np.prod(kernel_shape) / kernel_shape[out_feature_dim]
            total += 2.0 * np.prod(equation.outvars[0].aval.shape) * taps_times_inputs
        elif equation.primitive.name == 'dot_general':
            (lhs_contracting, _), _ = equation.params['dimension_numbers']
            lhs_shape = equation.invars[0].aval.shape
            contracted = np.prod([lhs_shape[d] for d in lhs_contracting])
            total += 2.0 * np.prod(equation.outvars[0].aval.shape) * contracted
        for value in equation.params.values():
            for sub in _sub_jaxprs(value):
                total += _dense_flops(sub)
    return total


def dense_forward_flops(model, channels: int) -> float:
    """Count the FLOPs of one image forward: 2 per multiply-add, over every kernel tap.

    Taps that fall on the zero padding are counted too, unlike in XLA's cost analysis.
    """
    x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, channels), jnp.float32)
    closed = jax.make_jaxpr(lambda m, images: m(images, 1.0))(model, x)
    return _dense_flops(closed.jaxpr)


def check_xla_conv_counting() -> str:
    """Return a line describing how XLA's cost analysis counts a padded 3x3 convolution."""
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    kernel = jnp.zeros((3, 3, 4, 8), jnp.float32)
    conv = jax.jit(lambda a, w: jax.lax.conv_general_dilated(
        a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    analysis = conv.lower(x, kernel).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    flops = float(analysis['flops'])
    all_taps = 8 * 8 * 8 * 4 * 9
    # Taps that land inside the 8x8 image: 6 interior rows/columns see 3 taps, the 2 edge ones 2.
    inside_taps = (6 * 3 + 2 * 2) ** 2 * 8 * 4
    return (f'XLA cost analysis of a 3x3 conv, 8x8x4 -> 8x8x8, padding 1: {flops:.0f} FLOPs; '
            f'multiply-adds over all taps {all_taps}, over taps inside the image {inside_taps} '
            f'(so XLA counts {flops / inside_taps:.0f} FLOPs per multiply-add and skips taps on '
            'the padding)')


# ---------------------------------------------------------------------------------------------
# Models.

def digits_models(sigmas, workdir: Path):
    torch_model, _ = torch_reference.load_official_checkpoint(DIGITS_CHECKPOINT, ema=True)
    converted = workdir / 'digits.msgpack'
    convert_file(DIGITS_CHECKPOINT, converted, ema=True)
    return torch_model, load_score_model(converted)


def cifar_models(sigmas, workdir: Path):
    torch.manual_seed(0)
    torch_model = torch_reference.build_model('NCSNv2', 128, 3, sigmas).eval()
    source = workdir / 'cifar10_ngf128_random.pth'
    torch.save(torch_model.state_dict(), source)
    converted = workdir / 'cifar10_ngf128_random.msgpack'
    convert_file(source, converted)
    return torch_model, load_score_model(converted)


# ---------------------------------------------------------------------------------------------
# One case.

def relative_l2(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def run_case(name, make_models, *, channels, batch, steps, steps_each, repeats, sigma_begin,
             reference_gflop, matmul_size, workdir):
    """Time both samplers on one model.

    Returns (JAX/PyTorch ratio of median sampler times, JAX GFLOP/s, PyTorch GFLOP/s, JAX matmul
    GFLOP/s measured between the sampler runs).
    """
    print(f'\n== {name}: batch {batch}, {steps} steps ({steps // steps_each} levels x '
          f'{steps_each}), {repeats} timed runs each ==')
    print(load_text())
    n_levels = steps // steps_each
    sigmas = geometric_sigmas(sigma_begin, 0.01, n_levels)
    torch_model, jax_model = make_models(sigmas, workdir)
    # pid_ald_torch passes the level index as the label, so the torch network divides by the
    # sampling ladder, as the JAX sampler divides by the sigma values.
    torch_model.sigmas = torch.from_numpy(sigmas)

    rng = np.random.default_rng(0)
    x_init = rng.uniform(size=(batch, channels, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    noise = rng.standard_normal((steps,) + x_init.shape).astype(np.float32)
    x_init_torch, noise_torch = torch.from_numpy(x_init), torch.from_numpy(noise)
    x_init_jax = jnp.asarray(x_init.transpose(0, 2, 3, 1))
    noise_jax = jnp.asarray(noise.transpose(0, 1, 3, 4, 2))
    settings = dict(n_steps_each=steps_each, step_lr=STEP_LR, denoise=False, **GAINS)

    def torch_sampler():
        x, _ = torch_reference.pid_ald_torch(torch_model, x_init_torch, sigmas, noise=noise_torch,
                                             **settings)
        return x

    def jax_sampler():
        x, _ = pid_ald(jax_model, x_init_jax, sigmas, noise=noise_jax, **settings)
        return x.block_until_ready()

    labels = torch.zeros(batch, dtype=torch.long)
    jax_forward = jax.jit(lambda model, images: model(images, sigmas[0]))

    def torch_network():
        with torch.no_grad():
            torch_model(x_init_torch, labels)

    def jax_network():
        jax_forward(jax_model, x_init_jax).block_until_ready()

    matrix = jnp.asarray(rng.standard_normal((matmul_size, matmul_size), dtype=np.float32))
    jax_matmul = jax.jit(jnp.matmul)

    def matmul():
        jax_matmul(matrix, matrix).block_until_ready()

    xla_flop = xla_forward_flops(jax_model, channels)
    dense_flop = dense_forward_flops(jax_model, channels)
    print(f'FLOPs per image forward: XLA cost analysis {xla_flop / 1e9:.3f} GFLOP, all kernel taps '
          f'(padding included) {dense_flop / 1e9:.3f} GFLOP')

    start = time.perf_counter()
    jax_network()
    network_first = time.perf_counter() - start
    start = time.perf_counter()
    jax_sampler()
    sampler_first = time.perf_counter() - start
    # The first torch call creates the oneDNN primitives, so it stays out of the timings.
    torch_network()
    matmul()

    runs = {'torch sampler': torch_sampler, 'JAX sampler': jax_sampler,
            'torch network': torch_network, 'JAX network': jax_network, 'matmul': matmul}
    times = {label: [] for label in runs}
    outputs = {}
    for _ in range(repeats):
        for label, function in runs.items():
            start = time.perf_counter()
            outputs[label] = function()
            times[label].append(time.perf_counter() - start)
    median = {label: statistics.median(values) for label, values in times.items()}

    sampler_compile = sampler_first - median['JAX sampler']
    network_compile = network_first - median['JAX network']
    print(f'JAX first call minus warm call (compilation and other one-time work): sampler '
          f'{sampler_compile:.2f} s, network alone {network_compile:.2f} s')
    image_steps = batch * steps
    if reference_gflop is None:
        rate_flop, rate_source = xla_flop, 'XLA count'
    else:
        rate_flop, rate_source = reference_gflop * 1e9, f'{reference_gflop} GFLOP counted'
    for side in ('torch', 'JAX'):
        sampler = median[f'{side} sampler']
        network = median[f'{side} network']
        each = ' '.join(f'{t:.2f}' for t in times[f'{side} sampler'])
        overhead = sampler / steps - network
        label = 'PyTorch' if side == 'torch' else 'JAX'
        print(f'{label:8s} sampler {sampler:7.2f} s (runs: {each}), {image_steps / sampler:7.1f} '
              f'image-steps/s, {rate_flop * image_steps / sampler / 1e9:6.1f} GFLOP/s '
              f'({rate_source}); network alone {network:.3f} s per forward, so '
              f'{overhead:+.3f} s per step outside the network')
    difference = relative_l2(np.asarray(outputs['JAX sampler']),
                             outputs['torch sampler'].numpy().transpose(0, 2, 3, 1))
    print(f'final samples, JAX vs PyTorch: relative L2 difference {difference:.1e}')
    matmul_rate = 2.0 * matmul_size ** 3 / median['matmul'] / 1e9
    print(f'JAX {matmul_size}x{matmul_size} float32 matmul between the sampler runs: '
          f'{matmul_rate:.1f} GFLOP/s')
    ratio = median['JAX sampler'] / median['torch sampler']
    best_ratio = min(times['JAX sampler']) / min(times['torch sampler'])
    print(f'network alone JAX/PyTorch time ratio: '
          f'{median["JAX network"] / median["torch network"]:.3f}; sampler, fastest runs: '
          f'{best_ratio:.3f}; sampler, medians: {ratio:.3f}')
    print(load_text())
    jax_rate = rate_flop * image_steps / median['JAX sampler'] / 1e9
    torch_rate = rate_flop * image_steps / median['torch sampler'] / 1e9
    return ratio, jax_rate, torch_rate, matmul_rate


def main(argv=None) -> int:
    args = parse_args(argv)
    jax.config.update('jax_default_matmul_precision', 'highest')  # as main.py sets it
    threads = args.torch_threads or available_cores()
    torch.set_num_threads(threads)

    print(f'CPU: {cpu_model()}, {available_cores()} cores available to this process '
          f'({os.cpu_count()} online)')
    print(f'Python {platform.python_version()}, jax {jax.__version__}, torch {torch.__version__} '
          f'({threads} intra-op threads), NumPy {np.__version__}')
    print(f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print(load_text())
    rates = matmul_rates(args.matmul_size)
    print(f'float32 {args.matmul_size}x{args.matmul_size} matmul GFLOP/s: '
          + ', '.join(f'{name} {rate:.1f}' for name, rate in rates.items()))
    print(check_xla_conv_counting())

    cases = []
    if args.case in ('both', 'digits'):
        cases.append(('digits demo model (NCSNv2, ngf 16, 1x32x32)', digits_models, dict(
            channels=1, batch=args.digits_batch, steps=args.digits_steps, sigma_begin=17.0,
            reference_gflop=None)))
    if args.case in ('both', 'cifar'):
        cases.append(('CIFAR-10-size random model (NCSNv2, ngf 128, 3x32x32)', cifar_models, dict(
            channels=3, batch=args.batch, steps=args.steps, sigma_begin=50.0,
            reference_gflop=CIFAR_COUNTED_GFLOP)))

    results = []
    with tempfile.TemporaryDirectory(prefix='ncsn_bench_') as workdir:
        for name, make_models, options in cases:
            results.append((name,) + run_case(
                name, make_models, steps_each=args.steps_each, repeats=args.repeats,
                matmul_size=args.matmul_size, workdir=Path(workdir), **options))

    print('\n== summary (GFLOP/s as a share of the JAX matmul rate measured between the runs) ==')
    for name, ratio, jax_rate, torch_rate, matmul_rate in results:
        print(f'{name}: JAX {jax_rate:.1f} GFLOP/s ({100 * jax_rate / matmul_rate:.0f}%), '
              f'PyTorch {torch_rate:.1f} GFLOP/s ({100 * torch_rate / matmul_rate:.0f}%), '
              f'matmul {matmul_rate:.1f} GFLOP/s, JAX/PyTorch time ratio {ratio:.3f}')
    if args.case == 'digits':
        print(f'JAX/PyTorch time ratio (digits): {results[-1][1]:.3f}')
    else:
        print(f'JAX/PyTorch time ratio: {results[-1][1]:.3f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
