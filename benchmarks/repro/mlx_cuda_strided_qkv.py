"""MLX's fused kernels on strided views of one q | k | v matrix: a small reproduction, to narrow
down and report upstream (ml-explore/mlx) a fault seen on MLX's CUDA backend.

What was seen (one H200, mlx-cuda-13 0.32.2, 2026-12-05, benchmarks/h200-2026-12-05/): the MLX
binary with `FTB_MLX_QKV_LAYOUT_ONCE=1` lays out Phi-3's fused q | k | v projection once and
splits it, so q, k and v reach `mx.fast.rope` and `mx.fast.scaled_dot_product_attention` as
strided views ([B, H, T, D] with a T stride of (H + 2 KV) D rather than H D). The loss was NaN at
step 0 (last-n and LoRA); with MLX_USE_CUDA_GRAPHS=0 cuDNN then failed (`cudnnCreate ...
CUDNN_STATUS_INTERNAL_ERROR`, then `cudaStreamSynchronize ... illegal memory access`); with the
fused kernels off (RoPE and RMSNorm written out, the same SDPA) the run trained. On the CPU every
form agrees exactly.

This script computes each stage from the strided views and from contiguous copies of the same
values, forward and backward, and prints the largest difference and whether any value is not
finite. On the CPU every line should read 0 and `finite`; a stage that differs on the GPU names
the kernel.

Run (CPU): pip install "mlx[cpu]==0.32.2"; python benchmarks/repro/mlx_cuda_strided_qkv.py
Run (CUDA): pip install mlx==0.32.2 mlx-cuda-13==0.32.2; python benchmarks/repro/mlx_cuda_strided_qkv.py --gpu

Run here on the CPU (2026-12-05): every stage 0.000e+00 and finite, "all agree" (56 s on 2 cores).
Not yet run on a GPU: the device time of the session that found the fault was spent; whether it
reproduces the fault outside the binary is still to be seen.
"""

import sys

import mlx.core as mx

if "--gpu" in sys.argv:
    mx.set_default_device(mx.gpu)

# Phi-3-mini's attention: 32 heads of 96 (no grouped KV), a 4,096-token micro-batch.
B, T, H, KV, D = 8, 512, 32, 32, 96
mx.random.seed(0)
qkv = (mx.random.normal((B * T, (H + 2 * KV) * D)) * 0.5).astype(mx.bfloat16)
# Hugging Face's RoPE wavelengths for theta 10,000 (the binary passes them as `freqs`).
freqs = 10000.0 ** (mx.arange(0, D, 2, dtype=mx.float32) / D)


def split_heads(m, contiguous):
    parts = mx.split(m, [H * D, (H + KV) * D], axis=-1)
    out = []
    for a, n in zip(parts, (H, KV, KV)):
        if contiguous:
            a = mx.contiguous(a)
        out.append(a.reshape(B, T, n, D).transpose(0, 2, 1, 3))
    return out


def rope(x):
    return mx.fast.rope(x, D, traditional=False, base=None, scale=1.0, offset=0, freqs=freqs)


def stages(m, contiguous):
    q, k, v = split_heads(m, contiguous)
    rq, rk = rope(q), rope(k)
    o = mx.fast.scaled_dot_product_attention(rq, rk, v, scale=D**-0.5, mask="causal")
    o_plain = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask="causal")
    return {"rope(q)": rq, "rope(k)": rk, "sdpa(q, k, v)": o_plain, "sdpa(rope)": o}


def loss(m, contiguous):
    o = stages(m, contiguous)["sdpa(rope)"]
    return (o.astype(mx.float32) ** 2).mean()


def report(name, a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    diff = mx.abs(a - b).max().item()
    finite = mx.all(mx.isfinite(a)).item()
    print(f"{name:<22} max |views - contiguous| {diff:.3e}  {'finite' if finite else 'NOT FINITE'}")
    return diff == 0 and finite


ok = True
views, plain = stages(qkv, False), stages(qkv, True)
for name in views:
    ok &= report(name, views[name], plain[name])
g_views = mx.grad(lambda m: loss(m, False))(qkv)
g_plain = mx.grad(lambda m: loss(m, True))(qkv)
ok &= report("grad of q | k | v", g_views, g_plain)
print(f"device {mx.default_device()}, mlx {mx.__version__}: {'all agree' if ok else 'DIFFERENT'}")
sys.exit(0 if ok else 1)
