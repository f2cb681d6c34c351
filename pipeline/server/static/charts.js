/* llm-pipeline: charts and tables of a job, shared by the dashboard and the run report.
 *
 * No dependencies and no network: charts are inline SVG drawn here. The data is a job's
 * timeline (runs of samples, see pipeline/jobs/_timeline.py), its summary and its latest
 * failures:
 *   {runs: [{number, started_at, job: {model, rpm, tpm, ...}, samples: [...], end}],
 *    summary: {...} | null, failures: [{key, line, error: {type, message, status}}]}
 */
(function (global) {
  "use strict";

  const SVGNS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2"];

  function h(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    for (const child of children || []) node.appendChild(child);
    return node;
  }

  function s(tag, attrs, parent) {
    const node = document.createElementNS(SVGNS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = String(v);
      else node.setAttribute(k, String(v));
    }
    if (parent) parent.appendChild(node);
    return node;
  }

  /** A number for people: 1234567 -> "1,234,567", 0.1234 -> "0.123". */
  function fmt(n, digits) {
    if (n === null || n === undefined || Number.isNaN(n)) return "–";
    if (digits !== undefined) return Number(n).toFixed(digits);
    const a = Math.abs(n);
    if (a >= 1000) return Math.round(n).toLocaleString("en-US");
    if (a >= 100 || Number.isInteger(n)) return String(Math.round(n));
    if (a >= 1) return n.toFixed(1);
    if (a === 0) return "0";
    return n.toPrecision(3);
  }

  function tick(v) {
    return Math.abs(v) >= 1000 ? fmt(v) : String(parseFloat(v.toPrecision(3)));
  }

  function money(n) {
    if (n === null || n === undefined) return "–";
    return "$" + (n < 100 ? Number(n).toFixed(4) : Math.round(n).toLocaleString("en-US"));
  }

  function duration(sec) {
    if (sec === null || sec === undefined) return "–";
    const t = Math.round(sec);
    const hh = Math.floor(t / 3600), mm = Math.floor((t % 3600) / 60), ss = t % 60;
    const two = (x) => String(x).padStart(2, "0");
    return hh ? `${hh}:${two(mm)}:${two(ss)}` : `${mm}:${two(ss)}`;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(count, 1);
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / mag;
    return (norm < 1.5 ? 1 : norm < 3 ? 2 : norm < 7 ? 5 : 10) * mag;
  }

  function ticks(lo, hi, count) {
    if (!(hi > lo)) hi = lo + 1;
    const step = niceStep(hi - lo, count);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(v);
    return {values: out, top: Math.max(hi, out[out.length - 1] || hi)};
  }

  /**
   * Draw a line chart into `host` (replacing its content).
   * spec: {title, unit, series: [{name, points: [[x, y], ...]}], limit: {value, label}}
   * The <svg> carries data-points (points drawn, all series) for tests and tools.
   */
  function lineChart(host, spec) {
    const W = 560, H = 200, L = 52, R = 12, T = 10, B = 26;
    host.textContent = "";
    host.classList.add("chart");
    host.appendChild(h("h3", {text: spec.title}));
    const svg = s("svg", {viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": spec.title});
    host.appendChild(svg);
    const all = spec.series.flatMap((x) => x.points);
    svg.setAttribute("data-points", String(all.length));
    let x0 = 0, x1 = 1, y1 = 0;
    for (const [x, y] of all) {
      x1 = Math.max(x1, x);
      y1 = Math.max(y1, y);
    }
    if (spec.limit && spec.limit.value) y1 = Math.max(y1, spec.limit.value * 1.05);
    const yt = ticks(0, y1 || 1, 4), xt = ticks(x0, x1, 6);
    const px = (x) => L + ((x - x0) / (xt.top - x0)) * (W - L - R);
    const py = (y) => H - B - (y / yt.top) * (H - T - B);
    for (const v of yt.values) {
      s("line", {x1: L, x2: W - R, y1: py(v), y2: py(v), class: "grid"}, svg);
      s("text", {x: L - 6, y: py(v) + 4, "text-anchor": "end", class: "tick", text: tick(v)}, svg);
    }
    const xtick = xt.top < 120 ? (v) => `${tick(v)}s` : duration;
    for (const v of xt.values) {
      s("text", {x: px(v), y: H - 8, "text-anchor": "middle", class: "tick", text: xtick(v)}, svg);
    }
    s("line", {x1: L, x2: W - R, y1: py(0), y2: py(0), class: "axis"}, svg);
    if (spec.limit && spec.limit.value) {
      const y = py(spec.limit.value);
      s("line", {x1: L, x2: W - R, y1: y, y2: y, class: "limit"}, svg);
      s("text", {x: W - R - 4, y: y - 4, "text-anchor": "end", class: "limit-label",
        text: spec.limit.label}, svg);
    }
    const legend = h("div", {class: "legend"});
    spec.series.forEach((series, i) => {
      const color = series.color || COLORS[i % COLORS.length];
      if (series.points.length) {
        const d = series.points.map(([x, y], j) => `${j ? "L" : "M"}${px(x).toFixed(1)},${py(y).toFixed(1)}`);
        s("path", {d: d.join(""), fill: "none", stroke: color, "stroke-width": 1.6,
          class: "series", "data-name": series.name}, svg);
      }
      const last = series.points.length ? series.points[series.points.length - 1][1] : null;
      const item = h("span", {class: "key"}, [h("i", {style: `background:${color}`})]);
      item.appendChild(document.createTextNode(`${series.name}${last === null ? "" : ": " + fmt(last)}${spec.unit ? " " + spec.unit : ""}`));
      legend.appendChild(item);
    });
    host.appendChild(legend);
  }

  /** Time series derived from the runs: x is seconds since the first run started. */
  function derive(runs) {
    const out = {done: [], total: [], rows: [], requests: [], limited: [], retries: [],
      tokens: [], cost: [], waiting: [], inflight: []};
    let offset = 0, costBefore = 0;
    for (const run of runs) {
      // a run's counters start at zero: its first interval has a rate too
      let prev = {t: 0, ok: 0, failed: 0, requests: 0, rate_limited: 0, retries: 0,
        prompt_tokens: 0, completion_tokens: 0, limiter_wait_s: 0, cost_usd: 0};
      for (const p of run.samples) {
        const x = offset + p.t;
        out.done.push([x, p.rows_done]);
        out.cost.push([x, costBefore + p.cost_usd]);
        out.inflight.push([x, p.in_flight || 0]);
        if (p.rows_total !== null && p.rows_total !== undefined) out.total.push([x, p.rows_total]);
        if (prev && p.t > prev.t) {
          const dt = p.t - prev.t;
          const rate = (a, b) => Math.max(a - b, 0) / dt;
          out.rows.push([x, rate(p.ok + p.failed, prev.ok + prev.failed)]);
          out.requests.push([x, rate(p.requests, prev.requests)]);
          out.limited.push([x, rate(p.rate_limited || 0, prev.rate_limited || 0) * 60]);
          out.retries.push([x, rate(p.retries, prev.retries) * 60]);
          const tok = p.prompt_tokens + p.completion_tokens - prev.prompt_tokens - prev.completion_tokens;
          out.tokens.push([x, Math.max(tok, 0) / dt * 60]);
          out.waiting.push([x, rate(p.limiter_wait_s || 0, prev.limiter_wait_s || 0)]);
        }
        prev = p;
      }
      if (run.samples.length) {
        offset += prev.t;
        costBefore += prev.cost_usd;
      }
    }
    return out;
  }

  /** Figures over all runs: the last sample of each run, added up. */
  function totals(runs) {
    const t = {rows_total: null, rows_done: 0, ok: 0, failed: 0, requests: 0, retries: 0,
      rate_limited: 0, prompt_tokens: 0, completion_tokens: 0, cost_usd: 0, limiter_wait_s: 0,
      elapsed_s: 0, inflight_s: 0, in_flight: 0};
    for (const run of runs) {
      const n = run.samples.length;
      if (!n) continue;
      const last = run.samples[n - 1];
      for (const k of ["ok", "failed", "requests", "retries", "rate_limited", "prompt_tokens",
        "completion_tokens", "cost_usd", "limiter_wait_s"]) t[k] += last[k] || 0;
      t.rows_done = last.rows_done;
      t.in_flight = last.in_flight || 0;
      if (last.rows_total !== null && last.rows_total !== undefined) t.rows_total = last.rows_total;
      t.elapsed_s += last.t;
      for (let i = 1; i < n; i++) {
        const a = run.samples[i - 1], b = run.samples[i];
        t.inflight_s += ((a.in_flight || 0) + (b.in_flight || 0)) / 2 * (b.t - a.t);
      }
    }
    return t;
  }

  function tile(label, value, key) {
    return h("div", {class: "tile", "data-key": key}, [
      h("div", {class: "value", text: value}), h("div", {class: "label", text: label})]);
  }

  function tiles(t) {
    const total = t.rows_total;
    const pct = total ? Math.min(100, (100 * t.rows_done) / total) : null;
    const wait = t.limiter_wait_s + t.inflight_s;
    return h("div", {class: "tiles"}, [
      tile("rows done", pct === null ? fmt(t.rows_done) : `${fmt(t.rows_done)} / ${fmt(total)} (${pct.toFixed(0)}%)`, "done"),
      tile("answered", fmt(t.ok), "ok"),
      tile("failed", fmt(t.failed), "failed"),
      tile("remaining", total ? fmt(Math.max(total - t.rows_done, 0)) : "–", "remaining"),
      tile("requests", fmt(t.requests), "requests"),
      tile("429s / slow-downs", fmt(t.rate_limited), "rate_limited"),
      tile("retries", fmt(t.retries), "retries"),
      tile("tokens in / out", `${fmt(t.prompt_tokens)} / ${fmt(t.completion_tokens)}`, "tokens"),
      tile("cost so far", money(t.cost_usd), "cost"),
      tile("limiter wait share", wait > 0 ? `${((100 * t.limiter_wait_s) / wait).toFixed(1)}%` : "–", "wait_share"),
      tile("elapsed", duration(t.elapsed_s), "elapsed"),
    ]);
  }

  function table(caption, head, rows, attrs) {
    const thead = h("thead", {}, [h("tr", {}, head.map((x) => h("th", {text: x})))]);
    const body = h("tbody", {}, rows.map((r) => h("tr", {"data-field": r.field}, r.cells.map((c) => h("td", {text: c})))));
    return h("table", Object.assign({class: "data"}, attrs || {}), [h("caption", {text: caption}), thead, body]);
  }

  const SUMMARY_FIELDS = [
    ["rows_in", "rows read"], ["ok", "answered"], ["failed", "dead-lettered"],
    ["requests", "requests"], ["retries", "retries"], ["prompt_tokens", "prompt tokens"],
    ["completion_tokens", "completion tokens"], ["cost_usd", "cost (USD)"],
    ["elapsed_s", "elapsed (s)"], ["rows_per_s", "rows/s"], ["resumed_skipped", "skipped (resumed)"],
    ["cache_hits", "cache hits"], ["total_ok", "total answered"], ["total_failed", "total dead-lettered"],
    ["complete", "complete"], ["stopped", "stopped"], ["exit_status", "exit status"], ["error", "error"],
  ];

  function summaryTable(summary) {
    const rows = SUMMARY_FIELDS.filter(([k]) => k in summary).map(([k, label]) => {
      const v = summary[k];
      return {field: k, cells: [label, v === null ? "–" : String(v)]};
    });
    return table("Summary", ["", "value"], rows, {id: "summary"});
  }

  function failureTables(summary, failures) {
    const out = [];
    const causes = (summary && summary.failed_by_cause) || {};
    const causeRows = Object.entries(causes).map(([cause, n]) => ({field: cause, cells: [cause, String(n)]}));
    if (causeRows.length) out.push(table("Failures by cause", ["cause", "rows"], causeRows, {id: "causes"}));
    const rows = (failures || []).map((f) => {
      const e = f.error || {};
      return {field: String(f.key), cells: [String(f.key), f.line === undefined ? "" : String(f.line),
        e.type || "", e.status === null || e.status === undefined ? "" : String(e.status), e.message || ""]};
    });
    out.push(table("Latest failures", ["row", "line", "error", "status", "message"], rows, {id: "failures"}));
    return out;
  }

  /**
   * Render a job's figures, charts and tables into `root` (replacing its content).
   * data: {runs, summary, failures}; returns the totals shown.
   */
  function renderJob(root, data) {
    const runs = data.runs || [];
    const job = (runs.length && runs[runs.length - 1].job) || {};
    const t = totals(runs);
    const d = derive(runs);
    root.textContent = "";
    root.appendChild(tiles(t));
    const grid = h("div", {class: "charts"});
    root.appendChild(grid);
    const chart = (id, spec) => {
      const host = h("div", {id});
      grid.appendChild(host);
      lineChart(host, spec);
    };
    chart("chart-progress", {title: "Rows done", series: [{name: "done", points: d.done}],
      limit: t.rows_total ? {value: t.rows_total, label: `total ${fmt(t.rows_total)}`} : null});
    chart("chart-rate", {title: "Rows and requests per second", unit: "/s",
      series: [{name: "rows", points: d.rows}, {name: "requests", points: d.requests}],
      limit: job.rpm ? {value: job.rpm / 60, label: `quota ${fmt(job.rpm)} rpm`} : null});
    chart("chart-tokens", {title: "Tokens per minute", unit: "/min",
      series: [{name: "tokens", points: d.tokens}],
      limit: job.tpm ? {value: job.tpm, label: `quota ${fmt(job.tpm)} tpm`} : null});
    chart("chart-limited", {title: "429s and retries per minute", unit: "/min",
      series: [{name: "429s", points: d.limited, color: COLORS[2]}, {name: "retries", points: d.retries, color: COLORS[4]}]});
    chart("chart-waiting", {title: "Rows waiting for the quota, and in flight",
      series: [{name: "waiting", points: d.waiting, color: COLORS[3]}, {name: "in flight", points: d.inflight, color: COLORS[5]}]});
    chart("chart-cost", {title: "Cost so far (USD)", series: [{name: "cost", points: d.cost}]});
    const tables = h("div", {class: "tables"});
    if (data.summary) tables.appendChild(summaryTable(data.summary));
    for (const x of failureTables(data.summary, data.failures)) tables.appendChild(x);
    root.appendChild(tables);
    return t;
  }

  global.LP = {fmt, money, duration, lineChart, derive, totals, renderJob, h};
})(window);
