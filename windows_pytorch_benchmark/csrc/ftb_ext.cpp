// ATen entry points that tch 0.24 does not wrap, called from Rust through a C ABI.
//
// tch's generated bindings leave out `_flash_attention_forward` (variable-length flash attention)
// and the SDPA backend switches of `at::globalContext()`. Both are plain ATen calls: no kernel is
// written here. A tch `Tensor` is a pointer to an `at::Tensor` (torch-sys's `tensor` type), so
// tensors cross the boundary as `at::Tensor*`; returned tensors are heap-allocated and owned by
// the Rust side from then on (tch frees them with `at_free`).
//
// Every function returns nullptr on success, else a malloc'd message the caller frees with
// `ftb_free_error`: C++ exceptions must not cross into Rust.

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <vector>

namespace {
char* error_message(const char* what) {
  char* m = static_cast<char*>(std::malloc(std::strlen(what) + 1));
  if (m != nullptr) std::strcpy(m, what);
  return m;
}
}  // namespace

#define FTB_PROTECT(body)                              \
  try {                                                \
    body;                                              \
    return nullptr;                                    \
  } catch (const std::exception& e) {                  \
    return error_message(e.what());                    \
  } catch (...) {                                      \
    return error_message("unknown C++ exception");     \
  }

extern "C" {

void ftb_free_error(char* e) { std::free(e); }

// Which fused attention kernels `scaled_dot_product_attention` may pick (process-wide).
char* ftb_sdp_enable(int flash, int mem_efficient, int math, int cudnn) {
  FTB_PROTECT({
    auto& c = at::globalContext();
    c.setSDPUseFlash(flash != 0);
    c.setSDPUseMemEfficient(mem_efficient != 0);
    c.setSDPUseMath(math != 0);
    c.setSDPUseCuDNN(cudnn != 0);
  })
}

// Causal flash attention over documents laid end to end (FlashAttention-2's varlen API through
// ATen): q [tokens, heads, head_dim], k/v [tokens, kv_heads, head_dim], cu_seqlens int32
// [documents + 1] with the offsets of each document. Differentiable: ATen's autograd formula for
// `_flash_attention_forward` calls `_flash_attention_backward`.
char* ftb_flash_varlen(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                       const at::Tensor* cu_seqlens, int64_t max_len, at::Tensor** out) {
  FTB_PROTECT({
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu_seqlens, *cu_seqlens, max_len, max_len,
                                          0.0, /*is_causal=*/true, /*return_debug_mask=*/false);
    *out = new at::Tensor(std::get<0>(r));
  })
}

}  // extern "C"
