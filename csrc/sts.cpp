// The `sts` operator library (schemas), shared op plumbing and the Python module
// `sts_kernels._C`, whose import registers the ops.
#include <torch/extension.h>
#include <torch/version.h>  // TORCH_VERSION; the portable path (api/include) in every torch 2.x

#ifdef _OPENMP
#include <omp.h>
#endif

#include "sts.h"

namespace sts {

void check_mask(const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "sts::route: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 1 || mask.dim() == 2, "sts::route: mask must be [B] or [B, T], got ",
              mask.sizes());
}

int64_t row_bytes(const at::Tensor& t) {
  return c10::multiply_integers(t.sizes().slice(1)) * static_cast<int64_t>(t.element_size());
}

namespace {

void check_rows(const char* op, const at::Tensor& data, const at::Tensor& rows) {
  TORCH_CHECK(data.dim() >= 1, op, ": the row tensor needs at least 1 dim, got a 0-dim tensor");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, op,
              ": rows must be a 1-D int64 tensor, got ", rows.scalar_type(), " of shape ",
              rows.sizes());
  TORCH_CHECK(rows.device() == data.device(), op, ": rows is on ", rows.device(),
              " but the data is on ", data.device());
}

}  // namespace

void check_add_rows(const at::Tensor& dst, const at::Tensor& ids, const at::Tensor& src) {
  check_rows("sts::add_rows", src, ids);
  TORCH_CHECK(dst.dim() >= 1 && dst.is_contiguous(), "sts::add_rows: dst must be a contiguous "
              "tensor of at least 1 dim (it is updated in place), got shape ", dst.sizes());
  TORCH_CHECK(at::isFloatingType(dst.scalar_type()), "sts::add_rows: dst must be floating "
              "point, got ", dst.scalar_type());
  TORCH_CHECK(src.scalar_type() == dst.scalar_type() && src.device() == dst.device(),
              "sts::add_rows: src (", src.scalar_type(), " on ", src.device(),
              ") must match dst (", dst.scalar_type(), " on ", dst.device(), ")");
  TORCH_CHECK(src.size(0) == ids.size(0), "sts::add_rows: src has ", src.size(0),
              " rows but ids has ", ids.size(0), " entries");
  TORCH_CHECK(src.sizes().slice(1) == dst.sizes().slice(1), "sts::add_rows: src rows ",
              src.sizes().slice(1), " differ from dst rows ", dst.sizes().slice(1));
}

at::Tensor gather_rows_with(CopyRowsFn copy_rows, const at::Tensor& x, const at::Tensor& rows) {
  check_rows("sts::gather_rows", x, rows);
  const auto src = x.contiguous();
  auto sizes = src.sizes().vec();
  sizes[0] = rows.size(0);
  auto out = at::empty(sizes, src.options());
  copy_rows(src, out, rows.contiguous(), /*scatter=*/false);
  return out;
}

at::Tensor scatter_rows_with(CopyRowsFn copy_rows, const at::Tensor& src, const at::Tensor& rows,
                             int64_t num_rows) {
  check_rows("sts::scatter_rows", src, rows);
  TORCH_CHECK(src.size(0) == rows.size(0), "sts::scatter_rows: src has ", src.size(0),
              " rows but rows has ", rows.size(0), " entries");
  TORCH_CHECK(num_rows >= 0, "sts::scatter_rows: num_rows must be >= 0, got ", num_rows);
  const auto packed = src.contiguous();
  auto sizes = packed.sizes().vec();
  sizes[0] = num_rows;
  // Rows that no source row lands on must read exactly zero (the gradient of unrouted rows).
  auto out = at::zeros(sizes, packed.options());
  copy_rows(packed, out, rows.contiguous(), /*scatter=*/true);
  return out;
}

#ifndef STS_WITH_CUDA
std::vector<std::string> cuda_archs() { return {}; }
#endif

namespace {

std::string compiler() {
#if defined(__clang__)
  return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  return std::string("gcc ") + __VERSION__;
#else
  return "unknown";
#endif
}

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef STS_WITH_CUDA
  info["with_cuda"] = true;
#else
  info["with_cuda"] = false;
#endif
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  info["cuda_archs"] = cuda_archs();
  info["compiler"] = compiler();
  info["torch_version"] = TORCH_VERSION;
  return info;
}

}  // namespace
}  // namespace sts

TORCH_LIBRARY(sts, m) {
  // row_to_k: [R] the k of every row, -1 for a skipped row (the inverse of index);
  // padded_index: [B, Kmax] each sample's active rows, -1 past its count (Kmax = its width)
  m.def(
      "route(Tensor mask) -> (Tensor index, Tensor counts, Tensor offsets, Tensor row_to_k, "
      "Tensor padded_index)");
  m.def("gather_rows(Tensor x, Tensor rows) -> Tensor");
  m.def("scatter_rows(Tensor src, Tensor rows, SymInt num_rows) -> Tensor");
  // dst[ids[k]] += src[k] in place for ids in [0, R), other ids (-1) skipped: the gather's
  // backward adding the routed rows' gradient into a fresh grad_x (CPU only: Triton on GPUs)
  m.def("add_rows(Tensor(a!) dst, Tensor ids, Tensor src) -> ()");
  // skip_residual on canonical rows: x [R, F], the update (delta, or with from_output the
  // layer's output y) [K, F] or [B, Kmax, F] (CPU only: Triton serves GPUs). Returns (out, cos)
  // and (grad_x, grad_update, grad_gate); grad_x is empty in the residual form (= grad_out).
  m.def(
      "skip_residual(Tensor x, Tensor update, Tensor index, Tensor row_to_k, "
      "Tensor offsets, Tensor? gate, bool stats, bool from_output) -> (Tensor, Tensor)");
  m.def(
      "skip_residual_backward(Tensor grad_out, Tensor? x, Tensor update, Tensor index, "
      "Tensor row_to_k, Tensor offsets, Tensor? gate, bool need_grad_gate, bool from_output) "
      "-> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "sts_kernels C++/CUDA ops; importing this module registers torch.ops.sts.*";
  module.def("build_info", &sts::build_info,
             "How the extension was built: with_cuda, cuda_archs, openmp, omp_max_threads, "
             "compiler, torch_version");
}
