#pragma once
// Runtime CPU feature detection for the CPU backend's ISA dispatch.
#include <string>

namespace moe_kernels::cpu {

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };

// Highest ISA the machine supports, lowered by MOE_KERNELS_CPU_ISA={scalar,avx2,avx512,amx}.
Isa detected_isa();
std::string detected_isa_name();

}  // namespace moe_kernels::cpu
