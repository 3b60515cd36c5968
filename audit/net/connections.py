"""How long and how many: the connection limits of an aiohttp listener (aio_host.py). aiohttp
closes idle keep-alive connections but gives a client that never finishes its request head,
or trickles its body, all the time it wants; and a listener without a cap takes sockets until
the process runs out of descriptors, then every listener (gRPC and the store's files too)
fails. Here each connection is watched from accept to close:

- its request head must arrive within `header_timeout` of the connection, or of the first
  byte after the previous response;
- between requests it may stay idle `idle_timeout`;
- a request body must keep arriving, and a response keep leaving: no gap over `stall_timeout`
  (a handler that is busy, or that has stopped reading, is not the client's fault);
- at most `max_connections` are open: a new one beyond the cap closes the oldest connection
  that is idle or still sending its head (a real client sends its head at once, so that is
  the slow one) among those of the client address holding the most; if there is none (all
  inside requests, or, from the new one's own address, younger than a quarter of a second),
  the new one is closed at once.

Accept errors (EMFILE and kin) go to the event loop's exception handler once per attempt,
hundreds of times a second while descriptors are short; `AcceptErrorLog` turns them into
one line per interval."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from aiohttp import web

log = logging.getLogger(__name__)

ACCEPT_ERROR = "socket.accept() out of system resource"  # asyncio's message (selector_events.py)


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    stall_timeout: float = 30.0
    max_connections: int = 1000

    @property
    def tick(self) -> float:
        """How often the watcher looks: a fraction of the shortest timeout, at most a second."""
        return min(1.0, max(0.05, min(self.header_timeout, self.idle_timeout, self.stall_timeout) / 4))


@dataclass
class ConnectionCounts:
    """What the limits closed, since the start (read by tests and the periodic log line)."""

    accepted: int = 0
    head_timeouts: int = 0
    idle_timeouts: int = 0
    stalls: int = 0
    evicted: int = 0  # closed to make room for a new connection at the cap
    refused: int = 0  # new connections closed at once: every open one was inside a request
    accept_errors: int = 0
    open: int = 0


GRACE_S = 0.25  # a connection younger than this is never closed to make room

# the states of a connection
_HEAD, _REQUEST, _RESPONDING, _IDLE = "head", "request", "responding", "idle"


@dataclass(eq=False)
class _Watch:
    transport: asyncio.Transport
    state: str
    since: float  # when the state's clock started
    progress: float  # last sign of life inside a request
    request: web.BaseRequest | None = None
    head_since: float | None = None  # the next head's first byte, seen before the response was out
    write_buffer: int = 0
    peer: str = ""  # the client's address, without the port


class _WatchedProtocol(asyncio.Protocol):
    """Stands between the transport and aiohttp's RequestHandler: sees every connection and
    every byte, and forwards them. Request boundaries come from the middleware."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self._guard, self._inner = guard, inner
        self._refused = False

    def connection_made(self, transport):
        if not self._guard.admit(self._inner, transport):
            self._refused = True
            transport.close()
            return
        self._inner.connection_made(transport)

    def connection_lost(self, exc):
        if self._refused:
            return
        self._guard.forget(self._inner)
        self._inner.connection_lost(exc)

    def data_received(self, data):
        self._guard.saw_data(self._inner)
        self._inner.data_received(data)

    def eof_received(self):
        return self._inner.eof_received()

    def pause_writing(self):
        self._inner.pause_writing()

    def resume_writing(self):
        self._inner.resume_writing()


class ConnectionGuard:
    """The limits of one listener. All methods run on the listener's event loop."""

    def __init__(self, name: str, limits: ConnectionLimits):
        self.name, self.limits = name, limits
        self.counts = ConnectionCounts()
        self._watches: dict[object, _Watch] = {}  # by aiohttp's protocol, oldest first
        self._per_peer: Counter[str] = Counter()  # open connections per client address
        self._sweeper: asyncio.Task | None = None
        self._logged = ConnectionCounts()
        self._last_log = time.monotonic()

    def protocol_factory(self, make_handler):
        """Wrap aiohttp's protocol factory (the web.Server) for loop.create_server."""
        return lambda: _WatchedProtocol(self, make_handler())

    def start(self) -> None:
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """Marks where a request starts (its head is in) and where its handler is done."""
        watch = self._watches.get(request.protocol)
        if watch is None:
            return await handler(request)
        now = time.monotonic()
        watch.state, watch.since, watch.progress, watch.request = _REQUEST, now, now, request
        watch.head_since = None
        try:
            return await handler(request)
        except ConnectionResetError:
            # the client left, or the guard closed a stalled request: nobody to answer, nothing to log
            return web.Response(status=408)
        finally:
            now = time.monotonic()
            watch.state, watch.since, watch.progress, watch.request = _RESPONDING, now, now, None

    # the protocol's calls

    def admit(self, protocol, transport) -> bool:
        counts, now = self.counts, time.monotonic()
        peername = transport.get_extra_info("peername")
        peer = str(peername[0]) if isinstance(peername, tuple) and peername else ""
        if len(self._watches) >= self.limits.max_connections:
            victim = self._victim(peer, now)
            if victim is None:
                counts.refused += 1
                return False
            self._close(victim, "evicted")
        self._watches[protocol] = _Watch(transport, _HEAD, now, now, peer=peer)
        self._per_peer[peer] += 1
        counts.accepted += 1
        counts.open = len(self._watches)
        return True

    def _victim(self, peer: str, now: float):
        """The connection to close for a new one from `peer`: the oldest idle or unfinished
        head of the address holding the most connections (an attacker's, not the others'); if
        that address is the new one's own, not one younger than GRACE_S, whose head may simply
        not have been read yet (else a flood of new connections would push out everyone)."""
        hog = max(self._per_peer, key=self._per_peer.__getitem__)
        grace = GRACE_S if hog == peer else 0.0
        for p, w in self._watches.items():
            if w.peer == hog and w.state in (_HEAD, _IDLE) and now - w.since >= grace:
                return p
        for p, w in self._watches.items():  # that address is busy in requests: anyone's, then
            if w.state in (_HEAD, _IDLE) and now - w.since >= GRACE_S:
                return p
        return None

    def forget(self, protocol) -> None:
        watch = self._watches.pop(protocol, None)
        if watch is not None:
            self._release(watch)
        self.counts.open = len(self._watches)

    def _release(self, watch: _Watch) -> None:
        self._per_peer[watch.peer] -= 1
        if not self._per_peer[watch.peer]:
            del self._per_peer[watch.peer]

    def saw_data(self, protocol) -> None:
        watch = self._watches.get(protocol)
        if watch is None:
            return
        now = time.monotonic()
        if watch.state == _IDLE:
            watch.state, watch.since = _HEAD, now
        elif watch.state == _REQUEST and (watch.request is None or not watch.request.content.is_eof()):
            watch.progress = now
        elif watch.state != _HEAD and watch.head_since is None:  # the next request's first bytes
            watch.head_since = now

    # the watcher

    def _close(self, protocol, why: str) -> None:
        watch = self._watches.pop(protocol)
        self._release(watch)
        self.counts.open = len(self._watches)
        setattr(self.counts, why, getattr(self.counts, why) + 1)
        # a stalled write would never flush: drop it; otherwise a FIN, after what was sent
        (watch.transport.abort if why == "stalls" else watch.transport.close)()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.tick)
            try:
                self.sweep()
            except Exception:  # never let a bug stop the watcher
                log.exception("%s: the connection watcher failed", self.name)

    def sweep(self) -> None:
        lim, now = self.limits, time.monotonic()
        expired = []
        for protocol, w in self._watches.items():
            if w.transport.is_closing():
                continue
            if w.state == _HEAD and now - w.since > lim.header_timeout:
                expired.append((protocol, "head_timeouts"))
            elif w.state == _IDLE and now - w.since > lim.idle_timeout:
                expired.append((protocol, "idle_timeouts"))
            elif w.state in (_REQUEST, _RESPONDING):
                buffered = w.transport.get_write_buffer_size()
                body_pending = (
                    w.state == _REQUEST
                    and w.request is not None
                    and not w.request.content.is_eof()
                    and w.transport.is_reading()  # not paused by a handler that reads slowly
                )
                if buffered < w.write_buffer or not (body_pending or buffered):
                    w.progress = now  # the response is leaving, or nothing is waiting on the client
                w.write_buffer = buffered
                if now - w.progress > lim.stall_timeout:
                    expired.append((protocol, "stalls"))
                elif w.state == _RESPONDING and not buffered:
                    if w.head_since is not None:
                        w.state, w.since = _HEAD, w.head_since
                    else:
                        w.state, w.since = _IDLE, now
        for protocol, why in expired:
            self._close(protocol, why)
        self._log_now_and_then(now)

    def _log_now_and_then(self, now: float, every: float = 60.0) -> None:
        """One line a minute, when the limits closed or refused anything."""
        if now - self._last_log < every:
            return
        c, before = self.counts, self._logged
        fields = ("head_timeouts", "idle_timeouts", "stalls", "evicted", "refused")
        delta = {f: getattr(c, f) - getattr(before, f) for f in fields}
        self._last_log = now
        if delta["head_timeouts"] + delta["stalls"] + delta["evicted"] + delta["refused"]:
            log.warning(
                "%s: in the last %.0f s closed %d connections that sent no request head within %g s, "
                "%d that stalled over %g s, %d to make room at the cap of %d, and refused %d (%d open)",
                self.name,
                every,
                delta["head_timeouts"],
                self.limits.header_timeout,
                delta["stalls"],
                self.limits.stall_timeout,
                delta["evicted"],
                self.limits.max_connections,
                delta["refused"],
                c.open,
            )
        self._logged = ConnectionCounts(**vars(c))


@dataclass
class AcceptErrorLog:
    """An event loop exception handler: accept errors of this listener are counted and said
    once per `every` seconds; anything else goes to the loop's default handler."""

    name: str
    counts: ConnectionCounts
    every: float = 60.0
    _last: float = field(default=-1e18)
    _since_last: int = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != ACCEPT_ERROR:
            loop.default_exception_handler(context)
            return
        self.counts.accept_errors += 1
        self._since_last += 1
        now = time.monotonic()
        if now - self._last >= self.every:
            exc = context.get("exception")
            log.error(
                "%s: cannot accept connections: %s (%d times since the last such line); the process is "
                "out of file descriptors: raise `ulimit -n` or lower --max-connections",
                self.name,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                self._since_last,
            )
            self._last, self._since_last = now, 0


def grpc_connection_options(limits: ConnectionLimits) -> list[tuple[str, int]]:
    """The same limits for a gRPC server (grpc core enforces them): the HTTP/2 handshake within
    the header timeout, idle connections closed, at most `max_connections` open."""
    return [
        ("grpc.server_handshake_timeout_ms", int(limits.header_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(limits.idle_timeout * 1000)),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
    ]


FD_RESERVE = 256  # descriptors kept for everything but connections: the store, WAL, workers, pipes
# asyncio accepts up to the listen backlog in one go before any of them is admitted, and a
# connection closed to make room holds its descriptor until the next loop turn: a listener can
# briefly hold its cap plus twice this many
ACCEPT_BURST = 32


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to the hard one, so the caps decide and
    not the OS; return the soft limit now in force."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def fit_to_fd_limit(limits: ConnectionLimits, listeners: int, fd_limit: int) -> ConnectionLimits:
    """The limits with `max_connections` lowered so that `listeners` full listeners (with their
    accept bursts) and the reserve fit in `fd_limit` descriptors."""
    room = max(1, (fd_limit - FD_RESERVE) // max(1, listeners) - 2 * ACCEPT_BURST)
    if limits.max_connections <= room:
        return limits
    log.warning(
        "the open files limit (%d) allows %d connections per listener, not %d: raise `ulimit -n` for more",
        fd_limit,
        room,
        limits.max_connections,
    )
    return dataclasses.replace(limits, max_connections=room)
