"""The spec and the tests stay in step (spec/README.md): every claim `**ID**` defined in spec/*.md is
cited by at least one test marker `pytest.mark.spec("ID", ...)`, and every cited ID is defined.
IDs that code docstrings cite (minipeft/**/*.py) must be defined too, for stems that have a spec.
Claims marked "withdrawn" on their line need no test; fenced code blocks in the spec define nothing.
Regexes over source text: no imports."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ID = r"[A-Z][A-Z0-9]*-\d+"
DEFINED = re.compile(rf"\*\*({ID})\*\*")
MARKER = re.compile(r"mark\.spec\(([^)]*)\)")
QUOTED = re.compile(rf"""["']({ID})["']""")


def spec_ids():
    """{ID: "file:line"} for every definition, and the set of withdrawn IDs."""
    defined, withdrawn, dupes = {}, set(), []
    for path in sorted((ROOT / "spec").glob("*.md")):
        fenced = False
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
            for i in [] if fenced else DEFINED.findall(line):
                if i in defined:
                    dupes.append(f"{i} at {path.name}:{n} and {defined[i]}")
                defined[i] = f"{path.name}:{n}"
                if "withdrawn" in line.lower():
                    withdrawn.add(i)
    return defined, withdrawn, dupes


def cited_ids():
    """{ID: ["tests/file.py:line", ...]} from every spec marker under tests/."""
    cited = {}
    for path in sorted((ROOT / "tests").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in MARKER.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            for i in QUOTED.findall(m.group(1)):
                cited.setdefault(i, []).append(f"{path.relative_to(ROOT)}:{line}")
    return cited


def test_spec_ids_are_unique():
    _, _, dupes = spec_ids()
    assert not dupes, "IDs defined twice:\n  " + "\n  ".join(dupes)


def test_every_spec_id_has_a_test():
    defined, withdrawn, _ = spec_ids()
    assert defined, "no IDs found in spec/*.md"
    cited = cited_ids()
    missing = [f"{i} ({where})" for i, where in defined.items() if i not in cited and i not in withdrawn]
    assert not missing, "spec IDs no test cites with pytest.mark.spec:\n  " + "\n  ".join(missing)


def test_every_cited_id_is_defined():
    defined, withdrawn, _ = spec_ids()
    unknown = [f"{i} (cited at {', '.join(where)})" for i, where in cited_ids().items() if i not in defined]
    stale = [f"{i} (withdrawn; cited at {', '.join(where)})" for i, where in cited_ids().items() if i in withdrawn]
    assert not unknown + stale, "tests cite IDs that no spec defines:\n  " + "\n  ".join(unknown + stale)


def test_ids_cited_in_code_are_defined():
    defined, _, _ = spec_ids()
    stems = {i.rsplit("-", 1)[0] for i in defined}
    unknown = []
    for path in sorted((ROOT / "minipeft").rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(rf"\b({ID})\b", text):
            i = m.group(1)
            if i.rsplit("-", 1)[0] in stems and i not in defined:  # "GPT-2" has no stem: not an ID
                unknown.append(f"{i} ({path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1})")
    assert not unknown, "code cites IDs that no spec defines:\n  " + "\n  ".join(unknown)
