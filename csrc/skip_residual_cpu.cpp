// CPU kernels of `sts::skip_residual_rows` and its backward (STS_SPEC.md §2), parallel over
// rows with OpenMP through at::parallel_for. Same contract as the Triton ops in
// sts_kernels/ops/skip_residual.py: x `[R, F]`, delta packed `[K, F]` or padded `[B, Kmax, F]`,
// arithmetic in fp32 (fp64 for fp64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace sts {
namespace {

// Elements a task touches at least.
constexpr int64_t kGrainElements = 1 << 14;

int64_t grain_rows(int64_t num_features) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(num_features, 1));
}

// Where the delta of active row k lives: k itself (packed) or b * Kmax + (k - offsets[b])
// (padded), b the sample of its flat row.
struct DeltaLayout {
  bool padded;
  int64_t max_count;    // Kmax (padded)
  int64_t num_samples;  // B
  int64_t num_slots;    // K (packed) or B * Kmax (padded)
};

DeltaLayout delta_layout(const char* op, const at::Tensor& delta, const at::Tensor& index,
                         const at::Tensor& offsets, int64_t num_features) {
  TORCH_CHECK(delta.dim() == 2 || delta.dim() == 3, op,
              ": delta must be [K, F] or [B, Kmax, F], got ", delta.sizes());
  TORCH_CHECK(delta.size(-1) == num_features, op, ": delta has ", delta.size(-1),
              " features, expected ", num_features);
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == at::kLong, op,
              ": index must be a 1-D int64 tensor, got ", index.scalar_type(), " of shape ",
              index.sizes());
  TORCH_CHECK(offsets.dim() == 1 && offsets.scalar_type() == at::kLong && offsets.numel() >= 1,
              op, ": offsets must be a non-empty 1-D int64 tensor, got ", offsets.scalar_type(),
              " of shape ", offsets.sizes());
  const int64_t samples = offsets.numel() - 1;
  if (delta.dim() == 3) {
    TORCH_CHECK(delta.size(0) == samples, op, ": padded delta has ", delta.size(0),
                " samples, offsets ", samples);
    return {true, delta.size(1), samples, delta.size(0) * delta.size(1)};
  }
  TORCH_CHECK(delta.size(0) == index.numel(), op, ": delta has ", delta.size(0),
              " rows, index ", index.numel());
  return {false, 0, samples, delta.size(0)};
}

// The gate as contiguous `acc_t` values (fp32, or fp64 for fp64 inputs), or none.
std::optional<at::Tensor> gate_values(const char* op, const std::optional<at::Tensor>& gate,
                                      int64_t num_active, at::ScalarType acc_type) {
  if (!gate.has_value()) return std::nullopt;
  TORCH_CHECK(gate->dim() == 1 && gate->numel() == num_active, op, ": gate must be [",
              num_active, "], got ", gate->sizes());
  return gate->to(acc_type).contiguous();
}

at::ScalarType acc_type_of(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

template <typename scalar_t>
void skip_residual_rows_kernel(const at::Tensor& x, const at::Tensor& delta,
                               const std::optional<at::Tensor>& gate,
                               const std::vector<int64_t>& row_to_k, const int64_t* offsets,
                               const DeltaLayout& layout, at::Tensor& out, at::Tensor& cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rows = x.size(0), num_features = x.size(1);
  const int64_t rows_per_sample = num_rows / std::max<int64_t>(layout.num_samples, 1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* delta_data = delta.const_data_ptr<scalar_t>();
  const acc_t* gate_data = gate ? gate->const_data_ptr<acc_t>() : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  float* cos_data = cos.numel() ? cos.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, num_rows, grain_rows(num_features), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x_row = x_data + i * num_features;
      scalar_t* out_row = out_data + i * num_features;
      const int64_t k = row_to_k[i];
      // inactive rows are copied bit-exactly (x + 0 would turn -0.0 into +0.0)
      if (k < 0) {
        std::memcpy(out_row, x_row, num_features * sizeof(scalar_t));
        continue;
      }
      int64_t slot = k;
      if (layout.padded) {
        const int64_t sample = i / rows_per_sample;
        slot = sample * layout.max_count + k - offsets[sample];
      }
      const scalar_t* delta_row = delta_data + slot * num_features;
      const acc_t g = gate_data ? gate_data[k] : acc_t(1);
      if (!cos_data) {
        for (int64_t j = 0; j < num_features; ++j) {
          out_row[j] = static_cast<scalar_t>(static_cast<acc_t>(x_row[j]) +
                                             g * static_cast<acc_t>(delta_row[j]));
        }
        continue;
      }
      // the redundancy signal cos(x, out) from the same pass, out taken before the cast
      acc_t x_dot_out = 0, x_sq = 0, out_sq = 0;
      for (int64_t j = 0; j < num_features; ++j) {
        const acc_t xv = static_cast<acc_t>(x_row[j]);
        const acc_t ov = xv + g * static_cast<acc_t>(delta_row[j]);
        out_row[j] = static_cast<scalar_t>(ov);
        x_dot_out += xv * ov;
        x_sq += xv * xv;
        out_sq += ov * ov;
      }
      const acc_t norms = std::sqrt(x_sq) * std::sqrt(out_sq);
      cos_data[k] = static_cast<float>(x_dot_out / std::max<acc_t>(norms, acc_t(1e-8)));
    }
  });
}

// out[i] = x[i] + gate[k] * delta[k] for k with index[k] = i, out[i] = x[i] elsewhere; with
// `stats`, cos[k] = cos(x[i], out[i]) in fp32 (else cos is empty).
std::tuple<at::Tensor, at::Tensor> skip_residual_rows_cpu(const at::Tensor& x_in,
                                                          const at::Tensor& delta_in,
                                                          const at::Tensor& index_in,
                                                          const at::Tensor& offsets_in,
                                                          const std::optional<at::Tensor>& gate_in,
                                                          bool stats) {
  constexpr const char* op = "sts::skip_residual_rows";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [R, F], got ", x_in.sizes());
  TORCH_CHECK(delta_in.scalar_type() == x_in.scalar_type(), op, ": delta must have x's dtype ",
              x_in.scalar_type(), ", got ", delta_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto delta = delta_in.contiguous();
  const auto index = index_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t num_rows = x.size(0), num_active = index.numel();
  const auto layout = delta_layout(op, delta, index, offsets, x.size(1));
  const auto gate = gate_values(op, gate_in, num_active, acc_type_of(x.scalar_type()));
  auto out = at::empty_like(x);
  auto cos = at::empty({stats ? num_active : 0}, x.options().dtype(at::kFloat));

  // inverse map row -> k (or -1): one pass over x finds each row's delta
  std::vector<int64_t> row_to_k(num_rows, -1);
  const int64_t* ids = index.const_data_ptr<int64_t>();
  for (int64_t k = 0; k < num_active; ++k) {
    TORCH_CHECK(ids[k] >= 0 && ids[k] < num_rows, op, ": index[", k, "] = ", ids[k],
                " out of range [0, ", num_rows, ")");
    row_to_k[ids[k]] = k;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    skip_residual_rows_kernel<scalar_t>(x, delta, gate, row_to_k,
                                        offsets.const_data_ptr<int64_t>(), layout, out, cos);
  });
  return {out, cos};
}

template <typename scalar_t>
void skip_residual_rows_backward_kernel(const at::Tensor& grad_out, const at::Tensor& delta,
                                        const std::optional<at::Tensor>& gate,
                                        const int64_t* ids, const int64_t* offsets,
                                        const DeltaLayout& layout, int64_t num_active,
                                        at::Tensor& grad_delta, at::Tensor& grad_gate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_rows = grad_out.size(0), num_features = grad_out.size(1);
  const scalar_t* grad_out_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* delta_data = delta.const_data_ptr<scalar_t>();
  const acc_t* gate_data = gate ? gate->const_data_ptr<acc_t>() : nullptr;
  scalar_t* grad_delta_data = grad_delta.mutable_data_ptr<scalar_t>();
  acc_t* grad_gate_data = grad_gate.numel() ? grad_gate.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, layout.num_slots, grain_rows(num_features), [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      scalar_t* grad_delta_row = grad_delta_data + slot * num_features;
      // the k of this delta slot; padding slots past a sample's count get zero gradient
      int64_t k = slot;
      if (layout.padded) {
        const int64_t sample = slot / layout.max_count;
        k = offsets[sample] + slot % layout.max_count;
        if (k >= offsets[sample + 1]) {
          std::fill(grad_delta_row, grad_delta_row + num_features, scalar_t(0));
          continue;
        }
      }
      TORCH_CHECK(k < num_active && ids[k] >= 0 && ids[k] < num_rows,
                  "sts::skip_residual_rows_backward: slot ", slot, " names k = ", k,
                  " out of range or a row id out of range [0, ", num_rows, ")");
      const scalar_t* grad_out_row = grad_out_data + ids[k] * num_features;
      const scalar_t* delta_row = delta_data + slot * num_features;
      const acc_t g = gate_data ? gate_data[k] : acc_t(1);
      acc_t dot = 0;
      for (int64_t j = 0; j < num_features; ++j) {
        const acc_t go = static_cast<acc_t>(grad_out_row[j]);
        grad_delta_row[j] = static_cast<scalar_t>(g * go);
        if (grad_gate_data) dot += go * static_cast<acc_t>(delta_row[j]);
      }
      if (grad_gate_data) grad_gate_data[k] = dot;
    }
  });
}

// grad_delta[k] = gate[k] * grad_out[index[k]] (zero on padding slots) and, when asked and
// there is a gate, grad_gate[k] = <grad_out[index[k]], delta[k]> in gate's dtype (else empty).
std::tuple<at::Tensor, at::Tensor> skip_residual_rows_backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& delta_in, const at::Tensor& index_in,
    const at::Tensor& offsets_in, const std::optional<at::Tensor>& gate_in, bool need_grad_gate) {
  constexpr const char* op = "sts::skip_residual_rows_backward";
  TORCH_CHECK(grad_out_in.dim() == 2, op, ": grad_out must be [R, F], got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == delta_in.scalar_type(), op,
              ": grad_out must have delta's dtype ", delta_in.scalar_type(), ", got ",
              grad_out_in.scalar_type());
  const auto grad_out = grad_out_in.contiguous();
  const auto delta = delta_in.contiguous();
  const auto index = index_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t num_active = index.numel();
  const auto layout = delta_layout(op, delta, index, offsets, grad_out.size(1));
  const auto acc_type = acc_type_of(delta.scalar_type());
  const auto gate = gate_values(op, gate_in, num_active, acc_type);
  need_grad_gate = need_grad_gate && gate.has_value();
  auto grad_delta = at::empty_like(delta);
  auto grad_gate_acc = at::empty({need_grad_gate ? num_active : 0}, delta.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, delta.scalar_type(), op, [&] {
    skip_residual_rows_backward_kernel<scalar_t>(
        grad_out, delta, gate, index.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        layout, num_active, grad_delta, grad_gate_acc);
  });
  const auto gate_dtype = gate_in.has_value() ? gate_in->scalar_type() : at::kFloat;
  return {grad_delta, grad_gate_acc.to(gate_dtype)};
}

}  // namespace
}  // namespace sts

TORCH_LIBRARY_IMPL(sts, CPU, m) {
  m.impl("skip_residual_rows", &sts::skip_residual_rows_cpu);
  m.impl("skip_residual_rows_backward", &sts::skip_residual_rows_backward_cpu);
}
