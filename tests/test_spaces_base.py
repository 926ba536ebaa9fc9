"""Tests for nanas_jax.spaces.base: the registry and the shared checks."""

import numpy as np
import pytest

from nanas_jax.spaces import base, darts, nb201


def test_registry_returns_singletons_case_insensitive():
  assert base.space_names() == ('darts', 'nb201')
  assert base.get_space('darts') is base.get_space('DARTS') is darts.DARTS_SPACE
  assert base.get_space('nb201') is base.get_space('NB201') is nb201.NB201_SPACE
  assert isinstance(base.get_space('darts'), base.SearchSpace)


def test_unknown_space_lists_known_ones():
  with pytest.raises(ValueError, match=r"unknown search space 'nasbench101'.*'darts', 'nb201'"):
    base.get_space('nasbench101')


def test_registering_a_name_twice_fails():
  with pytest.raises(ValueError, match='registered twice'):
    base.register_space(darts.DartsSpace())


@pytest.mark.parametrize('name, shape, num_targets', [
    ('darts', (2, 14, 8), 4),
    ('nb201', (1, 6, 5), 3),
])
def test_shapes(name, shape, num_targets):
  space = base.get_space(name)
  assert space.alpha_shape == shape
  assert space.codes_shape == shape[:2]
  assert space.num_edges == shape[1] and space.num_ops == shape[2]
  assert space.num_targets == num_targets
  assert len(space.edge_targets) == space.num_edges


def test_shared_arrays_are_read_only():
  space = base.get_space('darts')
  with pytest.raises(ValueError):
    space.swap_ops[0] = True
  with pytest.raises(ValueError):
    space.edge_targets[0] = 3


def test_check_codes_names_the_problem():
  space = base.get_space('nb201')
  with pytest.raises(ValueError, match=r'shape \(6,\); expected \(1, 6\)'):
    space.check_codes(np.zeros(6, int))
  with pytest.raises(ValueError, match='integer op ids'):
    space.check_codes(np.zeros((1, 6)))
  codes = np.zeros((1, 6), int)
  codes[0, 4] = 5
  with pytest.raises(ValueError, match=r"op id 5 at cell 'cell', edge 4 .* 0\.\.4"):
    space.check_codes(codes)
  assert space.check_codes(codes.clip(0, 4)).dtype == np.int32


def test_check_weights_and_json_tag():
  space = base.get_space('darts')
  with pytest.raises(ValueError, match=r'shape \(14, 8\); expected \(2, 14, 8\)'):
    space.check_weights(np.zeros((14, 8)))
  with pytest.raises(ValueError, match=r'"space": \'nb201\'; expected \'darts\''):
    space.check_json_space({'space': 'nb201'})
  with pytest.raises(ValueError, match='must be an object'):
    space.check_json_space(['darts'])
