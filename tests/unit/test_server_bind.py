"""The server's listening socket: loopback, and TCP_NODELAY on every accepted connection."""

from __future__ import annotations

import asyncio
import socket

from mljobs.server.run import _bind


def test_accepted_connections_get_tcp_nodelay():
    # asyncio turns on TCP_NODELAY only for sockets whose proto says TCP; without it each
    # keep-alive response waited ~40 ms on a delayed ACK.
    sock = _bind("127.0.0.1", 0, None)
    host, port = sock.getsockname()
    assert host == "127.0.0.1"
    seen: list[int] = []

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        async with server:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.01)
            w.close()

    asyncio.run(main())
    assert seen and seen[0] != 0
