"""The repository explains itself: the README's config table is msd.Config's, and nothing in the
code or the documents points outside the repository. `python tests/test_docs.py` prints the
config table to paste into README.md."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # also when run as a script
import msd  # noqa: E402
FIELD = re.compile(r"^    (\w+): (\w+) = (.+?)\s+# (.*)$")  # `key: type = default  # meaning`
GROUP = re.compile(r"^    # (.+)$")


def config_table():
    """Markdown rows from msd.Config's source: one per key, grouped as the dataclass groups them."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for line in inspect.getsource(msd.Config).splitlines():
        if m := GROUP.match(line):
            lines.append(f"| **{m.group(1).split(' (')[0]}** | | |")
        elif m := FIELD.match(line):
            key, _, default, meaning = m.groups()
            lines.append(f"| `{key}` | `{default}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines)


def test_readme_config_table_is_msd_config():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = config_table()
    assert len(table.splitlines()) > len(msd.Config.__dataclass_fields__)
    assert table in readme, "README's config table is out of date; paste:\n" + table


def test_nothing_points_outside_the_repository():
    """No notes kept elsewhere, no absolute paths of a build machine, in any tracked text file."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an exported tree): read the usual files instead
        files = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                 if p.suffix in (".py", ".md", ".json") and ".git" not in p.parts]
    bad = re.compile(r"\.\./shared|PAPER\.md|PROTOCOLS\.md|STYLE\.md|/work/|/home/\w+|/Users/\w+")
    hits = []
    for name in files:
        path = ROOT / name
        if path.suffix not in (".py", ".md", ".json", ".txt", ".cfg", ".toml") or name == "tests/test_docs.py":
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if bad.search(line):
                hits.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_method_sections_cited_in_the_code_exist():
    method = (ROOT / "docs" / "method.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (\d+)\.", method, re.M))
    cited = set()
    for name in ("msd.py", "data.py", "evaluate.py", "README.md"):
        cited |= set(re.findall(r"method\.md,? §(\d+)", (ROOT / name).read_text(encoding="utf-8")))
        cited |= set(re.findall(r"method\.md §\d+[–-](\d+)", (ROOT / name).read_text(encoding="utf-8")))
    assert cited and cited <= sections, (cited, sections)


if __name__ == "__main__":
    print(config_table())
