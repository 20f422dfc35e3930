"""System shared memory with tritonclient.utils.shared_memory against the real server
(--allow_shared_memory): inputs and outputs in registered POSIX regions (dense S, top-k VALUES
and INDICES, FP16 inputs, an input at an unaligned offset), checked against numpy/sklearn
float64; registration errors (an out-of-bounds offset/byte_size, non-POSIX keys, a missing
object, a duplicate name) and use errors (a range outside the region, a too-small output, an
unknown or unregistered region) with their statuses; status and unregister; and a server
without the flag refusing registration with FAILED_PRECONDITION. Every region is unregistered
and destroyed (unlinked) in teardown.
"""

from __future__ import annotations

import os

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers import (as64, assert_serving, dense_reference, fp32_tolerance, infer_input,
                     output_shape, random_pair, rounded_tolerance, status_of, top_k_reference)


class Regions:
    """Creates POSIX shared-memory objects (unique keys per process and test), registers them
    on the server, and in close() unregisters and destroys all of them."""

    def __init__(self, client: grpcclient.InferenceServerClient, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.handles = []
        self.registered = []

    def key(self, name: str) -> str:
        return f"/simserve_kserve_{os.getpid()}_{self.prefix}_{name}"

    def create(self, name: str, byte_size: int, register: bool = True):
        """A new object of byte_size bytes; registered whole under `name` unless told not to."""
        handle = shm.create_shared_memory_region(name, self.key(name), byte_size,
                                                 create_only=True)
        self.handles.append(handle)
        if register:
            self.register(name, self.key(name), byte_size)
        return handle

    def register(self, name: str, key: str, byte_size: int, offset: int = 0) -> None:
        self.client.register_system_shared_memory(name, key, byte_size, offset=offset)
        self.registered.append(name)

    def close(self) -> None:
        try:
            for name in self.registered:
                self.client.unregister_system_shared_memory(name)
        finally:
            for handle in self.handles:
                shm.destroy_shared_memory_region(handle)


@pytest.fixture()
def regions(client, request):
    r = Regions(client, f"{abs(hash(request.node.name)) % 10**8}")
    try:
        yield r
    finally:
        r.close()
    leftovers = [k for k in shm.mapped_shared_memory_regions() if k.startswith(r.key(""))]
    assert not leftovers, leftovers


def read_region(handle, dtype, shape, offset=0) -> np.ndarray:
    """A copy of the region's contents (the view must not outlive the mapping)."""
    return np.array(shm.get_contents_as_numpy(handle, dtype, shape, offset=offset))


@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_dense_round_trip(client, regions, rng, metric):
    """A and B in one input region (B right after A), S written into an output region."""
    a, b = random_pair(rng, 2, n=5, m=6, d=16)
    inputs = regions.create("in", a.nbytes + b.nbytes)
    shm.set_shared_memory_region(inputs, [a, b])
    s_shape = output_shape(a, b)
    s_bytes = int(np.prod(s_shape)) * 4
    outputs = regions.create("out", s_bytes)

    in_a = grpcclient.InferInput("A", list(a.shape), "FP32")
    in_a.set_shared_memory("in", a.nbytes)
    in_b = grpcclient.InferInput("B", list(b.shape), "FP32")
    in_b.set_shared_memory("in", b.nbytes, offset=a.nbytes)
    out_s = grpcclient.InferRequestedOutput("S")
    out_s.set_shared_memory("out", s_bytes)
    result = client.infer(metric, [in_a, in_b], outputs=[out_s])

    output = result.get_output("S")
    assert output.datatype == "FP32" and list(output.shape) == s_shape
    # The result is only in the region: like Triton, no raw_output_contents when every output
    # is in shared memory (tritonclient's as_numpy cannot read such outputs with Triton either).
    assert list(result.get_response().raw_output_contents) == []
    ref = dense_reference(metric, a, b)
    np.testing.assert_allclose(as64(read_region(outputs, np.float32, s_shape)), ref,
                               **fp32_tolerance(ref))


def test_top_k_into_one_region(client, regions, rng):
    """VALUES at offset 0 and INDICES right after them in the same output region."""
    k = 3
    a, b = random_pair(rng, 0, n=4, m=25, d=12)
    inputs = regions.create("in", a.nbytes + b.nbytes)
    shm.set_shared_memory_region(inputs, [a, b])
    shape = output_shape(a, b, k)
    nbytes = int(np.prod(shape)) * 4
    outputs = regions.create("out", 2 * nbytes)

    in_a = grpcclient.InferInput("A", list(a.shape), "FP32")
    in_a.set_shared_memory("in", a.nbytes)
    in_b = grpcclient.InferInput("B", list(b.shape), "FP32")
    in_b.set_shared_memory("in", b.nbytes, offset=a.nbytes)
    out_values = grpcclient.InferRequestedOutput("VALUES")
    out_values.set_shared_memory("out", nbytes)
    out_indices = grpcclient.InferRequestedOutput("INDICES")
    out_indices.set_shared_memory("out", nbytes, offset=nbytes)
    result = client.infer("dot", [in_a, in_b], outputs=[out_values, out_indices],
                          parameters={"top_k": k})

    assert result.get_output("INDICES").datatype == "INT32"
    want_values, want_indices = top_k_reference("dot", dense_reference("dot", a, b), k)
    np.testing.assert_array_equal(read_region(outputs, np.int32, shape, offset=nbytes),
                                  want_indices)
    np.testing.assert_allclose(as64(read_region(outputs, np.float32, shape)), want_values,
                               **fp32_tolerance(want_values))


def test_values_in_region_indices_in_response(client, regions, rng):
    """Only VALUES goes to a region: INDICES still arrives in raw_output_contents at its
    output's position, so as_numpy reads it."""
    k = 2
    a, b = random_pair(rng, 2, n=3, m=9, d=8)
    shape = output_shape(a, b, k)
    nbytes = int(np.prod(shape)) * 4
    outputs = regions.create("out", nbytes)
    out_values = grpcclient.InferRequestedOutput("VALUES")
    out_values.set_shared_memory("out", nbytes)
    result = client.infer("euclidean", [infer_input("A", a), infer_input("B", b)],
                          outputs=[out_values, grpcclient.InferRequestedOutput("INDICES")],
                          parameters={"top_k": k})
    want_values, want_indices = top_k_reference("euclidean",
                                                dense_reference("euclidean", a, b), k)
    np.testing.assert_array_equal(result.as_numpy("INDICES"), want_indices)
    np.testing.assert_allclose(as64(read_region(outputs, np.float32, shape)), want_values,
                               **fp32_tolerance(want_values))


def test_fp16_input_region_raw_b_and_raw_output(client, regions, rng):
    """A (FP16) from a region, B (FP16) in raw_input_contents, S returned in the response."""
    a, b = random_pair(rng, 0, n=3, m=4, d=10, datatype="FP16")
    inputs = regions.create("in", a.nbytes)
    shm.set_shared_memory_region(inputs, [a])
    in_a = grpcclient.InferInput("A", list(a.shape), "FP16")
    in_a.set_shared_memory("in", a.nbytes)
    result = client.infer("euclidean", [in_a, infer_input("B", b)])
    ref = dense_reference("euclidean", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


@pytest.mark.parametrize("output_dtype,numpy_dtype,mantissa_bits",
                         [("FP16", np.float16, 10), ("BF16", ml_dtypes.bfloat16, 7)])
def test_half_precision_output_into_region(client, regions, rng, output_dtype, numpy_dtype,
                                           mantissa_bits):
    """output_dtype FP16/BF16 written into a region sized for 2-byte elements, at a 2-aligned
    offset."""
    a, b = random_pair(rng, 0, n=3, m=5, d=8)
    shape = output_shape(a, b)
    nbytes = int(np.prod(shape)) * 2
    outputs = regions.create("out", 2 + nbytes)
    out_s = grpcclient.InferRequestedOutput("S")
    out_s.set_shared_memory("out", nbytes, offset=2)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)], outputs=[out_s],
                          parameters={"output_dtype": output_dtype})
    assert result.get_output("S").datatype == output_dtype
    ref = dense_reference("cosine", a, b)
    np.testing.assert_allclose(as64(read_region(outputs, numpy_dtype, shape, offset=2)), ref,
                               **rounded_tolerance(ref, mantissa_bits))


def test_fp16_input_at_odd_offset(client, regions, rng):
    a, b = random_pair(rng, 0, n=3, m=4, d=8, datatype="FP16")
    inputs = regions.create("in", 1 + a.nbytes)
    shm.set_shared_memory_region(inputs, [a], offset=1)
    in_a = grpcclient.InferInput("A", list(a.shape), "FP16")
    in_a.set_shared_memory("in", a.nbytes, offset=1)
    result = client.infer("dot", [in_a, infer_input("B", b)])
    ref = dense_reference("dot", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


@pytest.mark.parametrize("case", ["size-string", "offset-negative", "size-negative",
                                  "no-size", "unknown-parameter", "region-int"])
def test_shared_memory_parameter_errors(client, server, regions, case):
    """Badly formed input parameters, sent on the generated stub (tritonclient would not
    build them): INVALID_ARGUMENT."""
    regions.create("in", 256)
    b = np.ones((4, 8), np.float32)
    request = service_pb2.ModelInferRequest(model_name="dot")
    a = request.inputs.add(name="A", datatype="FP32", shape=[3, 8])
    a.parameters["shared_memory_region"].string_param = "in"
    a.parameters["shared_memory_byte_size"].int64_param = 96
    if case == "size-string":
        a.parameters["shared_memory_byte_size"].string_param = "96"
    elif case == "offset-negative":
        a.parameters["shared_memory_offset"].int64_param = -4
    elif case == "size-negative":
        a.parameters["shared_memory_byte_size"].int64_param = -96
    elif case == "no-size":
        del a.parameters["shared_memory_byte_size"]
    elif case == "unknown-parameter":
        a.parameters["shared_memory_kind"].string_param = "system"
    elif case == "region-int":
        a.parameters["shared_memory_region"].int64_param = 1
    request.inputs.add(name="B", datatype="FP32", shape=[4, 8])
    request.raw_input_contents.append(b.tobytes())
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(request, timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT, excinfo.value.details()
    assert_serving(client)


def test_unaligned_input_offset_is_copied(client, regions, rng):
    """An FP32 input starting at byte 2 of its region (not 4-aligned) is still read right."""
    a, b = random_pair(rng, 0, n=3, m=4, d=8)
    inputs = regions.create("in", 2 + a.nbytes)
    shm.set_shared_memory_region(inputs, [a], offset=2)
    in_a = grpcclient.InferInput("A", list(a.shape), "FP32")
    in_a.set_shared_memory("in", a.nbytes, offset=2)
    result = client.infer("cosine", [in_a, infer_input("B", b)])
    ref = dense_reference("cosine", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


def test_region_registered_at_offset(client, regions, rng):
    """A region registered from byte 4096 of its object: tensor offsets count from there."""
    a, b = random_pair(rng, 0, n=2, m=3, d=4)
    handle = regions.create("obj", 4096 + a.nbytes + b.nbytes, register=False)
    shm.set_shared_memory_region(handle, [a, b], offset=4096)
    regions.register("part", regions.key("obj"), a.nbytes + b.nbytes, offset=4096)
    in_a = grpcclient.InferInput("A", list(a.shape), "FP32")
    in_a.set_shared_memory("part", a.nbytes)
    in_b = grpcclient.InferInput("B", list(b.shape), "FP32")
    in_b.set_shared_memory("part", b.nbytes, offset=a.nbytes)
    result = client.infer("dot", [in_a, in_b])
    ref = dense_reference("dot", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


def test_status_and_unregister(client, regions):
    regions.create("one", 64, register=False)
    regions.create("two", 128, register=False)
    regions.register("one", regions.key("one"), 64)
    regions.register("two", regions.key("two"), 96, offset=32)
    status = client.get_system_shared_memory_status(as_json=True)
    by_name = {name: region for name, region in status.get("regions", {}).items()}
    assert by_name["one"]["key"] == regions.key("one")
    assert int(by_name["one"]["byte_size"]) == 64
    assert int(by_name["two"]["offset"]) == 32 and int(by_name["two"]["byte_size"]) == 96
    only = client.get_system_shared_memory_status(region_name="two", as_json=True)
    assert list(only["regions"]) == ["two"]

    client.unregister_system_shared_memory("one")
    status = client.get_system_shared_memory_status(as_json=True)
    assert "one" not in status.get("regions", {}) and "two" in status["regions"]
    with pytest.raises(InferenceServerException) as excinfo:
        client.get_system_shared_memory_status(region_name="one")
    assert status_of(excinfo) == "NOT_FOUND"
    # An unregistered region can no longer be named by a request.
    a = np.ones((2, 4), np.float32)
    in_a = grpcclient.InferInput("A", [2, 4], "FP32")
    in_a.set_shared_memory("one", a.nbytes)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("dot", [in_a, infer_input("B", a)])
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert_serving(client)


def test_duplicate_name_already_exists(client, regions):
    regions.create("dup", 64)
    with pytest.raises(InferenceServerException) as excinfo:
        client.register_system_shared_memory("dup", regions.key("dup"), 64)
    assert status_of(excinfo) == "ALREADY_EXISTS"


@pytest.mark.parametrize("offset,byte_size", [(0, 4097), (4000, 200), (4096, 1), (0, 0)],
                         ids=["size", "offset+size", "offset-at-end", "zero"])
def test_register_out_of_bounds(client, regions, offset, byte_size):
    """The object has 4096 bytes: ranges beyond it (or empty) are INVALID_ARGUMENT."""
    regions.create("obj", 4096, register=False)
    with pytest.raises(InferenceServerException) as excinfo:
        client.register_system_shared_memory("oob", regions.key("obj"), byte_size,
                                             offset=offset)
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert "oob" not in client.get_system_shared_memory_status(as_json=True).get("regions", {})


@pytest.mark.parametrize("key", ["/dev/shm/simserve_x", "../simserve_x", "simserve_x", "/",
                                 "/.", "/..", "/a/b", ""])
def test_register_non_posix_key(client, key):
    with pytest.raises(InferenceServerException) as excinfo:
        client.register_system_shared_memory("badkey", key, 16)
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert "badkey" not in client.get_system_shared_memory_status(as_json=True).get(
        "regions", {})


def test_register_missing_object(client):
    with pytest.raises(InferenceServerException) as excinfo:
        client.register_system_shared_memory("missing", f"/simserve_kserve_none_{os.getpid()}",
                                             16)
    assert status_of(excinfo) == "NOT_FOUND"


@pytest.mark.parametrize("case", ["past-end", "offset-past-end", "size-vs-shape",
                                  "unknown-region", "output-too-small"])
def test_use_out_of_bounds(client, regions, case):
    """Tensor ranges are checked against the region at every use."""
    a = np.ones((4, 8), np.float32)  # 128 bytes
    regions.create("in", 128)
    regions.create("out", 64)
    region, byte_size, offset, out_bytes = {
        "past-end": ("in", 128, 4, 64),
        "offset-past-end": ("in", 128, 256, 64),
        "size-vs-shape": ("in", 64, 0, 64),      # the shape needs 128 bytes
        "unknown-region": ("nope", 128, 0, 64),
        "output-too-small": ("in", 128, 0, 32),  # S [4, 4] FP32 needs 64 bytes
    }[case]
    in_a = grpcclient.InferInput("A", [4, 8], "FP32")
    in_a.set_shared_memory(region, byte_size, offset=offset)
    out_s = grpcclient.InferRequestedOutput("S")
    out_s.set_shared_memory("out", out_bytes)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("cosine", [in_a, infer_input("B", a[:4])], outputs=[out_s])
    assert status_of(excinfo) == "INVALID_ARGUMENT", excinfo.value.message()
    assert_serving(client)


def test_misaligned_output_offset(client, regions, rng):
    """Results are written in place: an output start not aligned to 4 bytes is refused."""
    a, b = random_pair(rng, 0, n=2, m=2, d=4)
    regions.create("out", 64)
    out_s = grpcclient.InferRequestedOutput("S")
    out_s.set_shared_memory("out", 16, offset=2)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("dot", [infer_input("A", a), infer_input("B", b)], outputs=[out_s])
    assert status_of(excinfo) == "INVALID_ARGUMENT"


def test_off_without_flag(server_no_shm):
    """Without --allow_shared_memory: registration, status and use fail with
    FAILED_PRECONDITION, nothing is mapped, and plain requests still work."""
    key = f"/simserve_kserve_{os.getpid()}_noflag"
    handle = shm.create_shared_memory_region("noflag", key, 64, create_only=True)
    try:
        with grpcclient.InferenceServerClient(server_no_shm.address) as client:
            with pytest.raises(InferenceServerException) as excinfo:
                client.register_system_shared_memory("noflag", key, 64)
            assert status_of(excinfo) == "FAILED_PRECONDITION"
            with pytest.raises(InferenceServerException) as excinfo:
                client.get_system_shared_memory_status()
            assert status_of(excinfo) == "FAILED_PRECONDITION"
            in_a = grpcclient.InferInput("A", [2, 8], "FP32")
            in_a.set_shared_memory("noflag", 64)
            with pytest.raises(InferenceServerException) as excinfo:
                client.infer("dot", [in_a, infer_input("B", np.ones((2, 8), np.float32))])
            assert status_of(excinfo) == "FAILED_PRECONDITION"
            assert_serving(client)
    finally:
        shm.destroy_shared_memory_region(handle)
