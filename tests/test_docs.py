"""The repository explains itself: the config table of docs/training.md is msd.Config's, nothing
in the code or the documents points outside the repository, and every link, anchor and section
that a document or the code cites exists. `python tests/test_docs.py` prints the config table to
paste into docs/training.md."""
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


def test_config_table_is_msd_config():
    training = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    table = config_table()
    assert len(table.splitlines()) > len(msd.Config.__dataclass_fields__)
    assert table in training, "docs/training.md's config table is out of date; paste:\n" + table


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
    for path in [ROOT / "msd.py", ROOT / "data.py", ROOT / "evaluate.py", *markdown_files()]:
        cited |= set(re.findall(r"method\.md,? §(\d+)", path.read_text(encoding="utf-8")))
        cited |= set(re.findall(r"method\.md §\d+[–-](\d+)", path.read_text(encoding="utf-8")))
    assert cited and cited <= sections, (cited, sections)


# -----------------------------------------------------------------------------------------------
# Links, anchors and sections cited by name
# -----------------------------------------------------------------------------------------------
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")              # [text](target) and ![alt](target)
HEADING = re.compile(r"^#{1,6} (.+?)\s*#*\s*$", re.M)
# `README, "Title"`, `README.md, "Title"`, `README ("Title")`, `[x.md](x.md#a), "Title"`
CITATION = re.compile(r'\b(README|[\w-]+\.md)(?:#[\w-]*)?\)?,?\s+\(?"([^"\n]+)"')


def markdown_files():
    """README.md and every docs/*.md: the documents whose links are checked."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def heading_text(heading):
    """A heading as GitHub renders it: links reduced to their text, no code or emphasis marks."""
    heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[`*]", "", heading).strip()


def anchors(path):
    """The #anchors GitHub gives the headings of a markdown file: lower-case, punctuation dropped,
    each space a '-', and -1, -2, ... after a repeated one."""
    seen, result = {}, set()
    for heading in HEADING.findall(path.read_text(encoding="utf-8")):
        slug = re.sub(r"[^\w\- ]", "", heading_text(heading).lower()).replace(" ", "-")
        result.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return result


def link_problems(path):
    """Each relative link of a markdown file whose file, or whose #anchor in it, does not exist."""
    text = re.sub(r"<!--.*?-->", "", path.read_text(encoding="utf-8"), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)                     # code spans are not links
    problems = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):                     # https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        where = f"{path.relative_to(ROOT)}: ({target})"
        if ROOT not in dest.parents and dest != ROOT:
            problems.append(f"{where} points outside the repository")
        elif not dest.exists():
            problems.append(f"{where}: no file {file}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def test_every_relative_link_and_anchor_exists():
    problems = [p for path in markdown_files() for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_link_check_finds_a_broken_file_and_a_broken_anchor(tmp_path, monkeypatch):
    """The checker itself: a missing file, a missing anchor, and the GitHub anchor rules."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    (tmp_path / "a.md").write_text("# What `prepare` does, per dataset\n## Step 1.\n## Step 1.\n"
                                   "[ok](#what-prepare-does-per-dataset) [ok](#step-1-1) "
                                   "[ok](a.md#step-1) [bad](#step-2) [bad](b.md) "
                                   "[ok](https://example.org/x.md#y) `[code](c.md)`\n", encoding="utf-8")
    problems = link_problems(tmp_path / "a.md")
    assert len(problems) == 2, problems
    assert "#step-2" in problems[0] and "no file b.md" in problems[1]


def cited_file(name):
    """The file a citation names: README (with or without .md), or a document in docs/."""
    if name in ("README", "README.md"):
        return ROOT / "README.md"
    return ROOT / "docs" / name if (ROOT / "docs" / name).exists() else ROOT / name


def test_sections_cited_by_name_exist():
    """`README, "Training on MIMIC-CXR"` in the code or a document names a heading of README.md;
    a moved section must take its citations with it."""
    problems = []
    for path in [ROOT / "msd.py", ROOT / "data.py", ROOT / "evaluate.py", *markdown_files()]:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name, title in CITATION.findall(line):
                target = cited_file(name)
                titles = {heading_text(h) for h in HEADING.findall(target.read_text(encoding="utf-8"))} \
                    if target.exists() else set()
                if title.replace("`", "") not in titles:
                    problems.append(f'{path.relative_to(ROOT)}:{i}: cites {name}, "{title}": '
                                    f"no such heading in {target.relative_to(ROOT)}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    print(config_table())
