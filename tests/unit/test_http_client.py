"""The upstream HTTP/1.1 client (proxy/http_client.py) against real servers on loopback: raw asyncio
servers scripted byte by byte where the wire matters, aiohttp's server where it does not."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import gzip
import ipaddress
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.config import UpstreamConfig
from proxy.protocol.errors import UpstreamError, UpstreamTimeout
from proxy.protocol.sse import Event, read_event_batches
from proxy.upstreams.base import UpstreamRequest
from proxy.upstreams.http import HttpUpstream, HttpUpstreamResponse
from proxy.upstreams.http_client import ConnectionPool, HttpClientError, HttpResponse

LOOPBACK = ipaddress.ip_address("127.0.0.1")


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Peer:
    """The server's side of one connection."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def request(self) -> Request | None:
        """The next request on this connection, or None once the client closed it."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        line, *fields = head.decode().split("\r\n")[:-2]
        method, target, _ = line.split(" ")
        headers = dict(f.split(": ", 1) for f in fields)
        body = await self.reader.readexactly(int(headers.get("Content-Length", "0")))
        return Request(method, target, headers, body)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"


def answer(body: bytes, *extra: str, status: str = "200 OK", content_type: str = "application/json") -> bytes:
    head = [f"HTTP/1.1 {status}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


Script = Callable[[Peer], Awaitable[None]]


@dataclass
class Server:
    port: int
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    closed: int = 0  # connections the client closed

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}/mcp"


@contextlib.asynccontextmanager
async def serve(script: Script, ssl_context: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A server running `script` on every connection it accepts."""
    state = Server(0)

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        peer = Peer(reader, writer)
        with contextlib.suppress(ConnectionError):
            await script(peer)
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=ssl_context)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1):
                await server.wait_closed()


def keep_answering(state: Callable[[], Server], body: bytes = b'{"ok":true}', *extra: str) -> Script:
    """Answer every request on the connection with `body`, until the client closes it."""

    async def script(peer: Peer) -> None:
        while (request := await peer.request()) is not None:
            state().requests.append(request)
            await peer.send(answer(body, *extra))
        state().closed += 1

    return script


def pool(url: str, **options: float) -> ConnectionPool:
    settings: dict[str, float] = {
        "max_connections": 10, "keepalive_seconds": 5, "connect_timeout": 2, "read_timeout": 2,
    }  # fmt: skip
    settings.update(options)
    return ConnectionPool(
        url,
        max_connections=int(settings["max_connections"]),
        keepalive_seconds=settings["keepalive_seconds"],
        connect_timeout=settings["connect_timeout"],
        read_timeout=settings["read_timeout"],
    )


async def read_all(response: HttpResponse) -> bytes:
    try:
        return await response.content.read()
    finally:
        response.release()


@contextlib.asynccontextmanager
async def kept_alive_server(*extra: str) -> AsyncIterator[Server]:
    holder: list[Server] = []
    async with serve(keep_answering(lambda: holder[0], b'{"ok":true}', *extra)) as server:
        holder.append(server)
        yield server


# --- keep-alive and the pool ---------------------------------------------------------------------


async def test_sequential_requests_share_one_kept_alive_connection() -> None:
    async with kept_alive_server() as server:
        client = pool(server.url())
        for n in range(5):
            response = await client.request("POST", {"Content-Type": "application/json"}, b'{"n":%d}' % n)
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await read_all(response) == b'{"ok":true}'
        assert server.connections == 1
        first = server.requests[0]
        assert (first.method, first.target, first.body) == ("POST", "/mcp", b'{"n":0}')
        assert first.headers == {
            "Host": f"127.0.0.1:{server.port}", "Content-Type": "application/json", "Content-Length": "7",
        }  # fmt: skip
        await client.close()


async def test_the_pool_never_opens_more_than_max_connections() -> None:
    release = asyncio.Event()
    in_flight = 0
    peak = 0

    async def slow(peer: Peer) -> None:
        nonlocal in_flight, peak
        while await peer.request() is not None:
            in_flight += 1
            peak = max(peak, in_flight)
            await release.wait()
            in_flight -= 1
            await peer.send(answer(b"{}"))

    async with serve(slow) as server:
        client = pool(server.url(), max_connections=2)
        calls = [asyncio.create_task(client.request("POST", {}, b"{}")) for _ in range(5)]
        await asyncio.sleep(0.2)
        assert (server.connections, client.in_use) == (2, 2)
        release.set()
        for call in calls:
            await read_all(await call)
        assert server.connections == 2 and peak == 2
        assert client.in_use == 0
        await client.close()


async def test_waiting_for_a_free_connection_counts_against_the_connect_timeout() -> None:
    async def never_answer(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(10)

    async with serve(never_answer) as server:
        client = pool(server.url(), max_connections=1, connect_timeout=0.2, read_timeout=10)
        first = asyncio.create_task(client.request("POST", {}, b"{}"))
        await asyncio.sleep(0.05)
        with pytest.raises(TimeoutError):
            await client.request("POST", {}, b"{}")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert client.in_use == 0  # the cancelled request gave its slot back
        await client.close()


async def test_a_partly_read_answer_closes_its_connection() -> None:
    async def big_then_small(peer: Peer) -> None:
        request = await peer.request()
        assert request is not None
        await peer.send(answer(b"x" * 100_000)[:1000])  # the head and the start of a long body
        await asyncio.sleep(10)

    async with serve(big_then_small) as server:
        client = pool(server.url())
        response = await client.request("POST", {}, b"{}")
        assert await response.content.readany()
        response.release()  # unread body: the connection cannot carry another request
        assert client.in_use == 0
        second = asyncio.create_task(client.request("POST", {}, b"{}"))
        await asyncio.sleep(0.1)
        assert server.connections == 2
        second.cancel()
        await client.close()


async def test_connection_close_from_the_server_is_honoured() -> None:
    async with kept_alive_server("Connection: close") as server:
        client = pool(server.url())
        for _ in range(3):
            assert await read_all(await client.request("POST", {}, b"{}")) == b'{"ok":true}'
        assert server.connections == 3
        await client.close()


async def test_idle_connections_are_closed_after_keepalive_seconds() -> None:
    async with kept_alive_server() as server:
        client = pool(server.url(), keepalive_seconds=0.2)
        await read_all(await client.request("POST", {}, b"{}"))
        await asyncio.sleep(0.5)
        assert server.closed == 1  # the client closed it without being asked
        await read_all(await client.request("POST", {}, b"{}"))
        assert server.connections == 2
        await client.close()


async def test_an_idempotent_request_is_retried_once_when_a_kept_alive_connection_was_closed() -> None:
    async def one_answer_per_connection(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"{}"))
        await peer.request()  # the next one is read, then the connection closes unanswered

    async with serve(one_answer_per_connection) as server:
        client = pool(server.url())
        await read_all(await client.request("GET", {}))
        assert await read_all(await client.request("DELETE", {})) == b"{}"  # sent again, answered
        assert server.connections == 2
        with pytest.raises(HttpClientError):  # POST is not idempotent: never sent twice
            await client.request("POST", {}, b"{}")
        await client.close()


async def test_a_header_with_a_line_break_is_refused() -> None:
    client = pool("http://127.0.0.1:9/mcp")
    for headers in ({"X-A": "1\r\nX-Injected: 1"}, {"X-A": "1\n"}, {"X-A\r": "1"}, {"X-A": "1\x00"}):
        with pytest.raises(ValueError, match="line break"):
            await client.request("POST", headers, b"{}")


# --- bodies --------------------------------------------------------------------------------------


async def test_a_content_length_body_split_over_many_writes() -> None:
    body = b'{"data":"' + b"y" * 50_000 + b'"}'

    async def dribble(peer: Peer) -> None:
        await peer.request()
        data = answer(body)
        for start in range(0, len(data), 7_000):
            await peer.send(data[start : start + 7_000])
            await asyncio.sleep(0.001)

    async with serve(dribble) as server:
        client = pool(server.url())
        response = await client.request("POST", {}, b"{}")
        assert response.content_length == len(body)
        assert await read_all(response) == body


async def test_a_chunked_body() -> None:
    async def chunked(peer: Peer) -> None:
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        for part in (b'{"a":', b"1,", b'"b":2}'):
            await peer.send(b"%x\r\n%s\r\n" % (len(part), part))
            await asyncio.sleep(0.01)
        await peer.send(b"0\r\n\r\n")
        await peer.request()

    async with serve(chunked) as server:
        client = pool(server.url())
        assert await read_all(await client.request("POST", {}, b"{}")) == b'{"a":1,"b":2}'
        await client.close()


async def test_an_sse_stream_is_relayed_as_it_arrives() -> None:
    go_on = asyncio.Event()

    async def stream(peer: Peer) -> None:
        await peer.request()
        head = "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        await peer.send(head.encode())
        first = b"id: 1\ndata: first\n\n"
        await peer.send(b"%x\r\n%s\r\n" % (len(first), first))
        await go_on.wait()  # the rest only once the client has the first event
        rest = b"id: 2\ndata: second\n\n"
        await peer.send(b"%x\r\n%s\r\n0\r\n\r\n" % (len(rest), rest))

    async with serve(stream) as server:
        client = pool(server.url())
        response = await client.request("GET", {"Accept": "text/event-stream"})
        assert response.content_type == "text/event-stream"
        batches = read_event_batches(response.content, 10_000)
        first = await asyncio.wait_for(anext(batches), 2)
        assert first == [Event("first", id="1")]
        go_on.set()
        assert [batch async for batch in batches] == [[Event("second", id="2")]]
        response.release()
        await client.close()


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_decoded(encoding: str) -> None:
    body = b'{"text":"' + b"compressible " * 2000 + b'"}'
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)

    async with serve(keep_answering(lambda: server, packed, f"Content-Encoding: {encoding}")) as server:
        client = pool(server.url())
        response = await client.request("POST", {"Accept-Encoding": "gzip, deflate"}, b"{}")
        assert await read_all(response) == body
        await read_all(await client.request("POST", {}, b"{}"))
        assert server.connections == 1  # a decoded body still leaves the connection reusable
        await client.close()


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_a_reader_that_falls_behind_pauses_the_socket_and_loses_nothing(encoding: str | None) -> None:
    body = bytes(range(256)) * 8192  # 2 MiB: far above the reader's high-water mark
    sent = gzip.compress(body) if encoding else body
    extra = [f"Content-Encoding: {encoding}"] if encoding else []

    async with serve(keep_answering(lambda: server, sent, *extra)) as server:
        client = pool(server.url(), read_timeout=0.3)
        response = await client.request("POST", {}, b"{}")
        await asyncio.sleep(0.5)  # longer than the read timeout: a wait of ours is not the server's
        received = bytearray()
        while chunk := await response.content.readany():
            received += chunk
            await asyncio.sleep(0)
        response.release()
        assert received == body
        await read_all(await client.request("POST", {}, b"{}"))
        assert server.connections == 1
        await client.close()


async def test_a_body_cut_short_by_the_server_is_an_error() -> None:
    async def cut(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"z" * 1000)[:-500])  # and the connection closes

    async with serve(cut) as server:
        client = pool(server.url())
        response = await client.request("POST", {}, b"{}")
        with pytest.raises(HttpClientError):
            await read_all(response)
        wrapped = HttpUpstreamResponse(await client.request("POST", {}, b"{}"), 10_000)
        with pytest.raises(UpstreamError, match="closed the connection mid-response"):
            await wrapped.read_json()
        wrapped.close()


async def test_an_oversized_answer_is_an_upstream_error() -> None:
    async def big(peer: Peer) -> None:
        await peer.request()
        await peer.send(answer(b"b" * 5000))
        await peer.request()
        await peer.send(CHUNKED_HEAD)
        await peer.send(b"%x\r\n%s\r\n0\r\n\r\n" % (5000, b"b" * 5000))
        await peer.request()

    async with serve(big) as server:
        client = pool(server.url())
        for _ in ("declared length", "chunked"):
            response = HttpUpstreamResponse(await client.request("POST", {}, b"{}"), 1000)
            with pytest.raises(UpstreamError, match="oversized"):
                await response.read_json()
            response.close()
        await client.close()


# --- timeouts and failures -----------------------------------------------------------------------


async def test_no_answer_within_the_read_timeout() -> None:
    async def silent(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(10)

    async with serve(silent) as server:
        client = pool(server.url(), read_timeout=0.2)
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await client.request("POST", {}, b"{}")
        assert 0.15 < asyncio.get_running_loop().time() - started < 1.5
        assert client.in_use == 0


async def test_the_read_timeout_counts_from_the_last_read() -> None:
    async def stalls(peer: Peer) -> None:
        await peer.request()
        data = answer(b"s" * 100)
        await peer.send(data[:-100])
        for byte in range(10):  # a byte every 0.05 s for 0.5 s: slow, but never silent for 0.2 s
            await peer.send(data[-100 + byte : -99 + byte])
            await asyncio.sleep(0.05)
        await asyncio.sleep(10)  # then silent mid-body

    async with serve(stalls) as server:
        client = pool(server.url(), read_timeout=0.2)
        loop = asyncio.get_running_loop()
        started = loop.time()
        response = await client.request("POST", {}, b"{}")
        with pytest.raises(TimeoutError):
            await read_all(response)
        assert loop.time() - started > 0.5
        wrapped = HttpUpstreamResponse(await client.request("POST", {}, b"{}"), 10_000)
        with pytest.raises(UpstreamTimeout):
            await wrapped.read_json()
        wrapped.close()


async def test_a_connection_that_cannot_be_opened_in_time() -> None:
    # A listener that never accepts, its queue full: the kernel drops further SYNs unanswered.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(8):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        client = pool(f"http://127.0.0.1:{port}/mcp", connect_timeout=0.3)
        with pytest.raises(TimeoutError):
            await client.request("POST", {}, b"{}")
        assert client.in_use == 0
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_nothing_listening_is_an_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = pool(f"http://127.0.0.1:{port}/mcp")
    with pytest.raises(HttpClientError):
        await client.request("POST", {}, b"{}")
    assert client.in_use == 0


def upstream_config(url: str, **options: float) -> UpstreamConfig:
    return UpstreamConfig.model_validate(
        {"url": url, "connect_timeout_seconds": 1, "read_timeout_seconds": 1, **options}
    )


async def test_the_upstream_maps_failures_to_its_errors() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    upstream = HttpUpstream("acme", upstream_config(f"http://127.0.0.1:{port}/mcp"))
    with pytest.raises(UpstreamError, match="unreachable"):
        await upstream.send(UpstreamRequest("POST", {}, b"{}"))

    async def silent(peer: Peer) -> None:
        await peer.request()
        await asyncio.sleep(10)

    async with serve(silent) as server:
        upstream = HttpUpstream("acme", upstream_config(server.url(), read_timeout_seconds=0.2))
        with pytest.raises(UpstreamTimeout):
            await upstream.send(UpstreamRequest("POST", {}, b"{}"))
        await upstream.close()


@pytest.mark.parametrize("status", ["301 Moved Permanently", "302 Found", "307 Temporary Redirect"])
async def test_a_redirect_is_refused_and_not_followed(status: str) -> None:
    async with kept_alive_server() as elsewhere:

        async def redirect(peer: Peer) -> None:
            await peer.request()
            await peer.send(answer(b"", f"Location: {elsewhere.url()}", status=status))

        async with serve(redirect) as server:
            upstream = HttpUpstream("acme", upstream_config(server.url()))
            with pytest.raises(UpstreamError, match="redirect"):
                await upstream.send(UpstreamRequest("POST", {"Content-Type": "application/json"}, b"{}"))
            assert elsewhere.connections == 0
            assert upstream.connections_in_use == 0
            await upstream.close()


async def test_the_upstream_sends_its_headers_and_reads_the_session_id() -> None:
    async def initialize(peer: Peer) -> None:
        request = await peer.request()
        assert request is not None
        seen.append(request)
        await peer.send(answer(b'{"jsonrpc":"2.0","id":1,"result":{}}', "Mcp-Session-Id: s-1"))

    seen: list[Request] = []
    async with serve(initialize) as server:
        config = upstream_config(server.url())
        config = config.model_copy(update={"headers": {"X-Api-Key": "k"}, "tenant_header": "X-Tenant"})
        upstream = HttpUpstream("acme", config)
        response = await upstream.send(UpstreamRequest("POST", {"Content-Type": "application/json"}, b"{}"))
        assert response.status == 200 and response.content_type == "application/json"
        assert response.session_id == "s-1"
        assert await response.read_json() == b'{"jsonrpc":"2.0","id":1,"result":{}}'
        response.close()
        await upstream.close()
    headers = seen[0].headers
    assert headers["X-Api-Key"] == "k" and headers["X-Tenant"] == "acme"
    assert headers["User-Agent"].startswith("mcp-tenant-proxy/")
    assert "Cookie" not in headers


# --- TLS -----------------------------------------------------------------------------------------


def self_signed(host: str) -> tuple[bytes, bytes]:
    """A certificate (PEM) for `host` and 127.0.0.1, signed by its own key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(host), x509.IPAddress(LOOPBACK)]), critical=False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return certificate.public_bytes(serialization.Encoding.PEM), key_pem


async def test_https_with_a_self_signed_certificate_and_a_custom_context(tmp_path: Path) -> None:
    cert, key = self_signed("localhost")
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    trusting = ssl.create_default_context(cadata=cert.decode())

    holder: list[Server] = []
    async with serve(keep_answering(lambda: holder[0]), server_context) as server:
        holder.append(server)
        client = ConnectionPool(
            server.url("https", "localhost"),
            max_connections=2, keepalive_seconds=5, connect_timeout=2, read_timeout=2, ssl_context=trusting,
        )  # fmt: skip
        for _ in range(2):
            assert await read_all(await client.request("POST", {}, b"{}")) == b'{"ok":true}'
        assert server.connections == 1
        assert server.requests[0].headers["Host"] == f"localhost:{server.port}"
        await client.close()

        verifying = pool(server.url("https", "localhost"))  # the default context: system CAs only
        with pytest.raises(HttpClientError) as failure:
            await verifying.request("POST", {}, b"{}")
        assert isinstance(failure.value.__cause__, ssl.SSLCertVerificationError)


# --- aiohttp's own server ------------------------------------------------------------------------


async def test_against_aiohttp_web_with_compression_and_a_streamed_answer() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            for n in range(3):
                await response.write(b"data: %d\n\n" % n)
            await response.write_eof()
            return response
        reply = web.json_response({"echo": (await request.read()).decode()})
        reply.enable_compression()
        return reply

    app = web.Application()
    app.router.add_route("*", "/mcp", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        client = pool(f"http://127.0.0.1:{port}/mcp")
        response = await client.request("POST", {"Accept-Encoding": "gzip"}, b"hello")
        assert response.headers["Content-Encoding"] == "gzip"
        assert await read_all(response) == b'{"echo": "hello"}'
        stream = await client.request("GET", {})
        events = [e for batch in [b async for b in read_event_batches(stream.content, 1000)] for e in batch]
        stream.release()
        assert events == [Event("0"), Event("1"), Event("2")]
        assert client.in_use == 0
        await client.close()
    finally:
        await runner.cleanup()
