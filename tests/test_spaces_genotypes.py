"""Tests for nanas_jax.spaces.genotypes against the texts of the authors' repositories."""

import numpy as np
import pytest

from nanas_jax.spaces import darts, genotypes
from nanas_jax.spaces.darts import Genotype

# Verbatim from quark0/darts cnn/genotypes.py (NASNet in its multi-line layout).
NASNET_TEXT = """Genotype(
  normal = [
    ('sep_conv_5x5', 1),
    ('sep_conv_3x3', 0),
    ('sep_conv_5x5', 0),
    ('sep_conv_3x3', 0),
    ('avg_pool_3x3', 1),
    ('skip_connect', 0),
    ('avg_pool_3x3', 0),
    ('avg_pool_3x3', 0),
    ('sep_conv_3x3', 1),
    ('skip_connect', 1),
  ],
  normal_concat = [2, 3, 4, 5, 6],
  reduce = [
    ('sep_conv_5x5', 1),
    ('sep_conv_7x7', 0),
    ('max_pool_3x3', 1),
    ('sep_conv_7x7', 0),
    ('avg_pool_3x3', 1),
    ('sep_conv_5x5', 0),
    ('skip_connect', 3),
    ('avg_pool_3x3', 2),
    ('sep_conv_3x3', 2),
    ('max_pool_3x3', 1),
  ],
  reduce_concat = [4, 5, 6],
)"""

AMOEBANET_TEXT = """Genotype(
  normal = [
    ('avg_pool_3x3', 0),
    ('max_pool_3x3', 1),
    ('sep_conv_3x3', 0),
    ('sep_conv_5x5', 2),
    ('sep_conv_3x3', 0),
    ('avg_pool_3x3', 3),
    ('sep_conv_3x3', 1),
    ('skip_connect', 1),
    ('skip_connect', 0),
    ('avg_pool_3x3', 1),
    ],
  normal_concat = [4, 5, 6],
  reduce = [
    ('avg_pool_3x3', 0),
    ('sep_conv_3x3', 1),
    ('max_pool_3x3', 0),
    ('sep_conv_7x7', 2),
    ('sep_conv_7x7', 0),
    ('avg_pool_3x3', 1),
    ('max_pool_3x3', 0),
    ('max_pool_3x3', 1),
    ('conv_7x1_1x7', 0),
    ('sep_conv_3x3', 5),
  ],
  reduce_concat = [3, 4, 6]
)"""

DARTS_V1_TEXT = "Genotype(normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('avg_pool_3x3', 0)], reduce_concat=[2, 3, 4, 5])"
DARTS_V2_TEXT = "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])"
# yuhuixu1993/PC-DARTS genotypes.py: PC_DARTS_cifar (= PCDARTS) and PC_DARTS_image.
PC_DARTS_CIFAR_TEXT = "Genotype(normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0), ('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1), ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)], normal_concat=range(2, 6), reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)], reduce_concat=range(2, 6))"
PC_DARTS_IMAGE_TEXT = "Genotype(normal=[('skip_connect', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 0), ('skip_connect', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3', 1), ('dil_conv_5x5', 4)], normal_concat=range(2, 6), reduce=[('sep_conv_3x3', 0), ('skip_connect', 1), ('dil_conv_5x5', 2), ('max_pool_3x3', 1), ('sep_conv_3x3', 2), ('sep_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 3)], reduce_concat=range(2, 6))"
# chenxin061/pdarts genotypes.py (note the missing spaces, as in the original).
PDARTS_TEXT = "Genotype(normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0),('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3), ('sep_conv_3x3',0), ('dil_conv_5x5', 4)], normal_concat=range(2, 6), reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0), ('dil_conv_5x5', 2), ('max_pool_3x3', 0), ('dil_conv_3x3', 1), ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)], reduce_concat=range(2, 6))"

REFERENCE = {
    'NASNet': NASNET_TEXT,
    'AmoebaNet': AMOEBANET_TEXT,
    'DARTS_V1': DARTS_V1_TEXT,
    'DARTS_V2': DARTS_V2_TEXT,
    'DARTS': DARTS_V2_TEXT,
    'PC_DARTS': PC_DARTS_CIFAR_TEXT,
    'PC_DARTS_IMAGENET': PC_DARTS_IMAGE_TEXT,
    'PDARTS': PDARTS_TEXT,
}


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_genotypes_equal_the_published_texts(name):
  assert genotypes.GENOTYPES[name] == Genotype.parse(REFERENCE[name])


def test_every_genotype_is_checked_against_a_published_text():
  assert set(genotypes.GENOTYPES) == set(REFERENCE)


def test_darts_v2_values_spelled_out():
  assert genotypes.DARTS is genotypes.DARTS_V2
  assert genotypes.DARTS_V2.normal == (
      ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1),
      ('sep_conv_3x3', 1), ('skip_connect', 0), ('skip_connect', 0), ('dil_conv_3x3', 2))
  assert genotypes.DARTS_V2.reduce == (
      ('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1),
      ('max_pool_3x3', 0), ('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1))
  assert str(genotypes.DARTS_V2) == DARTS_V2_TEXT


def test_nasnet_and_amoebanet_keep_their_shape():
  assert genotypes.NASNet.num_nodes('normal') == 5
  assert genotypes.NASNet.normal_concat == (2, 3, 4, 5, 6)
  assert genotypes.AmoebaNet.reduce_concat == (3, 4, 6)
  assert ('conv_7x1_1x7', 0) in genotypes.AmoebaNet.reduce


SEARCHED = ['DARTS_V1', 'DARTS_V2', 'PC_DARTS', 'PC_DARTS_IMAGENET', 'PDARTS']


@pytest.mark.parametrize('name', SEARCHED)
def test_searched_genotypes_fit_the_darts_space(name):
  genotype = genotypes.GENOTYPES[name]
  codes = darts.DARTS_SPACE.encode(genotype)
  assert (codes != 0).sum() == 16
  assert darts.DARTS_SPACE.decode(codes) == genotype.canonical()


@pytest.mark.parametrize('query, expected', [
    ('darts', 'DARTS_V2'),
    ('DARTS', 'DARTS_V2'),
    ('darts_v1', 'DARTS_V1'),
    ('PC-DARTS', 'PC_DARTS'),
    ('pcdarts', 'PC_DARTS'),
    ('PC_DARTS_cifar', 'PC_DARTS'),
    ('pc-darts-image', 'PC_DARTS_IMAGENET'),
    ('P-DARTS', 'PDARTS'),
    (' nasnet ', 'NASNet'),
    ('AmoebaNet', 'AmoebaNet'),
])
def test_get_genotype_by_name(query, expected):
  assert genotypes.get_genotype(query) is genotypes.GENOTYPES[expected]


def test_get_genotype_from_text_and_errors():
  assert genotypes.get_genotype(PDARTS_TEXT) == genotypes.PDARTS
  assert genotypes.get_genotype(genotypes.PDARTS) is genotypes.PDARTS
  with pytest.raises(ValueError, match=r"unknown genotype name 'ENAS'; known names: \['NASNet'"):
    genotypes.get_genotype('ENAS')
  with pytest.raises(ValueError, match='unknown op'):
    genotypes.get_genotype(DARTS_V2_TEXT.replace('dil_conv_3x3', 'dil_conv_9x9'))
  with pytest.raises(ValueError, match='expects a name'):
    genotypes.get_genotype(np.zeros(3))
