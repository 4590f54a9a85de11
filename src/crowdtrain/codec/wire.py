"""The wire format of a payload: one safetensors blob with a small JSON header.

Layout (safetensors, https://github.com/huggingface/safetensors): an 8-byte little-endian header
length N, N bytes of JSON (tensor entries plus `__metadata__`), then the tensor data. Our
`__metadata__` has one key, "header", whose value is canonical JSON (sorted keys, no spaces):

    {"codec": "int8", "digest": "<32 hex>", "format": "crowdtrain-delta",
     "params": {"block_size": 64}, "shapes": {"<param>": [dims]}, "version": 1}

Each parameter becomes a few 1-D tensors named "<param>::<slot>" (e.g. "w::q", "w::scale").
`digest` is BLAKE2b-128 over the header without the digest and every tensor's name and bytes in
name order, so any corruption (a flipped bit anywhere) is detected; it is an integrity check,
not a signature. This module parses the header itself, with strict bounds, so that nothing is
allocated from numbers a payload merely claims; the decoder then reads the tensors in place and
never hands the bytes to safetensors. The JSON rules are at least as strict as safetensors' own
(its header must also be readable by `safetensors.torch.load`, e.g. no `-0` integers).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from crowdtrain import strictjson
from crowdtrain.codec.base import Slot, TensorCodec, ceil_div, require
from crowdtrain.codec.errors import PayloadError
from crowdtrain.codec.registry import CODECS, codec_names
from crowdtrain.config import CodecConfig, canonical_json

FORMAT_NAME = "crowdtrain-delta"
FORMAT_VERSION = 1
METADATA_KEY = "header"
#: read_header() (which has no expected shapes) refuses headers longer than this.
MAX_HEADER_BYTES = 16 << 20
#: The header allowance in decode(): this much plus a per-parameter allowance.
BASE_HEADER_BYTES = 1 << 20
MAX_NDIM = 64
DIGEST_HEX = 32
_HEADER_KEYS = frozenset({"format", "version", "codec", "params", "shapes", "digest"})
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class PayloadHeader:
    """What a payload says about itself: codec, format version, codec parameters, shapes, and
    the digest of its contents (so two headers are equal only for the same contents)."""

    codec: str
    version: int
    params: Mapping[str, int]
    shapes: Mapping[str, tuple[int, ...]]
    digest: str

    @property
    def spec(self) -> CodecConfig:
        """The codec config the payload was encoded with (ef_decay is the sender's, not sent)."""
        return CodecConfig.model_validate({"name": self.codec, **self.params})


def tensor_name(param: str, suffix: str) -> str:
    """The blob's name for one wire tensor of a parameter (no two (param, suffix) collide)."""
    return f"{param}::{suffix}"


def layout(
    shapes: Mapping[str, tuple[int, ...]], codec: TensorCodec, spec: CodecConfig
) -> dict[str, Slot]:
    """Every wire tensor's name and slot, in parameter order."""
    out: dict[str, Slot] = {}
    for name in sorted(shapes):
        for slot in codec.slots(math.prod(shapes[name]), spec):
            out[tensor_name(name, slot.suffix)] = slot
    return out


def metadata_core(
    codec: str, params: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """The header fields that the digest covers (everything but the digest)."""
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "codec": codec,
        "params": dict(params),
        "shapes": {name: list(shape) for name, shape in shapes.items()},
    }


def metadata_text(core: Mapping[str, Any], digest: str) -> str:
    """The canonical JSON text stored under __metadata__["header"]."""
    return canonical_json({**core, "digest": digest}).decode("ascii")


def compute_digest(core: Mapping[str, Any], tensors: Iterable[tuple[str, memoryview]]) -> str:
    """BLAKE2b-128 of the canonical header core and each (name, bytes), given in name order."""
    h = hashlib.blake2b(canonical_json(core), digest_size=DIGEST_HEX // 2)
    for name, data in tensors:
        encoded = name.encode("utf-8")
        h.update(len(encoded).to_bytes(8, "little"))
        h.update(encoded)
        h.update(data.nbytes.to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def header_allowance(expected: Mapping[str, tuple[int, ...]]) -> int:
    """A generous cap on the header length of any honest payload for these parameters.

    An honest header needs about 255 + 10 * len(name) + 21 * ndim bytes per parameter plus a
    few hundred bytes in all; this allows roughly twice that, plus 1 MiB.
    """
    per_param = sum(
        512 + 32 * len(name.encode("utf-8")) + 48 * len(s) for name, s in expected.items()
    )
    return BASE_HEADER_BYTES + per_param


def header_size_bound(core: Mapping[str, Any], layout: Mapping[str, Slot]) -> int:
    """Upper bound on the safetensors header (JSON and its padding) that encode() writes.

    safetensors (serde_json) writes compact JSON with raw UTF-8 and escapes exactly what Python's
    json does with ensure_ascii=False; every offset is counted here with the digits of the
    largest one, so the bound exceeds the real size by a few bytes per tensor at most.
    """
    total = sum(slot.nbytes for slot in layout.values())
    document: dict[str, Any] = {"__metadata__": {METADATA_KEY: metadata_text(core, "0" * 32)}}
    for name, slot in layout.items():
        document[name] = {
            "dtype": slot.dtype_name,
            "shape": [slot.length],
            "data_offsets": [total, total],
        }
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=False)
    return ceil_div(len(text.encode("utf-8")), 8) * 8


def check_size(payload: memoryview, max_bytes: int | None) -> None:
    """The size limit, checked before anything is parsed."""
    if max_bytes is not None and len(payload) > max_bytes:
        raise PayloadError(f"payload is {len(payload)} bytes, over the limit of {max_bytes}")


def _int(token: str) -> int:
    if token == "-0":  # safetensors (serde_json) reads -0 as a float and refuses it
        raise ValueError("the integer -0")
    return int(token)


def strict_json(text: str, what: str) -> Any:
    """Parse JSON that has no duplicate keys and no NaN/Infinity; errors become PayloadError."""
    try:
        return strictjson.loads(text, parse_int=_int)
    except ValueError as exc:
        reason = str(exc).split("\n")[0][:120]
        raise PayloadError(f"{what} is not valid JSON ({reason})") from None


def split(payload: memoryview, header_cap: int) -> tuple[dict[str, Any], int]:
    """Parse the safetensors header; return it and the offset where tensor data starts.

    Only the header's bytes are copied (at most `header_cap` of them).
    """
    size = len(payload)
    require(size >= 8, f"payload is {size} bytes, too short to hold a safetensors header")
    length = int.from_bytes(payload[:8], "little")
    require(
        length <= size - 8,
        f"payload declares a {length}-byte header but holds only {size - 8} bytes after it",
    )
    require(
        length <= header_cap,
        f"payload declares a {length}-byte header, over the limit of {header_cap}",
    )
    try:
        text = bytes(payload[8 : 8 + length]).decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("payload header is not valid UTF-8") from None
    raw = strict_json(text, "payload header")
    require(isinstance(raw, dict), "payload header is not a JSON object")
    return raw, 8 + length


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_shapes(shapes: object) -> dict[str, tuple[int, ...]]:
    require(isinstance(shapes, dict), "payload header 'shapes' is not an object")
    assert isinstance(shapes, dict)
    out: dict[str, tuple[int, ...]] = {}
    for name, dims in shapes.items():
        ok = (
            isinstance(dims, list)
            and len(dims) <= MAX_NDIM
            and all(_is_int(d) and 0 <= d < 2**63 for d in dims)
        )
        require(ok, f"payload header gives parameter {name!r} an invalid shape")
        out[name] = tuple(dims)
    return out


def parse_metadata(raw: Mapping[str, Any]) -> tuple[PayloadHeader, dict[str, Any], str]:
    """Validate our header inside safetensors' metadata; return it, its digest core, its digest."""
    meta = raw.get("__metadata__")
    require(isinstance(meta, dict), "payload has no __metadata__ header")
    assert isinstance(meta, dict)
    text = meta.get(METADATA_KEY)
    require(
        set(meta) == {METADATA_KEY} and isinstance(text, str),
        f"payload metadata must hold exactly one string, {METADATA_KEY!r}",
    )
    assert isinstance(text, str)
    obj = strict_json(text, "payload metadata")
    require(isinstance(obj, dict), "payload metadata is not a JSON object")
    require(obj.get("format") == FORMAT_NAME, f"payload is not a {FORMAT_NAME} payload")
    version = obj.get("version")
    require(
        _is_int(version) and version == FORMAT_VERSION,
        f"payload format version {version!r} is not supported (this reader knows {FORMAT_VERSION})",
    )
    missing = sorted(_HEADER_KEYS - set(obj))
    require(not missing, f"payload metadata lacks the key {missing[0] if missing else ''!r}")
    extra = sorted(set(obj) - _HEADER_KEYS)
    require(not extra, f"payload metadata has the unknown key {extra[0] if extra else ''!r}")
    codec = obj["codec"]
    require(
        isinstance(codec, str) and codec in CODECS,
        f"payload codec {codec!r} is unknown; known codecs are {', '.join(codec_names())}",
    )
    params = obj["params"]
    wanted = set(CODECS[codec].params(CodecConfig.model_validate({"name": codec})))
    require(
        isinstance(params, dict) and set(params) == wanted,
        f"payload params for codec {codec!r} must be exactly {sorted(wanted)}",
    )
    require(
        all(_is_int(v) for v in params.values()),
        f"payload params for codec {codec!r} must be integers",
    )
    try:
        CodecConfig.model_validate({"name": codec, **params})
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"]
        raise PayloadError(f"payload params for codec {codec!r} are invalid: {reason}") from None
    shapes = _parse_shapes(obj["shapes"])
    digest = obj["digest"]
    require(
        isinstance(digest, str)
        and len(digest) == DIGEST_HEX
        and all(c in "0123456789abcdef" for c in digest),
        "payload digest is not 32 lowercase hex digits",
    )
    require(text == canonical_json(obj).decode("ascii"), "payload metadata is not canonical JSON")
    header = PayloadHeader(
        codec=codec,
        version=FORMAT_VERSION,
        params=MappingProxyType(dict(params)),
        shapes=MappingProxyType(shapes),
        digest=digest,
    )
    core = {key: value for key, value in obj.items() if key != "digest"}
    return header, core, digest


def check_entries(
    raw: Mapping[str, Any], layout: Mapping[str, Slot], data_len: int
) -> dict[str, tuple[int, int]]:
    """Check every tensor entry against the expected layout and the data size; return spans."""
    names = set(raw) - {"__metadata__"}
    missing = sorted(set(layout) - names)
    require(not missing, f"payload lacks the tensor {missing[0] if missing else ''!r}")
    extra = sorted(names - set(layout))
    require(not extra, f"payload has the unexpected tensor {extra[0] if extra else ''!r}")
    spans: dict[str, tuple[int, int]] = {}
    for name, slot in layout.items():
        entry = raw[name]
        require(
            isinstance(entry, dict) and set(entry) == _ENTRY_KEYS,
            f"payload entry for tensor {name!r} is malformed",
        )
        dtype = entry["dtype"]
        require(
            dtype == slot.dtype_name,
            f"tensor {name!r} has dtype {dtype!r} where {slot.dtype_name!r} was expected",
        )
        shape = entry["shape"]
        require(
            isinstance(shape, list) and len(shape) == 1 and _is_int(shape[0]),
            f"tensor {name!r} is not one-dimensional",
        )
        require(
            shape[0] == slot.length,
            f"tensor {name!r} has {shape[0]} elements where {slot.length} were expected",
        )
        offsets = entry["data_offsets"]
        require(
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]
            and offsets[1] - offsets[0] == slot.nbytes,
            f"tensor {name!r} has data offsets that do not match its size",
        )
        spans[name] = (offsets[0], offsets[1])
    position = 0
    for start, end in sorted(spans.values()):
        require(start == position, "payload tensor data has gaps or overlaps")
        position = end
    require(
        position == data_len,
        f"payload holds {data_len} bytes of tensor data where {position} were declared",
    )
    return spans
