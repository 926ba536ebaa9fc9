"""Architecture search algorithms: bilevel DARTS / NA-DARTS on one search-state pytree."""

from nanas_jax.search.bilevel import BilevelSearch, validate_search_config
from nanas_jax.search.state import SearchState

__all__ = ["BilevelSearch", "SearchState", "validate_search_config"]
