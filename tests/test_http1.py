"""The plain-HTTP client of the lean request path (factory/teachers/http1.py) against a loopback server that
answers each request with scripted bytes: how an answer ends (length, chunks, close), keep-alive, and every
way an answer can be broken. The fake OpenAI/Anthropic server drives it through the teachers in test_wire.py."""
from __future__ import annotations

import asyncio
import gzip

import openai
import pytest

from apprentice.errors import TeacherError
from factory.teachers.http1 import Http1Pool, ProtocolError
from factory.teachers.wire import Wire

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 12\r\n\r\n{"ok": true}'


class Scripted:
    """A loopback server: reads each request (head, then Content-Length bytes), answers with the next script
    entry (bytes, or a coroutine function taking the writer, which may close it), and counts connections and
    requests."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/v1/chat/completions"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def _handle(self, reader, writer):
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if callable(answer):
                    await answer(writer)
                    if writer.is_closing():
                        return
                    continue
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def pool(server, connections=4, timeout_s=5.0):
    return Http1Pool(server.url, {"Authorization": "Bearer sk-test", "Content-Type": "application/json"},
                     connections=connections, timeout_s=timeout_s)


async def close_after(data: bytes, writer) -> None:
    writer.write(data)
    await writer.drain()
    writer.close()


def test_a_request_carries_the_headers_and_the_body_and_the_connection_is_kept_for_the_next():
    async def main():
        async with Scripted(OK, OK) as server:
            client = pool(server)
            first = await client.post(b'{"a": 1}')
            second = await client.post(b'{"b": 2}')
            client.close()
            return server, first, second

    server, first, second = asyncio.run(main())
    assert (first.status, first.content, second.content) == (200, b'{"ok": true}', b'{"ok": true}')
    assert ("Content-Type", "application/json") in first.headers, first.headers
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:"), head
    assert b"\r\nAuthorization: Bearer sk-test\r\n" in head and head.endswith(b"\r\nContent-Length: 8"), head
    assert body == b'{"a": 1}', body
    assert server.connections == 1, "the second request went on the first one's connection"


def test_chunked_gzip_and_until_close_bodies_are_read_whole():
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
    packed = gzip.compress(b"squeezed")
    zipped = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(packed), packed)
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + OK
    until_close = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nto the end"

    async def main():
        async with Scripted(chunked, zipped, interim, lambda w: close_after(until_close, w)) as server:
            client = pool(server)
            return [(await client.post(b"{}")).content for _ in range(4)], server

    contents, server = asyncio.run(main())
    assert contents == [b"hello world", b"squeezed", b'{"ok": true}', b"to the end"]
    assert server.connections == 1, "all but the last kept the connection"


def test_connection_close_and_http_1_0_are_not_reused():
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"

    async def main():
        async with Scripted(closing, OK) as server:
            client = pool(server)
            await client.post(b"{}")
            await client.post(b"{}")
            return server, client

    server, client = asyncio.run(main())
    assert server.connections == 2, "a connection the server closes is not asked again"
    assert client.open == 1, "the pool counts only the connection still open"


@pytest.mark.parametrize("answer, words", [
    (b"SMTP ready\r\n\r\n", "not an HTTP status line"),
    (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1 status line"),
    (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "a header line without a colon"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n", "is not a number"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "not a hex number"),
    (b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 4\r\n\r\nnope", "does not decompress"),
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 70_000, "over 64 KiB"),
])
def test_an_answer_that_is_not_http_is_a_protocol_error_and_its_connection_is_dropped(answer, words):
    async def main():
        async with Scripted(answer, OK) as server:
            client = pool(server)
            with pytest.raises(ProtocolError, match=words):
                await client.post(b"{}")
            assert client.open == 0, "the broken connection is closed, not pooled"
            return (await client.post(b"{}")).content, server

    content, server = asyncio.run(main())
    assert content == b'{"ok": true}' and server.connections == 2, "the next request gets a new connection"


def test_a_server_that_closes_before_the_answer_ends_is_a_connection_error_through_the_wire():
    half = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"

    async def main():
        async with Scripted(lambda w: close_after(half, w)) as server:
            client = openai.AsyncOpenAI(api_key="sk-test", base_url=server.url.rsplit("/chat/", 1)[0])
            wire = Wire(client, openai, "chat/completions", timeout_s=5.0, connections=2)
            assert wire.pool is None, "the factory stays on aiohttp's client unless asked"
            assert wire.prefer_http1() and wire.pool is not None, "plain HTTP with no proxy takes this client"
            with pytest.raises(TeacherError) as caught:
                await wire.post({"model": "m"})
            await wire.aclose()
            return caught.value

    error = asyncio.run(main())
    assert str(error).startswith("connection error: the server closed the connection"), str(error)
    assert error.retryable and error.status is None


def test_a_silent_server_times_out_and_a_cancelled_request_closes_its_connection():
    async def silent(writer):
        await asyncio.sleep(5)

    async def main():
        async with Scripted(silent, silent) as server:
            client = pool(server, timeout_s=0.2)
            with pytest.raises(asyncio.TimeoutError):
                await client.post(b"{}")
            task = asyncio.ensure_future(client.post(b"{}"))
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return client

    client = asyncio.run(main())
    assert client.open == 0 and not client.idle, "neither connection is kept: their answers would come late"


def test_no_more_connections_than_the_pool_allows_and_the_waiters_all_get_one():
    async def slow(writer):
        await asyncio.sleep(0.05)
        writer.write(OK)
        await writer.drain()

    async def main():
        async with Scripted(*[slow] * 6) as server:
            client = pool(server, connections=2)
            replies = await asyncio.gather(*(client.post(b"{}") for _ in range(6)))
            return replies, server

    replies, server = asyncio.run(main())
    assert [reply.status for reply in replies] == [200] * 6
    assert server.connections == 2, "two connections at most; the other requests waited for one"


def test_unasked_bytes_on_an_idle_connection_drop_it_and_a_non_http_url_is_refused():
    async def chatty(writer):
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 200 OK\r\n")  # more than was asked for, on the idle connection

    async def main():
        async with Scripted(chatty, OK) as server:
            client = pool(server)
            await client.post(b"{}")
            await asyncio.sleep(0.1)
            await client.post(b"{}")
            return server

    assert asyncio.run(main()).connections == 2, "the connection that spoke out of turn was dropped"
    with pytest.raises(ValueError, match="for http:// URLs"):
        Http1Pool("https://api.openai.com/v1/chat/completions", {}, connections=1, timeout_s=1)
