"""Era bridging: each side of the proxy speaks its own protocol era.

    client      upstream              the proxy
    2026-07-28  handshake era only    holds upstream sessions per caller (held.py) and carries each
                                      request on its caller's (calls.py); MRTR for server requests
    handshake   2026-07-28, no        keeps the session itself, forwards each request statelessly
                sessions              with the session's _meta (reverse.py)

stage.py puts it in the flows; shapes.py says what each message becomes in the other era.
"""
