"""Ray job entry points: each module is a Hydra app (``rrt-dist <job>``, or ``python jobs/<job>.py``)."""
