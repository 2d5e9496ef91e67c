"""The command line as users meet it: `--help` is the flag reference, and the docs show exactly that output;
environment variables stand in for flags; usage errors exit with the documented codes."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from kvablocal.sidecar import REPO

# Each help text and the page that shows it, in a fenced block opened by "$ <command>".
HELP_PAGES = {
    ("--help",): REPO / "README.md",
    ("serve", "--help"): REPO / "docs" / "sidecar.md",
    ("check", "--help"): REPO / "docs" / "check.md",
    ("experiment", "--help"): REPO / "docs" / "experiment.md",
    ("analyze", "--help"): REPO / "docs" / "analyze.md",
}


def run(kvab_bin: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVAB_") and k != "COLUMNS"}
    clean.update(env or {})
    return subprocess.run([kvab_bin, *args], capture_output=True, text=True, timeout=30, env=clean)


def documented_block(page, command: str) -> str:
    text = page.read_text()
    match = re.search(r"^```text\n\$ " + re.escape(command) + r"\n(.*?)^```$", text, re.S | re.M)
    assert match, f"{page.relative_to(REPO)} has no ```text block opened by '$ {command}'"
    return match.group(1)


def test_the_docs_show_the_help_exactly_as_the_binary_prints_it(kvab_bin):
    for args, page in HELP_PAGES.items():
        result = run(kvab_bin, *args)
        assert result.returncode == 0, result.stderr
        documented = documented_block(page, " ".join(("kvab", *args)))
        assert documented == result.stdout, (
            f"{page.relative_to(REPO)} shows an old `kvab {' '.join(args)}`; paste the current output:\n"
            + result.stdout)


@pytest.mark.parametrize("command, prefix, at_least", [("check", "KVAB_CHECK_", 35), ("experiment", "KVAB_EXPERIMENT_", 30),
                                                            ("analyze", "KVAB_ANALYZE_", 14)])
def test_every_flag_has_help_text_and_an_environment_variable(kvab_bin, command, prefix, at_least):
    text = run(kvab_bin, command, "--help").stdout
    flags = re.findall(r"^\s+(?:-\w, )?(--[a-z-]+)", text, re.M)
    assert len(flags) > at_least, flags
    switches_without_env = {"--help", "--local", "--cluster"}
    for flag in flags:
        entry = re.search(r"^\s+(?:-\w, )?" + re.escape(flag) + r"(?=[ <])(.*?)(?=^\s+-|^\S|\Z)", text, re.M | re.S)
        assert entry and len(entry.group(1).split()) >= 2, f"{flag} has no help text"
        if flag not in switches_without_env:
            variable = prefix + flag[2:].upper().replace("-", "_")
            assert f"[env: {variable}]" in " ".join(entry.group(1).split()), f"{flag}: no {variable}"


def test_an_environment_variable_stands_in_for_its_flag_and_the_flag_wins(kvab_bin):
    from_env = run(kvab_bin, "check", "--dry-run", env={"KVAB_CHECK_BURST_REQUESTS": "7",
                                                        "KVAB_CHECK_GATEWAY_URL": "http://gw.example:80"})
    assert from_env.returncode == 0, from_env.stderr
    assert "7 requests, 5 at a time" in from_env.stdout
    assert "curl -sS -X POST http://gw.example:80/v1/chat/completions" in from_env.stdout
    flag_wins = run(kvab_bin, "check", "--dry-run", "--burst-requests", "9",
                    env={"KVAB_CHECK_BURST_REQUESTS": "7"})
    assert "9 requests, 5 at a time" in flag_wins.stdout, flag_wins.stdout
    switch = run(kvab_bin, "check", env={"KVAB_CHECK_DRY_RUN": "true"})
    assert switch.returncode == 0 and "nothing is sent" in switch.stdout, switch.stderr


def test_a_bad_value_names_the_flag_and_where_it_came_from(kvab_bin):
    typed = run(kvab_bin, "check", "--burst-requests", "-1")
    assert typed.returncode == 3
    assert "invalid value '-1' for '--burst-requests <N>'" in typed.stderr, typed.stderr
    assert "environment" not in typed.stderr
    from_env = run(kvab_bin, "check", "--dry-run", env={"KVAB_CHECK_CONCURRENCY": "lots"})
    assert from_env.returncode == 3 and from_env.stdout == ""
    assert "'--concurrency <N>'" in from_env.stderr, from_env.stderr
    assert "environment variable KVAB_CHECK_CONCURRENCY" in from_env.stderr, from_env.stderr
    conflict = run(kvab_bin, "check", "--local", "--cluster")
    assert conflict.returncode == 3 and "--cluster" in conflict.stderr, conflict.stderr
    cross_flag = run(kvab_bin, "check", "--split", "gpu=1")
    assert cross_flag.returncode == 3 and "not one of the arms" in cross_flag.stderr


def test_serve_takes_its_configuration_from_kvab_config(kvab_bin, tmp_path):
    path = tmp_path / "listen.toml"
    path.write_text('listen = "127.0.0.1:1"\n')
    result = run(kvab_bin, "serve", "--check-config", env={"KVAB_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    assert "listen 127.0.0.1:1," in result.stdout
    # Empty means unset: the embedded local configuration.
    embedded = run(kvab_bin, "serve", "--check-config", env={"KVAB_CONFIG": ""})
    assert embedded.returncode == 0 and "static (" in embedded.stdout, embedded.stderr
    missing = run(kvab_bin, "serve", "--check-config", env={"KVAB_CONFIG": str(tmp_path / "nope.toml")})
    assert missing.returncode == 2 and "nope.toml" in missing.stderr


def test_usage_errors_and_version(kvab_bin):
    unknown = run(kvab_bin, "frobnicate")
    assert unknown.returncode == 2 and "Usage: kvab <COMMAND>" in unknown.stderr
    bare = run(kvab_bin)
    assert bare.returncode == 2 and "Usage:" in bare.stderr
    serve_flag = run(kvab_bin, "serve", "--listen", "x")
    assert serve_flag.returncode == 2 and "--listen" in serve_flag.stderr
    version = run(kvab_bin, "--version")
    assert version.returncode == 0 and re.fullmatch(r"kvab \d+\.\d+\.\d+\n", version.stdout)


def test_experiment_usage_errors_exit_3_and_name_the_flag_or_variable(kvab_bin):
    typed = run(kvab_bin, "experiment", "--requests", "1")
    assert typed.returncode == 3 and "'--requests <N>'" in typed.stderr, typed.stderr
    from_env = run(kvab_bin, "experiment", env={"KVAB_EXPERIMENT_CONCURRENCY": "lots"})
    assert from_env.returncode == 3 and from_env.stdout == ""
    assert "environment variable KVAB_EXPERIMENT_CONCURRENCY" in from_env.stderr, from_env.stderr
    both = run(kvab_bin, "experiment", "--rate", "5", "--concurrency", "2")
    assert both.returncode == 3 and "--concurrency" in both.stderr, both.stderr
    odd_block = run(kvab_bin, "experiment", "--block", "3")
    assert odd_block.returncode == 3 and "--block 3 is not a multiple" in odd_block.stderr, odd_block.stderr
    boundary = run(kvab_bin, "experiment", "--boundary", "bonferroni")
    assert boundary.returncode == 3 and "'--boundary <NAME>'" in boundary.stderr, boundary.stderr
    assert "must be one of obrien-fleming, pocock, always-valid" in boundary.stderr, boundary.stderr


def test_analyze_always_valid_needs_its_plan_and_a_fixed_start(kvab_bin):
    common = ("analyze", "--prometheus", "http://127.0.0.1:1", "--split", "nvlink=1,fs=1")
    without_plan = run(kvab_bin, *common, "--start", "2026-12-07T08:00:00Z", "--boundary", "always-valid")
    assert without_plan.returncode == 3 and "--plan-requests go together" in without_plan.stderr, without_plan.stderr
    plan_alone = run(kvab_bin, *common, "--start", "2026-12-07T08:00:00Z", "--plan-requests", "1000")
    assert plan_alone.returncode == 3 and "--plan-requests go together" in plan_alone.stderr, plan_alone.stderr
    no_start = run(kvab_bin, *common, "--boundary", "always-valid", "--plan-requests", "1000")
    assert no_start.returncode == 3 and "wants --start" in no_start.stderr, no_start.stderr
    with_looks = run(kvab_bin, *common, "--start", "2026-12-07T08:00:00Z", "--boundary", "always-valid",
                     "--plan-requests", "1000", "--looks", "4", "--look-every", "1h")
    assert with_looks.returncode == 3 and "--looks" in with_looks.stderr, with_looks.stderr


def test_an_arm_name_outside_the_contract_grammar_is_a_usage_error_naming_the_arm_and_the_rule(kvab_bin):
    """`kvab experiment --arms NVLink,fs` would tag requests `NVLink`, which no filter configuration can name
    (the filter and `kvab serve` refuse it): every command refuses it up front, as the filter states the rule."""
    rule = ("arm name \"NVLink\" has the uppercase letter 'N' (refused, never lowercased): an arm name is 1 to 32 "
            "characters of a-z, 0-9, '.', '_', '-', starting and ending with a letter or digit")
    for args in (("experiment", "--arms", "NVLink,fs"), ("analyze", "--arms", "NVLink,fs"),
                 ("check", "--arms", "NVLink,fs"), ("analyze", "--split", "NVLink=1,fs=1"),
                 ("check", "--proxy-url", "NVLink=http://127.0.0.1:1")):
        result = run(kvab_bin, *args)
        assert result.returncode == 3 and result.stdout == "", (args, result.stderr)
        assert f"'{args[1]} <" in result.stderr and rule in result.stderr, (args, result.stderr)
    from_env = run(kvab_bin, "experiment", env={"KVAB_EXPERIMENT_ARMS": "nvlink,fs-"})
    assert from_env.returncode == 3 and "arm name \"fs-\" must start and end with a letter or digit" in from_env.stderr, \
        from_env.stderr
    assert "environment variable KVAB_EXPERIMENT_ARMS" in from_env.stderr, from_env.stderr
