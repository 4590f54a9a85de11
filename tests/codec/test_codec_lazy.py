"""validate() and PayloadSource: lazy fragments equal decode() bit for bit, on every codec."""

from __future__ import annotations

import json
import math
import mmap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from crowdtrain import codec
from crowdtrain.codec import quant, topk, wire
from crowdtrain.codec.buffers import as_buffer, typed_view
from crowdtrain.codec.quant import BlockwiseCodec
from crowdtrain.config import CodecConfig
from crowdtrain.robust.sources import DeltaSource

ALL = ["fp32", "fp16", "bf16", "int8", "int4", "topk2bit"]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The float32 bit patterns, so -0.0 != 0.0 and NaNs compare as themselves."""
    assert t.dtype == torch.float32 and t.dim() == 1
    return t.contiguous().view(torch.int32)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(bits(a), bits(b)), (a[:8], b[:8])


def values(shape: tuple[int, ...], seed: int, kind: str, exponent: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    if kind == "sparse":
        x = x * (torch.rand(shape, generator=gen) < 0.1)
    elif kind == "mixed":  # magnitudes over 30 decades: subnormal products, zero blocks
        x = x * torch.pow(10.0, torch.randint(-15, 16, shape, generator=gen).float())
    elif kind == "negzero":
        x = -torch.zeros(shape)
    return (x.double() * 10.0**exponent).clamp(-codec.MAX_ABS, codec.MAX_ABS).float()


@st.composite
def payloads(draw: st.DrawFn) -> tuple[bytes, dict[str, tuple[int, ...]]]:
    name = draw(st.sampled_from(ALL))
    chunk = draw(st.sampled_from([16, 17, 50, 64]))
    spec = CodecConfig(
        name=name,
        block_size=draw(st.sampled_from([8, 9, 13, 64])),
        chunk_size=chunk,
        topk=draw(st.integers(1, chunk)),
    )
    dims = draw(st.lists(st.integers(0, 70), max_size=3))
    shape = tuple(dims) if math.prod(dims) <= 6000 else (draw(st.integers(0, 6000)),)
    kind = draw(st.sampled_from(["normal", "sparse", "mixed", "negzero"]))
    exponent = draw(st.integers(-40, 25))
    delta = {
        "x": values(shape, draw(st.integers(0, 2**31)), kind, exponent),
        "a.bias": values((draw(st.integers(0, 20)),), 1, "normal", 0),
    }
    return codec.encode(delta, spec), {k: tuple(v.shape) for k, v in delta.items()}


def reference(payload: bytes, shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The dense codecs' decoding formulas written out plainly (pad the levels to whole blocks,
    multiply by the block scales, trim), on tensors that safetensors itself loads."""
    spec = codec.read_header(payload).spec
    tensors = safetensors.torch.load(payload)
    out: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        numel = math.prod(shape)
        if spec.name in ("fp32", "bf16"):
            out[name] = tensors[f"{name}::v"].float()
        elif spec.name == "fp16":
            out[name] = tensors[f"{name}::v"].float() * tensors[f"{name}::scale"]
        elif spec.name in ("int8", "int4"):
            q = tensors[f"{name}::q"]
            if spec.name == "int8":
                levels = q.float()
            else:
                codes = torch.stack([q & 0x0F, q >> 4], dim=1).flatten()[:numel]
                levels = (codes.to(torch.int16) - 8).float()
            size = spec.block_size
            count = -(-numel // size)
            blocks = F.pad(levels, (0, count * size - numel)).view(count, size)
            out[name] = (blocks * tensors[f"{name}::scale"][:, None]).flatten()[:numel]
    return out


def source_over(payload: bytes, shapes: Any, how: str) -> codec.PayloadSource:
    if how == "bytes":
        return codec.PayloadSource(payload, shapes)
    if how == "bytearray":
        return codec.PayloadSource(bytearray(payload), shapes)
    header = codec.validate(memoryview(payload), shapes)
    return codec.PayloadSource(memoryview(payload), shapes, validated=header)


@settings(max_examples=150, deadline=None)
@given(case=payloads(), data=st.data(), how=st.sampled_from(["bytes", "bytearray", "view"]))
def test_fragments_equal_decode_bit_for_bit(
    case: tuple[bytes, dict[str, tuple[int, ...]]], data: st.DataObject, how: str
) -> None:
    """Random codecs, block/chunk sizes, shapes and ranges (many blocks, partial ends)."""
    payload, shapes = case
    full = {k: v.flatten() for k, v in codec.decode(payload, shapes).items()}
    for name, expected in reference(payload, shapes).items():
        assert_same_bits(full[name], expected)
    with source_over(payload, shapes, how) as source:
        for _ in range(4):
            name = data.draw(st.sampled_from(sorted(shapes)))
            numel = full[name].numel()
            start = data.draw(st.integers(0, numel))
            stop = data.draw(st.integers(start, numel))
            got = source.read(name, start, stop)
            assert got.shape == (stop - start,)
            assert_same_bits(got, full[name][start:stop])
        whole = source.read("x", 0, full["x"].numel())
        assert_same_bits(whole, full["x"])


@pytest.mark.parametrize("name", ALL)
def test_every_range_of_a_small_tensor(name: str) -> None:
    """Exhaustively: all (start, stop) of 53 elements, blocks of 8 and chunks of 16 (short
    last block and chunk, a block or chunk both partial at each end, or one inside another)."""
    spec = CodecConfig(name=name, block_size=8, chunk_size=16, topk=5)
    x = values((53,), 3, "mixed", -3)
    payload = codec.encode({"w": x}, spec)
    full = codec.decode(payload, {"w": (53,)})["w"]
    with codec.PayloadSource(payload, {"w": (53,)}) as source:
        for start in range(54):
            for stop in range(start, 54):
                assert_same_bits(source.read("w", start, stop), full[start:stop])


def test_fragments_spanning_the_parameter_in_big_pieces() -> None:
    """A tensor bigger than buffers.CHUNK, read in 1 << 20 pieces and odd-sized ones."""
    shape = (1050, 1000)
    x = values(shape, 4, "normal", -3)
    for name in ["int8", "int4"]:
        payload = codec.encode({"w": x}, CodecConfig(name=name, block_size=64))
        full = codec.decode(payload, {"w": shape})["w"].flatten()
        source = codec.PayloadSource(payload, {"w": shape})
        numel = full.numel()
        for piece in (1 << 20, 99_991):
            starts = range(0, numel, piece)
            got = torch.cat([source.read("w", a, min(numel, a + piece)) for a in starts])
            assert_same_bits(got, full)
        source.close()


def test_payload_source_is_a_delta_source() -> None:
    payload = codec.encode({"w": torch.ones(3, 4)}, CodecConfig())
    source = codec.PayloadSource(payload, {"w": (3, 4)})
    assert isinstance(source, DeltaSource)
    assert source.shapes == {"w": (3, 4)}
    assert source.header == codec.validate(payload, {"w": (3, 4)})
    assert source.header.codec == "int8" and not source.closed


def test_bad_reads() -> None:
    delta = {"w": torch.ones(3, 4), "s": torch.tensor(2.0)}
    payload = codec.encode(delta, CodecConfig(name="fp32"))
    source = codec.PayloadSource(payload, {"w": (3, 4), "s": ()})
    assert source.read("s", 0, 1).tolist() == [2.0]
    assert source.read("w", 5, 5).shape == (0,)
    for start, stop in [(-1, 3), (0, 13), (5, 4), (13, 13)]:
        with pytest.raises(ValueError, match="outside parameter 'w'"):
            source.read("w", start, stop)
    with pytest.raises(KeyError, match="no parameter named 'v'"):
        source.read("v", 0, 1)
    with pytest.raises(TypeError):
        source.read("w", 0.5, 2)  # type: ignore[arg-type]
    source.close()
    source.close()  # closing twice is fine
    assert source.closed
    with pytest.raises(ValueError, match="closed"):
        source.read("w", 0, 1)


def test_from_file_maps_validates_and_closes(tmp_path: Path) -> None:
    shapes = {"w": (40, 9), "b": (9,)}
    gen = torch.Generator().manual_seed(5)
    delta = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    payload = codec.encode(delta, CodecConfig(name="int4", block_size=16))
    path = tmp_path / "payload.bin"
    path.write_bytes(payload)
    full = codec.decode(payload, shapes)
    with codec.PayloadSource.from_file(path, shapes, max_bytes=len(payload)) as source:
        assert isinstance(source._mapped, mmap.mmap)
        kept = source.read("w", 7, 300)
        assert_same_bits(kept, full["w"].flatten()[7:300])
    assert source.closed and source._mapped is None
    assert_same_bits(kept, full["w"].flatten()[7:300])  # results outlive the mapping
    with pytest.raises(ValueError, match="closed"):
        source.read("w", 0, 1)

    header = codec.validate(payload, shapes)
    source = codec.PayloadSource.from_file(str(path), shapes, validated=header)
    assert_same_bits(source.read("b", 0, 9), full["b"])
    source.close()

    with pytest.raises(codec.PayloadError, match="over the limit"):
        codec.PayloadSource.from_file(path, shapes, max_bytes=len(payload) - 1)
    bad = bytearray(payload)
    bad[-1] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(codec.PayloadError, match="digest does not match"):
        codec.PayloadSource.from_file(path, shapes)
    path.write_bytes(b"")
    with pytest.raises(codec.PayloadError, match="too short"):
        codec.PayloadSource.from_file(path, shapes)
    with pytest.raises(FileNotFoundError):
        codec.PayloadSource.from_file(tmp_path / "missing.bin", shapes)


def test_validated_header_must_match_the_payload() -> None:
    shapes = {"w": (4, 4)}
    one = codec.encode({"w": torch.ones(4, 4)}, CodecConfig())
    two = codec.encode({"w": torch.full((4, 4), 2.0)}, CodecConfig())
    with pytest.raises(codec.PayloadError, match="not the one that was validated"):
        codec.PayloadSource(two, shapes, validated=codec.validate(one, shapes))
    with pytest.raises(codec.PayloadError, match="lacks the parameter"):
        codec.PayloadSource(one, {"v": (4, 4)}, validated=codec.validate(one, shapes))


def test_decode_output_does_not_share_the_payload_memory() -> None:
    payload = bytearray(codec.encode({"w": torch.ones(8)}, CodecConfig(name="fp32")))
    out = codec.decode(payload, {"w": (8,)})["w"]
    fragment = codec.PayloadSource(payload, {"w": (8,)}).read("w", 0, 8)
    out += 1
    fragment += 1
    assert codec.decode(payload, {"w": (8,)})["w"].tolist() == [1.0] * 8


def test_header_carries_the_digest() -> None:
    payload = codec.encode({"w": torch.ones(3)}, CodecConfig())
    header = codec.read_header(payload)
    safetensors_header = json.loads(payload[8 : 8 + int.from_bytes(payload[:8], "little")])
    meta = json.loads(safetensors_header["__metadata__"][wire.METADATA_KEY])
    assert header.digest == meta["digest"] and codec.validate(payload, {"w": (3,)}) == header


def test_typed_views_share_memory_unless_misaligned() -> None:
    data = bytearray(range(24))
    buf = as_buffer(data)
    aligned = typed_view(buf, 8, 16, torch.float32)
    assert aligned.data_ptr() == torch.frombuffer(data, dtype=torch.uint8).data_ptr() + 8
    odd = typed_view(buf, 1, 9, torch.float32)
    assert odd.data_ptr() % 4 == 0
    assert odd.view(torch.uint8).tolist() == list(range(1, 9))
    assert typed_view(buf, 5, 5, torch.int32).shape == (0,)
    del aligned, odd
    with pytest.raises(codec.PayloadError, match="must be bytes"):
        as_buffer("text")
    strided = memoryview(bytes(range(8)))[::2]
    with pytest.raises(codec.PayloadError, match="cannot be read"):
        as_buffer(strided)
    released = memoryview(b"1234")
    released.release()
    with pytest.raises(codec.PayloadError, match="cannot be read"):
        as_buffer(released)
    four_floats = memoryview(bytearray(16)).cast("f")
    assert len(as_buffer(four_floats)) == 16


# ---- layouts that encode() never writes but that are valid ----------------------------------


def reframe(payload: bytes, edit: Callable[[Any], str], misalign: int = 0) -> bytes:
    """Rewrite the safetensors header with `edit`, padded so the data starts `misalign` bytes
    past a multiple of 8."""
    n = int.from_bytes(payload[:8], "little")
    header, data = json.loads(payload[8 : 8 + n]), payload[8 + n :]
    raw = edit(header).encode()
    raw += b" " * ((misalign - len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw + data


def compact(header: Any) -> str:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize("name", ALL)
def test_misaligned_data_is_read_correctly(name: str) -> None:
    """A header padded to an odd length puts every tensor at an odd address: views are copied."""
    spec = CodecConfig(name=name, block_size=8, chunk_size=16, topk=3)
    x = values((7, 11), 6, "normal", 0)
    good = codec.encode({"w": x}, spec)
    odd = reframe(good, compact, misalign=1)
    assert int.from_bytes(odd[:8], "little") % 8 == 1
    shapes = {"w": (7, 11)}
    full = codec.decode(good, shapes)["w"].flatten()
    assert_same_bits(codec.decode(odd, shapes)["w"].flatten(), full)
    with codec.PayloadSource(odd, shapes) as source:
        assert_same_bits(source.read("w", 3, 70), full[3:70])


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: " " + compact(h),
        lambda h: "\t\n" + compact(h),
        lambda h: json.dumps(h, indent=2),
        lambda h: compact(dict(reversed(list(h.items())))),
        lambda h: compact(h) + " " * 13,
    ],
)
def test_accepted_payloads_are_readable_safetensors(edit: Any) -> None:
    """decode() no longer parses with safetensors: what validate() accepts, safetensors reads."""
    payload = codec.encode({"w": torch.randn(5, 7)}, CodecConfig(name="int8", block_size=8))
    edited = reframe(payload, edit)
    codec.validate(edited, {"w": (5, 7)})
    theirs = safetensors.torch.load(edited)
    ours = safetensors.torch.load(payload)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_minus_zero_integers_are_refused_like_safetensors_does() -> None:
    payload = codec.encode({"w": torch.randn(5, 7)}, CodecConfig(name="int8", block_size=8))

    def zero_first(h: Any) -> str:
        first = min(h[k]["data_offsets"][0] for k in h if k != "__metadata__")
        return compact(h).replace(f'"data_offsets":[{first},', '"data_offsets":[-0,', 1)

    edited = reframe(payload, zero_first)
    with pytest.raises(Exception):  # noqa: B017 (safetensors' own error type)
        safetensors.torch.load(edited)
    with pytest.raises(codec.PayloadError, match="not valid JSON"):
        codec.validate(edited, {"w": (5, 7)})


# ---- the checks themselves ------------------------------------------------------------------


def recraft(payload: bytes, edit: Any) -> bytes:
    """Edit a payload's wire tensors and give it a correct digest, so value checks are reached."""
    header = codec.read_header(payload)
    core = wire.metadata_core(header.codec, header.params, header.shapes)
    tensors = {k: v.clone() for k, v in safetensors.torch.load(payload).items()}
    edit(tensors)
    views = [(n, tensors[n].contiguous().view(torch.uint8).numpy().data) for n in sorted(tensors)]
    text = wire.metadata_text(core, wire.compute_digest(core, views))
    return bytes(safetensors.torch.save(tensors, metadata={wire.METADATA_KEY: text}))


def outcome(payload: bytes, shapes: Any) -> str:
    """'ok' or the PayloadError message; decode and validate must agree."""
    try:
        codec.validate(payload, shapes)
    except codec.PayloadError as exc:
        with pytest.raises(codec.PayloadError) as caught:
            codec.decode(payload, shapes)
        assert str(caught.value) == str(exc)
        return str(exc)
    assert all(bool(torch.isfinite(v).all()) for v in codec.decode(payload, shapes).values())
    return "ok"


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_huge_scales_are_judged_by_the_values_they_multiply(name: str) -> None:
    """A scale near float32's max is fine where its block's levels keep the product finite."""
    payload = codec.encode({"w": torch.zeros(32)}, CodecConfig(name=name, block_size=8))
    zero_code = 0 if name == "int8" else 0x88

    def blocks(levels: list[int], scale: float) -> Any:
        def edit(t: dict[str, torch.Tensor]) -> None:
            t["w::scale"][1] = scale
            if name == "int8":
                t["w::q"][8 : 8 + len(levels)] = torch.tensor(levels, dtype=torch.int8)
            else:
                codes = [lv + 8 for lv in levels] + [8] * (len(levels) % 2)
                packed = [lo | hi << 4 for lo, hi in zip(codes[0::2], codes[1::2], strict=True)]
                t["w::q"][4 : 4 + len(packed)] = torch.tensor(packed, dtype=torch.uint8)

        return recraft(payload, edit)

    assert torch.equal(codec.decode(payload, {"w": (32,)})["w"], torch.zeros(32))
    assert zero_code in safetensors.torch.load(payload)["w::q"].tolist()
    assert outcome(blocks([0, 0], 3e38), {"w": (32,)}) == "ok"
    assert outcome(blocks([1, -1], 3e38), {"w": (32,)}) == "ok"
    assert "decodes to NaN or Inf" in outcome(blocks([0, 2], 3e38), {"w": (32,)})
    assert "decodes to NaN or Inf" in outcome(blocks([0, -2], 3e38), {"w": (32,)})


def test_fp16_overflow_check_is_exact() -> None:
    payload = codec.encode({"w": torch.tensor([1.0, -0.5])}, CodecConfig(name="fp16"))

    def with_scale(scale: float) -> bytes:
        return recraft(payload, lambda t: t["w::scale"].fill_(scale))

    biggest = torch.finfo(torch.float32).max
    # The stored values are 2^14 and -2^13 (max|x| = 1 maps to 2^14): 2^14 * scale decides.
    assert safetensors.torch.load(payload)["w::v"].tolist() == [2.0**14, -(2.0**13)]
    assert outcome(with_scale(biggest / 2**14), {"w": (2,)}) == "ok"
    assert "decodes to NaN or Inf" in outcome(with_scale(biggest / 2**13), {"w": (2,)})


@pytest.fixture
def small_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the checks walk tensors in pieces of 4 bytes or elements (so many pieces)."""
    monkeypatch.setattr(quant, "CHUNK", 4)
    monkeypatch.setattr(topk, "CHUNK", 4)


def lie(name: str, key: str, index: int, value: float | int) -> bytes:
    spec = CodecConfig(name=name, block_size=8, chunk_size=16, topk=3)
    payload = codec.encode({"w": values((101,), 9, "normal", 0)}, spec)
    return recraft(payload, lambda t: t[key].__setitem__(index, value))


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (lie("int4", "w::q", 0, 0x80), "code 0"),
        (lie("int4", "w::q", 37, 0x08), "code 0"),
        (lie("int4", "w::q", 50, 0x80), "code 0"),  # the last (half-used) byte
        (lie("int4", "w::q", 50, 0x98), "padding"),
        # 101 elements in chunks of 16 keeping 3: idx[0:18] are 6 full rows, idx[18:21] the
        # short last chunk of 5 elements; 21 codes fill 6 bytes, the last one holds 1.
        (lie("topk2bit", "w::idx", 16, 16), "outside its chunk"),
        (lie("topk2bit", "w::idx", 13, 0), "not strictly ascending"),
        (lie("topk2bit", "w::idx", 19, 5), "outside its chunk"),
        (lie("topk2bit", "w::idx", 19, 4), "not strictly ascending"),
        (lie("topk2bit", "w::code", 5, 0xC0), "padding bits"),
    ],
)
def test_checks_in_pieces_find_every_lie(payload: bytes, match: str) -> None:
    assert match in outcome(payload, {"w": (101,)})


@pytest.mark.usefixtures("small_pieces")
def test_checks_in_pieces_keep_decodes_order() -> None:
    """With two lies in different pieces, the same one is reported as with one piece."""

    def edit(t: dict[str, torch.Tensor]) -> None:
        t["w::idx"][1] = 0  # not ascending, in the first piece of rows
        t["w::idx"][16] = 16  # outside its chunk, in a later piece

    spec = CodecConfig(name="topk2bit", chunk_size=16, topk=3)
    payload = recraft(codec.encode({"w": values((101,), 9, "normal", 0)}, spec), edit)
    assert "outside its chunk" in outcome(payload, {"w": (101,)})


@pytest.mark.usefixtures("small_pieces")
@pytest.mark.parametrize("name", ALL)
def test_valid_payloads_pass_in_pieces(name: str) -> None:
    spec = CodecConfig(name=name, block_size=8, chunk_size=16, topk=3)
    payload = codec.encode({"w": values((101,), 9, "mixed", 0)}, spec)
    assert outcome(payload, {"w": (101,)}) == "ok"


def test_unexpected_failures_are_still_payload_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    payload = codec.encode({"w": torch.ones(3)}, CodecConfig())
    monkeypatch.setattr(BlockwiseCodec, "check", broken)
    checks: list[Callable[..., object]] = [codec.validate, codec.decode, codec.PayloadSource]
    for check in checks:
        with pytest.raises(codec.PayloadError, match="could not be decoded"):
            check(payload, {"w": (3,)})
    monkeypatch.undo()
    source = codec.PayloadSource(payload, {"w": (3,)})
    monkeypatch.setattr(BlockwiseCodec, "decode_range", broken)
    with pytest.raises(codec.PayloadError, match="could not be decoded"):
        source.read("w", 0, 3)
