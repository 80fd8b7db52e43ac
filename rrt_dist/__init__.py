"""rrt-dist: Ray-distributed large-scale image retrieval with reranking (see README.md and DESIGN.md)."""
import os as _os

# Lance warns "No existing dataset ..., it will be created" for every fragment written before a table's first
# commit, which is how the pipelines write: set before any submodule imports lance; errors still show.
_os.environ.setdefault("LANCE_LOG", "error")
