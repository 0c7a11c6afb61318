"""Who may talk to the cloud server: the shared token on both planes, no browser route to
``/shutdown``, no open bind without a token, and TLS with a certificate made in the test
(a real ``harness.cloud_server`` process on the toy pair)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from harness.transport.auth import TOKEN_ENV, is_loopback, new_token, token_matches
from harness.transport.grpc_link import GrpcEdgeLink, LinkClosedError
from harness.wall import REPO_ROOT
from systems.messages import Failure, OpenSession, Upload, Verdict
from tests.support import cloud, toy_vocab_fingerprint


def _post(url: str, body: bytes | None, content_type: str | None, context=None) -> tuple[int, str]:
    headers = {"Content-Type": content_type} if content_type else {}
    req = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _get(url: str, context=None) -> dict:
    with urllib.request.urlopen(url, timeout=10, context=context) as r:
        return json.loads(r.read())


async def _verify_once(address: str, token: str | None, tls_ca: bytes | None = None):
    """Open a session, have one drafted token verified; the cloud's reply."""
    link = GrpcEdgeLink(address, system="vanilla", token=token, tls_ca=tls_ca, vocab_fingerprint=toy_vocab_fingerprint())
    await link.connect()
    try:
        session = link.session("e-1")
        await session.send(OpenSession("e-1", [1, 2, 3]))
        await session.send(Upload("e-1", round=0, start=3, tokens=[4], verify=True))
        env = await asyncio.wait_for(session.recv(), 30)
        return env.msg
    finally:
        await link.close()


def _attempts(address: str, *tries: tuple) -> list:
    """Each ``(token, tls_ca)`` try of :func:`_verify_once`, in one event loop: its reply or its error."""
    async def all_of_them():
        out = []
        for token, tls_ca in tries:
            try:
                out.append(await _verify_once(address, token, tls_ca))
            except LinkClosedError as e:
                out.append(e)
        return out

    return asyncio.run(all_of_them())


def test_token_helpers():
    a, b = new_token(), new_token()
    assert a != b and len(a) >= 40
    assert token_matches(a, a) and not token_matches(b, a) and not token_matches(None, a)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("example.org")


def test_streams_and_shutdown_need_the_token(tmp_path):
    with cloud(tmp_path) as info:
        token, base = info["token"], f"http://127.0.0.1:{info['http_port']}"
        assert oct(info["ready"].stat().st_mode & 0o777) == "0o600"  # the token is its owner's only
        address = f"127.0.0.1:{info['grpc_port']}"
        none, wrong, right = _attempts(address, (None, None), ("not-the-token", None), (token, None))
        for refused in (none, wrong):
            assert isinstance(refused, LinkClosedError) and "UNAUTHENTICATED: missing or wrong token" in str(refused)
        assert isinstance(right, Verdict), right

        # what a web page could send without a CORS preflight: refused, the server serves on
        good = json.dumps({"token": token}).encode()
        for body, ctype in [(good, "text/plain"), (good, None), (good, "application/x-www-form-urlencoded"),
                            (good, "multipart/form-data; boundary=x")]:
            status, _ = _post(f"{base}/shutdown", body, ctype)
            assert status in (415, 422), (ctype, status)
        assert _post(f"{base}/shutdown", json.dumps({"token": "guess"}).encode(), "application/json")[0] == 401
        assert _post(f"{base}/shutdown", b"{}", "application/json")[0] == 422
        assert _get(f"{base}/healthz")["status"] == "ok"
        assert _get(f"{base}/stats")["streams_refused"] == 2

        assert _post(f"{base}/shutdown", good, "application/json; charset=utf-8")[0] == 200
        assert info["proc"].wait(timeout=15) == 0


def test_a_given_token_is_used_and_not_written_out(tmp_path):
    token = new_token()
    with cloud(tmp_path, token=token) as info:
        assert "token" not in info  # the caller has it already
        assert isinstance(_attempts(f"127.0.0.1:{info['grpc_port']}", (token, None))[0], Verdict)
        token_file = tmp_path / "token.txt"
        token_file.write_text(token + "\n")
    with cloud(tmp_path, "--token-file", str(token_file)) as info:
        assert "token" not in info
        ok, refused = _attempts(f"127.0.0.1:{info['grpc_port']}", (token, None), (new_token(), None))
        assert isinstance(ok, Verdict) and isinstance(refused, LinkClosedError)


@pytest.mark.parametrize("args,message", [
    (["--host", "0.0.0.0"], "binding 0.0.0.0 (not loopback) needs a shared token: pass --token-file FILE or set "
                            "SPECWAN_CLOUD_TOKEN"),
    (["--token-file", "/nonexistent/token"], "cannot read the token file /nonexistent/token"),
    (["--tls-cert", "cert.pem"], "TLS needs both --tls-cert and --tls-key"),
])
def test_an_unsafe_or_broken_start_is_one_line(tmp_path, args, message):
    # MUTANT_UNDER_TEST too: mutmut's trampolines read their settings from the working folder,
    # which is not the tree here, so under `make mutate` the server would run unmutated anyway
    env = {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, "MUTANT_UNDER_TEST")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.run([sys.executable, "-m", "harness.cloud_server", "--pair", "toy", "--system", "vanilla",
                           "--grpc-port", "0", "--http-port", "0", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_tls_on_both_planes_with_a_certificate_made_here(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    ca_pem = ca.cert_pem.bytes()
    with cloud(tmp_path, "--tls-cert", str(cert_file), "--tls-key", str(key_file)) as info:
        assert info["tls"] is True
        address, token = f"127.0.0.1:{info['grpc_port']}", info["token"]
        # over TLS; plaintext to a TLS server; a CA that did not sign the server's certificate
        ok, plain, untrusted = _attempts(address, (token, ca_pem), (token, None), (token, trustme.CA().cert_pem.bytes()))
        assert isinstance(ok, Verdict), ok
        assert isinstance(plain, LinkClosedError) and isinstance(untrusted, LinkClosedError)

        context = ssl.create_default_context(cadata=ca_pem.decode())
        base = f"https://127.0.0.1:{info['http_port']}"
        assert _get(f"{base}/info", context)["tls"] is True
        with pytest.raises(urllib.error.URLError):  # untrusted without the CA
            _get(f"{base}/healthz")
        status, _ = _post(f"{base}/shutdown", json.dumps({"token": token}).encode(), "application/json", context)
        assert status == 200
        assert info["proc"].wait(timeout=15) == 0


def test_a_session_cannot_be_claimed_from_another_stream(tmp_path):
    """Each stream's sessions are its own: a second client using an honest client's session
    name neither reaches that session nor disturbs it."""
    with cloud(tmp_path) as info:
        address, token = f"127.0.0.1:{info['grpc_port']}", info["token"]

        async def scenario():
            honest = GrpcEdgeLink(address, system="vanilla", token=token, vocab_fingerprint=toy_vocab_fingerprint())
            thief = GrpcEdgeLink(address, system="vanilla", token=token, vocab_fingerprint=toy_vocab_fingerprint())
            await honest.connect()
            await thief.connect()
            try:
                mine, theirs = honest.session("e-1"), thief.session("e-1")
                await mine.send(OpenSession("e-1", [1, 2, 3]))
                await asyncio.sleep(0.2)
                # the thief uploads into "e-1" without opening it: its own (unopened) session fails
                await theirs.send(Upload("e-1", round=0, start=3, tokens=[9], verify=True))
                stolen = (await asyncio.wait_for(theirs.recv(), 30)).msg
                await mine.send(Upload("e-1", round=0, start=3, tokens=[4], verify=True))
                verdict = (await asyncio.wait_for(mine.recv(), 30)).msg
                return stolen, verdict
            finally:
                await thief.close()
                await honest.close()

        stolen, verdict = asyncio.run(scenario())
        assert isinstance(stolen, Failure) and "not open" in stolen.reason
        assert isinstance(verdict, Verdict) and verdict.session == "e-1"
        assert _get(f"http://127.0.0.1:{info['http_port']}/healthz")["status"] == "ok"


def test_a_stream_without_a_vocabulary_fingerprint_is_refused(tmp_path):
    """The vocabulary check is never skipped: an edge that leaves out its fingerprint is refused."""
    with cloud(tmp_path) as info:
        address, token = f"127.0.0.1:{info['grpc_port']}", info["token"]

        async def connect():
            link = GrpcEdgeLink(address, system="vanilla", token=token)  # no vocab_fingerprint
            try:
                await link.connect()
            finally:
                await link.close()

        with pytest.raises(LinkClosedError, match="sent no vocabulary fingerprint"):
            asyncio.run(connect())
