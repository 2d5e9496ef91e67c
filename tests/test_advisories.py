"""The offline advisory check (`make deny`) can fail: a vulnerability filed against a crate in
Cargo.lock, added to a copy of the committed RustSec snapshot, makes cargo-deny fail and name it."""
import subprocess
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CARGO_DENY = ROOT / ".venv" / "bin" / "cargo-deny"
SNAPSHOT = ROOT / "third_party" / "rustsec-advisory-db" / "advisory-db.tar.gz"
# The directory cargo-deny derives from the database URL (see the Makefile's ADVISORY_DB_DIR).
DB_DIR = Path("advisory-db-3157b0e258782691")

INJECTED = '''```toml
[advisory]
id = "RUSTSEC-2099-0001"
package = "anyhow"
date = "2099-01-01"
url = "https://example.invalid/advisory"
categories = ["memory-corruption"]

[versions]
patched = []
```

# Every version of anyhow is vulnerable

Filed by kvab's tests to show that the advisory check fails when it should.
'''


def deny_advisories(db_path: Path) -> subprocess.CompletedProcess:
    config = db_path.parent / "deny.toml"
    text = (ROOT / "deny.toml").read_text().replace('db-path = ".run/advisory-dbs"', f'db-path = "{db_path}"')
    assert str(db_path) in text, "deny.toml no longer sets db-path as this test expects"
    config.write_text(text)
    return subprocess.run(
        [str(CARGO_DENY), "--locked", "--offline", "--color", "never", "--config", str(config), "check", "advisories"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
    )


def unpack(db_path: Path) -> Path:
    repo = db_path / DB_DIR
    repo.mkdir(parents=True)
    with tarfile.open(SNAPSHOT) as tar:
        tar.extractall(repo, filter="data")
    return repo


def commit(repo: Path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=repo, check=True)


def test_the_snapshot_passes_and_an_advisory_against_a_locked_crate_fails(tmp_path):
    assert CARGO_DENY.exists(), "run `make venv` first (it installs cargo-deny into .venv)"
    clean = unpack(tmp_path / "clean")
    commit(clean)
    ok = deny_advisories(tmp_path / "clean")
    assert ok.returncode == 0, ok.stdout[-3000:]
    assert "advisories ok" in ok.stdout

    vulnerable = unpack(tmp_path / "vulnerable")
    (vulnerable / "crates" / "anyhow" / "RUSTSEC-2099-0001.md").write_text(INJECTED)
    commit(vulnerable)
    failed = deny_advisories(tmp_path / "vulnerable")
    assert failed.returncode != 0
    assert "RUSTSEC-2099-0001" in failed.stdout and "advisories FAILED" in failed.stdout, failed.stdout[-3000:]
