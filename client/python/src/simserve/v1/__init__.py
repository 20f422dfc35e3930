"""simserve.v1 — the messages and the Similarity service of proto/simserve/v1/similarity.proto.

`similarity_pb2` / `similarity_pb2_grpc` have the names and contents of protoc's gencode but are
built at import time from `similarity.binpb` (the proto's FileDescriptorSet, written by setup.py
when the package is built), so they work with any protobuf / grpcio the package supports.
"""
