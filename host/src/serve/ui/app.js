// The graft UI: plain JS over the JSON API (docs/API.md) and its event stream.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { jobs: [], current: null, losses: [], plugins: null, adapters: [], schema: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

let toastTimer = null;
function toast(message, info) {
  const t = $("toast");
  t.textContent = message;
  t.className = info ? "info" : "";
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => t.className = "hidden", 6000);
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
  const r = await fetch(path, opts);
  const data = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(data.error || `${r.status} ${r.statusText}`);
  return data;
}

// ---- pages ----
function showPage(name) {
  for (const b of document.querySelectorAll("nav button")) b.classList.toggle("active", b.dataset.page === name);
  for (const p of document.querySelectorAll(".page")) p.classList.toggle("hidden", p.id !== "page-" + name);
  if (name === "generate") loadAdapters();
  if (name === "plugins") loadPlugins();
}
for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => showPage(b.dataset.page));

// ---- status ----
async function loadStatus() {
  const s = await api("GET", "/api/status");
  $("status-line").textContent = `${s.model ? "model " + s.model : "no model loaded"} · ${s.device} · graft ${s.version}`;
}

// ---- plugins ----
async function loadPlugins() {
  renderPlugins(await api("GET", "/api/plugins"));
}
function renderPlugins(p) {
  state.plugins = p;
  $("pl-dirs").textContent = "folders: " + (p.dirs.join(", ") || "none") + (p.watching ? " (watched)" : "");
  const body = $("pl-table").querySelector("tbody");
  body.replaceChildren(...p.files.filter((f) => f.status !== "not a plugin").map((f) => el("tr", {},
    el("td", { text: f.id || "–" }), el("td", { text: f.version || "–" }), el("td", { text: f.abi_version ?? "–" }),
    el("td", { text: f.status }), el("td", { text: f.path }), el("td", { class: "problem", text: f.error || "" }))));
  $("pl-log").replaceChildren(...p.log.slice().reverse().map((m) => el("li", { text: m })));
  const select = $("train-plugin");
  const was = select.value;
  select.replaceChildren(...p.active.map((id) => el("option", { text: id })));
  if (p.active.includes(was)) select.value = was; else if (p.active.includes("lora")) select.value = "lora";
  if (!$("train-config").value.trim() || $("train-config").dataset.auto === "1") fillStrategyConfig(); else refreshConfigForm();
  const cmp = $("cmp-strategies");
  if (!cmp.value.trim()) cmp.value = JSON.stringify(p.active.map((id) => ({ name: id, plugin: id, config: {} })), null, 1);
}
// ---- strategy settings: a form drawn from the plugin's config schema, in step with the JSON ----
function activePlugin(id) {
  return state.plugins && state.plugins.files.find((x) => x.id === id && x.status === "active");
}
// A new strategy was picked: its schema's defaults (or its config example without a schema).
function fillStrategyConfig() {
  const f = activePlugin($("train-plugin").value);
  const schema = (f && f.config_schema) || null;
  let text = (f && f.config_example) || "{}";
  if (schema) {
    const config = {};
    for (const k of schema.keys) if (k.default !== null) config[k.key] = k.default;
    text = JSON.stringify(config, null, 1);
  } else {
    try { text = JSON.stringify(JSON.parse(text), null, 1); } catch (_) { /* keep as written */ }
  }
  $("train-config").value = text;
  $("train-config").dataset.auto = "1";
  refreshConfigForm();
}
// Redraws the form for the selected strategy's schema and fills it from the JSON.
function refreshConfigForm() {
  const f = activePlugin($("train-plugin").value);
  state.schema = (f && f.config_schema) || null;
  const box = $("train-config-form");
  box.replaceChildren(...(state.schema ? state.schema.keys.map(configField) : []));
  syncFormFromJson();
  showConfigViews();
}
function showConfigViews() {
  const has = !!state.schema;
  $("train-config-toggle").classList.toggle("hidden", !has);
  $("train-config-note").classList.toggle("hidden", has);
  $("train-config-form").classList.toggle("hidden", !has);
  $("train-config-label").classList.toggle("hidden", has && !$("train-config-raw").checked);
}
function rangeText(k) {
  if (k.min == null && k.max == null) return "";
  if (k.min != null && k.max != null) return `${k.min_exclusive ? "(" : "["}${k.min}, ${k.max}${k.max_exclusive ? ")" : "]"}`;
  if (k.min != null) return `${k.min_exclusive ? ">" : "≥"} ${k.min}`;
  return `${k.max_exclusive ? "<" : "≤"} ${k.max}`;
}
function configField(k) {
  const id = "cfg-" + k.key;
  const def = k.type === "string_list" ? JSON.stringify(k.default) : String(k.default);
  const range = rangeText(k);
  const help = el("span", { class: "help", text: [k.help, "default " + (k.default === null ? "none" : def), range && "range " + range].filter(Boolean).join(" · ") });
  const problem = el("span", { class: "problem", id: id + "-problem" });
  let input;
  if (k.type === "bool") {
    input = el("input", { id, type: "checkbox" });
  } else if (k.type === "enum") {
    input = el("select", { id }, ...k.choices.map((c) => el("option", { value: c, text: c })));
  } else if (k.type === "string_list") {
    input = el("textarea", { id, rows: Math.max(2, Math.min(5, (k.default || []).length)), spellcheck: "false", title: "one a line" });
  } else if (k.type === "int" || k.type === "float") {
    input = el("input", { id, type: "number", step: k.type === "int" ? "1" : "any" });
    if (k.min != null) input.min = k.type === "int" && k.min_exclusive ? Math.floor(k.min) + 1 : k.min;
    if (k.max != null) input.max = k.type === "int" && k.max_exclusive ? Math.ceil(k.max) - 1 : k.max;
    if (k.nullable) input.placeholder = k.default === null ? "none" : "default " + def;
  } else {
    input = el("input", { id, type: "text" });
  }
  input.dataset.key = k.key;
  input.addEventListener(k.type === "bool" || k.type === "enum" ? "change" : "input", () => formChanged(k, input));
  const label = k.type === "bool" ? el("label", { class: "check", for: id }, input, k.key) : el("label", { for: id, text: k.key });
  return el("div", { class: "field", "data-key": k.key }, label, ...(k.type === "bool" ? [] : [input]), help, problem);
}
// The value a field holds: {value} (undefined: the key is left out, so the default applies), or {error}.
function readField(k, input) {
  if (k.type === "bool") return { value: input.checked };
  if (k.type === "enum" || k.type === "string") return { value: input.value };
  if (k.type === "string_list") return { value: input.value.split("\n").map((s) => s.trim()).filter((s) => s) };
  if (!input.value.trim()) return { value: undefined };
  const v = Number(input.value);
  if (!Number.isFinite(v) || (k.type === "int" && !Number.isInteger(v))) return { error: `${k.key}: expected ${k.type === "int" ? "an integer" : "a number"}` };
  if (k.min != null && (v < k.min || (k.min_exclusive && v === k.min))) return { error: `${k.key}: must be ${k.min_exclusive ? ">" : "≥"} ${k.min}` };
  if (k.max != null && (v > k.max || (k.max_exclusive && v === k.max))) return { error: `${k.key}: must be ${k.max_exclusive ? "<" : "≤"} ${k.max}` };
  return { value: v };
}
function writeField(k, input, v) {
  if (k.type === "bool") input.checked = !!v;
  else if (k.type === "string_list") input.value = Array.isArray(v) ? v.join("\n") : "";
  else input.value = v === null || v === undefined ? "" : String(v);
}
function jsonConfig() {
  const v = JSON.parse($("train-config").value || "{}");
  if (v === null || typeof v !== "object" || Array.isArray(v)) throw new Error("it must be a JSON object");
  return v;
}
// Form -> JSON: the edited key only (a JSON that does not parse is rebuilt from the whole form).
function formChanged(k, input) {
  const r = readField(k, input);
  $("cfg-" + k.key + "-problem").textContent = r.error || "";
  if (r.error) return;
  let config;
  try { config = jsonConfig(); } catch (_) {
    config = {};
    for (const key of state.schema.keys) { const x = readField(key, $("cfg-" + key.key)); if (x.value !== undefined && !x.error) config[key.key] = x.value; }
  }
  if (r.value === undefined) delete config[k.key]; else config[k.key] = r.value;
  $("train-config").value = JSON.stringify(config, null, 1);
  $("train-config").dataset.auto = "0";
  $("train-config-error").textContent = "";
}
// JSON -> form: every field shows the JSON's value, or its default when the key is absent.
function syncFormFromJson() {
  $("train-config-error").textContent = "";
  if (!state.schema) return;
  let config;
  try { config = jsonConfig(); } catch (e) { $("train-config-error").textContent = "strategy config: " + e.message; return; }
  const unknown = Object.keys(config).filter((key) => !state.schema.keys.some((k) => k.key === key));
  if (unknown.length) $("train-config-error").textContent = "not in the plugin's schema: " + unknown.join(", ");
  for (const k of state.schema.keys) {
    writeField(k, $("cfg-" + k.key), k.key in config ? config[k.key] : k.default);
    $("cfg-" + k.key + "-problem").textContent = "";
  }
}
$("train-plugin").addEventListener("change", fillStrategyConfig);
$("train-config").addEventListener("input", () => { $("train-config").dataset.auto = "0"; syncFormFromJson(); });
$("train-config-raw").addEventListener("change", showConfigViews);
$("pl-rescan").addEventListener("click", async () => {
  try { const r = await api("POST", "/api/plugins/rescan"); renderPlugins(r.plugins); } catch (e) { toast(e.message); }
});

// ---- training ----
function num(id) { return Number($(id).value); }
function lines(id) { return $(id).value.split("\n").map((s) => s.trim()).filter((s) => s && !s.startsWith("#")); }

$("train-start").addEventListener("click", async () => {
  let config;
  try { config = JSON.parse($("train-config").value || "{}"); } catch (e) { toast("strategy config is not valid JSON: " + e.message); return; }
  if ($("train-unet-lr").value.trim()) config.unet_lr = Number($("train-unet-lr").value);
  if ($("train-te-lr").value.trim()) config.text_encoder_lr = Number($("train-te-lr").value);
  const req = {
    name: $("train-name").value.trim(), plugin: $("train-plugin").value, strategy_config: config,
    dataset_dir: $("train-dataset").value.trim(), resolution: num("train-resolution"), steps: num("train-steps"),
    seed: num("train-seed"), lr_schedule: $("train-schedule").value, optimizer: $("train-optimizer").value,
    warmup_steps: num("train-warmup"),
    sample_every: num("train-sample-every"), sample_prompts: lines("train-prompts"),
    gradient_checkpointing: $("train-checkpointing").checked,
  };
  if ($("train-val-split").value.trim()) {
    req.validation_split = num("train-val-split");
    req.validate_every = num("train-validate-every");
  }
  try {
    const job = await api("POST", "/api/train", req);
    toast(`run #${job.id} queued`, true);
    await selectJob(job.id);
  } catch (e) { toast(e.message); }
});

for (const action of ["pause", "resume", "stop"]) {
  $("job-" + action).addEventListener("click", async () => {
    if (!state.current) return;
    try { await api("POST", `/api/jobs/${state.current.id}/${action}`); } catch (e) { toast(e.message); }
  });
}

async function loadJobs() {
  state.jobs = await api("GET", "/api/jobs");
  renderJobs();
  if (!state.current) {
    const train = state.jobs.filter((j) => j.kind === "train");
    if (train.length) await selectJob(train[train.length - 1].id);
  } else {
    await selectJob(state.current.id);
  }
}

async function selectJob(id) {
  const job = await api("GET", `/api/jobs/${id}`);
  state.current = job;
  state.losses = job.losses.slice();
  upsertJob(job);
  renderJob();
  drawLoss();
  $("samples").replaceChildren();
  for (const s of job.samples) addSample(s.step, s.url);
}

function upsertJob(job) {
  const i = state.jobs.findIndex((j) => j.id === job.id);
  if (i >= 0) state.jobs[i] = job; else state.jobs.push(job);
  renderJobs();
}

function renderJobs() {
  $("jobs-table").querySelector("tbody").replaceChildren(...state.jobs.filter((j) => j.kind === "train").map((j) => {
    const tr = el("tr", { onclick: () => selectJob(j.id) }, el("td", { text: j.id }), el("td", { text: j.kind }),
      el("td", { text: j.name }), el("td", { text: j.waiting ? j.status + " (waiting for a rebuild)" : j.status }),
      el("td", { text: `${j.step}/${j.total}` }));
    if (state.current && state.current.id === j.id) tr.className = "current";
    return tr;
  }));
  $("cmp-table").querySelector("tbody").replaceChildren(...state.jobs.filter((j) => j.kind === "compare").map((j) =>
    el("tr", {}, el("td", { text: j.id }), el("td", { text: j.name }), el("td", { text: j.status + (j.error ? ": " + j.error : "") }),
      el("td", {}, j.report_url ? el("a", { href: "#", text: "view report", onclick: (e) => { e.preventDefault(); $("cmp-report").src = j.report_url; } }) : "–"))));
}

function fmt(v, digits) { return v === null || v === undefined ? "–" : Number(v).toPrecision(digits); }

function renderJob() {
  const j = state.current;
  if (!j) return;
  $("job-title").textContent = `#${j.id} ${j.name} (${j.plugin || j.kind})`;
  $("job-status").textContent = j.waiting ? j.status + ", waiting for a rebuild" : j.status;
  $("job-step").textContent = `${j.step} / ${j.total}`;
  $("job-loss").textContent = fmt(j.loss, 4);
  $("job-val-loss").textContent = fmt(j.val_loss, 4);
  $("job-lr").textContent = j.lr === null ? "–" : Number(j.lr).toExponential(2);
  $("job-speed").textContent = fmt(j.it_per_s, 3);
  $("job-progress").max = j.total || 1;
  $("job-progress").value = j.step;
  $("job-error").textContent = j.error || j.waiting || "";
  $("job-exports").textContent = j.exports.length ? "adapter files: " + j.exports.join(", ") : "";
  const live = ["running", "paused", "queued"].includes(j.status);
  $("job-pause").disabled = j.status !== "running";
  $("job-resume").disabled = j.status !== "paused";
  $("job-stop").disabled = !live;
}

function addSample(step, url) {
  if ([...document.querySelectorAll("#samples img")].some((i) => i.getAttribute("src") === url)) return;
  $("samples").prepend(el("figure", {}, el("img", { src: url, alt: `sample at step ${step}` }), el("figcaption", { text: `step ${step}` })));
}

function drawLoss() {
  const c = $("loss-canvas");
  const g = c.getContext("2d");
  const pts = state.losses;
  c.dataset.points = String(pts.length);
  g.clearRect(0, 0, c.width, c.height);
  const L = 50, R = 10, T = 10, B = 24, W = c.width - L - R, H = c.height - T - B;
  g.strokeStyle = "#c3c9d5"; g.strokeRect(L, T, W, H);
  g.fillStyle = "#4a5468"; g.font = "11px sans-serif";
  if (pts.length === 0) { g.fillText("no loss yet", L + 8, T + 16); return; }
  const vals = pts.filter((p) => p.val_loss !== undefined && p.val_loss !== null);
  const xs = pts.map((p) => p.step), ys = pts.map((p) => p.loss).concat(vals.map((p) => p.val_loss));
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const X = (s) => L + (s - x0) / (x1 - x0) * W, Y = (v) => T + (1 - (v - y0) / (y1 - y0)) * H;
  g.fillText(y1.toPrecision(3), 4, T + 8); g.fillText(y0.toPrecision(3), 4, T + H);
  g.fillText(String(x0), L, c.height - 6); g.fillText(String(x1), L + W - 20, c.height - 6);
  g.strokeStyle = "#9db8f5"; g.lineWidth = 1; g.beginPath();
  pts.forEach((p, i) => i ? g.lineTo(X(p.step), Y(p.loss)) : g.moveTo(X(p.step), Y(p.loss)));
  g.stroke();
  // Smoothed curve: an exponential moving average, as in loss.png.
  const beta = Math.min(0.9, Math.max(0, 1 - 10 / pts.length));
  let ema = ys[0];
  g.strokeStyle = "#2f6fed"; g.lineWidth = 2; g.beginPath();
  pts.forEach((p, i) => { ema = i ? beta * ema + (1 - beta) * p.loss : p.loss; i ? g.lineTo(X(p.step), Y(ema)) : g.moveTo(X(p.step), Y(ema)); });
  g.stroke();
  for (const p of pts) { g.fillStyle = "#2f6fed"; g.fillRect(X(p.step) - 1.5, Y(p.loss) - 1.5, 3, 3); }
  // Stage boundaries (dashed, labelled) and the validation loss (dark squares), as in loss.png.
  g.setLineDash([4, 4]); g.strokeStyle = "#969696"; g.lineWidth = 1;
  for (const p of pts.filter((p) => p.stage && p.step > x0)) {
    g.beginPath(); g.moveTo(X(p.step), T); g.lineTo(X(p.step), T + H); g.stroke();
    g.fillStyle = "#707070"; g.fillText(p.stage, X(p.step) + 3, T + 11);
  }
  g.setLineDash([]);
  if (vals.length) {
    g.strokeStyle = "#1b3f8a"; g.fillStyle = "#1b3f8a"; g.beginPath();
    vals.forEach((p, i) => i ? g.lineTo(X(p.step), Y(p.val_loss)) : g.moveTo(X(p.step), Y(p.val_loss)));
    g.stroke();
    for (const p of vals) g.fillRect(X(p.step) - 3.5, Y(p.val_loss) - 3.5, 7, 7);
    g.fillText("■ validation", L + W - 80, T + 12);
  }
  c.dataset.validation = String(vals.length);
}

// ---- dataset ----
$("ds-load").addEventListener("click", loadDataset);
async function loadDataset() {
  const dir = $("ds-dir").value.trim();
  let d;
  try { d = await api("GET", `/api/dataset?dir=${encodeURIComponent(dir)}&resolution=${num("ds-resolution")}`); } catch (e) { toast(e.message); return; }
  const buckets = Object.entries(d.buckets).map(([k, n]) => `${k}: ${n}`).join(", ");
  $("ds-summary").replaceChildren(
    el("p", { text: `${d.images.length} images · buckets ${buckets || "none"}` }),
    ...d.problems.map((p) => el("p", { class: "problem", text: p })));
  $("ds-images").replaceChildren(...d.images.map((img) => {
    const ta = el("textarea", { rows: "3" }); ta.value = img.caption || "";
    const save = el("button", { type: "button", text: "Save caption", onclick: async () => {
      try { await api("PUT", "/api/dataset/caption", { dir, name: img.name, caption: ta.value }); toast(`saved ${img.caption_file}`, true); }
      catch (e) { toast(e.message); }
    } });
    const size = img.width ? `${img.width}×${img.height} → bucket ${img.bucket || "–"}` : "size unknown";
    return el("div", { class: "card" + (img.problems.length ? " bad" : "") },
      el("img", { src: `/api/dataset/image?dir=${encodeURIComponent(dir)}&name=${encodeURIComponent(img.name)}`, alt: img.name }),
      el("div", { class: "small", text: `${img.name} · ${size}` }),
      ...img.problems.map((p) => el("div", { class: "problem", text: p })), ta, save);
  }));
  if (!$("train-dataset").value) $("train-dataset").value = dir;
}

// ---- generate ----
$("gen-refresh").addEventListener("click", loadAdapters);
async function loadAdapters() {
  const list = await api("GET", "/api/adapters");
  const checked = new Map([...document.querySelectorAll("#gen-adapters .adapter")].map((d) => [d.dataset.name, d]));
  $("gen-adapters").replaceChildren(...(list.length ? list.map((a) => {
    const old = checked.get(a.name);
    const cb = el("input", { type: "checkbox" }); cb.checked = old ? old.querySelector("input[type=checkbox]").checked : false;
    const w = el("input", { type: "number", step: "0.1", value: old ? old.querySelector("input[type=number]").value : "1" });
    const d = el("div", { class: "adapter", title: a.path }, cb, el("span", { text: `${a.name} (${a.source})` }), w);
    d.dataset.name = a.name;
    return d;
  }) : [el("p", { class: "small", text: "no adapters yet: train one, or start the server with --lora-dir" })]));
}

$("gen-run").addEventListener("click", async () => {
  const adapters = [...document.querySelectorAll("#gen-adapters .adapter")]
    .filter((d) => d.querySelector("input[type=checkbox]").checked)
    .map((d) => ({ name: d.dataset.name, weight: Number(d.querySelector("input[type=number]").value) }));
  const req = {
    prompt: $("gen-prompt").value, negative_prompt: $("gen-negative").value, width: num("gen-width"), height: num("gen-height"),
    steps: num("gen-steps"), guidance: num("gen-guidance"), scheduler: $("gen-scheduler").value, seed: num("gen-seed"), adapters,
  };
  $("gen-run").disabled = true;
  $("gen-progress").textContent = "generating…";
  try {
    const r = await api("POST", "/api/generate", req);
    showImage(r);
    $("gen-progress").textContent = `done in ${r.seconds.toFixed(1)} s`;
  } catch (e) { toast(e.message); $("gen-progress").textContent = ""; }
  $("gen-run").disabled = false;
});

function showImage(r) {
  $("gen-result").replaceChildren(el("img", { id: "gen-image", src: r.url, alt: r.request.prompt }));
  $("gen-params").textContent = r.parameters;
}
async function loadHistory() {
  const h = await api("GET", "/api/generate/history");
  $("gen-history").replaceChildren();
  for (const r of h) addHistory(r);
}
function addHistory(r) {
  $("gen-history").prepend(el("figure", { onclick: () => showImage(r) }, el("img", { src: r.url, alt: r.request.prompt }), el("figcaption", { text: `#${r.id} seed ${r.request.seed}` })));
}

// ---- compare ----
$("cmp-start").addEventListener("click", async () => {
  let strategies;
  try { strategies = JSON.parse($("cmp-strategies").value); } catch (e) { toast("strategies is not valid JSON: " + e.message); return; }
  const req = {
    name: $("cmp-name").value.trim(), dataset_dir: $("cmp-dataset").value.trim(), resolution: num("cmp-resolution"),
    steps: num("cmp-steps"), seed: num("cmp-seed"), prompts: lines("cmp-prompts"), strategies,
  };
  try { const j = await api("POST", "/api/compare", req); upsertJob(j); toast(`compare #${j.id} queued`, true); } catch (e) { toast(e.message); }
});

// ---- live events ----
function connect() {
  const es = new EventSource("/api/events");
  es.addEventListener("hello", () => { loadJobs().catch(() => {}); });
  es.addEventListener("job", (e) => {
    const j = JSON.parse(e.data);
    if (state.current && state.current.id === j.id) { Object.assign(state.current, { ...j, losses: state.current.losses }); renderJob(); }
    const i = state.jobs.findIndex((x) => x.id === j.id);
    if (i >= 0) state.jobs[i] = j; else state.jobs.push(j);
    renderJobs();
    if (j.status === "done") loadAdapters().catch(() => {});
  });
  es.addEventListener("train.step", (e) => {
    const d = JSON.parse(e.data);
    if (!state.current || state.current.id !== d.id) return;
    Object.assign(state.current, { step: d.step, lr: d.lr, it_per_s: d.it_per_s, status: "running" });
    // An event may repeat a step the job's snapshot already had.
    const last = state.losses.length ? state.losses[state.losses.length - 1].step : -1;
    if (d.val_loss !== null && d.val_loss !== undefined) state.current.val_loss = d.val_loss;
    if (d.loss !== null && d.step > last) {
      state.current.loss = d.loss;
      state.losses.push({ step: d.step, loss: d.loss, lr: d.lr, val_loss: d.val_loss, stage: d.stage });
    }
    renderJob(); drawLoss();
  });
  es.addEventListener("train.sample", (e) => {
    const d = JSON.parse(e.data);
    if (state.current && state.current.id === d.id) for (const u of d.urls) addSample(d.step, u);
  });
  es.addEventListener("plugins", (e) => {
    const d = JSON.parse(e.data);
    renderPlugins(d.plugins);
    toast(d.messages.join("\n"), true);
  });
  es.addEventListener("generate.progress", (e) => {
    const d = JSON.parse(e.data);
    $("gen-progress").textContent = `step ${d.step} / ${d.total}`;
  });
  es.addEventListener("generate.done", (e) => addHistory(JSON.parse(e.data)));
  es.onerror = () => { $("status-line").textContent = "reconnecting…"; setTimeout(() => loadStatus().catch(() => {}), 2000); };
}

loadStatus().catch((e) => toast(e.message));
loadPlugins().catch((e) => toast(e.message));
loadHistory().catch(() => {});
drawLoss();
connect();
