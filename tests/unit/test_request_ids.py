"""The proxy's request ids: 64 random bits each, drawn from the OS in batches, never repeated by a
forked child."""

from __future__ import annotations

import os
import re

from proxy.http.edge import RandomIds


def test_ids_are_64_random_bits_and_distinct_across_batches() -> None:
    ids = RandomIds()
    drawn = [ids() for _ in range(2 * RandomIds.BATCH + 5)]
    assert all(re.fullmatch(r"[0-9a-f]{16}", one) for one in drawn)
    assert len(set(drawn)) == len(drawn)


def test_a_forked_child_draws_ids_of_its_own() -> None:
    ids = RandomIds()
    ids()  # the parent's batch is drawn
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        os.write(writer, ids().encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(child, 0)
    childs = os.read(reader, 64).decode()
    os.close(reader)
    assert re.fullmatch(r"[0-9a-f]{16}", childs)
    assert childs != ids()  # the parent's next id: the child's would be it, had it kept the batch
