"""Daemon-side RPC over the protocol: requests with futures, pipelined, in order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any

from syncd import __version__
from syncd.protocol import messages as m
from syncd.protocol.codec import Connection, ProtocolError
from syncd.transport.channel import Channel

HELLO_TIMEOUT = 20.0
DIGESTS_CHUNK = 5000  # files per TarDigests message (about 400 KB)
TAR_WINDOW = 16 * 1024 * 1024  # tar data the agent may send ahead of our credits
DIRECT_TAR = "tar-direct"  # the agent's capability: its host's GNU tar takes streams directly


class AgentError(Exception):
    """The agent refused a request or the link to it failed."""


def _reply(item: Any) -> Any:
    """A queued reply, or the error it stands for (a Failure, or the link's exception)."""
    if isinstance(item, BaseException):
        raise AgentError(str(item))
    if isinstance(item, m.Failure):
        raise AgentError(item.message)
    return item


class AgentClient:
    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.conn = Connection("syncd " + __version__, ("scan", "apply", "blob", "fetch"))
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Queue[Any]] = {}
        self._abandoned: set[int] = set()  # streams closed before their end: late replies are dropped
        self.changes: asyncio.Queue[m.Changes] = asyncio.Queue()
        self._hello = asyncio.get_running_loop().create_future()
        self._reader: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.bytes_sent = 0  # wire bytes, framing included
        self.bytes_received = 0

    async def start(self) -> m.Hello:
        self.begin()
        return await self.wait_hello()

    def begin(self) -> None:
        """Send our Hello and start reading. Requests may follow at once: the agent
        serves them in order once it has started."""
        self._send_raw(self.conn.initiate())
        self._reader = asyncio.create_task(self._read_loop())

    async def wait_hello(self) -> m.Hello:
        try:
            return await asyncio.wait_for(asyncio.shield(self._hello), HELLO_TIMEOUT)
        except TimeoutError:
            raise AgentError("the agent did not answer the handshake") from None

    def _send_raw(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        try:
            self.channel.write(data)
        except (ConnectionError, OSError) as exc:
            self._fail(AgentError(f"link lost: {exc}"))
            raise AgentError(f"link lost: {exc}") from None

    def send(self, message: Any) -> None:
        if self.error is not None:
            raise AgentError(str(self.error))
        for data in self.conn.send_parts(message):
            self._send_raw(data)

    async def drain(self) -> None:
        try:
            await self.channel.drain()
        except (ConnectionError, OSError) as exc:
            self._fail(AgentError(f"link lost: {exc}"))
            raise AgentError(f"link lost: {exc}") from None

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self.channel.read()
                self.bytes_received += len(data)
                if not data:
                    status = await self.channel.exit_status(1.0)
                    detail = self.channel.stderr_text()
                    raise AgentError(
                        "the agent exited" + (f" (status {status})" if status is not None else "")
                        + (f": {detail}" if detail else "")
                    )
                for message in self.conn.receive_data(data):
                    queue = self._dispatch(message)
                    if queue is not None:
                        queue.put_nowait(message)
        except (ProtocolError, AgentError, ConnectionError, OSError) as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            self._fail(AgentError("connection closed"))
            raise

    def _fail(self, exc: BaseException) -> None:
        if isinstance(exc, ProtocolError):
            exc = AgentError(f"the agent broke the protocol: {exc}")
        self.error = exc
        if not self._hello.done():
            self._hello.set_exception(AgentError(str(exc)))
        for queue in self._waiting.values():
            queue.put_nowait(exc)
        self.changes.put_nowait(m.Changes((), True))  # wake whoever waits for changes

    def _dispatch(self, message: Any) -> asyncio.Queue[Any] | None:
        """Handle a message; return the queue it must go to, for requests' replies."""
        if isinstance(message, m.Hello):
            if not self._hello.done():
                self._hello.set_result(message)
            return None
        if isinstance(message, m.Changes):
            self.changes.put_nowait(message)
            return None
        if isinstance(message, m.Fatal):
            raise AgentError(f"the agent gave up: {message.message}")
        req = getattr(message, "req", None)
        queue = self._waiting.get(req) if isinstance(req, int) else None
        if queue is None:
            if req in self._abandoned:
                return None  # the rest of a stream we stopped reading
            raise ProtocolError(f"unsolicited {type(message).__name__}")
        return queue

    def _request(self, make: Any) -> AsyncIterator[Any]:
        """Send a request now (so it precedes whatever is sent next); iterate over its
        replies."""
        req = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting[req] = queue
        try:
            self.send(make(req))
        except BaseException:
            self._waiting.pop(req, None)
            raise
        return self._replies(req, queue)

    async def _replies(self, req: int, queue: asyncio.Queue[Any]) -> AsyncIterator[Any]:
        try:
            while True:
                yield _reply(await queue.get())
        finally:
            self._waiting.pop(req, None)

    async def call(self, make: Any) -> Any:
        async for reply in self._request(make):
            return reply
        raise AgentError("no reply")

    async def open(self, root: str, rules: dict[str, list[str]], create: bool, watch: bool) -> m.Opened:
        reply = await self.call(lambda req: m.Open(req, root, rules, create, watch))
        assert isinstance(reply, m.Opened)
        return reply

    async def _entries(self, make: Any) -> tuple[list[m.Entry], list[str], list[str]]:
        entries: list[m.Entry] = []
        absent: list[str] = []
        unlisted: list[str] = []
        async for chunk in self._request(make):
            entries.extend(chunk.entries)
            absent.extend(chunk.absent)
            unlisted.extend(chunk.unlisted)
            if chunk.done:
                break
        return entries, absent, unlisted

    async def scan(self, paths: list[str] | None,
                   recursive: bool = True) -> tuple[list[m.Entry], list[str], list[str]]:
        """(entries, absent paths, directories the walk could not list)."""
        wire = None if paths is None else tuple(paths)
        return await self._entries(lambda req: m.Scan(req, wire, recursive))

    def supports(self, capability: str) -> bool:
        """Whether the agent announced ``capability`` in its Hello."""
        peer = self.conn.peer
        return peer is not None and capability in peer.capabilities

    async def scan_tree(self, prints: dict[str, bytes]) -> tuple[list[m.Entry], set[str]]:
        """Scan the whole root, leaving out directories whose listing still has the given
        fingerprint; return the entries of the others and the set of unchanged ones."""
        dirs = tuple(prints)
        blob = b"".join(prints.values())
        entries: list[m.Entry] = []
        matched: set[str] | None = None
        async for reply in self._request(lambda req: m.ScanTree(req, dirs, blob)):
            if isinstance(reply, m.TreeMatched) and matched is None:
                bits = reply.matched
                if len(bits) != (len(dirs) + 7) // 8:
                    raise AgentError("the agent answered a tree scan with a malformed bitmap")
                matched = {d for i, d in enumerate(dirs) if bits[i >> 3] >> (i & 7) & 1}
            elif isinstance(reply, m.ScanChunk) and matched is not None:
                entries.extend(reply.entries)
                if reply.done:
                    break
            else:
                raise AgentError(f"the agent answered a tree scan with {type(reply).__name__} out of turn")
        assert matched is not None  # the loop ends only after the bitmap and the last chunk
        return entries, matched

    async def hash(self, paths: list[str]) -> tuple[list[m.Entry], list[str]]:
        entries, absent, _ = await self._entries(lambda req: m.Hash(req, tuple(paths)))
        return entries, absent

    async def apply(self, ops: list[m.Op]) -> tuple[m.OpResult, ...]:
        return await self.submit_apply(ops)

    def submit_apply(self, ops: list[m.Op]) -> asyncio.Future[tuple[m.OpResult, ...]]:
        """Write an Apply batch now (so it precedes whatever is sent next) and return a
        future for its results."""
        req = next(self._ids)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._waiting[req] = queue
        try:
            self.send(m.Apply(req, tuple(ops)))
        except BaseException:
            self._waiting.pop(req, None)
            raise

        async def results() -> tuple[m.OpResult, ...]:
            try:
                item = _reply(await queue.get())
            finally:
                self._waiting.pop(req, None)
            if not isinstance(item, m.Applied) or len(item.results) != len(ops):
                raise AgentError("the agent answered a batch with the wrong number of results")
            return item.results

        return asyncio.ensure_future(results())

    def fetch(self, path: str) -> AsyncIterator[m.FileData]:
        return self._request(lambda req: m.Fetch(req, path))

    def tar_from_agent(self, window: int = TAR_WINDOW, direct: bool = False) -> TarDownload:
        """The remote root as a tar stream; see TarDownload (and TarSend for ``direct``,
        asked for only if the agent supports it)."""
        return TarDownload(self, window, direct and self.supports(DIRECT_TAR))

    def tar_to_agent(self, path: str, runtime: bool, merge: bool = False, direct: bool = False) -> TarUpload:
        """Start sending a tar stream to the agent; see TarUpload and TarReceive. With
        ``direct`` (if the agent supports it) await ``ready`` first."""
        return TarUpload(self, path, runtime, merge, direct and self.supports(DIRECT_TAR))

    def new_blob_id(self) -> int:
        return next(self._ids)

    async def close(self) -> None:
        try:
            if self.error is None:
                self.send(m.Bye())
                await asyncio.wait_for(self.channel.drain(), 2)
        except (TimeoutError, AgentError, ConnectionError, OSError):
            pass
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        await self.channel.close()


class _Stream:
    """A request whose replies arrive over time: ``first`` (given the request id) is
    sent at once; ``reply`` waits for the next answer."""

    def __init__(self, client: AgentClient, first: Callable[[int], Any]) -> None:
        self.client = client
        self.req = next(client._ids)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        client._waiting[self.req] = self.queue
        client.send(first(self.req))

    async def reply(self) -> Any:
        return _reply(await self.queue.get())

    def close(self) -> None:
        if self.client._waiting.pop(self.req, None) is not None:
            self.client._abandoned.add(self.req)  # what the agent still sends for it is dropped


class TarUpload(_Stream):
    """A tar stream to the agent: ``send`` chunks (each waits for the link to drain),
    then ``finish`` with what the stream lacks, and get the agent's result."""

    def __init__(self, client: AgentClient, path: str, runtime: bool, merge: bool = False,
                 direct: bool = False) -> None:
        super().__init__(client, lambda req: m.TarReceive(req, path, runtime, merge, direct))
        self.direct = direct
        self.shared = 0  # entries named by TarDigests so far

    async def ready(self) -> m.TarReady | None:
        """For a direct stream, the agent's TarReady (staging directory and GNU tar);
        None if the stream is not direct."""
        if not self.direct:
            return None
        item = await self.reply()
        if not isinstance(item, m.TarReady):
            raise AgentError(f"unexpected {type(item).__name__} before a direct tar stream")
        return item

    def cancel(self) -> None:
        """The stream failed: the agent discards what it staged (nothing is placed)."""
        with contextlib.suppress(AgentError):
            self.client.send(m.TarEnd(self.req, (), True))
        self.close()

    def _check(self) -> None:
        # The agent refuses early (e.g. an unwritable target): stop sending at once.
        if not self.queue.empty():
            item = _reply(self.queue.get_nowait())
            raise AgentError(f"unexpected {type(item).__name__} during a tar stream")

    async def send(self, data: bytes) -> None:
        self._check()
        self.client.send(m.TarData(self.req, data))
        await self.client.drain()

    async def share_entries(self, entries: list[m.Entry]) -> None:
        """Tell the agent the entries sent (TarDigests: a direct push's agent checks them
        against its rules while tar works; the digests of those archived unhashed are
        None). May be called any number of times before ``finish``, as they are archived."""
        if not self.client.supports("tar-digests"):
            return
        for i in range(0, len(entries), DIGESTS_CHUNK):
            self._check()
            chunk = tuple(entries[i:i + DIGESTS_CHUNK])
            self.client.send(m.TarDigests(self.req, chunk))
            self.shared += len(chunk)
            await self.client.drain()

    async def placed(self, skipped: list[m.Skip]) -> m.TarPlaced:
        """End the stream (TarEnd, with what it lacks) and wait until the agent has put it
        in place; ``listing`` then gives the entries placed."""
        self._check()
        self.client.send(m.TarEnd(self.req, tuple(skipped), False, self.shared))
        item = await self.reply()
        if not isinstance(item, m.TarPlaced):
            raise AgentError(f"unexpected {type(item).__name__} after a tar stream")
        return item

    async def listing(self) -> tuple[list[m.Entry], str]:
        """The entries placed (after ``placed``), and where."""
        entries: list[m.Entry] = []
        try:
            while True:
                item = await self.reply()
                if not isinstance(item, m.TarResult):
                    raise AgentError(f"unexpected {type(item).__name__} after a tar stream")
                entries.extend(item.entries)
                if item.done:
                    return entries, item.where
        finally:
            self.close()

    async def finish(self, skipped: list[m.Skip]) -> tuple[list[m.Entry], list[m.Skip], int, str]:
        """``placed``, then ``listing``: (entries placed and kept, skipped, deleted, where)."""
        try:
            placement = await self.placed(skipped)
        except BaseException:
            self.close()
            raise
        entries, where = await self.listing()
        return entries + list(placement.kept), list(placement.skipped), placement.deleted, where


class TarDownload(_Stream):
    """The remote root as a tar stream: iterate over TarStart, TarData..., TarResult...
    (the last has ``done``), and ``ack`` the data taken in. The agent sends at most
    ``window`` bytes ahead of the acknowledgements: memory stays bounded on both sides
    however slow the consumer, without relying on the transport's own flow control."""

    def __init__(self, client: AgentClient, window: int, direct: bool = False) -> None:
        super().__init__(client, lambda req: m.TarSend(req, window, direct))
        self.window = window
        self._acked = 0

    def __aiter__(self) -> TarDownload:
        return self

    async def __anext__(self) -> Any:
        return await self.reply()

    def ack(self, consumed: int) -> None:
        """``consumed`` bytes of data taken in so far; credit is returned in quarters."""
        if consumed - self._acked >= self.window // 4:
            self._acked = consumed
            self.client.send(m.TarAck(self.req, consumed))
