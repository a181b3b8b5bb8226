"""The Redis connection every shared store uses, and how its failures are seen.

Keys always carry the tenant in a fixed position, as a hash tag: `<prefix>:{<tenant>}:<kind>:...`
(tenant ids match `^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`, so no tenant id can contain the `:`
separator or a brace). On a Redis Cluster only the tag is hashed, so all of a tenant's keys live in
one slot and every multi-key script or transaction of a tenant stays on one node; the few keys of no
tenant (the seal key) are used alone. A failed call raises StateUnavailable after marking the
backend down (for /readyz and metrics); each store decides what that means for its concern: serve
without it, or refuse. A cluster that cannot serve a key (a master down, its slots uncovered, no
node answering) counts as down, like a single Redis that cannot be reached.
"""

from __future__ import annotations

import asyncio
import inspect
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import structlog

from proxy.config import ConfigError, StateConfig
from proxy.ops.metrics import Metrics

log = structlog.get_logger("proxy.backends.redis")
T = TypeVar("T")
RETRY_SECONDS = 1.0


class StateUnavailable(Exception):
    """The shared state store could not be reached or did not answer in time."""


class RedisState:
    def __init__(self, config: StateConfig, metrics: Metrics, source: str) -> None:
        try:
            import redis.asyncio as redis_asyncio
            import redis.exceptions as redis_exceptions
            from redis.asyncio.cluster import RedisCluster
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ClusterDownError, RedisClusterException
        except ImportError:
            raise ConfigError(
                source,
                "state.backend",
                "the redis backend needs the redis package: pip install 'mcp-tenant-proxy[redis]'",
            ) from None
        assert config.url is not None
        self.prefix = config.key_prefix
        self.audit_max_records = config.audit_max_records
        self.timeout_seconds = config.timeout_seconds
        self.cluster = config.is_cluster
        options: dict[str, Any] = {
            "socket_timeout": config.timeout_seconds,
            "socket_connect_timeout": config.timeout_seconds,
            # One immediate retry (a pooled connection that died with a Redis restart), no backoff:
            # a request never waits on Redis for more than about twice timeout_seconds (a cluster
            # that says it is down adds its client's fixed 0.25 s before the retry).
            "retry": Retry(NoBackoff(), 1),
            "health_check_interval": 30,
        }
        self._primaries: Any = None  # on a cluster: where a readiness ping goes (every master)
        if self.cluster:  # the other nodes are found from the one named
            url = config.url.replace("+cluster://", "://", 1)
            self.client: Any = RedisCluster.from_url(url, **options)
            self._primaries = RedisCluster.PRIMARIES
        else:
            self.client = redis_asyncio.Redis.from_url(config.url, **options)
        # Redis cannot be reached (down: fail fast for a while) vs it answered with an error (a
        # refused command, e.g. out of memory: this call fails, the next ones still try).
        self._unreachable: tuple[type[BaseException], ...] = (
            redis_asyncio.ConnectionError,
            redis_asyncio.TimeoutError,
            OSError,
            TimeoutError,
            ClusterDownError,  # a master is down: the cluster refuses its slots, or all of them
            RedisClusterException,  # slots not covered, no node answering, no usable topology
        )
        self._refused: tuple[type[BaseException], ...] = (redis_asyncio.RedisError,)
        self._credentials_refused: tuple[type[BaseException], ...] = (
            redis_exceptions.AuthenticationError,
            redis_exceptions.AuthorizationError,
            redis_exceptions.AuthenticationWrongNumberOfArgsError,
        )
        self._metrics = metrics
        self.up = True
        # Why this replica cannot serve what needs shared state at all (None: it can, or could once):
        # Redis was never reached, or it refuses the credentials. /readyz says not ready for these,
        # while a later outage is only reported (every replica shares one Redis).
        self.problem: str | None = "the shared state store (Redis) has not answered yet"
        self._retry_at = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deferred: list[Callable[[Any], object]] = []
        self._on_failure: list[Callable[[], None]] = []

    def key(self, tenant: str, *parts: str) -> str:
        return ":".join((self.prefix, f"{{{tenant}}}", *parts))

    async def call(self, operation: str, awaitable: Awaitable[T]) -> T:
        """Await one Redis call, timed (by operation); a failure raises StateUnavailable (unreachable:
        marks it down).

        While it is down, calls fail at once for RETRY_SECONDS after each failure, so an unreachable
        Redis costs a request nothing but the fallback; then one call tries again."""
        if not self.up and time.monotonic() < self._retry_at:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            self._metrics.state_errors.labels(operation).inc()
            raise StateUnavailable(operation)
        started = time.perf_counter()
        try:
            result = await awaitable
        except self._credentials_refused as exc:
            self.problem = "the shared state store (Redis) refuses the configured credentials"
            self._failed(operation, exc)
            raise StateUnavailable(operation) from None
        except self._unreachable as exc:
            self._failed(operation, exc)
            raise StateUnavailable(operation) from None
        except self._refused as exc:
            log.error("state_backend_refused", operation=operation, error=type(exc).__name__)
            self._metrics.state_errors.labels(operation).inc()
            raise StateUnavailable(operation) from None
        finally:  # answered or not: a slow Redis shows in its latency before it fails
            self._metrics.observe_state_call(operation, time.perf_counter() - started)
        self.problem = None
        if not self.up:
            log.info("state_backend_back")
            self.up = True
        return result

    def _failed(self, operation: str, exc: BaseException) -> None:
        if self.up:
            log.warning("state_backend_down", operation=operation, error=type(exc).__name__)
        self.up = False
        self._retry_at = time.monotonic() + RETRY_SECONDS
        self._metrics.state_errors.labels(operation).inc()

    def defer(self, fill: Callable[[Any], object], on_failure: Callable[[], None] | None = None) -> None:
        """Queue writes no request waits for (a slot given back, a cache store): `fill` adds its
        commands to a pipeline; everything queued in one event-loop turn goes in one round trip.
        `on_failure` runs if that round trip fails (a write that must not be lost can be owed)."""
        self._deferred.append(fill)
        if on_failure is not None:
            self._on_failure.append(on_failure)
        if len(self._deferred) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        fills, self._deferred = self._deferred, []
        failures, self._on_failure = self._on_failure, []
        pipeline = self.client.pipeline(transaction=False)
        for fill in fills:
            fill(pipeline)
        self.spawn("write_batch", pipeline.execute(), failures)

    def spawn(
        self,
        operation: str,
        coroutine: Coroutine[Any, Any, Any],
        on_failure: list[Callable[[], None]] | None = None,
    ) -> None:
        """Run a write the request need not wait for (a cache store, an audit batch)."""

        async def run() -> None:
            try:
                await self.call(operation, coroutine)
            except StateUnavailable:  # counted and logged by call()
                for failed in on_failure or ():
                    failed()

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def seal_key(self) -> bytes | None:
        """The key every replica seals MRTR request state with: the first replica to ask creates it
        (`<prefix>:seal-key`, two parts, so no tenant's key can be it); None while Redis is away."""
        key = self.prefix + ":seal-key"  # no hash tag: hashed whole, as the single key it is
        try:
            await self.call("seal_key", self.client.set(key, secrets.token_bytes(32), nx=True))
            value: bytes | None = await self.call("seal_key", self.client.get(key))
        except StateUnavailable:
            return None
        return value if value is not None and len(value) >= 32 else None

    async def ping(self) -> bool:
        """Whether Redis answers now (always tries: this is how the readiness loop sees recovery)."""
        self._retry_at = 0.0
        ping = self.client.ping(target_nodes=self._primaries) if self.cluster else self.client.ping()
        try:
            await self.call("ping", ping)
        except StateUnavailable:
            return False
        return True

    def writes_in_flight(self) -> set[asyncio.Task[Any]]:
        """The writes spawned so far and not finished (a purge waits for the stores among them)."""
        return set(self._tasks)

    def flush_deferred(self) -> None:
        """Send the writes deferred to the end of this event-loop turn now."""
        if self._deferred:
            self._flush()

    async def written(self) -> None:
        """Wait for the writes spawned so far (each bounded by the client's timeouts), so that a
        read after them sees them: Redis orders commands per connection, not across the pool."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self.timeout_seconds * 2)

    async def close(self) -> None:
        self.flush_deferred()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2)
        await self.client.aclose()
