// genfoundry report: draws the embedded data with uPlot. Every logged point is drawn; uPlot keeps
// each pixel column's minimum and maximum when points outnumber pixels, so no spike disappears.
(async function () {
  "use strict";
  const R = (window.genfoundryReport = { ready: false, charts: [], errors: [] });
  window.addEventListener("error", (e) => R.errors.push(String(e.message || e)));
  window.addEventListener("unhandledrejection", (e) => R.errors.push(String(e.reason)));
  const data = JSON.parse(document.getElementById("report-data").textContent);
  const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];
  const EVENT_COLORS = { resume: "#dc2626", rollback: "#d97706" };
  const state = { x: "step", smoothing: 0.6 };
  const plots = [];

  async function unpack(blob, count) {
    if (!blob) return [];
    // the browser's own base64 decoder (a data: URL) feeding its own inflater
    const response = await fetch("data:application/octet-stream;base64," + blob);
    const stream = response.body.pipeThrough(new DecompressionStream("deflate"));
    const planes = new Uint8Array(await new Response(stream).arrayBuffer());
    const rows = planes.length / 4 / count;
    const columns = [];
    for (let c = 0; c < count; c++) {
      const out = new Float32Array(rows);
      const view = new Uint8Array(out.buffer);
      for (let b = 0; b < 4; b++) {
        const base = (c * 4 + b) * rows;
        for (let r = 0; r < rows; r++) view[r * 4 + b] = planes[base + r];
      }
      columns.push(out);
    }
    return columns;
  }

  for (const run of data.runs) {
    const cols = await unpack(run.table, run.columns.length);
    run.col = Object.fromEntries(run.columns.map((n, i) => [n, cols[i]]));
    [run.attemptTime, run.attemptStep] = await unpack(run.attempts, 2);
  }
  const multi = data.runs.length > 1;

  function fmtSeconds(v) {
    if (v == null) return "";
    const a = Math.abs(v);
    return a < 120 ? v.toFixed(0) + " s" : a < 7200 ? (v / 60).toFixed(1) + " min" : (v / 3600).toFixed(2) + " h";
  }
  function fmtValue(v) {
    if (v == null || !isFinite(v)) return "–";
    const a = Math.abs(v);
    return a !== 0 && (a < 1e-3 || a >= 1e6) ? Number(v.toExponential(3)).toExponential() : +v.toPrecision(5) + "";
  }
  function smooth(ys, w) {  // exponential moving average with bias correction, as TensorBoard's
    const out = new Array(ys.length);
    let acc = 0, n = 0;
    for (let i = 0; i < ys.length; i++) {
      const v = ys[i];
      if (v == null) { out[i] = null; continue; }
      acc = acc * w + (1 - w) * v; n++;
      out[i] = acc / (1 - Math.pow(w, n));
    }
    return out;
  }
  // One [xs, ys] table per run and metric: the rows where the metric was logged.
  function table(run, metric) {
    const xs = [], ys = [], col = run.col[metric], xcol = run.col[state.x];
    if (!col) return null;
    for (let i = 0; i < col.length; i++) if (!Number.isNaN(col[i])) { xs.push(xcol[i]); ys.push(col[i]); }
    return xs.length ? [xs, ys] : null;
  }

  function chartWidth(el) { return Math.max(320, el.clientWidth - 4); }

  // Vertical marks at restarts and rollbacks, on the step or wall-time axis.
  function eventMarks() {
    return { hooks: { draw: [(u) => {
      const ctx = u.ctx;
      ctx.save();
      ctx.lineWidth = 1.5 * uPlot.pxRatio;
      ctx.setLineDash([4 * uPlot.pxRatio, 3 * uPlot.pxRatio]);
      for (const run of data.runs) for (const ev of run.events) {
        const color = EVENT_COLORS[ev.event];
        if (!color) continue;
        const x = u.valToPos(state.x === "step" ? ev.step : ev.time, "x", true);
        if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
        ctx.strokeStyle = color;
        ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
      }
      ctx.restore();
    }] } };
  }

  let syncing = false;
  // The x range of every metric chart together: what a zoom-out returns to on all of them.
  function fullRange() {
    let min = Infinity, max = -Infinity;
    for (const p of plots) {
      const xs = p.xKind === "metric" && p.plot.data[0];
      if (xs && xs.length) { min = Math.min(min, xs[0]); max = Math.max(max, xs[xs.length - 1]); }
    }
    return min <= max ? { min, max } : null;
  }
  function zoomSync() {  // a zoom on one chart of the x axis applies to all of them
    return { hooks: { setScale: [(u, key) => {
      if (key !== "x" || syncing || !u.status) return;
      syncing = true;
      let { min, max } = u.scales.x;
      const xs = u.data[0];
      if (xs && xs.length && min <= xs[0] && max >= xs[xs.length - 1]) {  // zoomed out: to every chart's range
        const all = fullRange();
        if (all) ({ min, max } = all);
        if (u.scales.x.min !== min || u.scales.x.max !== max) u.setScale("x", { min, max });
      }
      for (const p of plots) if (p.plot !== u && p.xKind === "metric") p.plot.setScale("x", { min, max });
      syncing = false;
    }] } };
  }

  function register(id, title, el, plot, xKind, points) {
    const entry = { id, title, series: plot.series.length - 1, points, drawn: false };
    R.charts.push(entry);
    plots.push({ id, plot, xKind, el, entry });
    return entry;
  }

  function drawnHook(getEntry) {
    return { hooks: { draw: [() => { const e = getEntry(); if (e) e.drawn = true; }] } };
  }

  function metricData(spec) {
    const xLabel = state.x === "step" ? "step" : "wall time";
    const tables = [], series = [{ label: xLabel, value: (u, v) => v == null ? "–" : state.x === "step" ? fmtValue(v) : fmtSeconds(v) }], extra = [];
    let points = 0;
    data.runs.forEach((run, r) => {
      spec.series.forEach((s, k) => {
        const t = table(run, s.metric);
        if (!t) return;
        points += t[1].length;
        // one colour per run and metric; a metric's min/max take its colour
        const mains = spec.series.filter((x) => x.role === "main").map((x) => x.metric);
        const base = s.role === "band" ? s.metric.slice(0, -4) : s.metric;
        const slot = Math.max(mains.indexOf(base), 0);
        const color = COLORS[(r * mains.length + slot) % COLORS.length];
        const label = (multi ? run.name + " " : "") + s.metric;
        if (s.role === "band") {
          tables.push(t);
          series.push({ label, stroke: color, width: 1, dash: [5, 4], spanGaps: true, points: { show: false } });
          extra.push(null);
        } else if (spec.smooth.includes(s.metric)) {
          tables.push([t[0], t[1], smooth(t[1], state.smoothing)]);
          series.push({ label: label + " (raw)", stroke: color + "44", width: 1, spanGaps: true, points: { show: false } });
          series.push({ label, stroke: color, width: 1.6, spanGaps: true, points: { show: false } });
          extra.push(t[1], null);
        } else {
          tables.push(t);
          series.push({ label, stroke: color, width: 1.6, spanGaps: true,
                        points: { show: t[0].length < 60 } });
          extra.push(null);
        }
      });
    });
    return { data: tables.length ? uPlot.join(tables) : null, series, points, raws: extra };
  }

  function addMetricChart(spec, container) {
    const box = document.createElement("div");
    box.className = spec.id === "chart-loss" ? "chart wide" : "chart";  // the one chart everyone reads first
    box.innerHTML = `<h3>${escapeHtml(spec.title)}</h3>`;
    container.appendChild(box);
    const built = metricData(spec);
    if (!built.data) { box.remove(); return; }
    let entry = null;
    const opts = {
      width: chartWidth(box), height: 230, series: built.series,
      scales: { x: { time: false } },
      axes: [{ values: (u, vals) => vals.map((v) => state.x === "step" ? fmtValue(v) : fmtSeconds(v)) },
             { size: 64, values: (u, vals) => vals.map(fmtValue) }],
      legend: { live: true }, cursor: { sync: { key: "metrics" }, drag: { x: true, y: false } },
      plugins: [eventMarks(), zoomSync(), drawnHook(() => entry)],
    };
    const plot = new uPlot(opts, built.data, box);
    hideRawInLegend(plot);
    entry = register(spec.id, spec.title, box, plot, "metric", built.points);
    plots[plots.length - 1].spec = spec;
  }

  // The faint logged values stay on the chart but out of the legend, which lists each metric once.
  function hideRawInLegend(plot) {
    const rows = plot.root.querySelectorAll(".u-legend .u-series");
    plot.series.forEach((s, i) => { if (s.label && s.label.endsWith(" (raw)") && rows[i]) rows[i].style.display = "none"; });
  }

  function redrawMetrics(resetScales) {
    for (const p of plots) {
      if (p.xKind !== "metric") continue;
      const built = metricData(p.spec);
      p.plot.series[0].label = built.series[0].label;
      const label = p.plot.root.querySelector(".u-legend .u-series .u-label");
      if (label) label.textContent = built.series[0].label;
      p.plot.setData(built.data, resetScales);
    }
  }

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  }

  // ---- the timeline: steps against wall time, every attempt, with checkpoints and restarts --------
  function addTimeline(container) {
    const tables = [], series = [{ label: "wall time", value: (u, v) => v == null ? "–" : fmtSeconds(v) }];
    let points = 0;
    data.runs.forEach((run, r) => {
      if (!run.attemptTime || !run.attemptTime.length) return;
      const color = COLORS[r % COLORS.length];
      tables.push([Array.from(run.attemptTime), Array.from(run.attemptStep)]);
      points += run.attemptTime.length;
      series.push({ label: (multi ? run.name + " " : "") + "step", stroke: color, width: 1.6, points: { show: false } });
      for (const [kind, label, fill] of [["checkpoint", "checkpoint", "#059669"], ["resume", "restart", "#dc2626"],
                                          ["rollback", "rollback", "#d97706"], ["eval", "eval", "#7c3aed"]]) {
        const evs = run.events.filter((e) => e.event === kind).sort((a, b) => a.time - b.time);
        if (!evs.length) continue;
        tables.push([evs.map((e) => e.time), evs.map((e) => e.step)]);
        points += evs.length;
        series.push({ label: (multi ? run.name + " " : "") + label, stroke: fill, fill, paths: () => null,
                      points: { show: true, size: 9, fill, stroke: fill } });
      }
    });
    if (!tables.length) return;
    const box = document.createElement("div");
    box.className = "chart wide";
    box.innerHTML = "<h3>progress: step against wall time (restarts go back to their checkpoint)</h3>";
    container.appendChild(box);
    let entry = null;
    const plot = new uPlot({
      width: chartWidth(box), height: 260, series,
      scales: { x: { time: false } },
      axes: [{ values: (u, vals) => vals.map(fmtSeconds) }, { size: 64, values: (u, vals) => vals.map(fmtValue) }],
      plugins: [drawnHook(() => entry)],
    }, uPlot.join(tables), box);
    entry = register("chart-timeline", "timeline", box, plot, "timeline", points);
  }

  function addFid(container) {
    const tables = [], series = [{ label: "step" }];
    let points = 0;
    data.runs.forEach((run, r) => {
      if (!run.fid.length) return;
      tables.push([run.fid.map((f) => f.step), run.fid.map((f) => f.fid)]);
      points += run.fid.length;
      series.push({ label: (multi ? run.name + " " : "") + "FID", stroke: COLORS[r % COLORS.length], width: 1.6,
                    points: { show: true, size: 8 } });
    });
    if (!tables.length) {
      container.insertAdjacentHTML("beforeend", "<p class=note>No FID yet: <code>genfoundry eval RUN</code> scores the final weights, <code>--snapshot STEP</code> a snapshot.</p>");
      return;
    }
    const box = document.createElement("div");
    box.className = "chart";
    box.innerHTML = "<h3>FID against step</h3>";
    container.appendChild(box);
    let entry = null;
    const plot = new uPlot({ width: chartWidth(box), height: 230, series, scales: { x: { time: false } },
      axes: [{}, { size: 64, values: (u, vals) => vals.map(fmtValue) }], plugins: [drawnHook(() => entry)] },
      uPlot.join(tables), box);
    entry = register("chart-fid", "FID", box, plot, "fid", points);
  }

  function addHistogram(h, container) {
    const box = document.createElement("div");
    box.className = "chart";
    const side = h.threshold == null ? "" : ` — drops ${h.drop_above ? "above" : "below"} ${fmtValue(h.threshold)} (${escapeHtml(h.reason)})`;
    box.innerHTML = `<h3>${escapeHtml(h.column)}: ${h.scored} scored${side}</h3>`;
    container.appendChild(box);
    const bars = uPlot.paths.bars({ size: [0.9, Infinity] });
    const marks = { hooks: { draw: [(u) => {
      if (h.threshold == null) return;
      const x = u.valToPos(h.threshold, "x", true), ctx = u.ctx;
      ctx.save(); ctx.strokeStyle = "#111827"; ctx.lineWidth = 2 * uPlot.pxRatio;
      ctx.setLineDash([6 * uPlot.pxRatio, 4 * uPlot.pxRatio]);
      ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke(); ctx.restore();
    }] } };
    let entry = null;
    const stacked = h.kept.map((k, i) => k + h.dropped[i]);
    const plot = new uPlot({
      width: chartWidth(box), height: 200, scales: { x: { time: false } },
      series: [{}, { label: "dropped (any reason)", stroke: "#dc2626", fill: "#dc262699", paths: bars, points: { show: false } },
               { label: "kept", stroke: "#059669", fill: "#059669cc", paths: bars, points: { show: false } }],
      axes: [{ values: (u, vals) => vals.map(fmtValue) }, { size: 56 }],
      plugins: [marks, drawnHook(() => entry)],
    }, [h.centers, stacked, h.kept], box);
    entry = register(h.id, h.column, box, plot, "histogram", h.centers.length);
  }

  // ---- the page ------------------------------------------------------------------------------
  const main = document.getElementById("charts");
  const bySection = new Map();
  for (const spec of data.charts) {
    if (!bySection.has(spec.section)) bySection.set(spec.section, []);
    bySection.get(spec.section).push(spec);
  }
  const overview = section("Timeline and goodput", "timeline");
  addTimeline(overview);
  for (const [name, specs] of bySection) {
    const grid = section(name, "section-" + name.toLowerCase().replace(/[^a-z]+/g, "-"));
    for (const spec of specs) addMetricChart(spec, grid);
  }
  addFid(section("Evaluation", "evaluation"));
  if (data.curation) for (const h of data.curation.histograms) addHistogram(h, document.getElementById("histograms"));

  function section(title, id) {
    const s = document.createElement("section");
    s.id = id;
    s.innerHTML = `<h2>${escapeHtml(title)}</h2><div class="grid"></div>`;
    main.appendChild(s);
    if (id === "timeline") s.querySelector(".grid").before(document.getElementById("goodput"));
    return s.querySelector(".grid");
  }

  // samples: one slider per run over its grids
  for (const slider of document.querySelectorAll("input.samples")) {
    const run = data.runs[+slider.dataset.run], img = document.getElementById(slider.dataset.img);
    const label = document.getElementById(slider.dataset.label);
    const show = () => {
      const g = run.samples.grids[+slider.value];
      img.src = g.src;
      label.textContent = g.step == null ? "final" : "step " + g.step;
    };
    slider.addEventListener("input", show);
    show();
  }

  // a study's trials table: a click on a header sorts by that column (again: the other way)
  for (const tableEl of document.querySelectorAll("table.sortable")) {
    const body = tableEl.tBodies[0];
    tableEl.querySelectorAll("th").forEach((th, col) => {
      th.addEventListener("click", () => {
        const up = th.dataset.sorted !== "up";
        tableEl.querySelectorAll("th").forEach((h) => delete h.dataset.sorted);
        th.dataset.sorted = up ? "up" : "down";
        const key = (row) => row.cells[col].dataset.v;
        const numeric = th.dataset.type === "num" ||
          (th.dataset.type === "auto" && Array.from(body.rows).every((r) => key(r) === "" || isFinite(+key(r))));
        const rows = Array.from(body.rows).sort((a, b) => {
          const x = key(a), y = key(b);
          if (x === "" || y === "") return (x === "") - (y === "");  // no value: last either way
          const d = numeric ? +x - +y : x.localeCompare(y);
          return up ? d : -d;
        });
        for (const row of rows) body.appendChild(row);
      });
    });
  }

  // controls
  const smoothing = document.getElementById("smoothing"), smoothingValue = document.getElementById("smoothing-value");
  let smoothingFrame = 0;
  smoothing.addEventListener("input", () => {
    state.smoothing = +smoothing.value;
    smoothingValue.textContent = state.smoothing.toFixed(2);
    cancelAnimationFrame(smoothingFrame);  // one redraw per frame however fast the slider moves
    smoothingFrame = requestAnimationFrame(() => redrawMetrics(false));
  });
  for (const radio of document.querySelectorAll("input[name=xaxis]")) {
    radio.addEventListener("change", () => { state.x = radio.value; redrawMetrics(true); });
  }
  document.getElementById("reset-zoom").addEventListener("click", () => {
    for (const p of plots) p.plot.setData(p.plot.data, true);
  });
  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { for (const p of plots) p.plot.setSize({ width: chartWidth(p.el), height: p.plot.height }); }, 100);
  });

  // ready once every chart has drawn
  const deadline = performance.now() + 30000;
  (function check() {
    if (R.charts.every((c) => c.drawn) || performance.now() > deadline) {
      performance.mark("genfoundry-charts-drawn");
      R.ready = true;
      document.body.dataset.ready = "true";
    } else requestAnimationFrame(check);
  })();
})().catch((e) => {
  const R = window.genfoundryReport || (window.genfoundryReport = { charts: [], errors: [] });
  R.errors.push(String(e && e.stack || e));
  R.ready = true;
  console.error(e);
});
