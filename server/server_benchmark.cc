// Server benchmark (prints figures; not a test): the seed workload (100x400x500x200 fp32)
// computed in-process by the kernel vs through the server over loopback with Compute,
// ComputeStream and ComputeUpload, and a small request's unary rate vs GetInfo (an almost
// empty handler), all medians measured in this run.
// Usage: server_benchmark [--runs=N] [--small_calls=N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "kernels/similarity.h"
#include "server/server.h"
#include "simserve/v1/similarity.grpc.pb.h"

namespace {

using simserve::v1::ComputeChunk;
using simserve::v1::ComputeRequest;

double MedianMs(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double TimeMs(const std::function<bool()>& f) {
  const absl::Time begin = absl::Now();
  if (!f()) {
    std::fprintf(stderr, "call failed\n");
    std::exit(1);
  }
  return absl::ToDoubleMilliseconds(absl::Now() - begin);
}

std::string RandomBytes(int64_t count, uint32_t seed) {
  std::vector<float> v(count);
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0F, 1.0F);
  for (float& x : v) x = dist(rng);
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
}

ComputeRequest SeedRequest(int64_t batch, int64_t n, int64_t m, int64_t d,
                           simserve::v1::DataType out) {
  ComputeRequest r;
  for (int64_t x : {batch, n, d}) r.mutable_a()->add_shape(x);
  for (int64_t x : {batch, m, d}) r.mutable_b()->add_shape(x);
  r.mutable_a()->set_raw(RandomBytes(batch * n * d, 1));
  r.mutable_b()->set_raw(RandomBytes(batch * m * d, 2));
  r.set_output_dtype(out);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 7;
  int small_calls = 2000;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--runs=", 7) == 0) runs = std::atoi(argv[i] + 7);
    if (std::strncmp(argv[i], "--small_calls=", 14) == 0) small_calls = std::atoi(argv[i] + 14);
  }
  simserve::ServerConfig config;
  config.listen = "127.0.0.1:0";
  config.metrics_listen = "";
  // The seed request is 72 MB: over the default 64 MiB receive limit for Compute and
  // ComputeStream (ComputeUpload does not need this).
  config.limits.max_receive_message_bytes = int64_t{128} << 20;
  auto server = simserve::SimilarityServer::Start(config);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  auto stub = simserve::v1::Similarity::NewStub(grpc::CreateCustomChannel(
      "127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials(), args));

  const int64_t batch = 100, n = 400, m = 500, d = 200;
  for (auto out : {simserve::v1::FLOAT32, simserve::v1::BFLOAT16}) {
    const ComputeRequest req = SeedRequest(batch, n, m, d, out);
    // In-process kernel: same engine settings as the server's default (all cores).
    auto engine = simserve::kernels::SimilarityEngine::Create({});
    simserve::kernels::Options options;
    options.output_dtype = out == simserve::v1::FLOAT32 ? simserve::kernels::DataType::kFloat32
                                                        : simserve::kernels::DataType::kBFloat16;
    const simserve::kernels::Shape shape{batch, n, m, d};
    const size_t out_bytes =
        static_cast<size_t>(batch * n * m) * (out == simserve::v1::FLOAT32 ? 4 : 2);
    std::string buffer(out_bytes, '\0');  // reused: no page faults in the timed part
    std::vector<double> kernel, unary, stream, upload;
    for (int r = 0; r < runs; ++r) {
      kernel.push_back(TimeMs([&] {
        auto job = (*engine)->Prepare(shape, options,
                                      {reinterpret_cast<const std::byte*>(req.b().raw().data())});
        if (!job.ok()) return false;
        const size_t per_batch = out_bytes / batch;
        for (int64_t k = 0; k < batch; ++k) {
          auto* a = reinterpret_cast<const std::byte*>(req.a().raw().data()) + k * n * d * 4;
          if (!(*job)
                   ->ComputeTile(
                       k, 0, n, {a},
                       {reinterpret_cast<std::byte*>(buffer.data()) + k * per_batch, per_batch}, {})
                   .ok()) {
            return false;
          }
        }
        return true;
      }));
      unary.push_back(TimeMs([&] {
        grpc::ClientContext ctx;
        simserve::v1::ComputeResponse resp;
        return stub->Compute(&ctx, req, &resp).ok() && resp.values_raw().size() == out_bytes;
      }));
      stream.push_back(TimeMs([&] {
        grpc::ClientContext ctx;
        auto reader = stub->ComputeStream(&ctx, req);
        ComputeChunk chunk;
        size_t got = 0;
        while (reader->Read(&chunk)) got += chunk.values_raw().size();
        return reader->Finish().ok() && got == out_bytes;
      }));
      upload.push_back(TimeMs([&] {
        grpc::ClientContext ctx;
        auto s = stub->ComputeUpload(&ctx);
        simserve::v1::UploadRequest msg;
        *msg.mutable_header()->mutable_request() = req;
        msg.mutable_header()->mutable_request()->mutable_a()->clear_raw();
        msg.mutable_header()->mutable_request()->mutable_b()->clear_raw();
        s->Write(msg);
        constexpr size_t kPiece = 1 << 20;
        for (const std::string* data : {&req.b().raw(), &req.a().raw()}) {
          for (size_t off = 0; off < data->size(); off += kPiece) {
            if (data == &req.b().raw()) {
              msg.set_b_data(data->substr(off, kPiece));
            } else {
              msg.set_a_data(data->substr(off, kPiece));
            }
            s->Write(msg);
          }
        }
        s->WritesDone();
        ComputeChunk chunk;
        size_t got = 0;
        while (s->Read(&chunk)) got += chunk.values_raw().size();
        return s->Finish().ok() && got == out_bytes;
      }));
    }
    const double k = MedianMs(kernel);
    std::printf(
        "seed 100x400x500x200 %s out, median of %d: kernel in-process %.1f ms | Compute %.1f ms "
        "(%.2fx) | ComputeStream %.1f ms (%.2fx) | ComputeUpload %.1f ms (%.2fx)\n",
        out == simserve::v1::FLOAT32 ? "fp32" : "bf16", runs, k, MedianMs(unary),
        MedianMs(unary) / k, MedianMs(stream), MedianMs(stream) / k, MedianMs(upload),
        MedianMs(upload) / k);
  }

  // Small requests, one client, sequential: latency and rate vs GetInfo.
  const ComputeRequest small = SeedRequest(1, 8, 256, 128, simserve::v1::FLOAT32);
  std::vector<double> small_ms, info_ms, small_kernel_ms;
  {
    auto engine = simserve::kernels::SimilarityEngine::Create({});
    std::string out(size_t{8} * 256 * 4, '\0');
    for (int i = 0; i < small_calls; ++i) {
      small_kernel_ms.push_back(TimeMs([&] {
        auto job = (*engine)->Prepare({1, 8, 256, 128}, {},
                                      {reinterpret_cast<const std::byte*>(small.b().raw().data())});
        return job.ok() &&
               (*job)
                   ->ComputeTile(0, 0, 8,
                                 {reinterpret_cast<const std::byte*>(small.a().raw().data())},
                                 {reinterpret_cast<std::byte*>(out.data()), out.size()}, {})
                   .ok();
      }));
    }
  }
  for (int i = 0; i < small_calls; ++i) {
    small_ms.push_back(TimeMs([&] {
      grpc::ClientContext ctx;
      simserve::v1::ComputeResponse resp;
      return stub->Compute(&ctx, small, &resp).ok();
    }));
    info_ms.push_back(TimeMs([&] {
      grpc::ClientContext ctx;
      simserve::v1::GetInfoResponse resp;
      return stub->GetInfo(&ctx, simserve::v1::GetInfoRequest(), &resp).ok();
    }));
  }
  auto p99 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() * 99 / 100];
  };
  std::printf(
      "small 1x8x256x128 unary, 1 sequential client, %d calls: Compute p50 %.3f ms p99 %.3f ms "
      "(%.0f/s) | GetInfo p50 %.3f ms p99 %.3f ms (%.0f/s) | ratio %.2f | kernel in-process "
      "p50 %.3f ms\n",
      small_calls, MedianMs(small_ms), p99(small_ms), 1000.0 / MedianMs(small_ms),
      MedianMs(info_ms), p99(info_ms), 1000.0 / MedianMs(info_ms),
      MedianMs(info_ms) / MedianMs(small_ms), MedianMs(small_kernel_ms));
  (*server)->Shutdown(absl::Seconds(5));
  return 0;
}
