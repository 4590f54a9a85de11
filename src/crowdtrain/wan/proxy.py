"""A TCP proxy that makes a loopback connection behave like a volunteer's internet link.

crowdtrain's claims about slow links (DiLoCo rounds, compressed pseudo-gradients, overlapped
outer steps) are measured on one machine, so the network between a volunteer and the
coordinator has to be emulated. The usual tool is Linux netem (Hemminger 2005, "Network
Emulation with NetEm", linux.conf.au: ``tc qdisc ... netem rate 20mbit delay 50ms``), but the
kernel this project runs on has no netem (``sch_netem`` is not built) and changing qdiscs needs
root anyway. So the emulation lives in user space, as Dummynet's pipes did (Rizzo 1997,
"Dummynet: a simple approach to the evaluation of network protocols", ACM SIGCOMM CCR 27(1)):
the volunteer connects to this proxy on 127.0.0.1, and the proxy forwards every chunk to the
coordinator no earlier than the ``LinkShaper`` of that direction says it would have arrived.

What is emulated, per direction ("up" is client → target, "down" is target → client):

* **rate**: a FIFO bottleneck serialising bytes at ``up_mbps`` / ``down_mbps`` megabits per
  second, shared by all the connections of one proxy (one volunteer), as a real access link is;
* **latency**: ``latency_ms`` of one-way propagation delay added to each direction, so the
  round-trip time is twice it; a new connection also pays one round trip before its first
  byte is forwarded, as a TCP handshake through netem would (``emulate_handshake``);
* **bandwidth-delay product**: reading continues while earlier chunks are still "in flight",
  so a bulk transfer gets the full rate whatever the latency. In-flight bytes per connection
  and direction are bounded by the link's bandwidth-delay product (Jacobson 1988, "Congestion
  Avoidance and Control", SIGCOMM; RFC 7323 §1.1) plus ``queue_bytes`` of bottleneck queue;
  beyond that the proxy stops reading, so TCP flow control pushes back on the sender and memory
  stays bounded.

Faults, for the chaos tests (tests/chaos): ``stall(seconds)`` holds every byte in both
directions, and every new connection, for that long (a link that goes silent: the sockets stay
open and nothing moves), and ``drop(seconds)`` resets every open connection and every new one
for that long (a link that goes down); ``heal()`` ends both at once.

Not emulated: loss, jitter, reordering, TCP slow start and congestion control (the loopback
TCP underneath never loses a packet). Half-closes are forwarded after the data before them;
a failure on either side (a reset, a broken pipe) resets both connections, so neither peer can
mistake it for an orderly end of stream. Nothing binds beyond loopback unless
``allow_remote=True`` is passed.

Use it from synchronous code (``start()`` runs it on a background thread with its own event
loop, ``stop()`` closes everything), as a context manager, or from async code with ``serve()``
and ``aclose()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import math
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from types import TracebackType

from crowdtrain.wan.shaper import LinkShaper

__all__ = ["WanProxy"]

log = logging.getLogger(__name__)

MIB = 1 << 20
MAX_CHUNK_BYTES = 64 * 1024
MIN_CHUNK_BYTES = 1024
CHUNK_SECONDS = 0.005  # read at most ~5 ms worth of bytes at a time, so delivery stays smooth
UNLIMITED_PIPE_BYTES = 16 * MIB  # in-flight allowance of a link with no rate limit
MAX_PIPE_BYTES = 64 * MIB  # cap on the bandwidth-delay allowance of one connection-direction
LISTEN_BACKLOG = 2048  # pending connections the listener queues (the kernel caps it at somaxconn)
_LINGER_RESET = struct.pack("ii", 1, 0)  # struct linger {l_onoff=1, l_linger=0}: close sends RST


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mbps_to_bps(name: str, mbps: float | None) -> float | None:
    if mbps is None:
        return None
    if not (math.isfinite(mbps) and mbps > 0):
        raise ValueError(f"{name} must be a positive number of Mbit/s or None, not {mbps!r}.")
    return mbps * 1e6


def _chunk_bytes(link: LinkShaper) -> int:
    if link.rate_bps is None:
        return MAX_CHUNK_BYTES
    return int(min(MAX_CHUNK_BYTES, max(MIN_CHUNK_BYTES, link.rate_bps / 8 * CHUNK_SECONDS)))


def _inflight_limit(link: LinkShaper, queue_bytes: int) -> int:
    if link.rate_bps is None:
        pipe = UNLIMITED_PIPE_BYTES
    else:
        pipe = min(MAX_PIPE_BYTES, math.ceil(link.rate_bps / 8 * link.latency_s))
    return queue_bytes + pipe


class _Direction:
    """Moves bytes from one socket to the other, each chunk no earlier than its link says."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: LinkShaper,
        queue_bytes: int,
        on_delivered: Callable[[int], None],
        hold: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._hold = hold
        self._reader = reader
        self._writer = writer
        self._link = link
        self._chunk = _chunk_bytes(link)
        self._limit = _inflight_limit(link, queue_bytes)
        self._on_delivered = on_delivered
        self._queue: deque[tuple[float, bytes]] = deque()  # (delivery time, data); b"" = EOF
        self._queued_bytes = 0
        self._has_item = asyncio.Event()
        self._has_room = asyncio.Event()
        self._has_room.set()

    async def receive(self) -> None:
        """Read chunks as they come and stamp each with its delivery time; end after EOF."""
        loop = asyncio.get_running_loop()
        while True:
            while self._queued_bytes >= self._limit:
                self._has_room.clear()
                await self._has_room.wait()
            data = await self._reader.read(self._chunk)
            self._queue.append((self._link.schedule(loop.time(), len(data)), data))
            self._queued_bytes += len(data)
            self._has_item.set()
            if not data:
                return

    async def deliver(self) -> None:
        """Write each chunk at its delivery time, in order; forward EOF as a half-close."""
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._has_item.clear()
                await self._has_item.wait()
            due, data = self._queue.popleft()
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if self._hold is not None:
                await self._hold()
            if not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(data)
            await self._writer.drain()
            self._queued_bytes -= len(data)
            if self._queued_bytes < self._limit:
                self._has_room.set()
            self._on_delivered(len(data))


def _abort(writer: asyncio.StreamWriter | None) -> None:
    """Close the connection with a TCP reset, so the peer sees a failure and not an EOF.

    ``transport.abort()`` alone only drops the buffers: the kernel then sends a FIN, and a peer
    that has read everything sees an orderly end of stream, so a failure on the far side would
    reach it as silently truncated data. A zero linger timeout makes the close send RST instead
    (socket(7), SO_LINGER), as a failure on the far side of a real link would.
    """
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):  # TimeoutError is an OSError
        await asyncio.wait_for(writer.wait_closed(), timeout=5.0)


class WanProxy:
    """Forward TCP connections to ``target_host:target_port`` through emulated WAN links.

    ``up_mbps`` / ``down_mbps`` are the client → target and target → client rates in Mbit/s
    (None: unlimited) and ``latency_ms`` the one-way delay added to each direction. All the
    connections through one proxy share its two links (``up_link``, ``down_link``); to make
    several proxies share one volunteer's links, build them with ``WanProxy.from_links``.
    """

    def __init__(
        self,
        target_host: str,
        target_port: int,
        *,
        up_mbps: float | None,
        down_mbps: float | None,
        latency_ms: float,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        allow_remote: bool = False,
        queue_bytes: int = MIB,
        emulate_handshake: bool = True,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not _is_loopback(listen_host) and not allow_remote:
            raise ValueError(
                f"Refusing to listen on non-loopback address {listen_host!r}; "
                "pass allow_remote=True if you really mean to expose the proxy."
            )
        if not (math.isfinite(latency_ms) and latency_ms >= 0):
            raise ValueError(f"latency_ms must be a non-negative number, not {latency_ms!r}.")
        if queue_bytes <= 0:
            raise ValueError(f"queue_bytes must be positive, not {queue_bytes!r}.")
        self.target_host = target_host
        self.target_port = target_port
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.queue_bytes = queue_bytes
        self.emulate_handshake = emulate_handshake
        self.connect_timeout_s = connect_timeout_s
        self.up_link = LinkShaper(_mbps_to_bps("up_mbps", up_mbps), latency_ms / 1e3)
        self.down_link = LinkShaper(_mbps_to_bps("down_mbps", down_mbps), latency_ms / 1e3)
        self._bytes_up = 0
        self._bytes_down = 0
        self._port: int | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stalled_until = 0.0  # time.monotonic(): nothing moves before it
        self._down_until = 0.0  # time.monotonic(): connections are reset before it
        self._writers: dict[asyncio.Task[None], list[asyncio.StreamWriter]] = {}

    @classmethod
    def from_links(
        cls,
        target_host: str,
        target_port: int,
        *,
        up_link: LinkShaper,
        down_link: LinkShaper,
        listen_host: str = "127.0.0.1",
        listen_port: int = 0,
        allow_remote: bool = False,
        queue_bytes: int = MIB,
        emulate_handshake: bool = True,
        connect_timeout_s: float = 10.0,
    ) -> WanProxy:
        """A proxy whose connections use the given link shapers, which others may share."""
        proxy = cls(
            target_host,
            target_port,
            up_mbps=None,
            down_mbps=None,
            latency_ms=0.0,
            listen_host=listen_host,
            listen_port=listen_port,
            allow_remote=allow_remote,
            queue_bytes=queue_bytes,
            emulate_handshake=emulate_handshake,
            connect_timeout_s=connect_timeout_s,
        )
        proxy.up_link = up_link
        proxy.down_link = down_link
        return proxy

    # -- observation ------------------------------------------------------------------------

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the target so far."""
        return self._bytes_up

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to clients so far."""
        return self._bytes_down

    @property
    def port(self) -> int:
        """The port the proxy listens on; only known once it has started."""
        if self._port is None:
            raise RuntimeError("The WAN proxy has not been started; call start() or serve().")
        return self._port

    @property
    def active_connections(self) -> int:
        """Client connections currently being proxied."""
        return len(self._tasks)

    # -- async API --------------------------------------------------------------------------

    async def serve(self) -> int:
        """Start listening on the running event loop and return the bound port."""
        if self._server is not None:
            raise RuntimeError("This WAN proxy is already running.")
        self._closing = False
        self._server = await asyncio.start_server(
            self._on_connect, self.listen_host, self.listen_port, backlog=LISTEN_BACKLOG
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.debug(
            "WAN proxy on %s:%d -> %s:%d (up %r, down %r)",
            self.listen_host,
            self._port,
            self.target_host,
            self.target_port,
            self.up_link,
            self.down_link,
        )
        return self._port

    async def aclose(self) -> None:
        """Stop listening and abort every open connection; safe to call twice."""
        self._closing = True
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # let aborted transports run their connection_lost callbacks

    async def __aenter__(self) -> WanProxy:
        await self.serve()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- faults (tests/chaos) ----------------------------------------------------------------

    def stall(self, seconds: float) -> None:
        """For SECONDS from now, forward nothing: bytes in either direction and new connections
        wait (their sockets stay open), then everything continues where it stopped."""
        self._stalled_until = max(self._stalled_until, time.monotonic() + seconds)

    def drop(self, seconds: float = 0.0) -> None:
        """Reset every open connection (both sides see a TCP reset), and every connection
        made in the next SECONDS. Call it from another thread than the proxy's (`start`)."""
        self._down_until = max(self._down_until, time.monotonic() + seconds)
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._drop_open)

    def heal(self) -> None:
        """End a stall and a drop now: held bytes move on, new connections are proxied."""
        self._stalled_until = self._down_until = 0.0

    def _drop_open(self) -> None:
        for writers in self._writers.values():
            for writer in writers:
                _abort(writer)

    async def _hold(self) -> None:
        while (wait := self._stalled_until - time.monotonic()) > 0:
            await asyncio.sleep(min(wait, 0.05))

    # -- sync API ---------------------------------------------------------------------------

    def start(self) -> int:
        """Run the proxy on a background thread with its own event loop; return its port."""
        if self._thread is not None:
            raise RuntimeError("This WAN proxy is already running.")
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as exc:  # reported to start() below
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self.aclose())
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        thread = threading.Thread(target=run, name="crowdtrain-wanproxy", daemon=True)
        thread.start()
        ready.wait()
        if failure:
            thread.join()
            raise failure[0]
        self._loop, self._thread = loop, thread
        return self.port

    def stop(self) -> None:
        """Close the listener and all connections, then join the thread; safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        future = asyncio.run_coroutine_threadsafe(self.aclose(), loop)
        with contextlib.suppress(Exception):
            future.result(timeout=30.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        self._loop, self._thread = None, None

    def __enter__(self) -> WanProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- connections ------------------------------------------------------------------------

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing or time.monotonic() < self._down_until:
            _abort(writer)
            return
        task = asyncio.get_running_loop().create_task(self._proxy(reader, writer))
        self._tasks.add(task)
        self._writers[task] = [writer]
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: self._writers.pop(t, None))

    def _count_up(self, nbytes: int) -> None:
        self._bytes_up += nbytes

    def _count_down(self, nbytes: int) -> None:
        self._bytes_down += nbytes

    async def _proxy(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        """One client connection: handshake delay, connect to the target, pump both ways.

        Never raises except when cancelled: every failure ends in both sockets being aborted.
        """
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        target_writer: asyncio.StreamWriter | None = None
        clean = False
        try:
            if self.emulate_handshake:  # the SYN reaches the target one up-latency later
                await asyncio.sleep(self.up_link.latency_s)
            await self._hold()
            try:
                target_reader, connected = await asyncio.wait_for(
                    asyncio.open_connection(self.target_host, self.target_port),
                    timeout=self.connect_timeout_s,
                )
            except OSError as exc:  # refused, unreachable, or timed out
                log.debug(
                    "WAN proxy could not reach %s:%d: %s", self.target_host, self.target_port, exc
                )
                await _close(client_writer)  # the client sees an orderly close
                clean = True
                return
            target_writer = connected
            task = asyncio.current_task()
            if task in self._writers:
                self._writers[task].append(connected)
            if self.emulate_handshake:  # ... and the SYN-ACK is back one down-latency later
                handshake_done = accepted + self.up_link.latency_s + self.down_link.latency_s
                await asyncio.sleep(max(0.0, handshake_done - loop.time()))
            if await self._pump(client_reader, client_writer, target_reader, connected):
                await _close(connected)
                await _close(client_writer)
                clean = True
        except Exception:  # a bug, not a network event: log it here, not in the loop's handler
            log.exception("WAN proxy connection ended with an unexpected error")
        finally:
            if not clean:
                _abort(client_writer)
                _abort(target_writer)

    async def _pump(
        self,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        target_reader: asyncio.StreamReader,
        target_writer: asyncio.StreamWriter,
    ) -> bool:
        """Run both directions until both have forwarded EOF (True) or one side fails (False)."""
        up = _Direction(
            client_reader, target_writer, self.up_link, self.queue_bytes, self._count_up, self._hold
        )
        down = _Direction(
            target_reader,
            client_writer,
            self.down_link,
            self.queue_bytes,
            self._count_down,
            self._hold,
        )
        failed = False
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(up.receive())
                group.create_task(up.deliver())
                group.create_task(down.receive())
                group.create_task(down.deliver())
        except* OSError as failure:  # reset, broken pipe, connection lost
            log.debug("WAN proxy connection failed: %r", failure.exceptions)
            failed = True
        return not failed
