"""The one error type raised for a bad payload.

Every check in `crowdtrain.codec.validate` (which `decode` and `PayloadSource` run) and in
`crowdtrain.codec.read_header` raises `PayloadError` with one sentence naming the problem, so the
coordinator can reject an upload with a reason and never crash on hostile bytes (the design's
trust model: volunteers are untrusted).
"""

from __future__ import annotations


class PayloadError(ValueError):
    """A payload is malformed, too big, or lies about itself; the message is one sentence."""
