"""`kvab experiment`'s workloads beyond unique prompts, end to end on the local stack (the real Envoy with the
filter, the local arms): multi-turn conversations randomized and analysed as units, each turn a cell, a
failed turn counting the conversation's later turns against its arm; shared-prefix groups whose reuse the
report states, and the arms' prefix caches (the NVLink arm's small, the FS arm's large) making the FS arm
the faster one where the working set exceeds the NVLink arm's cache."""

import json
import subprocess

from kvablocal.sidecar import kvab_binary
from test_experiment import experiment, judge, primary, without_judged_fields


def test_conversations_are_the_units_and_every_turn_of_a_broken_one_counts(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0, fail_fraction={"fs": 0.15}, seed=4)
    records = tmp_path / "conversations.jsonl"
    code, report = experiment(
        s, "--prompt-tokens", "512", "--workload", "multi-turn", "--turns", "3", "--think-time", "0.005",
        "--requests", "80", "--warmup", "4", "--max-tokens", "4", "--seed", "21", "--records", str(records))
    assert code in (0, 2), report["reasons"]
    assert report["workload"]["shapes"] == [{"kind": "multi-turn", "turns": 3, "think_time_s": 0.005}]
    cells = {c["label"]: c for c in report["classes"]}
    assert list(cells) == ["512 turn 1", "512 turn 2", "512 turn 3"]
    assert [c["turn"] for c in cells.values()] == [1, 2, 3]
    # The assignment check counts conversations (80), not their 240 requests.
    planned = report["assignment"]["planned"]
    assert sum(planned.values()) == 80 and report["assignment"]["srm_ok"], report["assignment"]
    # Every conversation has a measured outcome at every turn: a broken one's later turns are its arm's
    # failures, never left out.
    errors = {e["class"]: e["arms"] for e in report["errors"]}
    for label in cells:
        assert {arm: counts["requests"] for arm, counts in errors[label].items()} == planned, (label, errors)
    broken = errors["512 turn 3"]["fs"]["errors"]
    assert broken >= errors["512 turn 1"]["fs"]["errors"] > 0, errors
    assert errors["512 turn 3"]["nvlink"]["errors"] == 0
    lines = [json.loads(line) for line in records.read_text().splitlines()[1:]]
    never_sent = [r for r in lines if (r["error"] or "").startswith("conversation broken at turn")]
    assert never_sent and all(r["assigned"] == "fs" and r["status"] is None for r in never_sent)
    # Each turn sends the conversation so far: the server counts the earlier messages and answers.
    measured = {label: c["measured_prompt_tokens"] for label, c in cells.items()}
    assert 512 <= measured["512 turn 1"] < 530, measured
    assert measured["512 turn 2"] > 2 * 512 and measured["512 turn 3"] > 3 * 512, measured
    reuse = {r["class"]: r["arms"]["nvlink"] for r in report["workload"]["reuse"]}
    assert reuse["512 turn 1"]["repeated"] == 0 and reuse["512 turn 1"]["shared_tokens"] == 0
    assert 0.45 < reuse["512 turn 2"]["shared_fraction"] < 0.55, reuse
    assert 0.6 < reuse["512 turn 3"]["shared_fraction"] < 0.7, reuse
    # A turn cell's comparison has one request per conversation on each side: its units.
    assert all(sum(c["n"].values()) <= 80 for c in report["comparisons"])
    _, again = judge(records)
    assert without_judged_fields(again) == without_judged_fields(report)


def test_the_workload_flags_are_checked_before_any_traffic(stack):
    s = stack()
    for args, says in [
        (["--workload", "multi-turn", "--endpoint", "completions"], "needs --endpoint chat"),
        (["--workload", "shared-prefix", "--prompt-tokens", "64", "--suffix-tokens", "64"], "leaves no prefix"),
        (["--workload", "multi-turn", "--turns", "1"], "--turns"),
    ]:
        done = subprocess.run([kvab_binary(), "experiment", "--gateway-url", s.urls()["gateway"], *args],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 3 and says in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") <= 3, done.stderr
    assert sum(arm.succeeded for arm in s.arms.values()) == 0, "no completion was sent"


def sharegpt_file(path, conversations=24):
    """A small conversations file in the ShareGPT layout: the human turns' lengths vary, each gpt reply is
    6 words (8 tokens by kvab's estimate), and every fourth conversation has one human turn only."""
    entries = []
    for i in range(conversations):
        turns = [{"from": "system", "value": "be brief"}]
        for turn in range(1 if i % 4 == 3 else 2):
            turns.append({"from": "human", "value": " ".join([f"q{i}-{turn}"] + ["word"] * (20 + 10 * (i % 5)))})
            turns.append({"from": "gpt", "value": "one two three four five six"})
        entries.append({"id": f"c{i}", "conversations": turns})
    path.write_text(json.dumps(entries))
    return path


def test_a_sharegpt_file_gives_prompts_or_conversations_and_the_answers_lengths(stack, tmp_path):
    s = stack(nvlink_delay=0.0, fs_delay=0.0)
    data = sharegpt_file(tmp_path / "sharegpt.json")
    records = tmp_path / "single.jsonl"
    code, report = experiment(s, "--prompts", str(data), "--requests", "48", "--warmup", "0", "--seed", "3",
                              "--records", str(records))
    assert code in (0, 2) and [c["label"] for c in report["classes"]] == ["sharegpt"], report["classes"]
    lines = [json.loads(line) for line in records.read_text().splitlines()[1:]]
    # Each answer as long as the dataset's reply (8 tokens), not --max-tokens' 32.
    assert len(lines) == 48 and all(r["output_tokens"] == 8 for r in lines), {r["output_tokens"] for r in lines}
    code, report = experiment(s, "--prompts", str(data), "--workload", "multi-turn", "--turns", "2",
                              "--requests", "36", "--warmup", "0", "--seed", "3")
    assert [c["label"] for c in report["classes"]] == ["sharegpt turn 1", "sharegpt turn 2"]
    assert sum(report["assignment"]["planned"].values()) == 36
    turn2 = next(c for c in report["classes"] if c["label"] == "sharegpt turn 2")
    turn1 = next(c for c in report["classes"] if c["label"] == "sharegpt turn 1")
    assert turn2["measured_prompt_tokens"] > 2 * turn1["measured_prompt_tokens"], (turn1, turn2)
    lines_file = tmp_path / "lines.jsonl"
    lines_file.write_text('{"prompt": "a b c"}\n')
    done = subprocess.run([kvab_binary(), "experiment", "--gateway-url", s.urls()["gateway"], "--prompts",
                           str(lines_file), "--workload", "multi-turn"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3 and "ShareGPT JSON file" in done.stderr, done.stderr


def test_where_the_working_set_exceeds_the_nvlink_cache_the_fs_arm_is_faster(stack):
    # The NVLink arm's prefix cache holds 4 of the 16 groups' 8128-token prefixes (its GPU memory), the FS
    # arm's all of them (its shared storage). Groups drawn uniformly: the NVLink arm prefills ~3 in 4
    # prompts whole (118 ms to the first token), the FS arm serves them from storage (~73 ms: the prefill
    # saved, the KV read at its bandwidth). The warm-up lets the FS arm see every group first.
    s = stack(nvlink_delay=0.0, fs_delay=0.0, nvlink_cache_tokens=4 * 8192)
    code, report = experiment(
        s, "--prompt-tokens", "8192", "--workload", "shared-prefix", "--prefix-groups", "16", "--zipf", "0",
        "--requests", "240", "--warmup", "128", "--max-tokens", "4", "--concurrency", "2", "--seed", "8")
    ttft = primary(report)["8192"]
    assert ttft["decision"] == "faster" and ttft["faster"] == "fs", (ttft["ratio"], ttft["ratio_ci"], ttft["blocked"])
    assert ttft["ratio_ci"][1] < 0.9, ttft["ratio_ci"]
    reuse = report["workload"]["reuse"][0]["arms"]
    # By construction, over the measured requests (each group's first measured one to an arm counts as new).
    assert all(arm["shared_fraction"] > 0.8 for arm in reuse.values()), reuse
    nvlink, fs = s.arms["nvlink"], s.arms["fs"]
    assert fs.cache_hits > 0.9 * fs.cache_queries and nvlink.cache_hits < 0.5 * nvlink.cache_queries, (
        (nvlink.cache_hits, nvlink.cache_queries), (fs.cache_hits, fs.cache_queries))
    assert code in (0, 2)
