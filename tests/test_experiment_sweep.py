"""`kvab experiment` over load levels (a load sweep) end to end on the local stack: the real Envoy with the
filter, and the local arms whose KV transfers share each arm's link (`kvablocal.arm.Link`), so the FS arm's
link saturates at a load the NVLink arm's does not reach. The sweep must find the long-prompt difference at
the lightest level, find it grown at the heavier one, put the FS arm's knee there and not the NVLink arm's,
judge its records again to the same report, and show its grid and load curves in a real browser."""

import subprocess

from browser import open_page
from kvablocal.sidecar import kvab_binary
from test_experiment import ARTIFACTS, experiment, judge, primary, without_judged_fields

LEVELS = (1, 32)


def test_a_load_sweep_finds_the_fs_knee_and_shows_its_grid(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0)
    html, records = tmp_path / "sweep.html", tmp_path / "sweep.jsonl"
    code, report = experiment(
        s, "--prompt-tokens", "128,8192", "--concurrency", ",".join(map(str, LEVELS)), "--requests", "160",
        "--warmup", "8", "--max-tokens", "8", "--seed", "11", "--slo", "ttft=2s", "--records", str(records),
        "--html", str(html))
    assert code in (0, 2), report["reasons"]
    sweep = report["sweep"]
    assert [level["concurrency"] for level in sweep["levels"]] == list(LEVELS)
    assert all(level["sent"] == 168 and level["measured_s"] > 0 for level in sweep["levels"]), sweep["levels"]
    assert report["run"]["concurrency"] is None and report["run"]["sent"] == 2 * 168
    cells = {c["label"]: (c["class"], c["level"], c["requests"]) for c in report["classes"]}
    assert cells == {"128 @ c=1": ("128", 0, 80), "8192 @ c=1": ("8192", 0, 80),
                     "128 @ c=32": ("128", 1, 80), "8192 @ c=32": ("8192", 1, 80)}, cells
    assert report["assignment"]["planned"] == {"fs": 160, "nvlink": 160}
    ttft = primary(report)
    assert set(ttft) == set(cells)
    # Holm runs across the cells: every comparison of the grid is in one family.
    assert all(c["ci_level_alpha"] <= 0.05 / 2 for c in ttft.values())
    light, heavy = ttft["8192 @ c=1"], ttft["8192 @ c=32"]
    assert light["decision"] == "faster" and light["faster"] == "nvlink", light
    assert heavy["decision"] == "faster" and heavy["faster"] == "nvlink", heavy
    # The FS link saturates: the arms are further apart under load, beyond the intervals.
    assert heavy["ratio_ci"][0] > light["ratio_ci"][1], (light["ratio_ci"], heavy["ratio_ci"])
    assert ttft["128 @ c=1"]["decision"] in ("equivalent", "inconclusive"), ttft["128 @ c=1"]

    curves = {(c["arm"], c["class"]): c for c in sweep["curves"]}
    assert set(curves) == {(arm, cls) for arm in ("nvlink", "fs") for cls in (None, "128", "8192")}
    fs_long, nvlink_long = curves[("fs", "8192")], curves[("nvlink", "8192")]
    assert "1.5 times" not in sweep["knee_rule"] and "2000" in sweep["knee_rule"], sweep["knee_rule"]
    # Under a 2 s TTFT objective neither arm's long prompts pass it at these levels...
    assert fs_long["knee"] is None and nvlink_long["knee"] is None, (fs_long, nvlink_long)
    # ...and every answered request met it: the goodput is the throughput.
    for curve in sweep["curves"]:
        for point in curve["points"]:
            assert point["slo_met"] == point["answered"] == point["requests"], point
            assert abs(point["goodput"] - point["throughput"]) < 1e-9
    # The slower arm holds more of the requests in flight (Little's law), the arms' rates are equal.
    fs_all, nvlink_all = curves[("fs", None)]["points"][1], curves[("nvlink", None)]["points"][1]
    assert fs_all["in_flight"] > nvlink_all["in_flight"], (fs_all, nvlink_all)
    assert fs_all["throughput"] == nvlink_all["throughput"]

    # Judged again: the same report; under a tighter objective the FS arm's long prompts pass it at c=32,
    # the NVLink arm's at no level.
    _, again = judge(records)
    assert without_judged_fields(again) == without_judged_fields(report)
    _, tight = judge(records, "--slo", "ttft=300ms")
    assert tight["sweep"]["slo"] == {"ttft_ms": 300.0}
    knees = {(c["arm"], c["class"]): c["knee"] for c in tight["sweep"]["curves"]}
    assert knees[("fs", "8192")] == 1 and knees[("nvlink", "8192")] is None, tight["sweep"]["curves"]
    assert tight["comparisons"] == report["comparisons"], "the SLO changes no comparison"
    decided = subprocess.run(
        [kvab_binary(), "experiment", "--judge-records", str(records), "--json", "--quiet", "--until", "decided"],
        capture_output=True, text=True, timeout=60)
    assert decided.returncode == 3 and "--until budget" in decided.stderr, decided.stderr

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = open_page(html, ARTIFACTS / "experiment-sweep.png")
    assert page["console_errors"] == [], page["console_errors"]
    assert page["requests"] == [html.as_uri()], "the report fetches nothing"
    dom = page["dom"]
    assert dom.index("<h2>Where</h2>") < dom.index("<h2>Classes</h2>"), "the grid comes first"
    assert dom.count('data-plot="load-curve"') == 2 and dom.count('data-plot="ttft-ecdf"') == 4
    assert "c=32</th>" in dom and "load sweep, closed loop: c=1, c=32" in dom


def test_a_load_sweep_without_an_slo_finds_the_fs_knee_by_its_median(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0)
    code, report = experiment(
        s, "--prompt-tokens", "8192", "--concurrency", ",".join(map(str, LEVELS)), "--requests", "80",
        "--warmup", "8", "--max-tokens", "8", "--seed", "12")
    sweep = report["sweep"]
    assert "1.5 times its median" in sweep["knee_rule"]
    knees = {c["arm"]: c["knee"] for c in sweep["curves"]}
    assert set(knees) == {"nvlink", "fs"}, "one class: one curve per arm"
    assert knees == {"nvlink": None, "fs": 1}, [(c["arm"], c["points"]) for c in sweep["curves"]]
    assert code in (0, 2)
