"""Tests of the RS / NA-RS evaluators: counting, accuracy tables, the supernet evaluator."""

import itertools
import json
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nanas_jax.search import evaluators
from nanas_jax.search.evaluators import (CountingEvaluator, Evaluator, SupernetEvaluator,
                                         TabularEvaluator)
from nanas_jax.spaces import get_space

NB201 = get_space('nb201')
DARTS = get_space('darts')
ALL_NB201 = np.array(list(itertools.product(range(5), repeat=6)), np.int32)[:, None, :]


def _nb201_table(seed=0):
  """Accuracy (percent) of every NB201 architecture, keyed by its benchmark string."""
  accuracies = np.random.default_rng(seed).uniform(50, 95, len(ALL_NB201)).round(3)
  return {NB201.format(NB201.decode(c)): float(a) for c, a in zip(ALL_NB201, accuracies)}


@pytest.fixture(scope='module')
def table():
  return _nb201_table()


@pytest.fixture(scope='module')
def json_evaluator(tmp_path_factory, table):
  path = tmp_path_factory.mktemp('table') / 'nb201.json'
  path.write_text(json.dumps(table))
  return TabularEvaluator.from_file(path)


# ------------------------------------------------------------------------- counting
def test_counting_evaluator_counts_every_request():
  seen = []

  def evaluate(codes):
    seen.append(len(codes))
    return codes.reshape(len(codes), -1).sum(axis=1).astype(float)

  counter = CountingEvaluator(evaluate)
  assert isinstance(counter, Evaluator)
  codes = ALL_NB201[:5]
  np.testing.assert_array_equal(counter(codes), [0, 1, 2, 3, 4])
  counter(codes[:2])
  assert (counter.count, counter.calls, counter.unique_count, counter.forwarded) == (7, 2, 5, 7)
  assert seen == [5, 2]


def test_counting_evaluator_cache_serves_repeats_but_still_counts_them():
  forwarded = []

  def evaluate(codes):
    forwarded.append(codes.copy())
    return codes.reshape(len(codes), -1).sum(axis=1).astype(float)

  counter = CountingEvaluator(evaluate, cache=True)
  batch = ALL_NB201[[3, 1, 3, 2]]
  np.testing.assert_array_equal(counter(batch), [3, 1, 3, 2])
  np.testing.assert_array_equal(counter(ALL_NB201[[2, 7]]), [2, 3])  # digit sums
  assert counter.count == 6 and counter.unique_count == 4 and counter.forwarded == 4
  assert [len(f) for f in forwarded] == [3, 1]


def test_counting_evaluator_checks_the_evaluator_output():
  with pytest.raises(ValueError, match=r'one loss per architecture, shape \(3,\)'):
    CountingEvaluator(lambda codes: np.zeros(2))(ALL_NB201[:3])


# ------------------------------------------------------------------------- tabular
def test_json_table_losses_are_errors_in_percent(json_evaluator, table):
  codes = ALL_NB201[[0, 77, 15624]]
  expected = [100 - table[NB201.format(NB201.decode(c))] for c in codes]
  np.testing.assert_allclose(json_evaluator(codes), expected)
  assert len(json_evaluator) == 5**6


def test_batched_lookup_equals_one_at_a_time(json_evaluator):
  codes = ALL_NB201[np.random.default_rng(1).choice(len(ALL_NB201), 40, replace=False)]
  one_by_one = np.concatenate([json_evaluator(c[None]) for c in codes])
  np.testing.assert_array_equal(json_evaluator(codes), one_by_one)


def test_csv_table_with_header_and_fractions(tmp_path):
  archs = [NB201.format(NB201.decode(c)) for c in ALL_NB201[:3]]
  path = tmp_path / 'small.csv'
  path.write_text('arch,accuracy\n' + ''.join(f'{a},{v}\n' for a, v in
                                                zip(archs, [0.5, 0.25, 0.75])))
  evaluator = TabularEvaluator.from_file(path, accuracy_scale=1.0)
  np.testing.assert_allclose(evaluator(ALL_NB201[:3]), [0.5, 0.75, 0.25])
  headerless = tmp_path / 'plain.csv'
  headerless.write_text(f'{archs[0]},93.5\n\n{archs[1]},90\n')
  np.testing.assert_allclose(TabularEvaluator.from_file(headerless)(ALL_NB201[:2]), [6.5, 10])


def test_table_keys_are_normalised(tmp_path):
  arch = NB201.format(NB201.decode(ALL_NB201[9]))
  path = tmp_path / 'spaced.json'
  path.write_text(json.dumps({f'  {arch}\n': 91.0}))
  np.testing.assert_allclose(TabularEvaluator.from_file(path)(ALL_NB201[9:10]), [9.0])


def test_missing_file_says_how_to_get_a_table(tmp_path):
  missing = tmp_path / 'nope.json'
  with pytest.raises(FileNotFoundError, match='NATS-tss-v1_0-3ffb9-simple') as info:
    TabularEvaluator.from_file(missing)
  assert str(missing) in str(info.value) and 'arch,accuracy' in str(info.value)
  with pytest.raises(FileNotFoundError, match='NATS-tss-v1_0-3ffb9-simple'):
    TabularEvaluator.from_nats_bench(tmp_path / 'NATS-tss-v1_0-3ffb9-simple')


def test_missing_architecture_is_a_key_error_naming_it(tmp_path):
  arch = NB201.format(NB201.decode(ALL_NB201[0]))
  path = tmp_path / 'one.json'
  path.write_text(json.dumps({arch: 90.0}))
  evaluator = TabularEvaluator.from_file(path)
  absent = NB201.format(NB201.decode(ALL_NB201[1]))
  with pytest.raises(KeyError, match=absent.replace('|', r'\|').replace('+', r'\+')):
    evaluator(ALL_NB201[:2])


@pytest.mark.parametrize('name, text, message', [
    ('broken.json', '{"a": ', 'not valid JSON'),
    ('list.json', '[1, 2]', 'expected a JSON object'),
    ('bad_arch.json', '{"|conv~0|": 90}', 'is not a nb201 architecture'),
    ('bad_value.json', None, 'is not a number in'),
    ('twice.json', None, 'appears twice'),
    ('empty.json', '{}', 'empty'),
    ('columns.csv', 'arch,accuracy\nx,1,2\n', 'line 2: expected two columns'),
    ('text.csv', None, 'line 1: accuracy'),
    ('table.txt', 'x', "unknown table format '.txt'"),
])
def test_malformed_tables(tmp_path, name, text, message):
  arch = NB201.format(NB201.decode(ALL_NB201[5]))
  if name == 'bad_value.json':
    text = json.dumps({arch: 'high'})
  elif name == 'twice.json':
    text = '{"%s": 90, "%s": 91}' % (arch, arch)
  elif name == 'text.csv':
    text = f'{arch},ninety\n'
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError, match=message):
    TabularEvaluator.from_file(path)


def test_fraction_table_with_percent_scale_warns(tmp_path):
  path = tmp_path / 'fractions.json'
  path.write_text(json.dumps({NB201.format(NB201.decode(ALL_NB201[0])): 0.9}))
  with pytest.warns(UserWarning, match='accuracy_scale=1.0'):
    TabularEvaluator.from_file(path)


def test_evaluator_checks_codes(json_evaluator):
  with pytest.raises(ValueError, match=r'shape \[N, 1, 6\]'):
    json_evaluator(ALL_NB201[0])
  with pytest.raises(ValueError, match='outside 0..4'):
    json_evaluator(np.full((1, 1, 6), 5))


class _FakeNatsApi:
  """The part of the nats_bench API that from_nats_bench uses."""

  def __init__(self, table):
    self.meta_archs = list(table)
    self.accuracies = list(table.values())
    self.queries = []

  def __len__(self):
    return len(self.meta_archs)

  def query_index_by_arch(self, arch):
    return self.meta_archs.index(arch) if arch in self.meta_archs else -1

  def get_more_info(self, index, dataset, hp='12', is_random=True):
    self.queries.append((index, dataset, hp, is_random))
    if dataset == 'cifar10':
      return {'test-accuracy': 1.0}
    return {'valid-accuracy': self.accuracies[index], 'test-accuracy': 1.0}


def test_from_nats_bench_uses_the_api(tmp_path, monkeypatch):
  archs = [NB201.format(NB201.decode(c)) for c in ALL_NB201[:2]]
  api = _FakeNatsApi({archs[0]: 91.0, archs[1]: 80.0})
  created = []

  class FakeModule:

    @staticmethod
    def create(path, space, fast_mode, verbose):
      created.append((path, space, fast_mode, verbose))
      return api

  monkeypatch.setitem(sys.modules, 'nats_bench', FakeModule)
  evaluator = TabularEvaluator.from_nats_bench(tmp_path)
  np.testing.assert_allclose(evaluator(ALL_NB201[[1, 0, 1]]), [20.0, 9.0, 20.0])
  assert created == [(str(tmp_path), 'tss', True, False)]
  # Each record is read once, averaged over seeds (is_random=False), 200-epoch results.
  assert api.queries == [(1, 'cifar10-valid', '200', False), (0, 'cifar10-valid', '200', False)]
  with pytest.raises(KeyError, match='not in NATS-Bench'):
    evaluator(ALL_NB201[2:3])
  cifar10 = TabularEvaluator.from_nats_bench(tmp_path, dataset='cifar10')
  with pytest.raises(ValueError, match='cifar10-valid'):
    cifar10(ALL_NB201[:1])


def test_from_nats_bench_without_the_package(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'nats_bench', None)
  with pytest.raises(ImportError, match='pip install nats_bench'):
    TabularEvaluator.from_nats_bench(tmp_path)


# ------------------------------------------------------------------------ supernet
class ToyArchModel(nn.Module):
  """logits = BN(tanh(sum_teo w[t,e,o] x P[t,e,o])) V: a supernet's contract in miniature,
  with BatchNorm so that train-mode batch statistics matter."""
  hidden: int = 5
  classes: int = 3

  @nn.compact
  def __call__(self, x, weights, train):
    x = x.reshape(x.shape[0], -1)
    proj = self.param('proj', nn.initializers.normal(0.5),
                      weights.shape + (x.shape[-1], self.hidden))
    h = jnp.tanh(jnp.einsum('teo,bd,teodh->bh', weights, x, proj))
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    return nn.Dense(self.classes)(h)


def _toy_setup(space, seed=0):
  rng = np.random.default_rng(seed)
  batches = [(rng.normal(size=(6, 4)).astype(np.float32), rng.integers(0, 3, 6)),
             (rng.normal(size=(4, 4)).astype(np.float32), rng.integers(0, 3, 4))]
  model = ToyArchModel()
  variables = model.init(jax.random.key(seed), jnp.asarray(batches[0][0]),
                         jnp.ones(space.alpha_shape) / space.num_ops, train=False)
  # Running statistics far from any batch's, so that train and eval mode differ.
  variables = {'params': variables['params'],
               'batch_stats': jax.tree.map(lambda v: v + 3.0, variables['batch_stats'])}
  return model, variables, batches


def _direct_loss(model, variables, batches, codes, num_ops, train):
  """One architecture, no vmap: the mean cross-entropy over all examples of the batches."""
  weights = jax.nn.one_hot(codes, num_ops)
  total, count = 0.0, 0
  for x, y in batches:
    if train:
      logits, _ = model.apply(variables, x, weights, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, x, weights, train=False)
    total += float(optax.softmax_cross_entropy_with_integer_labels(logits, y).sum())
    count += len(y)
  return total / count


@pytest.mark.parametrize('train', [True, False])
def test_supernet_evaluator_equals_a_loop_of_single_architectures(train):
  model, variables, batches = _toy_setup(NB201)
  # The compiled functions are the process's, shared by evaluators of equal supernets.
  sums = evaluators._evaluation_programs(())[0]
  sums.clear_cache()
  evaluator = SupernetEvaluator(model, variables, NB201, batches, chunk_size=4, train=train)
  codes = ALL_NB201[np.random.default_rng(2).choice(len(ALL_NB201), 6, replace=False)]
  batched = evaluator(codes)
  direct = [_direct_loss(model, variables, batches, c, NB201.num_ops, train) for c in codes]
  np.testing.assert_allclose(batched, direct, rtol=2e-5)
  singles = np.concatenate([evaluator(c[None]) for c in codes])
  np.testing.assert_allclose(singles, batched, rtol=1e-6)
  # Chunks of 4, the rest of a request of 4 or more filled up to a chunk, a smaller
  # request in powers of two: N = 6 is 4 + 4 (2 copies), N = 1 is 1; one compiled
  # function per (call size, batch shape).
  compiled = 2 * len({x.shape for x, _ in batches})
  assert sums._cache_size() == compiled
  # Another evaluator of an equal supernet (a new instance) compiles nothing of its own,
  # and answers the same.
  again = SupernetEvaluator(_toy_setup(NB201)[0], variables, NB201, batches, chunk_size=4,
                            train=train)
  np.testing.assert_array_equal(again(codes), batched)
  assert sums._cache_size() == compiled


def test_chunk_sizes_fill_only_the_rest_of_a_request_of_a_chunk_or_more():
  from nanas_jax.search.evaluators import chunk_sizes, filled  # pylint: disable=g-import-not-at-top
  assert chunk_sizes(9, 16) == [8, 1]
  assert chunk_sizes(35, 16) == [16, 16, 16]
  assert chunk_sizes(32, 16) == [16, 16] and chunk_sizes(0, 4) == []
  for n in range(100):
    sizes = chunk_sizes(n, 8)
    if n < 8:  # nothing filled: powers of two, each at most once
      assert sum(sizes) == n and len(set(sizes)) == len(sizes)
      assert all(s in (1, 2, 4) for s in sizes)
    else:  # one size; less than a chunk filled
      assert set(sizes) == {8} and n <= sum(sizes) < n + 8
  codes = np.arange(12).reshape(2, 2, 3)
  np.testing.assert_array_equal(filled(codes, 4), codes[[0, 1, 0, 0]])
  np.testing.assert_array_equal(filled(codes, 2), codes)


def test_supernet_evaluator_on_darts_codes_and_train_mode_matters():
  model, variables, batches = _toy_setup(DARTS, seed=3)
  rng = np.random.default_rng(0)
  codes = np.stack([DARTS.encode(DARTS.random(rng)) for _ in range(3)])
  train = SupernetEvaluator(model, variables, DARTS, batches)(codes)
  running = SupernetEvaluator(model, variables, DARTS, batches, train=False)(codes)
  assert train.shape == (3,) and np.all(np.isfinite(train))
  assert not np.allclose(train, running)
  np.testing.assert_allclose(
      train[1], _direct_loss(model, variables, batches, codes[1], DARTS.num_ops, True),
      rtol=2e-5)


def test_supernet_evaluator_argument_checks():
  model, variables, batches = _toy_setup(NB201)
  with pytest.raises(ValueError, match='chunk_size'):
    SupernetEvaluator(model, variables, NB201, batches, chunk_size=0)
  with pytest.raises(ValueError, match='at least one'):
    SupernetEvaluator(model, variables, NB201, [])
  with pytest.raises(ValueError, match='do not match'):
    SupernetEvaluator(model, variables, NB201, [(batches[0][0], batches[1][1])])
  evaluator = SupernetEvaluator(model, variables, NB201, batches)
  assert evaluator(np.zeros((0, 1, 6), np.int32)).shape == (0,)
  with pytest.raises(ValueError, match=r'\[N, 1, 6\]'):
    evaluator(np.zeros((2, 2, 14), np.int32))



@pytest.mark.parametrize('train', [True, False])
def test_supernet_evaluator_drops_padded_rows(train):
  """``(images, labels, mask)`` batches (a stream's eval batches): padded rows enter
  neither the loss nor, in training mode, the BatchNorm statistics."""
  model, variables, batches = _toy_setup(NB201, seed=6)
  x, y = batches[1]
  padded = (np.concatenate([x, 50 * np.ones((2, 4), np.float32)]),
            np.concatenate([y, [0, 0]]), np.array([True] * len(y) + [False, False]))
  codes = ALL_NB201[:3]
  got = SupernetEvaluator(model, variables, NB201, [batches[0], padded], train=train)
  want = SupernetEvaluator(model, variables, NB201, batches, train=train)
  assert got.num_examples == want.num_examples == 10
  np.testing.assert_allclose(got(codes), want(codes), rtol=1e-6)


def test_supernet_evaluator_with_accuracy_counts_correct_predictions():
  model, variables, batches = _toy_setup(NB201, seed=5)
  codes = ALL_NB201[np.random.default_rng(4).choice(len(ALL_NB201), 5, replace=False)]
  losses, accuracies = SupernetEvaluator(model, variables, NB201, batches, chunk_size=4,
                                         with_accuracy=True)(codes)
  np.testing.assert_allclose(losses, SupernetEvaluator(model, variables, NB201, batches,
                                                       chunk_size=4)(codes), rtol=1e-6)
  for c, acc in zip(codes, accuracies):
    weights = jax.nn.one_hot(c, NB201.num_ops)
    hits = sum(int(np.sum(np.argmax(model.apply(variables, x, weights, train=True,
                                                mutable=['batch_stats'])[0], -1) == y))
               for x, y in batches)
    assert acc == pytest.approx(hits / sum(len(y) for _, y in batches))
