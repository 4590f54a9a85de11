"""WanProxy over loopback: integrity, half-close, failures, shutdown, counters, shaping.

Timing is only ever checked from below, where physics guarantees it (bytes cannot cross a
1 Mbit/s link faster than 1 Mbit/s); the box is shared, so nothing is checked from above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from crowdtrain.wan import LinkShaper, WanProxy

TRAILER = b"<target saw eof>"
TIMEOUT = 15.0


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
def closed_port() -> int:
    """A loopback port nobody listens on (connections to it are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        assert echoed == payload + TRAILER
        assert proxy.bytes_up == len(payload)
        assert proxy.bytes_down == len(payload) + len(TRAILER)


def test_unlimited_links_and_no_latency(echo_port: int) -> None:
    payload = os.urandom(1_000_000)
    with WanProxy("127.0.0.1", echo_port, up_mbps=None, down_mbps=None, latency_ms=0) as proxy:
        assert _roundtrip(proxy.port, payload) == payload + TRAILER


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
        assert results == [p + TRAILER for p in payloads]

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
            assert sock.recv(4) == b"ping"
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


def test_target_failure_closes_the_client(caplog: pytest.LogCaptureFixture) -> None:
    """A target that resets the connection mid-stream: the client's side is closed too."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def reset_after_first_bytes() -> None:
        conn, _ = listener.accept()
        conn.recv(10)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # linger 0: RST

    thread = threading.Thread(target=reset_after_first_bytes, daemon=True)
    thread.start()
    with (
        listener,
        WanProxy("127.0.0.1", port, up_mbps=None, down_mbps=None, latency_ms=0) as proxy,
        socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT) as sock,
    ):
        sock.sendall(b"0123456789")
        assert _sees_closed(sock)
        thread.join()
    assert _no_loop_errors(caplog.records) == []


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
