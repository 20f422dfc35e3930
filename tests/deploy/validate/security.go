// Security policy of the rendered manifests: what the server reads from its SIMSERVE_* env
// (TLS and mutual TLS on the gRPC port, bearer tokens, the plaintext health-only port,
// HTTPS and basic auth on the metrics port), the Secret volumes those files come from, the
// cert-manager objects that make the Secrets, and the probes, Services, NetworkPolicy and
// ServiceMonitor that must agree with them.
package main

import (
	"fmt"
	"net"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"

	cmv1 "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
)

// The server's security flags (server/main.cc), as environment variables.
const (
	envTLSCert       = "SIMSERVE_TLS_CERT_FILE"
	envTLSKey        = "SIMSERVE_TLS_KEY_FILE"
	envTLSClientCA   = "SIMSERVE_TLS_CLIENT_CA_FILE"
	envTLSRefresh    = "SIMSERVE_TLS_REFRESH_SECONDS"
	envAuthTokens    = "SIMSERVE_AUTH_TOKEN_FILE"
	envAuthRefresh   = "SIMSERVE_AUTH_REFRESH_SECONDS"
	envHealthListen  = "SIMSERVE_HEALTH_LISTEN"
	envMetricsCert   = "SIMSERVE_METRICS_TLS_CERT_FILE"
	envMetricsKey    = "SIMSERVE_METRICS_TLS_KEY_FILE"
	envMetricsAuth   = "SIMSERVE_METRICS_BASIC_AUTH_FILE"
	healthPortName   = "health"
	defaultFileMode  = int32(0o644) // corev1.SecretVolumeSourceDefaultMode
	placeholderLabel = "NAMESPACE"  // in components/cert-manager and metrics-tls
)

// securityFeature is one thing the server switches on when all of its env vars are set.
type securityFeature struct {
	name string
	envs []string
}

// The features the -security flag names, each switched on by the env vars listed.
var securityFeatures = []securityFeature{
	{"tls", []string{envTLSCert, envTLSKey}},
	{"mtls", []string{envTLSClientCA}},
	{"tokens", []string{envAuthTokens}},
	{"health", []string{envHealthListen}},
	{"metrics-tls", []string{envMetricsCert, envMetricsKey}},
	{"metrics-auth", []string{envMetricsAuth}},
}

// Which key of a cert-manager Secret each file env var must name.
var certManagerKeys = map[string]string{
	envTLSCert: "tls.crt", envTLSKey: "tls.key", envTLSClientCA: "ca.crt",
	envMetricsCert: "tls.crt", envMetricsKey: "tls.key",
}

// serverSecurity is what a Deployment's server container switches on.
type serverSecurity struct {
	on map[string]bool
	// Secret that each file env var reads ("" when it is not a Secret file).
	secretOf   map[string]string
	healthPort int32 // 0: no health listener
}

// securityFeatureNames lists the names the -security flag accepts.
func securityFeatureNames() string {
	names := make([]string, len(securityFeatures))
	for i, f := range securityFeatures {
		names[i] = f.name
	}
	return strings.Join(names, ",")
}

// parseSecurityFlag turns "tls,tokens" or "none" into a set; "" means "not checked".
func parseSecurityFlag(s string) (map[string]bool, error) {
	if s == "" {
		return nil, nil
	}
	want := map[string]bool{}
	if s == "none" {
		return want, nil
	}
	for _, name := range splitList(s) {
		if !slices.ContainsFunc(securityFeatures, func(f securityFeature) bool { return f.name == name }) {
			return nil, fmt.Errorf("unknown security feature %q", name)
		}
		want[name] = true
	}
	return want, nil
}

// bundle indexes the cert-manager objects of the rendered manifests (Certificates by the
// Secret they fill).
type bundle struct {
	certs          map[string]*cmv1.Certificate // by namespace/secretName
	issuers        map[string]*cmv1.Issuer      // by namespace/name
	clusterIssuers map[string]*cmv1.ClusterIssuer
}

func newBundle(objs []runtime.Object) *bundle {
	b := &bundle{certs: map[string]*cmv1.Certificate{}, issuers: map[string]*cmv1.Issuer{},
		clusterIssuers: map[string]*cmv1.ClusterIssuer{}}
	for _, obj := range objs {
		switch o := obj.(type) {
		case *cmv1.Certificate:
			b.certs[o.Namespace+"/"+o.Spec.SecretName] = o
		case *cmv1.Issuer:
			b.issuers[o.Namespace+"/"+o.Name] = o
		case *cmv1.ClusterIssuer:
			b.clusterIssuers[o.Name] = o
		}
	}
	return b
}

// checkServerSecurity checks the security env of d's containers and their Secret files,
// and returns what is switched on (union over the containers).
func checkServerSecurity(p *problems, d *appsv1.Deployment, b *bundle, want map[string]bool) *serverSecurity {
	where := "Deployment/" + d.Name
	sec := &serverSecurity{on: map[string]bool{}, secretOf: map[string]string{}}
	pod := &d.Spec.Template.Spec
	for i := range pod.Containers {
		c := &pod.Containers[i]
		cw := fmt.Sprintf("%s container %q", where, c.Name)
		for _, f := range securityFeatures {
			set := 0
			for _, name := range f.envs {
				if e := findEnv(c, name); e != nil && (e.Value != "" || e.ValueFrom != nil) {
					set++
				}
			}
			if set > 0 && set < len(f.envs) {
				p.add(cw, "env %s must be set together", strings.Join(f.envs, " and "))
			}
			if set > 0 {
				sec.on[f.name] = true
			}
		}
		if sec.on["mtls"] && !sec.on["tls"] {
			p.add(cw, "env %s (mutual TLS) needs %s and %s", envTLSClientCA, envTLSCert, envTLSKey)
		}
		if sec.on["metrics-auth"] && !sec.on["metrics-tls"] {
			p.add(cw, "env %s without %s: the basic-auth password would cross the network in clear",
				envMetricsAuth, envMetricsCert)
		}
		for _, f := range securityFeatures {
			for _, name := range f.envs {
				if name == envHealthListen {
					continue
				}
				if e := findEnv(c, name); e != nil && (e.Value != "" || e.ValueFrom != nil) {
					sec.secretOf[name] = checkSecretFile(p, cw, d, c, name, b)
				}
			}
		}
		for _, name := range []string{envTLSRefresh, envAuthRefresh} {
			if e := findEnv(c, name); e != nil {
				if n, err := strconv.Atoi(e.Value); err != nil || n <= 0 {
					p.add(cw, "env %s=%q must be a positive integer (seconds)", name, e.Value)
				}
			}
		}
		if e := findEnv(c, envHealthListen); e != nil && e.Value != "" {
			sec.healthPort = checkHealthListen(p, cw, c, e.Value)
		}
		checkProbes(p, cw, c, sec)
	}
	// The two ports of one server share one certificate only if it names the same Secret.
	if sec.on["tls"] && sec.on["metrics-tls"] && sec.secretOf[envTLSCert] != sec.secretOf[envMetricsCert] {
		p.add(where, "the gRPC and metrics certificates come from different Secrets (%q, %q): "+
			"the ServiceMonitor verifies the metrics port with one CA", sec.secretOf[envTLSCert],
			sec.secretOf[envMetricsCert])
	}
	if want != nil {
		for _, f := range securityFeatures {
			if sec.on[f.name] != want[f.name] {
				p.add(where, "security: %s is %s, want %s (%s)", f.name, onOff(sec.on[f.name]),
					onOff(want[f.name]), strings.Join(f.envs, ", "))
			}
		}
	}
	return sec
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

// checkHealthListen: the plaintext health-only listener must be reachable by the kubelet
// (pod IP, not loopback), on a port of its own, declared as the container port "health".
func checkHealthListen(p *problems, cw string, c *corev1.Container, addr string) int32 {
	host, portStr, err := net.SplitHostPort(addr)
	port, perr := strconv.Atoi(portStr)
	if err != nil || perr != nil || port <= 0 || port > 65535 {
		p.add(cw, "env %s=%q must be host:port", envHealthListen, addr)
		return 0
	}
	if ip := net.ParseIP(host); host == "localhost" || (ip != nil && ip.IsLoopback()) {
		p.add(cw, "env %s=%q: the kubelet probes the pod IP, a loopback listener never answers it",
			envHealthListen, addr)
	}
	if port == grpcPort || port == metricsPort {
		p.add(cw, "env %s=%q must not share the gRPC or metrics port", envHealthListen, addr)
	}
	declared := false
	for _, cp := range c.Ports {
		if cp.Name == healthPortName && cp.ContainerPort == int32(port) {
			declared = true
		}
	}
	if !declared {
		p.add(cw, "env %s=%q needs a container port named %q with containerPort %d",
			envHealthListen, addr, healthPortName, port)
	}
	return int32(port)
}

// checkProbes: native gRPC probes on the plaintext health port when there is one, else on
// the gRPC port, which must then be plaintext (kubelet gRPC probes cannot speak TLS).
func checkProbes(p *problems, cw string, c *corev1.Container, sec *serverSecurity) {
	want := int32(grpcPort)
	if sec.healthPort != 0 {
		want = sec.healthPort
	} else if sec.on["tls"] {
		p.add(cw, "the gRPC port serves TLS and kubelet gRPC probes are plaintext: set %s "+
			"and probe its port", envHealthListen)
	}
	probes := []struct {
		name  string
		probe *corev1.Probe
	}{{"startupProbe", c.StartupProbe}, {"readinessProbe", c.ReadinessProbe},
		{"livenessProbe", c.LivenessProbe}}
	for _, pr := range probes {
		switch {
		case pr.probe == nil:
			p.add(cw, "%s is missing", pr.name)
		case pr.probe.GRPC == nil:
			p.add(cw, "%s must be a native grpc probe", pr.name)
		case pr.probe.GRPC.Port != want:
			p.add(cw, "%s grpc.port=%d, want %d", pr.name, pr.probe.GRPC.Port, want)
		}
	}
}

// checkSecretFile: the file env `name` points at must be a key of a Secret volume that is
// mounted read-only as a directory (a subPath mount never sees the Secret's updates, so
// rotation would need a restart), readable by the server's group only, and not optional.
// Returns the Secret's name ("" if the file is not from a Secret).
func checkSecretFile(p *problems, cw string, d *appsv1.Deployment, c *corev1.Container, name string, b *bundle) string {
	e := findEnv(c, name)
	if e.ValueFrom != nil || !path.IsAbs(e.Value) {
		p.add(cw, "env %s must be an absolute path", name)
		return ""
	}
	file := path.Clean(e.Value)
	dir, base := path.Split(file)
	dir = path.Clean(dir)
	var mount *corev1.VolumeMount
	for i := range c.VolumeMounts {
		m := &c.VolumeMounts[i]
		if path.Clean(m.MountPath) == file || (path.Clean(m.MountPath) == dir && (m.SubPath != "" || m.SubPathExpr != "")) {
			p.add(cw, "env %s=%s: volume %q is a subPath mount, which never sees the Secret's "+
				"updates (rotation would need a restart); mount the Secret as a directory", name, file, m.Name)
			return ""
		}
		if path.Clean(m.MountPath) == dir {
			mount = m
		}
	}
	if mount == nil {
		p.add(cw, "env %s=%s is not a file of a volume mounted at %s", name, file, dir)
		return ""
	}
	if !mount.ReadOnly {
		p.add(cw, "volume mount %q (%s) must be readOnly", mount.Name, dir)
	}
	pod := &d.Spec.Template.Spec
	var vol *corev1.Volume
	for i := range pod.Volumes {
		if pod.Volumes[i].Name == mount.Name {
			vol = &pod.Volumes[i]
		}
	}
	if vol == nil || vol.Secret == nil {
		p.add(cw, "env %s=%s: volume %q must be a Secret volume", name, file, mount.Name)
		return ""
	}
	s := vol.Secret
	vw := fmt.Sprintf("%s volume %q", cw, vol.Name)
	if s.Optional != nil && *s.Optional {
		p.add(vw, "Secret %q must not be optional: the server would start without %s", s.SecretName, base)
	}
	key, mode := base, defaultFileMode
	if s.DefaultMode != nil {
		mode = *s.DefaultMode
	}
	if len(s.Items) > 0 {
		key = ""
		for _, it := range s.Items {
			if it.Path == base {
				key = it.Key
				if it.Mode != nil {
					mode = *it.Mode
				}
			}
		}
		if key == "" {
			p.add(vw, "env %s=%s: %q is not among the items of Secret %q", name, file, base, s.SecretName)
			return s.SecretName
		}
	}
	if mode&0o007 != 0 {
		p.add(vw, "mode %#o lets every uid read Secret %q: use 0440 with the pod's fsGroup", mode, s.SecretName)
	} else if mode&0o040 == 0 || pod.SecurityContext == nil || pod.SecurityContext.FSGroup == nil {
		p.add(vw, "mode %#o: the non-root server reads Secret %q only through its group: "+
			"give the group read (0440) and set the pod's securityContext.fsGroup", mode, s.SecretName)
	}
	if cert := b.certs[d.Namespace+"/"+s.SecretName]; cert != nil {
		if want := certManagerKeys[name]; want != "" && key != want {
			p.add(cw, "env %s reads key %q of Secret %q, which Certificate/%s fills: want %q",
				name, key, s.SecretName, cert.Name, want)
		}
	}
	return s.SecretName
}

// checkSecurityBundle checks the cert-manager objects and how the Services, NetworkPolicy
// and ServiceMonitor fit the servers' security settings.
func checkSecurityBundle(p *problems, objs []runtime.Object, b *bundle,
	secs map[*appsv1.Deployment]*serverSecurity, services []*corev1.Service) {
	used := map[string]string{} // namespace/secret -> by whom
	for d, sec := range secs {
		for _, env := range []string{envTLSCert, envMetricsCert, envTLSClientCA} {
			if s := sec.secretOf[env]; s != "" {
				used[d.Namespace+"/"+s] = "Deployment/" + d.Name
				if cert := b.certs[d.Namespace+"/"+s]; cert != nil && env != envTLSClientCA {
					checkServingCertificate(p, cert, d, services)
				}
			}
		}
	}
	for _, iss := range b.issuers {
		checkIssuerSpec(p, "Issuer/"+iss.Name, &iss.Spec, iss.Namespace, b)
		if iss.Spec.CA != nil {
			used[iss.Namespace+"/"+iss.Spec.CA.SecretName] = "Issuer/" + iss.Name
		}
	}
	for _, iss := range b.clusterIssuers {
		// A ClusterIssuer's CA Secret lives in cert-manager's cluster resource namespace.
		checkIssuerSpec(p, "ClusterIssuer/"+iss.Name, &iss.Spec, "", b)
	}
	keys := make([]string, 0, len(b.certs))
	for k := range b.certs {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		checkCertificate(p, b.certs[k], b, used[k] != "")
	}
	for _, s := range services {
		checkServiceSecurity(p, s, secs)
	}
	for _, obj := range objs {
		switch o := obj.(type) {
		case *networkingv1.NetworkPolicy:
			checkHealthNotAdmitted(p, o, secs)
		case *monitoringv1.ServiceMonitor:
			checkServiceMonitorSecurity(p, o, services, secs, b)
		}
	}
}

// checkCertificate: every Certificate resolves its issuer, renews before it expires, has no
// leftover placeholder, and its Secret is used (served, a CA of an Issuer, or a client's).
func checkCertificate(p *problems, c *cmv1.Certificate, b *bundle, used bool) {
	where := "Certificate/" + c.Name
	if c.Spec.SecretName == "" {
		p.add(where, "spec.secretName is required")
	} else {
		for _, msg := range validation.IsDNS1123Subdomain(c.Spec.SecretName) {
			p.add(where, "spec.secretName %q: %s", c.Spec.SecretName, msg)
		}
	}
	ref := c.Spec.IssuerRef
	if ref.Group == "" || ref.Group == "cert-manager.io" {
		switch ref.Kind {
		case "", "Issuer":
			if b.issuers[c.Namespace+"/"+ref.Name] == nil {
				p.add(where, "issuerRef names Issuer %q, which is not rendered in namespace %q", ref.Name, c.Namespace)
			}
		case "ClusterIssuer":
			// Cluster-wide: may be managed outside these manifests.
		default:
			p.add(where, "issuerRef.kind %q must be Issuer or ClusterIssuer", ref.Kind)
		}
	}
	if c.Spec.Duration != nil && c.Spec.RenewBefore != nil && c.Spec.RenewBefore.Duration >= c.Spec.Duration.Duration {
		p.add(where, "renewBefore %s must be shorter than duration %s", c.Spec.RenewBefore.Duration,
			c.Spec.Duration.Duration)
	}
	for _, n := range c.Spec.DNSNames {
		if strings.Contains(n, placeholderLabel) {
			p.add(where, "dnsName %q still holds the placeholder %s: the overlay's replacements "+
				"must set the namespace (see overlays/prod)", n, placeholderLabel)
		}
	}
	if !used && !slices.Contains(c.Spec.Usages, cmv1.UsageClientAuth) {
		p.add(where, "its Secret %q is used by nothing (no server mounts it, no Issuer signs with it, "+
			"and it is no client certificate)", c.Spec.SecretName)
	}
}

// checkServingCertificate: the certificate a server presents names every Service that
// selects it (short and namespace-qualified names), may serve, and rotates its key.
func checkServingCertificate(p *problems, c *cmv1.Certificate, d *appsv1.Deployment, services []*corev1.Service) {
	where := "Certificate/" + c.Name
	if c.Spec.IsCA {
		p.add(where, "isCA must be false for the certificate Deployment/%s serves", d.Name)
	}
	if len(c.Spec.Usages) > 0 && !slices.Contains(c.Spec.Usages, cmv1.UsageServerAuth) {
		p.add(where, "usages %v lack %q, so clients refuse it", c.Spec.Usages, cmv1.UsageServerAuth)
	}
	if pk := c.Spec.PrivateKey; pk != nil && pk.RotationPolicy == cmv1.RotationPolicyNever {
		p.add(where, "privateKey.rotationPolicy Never keeps the served key forever; use Always")
	}
	ns := d.Namespace
	if ns == "" {
		ns = "default"
	}
	for _, s := range services {
		if !selects(s.Spec.Selector, d) {
			continue
		}
		for _, n := range []string{s.Name, s.Name + "." + ns, s.Name + "." + ns + ".svc",
			s.Name + "." + ns + ".svc.cluster.local"} {
			if !slices.Contains(c.Spec.DNSNames, n) {
				p.add(where, "dnsNames lack %q (Service/%s): clients dialing it fail verification", n, s.Name)
			}
		}
	}
}

// checkIssuerSpec: exactly one issuer type, as cert-manager's webhook requires; a CA
// Issuer's Secret, when a Certificate makes it, comes from a CA certificate.
func checkIssuerSpec(p *problems, where string, spec *cmv1.IssuerSpec, ns string, b *bundle) {
	n := 0
	for _, set := range []bool{spec.ACME != nil, spec.CA != nil, spec.Vault != nil,
		spec.SelfSigned != nil, spec.Venafi != nil} {
		if set {
			n++
		}
	}
	if n != 1 {
		p.add(where, "set exactly one of acme, ca, vault, selfSigned, venafi (got %d)", n)
	}
	if spec.CA != nil {
		if spec.CA.SecretName == "" {
			p.add(where, "ca.secretName is required")
		} else if cert := b.certs[ns+"/"+spec.CA.SecretName]; ns != "" && cert != nil && !cert.Spec.IsCA {
			p.add(where, "ca.secretName %q is made by Certificate/%s, which is not isCA", spec.CA.SecretName, cert.Name)
		}
	}
}

// checkServiceSecurity: a Service must not advertise cleartext for a TLS port, nor expose
// the health-only port (it is for the kubelet).
func checkServiceSecurity(p *problems, s *corev1.Service, secs map[*appsv1.Deployment]*serverSecurity) {
	where := "Service/" + s.Name
	for d, sec := range secs {
		if !selects(s.Spec.Selector, d) {
			continue
		}
		for _, port := range s.Spec.Ports {
			proto := ""
			if port.AppProtocol != nil {
				proto = *port.AppProtocol
			}
			if port.Name == "grpc" && sec.on["tls"] && proto == "kubernetes.io/h2c" {
				p.add(where, "port grpc serves TLS but appProtocol says kubernetes.io/h2c (cleartext)")
			}
			if port.Name == "metrics" && sec.on["metrics-tls"] && proto == "http" {
				p.add(where, "port metrics serves HTTPS but appProtocol says http")
			}
			if sec.healthPort != 0 && targetsPort(port.TargetPort, healthPortName, sec.healthPort) {
				p.add(where, "port %q exposes the health-only port, which is for the kubelet", port.Name)
			}
		}
	}
}

func targetsPort(t intstr.IntOrString, name string, number int32) bool {
	return (t.Type == intstr.String && t.StrVal == name) || (t.Type == intstr.Int && t.IntVal == number)
}

// checkHealthNotAdmitted: the plaintext health port stays reachable from the pod's node
// only (the kubelet; NetworkPolicy always allows node-local traffic), so no rule admits it.
func checkHealthNotAdmitted(p *problems, n *networkingv1.NetworkPolicy, secs map[*appsv1.Deployment]*serverSecurity) {
	where := "NetworkPolicy/" + n.Name
	for d, sec := range secs {
		if sec.healthPort == 0 || !selects(n.Spec.PodSelector.MatchLabels, d) {
			continue
		}
		for i, rule := range n.Spec.Ingress {
			if len(rule.Ports) == 0 {
				p.add(where, "ingress rule %d admits every port, the health-only port too", i)
			}
			for _, port := range rule.Ports {
				if port.Port != nil && targetsPort(*port.Port, healthPortName, sec.healthPort) {
					p.add(where, "ingress rule %d admits port %s, the health-only port: only the kubelet "+
						"(node-local traffic, always allowed) should reach it", i, port.Port.String())
				}
			}
		}
	}
}

// checkServiceMonitorSecurity: the scrape matches the metrics port's mode: HTTPS verified with
// the CA of the Secret the server's certificate comes from, under a name the certificate has;
// basic auth from the Secret the server's user file comes from.
func checkServiceMonitorSecurity(p *problems, m *monitoringv1.ServiceMonitor, services []*corev1.Service,
	secs map[*appsv1.Deployment]*serverSecurity, b *bundle) {
	where := "ServiceMonitor/" + m.Name
	var sec *serverSecurity
	var target *appsv1.Deployment
	for _, s := range services {
		if !selects(m.Spec.Selector.MatchLabels, &appsv1.Deployment{Spec: appsv1.DeploymentSpec{
			Template: corev1.PodTemplateSpec{ObjectMeta: s.ObjectMeta}}}) {
			continue
		}
		for d, ds := range secs {
			if selects(s.Spec.Selector, d) {
				sec, target = ds, d
			}
		}
	}
	if sec == nil {
		return // reported by checkServiceMonitor
	}
	for i, ep := range m.Spec.Endpoints {
		ew := fmt.Sprintf("%s endpoint %d", where, i)
		https := strings.EqualFold(ep.Scheme.String(), "https")
		if sec.on["metrics-tls"] != https {
			p.add(ew, "scheme %q, but the metrics port serves %s", ep.Scheme.String(),
				map[bool]string{true: "HTTPS", false: "plain HTTP"}[sec.on["metrics-tls"]])
		}
		tc := ep.TLSConfig
		if https {
			switch {
			case tc == nil || tc.CA.Secret == nil:
				p.add(ew, "tlsConfig.ca.secret is required to verify the metrics certificate")
			case tc.InsecureSkipVerify != nil && *tc.InsecureSkipVerify:
				p.add(ew, "tlsConfig.insecureSkipVerify must not be set")
			default:
				if want := sec.secretOf[envMetricsCert]; tc.CA.Secret.Name != want || tc.CA.Secret.Key != "ca.crt" {
					p.add(ew, "tlsConfig.ca.secret is %s/%s, want %s/ca.crt (the CA of the served certificate)",
						tc.CA.Secret.Name, tc.CA.Secret.Key, want)
				}
				cert := b.certs[target.Namespace+"/"+sec.secretOf[envMetricsCert]]
				switch {
				case tc.ServerName == nil || *tc.ServerName == "":
					p.add(ew, "tlsConfig.serverName is required: targets are pod IPs, which the certificate does not name")
				case strings.Contains(*tc.ServerName, placeholderLabel):
					p.add(ew, "tlsConfig.serverName %q still holds the placeholder %s", *tc.ServerName, placeholderLabel)
				case cert != nil && !slices.Contains(cert.Spec.DNSNames, *tc.ServerName):
					p.add(ew, "tlsConfig.serverName %q is not among the dnsNames of Certificate/%s", *tc.ServerName, cert.Name)
				}
			}
		}
		ba := ep.BasicAuth
		switch {
		case sec.on["metrics-auth"] && ba == nil:
			p.add(ew, "basicAuth is required: /metrics asks for it (%s)", envMetricsAuth)
		case !sec.on["metrics-auth"] && ba != nil:
			p.add(ew, "basicAuth is set but the server asks for none")
		case ba != nil:
			want := sec.secretOf[envMetricsAuth]
			for field, sel := range map[string]corev1.SecretKeySelector{"username": ba.Username, "password": ba.Password} {
				if sel.Name != want || sel.Key == "" {
					p.add(ew, "basicAuth.%s must be a key of Secret %q (the server's user file), got %q/%q",
						field, want, sel.Name, sel.Key)
				}
			}
		}
	}
}
