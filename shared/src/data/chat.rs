//! Chat formatting with the tokenizer's own template and tokenisation with a loss mask.
//!
//! A dolly record becomes two chat messages: the user turn holds the instruction, with the context
//! (when present) after a blank line; the assistant turn holds the response. The template in
//! `tokenizer_config.json` is rendered with minijinja; the prompt (the user turn up to and including
//! `<|assistant|>\n`) is rendered alone too, and tokens that start inside it carry no loss.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use super::records::Record;
use super::Sample;
use crate::error::ConfigError;
use crate::files::Location;

pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: String,
    bos: String,
    eos: String,
    /// Where it came from (for the summary).
    pub origin: String,
}

/// Finds `tokenizer.json` and `tokenizer_config.json`: a local folder, or a hub model id (cached).
/// A path that does not exist is never looked up on the hub; every problem is a usage error
/// naming the folder or file.
pub fn locate(spec: &str, revision: &str) -> Result<(PathBuf, PathBuf, String), ConfigError> {
    let fix = "pass a folder with tokenizer.json and tokenizer_config.json (e.g. --tokenizer ../shared/tokenizers/phi-3), or use --dataset synthetic (needs no tokenizer)";
    match crate::files::folder_or_hub_id(spec, "tokenizer folder", fix)? {
        Location::Folder(dir) => {
            let (t, c) = (
                dir.join("tokenizer.json"),
                dir.join("tokenizer_config.json"),
            );
            for f in [&t, &c] {
                if let Some(problem) = crate::files::regular_file_problem(f) {
                    return Err(ConfigError::input(f, problem, fix));
                }
            }
            Ok((t, c, dir.display().to_string()))
        }
        Location::Hub(id) => {
            let hub = |e: String| {
                ConfigError::value(
                    "tokenizer",
                    format!("hf://{id}@{revision}"),
                    &e,
                    "pass a local tokenizer folder with --tokenizer DIR, or use --dataset synthetic (needs no tokenizer)",
                )
            };
            let api = hf_hub::api::sync::ApiBuilder::from_env()
                .with_progress(false)
                .build()
                .map_err(|e| hub(format!("could not start the hub client ({e})")))?;
            let repo = api.repo(hf_hub::Repo::with_revision(
                id.clone(),
                hf_hub::RepoType::Model,
                revision.to_string(),
            ));
            let get = |f: &str| {
                repo.get(f)
                    .map_err(|e| hub(format!("could not get {f} ({e})")))
            };
            Ok((
                get("tokenizer.json")?,
                get("tokenizer_config.json")?,
                format!("hf://{id}@{revision}"),
            ))
        }
    }
}

/// The conversation a template is tried on when it loads: rendering it must give a prompt that is
/// a non-empty prefix of the whole conversation, and the response must add tokens after it.
const PROBE: (&str, &str) = ("What is a llama?", "An animal of the Andes.");

impl ChatTokenizer {
    /// Loads and checks the tokenizer and its chat template. Every problem (unreadable or broken
    /// files, no template, a template that does not parse, renders nothing, or cannot mask the
    /// prompt) is a usage error naming the file, found before any record is read.
    pub fn load(tokenizer_json: &Path, config_json: &Path, origin: String) -> Result<Self> {
        let fix = "use the model's own tokenizer folder (tokenizer.json + tokenizer_config.json), e.g. --tokenizer ../shared/tokenizers/phi-3";
        let bytes = std::fs::read(tokenizer_json).map_err(|e| {
            ConfigError::input(tokenizer_json, format!("cannot be read ({e})"), fix)
        })?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(crate::files::strip_bom_bytes(&bytes))
            .map_err(|e| {
                ConfigError::input(
                    tokenizer_json,
                    format!("is not a tokenizers-format tokenizer.json ({e})"),
                    fix,
                )
            })?;
        let refuse = |problem: String| ConfigError::input(config_json, problem, fix);
        let text = crate::files::read_text(config_json).map_err(refuse)?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| refuse(format!("is not valid JSON ({e})")))?;
        let token = |k: &str| -> String {
            match &cfg[k] {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Object(o) => o
                    .get("content")
                    .and_then(|c| c.as_str())
                    .unwrap_or("")
                    .to_string(),
                _ => String::new(),
            }
        };
        let template = match &cfg["chat_template"] {
            serde_json::Value::String(t) if !t.trim().is_empty() => t.clone(),
            serde_json::Value::String(_) => {
                return Err(refuse("its chat_template is empty".into()).into())
            }
            serde_json::Value::Null => {
                return Err(refuse(
                    "has no chat_template string (Phi-3's tokenizer_config.json carries one)"
                        .into(),
                )
                .into())
            }
            other => {
                return Err(refuse(format!(
                    "its chat_template is {}, not a template string (named templates are not supported)",
                    match other {
                        serde_json::Value::Array(_) => "a list",
                        serde_json::Value::Object(_) => "an object",
                        _ => "not a string",
                    }
                ))
                .into())
            }
        };
        let tok = Self {
            tokenizer,
            template,
            bos: token("bos_token"),
            eos: token("eos_token"),
            origin,
        };
        tok.probe().map_err(|e| {
            refuse(format!(
                "its chat_template cannot format a conversation: {e:#}"
            ))
        })?;
        Ok(tok)
    }

    /// Renders and tokenises [`PROBE`]: the template parses, renders a non-empty prompt that is a
    /// prefix of the conversation, and the response adds tokens after the prompt.
    fn probe(&self) -> Result<()> {
        let r = Record {
            instruction: PROBE.0.into(),
            context: String::new(),
            response: PROBE.1.into(),
            category: "open_qa".into(),
        };
        let s = self.encode(&r)?;
        if s.prompt_len == 0 {
            bail!("it renders the prompt as no tokens");
        }
        if s.ids.len() <= s.prompt_len {
            bail!("the response adds no tokens after the prompt, so there would be nothing to compute the loss on");
        }
        Ok(())
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Renders messages with the chat template: the prompt alone with `add_generation_prompt`
    /// (it ends where the response starts), the whole conversation without (Qwen3's template
    /// would otherwise open another assistant turn after the response). Python's string methods
    /// (`startswith`, `split`, `strip`, ...) that Qwen3's template calls are minijinja-contrib's
    /// `pycompat`. `enable_thinking` is false: Qwen3's template then writes the empty
    /// `<think>\n\n</think>\n\n` block into the prompt, so the response (the loss) is the
    /// record's answer alone; other templates ignore it. No `strftime_now`: Llama 3's template
    /// then writes its own fixed date ("26 Jul 2024"), so the tokens do not change with the day.
    pub fn render(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_template("chat", &self.template)
            .context("parsing the chat template")?;
        let msgs: Vec<_> = messages
            .iter()
            .map(|(r, c)| minijinja::context! { role => r, content => c })
            .collect();
        env.get_template("chat")?
            .render(minijinja::context! {
                messages => msgs,
                bos_token => self.bos,
                eos_token => self.eos,
                add_generation_prompt => add_generation_prompt,
                enable_thinking => false,
            })
            .context("rendering the chat template")
    }

    /// Formats and tokenises a record; `prompt_len` counts the tokens that start inside the prompt.
    pub fn encode(&self, r: &Record) -> Result<Sample> {
        let user = if r.context.trim().is_empty() {
            r.instruction.clone()
        } else {
            format!("{}\n\n{}", r.instruction, r.context)
        };
        let prompt = self.render(&[("user", &user)], true)?;
        let full = self.render(&[("user", &user), ("assistant", &r.response)], false)?;
        if !full.starts_with(&prompt) {
            bail!("the chat template does not render the prompt as a prefix of the conversation; prompt masking needs that");
        }
        // The template writes the special tokens as text (`<s>`), so no extra ones are added.
        let enc = self
            .tokenizer
            .encode(full.as_str(), false)
            .map_err(|e| anyhow!("tokenising: {e}"))?;
        let prompt_len = enc
            .get_offsets()
            .iter()
            .take_while(|(start, _)| *start < prompt.len())
            .count();
        Ok(Sample {
            ids: enc.get_ids().to_vec(),
            prompt_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_tokenizer() -> Option<ChatTokenizer> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/tokenizers/phi-3");
        if !dir.join("tokenizer.json").exists() {
            eprintln!(
                "skipped: the Phi-3 tokenizer is not at {} (../shared beside the repository)",
                dir.display()
            );
            return None;
        }
        let (t, c, o) = locate(dir.to_str().unwrap(), "main").unwrap();
        Some(ChatTokenizer::load(&t, &c, o).unwrap())
    }

    #[test]
    fn real_phi3_tokenizer_formats_and_masks() {
        let Some(tok) = shared_tokenizer() else {
            return;
        };
        assert_eq!(tok.vocab_size(), 32_064);
        let r = Record {
            instruction: "Hello world".into(),
            context: String::new(),
            response: "Hi there".into(),
            category: "open_qa".into(),
        };
        let s = tok.encode(&r).unwrap();
        // Expected ids were produced by the `tokenizers` Python package (0.22) from the same file.
        assert_eq!(
            s.ids,
            vec![
                1, 32010, 29871, 13, 10994, 3186, 32007, 29871, 13, 32001, 29871, 13, 18567, 727,
                32007, 29871, 13
            ]
        );
        assert_eq!(s.prompt_len, 12);
        // The synthetic generator lays out the same structure.
        let syn = super::super::synthetic::chat_sample(&s.ids[4..6], &s.ids[12..14]);
        assert_eq!(syn, s);
        let with_ctx = Record {
            context: "Some passage.".into(),
            ..r
        };
        let s2 = tok.encode(&with_ctx).unwrap();
        assert!(s2.prompt_len > s.prompt_len);
        assert_eq!(
            &s2.ids[s2.prompt_len..],
            &s.ids[s.prompt_len..],
            "response tokens unchanged by context"
        );
    }

    fn family_tokenizer(name: &str) -> Option<ChatTokenizer> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/tokenizers")
            .join(name);
        if !dir.join("tokenizer.json").exists() {
            eprintln!("skipped: no tokenizer at {}", dir.display());
            return None;
        }
        let (t, c, o) = locate(dir.to_str().unwrap(), "main").unwrap();
        Some(ChatTokenizer::load(&t, &c, o).unwrap())
    }

    /// Llama 3.2's and Qwen3's own templates (from their `tokenizer_config.json`) through
    /// minijinja give the ids Hugging Face gives, and the synthetic generator lays out the same
    /// structure. Expected ids: transformers 4.57 `apply_chat_template` on the same folders
    /// (Llama: `date_string="26 Jul 2024"`, the date the template falls back to; Qwen3:
    /// `enable_thinking=False`), then the tokenizer without added special tokens.
    #[test]
    fn llama3_and_qwen3_templates_format_mask_and_match_the_synthetic_structure() {
        use crate::model::Family;
        let r = Record {
            instruction: "What is a llama?".into(),
            context: String::new(),
            response: "An animal of the Andes.".into(),
            category: "open_qa".into(),
        };
        let cases: [(&str, Family, &[u32], usize); 2] = [
            (
                "llama-3",
                Family::Llama,
                &[
                    128000, 128006, 9125, 128007, 271, 38766, 1303, 33025, 2696, 25, 6790, 220,
                    2366, 18, 198, 15724, 2696, 25, 220, 1627, 10263, 220, 2366, 19, 271, 128009,
                    128006, 882, 128007, 271, 3923, 374, 264, 94776, 30, 128009, 128006, 78191,
                    128007, 271, 2127, 10065, 315, 279, 1628, 288, 13, 128009,
                ],
                40,
            ),
            (
                "qwen3",
                Family::Qwen3,
                &[
                    151644, 872, 198, 3838, 374, 264, 93676, 30, 151645, 198, 151644, 77091, 198,
                    151667, 271, 151668, 271, 2082, 9864, 315, 279, 1597, 288, 13, 151645, 198,
                ],
                17,
            ),
        ];
        for (dir, family, want, prompt_len) in cases {
            let Some(tok) = family_tokenizer(dir) else {
                continue;
            };
            let s = tok.encode(&r).unwrap();
            assert_eq!(s.ids, want, "{dir}");
            assert_eq!(s.prompt_len, prompt_len, "{dir}");
            let chat = super::super::synthetic::chat_ids(family);
            let prompt = &s.ids[chat.before_prompt.len()..prompt_len - chat.before_response.len()];
            let response = &s.ids[prompt_len..s.ids.len() - chat.after_response.len()];
            let syn = super::super::synthetic::chat_sample_for(&chat, prompt, response);
            assert_eq!(syn, s, "{dir}: synthetic structure");
            // Every id a synthetic record uses exists in the real vocabulary.
            assert!(chat.vocab_needed() <= tok.vocab_size(), "{dir}");
        }
    }

    #[test]
    fn built_in_tokenizer_with_template_masks_prompt() {
        // A word-level tokenizer built here, so the test needs no files from outside.
        let d = tempfile::tempdir().unwrap();
        let vocab = serde_json::json!({"<unk>":0,"<s>":1,"user":2,"bot":3,"hi":4,"there":5,"friend":6,"|":7});
        let tj = serde_json::json!({
            "version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
            "model":{"type":"WordLevel","vocab":vocab,"unk_token":"<unk>"}
        });
        std::fs::write(d.path().join("tokenizer.json"), tj.to_string()).unwrap();
        let cfg = serde_json::json!({"bos_token":"<s>","eos_token":"|","chat_template":"{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}user {{ m['content'] }} bot {% else %}{{ m['content'] }} |{% endif %}{% endfor %}"});
        std::fs::write(d.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let (t, c, o) = locate(d.path().to_str().unwrap(), "main").unwrap();
        let tok = ChatTokenizer::load(&t, &c, o).unwrap();
        let s = tok
            .encode(&Record {
                instruction: "hi".into(),
                context: String::new(),
                response: "there friend".into(),
                category: String::new(),
            })
            .unwrap();
        assert_eq!(s.ids, vec![1, 2, 4, 3, 5, 6, 7]);
        assert_eq!(s.prompt_len, 4);
    }
}
