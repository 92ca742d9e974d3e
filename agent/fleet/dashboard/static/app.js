// The dashboard page: one WebSocket brings rows (only the devices that changed, batched by the server),
// broker state, command replies and deploy progress; the table is keyed by device, so an update touches
// one row, and sorting/filtering happen at most once per animation frame.
"use strict";

const $ = id => document.getElementById(id);
const rows = new Map();      // device -> latest row
const trs = new Map();       // device -> <tr>
const FULL_WINDOW_S = 15 * 60;
let canDeploy = false;
let focus = null;            // {device, history: [...points], results: [...], since}
let renderQueued = false;
let modelsQueued = false;
let socket = null;

// -- token and operator name ---------------------------------------------------------------------------------
(function takeToken() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("lepton-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + "#/");
  }
})();
$("token").value = sessionStorage.getItem("lepton-token") || "";
$("token").addEventListener("change", e => sessionStorage.setItem("lepton-token", e.target.value));
$("operator").value = localStorage.getItem("lepton-operator") || "";
$("operator").addEventListener("change", e => localStorage.setItem("lepton-operator", e.target.value));

// -- formatting ------------------------------------------------------------------------------------------------
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const num = (v, digits = 1) => v === null || v === undefined ? "" : Number(v).toFixed(digits);
function ago(ts) {
  if (!ts) return "";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}
function rowCells(r) {
  const p = r.pipelines || [];
  const list = (f) => p.map(x => `<div data-pipeline="${esc(x.name)}">${f(x)}</div>`).join("");
  const d = r.deploy;
  const deploy = d ? `${esc(d.model)}@${esc(d.version)} ${esc(d.state)}` +
    (d.state !== "active" && d.progress !== null && d.progress !== undefined ? ` ${Math.round(d.progress * 100)}%` : "") +
    (d.reason ? ` (${esc(d.reason)})` : "") : "";
  const waits = Object.keys(r.waiting || {}).length, waiter = x => (r.waiting || {})[x.name];
  return `<td><a href="#/device/${encodeURIComponent(r.device)}">${esc(r.device)}</a></td>` +
    `<td data-col="presence"><span class="pill ${esc(r.presence)}">${esc(r.presence)}</span>` +
    (r.problems.length ? ` <span class="problem">${esc(r.problems.join(", "))}</span>` : "") +
    (waits ? ` <span class="badge waiting">waiting for a model</span>` : "") + `</td>` +
    `<td data-col="last-seen" data-ts="${r.last_seen || ""}">${ago(r.last_seen)}</td>` +
    `<td>${esc((r.groups || []).join(", "))}</td><td>${esc(r.profile)}</td><td>${esc(r.backend)}</td>` +
    `<td>${list(x => waiter(x) ? `${esc(x.name)}: <span class="badge waiting">waits for ${esc(r.waiting[x.name])}</span>`
      : `${esc(x.name)}: ${esc(x.model)}@${esc(x.version)}${x.variant ? ` (${esc(x.variant)})` : ""}`)}</td>` +
    `<td data-col="fps">${list(x => waiter(x) ? "" : num(x.fps))}</td><td data-col="p95">${list(x => waiter(x) ? "" : num(x.p95))}</td>` +
    `<td data-col="cpu">${num(r.cpu)}</td><td>${num(r.rss_mb, 0)}</td><td>${num(r.temp_c)}</td>` +
    `<td>${esc((r.throttled || []).join(" "))}</td><td>${r.spool ?? ""}</td>` +
    `<td>${r.governor ?? ""}${r.governor_paused ? " paused" : ""}</td><td data-col="deploy">${deploy}</td>`;
}

// -- the fleet table -------------------------------------------------------------------------------------------
const RANK = {offline: 0, stale: 0, stopped: 1, unknown: 2, online: 3};
const isWaiting = r => Object.keys(r.waiting || {}).length > 0;
// Problems first, then devices waiting for a model (neither failing nor healthy), then the rest.
const standing = r => r.problems.length ? 0 : isWaiting(r) ? 1 : 2;
function order(a, b) {
  const pa = standing(a), pb = standing(b);
  if (pa !== pb) return pa - pb;
  const ra = RANK[a.presence] ?? 2, rb = RANK[b.presence] ?? 2;
  return ra !== rb ? ra - rb : a.device < b.device ? -1 : 1;
}
function matches(r, group, text, state) {
  if (group && !(r.groups || []).includes(group)) return false;
  if (state === "problems" && !r.problems.length) return false;
  if (state === "waiting" && !isWaiting(r)) return false;
  if (!text) return true;
  const hay = [r.device, r.presence, r.profile, r.backend, ...(r.groups || []), ...r.problems,
    ...(r.pipelines || []).map(p => `${p.name} ${p.model}@${p.version}`), r.deploy ? r.deploy.state : "",
    ...(isWaiting(r) ? ["waiting", ...Object.values(r.waiting)] : [])].join(" ").toLowerCase();
  return hay.includes(text);
}
function queueRender() {
  if (!renderQueued) { renderQueued = true; requestAnimationFrame(renderFleet); }
}
function renderFleet() {
  renderQueued = false;
  const group = $("group-filter").value, text = $("text-filter").value.trim().toLowerCase(), state = $("state-filter").value;
  const sorted = [...rows.values()].sort(order);
  const body = $("fleet-rows");
  let shown = 0, i = 0;
  for (const r of sorted) {
    const tr = trs.get(r.device);
    tr.hidden = !matches(r, group, text, state);
    shown += !tr.hidden;
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    i++;
  }
  $("shown").textContent = `${shown} of ${rows.size} devices`;
  const groups = new Set();
  for (const r of rows.values()) for (const g of r.groups || []) groups.add(g);
  const select = $("group-filter");
  const have = new Set([...select.options].map(o => o.value));
  for (const g of [...groups].sort()) if (!have.has(g)) select.add(new Option(g, g));
}
function applyRows(list, counts) {
  for (const r of list) {
    rows.set(r.device, r);
    let tr = trs.get(r.device);
    if (!tr) { tr = document.createElement("tr"); tr.dataset.device = r.device; trs.set(r.device, tr); }
    tr.className = r.problems.length ? "has-problem" : isWaiting(r) ? "is-waiting" : "";
    tr.dataset.waiting = isWaiting(r) ? "yes" : "";
    tr.dataset.presence = r.presence;
    tr.innerHTML = rowCells(r);
    if (focus && focus.device === r.device) showFacts(r);
  }
  if (counts) for (const k of ["online", "stale", "offline", "problems", "waiting"]) $(`count-${k}`).textContent = counts[k];
  queueRender();
  if (!$("models-view").hidden && !modelsQueued) {  // who runs what changes with the rows: at most every 2 s
    modelsQueued = true;
    setTimeout(() => { modelsQueued = false; loadModels(); }, 2000);
  }
}
$("group-filter").addEventListener("change", queueRender);
$("text-filter").addEventListener("input", queueRender);
$("state-filter").addEventListener("change", queueRender);
setInterval(() => {  // "last seen" ages without a message
  for (const td of document.querySelectorAll("td[data-col=last-seen]")) td.textContent = ago(Number(td.dataset.ts));
}, 5000);

// -- the push channel ------------------------------------------------------------------------------------------
function connect() {
  socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  socket.onopen = () => { if (focus) sendFocus(); };
  socket.onmessage = e => {
    const m = JSON.parse(e.data);
    if (m.type === "rows") applyRows(m.rows, m.counts);
    else if (m.type === "broker") showBroker(m);
    else if (m.type === "events") m.events.forEach(onEvent);
    else if (m.type === "models") { if (!$("models-view").hidden) loadModels(); }
    else if (m.type === "device") onDeviceNews(m);
  };
  socket.onclose = () => {
    showBanner("The dashboard server is unreachable: reconnecting…");
    setTimeout(connect, 1000);
  };
}
function showBanner(text) { $("banner").textContent = text; $("banner").hidden = !text; }
function showBroker(m) {
  canDeploy = m.can_deploy;
  $("readonly").hidden = canDeploy;
  for (const b of ["deploy-button", "rollback-button"]) $(b).disabled = !canDeploy;
  showBanner(m.connected ? "" : `Broker ${m.broker} unreachable since ${new Date(m.since * 1000).toLocaleTimeString()}: ` +
    "devices show their last known state.");
}
function sendFocus() {
  if (socket && socket.readyState === 1) socket.send(JSON.stringify({type: "focus", device: focus ? focus.device : null, since: focus ? focus.since : 0}));
}

// -- actions ---------------------------------------------------------------------------------------------------
function confirmAction(text) {
  return new Promise(resolve => {
    const dialog = $("confirm");
    $("confirm-text").textContent = text;
    dialog.onclose = () => resolve(dialog.returnValue === "ok");
    dialog.returnValue = "";
    dialog.showModal();
  });
}
async function act(path, body, what) {
  if (!await confirmAction(what)) return null;
  const response = await fetch(path, {method: "POST", body: JSON.stringify(body), headers: {
    "Content-Type": "application/json", "X-Lepton-Token": $("token").value, "X-Lepton-Operator": $("operator").value}});
  const answer = await response.json().catch(() => ({error: `HTTP ${response.status}`}));
  return response.ok ? answer : {error: answer.error || `HTTP ${response.status}`, status: response.status};
}
const requests = new Map();  // id -> {action, target, el}
function onEvent(ev) {
  if (ev.type === "reply") {
    const li = document.querySelector(`#replies li[data-id="${ev.id}"]`);
    if (li) {
      li.classList.add(ev.ok ? "ok" : "failed");
      const pre = document.createElement("pre");
      pre.className = "reply";
      pre.textContent = `${ev.device}: ${JSON.stringify(ev.ok ? ev.result : ev.error, null, 1)}`;
      li.appendChild(pre);
    }
    const box = document.querySelector(`#progress [data-id="${ev.id}"]`);
    if (box && !ev.ok) {  // refused by the device before any deploy state (not kept, bad request, …)
      const e = ev.error || {};
      showProgress(box, ev.device, {model: "", version: "", state: "refused", reason: e.code, detail: e.message});
    }
  } else if (ev.type === "progress") {
    const box = document.querySelector(`#progress [data-id="${ev.id}"]`);
    if (box) showProgress(box, ev.device, ev.state);
  }
}
function showProgress(box, device, s) {
  let row = box.querySelector(`[data-device="${CSS.escape(device)}"]`);
  if (!row) {
    row = document.createElement("div"); row.className = "progress-row"; row.dataset.device = device;
    row.innerHTML = `<span class="dev"></span><progress max="1"></progress><span class="state"></span>` +
      `<ol class="trail"></ol><span class="verdict"></span>`;
    box.appendChild(row);
  }
  // Every state the deployment went through, once each (progress within a state only moves the bar).
  const step = s.state + (s.phase ? ` (${s.phase})` : ""), trail = row.querySelector(".trail");
  if (trail.lastElementChild?.textContent !== step) {
    const li = document.createElement("li");
    li.dataset.state = s.state; li.dataset.phase = s.phase || ""; li.textContent = step;
    trail.appendChild(li);
  }
  if (s.shadow) {  // the trial's figures: why it was promoted or refused
    const t = s.shadow, lat = t.latency_ms || {};
    row.querySelector(".verdict").textContent = `shadow: agreed on ${Math.round(t.agreement * 100)}% of ${t.items} items, ` +
      `p95 ${num(lat.candidate_p95, 2)} ms vs ${num(lat.active_p95, 2)} ms active`;
  }
  row.querySelector(".dev").textContent = device;
  row.querySelector("progress").value = s.state === "active" ? 1 : s.progress || 0;
  row.dataset.state = s.state;
  // Active, or rolled back on request (no reason): what was asked for happened.
  row.dataset.outcome = s.state === "active" || (s.state === "rolled_back" && !s.reason) ? "ok"
    : ["failed", "rolled_back", "refused"].includes(s.state) ? "bad" : "";
  row.querySelector(".state").textContent = (s.model ? `${s.model}@${s.version} ` : "") + step + (s.reason ? ` (${s.reason}${s.detail ? `: ${s.detail}` : ""})` : "");
}
for (const button of document.querySelectorAll("#commands button")) {
  button.addEventListener("click", async () => {
    const action = button.dataset.action;
    let args = {};
    try { args = $("command-args").value.trim() ? JSON.parse($("command-args").value) : {}; }
    catch (e) { return addReply(null, `${action}: arguments are not JSON (${e.message})`, "failed"); }
    const answer = await act("/api/cmd", {target: focus.device, action, args}, `Send ${action} to ${focus.device}?`);
    if (answer) addReply(answer.id, answer.error ? `${action}: refused — ${answer.error}` : `${action} sent (${answer.id})`, answer.error ? "failed" : "");
  });
}
function addReply(id, text, cls) {
  const li = document.createElement("li");
  if (id) li.dataset.id = id;
  li.className = cls || "";
  li.textContent = `${new Date().toLocaleTimeString()} ${text}`;
  $("replies").prepend(li);
}
function formAction(formId, path, describe) {
  $(formId).addEventListener("submit", async e => {
    e.preventDefault();
    const body = Object.fromEntries(new FormData(e.target));
    body.shadow = !!body.shadow;
    for (const k of ["shadow_items", "min_agreement", "max_latency_ratio"]) {
      if (body[k] === "") delete body[k]; else if (body[k] !== undefined) body[k] = Number(body[k]);
    }
    const answer = await act(path, body, describe(body));
    if (!answer) return;
    $("action-error").hidden = !answer.error;
    if (answer.error) { $("action-error").textContent = answer.error; return; }
    const box = document.createElement("div");
    box.className = "request"; box.dataset.id = answer.id;
    box.innerHTML = `<h4>${esc(answer.action)} ${esc(body.model)}${body.version ? "@" + esc(body.version) : ""} → ${esc(answer.target)} <small>${esc(answer.id)}</small></h4>`;
    $("progress").prepend(box);
  });
}
formAction("deploy-form", "/api/deploy",
  b => `Deploy ${b.model}@${b.version} to ${b.to}${b.shadow ? ` (shadow first, on ${b.shadow_items} items)` : ""}?`);
formAction("rollback-form", "/api/rollback", b => `Roll ${b.model} back on ${b.to}${b.version ? ` to ${b.version}` : ""}?`);

// -- device view -----------------------------------------------------------------------------------------------
function showFacts(r) {
  $("device-presence").textContent = r.presence;
  $("device-presence").className = `pill ${r.presence}`;
  const facts = [["class", r.profile], ["backend", r.backend], ["agent", r.agent], ["groups", (r.groups || []).join(", ")],
    ["CPU %", num(r.cpu)], ["RSS MB", num(r.rss_mb, 0)], ["°C", num(r.temp_c)], ["throttle", (r.throttled || []).join(" ")],
    ["spool", r.spool], ["governor", r.governor], ["problems", r.problems.join(", ")], ["last seen", ago(r.last_seen)]];
  $("device-facts").innerHTML = facts.map(([k, v]) => `<span><i>${esc(k)}</i> ${esc(v ?? "")}</span>`).join("");
  const waiting = Object.entries(r.waiting || {});
  $("device-waiting").hidden = !waiting.length;
  $("device-waiting").innerHTML = waiting.map(([p, m]) => `<li data-pipeline="${esc(p)}" data-model="${esc(m)}">` +
    `<span class="badge waiting">waiting for a model</span> pipeline <b>${esc(p)}</b> runs the model delivered as ` +
    `<b>${esc(m)}</b> and this device has none yet: deploying ${esc(m)} to ${esc(r.device)} starts it ` +
    `<a href="#/models" class="deploy-name" data-model="${esc(m)}" data-device="${esc(r.device)}">deploy ${esc(m)}…</a></li>`).join("");
  for (const a of $("device-waiting").querySelectorAll("a.deploy-name")) {
    a.onclick = () => { prefill = {model: a.dataset.model, to: a.dataset.device}; };
  }
}
let prefill = null;  // the deploy form's model and target, set by a device view's "deploy NAME…"
function summary(res) {
  if (res.event) return `${res.event} ${res.label} ${num(res.score, 2)}`;
  const list = res.classes || res.detections;
  if (list) return list.map(x => `${x.label} ${num(x.score, 2)}`).join(", ") || "(nothing)";
  return JSON.stringify(res).slice(0, 120);
}
function drawDevice() {
  if (!focus) return;
  const h = focus.history;
  // The last 15 minutes, or less while there is less: a device just seen fills the chart.
  const span = h.length ? Date.now() / 1000 - h[0].ts : 0;
  const CHART_WINDOW_S = Math.min(FULL_WINDOW_S, Math.max(60, span * 1.05));
  const names = [...new Set(h.flatMap(p => Object.keys(p.pipelines || {})))];
  drawChart($("chart-cpu"), [{label: "cpu", points: h.map(p => [p.ts, p.cpu])}], CHART_WINDOW_S);
  drawChart($("chart-temp"), [{label: "°C", points: h.map(p => [p.ts, p.temp])}], CHART_WINDOW_S);
  drawChart($("chart-fps"), names.map(n => ({label: n, points: h.map(p => [p.ts, (p.pipelines[n] || {}).fps])})), CHART_WINDOW_S);
  const first = names[0];
  const lat = k => ({label: `${first} ${k}`, points: h.map(p => [p.ts, ((p.pipelines || {})[first] || {})[k]])});
  drawChart($("chart-latency"), first ? ["p50", "p95", "pre", "invoke", "post"].map(lat) : [], CHART_WINDOW_S);
  const results = focus.results.slice(-30).reverse();
  $("results").innerHTML = results.map(r => `<li>${esc(new Date((r.ts || 0) * 1000).toLocaleTimeString())} ` +
    `<b>${esc(r.pipeline)}</b> #${esc(r.seq)} ${esc(summary(r))}${r.historical ? " (historical)" : ""}</li>`).join("");
  const shot = results.find(r => r.snapshot);
  $("snapshot").hidden = !shot;
  if (shot) drawSnapshot($("snapshot"), shot);
  $("deploy-history").innerHTML = focus.deploys.slice().reverse().map(s => `<li>${esc(new Date((s.ts || 0) * 1000).toLocaleTimeString())} ` +
    `${esc(s.model)}@${esc(s.version)} ${esc(s.state)}${s.reason ? ` (${esc(s.reason)})` : ""}</li>`).join("");
}
function onDeviceNews(m) {
  if (!focus || m.device !== focus.device) return;
  focus.history.push(...m.points);
  focus.results.push(...m.results);
  if (m.deploys) focus.deploys = m.deploys.length ? mergeDeploys(focus.deploys, m.deploys) : focus.deploys;
  for (const x of [...m.points, ...m.results]) focus.since = Math.max(focus.since, x.ts || 0);
  focus.results = focus.results.slice(-100);
  drawDevice();
}
function mergeDeploys(old, recent) {
  const key = s => `${s.model}|${s.version}|${s.state}|${s.ts}`;
  const seen = new Set(old.map(key));
  return old.concat(recent.filter(s => !seen.has(key(s)))).slice(-30);
}
async function openDevice(device) {
  focus = {device, history: [], results: [], deploys: [], since: 0};
  $("device-name").textContent = device;
  $("replies").innerHTML = "";
  const response = await fetch(`/api/device/${encodeURIComponent(device)}`);
  if (!response.ok) { $("device-facts").textContent = "no such device (yet)"; return; }
  const d = await response.json();
  Object.assign(focus, {history: d.history, results: d.results, deploys: d.deploys});
  for (const x of [...d.history, ...d.results]) focus.since = Math.max(focus.since, x.ts || 0);
  showFacts(d.row);
  drawDevice();
  sendFocus();
}

// -- models view -----------------------------------------------------------------------------------------------
async function loadModels() {
  const d = await (await fetch("/api/models")).json();
  $("models-rows").innerHTML = d.models.map(m => `<tr data-model="${esc(m.name)}@${esc(m.version ?? "")}"><td>${esc(m.name)}</td>` +
    `<td>${esc(m.version ?? "")}${m.unpublished ? " <i>(not on this broker)</i>" : ""}${m.missing ? "<i>none published yet</i>" : ""}</td><td>${m.size ? (m.size / 1024).toFixed(0) + " KiB" : ""}</td>` +
    `<td>${esc(m.key_id || "")}</td><td>${m.devices.length} ${esc(m.devices.slice(0, 8).join(", "))}${m.devices.length > 8 ? "…" : ""}</td>` +
    `<td data-col="waiting">${waitingFor(m.waiting || {})}</td>` +
    `<td>${m.unpublished || m.missing ? "" : `<button class="pick" data-name="${esc(m.name)}" data-version="${esc(m.version)}">deploy…</button>`}</td></tr>`).join("");
  for (const b of document.querySelectorAll("#models-rows button.pick")) {
    b.onclick = () => { const f = $("deploy-form"); f.model.value = b.dataset.name; f.version.value = b.dataset.version; f.to.focus(); };
  }
  if (prefill) {
    const f = $("deploy-form");
    f.model.value = prefill.model; f.to.value = prefill.to; f.version.focus();
    prefill = null;
  }
}
// The devices a deploy of this name would start: each with its waiting pipelines.
function waitingFor(waiting) {
  const list = Object.entries(waiting);
  return list.slice(0, 8).map(([d, ps]) => `<span class="badge waiting" data-device="${esc(d)}">${esc(d)} (${esc(ps.join(", "))})</span>`).join(" ") +
    (list.length > 8 ? ` and ${list.length - 8} more` : "");
}

// -- routing ---------------------------------------------------------------------------------------------------
function route() {
  const h = location.hash || "#/";
  const device = h.startsWith("#/device/") ? decodeURIComponent(h.slice(9)) : null;
  $("fleet-view").hidden = !(h === "#/" || h === "#" || h === "");
  $("device-view").hidden = !device;
  $("models-view").hidden = h !== "#/models";
  if (device) openDevice(device); else { focus = null; sendFocus(); }
  if (h === "#/models") loadModels();
}
window.addEventListener("hashchange", route);
setInterval(() => { if (focus) drawDevice(); }, 10000);  // the charts' time axis moves on
route();
connect();
