"""The messages and enums of simserve/v1/similarity.proto, as protoc's `similarity_pb2` has them
(DESCRIPTOR, one class per message, an EnumTypeWrapper per enum and each enum value), built at
import time from the FileDescriptorSet `similarity.binpb` in a private descriptor pool; see
simserve._protoload. Typing: similarity_pb2.pyi (generated with the descriptor set)."""

from simserve import _protoload

_FILE = _protoload.load(__package__, "similarity.binpb", "simserve/v1/similarity.proto",
                        globals(), __name__)
