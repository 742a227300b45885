// locker dashboard: renders a page of GET /locks as a table and the pools of GET /pools, refreshed
// 2 seconds after the previous refresh finished. A refresh asks one thing at a time (the locks,
// then the pools, then each pool the user opened), so the page never has two requests open at
// once, however slow the server.
// The filter box is a server-side search of locks (GET /locks?q=) and filters pools by name;
// only the first PAGE matching locks are fetched ("Show more" adds a page), pools show only their
// counts until opened, and only the first POOL_PAGE matching pools are listed, so the page stays
// usable with 100,000 locks and thousands of pools.
// Names, holder info and item metadata are user data: they only ever reach the page as text
// nodes (textContent), never as HTML, and only http(s) URLs become links.
"use strict";

const REFRESH_MS = 2000;
const PAGE = 200;
const MAX_PAGE = 10000; // the server's largest page
const POOL_PAGE = 100;

// Every request goes to a URL built from the page's own, so the dashboard also works under a
// reverse proxy's path prefix (https://ci.example.com/locker/ → the server's /). The userinfo of
// a page opened as http://user:pass@host/ is removed: fetch refuses URLs with credentials (and
// a relative URL inherits them from the document's). The browser still authenticates these
// same-origin requests with the credentials it cached when it loaded the page.
function api(path) {
  const base = new URL(".", window.location.href);
  base.username = "";
  base.password = "";
  return new URL(path, base);
}

let locks = {};
let total = 0; // locks matching the filter, over every page (Locker-Total)
let limit = PAGE; // how many of them to show
let confirming = null; // name of the lock whose force release awaits confirmation
let inFlight = null; // the refresh under way, if any
let again = false; // a refresh was asked for while one was under way
let timer = null; // the next scheduled refresh
let locksError = null; // why the last GET /locks failed, if it did
let poolsError = null; // why the last GET /pools (or of an opened pool) failed, if it did

let pools = []; // GET /pools: [{name, items, claimed, waiters}]
let poolLimit = POOL_PAGE; // how many matching pools to list
const opened = new Set(); // pools the user opened: their items are fetched on every refresh
const poolItems = new Map(); // opened pool's name → its GET /pool/{pool} answer
const openMetadata = new Set(); // "pool\nitem" whose metadata the user opened
const poolNodes = new Map(); // pool name → its <details>, kept across refreshes

function humanize(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
  const parts = [];
  for (const [unit, size] of units) {
    if (seconds >= size || (unit === "s" && parts.length === 0)) {
      parts.push(Math.floor(seconds / size) + unit);
      seconds %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function cell(label, ...children) {
  const td = el("td");
  td.dataset.label = label;
  for (const child of children) td.append(child);
  return td;
}

function safeUrl(value) {
  if (!value) return null;
  try {
    const url = new URL(value, window.location.href);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch (_) {
    return null;
  }
}

// A holding's info fields. Servers may send an empty info as [] rather than {}: anything but
// an object counts as no info.
function infoOf(lock) {
  const info = lock.info;
  return info && typeof info === "object" && !Array.isArray(info) ? info : {};
}

const BUILD_FIELDS = ["team", "pipeline", "job", "build", "build_name"];

// A holding's build (team / pipeline / job / build, else its other info), linked to the build
// when the holder gave an http(s) `build_url` or `url`.
function holderInfo(info) {
  const parts = BUILD_FIELDS.filter((k) => info[k]).map((k) => info[k]);
  const others = Object.keys(info)
    .filter((k) => ![...BUILD_FIELDS, "url", "build_url", "build_id", "atc_url"].includes(k));
  const text = parts.length ? parts.join(" / ") : others.map((k) => k + "=" + info[k]).join(", ");
  const href = safeUrl(info.build_url || info.url || "");
  if (href) {
    const link = el("a", text || href);
    link.href = href;
    link.rel = "noopener noreferrer";
    link.target = "_blank";
    return link;
  }
  return text || "—";
}

function holderCell(info) {
  return cell("Holder", holderInfo(info));
}

function requestors(lockedBy) {
  return Object.entries(lockedBy || {})
    .map(([who, count]) => el("span", count > 1 ? who + " ×" + count : who, "requestor"));
}

function requestorsCell(lockedBy) {
  return cell("Requestors", ...requestors(lockedBy));
}

function actionCell(name) {
  const td = cell("");
  if (confirming === name) {
    td.append(el("span", "Release " + name + "? "));
    const yes = el("button", "Yes, release", "confirm");
    yes.addEventListener("click", () => forceRelease(name));
    const no = el("button", "Cancel", "cancel");
    no.addEventListener("click", () => { confirming = null; render(); });
    td.append(yes, " ", no);
  } else {
    const button = el("button", "Force release", "force");
    button.addEventListener("click", () => { confirming = name; render(); });
    td.append(button);
  }
  return td;
}

// Semaphores (slots > 1) have several holdings; show every key and requestor.
function holders(lock) {
  return lock.holders && lock.holders.length ? lock.holders : [lock];
}

function keyCell(lock) {
  const td = cell("Key");
  holders(lock).forEach((holder, i) => td.append(i ? " " : "", el("code", holder.key)));
  if ((lock.slots || 1) > 1) {
    td.append(" ", el("span", holders(lock).length + "/" + lock.slots + " slots", "slots"));
  }
  return td;
}

function allRequestors(lock) {
  const all = {};
  for (const holder of holders(lock)) Object.assign(all, holder.locked_by || {});
  return all;
}

function render() {
  renderLocks();
  renderPools();
}

function renderLocks() {
  const now = Date.now();
  const filter = document.getElementById("filter").value.trim();
  const body = document.querySelector("#locks tbody");
  const names = Object.keys(locks).sort();
  const rows = [];
  for (const name of names) {
    const lock = locks[name];
    const tr = el("tr");
    tr.dataset.lock = name;
    const held = lock.acquired_at ? humanize((now - Date.parse(lock.acquired_at)) / 1000) : "—";
    const ttl = lock.expires_at ? humanize((Date.parse(lock.expires_at) - now) / 1000) : "no expiry";
    const waiters = lock.waiters || 0;
    tr.append(
      cell("Lock", name),
      keyCell(lock),
      requestorsCell(allRequestors(lock)),
      holderCell(infoOf(lock)),
      cell("Held for", held),
      cell("TTL left", ttl),
      cell("Generation", lock.generation),
      cell("Waiters", el("span", waiters, waiters > 0 ? "waiting" : "")),
      actionCell(name),
    );
    tr.firstChild.className = "name";
    rows.push(tr);
  }
  body.replaceChildren(...rows);
  document.getElementById("empty").hidden = names.length > 0 || filter !== "";
  document.getElementById("more").hidden = names.length >= total || limit >= MAX_PAGE;
  const waiting = names.reduce((sum, n) => sum + (locks[n].waiters || 0), 0);
  const counted = filter ? total + " matching" : total + " lock(s) held";
  const shown = names.length < total ? ", " + names.length + " shown" : "";
  document.getElementById("summary").textContent = counted + shown + ", " + waiting + " waiting";
}

// Puts `nodes` into `parent` in this order, touching the document only when they are not there
// already: an element left in place keeps its open state, scroll position and text selection,
// which matters for metadata someone is reading or copying while the page refreshes.
function arrange(parent, nodes) {
  const current = parent.children;
  if (current.length === nodes.length && nodes.every((node, i) => current[i] === node)) return;
  parent.replaceChildren(...nodes);
}

const drawnFrom = new WeakMap(); // element → the value its children were last drawn from

// Redraws `node`'s children with build() unless they were drawn from the same `value`.
function redraw(node, value, build) {
  if (drawnFrom.has(node) && drawnFrom.get(node) === value) return;
  drawnFrom.set(node, value);
  node.replaceChildren(...build());
}

const ITEM_COLUMNS = [
  "Item", "State", "Key", "Requestors", "Holder", "Claimed for", "Lease left", "Generation",
  "Metadata",
];

function plural(count, one, many) {
  return count + " " + (count === 1 ? one : many);
}

// A time of a holding: how long ago or until when, the exact time on hover.
function when(iso, seconds, prefix) {
  const node = el("time", humanize(seconds));
  node.dateTime = iso;
  node.title = prefix + new Date(iso).toLocaleString();
  return node;
}

// An item's metadata: arbitrary text (often YAML or JSON, sometimes credentials), so it stays
// closed, showing only its size, until opened, and is only ever set as text.
function metadataView(poolName, itemName, text) {
  if (!text) return [el("span", "—")];
  const key = poolName + "\n" + itemName;
  const lines = text.replace(/\n$/, "").split("\n").length;
  const details = el("details", null, "metadata");
  details.open = openMetadata.has(key);
  const bytes = new TextEncoder().encode(text).length;
  details.append(
    el("summary", plural(lines, "line", "lines") + ", " + plural(bytes, "byte", "bytes")),
    el("pre", text),
  );
  details.addEventListener("toggle", () => {
    if (details.open) openMetadata.add(key);
    else openMetadata.delete(key);
  });
  return [details];
}

// One item's row, its cells redrawn only where what they show changed.
function renderItem(row, poolName, item, now) {
  const holder = item.claimed && item.holder ? item.holder : null;
  const cells = row.cells;
  redraw(cells[0], item.name, () => [item.name]);
  redraw(cells[1], item.claimed, () => [
    el("span", item.claimed ? "claimed" : "unclaimed", item.claimed ? "claimed" : "unclaimed"),
  ]);
  redraw(cells[2], holder && holder.key, () => [holder ? el("code", holder.key) : "—"]);
  redraw(cells[3], JSON.stringify(holder && holder.locked_by), () =>
    holder ? requestors(holder.locked_by) : ["—"]);
  redraw(cells[4], JSON.stringify(holder && holder.info), () =>
    [holder ? holderInfo(infoOf(holder)) : "—"]);
  const since = holder && holder.acquired_at;
  const held = since ? humanize((now - Date.parse(since)) / 1000) : "—";
  redraw(cells[5], since + held, () =>
    [since ? when(since, (now - Date.parse(since)) / 1000, "since ") : "—"]);
  const until = holder && holder.expires_at;
  const left = until ? humanize((Date.parse(until) - now) / 1000) : "";
  redraw(cells[6], String(holder && until) + left, () => [
    !holder ? "—" : until ? when(until, (Date.parse(until) - now) / 1000, "until ") : "no expiry",
  ]);
  redraw(cells[7], holder && holder.generation, () =>
    [holder && holder.generation != null ? String(holder.generation) : "—"]);
  redraw(cells[8], item.metadata, () => metadataView(poolName, item.name, item.metadata));
}

const itemTables = new WeakMap(); // pool <details> → {table, rows: Map item name → <tr>}

function itemTable(node) {
  let found = itemTables.get(node);
  if (found) return found;
  const table = el("table", null, "items");
  const head = el("tr");
  for (const label of ITEM_COLUMNS) head.append(el("th", label));
  table.createTHead().append(head);
  table.createTBody();
  found = { table, rows: new Map() };
  itemTables.set(node, found);
  return found;
}

function renderItems(node, poolName, status, now) {
  const body = node.lastChild;
  if (!node.open) return;
  if (!status) {
    redraw(body, "loading", () => [el("p", "Loading items…", "note")]);
    return;
  }
  const items = Array.isArray(status.items) ? status.items : [];
  if (items.length === 0) {
    redraw(body, "no items", () => [el("p", "No items (only queued claims).", "note")]);
    return;
  }
  const { table, rows } = itemTable(node);
  redraw(body, "table", () => [table]);
  const shown = [];
  for (const item of items) {
    let row = rows.get(item.name);
    if (!row) {
      row = el("tr");
      row.dataset.item = item.name;
      for (const label of ITEM_COLUMNS) row.append(cell(label));
      row.cells[0].className = "name";
      rows.set(item.name, row);
    }
    renderItem(row, poolName, item, now);
    shown.push(row);
  }
  const names = new Set(items.map((item) => item.name));
  for (const name of [...rows.keys()]) if (!names.has(name)) rows.delete(name);
  arrange(table.tBodies[0], shown);
}

// A pool's <details>: counts in its summary, its items once opened. Kept across refreshes.
function poolNode(name) {
  let node = poolNodes.get(name);
  if (node) return node;
  node = el("details", null, "pool");
  node.dataset.pool = name;
  node.open = opened.has(name);
  node.append(el("summary"), el("div", null, "pool-items"));
  node.addEventListener("toggle", () => {
    if (node.open === opened.has(name)) return; // opened by renderPools, not by the user
    if (node.open) {
      opened.add(name);
      renderPools();
      refresh();
    } else {
      opened.delete(name);
      poolItems.delete(name);
    }
  });
  poolNodes.set(name, node);
  return node;
}

function renderPools() {
  const now = Date.now();
  const matching = matchingPools();
  const shown = matching.slice(0, poolLimit);
  const nodes = shown.map((pool) => {
    const node = poolNode(pool.name);
    const counts = [pool.items, pool.claimed, pool.waiters];
    const claimed = pool.claimed + " of " + plural(pool.items, "item", "items") + " claimed";
    redraw(node.firstChild, JSON.stringify(counts), () => [
      el("span", pool.name, "pool-name"),
      " ",
      el("span", claimed, "counts"),
      " ",
      el("span", plural(pool.waiters, "queued claim", "queued claims"),
        pool.waiters > 0 ? "queued waiting" : "queued"),
    ]);
    renderItems(node, pool.name, poolItems.get(pool.name), now);
    return node;
  });
  arrange(document.getElementById("pool-list"), nodes);
  const names = new Set(pools.map((pool) => pool.name));
  for (const name of [...poolNodes.keys()]) if (!names.has(name)) poolNodes.delete(name);

  const sum = (field) => pools.reduce((total, pool) => total + (pool[field] || 0), 0);
  const filter = filterText();
  document.getElementById("pools").hidden = pools.length === 0;
  document.getElementById("pools-summary").textContent =
    plural(pools.length, "pool", "pools") + ", " + sum("claimed") + " of " +
    plural(sum("items"), "item", "items") + " claimed, " +
    plural(sum("waiters"), "queued claim", "queued claims") +
    (filter ? ", " + matching.length + " matching" : "") +
    (shown.length < matching.length ? ", " + shown.length + " shown" : "");
  document.getElementById("pools-empty").hidden = shown.length > 0 || pools.length === 0;
  document.getElementById("more-pools").hidden = shown.length >= matching.length;
}

function showError() {
  const message = [locksError, poolsError].filter(Boolean).join(" · ");
  const node = document.getElementById("error");
  node.textContent = message;
  node.hidden = !message;
}

function filterText() {
  return document.getElementById("filter").value.trim();
}

function locksUrl() {
  const url = api("locks");
  url.searchParams.set("limit", String(limit));
  const filter = filterText();
  if (filter) url.searchParams.set("q", filter);
  return url;
}

// GET of `url` (one of api()'s) as JSON; a refusal throws an error with the status, naming
// the request as `what`.
async function getJson(url, what) {
  const response = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) {
    const error = new Error("GET " + what + " answered " + response.status);
    error.status = response.status;
    throw error;
  }
  return { response, body: await response.json() };
}

async function loadLocks() {
  try {
    const { response, body } = await getJson(locksUrl(), "/locks");
    locks = body;
    total = Number(response.headers.get("Locker-Total") || Object.keys(locks).length);
    if (confirming !== null && !(confirming in locks)) confirming = null;
    locksError = null;
  } catch (error) {
    locksError = "Cannot load locks: " + error.message;
  }
}

// The pools matching the filter (by name, ignoring case), in name order.
function matchingPools() {
  const filter = filterText().toLowerCase();
  return pools
    .filter((pool) => pool.name.toLowerCase().includes(filter))
    .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
}

// GET /pools, then GET /pool/{pool} of each opened pool that is listed, one after the other.
async function loadPools() {
  try {
    const { body } = await getJson(api("pools"), "/pools");
    pools = Array.isArray(body.pools) ? body.pools : [];
    const listed = new Set(matchingPools().slice(0, poolLimit).map((pool) => pool.name));
    for (const name of [...poolItems.keys()]) {
      if (!listed.has(name) || !opened.has(name)) poolItems.delete(name);
    }
    for (const name of opened) {
      if (!listed.has(name)) continue;
      try {
        const path = "pool/" + encodeURIComponent(name);
        const { body: status } = await getJson(api(path), "/" + path);
        if (opened.has(name)) poolItems.set(name, status); // unless closed meanwhile
      } catch (error) {
        // Gone since GET /pools answered: the next refresh no longer lists it.
        if (error.status !== 404) throw error;
        poolItems.delete(name);
      }
    }
    poolsError = null;
  } catch (error) {
    poolsError = "Cannot load pools: " + error.message;
  }
}

async function load() {
  await loadLocks();
  renderLocks();
  showError();
  await loadPools();
  renderPools();
  showError();
}

// Refreshes now, unless a refresh is under way: then once more right after it. Either way the
// next automatic refresh comes REFRESH_MS after the last one ends, so polls never overlap.
async function refresh() {
  clearTimeout(timer);
  if (inFlight) {
    again = true;
    return inFlight;
  }
  inFlight = (async () => {
    do {
      again = false;
      await load();
    } while (again);
  })();
  try {
    await inFlight;
  } finally {
    inFlight = null;
    clearTimeout(timer);
    timer = setTimeout(refresh, REFRESH_MS);
  }
}

async function forceRelease(name) {
  confirming = null;
  try {
    const response = await fetch(api("lock/" + encodeURIComponent(name) + "?force=true"), {
      method: "DELETE",
      credentials: "same-origin",
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error || "answered " + response.status);
    }
    locksError = null;
  } catch (error) {
    locksError = "Force release of " + name + " failed: " + error.message;
  }
  showError();
  await refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  let typing = null;
  document.getElementById("filter").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      limit = PAGE;
      poolLimit = POOL_PAGE;
      renderPools(); // pools are filtered here, at once; locks by the server
      refresh();
    }, 250);
  });
  document.getElementById("more").addEventListener("click", () => {
    limit = Math.min(limit + PAGE, MAX_PAGE);
    refresh();
  });
  document.getElementById("more-pools").addEventListener("click", () => {
    poolLimit += POOL_PAGE;
    renderPools();
    refresh();
  });
  refresh();
});
