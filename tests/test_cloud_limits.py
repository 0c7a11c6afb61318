"""What one client can make the cloud hold: a message past the size limit is refused on its
own stream, before the cloud buffers it all, and the server serves everyone else on (a real
``harness.cloud_server`` process, toy pair)."""

from __future__ import annotations

import asyncio
import json
import urllib.request

import grpc
import psutil

from harness.transport.auth import bearer
from harness.transport.frames import MD_PROTOCOL, MD_SYSTEM, MD_VOCAB, METHOD_PATH, encode_frame
from harness.transport.grpc_link import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, GrpcEdgeLink
from systems.messages import PROTOCOL_VERSION, OpenSession, Upload, Verdict
from tests.support import cloud


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def _oversized(address: str, token: str, vocab: str) -> grpc.StatusCode:
    """Send one frame just past the limit on a stream of its own; the status the stream ends with."""
    options = [("grpc.max_send_message_length", 4 * MAX_MESSAGE_BYTES)] + [
        o for o in CHANNEL_OPTIONS if o[0] != "grpc.max_send_message_length"]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.stream_stream(METHOD_PATH, request_serializer=lambda b: b,
                                     response_deserializer=lambda b: b)(metadata=(
            (MD_PROTOCOL, str(PROTOCOL_VERSION)), (MD_SYSTEM, "vanilla"), (MD_VOCAB, vocab), bearer(token)))
        await call.write(encode_frame(b"\x00" * (MAX_MESSAGE_BYTES + 1024), 0.0))
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as e:
            return e.code()
        return await call.code()


async def _honest(address: str, token: str, vocab: str):
    link = GrpcEdgeLink(address, system="vanilla", token=token, vocab_fingerprint=vocab)
    await link.connect()
    try:
        s = link.session("e-1")
        await s.send(OpenSession("e-1", [1, 2, 3]))
        await s.send(Upload("e-1", round=0, start=3, tokens=[4], verify=True))
        return (await asyncio.wait_for(s.recv(), 30)).msg
    finally:
        await link.close()


def test_a_message_past_the_limit_is_refused_and_the_server_serves_on(tmp_path):
    with cloud(tmp_path) as info:
        address, token = f"127.0.0.1:{info['grpc_port']}", info["token"]
        base = f"http://127.0.0.1:{info['http_port']}"
        vocab = _get(f"{base}/info")["vocab_fingerprint"]
        rss_before = psutil.Process(info["pid"]).memory_info().rss

        async def scenario():
            return await _oversized(address, token, vocab), await _honest(address, token, vocab)

        status, reply = asyncio.run(scenario())
        assert status == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(reply, Verdict)
        assert _get(f"{base}/healthz")["status"] == "ok" and info["proc"].poll() is None
        # the cloud never held the whole message: far below the 1.66 GB a 512 MB one once cost
        grown = psutil.Process(info["pid"]).memory_info().rss - rss_before
        assert grown < 4 * MAX_MESSAGE_BYTES, grown
