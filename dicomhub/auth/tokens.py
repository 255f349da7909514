"""Bearer token verification: the issuer's keys from OpenID discovery, checked by PyJWT.

Only asymmetric algorithms are accepted, so a token "signed" with ``none`` or with an HMAC keyed by the issuer's
public key never verifies. Keys are cached; a token naming an unknown ``kid`` triggers a refetch, at most one per
``refetch_interval`` seconds, so a key rotated at the issuer is picked up without a restart and a flood of forged
kids cannot turn into a flood of requests to the issuer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

log = logging.getLogger("dicomhub.auth")

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
FETCH_TIMEOUT_SECONDS = 5.0


class TokenRejected(Exception):
    """The token is not acceptable (a 401 with ``error="invalid_token"``); the message says why."""


class ProviderUnavailable(Exception):
    """The issuer's keys have never been fetched, so no token can be checked yet (a 503)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("The authentication provider is unavailable.")
        self.retry_after = retry_after


@dataclass(frozen=True)
class IssuerKeys:
    issuer: str
    keys: dict[str | None, dict[str, Any]]  # kid -> JWK (public keys for signatures only)


class TokenVerifier:
    """Checks bearer tokens against one issuer and a set of accepted audiences."""

    def __init__(self, authority: str, audiences: Sequence[str], leeway: float, refetch_interval: float) -> None:
        self.discovery_url = authority.rstrip("/") + "/.well-known/openid-configuration"
        self.audiences = list(audiences)
        self.leeway = leeway
        self.refetch_interval = refetch_interval
        self._keys: IssuerKeys | None = None
        self._last_fetch = -math.inf
        self._lock: asyncio.Lock | None = None

    async def refresh(self) -> None:
        """Fetches the discovery document and the key set, unless a fetch was tried less than an interval ago.

        Never raises: a provider that is down leaves the keys already known in place.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if time.monotonic() - self._last_fetch < self.refetch_interval:
                return
            self._last_fetch = time.monotonic()
            try:
                self._keys = await self._fetch()
            except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
                log.warning("token issuer keys not fetched", extra={"url": self.discovery_url, "error": str(exc)})

    async def _fetch(self) -> IssuerKeys:
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS) as client:
            discovery = (await client.get(self.discovery_url)).raise_for_status().json()
            key_set = (await client.get(discovery["jwks_uri"])).raise_for_status().json()
        keys = {
            key.get("kid"): key
            for key in key_set["keys"]
            if key.get("kty") in ("RSA", "EC", "OKP") and key.get("use", "sig") == "sig"
        }
        log.info("token issuer keys fetched", extra={"issuer": discovery["issuer"], "kids": sorted(map(str, keys))})
        return IssuerKeys(issuer=discovery["issuer"], keys=keys)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._last_fetch + self.refetch_interval - time.monotonic()))

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or ``TokenRejected`` / ``ProviderUnavailable``."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("The token is malformed.") from None
        algorithm = header.get("alg")
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            raise TokenRejected("The token's signing algorithm is not accepted.")
        kid = header.get("kid")
        if self._keys is None or kid not in self._keys.keys:
            await self.refresh()
        if self._keys is None:
            raise ProviderUnavailable(self._retry_after())
        jwk = self._keys.keys.get(kid)
        if jwk is None:
            raise TokenRejected("The token's signing key is unknown.")
        if jwk.get("alg", algorithm) != algorithm:
            raise TokenRejected("The token's signing algorithm does not match its key.")
        try:
            return jwt.decode(
                token,
                key=jwt.PyJWK(jwk, algorithm),
                algorithms=[algorithm],
                audience=self.audiences,
                issuer=self._keys.issuer,
                leeway=self.leeway,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("The token is not valid yet.") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("The token is for another audience.") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("The token is from another issuer.") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(f"The token has no '{exc.claim}' claim.") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("The token's signature is invalid.") from None
        except jwt.PyJWTError:
            raise TokenRejected("The token is invalid.") from None
