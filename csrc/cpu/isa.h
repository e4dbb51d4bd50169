// Which vector instruction set the CPU kernels are compiled for, from the compiler's target
// macros (the extension is built with -march=native unless FUSEDTX_MARCH names another target):
//   FUSEDTX_AVX512  AVX-512 F/BW/VL + FMA: 16-lane kernels (masked loads and stores of 16-bit
//                   types need BW and VL).
//   FUSEDTX_AVX2    AVX2 + FMA + F16C, no AVX-512: 8-lane kernels where they matter (the Linear
//                   matmul), the portable code elsewhere.
//   neon            aarch64: the portable code, its GCC vectors lowered to 128-bit NEON.
//   scalar          any other target (baseline x86-64: SSE2): the portable code (GCC vector
//                   extensions and std::fma).
// Every path computes the same bits: only the tiling and the instructions differ, never an
// element's sequence of correctly rounded operations. Kept free of torch headers so that
// registration.cpp can report the choice (fusedtx_native::cpu_isa).
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__FMA__)
#define FUSEDTX_AVX512 1
#define FUSEDTX_CPU_ISA "avx512"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FUSEDTX_AVX2 1
#define FUSEDTX_CPU_ISA "avx2"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define FUSEDTX_CPU_ISA "neon"
#else
#define FUSEDTX_CPU_ISA "scalar"
#endif
