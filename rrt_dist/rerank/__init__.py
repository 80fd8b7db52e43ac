"""Rerankers of a query's global top-K: geometric verification (GV) and, with rrt_dist.models, RRT."""
