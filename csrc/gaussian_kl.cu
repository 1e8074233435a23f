// Fused diagonal-Gaussian sampling with forward and reverse KL: the CUDA backend of
// ak.gaussian_sample_kl / ak.gaussian_sample, same semantics as the Triton kernels in
// amvl_kernels/gaussian_kl.py.
//
// Forward work split: a row (one latent slot) is owned by `tpr` threads: a power of two up
// to 32, whole warps past that (layout_for).
// Each thread walks the row in chunks of kChunk consecutive columns, tpr * kChunk columns
// apart, so any d works (d = 1 up to d > 65536). With tpr <= 32 a block holds kBlockFwd / tpr
// rows and the per-row KL sums reduce with shuffles inside aligned lane groups; with tpr > 32
// a block is one row and reduces through shared memory.
//
// The backward is elementwise once a row's upstream KL gradients are known, so it needs no row
// owner: its threads deal out the (row, chunk) pairs of the whole tensor in row-major order,
// one flat index, from a grid that the GPU holds at once. A warp then reads 32 consecutive
// chunks whatever d is, no thread slot idles at the end of a row (d = 3584 left an eighth of
// them idle when blocks owned a row's span), and, by default, no block is launched for a
// single chunk per thread (AMVL_GAUSSIAN_BWD_WAVES).
//
// Numerics follow the Triton path: loads widened to fp32 (fp64 inputs stay fp64), z and
// gradients rounded once to the storage dtype, KLs kept in the accumulation dtype. Noise is
// Philox4x32-10 + Box-Muller keyed by (seed, row-major element index), see philox.cuh; the
// Triton kernels group four columns of a row instead, so a seed gives different z on the two.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "gaussian_kl.h"
#include "philox.cuh"

namespace amvl {
namespace {

// Launch shape. The macros exist for scripts/sweep_cuda_gaussian.py, which builds the module
// with other values and times them side by side; a plain build never sets them. The blocks
// per SM promised to __launch_bounds__ cap the registers: left alone, ptxas gave the bf16
// backward 138 registers, one block of 256 threads per SM, and the GPU sat waiting on memory.
// The defaults were the fastest of the shapes the sweep timed on an H100 (RESULTS.md, run 4).
#ifndef AMVL_GAUSSIAN_BLOCK
#define AMVL_GAUSSIAN_BLOCK 128
#endif
#ifndef AMVL_GAUSSIAN_MIN_BLOCKS_FWD
#define AMVL_GAUSSIAN_MIN_BLOCKS_FWD 6
#endif
#ifndef AMVL_GAUSSIAN_MIN_BLOCKS_BWD
#define AMVL_GAUSSIAN_MIN_BLOCKS_BWD 5
#endif
#ifndef AMVL_FP32_MIN_BLOCKS_FWD
#define AMVL_FP32_MIN_BLOCKS_FWD 5
#endif
#ifndef AMVL_FP32_MIN_BLOCKS_BWD
#define AMVL_FP32_MIN_BLOCKS_BWD 4
#endif
// The forward's threads per block, when not AMVL_GAUSSIAN_BLOCK: a row of d = 3584 (448
// chunks) takes 4 passes of 128 threads, each a round trip to memory, where 512 threads take
// one; the sweep times both.
#ifndef AMVL_GAUSSIAN_BLOCK_FWD
#define AMVL_GAUSSIAN_BLOCK_FWD AMVL_GAUSSIAN_BLOCK
#endif
// 1: the backward's flat launch. 0: the 2-D grid it replaced (a row's span of tpr chunks per
// block, grid axis 1 across the span), kept for the sweep to time beside it; same results.
#ifndef AMVL_GAUSSIAN_BWD_FLAT
#define AMVL_GAUSSIAN_BWD_FLAT 1
#endif
// The flat backward's grid holds at most this many times the blocks the GPU runs at once; more
// than 1 gives each thread fewer chunks and leaves the block scheduler to fill the SMs.
#ifndef AMVL_GAUSSIAN_BWD_WAVES
#define AMVL_GAUSSIAN_BWD_WAVES 1
#endif

constexpr int kChunk = 8;  // 16 bytes of bf16/fp16, two 16-byte loads of fp32, four of fp64
constexpr int kBlock = AMVL_GAUSSIAN_BLOCK;
constexpr int kBlockFwd = AMVL_GAUSSIAN_BLOCK_FWD;
static_assert(kBlock >= 32 && kBlock <= 1024 && (kBlock & (kBlock - 1)) == 0,
              "threads per block: a power of two from 32 to 1024");
static_assert(kBlockFwd >= 32 && kBlockFwd <= 1024 && (kBlockFwd & (kBlockFwd - 1)) == 0,
              "forward threads per block: a power of two from 32 to 1024");

// Blocks per SM that `block` threads can have at all: an SM holds 2048 threads (sm_80 and
// sm_90), and __launch_bounds__ promising more would starve every thread of registers.
constexpr int fitting_blocks(int wanted, int block) {
  return wanted * block <= 2048 ? wanted : 2048 / block > 0 ? 2048 / block : 1;
}

// fp32 and fp64 chunks take two and four times the registers of a packed 16-bit chunk: they
// get the caps that keep them free of spills (ptxas for sm_90), the 16-bit types the macros'.
template <typename T>
constexpr int min_blocks_fwd() {
  return fitting_blocks(sizeof(T) == 2   ? AMVL_GAUSSIAN_MIN_BLOCKS_FWD
                        : sizeof(T) == 4 ? AMVL_FP32_MIN_BLOCKS_FWD
                                         : 1,
                        kBlockFwd);
}
template <typename T>
constexpr int min_blocks_bwd() {
  return fitting_blocks(sizeof(T) == 2   ? AMVL_GAUSSIAN_MIN_BLOCKS_BWD
                        : sizeof(T) == 4 ? AMVL_FP32_MIN_BLOCKS_BWD
                                         : 1,
                        kBlock);
}
constexpr int64_t kMaxGrid = 1 << 20;  // larger problems loop (grid-stride over row groups)

// Storage dtype -> accumulation dtype and the two roundings between them.
template <typename T>
struct Scalar;
template <>
struct Scalar<float> {
  using Acc = float;
  static AMVL_HD float widen(float x) { return x; }
  static AMVL_HD float narrow(float x) { return x; }
};
template <>
struct Scalar<double> {
  using Acc = double;
  static AMVL_HD double widen(double x) { return x; }
  static AMVL_HD double narrow(double x) { return x; }
};
template <>
struct Scalar<__half> {
  using Acc = float;
  static AMVL_HD float widen(__half x) { return __half2float(x); }
  static AMVL_HD __half narrow(float x) { return __float2half_rn(x); }
};
template <>
struct Scalar<__nv_bfloat16> {
  using Acc = float;
  static AMVL_HD float widen(__nv_bfloat16 x) { return __bfloat162float(x); }
  static AMVL_HD __nv_bfloat16 narrow(float x) { return __float2bfloat16_rn(x); }
};

// exp in the accumulation dtype. fp32 on the GPU: the hardware's exp2 approximation on
// x * log2(e) (__expf), which is what Triton's tl.exp compiles to (ex2.approx in the Gaussian
// kernels' PTX) and what the Triton path's KL tests pass with on an H100; relative error about
// 6e-8 * |x| plus two ulps. The precise expf costs several times the instructions, and an
// element takes five exps. The host twin and fp64 use the precise functions.
AMVL_HD float exp_acc(float x) {
#ifdef __CUDA_ARCH__
  return __expf(x);
#else
  return expf(x);
#endif
}
AMVL_HD double exp_acc(double x) { return exp(x); }

AMVL_HD uint4 load16(const uint4* p) {
#ifdef __CUDA_ARCH__
  return __ldg(p);
#else
  return *p;
#endif
}

// Columns c0 .. c0 + kChunk - 1 of `row` in the storage dtype T: a chunk of bf16 or fp16 stays
// packed in four 32-bit registers until each element is widened where it is used. Widening
// the whole chunk up front kept up to 72 fp32 values live per thread in the backward: 138
// registers and an eighth of the H100's warps, which held this backend to 33-50% of copy
// bandwidth (ncu and benchmarks, 2026-11-27). Columns past d read as 0.
template <typename T>
AMVL_HD void load_chunk(const Matrix& m, int64_t row, int64_t c0, int64_t d, T (&out)[kChunk]) {
  const T* p = static_cast<const T*>(m.ptr) + row * m.row_stride + c0 * m.col_stride;
  if (m.vec && c0 + kChunk <= d) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int v = 0; v < kChunk / kPer; ++v) {
      const uint4 raw = load16(reinterpret_cast<const uint4*>(p) + v);
      memcpy(out + v * kPer, &raw, sizeof(raw));
    }
  } else {
    const T zero = Scalar<T>::narrow(typename Scalar<T>::Acc(0));
#pragma unroll
    for (int j = 0; j < kChunk; ++j) out[j] = c0 + j < d ? p[j * m.col_stride] : zero;
  }
}

// The same, widened to A: for eps, which may come in any float dtype whatever the inputs'
// dtype (a uniform runtime switch).
template <typename T, typename A>
AMVL_HD void load_chunk_widened(const Matrix& m, int64_t row, int64_t c0, int64_t d,
                                A (&out)[kChunk]) {
  T raw[kChunk];
  load_chunk<T>(m, row, c0, d, raw);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) out[j] = static_cast<A>(Scalar<T>::widen(raw[j]));
}

template <typename A>
AMVL_HD void load_chunk_any(const Matrix& m, int64_t row, int64_t c0, int64_t d,
                            A (&out)[kChunk]) {
  switch (m.dtype) {
    case DType::kFloat16: load_chunk_widened<__half>(m, row, c0, d, out); break;
    case DType::kBFloat16: load_chunk_widened<__nv_bfloat16>(m, row, c0, d, out); break;
    case DType::kFloat64: load_chunk_widened<double>(m, row, c0, d, out); break;
    default: load_chunk_widened<float>(m, row, c0, d, out); break;
  }
}

// The noise of a chunk: the caller's eps, or the Philox stream at the chunk's row-major index.
template <typename A>
AMVL_HD void noise_chunk(const Matrix& eps, uint64_t seed, int64_t row, int64_t c0, int64_t d,
                         A (&out)[kChunk]) {
  if (eps.ptr != nullptr) {
    load_chunk_any(eps, row, c0, d, out);
    return;
  }
  float n[kChunk];
  normal_chunk<kChunk>(seed, static_cast<uint64_t>(row) * static_cast<uint64_t>(d) +
                                 static_cast<uint64_t>(c0), n);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) out[j] = static_cast<A>(n[j]);
}

// Store an already rounded chunk into a contiguous (rows, d) output.
template <typename T>
AMVL_HD void store_chunk(void* base, bool vec, int64_t row, int64_t c0, int64_t d,
                         const T (&v)[kChunk]) {
  T* p = static_cast<T*>(base) + row * d + c0;
  if (vec && c0 + kChunk <= d) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < kChunk / kPer; ++i) {
      uint4 raw;
      memcpy(&raw, v + i * kPer, sizeof(raw));
      reinterpret_cast<uint4*>(p)[i] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < kChunk; ++j) {
      if (c0 + j < d) p[j] = v[j];
    }
  }
}

// ------------------------------------------------------------------------- per-chunk maths
// Shared verbatim by the kernels and the host emulation. Each element is computed to its
// rounded outputs in one go, so only the packed chunks stay live across the loop.

template <typename T, typename A = typename Scalar<T>::Acc>
AMVL_HD void forward_chunk(const ForwardArgs& a, bool out_vec, int64_t row, int64_t c0,
                           A& kl_fwd, A& kl_rev) {
  // Every load is issued before the store of z: the compiler cannot move a load above a store
  // it cannot prove to be disjoint, and loads issued after it would wait a second round trip.
  const bool with_kl = a.mu_p.ptr != nullptr;
  T mu_q[kChunk], lv_q[kChunk], mu_p[kChunk], lv_p[kChunk], z[kChunk];
  A eps[kChunk];
  load_chunk<T>(a.mu_q, row, c0, a.d, mu_q);
  load_chunk<T>(a.lv_q, row, c0, a.d, lv_q);
  if (with_kl) {
    load_chunk<T>(a.mu_p, row, c0, a.d, mu_p);
    load_chunk<T>(a.lv_p, row, c0, a.d, lv_p);
  }
  noise_chunk(a.eps, a.seed, row, c0, a.d, eps);
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const A mq = Scalar<T>::widen(mu_q[j]), lq = Scalar<T>::widen(lv_q[j]);
    z[j] = Scalar<T>::narrow(mq + exp_acc(A(0.5) * lq) * eps[j]);
  }
  store_chunk<T>(a.z, out_vec, row, c0, a.d, z);
  if (!with_kl) return;

#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    if (c0 + j >= a.d) break;
    const A mq = Scalar<T>::widen(mu_q[j]), lq = Scalar<T>::widen(lv_q[j]);
    const A mp = Scalar<T>::widen(mu_p[j]), lp = Scalar<T>::widen(lv_p[j]);
    const A diff2 = (mq - mp) * (mq - mp);
    kl_fwd += A(0.5) * (lp - lq + exp_acc(lq - lp) + diff2 * exp_acc(-lp) - A(1));
    kl_rev += A(0.5) * (lq - lp + exp_acc(lp - lq) + diff2 * exp_acc(-lq) - A(1));
  }
}

// Which terms reach which side, decided once per launch from the arguments.
struct Routes {
  bool need_q, need_p;  // some gradient of (mu_q, lv_q) / (mu_p, lv_p) is wanted
  bool fwd_q, fwd_p, rev_q, rev_p;  // a KL term with an upstream gradient routed to that side
};

AMVL_HD Routes routes_of(const BackwardArgs& a) {
  // A KL without an upstream gradient adds nothing, not 0 * (something that may be inf).
  const bool fwd = a.mu_p.ptr != nullptr && a.grad_kl_fwd.ptr != nullptr;
  const bool rev = a.mu_p.ptr != nullptr && a.grad_kl_rev.ptr != nullptr;
  return Routes{a.grad_mu_q != nullptr || a.grad_lv_q != nullptr,
                a.grad_mu_p != nullptr || a.grad_lv_p != nullptr,
                fwd && a.fwd_to_q, fwd && a.fwd_to_p, rev && a.rev_to_q, rev && a.rev_to_p};
}

// The AMVL objective's routing (forward KL to the prior, reverse KL to the posterior) with z
// used downstream and all four gradients wanted: the training step's case, compiled with its
// routing as constants, so the per-element code carries no branches on it.
constexpr Routes kAmvlRoutes{true, true, false, true, true, false};

AMVL_HD bool is_amvl_routing(const BackwardArgs& a, const Routes& r) {
  return r.need_q == kAmvlRoutes.need_q && r.need_p == kAmvlRoutes.need_p &&
         r.fwd_q == kAmvlRoutes.fwd_q && r.fwd_p == kAmvlRoutes.fwd_p &&
         r.rev_q == kAmvlRoutes.rev_q && r.rev_p == kAmvlRoutes.rev_p &&
         a.grad_z.ptr != nullptr && a.grad_mu_q != nullptr && a.grad_lv_q != nullptr &&
         a.grad_mu_p != nullptr && a.grad_lv_p != nullptr;
}

// The fp64 kernels (a reference path) skip the specialised copy, which pushed their backward
// past 255 registers into spills.
template <typename T>
constexpr bool kFastAmvl = sizeof(T) <= 4;

// Purely elementwise given the row's upstream KL gradients g_fwd and g_rev (DESIGN.md sec. 2).
// kAmvl: the arguments are known to satisfy is_amvl_routing.
template <typename T, bool kAmvl, typename A = typename Scalar<T>::Acc>
AMVL_HD void backward_chunk(const BackwardArgs& a, const Routes& routes, bool out_vec,
                            int64_t row, int64_t c0, A g_fwd, A g_rev) {
  const Routes r = kAmvl ? kAmvlRoutes : routes;
  const bool any_kl = r.fwd_q || r.fwd_p || r.rev_q || r.rev_p;
  const bool with_z = r.need_q && (kAmvl || a.grad_z.ptr != nullptr);
  T mu_q[kChunk], lv_q[kChunk], mu_p[kChunk], lv_p[kChunk], dz[kChunk];
  A eps[kChunk];
  load_chunk<T>(a.mu_q, row, c0, a.d, mu_q);
  load_chunk<T>(a.lv_q, row, c0, a.d, lv_q);
  if (any_kl) {
    load_chunk<T>(a.mu_p, row, c0, a.d, mu_p);
    load_chunk<T>(a.lv_p, row, c0, a.d, lv_p);
  }
  if (with_z) {
    load_chunk<T>(a.grad_z, row, c0, a.d, dz);
    noise_chunk(a.eps, a.seed, row, c0, a.d, eps);  // regenerated, never stored
  }

  T g_mu_q[kChunk], g_lv_q[kChunk], g_mu_p[kChunk], g_lv_p[kChunk];
#pragma unroll
  for (int j = 0; j < kChunk; ++j) {
    const A mq = Scalar<T>::widen(mu_q[j]), lq = Scalar<T>::widen(lv_q[j]);
    A diff = 0, inv_var_p = 0, inv_var_q = 0, ratio_qp = 0, ratio_pq = 0;
    if (any_kl) {
      const A mp = Scalar<T>::widen(mu_p[j]), lp = Scalar<T>::widen(lv_p[j]);
      diff = mq - mp;
      inv_var_p = exp_acc(-lp);
      inv_var_q = exp_acc(-lq);
      ratio_qp = exp_acc(lq - lp);
      ratio_pq = exp_acc(lp - lq);
    }
    if (r.need_q) {
      A g_mu = 0, g_lv = 0;
      if (with_z) {
        const A g = Scalar<T>::widen(dz[j]);
        g_mu += g;
        g_lv += g * A(0.5) * exp_acc(A(0.5) * lq) * eps[j];
      }
      if (r.fwd_q) {
        g_mu += g_fwd * diff * inv_var_p;
        g_lv += g_fwd * A(0.5) * (ratio_qp - A(1));
      }
      if (r.rev_q) {
        g_mu += g_rev * diff * inv_var_q;
        g_lv += g_rev * A(0.5) * (A(1) - ratio_pq - diff * diff * inv_var_q);
      }
      g_mu_q[j] = Scalar<T>::narrow(g_mu);
      g_lv_q[j] = Scalar<T>::narrow(g_lv);
    }
    if (r.need_p) {
      A g_mu = 0, g_lv = 0;
      if (r.fwd_p) {
        g_mu -= g_fwd * diff * inv_var_p;
        g_lv += g_fwd * A(0.5) * (A(1) - ratio_qp - diff * diff * inv_var_p);
      }
      if (r.rev_p) {
        g_mu -= g_rev * diff * inv_var_q;
        g_lv += g_rev * A(0.5) * (ratio_pq - A(1));
      }
      g_mu_p[j] = Scalar<T>::narrow(g_mu);
      g_lv_p[j] = Scalar<T>::narrow(g_lv);
    }
  }
  if (kAmvl || a.grad_mu_q != nullptr) store_chunk<T>(a.grad_mu_q, out_vec, row, c0, a.d, g_mu_q);
  if (kAmvl || a.grad_lv_q != nullptr) store_chunk<T>(a.grad_lv_q, out_vec, row, c0, a.d, g_lv_q);
  if (kAmvl || a.grad_mu_p != nullptr) store_chunk<T>(a.grad_mu_p, out_vec, row, c0, a.d, g_mu_p);
  if (kAmvl || a.grad_lv_p != nullptr) store_chunk<T>(a.grad_lv_p, out_vec, row, c0, a.d, g_lv_p);
}

template <typename A>
AMVL_HD A load_row(const RowVector& v, int64_t row) {
  return v.ptr == nullptr ? A(0) : static_cast<const A*>(v.ptr)[row * v.stride];
}

#if AMVL_GAUSSIAN_BWD_FLAT
// A thread's walk over the backward's flat index g = row * per_row + chunk, from `first` in
// steps of `step`, below rows * per_row. Chunks never straddle rows (a row's last one is
// partial when kChunk does not divide d), so backward_chunk sees the (row, c0) pairs, and
// loads, of any other split of the work. g advances as a (row, chunk) pair with a carry, as
// step's chunk part is below per_row: the two divisions up front are a thread's only ones.
// Index is uint32_t where rows * per_row + step fits, as it does for anything a GPU's memory
// holds short of broadcast inputs: 64-bit state spilled in the 16-bit kernels' 96 registers.
template <typename Index>
struct FlatWalk {
  AMVL_HD FlatWalk(int64_t rows, int64_t per_row, uint64_t first, uint64_t step)
      : rows_(static_cast<Index>(rows)), per_row_(static_cast<Index>(per_row)) {
    row_ = static_cast<Index>(first) / per_row_;
    chunk_ = static_cast<Index>(first) - row_ * per_row_;
    by_row_ = static_cast<Index>(step) / per_row_;
    by_chunk_ = static_cast<Index>(step) - by_row_ * per_row_;
  }
  AMVL_HD bool more() const { return row_ < rows_; }
  AMVL_HD int64_t row() const { return static_cast<int64_t>(row_); }
  AMVL_HD int64_t c0() const { return static_cast<int64_t>(chunk_) * kChunk; }
  // No wrap-around: the new (row, chunk) encodes g + step < rows * per_row + step, and chunk_
  // stays below that before the carry (a sum of a chunk and step's chunk part).
  AMVL_HD void next() {
    row_ += by_row_;
    chunk_ += by_chunk_;
    if (chunk_ >= per_row_) {
      chunk_ -= per_row_;
      ++row_;
    }
  }

 private:
  Index rows_, per_row_, row_, chunk_, by_row_, by_chunk_;
};

// Whether FlatWalk<uint32_t> holds `chunks` walked by `threads`.
bool narrow_walk(int64_t chunks, int64_t threads) {
  return chunks + threads <= int64_t(UINT32_MAX);
}
#endif

// ------------------------------------------------------------------------- kernels

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane gets its group's
// total. All 32 lanes must arrive: the row loop is uniform across the block.
template <typename A>
__device__ A group_sum(A v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  }
  return v;
}

// Block-wide sums of two values; the totals are valid in thread 0.
template <typename A>
__device__ void block_sum2(A& x, A& y) {
  __shared__ A partial[2][kBlockFwd / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  x = group_sum(x, 32);
  y = group_sum(y, 32);
  if (lane == 0) {
    partial[0][warp] = x;
    partial[1][warp] = y;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x / 32;
    x = group_sum(lane < warps ? partial[0][lane] : A(0), 32);
    y = group_sum(lane < warps ? partial[1][lane] : A(0), 32);
  }
  __syncthreads();  // partial[] is reused by the next row
}

template <typename T>
__global__ void __launch_bounds__(kBlockFwd, min_blocks_fwd<T>())
    forward_kernel(ForwardArgs a, bool out_vec, int tpr) {
  using A = typename Scalar<T>::Acc;
  const int lane = tpr <= 32 ? threadIdx.x & (tpr - 1) : threadIdx.x;  // past 32, a row a block
  const int rows_per_block = blockDim.x / tpr;
  const bool with_kl = a.mu_p.ptr != nullptr;
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < a.rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = first + threadIdx.x / tpr;
    A kl_fwd = 0, kl_rev = 0;
    if (row < a.rows) {
      for (int64_t c0 = int64_t(lane) * kChunk; c0 < a.d; c0 += int64_t(tpr) * kChunk) {
        forward_chunk<T>(a, out_vec, row, c0, kl_fwd, kl_rev);
      }
    }
    if (!with_kl) continue;
    if (tpr <= 32) {
      kl_fwd = group_sum(kl_fwd, tpr);
      kl_rev = group_sum(kl_rev, tpr);
    } else {
      block_sum2(kl_fwd, kl_rev);
    }
    if (lane == 0 && row < a.rows) {
      static_cast<A*>(a.kl_fwd)[row] = kl_fwd;
      static_cast<A*>(a.kl_rev)[row] = kl_rev;
    }
  }
}

#if AMVL_GAUSSIAN_BWD_FLAT
// The 64-bit walk, for tensors past 2^32 chunks, a block per SM less: at the 16-bit types'
// cap its wider state spilled.
template <typename T, typename Index>
constexpr int min_blocks_flat_bwd() {
  return sizeof(Index) == 4 ? min_blocks_bwd<T>() : std::max(1, min_blocks_bwd<T>() - 1);
}

template <typename T, typename Index>
__global__ void __launch_bounds__(kBlock, (min_blocks_flat_bwd<T, Index>()))
    backward_kernel(BackwardArgs a, bool out_vec, int64_t chunks_per_row) {
  using A = typename Scalar<T>::Acc;
  const Routes r = routes_of(a);
  const bool amvl = is_amvl_routing(a, r);
  // Thread t takes g = t, t + threads, ...: a warp's 32 chunks lie side by side in memory.
  const uint64_t thread = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (FlatWalk<Index> w(a.rows, chunks_per_row, thread, uint64_t(gridDim.x) * blockDim.x);
       w.more(); w.next()) {
    const int64_t row = w.row(), c0 = w.c0();
    // Per chunk, as a thread's next chunk is mostly in another row; the lanes of a warp read
    // the same word or two.
    const A g_fwd = load_row<A>(a.grad_kl_fwd, row);
    const A g_rev = load_row<A>(a.grad_kl_rev, row);
    if (kFastAmvl<T> && amvl) {
      backward_chunk<T, kFastAmvl<T>>(a, r, out_vec, row, c0, g_fwd, g_rev);
    } else {
      backward_chunk<T, false>(a, r, out_vec, row, c0, g_fwd, g_rev);
    }
  }
}
#else
template <typename T>
__global__ void __launch_bounds__(kBlock, min_blocks_bwd<T>())
    backward_kernel(BackwardArgs a, bool out_vec, int tpr) {
  using A = typename Scalar<T>::Acc;
  const int lane = tpr <= 32 ? threadIdx.x & (tpr - 1) : threadIdx.x;  // past 32, a row a block
  const int rows_per_block = blockDim.x / tpr;
  const Routes r = routes_of(a);
  const bool amvl = is_amvl_routing(a, r);
  // Block y of the grid takes columns [y * tpr * kChunk, (y + 1) * tpr * kChunk) of its rows,
  // then every gridDim.y-th such span (rows longer than 65,535 spans).
  const int64_t c_first = (int64_t(blockIdx.y) * tpr + lane) * kChunk;
  const int64_t c_step = int64_t(gridDim.y) * tpr * kChunk;
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < a.rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = first + threadIdx.x / tpr;
    if (row >= a.rows) continue;
    const A g_fwd = load_row<A>(a.grad_kl_fwd, row);
    const A g_rev = load_row<A>(a.grad_kl_rev, row);
    for (int64_t c0 = c_first; c0 < a.d; c0 += c_step) {
      if (kFastAmvl<T> && amvl) {
        backward_chunk<T, kFastAmvl<T>>(a, r, out_vec, row, c0, g_fwd, g_rev);
      } else {
        backward_chunk<T, false>(a, r, out_vec, row, c0, g_fwd, g_rev);
      }
    }
  }
}
#endif

// ------------------------------------------------------------------------- host side

int64_t chunks_per_row(int64_t d) { return std::max<int64_t>(1, (d + kChunk - 1) / kChunk); }

struct Layout {
  int tpr;    // threads per row
  int block;  // threads per block
  int64_t grid;
  int64_t column_blocks;  // the 2-D backward's grid axis 1: blocks sharing one row's chunks
};

// Enough threads per row to give each about one chunk, at most one block of `block_cap`
// threads: up to 32 chunks a power of two (lane groups of a warp), past that whole warps
// that take the row in equal passes (d = 3584, 448 chunks, under a cap of 256: 224 threads
// of 2 chunks each, where 256 left an eighth of them idle in the second pass). Depends only
// on (rows, d), never on strides, so strided and contiguous inputs sum in the same order.
// The forward's shape (cap kBlockFwd) and the 2-D backward grid's (kBlock); the backward's
// flat launch has its own below, as it has nothing to sum.
Layout layout_for(int64_t rows, int64_t d, int block_cap) {
  const int64_t chunks = chunks_per_row(d);
  int tpr = 1;
  while (tpr < chunks && tpr < 32) tpr *= 2;
  if (chunks > 32) {
    const int64_t passes = (chunks + block_cap - 1) / block_cap;
    const int64_t per_pass = (chunks + passes - 1) / passes;
    tpr = static_cast<int>(std::min<int64_t>((per_pass + 31) / 32 * 32, block_cap));
  }
  const int block = tpr <= 32 ? block_cap : tpr;
  const int64_t rows_per_block = block / tpr;
  const int64_t grid = std::min((rows + rows_per_block - 1) / rows_per_block, kMaxGrid);
  const int64_t column_blocks = std::min<int64_t>((chunks + tpr - 1) / tpr, 65535);
  return Layout{tpr, block, grid, column_blocks};
}

#if AMVL_GAUSSIAN_BWD_FLAT
// Blocks of the flat backward: at most as many as the GPU holds at once, `resident` (SMs x
// blocks per SM); past that the threads loop rather than the GPU launching a block per kBlock
// chunks. Every thread takes the same number of chunks, give or take one, so no thread slot
// idles through a last partial pass (capping the grid at `resident` alone left 512 x 3584
// with 2 or 3 chunks a thread). Depends on (rows, d) and the device only, never on strides,
// like the forward's shape.
int64_t flat_backward_grid(int64_t rows, int64_t d, int64_t resident) {
  const int64_t blocks = (rows * chunks_per_row(d) + kBlock - 1) / kBlock;
  const int64_t passes = (blocks + resident - 1) / std::max<int64_t>(resident, 1);
  return std::max<int64_t>(1, (blocks + passes - 1) / std::max<int64_t>(passes, 1));
}

// SMs x resident blocks per SM of backward_kernel<T, uint32_t>, per device, 0 until first
// asked: the launch asks on every call, and attribute and occupancy queries cost time. The
// occupancy calculator rather than __launch_bounds__' promise, which is a floor: ptxas gives
// the fp64 kernel two blocks per SM where it promised one. Devices past kMaxDevices ask anew.
constexpr int kMaxDevices = 64;
template <typename T>
std::atomic<int64_t> resident_cache[kMaxDevices];

template <typename T>
cudaError_t resident_backward_blocks(int64_t& resident) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  std::atomic<int64_t>* slot =
      err == cudaSuccess && device >= 0 && device < kMaxDevices ? &resident_cache<T>[device]
                                                                  : nullptr;
  if (slot != nullptr && (resident = slot->load(std::memory_order_relaxed)) > 0) {
    return cudaSuccess;
  }
  int sms = 0, per_sm = 0;
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  if (err == cudaSuccess) {
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, backward_kernel<T, uint32_t>,
                                                        kBlock, 0);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();  // returned to the caller, not left behind for the next launch
    return err;
  }
  resident = int64_t(std::max(sms, 1)) * std::max(per_sm, 1);
  if (slot != nullptr) slot->store(resident, std::memory_order_relaxed);
  return cudaSuccess;
}
#endif

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Outputs are contiguous (rows, d): 16-byte stores need aligned bases and whole-16-byte rows.
bool outputs_vec_ok(std::initializer_list<const void*> outs, int64_t d, DType dtype) {
  if ((d * dtype_size(dtype)) % 16 != 0) return false;
  for (const void* p : outs) {
    if (p != nullptr && !aligned16(p)) return false;
  }
  return true;
}

template <typename T>
struct Tag {
  using type = T;
};

template <typename F>
void dispatch(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat16: f(Tag<__half>{}); break;
    case DType::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case DType::kFloat64: f(Tag<double>{}); break;
    default: f(Tag<float>{}); break;
  }
}

// What lane 0 holds after group_sum over v.size() lanes (a power of two <= 32).
template <typename A>
A butterfly_on_host(std::vector<A> v) {
  for (size_t offset = v.size() / 2; offset > 0; offset /= 2) {
    std::vector<A> next(v.size());
    for (size_t lane = 0; lane < v.size(); ++lane) next[lane] = v[lane] + v[lane ^ offset];
    v.swap(next);
  }
  return v[0];
}

// The row total forward_kernel stores: group_sum for tpr <= 32, block_sum2 otherwise.
template <typename A>
A sum_in_kernel_order(const std::vector<A>& per_thread) {
  if (per_thread.size() <= 32) return butterfly_on_host(per_thread);
  std::vector<A> per_warp(32, A(0));
  for (size_t w = 0; w < per_thread.size() / 32; ++w) {
    per_warp[w] = butterfly_on_host(std::vector<A>(per_thread.begin() + 32 * w,
                                                   per_thread.begin() + 32 * (w + 1)));
  }
  return butterfly_on_host(per_warp);
}

}  // namespace

int dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    case DType::kFloat64: return 8;
    default: return 4;
  }
}

bool vector_loads_ok(const Matrix& m, int64_t rows, int64_t d) {
  if (m.ptr == nullptr || d < kChunk || m.col_stride != 1 || !aligned16(m.ptr)) return false;
  return rows <= 1 || (m.row_stride * dtype_size(m.dtype)) % 16 == 0;
}

cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  const Layout l = layout_for(args.rows, args.d, kBlockFwd);
  const bool out_vec = outputs_vec_ok({args.z}, args.d, args.dtype);
  dispatch(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    forward_kernel<T><<<static_cast<unsigned>(l.grid), l.block, 0, stream>>>(args, out_vec, l.tpr);
  });
  return cudaGetLastError();
}

cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream) {
  if (args.rows == 0) return cudaSuccess;
  const bool out_vec = outputs_vec_ok(
      {args.grad_mu_q, args.grad_lv_q, args.grad_mu_p, args.grad_lv_p}, args.d, args.dtype);
  cudaError_t err = cudaSuccess;
  dispatch(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
#if AMVL_GAUSSIAN_BWD_FLAT
    int64_t resident = 0;
    err = resident_backward_blocks<T>(resident);
    if (err != cudaSuccess) return;
    const int64_t per_row = chunks_per_row(args.d);
    const int64_t grid =
        flat_backward_grid(args.rows, args.d, resident * AMVL_GAUSSIAN_BWD_WAVES);
    const auto kernel = narrow_walk(args.rows * per_row, grid * kBlock)
                            ? backward_kernel<T, uint32_t>
                            : backward_kernel<T, uint64_t>;
    kernel<<<static_cast<unsigned>(grid), kBlock, 0, stream>>>(args, out_vec, per_row);
#else
    const Layout l = layout_for(args.rows, args.d, kBlock);
    const dim3 grid(static_cast<unsigned>(l.grid), static_cast<unsigned>(l.column_blocks));
    backward_kernel<T><<<grid, l.block, 0, stream>>>(args, out_vec, l.tpr);
#endif
  });
  return err != cudaSuccess ? err : cudaGetLastError();
}

void forward_on_host(const ForwardArgs& args) {
  const bool out_vec = outputs_vec_ok({args.z}, args.d, args.dtype);
  const Layout l = layout_for(args.rows, args.d, kBlockFwd);
  dispatch(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Scalar<T>::Acc;
    std::vector<A> fwd(l.tpr), rev(l.tpr);
    for (int64_t row = 0; row < args.rows; ++row) {
      // Each of the row's tpr "threads" walks its chunks, then the partial sums combine in
      // the kernel's order: the host sums exactly what the GPU sums, in the same order.
      for (int lane = 0; lane < l.tpr; ++lane) {
        fwd[lane] = rev[lane] = A(0);
        for (int64_t c0 = int64_t(lane) * kChunk; c0 < args.d; c0 += int64_t(l.tpr) * kChunk) {
          forward_chunk<T>(args, out_vec, row, c0, fwd[lane], rev[lane]);
        }
      }
      if (args.mu_p.ptr != nullptr) {
        static_cast<A*>(args.kl_fwd)[row] = sum_in_kernel_order(fwd);
        static_cast<A*>(args.kl_rev)[row] = sum_in_kernel_order(rev);
      }
    }
  });
}

void backward_on_host(const BackwardArgs& args) {
  const bool out_vec = outputs_vec_ok(
      {args.grad_mu_q, args.grad_lv_q, args.grad_mu_p, args.grad_lv_p}, args.d, args.dtype);
  const Routes r = routes_of(args);
  dispatch(args.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename Scalar<T>::Acc;
    const auto chunk = [&](int64_t row, int64_t c0) {
      const A g_fwd = load_row<A>(args.grad_kl_fwd, row);
      const A g_rev = load_row<A>(args.grad_kl_rev, row);
      if (kFastAmvl<T> && is_amvl_routing(args, r)) {
        backward_chunk<T, kFastAmvl<T>>(args, r, out_vec, row, c0, g_fwd, g_rev);
      } else {
        backward_chunk<T, false>(args, r, out_vec, row, c0, g_fwd, g_rev);
      }
    };
#if AMVL_GAUSSIAN_BWD_FLAT
    // The kernel's walk on a GPU of kTwinThreads threads, one after another. A prime count,
    // so that the tests' rows take steps both shorter and longer than a row and the walk's
    // carry into the next row runs; a chunk it skipped would be left unwritten.
    constexpr uint64_t kTwinThreads = 37;
    const int64_t per_row = chunks_per_row(args.d);
    const auto walk = [&](auto index) {
      using Index = decltype(index);
      for (uint64_t t = 0; t < kTwinThreads; ++t) {
        for (FlatWalk<Index> w(args.rows, per_row, t, kTwinThreads); w.more(); w.next()) {
          chunk(w.row(), w.c0());
        }
      }
    };
    if (narrow_walk(args.rows * per_row, kTwinThreads)) {
      walk(uint32_t(0));
    } else {
      walk(uint64_t(0));
    }
#else
    for (int64_t row = 0; row < args.rows; ++row) {
      for (int64_t c0 = 0; c0 < args.d; c0 += kChunk) chunk(row, c0);
    }
#endif
  });
}

void philox_on_host(const uint32_t counter[4], uint32_t key0, uint32_t key1, uint32_t out[4]) {
  const Philox4 r = philox4x32_10(Philox4{{counter[0], counter[1], counter[2], counter[3]}},
                                  key0, key1);
  for (int i = 0; i < 4; ++i) out[i] = r.w[i];
}

}  // namespace amvl
