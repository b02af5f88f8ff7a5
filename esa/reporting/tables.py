"""Tables of the report, rendered as Markdown, HTML and LaTeX (booktabs) from one description."""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field


@dataclass
class Table:
    key: str  # LaTeX label and file-safe name
    title: str
    header: list[str]
    rows: list[list[str]]
    note: str = ""
    status_column: int | None = None  # index of a met / not met column (coloured in HTML)
    align: list[str] = field(default_factory=list)  # "l" or "r" per column; default: first left, rest right

    def alignment(self) -> list[str]:
        return self.align or ["l"] + ["r"] * (len(self.header) - 1)


def fmt(x, digits: int = 4) -> str:
    """A number for a table: 4 significant digits, trailing zeros kept (``30.00`` beside ``71.11``, so a column
    reads at one precision); p-values and tiny numbers in scientific notation; integers exact."""
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if math.isnan(x):
            return "n/a"
        if math.isinf(x):
            return "∞" if x > 0 else "−∞"
        if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e6):
            return f"{x:.{digits - 1}e}"
        return f"{x:#.{digits}g}".removesuffix(".")  # "#" keeps trailing zeros; 2042.4 → "2042", not "2042."
    return str(x)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(t: Table) -> str:
    align = {"l": ":--", "r": "--:"}
    lines = [f"**{t.title}**", "", "| " + " | ".join(map(_md_cell, t.header)) + " |",
             "|" + "|".join(align[a] for a in t.alignment()) + "|"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
    if t.note:
        lines += ["", f"*{t.note}*"]
    return "\n".join(lines) + "\n"


def to_html(t: Table) -> str:
    align = t.alignment()
    head = "".join(f'<th class="{a}">{html.escape(h)}</th>' for h, a in zip(t.header, align))
    body = []
    for row in t.rows:
        cells = []
        for i, (c, a) in enumerate(zip(row, align)):
            cls = a + (f" status-{c.replace(' ', '-')}" if i == t.status_column else "")
            cells.append(f'<td class="{cls}">{html.escape(c)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return (f'<table id="{t.key}"><caption>{html.escape(t.title)}</caption><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>{note}\n')


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                  "|": r"\textbar{}"}
_LATEX_UNICODE = {"Δ": r"$\Delta$", "≥": r"$\geq$", "≤": r"$\leq$", "α": r"$\alpha$", "ρ": r"$\rho$", "∞": r"$\infty$",
                  "−": "-", "—": "--", "×": r"$\times$", "±": r"$\pm$", "–": "--", "·": r"$\cdot$",
                  "<": r"$<$", ">": r"$>$"}  # bare < and > print as ¡ and ¿ in LaTeX's default font encoding


def latex_escape(text: str) -> str:
    out = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)
    for uni, tex in _LATEX_UNICODE.items():
        out = out.replace(uni, tex)
    return out


def to_latex(t: Table) -> str:
    """A booktabs ``table``; wider than the text, it is scaled down to the line width (graphicx)."""
    shrink_if_wide = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
    lines = [r"\begin{table}[ht]", r"\centering", rf"\caption{{{latex_escape(t.title)}}}",
             rf"\label{{tab:{t.key}}}", shrink_if_wide,
             r"\begin{tabular}{" + "".join(t.alignment()) + "}", r"\toprule",
             " & ".join(latex_escape(h) for h in t.header) + r" \\", r"\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + r" \\" for row in t.rows]
    lines += [r"\bottomrule", r"\end{tabular}}"]
    if t.note:
        lines.append(rf"\par\smallskip{{\footnotesize {latex_escape(t.note)}}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"
