"""The run manifest: resolved config + data-shard hashes + initial-weights hash, signed.

A volunteer pins the manifest's hash and the coordinator's public key when it first joins and
refuses a manifest that changed (DESIGN.md, trust model). Weights travel as safetensors bytes
(``protocol.broadcast.weights_bytes``, deterministic, so equal weights have equal hashes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from crowdtrain.config import RunConfig, config_hash
from crowdtrain.data import DataManifest

MANIFEST_FORMAT = "crowdtrain-manifest"
MANIFEST_VERSION = 1


def build_manifest(
    config: RunConfig,
    data: DataManifest,
    initial_weights: str,
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, Any]:
    """The manifest document a coordinator signs and serves at /v1/manifest."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "run": config.model_dump(mode="json"),
        "config_hash": config_hash(config),
        "data": data.to_json(),
        "data_hash": data.hash(),
        "initial_weights": initial_weights,
        "param_shapes": {k: list(v) for k, v in shapes.items()},
    }
