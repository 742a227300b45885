// locker dashboard: renders a page of GET /locks as a table, refreshed 2 seconds after the
// previous refresh finished (never two requests at once, however slow the server).
// The filter box is a server-side search (GET /locks?q=), and only the first PAGE matching
// locks are fetched ("Show more" adds a page), so the page stays usable with 100,000 locks.
// Lock names and holder info are user data: they only ever reach the page as text nodes
// (textContent), never as HTML, and only http(s) URLs become links.
"use strict";

const REFRESH_MS = 2000;
const PAGE = 200;
const MAX_PAGE = 10000; // the server's largest page

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

function holderCell(info) {
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
    return cell("Holder", link);
  }
  return cell("Holder", text || "—");
}

function requestorsCell(lockedBy) {
  const td = cell("Requestors");
  for (const [who, count] of Object.entries(lockedBy || {})) {
    td.append(el("span", count > 1 ? who + " ×" + count : who, "requestor"));
  }
  return td;
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

function showError(message) {
  const node = document.getElementById("error");
  node.textContent = message || "";
  node.hidden = !message;
}

function locksUrl() {
  const url = api("locks");
  url.searchParams.set("limit", String(limit));
  const filter = document.getElementById("filter").value.trim();
  if (filter) url.searchParams.set("q", filter);
  return url;
}

async function load() {
  try {
    const response = await fetch(locksUrl(), { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error("GET /locks answered " + response.status);
    locks = await response.json();
    total = Number(response.headers.get("Locker-Total") || Object.keys(locks).length);
    if (confirming !== null && !(confirming in locks)) confirming = null;
    showError(null);
  } catch (error) {
    showError("Cannot load locks: " + error.message);
  }
  render();
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
    showError(null);
  } catch (error) {
    showError("Force release of " + name + " failed: " + error.message);
  }
  await refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  let typing = null;
  document.getElementById("filter").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => { limit = PAGE; refresh(); }, 250);
  });
  document.getElementById("more").addEventListener("click", () => {
    limit = Math.min(limit + PAGE, MAX_PAGE);
    refresh();
  });
  refresh();
});
