// Google Benchmark for the kernel: the seed workload (100x400x500x200), a latency shape
// (1x32x1024x768) and a retrieval shape (1x1x10000x384), fp32 and bf16 precision.
// Reports GFLOP/s (2*batch*N*M*D per iteration) and the oneDNN implementation used.
// Threads: --benchmark_... flags as usual; SIMSERVE_BENCH_THREADS sets OpenMP threads (default
// all).
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstdlib>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/similarity.h"
#include "oneapi/dnnl/dnnl.hpp"

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
    const std::string message(impl.status().message());
    state.SkipWithError(message.c_str());
    return;
  }
  for (auto _ : state) {
    auto job = Engine().Prepare(shape, options, b_view);
    absl::Status status =
        job.ok() ? ComputeAll(**job, a_view, tile_rows, values, indices) : job.status();
    if (!status.ok()) {
      const std::string message(status.message());
      state.SkipWithError(message.c_str());
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

// Baselines for the formulation choice, straight on oneDNN with one 3D batched matmul over
// the whole seed workload: the bare matmul (a lower bound for any formulation) and the
// design's alternative of scaling by 1/||b_j|| in a [B,1,M] binary_mul post-op.
void RunRawBatchedMatmul(benchmark::State& state, bool column_scale_post_op) {
  using dnnl::memory;
  const Shape s = kSeed;
  const auto a = RandomFloats(s.batch * s.n * s.d, 1);
  const auto b = RandomFloats(s.batch * s.m * s.d, 2);
  const auto scales = RandomFloats(s.batch * s.m, 3);
  std::vector<float> out(s.batch * s.n * s.m);
  if (BenchThreads() > 0) omp_set_num_threads(BenchThreads());
  dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  dnnl::stream stream(eng);
  const memory::desc a_md({s.batch, s.n, s.d}, memory::data_type::f32, memory::format_tag::abc);
  const memory::desc b_md({s.batch, s.d, s.m}, memory::data_type::f32, memory::format_tag::acb);
  const memory::desc out_md({s.batch, s.n, s.m}, memory::data_type::f32, memory::format_tag::abc);
  const memory::desc scale_md({s.batch, 1, s.m}, memory::data_type::f32, memory::format_tag::abc);
  dnnl::primitive_attr attr;
  if (column_scale_post_op) {
    dnnl::post_ops ops;
    ops.append_binary(dnnl::algorithm::binary_mul, scale_md);
    attr.set_post_ops(ops);
  }
  const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a_md, b_md, out_md), attr, eng);
  const dnnl::matmul matmul(pd);
  memory a_mem(a_md, eng, const_cast<float*>(a.data()));
  memory b_mem(b_md, eng, const_cast<float*>(b.data()));
  memory out_mem(out_md, eng, out.data());
  memory scale_mem(scale_md, eng, const_cast<float*>(scales.data()));
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, out_mem}};
  if (column_scale_post_op) {
    args.emplace(DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1, scale_mem);
  }
  for (auto _ : state) {
    matmul.execute(stream, args);
    stream.wait();
  }
  state.SetLabel(pd.impl_info_str());
  state.counters["GFLOP/s"] = benchmark::Counter(static_cast<double>(MatmulFlops(s)) / 1e9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Baseline_Seed_BareBatchedMatmul(benchmark::State& s) { RunRawBatchedMatmul(s, false); }
void BM_Baseline_Seed_BatchedMatmulColumnScalePostOp(benchmark::State& s) {
  RunRawBatchedMatmul(s, true);
}
BENCHMARK(BM_Baseline_Seed_BareBatchedMatmul)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Baseline_Seed_BatchedMatmulColumnScalePostOp)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
}  // namespace simserve::kernels

BENCHMARK_MAIN();
