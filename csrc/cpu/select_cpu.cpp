// select_cpu.cpp -- the CPU op layer of rho_kernels::score_rows, select_rows and partial_rows:
// argument checks, the choice of the scoring kernel's instruction set, the top-k, and the
// registrations.  Compiled for the baseline instruction set; the scoring kernel itself
// (score_cpu_kernel.h) is compiled once per instruction set (csrc/cpu/isa/) and chosen here.
//
// Instruction set: the best of avx512 > avx2 > scalar that was built (setup.py defines
// RHO_CPU_HAVE_AVX2 / RHO_CPU_HAVE_AVX512) and that this CPU supports.  The environment variable
// RHO_KERNELS_CPU_ISA=scalar|avx2|avx512 asks for a lower one (a higher one than the CPU has is
// refused with a warning).  Ops: rho_kernels::cpu_isa() -> str names the one in use;
// rho_kernels::_set_cpu_isa(name) switches it in-process (name "" = the default choice again),
// for the tests that run the conformance suite once per instruction set.
//
// Top-k: one uint64 key per row (rho::select_key: score, eligibility, row; keys are unique).
// A radix select finds the k-th largest key in one or two histogram passes, one more pass
// collects the k winners, and an LSD radix sort orders them -- no comparison sort of N.
#include "select_cpu_aten.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "rho_math.h"
#include "score_cpu.h"

namespace rho_cpu {
namespace {

// --------------------------------------------------------------------------- instruction sets

struct Isa {
  const char* name;
  ScoreFn fn;
  PartialsFn partials;
};

// Built variants, lowest first.
constexpr Isa kIsas[] = {
    {"scalar", &score_rows_scalar, &partial_rows_scalar},
#if defined(RHO_CPU_HAVE_AVX2)
    {"avx2", &score_rows_avx2, &partial_rows_avx2},
#endif
#if defined(RHO_CPU_HAVE_AVX512)
    {"avx512", &score_rows_avx512, &partial_rows_avx512},
#endif
};
constexpr int kNumIsas = static_cast<int>(sizeof(kIsas) / sizeof(kIsas[0]));

// Whether this CPU (and OS: libgcc checks XCR0) runs the code built for kIsas[i]: the whole
// x86-64-v3 / -v4 level, since setup.py compiles those files with -march=x86-64-v3 / -v4.
bool cpu_supports(int i) {
  const std::string name = kIsas[i].name;
  if (name == "scalar") return true;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
  if (name == "avx2") return __builtin_cpu_supports("x86-64-v3");
  if (name == "avx512") return __builtin_cpu_supports("x86-64-v4");
#elif defined(__x86_64__)
  const bool v3 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                  __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  if (name == "avx2") return v3;
  if (name == "avx512") {
    return v3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
#endif
  return false;
}

int best_supported() {
  int best = 0;
  for (int i = 0; i < kNumIsas; ++i) {
    if (cpu_supports(i)) best = i;
  }
  return best;
}

std::string isa_names() {
  std::string s;
  for (int i = 0; i < kNumIsas; ++i) s += (i ? ", " : "") + std::string(kIsas[i].name);
  return s;
}

// The variant for a requested name ("" = best supported): at most the best supported one.
int resolve_isa(const std::string& want) {
  const int best = best_supported();
  if (want.empty()) return best;
  for (int i = 0; i < kNumIsas; ++i) {
    if (want == kIsas[i].name) {
      if (i > best) {
        TORCH_WARN("rho_kernels: CPU instruction set '", want, "' is not supported by this CPU; using '",
                   kIsas[best].name, "'");
        return best;
      }
      return i;
    }
  }
  TORCH_CHECK_VALUE(false, "rho_kernels: RHO_KERNELS_CPU_ISA / cpu isa '", want, "' is not one of the built ",
                    "instruction sets: ", isa_names());
  return best;
}

std::atomic<int> g_isa{-1};

int current_isa() {
  int i = g_isa.load(std::memory_order_acquire);
  if (i < 0) {
    const char* env = std::getenv("RHO_KERNELS_CPU_ISA");
    i = resolve_isa(env != nullptr ? std::string(env) : std::string());
    g_isa.store(i, std::memory_order_release);
  }
  return i;
}

std::string cpu_isa() { return kIsas[current_isa()].name; }

std::string set_cpu_isa(const std::string& name) {
  g_isa.store(resolve_isa(name), std::memory_order_release);
  return cpu_isa();
}

// --------------------------------------------------------------------------- ops

// Light defence: the Python layer (rho_kernels/_contract.py) has already validated all this.
Problem make_problem(const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& il,
                     int64_t method, int64_t ignore_index, double softcap, double logit_scale) {
  TORCH_CHECK_VALUE(rho::transform_valid(softcap, logit_scale), "rho_kernels: softcap must be 0 (none) or finite and ",
                    "> 0 and logit_scale finite and non-zero, got softcap = ", softcap, ", logit_scale = ", logit_scale);
  TORCH_CHECK(logits.device().is_cpu() && targets.device().is_cpu(), "rho_kernels (cpu): tensors must be on the CPU");
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, "rho_kernels: logits must be [N, V] or [B, T, V], got ",
              logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf || dt == at::kDouble,
              "rho_kernels: logits must be float32/bfloat16/float16/float64, got ", dt);
  TORCH_CHECK(method >= 0 && method < rho::kNumMethods, "rho_kernels: unknown method id ", method);
  const int64_t V = logits.size(-1);
  const int64_t rows = logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1);
  TORCH_CHECK(V >= 1, "rho_kernels: logits need at least one class, got V = ", V);
  TORCH_CHECK(targets.scalar_type() == at::kLong && targets.dim() == 1 && targets.is_contiguous() &&
                  targets.size(0) == rows,
              "rho_kernels: targets must be a contiguous int64 [N] tensor with N = ", rows, ", got ",
              targets.scalar_type(), " ", targets.sizes());
  TORCH_CHECK(rows <= static_cast<int64_t>(UINT32_MAX), "rho_kernels: at most 2^32 - 1 rows, got ", rows);
  const float* il_ptr = nullptr;
  if (rho::needs_il(static_cast<int>(method))) {
    TORCH_CHECK(il.has_value() && il->defined(), "rho_kernels: method ", method, " needs irreducible_loss");
    TORCH_CHECK(il->device().is_cpu() && il->scalar_type() == at::kFloat && il->dim() == 1 && il->is_contiguous() &&
                    il->size(0) == rows,
                "rho_kernels: irreducible_loss must be a contiguous float32 [N] CPU tensor with N = ", rows,
                ", got ", il->scalar_type(), " ", il->sizes());
    il_ptr = il->data_ptr<float>();
  }
  Problem p;
  p.logits = logits.data_ptr();
  p.dtype = dt == at::kFloat    ? LogitsType::kFloat32
            : dt == at::kDouble ? LogitsType::kFloat64
            : dt == at::kBFloat16 ? LogitsType::kBFloat16
                                  : LogitsType::kFloat16;
  p.method = static_cast<int>(method);
  p.rank = logits.dim();
  p.inner_rows = logits.dim() == 3 ? logits.size(1) : 1;
  p.stride0 = logits.stride(0);
  p.stride1 = logits.dim() == 3 ? logits.stride(1) : 0;
  p.stride_v = logits.stride(-1);
  p.num_rows = rows;
  p.num_classes = V;
  // [B, T, V] whose rows are evenly spaced is the [B * T, V] matrix: the kernel then finds a
  // row with one multiply (and may gather a tile of rows at fixed offsets).
  if (p.rank == 3 && (logits.size(0) <= 1 || p.stride0 == p.inner_rows * p.stride1)) {
    p.rank = 2;
    p.stride0 = p.stride1;
    p.stride1 = 0;
    p.inner_rows = 1;
  }
  p.targets = targets.data_ptr<int64_t>();
  p.il = il_ptr;
  p.ignore_index = ignore_index;
  p.transform = rho::transform_kind(softcap, logit_scale);
  p.softcap = softcap;
  p.logit_scale = logit_scale;
  return p;
}


// --------------------------------------------------------------------------- top-k

// The k (1 <= k <= n) largest of n unique keys, largest first, into out[0, k).
void top_keys(const uint64_t* keys, int64_t n, int64_t k, uint64_t* out) {
  constexpr int kDigitBits = 16;
  constexpr int64_t kBuckets = int64_t(1) << kDigitBits;
  std::vector<uint32_t> hist(static_cast<size_t>(kBuckets));
  // Radix select, most significant 16 bits first: keys >= threshold are exactly the top k.
  uint64_t threshold = 0;
  if (k < n) {
    std::vector<uint64_t> cand;  // the keys that share the prefix decided so far
    const uint64_t* src = keys;
    int64_t m = n, need = k;
    uint64_t prefix = 0;
    for (int shift = 64 - kDigitBits;; shift -= kDigitBits) {
      std::fill(hist.begin(), hist.end(), 0u);
      for (int64_t i = 0; i < m; ++i) ++hist[(src[i] >> shift) & (kBuckets - 1)];
      int64_t b = kBuckets - 1;
      for (; hist[b] < need; --b) need -= hist[b];
      prefix |= static_cast<uint64_t>(b) << shift;
      if (hist[b] == need || shift == 0) break;  // the whole bucket is in (unique keys: shift 0 always is)
      // Keep bucket b only (in place after the first level: the write index never passes the read).
      if (cand.empty()) cand.resize(hist[b]);
      int64_t j = 0;
      for (int64_t i = 0; i < m; ++i) {
        const uint64_t key = src[i];
        if (((key >> shift) & (kBuckets - 1)) == static_cast<uint64_t>(b)) cand[j++] = key;
      }
      src = cand.data();
      m = j;
    }
    threshold = prefix;
  }
  // Collect the winners.
  std::vector<uint64_t> a(static_cast<size_t>(k)), tmp(static_cast<size_t>(k));
  int64_t j = 0;
  for (int64_t i = 0; i < n && j < k; ++i) {
    if (keys[i] >= threshold) a[j++] = keys[i];
  }
  if (k < 256) {
    std::sort(a.begin(), a.end(), std::greater<uint64_t>());
    std::copy(a.begin(), a.end(), out);
    return;
  }
  // LSD radix sort of ~key (ascending = keys descending), 8-bit digits of the high word only:
  // the winners were collected in row order and the sort is stable, so equal scores stay in
  // ascending row order -- the low word's order -- without its 4 passes.  A digit that is the
  // same for all k keys (common in the high score bits) costs no pass.
  std::vector<uint32_t> counts(8 * 256, 0u);
  for (int64_t i = 0; i < k; ++i) {
    const uint64_t x = ~a[i];
    for (int d = 4; d < 8; ++d) ++counts[d * 256 + ((x >> (8 * d)) & 255)];
  }
  uint64_t* src = a.data();
  uint64_t* dst = tmp.data();
  for (int d = 4; d < 8; ++d) {
    uint32_t* c = counts.data() + d * 256;
    if (*std::max_element(c, c + 256) == static_cast<uint32_t>(k)) continue;
    uint32_t sum = 0;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cb = c[b];
      c[b] = sum;
      sum += cb;
    }
    for (int64_t i = 0; i < k; ++i) {
      const uint64_t x = ~src[i];
      dst[c[(x >> (8 * d)) & 255]++] = src[i];
    }
    std::swap(src, dst);
  }
  std::copy(src, src + k, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> score_rows_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                              const std::optional<at::Tensor>& il, int64_t method,
                                                              int64_t ignore_index, bool with_lse, double softcap,
                                                              double logit_scale, bool with_zsum) {
  const Problem p = make_problem(logits, targets, il, method, ignore_index, softcap, logit_scale);
  const auto lse_dtype = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor score = at::empty({p.num_rows}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({with_lse ? p.num_rows : 0}, logits.options().dtype(lse_dtype));
  at::Tensor zsum = at::empty({with_zsum ? p.num_rows : 0}, logits.options().dtype(lse_dtype));
  Outputs out{score.data_ptr<float>(), with_lse ? lse.data_ptr() : nullptr, nullptr, true};
  out.zsum = with_zsum ? zsum.data_ptr() : nullptr;
  kIsas[current_isa()].fn(p, out);
  return {score, lse, zsum};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_rows_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                               const std::optional<at::Tensor>& il, int64_t k,
                                                               int64_t method, int64_t ignore_index, double softcap,
                                                               double logit_scale) {
  const Problem p = make_problem(logits, targets, il, method, ignore_index, softcap, logit_scale);
  const int64_t N = p.num_rows;
  TORCH_CHECK(k >= 0 && k <= N, "rho_kernels: k = ", k, " is out of range: need 0 <= k <= N = ", N);
  at::Tensor indices = at::empty({k}, logits.options().dtype(at::kLong));
  at::Tensor scores = at::empty({k}, logits.options().dtype(at::kFloat));
  at::Tensor valid = at::empty({k}, logits.options().dtype(at::kBool));
  if (k == 0) return {indices, scores, valid};

  at::Tensor score = at::empty({N}, logits.options().dtype(at::kFloat));
  // Every key is written by the kernel: no zero fill (a pass over 8 bytes a row).
  std::unique_ptr<uint64_t[]> keys_buf(new uint64_t[static_cast<size_t>(N)]);
  uint64_t* keys = keys_buf.get();
  kIsas[current_isa()].fn(p, Outputs{score.data_ptr<float>(), nullptr, keys, false});
  std::vector<uint64_t> top(static_cast<size_t>(k));
  top_keys(keys, N, k, top.data());
  const float* sc_all = score.data_ptr<float>();
  int64_t* idx = indices.data_ptr<int64_t>();
  float* sc = scores.data_ptr<float>();
  bool* ok = valid.data_ptr<bool>();
  for (int64_t i = 0; i < k; ++i) {
    const uint32_t r = rho::key_row(top[i]);
    idx[i] = r;
    sc[i] = sc_all[r];
    ok[i] = rho::key_valid(top[i]);
  }
  return {indices, scores, valid};
}

// Partials of a vocabulary slice [n, V_slice], folded into `partials` (score_cpu.h: Partials).
at::Tensor partial_rows_cpu(const at::Tensor& logits, const at::Tensor& targets,
                            const std::optional<at::Tensor>& partials, int64_t vocab_start, int64_t method,
                            int64_t ignore_index, double softcap, double logit_scale) {
  TORCH_CHECK(logits.dim() == 2, "rho_kernels: partial_rows takes [n, V_slice] logits, got ", logits.sizes());
  TORCH_CHECK(method >= 0 && method < rho::kNumMethods, "rho_kernels: unknown method id ", method);
  TORCH_CHECK(vocab_start >= 0, "rho_kernels: vocab_start must be >= 0, got ", vocab_start);
  // Methods other than gradnorm and entropy keep d alone (as loss does); none reads the IL here.
  const bool own_sums = method == rho::kGradNorm || method == rho::kEntropy;
  const Problem p = make_problem(logits, targets, std::nullopt, own_sums ? method : int64_t(rho::kLoss), ignore_index,
                                 softcap, logit_scale);
  const auto acc = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (partials.has_value() && partials->defined()) {
    TORCH_CHECK(partials->device().is_cpu() && partials->scalar_type() == acc && partials->dim() == 2 &&
                    partials->size(0) == p.num_rows && partials->size(1) == kNumPartials && partials->is_contiguous(),
                "rho_kernels: partials must be a contiguous ", acc, " [", p.num_rows, ", ", kNumPartials,
                "] CPU tensor, got ", partials->scalar_type(), " ", partials->sizes());
  }
  at::Tensor out = at::empty({p.num_rows, kNumPartials}, logits.options().dtype(acc));
  const void* in = partials.has_value() && partials->defined() ? partials->data_ptr() : nullptr;
  kIsas[current_isa()].partials(
      p, Partials{in, out.data_ptr(), vocab_start, p.transform, softcap, logit_scale});
  return out;
}

}  // namespace
}  // namespace rho_cpu

TORCH_LIBRARY_FRAGMENT(rho_kernels, m) {
  // Partials (m, d, t, dx, s2x, z_y, owned per row) of a vocabulary slice of the logits, folded
  // into those of the slices before it: the linear ops' tiled CPU forward.
  m.def(
      "partial_rows(Tensor logits, Tensor targets, Tensor? partials, int vocab_start, int method, "
      "int ignore_index, float softcap=0.0, float logit_scale=1.0) -> Tensor");
  // The instruction set of the CPU scoring kernel in use ("scalar", "avx2" or "avx512").
  m.def("cpu_isa() -> str", &rho_cpu::cpu_isa);
  // Switch it in this process ("" = the default choice); returns the one now in use.  For tests.
  m.def("_set_cpu_isa(str name) -> str", &rho_cpu::set_cpu_isa);
}

TORCH_LIBRARY_IMPL(rho_kernels, CPU, m) {
  m.impl("score_rows", &rho_cpu::score_rows_cpu);
  m.impl("select_rows", &rho_cpu::select_rows_cpu);
  m.impl("partial_rows", &rho_cpu::partial_rows_cpu);
}
