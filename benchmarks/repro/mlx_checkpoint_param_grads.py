"""MLX's `mx.checkpoint` saves little memory once the checkpointed blocks' parameters need
gradients: a small reproduction, fit to report upstream (ml-explore/mlx).

Eight blocks, each computing 16 intermediates of its input's size. They are chained, and the
gradient of the sum is taken with respect to the input alone, or to the input and each block's
weight (as in training). MLX's peak memory is printed in input-sized arrays (4 MiB each) for
three versions:
- plain: no checkpointing;
- `mx.checkpoint`;
- `ordered`: a custom VJP that recomputes the block once its cotangent exists, and makes the
  input's gradient depend on the weight's, so the next block down waits for this block's
  weight gradient. This is what macos_mlx_benchmark/src/checkpoint.rs does through mlx-c.

Seen with mlx 0.32.2 on the CPU (pip install "mlx[cpu]==0.32.2"), 2026-12-04, in this order:

    weights need gradients: False  plain 275  mx.checkpoint 56  ordered 63
    weights need gradients: True   plain 290  mx.checkpoint 184  ordered 65

Run: python benchmarks/repro/mlx_checkpoint_param_grads.py
"""

import mlx.core as mx

N = 1 << 20  # float32 elements: 4 MiB


def block(x, w):
    parts = [mx.sin(x * w * (1.0 + k)) for k in range(16)]
    acc = x
    for t in parts:
        acc = acc + t * t
    return acc


def ordered_checkpoint(fun):
    """Recompute `fun` in its VJP only once the cotangent exists; the first input's gradient
    after the others'."""

    @mx.custom_function
    def f(*args):
        return fun(*args)

    @f.vjp
    def f_vjp(primals, cotangent, output):
        primals = mx.depends(list(primals), [cotangent])
        _, vjps = mx.vjp(lambda *a: [fun(*a)], primals, [cotangent])
        first = mx.depends([vjps[0]], vjps[1:])[0]
        return (first, *vjps[1:])

    return f


def peak(wrap, weights_need_grad):
    x = mx.random.normal((N,))
    ws = [mx.random.normal((N,)) for _ in range(8)]
    mx.eval(x, *ws)
    fn = wrap(block) if wrap else block

    def loss(x, *ws):
        h = x
        for w in ws:
            h = fn(h, w)
        return h.sum()

    argnums = list(range(9)) if weights_need_grad else [0]
    grad = mx.grad(loss, argnums=argnums)
    mx.reset_peak_memory()
    g = grad(x, *ws)
    mx.eval(g)
    return mx.get_peak_memory() / (4 * N)


if __name__ == "__main__":
    for need in (False, True):
        plain = peak(None, need)
        ckpt = peak(mx.checkpoint, need)
        ordered = peak(ordered_checkpoint, need)
        print(
            f"weights need gradients: {need!s:5}  plain {plain:.0f}  "
            f"mx.checkpoint {ckpt:.0f}  ordered {ordered:.0f}"
        )
