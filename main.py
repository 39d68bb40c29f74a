"""Sample with PID-controlled annealed Langevin dynamics from a converted NCSNv2 checkpoint.

    python main.py --config digits.yml [-P K_P] [-I K_I] [-D K_D] [-T STEPS] [-L LEVELS] ...
    python main.py --resume EXPERIMENT_DIR
    python main.py --config cifar10.yml --distributed [--coordinator_address HOST:PORT
                   --num_processes N --process_id I]       (once on every host)

Flags override the config. Each run writes a new folder under --exp (see ncsn_jax/experiment.py)
and spreads every chunk of samples over all local devices.
"""

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from ncsn_jax.cli import run_main, setup_logging
from ncsn_jax.errors import UserError

log = logging.getLogger('main')

# How long a process other than process 0 waits to see the experiment folder that process 0
# created (shared file systems can show a new folder with a delay).
FOLDER_WAIT_SECONDS = 60.0

# Flags that define what a run draws. --resume takes them from the experiment folder instead.
RUN_FLAGS = ('config', 'seed', 'exp', 'comment', 'exp_name', 'exp_dir_suffix', 'k_p', 'k_i', 'k_d',
             'k_i_decay', 'k_d_decay', 'n_steps_each', 'num_classes', 'precision')

# --precision: value of jax_default_matmul_precision for the score network.
MATMUL_PRECISION = {'float32': 'highest', 'tf32': 'tensorfloat32', 'bf16': 'bfloat16'}


def positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f'must be > 0 seconds, got {text}')
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description='PID-controlled annealed Langevin sampling of NCSNv2 '
                                     'score models in JAX.')
    parser.add_argument('--config',
                        help='config file name in configs/ (e.g. cifar10.yml) or a path; required '
                        'unless --resume is given')
    parser.add_argument('--seed', type=int, default=1234, help='random seed of the run')
    parser.add_argument('--exp', default='exp', help='parent folder of the experiment folders')
    parser.add_argument('--comment', default='', help='free text stored in the log and args.yml')
    parser.add_argument('--exp_name', default='default',
                        help='appended to the experiment folder name unless --exp_dir_suffix is given')
    parser.add_argument('--exp_dir_suffix', default=None,
                        help='appended to the experiment folder name instead of --exp_name; an empty '
                        'string appends nothing')
    parser.add_argument('-P', '--k_p', type=float, help='proportional gain (sampling.k_p)')
    parser.add_argument('-I', '--k_i', type=float, help='integral gain (sampling.k_i)')
    parser.add_argument('-D', '--k_d', type=float, help='derivative gain (sampling.k_d)')
    parser.add_argument('--k_i_decay', type=float, help='factor applied to k_i after every step')
    parser.add_argument('--k_d_decay', type=float, help='factor applied to k_d after every step')
    parser.add_argument('-T', '--n_steps_each', type=int, help='Langevin steps per noise level')
    parser.add_argument('-L', '--num_classes', type=int,
                        help='number of noise levels of the geometric sigma ladder')

    parser.add_argument(
        '--precision', choices=sorted(MATMUL_PRECISION), default='float32',
        help='matmul and convolution precision of the score network. float32 (default): full '
        'float32, the setting whose samples match the PyTorch reference within 1e-5. tf32: '
        'TensorFloat-32 on GPUs that have it (3-pass bfloat16 on TPUs); samples then differ from '
        'float32 ones by far more than 1e-5. bf16: 1-pass bfloat16 inputs on TPUs, which XLA '
        'treats like tf32 on GPUs; the largest deviation. On CPUs all three compute in float32. '
        'Metrics always use float32')

    parser.add_argument(
        '--resume', metavar='EXPERIMENT_DIR',
        help='continue a killed run in EXPERIMENT_DIR with its saved args.yml and config.yml: '
        'finished chunks in EXPERIMENT_DIR/chunks are kept, missing or invalid ones are drawn. '
        'A finished run is reported as complete (exit status 0). Cannot be combined with the '
        'flags above')
    parser.add_argument('--keep_chunks', action='store_true',
                        help='keep EXPERIMENT_DIR/chunks after the run finishes (removed by '
                        'default)')

    parser.add_argument(
        '--distributed', action='store_true',
        help='run as one of several processes (hosts) that share the chunks: calls '
        'jax.distributed.initialize; the experiment folder must be on a file system that all '
        'hosts share')
    parser.add_argument('--coordinator_address', metavar='HOST:PORT',
                        help='address of process 0 for --distributed (default: '
                        'JAX_COORDINATOR_ADDRESS, or detected on TPU, Slurm and Open MPI)')
    parser.add_argument('--num_processes', type=int,
                        help='number of processes for --distributed (default: JAX_NUM_PROCESSES, '
                        'or detected)')
    parser.add_argument('--process_id', type=int,
                        help='index of this process, 0 to num_processes - 1, for --distributed '
                        '(default: JAX_PROCESS_ID, or detected)')
    parser.add_argument('--gather_timeout', type=positive_seconds, default=900.0,
                        help='seconds that process 0 waits for the chunk files of the other '
                        'processes after drawing its own, and about how long the others wait '
                        'for process 0 (default 900); raise it when hosts differ in speed')
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None and args.config is None:
        parser.error('--config is required (or --resume EXPERIMENT_DIR)')
    if not args.distributed:
        for name in ('coordinator_address', 'num_processes', 'process_id'):
            if getattr(args, name) is not None:
                parser.error(f'--{name} needs --distributed')
    return args


def explicit_run_flags(argv) -> list:
    """Return the RUN_FLAGS given on the command line, whatever their values."""
    parser = build_parser()
    unset = object()
    parser.set_defaults(**{name: unset for name in RUN_FLAGS})
    args = parser.parse_args(argv)
    return [name for name in RUN_FLAGS if getattr(args, name) is not unset]


def convert_command(config) -> str:
    return shlex.join(['python', 'convert/torch_to_flax.py',
                       config.model.score_model_state_dict_path or 'CHECKPOINT.pth',
                       '--out', config.model.params_path, '--config', Path(config.source).name])


def load_model_for(config):
    """Load the converted model named by the config, checking that the two agree."""
    from ncsn_jax import checkpoint
    from ncsn_jax.models import check_image_size
    from ncsn_jax.score_model import load_score_model

    params_path = config.model.params_path
    if not params_path:
        raise UserError(f'{config.source}: model.params_path is not set; name the converted '
                        'parameter file there')
    if not Path(params_path).is_file():
        raise UserError(f'converted parameter file {params_path} not found; create it with: '
                        f'{convert_command(config)}')
    metadata = checkpoint.read_params_file(params_path, kind='score_model')['metadata']
    for key, expected in (('architecture', config.model.architecture), ('ngf', config.model.ngf),
                          ('channels', config.data.channels)):
        if metadata.get(key) != expected:
            raise UserError(f'{params_path} contains a model with {key} {metadata.get(key)}, but '
                            f'{config.source} sets {expected}; convert the matching checkpoint')
    reason = check_image_size(config.model.architecture, config.data.image_size)
    if reason:
        raise UserError(f'{config.source}: {reason}')
    return load_score_model(params_path)


def wait_for_folder(path: Path, timeout: float = FOLDER_WAIT_SECONDS):
    """Wait until the folder that process 0 created is visible on this host."""
    deadline = time.monotonic() + timeout
    while not path.is_dir():
        if time.monotonic() >= deadline:
            raise UserError(f'experiment folder {path}, created by process 0, is not visible on '
                            f'this host after {timeout:g} s; put --exp on a file system that all '
                            'hosts share and pass the same --exp to every process')
        time.sleep(0.2)


def load_run_settings(args, argv):
    """Return (config, seed, precision, saved args or None) of a new or a resumed run."""
    from ncsn_jax import experiment
    from ncsn_jax.config import apply_overrides, load_config

    if args.resume is None:
        config = load_config(args.config)
        config = apply_overrides(config, k_p=args.k_p, k_i=args.k_i, k_d=args.k_d,
                                 k_i_decay=args.k_i_decay, k_d_decay=args.k_d_decay,
                                 n_steps_each=args.n_steps_each, num_classes=args.num_classes)
        return config, args.seed, args.precision, None

    explicit_flags = explicit_run_flags(argv)
    if explicit_flags:
        flags = ', '.join(f'--{name}' for name in explicit_flags)
        raise UserError(f'--resume continues with the settings saved in {args.resume}; remove '
                        f'{flags}')
    config, saved = experiment.read_run_settings(args.resume)
    precision = saved.get('precision', 'float32')
    if precision not in MATMUL_PRECISION:
        raise UserError(f'{Path(args.resume) / "args.yml"}: invalid precision {precision!r}, '
                        f'expected one of {", ".join(sorted(MATMUL_PRECISION))}')
    return config, saved['seed'], precision, saved


def main(argv=None) -> int:
    args = parse_args(argv)
    from ncsn_jax import distributed, experiment

    config, seed, precision, saved = load_run_settings(args, argv)
    if saved is not None and experiment.is_complete(args.resume):
        log.info('%s is complete (%s exists); nothing to resume', args.resume,
                 experiment.COMPLETE_MARKER)
        return 0

    enable_compilation_cache()
    group = distributed.ProcessGroup()
    if args.distributed:
        # Must come before the first JAX computation, which loading the model is.
        group = distributed.initialize(args.coordinator_address, args.num_processes,
                                       args.process_id, wait_seconds=args.gather_timeout)
    model = load_model_for(config)
    evaluator = None
    if config.evaluation.evaluate:
        # Missing Inception or statistics files are reported here, before any sampling.
        from ncsn_jax.evaluation import Evaluator
        evaluator = Evaluator(config.evaluation, config.source)

    import jax
    jax.config.update('jax_default_matmul_precision', MATMUL_PRECISION[precision])

    if saved is not None:
        exp_dir = Path(args.resume)
    else:
        name = ''
        if group.is_main:
            sampling = config.sampling
            name = experiment.create_experiment_dir(args.exp, sampling.k_p, sampling.k_i,
                                                    sampling.k_d, args.exp_name,
                                                    args.exp_dir_suffix).name
        exp_dir = Path(args.exp) / distributed.broadcast_name(group, name)
        wait_for_folder(exp_dir)
    experiment.add_log_file(exp_dir / experiment.log_file_name(group))
    log.info('%s experiment folder: %s', 'resuming' if saved else 'new', exp_dir)
    log.info('command: %s', shlex.join(sys.argv))
    if saved is None and args.comment:
        log.info('comment: %s', args.comment)
    log.info('precision %s (jax_default_matmul_precision=%s)', precision,
             MATMUL_PRECISION[precision])
    if saved is None and group.is_main:
        experiment.write_run_settings(exp_dir, config,
                                      dict(vars(args), command=shlex.join(sys.argv)))
    experiment.run_sampling(model, config, exp_dir, seed, evaluator=evaluator, group=group,
                            gather_timeout=args.gather_timeout, keep_chunks=args.keep_chunks)
    log.info('done: %s', exp_dir)
    return 0


def enable_compilation_cache():
    """Cache compiled programs on disk so that repeated runs (such as gain sweeps) skip compiling.

    Uses JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/ncsn-jax/xla.
    """
    import jax
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update('jax_compilation_cache_dir',
                          str(Path.home() / '.cache' / 'ncsn-jax' / 'xla'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


if __name__ == '__main__':
    setup_logging()
    sys.exit(run_main(main))
