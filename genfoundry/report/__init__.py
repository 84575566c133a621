"""One self-contained page per run, or for several runs together: every metric against step and wall
time, the timeline of checkpoints, restarts and rollbacks with goodput, sample grids over training,
FID, the config, a curation's funnel, score histograms and rejected examples, and a hyper-parameter
study's trials (`genfoundry tune`).

The page embeds its data, uPlot (the chart library, installed from npm at set-up) and its own script,
so it opens offline from the file alone.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import urllib.parse
from pathlib import Path

from genfoundry.report.data import ReportError, chart_specs, is_study, read_curation, read_run, read_study

__all__ = ["ReportError", "build_report"]


def build_report(run_dirs: list[str | Path] | str | Path, out: str | Path | None = None,
                 curation: str | Path | None = None) -> Path:
    """Writes the report of `run_dirs` (default RUN/report.html for one run, ./report.html for several)
    and returns its path. `curation` adds a curation output folder's funnel, histograms and examples.

    A directory holding a study's trials.json (`genfoundry tune`) adds the table of its trials, and the
    runs of its best completed trials (up to `data.STUDY_RUNS`) join the charts; given alone, its page
    is STUDY/report.html."""
    from genfoundry.checkpoint.storage import write_atomic
    from genfoundry.report.assets import uplot

    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    if not run_dirs and curation is None:
        raise ReportError("a report needs at least one run directory or a curation folder")
    studies = [d for d in run_dirs if is_study(d)]
    if len(studies) > 1:
        raise ReportError(f"a page shows one study; {', '.join(map(str, studies))} are {len(studies)} (give one, "
                          f"and any other runs)")
    study = read_study(studies[0]) if studies else None
    given = [d for d in run_dirs if not is_study(d)]
    if study and not given and out is None:
        out = Path(studies[0]) / "report.html"
    run_dirs = (study["runs"] if study else []) + given
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
               "constant": sorted(constant),
               "study": {k: study[k] for k in ("name", "metric", "search", "best")} if study else None}
    if out is None:
        out = Path(run_dirs[0]) / "report.html" if len(run_dirs) == 1 else Path("report.html")
    out = Path(out)
    js, css = uplot()
    here = Path(__file__).parent
    page = _page(payload, js, css, (here / "page.js").read_text(), (here / "page.css").read_text(), study, out)
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


def _page(payload: dict, uplot_js: str, uplot_css: str, script: str, style: str, study: dict | None = None,
          out: Path | None = None) -> str:
    runs, cur = payload["runs"], payload["curation"]
    title = f"study {study['name']}" if study else ", ".join(r["name"] for r in runs) or "curation"
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False, default=_json_default).replace("<", "\\u003c")
    nav = ([("trials", "Trials")] if study else []) + [
        ("timeline", "Timeline"), ("section-loss", "Loss"), ("evaluation", "FID"), ("samples", "Samples"),
        ("config", "Config")] + ([("curation", "Curation")] if cur else [])
    sources = [study["path"]] if study else [r["path"] for r in runs] or [cur["path"]]
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=viewport content='width=device-width, initial-scale=1'><title>genfoundry report: {html.escape(title)}</title>",
        f"<style>{uplot_css}</style><style>{style}</style></head><body>",
        f"<header><h1>genfoundry report: {html.escape(title)}</h1><div class=meta>generated {payload['generated']}"
        f" from {', '.join(html.escape(p) for p in sources)}</div>",
        _study_cards(study) if study else _cards(runs), "</header>",
        "<nav>" + "".join(f"<a href='#{i}'>{t}</a>" for i, t in nav) +
        "<span class=controls><span>x axis <label><input type=radio name=xaxis value=step checked> step</label> "
        "<label><input type=radio name=xaxis value=time> wall time</label></span>"
        "<label>smoothing <input id=smoothing type=range min=0 max=0.99 step=0.01 value=0.6> "
        "<span id=smoothing-value>0.60</span></label><button id=reset-zoom title='or double-click a chart'>reset zoom"
        "</button></span></nav>",
        "<main><p class=note>Drag across a chart to zoom (every chart follows); double-click to zoom out. Faint lines "
        "are the logged values, solid ones smoothed; dashed lines are the lowest and highest rank; dashed verticals "
        "mark restarts (red) and rollbacks (orange).</p>",
        _trials(study, out or Path("report.html")) if study else "",
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


# ---- a study's trials ------------------------------------------------------------------------------

METRIC_NOTES = {"val_loss": "the lower of the raw and EMA weights' final validation losses",
                "val_loss_ema": "the EMA weights' final validation loss", "fid": "FID of the finished trial"}


def _study_cards(study: dict) -> str:
    counts, best = study["counts"], _best_trial(study)
    figures = [("trials", f"{counts.get('COMPLETE', 0) + counts.get('PRUNED', 0)} of {study['wanted'] or '?'}"),
               ("complete", str(counts.get("COMPLETE", 0))), ("pruned", str(counts.get("PRUNED", 0))),
               ("failed", str(counts.get("FAIL", 0))), ("running", str(counts.get("RUNNING", 0))),
               (f"best {study['metric']}", _fmt(best and best.get("value"), ".5g")),
               ("best trial", "–" if best is None else str(best["number"]))]
    return "<div class=cards>" + "".join(
        f"<div class=card><div class=k>{html.escape(k)}</div><div class=v>{html.escape(v)}</div>"
        f"<div class=run>{html.escape(study['name'])}</div></div>" for k, v in figures) + "</div>"


def _best_trial(study: dict) -> dict | None:
    return next((t for t in study["trials"] if t["number"] == study["best"]), None)


def _trials(study: dict, out: Path) -> str:
    """The trials table: number, state, score, every searched value, duration and a link to the run; the
    best trial's row marked. Each header sorts the table (page.js)."""
    keys, metric = study["search"], study["metric"]
    head = [("trial", "num"), ("state", "text"), (metric, "num")] + [(k, "auto") for k in keys] + [
        ("duration", "num"), ("run", "text")]
    rows = []
    for t in sorted(study["trials"], key=lambda t: t["number"]):
        state = t["state"].lower()
        shown = state
        if t["state"] == "PRUNED" and t.get("pruned_at_step") is not None:
            shown = f"pruned at step {t['pruned_at_step']}"
        if t.get("retry_of") is not None:
            shown += f" (again for trial {t['retry_of']})"
        best = t["number"] == study["best"]
        title = html.escape(t.get("error") or "", quote=True)
        cells = [(str(t["number"]) + (" ★" if best else ""), t["number"]),
                 (f"<span class='state {state}' title='{title}'>{html.escape(shown)}</span>", state),
                 (_fmt(t.get("value"), ".5g"), t.get("value"))]
        params = t.get("params") or {}
        for k in keys:
            v = params.get(k)
            cells.append(("–" if v is None else html.escape(_param(v)), v))
        duration = t.get("duration_s")
        cells.append(("–" if duration is None else _seconds(duration), duration))
        cells.append((_run_link(t, out), t.get("run") or ""))
        tds = "".join(f"<td data-v='{html.escape(_sort_key(v), quote=True)}'>{text}</td>" for text, v in cells)
        rows.append(f"<tr class='{'best ' if best else ''}{state}' data-trial={t['number']}>{tds}</tr>")
    ths = "".join(f"<th data-type={kind} title='sort'>{html.escape(name)}</th>" for name, kind in head)
    c = study["counts"]
    shown_runs = len(study["runs"])
    charts = (f"The charts below draw the runs of the {shown_runs} best completed trials"
              + (f" (of {study['completed']})" if study["completed"] > shown_runs else "") + "."
              if shown_runs else "No trial has completed yet, so there are no runs to draw.")
    best = _best_trial(study)
    best_line = ("" if best is None else
                 f" Best: trial {best['number']}, {html.escape(metric)} {_fmt(best.get('value'), '.5g')}"
                 f" ({html.escape('  '.join(f'{k}={_param(v)}' for k, v in (best.get('params') or {}).items()))}).")
    space = ", ".join(f"{html.escape(k)}={html.escape(str(v))}" for k, v in study["spaces"].items())
    return (f"<section id=trials><h2>Trials of study {html.escape(study['name'])}</h2><div class=panel>"
            f"<p class=note>{c.get('COMPLETE', 0)} complete, {c.get('PRUNED', 0)} pruned, {c.get('FAIL', 0)} failed, "
            f"{c.get('RUNNING', 0)} running of the {study['wanted'] or '?'} wanted; score: "
            f"{html.escape(METRIC_NOTES.get(metric, metric))}, lower is better.{best_line} Searched: {space}. "
            f"Click a header to sort. {charts}</p>"
            f"<table class='plain sortable' id=trials-table><thead><tr>{ths}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table></div></section>")


def _param(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return format(value, ".4g") if isinstance(value, float) else str(value)


def _sort_key(value) -> str:
    return "" if value is None else ("1" if value is True else "0" if value is False else str(value))


def _run_link(trial: dict, out: Path) -> str:
    """A link, relative to the page, to the trial's own report (or its run directory)."""
    path = trial.get("path")
    if not path:
        return "–"
    target = (Path(path) / "report.html" if trial.get("has_report") else Path(path)).resolve()
    try:
        href = urllib.parse.quote(Path(os.path.relpath(target, out.resolve().parent)).as_posix())
    except ValueError:  # on another drive (Windows): an absolute link
        href = target.as_uri()
    href += "" if trial.get("has_report") else "/"
    return f"<a href='{html.escape(href, quote=True)}'>{html.escape(Path(path).name)}</a>"


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
