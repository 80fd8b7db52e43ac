"""Lance feature tables, by concern: the format (:mod:`.features`: schema and codecs), versions and recovery
(:mod:`.versions`: write, commit, restore), the one place that deletes files (:mod:`.cleanup`), the read side
(:mod:`.readers`) and writer locks (:mod:`.locks`)."""
from rrt_dist.schema import LOCAL_ENCODINGS, FeatureTableMismatch

from .cleanup import remove_uncommitted
from .features import check_schema, features_schema, features_to_table
from .readers import (FeatureStore, MemoryFeatures, concat_globals, take_globals_from, take_locals_from)
from .versions import (Restoration, check_whole, commit_fragments, committed_ids, committed_sources, delete_ids,
                       lost_ids, manifest_versions, open_table, restore, restore_table, write_fragment)

__all__ = ["LOCAL_ENCODINGS", "FeatureStore", "FeatureTableMismatch", "MemoryFeatures", "Restoration", "check_schema",
           "check_whole", "commit_fragments", "committed_ids", "committed_sources", "concat_globals", "delete_ids",
           "features_schema", "features_to_table", "lost_ids", "manifest_versions", "open_table", "remove_uncommitted",
           "restore", "restore_table", "take_globals_from", "take_locals_from", "write_fragment"]
