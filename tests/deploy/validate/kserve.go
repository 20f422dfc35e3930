// KServe policy: the simserve ServingRuntime and the InferenceServices that use it. KServe
// (Standard deployment mode) makes one Deployment per predictor from the runtime's containers
// and the predictor's pod fields; predictorDeployment builds that Deployment here, so the
// same server policy as for deploy/k8s (resources, threads, hardening, probes, shutdown
// timing, galleries, TLS) applies to it, messages naming Deployment/<isvc>-predictor.
package main

import (
	"encoding/json"
	"slices"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
)

const (
	kserveGroup = "serving.kserve.io"
	// The runtime container KServe merges the predictor's model spec into (constants.go).
	kserveContainer    = "kserve-container"
	kserveModelFormat  = "simserve"
	kserveProtocol     = "grpc-v2" // simserve serves the Open Inference Protocol over gRPC only
	kserveModeKey      = "serving.kserve.io/deploymentMode"
	kserveH2CPortName  = "h2c"
	kservePredictorKey = "validate.simserve/inferenceservice" // marks a Deployment built here
)

type modelFormat struct {
	Name string `json:"name"`
}

// servingRuntime holds the fields of a (Cluster)ServingRuntime the policy reads (the schema
// has already been checked against the CRD).
type servingRuntime struct {
	Kind     string            `json:"kind"`
	Metadata metav1.ObjectMeta `json:"metadata"`
	Spec     struct {
		SupportedModelFormats []modelFormat      `json:"supportedModelFormats"`
		ProtocolVersions      []string           `json:"protocolVersions"`
		MultiModel            *bool              `json:"multiModel"`
		Disabled              *bool              `json:"disabled"`
		Containers            []corev1.Container `json:"containers"`
		Volumes               []corev1.Volume    `json:"volumes"`
	} `json:"spec"`
}

// predictorSpec is an InferenceService's spec.predictor: a pod spec inline, the replica
// bounds and the model (a container inline).
type predictorSpec struct {
	corev1.PodSpec
	MinReplicas *int32 `json:"minReplicas,omitempty"`
	MaxReplicas int32  `json:"maxReplicas,omitempty"`
	Model       *struct {
		corev1.Container
		ModelFormat     modelFormat `json:"modelFormat"`
		Runtime         *string     `json:"runtime,omitempty"`
		ProtocolVersion *string     `json:"protocolVersion,omitempty"`
		StorageURI      *string     `json:"storageUri,omitempty"`
	} `json:"model,omitempty"`
}

type inferenceService struct {
	Metadata metav1.ObjectMeta `json:"metadata"`
	Spec     struct {
		Predictor predictorSpec `json:"predictor"`
	} `json:"spec"`
}

func fromUnstructured(u *unstructured.Unstructured, out any) error {
	raw, err := json.Marshal(u.Object)
	if err != nil {
		return err
	}
	return json.Unmarshal(raw, out)
}

// kserveObjects returns the ServingRuntimes (by namespace/name; ClusterServingRuntimes by
// name) and InferenceServices among objs.
func kserveObjects(p *problems, objs []runtime.Object) (map[string]*servingRuntime, []*inferenceService) {
	runtimes := map[string]*servingRuntime{}
	var isvcs []*inferenceService
	for _, obj := range objs {
		u, ok := obj.(*unstructured.Unstructured)
		if !ok || u.GroupVersionKind().Group != kserveGroup {
			continue
		}
		var err error
		switch u.GetKind() {
		case "ServingRuntime", "ClusterServingRuntime":
			r := &servingRuntime{}
			if err = fromUnstructured(u, r); err == nil {
				runtimes[runtimeKey(r.Kind, r.Metadata.Namespace, r.Metadata.Name)] = r
			}
		case "InferenceService":
			s := &inferenceService{}
			if err = fromUnstructured(u, s); err == nil {
				isvcs = append(isvcs, s)
			}
		}
		if err != nil {
			p.add(describe(obj), "cannot read: %v", err)
		}
	}
	return runtimes, isvcs
}

func runtimeKey(kind, namespace, name string) string {
	if kind == "ClusterServingRuntime" {
		return "cluster/" + name
	}
	return namespace + "/" + name
}

// checkServingRuntime: simserve's runtime speaks grpc-v2 only, single-model, and its
// kserve-container declares the gRPC port first (KServe routes the predictor Service's port
// to the first container port, with appProtocol h2c only when its name says grpc or h2c).
func checkServingRuntime(p *problems, r *servingRuntime) {
	where := r.Kind + "/" + r.Metadata.Name
	if !slices.Contains(r.Spec.SupportedModelFormats, modelFormat{kserveModelFormat}) {
		p.add(where, "supportedModelFormats lacks %q", kserveModelFormat)
	}
	if !slices.Equal(r.Spec.ProtocolVersions, []string{kserveProtocol}) {
		p.add(where, "protocolVersions %v, want [%s]: simserve serves no v1 or REST v2 protocol",
			r.Spec.ProtocolVersions, kserveProtocol)
	}
	if r.Spec.MultiModel != nil && *r.Spec.MultiModel {
		p.add(where, "multiModel must not be true: simserve is no ModelMesh runtime")
	}
	var main *corev1.Container
	for i := range r.Spec.Containers {
		if r.Spec.Containers[i].Name == kserveContainer {
			main = &r.Spec.Containers[i]
		}
	}
	if main == nil {
		p.add(where, "no container named %q (the one KServe merges the model spec into)", kserveContainer)
		return
	}
	if len(main.Ports) == 0 || main.Ports[0].Name != kserveH2CPortName || main.Ports[0].ContainerPort != grpcPort {
		p.add(where, "container %q: the first port must be %s %d (the predictor Service's target)",
			kserveContainer, kserveH2CPortName, grpcPort)
	}
}

// predictorDeployment checks isvc's predictor and returns the Deployment KServe would make
// for it (nil if it cannot be built).
func predictorDeployment(p *problems, isvc *inferenceService, runtimes map[string]*servingRuntime) *appsv1.Deployment {
	where := "InferenceService/" + isvc.Metadata.Name
	switch mode := isvc.Metadata.Annotations[kserveModeKey]; mode {
	case "Standard", "RawDeployment":
	default:
		p.add(where, "annotation %s=%q: want Standard (Knative mode allows one container port "+
			"and no gRPC probes)", kserveModeKey, mode)
	}
	pred := isvc.Spec.Predictor
	if len(pred.Containers) > 0 {
		p.add(where, "predictor.containers must be empty: the ServingRuntime is the container")
	}
	m := pred.Model
	if m == nil {
		p.add(where, "predictor.model is required")
		return nil
	}
	if m.ModelFormat.Name != kserveModelFormat {
		p.add(where, "predictor.model.modelFormat.name %q, want %q", m.ModelFormat.Name, kserveModelFormat)
	}
	if m.ProtocolVersion != nil && *m.ProtocolVersion != kserveProtocol {
		p.add(where, "predictor.model.protocolVersion %q, want %s", *m.ProtocolVersion, kserveProtocol)
	}
	if m.StorageURI != nil {
		p.add(where, "predictor.model.storageUri must be unset: simserve's models are built in "+
			"(galleries come from the gallery volume)")
	}
	if m.Runtime == nil {
		p.add(where, "predictor.model.runtime must name the ServingRuntime (no auto-selection)")
		return nil
	}
	r := runtimes[runtimeKey("ServingRuntime", isvc.Metadata.Namespace, *m.Runtime)]
	if r == nil {
		r = runtimes[runtimeKey("ClusterServingRuntime", "", *m.Runtime)]
	}
	if r == nil {
		p.add(where, "predictor.model.runtime %q is not a rendered ServingRuntime", *m.Runtime)
		return nil
	}
	if r.Spec.Disabled != nil && *r.Spec.Disabled {
		p.add(where, "ServingRuntime %q is disabled", *m.Runtime)
	}
	name := isvc.Metadata.Name + "-predictor"
	labels := map[string]string{"app": "isvc." + name}
	d := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: isvc.Metadata.Namespace,
			Annotations: map[string]string{kservePredictorKey: isvc.Metadata.Name}},
		Spec: appsv1.DeploymentSpec{
			Replicas: pred.MinReplicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{ObjectMeta: metav1.ObjectMeta{Labels: labels}},
		},
	}
	if d.Spec.Replicas == nil {
		one := int32(1)
		d.Spec.Replicas = &one
	}
	pod := pred.PodSpec.DeepCopy()
	pod.Volumes = append(slices.Clone(r.Spec.Volumes), pod.Volumes...)
	for _, c := range r.Spec.Containers {
		c = *c.DeepCopy()
		if c.Name == kserveContainer {
			mergeModelContainer(&c, &m.Container)
		}
		pod.Containers = append(pod.Containers, c)
	}
	d.Spec.Template.Spec = *pod
	return d
}

// mergeModelContainer applies the predictor's model container fields to the runtime's
// kserve-container the way KServe's strategic merge does for the fields simserve uses: a set
// image, args or resources replace the runtime's, env entries override by name.
func mergeModelContainer(c, model *corev1.Container) {
	if model.Image != "" {
		c.Image = model.Image
	}
	if len(model.Args) > 0 {
		c.Args = model.Args
	}
	if len(model.Resources.Limits) > 0 || len(model.Resources.Requests) > 0 {
		c.Resources = model.Resources
	}
	for _, e := range model.Env {
		if i := slices.IndexFunc(c.Env, func(x corev1.EnvVar) bool { return x.Name == e.Name }); i >= 0 {
			c.Env[i] = e
		} else {
			c.Env = append(c.Env, e)
		}
	}
	c.VolumeMounts = append(c.VolumeMounts, model.VolumeMounts...)
}

// grpcPortName is the name simserve's gRPC container port must have in d: KServe expects
// h2c, deploy/k8s's Services target grpc.
func grpcPortName(d *appsv1.Deployment) string {
	if d.Annotations[kservePredictorKey] != "" {
		return kserveH2CPortName
	}
	return "grpc"
}

// checkKServe checks the KServe objects and returns the predictor Deployments KServe would
// make, for the server policy.
func checkKServe(p *problems, objs []runtime.Object) []*appsv1.Deployment {
	runtimes, isvcs := kserveObjects(p, objs)
	for _, r := range runtimes {
		checkServingRuntime(p, r)
	}
	var out []*appsv1.Deployment
	for _, isvc := range isvcs {
		if d := predictorDeployment(p, isvc, runtimes); d != nil {
			out = append(out, d)
		}
	}
	return out
}
