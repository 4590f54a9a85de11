"""The codecs by name, as `CodecConfig.name` spells them."""

from __future__ import annotations

from typing import get_args

from crowdtrain.codec.base import TensorCodec
from crowdtrain.codec.quant import Bf16Codec, BlockwiseCodec, Fp16Codec, Fp32Codec
from crowdtrain.codec.topk import TopK2BitCodec
from crowdtrain.config import CodecName

CODECS: dict[str, TensorCodec] = {
    "fp32": Fp32Codec(),
    "fp16": Fp16Codec(),
    "bf16": Bf16Codec(),
    "int8": BlockwiseCodec("int8", bits=8),
    "int4": BlockwiseCodec("int4", bits=4),
    "topk2bit": TopK2BitCodec(),
}
assert set(CODECS) == set(get_args(CodecName)), "every configurable codec needs an implementation"


def codec_names() -> tuple[str, ...]:
    """The codec names, in the order the config lists them."""
    return tuple(get_args(CodecName))


def get_codec(name: str) -> TensorCodec:
    """The codec called `name`; ValueError naming the known codecs if there is none."""
    try:
        return CODECS[name]
    except KeyError:
        known = ", ".join(codec_names())
        raise ValueError(f"unknown codec {name!r}; known codecs are {known}") from None
