"""The shipped JSON Schema agrees with the filter's own validation on every fixture, and the
filter refuses bad configurations inside a real Envoy with one log line naming the field."""

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest

from kvablocal.envoy import Gateway
from kvablocal.sidecar import kvab_binary, static_config

FILTER = Path(__file__).resolve().parents[1] / "filter"
SCHEMA = json.loads((FILTER / "config.schema.json").read_text())


def fixtures(folder):
    paths = sorted((FILTER / "fixtures" / folder).glob("*.json"))
    assert paths, folder
    return paths


def test_schema_is_a_valid_draft_2020_12_schema():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


@pytest.mark.parametrize("path", fixtures("valid") + fixtures("invalid-semantic"), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_schema_accepts(path):
    jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(path.read_text()))


@pytest.mark.parametrize("path", fixtures("invalid"), ids=lambda p: p.name)
def test_schema_refuses(path):
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft202012Validator(SCHEMA).validate(json.loads(path.read_text()))


REFUSED = [
    ('{"arms": []}', "invalid plugin configuration: arms: at least one arm is required"),
    ('{"arms": [{"name": "nvlink", "alias": ["p2p"]}]}', "invalid plugin configuration: arms[0].alias: unknown field `alias`"),
    (
        '{"arms": [{"name": "nvlink", "aliases": ["p2p"]}, {"name": "fs", "aliases": ["P2P"]}]}',
        'invalid plugin configuration: arms[1].aliases[0]: "p2p" is already a name or alias of arm "nvlink"',
    ),
    ('{"onMissing": "split", "split": {"weights": {"nvlink": 0}}}', "invalid plugin configuration: split.weights.nvlink: weight must be between 1 and 1000000, got 0"),
    ('{"onMissing": "split", "split": {"weights": {"nvlink": -1}}}', "invalid plugin configuration: split.weights.nvlink: invalid value: integer `-1`"),
    ('{"onMissing": "default"}', 'invalid plugin configuration: defaultArm: required when onMissing is "default"'),
    ("{not json", "invalid plugin configuration: key must be a string"),
    ('{"onMissing": "split", "split": {"weights": {"nvlink": 4294967296}}}', "invalid plugin configuration: split.weights.nvlink: invalid value: integer `4294967296`"),
    ('{"onMissing": "split", "split": {"weights": {"nvlink": 1000001}}}', "invalid plugin configuration: split.weights.nvlink: weight must be between 1 and 1000000, got 1000001"),
    ('{"onMissing": "split", "split": {"weights": {"nvlink": 1.5}}}', "invalid plugin configuration: split.weights.nvlink: invalid type: floating point `1.5`"),
    ('{"headr": "x-kv-backend"}', "invalid plugin configuration: headr: unknown field `headr`"),
    ("[]", "invalid plugin configuration: the configuration must be a JSON object"),
    ("{} {}", "invalid plugin configuration: trailing characters"),
    ('{"arms": [' + ",".join('{"name": "a%d"}' % i for i in range(17)) + "]}", "invalid plugin configuration: arms: at most 16 arms are allowed, got 17"),
    ('{"a\\nb": 1}', "invalid plugin configuration: a\\nb: unknown field `a\\nb`"),
    ('{"allowChoice": {}}', "invalid plugin configuration: allowChoice: needs sourceRanges, header, or both"),
    ('{"allowChoice": {"sourceRanges": ["10.1.0.0/8"]}}', 'invalid plugin configuration: allowChoice.sourceRanges[0]: "10.1.0.0/8" has host bits set; the range starts at 10.0.0.0/8'),
    ('{"allowChoice": {"header": "x-kv-backend-endpoint"}}', 'invalid plugin configuration: allowChoice.header: "x-kv-backend-endpoint" is the arm header or one of its tags'),
    ('{"sidecar": {"cluster": "kvab-sidecar-typo"}}', 'invalid plugin configuration: sidecar.cluster: Envoy has no cluster named "kvab-sidecar-typo"'),
    ('{"responseEndpointHeader": "off"}', 'invalid plugin configuration: responseEndpointHeader: invalid type: string "off", expected a boolean'),
]


@pytest.mark.parametrize("config,line", REFUSED, ids=[c for c, _ in REFUSED])
def test_envoy_refuses_bad_configuration_at_startup(arms, tmp_path, config, line):
    g = Gateway(config, arms["nvlink"].port, arms["fs"].port, workdir=tmp_path)
    g.start_process()
    code = g.wait_exit(timeout=60)
    log = g.log()
    assert code != 0
    kvab_lines = [l for l in log.splitlines() if "invalid plugin configuration" in l]
    assert len(kvab_lines) == 1, log[-3000:]
    assert line in kvab_lines[0], kvab_lines[0]
    assert "panic" not in log


# The contract's arm-name rule (kvab_contract::ARM_NAME_RULE), as every part states it.
ARM_NAME_RULE = ("an arm name is 1 to 32 characters of a-z, 0-9, '.', '_', '-', starting and ending with a letter or "
                 "digit (a label value Kubernetes and Prometheus keep as is), and not \"none\" or \"unknown\"")


def test_an_uppercase_arm_is_refused_at_load_by_the_filter_and_kvab_serve_with_the_same_rule(arms, tmp_path):
    """`NVLink` is a valid Kubernetes label value. Lowercased by one part and kept by another, every request
    for it would be answered 503 (the map's `NVLink` is foreign to a filter that knows `nvlink`): both refuse
    it at load instead, with the same message."""
    refusal = f"arm name \"NVLink\" has the uppercase letter 'N' (refused, never lowercased): {ARM_NAME_RULE}"
    g = Gateway('{"arms": [{"name": "NVLink"}, {"name": "fs"}]}', arms["nvlink"].port, arms["fs"].port,
                workdir=tmp_path / "envoy")
    g.start_process()
    code = g.wait_exit(timeout=60)
    log = g.log()
    kvab_lines = [l for l in log.splitlines() if "invalid plugin configuration" in l]
    assert code != 0 and len(kvab_lines) == 1, log[-3000:]
    assert f"invalid plugin configuration: arms[0].name: {refusal}" in kvab_lines[0], kvab_lines[0]

    config = tmp_path / "kvab.toml"
    config.write_text(static_config([("NVLink", f"127.0.0.1:{arms['nvlink'].port}", "local/p2p")],
                                    arms=("NVLink", "fs")).replace("{port}", "0"))
    serve = subprocess.run([kvab_binary(), "serve", "--config", str(config)], capture_output=True, text=True,
                           timeout=30)
    assert serve.returncode == 2 and serve.stdout == "", serve.stderr
    assert f"kvab.toml: line 3, column 8: `arms`: {refusal}" in serve.stderr, serve.stderr
