"""crowdtrain.data: pack corpora into content-addressed shards; deterministic batch sampling.

Pack once (`pack_source` / `ensure_packed`), read shards back through a `ShardStore`, pick each
peer's shards with `assign_shards`, and draw its batches with `BatchSampler`, whose output is a
pure function of its arguments so that any step can be replayed (DiLoCo data parallelism,
Douillard et al. 2023, arXiv:2311.08105).
"""

from crowdtrain.data.manifest import (
    DataError,
    DataManifest,
    ShardRef,
    load_manifest,
    parse_manifest,
)
from crowdtrain.data.pack import (
    SEPARATOR,
    ensure_packed,
    ensure_packed_for,
    pack_source,
    val_indices,
)
from crowdtrain.data.sampler import Batch, BatchSampler, assign_shards, eval_batches, peer_key
from crowdtrain.data.shards import Shard, ShardStore, shard_id
from crowdtrain.data.sources import STDLIB, list_files, stdlib_root

__all__ = [
    "SEPARATOR",
    "STDLIB",
    "Batch",
    "BatchSampler",
    "DataError",
    "DataManifest",
    "Shard",
    "ShardRef",
    "ShardStore",
    "assign_shards",
    "ensure_packed",
    "ensure_packed_for",
    "eval_batches",
    "list_files",
    "load_manifest",
    "pack_source",
    "parse_manifest",
    "peer_key",
    "shard_id",
    "stdlib_root",
    "val_indices",
]
