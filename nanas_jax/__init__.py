"""nanas_jax: neighborhood-aware neural architecture search (NA-DARTS, NA-RS) in JAX/Flax."""

__version__ = "0.1.0"
