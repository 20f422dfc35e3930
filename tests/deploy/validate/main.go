// Command validate checks rendered Kubernetes manifests (the output of `kubectl kustomize`)
// for simserve: every object is decoded strictly into the real Kubernetes, prometheus-operator
// and cert-manager Go types (unknown, misspelled, duplicate or wrongly typed fields fail,
// exactly as the API server's strict field validation does), then simserve's deployment
// policy is checked.
//
// Custom resources of the CRDs given with -crd (KServe's) are checked against the CRD's
// OpenAPI schema instead, with the same strictness (crd.go).
//
// Usage: validate [flags] FILE|- ...   (exit 0 = valid, 1 = invalid, 2 = usage error)
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	cmv1 "github.com/cert-manager/cert-manager/pkg/apis/certmanager/v1"
	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kjson "k8s.io/apimachinery/pkg/runtime/serializer/json"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	kyaml "k8s.io/apimachinery/pkg/util/yaml"
)

// newScheme registers exactly the API groups simserve's manifests may use; any other kind
// is rejected as unknown.
func newScheme() *runtime.Scheme {
	s := runtime.NewScheme()
	utilruntime.Must(corev1.AddToScheme(s))
	utilruntime.Must(appsv1.AddToScheme(s))
	utilruntime.Must(autoscalingv2.AddToScheme(s))
	utilruntime.Must(policyv1.AddToScheme(s))
	utilruntime.Must(networkingv1.AddToScheme(s))
	utilruntime.Must(monitoringv1.AddToScheme(s))
	utilruntime.Must(cmv1.AddToScheme(s))
	return s
}

// splitDocuments returns the non-empty YAML documents of r.
func splitDocuments(r io.Reader) ([][]byte, error) {
	reader := kyaml.NewYAMLReader(bufio.NewReader(r))
	var docs [][]byte
	for {
		doc, err := reader.Read()
		if errors.Is(err, io.EOF) {
			return docs, nil
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(stripComments(doc))) > 0 {
			docs = append(docs, doc)
		}
	}
}

func stripComments(doc []byte) []byte {
	var out bytes.Buffer
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out.Write(line)
			out.WriteByte('\n')
		}
	}
	return out.Bytes()
}

// decodeStrict decodes one YAML document into its typed object. Strict decoding errors
// (unknown or duplicate fields) are errors here, as are type mismatches and unknown kinds.
func decodeStrict(codec runtime.Decoder, doc []byte) (runtime.Object, error) {
	obj, gvk, err := codec.Decode(doc, nil, nil)
	if err != nil {
		if gvk != nil && gvk.Kind != "" {
			return nil, fmt.Errorf("%s %s: %w", gvk.GroupVersion(), gvk.Kind, err)
		}
		return nil, err
	}
	return obj, nil
}

func main() {
	opts := policyOptions{}
	flag.IntVar(&opts.minReplicas, "min-replicas", 1, "minimum spec.replicas of every Deployment")
	flag.IntVar(&opts.maxReplicas, "max-replicas", 1000, "maximum spec.replicas of every Deployment")
	require := flag.String("require-kinds", "Deployment,Service",
		"comma-separated kinds that must be present")
	forbid := flag.String("forbid-kinds", "", "comma-separated kinds that must be absent")
	security := flag.String("security", "",
		"exactly the security features every Deployment has on, comma-separated from "+
			securityFeatureNames()+", or none; empty: not checked")
	schemaOnly := flag.Bool("schema-only", false, "only strict schema decoding, no policy")
	extract := flag.String("extract-kind", "",
		"after successful validation, print the documents of this kind (as written) instead")
	crds := crdSchemas{}
	flag.Func("crd", "a CustomResourceDefinition YAML file whose kinds are checked against its "+
		"schema (repeatable)", crds.loadCRD)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags] FILE|- ...\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	opts.requireKinds = splitList(*require)
	opts.forbidKinds = splitList(*forbid)
	opts.crds = crds
	var err error
	if opts.security, err = parseSecurityFlag(*security); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}

	scheme := newScheme()
	codec := kjson.NewSerializerWithOptions(kjson.DefaultMetaFactory, scheme, scheme,
		kjson.SerializerOptions{Yaml: true, Strict: true})

	var objs []runtime.Object
	var extracted [][]byte
	var problems []string
	for _, name := range flag.Args() {
		var r io.Reader = os.Stdin
		if name != "-" {
			f, err := os.Open(name)
			if err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(2)
			}
			defer f.Close()
			r = f
		}
		docs, err := splitDocuments(r)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s: %v", name, err))
			continue
		}
		for i, doc := range docs {
			obj, isCustom, err := crds.decode(doc)
			if !isCustom {
				obj, err = decodeStrict(codec, doc)
			}
			if err != nil {
				problems = append(problems, fmt.Sprintf("%s: document %d: schema: %v", name, i+1, err))
				continue
			}
			objs = append(objs, obj)
			if *extract != "" && kindOf(obj) == *extract {
				extracted = append(extracted, doc)
			}
		}
	}
	if len(objs) == 0 && len(problems) == 0 {
		problems = append(problems, "no objects found")
	}
	if !*schemaOnly {
		problems = append(problems, checkPolicy(objs, opts)...)
	}
	if *extract != "" && len(problems) == 0 {
		if len(extracted) == 0 {
			problems = append(problems, "no "+*extract+" to extract")
		}
		for _, doc := range extracted {
			fmt.Printf("---\n%s", doc)
		}
	} else {
		for _, obj := range objs {
			fmt.Fprintf(os.Stdout, "decoded %s\n", describe(obj))
		}
	}
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintf(os.Stderr, "INVALID: %s\n", p)
		}
		fmt.Fprintf(os.Stderr, "%d problem(s) in %d object(s)\n", len(problems), len(objs))
		os.Exit(1)
	}
	if *extract == "" {
		fmt.Printf("OK: %d object(s) valid\n", len(objs))
	}
}

func splitList(s string) []string {
	var out []string
	for _, item := range strings.Split(s, ",") {
		if item = strings.TrimSpace(item); item != "" {
			out = append(out, item)
		}
	}
	return out
}
