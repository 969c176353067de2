// mljobs dashboard: live updates for the server-rendered pages. Plain JS, no build step.
// Everything the server sends is inserted as text (textContent), except the job page's live
// part, which the server renders from its own escaped templates.
"use strict";

const TAIL_LINES = 1000;   // lines of a log sent at first
const PAGE_LINES = 1000;   // lines per "load earlier"
const KEEPALIVE = "\x16";  // sent by a followed log stream when nothing was written for a while

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}

// -- jobs page: poll the small JSON list and redraw the rows ----------------------------------
function jobsPage() {
  const table = document.getElementById("jobs");
  const body = document.getElementById("jobs-body");
  const count = document.getElementById("jobs-count");
  const query = table.dataset.query;
  async function refresh() {
    try {
      const resp = await fetch("/dashboard/jobs.json" + (query ? "?" + query : ""), {cache: "no-store"});
      if (resp.status === 401) { window.location.reload(); return; }  // logged out: the login page
      if (!resp.ok) return;
      const data = await resp.json();
      const rows = data.jobs.map((j) => {
        const tr = el("tr", {"data-id": j.id});
        const first = el("td");
        first.append(el("a", {href: "/jobs/" + encodeURIComponent(j.id)}, j.name));
        if (j.name !== j.id) first.append(el("div", {class: "id"}, j.id));  // the id once, under a given name
        const st = el("td");
        st.append(el("span", {class: "status s-" + j.status}, j.status));
        tr.append(first, st, el("td", {}, j.owner), el("td", {}, j.compute_pool), el("td", {}, j.target_instances),
                  el("td", {}, j.created_time), el("td", {class: "queued"}, j.queued), el("td", {class: "ran"}, j.ran),
                  el("td", {class: "msg"}, j.message));
        return tr;
      });
      body.replaceChildren(...rows);
      count.textContent = rows.length + " job(s); updated live.";
    } catch (e) {
      count.textContent = "the server does not answer (" + e + "); retrying";
    }
  }
  setInterval(refresh, 2000);
}

// -- job page: resource charts (uPlot, served with the dashboard), live while the job runs -------
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];

function formatBytes(v) {
  if (v === null || v === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i ? v.toFixed(1) : String(Math.round(v))) + " " + units[i];
}

// One x axis (seconds since the first sample) and one series per instance: uPlot wants aligned
// arrays, so an instance has null where another sampled and it did not (the line spans the gap).
function aligned(rows, field) {
  const times = [...new Set(rows.map((r) => r.time))].sort((a, b) => a - b);
  const index = new Map(times.map((t, i) => [t, i]));
  const instances = [...new Set(rows.map((r) => r.instance))].sort((a, b) => a - b);
  const series = instances.map(() => times.map(() => null));
  for (const r of rows) {
    const v = r[field];
    if (v !== null && v !== undefined) series[instances.indexOf(r.instance)][index.get(r.time)] = v;
  }
  return {instances, data: [times, ...series], has: series.some((s) => s.some((v) => v !== null))};
}

function resourceCharts(id, isTerminal) {
  const box = document.getElementById("charts");
  const state = document.getElementById("charts-state");
  if (!box) return;
  if (typeof uPlot === "undefined") { state.textContent = "the chart library did not load"; return; }
  const specs = [
    {field: "cpu_percent", title: "CPU (% of one core)", el: "chart-cpu", fmt: (v) => v === null ? "" : v.toFixed(0) + "%"},
    {field: "rss_bytes", title: "Memory (resident)", el: "chart-memory", fmt: formatBytes},
    {field: "gpu_util", title: "GPU (% busy)", el: "chart-gpu", fmt: (v) => v === null ? "" : v.toFixed(0) + "%"},
    {field: "gpu_memory_bytes", title: "GPU memory", el: "chart-gpu-memory", fmt: formatBytes},
  ];
  const plots = {};
  function draw(rows) {
    for (const spec of specs) {
      const target = document.getElementById(spec.el);
      const {instances, data, has} = aligned(rows, spec.field);
      target.hidden = !has;
      if (!has) continue;
      const key = instances.join(",");
      let plot = plots[spec.field];
      if (plot && plot.key !== key) { plot.destroy(); plot = null; }
      if (!plot) {
        plot = new uPlot({
          title: spec.title, width: Math.max(320, Math.min(box.clientWidth / 2 - 16, 640)), height: 200,
          scales: {x: {time: true}},
          series: [{}, ...instances.map((i) => ({label: "instance " + i, stroke: COLORS[i % COLORS.length],
                                                  width: 2, spanGaps: true, value: (u, v) => spec.fmt(v)}))],
          axes: [{}, {size: 70, values: (u, vals) => vals.map(spec.fmt)}],
        }, data, target);
        plot.key = key;
        plots[spec.field] = plot;
      } else {
        plot.setData(data);
      }
    }
    state.textContent = rows.length ? "" : "no samples yet";
    box.dataset.samples = String(rows.length);
  }
  async function refresh() {
    try {
      const resp = await fetch("/api/v1/jobs/" + encodeURIComponent(id) + "/metrics", {cache: "no-store"});
      if (resp.ok) draw(await resp.json());
      else state.textContent = "the samples cannot be read: HTTP " + resp.status;
    } catch (e) { /* the next poll tries again */ }
    if (!isTerminal()) setTimeout(refresh, 2000);
  }
  refresh();
}

// -- pools page: each pool's running instances over the last hour, in all and per user --------
function poolsPage() {
  if (typeof uPlot === "undefined") return;
  const plots = {};
  async function refresh() {
    for (const fig of document.querySelectorAll("figure.use-chart")) {
      const name = fig.dataset.pool;
      try {
        const resp = await fetch("/dashboard/pools/" + encodeURIComponent(name) + "/use.json?minutes=60", {cache: "no-store"});
        if (!resp.ok) continue;
        const use = await resp.json();
        const names = ["all", ...Object.keys(use.series).filter((k) => k !== "all")];
        const data = [use.times, ...names.map((n) => use.series[n])];
        const key = names.join(",");
        let plot = plots[name];
        if (plot && plot.key !== key) { plot.destroy(); plot = null; }
        if (!plot) {
          const stepped = uPlot.paths.stepped({align: 1});
          plot = new uPlot({
            title: name + ": running instances (max " + use.max_nodes + ")", width: 640, height: 160,
            scales: {x: {time: true}, y: {range: [0, Math.max(1, use.max_nodes)]}},
            series: [{}, ...names.map((n, i) => ({label: n === "all" ? "all users" : n, paths: stepped,
                                                  stroke: COLORS[i % COLORS.length], width: n === "all" ? 2 : 1}))],
          }, data, fig);
          plot.key = key;
          plots[name] = plot;
        } else {
          plot.setData(data);
        }
        fig.dataset.points = String(use.times.length);
      } catch (e) { /* the next poll tries again */ }
    }
    setTimeout(refresh, 5000);
  }
  refresh();
}

// -- job page: poll its live part; stream the selected instance's log --------------------------
function jobPage() {
  const root = document.getElementById("job");
  const id = root.dataset.id;
  const live = document.getElementById("live");
  let terminal = root.dataset.terminal === "true";

  async function refresh() {
    try {
      const resp = await fetch("/jobs/" + encodeURIComponent(id) + "/live", {cache: "no-store"});
      if (!resp.ok) return;
      const data = await resp.json();
      live.innerHTML = data.html;  // rendered by the server's escaping templates
      terminal = data.terminal;
      root.dataset.terminal = String(terminal);
    } catch (e) { /* the next poll tries again */ }
    if (!terminal) setTimeout(refresh, 1000);
  }
  if (!terminal) setTimeout(refresh, 1000);
  resourceCharts(id, () => terminal);

  const pre = document.getElementById("log");
  const state = document.getElementById("log-state");
  const earlier = document.getElementById("log-earlier");
  let instance = 0, start = 0, controller = null, generation = 0;

  function logUrl(params) {
    return "/api/v1/jobs/" + encodeURIComponent(id) + "/logs?" + new URLSearchParams({instance, ...params});
  }
  function atBottom() { return pre.scrollHeight - pre.scrollTop - pre.clientHeight < 30; }
  function append(text) {
    const stick = atBottom();
    pre.append(document.createTextNode(text));
    if (stick) pre.scrollTop = pre.scrollHeight;
  }
  function setStart(value) {
    start = value;
    earlier.hidden = !(start > 0);
  }

  async function follow() {
    const mine = ++generation;
    if (controller) controller.abort();
    controller = new AbortController();
    pre.textContent = "";
    state.textContent = "loading the log...";
    try {
      const resp = await fetch(logUrl({limit: TAIL_LINES, follow: "true"}), {signal: controller.signal, cache: "no-store"});
      if (!resp.ok) { state.textContent = "the log cannot be read: HTTP " + resp.status; return; }
      setStart(parseInt(resp.headers.get("X-Log-Start") || "0", 10));
      state.textContent = terminal ? "" : "following the log live";
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let partial = "";
      for (;;) {
        const {value, done} = await reader.read();
        if (done) break;
        const lines = (partial + decoder.decode(value, {stream: true})).split("\n");
        partial = lines.pop();
        const text = lines.filter((l) => l !== KEEPALIVE).map((l) => l + "\n").join("");
        if (text) append(text);
      }
      if (partial && partial !== KEEPALIVE) append(partial);
      if (mine !== generation) return;
      if (!terminal) {  // the server ends a followed stream when the job ends: check before reconnecting
        try {
          const r = await fetch("/jobs/" + encodeURIComponent(id) + "/live", {cache: "no-store"});
          if (r.ok) terminal = (await r.json()).terminal;
        } catch (e) { /* reconnect below */ }
      }
      if (terminal) {
        state.textContent = "end of the log (the job has ended)";
      } else {
        state.textContent = "the log stream broke off; reconnecting";
        setTimeout(() => { if (mine === generation) follow(); }, 1000);
      }
    } catch (e) {
      if (e.name === "AbortError" || mine !== generation) return;
      state.textContent = "the log stream broke off (" + e + "); reconnecting";
      setTimeout(() => { if (mine === generation) follow(); }, 2000);
    }
  }

  earlier.addEventListener("click", async () => {
    earlier.disabled = true;
    try {
      const resp = await fetch(logUrl({limit: PAGE_LINES, before: start}), {cache: "no-store"});
      if (!resp.ok) { state.textContent = "earlier lines cannot be read: HTTP " + resp.status; return; }
      const text = (await resp.text()).split("\n").filter((l) => l !== KEEPALIVE).join("\n");
      const height = pre.scrollHeight;
      pre.prepend(document.createTextNode(text));
      pre.scrollTop += pre.scrollHeight - height;  // keep what was in view where it was
      setStart(parseInt(resp.headers.get("X-Log-Start") || "0", 10));
    } finally {
      earlier.disabled = false;
    }
  });

  // A browser opens at most 6 connections to a server and a followed log holds one: a hidden
  // tab lets its stream go and follows again when shown.
  document.addEventListener("visibilitychange", () => {
    if (document.hidden && controller) { generation++; controller.abort(); state.textContent = "paused while hidden"; }
    else if (!document.hidden && state.textContent === "paused while hidden") follow();
  });

  for (const tab of document.querySelectorAll("#log-tabs .tab")) {
    tab.addEventListener("click", () => {
      for (const t of document.querySelectorAll("#log-tabs .tab")) t.classList.toggle("active", t === tab);
      instance = parseInt(tab.dataset.instance, 10);
      follow();
    });
  }
  follow();
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "jobs") jobsPage();
  if (page === "job") jobPage();
  if (page === "pools") poolsPage();
});
