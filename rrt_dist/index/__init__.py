"""Global nearest-neighbour search over descriptor matrices keyed by image id."""
