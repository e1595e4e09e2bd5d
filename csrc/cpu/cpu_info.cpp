#include "cpu/cpu_info.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace moe_kernels::cpu {
namespace {

Isa machine_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // AMX-BF16 is not queryable through __builtin_cpu_supports on every gcc; oneDNN detects it
  // itself, so "amx" here means "AVX-512-BF16 present, let brgemm pick AMX if it can".
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return __builtin_cpu_supports("avx512bf16") ? Isa::kAmx : Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa parse(const char* s, Isa fallback) {
  if (s == nullptr || *s == '\0') return fallback;
  if (!std::strcmp(s, "scalar")) return Isa::kScalar;
  if (!std::strcmp(s, "avx2")) return Isa::kAvx2;
  if (!std::strcmp(s, "avx512")) return Isa::kAvx512;
  if (!std::strcmp(s, "amx")) return Isa::kAmx;
  throw std::invalid_argument(std::string("MOE_KERNELS_CPU_ISA: unknown ISA '") + s +
                              "' (expected scalar, avx2, avx512 or amx)");
}

}  // namespace

Isa detected_isa() {
  static const Isa isa = [] {
    Isa hw = machine_isa();
    Isa want = parse(std::getenv("MOE_KERNELS_CPU_ISA"), hw);
    // A request above what the hardware has is lowered, never honoured blindly.
    return static_cast<int>(want) < static_cast<int>(hw) ? want : hw;
  }();
  return isa;
}

std::string detected_isa_name() {
  switch (detected_isa()) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace moe_kernels::cpu
