"""NCSNv2 score networks (NCSNv2, NCSNv2Deeper, NCSNv2Deepest) in Flax, NHWC.

The module maps images x in [0, 1] to the network output; the score is that output divided by the
noise level σ, which `ncsn_jax.ScoreModel` applies. Each architecture is a table of residual stages
and refine blocks, so the three share one implementation.
"""

from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from ncsn_jax.models.layers import InstanceNormPlus, RefineBlock, ResidualBlock, _conv


class Stage(NamedTuple):
    """Two residual blocks: the first maps to `multiplier`·ngf channels and may go down."""

    name: str
    multiplier: int
    down: bool
    dilation: int


class Refine(NamedTuple):
    """A refine block fusing the outputs of `inputs` into `multiplier`·ngf channels."""

    name: str
    inputs: tuple
    multiplier: int


class RefineNet(nn.Module):
    """The shared NCSNv2 RefineNet; subclasses set `stages` and `refines`."""

    ngf: int
    channels: int

    stages: ClassVar[tuple] = ()
    refines: ClassVar[tuple] = ()

    @nn.compact
    def __call__(self, x):
        outputs = {}
        h = _conv(self.ngf, name='begin_conv')(2.0 * x - 1.0)
        for stage in self.stages:
            h = ResidualBlock(stage.multiplier * self.ngf, down=stage.down, dilation=stage.dilation,
                              name=f'{stage.name}_0')(h)
            h = ResidualBlock(stage.multiplier * self.ngf, dilation=stage.dilation,
                              name=f'{stage.name}_1')(h)
            outputs[stage.name] = h
        for k, refine in enumerate(self.refines):
            h = RefineBlock(refine.multiplier * self.ngf, start=k == 0,
                            end=k == len(self.refines) - 1, name=refine.name)(
                [outputs[name] for name in refine.inputs])
            outputs[refine.name] = h
        h = nn.elu(InstanceNormPlus(name='normalizer')(h))
        return _conv(self.channels, name='end_conv')(h)

    @classmethod
    def downsampling_steps(cls) -> int:
        """Return how many times the network halves the resolution."""
        return sum(1 for stage in cls.stages if stage.down and stage.dilation == 1)


class NCSNv2(RefineNet):
    stages = (Stage('res1', 1, False, 1), Stage('res2', 2, True, 1),
              Stage('res3', 2, True, 2), Stage('res4', 2, True, 4))
    refines = (Refine('refine1', ('res4',), 2), Refine('refine2', ('res3', 'refine1'), 2),
               Refine('refine3', ('res2', 'refine2'), 1), Refine('refine4', ('res1', 'refine3'), 1))


class NCSNv2Deeper(RefineNet):
    stages = (Stage('res1', 1, False, 1), Stage('res2', 2, True, 1), Stage('res3', 2, True, 1),
              Stage('res4', 4, True, 2), Stage('res5', 4, True, 4))
    refines = (Refine('refine1', ('res5',), 4), Refine('refine2', ('res4', 'refine1'), 2),
               Refine('refine3', ('res3', 'refine2'), 2), Refine('refine4', ('res2', 'refine3'), 1),
               Refine('refine5', ('res1', 'refine4'), 1))


class NCSNv2Deepest(RefineNet):
    stages = (Stage('res1', 1, False, 1), Stage('res2', 2, True, 1), Stage('res3', 2, True, 1),
              Stage('res31', 2, True, 1), Stage('res4', 4, True, 2), Stage('res5', 4, True, 4))
    refines = (Refine('refine1', ('res5',), 4), Refine('refine2', ('res4', 'refine1'), 2),
               Refine('refine31', ('res31', 'refine2'), 2),
               Refine('refine3', ('res3', 'refine31'), 2), Refine('refine4', ('res2', 'refine3'), 1),
               Refine('refine5', ('res1', 'refine4'), 1))


ARCHITECTURES = {cls.__name__: cls for cls in (NCSNv2, NCSNv2Deeper, NCSNv2Deepest)}


def create_model(architecture: str, ngf: int, channels: int) -> RefineNet:
    """Return the Flax module for an architecture name ('NCSNv2', 'NCSNv2Deeper', 'NCSNv2Deepest')."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f'unknown architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}')
    return ARCHITECTURES[architecture](ngf=ngf, channels=channels)


def check_image_size(architecture: str, image_size: int) -> str | None:
    """Return why `image_size` does not fit the architecture, or None if it does.

    Each halving (a ConvMeanPool) needs an even size, because PyTorch's sum of the four subsamples
    fails on odd sizes.
    """
    size = image_size
    for _ in range(ARCHITECTURES[architecture].downsampling_steps()):
        if size % 2:
            return (f'{architecture} halves the resolution '
                    f'{ARCHITECTURES[architecture].downsampling_steps()} times, so image_size '
                    f'{image_size} reaches the odd size {size}; use a size divisible by '
                    f'{2 ** ARCHITECTURES[architecture].downsampling_steps()}')
        size //= 2
    return None


def dummy_input(image_size: int, channels: int, batch: int = 1):
    return jnp.zeros((batch, image_size, image_size, channels), jnp.float32)
