"""The relay on its own (no sockets): which replica a request goes to, what happens when
one goes away or fails, how answers stream, and what the windows say."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from broker.sdk.frames import pack, unpack
from broker.services.relay import Link, NoReplica, ProgramFailed, Relay, Target

AMS = (52.37, 4.9)
NYC = (40.71, -74.0)


class Fake:
    """A replica's far end: answers each request it is sent with ``answer``."""

    def __init__(
        self, relay: Relay, name: str, at: tuple[float, float], answer: Callable[..., Any]
    ):
        self.link = Link(name, "svc", at[0], at[1], self.send)
        self.answer, self.seen = answer, 0
        relay.attach(self.link)

    async def send(self, frame: bytes) -> None:
        header, body = unpack(frame)
        self.seen += 1
        asyncio.get_running_loop().call_soon(self.answer, self, header["id"], bytes(body))

    def reply(self, rid: int, body: bytes, **header: Any) -> None:
        self.link.deliver(pack({"id": rid, "ok": True, "ms": 2.0, **header}, body))


def echo(fake: Fake, rid: int, body: bytes) -> None:
    fake.reply(rid, body)


def target(at: tuple[float, float] = AMS) -> Target:
    return Target("svc", at[0], at[1], 0, 50.0)


async def _call(
    relay: Relay, body: bytes = b"x", at: tuple[float, float] = AMS
) -> tuple[str, bytes]:
    answer = await relay.request(target(at), body)
    got = b"".join([chunk async for chunk in answer.chunks()])
    return answer.link.allocation_id, got


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_the_nearest_replica_answers_then_the_least_loaded() -> None:
    async def go() -> None:
        relay = Relay()
        Fake(relay, "ams", AMS, echo)
        Fake(relay, "nyc", NYC, echo)
        assert await _call(relay, b"a", AMS) == ("ams", b"a")
        assert await _call(relay, b"b", NYC) == ("nyc", b"b")
        # With work queued near the caller, a replica as near and idle is preferred.
        Fake(relay, "ams2", AMS, echo)
        relay.links["ams"].inflight = 5
        assert (await _call(relay, b"c", AMS))[0] == "ams2"

    run(go())


def test_a_replica_that_goes_away_is_retried_elsewhere() -> None:
    async def go() -> None:
        relay = Relay()

        def vanish(fake: Fake, rid: int, body: bytes) -> None:
            relay.detach(fake.link)  # its connection closed with the request in it

        gone = Fake(relay, "ams", AMS, vanish)
        Fake(relay, "nyc", NYC, echo)
        answer = await relay.request(target(AMS), b"x")
        assert (answer.link.allocation_id, answer.retries) == ("nyc", 1)
        assert gone.seen == 1
        [chunk async for chunk in answer.chunks()]
        (row,) = [r for r in relay.window() if r["scope"] == "service"]
        assert (row["requests"], row["errors"], row["retries"]) == (2, 1, 1)

    run(go())


def test_a_machine_failure_is_retried_a_program_failure_is_not() -> None:
    async def go() -> None:
        relay = Relay()

        def machine(fake: Fake, rid: int, body: bytes) -> None:
            fake.link.deliver(pack({"id": rid, "ok": False, "error": "device lost"}))

        def program(fake: Fake, rid: int, body: bytes) -> None:
            fake.link.deliver(pack({"id": rid, "ok": False, "error": "bad shape", "program": True}))

        Fake(relay, "ams", AMS, machine)
        Fake(relay, "nyc", NYC, echo)
        assert (await _call(relay))[0] == "nyc"
        bad = Relay()
        Fake(bad, "ams", AMS, program)
        Fake(bad, "nyc", NYC, echo)
        with pytest.raises(ProgramFailed, match="bad shape"):
            await bad.request(target(), b"x")

    run(go())


def test_no_replica_says_so() -> None:
    async def go() -> None:
        relay = Relay()
        with pytest.raises(NoReplica, match="no replica of it is connected"):
            await relay.request(target(), b"x")

        def vanish(fake: Fake, rid: int, body: bytes) -> None:
            relay.detach(fake.link)

        Fake(relay, "ams", AMS, vanish)
        with pytest.raises(NoReplica, match="went away before answering"):
            await relay.request(target(), b"x")

    run(go())


def test_a_large_answer_streams_in_chunks() -> None:
    async def go() -> None:
        relay = Relay()

        def chunks(fake: Fake, rid: int, body: bytes) -> None:
            for i in range(3):
                fake.reply(rid, bytes([i]) * 4, more=i < 2)

        Fake(relay, "ams", AMS, chunks)
        answer = await relay.request(target(), b"x")
        got = [chunk async for chunk in answer.chunks()]
        assert got == [b"\x00" * 4, b"\x01" * 4, b"\x02" * 4]
        assert relay.links["ams"].inflight == 0

    run(go())


def test_windows_count_requests_per_replica_and_region() -> None:
    async def go() -> None:
        relay = Relay()
        Fake(relay, "ams", AMS, echo)
        for _ in range(4):
            await _call(relay)
        rows = {r["scope"]: r for r in relay.window()}
        assert rows["service"]["requests"] == rows["replica:ams"]["requests"] == 4
        assert rows["region:0"]["within_slo"] == 4
        assert rows["service"]["p50_ms"] is not None
        # An idle replica still writes a window: its heartbeat.
        rows = {r["scope"]: r for r in relay.window()}
        assert rows["replica:ams"]["requests"] == 0

    run(go())


def test_frames_refuse_garbage() -> None:
    with pytest.raises(ValueError, match="shorter than its header"):
        unpack(b"\x00\x00")
    with pytest.raises(ValueError, match="runs past its end"):
        unpack(b"\x00\x00\x00\x09{}")
    header, body = unpack(pack({"id": 1}, b"abc"))
    assert (header, bytes(body)) == ({"id": 1}, b"abc")
