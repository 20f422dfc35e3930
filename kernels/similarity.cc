// Tile-by-tile similarity on oneDNN. Formulation (measured fastest, see README "Performance"):
// the operands are prepared in cache-sized pieces — B once per batch entry, A once per tile —
// where "prepared" means converted to the compute dtype and, for cosine, scaled to unit length
// (norms accumulated in double, so tiny and huge vectors stay exact). The matmul is then a plain
// 2D product with no post-ops, which oneDNN always serves with its brgemm kernels; distances and
// top-k are a short epilogue over the tile while it is still in cache.
#include "kernels/similarity.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>
#include <numeric>
#include <optional>
#include <string_view>
#include <thread>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/dtype.h"
#include "kernels/row_ops.h"
#include "oneapi/dnnl/dnnl.hpp"

namespace simserve::kernels {

const char* Name(Metric metric) {
  switch (metric) {
    case Metric::kCosine:
      return "cosine";
    case Metric::kDot:
      return "dot";
    case Metric::kEuclidean:
      return "euclidean";
    case Metric::kSquaredEuclidean:
      return "squared_euclidean";
  }
  return "unknown";
}

const char* Name(DataType dtype) {
  switch (dtype) {
    case DataType::kFloat32:
      return "float32";
    case DataType::kBFloat16:
      return "bfloat16";
    case DataType::kFloat16:
      return "float16";
  }
  return "unknown";
}

const char* Name(Precision precision) { return precision == Precision::kFp32 ? "fp32" : "bf16"; }

int64_t MatmulFlops(const Shape& shape) {
  int64_t flops = 2;
  for (const int64_t factor : {shape.batch, shape.n, shape.m, shape.d}) {
    if (factor < 0 || __builtin_mul_overflow(flops, factor, &flops)) return -1;
  }
  return flops;
}

absl::Status ValidateProblem(const Shape& shape, const Options& options) {
  const std::pair<const char*, int64_t> dims[] = {
      {"batch", shape.batch}, {"N", shape.n}, {"M", shape.m}, {"D", shape.d}};
  for (const auto& [name, value] : dims) {
    if (value <= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("dimension ", name, " must be positive, got ", value));
    }
  }
  if (options.top_k < 0 || options.top_k > shape.m) {
    return absl::InvalidArgumentError(
        absl::StrCat("top_k must be between 0 and M=", shape.m, ", got ", options.top_k));
  }
  if (options.top_k > 0 && shape.m > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("top_k needs M to fit int32 column indices");
  }
  if (!std::isfinite(options.epsilon) || options.epsilon < 0.0F) {
    return absl::InvalidArgumentError(
        absl::StrCat("epsilon must be finite and >= 0, got ", options.epsilon));
  }
  return absl::OkStatus();
}

namespace {

using dnnl::memory;

// A 64-byte aligned buffer that only grows; reused across tiles and requests.
class AlignedBuffer {
 public:
  void* Reserve(size_t bytes) {
    if (bytes > capacity_) {
      const size_t rounded = (bytes + 63) / 64 * 64;
      data_.reset(std::aligned_alloc(64, rounded));
      if (data_ == nullptr) throw std::bad_alloc();
      capacity_ = rounded;
    }
    return data_.get();
  }
  size_t capacity() const { return capacity_; }

 private:
  struct Free {
    void operator()(void* p) const { std::free(p); }
  };
  std::unique_ptr<void, Free> data_;
  size_t capacity_ = 0;
};

// Running selection of the k best (value, column) pairs of one row under a strict total
// order: larger values first (smaller for distances), ties to the lower column. Candidates
// are buffered and cut back to the k best when the buffer fills, so a column costs one
// comparison with the current k-th best once the selection is full.
class TopKSelector {
 public:
  void Reset(int64_t k, bool largest) {
    k_ = k;
    largest_ = largest;
    full_ = false;
    entries_.clear();
    capacity_ = std::max<int64_t>(2 * k, k + 256);
    entries_.reserve(std::min<int64_t>(capacity_, 1024));  // grows only for a large k
  }

  // Offers columns [first_column, first_column + count) with values row[0, count).
  void OfferRow(const float* row, int64_t count, int64_t first_column) {
    constexpr int64_t kBlock = 16;
    int64_t j = 0;
    for (; j + kBlock <= count; j += kBlock) {
      if (full_) {  // branch-free test of 16 values first (vectorised)
        const float threshold = threshold_.first;
        bool any = false;
        for (int64_t u = 0; u < kBlock; ++u) {
          any |= largest_ ? row[j + u] >= threshold : row[j + u] <= threshold;
        }
        if (!any) continue;
      }
      for (int64_t u = 0; u < kBlock; ++u) Offer(row[j + u], first_column + j + u);
    }
    for (; j < count; ++j) Offer(row[j], first_column + j);
  }

  void Offer(float value, int64_t column) {
    const Entry entry{value, static_cast<int32_t>(column)};
    if (full_ && !Better(entry, threshold_)) return;
    entries_.push_back(entry);
    if (static_cast<int64_t>(entries_.size()) >= capacity_) Compact();
  }

  // Offers everything `other` holds.
  void Merge(const TopKSelector& other) {
    for (const Entry& e : other.entries_) Offer(e.first, e.second);
  }

  // Heap bytes the candidate buffer holds.
  size_t capacity_bytes() const { return entries_.capacity() * sizeof(Entry); }

  // The selection, best first (at most k entries).
  const std::vector<std::pair<float, int32_t>>& Finish() {
    Compact();
    std::sort(entries_.begin(), entries_.end(), Order());
    return entries_;
  }

 private:
  using Entry = std::pair<float, int32_t>;
  // A strict total order; NaN (an overflowing distance) ranks last.
  bool Better(const Entry& x, const Entry& y) const {
    const bool x_nan = std::isnan(x.first);
    const bool y_nan = std::isnan(y.first);
    if (x_nan != y_nan) return y_nan;
    if (!x_nan && x.first != y.first) return largest_ ? x.first > y.first : x.first < y.first;
    return x.second < y.second;
  }
  struct ByOrder {
    const TopKSelector* selector;
    bool operator()(const Entry& x, const Entry& y) const { return selector->Better(x, y); }
  };
  ByOrder Order() const { return ByOrder{this}; }
  void Compact() {
    if (static_cast<int64_t>(entries_.size()) < k_) return;
    std::nth_element(entries_.begin(), entries_.begin() + (k_ - 1), entries_.end(), Order());
    entries_.resize(k_);
    threshold_ = entries_[k_ - 1];  // the k-th best so far: worse candidates never enter
    full_ = true;
  }

  int64_t k_ = 1;
  bool largest_ = true;
  bool full_ = false;
  int64_t capacity_ = 0;
  Entry threshold_{0.0F, 0};
  std::vector<Entry> entries_;
};

// Working memory of one OpenMP thread in a gallery tile.
struct ThreadScratch {
  AlignedBuffer product;    // float32 product of one row block x column block
  AlignedBuffer b_operand;  // a column block of the gallery converted to the compute dtype
  std::vector<TopKSelector> selectors;  // one per row of the row block
  std::optional<dnnl::stream> stream;
  size_t Bytes() const {
    size_t bytes = product.capacity() + b_operand.capacity();
    for (const TopKSelector& s : selectors) bytes += s.capacity_bytes();
    return bytes;
  }
};

// Per-job working memory, pooled by the engine.
struct Scratch {
  AlignedBuffer a_operand;  // one tile of A in the compute dtype
  AlignedBuffer b_operand;  // one batch entry of B in the compute dtype
  AlignedBuffer tile;       // float32 matmul output of one tile
  std::vector<float> a_sq_norms;
  std::vector<float> b_sq_norms;
  std::vector<int32_t> order;          // top-k candidates, per thread
  std::vector<ThreadScratch> threads;  // gallery tiles, per OpenMP thread
  size_t Bytes() const {
    size_t bytes = a_operand.capacity() + b_operand.capacity() + tile.capacity() +
                   (a_sq_norms.capacity() + b_sq_norms.capacity() + order.capacity()) * 4;
    for (const ThreadScratch& t : threads) bytes += t.Bytes();
    return bytes;
  }
};

// Gallery tiles: rows of A per step (each step reads the gallery once), and columns of the
// gallery per block (per-thread product memory: rows x columns floats, whatever m is).
constexpr int64_t kGalleryRowBlock = 256;
constexpr int64_t kGalleryMatmulColumns = 4096;
// Bytes of one converted column block of the gallery (bounds the columns for a large d).
constexpr int64_t kGalleryMatmulBlockBytes = int64_t{16} << 20;
// Bytes of the running top-k candidates of one row block, all threads (bounds the rows per
// step for a large k).
constexpr int64_t kGallerySelectorBytes = int64_t{64} << 20;
// Up to this many rows per step the gallery is scanned by dot_rows (reading B is the whole
// cost; converted on load, no scratch copy), in blocks that stay in L2 for the rows' passes.
constexpr int64_t kGalleryScanMaxRows = 8;
constexpr int64_t kGalleryScanBlockBytes = int64_t{512} << 10;

// Scratch sets larger than this are freed instead of pooled, bounding idle memory.
constexpr size_t kMaxPooledScratchBytes = size_t{256} << 20;

void StoreElement(float value, DataType dtype, std::byte* base, int64_t index) {
  switch (dtype) {
    case DataType::kFloat32:
      std::memcpy(base + index * 4, &value, 4);
      return;
    case DataType::kBFloat16: {
      const uint16_t bits = FloatToBf16(value);
      std::memcpy(base + index * 2, &bits, 2);
      return;
    }
    case DataType::kFloat16: {
      const uint16_t bits = FloatToF16(value);
      std::memcpy(base + index * 2, &bits, 2);
      return;
    }
  }
}

bool IsDistance(Metric metric) {
  return metric == Metric::kEuclidean || metric == Metric::kSquaredEuclidean;
}

// Primitives are cached per thread: oneDNN's default build does not allow one primitive to
// execute on two threads at once (measured: wrong results when two workers shared one), nor
// to migrate between threads.
struct MatmulKey {
  int64_t rows;
  int64_t m;
  int64_t d;
  bool bf16;
  std::thread::id thread = std::this_thread::get_id();
  // NOLINTNEXTLINE(modernize-use-nullptr): clang-tidy 14 misreads the defaulted <=>.
  auto operator<=>(const MatmulKey&) const = default;
};

struct CachedMatmul {
  dnnl::matmul primitive;
  std::string implementation;
};

}  // namespace

class SimilarityEngine::Impl {
 public:
  explicit Impl(const EngineConfig& config)
      : config_(config),
        engine_(dnnl::engine::kind::cpu, 0),
        threads_(config.threads_per_call > 0 ? config.threads_per_call : omp_get_num_procs()),
        bf16_matmul_(ProbeBf16Matmul()) {}

  int threads() const { return threads_; }
  // Whether Precision::kBf16 runs bf16 operands. CPUs without a bf16 matmul kernel in
  // oneDNN (e.g. AVX2-only ones, where oneDNN offers none or only `ref`) compute such
  // requests in float32: at least as accurate, never the reference implementation.
  bool UseBf16(Precision precision) const { return precision == Precision::kBf16 && bf16_matmul_; }
  const dnnl::engine& engine() const { return engine_; }

  // Returns the cached primitive for a tile shape, creating it on a miss. Refuses reference
  // implementations: they are orders of magnitude slower than the brgemm kernels.
  absl::StatusOr<std::shared_ptr<const CachedMatmul>> GetMatmul(const MatmulKey& key) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = cache_.find(key);
      if (it != cache_.end()) return it->second;
    }
    const auto dt = key.bf16 ? memory::data_type::bf16 : memory::data_type::f32;
    const memory::desc src_md({key.rows, key.d}, dt, memory::format_tag::ab);
    const memory::desc weights_md({key.d, key.m}, dt, memory::format_tag::ba);
    const memory::desc dst_md({key.rows, key.m}, memory::data_type::f32, memory::format_tag::ab);
    auto entry = std::make_shared<CachedMatmul>();
    try {
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, weights_md, dst_md),
                                            engine_);
      entry->implementation = pd.impl_info_str();
      if (entry->implementation.rfind("ref", 0) == 0) {
        return absl::InternalError(absl::StrCat("oneDNN offers only the reference matmul '",
                                                entry->implementation, "' for ", key.rows, "x",
                                                key.d, " by ", key.d, "x", key.m));
      }
      entry->primitive = dnnl::matmul(pd);
    } catch (const dnnl::error& e) {
      return absl::InternalError(absl::StrCat("oneDNN matmul creation failed: ", e.what()));
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (cache_.size() >= config_.primitive_cache_capacity) cache_.erase(cache_.begin());
    cache_.emplace(key, entry);
    return entry;
  }

  // True if oneDNN has a non-reference bf16 matmul on this CPU.
  bool ProbeBf16Matmul() const {
    try {
      const memory::desc src_md({64, 64}, memory::data_type::bf16, memory::format_tag::ab);
      const memory::desc weights_md({64, 64}, memory::data_type::bf16, memory::format_tag::ba);
      const memory::desc dst_md({64, 64}, memory::data_type::f32, memory::format_tag::ab);
      const dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, weights_md, dst_md),
                                            engine_);
      return std::string(pd.impl_info_str()).rfind("ref", 0) != 0;
    } catch (const dnnl::error&) {
      return false;
    }
  }

  std::unique_ptr<Scratch> AcquireScratch() {
    std::lock_guard<std::mutex> lock(mutex_);
    if (scratch_pool_.empty()) return std::make_unique<Scratch>();
    auto scratch = std::move(scratch_pool_.back());
    scratch_pool_.pop_back();
    return scratch;
  }

  void ReleaseScratch(std::unique_ptr<Scratch> scratch) {
    if (scratch->Bytes() > kMaxPooledScratchBytes) return;
    std::lock_guard<std::mutex> lock(mutex_);
    scratch_pool_.push_back(std::move(scratch));
  }

 private:
  const EngineConfig config_;
  dnnl::engine engine_;
  const int threads_;
  const bool bf16_matmul_;  // declared after engine_: probed with it
  std::mutex mutex_;
  std::map<MatmulKey, std::shared_ptr<const CachedMatmul>> cache_;  // guarded by mutex_
  std::vector<std::unique_ptr<Scratch>> scratch_pool_;              // guarded by mutex_
};

class SimilarityJob::Impl {
 public:
  Impl(SimilarityEngine::Impl& engine, const Shape& shape, const Options& options,
       ConstTensorView b)
      : engine_(engine),
        shape_(shape),
        options_(options),
        b_(b),
        scratch_(engine.AcquireScratch()),
        stream_(engine.engine()) {}

  Impl(SimilarityEngine::Impl& engine, const Shape& shape, const Options& options,
       const PreparedGallery& gallery)
      : Impl(engine, shape, options, ConstTensorView{}) {
    gallery_ = &gallery;
  }

  ~Impl() { engine_.ReleaseScratch(std::move(scratch_)); }

  const Shape& shape() const { return shape_; }
  const Options& options() const { return options_; }
  int64_t output_cols() const { return options_.top_k > 0 ? options_.top_k : shape_.m; }
  size_t ValueBytes(int64_t rows) const {
    return static_cast<size_t>(rows * output_cols()) * SizeOf(options_.output_dtype);
  }

  absl::Status ComputeTile(int64_t batch, int64_t row_begin, int64_t rows, ConstTensorView a_rows,
                           std::span<std::byte> values_out, std::span<int32_t> indices_out) {
    if (batch < 0 || batch >= shape_.batch || row_begin < 0 || rows <= 0 ||
        row_begin + rows > shape_.n) {
      return absl::InvalidArgumentError(absl::StrCat("tile batch ", batch, " rows [", row_begin,
                                                     ", ", row_begin + rows,
                                                     ") is outside the problem"));
    }
    if (values_out.size() != ValueBytes(rows)) {
      return absl::InvalidArgumentError(absl::StrCat("values_out holds ", values_out.size(),
                                                     " bytes, the tile needs ", ValueBytes(rows)));
    }
    const size_t want_indices = options_.top_k > 0 ? static_cast<size_t>(rows * options_.top_k) : 0;
    if (indices_out.size() != want_indices) {
      return absl::InvalidArgumentError(absl::StrCat("indices_out holds ", indices_out.size(),
                                                     " entries, the tile needs ", want_indices));
    }
    const int threads = ThreadsForTile(rows);
    if (omp_get_max_threads() != threads) omp_set_num_threads(threads);
    try {
      if (gallery_ != nullptr) {
        return ComputeGalleryTile(batch, rows, a_rows, values_out, indices_out);
      }
      return ComputeTileUnchecked(batch, rows, a_rows, values_out, indices_out);
    } catch (const dnnl::error& e) {
      return absl::InternalError(absl::StrCat("oneDNN matmul failed: ", e.what()));
    } catch (const std::bad_alloc&) {
      return absl::ResourceExhaustedError("out of memory for the kernel's scratch buffers");
    }
  }

 private:
  bool bf16() const { return engine_.UseBf16(options_.precision); }

  // Small tiles run on one thread: waking an OpenMP team costs more than it saves below a few
  // MFLOP per thread, and on a busy machine a spinning team can cost milliseconds.
  int ThreadsForTile(int64_t rows) const {
    constexpr int64_t kMinFlopsPerThread = int64_t{4} << 20;
    const int64_t flops = 2 * rows * shape_.m * shape_.d;
    return static_cast<int>(std::clamp<int64_t>(flops / kMinFlopsPerThread, 1, engine_.threads()));
  }

  RowScaling scaling() const {
    if (options_.metric != Metric::kCosine) return RowScaling::kNone;
    return options_.epsilon > 0.0F ? RowScaling::kUnitLengthClamped : RowScaling::kUnitLength;
  }

  // True when an operand can feed the matmul as it is (no scaling, no conversion).
  bool UsableInPlace(DataType dtype) const {
    return scaling() == RowScaling::kNone && dtype == DataType::kFloat32 && !bf16();
  }

  // The B operand of `batch`, prepared once per batch entry.
  const void* BOperand(int64_t batch) {
    const int64_t elements = shape_.m * shape_.d;
    const ConstTensorView b_batch{b_.data + batch * elements * SizeOf(b_.dtype), b_.dtype};
    const bool distance = IsDistance(options_.metric);
    if (distance) scratch_->b_sq_norms.resize(shape_.m);
    float* sq_norms = distance ? scratch_->b_sq_norms.data() : nullptr;
    if (UsableInPlace(b_.dtype)) {
      if (distance && prepared_batch_ != batch) {
        ops_.squared_norms(b_batch, shape_.m, shape_.d, sq_norms);
      }
      prepared_batch_ = batch;
      return b_batch.data;
    }
    void* dst = scratch_->b_operand.Reserve(elements * (bf16() ? 2 : 4));
    if (prepared_batch_ != batch) {
      ops_.prepare_rows(b_batch, shape_.m, shape_.d, scaling(), options_.epsilon, bf16(), dst,
                        sq_norms);
      prepared_batch_ = batch;
    }
    return dst;
  }

  absl::Status ComputeTileUnchecked(int64_t batch, int64_t rows, ConstTensorView a_rows,
                                    std::span<std::byte> values_out,
                                    std::span<int32_t> indices_out) {
    const int64_t m = shape_.m;
    const int64_t d = shape_.d;
    const bool distance = IsDistance(options_.metric);
    const void* b_operand = BOperand(batch);

    if (distance) scratch_->a_sq_norms.resize(rows);
    float* a_sq_norms = distance ? scratch_->a_sq_norms.data() : nullptr;
    const void* a_operand = a_rows.data;
    if (UsableInPlace(a_rows.dtype)) {
      if (distance) ops_.squared_norms(a_rows, rows, d, a_sq_norms);
    } else {
      void* dst = scratch_->a_operand.Reserve(rows * d * (bf16() ? 2 : 4));
      ops_.prepare_rows(a_rows, rows, d, scaling(), options_.epsilon, bf16(), dst, a_sq_norms);
      a_operand = dst;
    }

    absl::StatusOr<std::shared_ptr<const CachedMatmul>> matmul =
        engine_.GetMatmul({rows, m, d, bf16()});
    if (!matmul.ok()) return matmul.status();

    // Dense float32 similarities go straight into the caller's buffer; everything else needs
    // an epilogue over a float32 tile.
    const bool direct =
        !distance && options_.top_k == 0 && options_.output_dtype == DataType::kFloat32;
    float* product = direct ? reinterpret_cast<float*>(values_out.data())
                            : static_cast<float*>(scratch_->tile.Reserve(rows * m * 4));

    const auto dt = bf16() ? memory::data_type::bf16 : memory::data_type::f32;
    const dnnl::engine& eng = engine_.engine();
    memory a_mem({{rows, d}, dt, memory::format_tag::ab}, eng, const_cast<void*>(a_operand));
    memory b_mem({{d, m}, dt, memory::format_tag::ba}, eng, const_cast<void*>(b_operand));
    memory dst_mem({{rows, m}, memory::data_type::f32, memory::format_tag::ab}, eng, product);
    (*matmul)->primitive.execute(
        stream_, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, dst_mem}});
    stream_.wait();

    if (direct) return absl::OkStatus();
    if (distance) {
      ops_.to_distances(product, rows, m, a_sq_norms, scratch_->b_sq_norms.data(),
                        options_.metric == Metric::kEuclidean);
    }
    if (options_.top_k > 0) {
      SelectTopK(product, rows, values_out, indices_out);
    } else {
      ops_.convert_floats(product, rows * m, options_.output_dtype, values_out.data());
    }
    return absl::OkStatus();
  }

  // Per row the k best columns: largest for similarities, smallest for distances, ties to the
  // lower column index (a strict total order, so the selection is deterministic).
  void SelectTopK(const float* tile, int64_t rows, std::span<std::byte> values_out,
                  std::span<int32_t> indices_out) {
    const int64_t m = shape_.m;
    const int64_t k = options_.top_k;
    const bool largest = !IsDistance(options_.metric);
    const int threads = omp_get_max_threads();
    scratch_->order.resize(static_cast<size_t>(m) * threads);
    int32_t* order_base = scratch_->order.data();
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; ++r) {
      const float* row = tile + r * m;
      int32_t* order = order_base + static_cast<int64_t>(omp_get_thread_num()) * m;
      if (k <= kSmallK) {
        SelectSmallK(row, m, k, largest, order);
      } else {
        std::iota(order, order + m, 0);
        auto better = [row, largest](int32_t x, int32_t y) {
          if (row[x] != row[y]) return largest ? row[x] > row[y] : row[x] < row[y];
          return x < y;
        };
        std::partial_sort(order, order + k, order + m, better);
      }
      for (int64_t j = 0; j < k; ++j) {
        StoreElement(row[order[j]], options_.output_dtype, values_out.data(), r * k + j);
        indices_out[r * k + j] = order[j];
      }
    }
  }

  // Up to this k, one scan with a sorted list of the k best so far beats a partial sort:
  // most columns are rejected by a single comparison with the current k-th best.
  static constexpr int64_t kSmallK = 64;

  // Writes the k best column indices of `row`, best first, to order[0, k).
  static void SelectSmallK(const float* row, int64_t m, int64_t k, bool largest, int32_t* order) {
    if (largest) {
      SelectSmallKTyped<true>(row, m, k, order);
    } else {
      SelectSmallKTyped<false>(row, m, k, order);
    }
  }

  template <bool kLargest>
  static void SelectSmallKTyped(const float* row, int64_t m, int64_t k, int32_t* order) {
    // Columns arrive in increasing index order, so a newcomer never wins a tie: it must be
    // strictly better than an entry to move past it.
    auto strictly_better = [](float x, float y) { return kLargest ? x > y : x < y; };
    float best[kSmallK] = {};
    int64_t count = 0;
    for (; count < k; ++count) {  // the first k columns, insertion-sorted
      const float v = row[count];
      int64_t pos = count;
      for (; pos > 0 && strictly_better(v, best[pos - 1]); --pos) {
        best[pos] = best[pos - 1];
        order[pos] = order[pos - 1];
      }
      best[pos] = v;
      order[pos] = static_cast<int32_t>(count);
    }
    float threshold = best[k - 1];
    auto consider = [&](int64_t j) {
      const float v = row[j];
      if (!strictly_better(v, threshold)) return;
      int64_t pos = k - 1;
      for (; pos > 0 && strictly_better(v, best[pos - 1]); --pos) {
        best[pos] = best[pos - 1];
        order[pos] = order[pos - 1];
      }
      best[pos] = v;
      order[pos] = static_cast<int32_t>(j);
      threshold = best[k - 1];
    };
    // Blocks of 16 are tested branch-free first (vectorised); on random data almost every
    // block is rejected whole once the list has filled with good candidates.
    constexpr int64_t kBlock = 16;
    int64_t j = k;
    for (; j + kBlock <= m; j += kBlock) {
      bool any = false;
      for (int64_t u = 0; u < kBlock; ++u) any |= strictly_better(row[j + u], threshold);
      if (!any) continue;
      for (int64_t u = 0; u < kBlock; ++u) consider(j + u);
    }
    for (; j < m; ++j) consider(j);
  }

  // A tile against a prepared gallery: the gallery's unit rows are used as they are (or
  // converted per column block when the matmul needs another dtype), the product of each
  // block is rescaled by the gallery's norms as the metric needs, and top-k runs over the
  // blocks with a running selection, so memory does not grow with m.
  absl::Status ComputeGalleryTile(int64_t batch, int64_t rows, ConstTensorView a_rows,
                                  std::span<std::byte> values_out, std::span<int32_t> indices_out) {
    const PreparedGallery& gallery = *gallery_;
    const int64_t entry = gallery.shape().entries == 1 ? 0 : batch;
    const int64_t m = shape_.m;
    const int64_t d = shape_.d;
    const int64_t k = options_.top_k;
    const Metric metric = options_.metric;
    const bool distance = IsDistance(metric);
    const DataType storage = gallery.storage_dtype();
    const size_t storage_size = SizeOf(storage);
    const bool scan = rows <= kGalleryScanMaxRows;
    // The matmul honours the precision: bf16 operands only for Precision::kBf16 (then
    // BFLOAT16 storage feeds it as it is; FLOAT32 and FLOAT16 storage are converted per
    // block). The scan keeps A in float32 whatever the precision.
    const bool bf16_matmul = !scan && bf16();
    const DataType compute = bf16_matmul ? DataType::kBFloat16 : DataType::kFloat32;

    // A: unit (or clamped) rows for cosine, as is otherwise; squared norms for distances.
    if (distance) scratch_->a_sq_norms.resize(rows);
    float* a_sq = distance ? scratch_->a_sq_norms.data() : nullptr;
    const std::byte* a_operand = a_rows.data;
    if (scaling() == RowScaling::kNone && a_rows.dtype == compute) {
      if (distance) ops_.squared_norms(a_rows, rows, d, a_sq);
    } else {
      void* dst = scratch_->a_operand.Reserve(rows * d * SizeOf(compute));
      ops_.prepare_rows(a_rows, rows, d, scaling(), options_.epsilon, bf16_matmul, dst, a_sq);
      a_operand = static_cast<const std::byte*>(dst);
    }

    // Column scale of the unit-row product: ||b|| for dot and distances, the Keras clamp's
    // min(1, ||b|| / sqrt(epsilon)) for cosine with epsilon, none for plain cosine.
    const float* norms = gallery.norms(entry);
    const float* b_sq = gallery.sq_norms(entry);
    const bool scale_by_norm = metric == Metric::kDot || distance;
    const bool clamp = metric == Metric::kCosine && options_.epsilon > 0.0F;
    const float inv_sqrt_epsilon = clamp ? 1.0F / std::sqrt(options_.epsilon) : 0.0F;

    const int threads = omp_get_max_threads();
    if (static_cast<int>(scratch_->threads.size()) < threads) scratch_->threads.resize(threads);
    // Column blocks sized in bytes: per-thread memory (product, converted block) is bounded
    // whatever m and d are.
    const int64_t block_cols =
        scan ? std::max<int64_t>(64,
                                 kGalleryScanBlockBytes / (d * static_cast<int64_t>(storage_size)))
             : std::clamp<int64_t>(kGalleryMatmulBlockBytes / (d * 4), 64, kGalleryMatmulColumns);
    // Rows per step: the running top-k buffers 2k candidates per row and thread.
    const int64_t row_block =
        k > 0 ? std::clamp<int64_t>(
                    kGallerySelectorBytes / (threads * std::max<int64_t>(2 * k, k + 256) * 8), 1,
                    kGalleryRowBlock)
              : kGalleryRowBlock;
    const int64_t blocks = (m + block_cols - 1) / block_cols;
    const std::byte* unit_rows = gallery.unit_rows(entry);
    const size_t out_size = SizeOf(options_.output_dtype);

    // One block's product -> the metric (norm scaling, distances) -> top-k or the output.
    auto epilogue = [&](ThreadScratch& ts, float* product, int64_t rb, int64_t cols, int64_t r0,
                        int64_t c0) {
      if (scale_by_norm || clamp) {
        for (int64_t r = 0; r < rb; ++r) {
          float* row = product + r * cols;
          if (scale_by_norm) {
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) row[c] *= norms[c0 + c];
          } else {
#pragma omp simd
            for (int64_t c = 0; c < cols; ++c) {
              row[c] *= std::min(1.0F, norms[c0 + c] * inv_sqrt_epsilon);
            }
          }
        }
      }
      if (distance) {
        ops_.to_distances(product, rb, cols, a_sq + r0, b_sq + c0, metric == Metric::kEuclidean);
      }
      if (k > 0) {
        for (int64_t r = 0; r < rb; ++r) ts.selectors[r].OfferRow(product + r * cols, cols, c0);
      } else {
        for (int64_t r = 0; r < rb; ++r) {
          ops_.convert_floats(product + r * cols, cols, options_.output_dtype,
                              values_out.data() + ((r0 + r) * m + c0) * out_size);
        }
      }
    };

    for (int64_t r0 = 0; r0 < rows; r0 += row_block) {
      const int64_t rb = std::min(row_block, rows - r0);
      const std::byte* a_block = a_operand + r0 * d * SizeOf(compute);
      if (k > 0) {
        for (int t = 0; t < threads; ++t) {
          auto& selectors = scratch_->threads[t].selectors;
          selectors.resize(rb);
          for (TopKSelector& s : selectors) s.Reset(k, !distance);
        }
      }
      absl::Status error;
      std::mutex error_mutex;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        // No exception may leave an OpenMP region: each block's errors become the tile's
        // status (the first one wins) and the remaining blocks are skipped.
        auto fail = [&](absl::Status status) {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (error.ok()) error = std::move(status);
        };
        {
          std::lock_guard<std::mutex> lock(error_mutex);
          if (!error.ok()) continue;
        }
        try {
          omp_set_num_threads(1);  // the loops and the matmul below run on this thread only
          ThreadScratch& ts = scratch_->threads[omp_get_thread_num()];
          const int64_t c0 = blk * block_cols;
          const int64_t cols = std::min(block_cols, m - c0);
          auto* product = static_cast<float*>(ts.product.Reserve(rb * cols * 4));
          const std::byte* b_block = unit_rows + c0 * d * storage_size;
          if (scan) {
            ops_.dot_rows(reinterpret_cast<const float*>(a_block), rb, d, {b_block, storage}, cols,
                          product, cols);
          } else {
            absl::Status status =
                BlockMatmul(ts, a_block, rb, {b_block, storage}, cols, compute, product);
            if (!status.ok()) {
              fail(std::move(status));
              continue;
            }
          }
          epilogue(ts, product, rb, cols, r0, c0);
        } catch (const dnnl::error& e) {
          fail(absl::InternalError(absl::StrCat("oneDNN matmul failed: ", e.what())));
        } catch (const std::bad_alloc&) {
          fail(absl::ResourceExhaustedError("out of memory for the kernel's scratch buffers"));
        }
      }
      if (!error.ok()) return error;
      if (k > 0) {
        for (int64_t r = 0; r < rb; ++r) {
          TopKSelector& first = scratch_->threads[0].selectors[r];
          for (int t = 1; t < threads; ++t) first.Merge(scratch_->threads[t].selectors[r]);
          const auto& best = first.Finish();
          for (int64_t j = 0; j < k; ++j) {
            StoreElement(best[j].first, options_.output_dtype, values_out.data(), (r0 + r) * k + j);
            indices_out[(r0 + r) * k + j] = best[j].second;
          }
        }
      }
    }
    return absl::OkStatus();
  }

  // product (rows x cols, float32) = A block x B block^T on the calling thread, converting
  // the B block to `compute` first when it is stored in another dtype.
  absl::Status BlockMatmul(ThreadScratch& ts, const std::byte* a_block, int64_t rows,
                           ConstTensorView b_block, int64_t cols, DataType compute,
                           float* product) {
    const int64_t d = shape_.d;
    const bool bf16_compute = compute == DataType::kBFloat16;
    const void* b_operand = b_block.data;
    if (b_block.dtype != compute) {
      void* dst = ts.b_operand.Reserve(cols * d * SizeOf(compute));
      ops_.prepare_rows(b_block, cols, d, RowScaling::kNone, 0.0F, bf16_compute, dst, nullptr);
      b_operand = dst;
    }
    absl::StatusOr<std::shared_ptr<const CachedMatmul>> matmul =
        engine_.GetMatmul({rows, cols, d, bf16_compute});
    if (!matmul.ok()) return matmul.status();
    const dnnl::engine& eng = engine_.engine();
    if (!ts.stream.has_value()) ts.stream.emplace(eng);
    const auto dt = bf16_compute ? memory::data_type::bf16 : memory::data_type::f32;
    memory a_mem({{rows, d}, dt, memory::format_tag::ab}, eng, const_cast<std::byte*>(a_block));
    memory b_mem({{d, cols}, dt, memory::format_tag::ba}, eng, const_cast<void*>(b_operand));
    memory dst_mem({{rows, cols}, memory::data_type::f32, memory::format_tag::ab}, eng, product);
    (*matmul)->primitive.execute(
        *ts.stream, {{DNNL_ARG_SRC, a_mem}, {DNNL_ARG_WEIGHTS, b_mem}, {DNNL_ARG_DST, dst_mem}});
    ts.stream->wait();
    return absl::OkStatus();
  }

  SimilarityEngine::Impl& engine_;
  const RowOps& ops_ = BestRowOps();
  const Shape shape_;
  const Options options_;
  const ConstTensorView b_;
  const PreparedGallery* gallery_ = nullptr;
  std::unique_ptr<Scratch> scratch_;
  dnnl::stream stream_;
  int64_t prepared_batch_ = -1;
};

// ---- SimilarityEngine ----

SimilarityEngine::SimilarityEngine(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SimilarityEngine::~SimilarityEngine() = default;

absl::StatusOr<std::unique_ptr<SimilarityEngine>> SimilarityEngine::Create(
    const EngineConfig& config) {
  if (config.threads_per_call < 0) {
    return absl::InvalidArgumentError("threads_per_call must be >= 0");
  }
  try {
    return std::unique_ptr<SimilarityEngine>(new SimilarityEngine(std::make_unique<Impl>(config)));
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("cannot create the oneDNN CPU engine: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<SimilarityJob>> SimilarityEngine::Prepare(const Shape& shape,
                                                                         const Options& options,
                                                                         ConstTensorView b) {
  if (absl::Status status = ValidateProblem(shape, options); !status.ok()) return status;
  if (b.data == nullptr) return absl::InvalidArgumentError("B has no data");
  try {
    return std::unique_ptr<SimilarityJob>(
        new SimilarityJob(std::make_unique<SimilarityJob::Impl>(*impl_, shape, options, b)));
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("cannot create a oneDNN stream: ", e.what()));
  }
}

absl::StatusOr<std::unique_ptr<SimilarityJob>> SimilarityEngine::Prepare(
    const Shape& shape, const Options& options, const PreparedGallery& gallery) {
  if (absl::Status status = ValidateProblem(shape, options); !status.ok()) return status;
  const GalleryShape& g = gallery.shape();
  if (g.m != shape.m || g.d != shape.d || (g.entries != 1 && g.entries != shape.batch)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "the gallery is [", g.entries, ", ", g.m, ", ", g.d, "] but the problem needs batch ",
        shape.batch, " (or 1), M=", shape.m, ", D=", shape.d));
  }
  try {
    return std::unique_ptr<SimilarityJob>(
        new SimilarityJob(std::make_unique<SimilarityJob::Impl>(*impl_, shape, options, gallery)));
  } catch (const dnnl::error& e) {
    return absl::InternalError(absl::StrCat("cannot create a oneDNN stream: ", e.what()));
  }
}

absl::Status SimilarityEngine::Warmup(const Shape& shape, const Options& options,
                                      int64_t tile_rows) {
  if (absl::Status status = ValidateProblem(shape, options); !status.ok()) return status;
  const int64_t full = std::clamp<int64_t>(tile_rows, 1, shape.n);
  for (const int64_t rows : {full, shape.n % full}) {
    if (rows == 0) continue;
    absl::StatusOr<std::string> impl = MatmulImplementation(shape, options, rows);
    if (!impl.ok()) return impl.status();
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> SimilarityEngine::MatmulImplementation(const Shape& shape,
                                                                   const Options& options,
                                                                   int64_t rows) {
  absl::StatusOr<std::shared_ptr<const CachedMatmul>> matmul =
      impl_->GetMatmul({rows, shape.m, shape.d, impl_->UseBf16(options.precision)});
  if (!matmul.ok()) return matmul.status();
  return (*matmul)->implementation;
}

std::string SimilarityEngine::OneDnnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return absl::StrCat(v->major, ".", v->minor, ".", v->patch);
}

std::string SimilarityEngine::CpuIsa() {
  switch (dnnl::get_effective_cpu_isa()) {
    case dnnl::cpu_isa::sse41:
      return "sse41";
    case dnnl::cpu_isa::avx:
      return "avx";
    case dnnl::cpu_isa::avx2:
      return "avx2";
    case dnnl::cpu_isa::avx2_vnni:
      return "avx2_vnni";
    case dnnl::cpu_isa::avx512_core:
      return "avx512_core";
    case dnnl::cpu_isa::avx512_core_vnni:
      return "avx512_core_vnni";
    case dnnl::cpu_isa::avx512_core_bf16:
      return "avx512_core_bf16";
    case dnnl::cpu_isa::avx512_core_amx:
      return "avx512_core_amx";
    default:
      return "other";
  }
}

int SimilarityEngine::threads_per_call() const { return impl_->threads(); }

// ---- SimilarityJob ----

SimilarityJob::SimilarityJob(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SimilarityJob::~SimilarityJob() = default;
const Shape& SimilarityJob::shape() const { return impl_->shape(); }
const Options& SimilarityJob::options() const { return impl_->options(); }
int64_t SimilarityJob::output_cols() const { return impl_->output_cols(); }
size_t SimilarityJob::ValueBytes(int64_t rows) const { return impl_->ValueBytes(rows); }

absl::Status SimilarityJob::ComputeTile(int64_t batch, int64_t row_begin, int64_t rows,
                                        ConstTensorView a_rows, std::span<std::byte> values_out,
                                        std::span<int32_t> indices_out) {
  return impl_->ComputeTile(batch, row_begin, rows, a_rows, values_out, indices_out);
}

absl::Status ComputeAll(SimilarityJob& job, ConstTensorView a, int64_t tile_rows,
                        std::span<std::byte> values_out, std::span<int32_t> indices_out) {
  const Shape& shape = job.shape();
  const int64_t step = tile_rows > 0 ? std::min(tile_rows, shape.n) : shape.n;
  const size_t a_row_bytes = shape.d * SizeOf(a.dtype);
  const size_t k = static_cast<size_t>(job.options().top_k);
  if (values_out.size() != job.ValueBytes(shape.batch * shape.n) ||
      indices_out.size() != k * shape.batch * shape.n) {
    return absl::InvalidArgumentError("output buffers do not match the problem's output size");
  }
  for (int64_t batch = 0; batch < shape.batch; ++batch) {
    for (int64_t row = 0; row < shape.n; row += step) {
      const int64_t rows = std::min(step, shape.n - row);
      const int64_t first = batch * shape.n + row;
      const ConstTensorView a_rows{a.data + first * a_row_bytes, a.dtype};
      absl::Status status = job.ComputeTile(
          batch, row, rows, a_rows, values_out.subspan(job.ValueBytes(first), job.ValueBytes(rows)),
          indices_out.subspan(first * k, rows * k));
      if (!status.ok()) return status;
    }
  }
  return absl::OkStatus();
}

}  // namespace simserve::kernels
