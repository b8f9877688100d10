//! The Markdown report (GitHub-flavoured tables). Plots live in `report.html`; this file names each
//! one with its definition. Figures carry `[n]` marks that refer to the numbered definitions at the end.

use std::fmt::Write;

use super::figures::{footnote, Row, DEFINITIONS};
use super::Report;

/// Text from a summary (device names, notes, errors, paths, run ids: anything a summary file can
/// say) as Markdown that shows it literally, as `report.html` does with its escaping: HTML is
/// written as entities (a `<script>` in a device name is text, not markup), the characters of
/// links, code spans and tables are backslash-escaped, and a newline does not end a table row or
/// a list item. (`*` and `_` are left alone: at worst they emphasise, and names such as
/// `sw_power_cap` stay readable in the raw file.)
pub(crate) fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '\\' | '`' | '[' | ']' | '|' => {
                out.push('\\');
                out.push(c);
            }
            '\n' | '\r' => out.push(' '),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Text inside a table cell (see [`text`]: no pipe ends the cell, no newline ends the row).
fn cell(s: &str) -> String {
    text(s)
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
        text(&report.runs[report.baseline].label),
        report.generated_at
    );

    out.push_str("## Runs\n\n| run | run id | status | summary |\n| --- | --- | --- | --- |\n");
    for i in 0..n {
        let r = &report.runs[i];
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            cell(&report.heading(i)),
            cell(&r.summary.run.run_id),
            format!("{:?}", r.summary.status).to_lowercase(),
            cell(&r.summary_path.display().to_string())
        );
    }

    out.push_str("\n## Workload check\n\n");
    let base = &report.runs[report.baseline];
    let short = |h: &str| text(&h.chars().take(12).collect::<String>());
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
            text(&base.label),
            short(&base.summary.workload.hash)
        );
        for m in &report.workload.mismatches {
            let r = &report.runs[m.run];
            let _ = writeln!(
                out,
                ">\n> - **{}** (hash `{}`):",
                text(&r.label),
                short(&r.summary.workload.hash)
            );
            for d in &m.differences {
                let _ = writeln!(out, ">   - {}", text(&d.to_string()));
            }
            if let Some(e) = m.explanation() {
                let _ = writeln!(out, ">   - {}", text(e));
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
            let _ = writeln!(out, "  - {}", text(note));
        }
    }
    out.push('\n');

    out.push_str("## Hardware and software\n\n");
    table(&mut out, report, "", &report.environment);

    out.push_str("## Notes\n\n");
    for r in report.runs {
        let _ = writeln!(out, "### {}\n", text(&r.label));
        if let Some(e) = &r.summary.error {
            let _ = writeln!(
                out,
                "- **error:** {}{}",
                text(&e.message),
                e.hint
                    .as_ref()
                    .map(|h| format!(" ({})", text(h)))
                    .unwrap_or_default()
            );
        }
        for note in r.summary.notes.iter().chain(&r.log_problems()) {
            let _ = writeln!(out, "- {}", text(note));
        }
        if r.summary.notes.is_empty() && r.summary.error.is_none() && r.log_problems().is_empty() {
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
