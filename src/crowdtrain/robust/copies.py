"""Copy and replay detection for pseudo-gradients, with cheap sampled fingerprints.

The third stage of the coordinator's verification pipeline (docs/SECURITY.md). A free-rider
can submit another volunteer's update (or a rescaled or slightly noised copy of it) instead of
training, or replay an update that was accepted in an earlier round (Lin et al., "Free-riders in
Federated Learning: Attacks and Defenses", 2019, arXiv:1911.12560; Fraboni, Vidal and Lorenzi,
"Free-rider Attacks on Model Aggregation in Federated Learning", AISTATS 2021), and Sybils
controlled by one attacker send near-identical updates. Like FoolsGold (Fung, Yoon and
Beschastnikh, 2018, arXiv:1808.04866), copies are found by cosine similarity between updates,
but on a fingerprint: ``blocks`` contiguous runs of ``block_len`` elements at secret, fixed
random positions of the model, so a contribution is compared by reading a few thousand elements
of it and earlier rounds are remembered by their fingerprints alone.

Honest DiLoCo updates of one round share a large common component (they all descend the same
loss from the same weights), so the copy threshold adapts to how similar the round is: with
m = the median pairwise cosine of this round's fingerprints, a pair is a copy when its cosine
is at least max(min_cos, 1 − ratio × (1 − m)), i.e. ``1/ratio`` times closer to identical than
a typical pair. The adaptive part is capped at ``MAX_ADAPTIVE_THRESHOLD`` so that a round
flooded with copies, whose median cosine is then near 1, cannot hide them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from crowdtrain.robust.sources import DeltaSource

__all__ = ["MAX_ADAPTIVE_THRESHOLD", "copy_threshold", "detect_copies", "fingerprint"]

# The adaptive part of the threshold never exceeds this, so that a round where most pairs are
# copies (which pushes the median cosine towards 1) cannot lift the threshold above the cosine
# of lightly noised copies: cosine 0.999 is a copy with about 4.5% relative noise added. Honest
# DiLoCo updates are far less alike than that. ``min_cos`` above it still wins.
MAX_ADAPTIVE_THRESHOLD = 0.999

# Cosines are computed in float64; a cosine this close below the threshold still reaches it,
# so exact and rescaled copies are caught even at a threshold of 1.
_COSINE_TOLERANCE = 1e-9


def fingerprint(
    source: DeltaSource,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    key: int,
    blocks: int,
    block_len: int,
) -> torch.Tensor:
    """A float32 vector of ``blocks × block_len`` elements sampled from a contribution.

    The model's parameters are taken in ``shapes`` order. For each of ``blocks`` runs, a
    parameter is chosen with probability proportional to its element count and a start offset
    uniformly within it, and the run holds elements ``[offset, offset + block_len)`` of that
    parameter (a run never crosses a parameter boundary). A parameter with fewer than
    ``block_len`` elements gives its whole tensor, padded with zeros. Positions depend only on
    ``key``, ``shapes``, ``blocks`` and ``block_len`` (a ``torch.Generator`` seeded with ``key``
    modulo 2**64), never on the source, so fingerprints made with one key are comparable across
    contributions and rounds.

    Keep the coordinator's ``key`` secret (draw it once per run from ``secrets`` and never send
    it to volunteers): an attacker who knew the sampled positions could submit a copy that
    differs from the original only there, and so escape ``detect_copies``.

    The source is read only through ``source.read`` on ranges of at most ``block_len``
    elements, one read per run; a whole parameter is read only when it is smaller than that.
    Raises ValueError, in one sentence, when the arguments are unusable or the source does not
    match ``shapes``.
    """
    if blocks < 1 or block_len < 1:
        raise ValueError(
            f"a fingerprint needs blocks >= 1 and block_len >= 1, got {blocks} and {block_len}"
        )
    names = list(shapes)
    sizes = [math.prod(int(d) for d in shapes[name]) for name in names]
    if sum(sizes) == 0:
        raise ValueError("cannot fingerprint a model that has no parameter elements")
    gen = torch.Generator().manual_seed(int(key) % (1 << 64))
    choice = torch.multinomial(
        torch.tensor(sizes, dtype=torch.float64), blocks, replacement=True, generator=gen
    )
    unit = torch.rand(blocks, dtype=torch.float64, generator=gen)
    size = torch.tensor(sizes, dtype=torch.float64)[choice]
    room = torch.clamp(size - block_len + 1, min=1.0)
    offsets = torch.floor(unit * room).to(torch.int64)

    out = torch.zeros(blocks * block_len, dtype=torch.float32)
    for run, (param, offset) in enumerate(zip(choice.tolist(), offsets.tolist(), strict=True)):
        name = names[param]
        stop = min(offset + block_len, sizes[param])
        values = _read(source, name, offset, stop)
        out[run * block_len : run * block_len + (stop - offset)] = values
    return out


def _read(source: DeltaSource, name: str, start: int, stop: int) -> torch.Tensor:
    try:
        values = source.read(name, start, stop)
    except (KeyError, ValueError) as exc:
        detail = exc.args[0] if exc.args else type(exc).__name__
        raise ValueError(f"the contribution does not match the model: {detail}") from None
    if values.dim() != 1 or values.numel() != stop - start:
        raise ValueError(
            f"the contribution returned {values.numel()} elements for '{name}'[{start}:{stop}] "
            f"instead of {stop - start}; its shapes do not match the model"
        )
    return values


def copy_threshold(current: Sequence[torch.Tensor], *, min_cos: float, ratio: float) -> float:
    """The cosine at or above which two fingerprints count as copies, for this round.

    max(min_cos, min(1 − ratio × (1 − m), ``MAX_ADAPTIVE_THRESHOLD``)), where m is the median
    pairwise cosine among the usable (finite, non-zero) fingerprints of ``current`` when there
    are at least 3 of them; otherwise just ``min_cos``.
    """
    _check_limits(min_cos, ratio)
    units, usable = _normalise(
        _stack(current, current[0].numel() if current else 0, "this round's")
    )
    return _threshold(units[usable] @ units[usable].T, min_cos, ratio)


def detect_copies(
    current: Sequence[torch.Tensor],
    earlier: Sequence[torch.Tensor],
    *,
    min_cos: float,
    ratio: float,
    within_round: bool = True,
) -> list[str | None]:
    """Flag contributions whose fingerprint nearly copies an earlier one.

    ``current``: this round's fingerprints in submission order; ``earlier``: fingerprints of
    contributions accepted in recent rounds. Contribution i is a copy when its cosine
    similarity to some current j < i, or to any earlier fingerprint, reaches
    ``copy_threshold(current, min_cos=min_cos, ratio=ratio)``; the later one of a pair is
    flagged and the first is not. Rescaling does not hide a copy (cosine ignores scale). A
    fingerprint that is zero or not finite is neither flagged nor compared here (norm screening
    flags those). The reason names the closest match; "#j" is its 0-based index in ``current``.

    With ``within_round=False`` only the earlier fingerprints are candidates (the threshold is
    still this round's). All cosines come from one normalised matrix product. Raises ValueError
    when the fingerprints differ in length or are not 1-D, or when min_cos and ratio are unusable.
    """
    _check_limits(min_cos, ratio)
    if not current:
        return []
    length = current[0].numel()
    cur, cur_ok = _normalise(_stack(current, length, "this round's"))
    old, old_ok = _normalise(_stack(earlier, length, "earlier"))
    count = cur.shape[0]
    sims = cur @ torch.cat([cur, old]).T  # (count, count + len(earlier))
    threshold = _threshold(sims[:count, :count][cur_ok][:, cur_ok], min_cos, ratio)

    # Only pairs (i, j < i) within the round, and every earlier fingerprint, are candidates.
    allowed = torch.ones_like(sims, dtype=torch.bool)
    allowed[:, :count] = allowed[:, :count].tril(-1) if within_round else False
    allowed &= torch.cat([cur_ok, old_ok]).unsqueeze(0) & cur_ok.unsqueeze(1)
    best, where = torch.where(allowed, sims, -math.inf).max(dim=1)

    reasons: list[str | None] = [None] * count
    for i in range(count):
        cosine = float(best[i])
        if cosine + _COSINE_TOLERANCE < threshold:
            continue
        j = int(where[i])
        of = (
            f"contribution #{j} submitted earlier in this round"
            if j < count
            else "a contribution accepted in an earlier round (a replay)"
        )
        # Neither the cosine nor the round's threshold is named: reasons are public, and
        # they would tell a sender how far from a copy it has to move.
        reasons[i] = f"a near-copy of {of}"
    return reasons


def _check_limits(min_cos: float, ratio: float) -> None:
    if not (math.isfinite(min_cos) and 0.0 < min_cos <= 1.0 and 0.0 <= ratio <= 1.0):
        raise ValueError(
            f"copy detection limits min_cos={min_cos} and ratio={ratio} are unusable; "
            "they must satisfy 0 < min_cos <= 1 and 0 <= ratio <= 1"
        )


def _stack(vectors: Sequence[torch.Tensor], length: int, label: str) -> torch.Tensor:
    """The fingerprints as rows of one float64 matrix, checking they are comparable."""
    for index, vector in enumerate(vectors):
        if vector.dim() != 1 or vector.numel() != length:
            raise ValueError(
                f"{label} fingerprint {index} has shape {tuple(vector.shape)}, but fingerprints "
                f"must be 1-D with {length} elements (made with the same blocks and block_len)"
            )
    if not vectors:
        return torch.zeros(0, length, dtype=torch.float64)
    return torch.stack([v.detach().to(device="cpu", dtype=torch.float64) for v in vectors])


def _normalise(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length rows (usable ones) and the mask of usable rows (finite and non-zero)."""
    norms = torch.linalg.vector_norm(rows, dim=1)
    usable = torch.isfinite(norms) & (norms > 0)
    units = torch.where(
        usable.unsqueeze(1), rows / torch.where(usable, norms, 1.0).unsqueeze(1), 0.0
    )
    return units, usable


def _threshold(pairwise: torch.Tensor, min_cos: float, ratio: float) -> float:
    """The copy threshold from the usable fingerprints' cosine matrix (see copy_threshold)."""
    count = pairwise.shape[0]
    if count < 3:
        return min_cos
    upper = torch.triu_indices(count, count, offset=1)
    pairs = pairwise[upper[0], upper[1]].sort().values
    middle = pairs.numel() // 2
    median = float(pairs[middle] if pairs.numel() % 2 else (pairs[middle - 1] + pairs[middle]) / 2)
    adaptive = min(1.0 - ratio * (1.0 - median), MAX_ADAPTIVE_THRESHOLD)
    return max(min_cos, adaptive)
