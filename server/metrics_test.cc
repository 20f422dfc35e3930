// Unit tests of ServerMetrics: the exposition text (prometheus::TextSerializer) holds exactly the
// expected values after known observations, and the interceptor counts the RPCs of a small fake
// Similarity service served on loopback (OK, INVALID_ARGUMENT, streams, a cancelled call).
#include "server/metrics.h"

#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "prometheus/registry.h"
#include "prometheus/text_serializer.h"
#include "simserve/v1/similarity.grpc.pb.h"

namespace simserve {
namespace {

using ::testing::Contains;
using ::testing::HasSubstr;
using ::testing::Not;

// Parsed exposition: "name{k1="v1",k2="v2"}" (labels sorted by key, as prometheus-cpp prints
// them) -> value. Comment lines are kept separately.
struct Scrape {
  std::map<std::string, double> samples;
  std::vector<std::string> comments;
  std::string text;

  // Value of a series; fails the test (and returns -1) when the series is absent.
  double Value(const std::string& name,
               const std::map<std::string, std::string>& labels = {}) const {
    std::string key = name;
    if (!labels.empty()) {
      key += "{";
      bool first = true;
      for (const auto& [k, v] : labels) {
        if (!first) key += ",";
        first = false;
        key.append(k).append("=\"").append(v).append("\"");
      }
      key += "}";
    }
    auto it = samples.find(key);
    EXPECT_NE(it, samples.end()) << "missing series " << key << " in\n" << text;
    return it == samples.end() ? -1 : it->second;
  }

  // Number of series whose name is exactly `name`.
  int Count(const std::string& name) const {
    int n = 0;
    for (const auto& [key, value] : samples) {
      if (key == name || key.rfind(name + "{", 0) == 0) ++n;
    }
    return n;
  }
};

Scrape Collect(prometheus::Registry& registry) {
  Scrape scrape;
  scrape.text = prometheus::TextSerializer().Serialize(registry.Collect());
  std::istringstream in(scrape.text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    if (line[0] == '#') {
      scrape.comments.push_back(line);
      continue;
    }
    const size_t space = line.rfind(' ');
    scrape.samples[line.substr(0, space)] = std::stod(line.substr(space + 1));
  }
  return scrape;
}

std::vector<ServerMetrics::MethodInfo> SimilarityMethods() {
  return {{"/simserve.v1.Similarity/Compute", "unary"},
          {"/simserve.v1.Similarity/ComputeStream", "server_stream"},
          {"/simserve.v1.Similarity/ComputeUpload", "bidi_stream"},
          {"/simserve.v1.Similarity/GetInfo", "unary"}};
}

const BuildInfo kBuild = {"1.2.3", "2.6.3", "avx512_core_amx"};

std::map<std::string, std::string> Rpc(const std::string& method, const std::string& type,
                                       const std::string& service = "simserve.v1.Similarity") {
  return {{"grpc_method", method}, {"grpc_service", service}, {"grpc_type", type}};
}

std::map<std::string, std::string> RpcCode(const std::string& method, const std::string& type,
                                           const std::string& code) {
  auto labels = Rpc(method, type);
  labels["grpc_code"] = code;
  return labels;
}

TEST(ServerMetrics, PreCreatesEveryMethodAndCodeAtZero) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, kBuild, SimilarityMethods());
  const Scrape s = Collect(registry);

  // 4 Similarity methods + Health.Check, Health.Watch, reflection = 7 methods x 17 codes.
  EXPECT_EQ(s.Count("grpc_server_handled_total"), 7 * 17);
  EXPECT_EQ(s.Count("grpc_server_started_total"), 7);
  EXPECT_EQ(s.Count("grpc_server_msg_received_total"), 7);
  EXPECT_EQ(s.Count("grpc_server_msg_sent_total"), 7);
  EXPECT_EQ(s.Count("grpc_server_handling_seconds_count"), 7);
  for (const char* code :
       {"OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
        "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
        "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"}) {
    EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("Compute", "unary", code)), 0) << code;
  }
  EXPECT_EQ(s.Value("grpc_server_started_total", Rpc("Check", "unary", "grpc.health.v1.Health")),
            0);
  EXPECT_EQ(s.Value("grpc_server_started_total", Rpc("ServerReflectionInfo", "bidi_stream",
                                                     "grpc.reflection.v1alpha.ServerReflection")),
            0);
  EXPECT_EQ(
      s.Value("simserve_build_info",
              {{"version", "1.2.3"}, {"onednn_version", "2.6.3"}, {"isa", "avx512_core_amx"}}),
      1);
  EXPECT_THAT(s.comments, Contains("# TYPE grpc_server_handled_total counter"));
  EXPECT_THAT(s.comments, Contains("# TYPE grpc_server_handling_seconds histogram"));
  EXPECT_THAT(s.comments, Contains("# TYPE simserve_requests_in_flight gauge"));
}

TEST(ServerMetrics, StageObservationsAppearWithExactValues) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, kBuild, SimilarityMethods());
  metrics.ObserveQueueWait(0.003);  // between the 2.5 ms and 5 ms bounds
  metrics.ObserveQueueWait(20.0);   // above the last bound (10 s): only +Inf
  metrics.ObserveCompute(0.0004);   // below the first bound (0.5 ms)
  metrics.ObserveWrite(0.5);        // exactly on a bound: counted in le="0.5"
  metrics.ObserveTotal(1.5);
  metrics.ObserveTotal(1.5);
  metrics.AddInFlight(3);
  metrics.AddInFlight(-1);
  metrics.AddQueueDepth(5);
  metrics.AddQueueDepth(-5);
  metrics.AddBytesReceived(1000);
  metrics.AddBytesReceived(24);
  metrics.AddBytesSent(4096);
  metrics.AddFlops(2.0 * 100 * 400 * 500 * 200);
  metrics.AddTiles(7);
  metrics.Reject(RejectReason::kQueueFull);
  metrics.Reject(RejectReason::kQueueFull);
  metrics.Reject(RejectReason::kTooManyFlops);
  metrics.Reject(RejectReason::kDraining);
  const Scrape s = Collect(registry);

  EXPECT_EQ(s.Value("simserve_queue_wait_seconds_count"), 2);
  EXPECT_DOUBLE_EQ(s.Value("simserve_queue_wait_seconds_sum"), 20.003);
  EXPECT_EQ(s.Value("simserve_queue_wait_seconds_bucket", {{"le", "0.0025"}}), 0);
  EXPECT_EQ(s.Value("simserve_queue_wait_seconds_bucket", {{"le", "0.005"}}), 1);
  EXPECT_EQ(s.Value("simserve_queue_wait_seconds_bucket", {{"le", "10"}}), 1);
  EXPECT_EQ(s.Value("simserve_queue_wait_seconds_bucket", {{"le", "+Inf"}}), 2);
  EXPECT_EQ(s.Value("simserve_compute_seconds_bucket", {{"le", "0.0005"}}), 1);
  EXPECT_EQ(s.Value("simserve_write_seconds_bucket", {{"le", "0.25"}}), 0);
  EXPECT_EQ(s.Value("simserve_write_seconds_bucket", {{"le", "0.5"}}), 1);
  EXPECT_EQ(s.Value("simserve_request_seconds_count"), 2);
  EXPECT_EQ(s.Value("simserve_request_seconds_sum"), 3.0);
  // 0.5 ms .. 10 s: 14 finite bounds + +Inf.
  EXPECT_EQ(s.Count("simserve_request_seconds_bucket"), 15);
  EXPECT_EQ(s.Value("simserve_requests_in_flight"), 2);
  EXPECT_EQ(s.Value("simserve_queue_depth"), 0);
  EXPECT_EQ(s.Value("simserve_received_bytes_total"), 1024);
  EXPECT_EQ(s.Value("simserve_sent_bytes_total"), 4096);
  EXPECT_EQ(s.Value("simserve_flops_total"), 8e9);
  EXPECT_EQ(s.Value("simserve_tiles_streamed_total"), 7);
  EXPECT_EQ(s.Value("simserve_rejected_requests_total", {{"reason", "queue_full"}}), 2);
  EXPECT_EQ(s.Value("simserve_rejected_requests_total", {{"reason", "too_many_flops"}}), 1);
  EXPECT_EQ(s.Value("simserve_rejected_requests_total", {{"reason", "draining"}}), 1);
  EXPECT_EQ(s.Value("simserve_rejected_requests_total", {{"reason", "too_many_elements"}}), 0);
  EXPECT_EQ(s.Value("simserve_rejected_requests_total", {{"reason", "output_too_large"}}), 0);
  EXPECT_EQ(s.Value("simserve_rejected_requests_total", {{"reason", "inflight_bytes"}}), 0);
}

// A fake Similarity service with predictable behaviour, so the interceptor's counts can be
// checked without the real kernels: Compute fails with INVALID_ARGUMENT when top_k == 99,
// ComputeStream writes max_chunk_bytes chunks, ComputeUpload echoes one chunk per message
// read, GetInfo waits until the client gives up and then returns OK (sent to nobody).
class FakeSimilarity final : public v1::Similarity::Service {
 public:
  grpc::Status Compute(grpc::ServerContext*, const v1::ComputeRequest* request,
                       v1::ComputeResponse* response) override {
    if (request->top_k() == 99) return {grpc::StatusCode::INVALID_ARGUMENT, "top_k too large"};
    response->add_shape(1);
    return grpc::Status::OK;
  }
  grpc::Status ComputeStream(grpc::ServerContext*, const v1::ComputeRequest* request,
                             grpc::ServerWriter<v1::ComputeChunk>* writer) override {
    for (uint32_t i = 0; i < request->max_chunk_bytes(); ++i) {
      v1::ComputeChunk chunk;
      chunk.set_row_offset(i);
      writer->Write(chunk);
    }
    return grpc::Status::OK;
  }
  grpc::Status ComputeUpload(
      grpc::ServerContext*,
      grpc::ServerReaderWriter<v1::ComputeChunk, v1::UploadRequest>* stream) override {
    v1::UploadRequest piece;
    while (stream->Read(&piece)) stream->Write(v1::ComputeChunk());
    return grpc::Status::OK;
  }
  grpc::Status GetInfo(grpc::ServerContext* context, const v1::GetInfoRequest*,
                       v1::GetInfoResponse*) override {
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    while (!context->IsCancelled() && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    return grpc::Status::OK;
  }
};

TEST(ServerMetricsInterceptor, CountsStartedHandledAndMessagesPerMethodAndCode) {
  prometheus::Registry registry;
  ServerMetrics metrics(registry, kBuild, SimilarityMethods());
  FakeSimilarity service;
  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> creators;
  creators.push_back(metrics.MakeInterceptorFactory());
  builder.experimental().SetInterceptorCreators(std::move(creators));
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(server, nullptr);
  ASSERT_GT(port, 0);

  auto channel =
      grpc::CreateChannel("127.0.0.1:" + std::to_string(port), grpc::InsecureChannelCredentials());
  auto stub = v1::Similarity::NewStub(channel);
  const auto deadline = [] { return std::chrono::system_clock::now() + std::chrono::seconds(10); };

  // 3 OK + 2 INVALID_ARGUMENT unary calls.
  for (int i = 0; i < 5; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline());
    v1::ComputeRequest request;
    request.set_top_k(i < 3 ? 0 : 99);
    v1::ComputeResponse response;
    const grpc::Status status = stub->Compute(&ctx, request, &response);
    EXPECT_EQ(status.error_code(),
              i < 3 ? grpc::StatusCode::OK : grpc::StatusCode::INVALID_ARGUMENT);
  }
  // Two streams of 4 and 0 chunks.
  for (uint32_t chunks : {4u, 0u}) {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline());
    v1::ComputeRequest request;
    request.set_max_chunk_bytes(chunks);
    auto reader = stub->ComputeStream(&ctx, request);
    v1::ComputeChunk chunk;
    uint32_t read = 0;
    while (reader->Read(&chunk)) ++read;
    EXPECT_EQ(read, chunks);
    EXPECT_TRUE(reader->Finish().ok());
  }
  // One bidi stream with 3 messages up (3 chunks down).
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline());
    auto stream = stub->ComputeUpload(&ctx);
    for (int i = 0; i < 3; ++i) ASSERT_TRUE(stream->Write(v1::UploadRequest()));
    stream->WritesDone();
    v1::ComputeChunk chunk;
    int read = 0;
    while (stream->Read(&chunk)) ++read;
    EXPECT_EQ(read, 3);
    EXPECT_TRUE(stream->Finish().ok());
  }
  // A call the client abandons (deadline): the server's OK never arrives -> Canceled.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(100));
    v1::GetInfoResponse response;
    EXPECT_EQ(stub->GetInfo(&ctx, v1::GetInfoRequest(), &response).error_code(),
              grpc::StatusCode::DEADLINE_EXCEEDED);
  }
  // An unknown method is answered UNIMPLEMENTED and creates no series.
  {
    grpc::GenericStub generic(channel);
    grpc::ClientContext ctx;
    ctx.set_deadline(deadline());
    grpc::Slice empty(std::string(""));
    grpc::ByteBuffer request(&empty, 1);
    grpc::ByteBuffer response;
    grpc::Status status;
    std::mutex mu;
    std::condition_variable cv;
    bool done = false;
    generic.UnaryCall(&ctx, "/evil.Service/Method" + std::to_string(port), {}, &request, &response,
                      [&](grpc::Status s) {
                        std::lock_guard<std::mutex> lock(mu);
                        status = std::move(s);
                        done = true;
                        cv.notify_one();
                      });
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNIMPLEMENTED);
  }
  // Shutdown waits for the abandoned GetInfo handler, so every RPC has been recorded.
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(15));
  server->Wait();

  const Scrape s = Collect(registry);
  EXPECT_EQ(s.Value("grpc_server_started_total", Rpc("Compute", "unary")), 5);
  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("Compute", "unary", "OK")), 3);
  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("Compute", "unary", "InvalidArgument")),
            2);
  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("Compute", "unary", "Unknown")), 0);
  EXPECT_EQ(s.Value("grpc_server_msg_received_total", Rpc("Compute", "unary")), 5);
  EXPECT_EQ(s.Value("grpc_server_msg_sent_total", Rpc("Compute", "unary")), 3);
  EXPECT_EQ(s.Value("grpc_server_handling_seconds_count", Rpc("Compute", "unary")), 5);

  EXPECT_EQ(s.Value("grpc_server_started_total", Rpc("ComputeStream", "server_stream")), 2);
  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("ComputeStream", "server_stream", "OK")),
            2);
  EXPECT_EQ(s.Value("grpc_server_msg_received_total", Rpc("ComputeStream", "server_stream")), 2);
  EXPECT_EQ(s.Value("grpc_server_msg_sent_total", Rpc("ComputeStream", "server_stream")), 4);

  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("ComputeUpload", "bidi_stream", "OK")), 1);
  EXPECT_EQ(s.Value("grpc_server_msg_received_total", Rpc("ComputeUpload", "bidi_stream")), 3);
  EXPECT_EQ(s.Value("grpc_server_msg_sent_total", Rpc("ComputeUpload", "bidi_stream")), 3);

  EXPECT_EQ(s.Value("grpc_server_started_total", Rpc("GetInfo", "unary")), 1);
  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("GetInfo", "unary", "Canceled")), 1);
  EXPECT_EQ(s.Value("grpc_server_handled_total", RpcCode("GetInfo", "unary", "OK")), 0);
  EXPECT_EQ(s.Value("grpc_server_handling_seconds_count", Rpc("GetInfo", "unary")), 1);
  // The abandoned call took at least the client's 100 ms deadline.
  EXPECT_GE(s.Value("grpc_server_handling_seconds_sum", Rpc("GetInfo", "unary")), 0.1);

  EXPECT_THAT(s.text, Not(HasSubstr("evil")));
  EXPECT_EQ(s.Count("grpc_server_handled_total"), 7 * 17);
}

}  // namespace
}  // namespace simserve
