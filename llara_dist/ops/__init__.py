"""Custom ops. Imports only torch (triton lazily)."""

from llara_dist.ops.inject import inject_embeddings

__all__ = ["inject_embeddings"]
