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

#include <optional>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"
#include "mlx/fast.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "simd_table.hpp"

namespace zoo {
namespace {

using mlx::core::array;
using mlx::core::Primitive;
using mlx::core::Shape;
using mlx::core::Stream;
using mlx::core::UnaryPrimitive;

// The kernel table for this CPU, chosen once.
const KernelTable& kernels() {
  static const KernelTable table = [] {
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return avx2_table();
    }
#endif
    return generic_table();
  }();
  return table;
}

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

// The cotangent of softmax over the last axis: inputs (y, g).
class SoftmaxVjp : public UnaryPrimitive {
 public:
  explicit SoftmaxVjp(Stream stream) : UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& y = inputs[0];
    const array& g = inputs[1];
    require_dense(y, name());
    require_dense(g, name());
    allocate_output(out, g);
    size_t n = y.ndim() == 0 ? 1 : static_cast<size_t>(y.shape(-1));
    size_t rows = n == 0 ? 0 : y.size() / n;
    auto& encoder = mlx::core::cpu::get_command_encoder(stream());
    encoder.set_input_array(y);
    encoder.set_input_array(g);
    encoder.set_output_array(out);
    encoder.dispatch([y = y.data<float>(), g = g.data<float>(),
                      o = out.data<float>(), rows, n]() {
      kernels().softmax_vjp_rows(y, g, o, rows, n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[ZooSoftmaxVjp] runs on the CPU only");
  }
  const char* name() const override {
    return "ZooSoftmaxVjp";
  }
  bool is_equivalent(const Primitive&) const override {
    return true;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// softmax over the last axis of a float32 array.
class Softmax : public UnaryPrimitive {
 public:
  explicit Softmax(Stream stream) : UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    require_dense(x, name());
    allocate_output(out, x);
    size_t n = x.ndim() == 0 ? 1 : static_cast<size_t>(x.shape(-1));
    size_t rows = n == 0 ? 0 : x.size() / n;
    auto& encoder = mlx::core::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(out);
    encoder.dispatch(
        [x = x.data<float>(), o = out.data<float>(), rows, n]() {
          kernels().softmax_rows(x, o, rows, n);
        });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[ZooSoftmax] runs on the CPU only");
  }
  std::vector<array> vjp(
      const std::vector<array>&,
      const std::vector<array>& cotangents,
      const std::vector<int>&,
      const std::vector<array>& outputs) override {
    const array& y = outputs[0];
    array g = mlx::core::contiguous(
        mlx::core::astype(cotangents[0], mlx::core::float32, stream()),
        false,
        stream());
    return {array(
        y.shape(),
        mlx::core::float32,
        std::make_shared<SoftmaxVjp>(stream()),
        {y, g})};
  }
  const char* name() const override {
    return "ZooSoftmax";
  }
  bool is_equivalent(const Primitive&) const override {
    return true;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// The cotangent of SiLU: inputs (x, g).
class SiluVjp : public UnaryPrimitive {
 public:
  explicit SiluVjp(Stream stream) : UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    const array& g = inputs[1];
    require_dense(x, name());
    require_dense(g, name());
    allocate_output(out, g);
    auto& encoder = mlx::core::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(g);
    encoder.set_output_array(out);
    encoder.dispatch([x = x.data<float>(), g = g.data<float>(),
                      o = out.data<float>(), n = x.size()]() {
      kernels().silu_vjp(x, g, o, n);
    });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[ZooSiluVjp] runs on the CPU only");
  }
  const char* name() const override {
    return "ZooSiluVjp";
  }
  bool is_equivalent(const Primitive&) const override {
    return true;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }
};

// x * sigmoid(x) of a float32 array.
class Silu : public UnaryPrimitive {
 public:
  explicit Silu(Stream stream) : UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<array>& inputs, array& out) override {
    const array& x = inputs[0];
    require_dense(x, name());
    allocate_output(out, x);
    auto& encoder = mlx::core::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_output_array(out);
    encoder.dispatch(
        [x = x.data<float>(), o = out.data<float>(), n = x.size()]() {
          kernels().silu(x, o, n);
        });
  }
  void eval_gpu(const std::vector<array>&, array&) override {
    throw std::runtime_error("[ZooSilu] runs on the CPU only");
  }
  std::vector<array> vjp(
      const std::vector<array>& primals,
      const std::vector<array>& cotangents,
      const std::vector<int>&,
      const std::vector<array>&) override {
    const array& x = primals[0];
    array g = mlx::core::contiguous(
        mlx::core::astype(cotangents[0], mlx::core::float32, stream()),
        false,
        stream());
    return {array(
        x.shape(),
        mlx::core::float32,
        std::make_shared<SiluVjp>(stream()),
        {x, g})};
  }
  const char* name() const override {
    return "ZooSilu";
  }
  bool is_equivalent(const Primitive&) const override {
    return true;
  }
  std::vector<Shape> output_shapes(const std::vector<array>& inputs) override {
    return {inputs[0].shape()};
  }
};

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

extern "C" const char* zoo_last_error(void) {
  return zoo::last_error.c_str();
}

extern "C" const char* zoo_kernels_isa(void) {
  return zoo::kernels().isa;
}
