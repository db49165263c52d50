// select_cpu_aten.h -- the torch headers used by select_cpu.cpp, read as system headers.
//
// torch's at::vec headers contain '#pragma unroll' and clang-only pragmas that GCC's -Wall
// reports as unknown; a diagnostic pragma cannot silence those in GCC 12, but marking the
// including header as a system header does.  select_cpu.cpp defines CPU_CAPABILITY before
// including this file.
#pragma once
#pragma GCC system_header

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
