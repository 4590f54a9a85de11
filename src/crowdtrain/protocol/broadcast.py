"""Compressed weight broadcast: θ_{r+1} is what a volunteer holding θ_r reconstructs.

A volunteer that trained the last round holds θ_r; it needs only the outer update
θ_{r+1} − θ_r, which compresses like a pseudo-gradient does (int8 blockwise: about 1 byte per
parameter instead of fp32's 4). To keep every round a pure function of public inputs, the
coordinator does not send an approximation of its own θ_{r+1}: it *defines* θ_{r+1} as
θ_r + decode(update), computed with the same float32 additions a volunteer performs, so the
base a volunteer trains from, the base a verifier replays from and the coordinator's are the
same bits. What compression drops is not lost: the coordinator keeps it as an error-feedback
residual and adds it to the next update (Seide et al. 2014; the same mechanism as the
contributions' codec, ``crowdtrain.codec.encode``), so θ_r plus the residual is always the
exact sum of the outer steps. Compressing the model broadcast this way is also what DiLoCo's
streaming and quantized variants do for the outer direction (Douillard et al. 2025,
"Streaming DiLoCo", arXiv:2501.18512).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from crowdtrain import codec
from crowdtrain.config import BroadcastConfig
from crowdtrain.tensorfile import TensorFile

Shapes = Mapping[str, tuple[int, ...]]


def weights_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Safetensors bytes of named tensors (contiguous CPU copies), deterministic: the form θ is
    published in, so a reconstruction is checked by its sha256 against the published blob's
    (the coordinator streams the same bytes into its blob store: `TensorFile`)."""
    return TensorFile(tensors).to_bytes()


def apply_update(
    base: Mapping[str, torch.Tensor], payload: bytes, shapes: Shapes
) -> dict[str, torch.Tensor]:
    """θ_{r+1} from θ_r (`base`) and the published update `payload`: base + decode(payload),
    in float32, as the coordinator computed it. The payload is validated as any payload is
    (``codec.decode`` raises PayloadError)."""
    update = codec.decode(payload, shapes)
    return {name: base[name].to(torch.float32) + update[name] for name in shapes}


class Broadcast:
    """The coordinator's side: compress each round's outer update and keep the residual."""

    def __init__(self, config: BroadcastConfig, shapes: Shapes) -> None:
        self.config = config
        self.shapes = dict(shapes)
        self.residual: dict[str, torch.Tensor] = {}
        self.update: bytes | None = None  # the last round's published update, if compressed

    @property
    def compressed(self) -> bool:
        return self.config.codec != "fp32"

    def publish(self, before: Mapping[str, torch.Tensor], params: dict[str, torch.Tensor]) -> None:
        """Turn `params` (the outer step's result from `before`) into what volunteers will
        reconstruct, in place, and keep the encoded update in ``update``.

        Uncompressed, or when the update cannot be encoded (non-finite values of a diverged
        run), `params` stays the exact result, ``update`` is None (volunteers download θ whole)
        and the residual is dropped (it has been folded into nothing that was published)."""
        self.update = None
        if not self.compressed:
            return
        step = {name: params[name] - before[name] for name in self.shapes}
        try:
            payload = codec.encode(step, self.config.spec(), residual=self.residual)
        except ValueError:
            self.residual = {}
            return
        for name, value in apply_update(before, payload, self.shapes).items():
            params[name].copy_(value)
        self.update = payload
