"""tenant_allowlist.file: the tenant ids templates may serve, held compactly.

A platform may list hundreds of thousands of ids. As a set of str they would cost about 100 bytes
each (object headers, hash table); here they are one sorted bytes object and an array of end
offsets (the id's length and 4 bytes), found by bisection: an exact, byte-for-byte match.
"""

from __future__ import annotations

import hashlib
import re
from array import array
from itertools import accumulate
from pathlib import Path

from proxy.config import TENANT_ID_PATTERN, ConfigError

_TENANT_ID = re.compile(TENANT_ID_PATTERN.encode("ascii"))


class TenantIds:
    def __init__(self, ids: list[bytes]) -> None:
        ordered = sorted(set(ids))
        self._blob = b"".join(ordered)
        self._ends = array("I", accumulate(len(tenant) for tenant in ordered))

    def __len__(self) -> int:
        return len(self._ends)

    def _at(self, index: int) -> bytes:
        start = self._ends[index - 1] if index else 0
        return self._blob[start : self._ends[index]]

    def __contains__(self, tenant: object) -> bool:
        if not isinstance(tenant, str) or not tenant.isascii():
            return False  # ids are ASCII: nothing else is listed
        wanted = tenant.encode("ascii")
        low, high = 0, len(self._ends)
        while low < high:
            middle = (low + high) // 2
            if self._at(middle) < wanted:
                low = middle + 1
            else:
                high = middle
        return low < len(self._ends) and self._at(low) == wanted


def read_allowlist(path: Path, source: str) -> TenantIds:
    """The tenant ids of an allowlist file: one a line, `#` starts a comment, blank lines skipped.
    A line that is not a tenant id stops start-up (or a reload) with its file and line number.

    The same content is parsed once, however many runtimes are built from it (the check before
    the port is bound and the app's own, reloads for another file): parsing 100,000 ids makes
    that many short-lived objects, and memory the allocator does not give back."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        problem = exc.strerror or type(exc).__name__
        raise ConfigError(source, "tenant_allowlist.file", f"cannot read {path}: {problem}") from None
    key = (path, hashlib.sha256(data).digest())
    ids = _LAST_PARSED.get(key)
    if ids is None:
        ids = _parse(path, data)
        _LAST_PARSED.clear()
        _LAST_PARSED[key] = ids
    return ids


_LAST_PARSED: dict[tuple[Path, bytes], TenantIds] = {}  # the last file read, by its content's digest


def _parse(path: Path, data: bytes) -> TenantIds:
    ids: list[bytes] = []
    for number, line in enumerate(data.splitlines(), 1):
        tenant = line.split(b"#", 1)[0].strip()
        if not tenant:
            continue
        if _TENANT_ID.fullmatch(tenant) is None:
            shown = tenant[:80].decode("utf-8", "replace")
            raise ConfigError(path, f"line {number}", f"{shown!r} is not a tenant id")
        ids.append(tenant)
    return TenantIds(ids)
