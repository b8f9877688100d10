//! The HTML report: one file that opens anywhere without a network. Styles are inline in a
//! `<style>` element, plots are inline `<svg>`, fonts are the reader's own; there are no scripts.
//! Every figure's label carries its definition as a tooltip (`title`) and a footnote link to the
//! definitions section.

use std::fmt::Write;

use super::figures::{footnote, Cell, Row, DEFINITIONS};
use super::plots::{color, Plot};
use super::Report;

const STYLE: &str = r#"
:root { --ink: #1d2330; --muted: #5b6475; --line: #dde1e8; --soft: #f5f7fa; --warn: #fff4e0; --warn-line: #e0a030; --ok: #eaf6ec; --ok-line: #59a14f; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 20px; margin: 36px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 16px; margin: 0 0 6px; }
p.lede { color: var(--muted); margin: 0 0 8px; }
code, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: left; vertical-align: top; padding: 6px 10px; border-bottom: 1px solid var(--line); }
thead th { background: var(--soft); position: sticky; top: 0; white-space: nowrap; }
tbody th { font-weight: 600; white-space: nowrap; width: 1%; }
tbody tr:hover { background: #fafbfd; }
td { min-width: 150px; overflow-wrap: anywhere; }
tr.key td { font-weight: 650; font-size: 16px; }
.detail { display: block; color: var(--muted); font-size: 12.5px; }
.na { color: #a33; font-weight: 600; }
abbr[title] { text-decoration: underline dotted #8a93a6; cursor: help; }
sup a { text-decoration: none; color: #4e79a7; font-size: 11px; margin-left: 2px; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 6px; vertical-align: baseline; }
.badge { display: inline-block; font-size: 11px; font-weight: 600; color: #fff; background: #4e79a7; border-radius: 8px; padding: 0 7px; margin-left: 6px; vertical-align: 1px; }
.box { border-left: 4px solid; border-radius: 4px; padding: 10px 14px; margin: 8px 0 16px; }
.box.ok { background: var(--ok); border-color: var(--ok-line); }
.box.warn { background: var(--warn); border-color: var(--warn-line); }
.box ul { margin: 6px 0 0; padding-left: 20px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(520px, 1fr)); gap: 20px; }
figure { margin: 0; padding: 14px; border: 1px solid var(--line); border-radius: 6px; background: #fff; }
figure svg { display: block; width: 100%; height: auto; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 8px; }
figcaption ul { margin: 4px 0 0; padding-left: 18px; }
dl.defs { display: grid; grid-template-columns: max-content 1fr; gap: 6px 18px; }
dl.defs dt { font-weight: 600; }
dl.defs dd { margin: 0; color: #333b4a; }
dl.defs :target { background: #fff7cc; }
ul.notes { margin: 4px 0 12px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12.5px; }
"#;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn swatch(i: usize) -> String {
    let c = color(i);
    format!(
        r#"<span class="swatch" style="background:#{:02x}{:02x}{:02x}"></span>"#,
        c.0, c.1, c.2
    )
}

fn cell(c: &Cell) -> String {
    match (&c.detail, c.missing) {
        (Some(d), true) => format!(
            r#"<span class="na" title="{}">n/a</span><span class="detail">{}</span>"#,
            esc(d),
            esc(d)
        ),
        (Some(d), false) => format!(r#"{}<span class="detail">{}</span>"#, esc(&c.text), esc(d)),
        (None, _) => esc(&c.text),
    }
}

/// A per-run table: a header row of run names, then one row per figure.
fn table(out: &mut String, report: &Report, first: &str, rows: &[Row]) {
    out.push_str("<div class=\"scroll\"><table>\n<thead><tr>");
    let _ = write!(out, "<th>{}</th>", esc(first));
    for (i, r) in report.runs.iter().enumerate() {
        let badge = if i == report.baseline {
            r#"<span class="badge">baseline</span>"#
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<th title="{}">{}{}{badge}</th>"#,
            esc(&r.summary_path.display().to_string()),
            swatch(i),
            esc(&r.label)
        );
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    for row in rows {
        let key = row
            .definition
            .is_some_and(|d| matches!(d.id, "tokens-per-s" | "speed-up"));
        out.push_str(if key {
            "<tr class=\"key\"><th scope=\"row\">"
        } else {
            "<tr><th scope=\"row\">"
        });
        match row.definition {
            Some(d) => {
                let _ = write!(
                    out,
                    r##"<abbr title="{}">{}</abbr><sup><a href="#def-{}">[{}]</a></sup>"##,
                    esc(d.text),
                    esc(&row.label),
                    d.id,
                    footnote(d.id)
                );
            }
            None => out.push_str(&esc(&row.label)),
        }
        out.push_str("</th>");
        for c in &row.cells {
            let _ = write!(out, "<td>{}</td>", cell(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table></div>\n");
}

/// Puts a `<title>` (the hover tooltip) first inside the plot's `<svg>` element.
fn svg_with_title(svg: &str, title: &str) -> String {
    let svg = svg.trim_start_matches(|c: char| c.is_whitespace());
    match svg.find('>') {
        Some(end) if svg.starts_with("<svg") => format!(
            "{}<title>{}</title>{}",
            &svg[..=end],
            esc(title),
            &svg[end + 1..]
        ),
        _ => svg.to_string(),
    }
}

fn figure(out: &mut String, plot: &Plot) {
    let d = super::figures::def(plot.definition);
    let _ = write!(
        out,
        r#"<figure id="{}"><h3>{}</h3>"#,
        plot.id,
        esc(plot.title)
    );
    out.push_str(&svg_with_title(
        &plot.svg,
        &format!("{}: {}", plot.title, d.text),
    ));
    let _ = write!(
        out,
        r##"<figcaption>{}<sup><a href="#def-{}">[{}]</a></sup>"##,
        esc(d.text),
        d.id,
        footnote(d.id)
    );
    if !plot.notes.is_empty() {
        out.push_str("<ul>");
        for n in &plot.notes {
            let _ = write!(out, "<li>{}</li>", esc(n));
        }
        out.push_str("</ul>");
    }
    out.push_str("</figcaption></figure>\n");
}

fn workload_check(out: &mut String, report: &Report) {
    let base = &report.runs[report.baseline];
    let hash = &base.summary.workload.hash;
    if report.workload.all_same() {
        let _ = write!(
            out,
            r#"<div class="box ok"><strong>Same workload.</strong> All {} runs have workload hash <code>{}</code>: the same settings and the same tokens in every optimizer step, so their figures compare like with like.</div>"#,
            report.runs.len(),
            esc(&hash[..12.min(hash.len())])
        );
    } else {
        let _ = write!(
            out,
            r#"<div class="box warn"><strong>Workload mismatch.</strong> These runs did different work from the baseline {} (hash <code>{}</code>); their speed-ups do not compare like with like:<ul>"#,
            esc(&base.label),
            esc(&hash[..12.min(hash.len())])
        );
        for m in &report.workload.mismatches {
            let r = &report.runs[m.run];
            let h = &r.summary.workload.hash;
            let _ = write!(
                out,
                "<li>{}<strong>{}</strong> (hash <code>{}</code>)<ul>",
                swatch(m.run),
                esc(&r.label),
                esc(&h[..12.min(h.len())])
            );
            for d in &m.differences {
                let _ = write!(out, "<li><code>{}</code></li>", esc(&d.to_string()));
            }
            if let Some(e) = m.explanation() {
                let _ = write!(out, "<li>{}</li>", esc(e));
            }
            out.push_str("</ul></li>");
        }
        out.push_str("</ul></div>\n");
    }
    for d in &report.workload.dtype_differences {
        let _ = writeln!(
            out,
            r#"<div class="box warn"><strong>Precision differs.</strong> {}</div>"#,
            esc(&d.warning(|i| report.runs[i].label.clone()))
        );
    }
    table(out, report, "workload", &report.workload_rows);
}

/// The whole HTML document.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let n = report.runs.len();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>Fine-tuning benchmark: {n} run{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n",
        if n == 1 { "" } else { "s" }
    );
    let _ = write!(
        out,
        "<h1>Fine-tuning benchmark comparison</h1>\n<p class=\"lede\">{n} run{} side by side; baseline {}. Generated {} by <code>compare</code>. Hover a figure's name for its definition; <a href=\"#definitions\">definitions</a> are at the end.</p>\n",
        if n == 1 { "" } else { "s" },
        esc(&report.runs[report.baseline].label),
        esc(&report.generated_at)
    );

    out.push_str("<h2 id=\"runs\">Runs</h2>\n<div class=\"scroll\"><table><thead><tr><th>run</th><th>run id</th><th>status</th><th>summary</th></tr></thead><tbody>\n");
    for (i, r) in report.runs.iter().enumerate() {
        let badge = if i == report.baseline {
            r#"<span class="badge">baseline</span>"#
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "<tr><th scope=\"row\">{}{}{badge}</th><td class=\"mono\">{}</td><td>{}</td><td class=\"mono\">{}</td></tr>",
            swatch(i),
            esc(&r.label),
            esc(&r.summary.run.run_id),
            esc(&format!("{:?}", r.summary.status).to_lowercase()),
            esc(&r.summary_path.display().to_string())
        );
    }
    out.push_str("</tbody></table></div>\n");

    out.push_str("<h2 id=\"workload\">Workload check</h2>\n");
    workload_check(&mut out, report);

    out.push_str("<h2 id=\"headline\">Headline figures</h2>\n");
    table(&mut out, report, "figure", &report.headline);
    scaling(&mut out, report);

    out.push_str("<h2 id=\"plots\">Plots</h2>\n<div class=\"plots\">\n");
    for p in &report.plots {
        figure(&mut out, p);
    }
    out.push_str("</div>\n");

    out.push_str("<h2 id=\"environment\">Hardware and software</h2>\n");
    table(&mut out, report, "", &report.environment);

    out.push_str("<h2 id=\"notes\">Notes</h2>\n");
    for (i, r) in report.runs.iter().enumerate() {
        let _ = write!(
            out,
            "<h3>{}{}</h3>\n<ul class=\"notes\">",
            swatch(i),
            esc(&r.label)
        );
        if let Some(e) = &r.summary.error {
            let _ = write!(
                out,
                "<li><strong>error:</strong> {}{}</li>",
                esc(&e.message),
                e.hint
                    .as_ref()
                    .map(|h| format!(" ({})", esc(h)))
                    .unwrap_or_default()
            );
        }
        for note in r.summary.notes.iter().chain(&r.log_problems()) {
            let _ = write!(out, "<li>{}</li>", esc(note));
        }
        if r.summary.notes.is_empty() && r.summary.error.is_none() && r.log_problems().is_empty() {
            out.push_str("<li>none</li>");
        }
        out.push_str("</ul>\n");
    }

    out.push_str("<h2 id=\"definitions\">Definitions</h2>\n<dl class=\"defs\">\n");
    for (i, d) in DEFINITIONS.iter().enumerate() {
        let _ = writeln!(
            out,
            r#"<dt id="def-{}">[{}] {}</dt><dd>{}</dd>"#,
            d.id,
            i + 1,
            esc(d.name),
            esc(d.text)
        );
    }
    out.push_str("</dl>\n");
    let _ = write!(
        out,
        "<footer>Written by <code>compare</code> (benchmark {}). This file is self-contained: it loads no scripts, styles, fonts or images from anywhere.</footer>\n</main>\n</body>\n</html>\n",
        esc(env!("CARGO_PKG_VERSION"))
    );
    out
}

/// Multi-GPU runs against a one-GPU run of the same workload, with efficiency bars.
fn scaling(out: &mut String, report: &Report) {
    if report.scaling.is_empty() {
        return;
    }
    out.push_str("<h2 id=\"scaling\">Scaling (data parallel)</h2>\n<p>Efficiency = aggregate input tokens/s / (GPUs &times; the one-GPU run's input tokens/s), same workload hash.</p>\n<table><thead><tr><th>run</th><th>GPUs</th><th>input tokens/s</th><th>per GPU</th><th>one-GPU run</th><th>efficiency</th></tr></thead><tbody>\n");
    for r in &report.scaling {
        let pct = 100.0 * r.efficiency;
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{} ({:.0})</td><td><svg width=\"120\" height=\"12\" role=\"img\" aria-label=\"{pct:.1} %\"><rect width=\"120\" height=\"12\" fill=\"#eee\"/><rect width=\"{:.1}\" height=\"12\" fill=\"#4878a8\"/></svg> {pct:.1} %</td></tr>",
            esc(&report.runs[r.run].label),
            r.world_size,
            r.input_tokens_per_s,
            r.per_gpu_input_tokens_per_s,
            esc(&report.runs[r.single].label),
            r.single_input_tokens_per_s,
            (1.2 * pct).clamp(0.0, 120.0),
        );
    }
    out.push_str("</tbody></table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn title_goes_inside_the_svg_element() {
        let s = svg_with_title("<svg width=\"1\">\n<rect/></svg>", "a < b");
        assert_eq!(s, "<svg width=\"1\"><title>a &lt; b</title>\n<rect/></svg>");
    }
}
