//! Model FLOPs per token: one function, every factor commented.
//!
//! Conventions (as torchtitan and the PaLM paper's MFU): a matrix product of an `m×k` by a `k×n`
//! matrix costs `2·m·k·n` FLOPs; element-wise work (norms, RoPE, SiLU, softmax) is not counted; the
//! embedding lookup is a gather, not a product. Only real (non-padding) tokens count, so padding
//! lowers MFU, as it should. The backward pass of a product costs one forward's worth for the
//! input gradient and one more for the weight gradient; a part that needs neither (a frozen prefix
//! with nothing trainable before it) costs forward only.

use serde::{Deserialize, Serialize};

use crate::config::{LoraTarget, StrategyConfig, StrategyKind};
use crate::model::ModelShape;

/// The pieces of one token's cost, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FlopsBreakdown {
    pub forward: f64,
    pub backward: f64,
}

impl FlopsBreakdown {
    pub fn total(&self) -> f64 {
        self.forward + self.backward
    }
}

/// FLOPs of forward + backward for one token of a sequence of `seq_len` tokens.
pub fn flops_per_token(
    shape: &ModelShape,
    strategy: &StrategyConfig,
    seq_len: usize,
) -> FlopsBreakdown {
    let (h, v, l) = (
        shape.hidden_size as f64,
        shape.vocab_size as f64,
        shape.num_layers,
    );
    // Every projection of a block (q|k|v fused or split, the same weights either way; with
    // grouped-query attention k and v are num_kv_heads x head_dim wide): in x out weights.
    let block_weights: f64 = shape
        .projections()
        .iter()
        .map(|p| (p.in_features * p.out_features) as f64)
        .sum();
    // Forward matmul FLOPs per token: 2 per weight (multiply + add).
    let block_fwd = 2.0 * block_weights;
    let head_fwd = 2.0 * h * v;
    // Attention scores QK^T and the weighted sum AV: 2·T·d each per layer for a token that sees
    // T keys, i.e. 4·T·d per layer. With causal masking a token sees on average (T+1)/2 keys, so we
    // count the causal half: 4·d·(T+1)/2 per layer (the work a flash kernel actually does).
    let d_attn = shape.attention_width() as f64;
    let attn_fwd = 4.0 * d_attn * (seq_len as f64 + 1.0) / 2.0;

    let lora_fwd = |rank: usize, targets: &[LoraTarget]| -> f64 {
        // Each adapter: x·Aᵀ (in→r) then ·Bᵀ (r→out): 2·r·(in + out) per token.
        // Split families adapt q, k and v (gate and up) each with its own adapter.
        shape
            .projections()
            .iter()
            .filter(|p| targets.contains(&p.target))
            .map(|p| 2.0 * rank as f64 * (p.in_features + p.out_features) as f64)
            .sum()
    };

    let mut fwd = 0.0;
    let mut bwd = 0.0;
    match strategy.kind {
        StrategyKind::Full => {
            // Everything needs input and weight gradients: backward = 2 × forward.
            fwd = l as f64 * (block_fwd + attn_fwd) + head_fwd;
            bwd = 2.0 * fwd;
        }
        StrategyKind::LastN => {
            let n = strategy.last_n.min(l);
            let frozen = (l - n) as f64;
            // Frozen prefix: forward only (nothing before it trains, so no gradient flows there).
            fwd += frozen * (block_fwd + attn_fwd);
            // Trainable blocks: weight gradients (1×) and input gradients (1×); attention has no
            // weights, its backward is the input gradient of QK^T and AV: 2 × its forward.
            fwd += n as f64 * (block_fwd + attn_fwd);
            bwd += n as f64 * (2.0 * block_fwd + 2.0 * attn_fwd);
            // The LM head trains: 3 × forward in all. The first trainable block's input gradient
            // is computed by autograd frameworks unless told otherwise; we count the minimum.
            fwd += head_fwd;
            bwd += 2.0 * head_fwd;
        }
        StrategyKind::Lora => {
            let mut t = strategy.lora_targets.clone();
            t.sort();
            t.dedup();
            let adapters = lora_fwd(strategy.lora_rank, &t);
            // Frozen base weights need input gradients only (1× forward) in every block, since
            // adapters in every block train; adapters need both (2×); attention 2×.
            fwd = l as f64 * (block_fwd + attn_fwd + adapters) + head_fwd;
            bwd = l as f64 * (block_fwd + 2.0 * attn_fwd + 2.0 * adapters) + head_fwd;
        }
    }
    FlopsBreakdown {
        forward: fwd,
        backward: bwd,
    }
}

/// FLOPs computed again per token under activation checkpointing (`grad_checkpoint`): the forward
/// pass of every block that needs gradients (all of them for full and LoRA, the last N for
/// last-n), LoRA adapters included; the head and the frozen prefix are not recomputed. 0 without
/// checkpointing. Hardware FLOPs (`hfu`) count this on top of the model FLOPs (`mfu`).
pub fn recompute_flops_per_token(
    shape: &ModelShape,
    strategy: &StrategyConfig,
    seq_len: usize,
) -> f64 {
    if !strategy.grad_checkpoint {
        return 0.0;
    }
    let blocks = crate::measure::memory::blocks_with_grad(shape, strategy) as f64;
    // One block's forward: every term of `flops_per_token` for a block (products, attention,
    // adapters), read off a one-layer shape so the two counts cannot drift apart.
    let one = ModelShape {
        num_layers: 1,
        ..shape.clone()
    };
    let s = StrategyConfig {
        kind: match strategy.kind {
            StrategyKind::LastN => StrategyKind::Full,
            k => k,
        },
        ..strategy.clone()
    };
    let head = 2.0 * shape.hidden_size as f64 * shape.vocab_size as f64;
    blocks * (flops_per_token(&one, &s, seq_len).forward - head)
}

/// FLOPs of the LM head for one token: forward 2·h·V; backward 2× forward when the head trains
/// (last-n, full), 1× (input gradient only) under LoRA.
pub fn head_flops_per_token(shape: &ModelShape, strategy: &StrategyConfig) -> f64 {
    let fwd = 2.0 * shape.hidden_size as f64 * shape.vocab_size as f64;
    match strategy.kind {
        StrategyKind::Lora => 2.0 * fwd,
        _ => 3.0 * fwd,
    }
}

/// FLOPs of one optimizer step. Both binaries apply the LM head (and the loss) only at positions
/// that carry a loss: every record of length `n` contributes `n × (flops_per_token(n) − head)`,
/// and each of the step's `loss_tokens` one head.
pub fn step_flops(
    shape: &ModelShape,
    strategy: &StrategyConfig,
    doc_lengths: &[usize],
    loss_tokens: usize,
) -> f64 {
    let head = head_flops_per_token(shape, strategy);
    let body: f64 = doc_lengths
        .iter()
        .map(|&n| n as f64 * (flops_per_token(shape, strategy, n).total() - head))
        .sum();
    body + loss_tokens as f64 * head
}

/// What the device computes in one optimizer step: [`step_flops`] plus the recomputation of
/// activation checkpointing ([`recompute_flops_per_token`] for every token of every record).
pub fn step_hardware_flops(
    shape: &ModelShape,
    strategy: &StrategyConfig,
    doc_lengths: &[usize],
    loss_tokens: usize,
) -> f64 {
    let recompute: f64 = doc_lengths
        .iter()
        .map(|&n| n as f64 * recompute_flops_per_token(shape, strategy, n))
        .sum();
    step_flops(shape, strategy, doc_lengths, loss_tokens) + recompute
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_count_tiny_full() {
        // tiny: h=64, heads 4×16, I=128, V=32064, 2 layers.
        // weights per block: qkv 64·192 + o 64·64 + gate_up 64·256 + down 128·64 = 12288+4096+16384+8192 = 40960
        // forward per token at T=9: 2 layers × (2·40960 + 4·64·10/2) + 2·64·32064 = 2·(81920+1280) + 4104192 = 4270592
        let s = StrategyConfig {
            kind: StrategyKind::Full,
            ..Default::default()
        };
        let f = flops_per_token(&ModelShape::tiny(), &s, 9);
        assert_eq!(f.forward, 4_270_592.0);
        assert_eq!(f.backward, 2.0 * 4_270_592.0);
    }

    #[test]
    fn phi3_mini_matches_six_n_and_the_reference_mfu() {
        let shape = ModelShape::phi3_mini();
        let full = flops_per_token(
            &shape,
            &StrategyConfig {
                kind: StrategyKind::Full,
                ..Default::default()
            },
            1,
        );
        // Matmul weights: 3.821 B parameters minus the 98.5 M-entry embedding: 6·N ≈ 22.34 GFLOP.
        let n = 3_821_079_552.0 - 32_064.0 * 3072.0 - 32.0 * 2.0 * 3072.0 - 3072.0;
        assert!(
            (full.total() / (6.0 * n) - 1.0).abs() < 1e-3,
            "{}",
            full.total() / (6.0 * n)
        );
        // measuring.md: last-4 at 30,773 tokens/s was 36.7 % of 810 TFLOP/s ⇒ 9.66 GFLOP/token at
        // dolly-like lengths (~265 tokens mean).
        let last4 = flops_per_token(&shape, &StrategyConfig::default(), 265).total();
        assert!((last4 / 9.66e9 - 1.0).abs() < 0.01, "{last4}");
        // LoRA counts about 4N (forward + input gradients), as the reference row says.
        let lora = flops_per_token(
            &shape,
            &StrategyConfig {
                kind: StrategyKind::Lora,
                ..Default::default()
            },
            1,
        )
        .total();
        assert!(
            (lora / (4.0 * n) - 1.0).abs() < 0.02,
            "{}",
            lora / (4.0 * n)
        );
    }

    #[test]
    fn checkpointing_recomputes_the_forward_pass_of_the_blocks_that_train() {
        let shape = ModelShape::phi3_mini();
        let with = |kind: StrategyKind| StrategyConfig {
            kind,
            grad_checkpoint: true,
            ..Default::default()
        };
        // Without checkpointing nothing is recomputed.
        assert_eq!(
            recompute_flops_per_token(&shape, &StrategyConfig::default(), 512),
            0.0
        );
        // LoRA: about 4N of model FLOPs, and the forward pass (about 2N) again: 1.5x in all, the
        // issue's "4N to about 6N"; full: 6N + 2N = 1.33x.
        for (kind, ratio) in [(StrategyKind::Lora, 1.5), (StrategyKind::Full, 4.0 / 3.0)] {
            let s = with(kind);
            let model = flops_per_token(&shape, &s, 512);
            let recompute = recompute_flops_per_token(&shape, &s, 512);
            let r = (model.total() + recompute) / model.total();
            assert!((r / ratio - 1.0).abs() < 0.02, "{kind:?}: {r}");
            // Full: exactly the forward pass without the head.
            if kind == StrategyKind::Full {
                let head = 2.0 * 3072.0 * 32_064.0;
                assert!((recompute - (model.forward - head)).abs() < 1.0);
            }
        }
        // last-n: the last N blocks only, each one block's forward (products and attention).
        let s = with(StrategyKind::LastN);
        let full = with(StrategyKind::Full);
        let per_block = recompute_flops_per_token(&shape, &full, 512) / 32.0;
        let r = recompute_flops_per_token(&shape, &s, 512);
        assert!(
            (r - 4.0 * per_block).abs() < 1.0,
            "{r} vs {}",
            4.0 * per_block
        );
        // The step's hardware FLOPs add it for every token of every record.
        let docs = [100, 300];
        let hw = step_hardware_flops(&shape, &s, &docs, 200);
        let model = step_flops(&shape, &s, &docs, 200);
        let want = 100.0 * recompute_flops_per_token(&shape, &s, 100)
            + 300.0 * recompute_flops_per_token(&shape, &s, 300);
        assert!((hw - model - want).abs() / want < 1e-12);
    }

    #[test]
    fn step_flops_sums_documents() {
        let s = StrategyConfig::default();
        let shape = ModelShape::tiny();
        // Every position carries a loss: the per-token function, summed.
        let f = step_flops(&shape, &s, &[10, 20], 30);
        let want = 10.0 * flops_per_token(&shape, &s, 10).total()
            + 20.0 * flops_per_token(&shape, &s, 20).total();
        assert!((f - want).abs() < 1.0, "{f} vs {want}");
        // Ten fewer loss tokens: ten fewer head applications (2·64·32064 forward, 3x in all).
        let g = step_flops(&shape, &s, &[10, 20], 20);
        assert!((f - g - 10.0 * 3.0 * 2.0 * 64.0 * 32_064.0).abs() < 1.0);
    }
    /// Grouped-query attention and a tied head, counted by hand. tiny-llama: h=64, 4 heads of
    /// 16, 2 kv heads (k and v 32 wide), I=128, V=128,256, 2 blocks. Weights per block: q 64·64 +
    /// k 64·32 + v 64·32 + o 64·64 + gate 64·128 + up 64·128 + down 128·64 = 36,864. At T=9:
    /// attention 4·64·(9+1)/2 = 1,280 per block; head 2·64·128,256 = 16,416,768 (the tied
    /// embedding is the head's matrix: the same product). Forward = 2·(2·36,864 + 1,280) +
    /// 16,416,768 = 16,566,784.
    #[test]
    fn hand_count_grouped_query_attention_and_a_tied_head() {
        use crate::config::ModelPreset;
        let shape = ModelShape::from_preset(ModelPreset::TinyLlama);
        let full = StrategyConfig {
            kind: StrategyKind::Full,
            ..Default::default()
        };
        let f = flops_per_token(&shape, &full, 9);
        assert_eq!(f.forward, 16_566_784.0);
        assert_eq!(f.backward, 2.0 * 16_566_784.0);
        // last-n, N=1: the tied head trains as an untied one would (weight and input gradients:
        // 2 x its forward); the frozen block's forward only; the trained block 2 x forward.
        let last1 = StrategyConfig {
            kind: StrategyKind::LastN,
            last_n: 1,
            ..Default::default()
        };
        let f = flops_per_token(&shape, &last1, 9);
        assert_eq!(f.forward, 16_566_784.0);
        assert_eq!(
            f.backward,
            2.0 * 73_728.0 + 2.0 * 1_280.0 + 2.0 * 16_416_768.0
        );
        // tiny-qwen3: head_dim 32 (attention 128 wide at width 64), 2 kv heads (64 wide), LoRA
        // rank 4 on q, k, v, o, gate, up, down, one adapter each. Weights per block: q 64·128 + k
        // 64·64 + v 64·64 + o 128·64 + 3·64·128 = 49,152; attention 4·128·5 = 2,560; adapters
        // 2·4·(192 + 128 + 128 + 192 + 192 + 192 + 192) = 9,728; head 2·64·151,936 = 19,447,808.
        let shape = ModelShape::from_preset(ModelPreset::TinyQwen3);
        let lora = StrategyConfig {
            kind: StrategyKind::Lora,
            lora_rank: 4,
            ..Default::default()
        };
        let f = flops_per_token(&shape, &lora, 9);
        assert_eq!(
            f.forward,
            2.0 * (98_304.0 + 2_560.0 + 9_728.0) + 19_447_808.0
        );
        // Frozen weights: input gradients (1x); attention and adapters 2x; head input gradient.
        assert_eq!(
            f.backward,
            2.0 * (98_304.0 + 2.0 * 2_560.0 + 2.0 * 9_728.0) + 19_447_808.0
        );
    }
}
