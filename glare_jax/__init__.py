"""glare_jax: GLARE continual self-supervised pre-training in JAX/Flax."""

__version__ = "0.1.0"
