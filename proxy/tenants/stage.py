"""The tenant's runtime is held for the whole exchange: the idle sweep never drops it (nor closes
its upstream) under a request, a stream or a subscription. Explicit tenants are never dropped, so
only template tenants are counted."""

from __future__ import annotations

import time

from proxy.flow import Around, Call


class Hold(Around[Call]):
    async def enter(self, call: Call) -> bool:
        if call.tenant.idle_seconds is None:
            return False
        call.tenant.usage.in_use += 1
        return True

    def leave(self, call: Call, failure: BaseException | None) -> None:
        usage = call.tenant.usage
        usage.in_use -= 1
        usage.last_used = time.monotonic()


hold = Hold()
