"""Build hook for the simserve client: compiles the proto into a FileDescriptorSet, then setup().

The proto is looked up at $SIMSERVE_PROTO_DIR, else ../../proto (the repository layout, used by
`pip install ./client/python` and editable installs). Written to src/simserve/v1/ (git-ignored):
  similarity.binpb     the FileDescriptorSet (`protoc --descriptor_set_out --include_imports`)
                       from which simserve/v1/similarity_pb2.py and _pb2_grpc.py (committed,
                       hand-written) build the message classes and the stub at import time;
  similarity_pb2.pyi   typing stubs (`protoc --pyi_out`);
  similarity.proto     a copy of the source, and .proto-sha256 its digest (setup.d's stamp).
None of them depends on the protobuf / grpcio versions: any grpcio-tools gives the same data,
and the package runs on every runtime in its stated range (pyproject.toml). Files are replaced
atomically and only when their content changes, so rebuilding a checkout never disturbs a
process or an editable install that uses the same tree. Building from an sdist, which carries
the generated files, needs no proto.
"""

import hashlib
import os
import sys
import tempfile

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_REL = os.path.join("simserve", "v1", "similarity.proto")
GEN_DIR = os.path.join(HERE, "src", "simserve", "v1")
DESCRIPTOR_SET = os.path.join(GEN_DIR, "similarity.binpb")


def _proto_root():
    for cand in (os.environ.get("SIMSERVE_PROTO_DIR"), os.path.join(HERE, "..", "..", "proto")):
        if cand and os.path.isfile(os.path.join(cand, PROTO_REL)):
            return os.path.abspath(cand)
    return None


def _put(path, data):
    """Writes `data` to `path` atomically, unless the file already holds exactly it."""
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _generate():
    root = _proto_root()
    if root is None:
        if os.path.isfile(DESCRIPTOR_SET):
            return  # sdist build: generated files shipped with it.
        sys.exit("simserve: proto/simserve/v1/similarity.proto not found; set SIMSERVE_PROTO_DIR")
    from grpc_tools import protoc  # build requirement (any version: only its protoc is used)
    import grpc_tools

    proto = os.path.join(root, PROTO_REL)
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={root}",
            f"--proto_path={os.path.join(os.path.dirname(grpc_tools.__file__), '_proto')}",
            f"--descriptor_set_out={os.path.join(tmp, 'similarity.binpb')}",
            "--include_imports",
            f"--pyi_out={tmp}",
            proto,
        ]
        if protoc.main(args) != 0:
            sys.exit("simserve: grpc_tools.protoc failed on " + proto)
        os.makedirs(GEN_DIR, exist_ok=True)
        for src, dst in ((os.path.join(tmp, "similarity.binpb"), DESCRIPTOR_SET),
                         (os.path.join(tmp, "simserve", "v1", "similarity_pb2.pyi"),
                          os.path.join(GEN_DIR, "similarity_pb2.pyi")),
                         (proto, os.path.join(GEN_DIR, "similarity.proto"))):
            with open(src, "rb") as f:
                _put(dst, f.read())
    with open(proto, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    _put(os.path.join(GEN_DIR, ".proto-sha256"), (digest + "\n").encode())


_generate()
setup(package_dir={"": "src"}, packages=find_packages("src"))
