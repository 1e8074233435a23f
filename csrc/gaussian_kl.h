// Interface between the pybind11 binding and the Gaussian sampling + KL kernels.
//
// Plain C++ (no device code, no torch): the binding fills these structs from raw pointers,
// sizes and strides handed over by Python, and calls the launchers below.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace amvl {

// Storage dtypes, numbered as amvl_kernels/_cuda_gaussian_kl.py numbers them.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// One (rows, d) operand. Strides are in elements and may be anything, zero included.
struct Matrix {
  const void* ptr = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
  DType dtype = DType::kFloat32;
  bool vec = false;  // 16-byte loads allowed: unit column stride, every row start aligned
};

// A per-row vector (the KL gradients), in the accumulation dtype.
struct RowVector {
  const void* ptr = nullptr;
  int64_t stride = 0;
};

struct ForwardArgs {
  int64_t rows = 0, d = 0;
  uint64_t seed = 0;
  DType dtype = DType::kFloat32;  // of mu/logvar and z; the KLs are fp64 iff this is fp64
  Matrix mu_q, lv_q, mu_p, lv_p;  // mu_p.ptr == nullptr: sampling only, no KL
  Matrix eps;                     // eps.ptr == nullptr: noise drawn from `seed`
  void* z = nullptr;              // contiguous (rows, d)
  void* kl_fwd = nullptr;         // contiguous (rows,)
  void* kl_rev = nullptr;
};

struct BackwardArgs {
  int64_t rows = 0, d = 0;
  uint64_t seed = 0;
  DType dtype = DType::kFloat32;
  Matrix mu_q, lv_q, mu_p, lv_p, eps;
  Matrix grad_z;                     // ptr == nullptr: z unused downstream
  RowVector grad_kl_fwd, grad_kl_rev;  // ptr == nullptr: that KL unused downstream
  bool fwd_to_q = false, fwd_to_p = false, rev_to_q = false, rev_to_p = false;
  void* grad_mu_q = nullptr;  // contiguous (rows, d); nullptr: not needed
  void* grad_lv_q = nullptr;
  void* grad_mu_p = nullptr;
  void* grad_lv_p = nullptr;
};

// Bytes per element of a storage dtype.
int dtype_size(DType dtype);

// Whether `m` (already holding ptr and strides) may be read 16 bytes at a time.
bool vector_loads_ok(const Matrix& m, int64_t rows, int64_t d);

// Enqueue the kernels on `stream`. They return the launch error (cudaSuccess when queued).
cudaError_t launch_forward(const ForwardArgs& args, cudaStream_t stream);
cudaError_t launch_backward(const BackwardArgs& args, cudaStream_t stream);

// Run the kernels' per-element code on the host, serially, on host memory. Only for tests:
// it checks loads, noise, maths and gradient routing on machines without a GPU.
void forward_on_host(const ForwardArgs& args);
void backward_on_host(const BackwardArgs& args);

// One Philox4x32-10 block on the host, for the known-answer tests of the noise generator.
void philox_on_host(const uint32_t counter[4], uint32_t key0, uint32_t key1, uint32_t out[4]);

}  // namespace amvl
