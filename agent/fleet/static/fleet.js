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
  // The controller filters, sorts and pages the table (GET /api/devices, /ui/stream with the
  // same query): the page holds one page of rows, however large the fleet. A new filter, sort
  // or page opens a new stream whose first message is that page.
  const table = document.getElementById("devices");
  const body = table.tBodies[0];
  const headers = [...table.tHead.rows[0].cells];
  const keys = headers.map((th) => th.dataset.key);
  const seenColumn = keys.indexOf("last_seen");
  const filter = document.getElementById("filter");
  const stateFilter = document.getElementById("state-filter");
  const problem = document.getElementById("filter-problem");
  const byId = new Map([...body.rows].map((tr) => [tr.dataset.id, tr]));
  const view = {
    filter: filter.value, state: stateFilter.value, sort: table.dataset.sort,
    order: table.dataset.order, page: Number(table.dataset.page), per_page: Number(table.dataset.perPage),
  };
  let source = null, debounce = null, generation = 0;

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
  }

  function showSort() {
    headers.forEach((th) => th.removeAttribute("aria-sort"));
    const th = headers[keys.indexOf(view.sort)];
    if (th) th.setAttribute("aria-sort", view.order === "asc" ? "ascending" : "descending");
  }

  function showPager(data) {
    view.page = data.page;
    document.getElementById("shown").textContent = `${data.total} of ${data.summary.devices} match`;
    document.getElementById("page-info").textContent = `page ${data.page} of ${data.pages}`;
    document.getElementById("page-prev").disabled = data.page <= 1;
    document.getElementById("page-next").disabled = data.page >= data.pages;
  }

  function params() {
    const q = new URLSearchParams();
    if (view.filter.trim()) q.set("filter", view.filter.trim());
    if (view.state) q.set("state", view.state);
    if (view.sort !== "id") q.set("sort", view.sort);
    if (view.order !== "asc") q.set("order", view.order);
    if (view.page > 1) q.set("page", String(view.page));
    q.set("per_page", String(view.per_page));
    return q;
  }

  function onData(data, mine) {
    if (mine !== generation) return;  // a message from a stream this view replaced
    if (data.error) { problem.textContent = data.error.message; problem.hidden = false; table.dataset.rendered = params().toString(); return; }
    problem.hidden = true;
    updateCounts(data.summary);
    for (const row of data.rows) {
      let tr = byId.get(row.id);
      if (!tr) { tr = document.createElement("tr"); byId.set(row.id, tr); }
      render(tr, row);
    }
    if (data.ids) {
      // The page's rows in the controller's order; rows that left the page go.
      const keep = new Set(data.ids);
      for (const [id, tr] of byId) if (!keep.has(id)) { tr.remove(); byId.delete(id); }
      const fragment = document.createDocumentFragment();
      for (const id of data.ids) { const tr = byId.get(id); if (tr) fragment.appendChild(tr); }
      body.replaceChildren(fragment);
      if (data.ids.length) document.getElementById("empty")?.remove();
      showPager(data);
    }
    for (const tr of byId.values()) {
      const td = tr.cells[seenColumn];
      td.textContent = ago(Number(td.dataset.value));
    }
    table.dataset.rendered = params().toString();  // what the benchmark waits for
  }

  function follow() {
    if (source) source.close();
    const mine = ++generation;
    const query = params();
    history.replaceState(null, "", query.toString() === `per_page=${view.per_page}` ? "/" : `/?${query}`);
    source = stream(`/ui/stream?${query}`, (data) => onData(data, mine));
  }

  table.tHead.addEventListener("click", (event) => {
    const th = event.target.closest("th");
    if (!th) return;
    view.order = view.sort === th.dataset.key && view.order === "asc" ? "desc" : "asc";
    view.sort = th.dataset.key;
    view.page = 1;
    showSort();
    follow();
  });
  filter.addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { view.filter = filter.value; view.page = 1; follow(); }, 150);
  });
  stateFilter.addEventListener("change", () => { view.state = stateFilter.value; view.page = 1; follow(); });
  document.getElementById("page-prev").addEventListener("click", () => { view.page = Math.max(1, view.page - 1); follow(); });
  document.getElementById("page-next").addEventListener("click", () => { view.page += 1; follow(); });
  showSort();
  follow();
  fleetCharts();
}

const STATE_COLOURS = { ready: "#16a34a", busy: "#2463eb", starting: "#d97706", draining: "#a16207", degraded: "#dc2626", other: "#94a3b8" };

function fleetCharts() {
  // Devices by state (stacked) and total decode tok/s, from GET /api/fleet/history: the
  // registry's telemetry samples, so every controller draws the same chart.
  const states = document.getElementById("chart-states");
  const tps = document.getElementById("chart-tps");
  const windowSelect = document.getElementById("chart-window");
  async function refresh() {
    const data = await api(`/api/fleet/history?window_s=${windowSelect.value}`).catch(() => null);
    if (!data) return;
    const range = [data.since, Math.max(data.now, data.since + data.bucket_s)];
    drawChart(tps, data.buckets.map((b) => ({ ts: b.ts + data.bucket_s / 2, decode_tps: b.decode_tps })), range);
    drawStacked(states, data.buckets, data.bucket_s, range);
  }
  windowSelect.addEventListener("change", refresh);
  refresh();
  setInterval(refresh, 10000);
}

function drawStacked(svg, buckets, bucketS, range) {
  const W = 320, H = 120, L = 44, B = 16, T = 6;
  const ns = "http://www.w3.org/2000/svg";
  svg.replaceChildren();
  const el = (name, attrs, text) => {
    const node = document.createElementNS(ns, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  el("rect", { x: L, y: T, width: W - L - 2, height: H - T - B, class: "plot" });
  if (!buckets.length) { el("text", { x: W / 2, y: H / 2, class: "empty", "text-anchor": "middle" }, "no telemetry yet"); return; }
  const order = Object.keys(STATE_COLOURS).filter((s) => buckets.some((b) => b.counts[s]));
  const [x0, x1] = range;
  const top = Math.max(1, ...buckets.map((b) => Object.values(b.counts).reduce((a, n) => a + n, 0)));
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - 2);
  const sy = (y) => H - B - (y / top) * (H - T - B);
  const width = Math.max(1, sx(x0 + bucketS) - sx(x0) - 1);
  for (const b of buckets) {
    let base = 0;
    for (const state of order) {
      const n = b.counts[state] || 0;
      if (!n) continue;
      const rect = el("rect", { x: sx(b.ts).toFixed(1), y: sy(base + n).toFixed(1), width: width.toFixed(1), height: (sy(base) - sy(base + n)).toFixed(1), fill: STATE_COLOURS[state] });
      rect.appendChild(document.createElementNS(ns, "title")).textContent = `${new Date(b.ts * 1000).toLocaleTimeString()}: ${n} ${state}`;
      base += n;
    }
  }
  el("text", { x: L - 4, y: T + 8, class: "axis", "text-anchor": "end" }, String(top));
  el("text", { x: L - 4, y: H - B, class: "axis", "text-anchor": "end" }, "0");
  el("text", { x: L, y: H - 3, class: "axis" }, new Date(x0 * 1000).toLocaleTimeString());
  el("text", { x: W - 2, y: H - 3, class: "axis", "text-anchor": "end" }, new Date(x1 * 1000).toLocaleTimeString());
  const legend = document.getElementById("chart-legend");
  legend.replaceChildren(...order.map((state) => {
    const item = document.createElement("span"); item.className = "chip";
    const swatch = document.createElement("i"); swatch.style.background = STATE_COLOURS[state];
    item.append(swatch, ` ${state}`); return item;
  }));
}

// --- device page -----------------------------------------------------------------------

function drawChart(svg, points, range) {
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
  // ``range``: the time axis a caller fixes (the fleet chart's window), else the data's own.
  const [x0, x1] = range || [Math.min(...xs), Math.max(...xs, Math.min(...xs) + 1)];
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
      tr.insertCell().textContent = ago(c.sent_ts);
      const td = tr.insertCell();
      td.textContent = c.text;
      td.className = c.ok === null ? "pending" : c.ok ? "ok" : "fail";
      td.title = JSON.stringify(c.result);
    }
  }

  const addEvents = eventList(document.querySelector("#events tbody"));
  addEvents(JSON.parse(document.getElementById("events-data").textContent));

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

// Events as the controller words them (``text``), newest first; every progress event of one
// download updates that download's row and bar instead of adding a row.
const DOWNLOAD_DONE = ["complete", "done", "cached", "failed"];  // "done": the fleet simulator's

function eventList(tbody) {
  const downloads = new Map();  // file -> the row of its latest download
  return (events) => {
    for (const e of events) {
      let tr = null;
      if (e.kind === "download") {
        const file = String(e.body.file || "");
        tr = downloads.get(file);
        if (tr && tr.dataset.finished && !DOWNLOAD_DONE.includes(e.body.state)) tr = null;  // a new download of it
      }
      if (!tr) {
        tr = tbody.insertRow(0);
        tr.insertCell(); tr.insertCell();
        if (e.kind === "download") { tr.className = "download"; downloads.set(String(e.body.file || ""), tr); }
      }
      tr.cells[0].textContent = ago(e.ts);
      tr.cells[0].dataset.ts = e.ts;
      const text = document.createElement("span"); text.textContent = e.text;
      if (e.kind === "download") {
        const bar = document.createElement("progress");
        bar.max = 1;
        if (typeof e.body.bytes === "number" && e.body.total > 0) bar.value = Math.min(1, e.body.bytes / e.body.total);
        if (DOWNLOAD_DONE.includes(e.body.state)) { tr.dataset.finished = "1"; if (e.body.state !== "failed") bar.value = 1; }
        tr.classList.toggle("fail", e.body.state === "failed");
        tr.cells[1].replaceChildren(bar, " ", text);
      } else {
        tr.cells[1].replaceChildren(text);
      }
    }
    while (tbody.rows.length > 50) {
      const gone = tbody.rows[tbody.rows.length - 1];
      for (const [file, row] of downloads) if (row === gone) downloads.delete(file);
      gone.remove();
    }
    for (const tr of tbody.rows) tr.cells[0].textContent = ago(Number(tr.cells[0].dataset.ts));
  };
}

// --- rollout plans and pages ----------------------------------------------------------------

// A plan (POST /api/rollouts with dry_run) names its fields as the selector does; read the
// first of several names, so an older or newer controller's plan still shows.
const first = (object, names) => { for (const n of names) if (object && object[n] !== undefined && object[n] !== null) return object[n]; return undefined; };
const planDevices = (plan) => first(plan, ["devices", "plan", "rows"]) || [];
const planQuant = (d) => first(d, ["quant", "variant"]) ?? (d.no_fit || d.verdict === "no_fit" ? "no fit" : "–");
const fixedOr = (value, digits) => (typeof value === "number" ? value.toFixed(digits) : "–");

function renderPlan(container, plan, limit = 200) {
  container.replaceChildren();
  const summary = first(plan, ["summary", "counts"]);
  if (summary && typeof summary === "object") {
    const chips = document.createElement("div"); chips.className = "chips plan-summary";
    for (const [key, value] of Object.entries(summary)) {
      const chip = document.createElement("span"); chip.className = "chip";
      chip.textContent = `${key}: ${typeof value === "object" ? Object.entries(value).map(([k, v]) => `${k} ${v}`).join(", ") : value}`;
      chips.appendChild(chip);
    }
    container.appendChild(chips);
  }
  const devices = planDevices(plan);
  const table = document.createElement("table"); table.className = "list plan";
  table.innerHTML = "<thead><tr><th>device</th><th>variant</th><th>n_ctx</th><th>KV</th><th>GPU layers</th><th>pred. memory</th><th>pred. tok/s</th><th>why</th></tr></thead><tbody></tbody>";
  for (const d of devices.slice(0, limit)) {
    const tr = table.tBodies[0].insertRow();
    const noFit = d.no_fit || d.verdict === "no_fit" || planQuant(d) === "no fit";
    if (noFit) tr.className = "no-fit";
    const memory = first(d, ["ram_bytes", "memory_bytes", "predicted_memory_bytes", "predicted_ram_bytes"]) ?? first(d.estimate, ["ram_bytes"]);
    for (const cell of [first(d, ["device_id", "id", "device"]), planQuant(d), first(d, ["n_ctx"]), first(d, ["kv_type"]),
      first(d, ["n_gpu_layers"]), formatBytes(memory), fixedOr(first(d, ["predicted_tokens_per_s", "predicted_tps", "tokens_per_s"]), 1),
      first(d, ["reason", "why"])]) {
      tr.insertCell().textContent = cell ?? "–";
    }
  }
  container.appendChild(table);
  if (devices.length > limit) {
    const more = document.createElement("p"); more.className = "muted";
    more.textContent = `and ${devices.length - limit} more devices`;
    container.appendChild(more);
  }
}

function rolloutPage() {
  const id = document.body.dataset.rollout;
  const byId = (name) => document.getElementById(name);
  const PER_PAGE = 100;
  let page = 0, latest = null;
  const stored = sessionStorage.getItem(`plan:${id}`);  // the plan this browser saw before Start
  let planned = new Map();

  function showPlan(plan) {
    if (!plan) return;
    byId("plan-card").hidden = false;
    renderPlan(byId("plan"), plan);
    planned = new Map(planDevices(plan).map((d) => [first(d, ["device_id", "id", "device"]), planQuant(d)]));
  }

  function showSteps() {
    if (!latest) return;
    const wanted = byId("step-filter").value;
    const steps = latest.devices.filter((d) => !wanted || d.state === wanted);
    const pages = Math.max(1, Math.ceil(steps.length / PER_PAGE));
    page = Math.min(page, pages - 1);
    const tbody = byId("steps").tBodies[0];
    tbody.replaceChildren();
    for (const d of steps.slice(page * PER_PAGE, (page + 1) * PER_PAGE)) {
      const tr = tbody.insertRow(); tr.dataset.id = d.device_id; tr.className = `step-${d.state}`;
      const link = document.createElement("a"); link.href = `/devices/${encodeURIComponent(d.device_id)}`; link.textContent = d.device_id;
      tr.insertCell().appendChild(link);
      const state = document.createElement("span"); state.className = `badge step-${d.state}`; state.textContent = d.outcome ? `${d.state} (${d.outcome})` : d.state;
      tr.insertCell().appendChild(state);
      const bar = document.createElement("progress"); bar.max = 1; bar.value = d.progress ?? (["done", "succeeded"].includes(d.state) ? 1 : 0);
      tr.insertCell().appendChild(bar);
      tr.insertCell().textContent = planned.get(d.device_id) ?? "–";
      tr.insertCell().textContent = d.error || "";
    }
    byId("steps-shown").textContent = `${steps.length} devices · page ${page + 1} of ${pages}`;
    byId("steps-prev").disabled = page === 0;
    byId("steps-next").disabled = page >= pages - 1;
  }

  function show(r) {
    latest = r;
    const state = byId("rollout-state"); state.textContent = r.state; state.className = `badge rollout-${r.state}`;
    document.body.dataset.state = r.state;
    const spec = r.spec || {};
    const target = [spec.filter && `filter ${spec.filter}`, spec.group && `group ${spec.group}`, spec.pool && `pool ${spec.pool}`,
      spec.devices && spec.devices.length && `${spec.devices.length} listed devices`].filter(Boolean).join(" + ");
    byId("rollout-what").textContent = `${spec.manifest || r.source}${spec.pin ? ` pinned to ${spec.pin}` : ""} → ${target || "?"} · created ${ago(r.created)}`;
    byId("rollout-reason").hidden = !r.reason; byId("rollout-reason").textContent = r.reason || "";
    const total = r.devices.length;
    const counts = r.counts || {};
    const failed = r.failed ?? (counts.failed || 0);
    const finished = r.finished ?? ((counts.done || 0) + (counts.failed || 0));
    byId("rollout-progress").value = total ? finished / total : 0;
    byId("rollout-finished").textContent = `${finished} of ${total} finished`;
    byId("rollout-counts").replaceChildren(...Object.entries(counts).map(([k, v]) => {
      const chip = document.createElement("span"); chip.className = `chip step-${k}`; chip.textContent = `${v} ${k}`; return chip;
    }));
    byId("rollout-rate").textContent = `${fixedOr(r.rate_per_min ?? spec.rate_per_min ?? spec.base_rate, 1)} devices/min` +
      (spec.base_rate ? ` (ramp from ${spec.base_rate} ×${spec.increment_factor} to ${spec.max_rate ?? "∞"})` : "");
    byId("rollout-in-progress").textContent = r.in_progress ?? "–";
    // The failure rate counts only finished devices, and decides nothing before min_devices.
    const percent = r.failure_percent ?? (finished ? (failed * 100) / finished : 0);
    const threshold = spec.abort_percent ?? 100;
    byId("failure-fill").style.width = `${Math.min(100, percent ?? 0)}%`;
    byId("failure-fill").classList.toggle("over", (percent ?? 0) > threshold);
    byId("failure-mark").style.left = `${Math.min(100, threshold)}%`;
    const sample = spec.min_devices !== undefined ? `; decides once ${spec.min_devices} have finished` : "";
    const cap = spec.max_failures !== undefined && spec.max_failures !== null ? `; or past ${spec.max_failures} failures` : "";
    byId("failure-text").textContent = `${failed} of ${finished} finished failed (${fixedOr(percent ?? 0, 0)} %); aborts above ${threshold} %${sample}${cap}`;
    byId("rollout-abort").disabled = ["rolling_back", "rolled_back"].includes(r.state);
    if (r.plan) showPlan(r.plan);
    const select = byId("step-filter");
    for (const k of Object.keys(counts)) if (![...select.options].some((o) => o.value === k)) select.add(new Option(k, k));
    showSteps();
    const tbody = byId("decisions").tBodies[0];
    tbody.replaceChildren();
    for (const e of (r.events || []).slice().reverse()) {
      const tr = tbody.insertRow();
      tr.insertCell().textContent = ago(e.ts);
      tr.insertCell().textContent = e.device_id || "";
      tr.insertCell().textContent = e.decision;
      tr.insertCell().textContent = e.reason;
    }
  }

  async function refresh() {
    try { show(await api(`/api/rollouts/${encodeURIComponent(id)}`)); }
    catch (error) { byId("rollout-result").textContent = error.message; byId("rollout-result").className = "cmd-result fail"; }
  }
  if (stored) showPlan(JSON.parse(stored));
  byId("step-filter").addEventListener("change", () => { page = 0; showSteps(); });
  byId("steps-prev").addEventListener("click", () => { page -= 1; showSteps(); });
  byId("steps-next").addEventListener("click", () => { page += 1; showSteps(); });
  byId("rollout-abort").addEventListener("click", async () => {
    if (!confirm("Stop this rollout and roll back every device it switched?")) return;
    const out = byId("rollout-result");
    try { await api(`/api/rollouts/${encodeURIComponent(id)}/rollback`, {}); out.textContent = "abort and roll back requested"; out.className = "cmd-result ok"; }
    catch (error) { out.textContent = error.message; out.className = "cmd-result fail"; }
    refresh();
  });
  refresh();
  setInterval(refresh, 2000);
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
      const link = document.createElement("a"); link.href = `/rollouts/${encodeURIComponent(r.id)}`; link.textContent = r.id;
      const rate = r.rate_per_min ?? r.spec.rate_per_min ?? r.spec.base_rate;
      head.append(link, ` · ${r.state} · ${r.spec.manifest}${r.spec.pin ? " pin " + r.spec.pin : ""} · ${fixedOr(rate, 1)}/min · abort > ${r.spec.abort_percent} % · ${counts}${r.reason ? " · " + r.reason : ""}`);
      box.appendChild(head);
      if (!["rolling_back", "rolled_back"].includes(r.state)) {
        const button = document.createElement("button"); button.textContent = "roll back";
        button.addEventListener("click", async () => { await api(`/api/rollouts/${r.id}/rollback`, {}).catch((e) => alert(e.message)); refresh(); });
        head.appendChild(button);
      }
      const table = document.createElement("table"); table.className = "list";
      // The rollout page pages through every device; this list shows the first few.
      for (const d of r.devices.slice(0, 20)) {
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
  const rolloutForm = document.getElementById("rollout-form");
  function rolloutSpec() {
    const form = new FormData(rolloutForm);
    const spec = { manifest: form.get("manifest"), rate_per_min: Number(form.get("rate_per_min")), abort_percent: Number(form.get("abort_percent")) };
    if (form.get("pin")) spec.pin = form.get("pin");
    // Newer fields only when given: a controller that does not know them still starts.
    if (form.get("filter")) spec.filter = form.get("filter");
    if (form.get("min_devices")) spec.min_devices = Number(form.get("min_devices"));
    if (form.get("soak_s")) spec.soak_s = Number(form.get("soak_s"));
    if (form.get("pool")) spec.pool = form.get("pool"); else if (!spec.filter || form.get("group") !== "*") spec.group = form.get("group") || "*";
    return spec;
  }
  let plan = null;
  const planCard = document.getElementById("rollout-plan-card");
  rolloutForm.addEventListener("input", () => { plan = null; planCard.hidden = true; });
  document.getElementById("rollout-plan-button").addEventListener("click", async () => {
    const out = document.getElementById("rollout-result");
    const view = document.getElementById("rollout-plan");
    out.textContent = "planning …"; out.className = "cmd-result";
    try {
      plan = await api("/api/rollouts", { ...rolloutSpec(), dry_run: true });
      renderPlan(view, plan);
      planCard.hidden = false;
      out.textContent = `plan for ${planDevices(plan).length} device(s); nothing was sent`; out.className = "cmd-result ok planned";
    } catch (error) {
      plan = null;
      out.textContent = `no plan: ${error.message}`; out.className = "cmd-result fail";
    }
  });
  rolloutForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const out = document.getElementById("rollout-result");
    try {
      const r = await api("/api/rollouts", rolloutSpec());
      if (plan) sessionStorage.setItem(`plan:${r.id}`, JSON.stringify(plan));
      out.replaceChildren(`started ${r.id} on ${r.devices.length} device(s) · `);
      const link = document.createElement("a"); link.href = `/rollouts/${encodeURIComponent(r.id)}`; link.textContent = "follow it";
      out.appendChild(link);
      out.className = "cmd-result ok";
    }
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
  else if (page === "rollout") rolloutPage();
});
