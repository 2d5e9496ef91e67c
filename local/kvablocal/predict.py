"""The load model's prediction beside a `kvab experiment`'s findings, cell by cell.

`compare(report, records)` reads the experiment's JSON report (`--json`) and its records file
(`--records`) and returns, per primary cell: its label and level (the level's concurrency), kvab's ratio
of the second arm's primary metric to the first's with its interval and decision (the report's: a
Hodges–Lehmann ratio, of medians in spirit), the measured ratio of the arms' mean times to first token
(the cell's answered requests of each arm, from the records) and the model's predicted ratio of means
(`kvablocal.loadmodel.predict_cells` at the level's concurrency, the level's cells mixed; the prefix
caches' hits by `cache_hit_tokens`, Che's approximation from the workload's groups, over each arm's
requests of that level counted from its empty cache). The model's means are the measured means'
counterpart, not kvab's ratio's: with a bimodal cell (a shared prefix found cached or not) the two differ.

What the model leaves out: the gateway's time (Envoy and the filter) and the client's, the sleeps'
overrun, the HTTP and the CPU of the arms. A closed loop's slots spend some of their time in the client
between requests, so the arms see fewer requests in flight than the nominal concurrency; with
`think="little"` (the default) that time is estimated per level by Little's law from the level's
measured throughput and the requests in flight (`think_from_throughput`; the report's sweep curves) and
given to the model as its think time. The gateway's share is inside the measured end-to-end time, so it
stays out: the model's times are the arms' own.
"""

import json
import statistics
from pathlib import Path

from .loadmodel import cache_hit_tokens, predict_cells, prefix_hit_ratio, prefix_tokens, think_from_throughput


def read_records(path) -> tuple:
    """(header, [record]) of a records file (JSON lines; blank lines skipped)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty")
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def answered(record: dict) -> bool:
    """A request answered by its assigned arm, with a first token: in that arm's timings."""
    return record.get("error") is None and record.get("ttft_ms") is not None and record.get("served") == record["assigned"]


def class_shapes(header: dict) -> dict:
    """{class label: its workload shape} from the records header (unique when it names none)."""
    shapes = header.get("workloads") or [header.get("workload") or {"kind": "unique"}]
    return {c["label"]: shapes[c.get("workload", 0)] for c in header["classes"]}


def levels(report: dict) -> list:
    """Per level: {"concurrency", "rate", "sent", ...} (one level for a run without a sweep)."""
    if report.get("sweep"):
        return report["sweep"]["levels"]
    run = report["run"]
    return [{"concurrency": run.get("concurrency"), "rate": run.get("rate"), "sent": run.get("sent")}]


def level_think(report: dict, level: int, concurrency: int, records: list) -> float:
    """Seconds per request a slot spends outside the arms at `level` (Little's law): from the sweep's
    curves (per arm, over every class: throughput and requests in flight), else from the records and the
    run's time (a run of one level: its warm-up included, so roughly)."""
    curves = [c for c in (report.get("sweep") or {}).get("curves", []) if c.get("class") is None]
    if curves:
        points = [c["points"][level] for c in curves]
        return think_from_throughput(concurrency, sum(p["throughput"] for p in points), sum(p["in_flight"] for p in points))
    run = report["run"]
    e2e = [r["e2e_ms"] / 1000 for r in records if r.get("e2e_ms")]
    if not e2e or not run.get("duration_s"):
        return 0.0
    throughput = run["sent"] / run["duration_s"]
    return think_from_throughput(concurrency, throughput, throughput * statistics.mean(e2e))


def compare(report, records, models: dict = None, delay: dict = None, capacity: dict = None, think="little",
            hit_ratio: dict = None) -> list:
    """Per primary cell of `report` (the JSON report, a dict or a path) and `records` (the records file's
    path): {"cell", "class", "level", "concurrency", "kvab": {"metric", "ratio", "ratio_ci", "decision",
    "faster"}, "measured": {"n": {arm: answered}, "ttft_ms": {arm: mean}, "ratio"}, "model": {"ttft_ms":
    {arm: mean}, "hit_tokens": {arm: mean cached tokens}, "ratio"} or None, "think_ms"}; ratios are the
    second arm's over the first's, as kvab's. `models`, `delay`: as `predict_cells` (the arms'); `capacity`:
    each arm's prefix cache, tokens (`cache_hit_tokens`); `hit_ratio`: measured hit ratios of the shared
    prefixes instead of Che's ({arm: fraction}, `prefix_hit_ratio`); `think`: "little" (per level, from
    the measured throughput) or seconds. The model is None for an open-loop level, and where a cell of the
    level has no prompt size or is neither unique nor shared-prefix (the model knows no other)."""
    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text())
    header, lines = read_records(records)
    first, second = report["arms"]
    shapes = class_shapes(header)
    sweep_levels = levels(report)
    warmup = report["run"].get("warmup") or 0
    # The report's cells: label -> (class, level); a run without a sweep has its classes as cells.
    cells = {c["label"]: (c.get("class", c["label"]), c.get("level", 0), c.get("prompt_tokens")) for c in report["classes"]}
    by_cell = {}
    for record in lines:
        if answered(record):
            by_cell.setdefault(record["class"], []).append(record)

    predicted, thinks = {}, {}
    for index, level in enumerate(sweep_levels):
        concurrency = level.get("concurrency")
        of_level = [(label, cls, size) for label, (cls, lvl, size) in cells.items() if lvl == index]
        if not concurrency or not of_level:
            continue
        model_cells = [{"label": label, "prompt_tokens": size, "workload": shapes.get(cls, {"kind": "unique"})}
                       for label, cls, size in of_level]
        if any(c["prompt_tokens"] is None or c["workload"].get("kind") not in ("unique", "shared-prefix") for c in model_cells):
            continue
        records_of_level = [r for label, _, _ in of_level for r in by_cell.get(label, [])]
        seconds = level_think(report, index, concurrency, records_of_level) if think == "little" else float(think or 0.0)
        thinks[index] = seconds
        outputs = [r["output_tokens"] for r in records_of_level if r.get("output_tokens")]
        max_tokens = round(statistics.mean(outputs)) if outputs else 16
        # Each arm's requests of this level, counted from its empty cache (the levels before, then this one's
        # warm-up), the arms sharing every level equally.
        before = sum(done.get("sent") or 0 for done in sweep_levels[:index])
        arms = len(report["arms"])
        span = ((before + warmup) // arms, max((before + warmup) // arms + 1, (before + (level.get("sent") or 0)) // arms))
        hits = cache_hit_tokens(model_cells, capacity, span, hit_ratio)
        for cell in model_cells:
            cell["hit_tokens"] = hits[cell["label"]]
        result = predict_cells(model_cells, concurrency, models, max_tokens, delay, think=seconds)
        for cell in model_cells:
            predicted[cell["label"]] = {"ttft_ms": {arm: t * 1000 for arm, t in result["cells"][cell["label"]]["ttft"].items()},
                                        "hit_tokens": cell["hit_tokens"]}

    rows = []
    for comparison in report["comparisons"]:
        if not comparison.get("primary"):
            continue
        label = comparison["class"]
        cls, index, _ = cells.get(label, (label, 0, None))
        records_of_cell = by_cell.get(label, [])
        times = {arm: [r["ttft_ms"] for r in records_of_cell if r["assigned"] == arm] for arm in (first, second)}
        means = {arm: statistics.mean(t) if t else None for arm, t in times.items()}
        model = predicted.get(label) if comparison["metric"] == "ttft_ms" else None
        if model and {first, second} <= set(model["ttft_ms"]):
            model = {**model, "ratio": model["ttft_ms"][second] / model["ttft_ms"][first]}
        else:
            model = None
        rows.append({
            "cell": label, "class": cls, "level": index,
            "concurrency": sweep_levels[index].get("concurrency") if index < len(sweep_levels) else None,
            "kvab": {key: comparison.get(key) for key in ("metric", "ratio", "ratio_ci", "decision", "faster")},
            "measured": {"n": {arm: len(t) for arm, t in times.items()}, "ttft_ms": means,
                         "ratio": means[second] / means[first] if means[first] and means[second] else None},
            "model": model,
            "think_ms": thinks[index] * 1000 if index in thinks else None,
        })
    return rows


def prefix_hit_ratios(report: dict, records, capacity: dict = None, counters: dict = None) -> dict:
    """{arm: {"model": the fraction of the shared prefixes' tokens Che's approximation finds cached over the
    whole run, warm-ups included; "counters": the same from the arm's counters ({arm: (hits, queries)},
    tokens, over the run: `loadmodel.prefix_hit_ratio`), None without them}}; {} without a shared-prefix
    cell. Assumes every level has the same classes (a sweep's do)."""
    header, _ = read_records(records)
    shapes = class_shapes(header)
    cells = [{"label": c["label"], "prompt_tokens": c["prompt_tokens"], "workload": shapes.get(c.get("class", c["label"]), {})}
             for c in report["classes"] if c.get("level", 0) == 0 and c.get("prompt_tokens")]
    shared = [c for c in cells if prefix_tokens(c) > 0]
    if not shared:
        return {}
    sent = sum(level.get("sent") or 0 for level in levels(report))
    hits = cache_hit_tokens(cells, capacity, (0, max(1, sent // len(report["arms"]))))[shared[0]["label"]]
    counters = counters or {}
    return {arm: {"model": hits[arm] / prefix_tokens(shared[0]),
                  "counters": prefix_hit_ratio(*counters[arm], cells) if arm in counters else None} for arm in hits}


def table(rows: list) -> str:
    """The rows as a table: cell | kvab: ratio [interval] decision | measured mean ratio | model's ratio."""
    def ratio(value) -> str:
        return f"×{value:.3f}" if value is not None else "–"

    lines = []
    header = ("cell", "kvab: ratio [interval] decision", "measured mean ratio", "model's mean ratio")
    body = []
    for row in rows:
        kvab = row["kvab"]
        ci = kvab.get("ratio_ci") or [None, None]
        interval = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if None not in ci else "[–]"
        decision = kvab.get("decision") or "–"
        if decision == "faster" and kvab.get("faster"):
            decision = f"{kvab['faster']} faster"
        model = row["model"]
        body.append((row["cell"], f"{ratio(kvab.get('ratio'))} {interval} {decision}", ratio(row["measured"]["ratio"]),
                     ratio(model["ratio"]) if model else "–"))
    widths = [max(len(str(r[i])) for r in (header, *body)) for i in range(4)]
    for r in (header, *body):
        lines.append(" | ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
