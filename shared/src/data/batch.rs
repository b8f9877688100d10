//! Batch plans: which records form each optimizer step, and how a step's records are laid out in
//! micro-batches.
//!
//! Step composition does not depend on the plan: each epoch shuffles the records with the seed and
//! cuts them into steps of `micro_batch_size × grad_accum` records (the last step may be shorter).
//! The plan only arranges a step's records into micro-batches, and the loss of a step is the sum of
//! per-token losses over the whole step divided by the step's loss-token count, so the padded,
//! bucketed and packed plans compute the same loss and gradient (the tests prove it).
//!
//! Labels are shifted here (`labels[t]` is the target predicted at position `t`), so no backend can
//! get the shift wrong, and a packed row never predicts across a document boundary.

use serde::{Deserialize, Serialize};

use super::{ids, Sample};
use crate::config::{BatchConfig, BatchPlanKind};
use crate::rng::{mix64, SplitMix64};

/// Label value that carries no loss (PyTorch's `ignore_index` default).
pub const IGNORE_INDEX: i64 = -100;

/// One forward/backward pass worth of data, row-major `[rows, seq_len]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicroBatch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<i64>,
    pub labels: Vec<i64>,
    /// Positions for RoPE: restart at 0 for every document.
    pub position_ids: Vec<i64>,
    /// Packed rows only: the document each position belongs to (unique per row), -1 on padding.
    /// A position attends to earlier positions of its own document only. `None` means each row
    /// holds one right-padded record, so plain causal attention keeps real tokens away from padding.
    pub segment_ids: Option<Vec<i32>>,
    /// Real tokens in each row: every plan writes records from column 0, so a row's padding is
    /// its columns from here on.
    #[serde(default)]
    pub row_lengths: Vec<usize>,
    pub loss_tokens: usize,
    pub input_tokens: usize,
    pub padded_tokens: usize,
}

/// One optimizer step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    pub index: usize,
    pub epoch: usize,
    pub micro_batches: Vec<MicroBatch>,
    /// Records in the step.
    pub samples: usize,
    pub loss_tokens: usize,
    pub input_tokens: usize,
    pub padded_tokens: usize,
    /// Length of every record in the step.
    pub doc_lengths: Vec<usize>,
    /// Length of every record the backends compute: those of micro-batches with loss tokens (a
    /// micro-batch without any has zero loss and gradient, so no backend runs it). The FLOP
    /// count's input; all ranks' records in a data-parallel run.
    #[serde(default)]
    pub computed_doc_lengths: Vec<usize>,
    /// Index (into the prepared samples) of every record in the step, in step order.
    pub sample_ids: Vec<usize>,
}

/// The record order of every epoch: a permutation drawn from (seed, epoch).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    SplitMix64::new(mix64(seed ^ 0x004f_5244_4552_u64) ^ (epoch as u64).wrapping_mul(0x9e37_79b9))
        .shuffle(&mut order);
    order
}

/// All steps of a run.
pub fn plan_steps(
    samples: &[Sample],
    cfg: &BatchConfig,
    pad_to: Option<usize>,
    train_on_prompt: bool,
    seed: u64,
    epochs: usize,
    max_steps: Option<usize>,
) -> Vec<Step> {
    let per_step = cfg.micro_batch_size * cfg.grad_accum;
    let mut steps = Vec::new();
    'epochs: for epoch in 0..epochs {
        let order = epoch_order(samples.len(), seed, epoch);
        for chunk in order.chunks(per_step) {
            if max_steps.is_some_and(|m| steps.len() >= m) {
                break 'epochs;
            }
            let docs: Vec<&Sample> = chunk.iter().map(|&i| &samples[i]).collect();
            let mbs = layout(&docs, cfg, pad_to, train_on_prompt);
            steps.push(Step {
                index: steps.len(),
                epoch,
                samples: docs.len(),
                loss_tokens: mbs.iter().map(|m| m.loss_tokens).sum(),
                input_tokens: mbs.iter().map(|m| m.input_tokens).sum(),
                padded_tokens: mbs.iter().map(|m| m.padded_tokens).sum(),
                doc_lengths: docs.iter().map(|d| d.len()).collect(),
                computed_doc_lengths: computed_doc_lengths(&mbs),
                sample_ids: chunk.to_vec(),
                micro_batches: mbs,
            });
        }
    }
    steps
}

/// The records of the micro-batches a backend runs: those with at least one loss token.
pub fn computed_doc_lengths(mbs: &[MicroBatch]) -> Vec<usize> {
    mbs.iter()
        .filter(|m| m.loss_tokens > 0)
        .flat_map(MicroBatch::doc_lengths)
        .collect()
}

/// A step's records laid out in micro-batches by the configured plan.
pub(crate) fn layout(
    docs: &[&Sample],
    cfg: &BatchConfig,
    pad_to: Option<usize>,
    train_on_prompt: bool,
) -> Vec<MicroBatch> {
    match cfg.plan {
        BatchPlanKind::Padded => padded(docs, cfg.micro_batch_size, pad_to, train_on_prompt),
        BatchPlanKind::Bucketed => bucketed(docs, cfg.max_tokens_per_micro_batch, train_on_prompt),
        BatchPlanKind::Packed => packed(docs, cfg.max_tokens_per_micro_batch, train_on_prompt),
    }
}

/// Consecutive records, `micro_batch_size` per micro-batch, right-padded to the longest or `pad_to`.
fn padded(
    docs: &[&Sample],
    micro_batch_size: usize,
    pad_to: Option<usize>,
    top: bool,
) -> Vec<MicroBatch> {
    docs.chunks(micro_batch_size)
        .map(|c| {
            let len = pad_to.unwrap_or_else(|| c.iter().map(|d| d.len()).max().unwrap_or(1));
            one_per_row(c, len, top)
        })
        .collect()
}

/// Padded-token cost charged per extra micro-batch when cutting a step: launches and weight
/// reads that do not shrink with the micro-batch (about 1,500 kernels; on an H200 ~8 ms, the time
/// of ~1k tokens of phi-3-mini). Only decides where cuts fall, never what is computed.
const MICRO_BATCH_OVERHEAD_TOKENS: usize = 4096;

/// The step's records sorted by length (longest first, ties in step order), cut into contiguous
/// micro-batches that minimise padded tokens + a fixed cost per micro-batch (dynamic programming
/// over cut points), each within the token budget. Cutting greedily at the budget instead padded
/// 45 % of the tokens of a 64-record dolly-shaped step (measured on the H200, 2026-11-28).
fn bucketed(docs: &[&Sample], budget: usize, top: bool) -> Vec<MicroBatch> {
    let mut sorted: Vec<&Sample> = docs.to_vec();
    sorted.sort_by_key(|d| std::cmp::Reverse(d.len()));
    let n = sorted.len();
    // best[i]: least cost to lay out sorted[..i]; cut[i]: where its last micro-batch starts.
    let mut best = vec![usize::MAX; n + 1];
    let mut cut = vec![0; n + 1];
    best[0] = 0;
    for i in 1..=n {
        for j in (0..i).rev() {
            let rows = i - j;
            let padded = rows * sorted[j].len().max(1);
            if padded > budget && rows > 1 {
                break; // longer groups only get bigger
            }
            let c = best[j].saturating_add(padded + MICRO_BATCH_OVERHEAD_TOKENS);
            if c < best[i] {
                best[i] = c;
                cut[i] = j;
            }
        }
    }
    let mut bounds = Vec::new();
    let mut i = n;
    while i > 0 {
        bounds.push((cut[i], i));
        i = cut[i];
    }
    bounds.reverse();
    bounds
        .into_iter()
        .map(|(a, b)| one_per_row(&sorted[a..b], sorted[a].len(), top))
        .collect()
}

fn one_per_row(docs: &[&Sample], len: usize, top: bool) -> MicroBatch {
    let rows = docs.len();
    let mut mb = MicroBatch::empty(rows, len, false);
    for (r, d) in docs.iter().enumerate() {
        mb.place(r, 0, d, 0, top);
    }
    mb
}

/// Records packed first-fit decreasing into rows (capacity: a quarter of the token budget, or the
/// longest record if that is longer), then rows grouped into micro-batches under the token budget.
/// Each row is padded to the longest row of its micro-batch.
fn packed(docs: &[&Sample], budget: usize, top: bool) -> Vec<MicroBatch> {
    let mut sorted: Vec<&Sample> = docs.to_vec();
    sorted.sort_by_key(|d| std::cmp::Reverse(d.len()));
    // Row capacity: the longest record, at least 1/4 of the budget, never more than the budget.
    let longest = sorted.first().map(|d| d.len()).unwrap_or(1);
    let capacity = longest.max(budget / 4).min(budget).max(longest);
    let mut rows: Vec<(usize, Vec<&Sample>)> = Vec::new();
    for d in sorted {
        match rows.iter_mut().find(|(used, _)| used + d.len() <= capacity) {
            Some((used, v)) => {
                *used += d.len();
                v.push(d);
            }
            None => rows.push((d.len(), vec![d])),
        }
    }
    rows.sort_by_key(|(used, _)| std::cmp::Reverse(*used));
    let mut out = Vec::new();
    let mut start = 0;
    while start < rows.len() {
        let width = rows[start].0;
        let n = (budget / width.max(1)).max(1);
        let end = (start + n).min(rows.len());
        let mut mb = MicroBatch::empty(end - start, width, true);
        for (r, (_, ds)) in rows[start..end].iter().enumerate() {
            let mut offset = 0;
            for (k, d) in ds.iter().enumerate() {
                mb.place(r, offset, d, k as i32, top);
                offset += d.len();
            }
        }
        out.push(mb);
        start = end;
    }
    out
}

/// Flat indices of the positions that carry a loss (label != [`IGNORE_INDEX`]), in order: where
/// a backend runs the LM head and the loss (prompt and padding positions need no logits).
pub fn loss_positions(labels: &[i64]) -> Vec<usize> {
    labels
        .iter()
        .enumerate()
        .filter(|(_, &l)| l != IGNORE_INDEX)
        .map(|(i, _)| i)
        .collect()
}

/// A micro-batch's real tokens, every document end to end: what a backend computes when it
/// drops padding (the PyTorch binary's variable-length attention, the MLX binary's dense layers).
#[derive(Debug, Clone, PartialEq)]
pub struct RealTokens {
    /// The flat index (into the `rows x seq_len` layout) of each real token, row by row.
    pub slots: Vec<usize>,
    /// Document bounds as offsets into `slots` (`cu_seqlens`): document k is
    /// `doc_bounds[k]..doc_bounds[k + 1]`.
    pub doc_bounds: Vec<usize>,
}

impl RealTokens {
    /// The longest document's length in tokens (0 without any).
    pub fn longest_doc(&self) -> usize {
        self.doc_bounds
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or(0)
    }

    /// `values` (one per position of the micro-batch's layout) at the real tokens.
    pub fn pick<T: Copy>(&self, values: &[T]) -> Vec<T> {
        self.slots.iter().map(|&i| values[i]).collect()
    }
}

impl MicroBatch {
    /// The real tokens and their documents' bounds. Every plan writes a row's records from
    /// column 0, so a row's real tokens are its first `row_lengths[r]`; a padded or bucketed row
    /// is one document, and in a packed row a new segment id starts a new document.
    pub fn real_tokens(&self) -> RealTokens {
        let mut slots = Vec::with_capacity(self.input_tokens);
        let mut doc_bounds = vec![0];
        let seg = |i: usize| self.segment_ids.as_ref().map_or(0, |s| s[i]);
        for r in 0..self.rows {
            let row = r * self.seq_len..r * self.seq_len + self.row_lengths[r];
            for i in row.clone() {
                if i > row.start && seg(i) != seg(i - 1) {
                    doc_bounds.push(slots.len());
                }
                slots.push(i);
            }
            if !row.is_empty() {
                doc_bounds.push(slots.len());
            }
        }
        RealTokens { slots, doc_bounds }
    }

    fn empty(rows: usize, seq_len: usize, segmented: bool) -> Self {
        let n = rows * seq_len;
        Self {
            rows,
            seq_len,
            input_ids: vec![i64::from(ids::PAD); n],
            labels: vec![IGNORE_INDEX; n],
            position_ids: (0..n).map(|i| (i % seq_len) as i64).collect(),
            segment_ids: segmented.then(|| vec![-1; n]),
            row_lengths: vec![0; rows],
            loss_tokens: 0,
            input_tokens: 0,
            padded_tokens: n,
        }
    }

    /// Writes a record into row `r` from column `offset`, as document `seg` of that row.
    fn place(&mut self, r: usize, offset: usize, d: &Sample, seg: i32, train_on_prompt: bool) {
        let base = r * self.seq_len + offset;
        let first_target = if train_on_prompt {
            1
        } else {
            d.prompt_len.max(1)
        };
        for (t, &id) in d.ids.iter().enumerate() {
            self.input_ids[base + t] = i64::from(id);
            self.position_ids[base + t] = t as i64;
            if let Some(s) = &mut self.segment_ids {
                s[base + t] = seg;
            }
            // Position t predicts token t+1 when that token is a target.
            if t + 1 < d.len() && t + 1 >= first_target {
                self.labels[base + t] = i64::from(d.ids[t + 1]);
                self.loss_tokens += 1;
            }
        }
        self.input_tokens += d.len();
        self.row_lengths[r] = self.row_lengths[r].max(offset + d.len());
    }

    /// The length of every record in the micro-batch: a row's real tokens, or each document of a
    /// packed row.
    pub fn doc_lengths(&self) -> Vec<usize> {
        match &self.segment_ids {
            None => self
                .row_lengths
                .iter()
                .copied()
                .filter(|&n| n > 0)
                .collect(),
            Some(seg) => {
                let mut out = Vec::new();
                for row in seg.chunks(self.seq_len.max(1)) {
                    let mut t = 0;
                    while t < row.len() {
                        if row[t] < 0 {
                            t += 1;
                            continue;
                        }
                        let start = t;
                        while t < row.len() && row[t] == row[start] {
                            t += 1;
                        }
                        out.push(t - start);
                    }
                }
                out
            }
        }
    }

    /// Whether position `q` may attend to position `k` of the same row (the reference semantics
    /// that backends implement with causal attention or a segment mask).
    pub fn may_attend(&self, row: usize, q: usize, k: usize) -> bool {
        if k > q {
            return false;
        }
        match &self.segment_ids {
            None => true,
            Some(s) => {
                let (sq, sk) = (s[row * self.seq_len + q], s[row * self.seq_len + k]);
                // Padding attends to itself only, so its softmax row is well defined.
                if sq < 0 {
                    q == k
                } else {
                    sq == sk
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use proptest::prelude::*;

    fn samples(n: usize, seed: u64) -> Vec<Sample> {
        synthetic::generate(n, seed)
            .into_iter()
            .map(|(s, _)| s)
            .collect()
    }

    fn cfg(plan: BatchPlanKind, mbs: usize, ga: usize, budget: usize) -> BatchConfig {
        BatchConfig {
            plan,
            micro_batch_size: mbs,
            grad_accum: ga,
            max_tokens_per_micro_batch: budget,
        }
    }

    /// Every (record, position) with its label, as seen through a plan.
    fn tokens_of(steps: &[Step]) -> Vec<Vec<(i64, i64, i64)>> {
        steps
            .iter()
            .map(|s| {
                let mut v: Vec<(i64, i64, i64)> = s
                    .micro_batches
                    .iter()
                    .flat_map(|m| {
                        (0..m.rows * m.seq_len)
                            .map(move |i| (m.input_ids[i], m.labels[i], m.position_ids[i]))
                    })
                    .filter(|t| t.0 != i64::from(ids::PAD))
                    .collect();
                v.sort();
                v
            })
            .collect()
    }

    #[test]
    fn plans_keep_step_composition_and_every_token() {
        let s = samples(37, 1);
        let a = plan_steps(
            &s,
            &cfg(BatchPlanKind::Padded, 3, 2, 2048),
            None,
            false,
            9,
            2,
            None,
        );
        let b = plan_steps(
            &s,
            &cfg(BatchPlanKind::Bucketed, 3, 2, 2048),
            None,
            false,
            9,
            2,
            None,
        );
        let c = plan_steps(
            &s,
            &cfg(BatchPlanKind::Packed, 3, 2, 2048),
            None,
            false,
            9,
            2,
            None,
        );
        assert_eq!(a.len(), 14, "ceil(37/6) steps per epoch x 2");
        for (x, y) in [(&a, &b), (&a, &c)] {
            for (p, q) in x.iter().zip(y.iter()) {
                assert_eq!(
                    (p.samples, p.loss_tokens, p.input_tokens),
                    (q.samples, q.loss_tokens, q.input_tokens)
                );
                let mut l1 = p.doc_lengths.clone();
                let mut l2 = q.doc_lengths.clone();
                l1.sort();
                l2.sort();
                assert_eq!(l1, l2);
            }
        }
        assert!(
            c.iter().map(|s| s.padded_tokens).sum::<usize>()
                <= a.iter().map(|s| s.padded_tokens).sum::<usize>()
        );
        assert_eq!(tokens_of(&a), tokens_of(&b));
        // Bucketing pads far less than padding in step order.
        let pad = |v: &[Step]| {
            v.iter()
                .map(|s| s.padded_tokens - s.input_tokens)
                .sum::<usize>()
        };
        assert!(
            pad(&b) < pad(&a),
            "bucketed padding {} vs padded {}",
            pad(&b),
            pad(&a)
        );
        for st in &b {
            for m in &st.micro_batches {
                assert!(m.padded_tokens <= 2048 || m.rows == 1, "budget kept");
            }
        }
    }

    /// Records without loss tokens (here: prompts cut by truncation) make micro-batches that no
    /// backend runs; the FLOP count's records leave them out, and only them.
    #[test]
    fn micro_batches_without_loss_tokens_are_not_computed() {
        let mut s = samples(40, 3);
        for (k, d) in s.iter_mut().enumerate() {
            if k % 3 == 0 {
                d.prompt_len = d.len(); // no response token: no loss token
            }
        }
        for plan in [
            BatchPlanKind::Padded,
            BatchPlanKind::Bucketed,
            BatchPlanKind::Packed,
        ] {
            let steps = plan_steps(&s, &cfg(plan, 1, 4, 4096), None, false, 5, 1, None);
            let mut skipped = 0;
            for st in &steps {
                let mut all: Vec<usize> = st
                    .micro_batches
                    .iter()
                    .flat_map(MicroBatch::doc_lengths)
                    .collect();
                let mut want = st.doc_lengths.clone();
                all.sort();
                want.sort();
                assert_eq!(all, want, "{plan:?}: every record in one micro-batch");
                let mut ran: Vec<usize> = st
                    .micro_batches
                    .iter()
                    .filter(|m| m.loss_tokens > 0)
                    .flat_map(MicroBatch::doc_lengths)
                    .collect();
                let mut computed = st.computed_doc_lengths.clone();
                ran.sort();
                computed.sort();
                assert_eq!(computed, ran);
                skipped += st.doc_lengths.len() - st.computed_doc_lengths.len();
            }
            if plan == BatchPlanKind::Padded {
                assert!(
                    skipped > 0,
                    "one record per micro-batch: some have no loss token"
                );
            }
        }
    }

    #[test]
    fn pad_to_pads_every_row() {
        let s = samples(4, 2);
        let st = plan_steps(
            &s,
            &cfg(BatchPlanKind::Padded, 1, 4, 0),
            Some(2048),
            true,
            1,
            1,
            None,
        );
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].micro_batches.len(), 4);
        assert!(st[0]
            .micro_batches
            .iter()
            .all(|m| m.seq_len == 2048 && m.rows == 1));
        assert_eq!(st[0].padded_tokens, 4 * 2048);
        assert_eq!(
            st[0].loss_tokens,
            s.iter().map(|x| x.len() - 1).sum::<usize>()
        );
    }

    /// Issue 14: the real-token layout and loss positions both binaries use, by hand.
    #[test]
    fn real_tokens_and_loss_positions_by_hand() {
        // One packed row of 8: document 0 (2 tokens), document 1 (4 tokens), 2 padding positions.
        let packed = MicroBatch {
            rows: 1,
            seq_len: 8,
            input_ids: vec![5, 6, 7, 8, 9, 10, 0, 0],
            labels: vec![6, -100, 8, 9, 10, -100, -100, -100],
            position_ids: vec![0, 1, 0, 1, 2, 3, 6, 7],
            segment_ids: Some(vec![0, 0, 1, 1, 1, 1, -1, -1]),
            row_lengths: vec![6],
            loss_tokens: 4,
            input_tokens: 6,
            padded_tokens: 8,
        };
        let real = packed.real_tokens();
        assert_eq!(real.slots, [0, 1, 2, 3, 4, 5]);
        assert_eq!(real.doc_bounds, [0, 2, 6]);
        assert_eq!(real.longest_doc(), 4);
        assert_eq!(real.pick(&packed.position_ids), [0, 1, 0, 1, 2, 3]);
        assert_eq!(loss_positions(&packed.labels), [0, 2, 3, 4]);
        // Two right-padded rows of 4 with 2 real tokens each: one document each.
        let rows = MicroBatch {
            rows: 2,
            seq_len: 4,
            input_ids: vec![5, 6, 0, 0, 8, 9, 0, 0],
            labels: vec![6, -100, -100, -100, 9, -100, -100, -100],
            position_ids: vec![0, 1, 2, 3, 0, 1, 2, 3],
            segment_ids: None,
            row_lengths: vec![2, 2],
            loss_tokens: 2,
            input_tokens: 4,
            padded_tokens: 8,
        };
        let real = rows.real_tokens();
        assert_eq!(real.slots, [0, 1, 4, 5]);
        assert_eq!(real.doc_bounds, [0, 2, 4]);
        assert_eq!(loss_positions(&rows.labels), [0, 4]);
        assert_eq!(loss_positions(&real.pick(&rows.labels)), [0, 2]);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        #[test]
        fn every_input_token_once_labels_masked_packing_isolated(
            n in 1usize..40, seed in 0u64..1000, mbs in 1usize..5, ga in 1usize..4,
            plan in prop_oneof![Just(BatchPlanKind::Padded), Just(BatchPlanKind::Bucketed), Just(BatchPlanKind::Packed)],
            top in any::<bool>(), budget in 1024usize..4096,
        ) {
            let s = samples(n, seed);
            let steps = plan_steps(&s, &cfg(plan, mbs, ga, budget), None, top, seed, 1, None);
            // Every record exactly once per epoch: rebuild documents from the micro-batches.
            // (Synthetic content never uses the pad id, so a right-padded row ends at its first pad.)
            let mut seen: Vec<Vec<u32>> = Vec::new();
            let mut loss_total = 0;
            for st in &steps {
                for m in &st.micro_batches {
                    for r in 0..m.rows {
                        let row = r * m.seq_len;
                        let mut spans: Vec<(usize, usize)> = Vec::new();
                        match &m.segment_ids {
                            None => spans.push((0, (0..m.seq_len).take_while(|&t| m.input_ids[row + t] != i64::from(ids::PAD)).count())),
                            Some(sg) => {
                                let mut t = 0;
                                while t < m.seq_len {
                                    if sg[row + t] < 0 { t += 1; continue; }
                                    let s0 = t;
                                    while t < m.seq_len && sg[row + t] == sg[row + s0] { t += 1; }
                                    spans.push((s0, t - s0));
                                }
                            }
                        }
                        let mut covered = vec![false; m.seq_len];
                        for (t0, len) in spans {
                            let doc: Vec<u32> = (0..len).map(|j| m.input_ids[row + t0 + j] as u32).collect();
                            let orig = s.iter().find(|x| x.ids == doc).expect("a document of the data set");
                            let first = if top { 1 } else { orig.prompt_len.max(1) };
                            for j in 0..len {
                                covered[t0 + j] = true;
                                prop_assert_eq!(m.position_ids[row + t0 + j], j as i64);
                                let lab = m.labels[row + t0 + j];
                                if j + 1 < len && j + 1 >= first { prop_assert_eq!(lab, i64::from(doc[j + 1])); loss_total += 1; }
                                else { prop_assert_eq!(lab, IGNORE_INDEX); }
                            }
                            if m.segment_ids.is_some() {
                                for q in t0..t0 + len {
                                    for k in 0..m.seq_len {
                                        prop_assert_eq!(m.may_attend(r, q, k), k >= t0 && k <= q);
                                    }
                                }
                            }
                            seen.push(doc);
                        }
                        for (t, c) in covered.iter().enumerate() {
                            if !c { prop_assert_eq!(m.labels[row + t], IGNORE_INDEX); }
                        }
                    }
                }
            }
            let mut want: Vec<Vec<u32>> = s.iter().map(|x| x.ids.clone()).collect();
            want.sort();
            seen.sort();
            prop_assert_eq!(seen, want);
            prop_assert_eq!(loss_total, steps.iter().map(|x| x.loss_tokens).sum::<usize>());
        }

        /// Every plan: the real tokens are the documents end to end (`doc_lengths`, no padding
        /// id), and the loss positions select the same labels through either layout.
        #[test]
        fn real_tokens_are_the_documents_end_to_end(
            n in 1usize..30, seed in 0u64..1000, mbs in 1usize..5,
            plan in prop_oneof![Just(BatchPlanKind::Padded), Just(BatchPlanKind::Bucketed), Just(BatchPlanKind::Packed)],
        ) {
            let s = samples(n, seed);
            for st in plan_steps(&s, &cfg(plan, mbs, 2, 2048), None, false, seed, 1, None) {
                for m in &st.micro_batches {
                    let real = m.real_tokens();
                    let lens: Vec<usize> = real.doc_bounds.windows(2).map(|w| w[1] - w[0]).collect();
                    prop_assert_eq!(&lens, &m.doc_lengths());
                    prop_assert_eq!(real.longest_doc(), lens.iter().copied().max().unwrap_or(0));
                    prop_assert_eq!(real.slots.len(), m.input_tokens);
                    prop_assert!(real.pick(&m.input_ids).iter().all(|&t| t != i64::from(ids::PAD)));
                    let labels = real.pick(&m.labels);
                    let dense: Vec<i64> = loss_positions(&labels).iter().map(|&i| labels[i]).collect();
                    let padded: Vec<i64> = loss_positions(&m.labels).iter().map(|&i| m.labels[i]).collect();
                    prop_assert_eq!(dense.len(), m.loss_tokens);
                    prop_assert_eq!(dense, padded);
                }
            }
        }
    }
}
