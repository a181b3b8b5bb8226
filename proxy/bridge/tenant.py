"""One tenant's bridges, built with its runtime (a reload builds new ones and retires the old)."""

from __future__ import annotations

from proxy.bridge.calls import HandshakeBridge
from proxy.bridge.held import HeldSessions
from proxy.bridge.reverse import ReverseBridge
from proxy.config import ProxyConfig
from proxy.layers.data_access.catalog import Catalog
from proxy.upstreams.base import Upstream
from proxy.upstreams.eras import UpstreamEras


class TenantBridge:
    def __init__(
        self, tenant: str, upstream: Upstream, eras: UpstreamEras, catalog: Catalog, config: ProxyConfig
    ) -> None:
        self.enabled = config.bridging.enabled
        answer_timeout = config.sessions.answer_timeout_seconds
        # 2026-07-28 clients, handshake-era upstream: on sessions the proxy holds
        self.to_handshake = HandshakeBridge(HeldSessions(tenant, upstream, config.bridging), answer_timeout)
        # handshake-era clients, 2026-07-28 upstream without sessions: sessions kept by the proxy
        self.to_modern = ReverseBridge(upstream, eras, catalog, answer_timeout)

    def retire(self) -> None:
        """A reload replaced the tenant's runtime: calls waiting for input end, held sessions end
        once their calls are done."""
        self.to_handshake.close()
        self.to_handshake.sessions.retire()

    async def close(self) -> None:
        """Shutdown: everything held upstream ends."""
        self.to_handshake.close()
        await self.to_handshake.sessions.close()
        await self.to_modern.close()
