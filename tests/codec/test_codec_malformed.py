"""Hostile payloads: every malformation, lie and corruption is one PayloadError, nothing else."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain import codec
from crowdtrain.codec import wire
from crowdtrain.config import CodecConfig

ALL = ["fp32", "fp16", "bf16", "int8", "int4", "topk2bit"]
SHAPES = {"w": (5, 7), "b": (3,)}
SPECS = {name: CodecConfig(name=name, block_size=8, chunk_size=16, topk=3) for name in ALL}
SAFETY_NET = "payload could not be decoded"
FUZZ = settings(max_examples=80, deadline=None)


def delta() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}


PAYLOADS = {name: codec.encode(delta(), spec) for name, spec in SPECS.items()}


CHECKS: dict[str, Callable[..., object]] = {
    "decode": codec.decode,
    "validate": codec.validate,
    "PayloadSource": codec.PayloadSource,
}


def rejected(payload: Any, shapes: Any = SHAPES, **kw: Any) -> str:
    """decode, validate and PayloadSource must all raise the same PayloadError, from a specific
    check (not the safety net)."""
    messages = set()
    for name, check in CHECKS.items():
        try:
            check(payload, shapes, **kw)
        except codec.PayloadError as exc:
            messages.add(str(exc))
        else:
            pytest.fail(f"{name} accepted a malformed payload")
    assert len(messages) == 1, messages
    message = messages.pop()
    assert not message.startswith(SAFETY_NET), message
    assert "\n" not in message
    return message


def parts(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The wire tensors and header core of a valid payload."""
    payload = PAYLOADS[name]
    header = codec.read_header(payload)
    core = wire.metadata_core(header.codec, header.params, header.shapes)
    return dict(safetensors.torch.load(payload)), core


def craft(
    tensors: dict[str, torch.Tensor],
    core: dict[str, Any],
    *,
    digest: str | None = None,
    text: str | None = None,
) -> bytes:
    """A payload with a *correct* digest (unless given), so deeper checks are reached."""
    if digest is None:
        views = [
            (n, tensors[n].contiguous().view(torch.uint8).numpy().data) for n in sorted(tensors)
        ]
        digest = wire.compute_digest(core, views)
    if text is None:
        text = wire.metadata_text(core, digest)
    return bytes(safetensors.torch.save(tensors, metadata={wire.METADATA_KEY: text}))


def split_blob(payload: bytes) -> tuple[dict[str, Any], bytes]:
    n = int.from_bytes(payload[:8], "little")
    return json.loads(payload[8 : 8 + n]), payload[8 + n :]


def join_blob(header: Any, data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data


def test_valid_payloads_decode() -> None:
    for name in ALL:
        out = codec.decode(PAYLOADS[name], SHAPES, max_bytes=len(PAYLOADS[name]))
        assert {k: v.shape for k, v in out.items()} == SHAPES
        assert codec.decode(bytearray(PAYLOADS[name]), SHAPES).keys() == out.keys()
        header = codec.validate(memoryview(PAYLOADS[name]), SHAPES, max_bytes=len(PAYLOADS[name]))
        assert header == codec.read_header(PAYLOADS[name])


# ---- framing ---------------------------------------------------------------------------------


def test_size_limit_is_checked_first() -> None:
    assert "over the limit" in rejected(PAYLOADS["int8"], max_bytes=len(PAYLOADS["int8"]) - 1)
    assert "over the limit" in rejected(b"\xff" * 100, max_bytes=10)
    with pytest.raises(codec.PayloadError, match="over the limit"):
        codec.read_header(PAYLOADS["int8"], max_bytes=10)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"", "too short"),
        (b"1234567", "too short"),
        ((2**64 - 1).to_bytes(8, "little") + b"{}", "declares"),
        ((3).to_bytes(8, "little") + b"{}", "declares"),
        ((2).to_bytes(8, "little") + b"\xff\xfe", "UTF-8"),
        ((4).to_bytes(8, "little") + b"{]  ", "not valid JSON"),
        ((8).to_bytes(8, "little") + b"[1,2,3] ", "not a JSON object"),
        ((8).to_bytes(8, "little") + b'{"a":NaN', "not valid JSON"),
        (join_blob({"a": 1}, b"")[:8] + b'{"a":1,"a":2}', "not valid JSON"),
        ("a string", "must be bytes"),
    ],
)
def test_broken_framing(payload: Any, match: str) -> None:
    if isinstance(payload, bytes) and payload.startswith(join_blob({"a": 1}, b"")[:8]):
        payload = (len(payload) - 8).to_bytes(8, "little") + payload[8:]
    assert match in rejected(payload)


def test_deeply_nested_header_json() -> None:
    text = b"[" * 200_000 + b"]" * 200_000
    assert "not valid JSON" in rejected(len(text).to_bytes(8, "little") + text)


def test_header_longer_than_allowance() -> None:
    size = wire.header_allowance(SHAPES) + 8
    blob = size.to_bytes(8, "little") + b"{" + b" " * (size - 1)
    assert "over the limit" in rejected(blob)


def test_trailing_and_missing_data_bytes() -> None:
    payload = PAYLOADS["fp16"]
    assert "tensor data" in rejected(payload + b"\x00" * 8)
    assert "tensor data" in rejected(payload[:-2])


# ---- our header --------------------------------------------------------------------------------


def core_lie(key: str, value: Any) -> dict[str, Any]:
    _, core = parts("int8")
    if value is KeyError:
        del core[key]
    else:
        core[key] = value
    return core


@pytest.mark.parametrize(
    ("core", "match"),
    [
        (core_lie("format", "other-format"), "not a crowdtrain-delta payload"),
        (core_lie("format", KeyError), "not a crowdtrain-delta payload"),
        (core_lie("version", 2), "not supported"),
        (core_lie("version", "1"), "not supported"),
        (core_lie("version", True), "not supported"),
        (core_lie("codec", "int3"), "unknown"),
        (core_lie("codec", ["int8"]), "unknown"),
        (core_lie("shapes", KeyError), "lacks the key"),
        (core_lie("extra", 1), "unknown key"),
        (core_lie("params", {}), "must be exactly"),
        (core_lie("params", {"block_size": 8, "topk": 2}), "must be exactly"),
        (core_lie("params", {"block_size": True}), "integers"),
        (core_lie("params", {"block_size": 8.0}), "integers"),
        (core_lie("params", {"block_size": 4}), "invalid"),
        (core_lie("params", [8]), "must be exactly"),
        (core_lie("shapes", [["w", [5, 7]]]), "not an object"),
        (core_lie("shapes", {"w": [5, -7], "b": [3]}), "invalid shape"),
        (core_lie("shapes", {"w": [5, 7.0], "b": [3]}), "invalid shape"),
        (core_lie("shapes", {"w": "5x7", "b": [3]}), "invalid shape"),
        (core_lie("shapes", {"w": [1] * 65, "b": [3]}), "invalid shape"),
        (core_lie("shapes", {"w": [5, 2**70], "b": [3]}), "invalid shape"),
        (core_lie("shapes", {"w": [5, 7]}), "lacks the parameter 'b'"),
        (core_lie("shapes", {"w": [5, 7], "b": [3], "c": [1]}), "unexpected parameter 'c'"),
        (core_lie("shapes", {"w": [7, 5], "b": [3]}), "has shape [7, 5]"),
        (core_lie("shapes", {"w": [35], "b": [3]}), "has shape [35]"),
    ],
)
def test_header_lies(core: dict[str, Any], match: str) -> None:
    tensors, _ = parts("int8")
    assert match in rejected(craft(tensors, core))


def test_topk_params_must_be_consistent() -> None:
    tensors, core = parts("topk2bit")
    core["params"] = {"chunk_size": 16, "topk": 17}
    assert "invalid" in rejected(craft(tensors, core))


def test_metadata_container_lies() -> None:
    tensors, core = parts("fp32")
    assert "no __metadata__" in rejected(bytes(safetensors.torch.save(tensors)))
    two = {wire.METADATA_KEY: wire.metadata_text(core, "0" * 32), "x": "y"}
    assert "exactly one string" in rejected(bytes(safetensors.torch.save(tensors, metadata=two)))
    other = {"other": wire.metadata_text(core, "0" * 32)}
    assert "exactly one string" in rejected(bytes(safetensors.torch.save(tensors, metadata=other)))
    assert "metadata is not valid JSON" in rejected(craft(tensors, core, text="{nope"))
    assert "metadata is not a JSON object" in rejected(craft(tensors, core, text="[1]"))
    pretty = json.dumps({**core, "digest": "0" * 32}, indent=1, sort_keys=True)
    assert "not canonical" in rejected(craft(tensors, core, text=pretty))
    header, data = split_blob(PAYLOADS["fp32"])
    header["__metadata__"] = "text"
    assert "no __metadata__" in rejected(join_blob(header, data))


@pytest.mark.parametrize("digest", ["0" * 31, "G" * 32, "A" * 32, 12, None])
def test_malformed_digest(digest: Any) -> None:
    tensors, core = parts("int8")
    text = json.dumps({**core, "digest": digest}, sort_keys=True, separators=(",", ":"))
    assert "digest is not" in rejected(craft(tensors, core, text=text))


def test_digest_detects_changed_data() -> None:
    tensors, core = parts("int8")
    good = craft(tensors, core)
    tensors["w::q"] = tensors["w::q"].clone()
    tensors["w::q"][0] += 1
    digest = json.loads(split_blob(good)[0]["__metadata__"][wire.METADATA_KEY])["digest"]
    assert "digest does not match" in rejected(craft(tensors, core, digest=digest))


# ---- tensors in the blob -----------------------------------------------------------------------


def tensor_lie(name: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> bytes:
    tensors, core = parts(name)
    edit(tensors)
    return craft(tensors, core)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (tensor_lie("int8", lambda t: t.pop("w::scale")), "lacks the tensor 'w::scale'"),
        (tensor_lie("int8", lambda t: t.update({"w::extra": torch.zeros(1)})), "unexpected"),
        (tensor_lie("int8", lambda t: t.update({"c::q": torch.zeros(1)})), "unexpected"),
        (
            tensor_lie("int8", lambda t: t.update({"w::scale": t["w::scale"].half()})),
            "has dtype 'F16' where 'F32'",
        ),
        (
            tensor_lie("int8", lambda t: t.update({"w::q": t["w::q"].view(torch.uint8)})),
            "has dtype 'U8' where 'I8'",
        ),
        (
            tensor_lie("int8", lambda t: t.update({"w::q": t["w::q"][:-1].clone()})),
            "34 elements where 35",
        ),
        (
            tensor_lie("int8", lambda t: t.update({"w::scale": torch.ones(6)})),
            "6 elements where 5",
        ),
        (
            tensor_lie("topk2bit", lambda t: t.update({"w::idx": t["w::idx"].to(torch.int32)})),
            "has dtype 'I32' where 'U16'",
        ),
        (
            tensor_lie("fp16", lambda t: t.update({"b::v": t["b::v"].reshape(1, 3)})),
            "not one-dimensional",
        ),
    ],
)
def test_tensor_lies(payload: bytes, match: str) -> None:
    assert match in rejected(payload)


def entry_lie(edit: Callable[[dict[str, Any]], None]) -> bytes:
    header, data = split_blob(PAYLOADS["int8"])
    edit(header)
    return join_blob(header, data)


def swap_offsets(h: dict[str, Any]) -> None:
    h["w::q"]["data_offsets"], h["b::q"]["data_offsets"] = (
        h["b::q"]["data_offsets"],
        h["w::q"]["data_offsets"],
    )


def shift_offsets(h: dict[str, Any]) -> None:
    start, end = h["w::q"]["data_offsets"]
    h["w::q"]["data_offsets"] = [start + 1, end + 1]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (entry_lie(lambda h: h["w::q"].update(extra=1)), "malformed"),
        (entry_lie(lambda h: h.update({"w::q": [1]})), "malformed"),
        (entry_lie(lambda h: h["w::q"].update(shape=[35.0])), "not one-dimensional"),
        (entry_lie(lambda h: h["w::q"].update(data_offsets=[0, 1])), "data offsets"),
        (entry_lie(lambda h: h["w::q"].update(data_offsets=[-35, 0])), "data offsets"),
        (entry_lie(lambda h: h["w::q"].update(data_offsets=[True, 36])), "data offsets"),
        (entry_lie(swap_offsets), "data offsets"),
        (entry_lie(shift_offsets), "gaps or overlaps"),
    ],
)
def test_entry_lies(payload: bytes, match: str) -> None:
    assert match in rejected(payload)


def value_lie(name: str, key: str, index: int, value: float | int) -> bytes:
    tensors, core = parts(name)
    t = tensors[key].clone()
    t[index] = value
    tensors[key] = t
    return craft(tensors, core)


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (value_lie("fp32", "w::v", 3, math.nan), "NaN or Inf"),
        (value_lie("fp32", "b::v", 0, -math.inf), "NaN or Inf"),
        (value_lie("fp16", "w::v", 1, math.inf), "NaN or Inf"),
        (value_lie("fp16", "w::scale", 0, math.nan), "NaN or Inf"),
        (value_lie("fp16", "w::scale", 0, 0.0), "not positive"),
        (value_lie("fp16", "w::scale", 0, 3e38), "decodes to NaN or Inf"),
        (value_lie("bf16", "b::v", 2, math.nan), "NaN or Inf"),
        (value_lie("int8", "w::scale", 4, math.inf), "NaN or Inf"),
        (value_lie("int8", "w::scale", 0, -1.0), "negative"),
        (value_lie("int8", "w::scale", 0, 3e38), "decodes to NaN or Inf"),
        (value_lie("int8", "w::q", 0, -128), "code -128"),
        (value_lie("int4", "b::scale", 0, math.nan), "NaN or Inf"),
        (value_lie("int4", "w::q", 0, 0x80), "code 0"),
        (value_lie("int4", "b::q", 1, 0x18), "padding"),
        (value_lie("topk2bit", "w::levels", 1, math.inf), "NaN or Inf"),
        (value_lie("topk2bit", "w::levels", 0, -1.0), "negative"),
        (value_lie("topk2bit", "w::idx", 0, 16), "outside its chunk"),
        (value_lie("topk2bit", "w::idx", 1, 0), "not strictly ascending"),
        # b has 3 elements: one short chunk whose indices must be < 3.
        (value_lie("topk2bit", "b::idx", 2, 3), "outside its chunk"),
        (value_lie("topk2bit", "b::code", 0, 0xFF), "padding bits"),
    ],
)
def test_value_lies(payload: bytes, match: str) -> None:
    assert match in rejected(payload)


def test_negative_int32_index() -> None:
    spec = CodecConfig(name="topk2bit", chunk_size=70_000, topk=4)
    payload = codec.encode(delta(), spec)
    tensors = dict(safetensors.torch.load(payload))
    assert tensors["w::idx"].dtype == torch.int32
    header = codec.read_header(payload)
    core = wire.metadata_core(header.codec, header.params, header.shapes)
    tensors["w::idx"] = tensors["w::idx"].clone()
    tensors["w::idx"][0] = -1
    assert "negative index" in rejected(craft(tensors, core))


# ---- fuzzing -----------------------------------------------------------------------------------


@FUZZ
@given(name=st.sampled_from(ALL), data=st.data())
def test_truncation_is_rejected(name: str, data: st.DataObject) -> None:
    payload = PAYLOADS[name]
    cut = data.draw(st.integers(0, len(payload) - 1))
    rejected(payload[:cut])


@FUZZ
@given(blob=st.binary(max_size=3000), plausible=st.booleans())
def test_random_bytes_are_rejected(blob: bytes, plausible: bool) -> None:
    if plausible:  # a header length that fits, so the JSON parser sees the bytes
        blob = min(len(blob), 100).to_bytes(8, "little") + blob
    rejected(blob)
    with contextlib.suppress(codec.PayloadError):
        codec.read_header(blob)


@FUZZ
@given(name=st.sampled_from(ALL), data=st.data())
def test_bit_flips_are_rejected(name: str, data: st.DataObject) -> None:
    payload = bytearray(PAYLOADS[name])
    bit = data.draw(st.integers(0, 8 * len(payload) - 1))
    payload[bit // 8] ^= 1 << (bit % 8)
    rejected(bytes(payload))


def test_every_single_bit_flip_is_rejected() -> None:
    """Exhaustively, for one small payload: the digest and the header checks catch them all."""
    small = codec.encode({"w": torch.randn(9)}, CodecConfig(name="topk2bit", chunk_size=16, topk=3))
    for bit in range(8 * len(small)):
        flipped = bytearray(small)
        flipped[bit // 8] ^= 1 << (bit % 8)
        rejected(bytes(flipped), {"w": (9,)})


@FUZZ
@given(name=st.sampled_from(ALL), data=st.data())
def test_mutations_raise_only_payload_error(name: str, data: st.DataObject) -> None:
    """Splices, insertions, deletions and overwrites anywhere: only PayloadError escapes."""
    payload = PAYLOADS[name]
    start = data.draw(st.integers(0, len(payload)))
    end = data.draw(st.integers(start, min(len(payload), start + 64)))
    filler = data.draw(st.binary(max_size=64))
    mutated = payload[:start] + filler + payload[end:]
    if mutated == payload:
        return
    rejected(mutated)
    try:
        codec.read_header(mutated)
    except codec.PayloadError as exc:
        assert not str(exc).startswith(SAFETY_NET)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@FUZZ
@given(
    name=st.sampled_from(ALL),
    key=st.sampled_from(["format", "version", "codec", "params", "shapes"]),
    value=JSON,
)
def test_header_fields_of_any_type_are_rejected(name: str, key: str, value: Any) -> None:
    """Any JSON value in any header field (with a valid digest) is a PayloadError, never a crash."""
    tensors, core = parts(name)
    if core[key] == value:
        return
    core[key] = value
    rejected(craft(tensors, core))


@FUZZ
@given(
    name=st.sampled_from(ALL),
    field=st.sampled_from(["dtype", "shape", "data_offsets"]),
    value=JSON,
)
def test_entry_fields_of_any_type_are_rejected(name: str, field: str, value: Any) -> None:
    header, data = split_blob(PAYLOADS[name])
    entry = header[
        "w::" + ("v" if name in ("fp32", "fp16", "bf16") else "idx" if name == "topk2bit" else "q")
    ]
    if entry[field] == value:
        return
    entry[field] = value
    rejected(join_blob(header, data))
