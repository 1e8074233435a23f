// Counter-based Gaussian noise for the Gaussian sampling kernels.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11) turns a
// 128-bit counter and a 64-bit key into four independent 32-bit words. Box-Muller turns each
// pair of words into two standard normals, so one Philox call gives four normals.
//
// Everything here is __host__ __device__: the CPU tests check the generator against the
// published known-answer vectors and run the same noise code the GPU runs.
#pragma once

#include <cmath>
#include <cstdint>

#include <cuda_runtime.h>

#define AMVL_HD __host__ __device__ __forceinline__

namespace amvl {

struct Philox4 {
  uint32_t w[4];
};

AMVL_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#ifdef __CUDA_ARCH__
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t product = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(product);
  hi = static_cast<uint32_t>(product >> 32);
#endif
}

// Ten rounds, the key bumped by the Weyl constants between rounds (Random123's philox4x32).
AMVL_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key0 += 0x9E3779B9u;
      key1 += 0xBB67AE85u;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, ctr.w[0], hi0, lo0);
    mulhilo32(0xCD9E8D57u, ctr.w[2], hi1, lo1);
    ctr = Philox4{{hi1 ^ ctr.w[1] ^ key0, lo1, hi0 ^ ctr.w[3] ^ key1, lo0}};
  }
  return ctr;
}

// Two standard normals from two uniform words. The radius word maps to (0, 1] so the log is
// always finite (the largest |normal| is sqrt(2 * 33 ln 2) ~ 6.8); the angle word maps to
// [0, 2) half-turns, exactly representable.
// On the GPU the log, root, sine and cosine are the hardware's approximations (__logf,
// sqrt.approx, __sincosf on [-pi, pi), errors near 1e-6): the precise functions cost tens of
// instructions each, which made the noise, not memory, the bound of the Triton kernels until
// they switched. The host (the CPU tests' twin) computes the same formula precisely, so the
// two agree to about 1e-6, not bitwise.
AMVL_HD void box_muller(uint32_t radius_bits, uint32_t angle_bits, float& n0, float& n1) {
  const float u = fmaf(static_cast<float>(radius_bits), 0x1p-32f, 0x1p-33f);
  const float half_turns = static_cast<float>(angle_bits >> 8) * 0x1p-23f;
  float s, c;
#ifdef __CUDA_ARCH__
  // An approximate log of u within an ulp of 1 may come out positive: clamp before the root.
  // The root is the approximate one too (sqrt.approx, relative error about 2^-23, what
  // Triton's tl.sqrt emits): sqrtf compiles to the IEEE-rounded sequence with a slow path.
  float radius;
  asm("sqrt.approx.f32 %0, %1;" : "=f"(radius) : "f"(fmaxf(-2.0f * __logf(u), 0.0f)));
  // sin(pi t) = -sin(pi (t - 1)): the approximations are accurate on [-pi, pi) only.
  __sincosf(3.14159265358979323846f * (half_turns - 1.0f), &s, &c);
  s = -s;
  c = -c;
#else
  const float radius = sqrtf(-2.0f * logf(u));
  // Double precision rounded to float: within an ulp of the precise float functions.
  const double angle = 3.14159265358979323846 * static_cast<double>(half_turns);
  s = static_cast<float>(std::sin(angle));
  c = static_cast<float>(std::cos(angle));
#endif
  n0 = radius * c;
  n1 = radius * s;
}

// The four normals of noise group `group` (elements 4*group .. 4*group+3 of the row-major
// index space) for `seed`: counter = group, key = seed.
AMVL_HD void normal4(uint64_t seed, uint64_t group, float out[4]) {
  const Philox4 ctr{{static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u}};
  const Philox4 r =
      philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  box_muller(r.w[0], r.w[1], out[0], out[1]);
  box_muller(r.w[2], r.w[3], out[2], out[3]);
}

// Noise of the N consecutive row-major elements first, first+1, ...: element i always gets
// lane i % 4 of group i / 4, whatever chunk or thread asks for it, so the stream is independent
// of the launch configuration and the backward regenerates it bitwise.
template <int N>
AMVL_HD void normal_chunk(uint64_t seed, uint64_t first, float (&out)[N]) {
  static_assert(N % 4 == 0, "chunks cover whole noise groups");
  const uint64_t group = first >> 2;
  const int shift = static_cast<int>(first & 3);
  if (shift == 0) {  // the chunk is whole groups (any d divisible by 4): no realignment
#pragma unroll
    for (int g = 0; g < N / 4; ++g) normal4(seed, group + g, out + 4 * g);
    return;
  }
  constexpr int kGroups = N / 4 + 1;
  float n[4 * kGroups];
#pragma unroll
  for (int g = 0; g < kGroups; ++g) normal4(seed, group + g, n + 4 * g);
  // Static indices with a select keep n[] in registers (a runtime index would spill it).
#pragma unroll
  for (int j = 0; j < N; ++j) {
    out[j] = shift == 1 ? n[j + 1] : shift == 2 ? n[j + 2] : n[j + 3];
  }
}

}  // namespace amvl
