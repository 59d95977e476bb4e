"""Search indexes over embeddings: FAISS for the vectors, SQLite for paths and metadata.

>>> from cliplab.index import SearchIndex, Hit                    # doctest: +SKIP
>>> idx = SearchIndex.load("idx")                                 # doctest: +SKIP
>>> idx.search(queries, k=10)                                     # doctest: +SKIP

FAISS is imported when an index is built or loaded, not with this package.
"""

from .search import Hit, SearchIndex
from .sources import Collection, embed_images, read_features
from .types import INDEX_TYPES, IndexPlan, choose_index_type

__all__ = ["Hit", "SearchIndex", "Collection", "embed_images", "read_features", "INDEX_TYPES",
           "IndexPlan", "choose_index_type"]
