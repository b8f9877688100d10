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
#include <c10/core/CachingDeviceAllocator.h>

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

namespace {
std::vector<at::Tensor> tensor_list(at::Tensor* const* ts, int64_t n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int64_t i = 0; i < n; ++i) v.push_back(*ts[i]);
  return v;
}
}  // namespace

extern "C" {

// PyTorch's AdamW(fused=True) step over all parameters in a few multi-tensor kernels (ATen's
// _fused_adamw_): decoupled weight decay, bias-corrected moments, eps added after the square root,
// the same update as torch::optim::AdamW. `step` is the (already incremented) step count as a
// float32 scalar tensor on the parameters' device, shared by all parameters.
char* ftb_fused_adamw(at::Tensor* const* params, at::Tensor* const* grads, at::Tensor* const* exp_avg,
                      at::Tensor* const* exp_avg_sq, int64_t n, const at::Tensor* step, double lr,
                      double beta1, double beta2, double weight_decay, double eps) {
  FTB_PROTECT({
    auto p = tensor_list(params, n);
    auto g = tensor_list(grads, n);
    auto m = tensor_list(exp_avg, n);
    auto v = tensor_list(exp_avg_sq, n);
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  })
}

// torch.nn.utils.clip_grad_norm_ (foreach): total L2 norm of all gradients (per-tensor norms in
// fp32), every gradient scaled in place by min(1, max_norm / (norm + 1e-6)). The norm before
// clipping is returned as a device scalar; nothing synchronises.
char* ftb_clip_grad_norm(at::Tensor* const* grads, int64_t n, double max_norm, at::Tensor** norm) {
  FTB_PROTECT({
    auto g = tensor_list(grads, n);
    auto norms = at::_foreach_norm(g, 2, at::kFloat);
    auto total = at::linalg_vector_norm(at::stack(norms), 2);
    auto coef = at::clamp_max(max_norm / (total + 1e-6), 1.0);
    at::_foreach_mul_(g, coef);
    *norm = new at::Tensor(total);
  })
}

}  // extern "C"

namespace {
// The device allocator of `kind` (0: CUDA, 1: MPS). For CUDA this is libtorch's CUDA caching
// allocator, the object `c10::cuda::CUDACachingAllocator::get()` returns (libc10_cuda registers it
// as the CUDA allocator); reaching it through c10's device-generic interface keeps this file free
// of <c10/cuda/...> headers, which need the CUDA toolkit's, so the CPU build compiles it too.
c10::DeviceAllocator* device_allocator(int kind) {
  return c10::getDeviceAllocator(kind == 1 ? c10::DeviceType::MPS : c10::DeviceType::CUDA);
}
}  // namespace

extern "C" {

// The caching allocator's statistics for `device` (all pools together), as
// `c10::cuda::CUDACachingAllocator::getDeviceStats(device)` gives them (torch.cuda.memory_stats):
// out[0] max allocated bytes (live tensors), out[1] max reserved bytes (segments held from the
// device, free blocks included), out[2] allocated now, out[3] reserved now.
char* ftb_allocator_stats(int kind, int device, int64_t* out) {
  FTB_PROTECT({
    auto stats = device_allocator(kind)->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].peak;
    out[1] = stats.reserved_bytes[all].peak;
    out[2] = stats.allocated_bytes[all].current;
    out[3] = stats.reserved_bytes[all].current;
  })
}

// Starts a new measurement window: optionally returns the cached free blocks to the device
// (torch.cuda.empty_cache), then resets the peaks to the current values
// (torch.cuda.reset_peak_memory_stats: `resetPeakStats`).
char* ftb_allocator_reset(int kind, int device, int empty_cache) {
  FTB_PROTECT({
    auto* a = device_allocator(kind);
    if (empty_cache != 0) a->emptyCache();
    a->resetPeakStats(static_cast<c10::DeviceIndex>(device));
  })
}

}  // extern "C"
