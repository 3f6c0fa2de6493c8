"""A small round-robin TCP proxy: each new connection goes to the next replica that
accepts it (a replica that refuses, being dead, is skipped).

The replica test (``tests/replicas``) runs it in a thread; ``benchmarks.replicas``
runs it as a process of its own, so its CPU is counted apart from the load's:

    python -m benchmarks.proxy 127.0.0.1:8001 127.0.0.1:8002   # prints its URL
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import threading


class RoundRobinProxy:
    def __init__(self, backends: list[tuple[str, int]]) -> None:
        self.backends = backends
        self._next = itertools.cycle(range(len(backends)))
        self.connections = [0] * len(backends)  # per backend, for the test to check
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def __enter__(self) -> str:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, backlog=1024)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.run_until_complete(asyncio.sleep(0))
        self._loop.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        for _ in self.backends:
            i = next(self._next)
            host, port = self.backends[i]
            try:
                pair = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
            except (OSError, TimeoutError):
                continue
            self.connections[i] += 1
            return pair
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = await self._connect()
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def main(argv: list[str] | None = None) -> None:
    """Proxy to the ``host:port`` arguments; print the URL, run until SIGINT or SIGTERM."""
    targets = [arg.rsplit(":", 1) for arg in (argv if argv is not None else sys.argv[1:])]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with RoundRobinProxy([(host, int(port)) for host, port in targets]) as url:
        print(url, flush=True)
        stop.wait()


if __name__ == "__main__":
    main()
