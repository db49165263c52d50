// select_cpu_aten.h -- the torch headers used by the CPU kernels, read as system headers.
//
// torch's at::vec headers contain '#pragma unroll' and clang-only pragmas that GCC's -Wall
// reports as unknown; a diagnostic pragma cannot silence those in GCC 12, but marking the
// including header as a system header does.  The per-instruction-set kernel sources
// (csrc/cpu/isa/) define CPU_CAPABILITY before including this file and get at::vec too.
#pragma once
#pragma GCC system_header

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY)
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#endif
