"""Search spaces as pure data: ops, edges, encodings, genotype text formats.

Importing the package registers every space, so ``get_space('darts')`` and
``get_space('nb201')`` work whichever submodule was imported first.
"""

from nanas_jax.spaces.base import SearchSpace, get_space, space_names
from nanas_jax.spaces.darts import DARTS_SPACE, PRIMITIVES, REFERENCE_OPS, DartsSpace, Genotype
from nanas_jax.spaces.genotypes import GENOTYPES, get_genotype
from nanas_jax.spaces.nb201 import NB201_OPS, NB201_SPACE, NB201Arch, NB201Space

__all__ = [
    'DARTS_SPACE',
    'GENOTYPES',
    'NB201_OPS',
    'NB201_SPACE',
    'PRIMITIVES',
    'REFERENCE_OPS',
    'DartsSpace',
    'Genotype',
    'NB201Arch',
    'NB201Space',
    'SearchSpace',
    'get_genotype',
    'get_space',
    'space_names',
]
