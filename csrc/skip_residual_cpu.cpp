// CPU kernels of `sts::skip_residual` and its backward (STS_SPEC.md §2), parallel over
// rows with OpenMP through at::parallel_for. Same contract as the Triton ops in
// sts_kernels/ops/skip_residual.py: x `[R, F]`, the update `u` packed `[K, F]` or padded
// `[B, Kmax, F]`, arithmetic in fp32 (fp64 for fp64 inputs). `u` is the residual `delta`
// (out = x + g * delta), or with `from_output` the layer's output `y` on the routed rows
// (out = x + g * (y - x), so no separate `y - x` pass is needed).
//
// Every plan entry is validated serially before a parallel region (an exception thrown inside
// at::parallel_for terminates the process): O(R + K + B) integer reads, cheap next to the
// R * F values the kernels move.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

namespace sts {
namespace {

// Elements a task touches at least.
constexpr int64_t kGrainElements = 1 << 14;

int64_t grain_rows(int64_t num_features) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(num_features, 1));
}

// The plan as raw pointers, validated, and where the update of active row k lives: k itself
// (packed) or b * Kmax + (k - offsets[b]) (padded), b the sample of its flat row.
struct Plan {
  const int64_t* index;     // [K] flat row of every k
  const int64_t* row_to_k;  // [R] k of every row, -1 for a skipped row
  const int64_t* offsets;   // [B + 1]
  int64_t num_rows;         // R
  int64_t num_active;       // K
  int64_t num_samples;      // B
  int64_t rows_per_sample;  // R / B
  bool padded;
  int64_t max_count;  // Kmax (padded)
  int64_t num_slots;  // K (packed) or B * Kmax (padded)

  int64_t slot_of(int64_t row, int64_t k) const {
    if (!padded) return k;
    const int64_t sample = row / rows_per_sample;
    return sample * max_count + k - offsets[sample];
  }
};

Plan check_plan(const char* op, const at::Tensor& update, const at::Tensor& index,
                const at::Tensor& row_to_k, const at::Tensor& offsets, int64_t num_rows,
                int64_t num_features) {
  TORCH_CHECK(update.dim() == 2 || update.dim() == 3, op,
              ": the update must be [K, F] or [B, Kmax, F], got ", update.sizes());
  TORCH_CHECK(update.size(-1) == num_features, op, ": the update has ", update.size(-1),
              " features, expected ", num_features);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"index", index},
                                {"row_to_k", row_to_k},
                                {"offsets", offsets}}) {
    TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong && t.is_contiguous(), op, ": ", name,
                " must be a contiguous 1-D int64 tensor, got ", t.scalar_type(), " of shape ",
                t.sizes());
  }
  TORCH_CHECK(offsets.numel() >= 1, op, ": offsets must have B + 1 >= 1 entries");
  TORCH_CHECK(row_to_k.numel() == num_rows, op, ": row_to_k has ", row_to_k.numel(),
              " entries, x has ", num_rows, " rows");
  Plan plan{index.const_data_ptr<int64_t>(),
            row_to_k.const_data_ptr<int64_t>(),
            offsets.const_data_ptr<int64_t>(),
            num_rows,
            index.numel(),
            offsets.numel() - 1,
            0,
            update.dim() == 3,
            0,
            0};
  const int64_t samples = plan.num_samples;
  TORCH_CHECK(samples == 0 ? num_rows == 0 : num_rows % samples == 0, op, ": ", num_rows,
              " rows do not split into ", samples, " samples");
  plan.rows_per_sample = samples == 0 ? 0 : num_rows / samples;
  if (plan.padded) {
    TORCH_CHECK(update.size(0) == samples, op, ": the padded update has ", update.size(0),
                " samples, offsets ", samples);
    plan.max_count = update.size(1);
    plan.num_slots = update.size(0) * update.size(1);
    TORCH_CHECK(plan.max_count <= plan.rows_per_sample, op, ": the padded update has Kmax = ",
                plan.max_count, " slots per sample, more than its ", plan.rows_per_sample, " rows");
  } else {
    TORCH_CHECK(update.size(0) == plan.num_active, op, ": the update has ", update.size(0),
                " rows, index ", plan.num_active);
    plan.num_slots = plan.num_active;
  }
  // index: ascending row ids, each row's k recorded in row_to_k
  for (int64_t k = 0; k < plan.num_active; ++k) {
    const int64_t row = plan.index[k];
    TORCH_CHECK(row >= 0 && row < num_rows, op, ": index[", k, "] = ", row, " out of range [0, ",
                num_rows, ")");
    TORCH_CHECK(k == 0 || row > plan.index[k - 1], op, ": index must be strictly ascending");
    TORCH_CHECK(plan.row_to_k[row] == k, op, ": row_to_k[", row, "] = ", plan.row_to_k[row],
                ", expected ", k);
  }
  const int64_t mapped = std::count_if(plan.row_to_k, plan.row_to_k + num_rows,
                                       [](int64_t k) { return k != -1; });
  TORCH_CHECK(mapped == plan.num_active, op, ": row_to_k maps ", mapped, " rows, index has ",
              plan.num_active);
  // offsets: the exclusive cumulative count of every sample's active rows
  TORCH_CHECK(plan.offsets[0] == 0 && plan.offsets[samples] == plan.num_active, op,
              ": offsets must run from 0 to K = ", plan.num_active);
  for (int64_t b = 0; b < samples; ++b) {
    const int64_t lo = plan.offsets[b], hi = plan.offsets[b + 1];
    TORCH_CHECK(lo <= hi && hi <= plan.num_active && (!plan.padded || hi - lo <= plan.max_count),
                op, ": offsets[", b, ":", b + 2, "] = [", lo, ", ", hi,
                "] is not a count <= Kmax within [0, K]");
    TORCH_CHECK(lo == hi || (plan.index[lo] / plan.rows_per_sample == b &&
                             plan.index[hi - 1] / plan.rows_per_sample == b),
                op, ": offsets do not match the samples of index at sample ", b);
  }
  return plan;
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
void forward_kernel(const at::Tensor& x, const at::Tensor& update,
                    const std::optional<at::Tensor>& gate, const Plan& plan, bool from_output,
                    at::Tensor& out, at::Tensor& cos) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_features = x.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* update_data = update.const_data_ptr<scalar_t>();
  const acc_t* gate_data = gate ? gate->const_data_ptr<acc_t>() : nullptr;
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  float* cos_data = cos.numel() ? cos.mutable_data_ptr<float>() : nullptr;
  at::parallel_for(0, plan.num_rows, grain_rows(num_features), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* x_row = x_data + i * num_features;
      scalar_t* out_row = out_data + i * num_features;
      const int64_t k = plan.row_to_k[i];
      // inactive rows are copied bit-exactly (x + 0 would turn -0.0 into +0.0)
      if (k < 0) {
        std::memcpy(out_row, x_row, num_features * sizeof(scalar_t));
        continue;
      }
      const scalar_t* u_row = update_data + plan.slot_of(i, k) * num_features;
      const acc_t g = gate_data ? gate_data[k] : acc_t(1);
      // out = x + g * delta, delta = u or (from_output) u - x; cos(x, out) from the same pass
      acc_t x_dot_out = 0, x_sq = 0, out_sq = 0;
      for (int64_t j = 0; j < num_features; ++j) {
        const acc_t xv = static_cast<acc_t>(x_row[j]);
        const acc_t uv = static_cast<acc_t>(u_row[j]);
        const acc_t ov = xv + g * (from_output ? uv - xv : uv);
        out_row[j] = static_cast<scalar_t>(ov);
        x_dot_out += xv * ov;
        x_sq += xv * xv;
        out_sq += ov * ov;
      }
      if (cos_data) {
        const acc_t norms = std::sqrt(x_sq) * std::sqrt(out_sq);
        cos_data[k] = static_cast<float>(x_dot_out / std::max<acc_t>(norms, acc_t(1e-8)));
      }
    }
  });
}

// out[i] = x[i] + gate[k] * delta[k] for k = row_to_k[i] >= 0, out[i] = x[i] elsewhere; with
// `stats`, cos[k] = cos(x[i], out[i]) in fp32 (else cos is empty).
std::tuple<at::Tensor, at::Tensor> skip_residual_cpu(
    const at::Tensor& x_in, const at::Tensor& update_in, const at::Tensor& index,
    const at::Tensor& row_to_k, const at::Tensor& offsets, const std::optional<at::Tensor>& gate_in,
    bool stats, bool from_output) {
  constexpr const char* op = "sts::skip_residual";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be [R, F], got ", x_in.sizes());
  TORCH_CHECK(update_in.scalar_type() == x_in.scalar_type(), op,
              ": the update must have x's dtype ", x_in.scalar_type(), ", got ",
              update_in.scalar_type());
  const auto x = x_in.contiguous();
  const auto update = update_in.contiguous();
  const auto plan = check_plan(op, update, index.contiguous(), row_to_k.contiguous(),
                               offsets.contiguous(), x.size(0), x.size(1));
  const auto gate = gate_values(op, gate_in, plan.num_active, acc_type_of(x.scalar_type()));
  auto out = at::empty_like(x);
  auto cos = at::empty({stats ? plan.num_active : 0}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), op, [&] {
    forward_kernel<scalar_t>(x, update, gate, plan, from_output, out, cos);
  });
  return {out, cos};
}

// Residual form: walks the update slots (padding slots get zeros); grad_x is grad_out itself.
template <typename scalar_t>
void backward_delta_kernel(const at::Tensor& grad_out, const at::Tensor& delta,
                           const std::optional<at::Tensor>& gate, const Plan& plan,
                           at::Tensor& grad_delta, at::Tensor& grad_gate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_features = grad_out.size(1);
  const scalar_t* grad_out_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* delta_data = delta.const_data_ptr<scalar_t>();
  const acc_t* gate_data = gate ? gate->const_data_ptr<acc_t>() : nullptr;
  scalar_t* grad_delta_data = grad_delta.mutable_data_ptr<scalar_t>();
  acc_t* grad_gate_data = grad_gate.numel() ? grad_gate.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, plan.num_slots, grain_rows(num_features), [&](int64_t begin, int64_t end) {
    for (int64_t slot = begin; slot < end; ++slot) {
      scalar_t* grad_delta_row = grad_delta_data + slot * num_features;
      // the k of this slot; padding slots past a sample's count get zero gradient
      int64_t k = slot;
      if (plan.padded) {
        const int64_t sample = slot / plan.max_count;
        k = plan.offsets[sample] + slot % plan.max_count;
        if (k >= plan.offsets[sample + 1]) {
          std::fill(grad_delta_row, grad_delta_row + num_features, scalar_t(0));
          continue;
        }
      }
      const scalar_t* grad_out_row = grad_out_data + plan.index[k] * num_features;
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

// Output form: one walk over the R rows writes grad_x (grad_out, times 1 - g on active rows),
// grad_y and grad_gate. Padded: padding slot (b, j), counts[b] <= j < Kmax, is zeroed by row
// b * T + j (Kmax <= T: exactly one row per padding slot), so no separate zero fill.
template <typename scalar_t>
void backward_output_kernel(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& y,
                            const std::optional<at::Tensor>& gate, const Plan& plan,
                            at::Tensor& grad_x, at::Tensor& grad_y, at::Tensor& grad_gate) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_features = grad_out.size(1);
  const scalar_t* grad_out_data = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* y_data = y.const_data_ptr<scalar_t>();
  const acc_t* gate_data = gate ? gate->const_data_ptr<acc_t>() : nullptr;
  scalar_t* grad_x_data = grad_x.mutable_data_ptr<scalar_t>();
  scalar_t* grad_y_data = grad_y.mutable_data_ptr<scalar_t>();
  acc_t* grad_gate_data = grad_gate.numel() ? grad_gate.mutable_data_ptr<acc_t>() : nullptr;
  at::parallel_for(0, plan.num_rows, grain_rows(num_features), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* grad_out_row = grad_out_data + i * num_features;
      scalar_t* grad_x_row = grad_x_data + i * num_features;
      const int64_t k = plan.row_to_k[i];
      if (plan.padded) {
        const int64_t sample = i / plan.rows_per_sample, t = i % plan.rows_per_sample;
        if (t >= plan.offsets[sample + 1] - plan.offsets[sample] && t < plan.max_count) {
          scalar_t* pad_row = grad_y_data + (sample * plan.max_count + t) * num_features;
          std::fill(pad_row, pad_row + num_features, scalar_t(0));
        }
      }
      if (k < 0) {
        std::memcpy(grad_x_row, grad_out_row, num_features * sizeof(scalar_t));
        continue;
      }
      const int64_t slot = plan.slot_of(i, k);
      const scalar_t* x_row = x_data + i * num_features;
      const scalar_t* y_row = y_data + slot * num_features;
      scalar_t* grad_y_row = grad_y_data + slot * num_features;
      const acc_t g = gate_data ? gate_data[k] : acc_t(1);
      acc_t dot = 0;
      for (int64_t j = 0; j < num_features; ++j) {
        const acc_t go = static_cast<acc_t>(grad_out_row[j]);
        grad_x_row[j] = static_cast<scalar_t>(go - g * go);
        grad_y_row[j] = static_cast<scalar_t>(g * go);
        if (grad_gate_data) {
          dot += go * (static_cast<acc_t>(y_row[j]) - static_cast<acc_t>(x_row[j]));
        }
      }
      if (grad_gate_data) grad_gate_data[k] = dot;
    }
  });
}

// (grad_x, grad_update, grad_gate). Residual form: grad_x is empty (it is grad_out itself),
// grad_delta[k] = gate[k] * grad_out[index[k]]. Output form: grad_x[i] = (1 - gate[k]) *
// grad_out[i] on active rows and grad_out[i] elsewhere, grad_y[k] = gate[k] * grad_out[i].
// Padding slots get zeros. grad_gate[k] = <grad_out[i], delta[k]> in gate's dtype when asked
// and there is a gate, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> skip_residual_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& x_in,
    const at::Tensor& update_in, const at::Tensor& index, const at::Tensor& row_to_k,
    const at::Tensor& offsets, const std::optional<at::Tensor>& gate_in, bool need_grad_gate,
    bool from_output) {
  constexpr const char* op = "sts::skip_residual_backward";
  TORCH_CHECK(grad_out_in.dim() == 2, op, ": grad_out must be [R, F], got ", grad_out_in.sizes());
  TORCH_CHECK(grad_out_in.scalar_type() == update_in.scalar_type(), op,
              ": grad_out must have the update's dtype ", update_in.scalar_type(), ", got ",
              grad_out_in.scalar_type());
  TORCH_CHECK(!from_output || (x_in.has_value() && x_in->sizes() == grad_out_in.sizes() &&
                               x_in->scalar_type() == grad_out_in.scalar_type()),
              op, ": from_output needs x shaped and typed like grad_out");
  const auto grad_out = grad_out_in.contiguous();
  const auto update = update_in.contiguous();
  const auto plan = check_plan(op, update, index.contiguous(), row_to_k.contiguous(),
                               offsets.contiguous(), grad_out.size(0), grad_out.size(1));
  const auto acc_type = acc_type_of(update.scalar_type());
  const auto gate = gate_values(op, gate_in, plan.num_active, acc_type);
  need_grad_gate = need_grad_gate && gate.has_value();
  auto grad_gate_acc = at::empty({need_grad_gate ? plan.num_active : 0},
                                 update.options().dtype(acc_type));
  at::Tensor grad_x, grad_update;
  if (from_output) {
    const auto x = x_in->contiguous();
    grad_x = at::empty_like(grad_out);
    grad_update = at::empty_like(update);  // the row walk zeroes the padding slots too
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, update.scalar_type(), op, [&] {
      backward_output_kernel<scalar_t>(grad_out, x, update, gate, plan, grad_x, grad_update,
                                       grad_gate_acc);
    });
  } else {
    grad_x = grad_out.new_empty({0, grad_out.size(1)});
    grad_update = at::empty_like(update);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, update.scalar_type(), op, [&] {
      backward_delta_kernel<scalar_t>(grad_out, update, gate, plan, grad_update, grad_gate_acc);
    });
  }
  const auto gate_dtype = gate_in.has_value() ? gate_in->scalar_type() : at::kFloat;
  return {grad_x, grad_update, grad_gate_acc.to(gate_dtype)};
}

}  // namespace
}  // namespace sts

TORCH_LIBRARY_IMPL(sts, CPU, m) {
  m.impl("skip_residual", &sts::skip_residual_cpu);
  m.impl("skip_residual_backward", &sts::skip_residual_backward_cpu);
}
