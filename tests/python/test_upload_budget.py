"""Idle, slow and greedy clients (issue 11): uploads reserve their input in the in-flight budget
as it arrives, streams that send nothing are ended after --upload_idle_timeout, and one
client's reservations are capped at --max_inflight_bytes_per_peer so others keep being served.

Two clients are told apart by address: A connects over IPv4 (127.0.0.1), B over IPv6 (::1), to
one server listening on [::]."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from serverctl import Server, free_port
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

MiB = 1 << 20


class DualStackServer(Server):
    def args(self, port):
        return [self.binary, f"--listen=[::]:{port}", "--metrics_listen=", "--warmup=false",
                *self.extra_args]


def big_header(elements_per_tensor=64 * MiB):
    """An upload header declaring two float32 tensors of `elements_per_tensor` (256 MiB each
    by default, the largest max_input_elements allows), with small flops and output."""
    d = elements_per_tensor // 16
    return pb.UploadRequest(header=pb.UploadHeader(request=pb.ComputeRequest(
        a=pb.Tensor(shape=[1, 16, d]), b=pb.Tensor(shape=[1, 16, d]))))


class HeldUpload:
    """A ComputeUpload that sends `messages` and then nothing (the stream stays open) until
    close(); its outcome (status code, details) is available once the server ends it."""

    def __init__(self, address, messages):
        self.channel = grpc.insecure_channel(address)
        self.outbox = queue.Queue()
        for m in messages:
            self.outbox.put(m)
        self.result = None
        self.call = pb_grpc.SimilarityStub(self.channel).ComputeUpload(iter(self.outbox.get, None))
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()

    def _drain(self):
        try:
            for _ in self.call:
                pass
            self.result = (grpc.StatusCode.OK, "")
        except grpc.RpcError as err:
            self.result = (err.code(), err.details())

    def wait(self, timeout):
        self.thread.join(timeout)
        return self.result

    def close(self):
        self.call.cancel()
        self.outbox.put(None)
        self.thread.join(10)
        self.channel.close()


def small_compute(address, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((3, 8), dtype=np.float32)  # an ~80-byte request
    b = rng.standard_normal((2, 8), dtype=np.float32)
    with grpc.insecure_channel(address) as ch:
        reply = pb_grpc.SimilarityStub(ch).Compute(
            pb.ComputeRequest(a=pb.Tensor(shape=[3, 8], raw=a.tobytes()),
                              b=pb.Tensor(shape=[2, 8], raw=b.tobytes())), timeout=10)
    got = np.frombuffer(reply.values_raw, np.float32).reshape(3, 2)
    np.testing.assert_allclose(got, cosine_similarity(a.astype(np.float64), b), atol=1e-6)


def code_of(fn):
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details()


def test_idle_header_only_uploads_do_not_starve_others_and_time_out(server_binary):
    """The issue's scenario: four uploads declaring 512 MiB each send only their header (no
    deadline). Before, they reserved the whole 2 GiB budget and every other Compute got
    RESOURCE_EXHAUSTED for as long as they stayed open."""
    with DualStackServer(server_binary, ["--upload_idle_timeout=3s"]) as srv:
        v4 = f"127.0.0.1:{srv.address.rsplit(':', 1)[1]}"
        v6 = f"[::1]:{srv.address.rsplit(':', 1)[1]}"
        idle = [HeldUpload(v4, [big_header()]) for _ in range(4)]
        try:
            time.sleep(0.5)  # the headers are admitted
            assert all(u.result is None for u in idle), "the idle uploads are still open"
            small_compute(v6)  # another client
            small_compute(v4, seed=1)  # and the idle client itself
            begin = time.monotonic()
            outcomes = [u.wait(timeout=20) for u in idle]
            waited = time.monotonic() - begin
        finally:
            for u in idle:
                u.close()
        for outcome in outcomes:
            assert outcome is not None, "the idle upload was never ended"
            code, details = outcome
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
            assert "no data for 3s" in details
        assert waited < 15
        small_compute(v4, seed=2)  # everything is released: the server keeps serving


def test_one_client_cannot_take_the_whole_budget(server_binary):
    # Each idle upload holds its first reservation step (2 x 2 MiB read-ahead of input) plus
    # its result window (a few KiB here): just over 4 MiB. A share of 10 MiB fits two.
    args = [f"--max_inflight_bytes={32 * MiB}", f"--max_inflight_bytes_per_peer={10 * MiB}",
            f"--upload_read_ahead_bytes={2 * MiB}", "--upload_idle_timeout=60s"]
    with DualStackServer(server_binary, args) as srv:
        port = srv.address.rsplit(":", 1)[1]
        v4, v6 = f"127.0.0.1:{port}", f"[::1]:{port}"
        header = big_header(elements_per_tensor=4 * MiB)  # 16 MiB per tensor declared
        greedy = [HeldUpload(v4, [header]) for _ in range(2)]
        try:
            time.sleep(0.5)
            third = HeldUpload(v4, [header])
            code, details = third.wait(timeout=10)
            third.close()
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "this client's share" in details and "max_inflight_bytes_per_peer" in details
            other = HeldUpload(v6, [header])  # another client still gets its share
            time.sleep(0.5)
            assert other.result is None, other.result
            small_compute(v6)
            other.close()
        finally:
            for u in greedy:
                u.close()


def test_upload_reserves_its_input_as_it_arrives(server_binary):
    """An upload is admitted on a small first reservation; when its data outgrows what the
    budget can give, it fails mid-way with RESOURCE_EXHAUSTED saying how far it got."""
    args = [f"--max_inflight_bytes={24 * MiB}", f"--max_inflight_bytes_per_peer={24 * MiB}",
            f"--upload_read_ahead_bytes={1 * MiB}"]
    with DualStackServer(server_binary, args) as srv:
        d = 1 * MiB // 16
        b = np.ones((16, d), np.float32)  # 4 MiB each
        a = np.ones((16, d), np.float32)
        header = pb.UploadRequest(header=pb.UploadHeader(request=pb.ComputeRequest(
            a=pb.Tensor(shape=[1, 16, d]), b=pb.Tensor(shape=[1, 16, d]))))
        # 20 of its 32 MiB sent: it holds 21 MiB (what arrived plus the 1 MiB read-ahead).
        hog = HeldUpload(srv.address, [big_header(elements_per_tensor=4 * MiB)] +
                         [pb.UploadRequest(b_data=b.tobytes())] * 4 +
                         [pb.UploadRequest(a_data=a.tobytes())])
        try:
            time.sleep(1.0)
            assert hog.result is None
            # 8 MiB of input, 3 MiB left: admitted on 2 MiB, then refused while growing.
            pieces = [header, pb.UploadRequest(b_data=b.tobytes()),
                      pb.UploadRequest(a_data=a.tobytes())]
            with grpc.insecure_channel(srv.address) as ch:
                code, details = code_of(lambda: list(
                    pb_grpc.SimilarityStub(ch).ComputeUpload(iter(pieces), timeout=20)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
            assert "while receiving the upload" in details
        finally:
            hog.close()
        # Once the hog is gone the same upload fits and computes correctly.
        with grpc.insecure_channel(srv.address) as ch:
            chunks = list(pb_grpc.SimilarityStub(ch).ComputeUpload(iter(pieces), timeout=30))
        values = np.concatenate([np.frombuffer(c.values_raw, np.float32) for c in chunks])
        np.testing.assert_allclose(values, np.ones(16 * 16), rtol=1e-5)


def test_a_slow_but_steady_upload_is_not_cut_off(server_binary):
    with DualStackServer(server_binary, ["--upload_idle_timeout=2s"]) as srv:
        d = 64
        rng = np.random.default_rng(5)
        a = rng.standard_normal((4, d), dtype=np.float32)
        b = rng.standard_normal((6, d), dtype=np.float32)
        header = pb.UploadRequest(header=pb.UploadHeader(request=pb.ComputeRequest(
            a=pb.Tensor(shape=[4, d]), b=pb.Tensor(shape=[6, d]))))

        def halves(data):
            return [data[:len(data) // 2], data[len(data) // 2:]]

        def slowly():
            yield header
            pieces = [("b_data", p) for p in halves(b.tobytes())] + \
                     [("a_data", p) for p in halves(a.tobytes())]
            for field, piece in pieces:
                time.sleep(1.0)  # under the timeout each time, 4 s in all
                yield pb.UploadRequest(**{field: piece})
        with grpc.insecure_channel(srv.address) as ch:
            chunks = list(pb_grpc.SimilarityStub(ch).ComputeUpload(slowly(), timeout=30))
        got = np.frombuffer(b"".join(c.values_raw for c in chunks), np.float32).reshape(4, 6)
        np.testing.assert_allclose(got, cosine_similarity(a.astype(np.float64), b), atol=1e-6)


def test_idle_gallery_registration_times_out(server_binary):
    with DualStackServer(server_binary, ["--upload_idle_timeout=2s"]) as srv:
        header = pb.RegisterGalleryRequest(header=pb.GalleryHeader(
            name="idle", shape=[1000, 64], dtype=pb.FLOAT32))
        outbox = queue.Queue()
        outbox.put(header)
        with grpc.insecure_channel(srv.address) as ch:
            future = pb_grpc.SimilarityStub(ch).RegisterGallery.future(iter(outbox.get, None))
            try:
                future.result(timeout=20)
                code, details = grpc.StatusCode.OK, ""
            except grpc.RpcError as err:
                code, details = err.code(), err.details()
            outbox.put(None)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no data for 2s" in details
        small_compute(srv.address)
