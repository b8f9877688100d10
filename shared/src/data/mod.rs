//! The data side of the workload: records → token ids with a loss mask → steps of micro-batches.
//!
//! Everything here is computed once, in this crate, so both binaries see the same token ids, the
//! same masking and the same batch composition; the binaries only turn [`batch::MicroBatch`]es into
//! tensors.

pub mod batch;
pub mod chat;
pub mod records;
pub mod synthetic;

use serde::{Deserialize, Serialize};

/// One training record after formatting and tokenisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Token ids of the whole chat (prompt and response), at most `max_seq_len` long.
    pub ids: Vec<u32>,
    /// Leading tokens that carry no loss (the prompt, up to and including `<|assistant|>\n`).
    pub prompt_len: usize,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Number of positions whose next token is a loss target.
    pub fn loss_tokens(&self, train_on_prompt: bool) -> usize {
        let first_target = if train_on_prompt {
            1
        } else {
            self.prompt_len.max(1)
        };
        self.ids.len().saturating_sub(first_target)
    }
}

/// What the data pipeline counted on its way; goes into the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataStats {
    /// Where the records came from (hub id, file or `synthetic`).
    pub source: String,
    pub synthetic: bool,
    pub records_read: usize,
    pub records_used: usize,
    pub bad_records_skipped: usize,
    pub truncated: usize,
    pub dropped_overlong: usize,
    /// Records whose response was cut away entirely by truncation (they carry no loss).
    pub without_loss_tokens: usize,
    pub tokenizer: Option<String>,
    pub mean_tokens: f64,
    pub median_tokens: f64,
    pub max_tokens: usize,
}

/// Token ids the workload relies on (Phi-3's vocabulary).
pub mod ids {
    pub const BOS: u32 = 1;
    pub const ENDOFTEXT: u32 = 32000;
    pub const ASSISTANT: u32 = 32001;
    pub const END: u32 = 32007;
    pub const USER: u32 = 32010;
    /// "▁" then "\n" (byte token <0x0A>): how the tokenizer writes the newline after a special token.
    pub const NEWLINE: [u32; 2] = [29871, 13];
    /// Padding id (the tokenizer config's pad token). Padding never reaches the loss.
    pub const PAD: u32 = ENDOFTEXT;
}
