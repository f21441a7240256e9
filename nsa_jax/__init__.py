"""nsa-jax: DeepSeek's Native Sparse Attention in JAX/Flax (functional ops, module, trainer)."""
from nsa_jax import ops
from nsa_jax.config import ModelConfig, NSAConfig

__version__ = "0.1.0"
__all__ = ["ModelConfig", "NSAConfig", "ops", "__version__"]
