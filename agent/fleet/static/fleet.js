// The dashboard's only script: live table, device charts (inline SVG), prompt streaming,
// commands and rollouts. No framework, no chart library, nothing from a CDN.
"use strict";

const csrf = () => document.querySelector('meta[name="csrf"]').content;

async function api(path, body) {
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok && response.status !== 202) {
    const error = (data && data.error) || { code: String(response.status), message: response.statusText };
    throw new Error(`${error.code}: ${error.message}`);
  }
  return data;
}

function formatBytes(value) {
  if (typeof value !== "number") return "–";
  if (value >= 1024 ** 3) return `${(value / 1024 ** 3).toFixed(1)} GiB`;
  return `${Math.round(value / 1024 ** 2)} MiB`;
}

function ago(ts) {
  if (typeof ts !== "number") return "never";
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}

function problemBadge(problem) {
  const b = document.createElement("span");
  b.className = "badge state-degraded problem"; b.title = problem; b.textContent = "input refused";
  return b;
}

const CELL = {
  id: (r) => { const a = document.createElement("a"); a.href = `/devices/${encodeURIComponent(r.id)}`; a.textContent = r.id; return a; },
  state: (r) => {
    const s = document.createElement("span"); s.className = `badge state-${r.state}`; s.textContent = r.state;
    if (!r.problem) return s;
    // The controller refuses some of what this device sends: say so on its own row.
    const box = document.createDocumentFragment(); box.append(s, " ", problemBadge(r.problem)); return box;
  },
  board: (r) => r.board || "",
  cpu: (r) => r.cpu || "",
  ram_bytes: (r) => formatBytes(r.ram_bytes),
  gpu: (r) => (r.gpu || "") + (r.vram_bytes ? ` · ${formatBytes(r.vram_bytes)}` : ""),
  model: (r) => r.model || "",
  quant: (r) => r.quant || "",
  decode_tps: (r) => (typeof r.decode_tps === "number" ? r.decode_tps.toFixed(1) : "–"),
  mem_bytes: (r) => formatBytes(r.mem_bytes),
  temp_c: (r) => (typeof r.temp_c === "number" ? `${Math.round(r.temp_c)} °C` : "–"),
  last_seen: (r) => ago(r.last_seen),
};

function stream(url, onData) {
  const live = document.getElementById("live");
  const source = new EventSource(url);
  source.onopen = () => live && live.classList.add("on");
  source.onerror = () => live && live.classList.remove("on");
  source.onmessage = (event) => onData(JSON.parse(event.data));
  return source;
}

function updateCounts(summary) {
  document.querySelectorAll("[data-count]").forEach((el) => {
    const key = el.dataset.count;
    if (key === "devices") el.textContent = summary.devices;
    else if (key === "decode_tps_total") el.textContent = summary.decode_tps_total;
    else el.textContent = summary.counts[key] ?? 0;
  });
}

// --- fleet page ------------------------------------------------------------------------

function fleetPage() {
  // Rows are indexed by id and cells by column position, and sort keys are computed once
  // per pass, so a table of thousands of devices stays responsive.
  const table = document.getElementById("devices");
  const body = table.tBodies[0];
  const headers = [...table.tHead.rows[0].cells];
  const keys = headers.map((th) => th.dataset.key);
  const numeric = new Set(headers.filter((th) => th.dataset.type === "num").map((th) => th.dataset.key));
  const stateColumn = keys.indexOf("state"), seenColumn = keys.indexOf("last_seen");
  const filter = document.getElementById("filter");
  const stateFilter = document.getElementById("state-filter");
  const byId = new Map([...body.rows].map((tr) => [tr.dataset.id, tr]));
  let sortKey = "id", sortDir = 1;

  function render(tr, row) {
    tr.dataset.id = row.id;
    keys.forEach((key, i) => {
      const td = tr.cells[i] || tr.insertCell();
      td.dataset.key = key;
      const content = CELL[key](row);
      td.replaceChildren(content instanceof Node ? content : document.createTextNode(content));
      const raw = row[key];
      td.dataset.value = raw === null || raw === undefined ? "" : raw;
    });
    tr.searchText = undefined;
  }

  function sortValue(tr, column) {
    const td = tr.cells[column];
    if (numeric.has(keys[column])) return td.dataset.value === "" || td.dataset.value === undefined ? -Infinity : Number(td.dataset.value);
    return td.textContent.toLowerCase();
  }

  function apply() {
    const needle = filter.value.trim().toLowerCase();
    const state = stateFilter.value;
    const column = keys.indexOf(sortKey);
    const keyed = [...byId.values()].map((tr) => [sortValue(tr, column), tr]);
    keyed.sort((a, b) => (a[0] < b[0] ? -sortDir : a[0] > b[0] ? sortDir : 0));
    let shown = 0;
    const fragment = document.createDocumentFragment();
    for (const [, tr] of keyed) {
      if (tr.searchText === undefined) tr.searchText = tr.textContent.toLowerCase();
      const visible = (!needle || tr.searchText.includes(needle)) && (!state || tr.cells[stateColumn].textContent.trim() === state);
      if (tr.hidden === visible) tr.hidden = !visible;
      if (visible) shown += 1;
      fragment.appendChild(tr);
    }
    body.appendChild(fragment);
    document.getElementById("shown").textContent = `${shown} of ${keyed.length} shown`;
    headers.forEach((th) => th.removeAttribute("aria-sort"));
    headers[column].setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
  }

  table.tHead.addEventListener("click", (event) => {
    const th = event.target.closest("th");
    if (!th) return;
    sortDir = sortKey === th.dataset.key ? -sortDir : 1;
    sortKey = th.dataset.key;
    apply();
  });
  filter.addEventListener("input", apply);
  stateFilter.addEventListener("change", apply);
  apply();

  stream("/ui/stream", (data) => {
    updateCounts(data.summary);
    for (const row of data.rows) {
      let tr = byId.get(row.id);
      if (!tr) { tr = body.insertRow(); byId.set(row.id, tr); document.getElementById("empty")?.remove(); }
      render(tr, row);
    }
    if (data.rows.length) apply();
    for (const tr of byId.values()) {
      const td = tr.cells[seenColumn];
      td.textContent = ago(Number(td.dataset.value));
    }
  });
}

// --- device page -----------------------------------------------------------------------

function drawChart(svg, points) {
  const field = svg.dataset.field;
  const data = points.filter((p) => typeof p[field] === "number").slice(-300);
  const W = 320, H = 120, L = 44, B = 16, T = 6;
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const el = (name, attrs, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  el("rect", { x: L, y: T, width: W - L - 2, height: H - T - B, class: "plot" });
  if (data.length === 0) { el("text", { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle" }, "no data yet"); return; }
  const xs = data.map((p) => p.ts), ys = data.map((p) => p[field]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 = y0 * 0.9; y1 = y1 * 1.1 + 1e-9; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - 2);
  const sy = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  // A narrow range of a large number needs a finer unit, or both axis labels read the same.
  const fine = svg.dataset.unit === "bytes" && y1 - y0 < 0.2 * 1024 ** 3;
  const label = (v) => (svg.dataset.unit === "bytes"
    ? (fine ? `${Math.round(v / 1024 ** 2)} MiB` : formatBytes(v))
    : v.toFixed(y1 - y0 < 10 ? 1 : 0));
  el("text", { x: L - 4, y: T + 8, class: "axis", "text-anchor": "end" }, label(y1));
  el("text", { x: L - 4, y: H - B, class: "axis", "text-anchor": "end" }, label(y0));
  el("text", { x: L, y: H - 3, class: "axis" }, new Date(x0 * 1000).toLocaleTimeString());
  el("text", { x: W - 2, y: H - 3, class: "axis", "text-anchor": "end" }, new Date(x1 * 1000).toLocaleTimeString());
  el("polyline", { points: data.map((p) => `${sx(p.ts).toFixed(1)},${sy(p[field]).toFixed(1)}`).join(" "), class: "line" });
  const last = data[data.length - 1];
  el("circle", { cx: sx(last.ts), cy: sy(last[field]), r: 2.5, class: "dot" });
}

function devicePage() {
  const device = document.body.dataset.device;
  const base = `/api/devices/${encodeURIComponent(device)}`;
  const charts = [...document.querySelectorAll("svg.chart")];
  let points = [];
  const redraw = () => charts.forEach((svg) => drawChart(svg, points));

  api(`${base}/telemetry`).then((data) => { points = data.points; redraw(); }).catch(() => redraw());

  const nowCells = {
    decode_tps: (v) => (typeof v === "number" ? `${v.toFixed(1)} tok/s` : "–"),
    prefill_tps: (v) => (typeof v === "number" ? `${v.toFixed(1)} tok/s` : "–"),
    mem_bytes: formatBytes, rss_bytes: formatBytes,
    temp_c: (v) => (typeof v === "number" ? `${Math.round(v)} °C` : "–"),
    queue_depth: (v) => (v ?? "–"),
  };

  function showCommands(commands) {
    const tbody = document.querySelector("#commands tbody");
    tbody.replaceChildren();
    for (const c of commands) {
      const tr = tbody.insertRow();
      tr.insertCell().textContent = c.op;
      tr.insertCell().textContent = ago(c.sent_ts);
      const td = tr.insertCell();
      td.textContent = c.ok === null ? "pending" : c.ok ? "ok" : "failed";
      td.className = c.ok === null ? "pending" : c.ok ? "ok" : "fail";
      td.title = JSON.stringify(c.result);
    }
  }

  function addEvents(events) {
    const tbody = document.querySelector("#events tbody");
    for (const e of events) {
      const tr = tbody.insertRow(0);
      tr.insertCell().textContent = ago(e.ts);
      tr.insertCell().textContent = e.kind;
      const td = tr.insertCell(); td.className = "mono"; td.textContent = JSON.stringify(e.body);
    }
    while (tbody.rows.length > 50) tbody.deleteRow(-1);
  }

  stream(`/ui/stream?device=${encodeURIComponent(device)}`, (data) => {
    const row = data.rows.find((r) => r.id === device);
    if (row) {
      const state = document.getElementById("state");
      state.textContent = row.state; state.className = `badge state-${row.state}`;
      document.getElementById("quant").textContent = row.quant;
      document.getElementById("model").textContent = row.model || "no model";
      document.getElementById("last-seen").dataset.ts = row.last_seen;
      const problem = document.getElementById("problem");
      problem.textContent = row.problem || ""; problem.hidden = !row.problem;
      for (const [field, fmt] of Object.entries(nowCells)) {
        const td = document.querySelector(`#now td[data-field="${field}"]`);
        if (td) td.textContent = fmt(row[field]);
      }
    }
    const lastSeen = document.getElementById("last-seen");
    lastSeen.textContent = ago(Number(lastSeen.dataset.ts));
    if (data.point) { points.push(data.point); redraw(); }
    if (data.events) addEvents(data.events);
    if (data.commands) showCommands(data.commands);
  });

  // The explain table (a select's answer: newer agents keep it out of their retained meta).
  function showExplain(candidates) {
    const table = document.createElement("table");
    table.className = "list explain";
    table.innerHTML = "<thead><tr><th>quant</th><th>verdict</th><th>size</th><th>quality</th><th>n_ctx</th><th>KV</th><th>GPU layers</th><th>RAM need</th><th>pred. tok/s</th><th>reason</th></tr></thead><tbody></tbody>";
    const fixed = (value, digits) => (typeof value === "number" ? value.toFixed(digits) : "–");
    for (const c of candidates) {
      const tr = table.tBodies[0].insertRow();
      tr.className = `verdict-${c.verdict}`;
      for (const cell of [c.quant, c.verdict, formatBytes(c.size), fixed(c.quality, 3), c.n_ctx, c.kv_type,
        c.n_gpu_layers, formatBytes((c.estimate || {}).ram_bytes), fixed(c.predicted_tokens_per_s, 1), c.reason]) {
        tr.insertCell().textContent = cell ?? "–";
      }
    }
    document.getElementById("explain").replaceChildren(table);
  }

  const out = document.getElementById("cmd-result");
  async function command(op, args) {
    out.textContent = `${op}: waiting for cmd/result…`;
    try {
      const result = await api(`${base}/cmd`, { op, args, wait_s: 120 });
      out.textContent = `${op}: ${JSON.stringify(result.pending ? { pending: true, id: result.id } : (result.ok ? result.result : result.error), null, 1)}`;
      out.className = `cmd-result ${result.pending ? "pending" : result.ok ? "ok" : "fail"}`;
      if (op === "select" && result.ok) showExplain(result.result.candidates || []);
    } catch (error) {
      out.textContent = `${op}: ${error.message}`;
      out.className = "cmd-result fail";
    }
  }
  document.querySelectorAll("button[data-op]").forEach((button) => button.addEventListener("click", () => command(button.dataset.op, {})));
  document.getElementById("pin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const quant = new FormData(event.target).get("quant");
    command("pin", { quant: quant || null });
  });

  document.getElementById("prompt-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const reply = document.getElementById("reply");
    const meta = document.getElementById("reply-meta");
    reply.textContent = ""; reply.className = "reply streaming"; meta.textContent = "sending…";
    const button = event.target.querySelector("button"); button.disabled = true;
    try {
      // A model id or pool/<name> goes through the controller's router (/api/prompt).
      const target = form.get("target");
      const response = await fetch(target ? "/api/prompt" : `${base}/prompt`, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
        body: JSON.stringify({
          ...(target ? { target } : {}),
          messages: [{ role: "user", content: form.get("prompt") }],
          max_tokens: Number(form.get("max_tokens")), temperature: Number(form.get("temperature")),
        }),
      });
      if (!response.ok) { const e = (await response.json()).error; throw new Error(`${e.code}: ${e.message}`); }
      const servedBy = target ? response.headers.get("x-edge-device") : null;
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffered = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffered += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, newline); buffered = buffered.slice(newline + 1);
          if (!line.trim()) continue;
          const record = JSON.parse(line);
          if (record.delta !== undefined) { reply.textContent += record.delta; meta.textContent = "streaming…"; }
          if (record.done) {
            if (record.error) { reply.className = "reply fail"; meta.textContent = `${record.error.code}: ${record.error.message}`; }
            else {
              if (!reply.textContent && record.text) reply.textContent = record.text;
              reply.className = "reply done";
              const u = record.usage || {}, t = record.timings || {};
              meta.textContent = `${record.finish_reason || "done"} · ${u.completion_tokens ?? "?"} tokens` +
                (t.decode_tps ? ` · ${Number(t.decode_tps).toFixed(1)} tok/s` : "") +
                (servedBy ? ` · answered by ${servedBy}` : "");
            }
          }
        }
      }
    } catch (error) {
      reply.className = "reply fail"; meta.textContent = error.message;
    } finally { button.disabled = false; }
  });
}

// --- models page -----------------------------------------------------------------------

function modelsPage() {
  const container = document.getElementById("rollouts");
  async function refresh() {
    const data = await api("/api/rollouts").catch(() => null);
    if (!data) return;
    container.replaceChildren();
    if (!data.rollouts.length) { container.textContent = "No rollout yet."; return; }
    for (const r of data.rollouts) {
      const box = document.createElement("div"); box.className = `rollout state-${r.state}`; box.dataset.id = r.id;
      const head = document.createElement("div"); head.className = "rollout-head";
      const counts = Object.entries(r.counts).map(([k, v]) => `${v} ${k}`).join(", ");
      head.textContent = `${r.id} · ${r.state} · ${r.spec.manifest}${r.spec.pin ? " pin " + r.spec.pin : ""} · ${r.spec.rate_per_min}/min · abort > ${r.spec.abort_percent} % · ${counts}${r.reason ? " · " + r.reason : ""}`;
      box.appendChild(head);
      if (!["rolling_back", "rolled_back"].includes(r.state)) {
        const button = document.createElement("button"); button.textContent = "roll back";
        button.addEventListener("click", async () => { await api(`/api/rollouts/${r.id}/rollback`, {}).catch((e) => alert(e.message)); refresh(); });
        head.appendChild(button);
      }
      const table = document.createElement("table"); table.className = "list";
      for (const d of r.devices) {
        const tr = table.insertRow();
        const link = document.createElement("a"); link.href = `/devices/${encodeURIComponent(d.device_id)}`; link.textContent = d.device_id;
        tr.insertCell().appendChild(link);
        tr.insertCell().textContent = d.state;
        const bar = document.createElement("progress"); bar.max = 1; bar.value = d.progress ?? 0;
        tr.insertCell().appendChild(bar);
        tr.insertCell().textContent = d.error || "";
      }
      box.appendChild(table);
      container.appendChild(box);
    }
  }
  document.getElementById("rollout-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const spec = { manifest: form.get("manifest"), rate_per_min: Number(form.get("rate_per_min")), abort_percent: Number(form.get("abort_percent")) };
    if (form.get("pin")) spec.pin = form.get("pin");
    if (form.get("pool")) spec.pool = form.get("pool"); else spec.group = form.get("group") || "*";
    const out = document.getElementById("rollout-result");
    try { const r = await api("/api/rollouts", spec); out.textContent = `started ${r.id} on ${r.devices.length} device(s)`; out.className = "cmd-result ok"; }
    catch (error) { out.textContent = error.message; out.className = "cmd-result fail"; }
    refresh();
  });
  document.getElementById("upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const out = document.getElementById("upload-result");
    const files = form.getAll("files");
    try {
      for (const file of files) {  // the raw body, streamed by the browser: no multipart copy
        out.textContent = `uploading ${file.name} …`; out.className = "cmd-result";
        const response = await fetch(`/api/model-files/${encodeURIComponent(file.name)}`, {
          method: "PUT", body: file, credentials: "same-origin",
          headers: { "Content-Type": "application/octet-stream", "X-CSRF-Token": csrf() },
        });
        if (!response.ok) {
          const data = await response.json().catch(() => ({}));
          throw new Error(`${file.name}: ${(data.error && data.error.message) || response.statusText}`);
        }
      }
      out.textContent = "building the manifest …";
      const built = await api("/api/manifests", { name: form.get("name"), files: files.map((f) => f.name) });
      window.location = `/models?message=${encodeURIComponent("built and published " + built.name)}`;
    } catch (error) { out.textContent = error.message; out.className = "cmd-result fail"; }
  });
  refresh();
  setInterval(refresh, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "fleet") fleetPage();
  else if (page === "device") devicePage();
  else if (page === "models") modelsPage();
});
