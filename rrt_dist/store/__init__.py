"""Lance feature tables: the schema every stage reads, and the helpers that read and write it."""
from .features import (FeatureStore, FeatureTableMismatch, MemoryFeatures, check_schema, commit_fragments, committed_ids,
                       concat_globals, features_schema, features_to_table, take_locals_from, write_fragment)

__all__ = ["FeatureStore", "FeatureTableMismatch", "MemoryFeatures", "check_schema", "commit_fragments", "committed_ids",
           "concat_globals", "features_schema", "features_to_table", "take_locals_from", "write_fragment"]
