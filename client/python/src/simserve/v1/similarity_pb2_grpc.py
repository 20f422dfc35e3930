"""The Similarity service of simserve/v1/similarity.proto, as grpcio-tools' `similarity_pb2_grpc`
has it: SimilarityStub(channel) (sync or grpc.aio), SimilarityServicer and
add_SimilarityServicer_to_server, built from the descriptor; see simserve._protoload."""

from simserve import _protoload
from simserve.v1 import similarity_pb2

SimilarityStub, SimilarityServicer, add_SimilarityServicer_to_server = _protoload.service(
    similarity_pb2._FILE, "Similarity", __name__)
