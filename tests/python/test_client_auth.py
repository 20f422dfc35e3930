"""The Python client's bearer tokens (issue 11): `simserve.Client(..., token=...)` and
`simserve.aio.Client(..., token=...)` against the real server with --auth_token_file, over
plaintext and TLS. Every RPC the clients make (GetInfo, Compute, ComputeStream, ComputeUpload,
the gallery calls) must carry the token, results match scikit-learn / NumPy, a wrong or
missing token is UnauthenticatedError and is not retried, and the token shows up in no
repr and no error message."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances

import simserve
import simserve.aio
from test_auth import TOKENS, AuthServer, write_tokens
from test_tls import certs, credentials, tls_args  # noqa: F401  (certs is a fixture)

WRONG = "tok-wrong-but-well-formed"


@pytest.fixture(scope="module", params=["plaintext", "tls"])
def secured(request, server_binary, tmp_path_factory):
    """(server, client kwargs without the token) for a server that requires TOKENS, on a
    plaintext port and on a TLS port (server1 of make_certs.sh, trusted through ca1)."""
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    write_tokens(tokens, TOKENS)
    if request.param == "plaintext":
        with AuthServer(server_binary, tokens) as srv:
            yield srv, {}
    else:
        tls_certs = request.getfixturevalue("certs")
        with AuthServer(server_binary, tokens, creds=credentials(tls_certs),
                        args=tls_args(tls_certs)) as srv:
            yield srv, {"root_certificates": tls_certs / "ca1.crt"}


def inputs(seed=7):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((2, 6, 16)).astype(np.float32)
    b = rng.standard_normal((2, 9, 16)).astype(np.float32)
    a[0, 1] = 0.0  # a zero row: cosine 0 as sklearn
    want = np.stack([cosine_similarity(a[k].astype(np.float64), b[k].astype(np.float64))
                     for k in range(2)])
    return a, b, want


def failures(srv, reason):
    return srv.metric(f'simserve_auth_failures_total{{reason="{reason}"}}')


def test_every_rpc_carries_the_token(secured):
    srv, kw = secured
    a, b, want = inputs()
    with simserve.Client(srv.address, token=TOKENS[0], timeout=30, chunk_bytes=64, **kw) as c:
        info = c.info()
        assert info.version and info.limits["max_receive_message_bytes"] != 0
        for mode in ("unary", "stream", "upload"):
            np.testing.assert_allclose(c.similarity(a, b, mode=mode), want, atol=1e-5)
            assert c.last_timings.mode == mode and c.last_timings.attempts == 1
        dist = c.similarity(a[0], b[0], metric="euclidean", mode="auto")
        np.testing.assert_allclose(dist, euclidean_distances(a[0].astype(np.float64),
                                                             b[0].astype(np.float64)),
                                   rtol=1e-4, atol=1e-4)
        vals, idx = c.top_k(a, b, 3, mode="stream")
        want_idx = np.argsort(-want, axis=-1, kind="stable")[..., :3]
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_allclose(vals, np.take_along_axis(want, want_idx, -1), atol=1e-5)
        # Galleries: RegisterGallery (client stream), GetGallery, ListGalleries, a compute
        # by name in every mode, DeleteGallery.
        g = c.register_gallery("auth-gallery", b[1])
        assert c.get_gallery("auth-gallery").shape == (9, 16)
        assert "auth-gallery" in [x.name for x in c.galleries()]
        for mode in ("unary", "stream", "upload"):
            np.testing.assert_allclose(g.similarity(a[1], mode=mode), want[1], atol=1e-5)
        assert g.delete().name == "auth-gallery"
    assert failures(srv, "invalid") == 0 and failures(srv, "missing") == 0


def test_asyncio_client_carries_the_token(secured):
    srv, kw = secured
    a, b, want = inputs(8)

    async def run():
        async with simserve.aio.Client(srv.address, token=TOKENS[1], timeout=30,
                                       chunk_bytes=64, **kw) as c:
            assert (await c.info()).version
            got = {m: await c.similarity(a, b, mode=m) for m in ("unary", "stream", "upload")}
            g = await c.register_gallery("auth-aio", b[0])
            assert "auth-aio" in [x.name for x in await c.galleries()]
            got["gallery"] = await g.similarity(a[0], mode="upload")
            await g.delete()
            return got

    got = asyncio.run(run())
    for mode in ("unary", "stream", "upload"):
        np.testing.assert_allclose(got[mode], want, atol=1e-5)
    np.testing.assert_allclose(got["gallery"], want[0], atol=1e-5)


@pytest.mark.parametrize("token, message", [
    (WRONG, "not valid"),
    (None, "authorization: Bearer <token>"),
])
def test_wrong_or_missing_token_is_unauthenticated_and_not_retried(secured, token, message):
    srv, kw = secured
    a, b, _ = inputs()
    reason = "missing" if token is None else "invalid"
    # A policy that retries UNAVAILABLE quickly: UNAUTHENTICATED must still get one attempt.
    retry = simserve.RetryPolicy(max_attempts=5, initial_backoff=0.01)
    with simserve.Client(srv.address, token=token, timeout=20, retry=retry, **kw) as c:
        calls = [lambda: c.info(), lambda: c.similarity(a, b, mode="unary"),
                 lambda: c.similarity(a, b, mode="stream"), lambda: c.galleries(),
                 lambda: c.get_gallery("anything"), lambda: c.register_gallery("x", b[0])]
        for call in calls:
            before = failures(srv, reason)
            with pytest.raises(simserve.UnauthenticatedError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert message in err.value.details
            assert WRONG not in str(err.value)
            assert failures(srv, reason) == before + 1, "UNAUTHENTICATED was retried"


def test_asyncio_wrong_token_is_unauthenticated(secured):
    srv, kw = secured
    a, b, _ = inputs()

    async def run():
        codes = []
        async with simserve.aio.Client(srv.address, token=WRONG, timeout=20, **kw) as c:
            for call in (c.info(), c.similarity(a, b, mode="unary"),
                         c.similarity(a, b, mode="stream"), c.galleries()):
                try:
                    await call
                    codes.append("OK")
                except simserve.Error as e:
                    assert WRONG not in str(e)
                    codes.append(type(e).__name__)
        return codes

    before = failures(srv, "invalid")
    assert asyncio.run(run()) == ["UnauthenticatedError"] * 4
    assert failures(srv, "invalid") == before + 4, "one attempt per call"


def test_token_is_never_shown(secured):
    srv, kw = secured
    secret = TOKENS[0]
    with simserve.Client(srv.address, token=secret, **kw) as c:
        c.info()
        shown = repr(c) + repr(vars(c)) + repr(c._stub.GetInfo)
        assert secret not in shown

    async def aio_repr():
        async with simserve.aio.Client(srv.address, token=secret, **kw) as c:
            return repr(c) + repr(vars(c))
    assert secret not in asyncio.run(aio_repr())


def test_token_with_a_channel_passed_in(secured):
    srv, kw = secured
    a, b, want = inputs(9)
    with srv.channel() as channel:  # TLS or plaintext, as the server
        with simserve.Client(channel=channel, token=TOKENS[0], timeout=30) as c:
            np.testing.assert_allclose(c.similarity(a, b), want, atol=1e-5)
        with simserve.Client(channel=channel, timeout=30) as c:
            with pytest.raises(simserve.UnauthenticatedError):
                c.similarity(a, b)


@pytest.mark.parametrize("token", [
    "", "tok en-secret", "tok-secret\n", "\ttok-secret", "Bearer tok-secret", "tök-secret",
    "tok\x00secret", b"tok-secret"])
@pytest.mark.parametrize("make", [simserve.Client, simserve.aio.Client])
def test_malformed_tokens_are_refused_without_echoing_them(token, make):
    async def construct():  # grpc.aio channels are made inside a running loop
        return make("127.0.0.1:1", token=token)

    with pytest.raises(ValueError, match="token") as err:
        if make is simserve.Client:
            make("127.0.0.1:1", token=token)
        else:
            asyncio.run(construct())
    assert "secret" not in str(err.value)
