// Shared declarations of the sts extension: op schemas live in sts.cpp, the CPU kernels in
// routing_cpu.cpp and skip_residual_cpu.cpp, the CUDA kernels in routing_cuda.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <vector>

namespace sts {

// Copies whole rows of `src` ([R_src, ...] contiguous) into `dst` ([R_dst, ...] contiguous)
// as bytes. Gather (`scatter == false`): dst row k <- src row rows[k]; -1 in padded ids
// ([B, Kmax]) is a zero row, any other id outside the rows an error (C++) or a NaN row (CUDA).
// Scatter (`scatter == true`): dst row rows[k] <- src row k, skipping -1 (rows are unique).
using CopyRowsFn = void (*)(const at::Tensor& src, at::Tensor& dst, const at::Tensor& rows,
                            bool scatter);

// Validates `mask` for `sts::route`: bool, [B] or [B, T].
void check_mask(const at::Tensor& mask);

// Validates the arguments of `sts::add_rows(dst, ids, src)` (`dst[ids[k]] += src[k]`): dst
// contiguous [R, ...] of a floating dtype, ids 1-D int64 with one entry per row of src,
// src [len(ids), ...] like dst's rows, everything on one device.
void check_add_rows(const at::Tensor& dst, const at::Tensor& ids, const at::Tensor& src);

// `sts::gather_rows` / `sts::scatter_rows` around a device's row copy: checks, contiguous
// inputs, output allocation.
at::Tensor gather_rows_with(CopyRowsFn copy_rows, const at::Tensor& x, const at::Tensor& rows);
at::Tensor scatter_rows_with(CopyRowsFn copy_rows, const at::Tensor& src, const at::Tensor& rows,
                             int64_t num_rows);

// Bytes of one row: the product of the sizes after dim 0 times the element size.
int64_t row_bytes(const at::Tensor& t);

// GPU architectures the CUDA sources were compiled for, e.g. {"sm_80", "sm_90"}; empty
// without CUDA.
std::vector<std::string> cuda_archs();

}  // namespace sts
