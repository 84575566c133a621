"""One self-contained page per run, or for several runs together: every metric against step and wall
time, the timeline of checkpoints, restarts and rollbacks with goodput, sample grids over training,
FID, the config, and a curation's funnel, score histograms and rejected examples.

The page embeds its data, uPlot (the chart library, installed from npm at set-up) and its own script,
so it opens offline from the file alone.
"""

from __future__ import annotations

import datetime
import html
import json
from pathlib import Path

from genfoundry.report.data import ReportError, chart_specs, read_curation, read_run

__all__ = ["ReportError", "build_report"]


def build_report(run_dirs: list[str | Path] | str | Path, out: str | Path | None = None,
                 curation: str | Path | None = None) -> Path:
    """Writes the report of `run_dirs` (default RUN/report.html for one run, ./report.html for several)
    and returns its path. `curation` adds a curation output folder's funnel, histograms and examples."""
    from genfoundry.checkpoint.storage import write_atomic
    from genfoundry.report.assets import uplot

    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not run_dirs and curation is None:
        raise ReportError("a report needs at least one run directory or a curation folder")
    names = _names(run_dirs)
    runs = [read_run(d, n) for d, n in zip(run_dirs, names)]
    cur = read_curation(curation) if curation is not None else None
    metric_names = {c for run in runs for c in run["columns"][2:]}
    # A metric constant within every run that logs it, at one value, goes in a table, not a chart.
    constant = {n for n in metric_names
                if len({run["constant"].get(n, "varies") for run in runs if n in run["columns"]}) == 1
                and all(n in run["constant"] for run in runs if n in run["columns"])}
    payload = {"generated": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "runs": runs, "charts": chart_specs(metric_names - constant), "curation": cur,
               "constant": sorted(constant)}
    if out is None:
        out = Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html")
    js, css = uplot()
    here = Path(__file__).parent
    page = _page(payload, js, css, (here / "page.js").read_text(), (here / "page.css").read_text())
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, page.encode())
    except OSError as e:
        raise ReportError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def _names(run_dirs: list) -> list[str]:
    """Each run's folder name; where two share one, their parent's name too."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [f"{Path(d).resolve().parent.name}/{n}" if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def _page(payload: dict, uplot_js: str, uplot_css: str, script: str, style: str) -> str:
    runs, cur = payload["runs"], payload["curation"]
    title = ", ".join(r["name"] for r in runs) or "curation"
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=_json_default).replace("<", "\\u003c")
    nav = [("timeline", "Timeline"), ("section-loss", "Loss"), ("evaluation", "FID"), ("samples", "Samples"),
           ("config", "Config")] + ([("curation", "Curation")] if cur else [])
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>genfoundry report: {html.escape(title)}</title>",
        f"<style>{uplot_css}</style><style>{style}</style></head><body>",
        f"<header><h1>genfoundry report: {html.escape(title)}</h1><div class=meta>generated {payload['generated']}"
        f" from {', '.join(html.escape(r['path']) for r in runs) or html.escape(cur['path'])}</div>",
        _cards(runs), "</header>",
        "<nav>" + "".join(f"<a href='#{i}'>{t}</a>" for i, t in nav) +
        "<span class=controls><span>x axis <label><input type=radio name=xaxis value=step checked> step</label> "
        "<label><input type=radio name=xaxis value=time> wall time</label></span>"
        "<label>smoothing <input id=smoothing type=range min=0 max=0.99 step=0.01 value=0.6> "
        "<span id=smoothing-value>0.60</span></label><button id=reset-zoom title='or double-click a chart'>reset zoom"
        "</button></span></nav>",
        "<main><p class=note>Drag across a chart to zoom (every chart follows); double-click to zoom out. Faint lines "
        "are the logged values, solid ones smoothed; dashed lines are the lowest and highest rank; dashed verticals "
        "mark restarts (red) and rollbacks (orange).</p>",
        _goodput(runs), "<div id=charts></div>", _constants(runs, payload["constant"]),
        _samples(runs), _config(runs), _curation(cur) if cur else "", "</main>",
        f"<script type=application/json id=report-data>{data}</script>",
        f"<script>{uplot_js}</script><script>{script}</script></body></html>",
    ]
    return "\n".join(parts)


def _json_default(value):
    raise TypeError(f"{type(value).__name__} is not JSON")


def _fmt(value, spec: str = ".4g") -> str:
    return "–" if value is None else format(value, spec)


def _cards(runs: list[dict]) -> str:
    out = ["<div class=cards>"]
    for run in runs:
        last, g = run["last"], run["goodput"]
        fid = run["fid"][-1]["fid"] if run["fid"] else None
        for key, value in (("step", _fmt(last.get("step"), "d")), ("loss", _fmt(last.get("loss"))),
                           ("best val loss", _fmt(run["best_val_loss"])), ("FID", _fmt(fid, ".2f")),
                           ("images/s", _fmt(last.get("images_per_s"), ".0f")),
                           ("goodput", _fmt(g["goodput"], ".1%")),
                           ("restarts", str(sum(e["event"] == "resume" for e in run["events"]))),
                           ("rollbacks", str(sum(e["event"] == "rollback" for e in run["events"])))):
            out.append(f"<div class=card><div class=k>{key}</div><div class=v>{value}</div>"
                       f"<div class=run>{html.escape(run['name'])}</div></div>")
    out.append("</div>")
    return "".join(out)


def _goodput(runs: list[dict]) -> str:
    rows = []
    for run in runs:
        g = run["goodput"]
        rows.append(f"<tr><td>{html.escape(run['name'])}</td><td>{_seconds(g['wall_s'])}</td>"
                    f"<td>{_seconds(g['training_s'])}</td><td>{_seconds(g['redone_s'])}</td>"
                    f"<td>{_seconds(g['down_s'])}</td><td>{_seconds(g['other_s'])}</td>"
                    f"<td><b>{_fmt(g['goodput'], '.1%')}</b></td></tr>")
    return ("<div id=goodput class=panel><h3>goodput: the share of wall time spent on training steps the final "
            "weights keep</h3><table class=plain><tr><th>run</th><th>wall</th><th>kept training</th>"
            "<th>redone after restart/rollback</th><th>down between attempts</th>"
            "<th>other (start-up, validation, samples, saves)</th><th>goodput</th></tr>"
            + "".join(rows) + "</table></div>")


def _constants(runs: list[dict], names: list[str]) -> str:
    if not names:
        return ""
    rows = "".join(f"<tr><td>{html.escape(n)}</td><td>{_fmt(next(r['constant'][n] for r in runs if n in r['constant']))}"
                   f"</td></tr>" for n in names)
    return (f"<section id=constants><h2>Metrics that did not change</h2><div class=panel><table class=plain>"
            f"<tr><th>metric</th><th>value at every logged step</th></tr>{rows}</table></div></section>")


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.2f} h"


def _samples(runs: list[dict]) -> str:
    out = ["<section id=samples><h2>Samples over training</h2><div class=grid>"]
    for i, run in enumerate(runs):
        grids = run["samples"]["grids"]
        if not grids:
            out.append(f"<div class=panel><h3>{html.escape(run['name'])}</h3><p class=note>no sample grids yet "
                       f"(train.sample_every writes them)</p></div>")
            continue
        note = (f" ({len(grids)} of {run['samples']['total']}, evenly spaced)"
                if run["samples"]["total"] > len(grids) else "")
        out.append(f"<div class='panel samples'><h3>{html.escape(run['name'])}: <span id=sample-label-{i}></span>"
                   f"{note}</h3><input class=samples type=range min=0 max={len(grids) - 1} value={len(grids) - 1} "
                   f"data-run={i} data-img=sample-img-{i} data-label=sample-label-{i}>"
                   f"<div><img id=sample-img-{i} alt='sample grid'></div></div>")
    out.append("</div></section>")
    return "".join(out)


def _config(runs: list[dict]) -> str:
    blocks = "".join(f"<div class=panel><h3>{html.escape(r['name'])}: config.toml</h3>"
                     f"<pre>{html.escape(r['config'] or '(no config.toml)')}</pre></div>" for r in runs)
    return f"<section id=config><h2>Resolved config</h2><div class=grid>{blocks}</div></section>"


def _curation(cur: dict) -> str:
    s = cur["summary"]
    reasons = "".join(f"<tr><td>{html.escape(r)}</td><td>{n}</td></tr>" for r, n in s.get("reasons", {}).items())
    q = s.get("quality", {})
    fd = (f"<p>Fréchet distance to the reference: kept {q['fd_kept']:.2f}, a random subset of the same size "
          f"{q['fd_random']:.2f}.</p>" if q.get("fd_kept") is not None else "")
    examples = []
    for reason, entries in cur["examples"].items():
        figures = []
        for e in entries:
            picture = f"<img src='{e['src']}' alt=thumbnail>" if e["src"] else ""
            message = html.escape(e.get("message") or "", quote=True)
            figures.append(f"<figure>{picture}<figcaption title='{message}'>"
                           f"{html.escape(Path(e.get('source') or '').name)}</figcaption></figure>")
        examples.append(f"<div class=panel><h3>{html.escape(reason)}</h3><div class=thumbs>{''.join(figures)}"
                        f"</div></div>")
    return (f"<section id=curation><h2>Curation: {html.escape(cur['path'])}</h2><div class=grid>"
            f"<div class='panel funnel'><h3>kept {s['num_kept']} of {s['num_inputs']} inputs (utilization "
            f"{s['utilization']:.1%} of {s['num_readable']} readable)</h3>{cur['funnel_svg']}{fd}</div>"
            f"<div class=panel><h3>dropped, by reason</h3><table class=plain><tr><th>reason</th><th>inputs</th></tr>"
            f"{reasons}</table></div></div><h2>Scores, with the thresholds</h2><div class=grid id=histograms></div>"
            f"<h2>Dropped examples, by reason</h2><div class=grid>{''.join(examples)}</div></section>")
