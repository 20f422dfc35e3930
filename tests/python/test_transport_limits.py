"""Transport limits against abusive clients (issue 11), each against the real server:
concurrent streams per connection, keepalive enforcement (GOAWAY too_many_pings), idle
connections closed, oversized metadata refused. After each, the server keeps serving."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serverctl import Server
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc


def healthy(address):
    # Its own connection: Python channels to one target otherwise share one.
    with grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def small_request():
    a = np.eye(4, 8, dtype=np.float32)
    return pb.ComputeRequest(a=pb.Tensor(shape=[4, 8], raw=a.tobytes()),
                             b=pb.Tensor(shape=[4, 8], raw=a.tobytes()))


def held_upload(stub):
    """A ComputeUpload whose client sends nothing yet: its stream stays open."""
    outbox = queue.Queue()
    call = stub.ComputeUpload(iter(outbox.get, None))
    return call, outbox


def test_streams_per_connection_are_capped(server_binary):
    with Server(server_binary, ["--metrics_listen=", "--max_concurrent_streams=2"]) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.SimilarityStub(ch)
            held = [held_upload(stub) for _ in range(2)]
            time.sleep(0.5)
            third = stub.Compute.future(small_request(), timeout=30)
            time.sleep(1.5)
            assert not third.done(), "a third stream on the same connection must wait"
            assert healthy(srv.address), "other connections are served meanwhile"
            held[0][0].cancel()
            reply = third.result(timeout=10)  # runs once a stream is free
            got = np.frombuffer(reply.values_raw, np.float32).reshape(4, 4)
            np.testing.assert_allclose(got, np.eye(4), atol=1e-6)
            held[1][0].cancel()


def test_clients_pinging_too_often_get_goaway(server_binary):
    with Server(server_binary, ["--metrics_listen=", "--min_client_ping_interval=10s",
                                "--max_ping_strikes=1"]) as srv:
        options = [("grpc.keepalive_time_ms", 100), ("grpc.keepalive_timeout_ms", 1000),
                   ("grpc.keepalive_permit_without_calls", 1),
                   ("grpc.http2.max_pings_without_data", 0),
                   ("grpc.http2.min_time_between_pings_ms", 100)]
        with grpc.insecure_channel(srv.address, options=options) as ch:
            call, outbox = held_upload(pb_grpc.SimilarityStub(ch))
            try:
                code, details = None, ""
                try:
                    for _ in call:
                        pass
                except grpc.RpcError as err:
                    code, details = err.code(), err.details()
            finally:
                outbox.put(None)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
        assert "too_many_pings" in details.lower().replace(" ", "_"), details
        assert healthy(srv.address)


def test_idle_connections_are_closed(server_binary):
    with Server(server_binary, ["--metrics_listen=", "--max_connection_idle=1s"]) as srv:
        states = []
        idle = threading.Event()

        def watch(state):
            states.append(state)
            if state == grpc.ChannelConnectivity.IDLE and \
                    grpc.ChannelConnectivity.READY in states:
                idle.set()
        with grpc.insecure_channel(srv.address) as ch:
            ch.subscribe(watch, try_to_connect=False)
            pb_grpc.SimilarityStub(ch).Compute(small_request(), timeout=10)
            assert idle.wait(10), f"the server did not close the idle connection: {states}"
            pb_grpc.SimilarityStub(ch).Compute(small_request(), timeout=10)  # reconnects
            ch.unsubscribe(watch)


def test_oversized_metadata_is_refused(server_binary):
    with Server(server_binary, ["--metrics_listen=", "--max_metadata_bytes=4096"]) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.SimilarityStub(ch)
            try:
                stub.Compute(small_request(), metadata=[("x-big", "a" * 8192)], timeout=10)
                code = grpc.StatusCode.OK
            except grpc.RpcError as err:
                code = err.code()
            assert code != grpc.StatusCode.OK, "8 KiB of metadata over a 4 KiB limit"
        # gRPC may close that connection; a new one is served normally.
        with grpc.insecure_channel(srv.address,
                                   options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            pb_grpc.SimilarityStub(ch).Compute(small_request(), metadata=[("x-small", "a" * 100)],
                                               timeout=10)
        assert healthy(srv.address)


def test_calls_cut_off_before_their_request_arrived_are_not_invalid_argument(server_binary):
    """A deadline or cancel that beats the request body used to be logged and counted as
    INVALID_ARGUMENT ("tensor a is missing or empty"); the soak found it."""
    import re
    import urllib.request

    from serverctl import free_port
    metrics_port = free_port()
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 64, 128), dtype=np.float32)
    b = rng.standard_normal((4, 512, 128), dtype=np.float32)
    request = pb.ComputeRequest(a=pb.Tensor(shape=[4, 64, 128], raw=a.tobytes()),
                                b=pb.Tensor(shape=[4, 512, 128], raw=b.tobytes()))
    with Server(server_binary, [f"--metrics_listen=127.0.0.1:{metrics_port}"]) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.SimilarityStub(ch)
            codes = []
            for _ in range(50):
                try:
                    stub.Compute(request, timeout=0.002)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as err:
                    codes.append(err.code())
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED}, codes
        assert healthy(srv.address)
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics",
                                      timeout=5).read().decode()
        invalid = re.search(r'grpc_server_handled_total\{grpc_code="InvalidArgument",'
                            r'grpc_method="Compute"[^}]*\} (\S+)', text)
        assert invalid is not None and float(invalid.group(1)) == 0, invalid and invalid.group(0)
        assert "missing or empty" not in srv.log()
