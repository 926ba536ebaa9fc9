"""Tests of random search and NA-RS on a synthetic NAS-Bench-201 table with known optima.

The table holds all 5**6 = 15625 NB201 architectures: background accuracies in [50, 80],
a FLAT optimum (91 %, every distance-1 neighbor 90 %) and a SHARP one (97 %, every
distance-1 neighbor 5 %). Plain RS must pick the sharp centre, NA-RS the flat one.
"""

import itertools
import json
import math

import numpy as np
import pytest

from nanas_jax import neighborhood
from nanas_jax.search.evaluators import TabularEvaluator
from nanas_jax.search.random_search import (MAX_ENUMERATED_NEIGHBORS, SearchResult,
                                            na_random_search, random_search,
                                            random_search_same_budget, sample_candidates,
                                            space_size)
from nanas_jax.spaces import get_space

NB201 = get_space('nb201')
DARTS = get_space('darts')
ALL_NB201 = np.array(list(itertools.product(range(5), repeat=6)), np.int32)[:, None, :]
FLAT = np.array([[2, 3, 1, 3, 2, 3]], np.int32)
SHARP = np.array([[4, 0, 4, 0, 4, 1]], np.int32)


def index_of(codes):
  """Position of an NB201 encoding in ALL_NB201 (base-5 digits)."""
  return int(np.asarray(codes).ravel() @ 5 ** np.arange(5, -1, -1))


def _accuracies():
  accuracy = np.random.default_rng(0).uniform(50, 80, len(ALL_NB201))
  for centre, own, around in ((FLAT, 91.0, 90.0), (SHARP, 97.0, 5.0)):
    accuracy[index_of(centre)] = own
    for neighbor in neighborhood.enumerate_neighbors(NB201, centre, 1):
      accuracy[index_of(neighbor)] = around
  return accuracy


ACCURACY = _accuracies()


def table_loss(codes):
  """The oracle: 100 - accuracy, read by encoding index, not through the evaluator."""
  return np.array([100.0 - ACCURACY[index_of(c)] for c in codes])


@pytest.fixture(scope='module')
def evaluator(tmp_path_factory):
  path = tmp_path_factory.mktemp('nb201') / 'synthetic.json'
  path.write_text(json.dumps(
      {NB201.format(NB201.decode(c)): float(a) for c, a in zip(ALL_NB201, ACCURACY)}))
  return TabularEvaluator.from_file(path)


def _pool(extra=6, seed=1):
  """FLAT, SHARP and random architectures at distance >= 3 from both."""
  rng = np.random.default_rng(seed)
  pool = [FLAT, SHARP]
  while len(pool) < 2 + extra:
    codes = ALL_NB201[rng.integers(len(ALL_NB201))]
    if all(neighborhood.distance(codes, p) >= 3 for p in pool):
      pool.append(codes)
  return np.stack(pool)


def test_setup_flat_and_sharp_optima():
  assert neighborhood.distance(FLAT, SHARP) == 6
  assert ACCURACY.argmax() == index_of(SHARP)
  flat = neighborhood.enumerate_neighbors(NB201, FLAT, 1, include_center=True)
  sharp = neighborhood.enumerate_neighbors(NB201, SHARP, 1, include_center=True)
  assert table_loss(flat).mean() < table_loss(sharp).mean()


def test_rs_picks_the_sharp_optimum_and_na_rs_the_flat_one(evaluator):
  pool = _pool()
  rs = random_search(NB201, evaluator, None, 0, candidates=pool)
  assert rs.best_arch == NB201.format(NB201.decode(SHARP))
  np.testing.assert_array_equal(rs.best_codes, SHARP)
  assert rs.best_loss == rs.best_score == pytest.approx(3.0)
  np.testing.assert_allclose(rs.candidate_scores, table_loss(pool))
  for aggregation in ('mean', 'max', 'softmax_tau'):
    na = na_random_search(NB201, evaluator, None, 0, candidates=pool,
                          aggregation=aggregation)
    np.testing.assert_array_equal(na.best_codes, FLAT, err_msg=aggregation)
    assert na.best_loss == pytest.approx(9.0)
  assert na.best_score == pytest.approx(
      na.settings['tau'] * (math.log(np.exp(np.array([9.0] + [10.0] * 24)).sum())
                            - math.log(25)), rel=1e-5)


@pytest.mark.parametrize('aggregation', ['mean', 'max', 'softmax_tau'])
@pytest.mark.parametrize('include_center', [True, False])
def test_na_rs_scores_equal_hand_computed_aggregates(evaluator, aggregation, include_center):
  pool = _pool(extra=3, seed=4)
  tau = 2.5
  na = na_random_search(NB201, evaluator, None, 0, radius=1, include_center=include_center,
                        aggregation=aggregation, tau=tau, candidates=pool)
  for codes, score in zip(pool, na.candidate_scores):
    losses = table_loss(neighborhood.enumerate_neighbors(NB201, codes, 1, include_center))
    expected = {'mean': losses.mean(), 'max': losses.max(),
                'softmax_tau': tau * (np.log(np.exp(losses / tau).sum()) - np.log(len(losses)))}
    assert score == pytest.approx(expected[aggregation], rel=1e-5)
  best = int(np.argmin(na.candidate_scores))
  assert na.best_score == na.candidate_scores[best]
  assert na.best_loss == pytest.approx(table_loss(pool[best:best + 1])[0])


@pytest.mark.parametrize('aggregation', ['mean', 'max', 'softmax_tau'])
def test_na_rs_scores_in_float64(aggregation):
  """Losses that differ below float32's resolution (at 1e4, about 1e-3) keep their order:
  NA-RS aggregates in float64 (before the fix, float32 made every score 10000.0)."""
  pool = _pool(extra=3, seed=4)
  offset = {index_of(c): 1e-6 * (i + 1) for i, c in enumerate(ALL_NB201[::97])}
  losses = lambda codes: np.array([1e4 + offset.get(index_of(c), 0.5e-6) for c in codes])
  tau = 2.5
  na = na_random_search(NB201, losses, None, 0, radius=1, include_center=True,
                        aggregation=aggregation, tau=tau, candidates=pool)
  for codes, score in zip(pool, na.candidate_scores):
    group = losses(neighborhood.enumerate_neighbors(NB201, codes, 1, True))
    expected = {'mean': group.mean(), 'max': group.max(),
                'softmax_tau': tau * (np.log(np.exp((group - 1e4) / tau).sum())
                                      - np.log(len(group))) + 1e4}
    assert abs(score - expected[aggregation]) < 1e-9


def test_na_rs_radius_two(evaluator):
  pool = _pool(extra=1)
  na = na_random_search(NB201, evaluator, None, 0, radius=2, candidates=pool)
  for codes, score in zip(pool, na.candidate_scores):
    group = neighborhood.enumerate_neighbors(NB201, codes, 2, include_center=True)
    assert score == pytest.approx(table_loss(group).mean(), rel=1e-5)
  # 6 * 4 + 15 * 16 = 264 neighbors at distance 1..2, plus the centre.
  assert na.budget['total_evaluations'] == 3 * 265


def test_budget_counts(evaluator):
  pool = np.stack([FLAT, SHARP])
  na = na_random_search(NB201, evaluator, None, 0, candidates=pool)
  # Both neighborhoods in one call (50 architectures, up to 256 a call).
  assert na.budget == {'candidates': 2, 'neighbors_evaluated': 48, 'centers_evaluated': 2,
                       'total_evaluations': 2 * (24 + 1), 'unique_evaluations': 50,
                       'evaluator_calls': 1}
  no_center = na_random_search(NB201, evaluator, None, 0, include_center=False,
                               candidates=pool)
  # 2 * 24 neighbors, plus the winner's own loss evaluated once at the end.
  assert no_center.budget['total_evaluations'] == 49
  assert no_center.budget['neighbors_evaluated'] == 48
  assert no_center.budget['centers_evaluated'] == 1
  assert no_center.budget['evaluator_calls'] == 2
  assert no_center.best_loss == pytest.approx(9.0)
  assert np.isnan(no_center.candidate_losses[1])
  sampled = na_random_search(NB201, evaluator, None, 0, num_neighbors=5, candidates=pool)
  assert sampled.budget['total_evaluations'] == 2 * (5 + 1)
  assert sampled.budget['neighbors_evaluated'] == 10
  rs = random_search(NB201, evaluator, 7, 0, batch_size=3)
  assert rs.budget == {'candidates': 7, 'neighbors_evaluated': 0, 'centers_evaluated': 7,
                       'total_evaluations': 7, 'unique_evaluations': 7,
                       'evaluator_calls': 3}


def test_overlapping_neighborhoods_count_every_evaluation(evaluator):
  neighbor = neighborhood.enumerate_neighbors(NB201, FLAT, 1)[0]
  na = na_random_search(NB201, evaluator, None, 0, candidates=np.stack([FLAT, neighbor]))
  assert na.budget['total_evaluations'] == 50
  # Both centres, and the 3 other ops on the edge they differ on, are shared.
  assert na.budget['unique_evaluations'] == 50 - 5


def test_sampled_neighbors_are_aggregated_as_evaluated(evaluator):
  groups = []

  def recording(codes):
    groups.append(codes.copy())
    return evaluator(codes)

  pool = _pool(extra=2, seed=7)
  na = na_random_search(NB201, recording, None, np.random.default_rng(3), radius=2,
                        num_neighbors=6, aggregation='max', candidates=pool, batch_size=7)
  assert len(groups) == len(pool)  # 7 architectures a neighborhood, 7 a call
  for codes, group, score in zip(pool, groups, na.candidate_scores):
    np.testing.assert_array_equal(group[0], codes)
    assert len({g.tobytes() for g in group}) == 7
    assert all(1 <= neighborhood.distance(g, codes) <= 2 for g in group[1:])
    assert score == pytest.approx(table_loss(group).max())


def test_random_search_samples_distinct_candidates(evaluator):
  rs = random_search(NB201, evaluator, 300, np.random.default_rng(5))
  assert rs.candidates.shape == (300, 1, 6)
  assert len({c.tobytes() for c in rs.candidates}) == 300
  np.testing.assert_allclose(rs.candidate_scores, table_loss(rs.candidates))
  assert rs.best_loss == table_loss(rs.candidates).min()
  again = random_search(NB201, evaluator, 300, np.random.default_rng(5))
  np.testing.assert_array_equal(again.candidates, rs.candidates)


def test_exhaustive_random_search_finds_the_sharp_optimum(evaluator):
  assert space_size(NB201) == 5**6
  rs = random_search(NB201, evaluator, 5**6, 0)
  np.testing.assert_array_equal(rs.best_codes, SHARP)
  with pytest.raises(ValueError, match='only 15625 architectures'):
    sample_candidates(NB201, 5**6 + 1, 0)


def test_same_budget_random_search(evaluator):
  na = na_random_search(NB201, evaluator, 4, 0)
  assert na.budget['total_evaluations'] == 100
  rs = random_search_same_budget(NB201, evaluator, na, 1)
  assert rs.budget['total_evaluations'] == rs.budget['candidates'] == 100
  capped = random_search_same_budget(NB201, evaluator, 20_000, 1)
  assert capped.budget['total_evaluations'] == 5**6
  assert capped.budget['requested_evaluations'] == 20_000
  np.testing.assert_array_equal(capped.best_codes, SHARP)


def test_darts_requires_sampling_for_huge_neighborhoods():
  calls = []

  def evaluate(codes):
    calls.append(len(codes))
    return (codes == 4).sum(axis=(1, 2)).astype(float)  # Fewer sep_conv_3x3, lower loss.

  with pytest.raises(ValueError, match='num_neighbors=K') as info:
    na_random_search(DARTS, evaluate, 2, 0, radius=3)
  assert str(MAX_ENUMERATED_NEIGHBORS) in str(info.value)
  assert calls == []
  na = na_random_search(DARTS, evaluate, 3, 0, radius=3, num_neighbors=4)
  assert calls == [15] and na.budget['total_evaluations'] == 15
  assert all(DARTS.decode(c) is not None for c in na.candidates)
  assert na.best_arch.startswith('Genotype(')
  rs = random_search(DARTS, evaluate, 5, 0)
  assert len({c.tobytes() for c in rs.candidates}) == 5
  assert random_search_same_budget(DARTS, evaluate, 9, 0).budget['total_evaluations'] == 9


@pytest.mark.parametrize('kwargs, message', [
    ({'num_candidates': 0}, 'num_candidates must be an integer >= 1'),
    ({'aggregation': 'median'}, "unknown aggregation 'median'"),
    ({'aggregation': 'softmax_tau', 'tau': 0.0}, 'tau > 0'),
    ({'radius': 0}, 'radius must be an integer >= 1'),
    ({'num_neighbors': 25}, 'num_neighbors=25 exceeds the 24 neighbors'),
    ({'num_neighbors': 0}, 'num_neighbors must be an integer >= 1'),
])
def test_argument_errors(evaluator, kwargs, message):
  calls = []

  def counting(codes):
    calls.append(len(codes))
    return evaluator(codes)

  arguments = {'num_candidates': 3, **kwargs}
  with pytest.raises(ValueError, match=message):
    na_random_search(NB201, counting, rng=0, **arguments)
  assert calls == []


def test_candidate_pool_errors(evaluator):
  with pytest.raises(ValueError, match='repeats'):
    random_search(NB201, evaluator, None, 0, candidates=np.stack([FLAT, FLAT]))
  with pytest.raises(ValueError, match='num_candidates=3 but 2 candidates'):
    random_search(NB201, evaluator, 3, 0, candidates=np.stack([FLAT, SHARP]))
  with pytest.raises(ValueError, match='give num_candidates'):
    random_search(NB201, evaluator, None, 0)
  with pytest.raises(ValueError, match='num_candidates must be'):
    random_search(NB201, evaluator, 0, 0)


def test_result_to_json(evaluator):
  na = na_random_search(NB201, evaluator, None, 0, include_center=False,
                        candidates=np.stack([FLAT, SHARP]))
  data = json.loads(json.dumps(na.to_json()))
  assert data['best_arch'] == NB201.format(NB201.decode(FLAT))
  assert data['best_codes'] == FLAT.tolist()
  assert data['candidate_losses'][1] is None
  assert data['budget']['total_evaluations'] == 49
  assert data['settings']['aggregation'] == 'mean'
  assert isinstance(na, SearchResult) and int(np.argmin(na.candidate_scores)) == 0


def test_searches_report_their_progress_in_candidates():
  def evaluate(codes):
    return table_loss(codes)

  calls = []
  random_search(NB201, evaluate, 10, 0, batch_size=4,
                progress=lambda done, total: calls.append((done, total)))
  assert calls == [(4, 10), (8, 10), (10, 10)]
  calls.clear()
  na_random_search(NB201, evaluate, 3, 0, num_neighbors=2, batch_size=3,
                   progress=lambda done, total: calls.append((done, total)))
  assert calls == [(1, 3), (2, 3), (3, 3)]
  calls.clear()
  na_random_search(NB201, evaluate, 3, 0, num_neighbors=2, batch_size=7,
                   progress=lambda done, total: calls.append((done, total)))
  assert calls == [(2, 3), (3, 3)]


@pytest.mark.parametrize('batch_size', [1, 10, 25, 49, 50, 256])
def test_na_rs_calls_hold_whole_neighborhoods_up_to_the_batch_size(evaluator, batch_size):
  calls = []

  def recording(codes):
    calls.append(codes.copy())
    return evaluator(codes)

  pool = _pool(extra=2, seed=1)
  na = na_random_search(NB201, recording, None, 0, candidates=pool, batch_size=batch_size)
  # Each neighborhood is 25 architectures (the centre and 24 neighbors); a call holds as
  # many whole ones as fit, and one alone when it does not fit.
  per_call = max(1, batch_size // 25)
  assert [len(c) for c in calls] == [25 * min(per_call, len(pool) - i)
                                     for i in range(0, len(pool), per_call)]
  asked = np.concatenate(calls)
  for i, codes in enumerate(pool):
    group = neighborhood.enumerate_neighbors(NB201, codes, 1, include_center=True)
    np.testing.assert_array_equal(asked[25 * i:25 * (i + 1)], group)
    assert na.candidate_scores[i] == pytest.approx(table_loss(group).mean())
    assert na.candidate_losses[i] == table_loss(codes[None])[0]
  assert na.settings['batch_size'] == batch_size
