"""Architecture search algorithms on one search-state pytree: bilevel DARTS / NA-DARTS
(`objective` is the method, `bilevel` its execution), and random search / NA-RS over
pluggable evaluators (`random_search`, `evaluators`, `weight_sharing`).

The package exports classes; functions stay in their modules, so that no exported name
hides a submodule (``nanas_jax.search.random_search`` is the module, its function
``random_search.random_search``)."""

from nanas_jax.search.bilevel import BilevelSearch
from nanas_jax.search.evaluators import (CountingEvaluator, SupernetEvaluator,
                                         TabularEvaluator)
from nanas_jax.search.objective import Neighborhood
from nanas_jax.search.random_search import SearchResult
from nanas_jax.search.state import SearchState

__all__ = [
    "BilevelSearch", "CountingEvaluator", "Neighborhood", "SearchResult", "SearchState",
    "SupernetEvaluator", "TabularEvaluator",
]
