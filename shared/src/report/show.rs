//! `compare --show SUMMARY`: one run as a readable table in the terminal; nothing is written.

use std::fmt::Write;

use super::figures::{self, Row};
use super::load::Run;

fn section(out: &mut String, title: &str, rows: &[Row]) {
    let width = rows
        .iter()
        .map(|r| r.label.chars().count())
        .max()
        .unwrap_or(0);
    let _ = writeln!(out, "\n{title}");
    for row in rows {
        let value = row
            .cells
            .first()
            .map(figures::Cell::plain)
            .unwrap_or_default();
        let _ = writeln!(out, "  {:<width$}  {value}", row.label);
    }
}

/// The text `--show` prints.
pub fn render(run: &Run) -> String {
    let runs = std::slice::from_ref(run);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} ({})",
        run.summary.run.run_id,
        run.summary_path.display()
    );
    // A run against itself has no speed-up to show.
    let headline: Vec<Row> = figures::headline_rows(runs, 0)
        .into_iter()
        .filter(|r| !r.definition.is_some_and(|d| d.id.starts_with("speed-up")))
        .collect();
    section(&mut out, "Headline figures", &headline);
    section(&mut out, "Workload", &figures::workload_rows(runs));
    section(
        &mut out,
        "Hardware and software",
        &figures::environment_rows(runs),
    );
    let _ = writeln!(out, "\nNotes");
    if let Some(e) = &run.summary.error {
        let _ = writeln!(
            out,
            "  - error: {}{}",
            e.message,
            e.hint
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default()
        );
    }
    for note in &run.summary.notes {
        let _ = writeln!(out, "  - {note}");
    }
    let _ = writeln!(out, "\nDefinitions");
    let mut seen = Vec::new();
    for d in headline.iter().filter_map(|r| r.definition) {
        if !seen.contains(&d.id) {
            seen.push(d.id);
            let _ = writeln!(out, "  {}: {}", d.name, d.text);
        }
    }
    // Text from the summary file goes to a terminal: no control character (an escape sequence in
    // a device name could rewrite the screen) gets through.
    out.chars()
        .map(|c| if c.is_control() && c != '\n' { '?' } else { c })
        .collect()
}
