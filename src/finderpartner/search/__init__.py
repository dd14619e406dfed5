"""Search at scale: a vector store interface (store.py), ``--where`` filters (filters.py), the FAISS folder store
(faiss_store.py, meta.py, ann.py), indexing in parallel resumable parts (indexing.py). docs/search.md explains it."""

from .filters import And, Between, Compare, Filter, FilterError, In, IsNull, Not, Or, parse, to_sql
from .store import CompactStats, Hit, PhotoRow, SearchKnobs, VectorStore

__all__ = [
    "And",
    "Between",
    "Compare",
    "CompactStats",
    "Filter",
    "FilterError",
    "Hit",
    "In",
    "IsNull",
    "Not",
    "Or",
    "PhotoRow",
    "SearchKnobs",
    "VectorStore",
    "parse",
    "to_sql",
]
