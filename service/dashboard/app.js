// cachebus dashboard: the record, live, from GET /api/v1/cache/events (docs/ops.md).
//
// All state comes from the event stream: a `snapshot` replaces it, the other
// events change it. Nothing polls the service. Credentials live in this tab's
// sessionStorage only. Text from the service always goes in with textContent.
"use strict";

(function () {
  const TOKEN_KEY = "cachebus.token";
  const ACCESS_KEY = "cachebus.access_token";
  const MAX_CLEARS = 50;
  const BACKOFF_MIN_MS = 1000;
  const BACKOFF_MAX_MS = 30000;

  // The service's terms, spelled as its Python enums spell them: event kinds
  // (EventKind in service/events.py), worker states (WorkerState in
  // service/record.py) and purge causes (PurgeCause in bus/protocol.py; the
  // page shows them as sent, so a new one needs no code, only this list).
  // tests/test_terms.py fails when these and the enums differ; write no other
  // literal for them below.
  const EVENT = Object.freeze({
    CLEAR_PUBLISHED: "clear.published",
    CLEAR_ACKED: "clear.acked",
    CLEAR_COMPLETED: "clear.completed",
    WORKER_JOINED: "worker.joined",
    WORKER_STATE: "worker.state",
    WORKER_PURGED: "worker.purged",
    WORKER_STATS: "worker.stats",
    SNAPSHOT: "snapshot",
    OVERFLOW: "overflow",
  });
  const STATE = Object.freeze({
    LIVE: "live",
    SUSPECT: "suspect",
    LOST: "lost",
    LEFT: "left",
    FORGOTTEN: "forgotten",
  });
  const CAUSE = Object.freeze({
    CLEAR: "clear",
    RECONNECT: "reconnect",
    GAP: "gap",
    EPOCH: "epoch",
  });

  const $ = (id) => document.getElementById(id);

  // --- state ------------------------------------------------------------------

  /** name -> worker object, as /api/v1/cache/workers gives it. */
  let workers = new Map();
  /** id -> clear view; `clearOrder` holds ids newest first. */
  let clears = new Map();
  let clearOrder = [];
  let epoch = "";

  let source = null;          // the EventSource
  let opened = false;         // this EventSource got a 200 at least once
  let retryTimer = null;
  let backoff = BACKOFF_MIN_MS;

  function credentials() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const access = sessionStorage.getItem(ACCESS_KEY);
    return token && access ? { token: token, access_token: access } : null;
  }

  function query(creds) {
    return new URLSearchParams(creds).toString();
  }

  // A clear as the page keeps it: acks by worker, and its outcome once completed.
  function clearFromRecord(c) {
    const view = {
      id: c.id,
      seq: c.seq,
      published_at: c.published_at,
      expected: (c.workers || []).slice(),
      acks: new Map(),
      completed: null,
    };
    for (const ack of c.acks || []) view.acks.set(ack.worker, ack);
    if (c.duration_ms !== null && c.duration_ms !== undefined) {
      view.completed = { complete: c.complete, missing: c.missing || [], duration_ms: c.duration_ms };
    }
    return view;
  }

  // Newest (highest seq) first, at most MAX_CLEARS.
  function addClear(view) {
    const known = clears.has(view.id);
    clears.set(view.id, view);
    if (!known) {
      clearOrder.unshift(view.id);
      clearOrder.sort((a, b) => clears.get(b).seq - clears.get(a).seq);
    }
    while (clearOrder.length > MAX_CLEARS) clears.delete(clearOrder.pop());
  }

  // --- events -----------------------------------------------------------------

  const handlers = {
    [EVENT.SNAPSHOT]: (d) => {
      epoch = d.epoch || "";
      workers = new Map();
      for (const w of d.workers || []) workers.set(w.name, w);
      clears = new Map();
      clearOrder = [];
      for (const c of d.clears || []) {
        const view = clearFromRecord(c);
        clears.set(view.id, view);
        clearOrder.push(view.id);
      }
      clearOrder = clearOrder.slice(0, MAX_CLEARS);
      renderAll();
    },
    [EVENT.CLEAR_PUBLISHED]: (d) => {
      addClear({ id: d.clear_id, seq: d.seq, published_at: d.published_at,
                 expected: (d.expected || []).slice(), acks: new Map(), completed: null });
      renderClears();
    },
    [EVENT.CLEAR_ACKED]: (d) => {
      let view = clears.get(d.clear_id);
      if (!view) {
        // Published before this page knew of it: keep what the ack tells.
        view = { id: d.clear_id, seq: d.seq, published_at: null, expected: [], acks: new Map(), completed: null };
        addClear(view);
      }
      view.acks.set(d.worker, d);
      const w = workers.get(d.worker);
      if (w && (w.last_acked_seq === null || w.last_acked_seq === undefined || d.seq > w.last_acked_seq)) {
        w.last_acked_seq = d.seq;
        w.last_acked_clear = d.clear_id;
        renderWorkers();
      }
      renderClears();
    },
    [EVENT.CLEAR_COMPLETED]: (d) => {
      const view = clears.get(d.clear_id);
      if (!view) return;
      view.completed = { complete: d.complete, missing: d.missing || [], duration_ms: d.duration_ms };
      renderClears();
    },
    [EVENT.WORKER_JOINED]: (d) => {
      workers.set(d.name, d);
      renderWorkers();
    },
    [EVENT.WORKER_STATE]: (d) => {
      if (d.state === STATE.FORGOTTEN) {
        workers.delete(d.worker);
      } else {
        const w = workers.get(d.worker);
        if (!w) return;
        w.state = d.state;
        if (d.last_seen) w.last_seen = d.last_seen;
      }
      renderWorkers();
    },
    [EVENT.WORKER_PURGED]: (d) => {
      const w = workers.get(d.worker);
      if (!w) return;
      w.last_purge_cause = d.cause;
      // A purge empties the worker's cache; its next `worker.stats` says what refilled it.
      w.stats = Object.assign({}, w.stats, { entries: 0 });
      renderWorkers();
    },
    [EVENT.WORKER_STATS]: (d) => {
      const w = workers.get(d.worker);
      if (!w) return;
      w.stats = d.stats;
      if (d.last_seen) w.last_seen = d.last_seen;
      renderWorkers();
    },
    [EVENT.OVERFLOW]: () => {
      // The service drops this stream; the browser reconnects with Last-Event-ID.
      setStatus("reconnecting", "reconnecting… (fell behind)");
    },
  };

  function connect() {
    const creds = credentials();
    if (!creds) return showLogin("");
    stopStream();
    opened = false;
    setStatus("connecting", "connecting…");
    const es = new EventSource("/api/v1/cache/events?" + query(creds));
    source = es;
    es.onopen = () => {
      if (es !== source) return;
      opened = true;
      backoff = BACKOFF_MIN_MS;
      setStatus("live", "live");
    };
    es.onerror = () => {
      if (es !== source) return;
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        if (!opened) checkCredentials();
        else retryLater();
      } else {
        // CONNECTING: the browser reconnects by itself, with Last-Event-ID.
        setStatus("reconnecting", "reconnecting…");
      }
    };
    for (const kind of Object.keys(handlers)) {
      es.addEventListener(kind, (event) => {
        if (es !== source) return;
        let data;
        try {
          data = JSON.parse(event.data);
        } catch (err) {
          console.error("cachebus: bad event data", kind, err);
          return;
        }
        if (kind !== EVENT.OVERFLOW) setStatus("live", "live");
        handlers[kind](data);
      });
    }
  }

  function stopStream() {
    if (retryTimer !== null) {
      clearTimeout(retryTimer);
      retryTimer = null;
    }
    if (source !== null) {
      source.close();
      source = null;
    }
  }

  function retryLater() {
    const wait = backoff;
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setStatus("reconnecting", "reconnecting… (retry in " + Math.round(wait / 1000) + " s)");
    retryTimer = setTimeout(() => {
      retryTimer = null;
      connect();
    }, wait);
  }

  // The stream failed before it ever opened: bad credentials, or no service?
  // One read of /workers tells, with Flextype's error body when it is refused.
  async function checkCredentials() {
    const creds = credentials();
    if (!creds) return showLogin("");
    let response;
    try {
      response = await fetch("/api/v1/cache/workers?" + query(creds), { cache: "no-store" });
    } catch (err) {
      return retryLater();
    }
    if (response.status === 400 || response.status === 401) {
      const message = await errorMessage(response);
      forget();
      showLogin("The service refused these credentials: " + message);
      return;
    }
    retryLater();
  }

  async function errorMessage(response) {
    let message = "";
    try {
      const body = await response.json();
      if (body && typeof body.message === "string") message = body.message;
    } catch (err) {
      // not Flextype's JSON body
    }
    return "HTTP " + response.status + (message ? ": " + message : " " + response.statusText);
  }

  // --- actions ----------------------------------------------------------------

  async function clearNow() {
    const creds = credentials();
    if (!creds) return showLogin("");
    const button = $("clear-now");
    button.disabled = true;
    try {
      const response = await fetch("/api/v1/cache/clear", {
        method: "POST",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams(creds).toString(),
        cache: "no-store",
      });
      const id = response.headers.get("Cache-Clear-Id");
      if (response.ok) {
        showResult("ok", "Clear " + (id || "") + " accepted; acks appear below.", id);
      } else {
        showResult("error", "Clear refused: " + (await errorMessage(response)), id);
      }
    } catch (err) {
      showResult("error", "Clear failed: the service cannot be reached.", null);
    } finally {
      button.disabled = false;
    }
  }

  function showResult(kind, text, id) {
    const el = $("clear-result");
    el.hidden = false;
    el.dataset.kind = kind;
    if (id) el.dataset.clearId = id;
    else delete el.dataset.clearId;
    el.textContent = text;
  }

  function forget() {
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(ACCESS_KEY);
  }

  function showLogin(message, kind) {
    stopStream();
    workers = new Map();
    clears = new Map();
    clearOrder = [];
    epoch = "";
    renderAll();
    setStatus("idle", "not connected");
    $("dashboard").hidden = true;
    $("clear-now").hidden = true;
    $("forget").hidden = true;
    $("epoch").hidden = true;
    $("clear-result").hidden = true;
    $("login").hidden = false;
    const error = $("login-error");
    error.textContent = message;
    error.dataset.kind = kind || "error";
    error.hidden = !message;
    $("token").focus();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("dashboard").hidden = false;
    $("clear-now").hidden = false;
    $("forget").hidden = false;
    connect();
  }

  function setStatus(state, text) {
    const el = $("status");
    el.dataset.state = state;
    el.textContent = text;
  }

  // --- rendering --------------------------------------------------------------

  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function dash(value) {
    return value === null || value === undefined || value === "" ? "–" : String(value);
  }

  function ago(ts) {
    if (!ts) return "–";
    const seconds = Math.max(0, Date.now() / 1000 - ts);
    if (seconds < 1) return "just now";
    if (seconds < 90) return Math.floor(seconds) + " s ago";
    if (seconds < 5400) return Math.floor(seconds / 60) + " min ago";
    if (seconds < 172800) return Math.floor(seconds / 3600) + " h ago";
    return Math.floor(seconds / 86400) + " d ago";
  }

  // A live worker was heard within the liveness window (its heartbeats move no
  // event); for the other states last_seen is exact, so the time ticks from it.
  function lastSeenText(w) {
    return w.state === STATE.LIVE ? "just now" : ago(w.last_seen);
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return value.toFixed(2) + " ms";
    if (value < 1000) return value.toFixed(1) + " ms";
    return (value / 1000).toFixed(2) + " s";
  }

  function ratio(value) {
    return typeof value === "number" ? (value * 100).toFixed(1) + " %" : "–";
  }

  function cell(field, label, text, numeric) {
    return el("td", { "data-field": field, "data-label": label, "class": numeric ? "num" : "" }, text);
  }

  function workerRow(w) {
    const stats = w.stats && typeof w.stats === "object" ? w.stats : {};
    const tr = el("tr", { "data-worker": w.name, "data-state": w.state });
    tr.append(
      cell("name", "Name", w.name),
      (() => {
        const td = cell("state", "State");
        td.dataset.state = w.state;
        td.append(el("span", { "class": "badge", "data-state": w.state }, w.state));
        return td;
      })(),
      cell("host", "Host", dash(w.host)),
      cell("pid", "PID", dash(w.pid), true),
      (() => {
        const td = cell("last_seen", "Last seen", lastSeenText(w));
        td.dataset.ts = String(w.last_seen || "");
        if (w.last_seen) td.title = new Date(w.last_seen * 1000).toLocaleString();
        return td;
      })(),
      cell("last_acked_seq", "Last acked seq", dash(w.last_acked_seq), true),
      cell("entries", "Cache entries", dash(stats.entries), true),
      cell("hit_ratio", "Hit ratio", ratio(stats.hit_ratio), true),
      cell("last_purge_cause", "Last purge", dash(w.last_purge_cause)),
    );
    return tr;
  }

  function renderWorkers() {
    const body = $("workers").tBodies[0];
    const names = Array.from(workers.keys()).sort();
    body.replaceChildren(...names.map((name) => workerRow(workers.get(name))));
    $("no-workers").hidden = names.length > 0;
    const live = names.filter((n) => workers.get(n).state === STATE.LIVE).length;
    $("worker-count").textContent = names.length ? live + " of " + names.length + " live" : "";
  }

  function clearItem(view) {
    const expected = view.expected;
    const acked = expected.filter((n) => view.acks.has(n)).length;
    const li = el("li", { "data-clear": view.id, "data-seq": String(view.seq),
                          "class": "clear", "data-done": view.completed ? "true" : "false" });
    const head = el("div", { "class": "clear-head" });
    head.append(
      el("span", { "class": "seq", "data-field": "seq" }, "#" + view.seq),
      el("code", { "class": "clear-id", "data-field": "id", "title": view.id }, view.id),
      el("span", { "class": "when", "data-field": "published_at" },
         view.published_at ? new Date(view.published_at * 1000).toLocaleTimeString() : ""),
      el("span", { "class": "progress", "data-field": "progress",
                   "data-complete": acked === expected.length ? "true" : "false" },
         acked + "/" + expected.length),
    );
    const outcome = el("span", { "class": "outcome", "data-field": "duration" });
    if (view.completed && view.completed.complete) {
      outcome.dataset.outcome = "complete";
      outcome.textContent = expected.length === 0 ? "no live worker to ack"
        : "all acked in " + ms(view.completed.duration_ms);
    } else if (view.completed) {
      outcome.dataset.outcome = "timeout";
      outcome.textContent = "timed out after " + ms(view.completed.duration_ms) +
        ", missing: " + view.completed.missing.join(", ");
    } else {
      outcome.dataset.outcome = "waiting";
      outcome.dataset.since = String(view.published_at || "");
      outcome.textContent = waitingText(view.published_at);
    }
    head.append(outcome);
    const chips = el("div", { "class": "chips" });
    const names = expected.concat(Array.from(view.acks.keys()).filter((n) => !expected.includes(n)));
    for (const name of names) {
      const ack = view.acks.get(name);
      const chip = el("span", { "class": "chip", "data-ack-worker": name,
                                "data-acked": ack ? "true" : "false",
                                "data-expected": expected.includes(name) ? "true" : "false" });
      chip.append(el("span", { "class": "chip-name" }, name));
      if (ack) {
        chip.append(el("span", { "class": "chip-detail" }, ms(ack.latency_ms)));
        chip.title = name + " acked after " + ms(ack.latency_ms) + ", dropped " + ack.entries_dropped +
          " entries in " + ms(ack.purge_ms) + " (cause: " + ack.cause + ")";
      } else {
        chip.title = name + ": no ack yet";
      }
      chips.append(chip);
    }
    li.append(head, chips);
    return li;
  }

  function waitingText(since) {
    return since ? "waiting… " + Math.max(0, Date.now() / 1000 - since).toFixed(0) + " s" : "waiting…";
  }

  function renderClears() {
    const list = $("clears");
    list.replaceChildren(...clearOrder.map((id) => clearItem(clears.get(id))));
    $("no-clears").hidden = clearOrder.length > 0;
  }

  function renderAll() {
    renderWorkers();
    renderClears();
    const ep = $("epoch");
    ep.textContent = epoch ? "run " + epoch : "";
    ep.hidden = !epoch;
  }

  // Relative times tick once a second; this reads no network.
  function tick() {
    for (const td of document.querySelectorAll("#workers td[data-field=last_seen]")) {
      const w = workers.get(td.parentElement.dataset.worker);
      if (w) td.textContent = lastSeenText(w);
    }
    for (const span of document.querySelectorAll("#clears [data-outcome=waiting]")) {
      span.textContent = waitingText(Number(span.dataset.since) || 0);
    }
  }

  // --- wiring -----------------------------------------------------------------

  function start() {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      const access = $("access-token").value.trim();
      if (!token || !access) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      sessionStorage.setItem(ACCESS_KEY, access);
      $("access-token").value = "";
      showDashboard();
    });
    $("forget").addEventListener("click", () => {
      forget();
      $("token").value = "";
      showLogin("Credentials forgotten.", "info");
    });
    $("clear-now").addEventListener("click", clearNow);
    window.addEventListener("pagehide", stopStream);
    setInterval(tick, 1000);
    if (credentials()) showDashboard();
    else showLogin("");
  }

  start();
})();
