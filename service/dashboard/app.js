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
  // service/record.py), purge causes (PurgeCause in bus/protocol.py; the
  // page shows them as sent, so a new one needs no code, only this list) and
  // purge outcomes (PurgeOutcome in bus/protocol.py) and what a purge dropped
  // (PurgeExtent in bus/scope.py: an ack's `scope`).
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
  const OUTCOME = Object.freeze({
    OK: "ok",
    FAILED: "failed",
  });
  const EXTENT = Object.freeze({
    ALL: "all",
    SCOPED: "scoped",
  });

  // A clear's scope (ClearScope in service/openapi.yaml): what each process drops, then
  // which processes purge. The dialog's fields and the API's form fields carry these names.
  const WHAT_FIELDS = ["keys", "prefixes", "tags"];
  const SCOPE_FIELDS = WHAT_FIELDS.concat(["group"]);

  const $ = (id) => document.getElementById(id);

  // --- state ------------------------------------------------------------------

  /** worker id -> worker object, as /api/v1/cache/workers gives it; one per process. */
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

  // A worker's id: one per process. A service from before process ids keyed
  // workers (and named them in events) by name.
  function idOf(w) {
    return w.id || w.name;
  }

  // An id named in a clear's `missing` or `failed`: the id itself, or a worker object.
  function refId(ref) {
    return typeof ref === "string" ? ref : ref.worker;
  }

  function newClear(id, seq, publishedAt, token, expected, scope) {
    return { id: id, seq: seq, published_at: publishedAt, token: token || "",
             expected: expected, scope: scopeOf(scope), acks: new Map(), names: new Map(), completed: null };
  }

  // A clear's scope as four lists; null when not known (a clear seen only through its acks,
  // or a service from before scopes, whose clears are all of everything).
  function scopeOf(scope) {
    if (!scope || typeof scope !== "object") return null;
    const lists = {};
    for (const field of SCOPE_FIELDS) lists[field] = Array.isArray(scope[field]) ? scope[field].map(String) : [];
    return lists;
  }

  // Whether the clear drops only what it names (keys, prefixes or tags), rather than everything.
  function namesEntries(scope) {
    return !!scope && WHAT_FIELDS.some((field) => scope[field].length > 0);
  }

  function isScoped(scope) {
    return !!scope && SCOPE_FIELDS.some((field) => scope[field].length > 0);
  }

  // An ack as the clear keeps it: a successful purge is proof, and a later
  // failure of the same process does not take it back; a failure shows until then.
  function keepAck(view, ack) {
    const kept = view.acks.get(ack.worker);
    if (!kept || kept.outcome === OUTCOME.FAILED) view.acks.set(ack.worker, ack);
    if (ack.name) view.names.set(ack.worker, ack.name);
  }

  function isFailed(ack) {
    return !!ack && ack.outcome === OUTCOME.FAILED;
  }

  function isOk(ack) {
    return !!ack && !isFailed(ack);
  }

  // A clear as the page keeps it: acks by worker, and its outcome once completed.
  function clearFromRecord(c) {
    const view = newClear(c.id, c.seq, c.published_at, c.token, (c.workers || []).slice(), c.scope);
    for (const ack of c.acks || []) keepAck(view, ack);
    for (const ref of [].concat(c.missing || [], c.failed || [])) {
      if (typeof ref === "object" && ref.name) view.names.set(ref.worker, ref.name);
    }
    if (c.duration_ms !== null && c.duration_ms !== undefined) {
      view.completed = { complete: c.complete, missing: (c.missing || []).map(refId),
                         failed: (c.failed || []).map(refId), duration_ms: c.duration_ms };
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
      for (const w of d.workers || []) workers.set(idOf(w), w);
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
      addClear(newClear(d.clear_id, d.seq, d.published_at, d.token, (d.expected || []).slice(), d.scope));
      renderClears();
    },
    [EVENT.CLEAR_ACKED]: (d) => {
      let view = clears.get(d.clear_id);
      if (!view) {
        // Published before this page knew of it: keep what the ack tells.
        view = newClear(d.clear_id, d.seq, null, "", null, null);
        addClear(view);
      }
      keepAck(view, d);
      const w = workers.get(d.worker);
      if (w && isOk(d) && (w.last_acked_seq === null || w.last_acked_seq === undefined
                           || d.seq > w.last_acked_seq)) {
        w.last_acked_seq = d.seq;
        w.last_acked_clear = d.clear_id;
        renderWorkers();
      }
      renderClears();
    },
    [EVENT.CLEAR_COMPLETED]: (d) => {
      const view = clears.get(d.clear_id);
      if (!view) return;
      view.completed = { complete: d.complete, missing: (d.missing || []).map(refId),
                         failed: (d.failed || []).map(refId), duration_ms: d.duration_ms };
      renderClears();
    },
    [EVENT.WORKER_JOINED]: (d) => {
      workers.set(idOf(d), d);
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
      w.last_outcome = d.outcome || OUTCOME.OK;
      w.last_error = d.error || "";
      // A purge of everything empties the worker's cache, a scoped one drops what it counted;
      // its next `worker.stats` says what refilled it. A failed one may have dropped part
      // of it: the next `worker.stats` tells.
      if (!isFailed(d)) {
        const stats = w.stats && typeof w.stats === "object" ? w.stats : {};
        const entries = d.scope === EXTENT.SCOPED && typeof stats.entries === "number"
          ? Math.max(0, stats.entries - (Number(d.entries_dropped) || 0)) : 0;
        w.stats = Object.assign({}, w.stats, { entries: entries });
      }
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

  // "Clear now" empties every cache in the deployment, or what its scope names: ask first, in the page.
  function askToClear() {
    if (!credentials()) return showLogin("");
    const dialog = $("confirm-clear");
    dialog.returnValue = "";
    describeClear();
    dialog.showModal();
  }

  // The dialog's scope: each field's non-empty lines, trimmed (a key may hold a comma, not a newline).
  function dialogScope() {
    const lists = {};
    for (const field of SCOPE_FIELDS) {
      lists[field] = $("scope-" + field).value.split(/\r\n|\r|\n/).map((line) => line.trim())
        .filter((line) => line !== "");
    }
    return lists;
  }

  // The dialog says what the clear it sends does, as its fields are filled in.
  function describeClear() {
    const scope = dialogScope();
    const scoped = isScoped(scope);
    const who = scope.group.length ? "Each worker process of the group (by name or label)"
      : "Every worker process";
    const what = namesEntries(scope)
      ? " drops the entries named (a cache that cannot drop only those drops everything it holds)."
      : " drops its whole cache, so reads go to the backends until the caches fill again.";
    $("confirm-clear-title").textContent = scoped ? "Clear what you named?" : "Clear every cache now?";
    $("confirm-clear-what").textContent = who + what + " The clear counts as one call of your token.";
    $("confirm-clear-ok").textContent = scoped ? "Clear what you named" : "Clear every cache";
  }

  async function clearNow() {
    const creds = credentials();
    if (!creds) return showLogin("");
    const button = $("clear-now");
    button.disabled = true;
    const body = new URLSearchParams(creds);
    const scope = dialogScope();
    for (const field of SCOPE_FIELDS) {
      for (const entry of scope[field]) body.append(field, entry);
    }
    try {
      const response = await fetch("/api/v1/cache/clear", {
        method: "POST",
        headers: { "Content-Type": "application/x-www-form-urlencoded" },
        body: body.toString(),
        cache: "no-store",
      });
      const id = response.headers.get("Cache-Clear-Id");
      if (response.ok) {
        // Sent: the next "Clear now" starts from everything again. A refused scope stays, to be fixed.
        for (const field of SCOPE_FIELDS) $("scope-" + field).value = "";
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

  function pad(n) {
    return String(n).padStart(2, "0");
  }

  // Every time the page shows carries its date: "2026-11-29 08:12:03", local time.
  function fullDate(ts) {
    const d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  // A <time> element: `text` (the full date unless given), the full date as its title.
  function timeEl(ts, attrs, text) {
    const node = el("time", attrs, text === undefined ? fullDate(ts) : text);
    node.dateTime = new Date(ts * 1000).toISOString();
    node.title = fullDate(ts);
    return node;
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
  // event); for the other states last seen is exact, so the time ticks from it.
  function lastSeenText(w) {
    return w.state === STATE.LIVE ? "just now" : ago(w.last_seen);
  }

  function ms(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return value.toFixed(2) + " ms";
    if (value < 1000) return value.toFixed(1) + " ms";
    return (value / 1000).toFixed(2) + " s";
  }

  // As the record decides it: a worker that chose to keep serving when it hears no service
  // (bus.on_silence: serve) and said it is degraded, or that the service no longer hears.
  function isDegraded(w) {
    const stats = w.stats && typeof w.stats === "object" ? w.stats : {};
    if (stats.on_silence !== "serve" || w.state === STATE.LEFT) return false;
    return stats.degraded === true || w.state === STATE.SUSPECT || w.state === STATE.LOST;
  }

  function ratio(value) {
    return typeof value === "number" ? (value * 100).toFixed(1) + " %" : "–";
  }

  function plural(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  function cell(field, label, text, numeric) {
    return el("td", { "data-field": field, "data-label": label, "class": numeric ? "num" : "" }, text);
  }

  function workerRow(w) {
    const stats = w.stats && typeof w.stats === "object" ? w.stats : {};
    const failed = w.last_outcome === OUTCOME.FAILED;
    const tr = el("tr", { "data-worker": idOf(w), "data-name": w.name, "data-state": w.state,
                          "data-outcome": failed ? OUTCOME.FAILED : OUTCOME.OK });
    const names = Array.isArray(w.labels) ? w.labels.map(String) : [];
    tr.append(
      (() => {
        const td = cell("name", "Name", w.name);
        // More names it answers to in a clear's group.
        if (names.length) {
          td.append(" ", el("span", { "class": "labels", "data-field": "labels",
                                      "title": "Labels: a clear's group may name this process by any of them" },
                            names.join(", ")));
        }
        return td;
      })(),
      (() => {
        const td = cell("id", "Process");
        td.append(el("code", {}, dash(w.id || w.instance)));
        return td;
      })(),
      (() => {
        const td = cell("state", "State");
        td.dataset.state = w.state;
        td.append(el("span", { "class": "badge", "data-state": w.state }, w.state));
        if (isDegraded(w)) {
          td.append(" ", el("span", { "class": "badge degraded-note", "data-degraded": "true",
                                      "title": "bus.on_silence is serve: its caches may be serving entries a " +
                                               "clear should have dropped, until it hears the service again" },
                            "degraded"));
        }
        return td;
      })(),
      (() => {
        const td = cell("host", "Host", dash(w.host));
        // A worker heard through a relay (docs/scale-out.md): the relay's name, as the service knows it.
        if (w.via) {
          td.append(" ", el("span", { "class": "via", "data-via": w.via,
                                      "title": "Heard through the relay " + w.via }, "via " + w.via));
        }
        return td;
      })(),
      cell("pid", "PID", dash(w.pid), true),
      (() => {
        const td = cell("last_seen", "Last seen");
        td.dataset.ts = String(w.last_seen || "");
        if (w.last_seen) td.append(timeEl(w.last_seen, {}, lastSeenText(w)));
        else td.textContent = "–";
        return td;
      })(),
      cell("last_acked_seq", "Last acked seq", dash(w.last_acked_seq), true),
      cell("entries", "Cache entries", dash(stats.entries), true),
      cell("hit_ratio", "Hit ratio", ratio(stats.hit_ratio), true),
      (() => {
        const td = cell("last_purge_cause", "Last purge", dash(w.last_purge_cause));
        td.dataset.outcome = failed ? OUTCOME.FAILED : OUTCOME.OK;
        if (failed) {
          td.append(el("span", { "class": "failed-note" }, " failed"));
          td.title = "The last purge failed: " + (w.last_error || "no error message");
        }
        return td;
      })(),
    );
    return tr;
  }

  // One <tbody> per name: a header row with the group's count, then one row per process.
  function renderWorkers() {
    const table = $("workers");
    const groups = new Map();
    for (const w of workers.values()) {
      const name = String(w.name || "");
      if (!groups.has(name)) groups.set(name, []);
      groups.get(name).push(w);
    }
    const bodies = [];
    for (const name of Array.from(groups.keys()).sort()) {
      const members = groups.get(name).sort((a, b) => String(idOf(a)).localeCompare(String(idOf(b))));
      const live = members.filter((w) => w.state === STATE.LIVE).length;
      const failed = members.filter((w) => w.last_outcome === OUTCOME.FAILED).length;
      const body = el("tbody", { "data-group": name });
      const head = el("tr", { "class": "group" });
      const th = el("th", { "colSpan": 10, "scope": "rowgroup" });
      th.append(el("span", { "class": "group-name" }, name),
                el("span", { "class": "group-count", "data-field": "group-count" },
                   plural(members.length, "process", "processes") + ", " + live + " live" +
                   (failed ? ", " + failed + " failed" : "")));
      head.append(th);
      body.append(head, ...members.map(workerRow));
      bodies.push(body);
    }
    for (const old of Array.from(table.tBodies)) old.remove();
    table.append(...bodies);
    $("no-workers").hidden = workers.size > 0;
    const live = Array.from(workers.values()).filter((w) => w.state === STATE.LIVE).length;
    $("worker-count").textContent = workers.size
      ? live + " of " + plural(workers.size, "process", "processes") + " live, " + plural(groups.size, "name", "names") : "";
  }

  // How a clear names a process: its name, and when the name is not unique among
  // the clear's processes, the rest of its id (host:pid:random) after the host.
  function nameOf(view, id) {
    const w = workers.get(id);
    return view.names.get(id) || (w && w.name) || id;
  }

  function labels(view) {
    const ids = chipIds(view);
    const names = ids.map((id) => nameOf(view, id));
    const count = new Map();
    for (const name of names) count.set(name, (count.get(name) || 0) + 1);
    return new Map(ids.map((id, i) => [id, count.get(names[i]) > 1 && id !== names[i]
      ? names[i] + " " + String(id).split(":").slice(1).join(":") : names[i]]));
  }

  // The processes a clear expected, then any other that acked it.
  function chipIds(view) {
    const expected = view.expected || [];
    return expected.concat(Array.from(view.acks.keys()).filter((id) => !expected.includes(id)));
  }

  function clearItem(view) {
    const expected = view.expected || [];
    const acked = expected.filter((id) => isOk(view.acks.get(id))).length;
    const failing = Array.from(view.acks.values()).filter(isFailed).length;
    const li = el("li", { "data-clear": view.id, "data-seq": String(view.seq),
                          "class": "clear", "data-done": view.completed ? "true" : "false" });
    const head = el("div", { "class": "clear-head" });
    head.append(
      el("span", { "class": "seq", "data-field": "seq" }, "#" + view.seq),
      el("code", { "class": "clear-id", "data-field": "id", "title": view.id }, view.id),
      view.published_at ? timeEl(view.published_at, { "class": "when", "data-field": "published_at" })
        : el("span", { "class": "when", "data-field": "published_at" }, ""),
    );
    if (view.token) {
      head.append(el("code", { "class": "token", "data-field": "token",
                               "title": "The first 8 characters of the token that started this clear" },
                     "token " + view.token.slice(0, 8)));
    }
    head.append(el("span", { "class": "progress", "data-field": "progress",
                             "data-complete": expected.length > 0 && acked === expected.length ? "true" : "false" },
                   acked + "/" + expected.length));
    if (failing) {
      head.append(el("span", { "class": "failed-count", "data-field": "failed_count",
                               "data-outcome": OUTCOME.FAILED }, failing + " failed"));
    }
    const outcome = el("span", { "class": "outcome", "data-field": "duration" });
    const done = view.completed;
    const label = labels(view);
    const named = (ids) => ids.map((id) => label.get(id) || nameOf(view, id)).join(", ");
    if (view.expected && expected.length === 0) {
      outcome.dataset.outcome = "empty";
      outcome.textContent = view.scope && view.scope.group.length
        ? "nobody was listening: no live worker of its group when it was published"
        : "nobody was listening: no live worker when it was published";
    } else if (done && done.complete) {
      outcome.dataset.outcome = "complete";
      outcome.textContent = "all acked in " + ms(done.duration_ms);
    } else if (done) {
      // No proof: a process never acked (the record stopped waiting), or its purge failed.
      const missing = done.missing.filter((id) => !isOk(view.acks.get(id)));
      const failed = done.failed.filter((id) => !isOk(view.acks.get(id)));
      outcome.dataset.outcome = missing.length || !failed.length ? "timeout" : OUTCOME.FAILED;
      outcome.textContent = (missing.length || !failed.length ? "timed out after " : "no proof after ") +
        ms(done.duration_ms) +
        (missing.length ? ", missing: " + named(missing) : "") +
        (failed.length ? ", failed: " + named(failed) : "");
    } else {
      outcome.dataset.outcome = "waiting";
      outcome.dataset.since = String(view.published_at || "");
      outcome.textContent = waitingText(view.published_at);
    }
    head.append(outcome);
    if (isScoped(view.scope)) li.dataset.scoped = "true";
    const chips = el("div", { "class": "chips" });
    for (const id of chipIds(view)) chips.append(chip(view, id, label.get(id), expected.includes(id)));
    li.append(head);
    if (isScoped(view.scope)) li.append(scopeLine(view.scope));
    li.append(chips);
    return li;
  }

  // At most this many entries of each list show; the title holds them all.
  const SCOPE_SHOWN = 5;

  // "keys: a, b · tags: menu · group: web": what a scoped clear named, one list after the other.
  function scopeLine(scope) {
    const parts = [];
    const full = [];
    for (const field of SCOPE_FIELDS) {
      const values = scope[field];
      if (!values.length) continue;
      const more = values.length - SCOPE_SHOWN;
      parts.push(field + ": " + values.slice(0, SCOPE_SHOWN).join(", ") + (more > 0 ? " +" + more + " more" : ""));
      full.push(field + ": " + values.join(", "));
    }
    const node = el("div", { "class": "clear-scope", "data-field": "scope" }, parts.join(" · "));
    node.title = (namesEntries(scope) ? "Drops only the entries named" : "Drops everything") +
      (scope.group.length ? ", in the processes of its group" : ", in every process") + "\n" + full.join("\n");
    return node;
  }

  // One process's part in a clear: its ack (the entries it dropped), its failure, or nothing yet.
  function chip(view, id, label, expected) {
    const ack = view.acks.get(id);
    const node = el("span", { "class": "chip", "data-ack-worker": id, "data-ack-name": nameOf(view, id),
                              "data-acked": isOk(ack) ? "true" : "false",
                              "data-outcome": ack ? (isFailed(ack) ? OUTCOME.FAILED : OUTCOME.OK) : "",
                              "data-expected": expected ? "true" : "false" });
    node.append(el("span", { "class": "chip-name" }, label));
    const who = label === id ? id : label + " (" + id + ")";
    const at = ack && ack.acked_at ? " at " + fullDate(ack.acked_at) : "";
    if (isFailed(ack)) {
      node.append(el("span", { "class": "chip-detail", "data-field": "error" }, OUTCOME.FAILED));
      node.title = who + ": purge failed" + at + " (cause: " + ack.cause + "): " + (ack.error || "no error message");
    } else if (ack) {
      // A clear that named entries, acked by a purge of everything: a cache of this process cannot
      // drop only what was named (a plain mapping cannot know tags), or it purged for a gap.
      const whole = namesEntries(view.scope) && ack.scope === EXTENT.ALL;
      node.append(el("span", { "class": "chip-detail", "data-field": "latency" }, ms(ack.latency_ms)),
                  el("span", { "class": "chip-detail", "data-field": "dropped" },
                     plural(Number(ack.entries_dropped) || 0, "entry", "entries") + " dropped"));
      if (whole) {
        node.dataset.ackScope = EXTENT.ALL;
        node.append(el("span", { "class": "ack-scope", "data-field": "ack-scope" }, "dropped everything"));
      }
      node.title = who + " acked" + at + ", " + ms(ack.latency_ms) + " after the clear: dropped " +
        plural(Number(ack.entries_dropped) || 0, "entry", "entries") + " in " + ms(ack.purge_ms) +
        " (cause: " + ack.cause + ")" +
        (whole ? ". It dropped everything, not only what the clear named: " +
                 (ack.cause === CAUSE.CLEAR ? "a cache of it cannot drop just those entries"
                   : "it purged for cause " + ack.cause + ", which drops everything")
          : ack.scope === EXTENT.SCOPED ? ", only what the clear named" : "");
    } else {
      node.title = who + ": no ack yet";
    }
    return node;
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
      const time = td.querySelector("time");
      if (w && time) time.textContent = lastSeenText(w);
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
    $("clear-now").addEventListener("click", askToClear);
    for (const field of SCOPE_FIELDS) $("scope-" + field).addEventListener("input", describeClear);
    $("confirm-clear").addEventListener("close", () => {
      if ($("confirm-clear").returnValue === "clear") clearNow();
    });
    window.addEventListener("pagehide", stopStream);
    setInterval(tick, 1000);
    if (credentials()) showDashboard();
    else showLogin("");
  }

  start();
})();
