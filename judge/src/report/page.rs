//! The HTML page of the reports: its style, its frame with the verdict, escaping and figures. No script,
//! no font file, nothing fetched.

use std::fmt::Write as _;

use crate::verdict::Verdict;

/// `text` for HTML content or a quoted attribute value.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A `<figure class="plot" data-plot=...>` with the drawing (its `<title>` the caption) or, when there
/// is nothing to draw, why.
pub fn figure(out: &mut String, plot: &str, caption: &str, drawing: Result<String, String>) {
    let _ = write!(
        out,
        "<figure class=\"plot\" data-plot=\"{}\">",
        escape(plot)
    );
    match drawing {
        Ok(svg) => {
            let svg = svg.trim();
            // The title is the first child of the root <svg> element: its accessible name.
            let open = svg
                .find("<svg")
                .and_then(|start| svg[start..].find('>').map(|end| start + end + 1))
                .unwrap_or(0);
            out.push_str(&svg[..open]);
            let _ = write!(out, "<title>{}</title>", escape(caption));
            out.push_str(&svg[open..]);
        }
        Err(why) => {
            let _ = write!(out, "<p class=\"empty\">{}</p>", escape(&why));
        }
    }
    let _ = write!(out, "<figcaption>{}</figcaption></figure>", escape(caption));
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}\
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em}\
.verdict{padding:.6em 1em;border-radius:6px;font-weight:600}\
.decided{background:#e6f4ea}.inconclusive{background:#fff4e0}.equivalent{background:#e8f0fe}.invalid{background:#fde7e9}\
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}\
th{background:#f3f3f3}td.l,th.l{text-align:left}tr.primary td{font-weight:600}small{color:#666}\
.warn{color:#b00020;font-weight:600;background:#fde7e9;padding:.3em .6em;border-radius:4px}\
figure{display:inline-block;margin:.5em;vertical-align:top}figure svg{display:block}\
figcaption{font-size:.85em;color:#555;max-width:560px}.empty{color:#777;font-style:italic}";

/// A whole page in the reports' style: title, the verdict line (coloured by the verdict), then `body`.
pub fn page(title: &str, verdict_line: &str, verdict: Verdict, body: &str) -> String {
    let verdict_class = verdict.word();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>{STYLE}</style></head><body><h1>{title}</h1>\
         <p class=\"verdict {verdict_class}\">verdict: {verdict}</p>{body}</body></html>\n",
        title = escape(title),
        verdict = escape(verdict_line),
    )
}
