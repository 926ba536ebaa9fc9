"""nanas_jax: neighborhood-aware neural architecture search (NA-DARTS, NA-RS) in JAX/Flax.

What a user reaches for, importable from the package itself (the README's "Python"
section shows them at work)::

    import nanas_jax
    genotype = nanas_jax.get_genotype("DARTS_V2")           # or Genotype.parse(text)
    nanas_jax.summarize(genotype, "cifar10")["params"]      # 3349342
    summary = nanas_jax.run(config, "/tmp/workdir")         # search, train, pipeline, study

- genotypes: `Genotype` (DARTS text, parsed and printed exactly), `NB201Arch`
  (NAS-Bench-201 strings), `get_genotype` (a published name or text), `GENOTYPES`,
  `get_space` (``'darts'``, ``'nb201'``: encode / decode / parse / format / derive);
- neighborhoods: `distance`, `enumerate_neighbors`, `sample_neighbors`;
- networks: `build_network` (a genotype's evaluation network for ``'cifar10'``,
  ``'cifar100'`` or ``'imagenet'``), `NetworkCIFAR`, `NetworkImageNet`, `TinyNetwork`
  (NAS-Bench-201), the supernets `SearchNetwork` and `SearchNetworkNB201`;
- `summarize`: parameters and multiply-adds;
- running from a config: `run` (``config.task``: search, train, pipeline or study into a
  workdir),
  `flatness_report` (the flatness of a genotype in a search workdir).

Names resolve on first use, so ``import nanas_jax`` loads neither JAX nor TensorFlow and
importing any submodule costs nothing extra.
"""

import importlib

__version__ = "0.1.0"

# name -> (module, attribute)
_EXPORTS = {
    "GENOTYPES": ("nanas_jax.spaces", "GENOTYPES"),
    "Genotype": ("nanas_jax.spaces", "Genotype"),
    "NB201Arch": ("nanas_jax.spaces", "NB201Arch"),
    "get_genotype": ("nanas_jax.spaces", "get_genotype"),
    "get_space": ("nanas_jax.spaces", "get_space"),
    "distance": ("nanas_jax.neighborhood", "distance"),
    "enumerate_neighbors": ("nanas_jax.neighborhood", "enumerate_neighbors"),
    "sample_neighbors": ("nanas_jax.neighborhood", "sample_neighbors"),
    "build_network": ("nanas_jax.summary", "build_network"),
    "NetworkCIFAR": ("nanas_jax.nn.networks", "NetworkCIFAR"),
    "NetworkImageNet": ("nanas_jax.nn.networks", "NetworkImageNet"),
    "TinyNetwork": ("nanas_jax.nn.nb201_network", "TinyNetwork"),
    "SearchNetwork": ("nanas_jax.nn.supernet", "SearchNetwork"),
    "SearchNetworkNB201": ("nanas_jax.nn.nb201_supernet", "SearchNetworkNB201"),
    "summarize": ("nanas_jax.summary", "summarize"),
    "run": ("nanas_jax.tasks", "run"),
    "flatness_report": ("nanas_jax.flatness", "report"),
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module 'nanas_jax' has no attribute {name!r}")
  module, attribute = _EXPORTS[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))
