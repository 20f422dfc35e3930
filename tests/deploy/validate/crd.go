// Custom resources checked against their CustomResourceDefinition's OpenAPI schema, the way
// the API server checks them with strict field validation: duplicate fields, fields the
// schema does not know (found by pruning), metadata fields, types, enums, patterns and
// list-map keys. Used for KServe, whose Go API module cannot be built together with the
// k8s.io version the rest of the validator uses (deploy/README.md, "KServe").
package main

import (
	"bytes"
	"fmt"
	"os"
	"strings"

	apiextensions "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	structuralschema "k8s.io/apiextensions-apiserver/pkg/apiserver/schema"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/listtype"
	"k8s.io/apiextensions-apiserver/pkg/apiserver/schema/pruning"
	apiservervalidation "k8s.io/apiextensions-apiserver/pkg/apiserver/validation"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	utiljson "k8s.io/apimachinery/pkg/util/json"
	"k8s.io/apimachinery/pkg/util/validation/field"
	sigsjson "sigs.k8s.io/json"
	sigsyaml "sigs.k8s.io/yaml"
)

// crdVersion is one served version of a CRD: its structural schema (pruning, list types)
// and the OpenAPI validator built from the same schema.
type crdVersion struct {
	structural *structuralschema.Structural
	validator  apiservervalidation.SchemaCreateValidator
	namespaced bool
}

// crdSchemas maps group/version/kind to the schema of that version.
type crdSchemas map[schema.GroupVersionKind]*crdVersion

// loadCRD adds every served version of the CustomResourceDefinition(s) in file to s.
func (s crdSchemas) loadCRD(file string) error {
	data, err := os.ReadFile(file)
	if err != nil {
		return err
	}
	docs, err := splitDocuments(bytes.NewReader(data))
	if err != nil {
		return fmt.Errorf("%s: %w", file, err)
	}
	for _, doc := range docs {
		var crd apiextensionsv1.CustomResourceDefinition
		if err := sigsyaml.UnmarshalStrict(doc, &crd); err != nil {
			return fmt.Errorf("%s: %w", file, err)
		}
		if crd.Kind != "CustomResourceDefinition" {
			return fmt.Errorf("%s: kind %q, want CustomResourceDefinition", file, crd.Kind)
		}
		for _, v := range crd.Spec.Versions {
			if !v.Served || v.Schema == nil || v.Schema.OpenAPIV3Schema == nil {
				continue
			}
			var internal apiextensions.JSONSchemaProps
			if err := apiextensionsv1.Convert_v1_JSONSchemaProps_To_apiextensions_JSONSchemaProps(
				v.Schema.OpenAPIV3Schema, &internal, nil); err != nil {
				return fmt.Errorf("%s %s: %w", crd.Name, v.Name, err)
			}
			structural, err := structuralschema.NewStructural(&internal)
			if err != nil {
				return fmt.Errorf("%s %s: not a structural schema: %w", crd.Name, v.Name, err)
			}
			validator, _, err := apiservervalidation.NewSchemaValidator(&internal)
			if err != nil {
				return fmt.Errorf("%s %s: %w", crd.Name, v.Name, err)
			}
			gvk := schema.GroupVersionKind{Group: crd.Spec.Group, Version: v.Name, Kind: crd.Spec.Names.Kind}
			s[gvk] = &crdVersion{structural: structural, validator: validator,
				namespaced: crd.Spec.Scope == apiextensionsv1.NamespaceScoped}
		}
	}
	return nil
}

// decode returns (nil, false, nil) when doc is of no loaded CRD's kind. Otherwise it checks doc
// against the schema and returns it as an Unstructured object; every problem found is in err.
func (s crdSchemas) decode(doc []byte) (runtime.Object, bool, error) {
	var tm metav1.TypeMeta
	if err := sigsyaml.Unmarshal(doc, &tm); err != nil {
		return nil, false, nil // the typed decoder reports it
	}
	gvk := tm.GroupVersionKind()
	v, ok := s[gvk]
	if !ok {
		return nil, false, nil
	}
	fail := func(format string, args ...any) (runtime.Object, bool, error) {
		return nil, true, fmt.Errorf("%s %s: %s", gvk.GroupVersion(), gvk.Kind, fmt.Sprintf(format, args...))
	}
	// Duplicate fields: sigs.k8s.io/yaml's strict conversion, as kubectl and the API server.
	js, err := sigsyaml.YAMLToJSONStrict(doc)
	if err != nil {
		return fail("strict decoding error: %v", err)
	}
	var obj map[string]interface{}
	if err := utiljson.Unmarshal(js, &obj); err != nil {
		return fail("%v", err)
	}
	var errs []string
	// metadata is ObjectMeta whatever the schema says: strict decoding into the Go type.
	if md, ok := obj["metadata"]; ok {
		raw, _ := utiljson.Marshal(md)
		var meta metav1.ObjectMeta
		strictErrs, err := sigsjson.UnmarshalStrict(raw, &meta)
		if err != nil {
			return fail("metadata: %v", err)
		}
		for _, e := range strictErrs {
			errs = append(errs, strings.Replace(e.Error(), `unknown field "`, `unknown field "metadata.`, 1))
		}
	}
	// Unknown fields: what the API server would prune.
	pruned := pruning.PruneWithOptions(runtime.DeepCopyJSON(obj), v.structural, true,
		structuralschema.UnknownFieldPathOptions{TrackUnknownFieldPaths: true})
	for _, path := range pruned {
		errs = append(errs, fmt.Sprintf("unknown field %q", path))
	}
	var fieldErrs field.ErrorList
	fieldErrs = append(fieldErrs, apiservervalidation.ValidateCustomResource(nil, obj, v.validator)...)
	fieldErrs = append(fieldErrs, listtype.ValidateListSetsAndMaps(nil, v.structural, obj)...)
	for _, e := range fieldErrs {
		errs = append(errs, e.Error())
	}
	if len(errs) > 0 {
		return fail("strict decoding error: %s", strings.Join(errs, "; "))
	}
	return &unstructured.Unstructured{Object: obj}, true, nil
}

// namespaced reports whether obj (a custom resource) is namespace-scoped.
func (s crdSchemas) namespaced(obj *unstructured.Unstructured) bool {
	if v, ok := s[obj.GroupVersionKind()]; ok {
		return v.namespaced
	}
	return true
}
