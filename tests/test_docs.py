"""The reference pages agree with the code: every flag of every command is in its page's flags table, every flag
a page's table lists exists, and every link of the README and the pages points at a file that exists.

A flags table is a Markdown table whose first header cell is `flag`; the flags it lists are the `--names` in
backticks in its first column. Each command's parser comes from the command's own parse_args(), so a flag added
to a command without a line in its page fails here.
"""
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
# command module -> its page
PAGE_OF = {"train_pytorch": "train.md", "predict": "predict.md", "evaluate": "evaluate.md", "export": "export.md",
           "benchmark": "benchmark.md", "app": "app.md", "tune": "tune.md", "demo": "demo.md",
           "evaluate_numbers": "numbers.md", "number_reader": "numbers.md"}
# page -> the commands whose flags its tables may list (numbers.md documents predict.py --number too)
COVERS = {page: [module] for module, page in PAGE_OF.items()}
COVERS["numbers.md"] = ["evaluate_numbers", "predict", "number_reader"]


def parser_of(module_name):
    """The command's argparse parser, from its parse_args() (demo's also parses: it is given no arguments)."""
    parse_args = importlib.import_module(module_name).parse_args
    result = parse_args([]) if "argv" in inspect.signature(parse_args).parameters else parse_args()
    return result[0] if isinstance(result, tuple) else result


def options(parser):
    """[(first spelling, every spelling)] of each flag but --help."""
    return [(action.option_strings[0], set(action.option_strings)) for action in parser._actions
            if action.option_strings and action.dest != "help"]


def flags_tables(text):
    """Every flag listed in the first column of the page's flags tables."""
    flags, in_table = set(), False
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else None
        if cells is None:
            in_table = False
        elif cells[0] == "flag":
            in_table = True
        elif in_table and not set(cells[0]) <= set("-: "):
            flags.update(re.findall(r"--[A-Za-z][\w-]*", " ".join(re.findall(r"`([^`]*)`", cells[0]))))
    return flags


def test_flags_tables_are_read():
    table = "| flag | default |\n|---|---|\n| `--a_b` / `--no-a_b` | 1 |\n| `--c`, `--c-d` | x `--not_me` |\n\ntext `--e`"
    assert flags_tables(table) == {"--a_b", "--no-a_b", "--c", "--c-d"}


@pytest.mark.parametrize("module_name", sorted(PAGE_OF))
def test_every_flag_of_a_command_is_in_its_page(module_name):
    page = DOCS / PAGE_OF[module_name]
    listed = flags_tables(page.read_text())
    missing = [first for first, _ in options(parser_of(module_name)) if first not in listed]
    assert not missing, f"{page.name} has no line in a flags table for {missing} of {module_name}.py"


@pytest.mark.parametrize("page_name", sorted(COVERS))
def test_every_flag_a_page_lists_exists(page_name):
    known = set().union(*(spellings for module in COVERS[page_name] for _, spellings in options(parser_of(module))))
    stale = sorted(flags_tables((DOCS / page_name).read_text()) - known)
    assert not stale, f"{page_name} lists flags that {', '.join(COVERS[page_name])} do not have: {stale}"


def links(path):
    """The relative links of a Markdown file: (target file, as written); web links and #anchors left out."""
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        found.append(((path.parent / target.split("#")[0]).resolve(), target))
    return found


@pytest.mark.parametrize("path", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_point_at_files_that_exist(path):
    broken = [target for file, target in links(path) if not file.exists()]
    assert not broken, f"{path.name} links to missing files: {broken}"


def test_the_readme_links_every_page_of_docs():
    linked = {file for file, _ in links(README)}
    pages = set(DOCS.glob("*.md"))
    assert pages and pages <= linked, f"README.md does not link {sorted(p.name for p in pages - linked)}"


@pytest.mark.parametrize("module_name", sorted(PAGE_OF))
def test_help_shows_each_default_once(module_name):
    """A flag's help says its default once, and never "(default: None)": the help says what happens without it."""
    text = parser_of(module_name).format_help()
    blocks = re.split(r"\n  (?=-)", text)  # one block per flag
    assert "(default: None)" not in " ".join(text.split())
    twice = [block.split()[0] for block in blocks if " ".join(block.split()).count("(default") > 1]
    assert not twice, f"{module_name}.py --help states the default twice for {twice}"
