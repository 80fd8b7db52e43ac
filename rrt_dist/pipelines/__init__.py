"""Ray layers that distribute the stage cores (Ray Data pipelines, actor pools)."""
