"""Data: raw text → MDS shards per domain (prepare), and the loaders that feed training (mixture)."""
