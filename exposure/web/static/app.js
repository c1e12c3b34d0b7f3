// The risk desk's page: a WebSocket to the server (exposure/web/app.py), a full snapshot on
// connect, then conflated updates (at most 10 a second). Tables are built from the column
// lists the snapshot names; every number carries data-field (its SPEC key) and data-value
// (its exact value). No build step, no library: the server decides what this user sees.
"use strict";

const LABELS = {
  long_mv: "long", short_mv: "short", worst_gross: "worst gross", beta_net: "beta net",
  live_orders: "live orders", open_buy_mv: "open buy", open_sell_mv: "open sell",
  net_mv: "net mv", gross_mv: "gross mv", ref_price: "ref price", fund_pos: "fund pos",
  open_buy: "open buy", open_sell: "open sell", pnl: "P&L", currency: "ccy",
};
const TEXT = new Set(["name", "symbol", "currency"]);  // left-aligned, not numbers
const IDS = new Set(["account", "instrument", "sector"]);
const HIDDEN = new Set(["limits"]);                // used by the breach flags, not shown
const INTS = new Set(["live_orders", "fund_pos", "open_buy", "open_sell", "pos", "breach"]);
// Breach bits (SPEC): the flag, and how its use of the limit is computed from the row.
// limits = [gross, net, margin, loss].
const FLAGS = [
  [1, "gross", (r, l) => [r.gross, l[0]]],
  [2, "net", (r, l) => [Math.abs(r.net), l[1]]],
  [4, "margin", (r, l) => [r.margin, l[2]]],
  [8, "worst", (r, l) => [r.worst_gross, l[0]]],
  [16, "loss", (r, l) => [-r.pnl, l[3]]],
];
const STALE_MS = 2500;
const DECODER = new TextDecoder();

const S = {
  columns: null, fund: {}, accounts: new Map(), instruments: new Map(), sectors: new Map(),
  meta: {}, sort: { key: "gross", dir: "desc" }, filter: "", page: 0, size: 100, ipage: 0,
  opened: null, positions: null, lastMsg: 0, ws: null, backoff: 500,
};

const $ = (id) => document.getElementById(id);
const table = (name) => document.querySelector(`table[data-table="${name}"]`);

function fmt(col, v) {
  if (v === null || v === undefined) return "";
  if (typeof v !== "number") return String(v);
  if (IDS.has(col) || col === "epoch") return String(v);
  if (col === "rate") return v.toPrecision(6);     // a currency's rate: 0.00670000
  if (INTS.has(col)) return v.toLocaleString("en-US");
  return v.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
}

function cell(col, v) {
  const td = document.createElement("td");
  td.dataset.field = col;
  if (v !== null && v !== undefined) td.dataset.value = String(v);
  td.textContent = fmt(col, v);
  if (TEXT.has(col)) td.className = "text";
  else if (typeof v === "number" && v < 0) td.className = "neg";
  return td;
}

function flagsCell(row) {
  const td = document.createElement("td");
  td.dataset.field = "breach";
  td.dataset.value = String(row.breach);
  td.className = "text";
  const lim = Array.isArray(row.limits) ? row.limits : null;
  for (const [bit, name, use] of FLAGS) {
    const on = (row.breach & bit) !== 0;
    const [value, limit] = lim ? use(row, lim) : [null, 0];
    if (!on && !(limit > 0)) continue;
    const f = document.createElement("span");
    f.className = "flag" + (on ? " on" : "");
    f.dataset.flag = name;
    f.dataset.on = on ? "1" : "0";
    let text = name;
    if (limit > 0) {
      const pct = (100 * value) / limit;
      f.dataset.limit = String(limit);
      f.dataset.use = String(pct);
      text += ` ${Math.abs(pct) < 0.5 ? "0" : pct.toFixed(0)}%`;
      if (!on && pct >= 80) f.className += " warn";
      f.title = `${name}: ${fmt("x", value)} of a limit of ${fmt("x", limit)} (${pct.toFixed(1)}%)`;
    } else {
      f.title = `${name} limit breached (no limits row for this account on the feed yet)`;
    }
    f.textContent = text;
    td.appendChild(f);
  }
  return td;
}

function header(tbl, cols, sortable) {
  const tr = document.createElement("tr");
  for (const c of cols) {
    if (HIDDEN.has(c)) continue;
    const th = document.createElement("th");
    th.dataset.sort = c;
    th.textContent = LABELS[c] || c;
    if (TEXT.has(c) || c === "breach") th.className = "text";
    if (sortable && S.sort.key === c) th.dataset.dir = S.sort.dir;
    tr.appendChild(th);
  }
  tbl.tHead.replaceChildren(tr);
}

function toRow(cols, arr) {
  const o = {};
  for (let i = 0; i < cols.length; i++) o[cols[i]] = arr[i];
  return o;
}

function rowEl(cols, r, idcol) {
  const tr = document.createElement("tr");
  tr.dataset[idcol] = String(r[idcol]);
  for (const c of cols) {
    if (HIDDEN.has(c)) continue;
    tr.appendChild(c === "breach" ? flagsCell(r) : cell(c, r[c]));
  }
  return tr;
}

function compare(key, dir) {
  const s = dir === "asc" ? 1 : -1;
  return (a, b) => {
    let x = a[key], y = b[key];
    if (TEXT.has(key)) {
      x = x === null ? "\uffff" + String(a.account ?? a.instrument) : String(x).toLowerCase();
      y = y === null ? "\uffff" + String(b.account ?? b.instrument) : String(y).toLowerCase();
      return x < y ? -s : x > y ? s : 0;
    }
    return (x - y) * s || (a.account ?? a.instrument ?? 0) - (b.account ?? b.instrument ?? 0);
  };
}

// ---------------------------------------------------------------------------- rendering
function renderMeta() {
  const m = S.meta;
  $("node").textContent = m.node ?? "-";
  $("role").textContent = m.role ?? "-";
  $("role").dataset.value = m.role ?? "";
  $("epoch").textContent = m.epoch ?? "-";
  $("epoch").dataset.value = String(m.epoch ?? "");
  $("day").textContent = m.trading_day ?? (m.last_roll ? `rolled ${m.last_roll}` : "no schedule");
  $("day").dataset.value = m.trading_day ?? "";
  $("base").textContent = m.base_currency ?? "-";  // the money figures' currency (SPEC 7)
  checkStale();
}

function checkStale() {
  const why = [];
  if (!S.ws || S.ws.readyState !== WebSocket.OPEN) why.push("not connected to the server");
  else if (Date.now() - S.lastMsg > STALE_MS) why.push("nothing from the server");
  if (S.meta.stale) why.push(S.meta.stale_why);
  const stale = why.length > 0;
  $("status").dataset.stale = stale ? "true" : "false";
  $("stale").hidden = !stale;
  $("why").textContent = why.join("; ");
}

function renderFund() {
  const cols = S.columns.fund;
  const tbl = table("fund");
  header(tbl, cols, false);
  const tr = document.createElement("tr");
  for (const c of cols) tr.appendChild(cell(c, S.fund[c]));
  tbl.tBodies[0].replaceChildren(tr);
}

function visibleAccounts() {
  const f = S.filter.trim().toLowerCase();
  let rows = [...S.accounts.values()];
  if (f) {
    rows = rows.filter((r) => String(r.account) === f || String(r.account).startsWith(f)
      || (r.name !== null && String(r.name).toLowerCase().includes(f)));
  }
  rows.sort(compare(S.sort.key, S.sort.dir));
  return rows;
}

function renderAccounts() {
  const cols = S.columns.accounts;
  const tbl = table("accounts");
  header(tbl, cols, true);
  const rows = visibleAccounts();
  const size = S.size > 0 ? S.size : Math.max(rows.length, 1);
  const pages = Math.max(1, Math.ceil(rows.length / size));
  S.page = Math.min(S.page, pages - 1);
  const from = S.page * size;
  const shown = rows.slice(from, from + size);
  tbl.tBodies[0].replaceChildren(...shown.map((r) => {
    const tr = rowEl(cols, r, "account");
    if (r.breach) tr.classList.add("breach");
    if (r.account === S.opened) tr.classList.add("open");
    return tr;
  }));
  $("page-info").textContent = rows.length
    ? `${from + 1}-${from + shown.length} of ${rows.length}` : "0 of 0";
  $("page-info").dataset.total = String(rows.length);
  $("accounts-count").textContent = `(${S.accounts.size})`;
}

function renderInstruments() {
  const cols = S.columns.instruments;
  const tbl = table("instruments");
  header(tbl, cols, false);
  const rows = [...S.instruments.values()].sort(compare("crossing", "desc"));
  const size = 100;
  const pages = Math.max(1, Math.ceil(rows.length / size));
  S.ipage = Math.min(S.ipage, pages - 1);
  const from = S.ipage * size;
  const shown = rows.slice(from, from + size);
  tbl.tBodies[0].replaceChildren(...shown.map((r) => rowEl(cols, r, "instrument")));
  $("ipage-info").textContent = rows.length
    ? `${from + 1}-${from + shown.length} of ${rows.length}` : "0 of 0";
  $("instruments-count").textContent = `(${S.instruments.size})`;
}

function renderSectors() {
  const cols = S.columns.sectors;
  const tbl = table("sectors");
  header(tbl, cols, false);
  const rows = [...S.sectors.values()].sort(compare("gross_mv", "desc"));
  tbl.tBodies[0].replaceChildren(...rows.map((r) => rowEl(cols, r, "sector")));
}

function renderPositions() {
  const sec = $("drill");
  if (S.opened === null) { sec.hidden = true; return; }
  sec.hidden = false;
  const a = S.accounts.get(S.opened);
  $("drill-name").textContent = a && a.name ? `${a.name} (${S.opened})` : String(S.opened);
  const tbl = table("positions");
  tbl.dataset.account = String(S.opened);
  const cols = S.columns.positions;
  header(tbl, cols, false);
  const p = S.positions;
  $("drill-why").textContent = p && p.why ? p.why : "";
  const rows = p && p.rows ? p.rows.map((x) => toRow(cols, x)) : [];
  tbl.tBodies[0].replaceChildren(...rows.map((r) => rowEl(cols, r, "instrument")));
}

function renderAll() {
  if (!S.columns) return;
  renderMeta();
  renderFund();
  renderAccounts();
  renderInstruments();
  renderSectors();
  renderPositions();
}

// ---------------------------------------------------------------------------- messages
function merge(map, cols, idcol, rows) {
  for (const arr of rows || []) {
    const r = toRow(cols, arr);
    map.set(r[idcol], r);
  }
}

function onMessage(ev) {
  S.lastMsg = Date.now();
  let m;
  try {
    m = JSON.parse(typeof ev.data === "string" ? ev.data : DECODER.decode(ev.data));
  } catch { return; }
  if (m.type === "snapshot") {
    S.columns = m.columns;
    S.accounts = new Map(); S.instruments = new Map(); S.sectors = new Map();
    S.fund = m.fund || {};
    merge(S.accounts, m.columns.accounts, "account", m.accounts);
    merge(S.instruments, m.columns.instruments, "instrument", m.instruments);
    merge(S.sectors, m.columns.sectors, "sector", m.sectors);
    S.meta = m.meta || {};
    $("user").textContent = m.user ? `user ${m.user}` : "";
    if (m.positions && m.positions.account === S.opened) S.positions = m.positions;
    else if (S.opened !== null) send({ open: S.opened });
    renderAll();
  } else if (m.type === "update" && S.columns) {
    S.meta = m.meta || S.meta;
    if (m.fund) S.fund = m.fund;
    merge(S.accounts, S.columns.accounts, "account", m.accounts);
    merge(S.instruments, S.columns.instruments, "instrument", m.instruments);
    merge(S.sectors, S.columns.sectors, "sector", m.sectors);
    renderMeta();
    if (m.fund) renderFund();
    if (m.accounts && m.accounts.length) renderAccounts();
    if (m.instruments) renderInstruments();
    if (m.sectors) renderSectors();
    if (m.positions && m.positions.account === S.opened) {  // (the drill-down, refreshed)
      S.positions = m.positions;
      renderPositions();
    }
  }
}

function send(obj) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(obj));
}

function connect() {
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  ws.binaryType = "arraybuffer";  // (the server sends JSON in binary frames)
  S.ws = ws;
  ws.onopen = () => { S.backoff = 500; checkStale(); };
  ws.onmessage = onMessage;
  ws.onclose = (ev) => {
    checkStale();
    if (ev.code === 4401) { $("login").hidden = false; $("book").hidden = true; return; }
    setTimeout(connect, S.backoff);
    S.backoff = Math.min(5000, S.backoff * 2);
  };
}

// ---------------------------------------------------------------------------- controls
function wire() {
  table("accounts").tHead.addEventListener("click", (e) => {
    const th = e.target.closest("th");
    if (!th) return;
    const key = th.dataset.sort;
    S.sort = { key, dir: S.sort.key === key && S.sort.dir === "desc" ? "asc" : "desc" };
    renderAccounts();
  });
  table("accounts").tBodies[0].addEventListener("click", (e) => {
    const tr = e.target.closest("tr[data-account]");
    if (!tr) return;
    S.opened = Number(tr.dataset.account);
    S.positions = null;
    send({ open: S.opened });
    renderAccounts();
    renderPositions();
  });
  $("drill-close").addEventListener("click", () => {
    S.opened = null; S.positions = null; send({ close: true }); renderAccounts(); renderPositions();
  });
  $("filter").addEventListener("input", (e) => { S.filter = e.target.value; S.page = 0; renderAccounts(); });
  $("prev").addEventListener("click", () => { S.page = Math.max(0, S.page - 1); renderAccounts(); });
  $("next").addEventListener("click", () => { S.page += 1; renderAccounts(); });
  $("page-size").addEventListener("change", (e) => { S.size = Number(e.target.value); S.page = 0; renderAccounts(); });
  $("iprev").addEventListener("click", () => { S.ipage = Math.max(0, S.ipage - 1); renderInstruments(); });
  $("inext").addEventListener("click", () => { S.ipage += 1; renderInstruments(); });
  $("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    const r = await fetch("/login", {
      method: "POST", credentials: "same-origin", headers: { "content-type": "application/json" },
      body: JSON.stringify({ name: $("login-name").value, password: $("login-password").value }),
    });
    if (r.ok) {
      $("login").hidden = true; $("book").hidden = false; $("login-error").textContent = "";
      connect();
    } else {
      $("login-error").textContent = (await r.json().catch(() => ({}))).error || "log in failed";
    }
  });
  setInterval(checkStale, 500);
}

wire();
connect();
