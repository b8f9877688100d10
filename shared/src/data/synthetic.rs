//! Dolly-shaped records as token ids in the exact chat structure of a model family (Phi-3,
//! Llama 3, Qwen3: what its `tokenizer_config.json`'s template renders, see [`chat_ids`]), from a
//! seed.
//!
//! Length model (as the reference figures in measuring.md used): a record's total length in tokens,
//! template included, is `exp(N(ln 200, 0.75))` rounded and clipped to [24, 1024]. The category is
//! drawn with dolly-15k's own frequencies; the three categories that carry a context passage in
//! dolly (closed_qa, information_extraction, summarization: 29.8 % of records) get a longer prompt.
//! The length model counts Phi-3's 13 template tokens; another family's record has the same
//! content (as a real record would) in that family's template, whose length differs (Llama 3's
//! fixed system header: 36 template tokens; Qwen3's: 14).
//! Prompt/response split (our choice, documented in the README): of the content tokens (total minus
//! the 13 template tokens), the prompt takes a fraction uniform in [0.15, 0.45] without a context
//! and in [0.45, 0.80] with one; every record keeps at least one prompt and two response tokens.
//! Content ids follow Zipf's law (probability of the rank-r id ∝ 1/r^1.1, as word frequencies in
//! text roughly do) over a fixed permutation of the family's ordinary vocabulary (Phi-3:
//! 259..32000, no byte or special tokens), so a model can learn something and loss curves are not flat; compute per step
//! does not depend on which ids appear.

use super::{ids, Sample};
use crate::model::Family;
use crate::rng::SplitMix64;

/// A family's chat structure as token ids around a record's content, and the ordinary
/// vocabulary content ids are drawn from. Each is what the family's tokenizer gives for its
/// chat template (tested against the real tokenizers in `chat.rs`).
pub struct ChatIds {
    /// Before the user's content: Phi-3 `<s><|user|>\n`; Llama 3 `<|begin_of_text|>`, the
    /// system header with its fixed date and `<|start_header_id|>user<|end_header_id|>\n\n`;
    /// Qwen3 `<|im_start|>user\n`.
    pub before_prompt: &'static [u32],
    /// Between the user's content and the response (the prompt's end).
    pub before_response: &'static [u32],
    /// After the response (part of the loss).
    pub after_response: &'static [u32],
    /// Content ids: no byte-fallback or special tokens.
    pub content: std::ops::Range<u32>,
}

impl ChatIds {
    pub fn template_tokens(&self) -> usize {
        self.before_prompt.len() + self.before_response.len() + self.after_response.len()
    }

    /// The largest id a record uses, plus one: the vocabulary a model needs.
    pub fn vocab_needed(&self) -> usize {
        let specials = self
            .before_prompt
            .iter()
            .chain(self.before_response)
            .chain(self.after_response);
        specials
            .copied()
            .max()
            .unwrap_or(0)
            .max(self.content.end - 1) as usize
            + 1
    }
}

/// The chat structure of `family`.
pub fn chat_ids(family: Family) -> ChatIds {
    match family {
        Family::Phi3 => ChatIds {
            before_prompt: &[ids::BOS, ids::USER, ids::NEWLINE[0], ids::NEWLINE[1]],
            before_response: &[
                ids::END,
                ids::NEWLINE[0],
                ids::NEWLINE[1],
                ids::ASSISTANT,
                ids::NEWLINE[0],
                ids::NEWLINE[1],
            ],
            after_response: &[ids::END, ids::NEWLINE[0], ids::NEWLINE[1]],
            content: FIRST_CONTENT_ID..END_CONTENT_ID,
        },
        // "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge
        // Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user
        // <|end_header_id|>\n\n" ... "<|eot_id|><|start_header_id|>assistant<|end_header_id|>
        // \n\n" ... "<|eot_id|>"; content below the 256 special ids from 128,000.
        Family::Llama => ChatIds {
            before_prompt: &[
                128_000, 128_006, 9125, 128_007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220,
                2366, 18, 198, 15724, 2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 128_009,
                128_006, 882, 128_007, 271,
            ],
            before_response: &[128_009, 128_006, 78191, 128_007, 271],
            after_response: &[128_009],
            content: 256..128_000,
        },
        // "<|im_start|>user\n" ... "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
        // ... "<|im_end|>\n"; content below the special ids from 151,643.
        Family::Qwen3 => ChatIds {
            before_prompt: &[151_644, 872, 198],
            before_response: &[
                151_645, 198, 151_644, 77091, 198, 151_667, 271, 151_668, 271,
            ],
            after_response: &[151_645, 198],
            content: 256..151_643,
        },
    }
}

/// dolly-15k's categories and their record counts (sum 15,011) and whether they carry a context.
pub const CATEGORIES: [(&str, u32, bool); 8] = [
    ("open_qa", 3742, false),
    ("general_qa", 2191, false),
    ("classification", 2136, false),
    ("closed_qa", 1773, true),
    ("brainstorming", 1766, false),
    ("information_extraction", 1506, true),
    ("summarization", 1188, true),
    ("creative_writing", 709, false),
];

/// The vocabulary a Phi-3 model needs for synthetic records: they use Phi-3's ids up to `<|user|>`.
pub const VOCAB_NEEDED: usize = {
    let mut m = ids::BOS;
    let all = [
        ids::ENDOFTEXT,
        ids::ASSISTANT,
        ids::END,
        ids::USER,
        END_CONTENT_ID - 1,
    ];
    let mut i = 0;
    while i < all.len() {
        if all[i] > m {
            m = all[i];
        }
        i += 1;
    }
    m as usize + 1
};

/// Template tokens around the content: `<s><|user|>\n` + `<|end|>\n<|assistant|>\n` + `<|end|>\n`.
pub const TEMPLATE_TOKENS: usize = 13;

const MIN_LEN: usize = 24;
const MAX_LEN: usize = 1024;
const MEDIAN_LEN: f64 = 200.0;
const SIGMA: f64 = 0.75;
const FIRST_CONTENT_ID: u32 = 259;
const END_CONTENT_ID: u32 = 32_000;
const ZIPF_EXPONENT: f64 = 1.1;
/// The permutation is part of the synthetic "language", the same for every workload seed.
const LANGUAGE_SEED: u64 = 0x5a49_5046; // "ZIPF"

/// Content ids by rank, and the cumulative Zipf distribution over ranks.
struct Zipf {
    ids: Vec<u32>,
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(content: std::ops::Range<u32>) -> Self {
        let mut ids: Vec<u32> = content.collect();
        SplitMix64::new(LANGUAGE_SEED).shuffle(&mut ids);
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=ids.len())
            .map(|r| {
                acc += (r as f64).powf(-ZIPF_EXPONENT);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Self { ids, cdf }
    }

    fn draw(&self, rng: &mut SplitMix64) -> u32 {
        let u = rng.next_f64();
        let rank = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.ids.len() - 1);
        self.ids[rank]
    }
}

/// The first `n` synthetic records of the stream defined by `seed`, with their category names,
/// in Phi-3's chat structure.
pub fn generate(n: usize, seed: u64) -> Vec<(Sample, &'static str)> {
    generate_for(Family::Phi3, n, seed)
}

/// The same records in `family`'s chat structure and vocabulary: the same categories, lengths
/// and prompt/response split for every family (the random stream does not depend on it).
pub fn generate_for(family: Family, n: usize, seed: u64) -> Vec<(Sample, &'static str)> {
    let chat = chat_ids(family);
    let mut rng = SplitMix64::new(seed ^ 0x5359_4e54_4845_5449); // "SYNTHETI"
    let zipf = Zipf::new(chat.content.clone());
    let total: u32 = CATEGORIES.iter().map(|c| c.1).sum();
    (0..n)
        .map(|_| {
            let mut pick = rng.below(u64::from(total)) as u32;
            let mut cat = CATEGORIES[0];
            for c in CATEGORIES {
                if pick < c.1 {
                    cat = c;
                    break;
                }
                pick -= c.1;
            }
            let len = (MEDIAN_LEN.ln() + SIGMA * rng.normal())
                .exp()
                .round()
                .clamp(MIN_LEN as f64, MAX_LEN as f64) as usize;
            let content = len - TEMPLATE_TOKENS;
            let (lo, hi) = if cat.2 { (0.45, 0.80) } else { (0.15, 0.45) };
            let frac = lo + (hi - lo) * rng.next_f64();
            let prompt = ((content as f64 * frac).round() as usize).clamp(1, content - 2);
            let response = content - prompt;
            let mut tok = |k: usize| -> Vec<u32> { (0..k).map(|_| zipf.draw(&mut rng)).collect() };
            let p = tok(prompt);
            let r = tok(response);
            (chat_sample_for(&chat, &p, &r), cat.0)
        })
        .collect()
}

/// Lays out prompt and response content ids in Phi-3's chat structure.
pub fn chat_sample(prompt: &[u32], response: &[u32]) -> Sample {
    chat_sample_for(&chat_ids(Family::Phi3), prompt, response)
}

/// Lays out prompt and response content ids in a family's chat structure.
pub fn chat_sample_for(chat: &ChatIds, prompt: &[u32], response: &[u32]) -> Sample {
    let mut v = Vec::with_capacity(prompt.len() + response.len() + chat.template_tokens());
    v.extend_from_slice(chat.before_prompt);
    v.extend_from_slice(prompt);
    v.extend_from_slice(chat.before_response);
    let prompt_len = v.len();
    v.extend_from_slice(response);
    v.extend_from_slice(chat.after_response);
    Sample { ids: v, prompt_len }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_follow_the_reference_model() {
        let recs = generate(15_011, 42);
        let mut lens: Vec<usize> = recs.iter().map(|(s, _)| s.len()).collect();
        lens.sort();
        let median = lens[lens.len() / 2];
        assert!((185..=215).contains(&median), "median {median}");
        assert!(*lens.first().unwrap() >= MIN_LEN && *lens.last().unwrap() <= MAX_LEN);
        let with_ctx = recs
            .iter()
            .filter(|(_, c)| ["closed_qa", "information_extraction", "summarization"].contains(c))
            .count();
        let frac = with_ctx as f64 / recs.len() as f64;
        assert!((0.27..0.33).contains(&frac), "context fraction {frac}");
        assert_eq!(generate(10, 42), generate(20, 42)[..10].to_vec());
        // Zipf content: the most frequent id is common, every id is ordinary vocabulary.
        let mut counts = std::collections::HashMap::new();
        for (s, _) in &recs {
            for &id in &s.ids[4..s.prompt_len - 6] {
                assert!((259..32_000).contains(&id));
                *counts.entry(id).or_insert(0usize) += 1;
            }
        }
        let total: usize = counts.values().sum();
        let top = *counts.values().max().unwrap() as f64 / total as f64;
        assert!((0.05..0.15).contains(&top), "top id frequency {top}");
    }

    #[test]
    fn every_id_is_below_the_vocabulary_synthetic_records_need() {
        let top = generate(500, 7)
            .iter()
            .flat_map(|(s, _)| s.ids.iter().copied())
            .max()
            .unwrap();
        assert!((top as usize) < VOCAB_NEEDED, "{top}");
        assert_eq!(VOCAB_NEEDED, 32_011);
        assert_eq!(chat_ids(Family::Phi3).vocab_needed(), VOCAB_NEEDED);
        assert_eq!(chat_ids(Family::Phi3).template_tokens(), TEMPLATE_TOKENS);
    }

    /// Every family gets the same records (lengths of content, categories, split) in its own
    /// structure, with ids inside its vocabulary and its content range.
    #[test]
    fn every_family_gets_the_same_records_in_its_structure() {
        let phi = generate(300, 3);
        for f in [Family::Llama, Family::Qwen3] {
            let chat = chat_ids(f);
            let recs = generate_for(f, 300, 3);
            let extra_prompt = chat.before_prompt.len() + chat.before_response.len();
            let extra_response = chat.after_response.len();
            for ((a, ca), (b, cb)) in phi.iter().zip(&recs) {
                assert_eq!(ca, cb);
                assert_eq!(b.prompt_len - extra_prompt, a.prompt_len - 10);
                assert_eq!(
                    b.len() - b.prompt_len - extra_response,
                    a.len() - a.prompt_len - 3
                );
                assert_eq!(&b.ids[..chat.before_prompt.len()], chat.before_prompt);
                assert_eq!(&b.ids[b.len() - extra_response..], chat.after_response);
                let content =
                    &b.ids[chat.before_prompt.len()..b.prompt_len - chat.before_response.len()];
                assert!(content.iter().all(|id| chat.content.contains(id)), "{f:?}");
                assert!(b.ids.iter().all(|&id| (id as usize) < chat.vocab_needed()));
            }
            let shape = crate::model::ModelShape::from_preset(match f {
                Family::Llama => crate::config::ModelPreset::TinyLlama,
                _ => crate::config::ModelPreset::TinyQwen3,
            });
            assert!(chat.vocab_needed() <= shape.vocab_size, "{f:?}");
        }
    }

    #[test]
    fn structure_is_phi3_chat() {
        let s = chat_sample(&[500, 501], &[600]);
        assert_eq!(
            s.ids,
            vec![
                1, 32010, 29871, 13, 500, 501, 32007, 29871, 13, 32001, 29871, 13, 600, 32007,
                29871, 13
            ]
        );
        assert_eq!(s.prompt_len, 12);
        assert_eq!(s.loss_tokens(false), 4);
        assert_eq!(s.loss_tokens(true), 15);
    }
}
