#!/usr/bin/env bash
# Deploy test: renders the base and every overlay of deploy/k8s with kustomize (and prod plus
# components/mtls), decodes every rendered object strictly into the Kubernetes,
# prometheus-operator and cert-manager Go types and checks the deployment policy
# (tests/deploy/validate), including which security features each overlay switches on (dev:
# none; prod: TLS, tokens, the health-only port for the probes, HTTPS + basic auth on /metrics),
# then deploy/kserve (ServingRuntime + InferenceService) against KServe's CRD schemas with the
# same strictness and the server policy applied to the predictor Deployment KServe makes;
# then proves the validator rejects broken manifests: a misspelled field, wrong types, and
# policy violations, each with its message.
# Usage: k8s_test.sh [WORK_DIR]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
WORK="${1:-$(mktemp -d)}"
mkdir -p "$WORK"
K8S="$DEPLOY_ROOT/deploy/k8s"

log "building the validator"
deploy_build_validator "$WORK/validate"
VALIDATE="$WORK/validate"

# 1. Every overlay renders and validates, with the overlay's own expectations.
# Secrets are never rendered: the operator creates them (deploy/README.md).
prod_kinds=Namespace,Deployment,Service,HorizontalPodAutoscaler,PodDisruptionBudget,ServiceMonitor,NetworkPolicy,PersistentVolumeClaim,Certificate,Issuer
prod_security=tls,tokens,health,metrics-tls,metrics-auth
declare -A FLAGS=(
  [base]="-min-replicas 1 -max-replicas 1 -require-kinds Deployment,Service -security none"
  [dev]="-min-replicas 1 -max-replicas 1 -require-kinds Namespace,Deployment,Service -forbid-kinds HorizontalPodAutoscaler,Certificate,Issuer,Secret -security none"
  [prod]="-min-replicas 2 -require-kinds $prod_kinds -forbid-kinds Secret -security $prod_security"
  [prod-mtls]="-min-replicas 2 -require-kinds $prod_kinds -forbid-kinds Secret -security $prod_security,mtls"
  [kserve]="$(deploy_kserve_crd_flags)-min-replicas 2 -require-kinds ServingRuntime,InferenceService -forbid-kinds Deployment,Service,Secret -security none"
)
# prod + components/mtls: an overlay of the overlay, as a user would write it.
mkdir -p "$WORK/prod-mtls"
cat >"$WORK/prod-mtls/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: simserve
resources:
  - $(realpath --relative-to="$WORK/prod-mtls" "$K8S/overlays/prod")
components:
  - $(realpath --relative-to="$WORK/prod-mtls" "$K8S/components/mtls")
EOF
for name in base dev prod prod-mtls kserve; do
  case "$name" in
    base) dir="$K8S/base" ;;
    kserve) dir="$DEPLOY_ROOT/deploy/kserve" ;;
    prod-mtls) dir="$WORK/prod-mtls" ;;
    *) dir="$K8S/overlays/$name" ;;
  esac
  deploy_kustomize "$dir" >"$WORK/$name.yaml" || die "kustomize failed to render $name"
  # shellcheck disable=SC2086
  "$VALIDATE" ${FLAGS[$name]} "$WORK/$name.yaml" >"$WORK/$name.out" 2>&1 ||
    { cat "$WORK/$name.out" >&2; die "$name does not validate"; }
  log "$name: $(tail -1 "$WORK/$name.out") [$(grep '^decoded' "$WORK/$name.out" | cut -d' ' -f2 | paste -sd' ')]"
done
for overlay in "$K8S"/overlays/*/; do
  case "$(basename "$overlay")" in dev | prod) ;; *) die "overlay $(basename "$overlay") has no test expectations here" ;; esac
done

# The security split, spelled out (the validator's -security checks it too): the env, the
# mounts and the probe port in the rendered YAML.
for f in SIMSERVE_TLS_ SIMSERVE_AUTH_TOKEN_FILE SIMSERVE_HEALTH_LISTEN SIMSERVE_METRICS_TLS_ SIMSERVE_METRICS_BASIC_AUTH_FILE /etc/simserve/ 'port: 8081' 'kind: Certificate'; do
  grep -qF -- "$f" "$WORK/dev.yaml" && die "dev renders '$f': dev must stay plaintext without tokens"
  grep -qF -- "$f" "$WORK/prod.yaml" || die "prod lacks '$f'"
done
[ "$(grep -c '^            port: 8081$' "$WORK/prod.yaml")" = 3 ] || die "prod: not all three probes on the health port 8081"
[ "$(grep -c '^            port: 50051$' "$WORK/dev.yaml")" = 3 ] || die "dev: not all three probes on the gRPC port 50051"
grep -q 'secretName: simserve-tokens' "$WORK/prod.yaml" || die "prod mounts no token Secret"
grep -q 'name: SIMSERVE_TLS_CLIENT_CA_FILE' "$WORK/prod.yaml" && die "prod has mutual TLS (only with components/mtls)"
grep -q 'name: SIMSERVE_TLS_CLIENT_CA_FILE' "$WORK/prod-mtls.yaml" || die "components/mtls sets no client CA"

# 2. Broken manifests must fail, with the right message.
# run_validator NAME OVERLAY SED_SCRIPT: applies the edit to the rendered overlay, checks that it
# changed something, validates it with the overlay's flags; sets OUT and RC.
run_validator() {
  local name="$1" overlay="$2" script="$3"
  local bad="$WORK/case-$name.yaml"
  sed "$script" "$WORK/$overlay.yaml" >"$bad"
  cmp -s "$bad" "$WORK/$overlay.yaml" && die "case $name: the edit changed nothing"
  RC=0
  # shellcheck disable=SC2086
  OUT=$("$VALIDATE" ${FLAGS[$overlay]} "$bad" 2>&1) || RC=$?
}
# expect_fail NAME OVERLAY SED_SCRIPT EXPECTED_MESSAGE
expect_fail() {
  run_validator "$1" "$2" "$3"
  [ "$RC" -eq 1 ] || { echo "$OUT" >&2; die "negative case $1: exit $RC, want 1"; }
  grep -qF -- "$4" <<<"$OUT" || { echo "$OUT" >&2; die "negative case $1: message lacks '$4'"; }
  log "rejected as expected: $1"
}
# expect_pass NAME OVERLAY SED_SCRIPT: a variant that must stay valid.
expect_pass() {
  run_validator "$1" "$2" "$3"
  [ "$RC" -eq 0 ] || { echo "$OUT" >&2; die "positive case $1: exit $RC, want 0"; }
  log "accepted as expected: $1"
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
# cert-manager objects: strict decoding into cert-manager's Go types (v1.21).
expect_fail certificate-misspelled prod 's/^  dnsNames:$/  dnsName:/' \
  'cert-manager.io/v1 Certificate: strict decoding error: unknown field "spec.dnsName"'
expect_fail certificate-wrong-case prod 's/^  isCA: true$/  IsCA: true/' \
  'unknown field "spec.IsCA"'
expect_fail certificate-bad-duration prod 's/duration: 2160h/duration: 90 days/' \
  'time: unknown unit " days" in duration "90 days"'
expect_fail certificate-wrong-type prod '0,/size: 256/s//size: large/' \
  'cannot unmarshal string into Go struct field CertificatePrivateKey.spec.privateKey.size of type int'
expect_fail issuer-misspelled prod 's/selfSigned: {}/selfsigned: {}/' \
  'cert-manager.io/v1 Issuer: strict decoding error: unknown field "spec.selfsigned"'
cluster_issuer='$a ---\napiVersion: cert-manager.io/v1\nkind: ClusterIssuer\nmetadata:\n  name: corp-ca\nspec:\n  ca:\n    secretName: corp-ca'
expect_pass clusterissuer prod "$cluster_issuer"
expect_fail clusterissuer-misspelled prod "${cluster_issuer/secretName/secretNam}" \
  'cert-manager.io/v1 ClusterIssuer: strict decoding error: unknown field "spec.ca.secretNam"'
expect_fail clusterissuer-namespaced prod "${cluster_issuer/  name: corp-ca/  name: corp-ca\\n  namespace: simserve}" \
  'ClusterIssuer/corp-ca: policy: metadata.namespace: Forbidden: not allowed on this type'
expect_fail issuer-two-types prod 's/^  selfSigned: {}$/&\n  ca:\n    secretName: simserve-ca/' \
  'Issuer/simserve-selfsigned: policy: set exactly one of acme, ca, vault, selfSigned, venafi (got 2)'
expect_fail certificate-issuer-missing prod '/issuerRef:/,/name:/s/name: simserve-ca$/name: simserve-cax/' \
  'Certificate/simserve-tls: policy: issuerRef names Issuer "simserve-cax", which is not rendered'
expect_fail certificate-dnsname-missing prod '/^  - simserve-headless.simserve.svc$/d' \
  'dnsNames lack "simserve-headless.simserve.svc" (Service/simserve-headless)'
expect_fail certificate-placeholder prod 's/^  - simserve.simserve.svc.cluster.local$/  - simserve.NAMESPACE.svc.cluster.local/' \
  'dnsName "simserve.NAMESPACE.svc.cluster.local" still holds the placeholder NAMESPACE'
expect_fail certificate-renews-too-late prod 's/^  renewBefore: 720h$/  renewBefore: 2200h/' \
  'renewBefore 2200h0m0s must be shorter than duration 2160h0m0s'
expect_fail certificate-key-never-rotates prod 's/rotationPolicy: Always/rotationPolicy: Never/' \
  'Certificate/simserve-tls: policy: privateKey.rotationPolicy Never keeps the served key forever'
expect_fail certificate-no-server-auth prod '0,/- server auth/{/- server auth/d}' \
  'usages [digital signature] lack "server auth"'
expect_fail ca-not-a-ca prod 's/^  isCA: true$/  isCA: false/' \
  'ca.secretName "simserve-ca" is made by Certificate/simserve-ca, which is not isCA'
expect_fail certificate-unused prod 's/^  secretName: simserve-tls$/  secretName: simserve-tls2/' \
  'Certificate/simserve-tls: policy: its Secret "simserve-tls2" is used by nothing'
# TLS, the health-only port and the probes.
expect_fail tls-probe-on-grpc-port prod 's/^            port: 8081$/            port: 50051/' \
  'startupProbe grpc.port=50051, want 8081'
expect_fail tls-without-health-port prod '/name: SIMSERVE_HEALTH_LISTEN/,+1d' \
  'the gRPC port serves TLS and kubelet gRPC probes are plaintext: set SIMSERVE_HEALTH_LISTEN'
expect_fail health-on-loopback prod 's/value: 0.0.0.0:8081/value: 127.0.0.1:8081/' \
  'the kubelet probes the pod IP, a loopback listener never answers it'
expect_fail health-port-undeclared prod 's/containerPort: 8081/containerPort: 8082/' \
  'needs a container port named "health" with containerPort 8081'
expect_fail health-port-admitted prod '/^  - from:$/i\  - ports:\n    - port: health\n      protocol: TCP' \
  'NetworkPolicy/simserve: policy: ingress rule 1 admits port health, the health-only port'
expect_fail health-port-exposed prod '0,/targetPort: metrics/s//targetPort: health/' \
  'Service/simserve: policy: port "metrics" exposes the health-only port'
expect_fail tls-cert-without-key prod '/name: SIMSERVE_TLS_KEY_FILE/,+1d' \
  'env SIMSERVE_TLS_CERT_FILE and SIMSERVE_TLS_KEY_FILE must be set together'
expect_fail tls-key-from-ca-key prod 's|value: /etc/simserve/tls/tls.key|value: /etc/simserve/tls/ca.crt|' \
  'env SIMSERVE_TLS_KEY_FILE reads key "ca.crt" of Secret "simserve-tls", which Certificate/simserve-tls fills: want "tls.key"'
expect_fail tls-h2c-app-protocol prod '0,/appProtocol: https/s//appProtocol: kubernetes.io\/h2c/' \
  'Service/simserve: policy: port grpc serves TLS but appProtocol says kubernetes.io/h2c'
expect_fail secret-world-readable prod '0,/defaultMode: 288/s//defaultMode: 292/' \
  'mode 0444 lets every uid read Secret "simserve-metrics-auth"'
expect_fail secret-no-fsgroup prod '/^        fsGroup: 65532$/d' \
  'the non-root server reads Secret "simserve-tls" only through its group'
expect_fail secret-writable prod '/mountPath: \/etc\/simserve\/tls$/{n;n;s/readOnly: true/readOnly: false/}' \
  'volume mount "tls" (/etc/simserve/tls) must be readOnly'
expect_fail secret-optional prod 's/^\( *\)secretName: simserve-tokens$/&\n\1optional: true/' \
  'Secret "simserve-tokens" must not be optional'
expect_fail secret-subpath prod 's|mountPath: /etc/simserve/auth$|mountPath: /etc/simserve/auth/tokens\n          subPath: tokens|' \
  'volume "tokens" is a subPath mount, which never sees the Secret'"'"'s updates'
expect_fail secret-item-missing prod 's/^\( *path: \)tokens$/\1token/' \
  '"tokens" is not among the items of Secret "simserve-tokens"'
expect_fail tokens-not-mounted prod 's|value: /etc/simserve/auth/tokens|value: /etc/simserve/tokens|' \
  'env SIMSERVE_AUTH_TOKEN_FILE=/etc/simserve/tokens is not a file of a volume mounted at /etc/simserve'
expect_fail tokens-off prod '/name: SIMSERVE_AUTH_TOKEN_FILE/,+1d' \
  'security: tokens is off, want on (SIMSERVE_AUTH_TOKEN_FILE)'
expect_fail dev-with-tls dev 's|^\( *\)- name: SIMSERVE_LISTEN$|\1- name: SIMSERVE_TLS_CERT_FILE\n\1  value: /tls/tls.crt\n&|' \
  'security: tls is on, want off'
# The metrics port and its ServiceMonitor.
expect_fail metrics-auth-in-clear prod '/name: SIMSERVE_METRICS_TLS_CERT_FILE/,+1d;/name: SIMSERVE_METRICS_TLS_KEY_FILE/,+1d' \
  'the basic-auth password would cross the network in clear'
expect_fail servicemonitor-http-scheme prod 's/^    scheme: https$/    scheme: http/' \
  'ServiceMonitor/simserve endpoint 0: policy: scheme "http", but the metrics port serves HTTPS'
expect_fail servicemonitor-bad-scheme prod 's/^    scheme: https$/    scheme: tls/' \
  'endpoint scheme "tls" must be http or https'
expect_fail servicemonitor-misspelled-tls prod 's/^    tlsConfig:$/    tlsconfig:/' \
  'unknown field "spec.endpoints[0].tlsconfig"'
expect_fail servicemonitor-wrong-ca-key prod '/^    tlsConfig:$/,/serverName/s/key: ca.crt/key: tls.crt/' \
  'tlsConfig.ca.secret is simserve-tls/tls.crt, want simserve-tls/ca.crt'
expect_fail servicemonitor-server-name prod 's/serverName: simserve.simserve.svc$/serverName: simserve.other.svc/' \
  'tlsConfig.serverName "simserve.other.svc" is not among the dnsNames of Certificate/simserve-tls'
expect_fail servicemonitor-insecure prod 's/^\( *\)serverName: simserve.simserve.svc$/\1insecureSkipVerify: true\n&/' \
  'tlsConfig.insecureSkipVerify must not be set'
expect_fail servicemonitor-no-basic-auth prod '/^  - basicAuth:$/{N;N;N;N;N;N;s/.*/  - honorLabels: false/}' \
  'basicAuth is required: /metrics asks for it'
expect_fail servicemonitor-basic-auth-secret prod '/^  - basicAuth:$/,+6s/name: simserve-metrics-auth/name: other-secret/' \
  'basicAuth.password must be a key of Secret "simserve-metrics-auth"'
# KServe (deploy/kserve): strict schema decoding against KServe's CRDs, then its policy.
grep -A1 '^    - containerPort: 50051$' "$WORK/kserve.yaml" | grep -q '^      name: h2c$' ||
  die "kserve: the runtime's gRPC port is not named h2c"
expect_fail kserve-misspelled-readinessProbe kserve 's/readinessProbe:/readinesProbe:/' \
  'serving.kserve.io/v1alpha1 ServingRuntime: strict decoding error: unknown field "spec.containers[0].readinesProbe"'
expect_fail kserve-misspelled-modelFormat kserve 's/^      modelFormat:$/      modelformat:/' \
  'serving.kserve.io/v1beta1 InferenceService: strict decoding error: unknown field "spec.predictor.model.modelformat"'
expect_fail kserve-misspelled-metadata kserve '0,/^  name: simserve$/s//&\n  labelz: {}/' \
  'unknown field "metadata.labelz"'
expect_fail kserve-wrong-type kserve 's/minReplicas: 2/minReplicas: two/' \
  'spec.predictor.minReplicas in body must be of type integer'
expect_fail kserve-bad-quantity kserve '0,/cpu: "2"/s//cpu: two/' \
  'spec.containers[0].resources.limits.cpu in body should match'
expect_fail kserve-duplicate-field kserve '0,/^\( *\)runAsNonRoot: true$/s//&\n\1runAsNonRoot: false/' \
  'already set in map'
expect_fail kserve-duplicate-env kserve 's/- name: SIMSERVE_WORKERS/- name: SIMSERVE_LISTEN/' \
  'spec.containers[0].env[2]: Duplicate value: {"name":"SIMSERVE_LISTEN"}'
expect_fail kserve-protocol kserve 's/^  - grpc-v2$/  - v2/' \
  'ServingRuntime/simserve: policy: protocolVersions [v2], want [grpc-v2]'
expect_fail kserve-port-name kserve 's/^      name: h2c$/      name: grpc/' \
  'the first port must be h2c 50051'
expect_fail kserve-knative-mode kserve 's/deploymentMode: Standard/deploymentMode: Knative/' \
  'InferenceService/simserve: policy: annotation serving.kserve.io/deploymentMode="Knative": want Standard'
expect_fail kserve-storage-uri kserve 's/^      runtime: simserve$/&\n      storageUri: pvc:\/\/models/' \
  'predictor.model.storageUri must be unset'
expect_fail kserve-runtime-missing kserve 's/^      runtime: simserve$/      runtime: simserv/' \
  'predictor.model.runtime "simserv" is not a rendered ServingRuntime'
expect_fail kserve-writable-rootfs kserve 's/readOnlyRootFilesystem: true/readOnlyRootFilesystem: false/' \
  'Deployment/simserve-predictor container "kserve-container": policy: readOnlyRootFilesystem must be true'
expect_fail kserve-short-grace kserve 's/terminationGracePeriodSeconds: 35/terminationGracePeriodSeconds: 20/' \
  'terminationGracePeriodSeconds=20 must exceed'
expect_fail kserve-probe-port kserve 's/^        port: 50051$/        port: 8080/' \
  'startupProbe grpc.port=8080, want 50051'
expect_fail kserve-no-omp kserve 's/- name: OMP_NUM_THREADS/- name: OMP_THREAD_LIMIT/' \
  'env OMP_NUM_THREADS must come from resourceFieldRef limits.cpu'
# A predictor override of the resources goes through KServe's merge into the policy.
expect_fail kserve-override-cpu kserve 's/^      protocolVersion: grpc-v2$/&\n      resources:\n        requests: {cpu: "1", memory: 2Gi}\n        limits: {cpu: "2", memory: 2Gi}/' \
  'requests.cpu (1) must equal limits.cpu (2)'
expect_pass kserve-override-resources kserve 's/^      protocolVersion: grpc-v2$/&\n      resources:\n        requests: {cpu: "4", memory: 4Gi}\n        limits: {cpu: "4", memory: 4Gi}/'
log "k8s_test: PASS"
