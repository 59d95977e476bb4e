"""Work spread over machines on an existing distributed engine (Ray Data).

Nothing here is imported by ``import cliplab``: the engine is an optional dependency
(``pip install 'cliplab[scale]'``), imported when a function of this package runs.

- :func:`~cliplab.scale.ray_embed.embed_ray`: image embeddings of folders, WebDataset
  shards or a parquet table of paths, decoded on CPU workers and encoded in model actors,
  written as parquet shards with completion markers, resumable after a crash.
- :func:`~cliplab.scale.ray_embed.read_embeddings`: the features of a finished run, in
  input order.
"""

from .ray_embed import RayEmbedResult, embed_ray, list_sources, read_embeddings

__all__ = ["RayEmbedResult", "embed_ray", "list_sources", "read_embeddings"]
