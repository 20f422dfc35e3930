# simserve container image: a build stage that runs the project's own setup script and CMake
# release build, and a slim runtime stage holding only the server binary and the Debian
# runtime libraries it links (no compilers, no headers). Build with Docker or podman:
#   podman build --pull=never -t simserve .        (see deploy/README.md)
# Runs as a non-root numeric user, works with a read-only root filesystem (writes nothing;
# /tmp may be a tmpfs/emptyDir), and the server is PID 1 handling SIGTERM itself (graceful
# drain), so no init is needed.

ARG DEBIAN_IMAGE=debian:bookworm

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    SIMSERVE_SETUP_VENV=0
WORKDIR /src
# Toolchain and -dev packages exactly as a developer gets them (minus the Python venv, which only
# tests use); only scripts/setup.sh is in the context at this point (see .dockerignore), so
# this layer stays cached until the script changes.
COPY scripts/setup.sh scripts/setup.sh
RUN ./scripts/setup.sh \
 && apt-get update -qq && apt-get install -y -qq --no-install-recommends ccache >/dev/null \
 && rm -rf /var/lib/apt/lists/*
COPY CMakeLists.txt CMakePresets.json ./
COPY proto proto
COPY kernels kernels
COPY server server
# The server reads --gallery_dir files with the one .npy implementation, client/npy.
COPY client client
# The same configure as scripts/build.sh; only the server target is built (tests are not run
# here, they run in CI). ccache in a build cache mount makes rebuilds after small source
# changes quick. Then the runtime package list is derived from what the binary links.
RUN --mount=type=cache,target=/root/.cache/ccache,id=simserve-ccache \
    export CCACHE_DIR=/root/.cache/ccache \
 && cmake --preset release -DCMAKE_CXX_COMPILER_LAUNCHER=ccache >/dev/null \
 && cmake --build --preset release --target simserve \
 && install -D -m 0755 -s build/release/server/simserve /out/simserve \
 && install -D -m 0644 -s -t /out/lib build/release/server/libsimserve_libssl_compat.so \
      build/release/server/libsimserve_libcrypto_compat.so \
 && for lib in $(ldd /out/simserve | awk '$2 == "=>" && $3 ~ /^\// {print $3}'); do \
      dpkg -S "$lib" 2>/dev/null || dpkg -S "$(readlink -f "$lib")" 2>/dev/null \
        || dpkg -S "*/$(basename "$lib")" ; \
    done | cut -d: -f1 | sort -u > /out/runtime-packages.txt \
 && if grep -E -- '-dev$' /out/runtime-packages.txt; then echo "dev package needed at runtime" >&2; exit 1; fi \
 && echo "runtime packages:" $(cat /out/runtime-packages.txt)

# ---------------------------------------------------------------------------------------------
FROM ${DEBIAN_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
COPY --from=build /out/runtime-packages.txt /tmp/runtime-packages.txt
RUN apt-get update -qq \
 && xargs -a /tmp/runtime-packages.txt apt-get install -y -qq --no-install-recommends >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    /tmp/runtime-packages.txt
COPY --from=build /out/simserve /usr/local/bin/simserve
# OpenSSL 3 compatibility for the metrics port's HTTPS (server/openssl3_compat/).
COPY --from=build /out/lib/ /usr/local/lib/simserve/
# Fail the build, not the pod, if a shared library is missing.
RUN if ldd /usr/local/bin/simserve | grep 'not found'; then exit 1; fi

LABEL org.opencontainers.image.title="simserve" \
      org.opencontainers.image.description="Batched pairwise similarity (cosine, dot, euclidean) over gRPC with oneDNN"
# Listen on all interfaces inside the pod; every flag has a SIMSERVE_* equivalent.
ENV SIMSERVE_LISTEN=0.0.0.0:50051 \
    SIMSERVE_METRICS_LISTEN=0.0.0.0:9464
# 50051: gRPC (Similarity, grpc.health.v1.Health, reflection). 9464: Prometheus /metrics.
EXPOSE 50051 9464
USER 65532:65532
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/simserve"]
