"""An aiohttp application served from its own thread and event loop, with a thread pool for
the blocking work behind it. The socket is bound up front, so a busy port is an error at start.
Every connection is held to `ConnectionLimits` (connections.py): head, idle and stall timeouts
and a cap. Used by the OTLP/HTTP receiver (collector_ext) and the read API."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from .connections import ACCEPT_BURST, AcceptErrorLog, ConnectionGuard, ConnectionLimits


class ThreadedAioServer:
    def __init__(
        self, name: str, host: str, port: int, *, threads: int, limits: ConnectionLimits | None = None
    ):
        self.name, self.host, self.port = name, host, port
        self.limits = limits or ConnectionLimits()
        self.guard = ConnectionGuard(name, self.limits)
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"{name}-loop", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self, app: web.Application, what: str, ssl_context=None, **runner_options) -> int:
        """Bind, then serve `app` (`what` names it in errors), over TLS with `ssl_context`;
        return the port bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as e:
            sock.close()
            raise OSError(f"cannot listen for {what} on {self.host}:{self.port}: {e.strerror}") from None
        self.port = sock.getsockname()[1]
        self._thread.start()
        asyncio.run_coroutine_threadsafe(
            self._serve(app, sock, ssl_context, runner_options), self._loop
        ).result()
        return self.port

    async def _serve(
        self, app: web.Application, sock: socket.socket, ssl_context, runner_options: dict
    ) -> None:
        asyncio.get_running_loop().set_exception_handler(AcceptErrorLog(self.name, self.guard.counts))
        app.middlewares.insert(0, self.guard.middleware)
        # aiohttp's own idle timeout only as a backstop: the guard closes first, and counts it
        backstop = self.limits.idle_timeout * 1.5 + 1
        self._runner = web.AppRunner(app, access_log=None, keepalive_timeout=backstop, **runner_options)
        await self._runner.setup()
        await _GuardedSite(self._runner, sock, self.guard, ssl_context=ssl_context).start()
        self.guard.start()

    async def run_blocking(self, fn: Callable, *args):
        """Run `fn(*args)` on the pool, from a handler."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def stop(self) -> None:
        """Stop accepting; requests in flight finish (up to the runner's shutdown timeout)."""
        if self._runner is not None:
            self._loop.call_soon_threadsafe(self.guard.stop)
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self.executor.shutdown(wait=True)


LISTEN_QUEUE = 1024


class _GuardedSite(web.SockSite):
    """SockSite with aiohttp's protocol wrapped by the guard, and TLS handshakes held to the
    header timeout (SockSite has no say in either)."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard, *, ssl_context):
        super().__init__(runner, sock, ssl_context=ssl_context, backlog=ACCEPT_BURST)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(self._runner.server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            ssl_handshake_timeout=self._guard.limits.header_timeout if self._ssl_context else None,
        )
        # asyncio's backlog is also how many it accepts in one go; the kernel may queue more
        # (they hold no descriptor of ours until accepted), so a burst of clients waits rather
        # than having its connections dropped
        self._sock.listen(LISTEN_QUEUE)
