// The Cascade dashboard: one EventSource on /dashboard/events (see services/gateway/dashboard.py
// for the frames), plain DOM and canvas, no libraries.
"use strict";

const HISTORY_S = 180; // what the charts keep
const state = {
  instances: [],
  decisions: [], // newest last
  plans: [], // newest last
  series: {}, // model -> [{t, ttft, itl, tps, queue}]
};

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
};
const clock = (ts) => (ts ? new Date(ts * 1000).toLocaleTimeString() : "");

// ---------------------------------------------------------------- instances

function renderInstances() {
  const body = $("#instances tbody");
  const rows = new Map([...body.children].map((r) => [r.dataset.worker, r]));
  const seen = new Set();
  for (const i of state.instances) {
    seen.add(i.worker_id);
    let row = rows.get(i.worker_id);
    if (!row) {
      row = el("tr", { "data-worker": i.worker_id });
      body.append(row);
    }
    const ready = new Set(i.ready_units);
    const bar = el("div", { class: "bar", title: `${i.units_ready} of ${i.num_units} units ready` });
    for (let u = 0; u < i.num_units; u++) {
      bar.append(el("div", { class: ready.has(u) ? "unit ready" : "unit", "data-unit": u }));
    }
    row.dataset.state = i.state;
    row.dataset.ready = `${ready.size}/${i.num_units}`;
    row.replaceChildren(
      el("td", {}, i.worker_id),
      el("td", { class: `state-${i.state}` }, i.state),
      el("td", {}, i.model || "—"),
      el("td", { class: "num" }, i.num_units ? `${ready.size}/${i.num_units}` : "—"),
      el("td", { class: "bars" }, bar),
      el("td", { class: "num" }, i.running),
      el("td", { class: "num" }, i.waiting),
      el("td", { class: "num" }, i.tokens_per_s.toFixed(1)),
      el("td", { class: "num" }, `${Math.round(i.kv_cache_usage * 100)}%`),
      el("td", { class: "num" }, i.loading_mb_s ? i.loading_mb_s.toFixed(0) : "—"),
    );
  }
  for (const [w, row] of rows) if (!seen.has(w)) row.remove();
  $("#no-instances").classList.toggle("hidden", state.instances.length > 0);
  renderChains(); // chain nodes show each target's progress
}

// ---------------------------------------------------------------- transfer chains

function progressOf(worker) {
  const i = state.instances.find((x) => x.worker_id === worker);
  if (!i || !i.num_units) return 0;
  return i.ready_units.length / i.num_units;
}

function renderChains() {
  const box = $("#chains");
  if (!state.plans.length) return;
  box.replaceChildren();
  for (const p of state.plans.slice(-4).reverse()) {
    const wrap = el("div", { class: "plan", "data-plan": p.plan_id });
    wrap.append(
      el("div", { class: "plan-head" }, `${clock(p.ts)} ${p.model} · ${p.mode} · ${(p.nbytes / 1e6).toFixed(1)} MB` +
        (p.replaces ? ` · re-plan of ${p.replaces}` : "") + (p.note ? ` · ${p.note}` : "")),
    );
    for (const c of p.chains) {
      const line = el("div", { class: "chain", "data-transfer": c.transfer_id });
      line.append(el("span", { class: "node source" }, el("span", {}, c.source)));
      for (const t of c.targets) {
        const pct = Math.round(progressOf(t) * 100);
        line.append(el("span", { class: "arrow" }, "→"));
        line.append(
          el("span", { class: "node", "data-target": t },
            el("div", { class: "fill", style: `width:${pct}%` }), el("span", {}, `${t} ${pct}%`)),
        );
      }
      wrap.append(line);
    }
    box.append(wrap);
  }
}

// ---------------------------------------------------------------- decisions

function renderDecisions() {
  const list = $("#decisions");
  list.replaceChildren();
  for (const d of state.decisions.slice().reverse()) {
    const ack = d.ack == null ? el("span", { class: "ack-pending" }, "pending")
      : d.ack.ok ? el("span", { class: "ack-ok" }, `done ${d.ack.workers.join(", ")}`)
      : el("span", { class: "ack-failed" }, `failed: ${d.ack.error}`);
    list.append(
      el("li", { "data-decision-id": d.decision_id, "data-model": d.model },
        `${clock(d.ts)} `, el("b", {}, d.model), " ",
        el("span", { class: `action-${d.action}` }, `${d.action} ${d.count}`),
        ` → ${d.target} replicas · ${d.policy || "?"}/${d.trigger || "?"} · `, ack,
        el("span", { class: "reason" }, d.reason)),
    );
  }
  $("#no-decisions").classList.toggle("hidden", state.decisions.length > 0);
}

// ---------------------------------------------------------------- charts

const COLORS = ["#58a6ff", "#3fb950", "#f0883e", "#d2a8ff", "#ff7b72", "#e3b341", "#79c0ff"];
const colorOf = (i) => COLORS[i % COLORS.length];

function drawChart(canvas, lines, unit) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const now = Date.now() / 1000, t0 = now - HISTORY_S;
  const pad = { l: 46, r: 8, t: 8, b: 18 };
  let max = 0;
  for (const l of lines) for (const [, v] of l.points) if (v != null) max = Math.max(max, v);
  max = max > 0 ? max * 1.15 : 1;
  const x = (t) => pad.l + ((t - t0) / HISTORY_S) * (w - pad.l - pad.r);
  const y = (v) => h - pad.b - (v / max) * (h - pad.t - pad.b);
  g.strokeStyle = "#2a333d"; g.fillStyle = "#8593a0"; g.font = "11px system-ui"; g.lineWidth = 1;
  for (let k = 0; k <= 4; k++) {
    const v = (max / 4) * k;
    g.beginPath(); g.moveTo(pad.l, y(v)); g.lineTo(w - pad.r, y(v)); g.stroke();
    g.fillText(v >= 100 ? v.toFixed(0) : v.toFixed(1), 4, y(v) + 4);
  }
  g.fillText(`${unit} · last ${HISTORY_S}s`, pad.l + 4, h - 4);
  for (const d of state.decisions) { // scale decisions as markers on every chart
    if (d.ts < t0) continue;
    g.strokeStyle = d.action === "up" ? "#58a6ff" : "#f0883e";
    g.setLineDash([3, 3]);
    g.beginPath(); g.moveTo(x(d.ts), pad.t); g.lineTo(x(d.ts), h - pad.b); g.stroke();
    g.setLineDash([]);
    g.fillStyle = g.strokeStyle;
    g.fillText(d.action === "up" ? "▲" : "▼", x(d.ts) - 4, pad.t + 10);
  }
  lines.forEach((l, i) => {
    g.strokeStyle = l.color || colorOf(i); g.lineWidth = 1.5; g.beginPath();
    let pen = false;
    for (const [t, v] of l.points) {
      if (v == null || t < t0) { pen = false; continue; }
      if (pen) g.lineTo(x(t), y(v)); else g.moveTo(x(t), y(v));
      pen = true;
    }
    g.stroke();
    g.fillStyle = l.color || colorOf(i);
    g.fillText(l.name, pad.l + 8, pad.t + 12 + i * 13);
  });
}

function renderCharts() {
  const models = Object.keys(state.series).sort();
  const pick = (f) => (m) => state.series[m].map((p) => [p.t, f(p)]);
  const latency = [];
  models.forEach((m, i) => {
    latency.push({ name: `${m} TTFT`, color: colorOf(2 * i), points: pick((p) => p.ttft)(m) });
    latency.push({ name: `${m} ITL`, color: colorOf(2 * i + 1), points: pick((p) => p.itl)(m) });
  });
  drawChart($("#chart-latency"), latency, "ms");
  drawChart($("#chart-tokens"), models.map((m, i) => ({ name: m, color: colorOf(i), points: pick((p) => p.tps)(m) })), "tokens/s");
  drawChart($("#chart-queue"), models.map((m, i) => ({ name: m, color: colorOf(i), points: pick((p) => p.queue)(m) })), "requests");
}

function onStats(frame) {
  const body = $("#models tbody");
  body.replaceChildren();
  const fmt = (v) => (v == null ? "—" : v.toFixed(1));
  for (const [m, s] of Object.entries(frame.models)) {
    const series = (state.series[m] ||= []);
    series.push({ t: frame.ts, ttft: s.ttft_ms, itl: s.itl_ms, tps: s.tokens_per_s, queue: s.queued + s.waiting });
    while (series.length && series[0].t < frame.ts - HISTORY_S) series.shift();
    body.append(el("tr", { "data-model": m },
      el("td", {}, m), el("td", { class: "num" }, fmt(s.ttft_ms)), el("td", { class: "num" }, fmt(s.itl_ms)),
      el("td", { class: "num" }, fmt(s.tokens_per_s)), el("td", { class: "num" }, s.queued),
      el("td", { class: "num" }, s.waiting), el("td", { class: "num" }, s.running)));
  }
  renderCharts();
}

// ---------------------------------------------------------------- the stream

function connect() {
  const es = new EventSource("/dashboard/events");
  const on = (name, f) => es.addEventListener(name, (e) => f(JSON.parse(e.data)));
  es.onopen = () => { const c = $("#conn"); c.textContent = "live"; c.className = "conn up"; };
  es.onerror = () => { const c = $("#conn"); c.textContent = "reconnecting…"; c.className = "conn down"; };
  on("snapshot", (s) => {
    state.instances = s.instances;
    state.decisions = s.decisions;
    state.plans = s.plans;
    renderInstances(); renderDecisions(); renderChains(); renderCharts();
  });
  on("instances", (list) => { state.instances = list; renderInstances(); });
  on("decision", (d) => { state.decisions.push(d); state.decisions = state.decisions.slice(-50); renderDecisions(); });
  on("ack", (a) => {
    const d = state.decisions.find((x) => x.decision_id === a.decision_id);
    if (d) d.ack = a;
    renderDecisions();
  });
  on("plan", (p) => { state.plans.push(p); state.plans = state.plans.slice(-20); renderChains(); });
  on("transfer", () => renderChains());
  on("stats", onStats);
}

connect();
