"""Custom ops. Imports only torch (triton lazily)."""

from llara_dist.ops.inject import embed_and_inject, inject_embeddings

__all__ = ["embed_and_inject", "inject_embeddings"]
