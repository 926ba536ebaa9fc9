"""Flax (linen) modules: primitive ops, the search supernet, discrete networks."""
