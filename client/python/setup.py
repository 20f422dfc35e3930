"""Build hook for the simserve client: generates the gRPC stubs from the proto, then setup().

The proto is looked up at $SIMSERVE_PROTO_DIR, else ../../proto (the repository layout, used by
`pip install ./client/python` and editable installs). Stubs are written to src/simserve/v1/
(git-ignored) so that the generated imports (`from simserve.v1 import similarity_pb2`) resolve
inside this package. Building from an sdist, which carries the generated files, needs no proto.
"""

import hashlib
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_REL = os.path.join("simserve", "v1", "similarity.proto")
OUT_DIR = os.path.join(HERE, "src")
GEN_DIR = os.path.join(OUT_DIR, "simserve", "v1")
PB2 = os.path.join(GEN_DIR, "similarity_pb2.py")
PB2_GRPC = os.path.join(GEN_DIR, "similarity_pb2_grpc.py")


def _proto_root():
    for cand in (os.environ.get("SIMSERVE_PROTO_DIR"), os.path.join(HERE, "..", "..", "proto")):
        if cand and os.path.isfile(os.path.join(cand, PROTO_REL)):
            return os.path.abspath(cand)
    return None


def _generate():
    root = _proto_root()
    if root is None:
        if os.path.isfile(PB2) and os.path.isfile(PB2_GRPC):
            return  # sdist build: generated files shipped with it.
        sys.exit("simserve: proto/simserve/v1/similarity.proto not found; set SIMSERVE_PROTO_DIR")
    from grpc_tools import protoc  # build requirement
    import grpc_tools

    proto = os.path.join(root, PROTO_REL)
    os.makedirs(GEN_DIR, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={root}",
        f"--proto_path={os.path.join(os.path.dirname(grpc_tools.__file__), '_proto')}",
        f"--python_out={OUT_DIR}",
        f"--pyi_out={OUT_DIR}",
        f"--grpc_python_out={OUT_DIR}",
        proto,
    ]
    if protoc.main(args) != 0:
        sys.exit("simserve: grpc_tools.protoc failed on " + proto)
    with open(os.path.join(GEN_DIR, "__init__.py"), "w") as f:
        f.write('"""Generated from proto/simserve/v1/similarity.proto at build time."""\n')
    shutil.copyfile(proto, os.path.join(GEN_DIR, "similarity.proto"))
    with open(proto, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    with open(os.path.join(GEN_DIR, ".proto-sha256"), "w") as f:
        f.write(digest + "\n")


def _runtime_requirements():
    """grpcio/protobuf at least as new as the generator (the stubs check this at import)."""
    reqs = ["numpy>=1.21"]
    with open(PB2) as f:
        m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*"
                      r"(\d+),\s*(\d+),\s*(\d+)", f.read())
    reqs.append("protobuf>=%s.%s.%s" % m.groups() if m else "protobuf>=3.20")
    with open(PB2_GRPC) as f:
        m = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", f.read())
    reqs.append("grpcio>=" + m.group(1) if m else "grpcio>=1.51")
    return reqs


_generate()
setup(
    package_dir={"": "src"},
    packages=find_packages("src"),
    install_requires=_runtime_requirements(),
)
