//! The report of `kvab analyze` (its JSON is a public contract, docs/analyze.md) and its renderings:
//! the table, the verdict line and the HTML page's body. No I/O here.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::comparison::Comparison;
use crate::guardrail::ErrorGuard;
use crate::stats::format_p;
use crate::verdict::{verdict_line, Verdict};

use super::{html, plots};

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub verdict: Verdict,
    pub reasons: Vec<String>,
    pub arms: Vec<String>,
    pub window: Window,
    pub design: Design,
    pub assignment: Assignment,
    pub errors: BTreeMap<String, Rate>,
    pub errors_p: Option<f64>,
    /// The error-rate guardrail between the arms (`crate::guardrail::errors`).
    pub error_guardrail: ErrorGuard,
    pub misroutes: BTreeMap<String, Rate>,
    /// kvab serve's ledger (`kvab_routed_requests_total`) per requested arm, when it is scraped.
    pub routed: Option<BTreeMap<String, f64>>,
    pub comparisons: Vec<Comparison>,
    pub method: Method,
    /// Every PromQL query run, in order.
    pub queries: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Design {
    /// `randomized` (requests assigned by the split's random draw: those alone are compared), `sticky`
    /// (some assigned by their key: no randomized verdict, the key is the unit), `observational` (every
    /// tagged request chose its arm by header or default), or `none` (no tagged request).
    pub kind: &'static str,
    /// Which requests the comparisons and error rates count: `split` (split-assigned alone, in a
    /// randomized window) or `all` (every tagged request of the arms, a description, never a verdict).
    pub compared: &'static str,
    /// Tagged requests per arm and `source` (`header`, `alias`, `split`, `key`, `default`).
    pub requests: BTreeMap<String, BTreeMap<String, f64>>,
    pub split_share: Option<f64>,
    pub header_share: Option<f64>,
    pub key_share: Option<f64>,
    /// Requests in the window that were not split-assigned, untagged and other arms' included: what vLLM's
    /// own histograms hold besides the split's requests.
    pub other_requests: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Assignment {
    /// Split-assigned requests per arm.
    pub split: BTreeMap<String, f64>,
    pub weights: Option<BTreeMap<String, f64>>,
    pub srm_p: Option<f64>,
    /// `null` without --split or without split traffic.
    pub srm_ok: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Window {
    pub start: f64,
    pub end: f64,
    pub seconds: u64,
}

impl Window {
    /// The window from `start` to `end` (Unix seconds), whole seconds long (at least one), or why it is none.
    pub fn new(start: f64, end: f64) -> Result<Self, String> {
        if start >= end {
            return Err(format!(
                "the window is empty: --start {start} is not before --end {end}"
            ));
        }
        let seconds = (end - start).round().max(1.0) as u64;
        Ok(Window {
            start,
            end,
            seconds,
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Rate {
    pub of: f64,
    pub count: f64,
    pub rate: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Method {
    pub alpha: f64,
    /// `--looks`: the looks planned at one window growing from `--start` (1: one analysis).
    pub looks: u32,
    /// The look this run is (1 to `looks`).
    pub look: u32,
    /// The level of this look: alpha, the share spent by this look, or the always-valid level at the
    /// window's split-assigned requests (`crate::sequential`).
    pub look_alpha: f64,
    /// `--boundary`: `obrien-fleming`, `pocock` or `always-valid`.
    pub boundary: crate::sequential::Boundary,
    /// `--plan-requests` (with `always-valid`; null otherwise).
    pub plan_requests: Option<u64>,
    pub min_effect: f64,
    pub tail_margin: f64,
    pub error_margin: f64,
    pub min_requests: u64,
    pub srm_threshold: f64,
    pub description: &'static str,
}

/// `resolution request_duration_ms: median's bucket 6.7 % (nvlink), 7.1 % (fs); equivalent needs
/// --min-effect above 6.9 %`, or, when `--min-effect` is not above it, why `equivalent` is refused.
fn resolution_line(c: &Comparison, arms: &[String]) -> Option<String> {
    let r = c.resolution.as_ref()?;
    if let Some(why) = &r.refused {
        return Some(format!("resolution {}: {why}", c.metric));
    }
    let percent = |v: Option<&Option<f64>>| {
        v.copied()
            .flatten()
            .map_or("unbounded".into(), |v| format!("{:.1} %", 100.0 * v))
    };
    let per_arm: Vec<String> = arms
        .iter()
        .map(|arm| format!("{} ({arm})", percent(r.median.get(arm))))
        .collect();
    let margin = r
        .smallest_margin
        .map_or("-".into(), |m| format!("{:.1} %", 100.0 * m));
    Some(format!(
        "resolution {}: median's bucket {}; equivalent needs --min-effect above {margin}",
        c.metric,
        per_arm.join(", ")
    ))
}

impl Report {
    pub fn verdict_line(&self) -> String {
        verdict_line(self.verdict, &self.reasons)
    }

    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let (first, second) = (&self.arms[0], &self.arms[1]);
        let _ = writeln!(
            out,
            "{:<22} {:>9} {:>9} {:>12} {:>12} {:>8} {:>18} {:>9}  {:<36} {:>10}  tails",
            "metric",
            format!("n {first}"),
            format!("n {second}"),
            format!("p50 {first}"),
            format!("p50 {second}"),
            "ratio",
            "interval",
            "p adj",
            "decision",
            "detectable"
        );
        for c in &self.comparisons {
            let n = |arm: &str| c.n.get(arm).map_or("-".into(), |v| v.to_string());
            let p50 = |arm: &str| c.p50.get(arm).map_or("-".into(), |v| format!("{v:.1}"));
            let decision = format!(
                "{}{}",
                c.decision_text(),
                if c.primary { "" } else { " (secondary)" }
            );
            let _ = writeln!(
                out,
                "{:<22} {:>9} {:>9} {:>12} {:>12} {:>8} {:>18} {:>9}  {:<36} {:>10}  {}",
                c.metric,
                n(first),
                n(second),
                p50(first),
                p50(second),
                c.ratio_text(),
                c.ratio_ci_text(),
                c.p_adjusted.map_or("-".into(), format_p),
                decision,
                c.detectable_text(),
                c.tails_text()
            );
        }
        for c in &self.comparisons {
            if let Some(line) = resolution_line(c, &self.arms) {
                let _ = writeln!(out, "{line}");
            }
        }
        let share = |s: Option<f64>| s.map_or("-".into(), |s| format!("{:.0}%", 100.0 * s));
        let _ = writeln!(
            out,
            "\ndesign: {} (split {}, key {}, header {}; compared: {}); split-assigned {}; sample ratio {}",
            self.design.kind,
            share(self.design.split_share),
            share(self.design.key_share),
            share(self.design.header_share),
            self.design.compared,
            self.assignment
                .split
                .iter()
                .map(|(a, n)| format!("{a} {n:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            match (self.assignment.srm_ok, self.assignment.srm_p) {
                (Some(true), Some(p)) => format!("p={} (ok)", format_p(p)),
                (Some(false), Some(p)) => format!("p={} (MISMATCH)", format_p(p)),
                _ => "not checked (no --split)".into(),
            }
        );
        let rates = |map: &BTreeMap<String, Rate>| {
            map.iter()
                .map(|(a, r)| format!("{a} {:.0}/{:.0}", r.count, r.of))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let _ = writeln!(
            out,
            "errors (5xx or no status): {}; guardrail {}; misrouted: {}",
            rates(&self.errors),
            self.error_guardrail.summary(),
            rates(&self.misroutes)
        );
        let _ = writeln!(
            out,
            "window: {} s ending {:.0}",
            self.window.seconds, self.window.end
        );
        let _ = writeln!(out, "verdict: {}", self.verdict_line());
        out
    }

    pub fn html_body(&self) -> String {
        let escape = html::escape;
        let mut out = format!("<h2>Comparisons</h2><pre>{}</pre>", escape(&self.table()));
        out.push_str("<h2>Distributions</h2>");
        for c in &self.comparisons {
            let arms: Vec<plots::BinnedCdf> = self
                .arms
                .iter()
                .filter_map(|arm| {
                    let points = c
                        .cdf
                        .as_ref()?
                        .get(arm)?
                        .iter()
                        .map(|&[x, f]| (x, f))
                        .collect();
                    Some((
                        arm.clone(),
                        c.n.get(arm).copied().unwrap_or(0) as f64,
                        points,
                    ))
                })
                .collect();
            let caption = format!(
                "{}: the fraction of requests at or below each bucket bound, per arm ({}).",
                c.metric,
                c.decision_text()
            );
            html::figure(
                &mut out,
                c.metric,
                &caption,
                plots::binned_cdf_plot(c.metric, "ms (log scale)", &arms),
            );
        }
        out.push_str("<h2>Queries</h2><ul>");
        for q in &self.queries {
            out.push_str(&format!("<li><code>{}</code></li>", escape(q)));
        }
        out.push_str("</ul>");
        out
    }
}
