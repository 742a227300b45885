// locker dashboard: renders a page of GET /locks as a table and the pools of GET /pools, kept
// up to date by the live events of GET /events (docs/history.md): each event names the lock or
// pool it changed, and only that one is asked for again (GET /lock/{name}, GET /pool/{pool}).
// The whole page is loaded again only when the stream starts (a dropped one is resumed by the
// browser with Last-Event-ID, the server sending what was missed), when it says events were
// lost (`gap`), and when the filter or the page size changes. Only if the stream cannot be had (an
// older server, a proxy that refuses it) does the page fall back to polling, every POLL_S
// seconds (the page's `?poll=` overrides it), trying the stream again now and then.
// Whatever the cause, the page asks one thing at a time (the locks, the pools, each pool the
// user opened, each lock or pool an event named), so it never has two requests open at once
// besides the stream, however slow the server.
// A lock's row opens to its details: who waits, in arrival order (who stands ahead of whom),
// and its last events with how long each holding was held and each request waited
// (GET /lock/{name}/history).
// The filter box is a server-side search of locks (GET /locks?q=) and filters pools by name;
// only the first PAGE matching locks are fetched ("Show more" adds a page), pools show only their
// counts until opened, and only the first POOL_PAGE matching pools are listed, so the page stays
// usable with 100,000 locks and thousands of pools.
// Names, holder info and item metadata are user data: they only ever reach the page as text
// nodes (textContent), never as HTML, and only http(s) URLs become links.
"use strict";

const TICK_MS = 2000; // how often the times shown (held for, TTL left) are redrawn
const POLL_S = 10; // the fallback poll's period, without the live stream
const EVENTS_RETRY_MS = 30000; // without the stream, how often to try it again
const EVENTS_WAIT_MS = 1500; // how long the first load waits for the stream to open
const RESYNC_MS = 5000; // delay of a reload for a change past the page's last row
const HISTORY = 20; // events shown in a lock's details
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
let inFlight = null; // the work under way (see run()), if any
let again = false; // work was asked for while some was under way
let timer = null; // the next fallback poll
let fullLoad = true; // the whole page is to be loaded again
const dirtyLocks = new Set(); // locks an event named, to be asked for again
const dirtyPools = new Set(); // pools an event named, to be asked for again
let resyncTimer = null; // a reload after a change the page could not place (see placeLock)

let stream = null; // the EventSource of GET /events
let live = false; // whether the stream is open
let streamError = null; // why the page polls instead, if it does
let retryTimer = null; // the next attempt at the stream, without it

const expanded = new Set(); // locks whose details the user opened
// Opened lock's name → {status: its GET /lock/{name}, history: Map id → event (the stream's
// from the opening on, and GET /lock/{name}/history's once `loaded`), historyError, stale}.
const details = new Map();
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
      nameCell(name),
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
    if (expanded.has(name)) rows.push(detailRow(name, lock, now));
  }
  body.replaceChildren(...rows);
  document.getElementById("empty").hidden = names.length > 0 || filter !== "";
  document.getElementById("more").hidden = names.length >= total || limit >= MAX_PAGE;
  const waiting = names.reduce((sum, n) => sum + (locks[n].waiters || 0), 0);
  const counted = filter ? total + " matching" : total + " lock(s) held";
  const shown = names.length < total ? ", " + names.length + " shown" : "";
  document.getElementById("summary").textContent = counted + shown + ", " + waiting + " waiting";
}

// The lock's name, a button that opens or closes its details.
function nameCell(name) {
  const button = el("button", name, "lock-name");
  button.type = "button";
  button.setAttribute("aria-expanded", String(expanded.has(name)));
  button.addEventListener("click", () => toggleDetails(name));
  return cell("Lock", button);
}

function toggleDetails(name) {
  if (expanded.has(name)) {
    expanded.delete(name);
    details.delete(name);
  } else {
    expanded.add(name);
    details.set(name, {
      status: null, history: new Map(), loaded: false, historyError: null, stale: false,
    });
    dirtyLocks.add(name); // its queue
  }
  renderLocks();
  run();
}

// A duration in milliseconds, to the millisecond below a second.
function span(ms) {
  return ms < 1000 ? Math.max(0, Math.round(ms)) + "ms" : humanize(ms / 1000);
}

// One waiting request: its place, key, requestor, build and how long it has waited.
function queueEntry(waiter, now) {
  const li = el("li", null, "waiter");
  li.dataset.key = waiter.key;
  li.append(el("code", waiter.key), " ");
  if (waiter.requestor) li.append(el("span", waiter.requestor, "requestor"), " ");
  const info = infoOf(waiter);
  if (Object.keys(info).length) li.append(holderInfo(info), " ");
  if (waiter.since) {
    li.append(el("span", "waiting for ", "note-inline"),
      when(waiter.since, (now - Date.parse(waiter.since)) / 1000, "since "));
  }
  return li;
}

const EVENT_COLUMNS = ["When", "Event", "Key", "Requestor", "Duration"];

// What an event says of time: how long the holding was held, how long the request waited.
function durations(event) {
  const parts = [];
  if (event.held_ms != null) parts.push("held for " + span(event.held_ms));
  if (event.waited_ms != null) parts.push("waited for " + span(event.waited_ms));
  if (event.slots != null) parts.push(plural(event.slots, "slot", "slots"));
  if (event.by) parts.push("by " + event.by);
  return parts.join(", ") || "—";
}

function historyTable(entries, now) {
  const table = el("table", null, "history");
  const head = el("tr");
  for (const label of EVENT_COLUMNS) head.append(el("th", label));
  table.createTHead().append(head);
  const body = table.createTBody();
  for (const event of entries) {
    const tr = el("tr");
    tr.dataset.kind = event.kind;
    tr.append(
      event.at
        ? cell("When", when(event.at, (now - Date.parse(event.at)) / 1000, ""), " ago")
        : cell("When", "—"),
      cell("Event", el("span", event.kind, "kind")),
      cell("Key", event.key ? el("code", event.key) : "—"),
      cell("Requestor", event.requestor || "—"),
      cell("Duration", durations(event)),
    );
    body.append(tr);
  }
  return table;
}

// The row under an opened lock: who waits (front first) and its last events (newest first).
function detailRow(name, lock, now) {
  const tr = el("tr", null, "detail");
  tr.dataset.detail = name;
  const td = el("td");
  td.colSpan = 9;
  const found = details.get(name) || {};
  const status = found.status;
  const queue = status && (Array.isArray(status.queue) ? status.queue : "unlisted");

  const queueBox = el("div", null, "queue");
  queueBox.append(el("h3", "Who is waiting"));
  if (!queue) {
    queueBox.append(el("p", "Loading…", "note"));
  } else if (queue === "unlisted") {
    queueBox.append(el("p", plural(lock.waiters || 0, "waiter", "waiters") +
      " (the server does not list its queue).", "note"));
  } else if (queue.length === 0) {
    queueBox.append(el("p", "Nobody waits.", "note"));
  } else {
    const list = el("ol");
    for (const waiter of queue) list.append(queueEntry(waiter, now));
    queueBox.append(list);
  }

  const historyBox = el("div", null, "recent");
  historyBox.append(el("h3", "Last events"));
  if (found.historyError) {
    historyBox.append(el("p", found.historyError, "note error"));
  } else if (!found.loaded) {
    historyBox.append(el("p", "Loading…", "note"));
  } else if (found.history.size === 0) {
    historyBox.append(el("p", "No events kept.", "note"));
  } else {
    const entries = [...found.history.values()].sort((a, b) => b.id - a.id);
    historyBox.append(historyTable(entries, now));
  }
  const body = el("div", null, "detail-body");
  body.append(queueBox, historyBox);
  td.append(body);
  tr.append(td);
  return tr;
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
      dirtyPools.add(name); // its items
      run();
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

// Whether a lock belongs to the listing the filter asks for: the server's search of GET /locks
// (its name, a holder's key, a requestor or an info value contains the text, ignoring case).
function matches(name, lock) {
  const filter = filterText().toLowerCase();
  if (!filter) return true;
  const has = (text) => String(text).toLowerCase().includes(filter);
  return has(name) || holders(lock).some((holder) =>
    has(holder.key || "") || Object.keys(holder.locked_by || {}).some(has) ||
    Object.values(infoOf(holder)).some(has));
}

// Puts the status of one lock (null: free) into the page: its row is added, replaced or
// removed, and the count of matching locks follows. A change past the last row of a page that
// does not show every lock cannot be counted (was it counted before?): the page is loaded
// again a little later, once for however many such changes.
function placeLock(name, status) {
  const shown = name in locks;
  const names = Object.keys(locks).sort();
  const complete = names.length >= total;
  const wanted = status !== null && matches(name, status);
  if (wanted && shown) {
    locks[name] = status;
  } else if (wanted && (complete || name < names[names.length - 1])) {
    locks[name] = status;
    total += 1;
    if (Object.keys(locks).length > limit) delete locks[names[names.length - 1]];
  } else if (!wanted && shown) {
    delete locks[name];
    total = Math.max(0, total - 1);
    if (!complete) resyncSoon(); // the next lock past the page now belongs on it
  } else if (!complete) {
    resyncSoon();
  }
  if (confirming !== null && !(confirming in locks)) confirming = null;
}

function resyncSoon() {
  if (resyncTimer) return;
  resyncTimer = setTimeout(() => {
    resyncTimer = null;
    fullLoad = true;
    run();
  }, RESYNC_MS);
}

// GET /lock/{name} of a lock an event named (or whose details were opened).
async function loadLock(name) {
  const path = "lock/" + encodeURIComponent(name);
  try {
    let status = null;
    try {
      ({ body: status } = await getJson(api(path), "/" + path));
    } catch (error) {
      if (error.status !== 404) throw error; // 404: free
    }
    placeLock(name, status);
    const found = details.get(name);
    if (found) found.status = status || { queue: [] };
    locksError = null;
  } catch (error) {
    locksError = "Cannot load lock " + name + ": " + error.message;
  }
}

// GET /lock/{name}/history of an opened lock: its last HISTORY events.
async function loadHistory(name) {
  const found = details.get(name);
  const path = "lock/" + encodeURIComponent(name) + "/history";
  try {
    const url = api(path);
    url.searchParams.set("limit", String(HISTORY));
    const { body } = await getJson(url, "/" + path);
    if (details.get(name) !== found) return; // closed meanwhile
    found.stale = false;
    // Beside the events that came over the stream meanwhile, which this may lack.
    for (const event of Array.isArray(body.events) ? body.events : []) {
      found.history.set(event.id, event);
    }
    trimmed(found.history);
    found.loaded = true;
    found.historyError = null;
  } catch (error) {
    if (details.get(name) !== found) return;
    found.stale = false;
    found.loaded = true;
    found.historyError = "Cannot load its history: " + error.message;
  }
}

// The newest HISTORY of a map of events by id.
function trimmed(history) {
  const ids = [...history.keys()].sort((a, b) => a - b);
  for (const id of ids.slice(0, Math.max(0, ids.length - HISTORY))) history.delete(id);
  return history;
}

// GET /pool/{pool} of a pool an event named: its counts, and its items if it is opened.
async function loadPool(name) {
  const path = "pool/" + encodeURIComponent(name);
  try {
    let status = null;
    try {
      ({ body: status } = await getJson(api(path), "/" + path));
    } catch (error) {
      if (error.status !== 404) throw error; // 404: no items and no waiters left
    }
    pools = pools.filter((pool) => pool.name !== name);
    if (status) {
      const items = Array.isArray(status.items) ? status.items : [];
      pools.push({
        name,
        items: items.length,
        claimed: items.filter((item) => item.claimed).length,
        waiters: status.waiters || 0,
      });
      if (opened.has(name)) poolItems.set(name, status);
    } else {
      poolItems.delete(name);
    }
    poolsError = null;
  } catch (error) {
    poolsError = "Cannot load pool " + name + ": " + error.message;
  }
}

function first(set) {
  for (const value of set) {
    set.delete(value);
    return value;
  }
  return undefined;
}

// Does what is due, one request at a time: the whole page when asked for, then each lock and
// pool an event named, then the history of each opened lock not loaded yet.
async function work() {
  for (;;) {
    if (fullLoad) {
      fullLoad = false;
      dirtyLocks.clear();
      dirtyPools.clear();
      await load();
      for (const name of expanded) {
        dirtyLocks.add(name); // their queues
        const found = details.get(name);
        if (found) found.stale = true; // and their histories
      }
      continue;
    }
    const lock = first(dirtyLocks);
    if (lock !== undefined) {
      await loadLock(lock);
      renderLocks();
      showError();
      continue;
    }
    const pool = first(dirtyPools);
    if (pool !== undefined) {
      await loadPool(pool);
      renderPools();
      showError();
      continue;
    }
    const unloaded = [...expanded].find((name) => {
      const found = details.get(name);
      return found && (!found.loaded || found.stale);
    });
    if (unloaded !== undefined) {
      await loadHistory(unloaded);
      renderLocks();
      continue;
    }
    return;
  }
}

// Runs the work that is due, unless some is under way: then it is done right after. Without
// the live stream, the next poll comes POLL_S after the last work ended, so polls never overlap.
async function run() {
  clearTimeout(timer);
  if (inFlight) {
    again = true;
    return inFlight;
  }
  inFlight = (async () => {
    do {
      again = false;
      await work();
    } while (again);
  })();
  try {
    await inFlight;
  } finally {
    inFlight = null;
    clearTimeout(timer);
    if (!live) timer = setTimeout(refresh, pollSeconds() * 1000);
  }
}

// Loads the whole page again.
function refresh() {
  fullLoad = true;
  return run();
}

// The fallback poll's period: the page's `?poll=SECONDS`, else POLL_S.
function pollSeconds() {
  const asked = Number(new URL(window.location.href).searchParams.get("poll"));
  return Number.isFinite(asked) && asked >= 1 ? asked : POLL_S;
}

const EVENT_KINDS = [
  "queued", "acquired", "released", "force-released", "expired", "reclaimed", "timed-out",
  "withdrawn", "slots-changed", "item-added", "item-removed", "item-updated",
];

// One event of the stream: the lock or pool it names is asked for again; an opened lock's
// details take the event itself into their history.
function onEvent(message) {
  let event;
  try {
    event = JSON.parse(message.data);
  } catch (_) {
    return;
  }
  if (!event || typeof event !== "object") return;
  if (typeof event.lock === "string") {
    dirtyLocks.add(event.lock);
    const found = details.get(event.lock);
    if (found && typeof event.id === "number") {
      found.history.set(event.id, event);
      trimmed(found.history);
    }
  }
  if (typeof event.pool === "string") dirtyPools.add(event.pool);
  run();
}

function showMode() {
  const node = document.getElementById("mode");
  if (live) node.textContent = "Live: updated from GET /events as locks and pools change.";
  else if (streamError) {
    node.textContent = "Refreshed every " + pollSeconds() + " s (" + streamError + ").";
  } else node.textContent = "Connecting to GET /events…";
  document.body.dataset.live = String(live);
}

// Opens the live stream. The browser reconnects by itself after a dropped connection, and
// resumes with Last-Event-ID (the server replays what was missed, or says `gap`). A stream that
// cannot be had at all (refused, not an event stream) is closed for good by the browser: then
// the page polls, and tries the stream again every EVENTS_RETRY_MS.
function openStream() {
  clearTimeout(retryTimer);
  // Like every request of the page: without the userinfo of a page opened as
  // http://user:pass@host/ (EventSource refuses such URLs too); the browser authenticates it
  // with the credentials it cached for the page.
  const source = new EventSource(api("events"));
  stream = source;
  const waited = setTimeout(() => {
    if (stream === source && !live) refresh(); // show something while the stream is slow
  }, EVENTS_WAIT_MS);
  let resumes = false; // an event with an id came: a reconnection sends it as Last-Event-ID
  const received = (message) => {
    if (message.lastEventId) resumes = true;
    onEvent(message);
  };
  source.addEventListener("open", () => {
    clearTimeout(waited);
    live = true;
    streamError = null;
    showMode();
    // The first time, what changed before the stream began; after a reconnection the server
    // sends what was missed, unless no event had come yet to resume from.
    if (!resumes) refresh();
  });
  for (const kind of EVENT_KINDS) source.addEventListener(kind, received);
  source.addEventListener("message", received);
  source.addEventListener("gap", () => refresh()); // events were lost: load everything
  source.addEventListener("error", () => {
    if (stream !== source) return;
    live = false;
    if (source.readyState === EventSource.CLOSED) {
      clearTimeout(waited);
      stream = null;
      streamError = "live updates unavailable: GET /events failed";
      retryTimer = setTimeout(openStream, EVENTS_RETRY_MS);
      refresh(); // and poll from now on
    } else {
      streamError = null; // reconnecting
    }
    showMode();
  });
  showMode();
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
  dirtyLocks.add(name); // also when the stream is down
  await run();
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
  // Times move on between changes: redraw them (from what the page has, asking nothing).
  setInterval(render, TICK_MS);
  if (typeof EventSource === "function") {
    openStream();
  } else {
    streamError = "this browser has no EventSource";
    showMode();
    refresh();
  }
});
