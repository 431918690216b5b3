"""The scripts as lecture notes: one static two-column page per script, prose and equations on the left, the code
they annotate on the right, built from the files themselves (nothing is copied into a second source).

    pip install -r requirements-dev.txt && python tools/notes.py --out site      # then open site/index.html

How a script becomes a page. Its lines are cut into sections. Prose is what a reader of the file reads as prose:
the module docstring, every class and function docstring, and every block of whole-line comments; all other
lines are code, each shown once, in file order, to the right of the prose before it. A docstring's section starts
at its class or def line (and decorators), so that a method's paper sits beside its signature. A `# %% Title`
line (a jupytext cell, see below) starts a section headed by its title.

Prose is Markdown (CommonMark, raw HTML off, so `a < b` stays text). `$...$` is inline LaTeX and `$$...$$` display
LaTeX, converted to MathML at build time: browsers render MathML natively, so the pages need no script, no font
and no network. A formula that latex2mathml cannot convert stops the build with its file and line.

Anchors: every class and function (its name; methods as Class.method), every fewstep method by its --method name
(fewstep.html#shortcut) and every `# %%` cell (its title, lower-cased, dashes for spaces).

The same `# %%` lines make each script a notebook: `jupytext --to notebook fewstep.py`.

Dev-only (requirements-dev.txt): markdown-it-py, pygments, latex2mathml. No script imports this file.
"""
import argparse
import ast
import html
import io
import pathlib
import re
import sys
import tokenize

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = ("ddpm.py", "ddim.py", "sde_toy.py", "cfm_mnist.py", "fewstep.py", "fid.py", "unet.py")
CELL = re.compile(r"^\s*# %%(.*)$")  # a jupytext percent-format cell marker, with an optional title
DISPLAY_LINE = re.compile(r"^[ \t]*\$\$(.+?)\$\$[ \t]*$", re.M | re.S)  # a formula alone on its lines
DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.S)
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\s)([^$\n]+?)(?<!\s)\$")


class NotesError(Exception):
    """A script that cannot be turned into a page (bad LaTeX, duplicate anchor): printed in one line."""


# ---- reading a script: prose and code -------------------------------------------------------------------------------
def docstrings(tree):
    """{first line of a docstring: (its last line, the line its section starts at, its owner node)}."""
    found = {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            first = body[0].lineno
            head = first if isinstance(node, ast.Module) else min([node.lineno] + [d.lineno for d in
                                                                                node.decorator_list])
            found[first] = (body[0].end_lineno, head, node)
    return found


def comment_lines(source):
    """Line numbers that hold nothing but a comment (not a '#' inside a string)."""
    code_on = set()
    comments = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments.add(tok.start[0])
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER):
            code_on.update(range(tok.start[0], tok.end[0] + 1))
    return comments - code_on


def anchors_of(node, parents):
    """The anchors of a docstring's owner: its (qualified) name, and a fewstep method's `name = "..."` too."""
    if isinstance(node, ast.Module):
        return ["top"]
    qual = ".".join([p.name for p in parents] + [node.name])
    out = [qual]
    if isinstance(node, ast.ClassDef):
        for stmt in node.body:
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and getattr(stmt.targets[0], "id", "") == \
                    "name" and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                out.append(stmt.value.value)
    return out


def owners(tree):
    """{node: its enclosing classes and functions, outermost first}."""
    out = {}

    def visit(node, parents):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                out[child] = parents
                visit(child, parents + [child])
    visit(tree, [])
    return out


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def sections(source, name="script"):
    """The script as a list of sections {"prose": Markdown, "line": where the prose starts, "code": [(line number,
    text)], "anchors": [...], "title": str or None}, in file order."""
    lines = source.splitlines()
    tree = ast.parse(source)
    docs, comments, parents = docstrings(tree), comment_lines(source), owners(tree)
    out = [{"prose": [], "line": 1, "code": [], "anchors": [], "title": None}]
    n = 0
    while n < len(lines):
        number, text = n + 1, lines[n]
        if number in docs:
            end, head, node = docs[number]
            moved = [c for c in out[-1]["code"] if c[0] >= head]  # the def / class line(s) join their docstring
            out[-1]["code"] = [c for c in out[-1]["code"] if c[0] < head]
            prose = ast.get_docstring(node) or ""
            literal = ast.get_source_segment(source, node.body[0]) or ""
            if "$" in prose and re.search(r"\\[a-zA-Z]", literal) and not literal[:1] in "rR":
                raise NotesError(f"{name}:{number}: a docstring with LaTeX must be a raw string (r\"\"\"...), or "
                                 f"Python reads \\t, \\b, \\f in it as control characters")
            out.append({"prose": [prose], "line": number, "code": moved,
                        "anchors": anchors_of(node, parents.get(node, [])), "title": None})
            n = end
            continue
        if number in comments:
            cell = CELL.match(text)
            if cell or out[-1]["code"] and any(t.strip() for _, t in out[-1]["code"]):
                title = cell.group(1).strip(" -") if cell else None
                out.append({"prose": [], "line": number, "code": [], "anchors": [slug(title)] if title else [],
                            "title": title})
            if not cell:
                body = text.strip()[1:]
                if not re.fullmatch(r"\s*[-=]{3,}\s*", body):  # a ruler line is decoration, not prose
                    out[-1]["prose"].append(body[1:] if body.startswith(" ") else body)
        elif text.strip() or out[-1]["code"]:
            out[-1]["code"].append((number, text))
        n += 1
    for s in out:
        while s["code"] and not s["code"][-1][1].strip():
            s["code"].pop()
        s["prose"] = "\n".join(s["prose"]).strip()
    return [s for s in out if s["prose"] or s["code"] or s["title"]]


# ---- rendering: Markdown with MathML, highlighted code ---------------------------------------------------------------
def render_math(tex, display, where):
    """MathML of one formula. latex2mathml passes an unknown command through as text and does not count braces,
    so both are checked here: a formula on the page is either rendered or the build stops."""
    from latex2mathml.converter import convert
    tex = " ".join(tex.split())
    plain = re.sub(r"\\[{}]", "", tex)
    why = "unbalanced braces" if plain.count("{") != plain.count("}") else None
    try:
        out = convert(tex, display="block" if display else "inline")
    except Exception as e:  # latex2mathml raises several kinds; all mean the formula is wrong
        why = f"{type(e).__name__}: {e}"
    unknown = None if why else re.search(r">([^<]*\\[a-zA-Z]+)", out)
    if why or unknown:
        raise NotesError(f"{where}: cannot render the formula ${tex}$ ("
                         + (why or f"unknown command {unknown.group(1).strip()}") + ")")
    return out


def render_prose(text, where):
    """Markdown -> HTML with $...$ and $$...$$ as MathML. Formulas are swapped for placeholders first, so that
    Markdown does not read their underscores and asterisks as emphasis. A $$...$$ alone on its line is a display
    formula in a paragraph of its own, also where the docstring indents it (as plain text reads best)."""
    from markdown_it import MarkdownIt
    maths = []

    def keep(display):
        def swap(m):
            maths.append(render_math(m.group(1), display, where))
            return f"MATH{len(maths) - 1}HTAM"
        return swap
    text = DISPLAY_LINE.sub(lambda m: "\n" + keep(True)(m) + "\n", text)
    # An indented block right under a line of text (a docstring's "Papers" or "Usage" list) is preformatted: in
    # CommonMark it would continue the paragraph instead, and lose its lines.
    text = re.sub(r"^([^\s\n][^\n]*)\n(?=(?: {4}|\t)\S)", r"\1\n\n", text, flags=re.M)
    text = DISPLAY_MATH.sub(keep(True), text)
    text = INLINE_MATH.sub(keep(False), text)
    out = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
    return re.sub(r"MATH(\d+)HTAM", lambda m: maths[int(m.group(1))], out)


def highlight(code):
    from pygments import highlight as pyg
    from pygments.formatters import HtmlFormatter
    from pygments.lexers import PythonLexer
    return pyg(code, PythonLexer(stripnl=False, ensurenl=False), HtmlFormatter(nowrap=True))


CSS = """
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222; }
header { padding: 10px 24px; border-bottom: 1px solid #ddd; background: #fafafa; }
header a { color: #0366d6; text-decoration: none; }
.row { display: grid; grid-template-columns: minmax(0, 2fr) minmax(0, 3fr); border-bottom: 1px solid #f0f0f0; }
.prose { padding: 8px 24px; overflow-wrap: anywhere; }
.prose pre { background: #f6f6f6; padding: 6px 8px; overflow-x: auto; font-size: 13px; }
.prose h2 { font-size: 20px; margin: 12px 0 4px; }
.code { background: #fbfbfd; border-left: 1px solid #e8e8ee; padding: 8px 16px; overflow-x: auto; }
.code pre { margin: 0; font: 13px/1.45 Menlo, Consolas, "DejaVu Sans Mono", monospace; }
.anchor { visibility: hidden; color: #999; text-decoration: none; margin-left: 4px; }
.row:hover .anchor { visibility: visible; }
math[display="block"] { margin: 6px 0; overflow-x: auto; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; }
.prose td { overflow-wrap: normal; } .prose td:nth-child(-n+2) { white-space: nowrap; }
"""


def page(title, body):
    from pygments.formatters import HtmlFormatter
    style = HtmlFormatter().get_style_defs(".code pre")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<style>{CSS}{style}</style></head>\n<body><header><a href=\"index.html\">Notes</a> / "
            f"{html.escape(title)}</header>\n<main>\n{body}</main></body></html>\n")


def script_page(path):
    """The HTML page of one script, and its anchors."""
    source = pathlib.Path(path).read_text()
    rows, seen = [], set()
    for s in sections(source, pathlib.Path(path).name):
        where = f"{pathlib.Path(path).name}:{s['line']}"
        dup = seen & set(s["anchors"])
        if dup:
            raise NotesError(f"{where}: the anchor {sorted(dup)[0]!r} is used twice")
        seen.update(s["anchors"])
        ids = s["anchors"]
        prose = (f"<h2>{html.escape(s['title'])}</h2>" if s["title"] else "") + render_prose(s["prose"], where)
        if ids:
            prose = "".join(f'<span id="{html.escape(a)}"></span>' for a in ids[1:]) + prose + \
                f'<a class="anchor" href="#{html.escape(ids[0])}">&para; {html.escape(ids[0])}</a>'
        code = highlight("\n".join(t for _, t in s["code"])) if s["code"] else ""
        idattr = f' id="{html.escape(ids[0])}"' if ids else ""
        rows.append(f'<section class="row"{idattr}><div class="prose">{prose}</div>'
                    f'<div class="code"><pre>{code}</pre></div></section>\n')
    return page(pathlib.Path(path).name, "".join(rows)), seen


# ---- the index: the scripts and the methods --------------------------------------------------------------------------
def summary(path):
    """The first line of a script's module docstring."""
    doc = ast.get_docstring(ast.parse(pathlib.Path(path).read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def method_rows(path):
    """(name, class, paper line, first sentence) of every fewstep method, from the class docstrings."""
    tree = ast.parse(pathlib.Path(path).read_text())
    out = []
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            names = anchors_of(node, [])[1:]
            doc = ast.get_docstring(node) or ""
            if names and "Paper:" in doc:
                paper = " ".join(doc.split("Paper:", 1)[1].split("\n\n")[0].split())
                first = " ".join(doc.split("\n\n")[0].split()).split(". ")[0].rstrip(".") + "."
                out.append((names[0], node.name, paper, first))
    return out


def index_page(scripts):
    rows = "".join(f'<tr><td><a href="{pathlib.Path(s).stem}.html">{html.escape(pathlib.Path(s).name)}</a></td>'
                   f"<td>{html.escape(summary(s))}</td></tr>" for s in scripts)
    body = ('<div class="prose"><h2>Scripts</h2><p>Each page shows a script of the project as notes: prose and '
            "equations on the left, the code they describe on the right.</p>"
            f"<table><tr><th>script</th><th>what it is</th></tr>{rows}</table>")
    few = [s for s in scripts if pathlib.Path(s).name == "fewstep.py"]
    if few:
        rows = "".join(f'<tr><td><a href="fewstep.html#{html.escape(n)}">{html.escape(n)}</a></td>'
                       f"<td>{html.escape(c)}</td><td>{html.escape(p)}</td><td>{html.escape(d)}</td></tr>"
                       for n, c, p, d in method_rows(few[0]))
        body += ("<h2>Few-step methods (fewstep.py)</h2>"
                 f"<table><tr><th>method</th><th>class</th><th>paper</th><th>what it learns</th></tr>{rows}</table>")
    return page("index", body + "</div>\n")


def build(out, scripts=None):
    """Write OUT/index.html and one page per script; returns {script name: its anchors}."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scripts = [ROOT / s for s in SCRIPTS] if scripts is None else [pathlib.Path(s) for s in scripts]
    anchors = {}
    for s in scripts:
        text, anchors[s.name] = script_page(s)
        (out / f"{s.stem}.html").write_text(text)
    (out / "index.html").write_text(index_page(scripts))
    return anchors


def screenshot(site, target, png, width=1600, height=1000, chromium="chromium"):
    """PAGE.html#ANCHOR as headless Chromium draws it, into png, scrolled to that section. (Chromium's headless
    --screenshot draws nothing when the URL has a fragment, so a copy of the page hides the rows above the anchor's
    section instead of scrolling; the copy is deleted.)"""
    import subprocess
    page, _, anchor = target.partition("#")
    text = (pathlib.Path(site) / page).read_text()
    if anchor:
        sel = f'.row:is(#{anchor}, :has(#{anchor}))'
        hide = f".row {{ display: none; }} {sel}, {sel} ~ .row {{ display: grid; }}"
        text = text.replace("</style>", hide + "</style>", 1)
    tmp = pathlib.Path(site) / f".shot-{page}"
    tmp.write_text(text)
    try:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={pathlib.Path(png).resolve()}",
                        tmp.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    finally:
        tmp.unlink()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="site", help="the folder to write (default: site)")
    p.add_argument("--screenshot", nargs=2, action="append", default=[], metavar=("PAGE#ANCHOR", "PNG"),
                   help="after building, draw that section with headless Chromium into PNG (repeatable)")
    p.add_argument("scripts", nargs="*", help="scripts to build (default: the seven of the project)")
    args = p.parse_args(argv)
    try:
        anchors = build(args.out, args.scripts or None)
        for target, png in args.screenshot:
            screenshot(args.out, target, png)
    except NotesError as e:
        print(f"notes.py: error: {e}", file=sys.stderr)
        raise SystemExit(2)
    except ModuleNotFoundError as e:
        print(f"notes.py: error: {e.name} is missing; pip install -r requirements-dev.txt", file=sys.stderr)
        raise SystemExit(2)
    except (FileNotFoundError, OSError) as e:
        if args.screenshot:
            print(f"notes.py: error: --screenshot needs Chromium ({e}); install it (apt install chromium)",
                  file=sys.stderr)
            raise SystemExit(2)
        raise
    print(f"notes.py: {len(anchors)} pages and index.html in {args.out}/")


if __name__ == "__main__":
    main()
