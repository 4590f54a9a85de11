"""Compression codecs for pseudo-gradients and the wire format of an upload.

Codecs: fp32 (exact), fp16/bf16 (rounding), int8/int4 (blockwise absmax), and topk2bit (chunk-wise
top-k with 2-bit values, SparseLoCo-style, Sarfi et al. 2025, arXiv:2508.15706, used with error
feedback as in Deep Gradient Compression, Lin et al. 2018, and DeMo, Peng et al. 2024). A payload
is one safetensors blob with a JSON header; `validate` checks everything without decoding and
raises only `PayloadError`; `decode` validates, then decodes to float32; `PayloadSource` serves
any fragment of a validated payload (bytes or a mapped file), decoded on demand.
"""

from crowdtrain.codec.api import decode, encode, error_bound, max_payload_bytes, read_header
from crowdtrain.codec.errors import PayloadError
from crowdtrain.codec.quant import MAX_ABS
from crowdtrain.codec.registry import codec_names
from crowdtrain.codec.source import PayloadSource
from crowdtrain.codec.validation import validate
from crowdtrain.codec.wire import FORMAT_VERSION, PayloadHeader

__all__ = [
    "FORMAT_VERSION",
    "MAX_ABS",
    "PayloadError",
    "PayloadHeader",
    "PayloadSource",
    "codec_names",
    "decode",
    "encode",
    "error_bound",
    "max_payload_bytes",
    "read_header",
    "validate",
]
