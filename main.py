"""Sample with PID-controlled annealed Langevin dynamics from a converted NCSNv2 checkpoint.

    python main.py --config digits.yml [-P K_P] [-I K_I] [-D K_D] [-T STEPS] [-L LEVELS] ...

Flags override the config. Each run writes a new folder under --exp (see ncsn_jax/experiment.py).
"""

import argparse
import logging
import shlex
import sys
from pathlib import Path

from ncsn_jax.cli import run_main, setup_logging
from ncsn_jax.errors import UserError

log = logging.getLogger('main')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='PID-controlled annealed Langevin sampling of NCSNv2 '
                                     'score models in JAX.')
    parser.add_argument('--config', required=True,
                        help='config file name in configs/ (e.g. cifar10.yml) or a path')
    parser.add_argument('--seed', type=int, default=1234, help='random seed of the run')
    parser.add_argument('--exp', default='exp', help='folder that holds the experiment folders')
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
    return parser.parse_args(argv)


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
            raise UserError(f'{params_path} holds a model with {key} {metadata.get(key)}, but '
                            f'{config.source} sets {expected}; convert the matching checkpoint')
    reason = check_image_size(config.model.architecture, config.data.image_size)
    if reason:
        raise UserError(f'{config.source}: {reason}')
    return load_score_model(params_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    from ncsn_jax.config import apply_overrides, load_config
    config = load_config(args.config)
    config = apply_overrides(config, k_p=args.k_p, k_i=args.k_i, k_d=args.k_d,
                             k_i_decay=args.k_i_decay, k_d_decay=args.k_d_decay,
                             n_steps_each=args.n_steps_each, num_classes=args.num_classes)
    model = load_model_for(config)
    evaluator = None
    if config.evaluation.evaluate:
        # Missing Inception or statistics files are reported here, before any sampling.
        from ncsn_jax.evaluation import Evaluator
        evaluator = Evaluator(config.evaluation, config.source)

    import jax
    from ncsn_jax import experiment
    jax.config.update('jax_default_matmul_precision', 'highest')

    sampling = config.sampling
    exp_dir = experiment.create_experiment_dir(args.exp, sampling.k_p, sampling.k_i, sampling.k_d,
                                               args.exp_name, args.exp_dir_suffix)
    experiment.add_log_file(exp_dir / 'stdout.txt')
    log.info('experiment folder: %s', exp_dir)
    log.info('command: %s', shlex.join(sys.argv))
    if args.comment:
        log.info('comment: %s', args.comment)
    experiment.write_run_settings(exp_dir, config, dict(vars(args), command=shlex.join(sys.argv)))
    experiment.run_sampling(model, config, exp_dir, args.seed, evaluator=evaluator)
    log.info('done: %s', exp_dir)
    return 0


if __name__ == '__main__':
    setup_logging()
    sys.exit(run_main(main))
