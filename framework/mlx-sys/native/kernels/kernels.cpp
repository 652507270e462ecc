// mlx-zoo's CPU primitives for MLX: fused softmax and SiLU, with their
// vector-Jacobian products as primitives of their own.
//
// MLX's CPU element-wise kernels are scalar on x86 (its SIMD layer only
// specialises NEON and Accelerate): `exp` costs about 20 ns per value, so a
// training step spends a large share of its time in attention's softmax and
// the MLP's SiLU. These primitives run the same mathematics in one pass over
// the data with a vectorised exp (see simd_kernels.hpp), inside MLX's graph:
// they are evaluated lazily on the stream's thread like MLX's own kernels,
// and differentiate through `vjp`.

#include "zoo_kernels.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/transforms.h"
#include "simd_table.hpp"

namespace zoo {
namespace {

using mlx::core::array;
using mlx::core::Primitive;
using mlx::core::Shape;
using mlx::core::Stream;
using mlx::core::UnaryPrimitive;

// The kernel table for this CPU, chosen once (see ZOO_KERNELS_ISA).
const KernelTable& kernels() {
  static const KernelTable table = [] {
    // ZOO_KERNELS_ISA=generic keeps the baseline loops (to test them).
    const char* wanted = std::getenv("ZOO_KERNELS_ISA");
    bool generic_only = wanted != nullptr && std::string(wanted) == "generic";
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!generic_only && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma")) {
      return avx2_table();
    }
#endif
    (void)generic_only;
    return generic_table();
  }();
  return table;
}

// A few threads that share one parallel loop at a time with the calling
// thread (the MLX stream thread evaluating a primitive). Between jobs a
// worker sleeps on a condition variable (after ZOO_KERNEL_SPIN_US of
// spinning, 0 by default: on two cores a spinning worker took the CPU from
// the thread building the next step's graph; measured, decoding 4-bit was
// 76 tokens/s with 1 ms of spinning and 114 with none). Parts are claimed
// dynamically, so a worker that wakes late only misses parts. A second
// caller while a job runs (two streams at once) runs its loop alone rather
// than wait.
class WorkerPool {
 public:
  static WorkerPool& instance() {
    // Never destroyed: worker threads must not be joined during exit.
    static WorkerPool* pool = new WorkerPool(default_threads());
    return *pool;
  }

  // Threads that take part in a job, the caller included.
  int threads() const {
    return static_cast<int>(workers_.size()) + 1;
  }

  // Runs body(part) for every part in [0, parts).
  void run(int parts, const std::function<void(int)>& body) {
    std::unique_lock<std::mutex> exclusive(run_mutex_, std::try_to_lock);
    if (!exclusive.owns_lock() || workers_.empty() || parts <= 1) {
      for (int part = 0; part < parts; ++part) {
        body(part);
      }
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      body_ = &body;
      parts_ = parts;
      next_.store(0, std::memory_order_relaxed);
      unfinished_.store(parts, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work(&body);
    while (unfinished_.load(std::memory_order_acquire) > 0) {
      pause();
    }
    // Retire the job only once no worker is inside it, so that none can
    // claim a part of the next job with this job's body.
    for (;;) {
      std::lock_guard<std::mutex> lock(mutex_);
      if (active_.load(std::memory_order_acquire) == 0) {
        body_ = nullptr;
        return;
      }
    }
  }

 private:
  explicit WorkerPool(int threads) {
    if (const char* value = std::getenv("ZOO_KERNEL_SPIN_US")) {
      spin_ = std::chrono::microseconds(std::atoi(value));
    }
    for (int i = 1; i < threads; ++i) {
      workers_.emplace_back([this] { serve(); });
    }
  }

  // ZOO_KERNEL_THREADS, or the hardware's threads (at most 8).
  static int default_threads() {
    if (const char* value = std::getenv("ZOO_KERNEL_THREADS")) {
      int parsed = std::atoi(value);
      if (parsed >= 1) {
        return parsed;
      }
    }
    int hardware = static_cast<int>(std::thread::hardware_concurrency());
    return std::clamp(hardware, 1, 8);
  }

  static void pause() {
#if defined(__x86_64__)
    __builtin_ia32_pause();
#else
    std::this_thread::yield();
#endif
  }

  // Claims and runs parts until none are left.
  void work(const std::function<void(int)>* body) {
    for (;;) {
      int part = next_.fetch_add(1, std::memory_order_relaxed);
      if (part >= parts_) {
        return;
      }
      (*body)(part);
      unfinished_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  void serve() {
    uint64_t seen = 0;
    for (;;) {
      auto until = std::chrono::steady_clock::now() + spin_;
      int spins = 0;
      while (generation_.load(std::memory_order_acquire) == seen) {
        pause();
        if (++spins % 256 == 0 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lock(mutex_);
          wake_.wait(lock, [&] {
            return generation_.load(std::memory_order_acquire) != seen;
          });
        }
      }
      const std::function<void(int)>* body;
      {
        std::lock_guard<std::mutex> lock(mutex_);
        seen = generation_.load(std::memory_order_acquire);
        body = body_;
        if (body == nullptr) {
          continue;
        }
        active_.fetch_add(1, std::memory_order_acq_rel);
      }
      work(body);
      active_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }

  std::chrono::microseconds spin_{0};
  std::vector<std::thread> workers_;
  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  const std::function<void(int)>* body_ = nullptr;
  int parts_ = 0;
  std::atomic<int> next_{0};
  std::atomic<int> unfinished_{0};
  std::atomic<int> active_{0};
  std::atomic<uint64_t> generation_{0};
};

// Gives `out` a buffer: `donor`'s when nothing else holds it (as MLX's
// element-wise kernels do), a fresh one otherwise.
void allocate_output(array& out, const array& donor) {
  if (donor.is_donatable() && donor.dtype() == out.dtype() &&
      donor.flags().row_contiguous) {
    out.copy_shared_buffer(donor);
  } else {
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
  }
}

void require_dense(const array& a, const char* op) {
  if (a.dtype() != mlx::core::float32 || !a.flags().row_contiguous) {
    throw std::runtime_error(
        std::string("[") + op +
        "] expects a row-contiguous float32 input (internal error)");
  }
}

// What the primitives here share: they run on the CPU only, have one output
// shaped like their first input, and carry no state that could make two of
// them differ.
class CpuPrimitive : public UnaryPrimitive {
 public:
  explicit CpuPrimitive(Stream stream) : UnaryPrimitive(stream) {}

  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error(
        std::string("[") + name() + "] runs on the CPU only");
  }
  bool is_equivalent(const Primitive&) const override {
    return true;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }

 protected:
  // The stream's encoder, with `inputs` and `out` registered on it.
  mlx::core::cpu::CommandEncoder& encoder_for(
      const std::vector<array>& inputs,
      array& out) {
    auto& encoder = mlx::core::cpu::get_command_encoder(stream());
    for (const array& in : inputs) {
      encoder.set_input_array(in);
    }
    encoder.set_output_array(out);
    return encoder;
  }

  // For the element-wise kernels: checks that every input is dense
  // float32, gives `out` the last input's buffer when it can be donated (a
  // fresh one otherwise) and returns the encoder, arrays registered.
  mlx::core::cpu::CommandEncoder& prepare_elementwise(
      const std::vector<array>& inputs,
      array& out) {
    for (const array& input : inputs) {
      require_dense(input, name());
    }
    allocate_output(out, inputs.back());
    return encoder_for(inputs, out);
  }
};

// Input rows up to which `zoo_matvec` uses its own kernel.
constexpr size_t kMaxRows = 4;

// The backward primitive `P` applied to `saved` (what the forward pass
// keeps) and the cotangent, made a dense float32 array for the kernel.
template <class P>
array with_cotangent(const array& saved, const array& cotangent, Stream s) {
  array g = mlx::core::contiguous(
      mlx::core::astype(cotangent, mlx::core::float32, s), false, s);
  return array(
      saved.shape(), mlx::core::float32, std::make_shared<P>(s), {saved, g});
}

// The cotangent of softmax over the last axis: inputs (y, g).
class SoftmaxVjp : public CpuPrimitive {
 public:
  explicit SoftmaxVjp(Stream stream) : CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& y = inputs[0];
    const array& g = inputs[1];
    auto& encoder = prepare_elementwise(inputs, out);
    size_t n = y.ndim() == 0 ? 1 : static_cast<size_t>(y.shape(-1));
    size_t rows = n == 0 ? 0 : y.size() / n;
    encoder.dispatch([y = y.data<float>(), g = g.data<float>(),
                      o = out.data<float>(), rows, n]() {
      kernels().softmax_vjp_rows(y, g, o, rows, n);
    });
  }
  const char* name() const override {
    return "ZooSoftmaxVjp";
  }
};

// softmax over the last axis of a float32 array.
class Softmax : public CpuPrimitive {
 public:
  explicit Softmax(Stream stream) : CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    auto& encoder = prepare_elementwise(inputs, out);
    size_t n = x.ndim() == 0 ? 1 : static_cast<size_t>(x.shape(-1));
    size_t rows = n == 0 ? 0 : x.size() / n;
    encoder.dispatch(
        [x = x.data<float>(), o = out.data<float>(), rows, n]() {
          kernels().softmax_rows(x, o, rows, n);
        });
  }
  std::vector<array> vjp(
      const std::vector<array>&,
      const std::vector<array>& cotangents,
      const std::vector<int>&,
      const std::vector<array>& outputs) override {
    return {with_cotangent<SoftmaxVjp>(outputs[0], cotangents[0], stream())};
  }
  const char* name() const override {
    return "ZooSoftmax";
  }
};

// The cotangent of SiLU: inputs (x, g).
class SiluVjp : public CpuPrimitive {
 public:
  explicit SiluVjp(Stream stream) : CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    const array& g = inputs[1];
    auto& encoder = prepare_elementwise(inputs, out);
    encoder.dispatch([x = x.data<float>(), g = g.data<float>(),
                      o = out.data<float>(), n = x.size()]() {
      kernels().silu_vjp(x, g, o, n);
    });
  }
  const char* name() const override {
    return "ZooSiluVjp";
  }
};

// x * sigmoid(x) of a float32 array.
class Silu : public CpuPrimitive {
 public:
  explicit Silu(Stream stream) : CpuPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    auto& encoder = prepare_elementwise(inputs, out);
    encoder.dispatch(
        [x = x.data<float>(), o = out.data<float>(), n = x.size()]() {
          kernels().silu(x, o, n);
        });
  }
  std::vector<array> vjp(
      const std::vector<array>& primals,
      const std::vector<array>& cotangents,
      const std::vector<int>&,
      const std::vector<array>&) override {
    return {with_cotangent<SiluVjp>(primals[0], cotangents[0], stream())};
  }
  const char* name() const override {
    return "ZooSilu";
  }
};

// The product x @ w^T of a few input rows with a float32 weight [n, k] or an
// affine-quantized one (4 or 8 bits, float32 scales and biases), its output
// columns split over the worker pool. Inputs: (x, w) or (x, w, scales,
// biases); x is [..., k] with at most kMaxMatvecRows rows.
class Matvec : public CpuPrimitive {
 public:
  Matvec(Stream stream, int bits, int group)
      : CpuPrimitive(stream), bits_(bits), group_(group) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    for (const array& input : inputs) {
      if (!input.flags().row_contiguous) {
        throw std::runtime_error(
            "[ZooMatvec] expects row-contiguous inputs (internal error)");
      }
    }
    const array& x = inputs[0];
    const array& w = inputs[1];
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    size_t k = static_cast<size_t>(x.shape(-1));
    size_t n = static_cast<size_t>(w.shape(0));
    size_t m = k == 0 ? 0 : x.size() / k;
    auto& encoder = encoder_for(inputs, out);
    // Parts of at least 32 output columns, a few per thread.
    WorkerPool& pool = WorkerPool::instance();
    int parts = static_cast<int>(
        std::clamp<size_t>(n / 32, 1, static_cast<size_t>(4 * pool.threads())));
    float* y = out.data<float>();
    const float* xs = x.data<float>();
    if (bits_ == 0) {
      encoder.dispatch([xs, ws = w.data<float>(), y, m, k, n, parts, &pool]() {
        pool.run(parts, [&](int part) {
          size_t n0 = n * part / parts;
          size_t n1 = n * (part + 1) / parts;
          kernels().matvec_f32(ws, xs, y, m, k, n, n0, n1);
        });
      });
      return;
    }
    encoder.dispatch([xs,
                      ws = w.data<uint32_t>(),
                      scales = inputs[2].data<float>(),
                      biases = inputs[3].data<float>(),
                      y, m, k, n, parts, &pool,
                      bits = bits_, group = group_]() {
      size_t groups = k / group;
      std::vector<float> xsums(m * groups, 0.0f);
      for (size_t r = 0; r < m; ++r) {
        for (size_t g = 0; g < groups; ++g) {
          float sum = 0.0f;
          for (int i = 0; i < group; ++i) {
            sum += xs[r * k + g * group + i];
          }
          xsums[r * groups + g] = sum;
        }
      }
      pool.run(parts, [&](int part) {
        size_t n0 = n * part / parts;
        size_t n1 = n * (part + 1) / parts;
        kernels().matvec_quantized(
            ws, scales, biases, xs, xsums.data(), y, m, k, n, bits, group, n0,
            n1);
      });
    });
  }
  // Gradients reach the input through the (de-quantized) weight and, for a
  // float weight, the weight; quantized parameters have none (as in MLX).
  std::vector<array> vjp(
      const std::vector<array>& primals,
      const std::vector<array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<array>&) override {
    namespace mx = mlx::core;
    const array& x = primals[0];
    const array& g = cotangents[0];
    std::vector<array> grads;
    for (int arg : argnums) {
      if (arg == 0) {
        array weight = bits_ == 0
            ? primals[1]
            : mx::dequantize(
                  primals[1], primals[2], primals[3], group_, bits_, "affine",
                  std::nullopt, mx::float32, stream());
        grads.push_back(mx::matmul(g, weight, stream()));
      } else if (arg == 1 && bits_ == 0) {
        int k = x.shape(-1);
        int n = g.shape(-1);
        grads.push_back(mx::matmul(
            mx::transpose(mx::reshape(g, {-1, n}, stream()), stream()),
            mx::reshape(x, {-1, k}, stream()),
            stream()));
      } else {
        throw std::invalid_argument(
            "[ZooMatvec] quantized weights, scales and biases have no gradient");
      }
    }
    return grads;
  }
  const char* name() const override {
    return "ZooMatvec";
  }
  bool is_equivalent(const Primitive& other) const override {
    const auto& o = static_cast<const Matvec&>(other);
    return bits_ == o.bits_ && group_ == o.group_;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    Shape shape = inputs[0].shape();
    shape.back() = inputs[1].shape(0);
    return {shape};
  }

 private:
  int bits_;
  int group_;
};

// x @ w^T through `Matvec` when the kernels cover the case (CPU stream,
// float32, 1 to 4 rows, 4 or 8 bits with float32 scales and biases), MLX's
// matmul / quantized_matmul otherwise.
array matvec(
    const array& x,
    const array& w,
    const std::optional<array>& scales,
    const std::optional<array>& biases,
    int bits,
    int group,
    const Stream& s) {
  namespace mx = mlx::core;
  bool quantized = scales.has_value();
  if (x.ndim() == 0) {
    throw std::invalid_argument("[zoo_matvec] expects an input with features");
  }
  int k = x.shape(-1);
  size_t rows = k == 0 ? 0 : x.size() / k;
  bool covered = s.device == mx::Device::cpu && x.dtype() == mx::float32 &&
      rows >= 1 && rows <= kMaxRows && w.ndim() == 2;
  if (quantized) {
    covered = covered && biases.has_value() && (bits == 4 || bits == 8) &&
        group % 32 == 0 && k % group == 0 && w.dtype() == mx::uint32 &&
        scales->dtype() == mx::float32 && biases->dtype() == mx::float32 &&
        w.shape(1) * (32 / bits) == k;
  } else {
    covered = covered && w.dtype() == mx::float32 && w.shape(1) == k;
  }
  if (!covered) {
    return quantized
        ? mx::quantized_matmul(x, w, *scales, biases, true, group, bits,
                               "affine", s)
        : mx::matmul(x, mx::transpose(w, s), s);
  }
  Shape shape = x.shape();
  shape.back() = w.shape(0);
  std::vector<array> inputs = {mx::contiguous(x, false, s),
                               mx::contiguous(w, false, s)};
  if (quantized) {
    inputs.push_back(mx::contiguous(*scales, false, s));
    inputs.push_back(mx::contiguous(*biases, false, s));
  }
  return array(
      shape,
      mx::float32,
      std::make_shared<Matvec>(s, quantized ? bits : 0, group),
      std::move(inputs));
}

// Applies primitive `P` to `x` in float32 on a CPU stream, casting other
// floating types there and back; elsewhere returns `fallback(x)`.
template <class P, class Fallback>
array apply_float32(
    const array& x,
    const Stream& s,
    const char* op,
    Fallback fallback) {
  if (!mlx::core::issubdtype(x.dtype(), mlx::core::floating)) {
    throw std::invalid_argument(
        std::string("[") + op + "] expects a floating-point array");
  }
  if (s.device != mlx::core::Device::cpu) {
    return fallback(x);
  }
  array input = mlx::core::contiguous(
      mlx::core::astype(x, mlx::core::float32, s), false, s);
  array out(
      input.shape(),
      mlx::core::float32,
      std::make_shared<P>(s),
      {input});
  return x.dtype() == mlx::core::float32 ? out
                                          : mlx::core::astype(out, x.dtype(), s);
}

array softmax_last_axis(const array& x, const Stream& s) {
  if (x.ndim() == 0) {
    throw std::invalid_argument("[zoo_softmax_last_axis] expects an axis");
  }
  return apply_float32<Softmax>(
      x, s, "zoo_softmax_last_axis", [&](const array& a) {
        return mlx::core::softmax(a, std::vector<int>{-1}, true, s);
      });
}

// MLX's CPU attention (the composition `fast::scaled_dot_product_attention`
// falls back to on the CPU) with this file's softmax: scores in the inputs'
// dtype, masked positions at the dtype's lowest value, grouped heads by
// reshaping the queries instead of repeating the keys.
array attention_composed(
    const array& queries,
    const array& keys,
    const array& values,
    float scale,
    const std::string& mask_mode,
    std::optional<array> mask,
    const Stream& s) {
  namespace mx = mlx::core;
  if (queries.ndim() != 4 || keys.ndim() != 4 || values.ndim() != 4) {
    throw std::invalid_argument(
        "[zoo_attention] expects queries, keys and values of shape "
        "[batch, heads, length, head_dim]");
  }
  int q_heads = queries.shape(1);
  int kv_heads = keys.shape(1);
  if (kv_heads == 0 || q_heads % kv_heads != 0 || values.shape(1) != kv_heads) {
    throw std::invalid_argument(
        "[zoo_attention] the query heads must be a multiple of the key/value "
        "heads");
  }
  int repeats = q_heads / kv_heads;
  array q = mx::multiply(array(scale, queries.dtype()), queries, s);
  array k = keys;
  array v = values;
  if (repeats > 1) {
    q = mx::unflatten(q, 1, {kv_heads, repeats}, s);
    k = mx::expand_dims(k, 2, s);
    v = mx::expand_dims(v, 2, s);
  }
  array scores = mx::matmul(q, mx::swapaxes(k, -1, -2, s), s);
  array lowest(mx::finfo(scores.dtype()).min, scores.dtype());
  if (mask) {
    array m = *mask;
    if (repeats > 1 && m.ndim() >= 3) {
      m = m.shape(-3) == 1 ? mx::expand_dims(m, -3, s)
                           : mx::unflatten(m, -3, {kv_heads, repeats}, s);
    }
    scores = m.dtype() == mx::bool_ ? mx::where(m, scores, lowest, s)
                                    : mx::add(scores, m, s);
  }
  if (mask_mode == "causal") {
    int q_len = q.shape(-2);
    int k_len = k.shape(-2);
    array q_index = mx::expand_dims(mx::arange(k_len - q_len, k_len, s), 1, s);
    array k_index = mx::arange(0, k_len, s);
    scores = mx::where(
        mx::greater_equal(q_index, k_index, s), scores, lowest, s);
  }
  array out = mx::matmul(softmax_last_axis(scores, s), v, s);
  if (repeats > 1) {
    out = mx::flatten(out, 1, 2, s);
  }
  return out;
}

// Dense copy of a [batch, heads, rows, dim] array's values, for inputs
// whose innermost stride is not 1 (the kernel reads rows directly).
std::vector<float> gather_dense(
    const float* data,
    const mlx::core::Strides& strides,
    const Shape& shape) {
  std::vector<float> dense(
      static_cast<size_t>(shape[0]) * shape[1] * shape[2] * shape[3]);
  size_t at = 0;
  for (int b = 0; b < shape[0]; ++b) {
    for (int h = 0; h < shape[1]; ++h) {
      for (int r = 0; r < shape[2]; ++r) {
        for (int c = 0; c < shape[3]; ++c) {
          dense[at++] = data[b * strides[0] + h * strides[1] +
                             r * strides[2] + c * strides[3]];
        }
      }
    }
  }
  return dense;
}

// Attention of a single query position (token-by-token decoding) over
// float32 keys and values read in place, typically a view of the KV cache's
// buffer: one pass per head (scores, softmax, weighted sum) instead of two
// BLAS calls per head and a softmax between them. Inputs (q, k, v) of
// shapes [B, Hq, 1, D], [B, Hkv, S, D], [B, Hkv, S, D].
class DecodeAttention : public CpuPrimitive {
 public:
  DecodeAttention(Stream stream, float scale)
      : CpuPrimitive(stream), scale_(scale) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    out.set_data(mlx::core::allocator::malloc(out.nbytes()));
    auto& encoder = encoder_for(inputs, out);
    const array& q = inputs[0];
    const array& k = inputs[1];
    const array& v = inputs[2];
    encoder.dispatch([q_data = q.data<float>(), k_data = k.data<float>(),
                      v_data = v.data<float>(), o = out.data<float>(),
                      q_shape = q.shape(), k_shape = k.shape(),
                      q_strides = q.strides(), k_strides = k.strides(),
                      v_strides = v.strides(), scale = scale_]() {
      // Inputs with a non-unit innermost stride are read through a copy.
      std::vector<float> q_copy, k_copy, v_copy;
      const float* qp = q_data;
      const float* kp = k_data;
      const float* vp = v_data;
      auto qs = q_strides;
      auto ks = k_strides;
      auto vs = v_strides;
      auto dense_strides = [](const Shape& shape) {
        return mlx::core::Strides{
            static_cast<int64_t>(shape[1]) * shape[2] * shape[3],
            static_cast<int64_t>(shape[2]) * shape[3],
            shape[3],
            1};
      };
      if (qs[3] != 1) {
        q_copy = gather_dense(q_data, qs, q_shape);
        qp = q_copy.data();
        qs = dense_strides(q_shape);
      }
      if (ks[3] != 1) {
        k_copy = gather_dense(k_data, ks, k_shape);
        kp = k_copy.data();
        ks = dense_strides(k_shape);
      }
      if (vs[3] != 1) {
        v_copy = gather_dense(v_data, vs, k_shape);
        vp = v_copy.data();
        vs = dense_strides(k_shape);
      }
      int batch = q_shape[0];
      int q_heads = q_shape[1];
      int repeats = q_heads / k_shape[1];
      size_t s_len = k_shape[2];
      size_t d = q_shape[3];
      std::vector<float> scores(s_len);
      for (int b = 0; b < batch; ++b) {
        for (int h = 0; h < q_heads; ++h) {
          int kv = h / repeats;
          kernels().attend_one_query(
              qp + b * qs[0] + h * qs[1],
              kp + b * ks[0] + kv * ks[1],
              ks[2],
              vp + b * vs[0] + kv * vs[1],
              vs[2],
              o + (static_cast<size_t>(b) * q_heads + h) * d,
              s_len,
              d,
              scale,
              scores.data());
        }
      }
    });
  }
  // Gradients through the composition this primitive computes.
  std::vector<array> vjp(
      const std::vector<array>& primals,
      const std::vector<array>& cotangents,
      const std::vector<int>& argnums,
      const std::vector<array>&) override {
    float scale = scale_;
    Stream s = stream();
    auto composed = [scale, s](const std::vector<array>& in) {
      return std::vector<array>{
          attention_composed(in[0], in[1], in[2], scale, "", std::nullopt, s)};
    };
    auto grads = mlx::core::vjp(composed, primals, cotangents).second;
    std::vector<array> selected;
    for (int arg : argnums) {
      selected.push_back(grads[arg]);
    }
    return selected;
  }
  const char* name() const override {
    return "ZooDecodeAttention";
  }
  bool is_equivalent(const Primitive& other) const override {
    return scale_ == static_cast<const DecodeAttention&>(other).scale_;
  }

 private:
  float scale_;
};

// Attention as MLX's fast::scaled_dot_product_attention computes it: MLX's
// own fused kernel off the CPU; on the CPU, `DecodeAttention` for a single
// float32 query without a mask (causal with one query sees every key), the
// composition with this file's softmax otherwise.
array attention(
    const array& queries,
    const array& keys,
    const array& values,
    float scale,
    const std::string& mask_mode,
    std::optional<array> mask,
    const Stream& s) {
  namespace mx = mlx::core;
  if (s.device != mx::Device::cpu) {
    return mx::fast::scaled_dot_product_attention(
        queries, keys, values, scale, mask_mode, mask, {}, false, s);
  }
  bool single_query = queries.ndim() == 4 && keys.ndim() == 4 &&
      values.ndim() == 4 && queries.shape(2) == 1 && !mask &&
      (mask_mode.empty() || mask_mode == "causal") &&
      queries.dtype() == mx::float32 && keys.dtype() == mx::float32 &&
      values.dtype() == mx::float32 && keys.shape(1) > 0 &&
      queries.shape(1) % keys.shape(1) == 0 && keys.shape(2) > 0 &&
      values.shape(1) == keys.shape(1) && values.shape(2) == keys.shape(2) &&
      queries.shape(0) == keys.shape(0) && values.shape(0) == keys.shape(0) &&
      queries.shape(3) == keys.shape(3) && values.shape(3) == keys.shape(3);
  if (!single_query) {
    return attention_composed(queries, keys, values, scale, mask_mode, mask, s);
  }
  return array(
      queries.shape(),
      mx::float32,
      std::make_shared<DecodeAttention>(s, scale),
      {queries, keys, values});
}

thread_local std::string last_error;

template <class Build>
int guarded(mlx_array* res, Build build) {
  try {
    mlx_array_set_(*res, build());
    return 0;
  } catch (std::exception& e) {
    last_error = e.what();
    return 1;
  }
}

// silu(gate) * up as one graph for MLX's compile (shapeless: one trace
// serves every shape).
std::vector<array> swiglu_body(const std::vector<array>& in) {
  namespace mx = mlx::core;
  return {mx::multiply(mx::multiply(in[0], mx::sigmoid(in[0])), in[1])};
}

// silu(gate) * up: on the CPU with this file's SiLU; elsewhere compiled
// once by MLX into one fused element-wise kernel (three kernel launches
// otherwise, which decoding, a few hundred small launches a token, feels).
array swiglu(const array& gate, const array& up, const Stream& s) {
  namespace mx = mlx::core;
  if (s.device == mx::Device::cpu) {
    array activated = apply_float32<Silu>(
        gate, s, "zoo_swiglu", [&](const array& a) {
          return mx::multiply(a, mx::sigmoid(a, s), s);
        });
    return mx::multiply(activated, up, s);
  }
  static auto fused = mx::compile(swiglu_body, /*shapeless=*/true);
  mx::StreamContext on(s);
  return fused({gate, up})[0];
}

} // namespace
} // namespace zoo

extern "C" int zoo_softmax_last_axis(
    mlx_array* res,
    const mlx_array x,
    const mlx_stream s) {
  return zoo::guarded(res, [&] {
    return zoo::softmax_last_axis(mlx_array_get_(x), mlx_stream_get_(s));
  });
}

extern "C" int zoo_attention(
    mlx_array* res,
    const mlx_array queries,
    const mlx_array keys,
    const mlx_array values,
    float scale,
    const char* mask_mode,
    const mlx_array mask,
    const mlx_stream s) {
  return zoo::guarded(res, [&] {
    std::optional<mlx::core::array> mask_array;
    if (mask.ctx) {
      mask_array = mlx_array_get_(mask);
    }
    return zoo::attention(
        mlx_array_get_(queries),
        mlx_array_get_(keys),
        mlx_array_get_(values),
        scale,
        mask_mode ? mask_mode : "",
        mask_array,
        mlx_stream_get_(s));
  });
}

extern "C" int zoo_silu(mlx_array* res, const mlx_array x, const mlx_stream s) {
  return zoo::guarded(res, [&] {
    const auto& input = mlx_array_get_(x);
    auto stream = mlx_stream_get_(s);
    return zoo::apply_float32<zoo::Silu>(
        input, stream, "zoo_silu", [&](const auto& a) {
          return mlx::core::multiply(a, mlx::core::sigmoid(a, stream), stream);
        });
  });
}

extern "C" int zoo_swiglu(
    mlx_array* res,
    const mlx_array gate,
    const mlx_array up,
    const mlx_stream s) {
  return zoo::guarded(res, [&] {
    return zoo::swiglu(
        mlx_array_get_(gate), mlx_array_get_(up), mlx_stream_get_(s));
  });
}

extern "C" int zoo_matvec(
    mlx_array* res,
    const mlx_array x,
    const mlx_array w,
    const mlx_array scales,
    const mlx_array biases,
    int bits,
    int group_size,
    const mlx_stream s) {
  return zoo::guarded(res, [&] {
    std::optional<mlx::core::array> scales_array;
    std::optional<mlx::core::array> biases_array;
    if (scales.ctx) {
      scales_array = mlx_array_get_(scales);
    }
    if (biases.ctx) {
      biases_array = mlx_array_get_(biases);
    }
    return zoo::matvec(
        mlx_array_get_(x),
        mlx_array_get_(w),
        scales_array,
        biases_array,
        bits,
        group_size,
        mlx_stream_get_(s));
  });
}

extern "C" const char* zoo_last_error(void) {
  return zoo::last_error.c_str();
}

extern "C" const char* zoo_kernels_isa(void) {
  return zoo::kernels().isa;
}
