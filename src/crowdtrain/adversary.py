"""Attack behaviours of untrusted volunteers, as pure deterministic transformations.

The swarm, the networked volunteer client, the tests and the benchmarks all attack through this
one module, so a defence measured in the simulator is measured against the same bytes a
malicious client would send. An `Attacker` takes the pseudo-gradient Δ it trained honestly (with
its batches passed through `Attacker.poison` first) and what its coalition can see of the round
(`RoundView`), and returns a `Forgery`: the Δ and the `Claim` (samples, tokens, steps, loss) it
reports. `encode_forgery` turns that into a payload of the run's codec, including payloads that
decode to NaN/Inf, which the honest encoder refuses to write. Randomness comes from a generator
seeded by (attack, seed, peer, round), so the same seed always gives the same forgery.

The attacks and where they come from:

- ``sign_flip`` (−Δ), ``noise`` (Gaussian, ‖noise‖ = 100‖Δ‖) and ``nan`` (non-finite values):
  the classic Byzantine baselines of Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent" (NeurIPS; Krum), and Karimireddy, He, Jaggi 2021,
  "Learning from History for Byzantine Robust Optimization" (ICML, arXiv:2012.10333; bit flip).
- ``scale100`` / ``scale1000`` (100Δ, 1000Δ): the boosted update of model replacement,
  Bagdasaryan et al. 2020, "How To Backdoor Federated Learning" (AISTATS, arXiv:1807.00459).
- ``alie``: Baruch, Baruch, Goldberg 2019, "A Little Is Enough: Circumventing Defenses For
  Distributed Learning" (NeurIPS, arXiv:1902.06156). Every coordinate is μ − z·σ of the honest
  deltas, with s = ⌊n/2 + 1⌋ − m and z = Φ⁻¹((n − s)/n) for n peers and m attackers.
- ``ipm0.1`` / ``ipm100``: inner-product manipulation, Xie, Koyejo, Gupta 2019, "Fall of
  Empires: Breaking Byzantine-tolerant SGD by Inner Product Manipulation" (UAI,
  arXiv:1903.03936): −ε · mean(honest Δ), ε = 0.1 or 100.
- ``poison``: label flipping (data poisoning), Tolpegin et al. 2020, "Data Poisoning Attacks
  Against Federated Learning Systems" (ESORICS, arXiv:2007.08432): train on targets mapped
  through a fixed permutation of the vocabulary and send the resulting Δ as it is.
- ``free_rider``, ``copycat``, ``stale``: free-riders that claim a full budget without doing the
  work: Lin, Du, Liu 2019, "Free-riders in Federated Learning: Attacks and Defenses"
  (arXiv:1911.12560), and Fraboni, Vidal, Lorenzi 2021, "Free-rider Attacks on Model
  Aggregation in Federated Learning" (AISTATS, arXiv:2006.11901; disguised free-riders).
  ``free_rider`` sends zeros or tiny noise, ``copycat`` a disguised copy of another peer's Δ,
  ``stale`` the Δ of its first round again and again.
- ``minmax``, ``minsum`` and ``edge``: adaptive attacks that read the honest updates and the
  public defence settings (`_adaptive`): Shejwalkar and Houmansadr 2021, "Manipulating the
  Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated Learning" (NDSS),
  and −mean(honest) just under the norm screening limit. Each colluder turns the shared
  direction by its own random spread, so they are not copies of each other.
- ``drift``: an honest Δ plus one fixed random direction, the same in every round and for
  every colluder, at half the Δ's norm: the slow, hidden push of a model-replacement or
  backdoor campaign spread over many rounds (Bhagoji et al. 2019, "Analyzing Federated
  Learning through an Adversarial Lens", ICML, arXiv:1811.12470, explicit boosting and
  stealth), which no single round's screening sees.
- ``collude``: a coalition past probation that verifies for the run: each member free-rides
  (sends the mean of the honest updates it sees plus its own spread, which only a replay can
  tell from work),
  clears its accomplices' spot-checks by uploading their own submissions as its replays, and
  frames honest peers by uploading its replay turned around: the colluding verifiers of the
  threat model (docs/SECURITY.md, "A malicious verifier").
- ``wrong_data``: an honest update trained on other data than assigned (its assigned text read
  backwards: same tokens, another distribution), the defences issue's "training on data other
  than assigned": only usefulness on the *assigned* batches and replays can tell.
- ``inflate``: an honest Δ with samples and tokens claimed ×100, aimed at sample-weighted
  averaging (FedAvg, McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", AISTATS, arXiv:1602.05629).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from statistics import NormalDist

import safetensors.torch
import torch

from crowdtrain import codec
from crowdtrain.codec import wire
from crowdtrain.config import CodecConfig
from crowdtrain.train.moments import split_base

ATTACKS: tuple[str, ...] = (
    "sign_flip",
    "scale100",
    "scale1000",
    "noise",
    "alie",
    "ipm0.1",
    "ipm100",
    "poison",
    "free_rider",
    "copycat",
    "stale",
    "nan",
    "inflate",
    "minmax",
    "minsum",
    "edge",
    "drift",
    "collude",
    "wrong_data",
)

#: ‖noise‖ / ‖Δ‖ of the `noise` attack.
NOISE_RATIO = 100.0
#: Per-element standard deviation of the `free_rider`'s random Δ in odd rounds.
FREE_RIDER_STD = 1e-6
#: The `copycat` rescales its victim by a factor drawn uniformly from this range ...
COPYCAT_SCALE = (0.9, 1.1)
#: ... and adds Gaussian noise with this norm relative to the victim's.
COPYCAT_NOISE = 0.01
#: The `inflate` attack multiplies the claimed samples and tokens by this.
INFLATE_FACTOR = 100

#: How far each adaptive colluder (`minmax`, `minsum`, `edge`) turns its direction from the
#: coalition's shared one, so that copy detection does not see them as copies of each other
#: (relative norm of a random direction added before normalising: pairwise cosine ≈ 0.94).
ADAPTIVE_SPREAD = 0.25
#: `edge` sends −mean(honest) at this multiple of the honest peers' median norm: just under
#: the default norm screening limit of 4 (`defence.norm_high`, public in the manifest).
EDGE_RATIO = 3.6
#: `drift` adds to its honest Δ one fixed direction (the same every round, shared by the
#: coalition) of this norm relative to its Δ: a slow push that no single round shows.
DRIFT_RATIO = 0.5
_SCALES = {"scale100": 100.0, "scale1000": 1000.0}
_IPM_EPSILON = {"ipm0.1": 0.1, "ipm100": 100.0}

Delta = dict[str, torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Claim:
    """What a volunteer reports next to its payload."""

    samples: int
    tokens: int
    steps: int
    train_loss: float


@dataclass(frozen=True)
class RoundView:
    """What the attacker coalition can see in one round."""

    round: int
    peers: int  # n: total peers in the round (honest + attackers)
    attackers: int  # m: colluding attackers in the round
    #: honest deltas the coalition sees this round (all of them in the swarm: omniscient)
    honest: Sequence[Mapping[str, torch.Tensor]] = field(default=())
    #: deltas other peers already submitted this round, in order (for copycat)
    others: Sequence[Mapping[str, torch.Tensor]] = field(default=())
    #: the coalition's peer ids, and what each of them submitted in this round (a colluding
    #: verifier's side channel; empty for a networked attacker, which has none)
    coalition: frozenset[str] = frozenset()
    accomplices: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.round < 0:
            raise ValueError(f"RoundView.round must be >= 0, got {self.round}")
        if not 0 <= self.attackers <= self.peers:
            raise ValueError(
                f"RoundView needs 0 <= attackers <= peers, got {self.attackers} attackers "
                f"among {self.peers} peers"
            )


@dataclass(frozen=True)
class Forgery:
    """An attacker's upload before encoding: the Δ (NaN/Inf allowed) and the claim."""

    delta: dict[str, torch.Tensor]
    claim: Claim


def alie_z(peers: int, attackers: int) -> float:
    """ALIE's z for n peers of which m attack: s = ⌊n/2 + 1⌋ − m, z = Φ⁻¹((n − s)/n).

    s is the number of honest peers the attackers must win over for a majority; it is clamped
    to [1, n − 1] so that z stays finite when m is at least half of n (outside the paper's
    assumptions).
    """
    if peers < 2:
        raise ValueError(f"ALIE needs at least 2 peers in the round, got {peers}")
    if not 0 <= attackers <= peers:
        raise ValueError(f"ALIE needs 0 <= attackers <= peers, got {attackers} of {peers}")
    s = min(max(peers // 2 + 1 - attackers, 1), peers - 1)
    return NormalDist().inv_cdf((peers - s) / peers)


def target_permutation(seed: int, vocab_size: int) -> torch.Tensor:
    """The `poison` attack's map of targets: int64 [vocab_size], y ↦ perm[y].

    It is one cycle through the vocabulary in a random order (seeded), so it is a permutation
    with no fixed point: every target is changed. It depends on the seed only, so a coalition
    of poisoners that shares a seed flips targets the same way.
    """
    if vocab_size < 2:
        raise ValueError(f"poisoning needs a vocabulary of at least 2 tokens, got {vocab_size}")
    order = torch.randperm(vocab_size, generator=_generator("poison", seed, "", 0))
    perm = torch.empty(vocab_size, dtype=torch.int64)
    perm[order] = order.roll(-1)
    return perm


class Attacker:
    """One attacking volunteer; keeps its own state (e.g. the old delta for `stale`).

    Drivers call `poison` on the batches before training, train, then call `forge` with the
    honest Δ and claim and encode the result with `encode_forgery`. When `trains` is False the
    honest Δ is never used beyond its names, shapes and dtypes, so a driver may pass zeros
    instead of training. `needs_honest` asks the driver to fill `RoundView.honest`;
    `needs_others` to fill `RoundView.others`.
    """

    def __init__(self, name: str, peer_id: str, seed: int) -> None:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; the attacks are {', '.join(ATTACKS)}")
        self.name = name
        self.peer_id = peer_id
        self.seed = seed
        self.needs_honest = name in ("alie", "minmax", "minsum", "edge", "collude", *_IPM_EPSILON)
        self.needs_others = name == "copycat"
        self.trains = name not in ("free_rider", "collude")
        #: whether it lies when it verifies (`forge_replay`)
        self.lies_as_verifier = name == "collude"
        self._kept: tuple[int, Delta] | None = None

    def __repr__(self) -> str:
        return f"Attacker({self.name!r}, {self.peer_id!r}, seed={self.seed})"

    def poison(self, batches: Iterator[Batch], vocab_size: int) -> Iterator[Batch]:
        """The batches to train on: unchanged, except for `poison`, which maps every target
        y through `target_permutation(seed, vocab_size)` and leaves the inputs x as they are,
        and `wrong_data`, which trains on other text than it was assigned: each sequence read
        backwards (the same tokens, another distribution)."""
        if self.name == "wrong_data":
            return _reversed(batches)
        if self.name != "poison":
            return batches
        return _relabel(batches, target_permutation(self.seed, vocab_size))

    def forge(self, honest: Mapping[str, torch.Tensor], claim: Claim, view: RoundView) -> Forgery:
        """The upload of this attacker in `view.round`, from its own honestly trained Δ.

        The forged Δ has the names, shapes, dtypes and devices of `honest` and never shares
        memory with any input; the claim is `claim`, except for `inflate`.
        """
        delta = self._delta(honest, view)
        if self.name == "inflate":
            claim = replace(
                claim,
                samples=claim.samples * INFLATE_FACTOR,
                tokens=claim.tokens * INFLATE_FACTOR,
            )
        return Forgery(delta=delta, claim=claim)

    def forge_replay(
        self, target: str, replay: Mapping[str, torch.Tensor], view: RoundView
    ) -> Delta:
        """What a colluding verifier uploads as its replay of TARGET's work: the accomplice's
        own submission when TARGET is in the coalition and the side channel has it (the check
        passes), else its honest replay turned around (a mismatch: it frames an honest peer).
        An honest verifier's replay comes back unchanged."""
        if not self.lies_as_verifier:
            return _clone(replay)
        if target in view.coalition:
            submitted = view.accomplices.get(target)
            return _clone(replay) if submitted is None else _like(submitted, replay, "accomplice")
        return {k: -t.detach() for k, t in replay.items()}

    def _rng(self, view: RoundView) -> torch.Generator:
        return _generator(self.name, self.seed, self.peer_id, view.round)

    def _delta(self, honest: Mapping[str, torch.Tensor], view: RoundView) -> Delta:
        name = self.name
        if name == "sign_flip":
            return {k: -t.detach() for k, t in honest.items()}
        if name in _SCALES:
            return {k: t.detach() * _SCALES[name] for k, t in honest.items()}
        if name == "noise":
            noise = _gaussian(honest, self._rng(view))
            return _scaled_to(noise, NOISE_RATIO * _norm(honest))
        if name == "alie":
            return _alie(honest, view)
        if name in _IPM_EPSILON:
            reference = view.honest or [honest]
            mean = _mean(reference, honest, "RoundView.honest")
            return {k: t * -_IPM_EPSILON[name] for k, t in mean.items()}
        if name == "free_rider":
            if view.round % 2 == 0:
                return {k: torch.zeros_like(t) for k, t in honest.items()}
            return {k: t * FREE_RIDER_STD for k, t in _gaussian(honest, self._rng(view)).items()}
        if name == "copycat":
            return self._copy(honest, view)
        if name == "stale":
            if self._kept is None:
                self._kept = (view.round, _clone(honest))
            kept_round, kept = self._kept
            return _clone(kept if view.round > kept_round else honest)
        if name == "collude":  # the honest mean, turned by its own spread (not a copy)
            if not view.honest:
                return _clone(honest)
            mean = _mean(view.honest, honest, "RoundView.honest")
            spread = _scaled_to(_gaussian(honest, self._rng(view)), ADAPTIVE_SPREAD * _norm(mean))
            return {k: mean[k] + spread[k] for k in honest}
        if name == "drift":
            direction = _gaussian(honest, _generator("drift", self.seed, "", 0))
            push = _scaled_to(direction, DRIFT_RATIO * _norm(honest))
            return {k: honest[k].detach() + push[k] for k in honest}
        if name in ("minmax", "minsum", "edge"):
            return _adaptive(name, honest, view, self._rng(view))
        if name == "nan":
            return _with_nonfinite(honest)
        return _clone(honest)  # poison (Δ of poisoned training) and inflate (honest Δ)

    def _copy(self, honest: Mapping[str, torch.Tensor], view: RoundView) -> Delta:
        """The last delta of `view.others`, times U(0.9, 1.1), plus noise of 1% of its norm."""
        if not view.others:
            return _clone(honest)
        victim = _like(view.others[-1], honest, "the copied delta in RoundView.others")
        rng = self._rng(view)
        low, high = COPYCAT_SCALE
        factor = low + (high - low) * float(torch.rand((), generator=rng, dtype=torch.float64))
        noise = _scaled_to(_gaussian(honest, rng), COPYCAT_NOISE * _norm(victim))
        return {k: victim[k] * factor + noise[k] for k in honest}


def idle_start(
    base: Mapping[str, torch.Tensor], *, max_steps: int, batch_size: int, context: int
) -> tuple[dict[str, torch.Tensor], Claim]:
    """What an attacker that does not train (`Attacker.trains` is False) forges from: a zero
    Δ shaped like the weights, and a claim of the work order's whole step budget."""
    samples = max_steps * batch_size
    zeros = {name: torch.zeros_like(t) for name, t in split_base(base)[0].items()}
    return zeros, Claim(samples, samples * context, max_steps, 2.0)


def encode_forgery(
    forgery: Forgery, codec_cfg: CodecConfig, residual: dict[str, torch.Tensor] | None = None
) -> bytes:
    """The payload a malicious client would upload for `forgery`, in the run's codec.

    A finite Δ is simply `codec.encode(delta, codec_cfg, residual)`. For a Δ holding NaN/Inf
    (which `codec.encode` refuses), the finite part (non-finite entries set to 0) is encoded,
    updating `residual` as usual, then the wire tensor behind each non-finite entry is
    overwritten so that it decodes to NaN/Inf: the value itself (fp32, fp16, bf16), the scale
    of its block (int8, int4) or both levels of its chunk (topk2bit). The header and digest are
    rewritten to match, so the result is a well-formed payload that only the value checks of
    `codec.validate` / `codec.decode` reject (with `codec.PayloadError`).
    """
    bad = {k: ~torch.isfinite(t.detach()) for k, t in forgery.delta.items()}
    if not any(bool(mask.any()) for mask in bad.values()):
        return codec.encode(forgery.delta, codec_cfg, residual=residual)
    finite = {
        k: torch.nan_to_num(t.detach(), nan=0.0, posinf=0.0, neginf=0.0)
        for k, t in forgery.delta.items()
    }
    blob = codec.encode(finite, codec_cfg, residual=residual)
    header = codec.read_header(blob)
    tensors: dict[str, torch.Tensor] = safetensors.torch.load(blob)
    for name, mask in bad.items():
        index = torch.nonzero(mask.to("cpu").reshape(-1)).flatten()
        if index.numel():
            values = forgery.delta[name].detach().to("cpu", torch.float32).reshape(-1)[index]
            _corrupt(tensors, name, header, index, values)
    core = wire.metadata_core(header.codec, header.params, header.shapes)
    digest = wire.compute_digest(core, ((n, _bytes_of(tensors[n])) for n in sorted(tensors)))
    text = wire.metadata_text(core, digest)
    return bytes(safetensors.torch.save(tensors, metadata={wire.METADATA_KEY: text}))


def _corrupt(
    tensors: dict[str, torch.Tensor],
    name: str,
    header: codec.PayloadHeader,
    index: torch.Tensor,
    values: torch.Tensor,
) -> None:
    """Overwrite the wire values that elements `index` of parameter `name` decode from."""
    if header.codec in ("fp32", "fp16", "bf16"):
        v = tensors[wire.tensor_name(name, "v")]
        v[index] = values.to(v.dtype)
    elif header.codec in ("int8", "int4"):
        scale = tensors[wire.tensor_name(name, "scale")]
        scale[index // header.params["block_size"]] = values.abs()
    elif header.codec == "topk2bit":
        levels = tensors[wire.tensor_name(name, "levels")]
        chunk = index // header.params["chunk_size"]
        levels[2 * chunk] = values.abs()
        levels[2 * chunk + 1] = values.abs()
    else:  # pragma: no cover - every codec of the registry is handled above
        raise ValueError(f"cannot forge a non-finite payload for codec {header.codec!r}")


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A 1-D CPU tensor's raw (little-endian) bytes, as the digest reads them."""
    return t.contiguous().view(torch.uint8).numpy().data


def _reversed(batches: Iterator[Batch]) -> Iterator[Batch]:
    """Each window read backwards: x and y (x shifted by one) rebuilt from the reversed text."""
    for x, y in batches:
        text = torch.cat([x[:, :1], y], dim=1).flip(dims=[1])
        yield text[:, :-1].contiguous(), text[:, 1:].contiguous()


def _relabel(batches: Iterator[Batch], perm: torch.Tensor) -> Iterator[Batch]:
    for x, y in batches:
        yield x, perm.to(y.device)[y].to(y.dtype)


def _generator(attack: str, seed: int, peer_id: str, round: int) -> torch.Generator:
    """A CPU generator seeded from (attack, seed, peer, round), the same on every platform."""
    key = f"crowdtrain-adversary|{attack}|{seed}|{peer_id}|{round}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _clone(delta: Mapping[str, torch.Tensor]) -> Delta:
    return {k: t.detach().clone(memory_format=torch.contiguous_format) for k, t in delta.items()}


def _norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of all tensors together, accumulated in float64."""
    squares = sum(
        float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) ** 2
        for t in delta.values()
    )
    return math.sqrt(squares)


def _gaussian(like: Mapping[str, torch.Tensor], rng: torch.Generator) -> Delta:
    """Standard normal tensors shaped like `like` (drawn in name order, on the CPU, float32)."""
    return {
        k: torch.randn(like[k].shape, generator=rng, dtype=torch.float32).to(
            like[k].device, like[k].dtype
        )
        for k in sorted(like)
    }


def _scaled_to(delta: Delta, norm: float) -> Delta:
    """`delta` rescaled to the given total norm (zeros when either norm is 0)."""
    current = _norm(delta)
    factor = norm / current if current > 0 else 0.0
    return {k: t * factor for k, t in delta.items()}


def _like(
    delta: Mapping[str, torch.Tensor], honest: Mapping[str, torch.Tensor], what: str
) -> Delta:
    """`delta` checked to have the names and shapes of `honest`, cast to its dtypes/devices."""
    if set(delta) != set(honest):
        raise ValueError(f"{what} has different parameter names than the attacker's own delta")
    for k, t in honest.items():
        if delta[k].shape != t.shape:
            raise ValueError(
                f"{what} gives {k!r} the shape {tuple(delta[k].shape)} where the attacker's "
                f"own delta has {tuple(t.shape)}"
            )
    return {k: delta[k].detach().to(honest[k].device, honest[k].dtype) for k in honest}


def _mean(
    deltas: Sequence[Mapping[str, torch.Tensor]], honest: Mapping[str, torch.Tensor], what: str
) -> Delta:
    """The coordinate-wise mean of `deltas` (each checked against `honest`)."""
    checked = [_like(d, honest, what) for d in deltas]
    return {k: torch.stack([d[k] for d in checked]).mean(dim=0) for k in honest}


def _alie(honest: Mapping[str, torch.Tensor], view: RoundView) -> Delta:
    """μ − z·σ per coordinate over `view.honest` (σ with Bessel's correction); own Δ when the
    coalition sees fewer than two honest deltas."""
    if len(view.honest) < 2:
        return _clone(honest)
    z = alie_z(view.peers, view.attackers)
    checked = [_like(d, honest, "RoundView.honest") for d in view.honest]
    out: Delta = {}
    for k in honest:
        sigma, mu = torch.std_mean(torch.stack([d[k] for d in checked]), dim=0, correction=1)
        out[k] = mu - z * sigma
    return out


def _adaptive(
    name: str, honest: Mapping[str, torch.Tensor], view: RoundView, rng: torch.Generator
) -> Delta:
    """The attacks that adapt to the defence (Shejwalkar and Houmansadr 2021, "Manipulating the
    Byzantine: Optimizing Model Poisoning Attacks and Defenses for Federated Learning", NDSS):
    μ + γ·p, with μ the honest mean and p the inverse unit vector −μ/‖μ‖ turned by this
    attacker's own random spread. `minmax`: the largest γ whose distance to every honest Δ is
    at most the largest distance between two honest Δs; `minsum`: the largest γ whose summed
    squared distances to the honest Δs are at most the largest such sum of an honest Δ (both
    in closed form: the distances are quadratic in γ). `edge`: γ puts the whole update at
    EDGE_RATIO × the honest median norm, just inside norm screening. Own Δ when the coalition
    sees fewer than two honest deltas."""
    if len(view.honest) < 2:
        return _clone(honest)
    names = list(honest)
    checked = [_like(d, honest, "RoundView.honest") for d in view.honest]
    flat = torch.stack(
        [torch.cat([d[k].detach().reshape(-1).cpu().double() for k in names]) for d in checked]
    )
    mu = flat.mean(dim=0)
    spread = torch.randn(mu.shape, generator=rng, dtype=torch.float64)
    p = -mu / mu.norm().clamp_min(1e-30) + ADAPTIVE_SPREAD * spread / spread.norm()
    p = p / p.norm()
    if name == "edge":
        median = float(flat.norm(dim=1).median())
        out = p * (EDGE_RATIO * median)
    else:
        dev = mu - flat  # n × P
        a = (dev * dev).sum(dim=1)  # ‖μ − h_i‖²
        b = dev @ p  # ⟨μ − h_i, p⟩; ‖μ + γp − h_i‖² = a_i + 2γb_i + γ²
        d2 = torch.cdist(flat, flat).square()
        if name == "minmax":
            gamma = float((-b + (b * b - (a - d2.max())).clamp_min(0).sqrt()).min())
        else:  # Σ_i b_i = ⟨Σ(μ − h_i), p⟩ = 0, so the sum is Σa_i + nγ²
            gamma = math.sqrt(max(0.0, float(d2.sum(dim=1).max() - a.sum()) / len(checked)))
        out = mu + max(0.0, gamma) * p
    result: Delta = {}
    offset = 0
    for k in names:
        t = honest[k]
        n = t.numel()
        result[k] = out[offset : offset + n].reshape(t.shape).to(t.dtype).to(t.device)
        offset += n
    return result


def _with_nonfinite(honest: Mapping[str, torch.Tensor]) -> Delta:
    """The honest Δ with one tensor's first element NaN and another's +Inf (in name order);
    with a single non-empty tensor, its first two elements."""
    out = _clone(honest)
    flats = [out[k].view(-1) for k in sorted(out) if out[k].numel() > 0]
    if not flats:
        raise ValueError("the nan attack needs a delta with at least one element")
    targets = [(flats[0], 0), (flats[1], 0)] if len(flats) > 1 else [(flats[0], 0), (flats[0], 1)]
    for (flat, i), value in zip(targets, (math.nan, math.inf), strict=True):
        if i < flat.numel():
            flat[i] = value
    return out
