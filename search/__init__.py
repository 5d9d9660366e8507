"""FAISS index, queries, near-duplicate groups and detection over a clipdex store."""
