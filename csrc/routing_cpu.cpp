// CPU kernels of the routing ops, parallel with OpenMP through at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "sts.h"

namespace sts {
namespace {

// Rows per block of the compaction: big enough to amortise a task, small enough to balance.
constexpr int64_t kRouteBlock = 1 << 14;
// Bytes a row-copy task moves at least.
constexpr int64_t kCopyGrainBytes = 1 << 16;

// Stream compaction in three passes: per-block counts (parallel), exclusive scan of the block
// counts (serial, one entry per block), ids and the row -> k map written from each block's
// start (parallel).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cpu(
    const at::Tensor& mask) {
  check_mask(mask);
  const auto flat = mask.contiguous();
  const bool* flags = flat.data_ptr<bool>();
  const int64_t num_rows = flat.numel();
  const int64_t samples = flat.size(0);
  const int64_t per_sample = samples == 0 ? 0 : num_rows / samples;
  const int64_t blocks = (num_rows + kRouteBlock - 1) / kRouteBlock;

  std::vector<int64_t> block_start(blocks + 1, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t lo = blk * kRouteBlock, hi = std::min(num_rows, lo + kRouteBlock);
      block_start[blk + 1] = std::count(flags + lo, flags + hi, true);
    }
  });
  std::partial_sum(block_start.begin(), block_start.end(), block_start.begin());

  const auto long_opts = flat.options().dtype(at::kLong);
  const int64_t active = block_start[blocks];
  auto index = at::empty({active}, long_opts);
  auto row_to_k = at::empty({num_rows}, long_opts);
  int64_t* ids = index.data_ptr<int64_t>();
  int64_t* ks = row_to_k.data_ptr<int64_t>();
  // ids of the active rows and the inverse map row -> k (-1 for a skipped row), one pass
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      int64_t out = block_start[blk];
      const int64_t lo = blk * kRouteBlock, hi = std::min(num_rows, lo + kRouteBlock);
      for (int64_t i = lo; i < hi; ++i) {
        ks[i] = flags[i] ? out : -1;
        if (flags[i]) ids[out++] = i;
      }
    }
  });

  // offsets[b] = active rows before sample b's first row: a binary search in the sorted ids.
  auto offsets = at::empty({samples + 1}, long_opts);
  int64_t* off = offsets.data_ptr<int64_t>();
  at::parallel_for(0, samples + 1, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      off[b] = std::lower_bound(ids, ids + active, b * per_sample) - ids;
    }
  });
  auto counts = offsets.narrow(0, 1, samples) - offsets.narrow(0, 0, samples);

  // padded_index[b, j] = the j-th active row of sample b, -1 past its count: Kmax is its width
  int64_t max_count = 0;
  for (int64_t b = 0; b < samples; ++b) max_count = std::max(max_count, off[b + 1] - off[b]);
  auto padded_index = at::empty({samples, max_count}, long_opts);
  int64_t* padded = padded_index.data_ptr<int64_t>();
  at::parallel_for(0, samples, std::max<int64_t>(1, 4096 / std::max<int64_t>(max_count, 1)),
                   [&](int64_t begin, int64_t end) {
                     for (int64_t b = begin; b < end; ++b) {
                       for (int64_t j = 0; j < max_count; ++j) {
                         padded[b * max_count + j] = off[b] + j < off[b + 1] ? ids[off[b] + j] : -1;
                       }
                     }
                   });
  return {index, counts, offsets, row_to_k, padded_index};
}

// Raises naming `op` and the first malformed id of the 1-D `rows` (flat ids: outside
// [0, bound); padded: outside [0, bound) and not -1), if any: on the host, before any
// parallel region (an exception thrown inside at::parallel_for terminates the process). One
// serial min/max pass over 8-byte ids, cheap next to the copy.
void check_ids(const char* op, const at::Tensor& rows, int64_t bound, bool padded) {
  const int64_t* ids = rows.data_ptr<int64_t>();
  const int64_t count = rows.numel();
  const int64_t lowest = padded ? -1 : 0;
  if (count == 0) return;
  const auto [min_id, max_id] = std::minmax_element(ids, ids + count);
  if (*min_id >= lowest && *max_id < bound) return;
  const int64_t k =
      std::find_if(ids, ids + count, [&](int64_t id) { return id < lowest || id >= bound; }) - ids;
  if (padded) {
    TORCH_CHECK(false, op, ": rows[", k, "] = ", ids[k], " (flat position in the padded layout) ",
                "is neither a row id in [0, ", bound, ") nor -1 (a padding slot)");
  }
  TORCH_CHECK(false, op, ": rows[", k, "] = ", ids[k], " is not a row id in [0, ", bound,
              ") (1-D rows: every id names a row; -1 marks padding only in the 2-D padded "
              "layout)");
}

// Row copy through 1-D `rows`. kPadded: the ids of the padded layout, where -1 marks a
// padding slot (a zero row in the gather, nothing in the scatter); otherwise every id must
// name a row. Any other id raises, before anything is written.
template <bool kPadded>
void copy_rows_cpu(const at::Tensor& src, at::Tensor& dst, const at::Tensor& rows, bool scatter) {
  const int64_t bytes = row_bytes(src);
  const int64_t bound = scatter ? dst.size(0) : src.size(0);
  const char* from = static_cast<const char*>(src.data_ptr());
  char* to = static_cast<char*>(dst.data_ptr());
  const int64_t* ids = rows.data_ptr<int64_t>();
  check_ids(scatter ? "sts::scatter_rows" : "sts::gather_rows", rows, bound, kPadded);
  const int64_t grain = std::max<int64_t>(1, kCopyGrainBytes / std::max<int64_t>(bytes, 1));
  at::parallel_for(0, rows.numel(), grain, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t row = ids[k];
      if (scatter) {
        if (row >= 0) std::memcpy(to + row * bytes, from + k * bytes, bytes);
      } else if (row >= 0) {
        std::memcpy(to + k * bytes, from + row * bytes, bytes);
      } else {
        std::memset(to + k * bytes, 0, bytes);
      }
    }
  });
}

// `rows` of sts::gather_rows / sts::scatter_rows: 1-D (a plan's index) or 2-D (its
// padded_index [B, Kmax]), int64.
void check_rows_layout(const char* op, const at::Tensor& rows) {
  TORCH_CHECK((rows.dim() == 1 || rows.dim() == 2) && rows.scalar_type() == at::kLong, op,
              ": rows must be a 1-D int64 tensor of row ids or a 2-D one (the padded layout "
              "[B, Kmax], -1 = padding), got ",
              rows.scalar_type(), " of shape ", rows.sizes());
}

}  // namespace

// sts::gather_rows / sts::scatter_rows on a device, for both layouts of `rows`: 1-D ids
// through `flat`, the 2-D padded layout flattened through `padded` (out / src
// [*rows.shape, ...]). Shared with routing_cuda.cu (declared there).
at::Tensor gather_rows_by_layout(CopyRowsFn flat, CopyRowsFn padded, const at::Tensor& x,
                                 const at::Tensor& rows) {
  check_rows_layout("sts::gather_rows", rows);
  if (rows.dim() == 1) return gather_rows_with(flat, x, rows);
  auto out = gather_rows_with(padded, x, rows.reshape({-1}));
  auto sizes = rows.sizes().vec();
  sizes.insert(sizes.end(), out.sizes().begin() + 1, out.sizes().end());
  return out.view(sizes);
}

at::Tensor scatter_rows_by_layout(CopyRowsFn flat, CopyRowsFn padded, const at::Tensor& src,
                                  const at::Tensor& rows, int64_t num_rows) {
  check_rows_layout("sts::scatter_rows", rows);
  if (rows.dim() == 1) return scatter_rows_with(flat, src, rows, num_rows);
  TORCH_CHECK(src.dim() >= 2 && src.sizes().slice(0, 2) == rows.sizes(),
              "sts::scatter_rows: src must start with rows' shape ", rows.sizes(), ", got ",
              src.sizes());
  auto sizes = src.sizes().slice(1).vec();
  sizes[0] = rows.numel();
  return scatter_rows_with(padded, src.reshape(sizes), rows.reshape({-1}), num_rows);
}

namespace {

at::Tensor gather_rows_cpu(const at::Tensor& x, const at::Tensor& rows) {
  return gather_rows_by_layout(copy_rows_cpu<false>, copy_rows_cpu<true>, x, rows);
}

at::Tensor scatter_rows_cpu(const at::Tensor& src, const at::Tensor& rows, int64_t num_rows) {
  return scatter_rows_by_layout(copy_rows_cpu<false>, copy_rows_cpu<true>, src, rows, num_rows);
}

// dst[ids[k]] += src[k] for every id in [0, R); other ids (-1: a padding slot) are skipped,
// their source rows never read. Valid ids are unique (a plan's rows), so rows go to tasks
// without locks; the sum is formed in fp32 (fp64 for fp64) and rounded once.
void add_rows_cpu(at::Tensor& dst, const at::Tensor& ids, const at::Tensor& src) {
  check_add_rows(dst, ids, src);
  const auto packed = src.contiguous();
  const int64_t num_rows = dst.size(0);
  const int64_t cols = dst.numel() / std::max<int64_t>(num_rows, 1);
  const int64_t* rows = ids.contiguous().data_ptr<int64_t>();
  const int64_t grain = std::max<int64_t>(1, kCopyGrainBytes / std::max<int64_t>(row_bytes(dst), 1));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dst.scalar_type(), "sts::add_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* to = dst.data_ptr<scalar_t>();
    const scalar_t* from = packed.data_ptr<scalar_t>();
    at::parallel_for(0, ids.numel(), grain, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        const int64_t row = rows[k];
        if (row < 0 || row >= num_rows) continue;
        scalar_t* out = to + row * cols;
        const scalar_t* add = from + k * cols;
        for (int64_t c = 0; c < cols; ++c) {
          out[c] = static_cast<scalar_t>(static_cast<acc_t>(out[c]) + static_cast<acc_t>(add[c]));
        }
      }
    });
  });
}

}  // namespace
}  // namespace sts

TORCH_LIBRARY_IMPL(sts, CPU, m) {
  m.impl("add_rows", &sts::add_rows_cpu);
  m.impl("route", &sts::route_cpu);
  m.impl("gather_rows", &sts::gather_rows_cpu);
  m.impl("scatter_rows", &sts::scatter_rows_cpu);
}
