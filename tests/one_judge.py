"""What a report saved before the one judge (issue #28) reads as now: the same decisions and figures, in the
one wording and order of reasons that `kvab experiment` and `kvab analyze` share since (kvab_judge::verdict).

The saved reports under tests/data/ were written before `kvab experiment` and `kvab analyze` shared one
comparison, one decision rule and one verdict. These are every difference, each applied to a saved report
(nothing else may differ):

- analyze: `n` per arm is whole requests (Prometheus's increase() was shown as a float); each comparison has
  `more_requests` (always null for histograms); a comparison's reason no longer ends in " (median)"; an
  invalid verdict also gives the notes (error rates that differ, misrouted requests) after its reason.
- experiment: the notes (misrouted answers, error rates that differ) come after the comparisons' reasons
  instead of before them (an invalid verdict keeps them after its reason, as before).
"""

from __future__ import annotations

import copy

MEDIAN = " (median)"


def format_p(p: float) -> str:
    """kvab_judge::stats::format_p: Rust's `{:.1e}` (`1.2e-5`) below 1e-4, else four decimals."""
    if p < 1e-4:
        mantissa, exponent = f"{p:.1e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{p:.4f}"


def analyze_report(saved: dict) -> dict:
    report = copy.deepcopy(saved)
    for c in report["comparisons"]:
        c["n"] = {arm: round(n) for arm, n in c["n"].items()}
        c.setdefault("more_requests", None)
    report["reasons"] = [r.removesuffix(MEDIAN) if r.endswith(MEDIAN) else r for r in report["reasons"]]
    if report["verdict"] == "invalid":
        errors_p = report.get("errors_p")
        if errors_p is not None and errors_p < report["method"]["alpha"]:
            report["reasons"].append(f"error rates differ between the arms (p={format_p(errors_p)})")
        misrouted = sum(r["count"] for r in report["misroutes"].values())
        if misrouted > 0:
            report["reasons"].append(f"{misrouted:.0f} request(s) served by another arm than tagged")
    return report


def experiment_report(saved: dict) -> dict:
    report = copy.deepcopy(saved)
    if report["verdict"] != "invalid":
        notes = [r for r in report["reasons"]
                 if "served by another arm than assigned" in r or r.startswith("error rates differ in class ")]
        skipped = [r for r in report["reasons"] if r.endswith("(the open loop did not hold its rate)")]
        rest = [r for r in report["reasons"] if r not in notes and r not in skipped]
        report["reasons"] = rest + notes + skipped
    return report
