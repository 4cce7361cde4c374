// The MUST web console: a small single-page app over the /v1 API (no framework, no CDN).
// Pages: #/jobs, #/job/ID, #/submit, #/classify, #/models. The API key lives in localStorage.
"use strict";

const view = document.getElementById("view");
const PAGE = 25;
let timers = [];

// ---- helpers ------------------------------------------------------------------------------------
function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function svg(tag, attrs, ...kids) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const kid of kids.flat()) el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  return el;
}

function key() { return localStorage.getItem("must-api-key") || ""; }

async function api(path, opts = {}) {
  const headers = Object.assign({}, opts.headers || {});
  if (key()) headers["Authorization"] = "Bearer " + key();
  if (opts.json !== undefined) {
    headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(opts.json);
  }
  const res = await fetch(path, { method: opts.method || "GET", headers, body: opts.body });
  if (res.status === 204) return null;
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const err = new Error((body.code ? body.code + ": " : "") + (body.detail || res.statusText));
    err.status = res.status;
    throw err;
  }
  return body;
}

function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }
function fmtDate(s) { return s ? new Date(s).toLocaleString() : ""; }
function fmtDur(sec) {
  if (sec === null || sec === undefined || !isFinite(sec)) return "";
  sec = Math.round(sec);
  const m = Math.floor(sec / 60), s = sec % 60;
  return m >= 60 ? `${Math.floor(m / 60)}h ${m % 60}m` : m ? `${m}m ${s}s` : `${s}s`;
}
function duration(job) {
  if (!job.started_at) return "";
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return fmtDur((end - new Date(job.started_at)) / 1000);
}
function pct(x) { return x === null || x === undefined ? "" : x.toFixed(1); }
function baseName(bm) { return bm ? [bm.arch, bm.pretrained].filter(Boolean).join(" / ") : ""; }
function errorBox(e) { return h("p", { class: "err", role: "alert" }, String(e.message || e)); }
function statusCell(s) { return h("span", { class: "status " + s }, s); }

function progressBar(job) {
  const p = job.progress || {};
  const f = job.status === "succeeded" ? 1 : p.fraction || 0;
  const eta = job.status === "running" && p.eta_seconds ? " ETA " + fmtDur(p.eta_seconds) : "";
  return h("span", {},
    h("span", { class: "bar", title: `${p.step || 0}/${p.total_steps || "?"} steps` },
      h("span", { style: `width:${(100 * f).toFixed(1)}%` })),
    ` ${(100 * f).toFixed(0)}%${eta}`);
}

// ---- jobs list ----------------------------------------------------------------------------------
function jobsPage(params) {
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10));
  const status = params.get("status") || "";
  const body = h("tbody");
  const info = h("span", { class: "muted" });
  const filter = h("select", { id: "status-filter", onchange: (ev) => {
    location.hash = "#/jobs?status=" + ev.target.value;
  } }, ["", "queued", "running", "succeeded", "failed", "cancelled"].map(
    (s) => h("option", { value: s, selected: s === status }, s || "all statuses")));
  const prev = h("button", { onclick: () => go(offset - PAGE) }, "← newer");
  const next = h("button", { onclick: () => go(offset + PAGE) }, "older →");
  function go(off) { location.hash = `#/jobs?offset=${Math.max(0, off)}&status=${status}`; }
  view.replaceChildren(
    h("h1", {}, "Jobs"),
    h("div", { class: "pager" }, filter, prev, next, info),
    h("table", { id: "jobs" },
      h("thead", {}, h("tr", {}, ["Job", "Status", "Progress", "Dataset", "Base model", "Created",
        "Duration"].map((t) => h("th", {}, t)))),
      body));
  every(3000, async () => {
    try {
      const q = `limit=${PAGE}&offset=${offset}` + (status ? `&status=${status}` : "");
      const page = await api("/v1/jobs?" + q);
      body.replaceChildren(...page.items.map((j) => h("tr", { "data-job": j.id },
        h("td", {}, h("a", { href: "#/job/" + j.id }, j.id.slice(0, 8))),
        h("td", {}, statusCell(j.status)),
        h("td", {}, progressBar(j)),
        h("td", {}, j.dataset_uri),
        h("td", {}, baseName(j.base_model)),
        h("td", {}, fmtDate(j.created_at)),
        h("td", {}, duration(j)))));
      const last = Math.min(page.total, offset + page.items.length);
      info.textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : "no jobs yet";
      prev.disabled = offset === 0;
      next.disabled = last >= page.total;
    } catch (e) { info.replaceChildren(errorBox(e)); }
  });
}

// ---- charts ---------------------------------------------------------------------------------------
const COLOURS = ["#2457a6", "#b3261e", "#2f7d4f", "#c77c02", "#6b4fa3", "#0e7c86"];

function lineChart(id, series, { width = 560, height = 220, yMin = null, yMax = null } = {}) {
  const pad = { l: 44, r: 10, t: 10, b: 24 };
  const pts = series.flatMap((s) => s.points);
  const el = svg("svg", { class: "chart", id, width, height, viewBox: `0 0 ${width} ${height}` });
  if (!pts.length) {
    el.append(svg("text", { x: 20, y: height / 2 }, "no points yet"));
    return el;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]).filter((y) => isFinite(y));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = yMin !== null ? yMin : Math.min(...ys), y1 = yMax !== null ? yMax : Math.max(...ys, y0 + 1e-9);
  const sx = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const sy = (y) => height - pad.b - ((y - y0) / (y1 - y0 || 1)) * (height - pad.t - pad.b);
  for (const t of [0, 0.5, 1]) {
    const y = y0 + t * (y1 - y0);
    el.append(svg("line", { x1: pad.l, x2: width - pad.r, y1: sy(y), y2: sy(y), stroke: "#e3e6eb" }),
      svg("text", { x: 2, y: sy(y) + 4 }, y.toPrecision(3)));
  }
  el.append(svg("text", { x: pad.l, y: height - 6 }, `step ${x0}`),
    svg("text", { x: width - pad.r - 60, y: height - 6 }, `step ${x1}`));
  series.forEach((s, i) => {
    const d = s.points.filter((p) => isFinite(p[1])).map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`);
    el.append(svg("polyline", { points: d.join(" "), fill: "none", stroke: COLOURS[i % COLOURS.length],
      "stroke-width": 1.6, "data-series": s.name }));
  });
  return el;
}

function legend(names) {
  return h("div", { class: "legend" }, names.map((n, i) =>
    h("span", {}, h("i", { style: `background:${COLOURS[i % COLOURS.length]}` }), n)));
}

function curves(points) {
  const lossKeys = [...new Set(points.flatMap((p) => Object.keys(p.losses || {})))];
  const loss = lossKeys.map((k) => ({ name: k, points: points.map((p) => [p.step, p.losses[k]]) }));
  const conf = [{ name: "confident ratio", points: points.map((p) => [p.step, p.conf_ratio]) }];
  return h("div", { class: "cards" },
    h("div", { class: "card" }, h("h2", {}, "Losses"), lineChart("chart-loss", loss), legend(lossKeys)),
    h("div", { class: "card" }, h("h2", {}, "Confident pseudo-labels"),
      lineChart("chart-conf", conf, { yMin: 0, yMax: 1 }), legend(["confident ratio"])));
}

// ---- job page ---------------------------------------------------------------------------------------
function evalTable(job) {
  const ev = job.metrics && job.metrics.eval;
  if (!ev || !ev.zero_shot) return null;
  const cols = ["zero_shot", "adapted", "adapted_ema"].filter((c) => ev[c]);
  const names = job.class_names;
  return h("div", {},
    h("h2", {}, "Accuracy on the labelled eval set (%)"),
    h("div", { class: "scroll" }, h("table", { id: "eval" },
      h("thead", {}, h("tr", {}, h("th", {}, "class"), cols.map((c) => h("th", { class: "num" }, c)))),
      h("tbody", {},
        h("tr", {}, h("th", {}, "top-1"), cols.map((c) => h("td", { class: "num" }, pct(ev[c].top1)))),
        h("tr", {}, h("th", {}, "mean per class"),
          cols.map((c) => h("td", { class: "num" }, pct(ev[c].mean_per_class)))),
        names.filter((n) => n in (ev.zero_shot.per_class || {})).map((n) => h("tr", {}, h("td", {}, n),
          cols.map((c) => h("td", { class: "num" }, pct((ev[c].per_class || {})[n])))))))));
}

function histogram(pc) {
  if (!pc || !pc.adapted) return null;
  const names = Object.keys(pc.adapted).sort((a, b) => pc.adapted[b] - pc.adapted[a]);
  const max = Math.max(1, ...names.map((n) => Math.max(pc.adapted[n], (pc.zero_shot || {})[n] || 0)));
  const w = (v) => `width:${(120 * v / max).toFixed(1)}px`;
  return h("div", {},
    h("h2", {}, `Predicted classes on ${pc.num_images} unlabeled images (zero-shot → adapted)`),
    h("div", { class: "scroll" }, h("table", { id: "histogram" },
      h("thead", {}, h("tr", {}, ["class", "zero-shot", "", "adapted", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, names.map((n) => {
        const zs = (pc.zero_shot || {})[n] || 0, ad = pc.adapted[n];
        return h("tr", {}, h("td", {}, n), h("td", { class: "num" }, zs),
          h("td", {}, h("span", { class: "hbar zs", style: w(zs) })),
          h("td", { class: "num" }, ad), h("td", {}, h("span", { class: "hbar", style: w(ad) })));
      })))));
}

function gallery(job, pc) {
  if (job.status !== "succeeded" || !job.model_id) return null;
  const names = pc && pc.adapted
    ? Object.keys(pc.adapted).sort((a, b) => pc.adapted[b] - pc.adapted[a]) : job.class_names;
  const box = h("div", { id: "gallery" });
  async function show(cls) {
    try {
      const q = `limit=12&class=${encodeURIComponent(cls)}`;
      const res = await api(`/v1/jobs/${job.id}/samples?${q}`);
      box.replaceChildren(res.items.length ? h("div", { class: "gallery" }, res.items.map((s) =>
        h("figure", {}, h("img", { src: s.thumbnail, alt: s.path, title: s.path }),
          h("figcaption", {}, s.score.toFixed(2))))) : h("p", { class: "muted" },
        "the served model predicts this class for none of the sampled images"));
    } catch (e) { box.replaceChildren(errorBox(e)); }
  }
  const pick = h("select", { id: "gallery-class", onchange: (ev) => show(ev.target.value) },
    names.map((n) => h("option", { value: n }, pc && pc.adapted ? `${n} (${pc.adapted[n]})` : n)));
  if (names.length) show(names[0]);
  return h("div", {}, h("h2", {}, "Your images under each predicted class (most confident first)"),
    h("p", {}, pick), box);
}

function logsPanel(job) {
  const pre = h("pre", { class: "logs", id: "logs" });
  let after = null;
  const tick = async () => {
    try {
      const q = after === null ? "tail=true&limit=500" : `after=${after}&limit=500`;
      const page = await api(`/v1/jobs/${job.id}/logs?${q}`);
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      for (const l of page.items) {
        pre.append(`${l.ts.slice(11, 19)} #${l.attempt} ${l.level.padEnd(7)} ${l.logger}: ${l.message}\n`);
      }
      if (page.next_after !== null) after = page.next_after;
      if (atEnd) pre.scrollTop = pre.scrollHeight;
    } catch (e) { pre.append(String(e.message) + "\n"); }
  };
  return { el: h("div", {}, h("h2", {}, "Logs"), pre), tick };
}

function jobPage(id) {
  const head = h("div", {}), charts = h("div", {}), results = h("div", {});
  const logs = logsPanel({ id });
  view.replaceChildren(h("h1", {}, "Job ", h("code", {}, id)), head, charts, results, logs.el);
  let finalRendered = false;
  const curve = [];  // points so far: a running job is polled for the new ones only
  every(3000, async () => {
    let job;
    try { job = await api("/v1/jobs/" + id); } catch (e) { head.replaceChildren(errorBox(e)); return; }
    const live = job.status === "queued" || job.status === "running";
    const cancel = h("button", { class: "danger", id: "cancel", disabled: !live || job.cancel_requested,
      onclick: async () => { try { await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); }
        catch (e) { head.append(errorBox(e)); } } }, job.cancel_requested ? "cancelling…" : "Cancel");
    head.replaceChildren(h("table", {}, h("tbody", {},
      h("tr", {}, h("th", {}, "status"), h("td", { id: "job-status" }, statusCell(job.status), " ", cancel)),
      h("tr", {}, h("th", {}, "progress"), h("td", {}, progressBar(job),
        job.progress.images_per_second ? ` · ${job.progress.images_per_second.toFixed(1)} images/s` : "")),
      h("tr", {}, h("th", {}, "dataset"), h("td", {}, job.dataset_uri,
        job.dataset.num_images !== null ? ` (${job.dataset.num_images} images)` : "")),
      h("tr", {}, h("th", {}, "classes"), h("td", {}, `${job.class_names.length}: ` +
        job.class_names.slice(0, 12).join(", ") + (job.class_names.length > 12 ? ", …" : ""))),
      h("tr", {}, h("th", {}, "base model"), h("td", {}, baseName(job.base_model))),
      h("tr", {}, h("th", {}, "created / duration"), h("td", {}, `${fmtDate(job.created_at)} · ${duration(job)}`)),
      job.model_id ? h("tr", {}, h("th", {}, "model"), h("td", {}, h("code", {}, job.model_id))) : null,
      job.error ? h("tr", {}, h("th", {}, "error"), h("td", { class: "err" }, `${job.error.code}: ${job.error.message}`)) : null,
      job.status === "succeeded" ? h("tr", {}, h("th", {}, "run health"), h("td", { id: "job-warnings" },
        job.warnings.length ? job.warnings.map((w) => h("div", { class: "err", "data-code": w.code },
          `${w.code}: ${w.message}`)) : "no warning (the label-free health rule flagged nothing)")) : null)));
    if (!finalRendered) {
      try {
        const since = curve.length ? `?after_step=${curve[curve.length - 1].step}` : "";
        const hist = await api(`/v1/jobs/${id}/history${since}`);
        curve.push(...hist.points);
        charts.replaceChildren(h("h2", {}, `Training curves (${curve.length} points)`), curves(curve));
        if (!live) {
          results.replaceChildren(...[evalTable(job), histogram(hist.predicted_classes),
            gallery(job, hist.predicted_classes)].filter(Boolean));
          finalRendered = true;
        }
      } catch (e) { charts.replaceChildren(errorBox(e)); }
    }
    await logs.tick();  // cheap with `after`; an attempt's last lines may follow its status
  });
}

// ---- submit -------------------------------------------------------------------------------------
function submitPage() {
  const field = (label, input) => [h("label", { for: input.id }, label), input];
  const inp = (id, attrs = {}) => h("input", Object.assign({ id, name: id }, attrs));
  const out = h("div", {});
  const form = h("form", { class: "grid", id: "submit-form", onsubmit: async (ev) => {
    ev.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    const num = (id, f = parseInt) => (v(id) ? f(v(id)) : undefined);
    const bm = { arch: v("arch") || undefined, pretrained: v("pretrained") || undefined,
      config_uri: v("config_uri") || undefined, checkpoint_uri: v("checkpoint_uri") || undefined,
      allow_random_init: document.getElementById("allow_random_init").checked || undefined };
    const body = {
      dataset_uri: v("dataset_uri"),
      class_names: v("class_names").split(/[\n,]/).map((s) => s.trim()).filter(Boolean),
      base_model: bm,
      params: { preset: v("preset") || undefined, epochs: num("epochs"), batch_size: num("batch_size"),
        lr: num("lr", parseFloat), seed: num("seed") },
    };
    if (v("eval_dataset_uri")) body.eval_dataset_uri = v("eval_dataset_uri");
    try {
      const job = await api("/v1/jobs", { method: "POST", json: body });
      location.hash = "#/job/" + job.id;
    } catch (e) { out.replaceChildren(errorBox(e)); }
  } },
  field("Dataset URI", inp("dataset_uri", { required: true, placeholder: "s3://bucket/prefix/ or https://…/images.zip" })),
  field("Class names", h("textarea", { id: "class_names", rows: 4, required: true, placeholder: "one per line (or comma-separated)" })),
  field("Base model arch", inp("arch", { value: "ViT-B-16" })),
  field("Pretrained tag", inp("pretrained", { placeholder: "e.g. openai" })),
  field("Model config URI", inp("config_uri", { placeholder: "optional open_clip config JSON" })),
  field("Checkpoint URI", inp("checkpoint_uri", { placeholder: "optional weights" })),
  field("Random weights (tests only)", inp("allow_random_init", { type: "checkbox" })),
  field("Eval dataset URI", inp("eval_dataset_uri", { placeholder: "optional labelled folder (one subfolder per class)" })),
  field("Preset", inp("preset", { placeholder: "optional" })),
  field("Epochs", inp("epochs", { type: "number", min: 1 })),
  field("Batch size", inp("batch_size", { type: "number", min: 1 })),
  field("Learning rate", inp("lr", { type: "number", step: "any", min: 0 })),
  field("Seed", inp("seed", { type: "number", min: 0 })),
  h("span"), h("div", {}, h("button", { class: "primary", type: "submit", id: "submit" }, "Submit job")));
  view.replaceChildren(h("h1", {}, "Submit an adaptation job"), form, out);
}

// ---- classify -----------------------------------------------------------------------------------
function topTable(title, res) {
  return h("div", { class: "card" }, h("h2", {}, title), h("table", {}, h("tbody", {},
    res.top_k.map((t) => h("tr", {}, h("td", {}, t.label), h("td", { class: "num" }, t.score.toFixed(3)))))));
}

async function classifyPage(params) {
  const pick = h("select", { id: "model" }), out = h("div", { id: "classify-out" });
  const file = h("input", { type: "file", id: "image", accept: "image/*" });
  const drop = h("div", { class: "drop", id: "drop" }, "Drop an image here, or choose one: ", file);
  view.replaceChildren(h("h1", {}, "Classify an image"), h("p", {}, "Adapted model: ", pick), drop, out);
  let models = [];
  try {
    models = (await api("/v1/models?limit=100")).items;
    pick.replaceChildren(...models.map((m) => h("option", { value: m.id, selected: m.id === params.get("model") },
      `${m.id.slice(0, 8)} · ${m.class_names.length} classes · ${fmtDate(m.created_at)}`)));
  } catch (e) { out.replaceChildren(errorBox(e)); }
  async function run(blob) {
    const m = models.find((x) => x.id === pick.value);
    if (!m) { out.replaceChildren(errorBox("no adapted model yet")); return; }
    const form = () => { const f = new FormData(); f.append("images", blob, "image"); f.append("top_k", "5"); return f; };
    const zsForm = form();
    zsForm.append("class_names", JSON.stringify(m.class_names));
    zsForm.append("base_model", JSON.stringify(m.base_model));
    const [ad, zs] = await Promise.allSettled([
      api(`/v1/models/${m.id}/classify`, { method: "POST", body: form() }),
      api("/v1/classify", { method: "POST", body: zsForm })]);
    const cell = (title, r) => r.status === "fulfilled" ? topTable(title, r.value.results[0])
      : h("div", { class: "card" }, h("h2", {}, title), errorBox(r.reason));
    out.replaceChildren(h("div", { class: "cards" },
      h("div", { class: "card" }, h("img", { src: URL.createObjectURL(blob), alt: "your image", style: "width:160px;image-rendering:pixelated" })),
      cell("Adapted", ad), cell("Zero-shot", zs)));
  }
  file.addEventListener("change", () => file.files[0] && run(file.files[0]));
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files[0]) run(ev.dataTransfer.files[0]);
  });
}

// ---- models -------------------------------------------------------------------------------------
function modelsPage(params) {
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10));
  const body = h("tbody"), info = h("span", { class: "muted" });
  const go = (off) => { location.hash = `#/models?offset=${Math.max(0, off)}`; };
  const prev = h("button", { onclick: () => go(offset - PAGE) }, "← newer");
  const next = h("button", { onclick: () => go(offset + PAGE) }, "older →");
  view.replaceChildren(h("h1", {}, "Models"), h("div", { class: "pager" }, prev, next, info),
    h("table", { id: "models" }, h("thead", {}, h("tr", {}, ["Model", "Classes", "Size", "Source job",
      "Top-1 zero-shot → adapted", "Created", ""].map((t) => h("th", {}, t)))), body));
  async function load() {
    try {
      const page = await api(`/v1/models?limit=${PAGE}&offset=${offset}`);
      body.replaceChildren(...page.items.map((m) => {
        const zs = m.metrics.zero_shot, ad = m.metrics.adapted;
        return h("tr", { "data-model": m.id },
          h("td", {}, h("code", {}, m.id.slice(0, 8))),
          h("td", { title: m.class_names.join(", ") }, `${m.class_names.length}: ` +
            m.class_names.slice(0, 5).join(", ") + (m.class_names.length > 5 ? ", …" : "")),
          h("td", { class: "num" }, (m.size_bytes / 1e6).toFixed(1) + " MB"),
          h("td", {}, h("a", { href: "#/job/" + m.job_id }, m.job_id.slice(0, 8))),
          h("td", {}, zs && ad ? `${pct(zs.top1)} → ${pct(ad.top1)}` : h("span", { class: "muted" }, "no eval set")),
          h("td", {}, fmtDate(m.created_at)),
          h("td", {}, h("a", { href: "#/classify?model=" + m.id }, "classify"), " ",
            h("button", { class: "danger", "data-delete": m.id, onclick: async () => {
              if (!confirm(`Delete model ${m.id}? Its weights are removed; the job stays.`)) return;
              try { await api("/v1/models/" + m.id, { method: "DELETE" }); load(); }
              catch (e) { info.replaceChildren(errorBox(e)); }
            } }, "Delete")));
      }));
      const last = Math.min(page.total, offset + page.items.length);
      info.textContent = page.total ? `${offset + 1}–${last} of ${page.total}` : "no models yet";
      prev.disabled = offset === 0;
      next.disabled = last >= page.total;
    } catch (e) { info.replaceChildren(errorBox(e)); }
  }
  load();
}

// ---- router -------------------------------------------------------------------------------------
function route() {
  timers.forEach(clearInterval);
  timers = [];
  const [path, query] = (location.hash.slice(1) || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  document.querySelectorAll("[data-nav]").forEach((a) =>
    a.classList.toggle("active", a.dataset.nav === parts[0] || (parts[0] === "job" && a.dataset.nav === "jobs")));
  if (parts[0] === "job" && parts[1]) jobPage(parts[1]);
  else if (parts[0] === "submit") submitPage();
  else if (parts[0] === "classify") classifyPage(params);
  else if (parts[0] === "models") modelsPage(params);
  else jobsPage(params);
}

document.getElementById("api-key").value = key();
document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  localStorage.setItem("must-api-key", document.getElementById("api-key").value.trim());
  route();
});
window.addEventListener("hashchange", route);
route();
