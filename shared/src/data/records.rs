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
        // A path is never a hub id (a missing one is "no such file", not a network error).
        if p.exists()
            || crate::files::looks_like_a_path(spec)
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

/// Checks, before anything else loads, that a local data file can be read: it exists and is a
/// regular file (a folder named `x.jsonl` cannot be read; a FIFO or device would block the read,
/// and a signal could not stop it cleanly).
pub fn check_source(src: &DatasetSource) -> Result<(), DataError> {
    let DatasetSource::File(path) = src else {
        return Ok(());
    };
    match crate::files::regular_file_problem(path) {
        None => Ok(()),
        Some(p) if p == "does not exist" => Err(DataError {
            source_name: path.display().to_string(),
            location: None,
            problem: "no such file".into(),
            fix: "check the path, or use --dataset synthetic or a hub id such as databricks/databricks-dolly-15k".into(),
        }),
        Some(p) => Err(DataError {
            source_name: path.display().to_string(),
            location: None,
            problem: p,
            fix: "pass a regular .jsonl, .parquet or .csv file with dolly's fields (copy a stream to a file first)".into(),
        }),
    }
}

pub fn load_file(path: &Path, limit: usize, policy: BadRecordPolicy) -> Result<Loaded> {
    let name = path.display().to_string();
    check_source(&DatasetSource::File(path.to_path_buf()))?;
    let unreadable = |e: &dyn std::fmt::Display| DataError {
        source_name: name.clone(),
        location: None,
        problem: format!("cannot be read ({e})"),
        fix: "check the file's permissions, or copy it to a readable place".into(),
    };
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
            let bytes = std::fs::read(path).map_err(|e| unreadable(&e))?;
            for (i, line) in bytes.split(|b| *b == b'\n').enumerate() {
                // A byte-order mark (Windows editors write one) is not part of the first record.
                let line = if i == 0 {
                    crate::files::strip_bom_bytes(line)
                } else {
                    line
                };
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
            // The csv reader skips a leading byte-order mark itself.
            let mut rdr = csv::Reader::from_path(path).map_err(|e| unreadable(&e))?;
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
            use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
            let file = std::fs::File::open(path).map_err(|e| unreadable(&e))?;
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
                // Only text columns are read, as in JSONL: a number, a list or a struct is named
                // with its type (arrow would cast many of them to text); binary columns are text
                // only where their bytes are UTF-8, checked per row like a JSONL line.
                let mut cols: Vec<Option<TextColumn>> = Vec::new();
                for n in ["instruction", "context", "response", "category"] {
                    cols.push(match batch.column_by_name(n) {
                        None => None,
                        Some(c) => TextColumn::new(c).map_err(|ty| {
                            bad(
                                &name,
                                &format!("column {n:?}"),
                                &format!("field {n:?} has type {ty}, not a string"),
                                &format!("write {n:?} as a string column"),
                            )
                        })?,
                    });
                }
                let fields = ["instruction", "context", "response", "category"];
                for i in 0..batch.num_rows() {
                    let loc = format!("row {}", row0 + i + 1);
                    let mut values: [Option<String>; 4] = Default::default();
                    let mut err = None;
                    for (k, c) in cols.iter().enumerate() {
                        match c.as_ref().map(|c| c.get(i)).transpose() {
                            Ok(v) => values[k] = v.flatten(),
                            Err(valid_up_to) => {
                                err = Some(bad(
                                    &name,
                                    &loc,
                                    &format!(
                                        "invalid UTF-8 at byte {valid_up_to} in field {:?}",
                                        fields[k]
                                    ),
                                    "re-encode the text as UTF-8, or pass --on-bad-record skip",
                                ));
                                break;
                            }
                        }
                    }
                    let [v0, v1, v2, v3] = values;
                    let r = match err {
                        Some(e) => Err(e),
                        None => build(v0, v1, v2, v3, &name, &loc),
                    };
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

/// A Parquet column of text: strings (any offset width, or dictionary-encoded) or binary whose
/// bytes are checked as UTF-8 row by row.
enum TextColumn {
    Text(arrow::array::ArrayRef),
    Bytes(arrow::array::ArrayRef),
}

impl TextColumn {
    /// The column, or its type's name when it is not text.
    fn new(c: &arrow::array::ArrayRef) -> Result<Option<Self>, String> {
        use arrow::datatypes::DataType as T;
        let text = |v: &T| matches!(v, T::Utf8 | T::LargeUtf8 | T::Utf8View);
        match c.data_type() {
            // A column of nulls only: the field is absent in every row.
            T::Null => Ok(None),
            t if text(t) => arrow::compute::cast(c, &T::Utf8)
                .map(|a| Some(Self::Text(a)))
                .map_err(|e| format!("{t} ({e})")),
            T::Dictionary(_, v) if text(v) => arrow::compute::cast(c, &T::Utf8)
                .map(|a| Some(Self::Text(a)))
                .map_err(|e| format!("{} ({e})", c.data_type())),
            T::Binary | T::LargeBinary | T::BinaryView => arrow::compute::cast(c, &T::LargeBinary)
                .map(|a| Some(Self::Bytes(a)))
                .map_err(|e| format!("{} ({e})", c.data_type())),
            other => Err(other.to_string()),
        }
    }

    /// Row `i`: `Ok(None)` for null, `Err(valid_up_to)` for bytes that are not UTF-8.
    fn get(&self, i: usize) -> Result<Option<String>, usize> {
        use arrow::array::{Array, AsArray};
        match self {
            Self::Text(a) => Ok((!a.is_null(i)).then(|| a.as_string::<i32>().value(i).to_string())),
            Self::Bytes(a) => {
                if a.is_null(i) {
                    return Ok(None);
                }
                std::str::from_utf8(a.as_binary::<i64>().value(i))
                    .map(|s| Some(s.to_string()))
                    .map_err(|e| e.valid_up_to())
            }
        }
    }
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
    fn a_byte_order_mark_is_not_part_of_the_first_record() {
        let (_d, p) = write(
            "d.jsonl",
            b"\xef\xbb\xbf{\"instruction\":\"a\",\"response\":\"b\"}\n",
        );
        let l = load_file(&p, 10, BadRecordPolicy::Error).unwrap();
        assert_eq!(l.records[0].instruction, "a");
        let (_d, p) = write("d.csv", b"\xef\xbb\xbfinstruction,response\nWhat?,Yes\n");
        let l = load_file(&p, 10, BadRecordPolicy::Error).unwrap();
        assert_eq!(l.records[0].instruction, "What?");
    }

    /// Text columns of every arrow flavour are read; other types are named, never cast to text;
    /// binary is text where it is UTF-8, row by row.
    #[test]
    fn parquet_text_columns_of_any_flavour_and_nothing_else() {
        use arrow::array::{
            ArrayRef, BinaryArray, DictionaryArray, Float64Array, LargeStringArray, StringArray,
        };
        use arrow::datatypes::Int32Type;
        use std::sync::Arc;
        let d = tempfile::tempdir().unwrap();
        let load = |response: ArrayRef, policy| {
            let p = d.path().join("d.parquet");
            let batch = arrow::record_batch::RecordBatch::try_from_iter(vec![
                (
                    "instruction",
                    Arc::new(StringArray::from(vec!["i1", "i2"])) as ArrayRef,
                ),
                ("response", response),
            ])
            .unwrap();
            let f = std::fs::File::create(&p).unwrap();
            let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
            w.write(&batch).unwrap();
            w.close().unwrap();
            load_file(&p, 10, policy)
        };
        let ok = |a: ArrayRef| {
            let l = load(a, BadRecordPolicy::Error).unwrap();
            l.records
                .iter()
                .map(|r| r.response.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ok(Arc::new(LargeStringArray::from(vec!["r1", "r2"]))),
            ["r1", "r2"]
        );
        assert_eq!(
            ok(Arc::new(
                vec!["r1", "r2"]
                    .into_iter()
                    .collect::<DictionaryArray<Int32Type>>()
            )),
            ["r1", "r2"]
        );
        assert_eq!(
            ok(Arc::new(BinaryArray::from(vec![&b"r1"[..], &b"r2"[..]]))),
            ["r1", "r2"]
        );
        let e = load(
            Arc::new(Float64Array::from(vec![1.0, 2.0])),
            BadRecordPolicy::Skip,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("\"response\" has type Float64, not a string"),
            "{e}"
        );
        let bad_utf8: ArrayRef = Arc::new(BinaryArray::from(vec![&b"r1"[..], &b"\xff"[..]]));
        let e = load(bad_utf8.clone(), BadRecordPolicy::Error)
            .unwrap_err()
            .to_string();
        assert!(e.contains("row 2") && e.contains("invalid UTF-8"), "{e}");
        let l = load(bad_utf8, BadRecordPolicy::Skip).unwrap();
        assert_eq!((l.records.len(), l.skipped), (1, 1));
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
