// Host emulation of the few CUDA features fusedtx's kernels use, so that csrc/cuda/*.cu can run
// (slowly) on a machine without a GPU and be compared bit for bit with fusedtx/reference/: one
// std::thread per CUDA thread, std::barrier for __syncthreads and for warp shuffles, shared
// memory poisoned with NaN at every launch. The _rn intrinsics map to plain IEEE operations
// (the emulated file is compiled with -ffp-contract=off). Test-only: see tests/cuda_emu/build.py.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <thread>
#include <vector>
#include <cstdio>
#include <cstdlib>

#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __align__
#define __align__(n) alignas(n)

struct EmuDim { unsigned x, y, z; };
inline thread_local EmuDim emu_threadIdx, emu_blockIdx, emu_blockDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
inline thread_local std::barrier<>* emu_block_barrier;
inline thread_local std::barrier<>* emu_warp_barrier;
inline thread_local uint64_t* emu_warp_buf;
inline thread_local unsigned char* emu_smem;
inline thread_local int emu_shfl_calls;

inline void __syncthreads() { emu_block_barrier->arrive_and_wait(); }
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d) {
  if (mask != 0xffffffffu) { std::fprintf(stderr, "partial mask\n"); std::abort(); }
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&emu_warp_buf[lane], &v, sizeof(T));
  emu_warp_barrier->arrive_and_wait();
  T r = v;
  if (lane + d < 32) std::memcpy(&r, &emu_warp_buf[lane + d], sizeof(T));
  emu_warp_barrier->arrive_and_wait();
  return r;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, unsigned d) {
  const unsigned lane = threadIdx.x % 32;
  std::memcpy(&emu_warp_buf[lane], &v, sizeof(T));
  emu_warp_barrier->arrive_and_wait();
  T r; std::memcpy(&r, &emu_warp_buf[lane ^ d], sizeof(T));
  emu_warp_barrier->arrive_and_wait();
  return r;
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }  // one rounding (libm fmaf)
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return std::sqrt(a); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

extern "C" cudaError_t cudaGetLastError(void) { return cudaSuccess; }
extern "C" cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) { std::memset(p, v, n); return cudaSuccess; }

// Dynamic shared memory past the 48 KB default must be opted into per kernel, as on a GPU; the
// emulator allows up to 99 KB, the smallest opt-in maximum of sm_80+ GPUs (sm_86 / sm_89).
constexpr size_t emu_default_smem = 48 * 1024, emu_max_smem = 99 * 1024;
inline std::map<const void*, size_t> emu_smem_opt_in;
extern "C" cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || size_t(value) > emu_max_smem)
    return cudaErrorInvalidValue;
  emu_smem_opt_in[func] = size_t(value);
  return cudaSuccess;
}
template <typename F>  // cuda_runtime.h's C++ overload, which it declares for nvcc only
inline cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(func), attr, value);
}

inline long emu_launches = 0;
inline long emu_threads_total = 0;
template <typename F, typename... Args>
void emu_launch(F f, unsigned grid, int block, size_t smem, cudaStream_t, Args... args) {
  ++emu_launches;
  const auto opt_in = emu_smem_opt_in.find(reinterpret_cast<const void*>(f));
  const size_t smem_limit = opt_in == emu_smem_opt_in.end() ? emu_default_smem : opt_in->second;
  if (block < 1 || block > 1024 || smem > smem_limit) { std::fprintf(stderr, "bad launch config\n"); std::abort(); }
  for (unsigned b = 0; b < grid; ++b) {
    std::vector<double> sm(smem / 8 + 2, std::nan(""));  // poison shared memory
    std::barrier<> bar(block);
    const int warps = (block + 31) / 32;
    std::vector<std::unique_ptr<std::barrier<>>> wbar;
    for (int w = 0; w < warps; ++w) wbar.emplace_back(new std::barrier<>(32));
    std::vector<uint64_t> wbuf(warps * 32);
    std::vector<std::thread> threads;
    for (int t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        emu_threadIdx = {unsigned(t), 0, 0};
        emu_blockIdx = {b, 0, 0};
        emu_blockDim = {unsigned(block), 1, 1};
        emu_block_barrier = &bar;
        emu_warp_barrier = wbar[t / 32].get();
        emu_warp_buf = &wbuf[(t / 32) * 32];
        emu_smem = reinterpret_cast<unsigned char*>(sm.data());
        f(args...);
      });
    }
    for (auto& th : threads) th.join();
    emu_threads_total += block;
  }
}
