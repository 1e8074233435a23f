// Python module amvl_kernels._C: the CUDA Gaussian sampling + KL kernels behind raw pointers.
//
// No torch headers on purpose: amvl_kernels/_cuda_gaussian_kl.py passes data pointers,
// strides, dtype codes and the current stream as plain ints, so one build works with any torch
// version and compiles on machines whose torch has no CUDA headers. The CUDA runtime is linked
// statically; without a GPU the module still imports and device_count() returns 0.
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "gaussian_kl.h"

// The fingerprint of csrc/ this module was built from (build_cuda.py defines it); the package
// refuses a module whose sources have changed since.
#ifndef AMVL_SOURCE_HASH
#define AMVL_SOURCE_HASH 0LL
#endif

namespace py = pybind11;

namespace {


// (data_ptr, row stride, col stride, dtype code) of a (rows, d) view, or None.
using MatrixArg = std::optional<std::tuple<uintptr_t, int64_t, int64_t, int>>;
// (data_ptr, stride) of a per-row vector, or None.
using RowArg = std::optional<std::tuple<uintptr_t, int64_t>>;

// Inputs other than eps (any float dtype, converted in the kernel) are in the kernel's dtype.
void check_code(const MatrixArg& arg, int dtype, const char* name) {
  if (arg && std::get<3>(*arg) != dtype) {
    throw std::invalid_argument(std::string(name) + " has dtype code " +
                                std::to_string(std::get<3>(*arg)) + " but the call is for " +
                                std::to_string(dtype));
  }
}

amvl::DType to_dtype(int code) {
  if (code < 0 || code > 3) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(code));
  }
  return static_cast<amvl::DType>(code);
}

amvl::Matrix to_matrix(const MatrixArg& arg, int64_t rows, int64_t d) {
  amvl::Matrix m;
  if (!arg) return m;
  const auto& [ptr, row_stride, col_stride, code] = *arg;
  m.ptr = reinterpret_cast<const void*>(ptr);
  m.row_stride = row_stride;
  m.col_stride = col_stride;
  m.dtype = to_dtype(code);
  m.vec = amvl::vector_loads_ok(m, rows, d);
  return m;
}

amvl::RowVector to_row_vector(const RowArg& arg) {
  amvl::RowVector v;
  if (arg) {
    v.ptr = reinterpret_cast<const void*>(std::get<0>(*arg));
    v.stride = std::get<1>(*arg);
  }
  return v;
}

void* to_ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

std::string describe(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
}

int device_count() {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // no device / no driver is an answer here, not a sticky error
    return 0;
  }
  return count;
}

// Makes `device` current for one launch and restores the caller's device afterwards.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0) {
      cudaGetLastError();
      throw std::runtime_error(
          "amvl_kernels._C: no CUDA device is available (" +
          (err != cudaSuccess ? describe(err) : std::string("0 devices")) +
          "); the CUDA kernels cannot run on this machine, use backend='torch' or 'triton'");
    }
    if (device < 0 || device >= count) {
      throw std::invalid_argument("amvl_kernels._C: device " + std::to_string(device) +
                                  " does not exist (" + std::to_string(count) + " visible)");
    }
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int current = previous_;
    if (cudaGetDevice(&current) == cudaSuccess && current != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

  static void check(cudaError_t err, const char* what) {
    if (err != cudaSuccess) {
      throw std::runtime_error(std::string("amvl_kernels._C: ") + what +
                               " failed: " + describe(err));
    }
  }

 private:
  int previous_ = 0;
};

amvl::ForwardArgs forward_args(int dtype, int64_t rows, int64_t d, uint64_t seed,
                               const MatrixArg& mu_q, const MatrixArg& lv_q,
                               const MatrixArg& mu_p, const MatrixArg& lv_p,
                               const MatrixArg& eps, uintptr_t z, uintptr_t kl_fwd,
                               uintptr_t kl_rev) {
  if (rows < 0 || d < 0) throw std::invalid_argument("rows and d must be >= 0");
  if (!mu_q || !lv_q) throw std::invalid_argument("mu_q and lv_q are required");
  if (bool(mu_p) != bool(lv_p)) throw std::invalid_argument("mu_p and lv_p come together");
  if (!z) throw std::invalid_argument("z is required");
  if (mu_p && (!kl_fwd || !kl_rev)) {
    throw std::invalid_argument("kl_fwd and kl_rev are required with mu_p and lv_p");
  }
  for (const auto& [arg, name] : {std::pair{&mu_q, "mu_q"}, {&lv_q, "lv_q"}, {&mu_p, "mu_p"},
                                  {&lv_p, "lv_p"}}) {
    check_code(*arg, dtype, name);
  }
  amvl::ForwardArgs a;
  a.rows = rows;
  a.d = d;
  a.seed = seed;
  a.dtype = to_dtype(dtype);
  a.mu_q = to_matrix(mu_q, rows, d);
  a.lv_q = to_matrix(lv_q, rows, d);
  a.mu_p = to_matrix(mu_p, rows, d);
  a.lv_p = to_matrix(lv_p, rows, d);
  a.eps = to_matrix(eps, rows, d);
  a.z = to_ptr(z);
  a.kl_fwd = to_ptr(kl_fwd);
  a.kl_rev = to_ptr(kl_rev);
  return a;
}

amvl::BackwardArgs backward_args(int dtype, int64_t rows, int64_t d, uint64_t seed,
                                 const MatrixArg& mu_q, const MatrixArg& lv_q,
                                 const MatrixArg& mu_p, const MatrixArg& lv_p,
                                 const MatrixArg& eps, const MatrixArg& grad_z,
                                 const RowArg& grad_kl_fwd, const RowArg& grad_kl_rev,
                                 bool fwd_to_q, bool fwd_to_p, bool rev_to_q, bool rev_to_p,
                                 uintptr_t grad_mu_q, uintptr_t grad_lv_q, uintptr_t grad_mu_p,
                                 uintptr_t grad_lv_p) {
  if (rows < 0 || d < 0) throw std::invalid_argument("rows and d must be >= 0");
  if (!mu_q || !lv_q) throw std::invalid_argument("mu_q and lv_q are required");
  if (bool(mu_p) != bool(lv_p)) throw std::invalid_argument("mu_p and lv_p come together");
  if (!mu_p && (grad_mu_p || grad_lv_p)) {
    throw std::invalid_argument("gradients of mu_p / lv_p need mu_p and lv_p");
  }
  for (const auto& [arg, name] : {std::pair{&mu_q, "mu_q"}, {&lv_q, "lv_q"}, {&mu_p, "mu_p"},
                                  {&lv_p, "lv_p"}, {&grad_z, "grad_z"}}) {
    check_code(*arg, dtype, name);
  }
  amvl::BackwardArgs a;
  a.rows = rows;
  a.d = d;
  a.seed = seed;
  a.dtype = to_dtype(dtype);
  a.mu_q = to_matrix(mu_q, rows, d);
  a.lv_q = to_matrix(lv_q, rows, d);
  a.mu_p = to_matrix(mu_p, rows, d);
  a.lv_p = to_matrix(lv_p, rows, d);
  a.eps = to_matrix(eps, rows, d);
  a.grad_z = to_matrix(grad_z, rows, d);
  a.grad_kl_fwd = to_row_vector(grad_kl_fwd);
  a.grad_kl_rev = to_row_vector(grad_kl_rev);
  a.fwd_to_q = fwd_to_q;
  a.fwd_to_p = fwd_to_p;
  a.rev_to_q = rev_to_q;
  a.rev_to_p = rev_to_p;
  a.grad_mu_q = to_ptr(grad_mu_q);
  a.grad_lv_q = to_ptr(grad_lv_q);
  a.grad_mu_p = to_ptr(grad_mu_p);
  a.grad_lv_p = to_ptr(grad_lv_p);
  return a;
}

void forward(int dtype, int64_t rows, int64_t d, uint64_t seed, const MatrixArg& mu_q,
             const MatrixArg& lv_q, const MatrixArg& mu_p, const MatrixArg& lv_p,
             const MatrixArg& eps, uintptr_t z, uintptr_t kl_fwd, uintptr_t kl_rev, int device,
             uintptr_t stream) {
  const auto args = forward_args(dtype, rows, d, seed, mu_q, lv_q, mu_p, lv_p, eps, z, kl_fwd,
                                 kl_rev);
  DeviceScope scope(device);
  DeviceScope::check(amvl::launch_forward(args, reinterpret_cast<cudaStream_t>(stream)),
                     "launching the Gaussian KL forward kernel");
}

void backward(int dtype, int64_t rows, int64_t d, uint64_t seed, const MatrixArg& mu_q,
              const MatrixArg& lv_q, const MatrixArg& mu_p, const MatrixArg& lv_p,
              const MatrixArg& eps, const MatrixArg& grad_z, const RowArg& grad_kl_fwd,
              const RowArg& grad_kl_rev, bool fwd_to_q, bool fwd_to_p, bool rev_to_q,
              bool rev_to_p, uintptr_t grad_mu_q, uintptr_t grad_lv_q, uintptr_t grad_mu_p,
              uintptr_t grad_lv_p, int device, uintptr_t stream) {
  const auto args = backward_args(dtype, rows, d, seed, mu_q, lv_q, mu_p, lv_p, eps, grad_z,
                                  grad_kl_fwd, grad_kl_rev, fwd_to_q, fwd_to_p, rev_to_q,
                                  rev_to_p, grad_mu_q, grad_lv_q, grad_mu_p, grad_lv_p);
  DeviceScope scope(device);
  DeviceScope::check(amvl::launch_backward(args, reinterpret_cast<cudaStream_t>(stream)),
                     "launching the Gaussian KL backward kernel");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "CUDA kernels of amvl_kernels (Gaussian sampling + bidirectional KL). Called by "
      "amvl_kernels._cuda_gaussian_kl with raw pointers; not a public API.";

  m.attr("source_hash") = static_cast<int64_t>(AMVL_SOURCE_HASH);
  m.def("device_count", &device_count,
        "Number of CUDA devices this module's runtime sees; 0 without a GPU or driver.");
  m.def("cuda_runtime_version", [] {
    int version = 0;
    cudaRuntimeGetVersion(&version);
    return version;
  }, "CUDA runtime version the module was linked against, e.g. 13000.");

  const char* fwd_doc =
      "Enqueue z = mu_q + exp(lv_q / 2) * eps and the per-row KL(q||p), KL(p||q) on `stream`. "
      "Matrices are (ptr, row_stride, col_stride, dtype_code) or None; outputs are contiguous.";
  m.def("forward", &forward, fwd_doc, py::arg("dtype"), py::arg("rows"), py::arg("d"),
        py::arg("seed"), py::arg("mu_q"), py::arg("lv_q"), py::arg("mu_p"), py::arg("lv_p"),
        py::arg("eps"), py::arg("z"), py::arg("kl_fwd"), py::arg("kl_rev"), py::arg("device"),
        py::arg("stream"));
  m.def("backward", &backward,
        "Enqueue the gradients of the inputs whose output pointer is non-zero.",
        py::arg("dtype"), py::arg("rows"), py::arg("d"), py::arg("seed"), py::arg("mu_q"),
        py::arg("lv_q"), py::arg("mu_p"), py::arg("lv_p"), py::arg("eps"), py::arg("grad_z"),
        py::arg("grad_kl_fwd"), py::arg("grad_kl_rev"), py::arg("fwd_to_q"),
        py::arg("fwd_to_p"), py::arg("rev_to_q"), py::arg("rev_to_p"), py::arg("grad_mu_q"),
        py::arg("grad_lv_q"), py::arg("grad_mu_p"), py::arg("grad_lv_p"), py::arg("device"),
        py::arg("stream"));

  // Host twins of the two kernels, on host memory: tests run the kernels' per-element code
  // (loads, noise, maths, routing) on machines without a GPU.
  m.def("forward_host", [](int dtype, int64_t rows, int64_t d, uint64_t seed,
                           const MatrixArg& mu_q, const MatrixArg& lv_q, const MatrixArg& mu_p,
                           const MatrixArg& lv_p, const MatrixArg& eps, uintptr_t z,
                           uintptr_t kl_fwd, uintptr_t kl_rev) {
    const auto args = forward_args(dtype, rows, d, seed, mu_q, lv_q, mu_p, lv_p, eps, z,
                                   kl_fwd, kl_rev);
    py::gil_scoped_release release;
    amvl::forward_on_host(args);
  }, "forward on host memory, serially (tests only)", py::arg("dtype"), py::arg("rows"),
        py::arg("d"), py::arg("seed"), py::arg("mu_q"), py::arg("lv_q"), py::arg("mu_p"),
        py::arg("lv_p"), py::arg("eps"), py::arg("z"), py::arg("kl_fwd"), py::arg("kl_rev"));
  m.def("backward_host", [](int dtype, int64_t rows, int64_t d, uint64_t seed,
                            const MatrixArg& mu_q, const MatrixArg& lv_q, const MatrixArg& mu_p,
                            const MatrixArg& lv_p, const MatrixArg& eps, const MatrixArg& grad_z,
                            const RowArg& grad_kl_fwd, const RowArg& grad_kl_rev,
                            bool fwd_to_q, bool fwd_to_p, bool rev_to_q, bool rev_to_p,
                            uintptr_t grad_mu_q, uintptr_t grad_lv_q, uintptr_t grad_mu_p,
                            uintptr_t grad_lv_p) {
    const auto args = backward_args(dtype, rows, d, seed, mu_q, lv_q, mu_p, lv_p, eps, grad_z,
                                    grad_kl_fwd, grad_kl_rev, fwd_to_q, fwd_to_p, rev_to_q,
                                    rev_to_p, grad_mu_q, grad_lv_q, grad_mu_p, grad_lv_p);
    py::gil_scoped_release release;
    amvl::backward_on_host(args);
  }, "backward on host memory, serially (tests only)", py::arg("dtype"), py::arg("rows"),
        py::arg("d"), py::arg("seed"), py::arg("mu_q"), py::arg("lv_q"), py::arg("mu_p"),
        py::arg("lv_p"), py::arg("eps"), py::arg("grad_z"), py::arg("grad_kl_fwd"),
        py::arg("grad_kl_rev"), py::arg("fwd_to_q"), py::arg("fwd_to_p"), py::arg("rev_to_q"),
        py::arg("rev_to_p"), py::arg("grad_mu_q"), py::arg("grad_lv_q"), py::arg("grad_mu_p"),
        py::arg("grad_lv_p"));
  m.def("philox4x32_10", [](std::tuple<uint32_t, uint32_t, uint32_t, uint32_t> counter,
                            std::tuple<uint32_t, uint32_t> key) {
    const uint32_t ctr[4] = {std::get<0>(counter), std::get<1>(counter), std::get<2>(counter),
                             std::get<3>(counter)};
    uint32_t out[4];
    amvl::philox_on_host(ctr, std::get<0>(key), std::get<1>(key), out);
    return std::make_tuple(out[0], out[1], out[2], out[3]);
  }, "One Philox4x32-10 block computed on the host (known-answer tests).", py::arg("counter"),
        py::arg("key"));
}
