"""Tests for tools/notes.py (the scripts as two-column pages) and for the scripts as jupytext notebooks.

What a reader depends on, checked on a site built into a temporary folder: every fewstep method has its anchor;
every code line of every script is on its page exactly once and in order (the expected lines are found here with
tokenize and ast, not with the builder's own functions); no link leaves the folder or points at a missing anchor;
no formula is left unrendered. The notebook form: fewstep.py read by jupytext runs, cell by cell, up to its
METHODS table.
"""
import ast
import html.parser
import importlib.util
import io
import pathlib
import re
import tokenize

import pytest

import fewstep

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytest.importorskip("markdown_it")
pytest.importorskip("latex2mathml")
pytest.importorskip("pygments")


def load_notes():
    spec = importlib.util.spec_from_file_location("notes", ROOT / "tools" / "notes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Page(html.parser.HTMLParser):
    """Collects the ids, the links, the text of the code column and the prose text outside <math>."""

    def __init__(self):
        super().__init__()
        self.ids, self.links, self.code, self.prose, self.maths, self.math_text = set(), [], [], [], 0, []
        self.stack = []  # (tag, class) of open elements

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("href", "src"):
            if key in a:
                self.links.append(a[key])
        self.maths += tag == "math"
        self.stack.append((tag, a.get("class")))

    def handle_endtag(self, tag):
        while self.stack and self.stack.pop()[0] != tag:
            pass

    def handle_data(self, data):
        classes = [c for _, c in self.stack]
        if "code" in classes:
            self.code.append(data)
        elif any(t == "math" for t, _ in self.stack):
            self.math_text.append(data)
        elif "prose" in classes:
            self.prose.append(data)


def parse(path):
    page = Page()
    page.feed(path.read_text())
    return page


def expected_code_lines(path):
    """The script's non-blank lines that are neither docstring lines nor whole-line comments."""
    source = path.read_text()
    lines = source.splitlines()
    skip = set()
    for node in ast.walk(ast.parse(source)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str) and \
                isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))
    inside_string = set()  # lines after the first of a multi-line string: a '#' there is text, not a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.STRING:
            inside_string.update(range(tok.start[0] + 1, tok.end[0] + 1))
    return [line for n, line in enumerate(lines, 1) if line.strip() and n not in skip
            and not (line.lstrip().startswith("#") and n not in inside_string)]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    load_notes().build(out)
    return out


def test_every_code_line_is_on_its_page_once_in_order(site):
    notes = load_notes()
    for script in notes.SCRIPTS:
        page = parse(site / script.replace(".py", ".html"))
        shown = [line for line in "".join(page.code).splitlines() if line.strip()]
        assert shown == expected_code_lines(ROOT / script), script


def test_every_method_has_its_anchor_and_links_stay_in_the_folder(site):
    pages = {p.name: parse(p) for p in site.glob("*.html")}
    assert set(pages) == {"index.html"} | {s.replace(".py", ".html") for s in load_notes().SCRIPTS}
    assert set(fewstep.METHODS) <= pages["fewstep.html"].ids
    assert {"RectifiedFlow", "Shortcut.step", "try-it-a-minute-of-rf-on-mnist5k"} <= pages["fewstep.html"].ids
    for name, page in pages.items():
        for link in page.links:
            target, _, anchor = link.partition("#")
            assert "//" not in target and ":" not in target and not target.startswith(("/", "..")), (name, link)
            assert (target or name) in pages, (name, link)
            assert not anchor or anchor in pages[target or name].ids, (name, link)
    index = pages["index.html"]
    assert {f"fewstep.html#{m}" for m in fewstep.METHODS} <= set(index.links)


def test_no_formula_is_left_unrendered(site):
    for page in site.glob("*.html"):
        p = parse(page)
        prose = "".join(p.prose)
        assert "$" not in prose, (page.name, prose[max(0, prose.find("$") - 80):prose.find("$") + 80])
        commands = re.findall(r"\\[a-zA-Z]+", prose + "".join(p.math_text))  # raw TeX, or a command MathML lacks
        assert not commands, (page.name, commands[:5])
    assert parse(site / "ddpm.html").maths >= 10 and parse(site / "fewstep.html").maths >= 10


def test_a_formula_becomes_mathml_and_a_broken_one_names_its_line(tmp_path):
    notes = load_notes()
    good = tmp_path / "good.py"
    good.write_text('r"""Notes: $x_t = \\sqrt{\\bar\\alpha_t} x_0$ and\n\n$$ \\frac{a}{b} $$\n"""\nX = 1  # $kept$\n')
    text, _ = notes.script_page(good)
    assert text.count("<math") == 2 and "<msqrt>" in text and "<mfrac>" in text
    assert "$kept$" in text  # a comment after code is code: shown as written
    bad = tmp_path / "bad.py"
    for formula, why in ((r"\frac{a}{b", "unbalanced braces"), (r"\hat{x}^", "Missing"),
                         (r"\notacommand x", r"unknown command \\notacommand")):
        bad.write_text(f'X = 1\n\n\n# the formula ${formula}$ is broken\nY = 2\n')
        with pytest.raises(notes.NotesError, match=rf"bad.py:4: cannot render the formula .*{why}"):
            notes.script_page(bad)
    cooked = tmp_path / "cooked.py"  # not a raw string: Python would read \t of \tilde as a tab
    cooked.write_text('X = 1\n\n\ndef f():\n    """$\\tilde x$"""\n')
    with pytest.raises(notes.NotesError, match=r"cooked.py:5: a docstring with LaTeX must be a raw string"):
        notes.script_page(cooked)


def test_fewstep_as_a_notebook_runs_up_to_its_methods():
    """jupytext reads the percent-format cells (one per `# %%` section); executing them in order defines every
    method. The last cell, the one-minute training, is not run here."""
    jupytext = pytest.importorskip("jupytext")
    nb = jupytext.read(ROOT / "fewstep.py")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert len(code) >= 12
    titles = [c.metadata.get("title", "") for c in code]
    assert any(t.startswith("shortcut: shortcut models") for t in titles), titles
    namespace = {"__name__": "fewstep_notebook"}
    for cell in code:
        exec(compile(cell.source, "fewstep_notebook", "exec"), namespace)
        if "METHODS" in namespace:
            break
    assert set(namespace["METHODS"]) == set(fewstep.METHODS)
    method = namespace["METHODS"]["shortcut"]()
    assert method.name == "shortcut" and method.loss.__doc__ == fewstep.Shortcut().loss.__doc__
