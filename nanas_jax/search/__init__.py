"""Architecture search algorithms on one search-state pytree: bilevel DARTS / NA-DARTS, and
random search / NA-RS over pluggable evaluators."""

from nanas_jax.search.bilevel import BilevelSearch, validate_search_config
from nanas_jax.search.evaluators import (CountingEvaluator, SupernetEvaluator,
                                         TabularEvaluator)
from nanas_jax.search.random_search import (SearchResult, na_random_search, random_search,
                                            random_search_same_budget)
from nanas_jax.search.state import SearchState

__all__ = [
    "BilevelSearch", "CountingEvaluator", "SearchResult", "SearchState",
    "SupernetEvaluator", "TabularEvaluator", "na_random_search", "random_search",
    "random_search_same_budget", "validate_search_config",
]
