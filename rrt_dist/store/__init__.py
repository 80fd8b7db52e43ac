"""Lance feature tables: the schema every stage reads, and the helpers that read and write it."""
from rrt_dist.schema import LOCAL_ENCODINGS, FeatureTableMismatch

from .features import (FeatureStore, MemoryFeatures, check_schema, commit_fragments, committed_ids, committed_sources,
                       concat_globals, delete_ids, features_schema, features_to_table, open_table, remove_uncommitted,
                       take_globals_from, take_locals_from, write_fragment)

__all__ = ["LOCAL_ENCODINGS", "FeatureStore", "FeatureTableMismatch", "MemoryFeatures", "check_schema", "commit_fragments", "committed_ids",
           "committed_sources", "concat_globals", "delete_ids", "features_schema", "features_to_table", "open_table",
           "remove_uncommitted", "take_globals_from", "take_locals_from", "write_fragment"]
