// kit review: one conversation at a time, keyboard first. Text from the data is only ever set as
// text (never parsed as HTML), and every request goes to this server with its session token.
"use strict";

const TOKEN = document.querySelector('meta[name="kit-token"]').content;
const KEYED = document.querySelector('meta[name="kit-keyed"]').content === "1";
const $ = (id) => document.getElementById(id);
const SEVERITY = { contradicted: 2, unsupported: 1, supported: 0 };
const WORD = { accept: "accepted", reject: "rejected", edit: "edited" };

let key = sessionStorage.getItem("kit-review-key") || "";
let summary = null;   // GET /api/items
let order = [];       // item indices shown, in order
let pos = 0;          // position in `order`
let item = null;      // GET /api/items/{n}
let mode = "view";    // view | reject | edit
let imageUrl = null;
let view = { scale: 1, x: 0, y: 0 };

class ApiFailure extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, body) {
  const headers = { "X-Kit-Token": TOKEN };
  if (key) headers.Authorization = "Bearer " + key;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method: body === undefined ? "GET" : "POST", headers,
                                  body: body === undefined ? undefined : JSON.stringify(body) });
  if (!res.ok) {
    let message = res.status + " " + res.statusText;
    try { message = (await res.json()).error.message; } catch (e) { /* not JSON: keep the status line */ }
    throw new ApiFailure(res.status, message);
  }
  return res;
}

function say(text, error) {
  const s = $("status");
  s.textContent = text || "";
  s.classList.toggle("error", !!error);
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// ------------------------------------------------------------------ the list: filters and order

function rank(it) {  // flagged first, then the clean ones, then what the check rejected
  if (it.origin === "rejected") return 2;
  return it.bad ? 0 : 1;
}

function shown(it) {
  const d = $("filter-decision").value, k = $("filter-kind").value;
  if (it.origin === "rejected" && !$("show-rejected").checked) return false;
  if (d === "undecided" ? it.decision : d !== "all" && it.decision !== d) return false;
  if (k === "flagged") return it.bad > 0;
  if (k === "clean") return it.bad === 0;
  if (k !== "any") return it.kinds.includes(k);
  return true;
}

function reorder(keepIndex) {
  order = summary.items.filter(shown).sort((a, b) => rank(a) - rank(b) || a.index - b.index).map((it) => it.index);
  const at = order.indexOf(keepIndex);
  pos = at >= 0 ? at : Math.min(pos, Math.max(order.length - 1, 0));
}

function progress() {
  const generated = summary.items.filter((it) => it.origin !== "rejected");
  const decided = generated.filter((it) => it.decision);
  const by = (d) => summary.items.filter((it) => it.decision === d).length;
  const rescued = summary.items.filter((it) => it.origin === "rejected" && (it.decision === "accept" || it.decision === "edit")).length;
  const pct = generated.length ? Math.round((100 * decided.length) / generated.length) : 100;
  $("progress-fill").style.width = pct + "%";
  $("progress").setAttribute("aria-valuenow", String(pct));
  $("progress-text").textContent = `${decided.length} / ${generated.length} decided · ${by("accept")} accepted · ${by("edit")} edited · ` +
    `${by("reject")} rejected` + (rescued ? ` · ${rescued} rescued` : "");
  $("rejected-count").textContent = String(summary.items.length - generated.length);
  $("position").textContent = order.length ? `${pos + 1} of ${order.length} shown` : "nothing matches these filters";
}

// ------------------------------------------------------------------ one conversation

function answerTurns(turns) {  // answer number -> turn index
  const out = [];
  turns.forEach((t, i) => { if (t.from === "gpt") out.push(i); });
  return out;
}

// The text with each claim marked; claims on the same words merge, the worst status shows.
function marked(text, claims, numbers) {
  const frag = document.createDocumentFragment();
  const spans = new Map();
  for (const c of claims) {
    if (c.start < 0) continue;
    const k = c.start + ":" + c.end;
    if (!spans.has(k)) spans.set(k, { start: c.start, end: c.end, claims: [] });
    spans.get(k).claims.push(c);
  }
  let at = 0;
  for (const s of [...spans.values()].sort((a, b) => a.start - b.start)) {
    if (s.start < at) continue;
    frag.append(text.slice(at, s.start));
    const worst = s.claims.reduce((w, c) => (SEVERITY[c.status] > SEVERITY[w.status] ? c : w));
    const m = el("mark", "claim " + worst.status, text.slice(s.start, s.end));
    m.title = s.claims.map((c) => `${c.kind}: ${c.status}${c.why ? " (" + c.why + ")" : ""}`).join("\n");
    const bad = s.claims.filter((c) => numbers.has(c)).map((c) => numbers.get(c));
    if (bad.length) m.append(el("sup", null, bad.join(",")));
    frag.append(m);
    at = s.end;
  }
  frag.append(text.slice(at));
  return frag;
}

// `numbered`: marks carry the number of their entry in the claims list (the text that list is about).
function renderTurns(list, turns, claims, editable, numbered = true) {
  list.replaceChildren();
  const bad = claims.filter((c) => c.status !== "supported");
  const numbers = new Map(numbered ? bad.map((c, i) => [c, i + 1]) : []);
  const answers = answerTurns(turns);
  turns.forEach((t, i) => {
    const li = el("li", "turn " + (t.from === "gpt" ? "gpt" : "human"));
    li.append(el("span", "who", t.from === "gpt" ? "answer" : "question"));
    if (editable) {
      const ta = el("textarea", "turn-edit");
      ta.value = t.value;
      ta.dataset.turn = String(i);
      ta.addEventListener("input", scheduleCheck);
      li.append(ta);
    } else {
      const n = answers.indexOf(i);
      li.append(n >= 0 ? marked(t.value, claims.filter((c) => c.answer === n), numbers) : t.value);
    }
    list.append(li);
  });
  return bad;
}

function renderClaims(bad) {
  const ul = $("claims");
  ul.replaceChildren();
  if (!summary.checks_claims) { ul.append(el("li", "none", "claims are not checked: " + summary.why_unchecked)); return; }
  if (!bad.length) { ul.append(el("li", "none", "none: every claim the vocabulary recognises is in the source")); return; }
  for (const c of bad) {
    const li = el("li", "claim " + c.status);
    li.append(el("q", null, c.text), " ", el("b", null, c.status), " ", el("span", "kind", c.kind + " · " + c.concept));
    if (c.why) li.append(" — " + c.why);
    ul.append(li);
  }
}

function renderSource(src, facts) {
  const body = $("source-body");
  body.replaceChildren();
  if (!src) { body.append(el("p", "muted", "This folder does not record the source of this conversation (no sources.jsonl).")); return; }
  const dl = el("dl");
  const row = (name, value) => { dl.append(el("dt", null, name)); const dd = el("dd"); dd.append(value); dl.append(dd); };
  const list = (items) => { const ul = el("ul"); items.forEach((t) => ul.append(el("li", null, t))); return ul; };
  if (src.captions.length) row("captions", list(src.captions));
  if (src.findings.length) row("findings", list(src.findings));
  if (src.boxes.length) row("boxes", list(src.boxes.map((b) => `${b.label} [${b.bbox.map((v) => v.toFixed(2)).join(", ")}]`)));
  for (const [k, v] of Object.entries(src.metadata)) row(k, v);
  if (facts) {
    row("present", facts.present.join(", ") || "—");
    if (facts.absent.length) row("absent", facts.absent.join(", "));
  }
  body.append(dl);
}

function renderBoxes(src) {
  const layer = $("boxes");
  layer.replaceChildren();
  for (const b of src ? src.boxes : []) {
    const [x1, y1, x2, y2] = b.bbox;
    const d = el("div", "box");
    d.style.left = 100 * x1 + "%"; d.style.top = 100 * y1 + "%";
    d.style.width = 100 * (x2 - x1) + "%"; d.style.height = 100 * (y2 - y1) + "%";
    d.append(el("span", null, b.label));
    layer.append(d);
  }
  layer.hidden = !$("show-boxes").checked;
}

async function renderImage() {
  const img = $("image"), note = $("image-note");
  if (imageUrl) { URL.revokeObjectURL(imageUrl); imageUrl = null; }
  img.removeAttribute("src");
  delete img.dataset.shows;
  $("image-name").textContent = item.image_name || "";
  if (!item.image) { note.hidden = false; note.textContent = item.image_problem || "no image"; return; }
  note.hidden = true;
  const want = item.index;
  const blob = await (await api(`/api/items/${item.index}/image`)).blob();
  if (!item || item.index !== want) return;
  imageUrl = URL.createObjectURL(blob);
  img.onload = () => { fit(); img.dataset.shows = item.id; };
  img.src = imageUrl;
}

function render() {
  const it = item;
  $("item-id").textContent = it.id;
  $("item-type").textContent = it.type || "";
  const verdict = $("verdict");
  verdict.className = "tag " + it.origin;
  verdict.textContent = { kept: "kept", flagged: "flagged", rejected: "rejected by the claim check" }[it.origin];
  $("verdict-text").textContent = !summary.checks_claims ? "" :
    it.origin === "rejected" ? "The claim check rejected this conversation; accept or edit it to train on it anyway." :
    it.bad ? `The claim check found ${it.bad} claim${it.bad > 1 ? "s" : ""} the source does not support.` :
    "The claim check found nothing unsupported.";
  const d = it.decided;
  const state = $("decision-state");
  state.dataset.decision = d ? d.decision : "";
  state.textContent = d ? WORD[d.decision] + (d.reason ? ": " + d.reason : "") : "undecided";
  state.title = d ? "decided " + d.time : "";
  const edited = d && d.decision === "edit";
  const bad = renderTurns($("conversation"), edited ? d.conversations : it.conversations, edited ? d.claims : it.claims, false);
  $("original").hidden = !edited;
  if (edited) renderTurns($("original-turns"), it.conversations, it.claims, false, false);
  renderClaims(bad);
  renderSource(it.source, it.facts);
  renderBoxes(it.source);
  progress();
}

async function open(index) {
  setMode("view");
  try {
    item = await (await api(`/api/items/${index}`)).json();
    render();
    document.querySelector("main").dataset.loaded = item.id;
    await renderImage();
  } catch (e) { failed(e); }
}

async function go(step) {
  if (!order.length) return;
  const next = Math.max(0, Math.min(order.length - 1, pos + step));
  if (next === pos && item && order[pos] === item.index) return;
  pos = next;
  await open(order[pos]);
}

// ------------------------------------------------------------------ decisions

function setMode(m) {
  mode = m;
  $("view-actions").hidden = m !== "view";
  $("reject-form").hidden = m !== "reject";
  $("edit-actions").hidden = m !== "edit";
}

async function decide(body) {
  try {
    const res = await (await api("/api/decisions", { id: item.id, ...body })).json();
    const brief = summary.items[item.index];
    brief.decision = res.saved.decision;
    say(`${item.id}: ${WORD[res.saved.decision]} (saved)`);
    const done = item.index;
    item = res.item;
    setMode("view");
    reorder(done);
    const at = order.indexOf(done);
    if (at >= 0 && at < order.length - 1) { pos = at + 1; await open(order[pos]); }
    else if (at < 0 && order.length) { pos = Math.min(pos, order.length - 1); await open(order[pos]); }
    else render();
  } catch (e) { failed(e); }
}

function startReject() {
  if (!item) return;
  setMode("reject");
  $("reason").value = item.decided && item.decided.decision === "reject" ? item.decided.reason : "";
  $("reason").focus();
}

function startEdit() {
  if (!item) return;
  setMode("edit");
  const d = item.decided;
  const turns = d && d.decision === "edit" ? d.conversations : item.conversations;
  renderTurns($("conversation"), turns, [], true);
  const first = document.querySelector('#conversation .gpt textarea') || document.querySelector("#conversation textarea");
  first.focus();
  first.setSelectionRange(first.value.length, first.value.length);
}

function editedTurns() {
  const base = item.conversations;
  return [...document.querySelectorAll("#conversation textarea")].map((ta) => ({ from: base[+ta.dataset.turn].from, value: ta.value }));
}

let checkTimer = null;
function scheduleCheck() { clearTimeout(checkTimer); checkTimer = setTimeout(checkEdit, 500); }

async function checkEdit() {
  if (mode !== "edit") return;
  try {
    const res = await (await api(`/api/items/${item.index}/check`, { conversations: editedTurns() })).json();
    renderClaims(res.claims.filter((c) => c.status !== "supported"));
    say("claims of the edited text checked (not saved yet)");
  } catch (e) { failed(e); }
}

function cancel() {
  setMode("view");
  render();
  say("");
}

// ------------------------------------------------------------------ image: zoom and pan

// The boxes sit over the image unscaled, so their lines and labels stay readable at any zoom.
function apply() {
  const img = $("image"), layer = $("boxes");
  $("stage").style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
  layer.style.left = view.x + "px"; layer.style.top = view.y + "px";
  layer.style.width = img.naturalWidth * view.scale + "px"; layer.style.height = img.naturalHeight * view.scale + "px";
}

function fit() {
  const img = $("image"), box = $("viewer").getBoundingClientRect();
  if (!img.naturalWidth) return;
  view.scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
  view.x = (box.width - img.naturalWidth * view.scale) / 2;
  view.y = (box.height - img.naturalHeight * view.scale) / 2;
  apply();
}

function zoom(factor, cx, cy) {
  const box = $("viewer").getBoundingClientRect();
  cx = cx === undefined ? box.width / 2 : cx;
  cy = cy === undefined ? box.height / 2 : cy;
  const s = Math.max(0.05, Math.min(40, view.scale * factor));
  view.x = cx - ((cx - view.x) * s) / view.scale;
  view.y = cy - ((cy - view.y) * s) / view.scale;
  view.scale = s;
  apply();
}

function setupViewer() {
  const v = $("viewer");
  v.addEventListener("wheel", (e) => {
    e.preventDefault();
    const r = v.getBoundingClientRect();
    zoom(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - r.left, e.clientY - r.top);
  }, { passive: false });
  let drag = null;
  v.addEventListener("pointerdown", (e) => { drag = { x: e.clientX - view.x, y: e.clientY - view.y }; v.setPointerCapture(e.pointerId); v.classList.add("dragging"); });
  v.addEventListener("pointermove", (e) => { if (drag) { view.x = e.clientX - drag.x; view.y = e.clientY - drag.y; apply(); } });
  v.addEventListener("pointerup", () => { drag = null; v.classList.remove("dragging"); });
  $("zoom-in").onclick = () => zoom(1.25);
  $("zoom-out").onclick = () => zoom(0.8);
  $("zoom-fit").onclick = fit;
  $("show-boxes").onchange = () => { $("boxes").hidden = !$("show-boxes").checked; };
}

// ------------------------------------------------------------------ keys, start

function onKey(e) {
  if (mode === "edit") {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); decide({ decision: "edit", conversations: editedTurns() }); }
    else if (e.key === "Escape") { e.preventDefault(); cancel(); }
    return;
  }
  if (mode === "reject") {
    if (e.key === "Enter") { e.preventDefault(); decide({ decision: "reject", reason: $("reason").value }); }
    else if (e.key === "Escape") { e.preventDefault(); cancel(); }
    return;
  }
  const typing = e.target.tagName === "TEXTAREA" || e.target.tagName === "SELECT" ||
    (e.target.tagName === "INPUT" && !["checkbox", "radio", "button"].includes(e.target.type));
  if (e.ctrlKey || e.metaKey || e.altKey || typing) return;
  const actions = {
    a: () => decide({ decision: "accept" }), r: startReject, e: startEdit, ArrowLeft: () => go(-1), ArrowRight: () => go(1),
    "+": () => zoom(1.25), "=": () => zoom(1.25), "-": () => zoom(0.8), 0: fit,
    b: () => { $("show-boxes").checked = !$("show-boxes").checked; $("boxes").hidden = !$("show-boxes").checked; },
  };
  const act = actions[e.key];
  if (act && item) { e.preventDefault(); act(); }
}

function failed(e) {
  if (e instanceof ApiFailure && e.status === 401) { askKey(); return; }
  say(e.message || String(e), true);
}

function askKey() {
  $("main").hidden = true;
  $("keyform").hidden = false;
  $("key").focus();
}

async function start() {
  try {
    summary = await (await api("/api/items")).json();
  } catch (e) { failed(e); return; }
  $("keyform").hidden = true;
  $("main").hidden = false;
  $("folder").textContent = summary.folder;
  $("check-note").textContent = summary.checks_claims ? "" : "claims not checked: " + summary.why_unchecked;
  reorder(-1);
  const firstOpen = order.findIndex((i) => !summary.items[i].decision);
  pos = firstOpen >= 0 ? firstOpen : 0;
  progress();
  if (order.length) await open(order[pos]);
}

function refilter() {
  reorder(item ? item.index : -1);
  progress();
  if (order.length && (!item || order[pos] !== item.index)) open(order[pos]);
}

document.addEventListener("DOMContentLoaded", () => {
  setupViewer();
  document.addEventListener("keydown", onKey);
  $("accept").onclick = () => decide({ decision: "accept" });
  $("reject").onclick = startReject;
  $("edit").onclick = startEdit;
  $("prev").onclick = () => go(-1);
  $("next").onclick = () => go(1);
  $("reject-save").onclick = () => decide({ decision: "reject", reason: $("reason").value });
  $("reject-cancel").onclick = cancel;
  $("edit-save").onclick = () => decide({ decision: "edit", conversations: editedTurns() });
  $("edit-check").onclick = checkEdit;
  $("edit-cancel").onclick = cancel;
  for (const id of ["filter-decision", "filter-kind", "show-rejected"]) $(id).onchange = refilter;
  $("key-go").onclick = () => { key = $("key").value.trim(); sessionStorage.setItem("kit-review-key", key); start(); };
  $("key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("key-go").click(); });
  if (KEYED && !key) askKey(); else start();
});
