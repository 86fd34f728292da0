// The chat page: talks to the server's own OpenAI-compatible API (relative URLs, so the page
// also works where the app is mounted under a prefix) and polls the organism's status.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], busy: false, key: sessionStorage.getItem("molecule-gpt-key") || "" };
const POLL_MS = 2000;

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function showError(text) {
  const el = $("error");
  el.textContent = text || "";
  el.hidden = !text;
}

// An error response of the API: its OpenAI error object's message; a 401 asks for the key.
async function failure(resp) {
  let message = resp.status + " " + resp.statusText;
  try { message = (await resp.json()).error.message || message; } catch (e) { /* not JSON */ }
  if (resp.status === 401) $("keyform").hidden = false;
  return new Error(message);
}

async function loadModels() {
  const resp = await fetch("v1/models", { headers: headers() });
  if (!resp.ok) throw await failure(resp);
  const models = (await resp.json()).data;
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  state.model = models.length ? models[0].id : null;
}

function addMessage(role, text) {
  const li = document.createElement("li");
  li.className = "msg " + role;
  li.textContent = text;
  $("messages").appendChild(li);
  li.scrollIntoView({ block: "end" });
  return li;
}

// Read a server-sent event stream; calls onData(obj) per JSON event, returns at [DONE].
async function readEvents(resp, onData) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  state.busy = true;
  $("send").disabled = true;
  showError("");
  addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  let reply = "";
  try {
    const resp = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(),
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true }),
    });
    if (!resp.ok) throw await failure(resp);
    await readEvents(resp, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        reply += delta.content;
        bubble.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
    });
    state.history.push({ role: "assistant", content: reply });
  } catch (err) {
    state.history.pop();  // the turn did not happen: it is not resent
    bubble.remove();
    showError(err.message);
  } finally {
    bubble.classList.remove("streaming");
    state.busy = false;
    $("send").disabled = false;
    pollStatus();
  }
}

function fmt(x, digits = 3) {
  return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
}

function drawChart(points) {
  const canvas = $("chart");
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 28;
  ctx.clearRect(0, 0, w, h);
  const pts = points.filter((p) => p[1] !== null);
  canvas.dataset.points = String(pts.length);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6b6f73";
  if (pts.length === 0) {
    ctx.fillText("no held-out measurement yet", pad, h / 2);
    return;
  }
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-6) { y0 -= 0.05; y1 += 0.05; }
  const X = (x) => pad + (x1 > x0 ? (x - x0) / (x1 - x0) : 0.5) * (w - pad - 8);
  const Y = (y) => 8 + (1 - (y - y0) / (y1 - y0)) * (h - pad - 8);
  ctx.strokeStyle = "#dedbd2";
  ctx.beginPath(); ctx.moveTo(pad, 8); ctx.lineTo(pad, h - pad); ctx.lineTo(w - 8, h - pad); ctx.stroke();
  ctx.fillText(y1.toFixed(2), 2, 14);
  ctx.fillText(y0.toFixed(2), 2, h - pad);
  ctx.fillText("step " + x0, pad, h - 10);
  const right = "step " + x1;
  ctx.fillText(right, w - 8 - ctx.measureText(right).width, h - 10);
  ctx.strokeStyle = "#3c6e91";
  ctx.lineWidth = 2;
  ctx.beginPath();
  pts.forEach((p, i) => (i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
  ctx.stroke();
  ctx.fillStyle = "#3c6e91";
  for (const p of pts) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); }
}

function showStatus(doc) {
  const badge = $("state");
  badge.textContent = doc.state === "ready" ? (doc.learning ? "learning" : "not learning") : doc.state;
  badge.className = "badge " + doc.state;
  if (doc.state !== "ready") return;
  $("stat-steps").textContent = doc.steps.toLocaleString();
  $("stat-accepted").textContent = doc.bursts.accepted;
  $("stat-rolled-back").textContent = doc.bursts.rolled_back;
  $("stat-val-loss").textContent = fmt(doc.val_loss);
  $("stat-heard-loss").textContent = fmt(doc.heard_val_loss);
  $("stat-vocab").textContent = doc.vocab_size + (doc.bpe ? " (BPE)" : " (characters)");
  const states = {};
  for (const m of doc.delta_modules) states[m.state] = (states[m.state] || 0) + 1;
  $("stat-modules").textContent = doc.delta_modules.length +
    (doc.delta_modules.length ? " (" + Object.entries(states).map(([k, n]) => n + " " + k).join(", ") + ")" : "");
  $("stat-memory").textContent = doc.memory ? doc.memory.messages + " messages" : "none";
  $("stat-next").textContent = doc.next_burst;
  drawChart(doc.history.val_loss);
  $("bursts").replaceChildren(...doc.history.bursts.slice().reverse().map((b) => {
    const li = document.createElement("li");
    li.className = b.accepted ? "kept" : "rolled-back";
    li.textContent = "step " + b.step + ": " + (b.accepted ? "kept" : "rolled back (" + b.reason.replace(/_/g, " ") + ")") +
      ", held-out " + fmt(b.loss_before) + " \u2192 " + fmt(b.loss_after);
    return li;
  }));
}

let polling = null;
async function pollStatus() {
  if (!state.model) return;
  try {
    const resp = await fetch("v1/organisms/" + encodeURIComponent(state.model) + "/status", { headers: headers() });
    if (resp.ok || resp.status === 503) showStatus(await resp.json());
    else if (resp.status === 401) $("keyform").hidden = false;
  } catch (e) {
    $("state").textContent = "offline";
    $("state").className = "badge failed";
  }
}

async function start() {
  try {
    await loadModels();
    showError("");
  } catch (err) {
    showError(err.message);
    return;
  }
  pollStatus();
  if (polling === null) polling = setInterval(pollStatus, POLL_MS);
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy || !state.model) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
$("model").addEventListener("change", () => {
  state.model = $("model").value;
  state.history = [];
  $("messages").replaceChildren();
  pollStatus();
});
$("keyform").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = $("key").value.trim();
  sessionStorage.setItem("molecule-gpt-key", state.key);
  $("keyform").hidden = true;
  start();
});
start();
