"""ncsn-jax: NCSNv2 score models and PID-controlled annealed Langevin sampling in JAX."""

from ncsn_jax.score_model import ScoreModel, load_score_model
from ncsn_jax.sampling import pid_ald, geometric_sigmas

__all__ = ['ScoreModel', 'load_score_model', 'pid_ald', 'geometric_sigmas']
__version__ = '0.1.0'
