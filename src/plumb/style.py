"""The one stylesheet of everything plumb shows as HTML: the report, the compare and
experiment pages, and the Jupyter views of a run, a Monitor and a Diagnosis. Every rule
is scoped under ``.plumb`` (a page's body, or the box a notebook output sits in), so a
notebook's own styles are left alone; it is inlined in each page and each notebook
output, which stay self-contained. Narrow screens (a 390 px phone): tables scroll inside
their box; figures keep a readable 760 px and scroll inside theirs."""

from __future__ import annotations

STYLE = """
.plumb { font: 14px/1.45 system-ui, sans-serif; color: #222; }
body.plumb { margin: 2em auto; max-width: 1150px; padding: 0 1em; }
.plumb h1 { font-size: 1.5em; margin: .3em 0; }
.plumb h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; font-size: 1.25em; }
.plumb table { border-collapse: collapse; margin: .5em 0; display: block; overflow-x: auto; max-width: 100%; }
.plumb table.fixed { display: table; table-layout: fixed; width: 100%; }
.plumb td, .plumb th { padding: .2em .6em; border-bottom: 1px solid #eee; text-align: right; vertical-align: middle; }
.plumb th { background: #f5f5f5; } .plumb td.l, .plumb th.l { text-align: left; }
.plumb td.top { vertical-align: top; }
.plumb code, .plumb .mono { font-family: ui-monospace, monospace; }
.plumb pre { white-space: pre-wrap; word-break: break-word; font-size: .85em; }
.plumb .grid { display: flex; flex-wrap: wrap; gap: 2em; }
.plumb figure { margin: 1em 0; } .plumb figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
.plumb figcaption { color: #555; font-size: .9em; }
.plumb .finding { border-left: 4px solid #999; padding: .3em .8em; margin: .5em 0; background: #fafafa; }
.plumb .error { border-color: #b00020; } .plumb .warning { border-color: #b26a00; }
.plumb .info { border-color: #2a6fb0; }
.plumb .sev { font-weight: bold; text-transform: uppercase; font-size: .8em; }
.plumb .fix { margin-top: .2em; } .plumb .fix code { background: #eef3e8; padding: 0 .3em; }
.plumb .muted { color: #666; } .plumb .nowrap { white-space: nowrap; }
.plumb .quick { border-left: 4px solid #b26a00; background: #fff8e8; padding: .4em .8em; }
.plumb .headline { font-size: 1.15em; padding: .5em .8em; border-radius: 4px; margin: .6em 0; }
.plumb .headline.bad { background: #fdecea; border-left: 5px solid #b00020; }
.plumb .headline.good { background: #e9f5ec; border-left: 5px solid #2e7d32; }
.plumb .headline.unknown { background: #f3f3f3; border-left: 5px solid #999; }
.plumb .essentials { color: #444; }
.plumb td.flag { background: #fde2dd; font-weight: bold; }
.plumb table.results th { vertical-align: bottom; }
@media (max-width: 600px) {
  body.plumb { margin: .6em auto; padding: 0 .6em; }
  .plumb { font-size: 15px; }
  .plumb .grid { gap: .8em; }
  /* a figure shrunk to a phone's width has unreadable legends: keep it at 760 px and
     let it scroll sideways inside its own box */
  .plumb figure { overflow-x: auto; }
  .plumb figure img { max-width: none; width: 760px; }
}
"""


def styled(inner: str) -> str:
    """``inner`` (trusted HTML) in a ``.plumb`` box with the stylesheet: a notebook
    output that looks like the report."""
    return f'<div class="plumb"><style>{STYLE}</style>{inner}</div>'
