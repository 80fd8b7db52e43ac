"""Reranking models."""
