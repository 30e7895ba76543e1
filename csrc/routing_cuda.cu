// CUDA kernels of the routing ops. Compiled only when setup.py builds with CUDA
// (STS_WITH_CUDA).
// c10/cuda headers only, not ATen/cuda/CUDAContext.h: that one pulls in cuBLAS/cuSPARSE
// headers, which a minimal CUDA toolkit lacks, and slows the compile.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "sts.h"

namespace sts {

// Defined in routing_cpu.cpp (compiled in every build): sts::gather_rows / sts::scatter_rows
// for both layouts of `rows`, 1-D ids through `flat`, the 2-D padded layout through `padded`.
at::Tensor gather_rows_by_layout(CopyRowsFn flat, CopyRowsFn padded, const at::Tensor& x,
                                 const at::Tensor& rows);
at::Tensor scatter_rows_by_layout(CopyRowsFn flat, CopyRowsFn padded, const at::Tensor& src,
                                  const at::Tensor& rows, int64_t num_rows);

std::vector<std::string> cuda_archs() {
  std::vector<std::string> archs;
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines it as the compiled architectures, e.g. 800,900.
  for (int arch : {__CUDA_ARCH_LIST__}) archs.push_back("sm_" + std::to_string(arch / 10));
#endif
  return archs;
}

namespace {

constexpr int kThreads = 256;

// Scatters each active row id to its slot k = (inclusive prefix count at i) - 1: index[k],
// the inverse map row_to_k (-1 for a skipped row) and its place in the padded layout; the
// padded layout's slots past each sample's count get -1. One grid-stride loop over
// max(R, B * Kmax) items.
__global__ void compact_kernel(const bool* __restrict__ flags, const int64_t* __restrict__ inclusive,
                               const int64_t* __restrict__ offsets, int64_t num_rows,
                               int64_t per_sample, int64_t samples, int64_t max_count,
                               int64_t* __restrict__ index, int64_t* __restrict__ row_to_k,
                               int64_t* __restrict__ padded) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t slots = samples * max_count;
  const int64_t work = num_rows > slots ? num_rows : slots;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < work;
       i += stride) {
    if (i < num_rows) {  // per_sample >= 1 here
      const int64_t k = flags[i] ? inclusive[i] - 1 : -1;
      row_to_k[i] = k;
      if (k >= 0) {
        const int64_t b = i / per_sample;
        index[k] = i;
        padded[b * max_count + k - offsets[b]] = i;
      }
    }
    if (i < slots) {  // max_count >= 1 here
      const int64_t b = i / max_count;
      if (i % max_count >= offsets[b + 1] - offsets[b]) padded[i] = -1;
    }
  }
}

// One block: offsets[b] = active rows before sample b's first row and counts[b], read off
// the inclusive prefix count, and sizes = {K, Kmax}, which the host reads in one copy.
__global__ void sample_offsets_kernel(const int64_t* __restrict__ inclusive, int64_t samples,
                                      int64_t per_sample, int64_t* __restrict__ offsets,
                                      int64_t* __restrict__ counts, int64_t* __restrict__ sizes) {
  __shared__ int64_t block_max[kThreads];
  const auto before = [&](int64_t b) { return b * per_sample == 0 ? 0 : inclusive[b * per_sample - 1]; };
  int64_t local_max = 0;
  for (int64_t b = threadIdx.x; b <= samples; b += blockDim.x) {
    offsets[b] = before(b);
    if (b < samples) {
      const int64_t count = before(b + 1) - before(b);
      counts[b] = count;
      local_max = count > local_max ? count : local_max;
    }
  }
  // tree reduction of the per-thread maxima
  block_max[threadIdx.x] = local_max;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride && block_max[threadIdx.x + stride] > block_max[threadIdx.x]) {
      block_max[threadIdx.x] = block_max[threadIdx.x + stride];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    sizes[0] = before(samples);
    sizes[1] = block_max[0];
  }
}

// Multiprocessors of the current device, queried once per device (not once per launch).
int sm_count() {
  static std::mutex mutex;
  static std::unordered_map<int, int> cache;
  const int device = c10::cuda::current_device();
  const std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it == cache.end()) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    it = cache.emplace(device, sms).first;
  }
  return it->second;
}

// Blocks for `work` items at `per_block` each, capped at 16 per SM (the loops grid-stride).
int64_t grid_for(int64_t work, int64_t per_block) {
  const int64_t max_blocks = int64_t{sm_count()} * 16;
  return std::max<int64_t>(1, std::min(max_blocks, (work + per_block - 1) / per_block));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> route_cuda(
    const at::Tensor& mask) {
  check_mask(mask);
  const c10::cuda::CUDAGuard guard(mask.device());
  const auto flat = mask.contiguous();
  const int64_t num_rows = flat.numel();
  const int64_t samples = flat.size(0);
  const int64_t per_sample = samples == 0 ? 0 : num_rows / samples;
  const auto long_opts = flat.options().dtype(at::kLong);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  const auto inclusive = at::cumsum(flat.view({-1}), 0, at::kLong);  // [R] device-wide scan
  auto offsets = at::empty({samples + 1}, long_opts);
  auto counts = at::empty({samples}, long_opts);
  auto sizes = at::empty({2}, long_opts);
  sample_offsets_kernel<<<1, kThreads, 0, stream>>>(inclusive.data_ptr<int64_t>(), samples,
                                                    per_sample, offsets.data_ptr<int64_t>(),
                                                    counts.data_ptr<int64_t>(),
                                                    sizes.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // The one host synchronisation: K sizes the index, Kmax the padded layout, one copy.
  const auto host_sizes = sizes.cpu();
  const int64_t active = host_sizes.data_ptr<int64_t>()[0];
  const int64_t max_count = host_sizes.data_ptr<int64_t>()[1];
  auto index = at::empty({active}, long_opts);
  auto row_to_k = at::empty({num_rows}, long_opts);
  auto padded_index = at::empty({samples, max_count}, long_opts);
  const int64_t work = std::max(num_rows, padded_index.numel());
  if (work > 0) {
    compact_kernel<<<grid_for(work, kThreads), kThreads, 0, stream>>>(
        flat.data_ptr<bool>(), inclusive.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
        num_rows, per_sample, samples, max_count, index.data_ptr<int64_t>(),
        row_to_k.data_ptr<int64_t>(), padded_index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {index, counts, offsets, row_to_k, padded_index};
}

// Row copy in units of `Vec` (16 bytes when rows and pointers allow): threadIdx.x walks a
// row's vectors, threadIdx.y picks one of the block's rows, blocks stride over the rows.
// An id outside [0, bound) is never read through or written to (no device-side assert,
// which would kill the CUDA context; the Python ops validate ids on the host under
// STS_DEBUG=1): the scatter skips it, the gather fills its row with `poison` (NaN bytes for
// floats), except -1 in the padded layout (kPadded), a padding slot, which gets a zero row.
template <typename Vec, bool kScatter, bool kPadded>
__global__ void copy_rows_kernel(const Vec* __restrict__ src, Vec* __restrict__ dst,
                                 const int64_t* __restrict__ rows, int64_t num_ids,
                                 int64_t row_vecs, int64_t bound, Vec poison) {
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.y) + threadIdx.y; k < num_ids;
       k += row_stride) {
    const int64_t row = rows[k];
    const bool valid = row >= 0 && row < bound;
    if (kScatter) {
      if (!valid) continue;
      const Vec* from = src + k * row_vecs;
      Vec* to = dst + row * row_vecs;
      for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) to[j] = from[j];
    } else {
      Vec* to = dst + k * row_vecs;
      if (!valid) {
        const Vec fill = kPadded && row == -1 ? Vec{} : poison;
        for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) to[j] = fill;
      } else {
        const Vec* from = src + row * row_vecs;
        for (int64_t j = threadIdx.x; j < row_vecs; j += blockDim.x) to[j] = from[j];
      }
    }
  }
}

// The byte that fills a gathered row whose id is malformed: all bits set, a NaN in every
// floating dtype of 2 or more bytes (complex too), -1 in signed integers, the maximum in
// unsigned ones; a float8 dtype's own NaN byte; 1 (True) for bool. The same byte everywhere,
// so a vector of any width holds the pattern wherever it starts (as the Triton kernel's
// `_poison_byte` in sts_kernels/ops/routing.py).
uint8_t poison_byte(at::ScalarType dtype) {
  if (dtype == at::kBool) return 1;
  if (at::isFloatingType(dtype) && at::elementSize(dtype) == 1) {  // float8: its own NaN byte
    const auto nan = at::scalar_tensor(std::numeric_limits<float>::quiet_NaN()).to(dtype);
    return *static_cast<const uint8_t*>(nan.data_ptr());
  }
  return 0xFF;
}

template <typename Vec, bool kPadded>
void launch_copy_rows(const at::Tensor& src, at::Tensor& dst, const at::Tensor& rows,
                      bool scatter, int64_t bytes) {
  const int64_t row_vecs = bytes / static_cast<int64_t>(sizeof(Vec));
  int lanes = 1;
  while (lanes < kThreads && lanes < row_vecs) lanes *= 2;
  const dim3 block(lanes, kThreads / lanes);
  const int64_t num_ids = rows.numel();
  const int64_t grid = grid_for(num_ids, block.y);
  const int64_t bound = scatter ? dst.size(0) : src.size(0);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto* from = static_cast<const Vec*>(src.data_ptr());
  auto* to = static_cast<Vec*>(dst.data_ptr());
  const auto* ids = rows.data_ptr<int64_t>();
  if (scatter) {
    // the scatter writes nothing for any id outside [0, bound): one kernel for both layouts
    copy_rows_kernel<Vec, true, false>
        <<<grid, block, 0, stream>>>(from, to, ids, num_ids, row_vecs, bound, Vec{});
  } else {
    Vec poison;
    std::memset(&poison, poison_byte(src.scalar_type()), sizeof(Vec));
    copy_rows_kernel<Vec, false, kPadded>
        <<<grid, block, 0, stream>>>(from, to, ids, num_ids, row_vecs, bound, poison);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// kPadded: `rows` are the padded layout's (-1: a padding slot), else a plan's index.
template <bool kPadded>
void copy_rows_cuda(const at::Tensor& src, at::Tensor& dst, const at::Tensor& rows, bool scatter) {
  const int64_t bytes = row_bytes(src);
  if (rows.numel() == 0 || bytes == 0) return;
  const c10::cuda::CUDAGuard guard(src.device());
  const auto src_addr = reinterpret_cast<std::uintptr_t>(src.data_ptr());
  const auto dst_addr = reinterpret_cast<std::uintptr_t>(dst.data_ptr());
  // The widest access that every row start in both tensors is aligned to.
  const auto fits = [&](int64_t width) {
    return bytes % width == 0 && src_addr % width == 0 && dst_addr % width == 0;
  };
  if (fits(16)) {
    launch_copy_rows<uint4, kPadded>(src, dst, rows, scatter, bytes);
  } else if (fits(8)) {
    launch_copy_rows<uint2, kPadded>(src, dst, rows, scatter, bytes);
  } else if (fits(4)) {
    launch_copy_rows<uint32_t, kPadded>(src, dst, rows, scatter, bytes);
  } else if (fits(2)) {
    launch_copy_rows<uint16_t, kPadded>(src, dst, rows, scatter, bytes);
  } else {
    launch_copy_rows<uint8_t, kPadded>(src, dst, rows, scatter, bytes);
  }
}

at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& rows) {
  return gather_rows_by_layout(copy_rows_cuda<false>, copy_rows_cuda<true>, x, rows);
}

at::Tensor scatter_rows_cuda(const at::Tensor& src, const at::Tensor& rows, int64_t num_rows) {
  return scatter_rows_by_layout(copy_rows_cuda<false>, copy_rows_cuda<true>, src, rows, num_rows);
}

}  // namespace
}  // namespace sts

TORCH_LIBRARY_IMPL(sts, CUDA, m) {
  m.impl("route", &sts::route_cuda);
  m.impl("gather_rows", &sts::gather_rows_cuda);
  m.impl("scatter_rows", &sts::scatter_rows_cuda);
}
