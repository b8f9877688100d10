//! The Markdown report (GitHub-flavoured tables). Plots live in `report.html`; this file names each
//! one with its definition. Figures carry `[n]` marks that refer to the numbered definitions at the end.

use std::fmt::Write;

use super::figures::{footnote, Row, DEFINITIONS};
use super::Report;

/// Makes text safe inside a table cell: no pipe ends the cell, no newline ends the row.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

fn table(out: &mut String, report: &Report, first: &str, rows: &[Row]) {
    let _ = write!(out, "| {} |", cell(first));
    for i in 0..report.runs.len() {
        let _ = write!(out, " {} |", cell(&report.heading(i)));
    }
    out.push_str("\n| --- |");
    out.push_str(&" --- |".repeat(report.runs.len()));
    out.push('\n');
    for row in rows {
        let label = match row.definition {
            Some(d) => format!("{} [{}]", cell(&row.label), footnote(d.id)),
            None => cell(&row.label),
        };
        let _ = write!(out, "| {label} |");
        for c in &row.cells {
            let _ = write!(out, " {} |", cell(&c.plain()));
        }
        out.push('\n');
    }
    out.push('\n');
}

/// The whole Markdown document.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let n = report.runs.len();
    let _ = write!(
        out,
        "# Fine-tuning benchmark comparison\n\n{n} run{} side by side; baseline **{}**. Generated {} by `compare`. The plots are in `report.html` (same folder).\n\n",
        if n == 1 { "" } else { "s" },
        report.runs[report.baseline].label,
        report.generated_at
    );

    out.push_str("## Runs\n\n| run | run id | status | summary |\n| --- | --- | --- | --- |\n");
    for i in 0..n {
        let r = &report.runs[i];
        let _ = writeln!(
            out,
            "| {} | `{}` | {} | `{}` |",
            cell(&report.heading(i)),
            cell(&r.summary.run.run_id),
            format!("{:?}", r.summary.status).to_lowercase(),
            cell(&r.summary_path.display().to_string())
        );
    }

    out.push_str("\n## Workload check\n\n");
    let base = &report.runs[report.baseline];
    let short = |h: &str| h.chars().take(12).collect::<String>();
    if report.workload.all_same() {
        let _ = write!(
            out,
            "Same workload: all {n} runs have workload hash `{}` (the same settings and the same tokens in every optimizer step), so their figures compare like with like.\n\n",
            short(&base.summary.workload.hash)
        );
    } else {
        let _ = writeln!(
            out,
            "> **Workload mismatch.** These runs did different work from the baseline {} (hash `{}`); their speed-ups do not compare like with like:",
            base.label,
            short(&base.summary.workload.hash)
        );
        for m in &report.workload.mismatches {
            let r = &report.runs[m.run];
            let _ = writeln!(
                out,
                ">\n> - **{}** (hash `{}`):",
                r.label,
                short(&r.summary.workload.hash)
            );
            for d in &m.differences {
                let _ = writeln!(out, ">   - `{d}`");
            }
            if let Some(e) = m.explanation() {
                let _ = writeln!(out, ">   - {e}");
            }
        }
        out.push('\n');
    }
    for d in &report.workload.dtype_differences {
        let _ = writeln!(
            out,
            "> **Precision differs.** {}\n",
            d.warning(|i| report.runs[i].label.clone())
        );
    }
    table(&mut out, report, "workload", &report.workload_rows);

    out.push_str("## Headline figures\n\n");
    table(&mut out, report, "figure", &report.headline);
    out.push_str(&super::scaling::markdown(report.runs, &report.scaling));

    out.push_str("## Plots (in report.html)\n\n");
    for p in &report.plots {
        let d = super::figures::def(p.definition);
        let _ = writeln!(out, "- **{}** [{}]: {}", p.title, footnote(d.id), d.text);
        for note in &p.notes {
            let _ = writeln!(out, "  - {note}");
        }
    }
    out.push('\n');

    out.push_str("## Hardware and software\n\n");
    table(&mut out, report, "", &report.environment);

    out.push_str("## Notes\n\n");
    for r in report.runs {
        let _ = writeln!(out, "### {}\n", r.label);
        if let Some(e) = &r.summary.error {
            let _ = writeln!(
                out,
                "- **error:** {}{}",
                e.message,
                e.hint
                    .as_ref()
                    .map(|h| format!(" ({h})"))
                    .unwrap_or_default()
            );
        }
        for note in &r.summary.notes {
            let _ = writeln!(out, "- {note}");
        }
        if r.summary.notes.is_empty() && r.summary.error.is_none() {
            out.push_str("- none\n");
        }
        out.push('\n');
    }

    out.push_str(
        "## Definitions\n\nThe numbers in brackets above refer to these (from `measuring.md`).\n\n",
    );
    for (i, d) in DEFINITIONS.iter().enumerate() {
        let _ = writeln!(out, "{}. **{}**: {}", i + 1, d.name, d.text);
    }
    out
}
