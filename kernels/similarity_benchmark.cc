// Google Benchmark for the kernel: the seed workload (100x400x500x200), a latency shape
// (1x32x1024x768) and a retrieval shape (1x1x10000x384), fp32 and bf16 precision.
// Reports GFLOP/s (2*batch*N*M*D per iteration) and the oneDNN implementation used.
// Threads: --benchmark_... flags as usual; SIMSERVE_BENCH_THREADS sets OpenMP threads (default
// all).
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "kernels/similarity.h"

namespace simserve::kernels {
namespace {

int BenchThreads() {
  const char* env = std::getenv("SIMSERVE_BENCH_THREADS");
  return env != nullptr ? std::atoi(env) : 0;
}

SimilarityEngine& Engine() {
  // Benchmarks are registered as free functions; one engine for the whole binary.
  static auto engine = SimilarityEngine::Create({.threads_per_call = BenchThreads()});
  return **engine;
}

std::vector<float> RandomFloats(int64_t count, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(-1.0F, 1.0F);
  std::vector<float> data(count);
  for (float& v : data) v = dist(gen);
  return data;
}

void RunSimilarity(benchmark::State& state, Shape shape, Options options, int64_t tile_rows) {
  const auto a = RandomFloats(shape.batch * shape.n * shape.d, 1);
  const auto b = RandomFloats(shape.batch * shape.m * shape.d, 2);
  const ConstTensorView a_view{reinterpret_cast<const std::byte*>(a.data()), DataType::kFloat32};
  const ConstTensorView b_view{reinterpret_cast<const std::byte*>(b.data()), DataType::kFloat32};
  const int64_t rows = shape.batch * shape.n;
  const size_t k = static_cast<size_t>(options.top_k);
  std::vector<std::byte> values(static_cast<size_t>(rows * (k > 0 ? k : shape.m)) *
                                SizeOf(options.output_dtype));
  std::vector<int32_t> indices(rows * k);
  auto impl = Engine().MatmulImplementation(shape, options, std::min(tile_rows, shape.n));
  if (!impl.ok()) {
    state.SkipWithError(std::string(impl.status().message()).c_str());
    return;
  }
  for (auto _ : state) {
    auto job = Engine().Prepare(shape, options, b_view);
    absl::Status status =
        job.ok() ? ComputeAll(**job, a_view, tile_rows, values, indices) : job.status();
    if (!status.ok()) {
      state.SkipWithError(std::string(status.message()).c_str());
      return;
    }
    benchmark::DoNotOptimize(values.data());
  }
  state.SetLabel(*impl);
  state.counters["GFLOP/s"] = benchmark::Counter(static_cast<double>(MatmulFlops(shape)) / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

constexpr Shape kSeed{.batch = 100, .n = 400, .m = 500, .d = 200};
constexpr Shape kLatency{.batch = 1, .n = 32, .m = 1024, .d = 768};
constexpr Shape kRetrieval{.batch = 1, .n = 1, .m = 10000, .d = 384};

void BM_Seed_Cosine_Fp32(benchmark::State& s) { RunSimilarity(s, kSeed, {}, 400); }
void BM_Seed_Cosine_Bf16(benchmark::State& s) {
  RunSimilarity(s, kSeed, {.precision = Precision::kBf16}, 400);
}
void BM_Seed_Dot_Fp32(benchmark::State& s) {
  RunSimilarity(s, kSeed, {.metric = Metric::kDot}, 400);
}
void BM_Seed_Euclidean_Fp32(benchmark::State& s) {
  RunSimilarity(s, kSeed, {.metric = Metric::kEuclidean}, 400);
}
void BM_Seed_Cosine_Fp32_Bf16Out(benchmark::State& s) {
  RunSimilarity(s, kSeed, {.output_dtype = DataType::kBFloat16}, 400);
}
void BM_Seed_Cosine_Fp32_Top10(benchmark::State& s) { RunSimilarity(s, kSeed, {.top_k = 10}, 400); }
void BM_Latency_Cosine_Fp32(benchmark::State& s) { RunSimilarity(s, kLatency, {}, 32); }
void BM_Latency_Cosine_Bf16(benchmark::State& s) {
  RunSimilarity(s, kLatency, {.precision = Precision::kBf16}, 32);
}
void BM_Retrieval_Cosine_Fp32(benchmark::State& s) { RunSimilarity(s, kRetrieval, {}, 1); }
void BM_Retrieval_Cosine_Bf16(benchmark::State& s) {
  RunSimilarity(s, kRetrieval, {.precision = Precision::kBf16}, 1);
}

BENCHMARK(BM_Seed_Cosine_Fp32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Seed_Cosine_Bf16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Seed_Dot_Fp32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Seed_Euclidean_Fp32)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Seed_Cosine_Fp32_Bf16Out)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Seed_Cosine_Fp32_Top10)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Latency_Cosine_Fp32)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Latency_Cosine_Bf16)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Retrieval_Cosine_Fp32)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK(BM_Retrieval_Cosine_Bf16)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace
}  // namespace simserve::kernels

BENCHMARK_MAIN();
