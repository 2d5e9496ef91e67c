"""Writes each recorded fixture's saved report again, judged by this kvab from the recorded data.

The recorded data (experiment records, Prometheus answers) are what live runs measured; their reports are what
the judge of this tree says of them. When the judge changes on purpose (a new rule, new fields), run this and
read the diff of the reports: every change must be one the change meant.

    KVAB_BIN=target/debug/kvab .venv/bin/python tests/data/rejudge.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent / "local")]

from test_analyze_answers import analysis_flags  # noqa: E402

KVAB = os.environ.get("KVAB_BIN", "target/debug/kvab")
EXIT = {"decided": 0, "invalid": 1, "inconclusive": 2}


def judged(command: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KVAB_ANALYZE_", "KVAB_EXPERIMENT_"))}
    done = subprocess.run([KVAB, *command, "--json"], capture_output=True, text=True, timeout=120, env=env)
    report = json.loads(done.stdout)
    assert done.returncode == EXIT[report["verdict"]], (command, done.returncode, done.stderr)
    return report


def write(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    print(f"{path.relative_to(HERE.parent.parent)}: {report['verdict']}: {'; '.join(report['reasons'])}")


def main() -> None:
    for records in sorted((HERE / "experiment-records").glob("*.jsonl")):
        report = judged(["experiment", "--judge-records", str(records)])
        report["run"]["judged_from"] = None  # as the live run printed it
        write(records.with_suffix(".report.json"), report)
    for answers in sorted((HERE / "analyze-answers").glob("*.json")):
        if answers.name.endswith(".report.json"):
            continue
        saved = answers.with_name(answers.stem + ".report.json")
        flags = analysis_flags(json.loads(saved.read_text()))
        write(saved, judged(["analyze", "--answers", str(answers), *flags]))


if __name__ == "__main__":
    main()
