"""ModelStreamInfer through tritonclient.grpc's start_stream / async_stream_infer: several
requests of different models on one stream come back one response each, in order, with their
request ids; an invalid request in the middle gets its error in the callback
(InferenceServerException naming INVALID_ARGUMENT / NOT_FOUND) while the stream goes on and
the later requests still succeed. Responses are collected from a queue with a bounded wait.
On the generated stub: each failed request's response names its request id and model.
"""

from __future__ import annotations

import queue

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers import (as64, dense_reference, fp32_tolerance, infer_input, random_pair,
                     top_k_reference)

WAIT_SECONDS = 30


def collect(responses: "queue.Queue", count: int):
    """`count` (result, error) pairs in arrival order, each waited for at most WAIT_SECONDS."""
    return [responses.get(timeout=WAIT_SECONDS) for _ in range(count)]


def test_stream_in_order_with_failures(server, rng):
    responses: "queue.Queue" = queue.Queue()
    requests = []  # (id, model, a, b, parameters, expected error code or None)
    for i, model in enumerate(["cosine", "dot", "euclidean", "squared_euclidean"]):
        a, b = random_pair(rng, 2 if i % 2 else 0, n=3 + i, m=5, d=8)
        requests.append((f"ok-{i}", model, a, b, {}, None))
    bad_a, bad_b = random_pair(rng, 0, n=3, m=4, d=8)
    requests.insert(2, ("bad-shape", "cosine", bad_a, bad_b[:, :6], {}, "INVALID_ARGUMENT"))
    nan_a = bad_a.copy()
    nan_a[0, 0] = np.nan
    requests.insert(4, ("bad-nan", "dot", nan_a, bad_b, {}, "INVALID_ARGUMENT"))
    requests.append(("bad-model", "nope", bad_a, bad_b, {}, "NOT_FOUND"))
    a, b = random_pair(rng, 0, n=4, m=30, d=16)
    requests.append(("top-k", "cosine", a, b, {"top_k": 3}, None))

    client = grpcclient.InferenceServerClient(server.address)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            stream_timeout=WAIT_SECONDS)
        for request_id, model, a, b, parameters, _ in requests:
            client.async_stream_infer(model, [infer_input("A", a), infer_input("B", b)],
                                      request_id=request_id, parameters=parameters)
        got = collect(responses, len(requests))
        client.stop_stream()
    finally:
        client.close()

    for (request_id, model, a, b, parameters, error_code), (result, error) in zip(requests, got):
        if error_code:
            assert result is None and isinstance(error, InferenceServerException), request_id
            assert error_code in error.message(), (request_id, error.message())
            continue
        assert error is None, (request_id, error)
        response = result.get_response()
        assert response.id == request_id and response.model_name == model
        ref = dense_reference(model, a, b)
        if parameters.get("top_k"):
            want_values, want_indices = top_k_reference(model, ref, parameters["top_k"])
            np.testing.assert_array_equal(result.as_numpy("INDICES"), want_indices)
            np.testing.assert_allclose(as64(result.as_numpy("VALUES")), want_values,
                                       **fp32_tolerance(want_values))
        else:
            np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))
    assert responses.empty()


def test_stream_many_small_requests(server, rng):
    """20 requests pipelined on one stream: 20 responses in send order, each correct."""
    responses: "queue.Queue" = queue.Queue()
    pairs = [random_pair(rng, 0, n=2, m=3, d=4, datatype="FP16") for _ in range(20)]
    client = grpcclient.InferenceServerClient(server.address)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)),
                            stream_timeout=WAIT_SECONDS)
        for i, (a, b) in enumerate(pairs):
            client.async_stream_infer("euclidean", [infer_input("A", a), infer_input("B", b)],
                                      request_id=str(i))
        got = collect(responses, len(pairs))
        client.stop_stream()
    finally:
        client.close()
    for i, ((a, b), (result, error)) in enumerate(zip(pairs, got)):
        assert error is None, error
        assert result.get_response().id == str(i)
        ref = dense_reference("euclidean", a, b)
        np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


def test_stream_error_responses_carry_request_id(server, rng):
    """On the generated stub (tritonclient's callback gets no result for a failed request, so
    it cannot show this): a failed request's ModelStreamInferResponse has error_message AND
    infer_response.id / model_name of that request, so a client can tell which one failed
    (Triton does the same). Covers failures found while translating the request (unknown
    model, bad parameter) and while computing it (NaN)."""
    a, b = random_pair(rng, 0, n=3, m=4, d=8)
    nan_a = a.copy()
    nan_a[2, 3] = np.nan

    def request(request_id, model, a, b, **parameters):
        r = service_pb2.ModelInferRequest(model_name=model, id=request_id)
        r.inputs.add(name="A", datatype="FP32", shape=list(a.shape))
        r.inputs.add(name="B", datatype="FP32", shape=list(b.shape))
        r.raw_input_contents.extend([a.tobytes(), b.tobytes()])
        for name, value in parameters.items():
            r.parameters[name].string_param = value
        return r

    requests = [request("s-unknown-model", "nope", a, b),
                request("s-bad-parameter", "dot", a, b, bogus="1"),
                request("s-nan", "dot", nan_a, b),
                request("s-ok", "dot", a, b)]
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=WAIT_SECONDS))
    assert len(responses) == len(requests)
    for sent, got in zip(requests[:3], responses[:3]):
        assert got.error_message, sent.id
        assert (got.infer_response.id, got.infer_response.model_name) == (
            sent.id, sent.model_name), got.error_message
    assert responses[0].error_message.startswith("NOT_FOUND")
    assert responses[1].error_message.startswith("INVALID_ARGUMENT")
    assert responses[2].error_message.startswith("INVALID_ARGUMENT")
    last = responses[3]
    assert not last.error_message and last.infer_response.id == "s-ok"
    s = np.frombuffer(last.infer_response.raw_output_contents[0], np.float32).reshape(3, 4)
    ref = dense_reference("dot", a, b)
    np.testing.assert_allclose(as64(s), ref, **fp32_tolerance(ref))
