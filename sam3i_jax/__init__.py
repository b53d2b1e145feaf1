"""sam3i-jax: SAM 3 and SAM3-I in JAX/Flax NNX.

Import-light on purpose: no torch, tensorflow or scipy is imported here.
"""

from sam3i_jax.models.config import PRESETS, Sam3Config, get_preset

__all__ = ["PRESETS", "Sam3Config", "get_preset"]
__version__ = "0.1.0"
