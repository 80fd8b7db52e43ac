"""RRT training: pair sampling (``sampler``), the pure training step and validation (``core``) and the
Ray Train layer (``distributed``). ``rrt_dist.pipelines.train`` prepares a run; ``jobs/train_rrt.py`` runs it."""
