"""Published DARTS-space genotypes by name, with the values of their authors' repositories.

Sources: quark0/darts ``cnn/genotypes.py`` (NASNet, AmoebaNet, DARTS_V1, DARTS_V2; DARTS is
DARTS_V2 there), yuhuixu1993/PC-DARTS ``genotypes.py`` (PC_DARTS = its ``PCDARTS`` =
``PC_DARTS_cifar``; PC_DARTS_IMAGENET = ``PC_DARTS_image``) and chenxin061/pdarts
``genotypes.py`` (PDARTS). The pair order inside each node is the authors' (strongest edge
first for searched cells) and is kept: it is what their code prints and what papers quote.
"""

from __future__ import annotations

from nanas_jax.spaces.darts import Genotype

NASNet = Genotype(
    normal=[('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('sep_conv_5x5', 0),
            ('sep_conv_3x3', 0), ('avg_pool_3x3', 1), ('skip_connect', 0),
            ('avg_pool_3x3', 0), ('avg_pool_3x3', 0), ('sep_conv_3x3', 1),
            ('skip_connect', 1)],
    normal_concat=[2, 3, 4, 5, 6],
    reduce=[('sep_conv_5x5', 1), ('sep_conv_7x7', 0), ('max_pool_3x3', 1),
            ('sep_conv_7x7', 0), ('avg_pool_3x3', 1), ('sep_conv_5x5', 0),
            ('skip_connect', 3), ('avg_pool_3x3', 2), ('sep_conv_3x3', 2),
            ('max_pool_3x3', 1)],
    reduce_concat=[4, 5, 6],
)

AmoebaNet = Genotype(
    normal=[('avg_pool_3x3', 0), ('max_pool_3x3', 1), ('sep_conv_3x3', 0),
            ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('avg_pool_3x3', 3),
            ('sep_conv_3x3', 1), ('skip_connect', 1), ('skip_connect', 0),
            ('avg_pool_3x3', 1)],
    normal_concat=[4, 5, 6],
    reduce=[('avg_pool_3x3', 0), ('sep_conv_3x3', 1), ('max_pool_3x3', 0),
            ('sep_conv_7x7', 2), ('sep_conv_7x7', 0), ('avg_pool_3x3', 1),
            ('max_pool_3x3', 0), ('max_pool_3x3', 1), ('conv_7x1_1x7', 0),
            ('sep_conv_3x3', 5)],
    reduce_concat=[3, 4, 6],
)

DARTS_V1 = Genotype(
    normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0),
            ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1),
            ('sep_conv_3x3', 0), ('skip_connect', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
            ('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('avg_pool_3x3', 0)],
    reduce_concat=[2, 3, 4, 5],
)

DARTS_V2 = Genotype(
    normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0),
            ('skip_connect', 0), ('dil_conv_3x3', 2)],
    normal_concat=[2, 3, 4, 5],
    reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
            ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
            ('skip_connect', 2), ('max_pool_3x3', 1)],
    reduce_concat=[2, 3, 4, 5],
)

DARTS = DARTS_V2

PC_DARTS = Genotype(
    normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0),
            ('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1),
            ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)],
    normal_concat=range(2, 6),
    reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1),
            ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('sep_conv_3x3', 3),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)],
    reduce_concat=range(2, 6),
)

PC_DARTS_IMAGENET = Genotype(
    normal=[('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0),
            ('skip_connect', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
            ('sep_conv_3x3', 1), ('dil_conv_5x5', 4)],
    normal_concat=range(2, 6),
    reduce=[('sep_conv_3x3', 0), ('skip_connect', 1), ('dil_conv_5x5', 2),
            ('max_pool_3x3', 1), ('sep_conv_3x3', 2), ('sep_conv_3x3', 1),
            ('sep_conv_5x5', 0), ('sep_conv_3x3', 3)],
    reduce_concat=range(2, 6),
)

PDARTS = Genotype(
    normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0),
            ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
            ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)],
    normal_concat=range(2, 6),
    reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0),
            ('dil_conv_5x5', 2), ('max_pool_3x3', 0), ('dil_conv_3x3', 1),
            ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)],
    reduce_concat=range(2, 6),
)

GENOTYPES = {
    'NASNet': NASNet,
    'AmoebaNet': AmoebaNet,
    'DARTS_V1': DARTS_V1,
    'DARTS_V2': DARTS_V2,
    'DARTS': DARTS,
    'PC_DARTS': PC_DARTS,
    'PC_DARTS_IMAGENET': PC_DARTS_IMAGENET,
    'PDARTS': PDARTS,
}

# The spellings the authors' repositories and papers use for the same genotypes.
_ALIASES = {
    'PCDARTS': 'PC_DARTS',
    'PC_DARTS_CIFAR': 'PC_DARTS',
    'PC_DARTS_IMAGE': 'PC_DARTS_IMAGENET',
    'P_DARTS': 'PDARTS',
}


def _normalise(name: str) -> str:
  return name.strip().upper().replace('-', '_')


_BY_KEY = {_normalise(name): genotype for name, genotype in GENOTYPES.items()}
_BY_KEY.update({alias: GENOTYPES[name] for alias, name in _ALIASES.items()})


def get_genotype(name_or_text: str) -> Genotype:
  """A published genotype by name (case-insensitive, '-' = '_') or ``Genotype(...)`` text."""
  if isinstance(name_or_text, Genotype):
    return name_or_text
  if not isinstance(name_or_text, str):
    raise ValueError(
        f'get_genotype expects a name or Genotype(...) text, got '
        f'{type(name_or_text).__name__}.')
  if '(' in name_or_text:
    return Genotype.parse(name_or_text)
  key = _normalise(name_or_text)
  if key not in _BY_KEY:
    raise ValueError(
        f'unknown genotype name {name_or_text!r}; known names: {list(GENOTYPES)} '
        f'(also {list(_ALIASES)}), or pass the Genotype(...) text itself.')
  return _BY_KEY[key]
