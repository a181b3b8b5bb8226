"""Task ids: the proxy's own for each upstream task, and whose tasks the upstream's ids are.

A task id is a bearer token at the upstream (servers such as FastMCP keep every unauthenticated
caller's tasks in one space), and an upstream may be shared by tenants. So a client only ever sees
the proxy's id for a task, issued to it alone:

    t1.<upstream id, base64url>.<HMAC-SHA256 over (tenant, principal, upstream, upstream id), 144 bits>

under the key requestState is sealed with (the replicas' common key with state.backend: redis).
It opens only for the caller it was issued to, on the same upstream: any other caller, a reload
that moved the tenant to another upstream, an altered or forged id finds nothing. The proxy's id
for an upstream task is deterministic, so a notification or a list naming the upstream's id maps
back to it, but only for tasks the store below says are the caller's: whose tasks the upstream ids
are (created through the proxy by that caller) is remembered here, in this process, or shared by
the replicas (backends/redis/tasks.py, the same interface).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections import OrderedDict
from typing import Final

from proxy.layers.containment.request_state import RequestStateSeal

Owner = tuple[str, str, str]  # (tenant, principal: issuer and subject, upstream identity)
PREFIX: Final = "t1."
MAX_UPSTREAM_ID_BYTES: Final = 512
MAX_TASKS_PER_OWNER: Final = 1024
MAX_OWNERS: Final = 10_000
_TAG_BYTES: Final = 18


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _tag(seal: RequestStateSeal, owner: Owner, upstream_id: str) -> bytes:
    message = "\0".join(("task", *owner, upstream_id)).encode("utf-8", "surrogatepass")
    return seal.mac(message)[:_TAG_BYTES]


def bindable(upstream_id: object) -> bool:
    """Whether an upstream's task id can be issued under a proxy id (a string of bounded size)."""
    return isinstance(upstream_id, str) and 0 < len(upstream_id.encode("utf-8", "surrogatepass")) <= (
        MAX_UPSTREAM_ID_BYTES
    )


def issue(seal: RequestStateSeal, owner: Owner, upstream_id: str) -> str:
    """The proxy's id for an upstream task of this caller (the same one every time)."""
    encoded = _b64(upstream_id.encode("utf-8", "surrogatepass"))
    return f"{PREFIX}{encoded}.{_b64(_tag(seal, owner, upstream_id))}"


def open_id(seal: RequestStateSeal, owner: Owner, task_id: str) -> str | None:
    """The upstream's id behind a proxy task id, or None unless it was issued to this caller."""
    if not task_id.startswith(PREFIX) or task_id.count(".") != 2:
        return None
    encoded, tag = task_id[len(PREFIX) :].split(".")
    try:
        raw = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
        given = base64.urlsafe_b64decode(tag + "=" * (-len(tag) % 4))
        upstream_id = raw.decode("utf-8", "surrogatepass")
    except (binascii.Error, ValueError):
        return None
    if _b64(raw) != encoded or not bindable(upstream_id):
        return None  # (only the canonical encoding is one the proxy issued)
    return upstream_id if hmac.compare_digest(given, _tag(seal, owner, upstream_id)) else None


class TaskStore:
    """Whose tasks the upstream's ids are, in this process: a bounded, least-recently-used record
    per caller (tenant, subject, upstream), and which of them the audit already saw finish."""

    def __init__(self) -> None:
        self._owned: OrderedDict[Owner, OrderedDict[str, bool]] = OrderedDict()

    def _tasks(self, owner: Owner) -> OrderedDict[str, bool]:
        tasks = self._owned.get(owner)
        if tasks is None:
            tasks = self._owned[owner] = OrderedDict()
            if len(self._owned) > MAX_OWNERS:
                self._owned.popitem(last=False)
        else:
            self._owned.move_to_end(owner)
        return tasks

    def remember(self, owner: Owner, upstream_id: str) -> None:
        """A task created by this caller through the proxy."""
        tasks = self._tasks(owner)
        tasks.setdefault(upstream_id, False)
        tasks.move_to_end(upstream_id)
        if len(tasks) > MAX_TASKS_PER_OWNER:
            tasks.popitem(last=False)

    def knows(self, owner: Owner, upstream_id: str) -> bool:
        """Whether this process knows the task as the caller's (notifications are judged by it)."""
        tasks = self._owned.get(owner)
        return tasks is not None and upstream_id in tasks

    async def owned(self, owner: Owner) -> frozenset[str]:
        """Every task the caller created (what a task list may show)."""
        tasks = self._owned.get(owner)
        return frozenset(tasks) if tasks is not None else frozenset()

    def finished(self, owner: Owner, upstream_id: str) -> bool:
        """True the first time a task of the caller is seen in a terminal state (audited once)."""
        tasks = self._tasks(owner)
        if tasks.get(upstream_id, False):
            return False
        tasks[upstream_id] = True
        if len(tasks) > MAX_TASKS_PER_OWNER:
            tasks.popitem(last=False)
        return True
