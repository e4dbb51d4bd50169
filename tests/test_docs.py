"""docs/design.md stays true to the tree: every section the code cites exists, and every repository
path the notes name (the op map, the layering) is a file or folder that exists."""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r'docs/design\.md,\s*"([^"]+)"')
PATH = re.compile(r"`((?:fusedtx|csrc|tests|benchmarks|docs)/[\w./*<>-]*)`")
TEXT_FILES = (".py", ".cpp", ".cu", ".h", ".cuh", ".sh", ".md", ".toml")


def _sections(text: str) -> set[str]:
    return {m.group(1).strip() for m in re.finditer(r"^#{2,4} (.+)$", text, re.M)}


def _tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout:
        return [ROOT / name for name in out.stdout.split()]
    return [p for p in ROOT.rglob("*") if ".git" not in p.parts and ".venv" not in p.parts]


def cited_sections(files) -> dict[str, set[str]]:
    """section name -> the files citing it (the design notes' path, a comma, the quoted name)."""
    cited: dict[str, set[str]] = {}
    for path in files:
        if path.suffix not in TEXT_FILES or not path.is_file() or "results" in path.parts:
            continue
        for section in CITATION.findall(path.read_text(errors="replace")):
            cited.setdefault(section, set()).add(path.name)
    return cited


def missing_paths(text: str) -> list[str]:
    """Repository paths in backticks that match nothing (<op> placeholders and globs allowed)."""
    missing = []
    for raw in PATH.findall(text):
        pattern = re.sub(r"\*+", "*", re.sub(r"<[^>]+>", "*", raw.rstrip("/.")))
        if not any(ROOT.glob(pattern)):
            missing.append(raw)
    return missing


def test_every_cited_section_exists():
    sections = _sections(DESIGN.read_text())
    cited = cited_sections(_tracked_files())
    assert cited, "no citation of docs/design.md found: the pattern no longer matches the code's style"
    unknown = {s: sorted(f) for s, f in cited.items() if s not in sections}
    assert not unknown, f"sections cited but not in docs/design.md: {unknown}"


def test_every_path_in_the_notes_exists():
    text = DESIGN.read_text()
    assert len(PATH.findall(text)) > 20, "the op map's paths are no longer found"
    assert not missing_paths(text), f"paths in docs/design.md that do not exist: {missing_paths(text)}"


def test_the_checks_can_fail(tmp_path):
    """Negative controls: a citation of a made-up section and a made-up path are reported."""
    cited = tmp_path / "cites.py"
    cite = "docs/design.md" + ', "{}"'  # built here, so that this file cites nothing itself
    cited.write_text(f"# see {cite.format('No such section')}\n# and {cite.format('Layering')}\n")
    found = cited_sections([cited])
    assert set(found) == {"No such section", "Layering"}
    assert "Layering" in _sections(DESIGN.read_text()) and "No such section" not in _sections(DESIGN.read_text())
    assert missing_paths("see `csrc/cpu/no_such_op.cpp` and `fusedtx/ops/softmax.py`") == ["csrc/cpu/no_such_op.cpp"]
