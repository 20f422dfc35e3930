// Command interop sends the shared test vectors (../vectors/cases.json) to a simserve server
// with google.golang.org/grpc, by unary Compute and by ComputeStream, and compares each result
// with the reference within the case's tolerance (top-k indices exactly). The stubs in
// gen/simservev1 are generated from proto/ at test time (see run_interop.py); never committed.
//
// Usage: interop -addr 127.0.0.1:PORT -cases path/to/cases.json
package main

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "simserve.dev/interop/gen/simservev1"
)

type tensorJSON struct {
	Shape   []int64   `json:"shape"`
	Values  []float64 `json:"values"`
	Indices []int32   `json:"indices"`
}

type caseJSON struct {
	Name     string     `json:"name"`
	Metric   string     `json:"metric"`
	Epsilon  float32    `json:"epsilon"`
	TopK     uint32     `json:"top_k"`
	Atol     float64    `json:"atol"`
	A        tensorJSON `json:"a"`
	B        tensorJSON `json:"b"`
	Expected tensorJSON `json:"expected"`
}

// result is a reassembled output: float32 values and (top-k) int32 indices, C order.
type result struct {
	shape   []int64
	values  []float32
	indices []int32
}

func rawFloat32(v []float64) []byte {
	out := make([]byte, 4*len(v))
	for i, x := range v {
		binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(float32(x)))
	}
	return out
}

func decodeFloat32(raw []byte) []float32 {
	out := make([]float32, len(raw)/4)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out
}

func decodeInt32(raw []byte) []int32 {
	out := make([]int32, len(raw)/4)
	for i := range out {
		out[i] = int32(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out
}

func request(c caseJSON) *pb.ComputeRequest {
	return &pb.ComputeRequest{
		A:       &pb.Tensor{Shape: c.A.Shape, Dtype: pb.DataType_FLOAT32, Data: &pb.Tensor_Raw{Raw: rawFloat32(c.A.Values)}},
		B:       &pb.Tensor{Shape: c.B.Shape, Dtype: pb.DataType_FLOAT32, Data: &pb.Tensor_Raw{Raw: rawFloat32(c.B.Values)}},
		Metric:  pb.Metric(pb.Metric_value[c.Metric]),
		TopK:    c.TopK,
		Epsilon: c.Epsilon,
		// Small chunks so that even these tiny results arrive in several tiles.
		MaxChunkBytes: 64,
	}
}

func unary(ctx context.Context, cl pb.SimilarityClient, c caseJSON) (*result, error) {
	resp, err := cl.Compute(ctx, request(c))
	if err != nil {
		return nil, err
	}
	return &result{resp.Shape, decodeFloat32(resp.ValuesRaw), decodeInt32(resp.IndicesRaw)}, nil
}

func stream(ctx context.Context, cl pb.SimilarityClient, c caseJSON) (*result, error) {
	st, err := cl.ComputeStream(ctx, request(c))
	if err != nil {
		return nil, err
	}
	r := &result{}
	tiles := 0
	for {
		ch, err := st.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if tiles == 0 {
			r.shape = ch.Shape
		}
		tiles++
		// Tiles arrive in (batch, row) order and cover the output once: appending reassembles.
		r.values = append(r.values, decodeFloat32(ch.ValuesRaw)...)
		r.indices = append(r.indices, decodeInt32(ch.IndicesRaw)...)
	}
	return r, nil
}

func compare(c caseJSON, r *result) error {
	if fmt.Sprint(r.shape) != fmt.Sprint(c.Expected.Shape) {
		return fmt.Errorf("shape %v, expected %v", r.shape, c.Expected.Shape)
	}
	if len(r.values) != len(c.Expected.Values) {
		return fmt.Errorf("%d values, expected %d", len(r.values), len(c.Expected.Values))
	}
	for i, want := range c.Expected.Values {
		got := float64(r.values[i])
		if math.IsNaN(got) || math.Abs(got-want) > c.Atol+1e-5*math.Abs(want) {
			return fmt.Errorf("value[%d] = %g, expected %g (atol %g)", i, got, want, c.Atol)
		}
	}
	if c.TopK > 0 {
		if len(r.indices) != len(c.Expected.Indices) {
			return fmt.Errorf("%d indices, expected %d", len(r.indices), len(c.Expected.Indices))
		}
		for i, want := range c.Expected.Indices {
			if r.indices[i] != want {
				return fmt.Errorf("index[%d] = %d, expected %d", i, r.indices[i], want)
			}
		}
	}
	return nil
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server host:port")
	casesPath := flag.String("cases", "cases.json", "test vectors")
	flag.Parse()

	data, err := os.ReadFile(*casesPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	var file struct {
		Cases []caseJSON `json:"cases"`
	}
	if err := json.Unmarshal(data, &file); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()
	cl := pb.NewSimilarityClient(conn)

	passed, failed := 0, 0
	modes := []struct {
		name string
		call func(context.Context, pb.SimilarityClient, caseJSON) (*result, error)
	}{{"unary", unary}, {"stream", stream}}
	for _, c := range file.Cases {
		for _, m := range modes {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			r, err := m.call(ctx, cl, c)
			cancel()
			if err == nil {
				err = compare(c, r)
			}
			if err != nil {
				failed++
				fmt.Printf("FAIL go %s %s: %v\n", m.name, c.Name, err)
			} else {
				passed++
				fmt.Printf("ok   go %s %s\n", m.name, c.Name)
			}
		}
	}
	fmt.Printf("go: %d passed, %d failed\n", passed, failed)
	if failed > 0 || passed == 0 {
		os.Exit(1)
	}
}
