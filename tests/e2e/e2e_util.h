// Helpers shared by the server end-to-end tests: request builders, a double-precision
// reference implementation of every metric, output decoding and small RPC drivers.
#ifndef SIMSERVE_TESTS_E2E_E2E_UTIL_H_
#define SIMSERVE_TESTS_E2E_E2E_UTIL_H_

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "kernels/dtype.h"
#include "server/config.h"
#include "simserve/v1/similarity.grpc.pb.h"

namespace simserve::e2e {

// A one-shot event on std::mutex (visible to TSan, unlike the system Abseil's Notification).
class Event {
 public:
  void Notify() {
    std::lock_guard<std::mutex> lock(mu_);
    set_ = true;
    cv_.notify_all();
  }
  void WaitForNotification() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return set_; });
  }
  bool HasBeenNotified() {
    std::lock_guard<std::mutex> lock(mu_);
    return set_;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool set_ = false;
};

// Inputs of one problem in float32, C order.
// A light in-process server for tests: ephemeral loopback port, no metrics port, one worker
// with one OpenMP thread (the machine is shared), no warm-up.
inline ServerConfig TestServerConfig() {
  ServerConfig c;
  c.listen = "127.0.0.1:0";
  c.metrics_listen = "";
  c.compute.workers = 1;
  c.compute.threads_per_worker = 1;
  c.compute.warmup = false;
  c.drain_grace = absl::Seconds(5);
  return c;
}

struct Problem {
  int64_t batch = 1, n = 1, m = 1, d = 1;
  std::vector<float> a;
  std::vector<float> b;
};

// Uniform [-1, 1) values; row `zero_row` of A (if >= 0) is all zeros in every batch entry.
inline Problem RandomProblem(int64_t batch, int64_t n, int64_t m, int64_t d, uint32_t seed,
                             int64_t zero_row = -1) {
  Problem p{batch, n, m, d, std::vector<float>(batch * n * d), std::vector<float>(batch * m * d)};
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-1.0F, 1.0F);
  for (float& x : p.a) x = dist(rng);
  for (float& x : p.b) x = dist(rng);
  if (zero_row >= 0) {
    for (int64_t k = 0; k < batch; ++k) {
      std::fill_n(p.a.begin() + (k * n + zero_row) * d, d, 0.0F);
    }
  }
  return p;
}

inline std::string Bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

inline void SetTensor(v1::Tensor* t, const std::vector<int64_t>& shape,
                      const std::vector<float>* data) {
  for (int64_t dim : shape) t->add_shape(dim);
  t->set_dtype(v1::FLOAT32);
  if (data != nullptr) t->set_raw(Bytes(*data));
}

// A ComputeRequest for `p`; 3D unless `two_d` (then batch must be 1). Without data when
// `with_data` is false (an upload header).
inline v1::ComputeRequest MakeRequest(const Problem& p, v1::Metric metric,
                                      v1::DataType out = v1::FLOAT32, uint32_t top_k = 0,
                                      bool two_d = false, bool with_data = true) {
  v1::ComputeRequest r;
  r.set_metric(metric);
  r.set_output_dtype(out);
  r.set_top_k(top_k);
  if (two_d) {
    SetTensor(r.mutable_a(), {p.n, p.d}, with_data ? &p.a : nullptr);
    SetTensor(r.mutable_b(), {p.m, p.d}, with_data ? &p.b : nullptr);
  } else {
    SetTensor(r.mutable_a(), {p.batch, p.n, p.d}, with_data ? &p.a : nullptr);
    SetTensor(r.mutable_b(), {p.batch, p.m, p.d}, with_data ? &p.b : nullptr);
  }
  return r;
}

// Reference S[k][i][j] in double precision, written independently of the kernel.
inline std::vector<double> Reference(const Problem& p, v1::Metric metric, double epsilon = 0) {
  std::vector<double> s(p.batch * p.n * p.m);
  for (int64_t k = 0; k < p.batch; ++k) {
    for (int64_t i = 0; i < p.n; ++i) {
      const float* a = &p.a[(k * p.n + i) * p.d];
      for (int64_t j = 0; j < p.m; ++j) {
        const float* b = &p.b[(k * p.m + j) * p.d];
        double dot = 0, aa = 0, bb = 0, dist = 0;
        for (int64_t x = 0; x < p.d; ++x) {
          dot += double{a[x]} * b[x];
          aa += double{a[x]} * a[x];
          bb += double{b[x]} * b[x];
          dist += (double{a[x]} - b[x]) * (double{a[x]} - b[x]);
        }
        double v = 0;
        switch (metric) {
          case v1::COSINE:
            if (epsilon > 0) {
              v = dot / (std::sqrt(std::max(aa, epsilon)) * std::sqrt(std::max(bb, epsilon)));
            } else {
              v = (aa == 0 || bb == 0) ? 0.0 : dot / (std::sqrt(aa) * std::sqrt(bb));
            }
            break;
          case v1::DOT:
            v = dot;
            break;
          case v1::EUCLIDEAN:
            v = std::sqrt(dist);
            break;
          default:
            v = dist;
            break;
        }
        s[(k * p.n + i) * p.m + j] = v;
      }
    }
  }
  return s;
}

// Decodes little-endian values of `dtype` to double.
inline std::vector<double> Decode(const std::string& raw, v1::DataType dtype) {
  std::vector<double> out;
  if (dtype == v1::FLOAT32) {
    out.resize(raw.size() / 4);
    for (size_t i = 0; i < out.size(); ++i) {
      float f = 0;
      std::memcpy(&f, raw.data() + 4 * i, 4);
      out[i] = f;
    }
  } else {
    out.resize(raw.size() / 2);
    for (size_t i = 0; i < out.size(); ++i) {
      uint16_t h = 0;
      std::memcpy(&h, raw.data() + 2 * i, 2);
      out[i] = dtype == v1::BFLOAT16 ? kernels::Bf16ToFloat(h) : kernels::F16ToFloat(h);
    }
  }
  return out;
}

inline std::vector<int32_t> DecodeIndices(const std::string& raw) {
  std::vector<int32_t> out(raw.size() / 4);
  if (!out.empty()) std::memcpy(out.data(), raw.data(), raw.size());
  return out;
}

// Allowed |got - want| for a value of magnitude `want` in `dtype`, for inputs in [-1, 1]
// and dimension d (fp32 matmul rounding grows with d and the operands' norms).
inline double Tolerance(double want, v1::DataType dtype, int64_t d) {
  const double rel = dtype == v1::FLOAT32 ? 1e-5 : (dtype == v1::FLOAT16 ? 1e-3 : 8e-3);
  return rel * std::abs(want) + 2e-5 * static_cast<double>(d) + (dtype == v1::FLOAT32 ? 0 : rel);
}

inline bool LargerIsBetter(v1::Metric metric) { return metric == v1::COSINE || metric == v1::DOT; }

// Assembled result of a streaming call.
struct StreamResult {
  grpc::Status status;
  std::vector<int64_t> shape;
  v1::DataType dtype = v1::FLOAT32;
  std::string values;   // all value bytes in C order
  std::string indices;  // all index bytes (top-k)
  std::vector<v1::ComputeChunk> chunks;
  std::multimap<std::string, std::string> trailers;
};

// Appends one chunk, checking the contract: (batch, row) order, exact coverage.
inline std::string AddChunk(StreamResult* r, v1::ComputeChunk chunk, int64_t* next_batch,
                            int64_t* next_row, int64_t n) {
  if (r->chunks.empty()) {
    r->shape.assign(chunk.shape().begin(), chunk.shape().end());
    r->dtype = chunk.dtype();
  } else if (chunk.shape_size() != 0) {
    return "shape repeated on a later chunk";
  }
  if (chunk.batch_index() != *next_batch || chunk.row_offset() != *next_row) {
    return "chunk out of order at batch " + std::to_string(chunk.batch_index()) + " row " +
           std::to_string(chunk.row_offset());
  }
  *next_row += chunk.row_count();
  if (*next_row > n) return "chunk crosses a batch entry";
  if (*next_row == n) {
    *next_row = 0;
    ++*next_batch;
  }
  r->values += chunk.values_raw();
  r->indices += chunk.indices_raw();
  r->chunks.push_back(std::move(chunk));
  return "";
}

inline std::multimap<std::string, std::string> Trailers(const grpc::ClientContext& ctx) {
  std::multimap<std::string, std::string> out;
  for (const auto& [k, v] : ctx.GetServerTrailingMetadata()) {
    out.emplace(std::string(k.data(), k.size()), std::string(v.data(), v.size()));
  }
  return out;
}

// Compares a result with the reference; dense or top-k.
inline void ExpectMatches(const Problem& p, const v1::ComputeRequest& req,
                          const std::vector<int64_t>& shape, const std::string& values,
                          const std::string& indices, v1::DataType dtype) {
  const uint32_t k = req.top_k();
  const int64_t cols = k > 0 ? k : p.m;
  const bool two_d = req.a().shape_size() == 2;
  const std::vector<int64_t> want_shape =
      two_d ? std::vector<int64_t>{p.n, cols} : std::vector<int64_t>{p.batch, p.n, cols};
  ASSERT_EQ(shape, want_shape);
  ASSERT_EQ(dtype, req.output_dtype());
  const std::vector<double> ref = Reference(p, req.metric(), req.epsilon());
  const std::vector<double> got = Decode(values, dtype);
  ASSERT_EQ(static_cast<int64_t>(got.size()), p.batch * p.n * cols);
  int bad = 0;
  std::string first;
  if (k == 0) {
    for (size_t i = 0; i < got.size(); ++i) {
      if (std::abs(got[i] - ref[i]) > Tolerance(ref[i], dtype, p.d) && bad++ == 0) {
        first = "flat " + std::to_string(i) + ": got " + std::to_string(got[i]) + " want " +
                std::to_string(ref[i]);
      }
    }
  } else {
    const std::vector<int32_t> idx = DecodeIndices(indices);
    ASSERT_EQ(idx.size(), got.size());
    for (int64_t row = 0; row < p.batch * p.n; ++row) {
      std::vector<double> sorted(ref.begin() + row * p.m, ref.begin() + (row + 1) * p.m);
      if (LargerIsBetter(req.metric())) {
        std::sort(sorted.rbegin(), sorted.rend());
      } else {
        std::sort(sorted.begin(), sorted.end());
      }
      for (int64_t q = 0; q < cols; ++q) {
        const double g = got[row * cols + q];
        const int32_t j = idx[row * cols + q];
        const bool in_range = j >= 0 && j < p.m;
        if ((!in_range || std::abs(g - sorted[q]) > Tolerance(sorted[q], dtype, p.d) ||
             std::abs(ref[row * p.m + (in_range ? j : 0)] - g) > Tolerance(g, dtype, p.d)) &&
            bad++ == 0) {
          first = "row " + std::to_string(row) + " rank " + std::to_string(q) + ": got " +
                  std::to_string(g) + " at column " + std::to_string(j) + ", want " +
                  std::to_string(sorted[q]);
        }
      }
    }
  }
  EXPECT_EQ(bad, 0) << first;
}

}  // namespace simserve::e2e

#endif  // SIMSERVE_TESTS_E2E_E2E_UTIL_H_
