/**
 * The viewer page: follow one stream with trio-events.js and show its events.
 *
 * Query parameters of the page: `stream` (connect to it at once) and `server` (a ws:// or wss://
 * origin; default: this page's own host). The token is typed into the page and kept in
 * sessionStorage: it never appears in the address bar. When `server` names another host than the
 * page's own, the stored token is not loaded and nothing connects until Connect is pressed (a
 * crafted link must not send the token elsewhere). `keep` (tests) lowers MAX_KEPT.
 *
 * Event data is only ever rendered with textContent (never innerHTML): payloads are untrusted.
 */
import { connect } from "./trio-events.js";

/** Rows kept in the DOM; older ones are removed (the "events" figure counts them all). */
const MAX_ROWS = 2000;
/** Events kept in memory for re-filtering; older ones are forgotten. */
const MAX_KEPT = (() => {
  const keep = Number(new URLSearchParams(location.search).get("keep"));
  return Number.isSafeInteger(keep) && keep > 0 && keep < 20000 ? keep : 20000;
})();
const RATE_WINDOW_MS = 5000;
const STREAMS_KEY = "trio-events.streams";
const TOKEN_KEY = "trio-events.token";

const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const ui = {
  connectForm: $("connect-form"), stream: $("stream"), streams: $("streams"), token: $("token"),
  disconnect: $("disconnect"), state: $("state"), message: $("message"),
  total: $("fig-total"), rate: $("fig-rate"), last: $("fig-last"), lag: $("fig-lag"),
  pending: $("fig-pending"), type: $("filter-type"), source: $("filter-source"),
  text: $("filter-text"), hidden: $("show-hidden"), newestFirst: $("newest-first"),
  pause: $("pause"), events: $("events"), empty: $("empty"),
  publishForm: $("publish-form"), pubType: $("pub-type"), pubSource: $("pub-source"),
  pubHidden: $("pub-hidden"), pubPayload: $("pub-payload"), pubResult: $("pub-result"),
};

const view = {
  /** @type {import("./trio-events.js").Connection | null} */ conn: null,
  /** Events (and gap markers) received and shown, oldest first. */ kept: [],
  /** Events received while paused (the last MAX_KEPT or so). */ pending: [],
  /** Events received while paused (all of them). */ pendingCount: 0,
  /** Events received while paused and dropped (older than the last MAX_KEPT), and their ids. */
  skipped: 0, skippedFrom: -1, skippedTo: -1,
  paused: false,
  total: 0,
  lastShown: -1,
  /** [time, count] of recent frames, for events/s. */ arrivals: [],
};

/** The server's ws:// origin, and whether it is another host than the page's own. */
function serverBase() {
  const override = new URLSearchParams(location.search).get("server");
  if (override) {
    const url = new URL(override);
    if (url.protocol !== "ws:" && url.protocol !== "wss:") {
      throw new Error(`?server= must be a ws:// or wss:// address, not ${url.protocol}//`);
    }
    return { base: `${url.protocol}//${url.host}`, host: url.host, foreign: url.host !== location.host };
  }
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  return { base: `${scheme}://${location.host}`, host: location.host, foreign: false };
}

/** serverBase(), or null when ?server= is malformed (treated as foreign: never auto-connect). */
function serverInfo() {
  try {
    return serverBase();
  } catch {
    return null;
  }
}

// --- remembered streams and token --------------------------------------------------------------

function rememberedStreams() {
  try {
    const list = JSON.parse(localStorage.getItem(STREAMS_KEY) || "[]");
    return Array.isArray(list) ? list.filter((s) => typeof s === "string") : [];
  } catch {
    return [];
  }
}

function remember(stream) {
  const list = [stream, ...rememberedStreams().filter((s) => s !== stream)].slice(0, 12);
  localStorage.setItem(STREAMS_KEY, JSON.stringify(list));
  fillStreamList();
}

function fillStreamList() {
  ui.streams.replaceChildren(...rememberedStreams().map((s) => {
    const option = document.createElement("option");
    option.value = s;
    return option;
  }));
}

// --- status ------------------------------------------------------------------------------------

function say(text, isError = false) {
  ui.message.textContent = text;
  ui.message.classList.toggle("error", isError);
}

function showState(state, attempt) {
  const label = { open: "connected", connecting: "connecting", closed: "closed",
    reconnecting: `reconnecting (attempt ${attempt})` }[state];
  ui.state.textContent = label;
  ui.state.dataset.state = state;
  ui.state.className = `state state-${state}`;
  ui.disconnect.disabled = state === "closed";
}

function updateFigures() {
  const now = performance.now();
  view.arrivals = view.arrivals.filter(([t]) => now - t < RATE_WINDOW_MS);
  const recent = view.arrivals.reduce((sum, [, n]) => sum + n, 0);
  ui.total.textContent = String(view.total);
  ui.rate.textContent = (recent / (RATE_WINDOW_MS / 1000)).toFixed(1);
  ui.last.textContent = view.lastShown >= 0 ? String(view.lastShown) : "–";
  const head = view.conn ? view.conn.headId : -1;
  ui.lag.textContent = String(Math.max(0, head - view.lastShown));
  ui.pending.textContent = String(view.pendingCount);
  ui.pause.textContent = view.paused ? `Resume (${view.pendingCount})` : "Pause";
}

// --- rows --------------------------------------------------------------------------------------

function matches(item) {
  if (item.gap || item.skipped) return true;
  if (item.hidden && !ui.hidden.checked) return false;
  const type = ui.type.value.trim().toLowerCase();
  if (type && !item.type.toLowerCase().includes(type)) return false;
  if (ui.source.value && item.source !== ui.source.value) return false;
  const text = ui.text.value.trim().toLowerCase();
  return !text || JSON.stringify(item).toLowerCase().includes(text);
}

function cell(className, text, title) {
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text; // never innerHTML: event data is untrusted
  if (title) span.title = title;
  return span;
}

function makeRow(item) {
  const row = document.createElement("div");
  if (item.gap) {
    row.className = "row gap";
    row.append(cell("text", `events ${item.from} to ${item.to} are no longer available`));
    return row;
  }
  if (item.skipped) {
    row.className = "row gap skipped";
    row.append(cell("text", `${item.count} events skipped while paused (ids ${item.from} to ` +
      `${item.to}); connect with after=${item.from - 1} to replay them`));
    return row;
  }
  row.className = item.hidden ? "row hidden-event" : "row";
  row.dataset.id = String(item.id);
  const payload = JSON.stringify(item.payload);
  const time = item.timestamp.slice(11, 23);
  row.append(cell("id", String(item.id)), cell("time", time, item.timestamp),
    cell("source", item.source), cell("type", item.type, item.type),
    cell("payload", payload, payload.slice(0, 2000)));
  return row;
}

function markNewest() {
  ui.events.querySelector(".row.newest")?.classList.remove("newest");
  const rows = ui.events.querySelectorAll(".row[data-id]");
  const newest = ui.newestFirst.checked ? rows[0] : rows[rows.length - 1];
  newest?.classList.add("newest");
  ui.empty.hidden = ui.events.childElementCount > 0;
}

/** Add rows for `items` (oldest first) at the newest end; drop the oldest beyond MAX_ROWS. */
function addRows(items) {
  const shown = items.filter(matches).slice(-MAX_ROWS);
  if (shown.length === 0) return;
  const fragment = document.createDocumentFragment();
  if (ui.newestFirst.checked) {
    for (let i = shown.length - 1; i >= 0; i--) fragment.append(makeRow(shown[i]));
    ui.events.prepend(fragment);
    while (ui.events.childElementCount > MAX_ROWS) ui.events.lastElementChild.remove();
  } else {
    for (const item of shown) fragment.append(makeRow(item));
    ui.events.append(fragment);
    while (ui.events.childElementCount > MAX_ROWS) ui.events.firstElementChild.remove();
  }
}

function rerender() {
  ui.events.replaceChildren();
  addRows(view.kept);
  markNewest();
}

/** Show `items` (events and gap markers, oldest first): keep them and render the matching. */
function show(items) {
  for (const item of items) if (item.id !== undefined) view.lastShown = item.id;
  // Never spread an array of any length (the stack limit): keep and render only the tail.
  const tail = items.length > MAX_KEPT ? items.slice(-MAX_KEPT) : items;
  for (const item of tail) view.kept.push(item);
  if (view.kept.length > MAX_KEPT) view.kept.splice(0, view.kept.length - MAX_KEPT);
  addRows(tail);
  markNewest();
  updateFigures();
}

/** While paused, keep about the last MAX_KEPT items; count the events dropped before them. */
function trimPending(limit) {
  if (view.pending.length <= limit) return;
  const dropped = view.pending.splice(0, view.pending.length - limit);
  for (const item of dropped) {
    if (item.id === undefined) continue; // a gap marker
    view.skipped += 1;
    if (view.skippedFrom < 0) view.skippedFrom = item.id;
    view.skippedTo = item.id;
  }
}

function receive(items) {
  if (view.paused) {
    for (const item of items) {
      view.pending.push(item);
      if (item.id !== undefined) view.pendingCount += 1;
    }
    trimPending(2 * MAX_KEPT); // amortized: trimmed to MAX_KEPT on Resume
  } else {
    show(items);
  }
  updateFigures();
}

// --- connection --------------------------------------------------------------------------------

function reset() {
  view.kept = [];
  view.pending = [];
  view.pendingCount = 0;
  view.skipped = 0;
  view.skippedFrom = -1;
  view.skippedTo = -1;
  view.total = 0;
  view.lastShown = -1;
  view.arrivals = [];
  ui.events.replaceChildren();
  markNewest();
  updateFigures();
}

function start(stream, token) {
  view.conn?.disconnect();
  reset();
  let base;
  try {
    ({ base } = serverBase());
  } catch (err) {
    say(err.message, true);
    return;
  }
  say(`connecting to ${stream}…`);
  try {
    view.conn = connect(`${base}/v1/streams/${encodeURIComponent(stream)}`, {
      token: token || undefined,
      onState: (state, { attempt }) => {
        showState(state, attempt);
        if (state === "reconnecting") say(`connection lost; resuming after id ${view.conn?.lastId}…`);
      },
      onOpen: (hello) => say(`connected to ${hello.stream}; replaying history…`),
      onCaughtUp: () => say(`live on ${stream}`),
      onEvents: (events) => {
        view.total += events.length;
        view.arrivals.push([performance.now(), events.length]);
        receive(events);
      },
      onGap: ({ from, to }) => receive([{ gap: true, from, to }]),
      onError: (err) => {
        if (err.code === "token_refused") {
          say(`Token refused: ${err.message.replace(/^token refused: /, "")}. ` +
            "Enter a valid token and connect again.", true);
        } else if (err.code === "epoch_changed") {
          say(`${err.message}. Press Connect to load the new history.`, true);
        } else {
          say(`${err.code}: ${err.message}`, true);
        }
      },
    });
  } catch (err) {
    say(err.message, true);
  }
}

ui.connectForm.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const stream = ui.stream.value.trim();
  const token = ui.token.value.trim();
  const info = serverInfo();
  // Only a token for this page's own server is remembered (and ever loaded again).
  if (info && !info.foreign) {
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    else sessionStorage.removeItem(TOKEN_KEY);
  }
  remember(stream);
  start(stream, token);
});

ui.disconnect.addEventListener("click", () => {
  view.conn?.disconnect();
  say("disconnected");
});

for (const input of [ui.type, ui.source, ui.text, ui.hidden, ui.newestFirst]) {
  input.addEventListener("input", rerender);
}

ui.pause.addEventListener("click", () => {
  view.paused = !view.paused;
  if (!view.paused) {
    trimPending(MAX_KEPT);
    const pending = view.pending;
    if (view.skipped > 0) {
      // A marker row in order (it may fall beyond MAX_ROWS) and on the status line (always seen).
      const marker = { skipped: true, count: view.skipped, from: view.skippedFrom, to: view.skippedTo };
      show([marker]);
      say(`${marker.count} events skipped while paused (ids ${marker.from} to ${marker.to}): ` +
        `only the last ${MAX_KEPT} were kept; connect with after=${marker.from - 1} to replay them`);
    }
    view.pending = [];
    view.pendingCount = 0;
    view.skipped = 0;
    view.skippedFrom = -1;
    view.skippedTo = -1;
    if (pending.length) show(pending);
  }
  updateFigures();
});

ui.publishForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  ui.pubResult.classList.remove("error");
  delete ui.pubResult.dataset.id;
  let payload;
  try {
    payload = JSON.parse(ui.pubPayload.value);
  } catch (err) {
    ui.pubResult.textContent = `the payload is not valid JSON (${err.message}); write a ` +
      'JSON object, e.g. {"value": 3}';
    ui.pubResult.classList.add("error");
    return;
  }
  if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
    ui.pubResult.textContent = 'the payload must be a JSON object, e.g. {"value": 3}';
    ui.pubResult.classList.add("error");
    return;
  }
  if (!view.conn || view.conn.state === "closed") {
    ui.pubResult.textContent = "connect to a stream first";
    ui.pubResult.classList.add("error");
    return;
  }
  ui.pubResult.textContent = "publishing…";
  try {
    const id = await view.conn.publish({ type: ui.pubType.value, source: ui.pubSource.value,
      payload, hidden: ui.pubHidden.checked });
    ui.pubResult.textContent = `published as id ${id}`;
    ui.pubResult.dataset.id = String(id);
  } catch (err) {
    ui.pubResult.textContent = `${err.code ?? "error"}: ${err.message}`;
    ui.pubResult.classList.add("error");
  }
});

setInterval(updateFigures, 1000);
fillStreamList();
const target = serverInfo();
// A stored token is only for this page's own server: a link with ?server=elsewhere must not
// carry it there, nor connect by itself.
const trusted = target !== null && !target.foreign;
ui.token.value = trusted ? sessionStorage.getItem(TOKEN_KEY) ?? "" : "";
showState("closed", 0);
markNewest();
const initial = new URLSearchParams(location.search).get("stream");
if (initial) ui.stream.value = initial;
if (target === null) {
  say("?server= is not a valid ws:// or wss:// address", true);
} else if (target.foreign) {
  say(`This page points at another server, ${target.host}. Type its token (if any) and press ` +
    "Connect.");
} else if (initial) {
  remember(initial);
  start(initial, ui.token.value.trim());
}
