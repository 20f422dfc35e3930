#!/usr/bin/env bash
# Deploy test: renders the base and every overlay of deploy/k8s with kustomize, decodes every
# rendered object strictly into the Kubernetes / prometheus-operator Go types and checks the
# deployment policy (tests/deploy/validate), then proves the validator rejects broken
# manifests: a misspelled field, wrong types, and policy violations, each with its message.
# Usage: k8s_test.sh [WORK_DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
K8S="$DEPLOY_ROOT/deploy/k8s"

if ! command -v go >/dev/null && [ -x /usr/local/go/bin/go ]; then export PATH="/usr/local/go/bin:$PATH"; fi
command -v go >/dev/null || die "go is required (run scripts/setup.sh)"
kustomize_build() {
  local gobin="${SIMSERVE_TOOLS_DIR:-$HOME/.cache/simserve}/go/bin"
  if command -v kubectl >/dev/null; then kubectl kustomize "$1"
  elif command -v kustomize >/dev/null; then kustomize build "$1"
  elif [ -x "$gobin/kustomize" ]; then "$gobin/kustomize" build "$1"
  else die "neither kubectl nor kustomize found (run scripts/setup.sh)"; fi
}

log "building the validator"
(cd "$DEPLOY_ROOT/tests/deploy/validate" && go build -o "$WORK/validate" .) || die "validator build failed"
VALIDATE="$WORK/validate"

# 1. Every overlay renders and validates, with the overlay's own expectations.
declare -A FLAGS=(
  [base]="-min-replicas 1 -max-replicas 1 -require-kinds Deployment,Service"
  [dev]="-min-replicas 1 -max-replicas 1 -require-kinds Namespace,Deployment,Service -forbid-kinds HorizontalPodAutoscaler"
  [prod]="-min-replicas 2 -require-kinds Namespace,Deployment,Service,HorizontalPodAutoscaler,PodDisruptionBudget,ServiceMonitor,NetworkPolicy,PersistentVolumeClaim"
)
for name in base dev prod; do
  dir="$K8S/overlays/$name"
  [ "$name" = base ] && dir="$K8S/base"
  kustomize_build "$dir" >"$WORK/$name.yaml" || die "kustomize failed to render $name"
  # shellcheck disable=SC2086
  "$VALIDATE" ${FLAGS[$name]} "$WORK/$name.yaml" >"$WORK/$name.out" 2>&1 ||
    { cat "$WORK/$name.out" >&2; die "$name does not validate"; }
  log "$name: $(tail -1 "$WORK/$name.out") [$(grep '^decoded' "$WORK/$name.out" | cut -d' ' -f2 | paste -sd' ')]"
done
for overlay in "$K8S"/overlays/*/; do
  case "$(basename "$overlay")" in dev | prod) ;; *) die "overlay $(basename "$overlay") has no test expectations here" ;; esac
done

# 2. Broken manifests must fail, with the right message.
# expect_fail NAME OVERLAY SED_SCRIPT EXPECTED_MESSAGE
expect_fail() {
  local name="$1" overlay="$2" script="$3" want="$4"
  local bad="$WORK/bad-$name.yaml"
  sed "$script" "$WORK/$overlay.yaml" >"$bad"
  cmp -s "$bad" "$WORK/$overlay.yaml" && die "negative case $name: the edit changed nothing"
  local out rc=0
  # shellcheck disable=SC2086
  out=$("$VALIDATE" ${FLAGS[$overlay]} "$bad" 2>&1) || rc=$?
  [ "$rc" -eq 1 ] || { echo "$out" >&2; die "negative case $name: exit $rc, want 1"; }
  grep -qF -- "$want" <<<"$out" || { echo "$out" >&2; die "negative case $name: message lacks '$want'"; }
  log "rejected as expected: $name"
}
expect_fail misspelled-readinessProbe dev 's/readinessProbe:/readinesProbe:/' \
  'unknown field "spec.template.spec.containers[0].readinesProbe"'
expect_fail wrong-case-field dev 's/ readOnlyRootFilesystem:/ ReadOnlyRootFilesystem:/' \
  'unknown field "spec.template.spec.containers[0].securityContext.ReadOnlyRootFilesystem"'
expect_fail replicas-string dev 's/^  replicas: 1$/  replicas: "one"/' \
  'cannot unmarshal string into Go struct field DeploymentSpec.spec.replicas of type int32'
expect_fail containerPort-string dev 's/containerPort: 50051/containerPort: "grpc"/' \
  'spec.template.spec.containers.ports.containerPort of type int32'
expect_fail bad-quantity dev '0,/cpu: "1"/s//cpu: one/' 'quantities must match the regular expression'
expect_fail duplicate-field dev 's/^\( *\)runAsNonRoot: true$/&\n\1runAsNonRoot: false/' \
  'already set in map'
expect_fail unknown-kind dev 's/^kind: Service$/kind: Servise/' 'no kind "Servise" is registered'
expect_fail servicemonitor-misspelled prod 's/^  endpoints:$/  endpoint:/' 'unknown field "spec.endpoint"'
expect_fail hpa-wrong-type prod 's/averageUtilization: 70/averageUtilization: seventy/' \
  'of type int32'
expect_fail servicemonitor-bad-duration prod 's/interval: 15s/interval: 15 seconds/' \
  'endpoint interval "15 seconds" is not a Prometheus duration'
expect_fail bad-label-value dev 's|app.kubernetes.io/component: server$|app.kubernetes.io/component: "server pods"|' \
  'metadata.labels: Invalid value: "server pods"'
expect_fail bad-service-name dev 's/^  name: simserve-headless$/  name: simserve.headless/' \
  'metadata.name: Invalid value: "simserve.headless"'
expect_fail policy-writable-rootfs dev 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' \
  'readOnlyRootFilesystem must be true'
expect_fail policy-cpu-request-ne-limit dev '0,/cpu: "1"/s//cpu: 500m/' \
  'must equal limits.cpu'
expect_fail policy-probe-port dev 's/^            port: 50051$/            port: 8080/' \
  'grpc.port=8080, want 50051'
expect_fail policy-short-grace dev 's/terminationGracePeriodSeconds: 35/terminationGracePeriodSeconds: 20/' \
  'terminationGracePeriodSeconds=20 must exceed'
expect_fail policy-no-headless dev '/clusterIP: None/d' 'a headless Service (clusterIP: None) is required'
expect_fail policy-port-name dev 's/name: metrics$/name: prom/' 'missing container port named "metrics"'
expect_fail policy-no-omp dev 's/- name: OMP_NUM_THREADS/- name: OMP_THREAD_LIMIT/' \
  'env OMP_NUM_THREADS must come from resourceFieldRef limits.cpu'
expect_fail policy-hpa-with-replicas prod 's/^  revisionHistoryLimit: 5$/  replicas: 4\n&/' \
  'spec.replicas must be unset when HorizontalPodAutoscaler/simserve scales it'
# Galleries: dev has the init-container + emptyDir variant, prod the ReadOnlyMany claim.
grep -q 'name: SIMSERVE_GALLERY_DIR' "$WORK/dev.yaml" || die "dev renders no gallery directory"
grep -q 'image: simserve-galleries:dev' "$WORK/dev.yaml" || die "dev's gallery init image not set"
grep -q 'claimName: simserve-galleries' "$WORK/prod.yaml" || die "prod mounts no gallery claim"
expect_fail gallery-claim-rwo prod 's/- ReadOnlyMany/- ReadWriteOnce/' \
  'accessModes must include ReadOnlyMany'
expect_fail gallery-claim-missing prod 's/claimName: simserve-galleries/claimName: galleries-typo/' \
  'PersistentVolumeClaim "galleries-typo" is not rendered'
expect_fail gallery-claim-writable prod '/claimName: simserve-galleries/{n;s/readOnly: true/readOnly: false/}' \
  'persistentVolumeClaim.readOnly must be true'
expect_fail gallery-mount-writable dev 's/readOnly: true/readOnly: false/' \
  'the gallery directory /var/lib/simserve/galleries must be mounted readOnly'
expect_fail gallery-dir-not-mounted dev 's|value: /var/lib/simserve/galleries|value: /galleries|' \
  'env SIMSERVE_GALLERY_DIR=/galleries is not a volume mount'
expect_fail gallery-emptydir-tmpfs dev 's/^\( *\)sizeLimit: 2Gi$/\1medium: Memory\n&/' \
  'a tmpfs emptyDir would count against the memory limit'
expect_fail gallery-emptydir-unbounded dev 's/^\( *\)sizeLimit: 2Gi$/\1medium: ""/' \
  'the gallery emptyDir needs a sizeLimit'
expect_fail gallery-not-filled dev '/^      initContainers:$/,/^      securityContext:$/{/^        - mountPath: \/var\/lib\/simserve\/galleries$/{N;s/$/\n          readOnly: true/}}' \
  'no init container mounts the gallery emptyDir writable'
expect_fail gallery-memory-over-limit dev '/name: SIMSERVE_GALLERY_MEMORY_BYTES/{n;s/"268435456"/"805306368"/}' \
  'exceed limits.memory (1Gi)'
expect_fail gallery-memory-default prod '/name: SIMSERVE_GALLERY_MEMORY_BYTES/,+1d' \
  'SIMSERVE_GALLERY_MEMORY_BYTES (4294967296)'
expect_fail gallery-rescan-not-a-number prod 's/^\( *value: \)"10"$/\1"10s"/' \
  'env SIMSERVE_GALLERY_RESCAN_SECONDS="10s" must be a positive integer'
expect_fail init-privilege-escalation dev '/^      initContainers:$/,/^      securityContext:$/s/allowPrivilegeEscalation: false/allowPrivilegeEscalation: true/' \
  'init container "galleries": policy: allowPrivilegeEscalation must be false'
expect_fail init-not-guaranteed dev '/^      initContainers:$/,/^      securityContext:$/{0,/cpu: 100m/s//cpu: 200m/}' \
  'init container "galleries": policy: requests.cpu must equal limits.cpu'
log "k8s_test: PASS"
