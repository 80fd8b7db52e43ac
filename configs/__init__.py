"""The Hydra config groups (dataset, backbone, index, reranker, train, ray, experiment), shipped as package data."""
