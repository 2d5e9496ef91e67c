"""The README's "What `make` installs" names everything the Makefile installs: each Debian package,
rustup target and component, cargo-installed tool, npm package and PyPI requirement. A target that
starts installing something new fails here until the README says so."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Continuation lines joined, so each recipe command is one line.
MAKEFILE = (REPO / "Makefile").read_text().replace("\\\n", " ")


def readme_install_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("### What `make` installs")
    return text[start:text.index("\n### ", start + 1)]


def make_variables() -> dict:
    return dict(re.findall(r"^([A-Z_]+)\s*:=\s*(\S+)\s*$", MAKEFILE, flags=re.M))


def expand(word: str) -> str:
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: make_variables().get(m.group(1), m.group(0)), word)


def installed_by_make() -> dict:
    """What the Makefile's recipes install, by kind."""
    found = {"debian": set(), "rustup": set(), "cargo install": set(), "npm": set()}
    for args in re.findall(r"apt-get install -y -qq ([^;}>\n]+)", MAKEFILE):
        found["debian"].update(args.split())
    for names in re.findall(r"rustup component add ([^;|}\n]+)", MAKEFILE):
        found["rustup"].update(names.split())
    for names in re.findall(r"for t in ([^;]+); do[^\n]*rustup target", MAKEFILE):
        found["rustup"].update(names.split())
    for name in re.findall(r"cargo install [^\n]*?--root \S+ ([a-z0-9-]+)", MAKEFILE):
        found["cargo install"].add(name)
    for spec in re.findall(r"npm install [^\n]*?(\S+@\S+);", MAKEFILE):
        found["npm"].add(expand(spec))
    return found


def test_the_makefile_installs_what_is_parsed_here():
    # The patterns above must keep matching: an empty kind would pass everything below.
    found = installed_by_make()
    assert all(found.values()), found
    assert {"prometheus", "valgrind", "wrk", "hey", "nodejs", "npm"} <= found["debian"]


def test_the_readme_names_everything_the_makefile_installs():
    section = readme_install_section()
    missing = [
        (kind, name)
        for kind, names in installed_by_make().items()
        for name in sorted(names)
        if f"`{name}`" not in section and f"`{name}" not in section
    ]
    assert not missing, f"installed by the Makefile but not in the README's install list: {missing}"


def test_the_readme_names_every_python_requirement_with_its_pin():
    section = readme_install_section()
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", (REPO / "tests" / "requirements.txt").read_text(), flags=re.M)
    assert pins
    missing = [name for name, _ in pins if f"`{name}" not in section]
    assert not missing, f"in tests/requirements.txt but not in the README's install list: {missing}"
    # Versions the README states must be the pinned ones.
    for name, version in pins:
        for stated in re.findall(rf"`{re.escape(name)}==([^`]+)`", section):
            assert stated == version, f"README says {name}=={stated}, tests/requirements.txt pins {version}"
