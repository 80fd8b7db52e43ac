"""What a report row costs beside what it scores: the bytes per gallery image its reranker needs stored beyond the
global descriptor every row reads (the seconds per query of its stage are measured by ``evaluate_methods``)."""
from __future__ import annotations

import pyarrow as pa

from rrt_dist.rerank.methods import parse_method

# The feature-table columns (rrt_dist.store's schema) each reranker input is read from.
INPUT_COLUMNS = {"locals": ("local", "local_scale", "scales", "n_local"), "positions": ("positions",),
                 "patches": ("local", "local_scale", "positions", "n_local")}


def row_bytes(schema: pa.Schema, columns) -> int:
    """Bytes one row of ``columns`` takes as ``schema`` stores it (fixed-width lists: the padding included; columns
    the schema lacks count 0)."""
    total = 0
    for name in dict.fromkeys(columns):
        if name not in schema.names:
            continue
        typ = schema.field(name).type
        if pa.types.is_fixed_size_list(typ):
            total += typ.list_size * typ.value_type.bit_width // 8
        else:
            total += typ.bit_width // 8
    return total


def stored_bytes(inputs: tuple[str, ...], schema: pa.Schema, own_table: pa.Schema | None = None) -> int:
    """Bytes per gallery image a reranker reading ``inputs`` needs stored beyond the global descriptor: the columns
    it reads from the run's tables (``schema``), or every descriptor column of a table of its own (``own_table``: the
    structural rows' patch grids from ``reranker.patch_backbone``, global included). 0 for global-only rerankers."""
    if own_table is not None:
        return row_bytes(own_table, [n for n in own_table.names if n not in ("id", "source")])
    return row_bytes(schema, [c for i in inputs for c in INPUT_COLUMNS.get(i, ())])


def add_storage(costs: dict[str, dict], schema: pa.Schema, patch_schema: pa.Schema | None = None) -> int:
    """Each row of ``costs`` (``evaluate_methods``'): its ``stored_bytes_per_image`` from the gallery table's
    ``schema`` (``patch_schema``: the structural rows' own patch table, if any). Returns the global descriptor's bytes
    per image, which every row reads."""
    for cost in costs.values():
        reranker = parse_method(cost["method"]).reranker
        own = patch_schema if reranker and "patches" in reranker.inputs else None
        cost["stored_bytes_per_image"] = stored_bytes(reranker.inputs, schema, own) if reranker else 0
    return row_bytes(schema, ["global"])
