// Policy checks for simserve's rendered manifests: what the schema cannot say (CPU
// requests == limits, threads from the CPU limit, hardening, graceful shutdown timing,
// port names, the gallery directory's volume and the memory budget, and that Services, HPA,
// PDB, ServiceMonitor, NetworkPolicy and PersistentVolumeClaims fit the Deployment they are
// meant for). Probes, TLS, tokens and cert-manager objects: security.go.
package main

import (
	"fmt"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	cmv1 "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	apivalidation "k8s.io/apimachinery/pkg/api/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// The server's contract (server/config.h, server/main.cc) that the manifests must honour.
const (
	grpcPort    = 50051
	metricsPort = 9464
	// ServerConfig::drain_grace default, used when the manifest does not set it.
	defaultDrainGrace = 20 * time.Second
	envOMPThreads     = "OMP_NUM_THREADS"
	envComputeThreads = "SIMSERVE_THREADS_PER_WORKER"
	envWorkers        = "SIMSERVE_WORKERS"
	envMaxConnAge     = "SIMSERVE_MAX_CONNECTION_AGE" // absl duration, e.g. "2m"
	envDrainGrace     = "SIMSERVE_DRAIN_GRACE"        // absl duration, e.g. "20s"
	envGalleryDir     = "SIMSERVE_GALLERY_DIR"
	envGalleryRescan  = "SIMSERVE_GALLERY_RESCAN_SECONDS"
	envGalleryMemory  = "SIMSERVE_GALLERY_MEMORY_BYTES"
	envInflight       = "SIMSERVE_MAX_INFLIGHT_BYTES"
	// ServerConfig defaults (server/config.h) used when the manifest does not set them.
	defaultGalleryMemory = int64(4) << 30
	defaultInflight      = int64(2) << 30
	// What the process needs beside in-flight requests and galleries (code, gRPC, oneDNN).
	memoryHeadroom = int64(256) << 20
)

// promDuration is the pattern the ServiceMonitor CRD enforces on durations.
var promDuration = regexp.MustCompile(
	`^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$`)

type policyOptions struct {
	minReplicas, maxReplicas  int
	requireKinds, forbidKinds []string
	// Exactly the security features (securityFeatures) each Deployment must have on; nil:
	// not checked.
	security map[string]bool
	// The schemas of the custom resources that are not Go types here (KServe's).
	crds crdSchemas
}

func describe(obj runtime.Object) string {
	switch o := obj.(type) {
	case *appsv1.Deployment:
		return "Deployment/" + o.Name
	case *corev1.Service:
		return "Service/" + o.Name
	case *autoscalingv2.HorizontalPodAutoscaler:
		return "HorizontalPodAutoscaler/" + o.Name
	case *policyv1.PodDisruptionBudget:
		return "PodDisruptionBudget/" + o.Name
	case *monitoringv1.ServiceMonitor:
		return "ServiceMonitor/" + o.Name
	case *networkingv1.NetworkPolicy:
		return "NetworkPolicy/" + o.Name
	case *corev1.ServiceAccount:
		return "ServiceAccount/" + o.Name
	case *corev1.ConfigMap:
		return "ConfigMap/" + o.Name
	case *corev1.PersistentVolumeClaim:
		return "PersistentVolumeClaim/" + o.Name
	case *corev1.Namespace:
		return "Namespace/" + o.Name
	case *corev1.Secret:
		return "Secret/" + o.Name
	case *cmv1.Certificate:
		return "Certificate/" + o.Name
	case *cmv1.Issuer:
		return "Issuer/" + o.Name
	case *cmv1.ClusterIssuer:
		return "ClusterIssuer/" + o.Name
	case *unstructured.Unstructured:
		return o.GetKind() + "/" + o.GetName()
	}
	return fmt.Sprintf("%T", obj)
}

func kindOf(obj runtime.Object) string {
	return strings.SplitN(describe(obj), "/", 2)[0]
}

// checkPolicy returns one message per violation.
func checkPolicy(objs []runtime.Object, opts policyOptions) []string {
	var p problems
	present := map[string]bool{}
	var deployments []*appsv1.Deployment
	var services []*corev1.Service
	claims := map[string]*corev1.PersistentVolumeClaim{}
	for _, obj := range objs {
		present[kindOf(obj)] = true
		checkObjectMeta(&p, obj, opts.crds)
		switch o := obj.(type) {
		case *appsv1.Deployment:
			deployments = append(deployments, o)
		case *corev1.Service:
			services = append(services, o)
		case *corev1.PersistentVolumeClaim:
			claims[o.Namespace+"/"+o.Name] = o
		}
	}
	for _, k := range opts.requireKinds {
		if !present[k] {
			p.add("bundle", "a %s is required but none was rendered", k)
		}
	}
	for _, k := range opts.forbidKinds {
		if present[k] {
			p.add("bundle", "a %s must not be rendered here", k)
		}
	}
	cm := newBundle(objs)
	secs := map[*appsv1.Deployment]*serverSecurity{}
	for _, d := range deployments {
		checkDeployment(&p, d, hpaFor(objs, d), opts)
		checkGalleries(&p, d, claims)
		secs[d] = checkServerSecurity(&p, d, cm, opts.security)
	}
	// KServe makes its predictors' Deployments and Services itself: the server policy applies
	// to the Deployment it would make; the Services check does not.
	for _, d := range checkKServe(&p, objs) {
		checkDeployment(&p, d, nil, opts)
		checkGalleries(&p, d, claims)
		secs[d] = checkServerSecurity(&p, d, cm, opts.security)
	}
	checkServices(&p, services, deployments)
	checkSecurityBundle(&p, objs, cm, secs, services)
	for _, obj := range objs {
		switch o := obj.(type) {
		case *autoscalingv2.HorizontalPodAutoscaler:
			checkHPA(&p, o, deployments)
		case *policyv1.PodDisruptionBudget:
			checkPDB(&p, o, deployments)
		case *monitoringv1.ServiceMonitor:
			checkServiceMonitor(&p, o, services)
		case *networkingv1.NetworkPolicy:
			checkNetworkPolicy(&p, o, deployments)
		}
	}
	return p.list
}

// checkObjectMeta applies the API server's own metadata validation (name format per kind,
// label and annotation syntax) to obj and to a Deployment's pod template labels.
func checkObjectMeta(p *problems, obj runtime.Object, crds crdSchemas) {
	m, ok := obj.(metav1.Object)
	if !ok {
		return
	}
	nameFn := apivalidation.NameIsDNSSubdomain
	namespaced := true
	switch o := obj.(type) {
	case *corev1.Service:
		nameFn = apivalidation.NameIsDNS1035Label
	case *corev1.Namespace:
		nameFn, namespaced = apivalidation.NameIsDNSLabel, false
	case *cmv1.ClusterIssuer:
		namespaced = false
	case *unstructured.Unstructured:
		namespaced = crds.namespaced(o)
	case *appsv1.Deployment:
		for _, e := range metav1validation.ValidateLabels(o.Spec.Template.Labels,
			field.NewPath("spec", "template", "metadata", "labels")) {
			p.add(describe(obj), "%s", e.Error())
		}
	}
	if namespaced && m.GetNamespace() == "" {
		// Rendered without a namespace (the base): validate as if applied to "default".
		copied := obj.DeepCopyObject().(metav1.Object)
		copied.SetNamespace("default")
		m = copied
	}
	for _, e := range apivalidation.ValidateObjectMetaAccessor(m, namespaced, nameFn,
		field.NewPath("metadata")) {
		p.add(describe(obj), "%s", e.Error())
	}
}

type problems struct{ list []string }

// add records a violation once (several env vars may read the same volume, for example).
func (p *problems) add(where, format string, args ...any) {
	msg := where + ": policy: " + fmt.Sprintf(format, args...)
	if !slices.Contains(p.list, msg) {
		p.list = append(p.list, msg)
	}
}

// hpaFor returns the HPA scaling d, if any.
func hpaFor(objs []runtime.Object, d *appsv1.Deployment) *autoscalingv2.HorizontalPodAutoscaler {
	for _, obj := range objs {
		if h, ok := obj.(*autoscalingv2.HorizontalPodAutoscaler); ok &&
			h.Spec.ScaleTargetRef.Kind == "Deployment" && h.Spec.ScaleTargetRef.Name == d.Name {
			return h
		}
	}
	return nil
}

func checkDeployment(p *problems, d *appsv1.Deployment, hpa *autoscalingv2.HorizontalPodAutoscaler,
	opts policyOptions) {
	where := "Deployment/" + d.Name
	// Without spec.replicas the API defaults to 1 and an HPA raises it to its minReplicas.
	replicas := 1
	if d.Spec.Replicas != nil {
		replicas = int(*d.Spec.Replicas)
		if hpa != nil {
			p.add(where, "spec.replicas must be unset when HorizontalPodAutoscaler/%s scales it "+
				"(kubectl apply would reset the scale)", hpa.Name)
		}
	} else if hpa != nil && hpa.Spec.MinReplicas != nil {
		replicas = int(*hpa.Spec.MinReplicas)
	}
	if replicas < opts.minReplicas || replicas > opts.maxReplicas {
		p.add(where, "spec.replicas=%d, want %d..%d", replicas, opts.minReplicas, opts.maxReplicas)
	}
	sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
	if err != nil || sel.Empty() || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		p.add(where, "spec.selector must be non-empty and match the pod template labels")
	}
	pod := d.Spec.Template.Spec
	psc := pod.SecurityContext
	if psc == nil {
		psc = &corev1.PodSecurityContext{}
	}
	if len(pod.Containers) == 0 {
		p.add(where, "no containers")
	}
	tmpVolumes := map[string]bool{}
	for _, v := range pod.Volumes {
		if v.EmptyDir != nil {
			tmpVolumes[v.Name] = true
		}
	}
	for i := range pod.Containers {
		c := &pod.Containers[i]
		cw := fmt.Sprintf("%s container %q", where, c.Name)
		checkPorts(p, cw, c, grpcPortName(d))
		checkResources(p, cw, c)
		checkEnv(p, cw, c)
		checkSecurity(p, cw, c, psc)
		hasTmp := false
		for _, m := range c.VolumeMounts {
			if m.MountPath == "/tmp" && tmpVolumes[m.Name] {
				hasTmp = true
			}
		}
		if !hasTmp {
			p.add(cw, "needs an emptyDir volume mounted at /tmp (read-only root filesystem)")
		}
		checkMemoryBudget(p, cw, c)
		preStop := preStopSeconds(c)
		if preStop <= 0 {
			p.add(cw, "needs a lifecycle.preStop sleep so endpoints are removed before SIGTERM")
		}
		drain := drainGrace(c)
		need := int64((time.Duration(preStop)*time.Second + drain) / time.Second)
		if pod.TerminationGracePeriodSeconds == nil || *pod.TerminationGracePeriodSeconds <= need {
			got := "unset (30)"
			if pod.TerminationGracePeriodSeconds != nil {
				got = strconv.FormatInt(*pod.TerminationGracePeriodSeconds, 10)
			}
			p.add(cw, "terminationGracePeriodSeconds=%s must exceed preStop %ds + drain grace %s",
				got, preStop, drain)
		}
	}
	for i := range pod.InitContainers {
		c := &pod.InitContainers[i]
		cw := fmt.Sprintf("%s init container %q", where, c.Name)
		checkSecurity(p, cw, c, psc)
		checkGuaranteed(p, cw, c)
	}
}

// checkGuaranteed: an init container must have requests == limits for cpu and memory too,
// or the pod drops out of the Guaranteed QoS class (and its CPU pinning and eviction order).
func checkGuaranteed(p *problems, cw string, c *corev1.Container) {
	for _, r := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, hasReq := c.Resources.Requests[r]
		lim, hasLim := c.Resources.Limits[r]
		if !hasReq || !hasLim || req.Cmp(lim) != 0 {
			p.add(cw, "requests.%s must equal limits.%s (both set) so the pod stays Guaranteed", r, r)
		}
	}
}

// envBytes returns the integer value of env `name`, or def when it is unset.
func envBytes(p *problems, cw string, c *corev1.Container, name string, def int64) int64 {
	e := findEnv(c, name)
	if e == nil {
		return def
	}
	n, err := strconv.ParseInt(e.Value, 10, 64)
	if err != nil || n < 0 {
		p.add(cw, "env %s=%q must be a non-negative integer (bytes)", name, e.Value)
		return def
	}
	return n
}

// checkMemoryBudget: in-flight requests and all galleries (both capped by the server) plus
// the process itself must fit the memory limit, or a full server is OOM-killed instead of
// answering RESOURCE_EXHAUSTED.
func checkMemoryBudget(p *problems, cw string, c *corev1.Container) {
	limit, ok := c.Resources.Limits[corev1.ResourceMemory]
	if !ok {
		return // reported by checkResources
	}
	inflight := envBytes(p, cw, c, envInflight, defaultInflight)
	galleries := envBytes(p, cw, c, envGalleryMemory, defaultGalleryMemory)
	if need := inflight + galleries + memoryHeadroom; need > limit.Value() {
		p.add(cw, "%s (%d) + %s (%d) + %d MiB headroom exceed limits.memory (%s)", envInflight,
			inflight, envGalleryMemory, galleries, memoryHeadroom>>20, limit.String())
	}
}

// checkGalleries: a --gallery_dir (SIMSERVE_GALLERY_DIR) must be a read-only mount of either
// a read-only PersistentVolumeClaim that is ReadOnlyMany (every replica on any node loads the
// same files) or a disk emptyDir with a sizeLimit that an init container fills.
func checkGalleries(p *problems, d *appsv1.Deployment, claims map[string]*corev1.PersistentVolumeClaim) {
	where := "Deployment/" + d.Name
	pod := d.Spec.Template.Spec
	volumes := map[string]*corev1.Volume{}
	for i := range pod.Volumes {
		volumes[pod.Volumes[i].Name] = &pod.Volumes[i]
	}
	for i := range pod.Containers {
		c := &pod.Containers[i]
		cw := fmt.Sprintf("%s container %q", where, c.Name)
		if e := findEnv(c, envGalleryRescan); e != nil {
			if n, err := strconv.Atoi(e.Value); err != nil || n <= 0 {
				p.add(cw, "env %s=%q must be a positive integer (seconds)", envGalleryRescan, e.Value)
			}
		}
		e := findEnv(c, envGalleryDir)
		if e == nil || e.Value == "" {
			continue
		}
		dir := e.Value
		var mount *corev1.VolumeMount
		for j := range c.VolumeMounts {
			if c.VolumeMounts[j].MountPath == dir {
				mount = &c.VolumeMounts[j]
			}
		}
		if !strings.HasPrefix(dir, "/") || mount == nil {
			p.add(cw, "env %s=%s is not a volume mount of the container", envGalleryDir, dir)
			continue
		}
		if !mount.ReadOnly {
			p.add(cw, "the gallery directory %s must be mounted readOnly (the server only reads it)", dir)
		}
		v := volumes[mount.Name]
		switch {
		case v == nil:
			p.add(cw, "the gallery mount %s names no volume %q", dir, mount.Name)
		case v.PersistentVolumeClaim != nil:
			src := v.PersistentVolumeClaim
			if !src.ReadOnly {
				p.add(cw, "volume %q: persistentVolumeClaim.readOnly must be true", v.Name)
			}
			claim := claims[d.Namespace+"/"+src.ClaimName]
			if claim == nil {
				p.add(cw, "volume %q: PersistentVolumeClaim %q is not rendered", v.Name, src.ClaimName)
				continue
			}
			cwhere := "PersistentVolumeClaim/" + claim.Name
			rox := false
			for _, m := range claim.Spec.AccessModes {
				rox = rox || m == corev1.ReadOnlyMany
			}
			if !rox {
				p.add(cwhere, "accessModes must include ReadOnlyMany (replicas on several nodes mount it), got %v",
					claim.Spec.AccessModes)
			}
			if _, ok := claim.Spec.Resources.Requests[corev1.ResourceStorage]; !ok {
				p.add(cwhere, "resources.requests.storage is required")
			}
		case v.EmptyDir != nil:
			if v.EmptyDir.Medium == corev1.StorageMediumMemory {
				p.add(cw, "volume %q: a tmpfs emptyDir would count against the memory limit on top of the loaded galleries", v.Name)
			}
			if v.EmptyDir.SizeLimit == nil || v.EmptyDir.SizeLimit.IsZero() {
				p.add(cw, "volume %q: the gallery emptyDir needs a sizeLimit", v.Name)
			}
			filled := false
			for _, ic := range pod.InitContainers {
				for _, m := range ic.VolumeMounts {
					filled = filled || (m.Name == v.Name && !m.ReadOnly)
				}
			}
			if !filled {
				p.add(cw, "volume %q: no init container mounts the gallery emptyDir writable, so it stays empty", v.Name)
			}
		default:
			p.add(cw, "volume %q: the gallery directory must be a persistentVolumeClaim or an emptyDir filled by an init container", v.Name)
		}
	}
}

// checkPorts: the gRPC port (named grpcName) and the metrics port are declared with the
// server's numbers.
func checkPorts(p *problems, cw string, c *corev1.Container, grpcName string) {
	want := map[string]int32{grpcName: grpcPort, "metrics": metricsPort}
	for _, port := range c.Ports {
		for _, msg := range validation.IsValidPortName(port.Name) {
			p.add(cw, "port %d name %q: %s", port.ContainerPort, port.Name, msg)
		}
		if n, ok := want[port.Name]; ok {
			if port.ContainerPort != n {
				p.add(cw, "port %q is %d, want %d", port.Name, port.ContainerPort, n)
			}
			delete(want, port.Name)
		}
	}
	for name, n := range want {
		p.add(cw, "missing container port named %q (%d)", name, n)
	}
}

func checkResources(p *problems, cw string, c *corev1.Container) {
	reqCPU, hasReq := c.Resources.Requests[corev1.ResourceCPU]
	limCPU, hasLim := c.Resources.Limits[corev1.ResourceCPU]
	if !hasReq || !hasLim {
		p.add(cw, "resources.requests.cpu and resources.limits.cpu are both required")
	} else if reqCPU.Cmp(limCPU) != 0 {
		p.add(cw, "requests.cpu (%s) must equal limits.cpu (%s) for a CPU-bound server",
			reqCPU.String(), limCPU.String())
	} else if limCPU.MilliValue()%1000 != 0 {
		p.add(cw, "limits.cpu (%s) should be whole cores: threads are derived from it", limCPU.String())
	}
	if _, ok := c.Resources.Requests[corev1.ResourceMemory]; !ok {
		p.add(cw, "resources.requests.memory is required")
	}
	if _, ok := c.Resources.Limits[corev1.ResourceMemory]; !ok {
		p.add(cw, "resources.limits.memory is required")
	}
}

func findEnv(c *corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

func checkEnv(p *problems, cw string, c *corev1.Container) {
	for _, name := range []string{envOMPThreads, envComputeThreads} {
		e := findEnv(c, name)
		if e == nil || e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil ||
			e.ValueFrom.ResourceFieldRef.Resource != "limits.cpu" {
			p.add(cw, "env %s must come from resourceFieldRef limits.cpu", name)
		}
	}
	// Threads come from the whole CPU limit, so exactly one request may compute at a time.
	if e := findEnv(c, envWorkers); e == nil || e.Value != "1" {
		p.add(cw, "env %s must be \"1\" when threads per worker = limits.cpu", envWorkers)
	}
	e := findEnv(c, envMaxConnAge)
	if e == nil {
		p.add(cw, "env %s must be set so connections rebalance as pods scale", envMaxConnAge)
	} else if d, err := time.ParseDuration(e.Value); err != nil || d <= 0 {
		p.add(cw, "env %s=%q must be a positive finite duration", envMaxConnAge, e.Value)
	}
}

func drainGrace(c *corev1.Container) time.Duration {
	if e := findEnv(c, envDrainGrace); e != nil {
		if d, err := time.ParseDuration(e.Value); err == nil {
			return d
		}
	}
	return defaultDrainGrace
}

// preStopSeconds returns the preStop sleep in seconds (exec `sleep N` or the native sleep
// action), 0 when there is none.
func preStopSeconds(c *corev1.Container) int {
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
		return 0
	}
	h := c.Lifecycle.PreStop
	if h.Sleep != nil {
		return int(h.Sleep.Seconds)
	}
	if h.Exec != nil && len(h.Exec.Command) == 2 && strings.HasSuffix(h.Exec.Command[0], "sleep") {
		if n, err := strconv.Atoi(h.Exec.Command[1]); err == nil {
			return n
		}
	}
	return 0
}

func checkSecurity(p *problems, cw string, c *corev1.Container, psc *corev1.PodSecurityContext) {
	sc := c.SecurityContext
	if sc == nil {
		p.add(cw, "securityContext is required")
		return
	}
	nonRoot := (sc.RunAsNonRoot != nil && *sc.RunAsNonRoot) || (sc.RunAsNonRoot == nil &&
		psc.RunAsNonRoot != nil && *psc.RunAsNonRoot)
	if !nonRoot {
		p.add(cw, "runAsNonRoot must be true")
	}
	uid := sc.RunAsUser
	if uid == nil {
		uid = psc.RunAsUser
	}
	if uid == nil || *uid == 0 {
		p.add(cw, "runAsUser must be a numeric non-zero uid")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		p.add(cw, "readOnlyRootFilesystem must be true")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		p.add(cw, "allowPrivilegeEscalation must be false")
	}
	if sc.Privileged != nil && *sc.Privileged {
		p.add(cw, "privileged must not be set")
	}
	dropAll := false
	if sc.Capabilities != nil {
		for _, cap := range sc.Capabilities.Drop {
			if cap == "ALL" {
				dropAll = true
			}
		}
		if len(sc.Capabilities.Add) > 0 {
			p.add(cw, "capabilities.add must be empty")
		}
	}
	if !dropAll {
		p.add(cw, "capabilities.drop must contain ALL")
	}
	seccomp := sc.SeccompProfile
	if seccomp == nil {
		seccomp = psc.SeccompProfile
	}
	if seccomp == nil || seccomp.Type != corev1.SeccompProfileTypeRuntimeDefault {
		p.add(cw, "seccompProfile.type must be RuntimeDefault")
	}
}

// selects reports whether a Service/PDB/NetworkPolicy selector picks d's pods.
func selects(selector map[string]string, d *appsv1.Deployment) bool {
	return len(selector) > 0 && labels.SelectorFromSet(selector).Matches(labels.Set(d.Spec.Template.Labels))
}

func containerPortNamed(d *appsv1.Deployment, target intstr.IntOrString) bool {
	for _, c := range d.Spec.Template.Spec.Containers {
		for _, port := range c.Ports {
			if (target.Type == intstr.String && port.Name == target.StrVal) ||
				(target.Type == intstr.Int && port.ContainerPort == target.IntVal) {
				return true
			}
		}
	}
	return false
}

func checkServices(p *problems, services []*corev1.Service, deployments []*appsv1.Deployment) {
	haveClusterIP, haveHeadless := false, false
	for _, s := range services {
		where := "Service/" + s.Name
		var target *appsv1.Deployment
		for _, d := range deployments {
			if selects(s.Spec.Selector, d) {
				target = d
			}
		}
		if target == nil {
			p.add(where, "selector %v selects no rendered Deployment", s.Spec.Selector)
			continue
		}
		names := map[string]bool{}
		for _, port := range s.Spec.Ports {
			names[port.Name] = true
			for _, msg := range validation.IsValidPortName(port.Name) {
				p.add(where, "port %d name %q: %s", port.Port, port.Name, msg)
			}
			if !containerPortNamed(target, port.TargetPort) {
				p.add(where, "port %q targetPort %s matches no container port", port.Name,
					port.TargetPort.String())
			}
		}
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			if !names["grpc"] {
				p.add(where, "headless Service needs a port named grpc")
			}
			haveHeadless = true
		} else if s.Spec.Type == "" || s.Spec.Type == corev1.ServiceTypeClusterIP {
			if !names["grpc"] || !names["metrics"] {
				p.add(where, "ClusterIP Service needs ports named grpc and metrics")
			}
			haveClusterIP = true
		}
	}
	if len(deployments) > 0 && !haveClusterIP {
		p.add("bundle", "a ClusterIP Service with ports grpc and metrics is required")
	}
	if len(deployments) > 0 && !haveHeadless {
		p.add("bundle", "a headless Service (clusterIP: None) is required for client-side round_robin")
	}
}

func checkHPA(p *problems, h *autoscalingv2.HorizontalPodAutoscaler, deployments []*appsv1.Deployment) {
	where := "HorizontalPodAutoscaler/" + h.Name
	ref := h.Spec.ScaleTargetRef
	found := false
	for _, d := range deployments {
		if ref.Kind == "Deployment" && ref.APIVersion == "apps/v1" && ref.Name == d.Name {
			found = true
		}
	}
	if !found {
		p.add(where, "scaleTargetRef %s %s/%s is not a rendered Deployment", ref.APIVersion, ref.Kind, ref.Name)
	}
	minR := int32(1)
	if h.Spec.MinReplicas != nil {
		minR = *h.Spec.MinReplicas
	}
	if minR < 2 || h.Spec.MaxReplicas < minR {
		p.add(where, "want 2 <= minReplicas (%d) <= maxReplicas (%d)", minR, h.Spec.MaxReplicas)
	}
	cpu := false
	for _, m := range h.Spec.Metrics {
		if m.Type == autoscalingv2.ResourceMetricSourceType && m.Resource != nil &&
			m.Resource.Name == corev1.ResourceCPU && m.Resource.Target.Type == autoscalingv2.UtilizationMetricType &&
			m.Resource.Target.AverageUtilization != nil {
			cpu = true
		}
	}
	if !cpu {
		p.add(where, "needs a Resource cpu Utilization metric")
	}
}

func checkPDB(p *problems, b *policyv1.PodDisruptionBudget, deployments []*appsv1.Deployment) {
	where := "PodDisruptionBudget/" + b.Name
	if b.Spec.Selector == nil {
		p.add(where, "selector is required")
		return
	}
	matched := false
	for _, d := range deployments {
		if selects(b.Spec.Selector.MatchLabels, d) {
			matched = true
		}
	}
	if !matched {
		p.add(where, "selector selects no rendered Deployment")
	}
	if (b.Spec.MinAvailable == nil) == (b.Spec.MaxUnavailable == nil) {
		p.add(where, "set exactly one of minAvailable and maxUnavailable")
	}
}

func checkServiceMonitor(p *problems, m *monitoringv1.ServiceMonitor, services []*corev1.Service) {
	where := "ServiceMonitor/" + m.Name
	if len(m.Spec.Endpoints) == 0 {
		p.add(where, "needs at least one endpoint")
	}
	for _, ep := range m.Spec.Endpoints {
		// The CRD's OpenAPI pattern for monitoringv1.Duration (the Go type is a plain string).
		for field, d := range map[string]monitoringv1.Duration{"interval": ep.Interval,
			"scrapeTimeout": ep.ScrapeTimeout} {
			if d != "" && !promDuration.MatchString(string(d)) {
				p.add(where, "endpoint %s %q is not a Prometheus duration", field, d)
			}
		}
		// The CRD's enum for the scheme (the Go type is a plain string).
		if ep.Scheme != nil && !slices.Contains([]string{"http", "https", "HTTP", "HTTPS"}, string(*ep.Scheme)) {
			p.add(where, "endpoint scheme %q must be http or https", *ep.Scheme)
		}
		matched := false
		for _, s := range services {
			if !selects(m.Spec.Selector.MatchLabels, &appsv1.Deployment{Spec: appsv1.DeploymentSpec{
				Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: s.Labels}}}}) {
				continue
			}
			for _, port := range s.Spec.Ports {
				if port.Name == ep.Port && port.Port == metricsPort {
					matched = true
				}
			}
		}
		if !matched {
			p.add(where, "endpoint port %q is not the metrics port of a selected Service", ep.Port)
		}
	}
}

func checkNetworkPolicy(p *problems, n *networkingv1.NetworkPolicy, deployments []*appsv1.Deployment) {
	where := "NetworkPolicy/" + n.Name
	matched := false
	for _, d := range deployments {
		if selects(n.Spec.PodSelector.MatchLabels, d) {
			matched = true
		}
	}
	if !matched {
		p.add(where, "podSelector selects no rendered Deployment")
	}
	allowed := map[string]bool{}
	for _, rule := range n.Spec.Ingress {
		for _, port := range rule.Ports {
			if port.Port != nil {
				allowed[port.Port.String()] = true
			}
		}
	}
	if !allowed["grpc"] && !allowed[strconv.Itoa(grpcPort)] {
		p.add(where, "ingress must allow the grpc port")
	}
	if !allowed["metrics"] && !allowed[strconv.Itoa(metricsPort)] {
		p.add(where, "ingress must allow the metrics port (Prometheus scrapes it)")
	}
}
