"""Logging set-up and error handling shared by the command-line entry points."""

import logging
import sys

from ncsn_jax.errors import UserError

LOG_FORMAT = '%(levelname)s %(message)s'


def setup_logging(level=logging.INFO):
    """Log to stderr; keep JAX's own start-up messages (such as the TPU probe) out of it."""
    logging.basicConfig(level=level, format=LOG_FORMAT, stream=sys.stderr, force=True)
    for name in ('jax', 'jax._src', 'absl'):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_main(main, argv=None) -> int:
    """Call `main(argv)`; report a UserError as one logged line and return exit status 2."""
    try:
        return main(argv) or 0
    except UserError as exc:
        logging.getLogger('ncsn_jax').error('%s', exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger('ncsn_jax').error('interrupted')
        return 130
