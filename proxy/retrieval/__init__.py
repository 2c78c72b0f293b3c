"""Retrieval: embedders, the vector index, knowledge-base and semantic-cache collections, and the
precision guards that decide when an entry may answer a request instead of a model."""
