"""WanProxy over loopback: integrity, half-close, failures, shutdown, counters, shaping.

Timing is only ever checked from below, where physics guarantees it (bytes cannot cross a
1 Mbit/s link faster than 1 Mbit/s); the box is shared, so nothing is checked from above.
TIMEOUT only keeps a broken proxy from hanging the run; nothing passing comes close to it.

Listeners here queue more pending connections than any test opens at once. With a short
backlog (socketserver's default is 5) Linux answers a burst of simultaneous connects with SYN
cookies, and data segments that reach the listener before the cookie-bearing ACK fail cookie
validation and are answered with a reset: the echo server itself would then reset connections
on a loaded machine, whatever the proxy does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from crowdtrain.wan import LinkShaper, WanProxy

TRAILER = b"<target saw eof>"
TIMEOUT = 60.0
BACKLOG = 128  # more than the most simultaneous connections any test opens (24)
LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echo everything; after the client's EOF send a trailer and close the write side."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(TIMEOUT)
        with contextlib.suppress(OSError):
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.sendall(TRAILER)
            sock.shutdown(socket.SHUT_WR)


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = BACKLOG


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port nobody listens on (connections to it are refused).

    The port stays bound (but not listening) for the whole test, so no other process can start
    listening on it and no outgoing connection can pick it as its own source port.
    """
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def _echo_mismatch(got: bytes, payload: bytes) -> str:
    """Empty if ``got`` is ``payload`` echoed plus the trailer, else where they part ways."""
    want = payload + TRAILER
    if got == want:
        return ""
    same = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
    where = f"first differing byte at offset {same}" if same is not None else "one is a prefix"
    return (
        f"got {len(got)} bytes, expected {len(want)} ({len(payload)} + trailer); {where}; "
        f"got ends with {got[-24:]!r}"
    )


def _roundtrip(port: int, payload: bytes) -> bytes:
    """Send payload, half-close, and read everything back until the proxy forwards EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        received = bytearray()

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        while chunk := sock.recv(65536):
            received += chunk
        sender.join()
    return bytes(received)


def _recv_exactly(sock: socket.socket, nbytes: int) -> bytes:
    """Read exactly nbytes (recv may return fewer than asked for); b"" ends it early."""
    received = bytearray()
    while len(received) < nbytes and (chunk := sock.recv(nbytes - len(received))):
        received += chunk
    return bytes(received)


def _read_until_reset(sock: socket.socket) -> tuple[bytes, bool]:
    """Everything the peer sent, and whether it ended in a reset (True) or an EOF (False)."""
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        return bytes(received), True
    return bytes(received), False


def _reset(sock: socket.socket) -> None:
    """Close with RST instead of FIN, as a crashing peer or a failing network would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    sock.close()


def _sees_closed(sock: socket.socket) -> bool:
    """True when the peer closed the connection, in order (EOF) or not (reset)."""
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True


def _no_loop_errors(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno >= logging.ERROR]


def test_one_megabyte_both_ways_intact_and_counted(echo_port: int) -> None:
    payload = os.urandom(1_000_000)
    with WanProxy("127.0.0.1", echo_port, up_mbps=400, down_mbps=800, latency_ms=5) as proxy:
        echoed = _roundtrip(proxy.port, payload)
        assert _echo_mismatch(echoed, payload) == ""
        assert proxy.bytes_up == len(payload)
        assert proxy.bytes_down == len(payload) + len(TRAILER)


def test_unlimited_links_and_no_latency(echo_port: int) -> None:
    payload = os.urandom(1_000_000)
    with WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=0) as proxy:
        assert _echo_mismatch(_roundtrip(proxy.port, payload), payload) == ""


def test_many_concurrent_connections(echo_port: int) -> None:
    async def client(port: int, payload: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send() -> None:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()

        sending = asyncio.create_task(send())
        received = await reader.read()
        await sending
        writer.close()
        await writer.wait_closed()
        return received

    async def main(port: int) -> None:
        payloads = [os.urandom(20_000 + 997 * i) for i in range(24)]
        results = await asyncio.wait_for(
            asyncio.gather(*(client(port, p) for p in payloads)), TIMEOUT
        )
        mismatches = [_echo_mismatch(r, p) for r, p in zip(results, payloads, strict=True)]
        assert {i: m for i, m in enumerate(mismatches) if m} == {}

    with WanProxy("127.0.0.1", echo_port, up_mbps=200, down_mbps=None, latency_ms=2) as proxy:
        asyncio.run(main(proxy.port))
        assert proxy.bytes_up == sum(20_000 + 997 * i for i in range(24))


def test_half_close_keeps_the_other_direction_open(echo_port: int) -> None:
    with (
        WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=1) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock,
    ):
        sock.sendall(b"hello")
        sock.shutdown(socket.SHUT_WR)  # the target must see EOF while we can still read
        received = bytearray()
        while chunk := sock.recv(1024):
            received += chunk
        assert bytes(received) == b"hello" + TRAILER


def test_refused_target_closes_the_client_without_errors(
    closed_port: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with WanProxy("127.0.0.1", closed_port, up_mbps=10, down_mbps=10, latency_ms=1) as proxy:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
                with contextlib.suppress(OSError):
                    sock.sendall(b"anyone there?")
                assert _sees_closed(sock)
        assert proxy.bytes_up == 0
    assert _no_loop_errors(caplog.records) == []


def test_stop_with_open_connections(echo_port: int) -> None:
    proxy = WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=0)
    port = proxy.start()
    socks = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(4)]
    try:
        for sock in socks:
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
        assert proxy.active_connections == 4
        proxy.stop()
        assert proxy.active_connections == 0
        for sock in socks:
            assert _sees_closed(sock)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()
        proxy.stop()  # idempotent
    finally:
        for sock in socks:
            sock.close()


def test_target_reset_reaches_the_client_as_a_reset(caplog: pytest.LogCaptureFixture) -> None:
    """A target that resets mid-stream: the client is reset too, never shown a clean EOF.

    An EOF would let the client take the bytes before it for a complete reply.
    """
    listener = socket.create_server(("127.0.0.1", 0), backlog=BACKLOG)
    port = listener.getsockname()[1]

    def reset_after_a_partial_reply() -> None:
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        _recv_exactly(conn, 10)
        conn.sendall(b"partial")
        _reset(conn)

    thread = threading.Thread(target=reset_after_a_partial_reply, daemon=True)
    thread.start()
    with (
        listener,
        WanProxy("127.0.0.1", port, up_mbps=None, down_mbps=None, latency_ms=0) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock,
    ):
        sock.sendall(b"0123456789")
        received, was_reset = _read_until_reset(sock)
        assert was_reset, f"the client saw a clean EOF after {received!r}"
        assert b"partial".startswith(received)
        thread.join(TIMEOUT)
    assert _no_loop_errors(caplog.records) == []


def test_client_reset_reaches_the_target_as_a_reset() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=BACKLOG)
    seen: list[tuple[bytes, bool]] = []

    def read_until_the_end() -> None:
        conn, _ = listener.accept()
        conn.settimeout(TIMEOUT)
        with conn:
            seen.append(_read_until_reset(conn))

    thread = threading.Thread(target=read_until_the_end, daemon=True)
    thread.start()
    with (
        listener,
        WanProxy(
            "127.0.0.1", listener.getsockname()[1], up_mbps=None, down_mbps=None, latency_ms=0
        ) as proxy,
    ):
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        sock.sendall(b"half a request")
        _reset(sock)
        thread.join(TIMEOUT)
    assert len(seen) == 1
    received, was_reset = seen[0]
    assert was_reset, f"the target saw a clean EOF after {received!r}"
    assert b"half a request".startswith(received)


def test_async_api_reports_nothing_to_the_loop_handler(echo_port: int, closed_port: int) -> None:
    async def main() -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        reported: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, ctx: reported.append(ctx))
        async with (
            WanProxy("127.0.0.1", echo_port, up_mbps=50, down_mbps=50, latency_ms=1) as good,
            WanProxy("127.0.0.1", closed_port, up_mbps=50, down_mbps=50, latency_ms=1) as bad,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", good.port)
            writer.write(b"x" * 10_000)
            await writer.drain()
            assert await reader.readexactly(10_000) == b"x" * 10_000
            _, dead = await asyncio.open_connection("127.0.0.1", bad.port)
            # leave both open: aclose must abort them quietly
        writer.close()
        dead.close()
        await asyncio.sleep(0.01)
        return reported

    assert asyncio.run(main()) == []


def test_pauses_reading_when_the_target_does_not_read() -> None:
    """In-flight bytes are bounded: a stalled receiver stalls the sender instead of memory."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    thread = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
    thread.start()
    with (
        listener,
        WanProxy(
            "127.0.0.1",
            listener.getsockname()[1],
            up_mbps=1000,
            down_mbps=1000,
            latency_ms=0,
            queue_bytes=256 * 1024,
        ) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5) as sock,
    ):
        block = b"\0" * 65536
        sent = 0
        with contextlib.suppress(TimeoutError):
            while sent < 128 * 1024 * 1024:
                sent += sock.send(block)
        # kernel socket buffers hold some megabytes; the proxy itself holds at most ~256 kB
        assert sent < 96 * 1024 * 1024
        thread.join()
        accepted[0].close()


def test_rate_limit_is_a_lower_bound_on_transfer_time(echo_port: int) -> None:
    payload = os.urandom(100_000)  # 0.8 Mbit: at least 0.8 s on a 1 Mbit/s uplink
    with WanProxy("127.0.0.1", echo_port, up_mbps=1, down_mbps=None, latency_ms=0) as proxy:
        started = time.monotonic()
        assert _roundtrip(proxy.port, payload) == payload + TRAILER
        elapsed = time.monotonic() - started
    assert elapsed >= 0.8 * 0.97


def test_latency_costs_a_handshake_and_a_round_trip(echo_port: int) -> None:
    with WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=60) as proxy:
        started = time.monotonic()
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"?")
            assert sock.recv(1) == b"?"
        elapsed = time.monotonic() - started
    assert elapsed >= 4 * 0.060 * 0.97  # SYN, SYN-ACK, request, response


def test_connections_share_the_volunteer_uplink(echo_port: int) -> None:
    """Two connections at once through one proxy share its 1 Mbit/s: 2 × 50 kB ≥ 0.8 s."""
    with WanProxy("127.0.0.1", echo_port, up_mbps=1, down_mbps=None, latency_ms=0) as proxy:
        payloads = [os.urandom(50_000), os.urandom(50_000)]
        results: list[bytes] = [b"", b""]

        def run(i: int) -> None:
            results[i] = _roundtrip(proxy.port, payloads[i])

        started = time.monotonic()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
    assert results == [p + TRAILER for p in payloads]
    assert elapsed >= 0.8 * 0.97


def test_proxies_built_from_shared_links_share_bandwidth(echo_port: int) -> None:
    up, down = LinkShaper(rate_bps=1e6, latency_s=0.0), LinkShaper(rate_bps=None, latency_s=0.0)
    a = WanProxy.from_links("127.0.0.1", echo_port, up_link=up, down_link=down)
    b = WanProxy.from_links("127.0.0.1", echo_port, up_link=up, down_link=down)
    with a, b:
        assert a.up_link is b.up_link
        started = time.monotonic()
        assert _roundtrip(a.port, b"a" * 50_000) == b"a" * 50_000 + TRAILER
        assert _roundtrip(b.port, b"b" * 50_000) == b"b" * 50_000 + TRAILER
        assert up.busy_until - started >= 0.8 * 0.97


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org", ""])
def test_refuses_non_loopback_listen_address(host: str) -> None:
    with pytest.raises(ValueError, match="allow_remote"):
        WanProxy("127.0.0.1", 1, up_mbps=1, down_mbps=1, latency_ms=0, listen_host=host)


def test_allows_loopback_and_explicit_remote() -> None:
    for host in ["127.0.0.1", "127.0.0.2", "localhost", "::1"]:
        WanProxy("127.0.0.1", 1, up_mbps=1, down_mbps=1, latency_ms=0, listen_host=host)
    WanProxy(
        "127.0.0.1",
        1,
        up_mbps=1,
        down_mbps=1,
        latency_ms=0,
        listen_host="0.0.0.0",
        allow_remote=True,
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"up_mbps": 0.0}, "up_mbps"),
        ({"down_mbps": -3.0}, "down_mbps"),
        ({"latency_ms": -1.0}, "latency_ms"),
    ],
)
def test_rejects_bad_link_settings(kwargs: dict[str, float], match: str) -> None:
    settings: dict[str, float | None] = {"up_mbps": 1.0, "down_mbps": 1.0, "latency_ms": 0.0}
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        WanProxy("127.0.0.1", 1, **settings)  # type: ignore[arg-type]


def test_port_before_start_is_a_clear_error() -> None:
    proxy = WanProxy("127.0.0.1", 1, up_mbps=None, down_mbps=None, latency_ms=0)
    with pytest.raises(RuntimeError, match="not been started"):
        _ = proxy.port
    proxy.stop()  # stopping a proxy that never started is harmless


def test_start_reports_a_port_in_use_and_refuses_a_second_start() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = WanProxy(
            "127.0.0.1",
            1,
            up_mbps=None,
            down_mbps=None,
            latency_ms=0,
            listen_port=taken.getsockname()[1],
        )
        with pytest.raises(OSError):
            busy.start()
    with (
        WanProxy("127.0.0.1", 1, up_mbps=None, down_mbps=None, latency_ms=0) as proxy,
        pytest.raises(RuntimeError, match="already running"),
    ):
        proxy.start()


def test_stall_holds_every_byte_until_healed_then_delivers_them(echo_port: int) -> None:
    with (
        WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=0) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock,
    ):
        sock.sendall(b"before")
        assert _recv_exactly(sock, 6) == b"before"
        proxy.stall(TIMEOUT)
        sock.sendall(b"during")
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):  # nothing comes back while the link is silent
            sock.recv(6)
        sock.settimeout(TIMEOUT)
        proxy.heal()
        assert _recv_exactly(sock, 6) == b"during"  # late, but whole


def test_drop_resets_open_connections_and_refuses_new_ones_until_healed(echo_port: int) -> None:
    with WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=0) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"x")
            assert _recv_exactly(sock, 1) == b"x"
            proxy.drop(TIMEOUT)
            _, reset = _read_until_reset(sock)
            assert reset
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock:
            _, reset = _read_until_reset(sock)  # the link is still down
            assert reset
        proxy.heal()
        assert _roundtrip(proxy.port, b"back") == b"back" + TRAILER
