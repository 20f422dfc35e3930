// Command kserve calls simserve's Open Inference Protocol service (inference.GRPCInferenceService)
// with google.golang.org/grpc and stubs generated at test time from
// proto/inference/grpc_service.proto (see tests/kserve/test_go_client.py; never committed):
// ServerLive, ServerReady, ModelMetadata and ModelInfer of the `cosine` model with FP32 A and
// B in raw_input_contents, then ModelInfer of an unknown model. It checks nothing itself:
// it writes what the server answered as JSON for the Python driver, which compares it with
// numpy/scikit-learn.
//
// Usage: kserve -addr 127.0.0.1:PORT -in request.json -out answer.json
// request.json: {"model": "cosine", "a": {"shape": [...], "values": [...]}, "b": {...}}
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "simserve.dev/kserve/gen/inference"
)

type tensorJSON struct {
	Name     string    `json:"name,omitempty"`
	Datatype string    `json:"datatype,omitempty"`
	Shape    []int64   `json:"shape"`
	Values   []float32 `json:"values,omitempty"`
}

type requestJSON struct {
	Model string     `json:"model"`
	A     tensorJSON `json:"a"`
	B     tensorJSON `json:"b"`
}

type answerJSON struct {
	Live             bool         `json:"live"`
	Ready            bool         `json:"ready"`
	MetadataName     string       `json:"metadata_name"`
	MetadataVersions []string     `json:"metadata_versions"`
	MetadataInputs   []tensorJSON `json:"metadata_inputs"`
	MetadataOutputs  []tensorJSON `json:"metadata_outputs"`
	ModelName        string       `json:"model_name"`
	ModelVersion     string       `json:"model_version"`
	ID               string       `json:"id"`
	Outputs          []tensorJSON `json:"outputs"`
	UnknownModelCode string       `json:"unknown_model_code"`
}

// raw is the little-endian float32 encoding of values (raw_input_contents).
func raw(values []float32) []byte {
	out := make([]byte, 4*len(values))
	for i, v := range values {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
	}
	return out
}

func decode(data []byte) []float32 {
	out := make([]float32, len(data)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(data[4*i:]))
	}
	return out
}

func metadataTensors(in []*pb.ModelMetadataResponse_TensorMetadata) []tensorJSON {
	out := []tensorJSON{}
	for _, t := range in {
		out = append(out, tensorJSON{Name: t.GetName(), Datatype: t.GetDatatype(),
			Shape: t.GetShape()})
	}
	return out
}

func run(addr, inPath, outPath string) error {
	data, err := os.ReadFile(inPath)
	if err != nil {
		return err
	}
	var req requestJSON
	if err := json.Unmarshal(data, &req); err != nil {
		return err
	}
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	client := pb.NewGRPCInferenceServiceClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	var answer answerJSON
	live, err := client.ServerLive(ctx, &pb.ServerLiveRequest{})
	if err != nil {
		return fmt.Errorf("ServerLive: %w", err)
	}
	answer.Live = live.GetLive()
	ready, err := client.ServerReady(ctx, &pb.ServerReadyRequest{})
	if err != nil {
		return fmt.Errorf("ServerReady: %w", err)
	}
	answer.Ready = ready.GetReady()
	meta, err := client.ModelMetadata(ctx, &pb.ModelMetadataRequest{Name: req.Model})
	if err != nil {
		return fmt.Errorf("ModelMetadata: %w", err)
	}
	answer.MetadataName = meta.GetName()
	answer.MetadataVersions = meta.GetVersions()
	answer.MetadataInputs = metadataTensors(meta.GetInputs())
	answer.MetadataOutputs = metadataTensors(meta.GetOutputs())

	infer := &pb.ModelInferRequest{
		ModelName: req.Model,
		Id:        "go-1",
		Inputs: []*pb.ModelInferRequest_InferInputTensor{
			{Name: "A", Datatype: "FP32", Shape: req.A.Shape},
			{Name: "B", Datatype: "FP32", Shape: req.B.Shape},
		},
		Outputs:          []*pb.ModelInferRequest_InferRequestedOutputTensor{{Name: "S"}},
		RawInputContents: [][]byte{raw(req.A.Values), raw(req.B.Values)},
	}
	resp, err := client.ModelInfer(ctx, infer)
	if err != nil {
		return fmt.Errorf("ModelInfer: %w", err)
	}
	answer.ModelName = resp.GetModelName()
	answer.ModelVersion = resp.GetModelVersion()
	answer.ID = resp.GetId()
	for i, o := range resp.GetOutputs() {
		t := tensorJSON{Name: o.GetName(), Datatype: o.GetDatatype(), Shape: o.GetShape()}
		if i < len(resp.GetRawOutputContents()) {
			t.Values = decode(resp.GetRawOutputContents()[i])
		}
		answer.Outputs = append(answer.Outputs, t)
	}

	infer.ModelName = "no_such_model"
	if _, err := client.ModelInfer(ctx, infer); err == nil {
		answer.UnknownModelCode = "OK"
	} else {
		answer.UnknownModelCode = status.Code(err).String()
	}

	out, err := json.MarshalIndent(answer, "", " ")
	if err != nil {
		return err
	}
	return os.WriteFile(outPath, out, 0o644)
}

func main() {
	addr := flag.String("addr", "", "server address host:port")
	in := flag.String("in", "", "request JSON")
	out := flag.String("out", "", "answer JSON")
	flag.Parse()
	if err := run(*addr, *in, *out); err != nil {
		fmt.Fprintln(os.Stderr, "kserve:", err)
		os.Exit(1)
	}
}
