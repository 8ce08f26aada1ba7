"""Text options: frozen-LM embeddings with an on-disk cache, and the real-text preference datasets."""

from steerable.text.embedder import Embedder, EmbedderConfig, embed_preferences

__all__ = ["Embedder", "EmbedderConfig", "embed_preferences"]
