"""The door of a run: who may register, and how fast (docs/SECURITY.md, "Sybils at the door").

No defence inside the protocol can tell a thousand identities of one person from a thousand
volunteers (Douceur 2002, "The Sybil Attack"): an open run can only make each new identity
cost something, and cap what newcomers hold once admitted (``defence.probation_share``). The
costs here, each optional and combinable, checked in this order:

- **per-address rate limit** (token bucket: `address_burst` at once, `address_per_hour`
  after; an IPv6 address counts by its /`ipv6_prefix`, since one host gets a whole /64).
  Every attempt counts, refused ones too (it also bounds guessing invite keys);
- **invite key** (one shared secret, as before); a registration with the *seed* invite key
  (`seed_invite`, the organizer's own machines) passes the invite check and starts
  established (`PeerJoined.seed`);
- **proof of work** (hashcash, ``crowdtrain.hashcash``): `pow_bits` zero bits of a
  challenge the coordinator signed (HMAC) and that expires; each challenge admits once;
- **identity-provider token**: a JWT (RFC 7519) signed by a provider the organizer trusts
  (its public key, issuer and audience); one peer per subject, so an account is one identity,
  a banned account stays banned, and re-registering with the same subject re-issues the token;
- **global rate limit** on identities admitted (`global_burst`, `global_per_minute`), taken
  only by a registration that passed everything else, so a flood of bad attempts cannot use
  up the honest volunteers' share.

A refused attempt gets 401 (invite, proof of work, identity) or 429 with `Retry-After`. The
state is bounded: the address table keeps at most `max_addresses` entries (the least recently
used is dropped: dropping gives that address a full bucket, so the bound is set far above any
honest population), and spent challenges are kept only until they expire.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from crowdtrain import hashcash


def name_is_printable(name: str) -> bool:
    """Whether a display name is visible text: not blank, and no control, format, private-use
    or unassigned characters (which could hide one name inside another on the leaderboard)."""
    bad = {"Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp"}
    return bool(name.strip()) and not any(unicodedata.category(ch) in bad for ch in name)


class AdmissionRefused(Exception):
    """A registration the door refuses: HTTP status, machine code, one sentence, and for
    429 the seconds after which to try again."""

    def __init__(self, status: int, code: str, detail: str, retry_after: float | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.retry_after = status, code, detail, retry_after


class AdmissionConfig(BaseModel):
    """How a coordinator admits new volunteers (`crowdtrain serve` options; not in the run
    config, so changing them does not change the manifest volunteers have pinned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address_burst: int = Field(32, ge=0, le=1_000_000)  # 0: no per-address limit
    address_per_hour: float = Field(60.0, ge=0.0, le=1e6)
    ipv6_prefix: int = Field(64, ge=16, le=128)
    global_burst: int = Field(200, ge=0, le=10_000_000)  # 0: no global limit
    global_per_minute: float = Field(120.0, ge=0.0, le=1e7)
    max_addresses: int = Field(100_000, ge=1, le=10_000_000)
    pow_bits: int = Field(0, ge=0, le=hashcash.MAX_BITS)
    challenge_ttl_s: float = Field(600.0, gt=0.0, le=86_400.0)
    invite: str | None = Field(None, min_length=1, max_length=256)
    # Volunteers who register with this key are seed volunteers (the organizer vouches for
    # them): established from the start, so sybils cannot outvote them in the first rounds.
    seed_invite: str | None = Field(None, min_length=16, max_length=256)
    identity_key: Path | None = None  # PEM public key of the identity provider
    identity_issuer: str | None = None
    identity_audience: str | None = None
    identity_algorithms: tuple[str, ...] = ("RS256", "ES256", "EdDSA")

    @model_validator(mode="after")
    def _identity_complete(self) -> AdmissionConfig:
        parts = (self.identity_key, self.identity_issuer, self.identity_audience)
        if any(p is not None for p in parts) and not all(p is not None for p in parts):
            raise ValueError(
                "an identity provider needs its public key, issuer and audience together"
            )
        if "none" in {a.lower() for a in self.identity_algorithms} or any(
            a.upper().startswith("HS") for a in self.identity_algorithms
        ):
            raise ValueError("identity tokens must be signed with a public-key algorithm")
        return self

    def describe(self) -> str:
        """One line for the coordinator's start-up log."""
        parts = []
        if self.address_burst:
            parts.append(f"{self.address_burst} then {self.address_per_hour:g}/hour per address")
        if self.global_burst:
            parts.append(f"{self.global_burst} then {self.global_per_minute:g}/minute in all")
        if self.invite is not None:
            parts.append("invite key")
        if self.seed_invite is not None:
            parts.append("seed invite key")
        if self.pow_bits:
            parts.append(f"proof of work ({self.pow_bits} bits)")
        if self.identity_key is not None:
            parts.append(f"identity tokens from {self.identity_issuer}")
        return "registration: " + (", ".join(parts) if parts else "open, no limits")


@dataclass
class RateLimiter:
    """Token buckets by key: `burst` at once, refilled at `per_s`; at most `max_keys` kept."""

    burst: float
    per_s: float
    max_keys: int = 100_000
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def wait(self, key: str, now: float) -> float:
        """Seconds until `key` has a token (0: it has one now); takes nothing."""
        tokens = self._level(key, now)
        if tokens >= 1.0:
            return 0.0
        return math.inf if self.per_s <= 0 else (1.0 - tokens) / self.per_s

    def take(self, key: str, now: float) -> float:
        """Take a token for `key` and return 0, or return the seconds until one is there."""
        if wait := self.wait(key, now):
            return wait
        self._buckets[key] = (self._level(key, now) - 1.0, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0

    def _level(self, key: str, now: float) -> float:
        """The tokens `key` has at NOW (a bucket it never used is full)."""
        tokens, at = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - at) * self.per_s)

    def __len__(self) -> int:
        return len(self._buckets)


def address_key(host: str | None, ipv6_prefix: int) -> str:
    """The rate-limit key of a client address: the IPv4 address, or its IPv6 network."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/{ipv6_prefix}", strict=False))
    return str(ip)


class Challenges:
    """Proof-of-work challenges the coordinator signs, that expire and admit once each.

    A challenge is "<expiry>.<bits>.<random>.<hmac>": nothing is stored when one is issued;
    a solved one is remembered until its expiry, so it cannot be spent twice.
    """

    def __init__(self, secret: bytes, bits: int, ttl_s: float) -> None:
        self._secret, self.bits, self.ttl_s = secret, bits, ttl_s
        self._spent: dict[str, float] = {}

    def _mac(self, body: str) -> str:
        return hmac.new(self._secret, body.encode(), hashlib.sha256).hexdigest()[:32]

    def issue(self, now: float) -> dict[str, Any]:
        body = f"{int(now + self.ttl_s)}.{self.bits}.{secrets.token_hex(16)}"
        return {
            "challenge": f"{body}.{self._mac(body)}",
            "bits": self.bits,
            "expires_in": self.ttl_s,
        }

    def spend(self, challenge: str, nonce: str, now: float) -> None:
        """Accept a solved challenge once, or raise AdmissionRefused."""
        parts = challenge.split(".")
        if len(parts) != 4 or not hmac.compare_digest(self._mac(".".join(parts[:3])), parts[3]):
            raise AdmissionRefused(401, "bad_pow", "the proof-of-work challenge is not this run's")
        try:
            expiry, bits = int(parts[0]), int(parts[1])
        except ValueError:
            raise AdmissionRefused(401, "bad_pow", "the challenge is malformed") from None
        if expiry < now:
            raise AdmissionRefused(401, "pow_expired", "the challenge expired; ask for a new one")
        if bits < self.bits:
            raise AdmissionRefused(401, "bad_pow", "the challenge is below this run's difficulty")
        for key in [k for k, t in self._spent.items() if t < now]:
            del self._spent[key]
        if challenge in self._spent:
            raise AdmissionRefused(401, "pow_spent", "this challenge already admitted a peer")
        if not hashcash.check(challenge, nonce, bits):
            raise AdmissionRefused(401, "bad_pow", "the nonce does not solve the challenge")
        self._spent[challenge] = float(expiry)


class IdentityProvider:
    """Checks JWTs from the identity provider the organizer trusts; returns their subject."""

    def __init__(self, config: AdmissionConfig) -> None:
        import jwt  # PyJWT, in the server extra

        assert config.identity_key is not None
        try:
            pem = config.identity_key.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read the identity provider's key: {exc}") from None
        self._jwt = jwt
        self._key = pem
        self._issuer = config.identity_issuer
        self._audience = config.identity_audience
        self._algorithms = list(config.identity_algorithms)

    def subject(self, token: str) -> str:
        """The token's issuer-qualified subject, or AdmissionRefused(401)."""
        try:
            claims = self._jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except self._jwt.PyJWTError as exc:
            raise AdmissionRefused(
                401, "bad_identity", f"the identity token was refused ({type(exc).__name__})"
            ) from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= 255:
            raise AdmissionRefused(401, "bad_identity", "the identity token has no usable subject")
        return f"{self._issuer}#{sub}"


class Admission:
    """The door's state: rate limits, challenges and the identity provider (thread-unsafe:
    the coordinator calls it under its lock)."""

    def __init__(self, config: AdmissionConfig, secret: bytes) -> None:
        self.config = config
        self._by_address = RateLimiter(
            config.address_burst, config.address_per_hour / 3600.0, config.max_addresses
        )
        self._global = RateLimiter(config.global_burst, config.global_per_minute / 60.0, 1)
        self.challenges = Challenges(secret, config.pow_bits, config.challenge_ttl_s)
        self.identity = IdentityProvider(config) if config.identity_key is not None else None

    def check(
        self,
        host: str | None,
        now: float,
        *,
        invite: str | None,
        pow_challenge: str | None,
        pow_nonce: str | None,
        identity: str | None,
    ) -> tuple[str | None, bool]:
        """Every cost of the module's order (the global limit only looked at, so that a
        refusal after a solved proof of work does not spend it); returns the identity subject
        (None without a provider) and whether it is a seed volunteer, or raises
        AdmissionRefused. `admitted` takes the global token once the peer is created."""
        c = self.config
        if c.address_burst:
            wait = self._by_address.take(address_key(host, c.ipv6_prefix), now)
            if wait:
                raise AdmissionRefused(
                    429, "rate_limited", "too many registrations from this address", wait
                )
        if c.global_burst and (wait := self._global.wait("all", now)):
            raise AdmissionRefused(429, "busy", "the run admits no more volunteers now", wait)
        seed = (
            c.seed_invite is not None
            and invite is not None
            and secrets.compare_digest(invite, c.seed_invite)
        )
        if (
            not seed
            and c.invite is not None
            and not (invite is not None and secrets.compare_digest(invite, c.invite))
        ):
            raise AdmissionRefused(401, "bad_invite", "this run needs a valid invite key to join")
        if c.pow_bits:
            if pow_challenge is None or pow_nonce is None:
                raise AdmissionRefused(
                    401,
                    "pow_required",
                    f"this run needs a proof of work ({c.pow_bits} bits): "
                    "GET /v1/register/challenge and solve it",
                )
            self.challenges.spend(pow_challenge, pow_nonce, now)
        if self.identity is None:
            return None, seed
        if identity is None:
            raise AdmissionRefused(
                401, "identity_required", "this run admits volunteers with an identity token"
            )
        return self.identity.subject(identity), seed

    def admitted(self, now: float) -> None:
        """Count one admitted identity against the run's rate (`check` saw a token there)."""
        if self.config.global_burst:
            self._global.take("all", now)
