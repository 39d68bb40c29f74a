from ncsn_jax.models.ncsnv2 import (ARCHITECTURES, NCSNv2, NCSNv2Deeper, NCSNv2Deepest, RefineNet,
                                    check_image_size, create_model)

__all__ = ['ARCHITECTURES', 'NCSNv2', 'NCSNv2Deeper', 'NCSNv2Deepest', 'RefineNet',
           'check_image_size', 'create_model']
