// Retrieval benchmark of the in-process kernel against a prepared gallery, driven by
// tests/bench/retrieval.py (which runs faiss beside it). Prints one JSON line per run:
//   gallery_benchmark --m=1000000 --d=384 --queries=1,16,256 --k=10 --storage=float32
//       --rounds=5 [--bandwidth]
// --bandwidth also measures the machine's memory read bandwidth over a buffer of the
// gallery's size (the floor of a scan: gallery bytes / bandwidth). --precision=bf16 runs the
// matmul path (more than 8 query rows) on bf16 operands. With --stdin it builds
// the gallery, then answers one line per query count read from stdin ("16") with one
// timed call, so that a harness can interleave it round by round with a baseline process.
#include <omp.h>
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "kernels/gallery.h"
#include "kernels/similarity.h"

namespace {

using simserve::kernels::DataType;

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Read bandwidth in bytes/s: a summing pass over `bytes` with all OpenMP threads, 64
// independent accumulators per thread so that the adds are never the bottleneck.
// The buffer uses transparent huge pages, as the gallery does (kernels/gallery.cc).
double ReadBandwidth(size_t bytes, int rounds) {
  constexpr size_t kLanes = 64;
  constexpr size_t kHuge = size_t{2} << 20;
  const size_t count = bytes / 4 / kLanes * kLanes;
  const size_t rounded = (count * 4 + kHuge - 1) / kHuge * kHuge;
  std::unique_ptr<float, decltype(&std::free)> storage(
      static_cast<float*>(std::aligned_alloc(kHuge, rounded)), &std::free);
  madvise(storage.get(), rounded, MADV_HUGEPAGE);
  std::span<float> buffer(storage.get(), count);
  std::fill(buffer.begin(), buffer.end(), 1.0F);
  const size_t steps = buffer.size() / kLanes;
  std::vector<double> times;
  volatile float sink = 0;
  for (int r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    float total = 0;
#pragma omp parallel reduction(+ : total)
    {
      float lanes[kLanes] = {};
#pragma omp for schedule(static)
      for (size_t step = 0; step < steps; ++step) {
        const float* x = buffer.data() + step * kLanes;
#pragma omp simd
        for (size_t u = 0; u < kLanes; ++u) lanes[u] += x[u];
      }
      for (const float lane : lanes) total += lane;
    }
    sink = sink + total;
    times.push_back(Seconds(start));
  }
  return static_cast<double>(buffer.size() * 4) / Median(times);
}

std::string Flag(int argc, char** argv, const char* name, const char* fallback) {
  const std::string prefix = std::string("--") + name + "=";
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], prefix.c_str(), prefix.size()) == 0) return argv[i] + prefix.size();
    if (std::string(argv[i]) == std::string("--") + name) return "1";
  }
  return fallback;
}

}  // namespace

int main(int argc, char** argv) {
  const int64_t m = std::atoll(Flag(argc, argv, "m", "1000000").c_str());
  const int64_t d = std::atoll(Flag(argc, argv, "d", "384").c_str());
  const int64_t k = std::atoll(Flag(argc, argv, "k", "10").c_str());
  const int rounds = std::atoi(Flag(argc, argv, "rounds", "5").c_str());
  const std::string storage_name = Flag(argc, argv, "storage", "float32");
  const std::string queries_list = Flag(argc, argv, "queries", "1,16,256");
  const bool bandwidth = Flag(argc, argv, "bandwidth", "0") == "1";
  // Arithmetic of the matmul path (more than 8 query rows): fp32 (default) or bf16.
  const auto precision = Flag(argc, argv, "precision", "fp32") == "bf16"
                             ? simserve::kernels::Precision::kBf16
                             : simserve::kernels::Precision::kFp32;
  const DataType storage = storage_name == "bfloat16"  ? DataType::kBFloat16
                           : storage_name == "float16" ? DataType::kFloat16
                                                       : DataType::kFloat32;

  const int threads = std::atoi(Flag(argc, argv, "threads", "0").c_str());
  if (threads > 0) omp_set_num_threads(threads);
  auto engine = simserve::kernels::SimilarityEngine::Create({.threads_per_call = threads});
  if (!engine.ok()) {
    std::fprintf(stderr, "%s\n", engine.status().ToString().c_str());
    return 1;
  }
  std::mt19937 gen(1);
  std::normal_distribution<float> dist(0.0F, 1.0F);
  // The gallery: a cheap generator (std::normal_distribution takes seconds for 4e8 values).
  auto fill = [](float* data, int64_t count, uint64_t seed) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < count; ++i) {
      uint64_t x = (static_cast<uint64_t>(i) + seed) * 0x9E3779B97F4A7C15ULL;
      x ^= x >> 29;
      x *= 0xBF58476D1CE4E5B9ULL;
      x ^= x >> 32;
      data[i] = static_cast<float>(static_cast<int64_t>(x % 2000001) - 1000000) * 1e-6F;
    }
  };
  const auto build_start = std::chrono::steady_clock::now();
  auto builder = simserve::kernels::GalleryBuilder::Create({1, m, d}, DataType::kFloat32, storage);
  if (!builder.ok()) {
    std::fprintf(stderr, "%s\n", builder.status().ToString().c_str());
    return 1;
  }
  auto* raw = reinterpret_cast<float*>((*builder)->input().data());
  fill(raw, m * d, 12345);
  const auto prepare_start = std::chrono::steady_clock::now();
  auto gallery = (*builder)->Build();
  if (!gallery.ok()) {
    std::fprintf(stderr, "%s\n", gallery.status().ToString().c_str());
    return 1;
  }
  std::printf(
      "{\"event\": \"gallery\", \"m\": %lld, \"d\": %lld, \"storage\": \"%s\", \"bytes\": %lld, "
      "\"prepare_s\": %.3f, \"fill_s\": %.3f, \"threads\": %d}\n",
      static_cast<long long>(m), static_cast<long long>(d), storage_name.c_str(),
      static_cast<long long>((*gallery)->bytes()), Seconds(prepare_start),
      std::chrono::duration<double>(prepare_start - build_start).count(),
      (*engine)->threads_per_call());
  if (bandwidth) {
    std::printf("{\"event\": \"bandwidth\", \"bytes_per_s\": %.4g}\n",
                ReadBandwidth(static_cast<size_t>(m * d * 4), rounds));
  }
  if (Flag(argc, argv, "stdin", "0") == "1") {
    std::fflush(stdout);
    long long q = 0;
    while (std::scanf("%lld", &q) == 1) {
      std::vector<float> a(q * d);
      for (float& v : a) v = dist(gen);
      const simserve::kernels::Options options{.precision = precision, .top_k = k};
      std::vector<std::byte> values(q * k * 4);
      std::vector<int32_t> indices(q * k);
      const auto start = std::chrono::steady_clock::now();
      auto job = (*engine)->Prepare({1, q, m, d}, options, **gallery);
      absl::Status status = job.ok()
                                ? ComputeAll(**job, {reinterpret_cast<const std::byte*>(a.data())},
                                             0, values, indices)
                                : job.status();
      std::printf("{\"event\": \"query\", \"queries\": %lld, \"ms\": %.3f, \"ok\": %s}\n", q,
                  Seconds(start) * 1e3, status.ok() ? "true" : "false");
      std::fflush(stdout);
    }
    return 0;
  }
  size_t pos = 0;
  while (pos < queries_list.size()) {
    size_t comma = queries_list.find(',', pos);
    if (comma == std::string::npos) comma = queries_list.size();
    const int64_t q = std::atoll(queries_list.substr(pos, comma - pos).c_str());
    pos = comma + 1;
    std::vector<float> a(q * d);
    for (float& v : a) v = dist(gen);
    const simserve::kernels::Shape shape{1, q, m, d};
    const simserve::kernels::Options options{.precision = precision, .top_k = k};
    std::vector<std::byte> values(q * k * 4);
    std::vector<int32_t> indices(q * k);
    std::vector<double> times;
    for (int r = 0; r < rounds + 1; ++r) {
      const auto start = std::chrono::steady_clock::now();
      auto job = (*engine)->Prepare(shape, options, **gallery);
      absl::Status status = job.ok()
                                ? ComputeAll(**job, {reinterpret_cast<const std::byte*>(a.data())},
                                             0, values, indices)
                                : job.status();
      if (!status.ok()) {
        std::fprintf(stderr, "%s\n", status.ToString().c_str());
        return 1;
      }
      if (r > 0) times.push_back(Seconds(start));  // the first round creates primitives
    }
    std::printf(
        "{\"event\": \"query\", \"queries\": %lld, \"k\": %lld, \"storage\": \"%s\", "
        "\"median_ms\": %.3f, \"min_ms\": %.3f}\n",
        static_cast<long long>(q), static_cast<long long>(k), storage_name.c_str(),
        Median(times) * 1e3, *std::min_element(times.begin(), times.end()) * 1e3);
    std::fflush(stdout);
  }
  return 0;
}
