"""The daemon's RPC client: replies to a stream it stopped reading are dropped, while a
reply nobody asked for is still a protocol error."""

from __future__ import annotations

import asyncio

import pytest

from syncd.protocol import messages as m
from syncd.protocol.codec import Connection
from syncd.session.agent_client import AgentClient
from syncd.transport.channel import Channel


class FakeChannel(Channel):
    """The agent's side is a Connection fed what the client writes; its replies are
    queued by the test."""

    def __init__(self) -> None:
        super().__init__()
        self.incoming: asyncio.Queue[bytes] = asyncio.Queue()
        self.agent = Connection("syncd-agent test", ("tar", "tar-digests", "tar-direct"))
        self.received: list[object] = []

    async def _read_raw(self) -> bytes:
        return await self.incoming.get()

    def write(self, data: bytes) -> None:
        self.received.extend(self.agent.receive_data(data))

    async def drain(self) -> None:
        pass

    async def close(self) -> None:
        self.incoming.put_nowait(b"")

    async def exit_status(self, timeout: float = 2.0) -> int | None:
        return 0

    def reply(self, message: object) -> None:
        self.incoming.put_nowait(self.agent.send(message))


@pytest.mark.parametrize(("abandon", "broken"), [(True, False), (False, True)],
                         ids=["late-replies-of-a-closed-stream", "reply-to-nothing"])
def test_late_replies_of_an_abandoned_stream_are_dropped(abandon: bool, broken: bool) -> None:
    async def go() -> tuple[BaseException | None, m.Opened | None]:
        channel = FakeChannel()
        client = AgentClient(channel)
        channel.incoming.put_nowait(channel.agent.initiate())
        await client.start()
        download = client.tar_from_agent(direct=True)
        assert isinstance(channel.received[-1], m.TarSend) and channel.received[-1].direct
        req = download.req if abandon else download.req + 100
        download.close()  # as a small pull does once it has seen enough
        channel.reply(m.TarStart(req, 1, 1))
        channel.reply(m.TarResult(req, (), (), 0, "/r", True))
        await asyncio.sleep(0.05)
        try:
            if client.error is not None:
                return client.error, None
            # The link still works: the next request gets its answer.
            opening = asyncio.ensure_future(client.open("/r", {}, False, False))
            await asyncio.sleep(0.05)
            opened_req = next(x.req for x in channel.received if isinstance(x, m.Open))
            channel.reply(m.Opened(opened_req, "/r", "3.11", "", True))
            return None, await asyncio.wait_for(opening, 2)
        finally:
            await client.close()

    error, opened = asyncio.run(go())
    if broken:
        assert error is not None and "unsolicited TarStart" in str(error)
    else:
        assert error is None and opened is not None and opened.root == "/r"
