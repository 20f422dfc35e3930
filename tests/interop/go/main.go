// Command interop sends the shared test vectors (../vectors/cases.json) to a simserve server
// with google.golang.org/grpc, by unary Compute and by ComputeStream, and compares each result
// with the reference within the case's tolerance (top-k indices exactly). Galleries: each
// case's B is registered (RegisterGallery, a client stream of header + data pieces) and then
// queried by name with Compute, ComputeStream and ComputeUpload (header naming the gallery,
// then only A); the server's --gallery_dir holds each case's B as dir-<case>.npy (written
// by run_interop.py with numpy), queried the same way; then ListGalleries, DeleteGallery and
// their error codes. The stubs in gen/simservev1 are generated from proto/ at test time (see
// run_interop.py); never committed.
//
// With -ca and -token (run_interop.py --security tls_token) the connection uses TLS
// (credentials.NewClientTLSFromFile) and per-RPC credentials that send
// `authorization: Bearer <token>` on every call; a wrong and a missing token must then get
// UNAUTHENTICATED.
//
// Usage: interop -addr 127.0.0.1:PORT -cases path/to/cases.json [-ca ca.crt -token TOKEN]
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
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

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

// galleryRequest is request(c) with the named gallery in place of B.
func galleryRequest(c caseJSON, gallery string) *pb.ComputeRequest {
	req := request(c)
	req.B = nil
	req.Gallery = gallery
	return req
}

func unary(ctx context.Context, cl pb.SimilarityClient, c caseJSON) (*result, error) {
	return unaryReq(ctx, cl, request(c))
}

func unaryReq(ctx context.Context, cl pb.SimilarityClient, req *pb.ComputeRequest) (*result, error) {
	resp, err := cl.Compute(ctx, req)
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
	return collect(st)
}

// collect reassembles a stream of ComputeChunks.
func collect(st interface {
	Recv() (*pb.ComputeChunk, error)
}) (*result, error) {
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

// registerGallery uploads the case's B as `name`: the header, then the bytes in two pieces.
func registerGallery(ctx context.Context, cl pb.SimilarityClient, c caseJSON, name string) (*pb.GalleryInfo, error) {
	st, err := cl.RegisterGallery(ctx)
	if err != nil {
		return nil, err
	}
	header := &pb.GalleryHeader{Name: name, Shape: c.B.Shape, Dtype: pb.DataType_FLOAT32}
	if err := st.Send(&pb.RegisterGalleryRequest{Part: &pb.RegisterGalleryRequest_Header{Header: header}}); err != nil {
		return nil, err
	}
	raw := rawFloat32(c.B.Values)
	for _, piece := range [][]byte{raw[:len(raw)/2], raw[len(raw)/2:]} {
		if err := st.Send(&pb.RegisterGalleryRequest{Part: &pb.RegisterGalleryRequest_Data{Data: piece}}); err != nil {
			return nil, err
		}
	}
	info, err := st.CloseAndRecv()
	if err != nil {
		return nil, err
	}
	if info.Name != name || fmt.Sprint(info.Shape) != fmt.Sprint(c.B.Shape) || info.Version < 1 ||
		info.Source != pb.GallerySource_UPLOADED || info.Bytes <= 0 {
		return nil, fmt.Errorf("RegisterGallery answered %v", info)
	}
	return info, nil
}

// galleryStream is ComputeStream with the gallery in place of B.
func galleryStream(ctx context.Context, cl pb.SimilarityClient, c caseJSON, gallery string) (*result, error) {
	st, err := cl.ComputeStream(ctx, galleryRequest(c, gallery))
	if err != nil {
		return nil, err
	}
	return collect(st)
}

// galleryUpload is ComputeUpload whose header names the gallery; only A follows, in pieces.
func galleryUpload(ctx context.Context, cl pb.SimilarityClient, c caseJSON, gallery string) (*result, error) {
	st, err := cl.ComputeUpload(ctx)
	if err != nil {
		return nil, err
	}
	req := galleryRequest(c, gallery)
	raw := req.A.GetRaw()
	req.A.Data = nil
	if err := st.Send(&pb.UploadRequest{Part: &pb.UploadRequest_Header{Header: &pb.UploadHeader{Request: req}}}); err != nil {
		return nil, err
	}
	for off := 0; off < len(raw); off += 40 {
		end := min(off+40, len(raw))
		if err := st.Send(&pb.UploadRequest{Part: &pb.UploadRequest_AData{AData: raw[off:end]}}); err != nil {
			return nil, err
		}
	}
	if err := st.CloseSend(); err != nil {
		return nil, err
	}
	return collect(st)
}

// wantCode checks that err is a gRPC status with the given code.
func wantCode(err error, want codes.Code) error {
	if got := status.Code(err); got != want {
		return fmt.Errorf("got %v (%v), want %v", got, err, want)
	}
	return nil
}

// galleryChecks runs the gallery part; report is called once per check.
func galleryChecks(cl pb.SimilarityClient, cases []caseJSON, report func(name string, err error)) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, c := range cases {
		name := "go-" + c.Name
		info, err := registerGallery(ctx, cl, c, name)
		report("gallery register "+c.Name, err)
		if err != nil {
			continue
		}
		calls := []struct {
			mode string
			call func() (*result, error)
		}{
			{"unary", func() (*result, error) { return unaryReq(ctx, cl, galleryRequest(c, name)) }},
			{"stream", func() (*result, error) { return galleryStream(ctx, cl, c, name) }},
			{"upload", func() (*result, error) { return galleryUpload(ctx, cl, c, name) }},
			{"pinned", func() (*result, error) {
				req := galleryRequest(c, name)
				req.GalleryVersion = info.Version
				return unaryReq(ctx, cl, req)
			}},
			{"directory", func() (*result, error) { return unaryReq(ctx, cl, galleryRequest(c, "dir-"+c.Name)) }},
		}
		for _, m := range calls {
			r, err := m.call()
			if err == nil {
				err = compare(c, r)
			}
			report("gallery "+m.mode+" "+c.Name, err)
		}
		req := galleryRequest(c, name)
		req.GalleryVersion = info.Version + 1
		_, err = cl.Compute(ctx, req)
		report("gallery wrong version "+c.Name, wantCode(err, codes.FailedPrecondition))
	}
	list, err := cl.ListGalleries(ctx, &pb.ListGalleriesRequest{})
	if err == nil {
		sources := map[string]pb.GallerySource{}
		var names []string
		for _, g := range list.Galleries {
			sources[g.Name] = g.Source
			names = append(names, g.Name)
		}
		for i := 1; i < len(names) && err == nil; i++ {
			if names[i-1] >= names[i] {
				err = fmt.Errorf("not sorted by name: %v", names)
			}
		}
		for _, c := range cases {
			if s, ok := sources["dir-"+c.Name]; err == nil && (!ok || s != pb.GallerySource_DIRECTORY) {
				err = fmt.Errorf("dir-%s: listed %v, source %v", c.Name, ok, s)
			}
			if s, ok := sources["go-"+c.Name]; err == nil && (!ok || s != pb.GallerySource_UPLOADED) {
				err = fmt.Errorf("go-%s: listed %v, source %v", c.Name, ok, s)
			}
		}
	}
	report("gallery list", err)
	for _, c := range cases {
		deleted, err := cl.DeleteGallery(ctx, &pb.DeleteGalleryRequest{Name: "go-" + c.Name})
		if err == nil && deleted.GetDeleted().GetName() != "go-"+c.Name {
			err = fmt.Errorf("deleted %v", deleted)
		}
		report("gallery delete "+c.Name, err)
	}
	_, err = cl.GetGallery(ctx, &pb.GetGalleryRequest{Name: "go-" + cases[0].Name})
	report("gallery get deleted", wantCode(err, codes.NotFound))
	_, err = cl.Compute(ctx, galleryRequest(cases[0], "go-"+cases[0].Name))
	report("gallery compute deleted", wantCode(err, codes.NotFound))
	_, err = cl.DeleteGallery(ctx, &pb.DeleteGalleryRequest{Name: "dir-" + cases[0].Name})
	report("gallery delete directory", wantCode(err, codes.FailedPrecondition))
	_, err = registerGallery(ctx, cl, cases[0], "bad/name")
	report("gallery bad name", wantCode(err, codes.InvalidArgument))
}

// bearer sends `authorization: Bearer <token>` with every RPC, over TLS only (grpc-go's
// oauth package does the same but needs golang.org/x/oauth2).
type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}

func (bearer) RequireTransportSecurity() bool { return true }

// dial connects to addr: plaintext without ca, else TLS trusting the PEM file ca, with the
// token (if not empty) on every call.
func dial(addr, ca, token string) (*grpc.ClientConn, error) {
	if ca == "" {
		return grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	creds, err := credentials.NewClientTLSFromFile(ca, "")
	if err != nil {
		return nil, err
	}
	opts := []grpc.DialOption{grpc.WithTransportCredentials(creds)}
	if token != "" {
		opts = append(opts, grpc.WithPerRPCCredentials(bearer(token)))
	}
	return grpc.NewClient(addr, opts...)
}

// refusalChecks calls with a wrong token and without one: both must be UNAUTHENTICATED,
// for a unary call and a stream alike.
func refusalChecks(addr, ca, token string, c caseJSON, report func(name string, err error)) {
	for _, t := range []struct{ label, token string }{{"wrong token", "wrong-" + token}, {"no token", ""}} {
		conn, err := dial(addr, ca, t.token)
		if err != nil {
			report(t.label, err)
			continue
		}
		cl := pb.NewSimilarityClient(conn)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = unary(ctx, cl, c)
		report(t.label+" unary", wantCode(err, codes.Unauthenticated))
		_, err = stream(ctx, cl, c)
		report(t.label+" stream", wantCode(err, codes.Unauthenticated))
		cancel()
		conn.Close()
	}
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
	ca := flag.String("ca", "", "PEM CA of the server's certificate (TLS); empty: plaintext")
	token := flag.String("token", "", "bearer token sent on every call (needs -ca)")
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
	conn, err := dial(*addr, *ca, *token)
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
	report := func(name string, err error) {
		if err != nil {
			failed++
			fmt.Printf("FAIL go %s: %v\n", name, err)
		} else {
			passed++
			fmt.Printf("ok   go %s\n", name)
		}
	}
	galleryChecks(cl, file.Cases, report)
	if *token != "" {
		refusalChecks(*addr, *ca, *token, file.Cases[0], report)
	}
	fmt.Printf("go: %d passed, %d failed\n", passed, failed)
	if failed > 0 || passed == 0 {
		os.Exit(1)
	}
}
