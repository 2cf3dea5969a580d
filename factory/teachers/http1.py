"""POST over plain HTTP/1.1 with keep-alive, on asyncio's own transports: the lean path's lean path.

For an `http://` endpoint (a vLLM or SGLang server, the fake, anything on the local network) with no proxy in
the way, `Wire` posts here instead of through aiohttp's client, whose session, request and response objects, a
task per request to write the body and a timer moved on every read cost more CPU than the rest of a request's
trip: against the fake at 64 in flight, 97 µs a request there and 36 µs here (benchmarks/http_client.py). The
serve router makes one such request per answer, on the same cores as its clients and often its backend
(benchmarks/serve_overhead.py). TLS and proxies stay with aiohttp.

What is read: the status line, the headers, a body sized by Content-Length, sent chunked, or ended by the
connection's close; gzip or deflate is undone. A connection answers one request at a time and goes back to the
pool unless the server said `Connection: close`. Timeouts follow aiohttp's `connect` and `sock_read`: the
connection must be made, and each read must come, within `timeout_s`.
"""
from __future__ import annotations

import asyncio
import zlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 1 << 16  # a response head longer than this is not an HTTP server's


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.1 as this client reads it."""


@dataclass(slots=True)
class Reply:
    status: int
    headers: list[tuple[str, str]]  # as sent: names in their own case, in order
    content: bytes


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        self.waiter: asyncio.Future[Reply] | None = None
        self.buffer = bytearray()
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self._reset()

    def _reset(self) -> None:
        self.buffer.clear()
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body_at = -1     # where the body starts in the buffer, -1 while the head is not read
        self.length = -1      # Content-Length; -1: chunked or until close
        self.chunked = False
        self.keep_alive = True
        self.chunks: list[bytes] = []
        self.chunk_at = -1    # chunked: where the next chunk's size line starts, -1 before the first

    # ---- asyncio.Protocol ----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():  # nothing was asked: the connection is not usable
            self.close()
            return
        self.buffer += data
        self.last_read = asyncio.get_running_loop().time()
        try:
            reply = self._parse()
        except ProtocolError as exc:
            self._fail(exc)
            return
        if reply is not None:
            self.reusable = self.keep_alive
            self._finish(reply)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost reads what came

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is None or self.waiter.done():
            return
        if exc is None and self.body_at >= 0 and self.length < 0 and not self.chunked:
            self._finish(self._reply(bytes(self.buffer[self.body_at:])))  # a body ended by the close
        else:
            self._fail(ProtocolError(f"the server closed the connection ({exc or 'before the answer ended'})"))

    # ---- one request ---------------------------------------------------------------------------------------
    def request(self, data: bytes) -> asyncio.Future[Reply]:
        loop = asyncio.get_running_loop()
        self._reset()
        self.reusable = False
        self.waiter = loop.create_future()
        assert self.transport is not None
        self.transport.write(data)
        self.last_read = loop.time()
        self.timer = loop.call_later(self.timeout_s, self._check_timeout)
        return self.waiter

    def _check_timeout(self) -> None:
        """Each read must come within timeout_s (aiohttp's sock_read): one timer, moved on only when it fires."""
        if self.waiter is None or self.waiter.done():
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self.last_read
        if quiet >= self.timeout_s:
            self._fail(asyncio.TimeoutError())
        else:
            self.timer = loop.call_later(self.timeout_s - quiet, self._check_timeout)

    def _finish(self, reply: Reply) -> None:
        self._stop_timer()
        assert self.waiter is not None
        self.waiter.set_result(reply)

    def _fail(self, exc: BaseException) -> None:
        self._stop_timer()
        self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        self.closed = True
        self.reusable = False
        self._stop_timer()
        if self.transport is not None:
            self.transport.close()

    # ---- reading the answer --------------------------------------------------------------------------------
    def _parse(self) -> Reply | None:
        buffer = self.buffer
        while self.body_at < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ProtocolError("the answer's head is over 64 KiB")
                return None
            self._read_head(bytes(buffer[:end]))
            if 100 <= self.status < 200:  # an interim answer (100 Continue): the real one follows
                del buffer[:end + 4]
                self.headers = []
                continue
            self.body_at = end + 4
        if self.status in (204, 304):
            return self._reply(b"")
        if self.chunked:
            return self._read_chunks()
        if self.length >= 0:
            if len(buffer) - self.body_at < self.length:
                return None
            if len(buffer) - self.body_at > self.length:
                self.keep_alive = False  # bytes nobody asked for: what follows on this connection is not ours
            return self._reply(bytes(buffer[self.body_at:self.body_at + self.length]))
        return None  # until the connection closes

    def _read_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        try:
            self.status = int(rest[:3])
        except ValueError:
            raise ProtocolError(f"not an HTTP status line: {lines[0][:80]!r}") from None
        if not version.startswith(b"HTTP/1."):
            raise ProtocolError(f"not an HTTP/1 status line: {lines[0][:80]!r}")
        self.keep_alive = version == b"HTTP/1.1"
        self.length, self.chunked = -1, False
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                raise ProtocolError(f"a header line without a colon: {line[:80]!r}")
            key, text = name.strip().decode("latin-1"), value.strip().decode("latin-1")
            self.headers.append((key, text))
            lower = key.lower()
            if lower == "content-length":
                try:
                    self.length = int(text)
                except ValueError:
                    raise ProtocolError(f"Content-Length {text!r} is not a number") from None
            elif lower == "transfer-encoding":
                self.chunked = "chunked" in text.lower()
            elif lower == "connection":
                self.keep_alive = "close" not in text.lower() and (self.keep_alive or "keep-alive" in text.lower())
        if self.chunked:
            self.length = -1

    def _read_chunks(self) -> Reply | None:
        buffer = self.buffer
        at = self.body_at if self.chunk_at < 0 else self.chunk_at
        while True:
            line_end = buffer.find(b"\r\n", at)
            if line_end < 0:
                break
            try:
                size = int(bytes(buffer[at:line_end]).split(b";", 1)[0], 16)
            except ValueError:
                raise ProtocolError("a chunk size that is not a hex number") from None
            if size == 0:  # the last chunk, then trailers (usually none) and an empty line
                end = buffer.find(b"\r\n\r\n", line_end)
                if end < 0:
                    break
                if len(buffer) > end + 4:
                    self.keep_alive = False
                return self._reply(b"".join(self.chunks))
            if len(buffer) < line_end + 2 + size + 2:
                break
            self.chunks.append(bytes(buffer[line_end + 2:line_end + 2 + size]))
            at = line_end + 2 + size + 2
        self.chunk_at = at
        return None

    def _reply(self, content: bytes) -> Reply:
        for key, value in self.headers:
            if key.lower() == "content-encoding" and value.lower() in ("gzip", "deflate"):
                try:  # wbits 47: a gzip or zlib header, whichever came
                    content = zlib.decompress(content, 47)
                except zlib.error as exc:
                    raise ProtocolError(f"the {value} body does not decompress: {exc}") from None
        return Reply(self.status, self.headers, content)


class Http1Pool:
    """POST bodies to one `http://` URL on at most `connections` keep-alive connections."""

    def __init__(self, url: str, headers: dict[str, str], *, connections: int, timeout_s: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{url}: Http1Pool is for http:// URLs")
        self.host, self.port = parts.hostname, parts.port or 80
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [f"POST {target} HTTP/1.1", f"Host: {parts.netloc.rsplit('@', 1)[-1]}"]  # no user:password@
        lines += [f"{key}: {value}" for key, value in headers.items()
                  if key.lower() not in ("host", "content-length", "connection", "transfer-encoding")]
        self.head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self.connections = connections
        self.timeout_s = timeout_s
        self.idle: list[_Connection] = []
        self.open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def post(self, body: bytes) -> Reply:
        """The answer (any status); ConnectionError, OSError or asyncio.TimeoutError when there is none."""
        connection = await self._acquire()
        try:
            reply = await connection.request(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
        except BaseException:
            connection.close()  # cancelled or failed halfway: what is left on it would answer the wrong request
            self._release(connection)
            raise
        self._release(connection)
        return reply

    async def _acquire(self) -> _Connection:
        while True:
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed:
                    return connection
                self.open -= 1  # the server closed it while it waited
            if self.open < self.connections:
                self.open += 1
                try:
                    _, connection = await asyncio.wait_for(asyncio.get_running_loop().create_connection(
                        lambda: _Connection(self.timeout_s), self.host, self.port), self.timeout_s)
                except BaseException:
                    self.open -= 1
                    self._wake()
                    raise
                return connection
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self.waiters:
                    self.waiters.remove(waiter)
                elif waiter.done() and not waiter.cancelled():
                    self._wake()  # it was woken for a free connection it will not take: pass it on
                raise

    def _release(self, connection: _Connection) -> None:
        if connection.reusable and not connection.closed and not self.closed:
            self.idle.append(connection)
        else:
            connection.close()
            self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for connection in self.idle:
            connection.close()
        self.open -= len(self.idle)
        self.idle.clear()
