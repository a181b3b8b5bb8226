"""Bearer JWT verification (pyjwt) and RFC 9728 protected resource metadata.

The tenant is decided here, from verified claims only:

    Authorization header -> one Bearer token -> unverified `iss` picks a configured issuer
    -> pyjwt verifies signature (algorithms pinned by that issuer, never the token header),
       aud, iss, exp, nbf, iat with a small leeway
    -> `tenant_claim` (dotted path) must be a string equal to a configured tenant id, byte for byte,
       or a well-formed id a tenant template serves for these claims (tenants/templates.py)
    -> TenantContext(tenant, subject, scopes, expiry, template)

Keys: HS* from the environment variable `secret_env` (refused when short, a placeholder or
guessable: hmac_secret_problem); asymmetric keys from `public_key_file`, or from `jwks_url` through
PyJWKClient (set cached; an unknown kid refetches at most once per cooldown; the last good set is
kept through an outage; fetches run off the event loop). A token verified once is not verified
again while it lives in the verified-token cache (token_cache.py).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jwt import PyJWKClient, PyJWKSet

from proxy.config import ConfigError, IssuerConfig, ProxyConfig
from proxy.layers.auth.token_cache import VerifiedTokens, token_key
from proxy.protocol.errors import BadRequest, Forbidden, InsufficientScope, Unauthenticated
from proxy.tenants.templates import NOT_SERVED, TenantResolver, claim_at
from proxy.types import JsonObject, TenantContext

MIN_HMAC_SECRET_BYTES = 32
MIN_HMAC_SECRET_BITS = 128  # the estimate (_estimated_bits) must exceed this
MIN_HMAC_SECRET_DISTINCT_CHARS = 8
HMAC_SECRET_ADVICE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"  # noqa: S105 - a command
# Words operators leave in place of a secret. The long ones count anywhere in the secret; "todo" and
# runs of x only as a word of their own (and x-runs in one case), or as 8+ x's: a generated secret
# (secrets.token_urlsafe(32)) matches any of these about once in a million, and then a fresh one will
# not. Substrings of a random secret this rare cost nothing; shorter words anywhere would.
_PLACEHOLDER = re.compile(
    r"(?i:change[-_ ]?me|replace|placeholder|secret|example|password|x{8,})"
    r"|(?<![A-Za-z0-9])(?:(?i:todo)|x{3,}|X{3,})(?![A-Za-z0-9])"
)
MAX_TOKEN_CHARS = 8192
# Header parameters that point at keys chosen by the token's author: never honoured, always refused.
_KEY_POINTING_HEADERS = frozenset({"jku", "x5u", "jwk", "x5c"})
_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$")
_KID_SHAPE = re.compile(r"^[\x21-\x7e]{1,256}$")


def metadata_url(resource_url: str) -> str:
    """RFC 9728 metadata URL for a resource, path-inserted form."""
    parts = urlsplit(resource_url)
    return f"{parts.scheme}://{parts.netloc}/.well-known/oauth-protected-resource{parts.path.rstrip('/')}"


class _ResilientJWKClient(PyJWKClient):
    """PyJWKClient that serves the last good key set while the JWKS endpoint is unreachable.

    A failed fetch counts as a fetch for the refetch cooldown, so a burst of unknown kids during an
    outage cannot turn into a burst of outbound requests.
    """

    _last_good: Any = None

    def fetch_data(self) -> Any:
        try:
            data = super().fetch_data()
        except (jwt.PyJWTError, ValueError):  # unreachable, not JSON, or no usable keys
            self._last_successful_fetch = time.monotonic()
            if self._last_good is None:
                raise
            return self._last_good
        self._last_good = data
        return data


class JwksKeys:
    """Signing keys from one issuer's JWKS; lookups never block the event loop on the network."""

    def __init__(self, issuer: IssuerConfig, on_new_key_set: Callable[[], None]) -> None:
        assert issuer.jwks_url is not None
        self._client = _ResilientJWKClient(
            issuer.jwks_url,
            cache_jwk_set=True,
            lifespan=issuer.jwks_cache_seconds,
            timeout=issuer.jwks_timeout_seconds,
            cooldown_duration=issuer.jwks_refetch_cooldown_seconds,
        )
        self._on_new_key_set = on_new_key_set
        self._lock = asyncio.Lock()

    def key_set(self) -> PyJWKSet | None:
        """The issuer's current key set (None once it has expired, until it is fetched again)."""
        cache = self._client.jwk_set_cache
        return cache.get() if cache is not None else None

    def _cached(self, kid: str) -> tuple[Any, PyJWKSet | None] | None:
        jwk_set = self.key_set()
        if jwk_set is None:
            return None
        key = next((key for key in jwk_set.keys if key.key_id == kid), None)
        return None if key is None else (key.key, jwk_set)

    async def key_for(self, kid: str) -> tuple[Any, PyJWKSet | None] | None:
        """The key with this kid and the key set holding it, or None when the JWKS has none (or
        cannot be had at all)."""
        found = self._cached(kid)
        if found is None:
            async with self._lock:  # one fetch at a time, however many requests wait for it
                found = self._cached(kid)
                if found is None:
                    found = await self._fetch(kid)
        return found

    async def _fetch(self, kid: str) -> tuple[Any, PyJWKSet | None] | None:
        cache = self._client.jwk_set_cache
        before = cache.jwk_set_with_timestamp if cache is not None else None
        try:
            key = await asyncio.to_thread(self._client.get_signing_key, kid)
        except (jwt.PyJWTError, ValueError):
            return None
        finally:
            if before is not None and cache is not None and cache.jwk_set_with_timestamp is not before:
                self._on_new_key_set()  # rotated or refetched: tokens verified by the old set go
        stored = cache.jwk_set_with_timestamp if cache is not None else None  # (expired or not)
        return key.key, stored.get_jwk_set() if stored is not None else None


def _period(text: str) -> int:
    """The length of the shortest unit `text` repeats (len(text) when it does not repeat)."""
    border = [0] * len(text)  # Knuth-Morris-Pratt prefix function: linear however long the secret
    for i in range(1, len(text)):
        k = border[i - 1]
        while k and text[i] != text[k]:
            k = border[k - 1]
        border[i] = k + 1 if text[i] == text[k] else k
    return len(text) - border[-1] if text else 0


def _bits_per_symbol(symbols: Iterable[object]) -> float:
    """Shannon entropy of the symbols' frequencies, Miller-Madow corrected for a short sample."""
    counts = Counter(symbols)
    total = sum(counts.values())
    if total == 0:
        return 0.0
    plain = -sum(n / total * math.log2(n / total) for n in counts.values())
    return plain + (len(counts) - 1) / (2 * total * math.log(2))


def _alphabet_bits(text: str) -> float:
    """log2 of the alphabet `text` seems drawn from: hex digits, or the character classes it uses."""
    if all(c in "0123456789abcdef" for c in text) or all(c in "0123456789ABCDEF" for c in text):
        return 4.0
    size = 0
    size += 10 if any(c.isdigit() for c in text) else 0
    size += 26 if any(c.islower() for c in text) else 0
    size += 26 if any(c.isupper() for c in text) else 0
    size += 33 if any(not c.isalnum() for c in text) else 0
    return math.log2(max(size, 2))


def _estimated_bits(secret: str) -> float:
    """A conservative estimate of the secret's entropy: its repeating unit's length times the least
    of the bits per character its alphabet allows, its character frequencies give, and the steps
    between neighbouring characters give (0123..., abcd... and qwqw... have few distinct steps)."""
    unit = secret[: _period(secret)]
    if len(unit) < 2:
        return 0.0
    steps = [ord(b) - ord(a) for a, b in itertools.pairwise(unit)]
    return len(unit) * min(_alphabet_bits(unit), _bits_per_symbol(unit), _bits_per_symbol(steps))


def hmac_secret_problem(secret: str) -> str | None:
    """Why `secret` must not sign or verify HS* tokens, or None when it may.

    Refused: under 32 bytes; a placeholder word (change-me, replace, placeholder, secret, example,
    password, todo, xxx); fewer than 8 distinct characters; an estimated entropy of 128 bits or
    less. secrets.token_urlsafe(32) (190 bits estimated at the least) passes, but for the rare
    placeholder word drawn by chance (see _PLACEHOLDER); so do token_urlsafe(24), token_hex(32) and
    `openssl rand -base64 32`; 32 hex digits (128 bits, half the key HS256 wants) do not.
    """
    if len(secret.encode()) < MIN_HMAC_SECRET_BYTES:
        return f"must hold a secret of at least {MIN_HMAC_SECRET_BYTES} bytes"
    advice = f"generate one, e.g. {HMAC_SECRET_ADVICE}"
    placeholder = _PLACEHOLDER.search(secret)
    if placeholder is not None:
        word = placeholder.group(0).lower()
        word = "xxx" if set(word) == {"x"} else word
        return f"holds a placeholder ({word!r}), not a secret: {advice}"
    distinct = len(set(secret))
    if distinct == 1:
        return f"holds one character repeated, not a secret: {advice}"
    if distinct < MIN_HMAC_SECRET_DISTINCT_CHARS:
        return f"holds a secret of only {distinct} distinct characters: {advice}"
    bits = _estimated_bits(secret)
    if bits <= MIN_HMAC_SECRET_BITS:
        return (
            f"holds a guessable secret (about {int(bits)} bits of entropy estimated, more than "
            f"{MIN_HMAC_SECRET_BITS} needed): {advice}"
        )
    return None


def _scopes_of(claims: Mapping[str, Any]) -> frozenset[str]:
    scope = claims.get("scope")
    if isinstance(scope, str):
        return frozenset(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list) and all(isinstance(item, str) for item in scp):
        return frozenset(scp)
    return frozenset()


class Authenticator:
    """Verifies bearer tokens against the configured issuers and resolves the tenant."""

    def __init__(
        self, config: ProxyConfig, env: Mapping[str, str] | None = None, tenants: TenantResolver | None = None
    ) -> None:
        environ = os.environ if env is None else env
        self._issuers: dict[str, IssuerConfig] = {i.issuer: i for i in config.auth.issuers}
        self._tenants = tenants if tenants is not None else TenantResolver(config)
        self._static_keys: dict[str, Any] = {}
        self._jwks: dict[str, JwksKeys] = {}
        self._verified = VerifiedTokens(config.auth.cache_seconds)
        self.resource_url = config.listen.resource_url
        # public_url is this resource's identifier (RFC 8707): every issuer's tokens may name it.
        self._audiences = {
            i.issuer: list(dict.fromkeys((*i.audiences, self.resource_url))) for i in config.auth.issuers
        }
        self.metadata_url = metadata_url(self.resource_url)
        self.metadata: JsonObject = {
            "resource": self.resource_url,
            "authorization_servers": list(config.auth.authorization_servers),
            "bearer_methods_supported": ["header"],
        }
        scopes = sorted({s for i in config.auth.issuers for s in i.required_scopes})
        if scopes:
            self.metadata["scopes_supported"] = scopes
        for index, issuer in enumerate(config.auth.issuers):
            where = f"auth.issuers.{index}"
            if issuer.secret_env is not None:
                secret = environ.get(issuer.secret_env, "")
                problem = hmac_secret_problem(secret)
                if problem is not None:
                    raise ConfigError(
                        config.source,
                        f"{where}.secret_env",
                        f"environment variable {issuer.secret_env} {problem}",
                    )
                self._static_keys[issuer.issuer] = secret.encode()
            elif issuer.public_key_file is not None:
                self._static_keys[issuer.issuer] = _load_public_key(
                    issuer.public_key_file, config.source, where
                )
            else:
                self._jwks[issuer.issuer] = JwksKeys(issuer, self._verified.clear)

    def challenge(self, error: str | None = None, description: str | None = None) -> str:
        value = f'Bearer resource_metadata="{self.metadata_url}"'
        if error:
            value += f', error="{error}"'
        if description:
            safe = description.replace("\\", "").replace('"', "'")
            value += f', error_description="{safe}"'
        return value

    def _unauthenticated(self, description: str, token_sent: bool) -> Unauthenticated:
        return Unauthenticated(
            f"Unauthorized: {description}",
            headers={
                "WWW-Authenticate": self.challenge(
                    "invalid_token" if token_sent else None, description if token_sent else None
                )
            },
        )

    def bearer_token(self, authorization: Iterable[str]) -> str:
        """The single Bearer token of a request; anything else is refused before any verification
        (its shape is checked before it is verified: a token verified before need not pass again)."""
        values = list(authorization)
        if not values:
            raise self._unauthenticated("no bearer token (send it in the Authorization header)", False)
        if len(values) > 1:
            raise BadRequest("Bad request: more than one Authorization header")
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise self._unauthenticated("the Authorization header must be 'Bearer <token>'", True)
        return token

    def _check_shape(self, token: str) -> None:
        if len(token) > MAX_TOKEN_CHARS or not _TOKEN_SHAPE.fullmatch(token):
            raise self._unauthenticated("the bearer token is not a compact JWS", True)

    async def authenticate(self, authorization: Iterable[str]) -> TenantContext:
        """The caller of a request. A token verified before (by this config) is taken from the
        verified-token cache while its entry lives and, for a JWKS issuer, while the key set that
        verified it is still the issuer's current one (an expired set is fetched again first)."""
        token = self.bearer_token(authorization)
        key = token_key(token)
        known = self._verified.get(key)
        if known is not None:
            jwks = self._jwks.get(known.caller.issuer)
            if jwks is None or (known.key_set is not None and jwks.key_set() is known.key_set):
                return known.caller
            self._verified.discard(key)
        self._check_shape(token)
        caller, leeway, key_set = await self._verify(token)
        self._verified.put(key, caller, leeway, key_set)
        return caller

    def forget_tenants(self, tenants: Collection[str]) -> None:
        """Tenants this process no longer serves (idle template tenants): their tokens are verified
        again on their next request, and nothing of theirs stays in memory meanwhile."""
        self._verified.forget_tenants(tenants)

    async def _verify(self, token: str) -> tuple[TenantContext, float, PyJWKSet | None]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise self._unauthenticated("the bearer token is malformed", True) from None
        if _KEY_POINTING_HEADERS & header.keys():
            raise self._unauthenticated("token headers jku, x5u, jwk and x5c are not accepted", True)
        issuer_name = unverified.get("iss")
        issuer = self._issuers.get(issuer_name) if isinstance(issuer_name, str) else None
        if issuer is None:
            raise self._unauthenticated("the token's issuer is not trusted", True)
        if header.get("alg") not in issuer.algorithms:
            raise self._unauthenticated("the token's algorithm is not allowed for its issuer", True)
        key = self._static_keys.get(issuer.issuer)
        key_set: PyJWKSet | None = None
        if key is None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not _KID_SHAPE.fullmatch(kid):
                raise self._unauthenticated("the token has no usable kid", True)
            found = await self._jwks[issuer.issuer].key_for(kid)
            if found is None:
                raise self._unauthenticated("no signing key matches the token's kid", True)
            key, key_set = found
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=list(issuer.algorithms),
                audience=self._audiences[issuer.issuer],
                issuer=issuer.issuer,
                leeway=issuer.leeway_seconds,
                options={"require": ["exp", "iss", "aud"], "strict_aud": False},
            )
        except jwt.ExpiredSignatureError:
            raise self._unauthenticated("the token has expired", True) from None
        except jwt.ImmatureSignatureError:
            raise self._unauthenticated("the token is not valid yet", True) from None
        except jwt.InvalidAudienceError:
            raise self._unauthenticated("the token was not issued for this resource", True) from None
        except jwt.PyJWTError as exc:
            raise self._unauthenticated(f"the token is invalid ({type(exc).__name__})", True) from None
        except (TypeError, ValueError):  # e.g. an EC token against an RSA key: pyjwt raises these
            raise self._unauthenticated("the token's algorithm does not fit the issuer's key", True) from None
        for name in ("exp", "nbf", "iat"):
            value = claims.get(name)
            if name in claims and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise self._unauthenticated(f"the token's {name} claim is not a number", True)
        return self._context(issuer, claims), issuer.leeway_seconds, key_set

    def _context(self, issuer: IssuerConfig, claims: Mapping[str, Any]) -> TenantContext:
        subject = claim_at(claims, issuer.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise self._unauthenticated(f"the token has no {issuer.subject_claim!r} claim", True)
        try:
            subject.encode("utf-8")  # a JSON \ud800 escape decodes to a lone surrogate: not text
        except UnicodeEncodeError:
            raise self._unauthenticated(
                f"the token's {issuer.subject_claim!r} claim is not valid text", True
            ) from None
        tenant = claim_at(claims, issuer.tenant_claim)
        served = self._tenants.resolve(tenant, claims) if isinstance(tenant, str) else None
        if served is None:
            raise Forbidden(NOT_SERVED)
        scopes = _scopes_of(claims)
        missing = [scope for scope in issuer.required_scopes if scope not in scopes]
        if missing:
            raise InsufficientScope(
                "Forbidden: the token lacks a required scope",
                headers={
                    "WWW-Authenticate": self.challenge("insufficient_scope")
                    + f', scope="{" ".join(issuer.required_scopes)}"'
                },
            )
        return TenantContext(
            tenant=tenant,
            subject=subject,
            issuer=issuer.issuer,
            scopes=scopes,
            expires_at=float(claims["exp"]),
            template=served[1],
        )


def _load_public_key(path: Path, source: str, where: str) -> Any:
    try:
        return load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            source, f"{where}.public_key_file", f"cannot load a PEM public key: {exc}"
        ) from None


def mint_token(
    config: ProxyConfig,
    issuer_name: str,
    tenant: str,
    subject: str,
    ttl_seconds: int = 3600,
    scope: str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """A token signed with the issuer's configured secret or private key (development, demos, tests)."""
    environ = os.environ if env is None else env
    issuer = next((i for i in config.auth.issuers if i.issuer == issuer_name), None)
    if issuer is None:
        raise ValueError(f"issuer {issuer_name!r} is not configured")
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer.issuer,
        "aud": config.listen.resource_url,  # what every issuer's tokens may name
        issuer.subject_claim: subject,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_seconds,
    }
    node = claims
    *parents, leaf = issuer.tenant_claim.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = tenant
    if scope:
        claims["scope"] = scope
    if issuer.secret_env is not None:
        secret = environ.get(issuer.secret_env)
        if not secret:
            raise ValueError(f"environment variable {issuer.secret_env} is not set")
        problem = hmac_secret_problem(secret)
        if problem is not None:  # `run` would refuse it: no token it never accepts
            raise ValueError(f"environment variable {issuer.secret_env} {problem}")
        return jwt.encode(claims, secret, algorithm=issuer.algorithms[0])
    if issuer.private_key_file is None:
        raise ValueError(f"issuer {issuer_name!r} has no secret_env or private_key_file to sign with")
    return jwt.encode(claims, issuer.private_key_file.read_bytes(), algorithm=issuer.algorithms[0])
