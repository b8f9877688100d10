//! Dolly-15k records from the hub (cached by `hf-hub`) or a local JSONL / Parquet / CSV file.
//!
//! Every record needs `instruction` and `response` (non-empty strings); `context` and `category`
//! may be absent or empty. A bad record stops the run before the model loads (naming the file, the
//! line or row, the field and the fix) unless `--on-bad-record skip` is given, in which case it is
//! counted in the summary.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::BadRecordPolicy;
use crate::error::DataError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub instruction: String,
    pub context: String,
    pub response: String,
    pub category: String,
}

/// Records read, and how many were skipped as bad.
#[derive(Debug, Default)]
pub struct Loaded {
    pub records: Vec<Record>,
    pub skipped: usize,
    pub source: String,
}

/// Where the dataset comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DatasetSource {
    Synthetic,
    File(PathBuf),
    Hub { id: String },
}

impl DatasetSource {
    pub fn parse(spec: &str) -> Self {
        if spec == crate::config::SYNTHETIC {
            return Self::Synthetic;
        }
        let p = Path::new(spec);
        if p.exists()
            || spec.ends_with(".jsonl")
            || spec.ends_with(".json")
            || spec.ends_with(".parquet")
            || spec.ends_with(".csv")
        {
            Self::File(p.to_path_buf())
        } else {
            Self::Hub {
                id: spec.to_string(),
            }
        }
    }
}

/// Reads at most `limit` good records (dolly's order: the first `limit` are the `fast` mode's).
pub fn load(src: &DatasetSource, limit: usize, policy: BadRecordPolicy) -> Result<Loaded> {
    match src {
        DatasetSource::Synthetic => Ok(Loaded {
            source: "synthetic".into(),
            ..Default::default()
        }),
        DatasetSource::File(p) => load_file(p, limit, policy),
        DatasetSource::Hub { id } => {
            let path = fetch_from_hub(id)?;
            let mut l = load_file(&path, limit, policy)?;
            l.source = format!("hf://datasets/{id} ({})", path.display());
            Ok(l)
        }
    }
}

/// Downloads (or finds in the hub cache) the dataset's data file: the first `.jsonl`, else the
/// first `.parquet` in the repository. Uses `HF_HOME`/`HF_HUB_CACHE` like the Python hub client.
pub fn fetch_from_hub(id: &str) -> Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .context("starting the hub client")?;
    let repo = api.dataset(id.to_string());
    // dolly's file is known; try it first so a cached copy works offline.
    let known = "databricks-dolly-15k.jsonl";
    if id == crate::config::DOLLY_HUB_ID {
        if let Ok(p) = repo.get(known) {
            return Ok(p);
        }
    }
    let info = repo.info().map_err(|e| DataError {
        source_name: format!("hf://datasets/{id}"),
        location: None,
        problem: format!("could not reach the Hugging Face hub or the dataset ({e})"),
        fix: "check the id and the network, or pass a local file: --dataset path/to/databricks-dolly-15k.jsonl (or .parquet/.csv), or --dataset synthetic".into(),
    })?;
    let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    files.sort();
    let pick = files
        .iter()
        .find(|f| f.ends_with(".jsonl"))
        .or_else(|| files.iter().find(|f| f.ends_with(".parquet")))
        .cloned()
        .ok_or_else(|| DataError {
            source_name: format!("hf://datasets/{id}"),
            location: None,
            problem: "the repository has no .jsonl or .parquet file".into(),
            fix: "pass a local file with --dataset".into(),
        })?;
    repo.get(&pick)
        .with_context(|| format!("downloading {pick} from hf://datasets/{id}"))
}

pub fn load_file(path: &Path, limit: usize, policy: BadRecordPolicy) -> Result<Loaded> {
    let name = path.display().to_string();
    if !path.exists() {
        return Err(DataError {
            source_name: name,
            location: None,
            problem: "no such file".into(),
            fix: "check the path, or use --dataset synthetic or a hub id such as databricks/databricks-dolly-15k".into(),
        }
        .into());
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut out = Loaded {
        source: name.clone(),
        ..Default::default()
    };
    let accept = |r: Result<Record, DataError>, out: &mut Loaded| -> Result<bool> {
        match r {
            Ok(rec) => out.records.push(rec),
            Err(e) => match policy {
                BadRecordPolicy::Error => return Err(e.into()),
                BadRecordPolicy::Skip => out.skipped += 1,
            },
        }
        Ok(out.records.len() < limit)
    };
    match ext.as_str() {
        "jsonl" | "json" => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {name}"))?;
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                if line.iter().all(|b| b.is_ascii_whitespace()) {
                    continue;
                }
                let loc = format!("line {}", i + 1);
                let r = match std::str::from_utf8(line) {
                    Err(e) => Err(bad(&name, &loc, &format!("invalid UTF-8 at byte {}{}", e.valid_up_to(), utf8_field(line)), "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass --on-bad-record skip")),
                    Ok(text) => match serde_json::from_str::<serde_json::Value>(text) {
                        Err(e) => Err(bad(&name, &loc, &format!("not valid JSON ({e})"), "each line must be one JSON object with instruction, context, response, category")),
                        Ok(v) => record_from_json(&v, &name, &loc),
                    },
                };
                if !accept(r, &mut out)? {
                    break;
                }
            }
        }
        "csv" => {
            let mut rdr =
                csv::Reader::from_path(path).with_context(|| format!("opening {name}"))?;
            let headers = rdr
                .headers()
                .map_err(|e| {
                    bad(
                        &name,
                        "header",
                        &format!("unreadable header ({e})"),
                        "the first row must name the columns",
                    )
                })?
                .clone();
            let col = |n: &str| headers.iter().position(|h| h == n);
            for (i, row) in rdr.records().enumerate() {
                let loc = format!("row {}", i + 2);
                let r = match row {
                    Err(e) => Err(bad(
                        &name,
                        &loc,
                        &format!("unreadable row ({e})"),
                        "fix the CSV quoting or encoding",
                    )),
                    Ok(row) => {
                        let get = |n: &str| col(n).and_then(|c| row.get(c)).map(str::to_string);
                        build(
                            get("instruction"),
                            get("context"),
                            get("response"),
                            get("category"),
                            &name,
                            &loc,
                        )
                    }
                };
                if !accept(r, &mut out)? {
                    break;
                }
            }
        }
        "parquet" => {
            use arrow::array::{Array, AsArray};
            use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let file = std::fs::File::open(path).with_context(|| format!("opening {name}"))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(file)
                .map_err(|e| {
                    bad(
                        &name,
                        "footer",
                        &format!("not a readable Parquet file ({e})"),
                        "re-download the file or convert it to JSONL",
                    )
                })?
                .build()?;
            let mut row0 = 0usize;
            'batches: for batch in reader {
                let batch = batch.map_err(|e| {
                    bad(
                        &name,
                        &format!("after row {row0}"),
                        &format!("unreadable data ({e})"),
                        "re-download the file",
                    )
                })?;
                // A column of another type (a list, a struct) is named, not taken for missing.
                let column = |n: &str| -> Result<Option<arrow::array::ArrayRef>, DataError> {
                    let Some(c) = batch.column_by_name(n) else {
                        return Ok(None);
                    };
                    arrow::compute::cast(c, &arrow::datatypes::DataType::Utf8)
                        .map(Some)
                        .map_err(|_| {
                            bad(
                                &name,
                                &format!("column {n:?}"),
                                &format!("field {n:?} has type {}, not a string", c.data_type()),
                                &format!("write {n:?} as a string column"),
                            )
                        })
                };
                let mut cols: Vec<Option<arrow::array::ArrayRef>> = Vec::new();
                for n in ["instruction", "context", "response", "category"] {
                    cols.push(column(n)?);
                }
                for i in 0..batch.num_rows() {
                    let get = |k: usize| {
                        cols[k].as_ref().and_then(|a| {
                            if a.is_null(i) {
                                None
                            } else {
                                Some(a.as_string::<i32>().value(i).to_string())
                            }
                        })
                    };
                    let r = build(
                        get(0),
                        get(1),
                        get(2),
                        get(3),
                        &name,
                        &format!("row {}", row0 + i + 1),
                    );
                    if !accept(r, &mut out)? {
                        break 'batches;
                    }
                }
                row0 += batch.num_rows();
            }
        }
        other => {
            return Err(DataError {
                source_name: name,
                location: None,
                problem: format!("unknown file type {other:?}"),
                fix: "use a .jsonl, .parquet or .csv file with dolly's fields".into(),
            }
            .into())
        }
    }
    Ok(out)
}

/// Names the field an invalid UTF-8 sequence sits in, when the rest of the line is valid JSON.
fn utf8_field(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let Ok(serde_json::Value::Object(obj)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return String::new();
    };
    let fields: Vec<String> = obj
        .iter()
        .filter(|(_, v)| v.as_str().is_some_and(|s| s.contains('\u{FFFD}')))
        .map(|(k, _)| format!("{k:?}"))
        .collect();
    if fields.is_empty() {
        String::new()
    } else {
        format!(" in field {}", fields.join(", "))
    }
}

fn bad(file: &str, loc: &str, problem: &str, fix: &str) -> DataError {
    DataError {
        source_name: file.into(),
        location: Some(loc.into()),
        problem: problem.into(),
        fix: fix.into(),
    }
}

fn record_from_json(v: &serde_json::Value, file: &str, loc: &str) -> Result<Record, DataError> {
    let Some(obj) = v.as_object() else {
        return Err(bad(
            file,
            loc,
            "not a JSON object",
            "each line must be an object with instruction, context, response, category",
        ));
    };
    let field = |k: &str| -> Result<Option<String>, DataError> {
        match obj.get(k) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(bad(
                file,
                loc,
                &format!("field {k:?} is {}, not a string", json_kind(other)),
                &format!("make {k:?} a string"),
            )),
        }
    };
    build(
        field("instruction")?,
        field("context")?,
        field("response")?,
        field("category")?,
        file,
        loc,
    )
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn build(
    instruction: Option<String>,
    context: Option<String>,
    response: Option<String>,
    category: Option<String>,
    file: &str,
    loc: &str,
) -> Result<Record, DataError> {
    let need = |k: &str, v: Option<String>| -> Result<String, DataError> {
        match v {
            None => Err(bad(
                file,
                loc,
                &format!("missing field {k:?}"),
                &format!("add a non-empty {k:?} string, or pass --on-bad-record skip"),
            )),
            Some(s) if s.trim().is_empty() => Err(bad(
                file,
                loc,
                &format!("field {k:?} is empty"),
                &format!("give {k:?} text, or pass --on-bad-record skip"),
            )),
            Some(s) => Ok(s),
        }
    };
    Ok(Record {
        instruction: need("instruction", instruction)?,
        response: need("response", response)?,
        context: context.unwrap_or_default(),
        category: category.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        (d, p)
    }

    #[test]
    fn jsonl_reads_and_names_bad_lines() {
        let good = r#"{"instruction":"a","context":"","response":"b","category":"open_qa"}"#;
        let (_d, p) = write(
            "d.jsonl",
            format!("{good}\n{good}\n{{\"instruction\":\"x\",\"response\":5}}\n").as_bytes(),
        );
        let e = load_file(&p, 10, BadRecordPolicy::Error)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("line 3") && e.contains("\"response\"") && e.contains("a number"),
            "{e}"
        );
        let l = load_file(&p, 10, BadRecordPolicy::Skip).unwrap();
        assert_eq!((l.records.len(), l.skipped), (2, 1));
        let l = load_file(&p, 1, BadRecordPolicy::Error).unwrap();
        assert_eq!(l.records.len(), 1, "limit stops before the bad line");
    }

    #[test]
    fn invalid_utf8_and_broken_json_are_named() {
        let (_d, p) = write(
            "d.jsonl",
            b"{\"instruction\":\"a\xff\",\"response\":\"b\"}\n",
        );
        let e = load_file(&p, 10, BadRecordPolicy::Error)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("UTF-8") && e.contains("line 1") && e.contains("\"instruction\""),
            "{e}"
        );
        let (_d, p) = write("d.jsonl", b"{\"instruction\":\n");
        let e = load_file(&p, 10, BadRecordPolicy::Error)
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 1") && e.contains("not valid JSON"), "{e}");
        let (_d, p) = write("d.jsonl", b"{\"instruction\":\"a\",\"response\":\"  \"}\n");
        assert!(load_file(&p, 10, BadRecordPolicy::Error)
            .unwrap_err()
            .to_string()
            .contains("empty"));
    }

    #[test]
    fn csv_reads_dolly_columns() {
        let (_d, p) = write(
            "d.csv",
            b"instruction,context,response,category\nWhat?,,\"Yes, really\",open_qa\n",
        );
        let l = load_file(&p, 10, BadRecordPolicy::Error).unwrap();
        assert_eq!(l.records[0].response, "Yes, really");
    }

    #[test]
    fn parquet_reads_dolly_columns() {
        use arrow::array::StringArray;
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("d.parquet");
        let batch = RecordBatch::try_from_iter(vec![
            (
                "instruction",
                Arc::new(StringArray::from(vec!["i1", "i2"])) as arrow::array::ArrayRef,
            ),
            (
                "context",
                Arc::new(StringArray::from(vec![Some("c1"), None])) as _,
            ),
            (
                "response",
                Arc::new(StringArray::from(vec!["r1", "r2"])) as _,
            ),
            (
                "category",
                Arc::new(StringArray::from(vec!["closed_qa", "open_qa"])) as _,
            ),
        ])
        .unwrap();
        let f = std::fs::File::create(&p).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let l = load_file(&p, 10, BadRecordPolicy::Error).unwrap();
        assert_eq!(l.records.len(), 2);
        assert_eq!(l.records[0].context, "c1");
        assert_eq!(l.records[1].context, "");
        let (_d2, broken) = write("b.parquet", b"PAR1 not really");
        assert!(load_file(&broken, 10, BadRecordPolicy::Error)
            .unwrap_err()
            .to_string()
            .contains("Parquet"));
    }
}
