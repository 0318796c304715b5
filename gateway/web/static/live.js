// Siteward device list: keeps the server-rendered cards current over /api/v1/live.
// Plain JavaScript, no build step, no external resources. DOM text is always set with
// textContent, never innerHTML: device names and metrics come from the network.
// SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";

  var list = document.getElementById("devices");
  var statusEl = document.getElementById("live-status");
  var countEl = document.getElementById("device-count");
  var emptyEl = document.getElementById("no-devices");
  if (!list || !statusEl) { return; }

  var AUTH_ENDED = 4401;
  var backoffMs = 1000;
  var MAX_BACKOFF_MS = 30000;
  var socket = null;
  var retryTimer = null;

  // the same rule as the server (pages.format_value): at most 3 decimals, no trailing zeros
  function formatValue(v) {
    if (typeof v !== "number" || !isFinite(v)) { return String(v); }
    var text = (Math.round(v * 1000) / 1000).toFixed(3).replace(/0+$/, "").replace(/\.$/, "");
    return text === "-0" || text === "" ? "0" : text;
  }

  function setStatus(state, text) {
    statusEl.dataset.state = state;
    statusEl.textContent = text;
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function findCard(id) {
    var cards = list.querySelectorAll("li.device");
    for (var i = 0; i < cards.length; i++) {
      if (cards[i].dataset.device === id) { return cards[i]; }
    }
    return null;
  }

  function updateCount() {
    var n = list.querySelectorAll("li.device").length;
    if (countEl) { countEl.textContent = String(n); }
    if (emptyEl) { emptyEl.hidden = n > 0; }
  }

  function makeCard(id) {
    var card = el("li", "device");
    card.dataset.device = id;
    var head = el("div", "head");
    head.appendChild(el("h2", "", id));
    var badge = el("span", "badge offline", "offline");
    badge.dataset.role = "status";
    head.appendChild(badge);
    card.appendChild(head);
    var meta = el("p", "meta");
    meta.appendChild(el("span", "id", id));
    meta.appendChild(document.createTextNode(" · "));
    var state = el("span", "state", "discovered");
    state.dataset.role = "state";
    meta.appendChild(state);
    meta.appendChild(document.createTextNode(" · last seen "));
    meta.appendChild(el("time", "", "never"));
    card.appendChild(meta);
    card.appendChild(el("dl", "values"));
    list.appendChild(card);
    updateCount();
    return card;
  }

  function cardFor(id) { return findCard(id) || makeCard(id); }

  function setOnline(card, online) {
    card.dataset.online = online ? "true" : "false";
    var badge = card.querySelector('[data-role="status"]');
    if (badge) {
      badge.textContent = online ? "online" : "offline";
      badge.className = "badge " + (online ? "online" : "offline");
    }
  }

  function setSeen(card, ts) {
    var t = card.querySelector("time");
    if (!t || typeof ts !== "number") { return; }
    var d = new Date(ts * 1000);
    t.dataset.ts = String(ts);
    t.dateTime = d.toISOString();
    t.textContent = d.toLocaleTimeString();
  }

  function setValue(card, metric, value, unit) {
    var dl = card.querySelector("dl.values");
    var row = null;
    var rows = dl.querySelectorAll("div[data-metric]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].dataset.metric === metric) { row = rows[i]; break; }
    }
    if (!row) {
      row = el("div");
      row.dataset.metric = metric;
      row.appendChild(el("dt", "", metric));
      var dd = el("dd");
      dd.appendChild(el("span", "v"));
      dd.appendChild(document.createTextNode(" "));
      dd.appendChild(el("span", "u"));
      row.appendChild(dd);
      // keep metrics in name order, as the server renders them
      var before = null;
      for (var j = 0; j < rows.length; j++) {
        if (rows[j].dataset.metric > metric) { before = rows[j]; break; }
      }
      dl.insertBefore(row, before);
    }
    row.querySelector(".v").textContent = formatValue(value);
    row.querySelector(".u").textContent = unit || "";
    row.classList.remove("fresh");
    void row.offsetWidth; // restart the highlight animation
    row.classList.add("fresh");
  }

  function applyDevice(d) {
    var card = cardFor(d.id);
    var h2 = card.querySelector("h2");
    if (h2) { h2.textContent = d.name || d.id; }
    var st = card.querySelector('[data-role="state"]');
    if (st && d.state) { st.textContent = d.state; }
    setOnline(card, !!d.online);
    if (d.last_seen) { setSeen(card, d.last_seen); }
    var latest = d.latest || {};
    Object.keys(latest).forEach(function (m) {
      setValue(card, m, latest[m].value, latest[m].unit);
    });
  }

  // after a reconnect or a gap, updates were missed: read the current state once
  function resync() {
    fetch("/api/v1/devices", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) { location.assign("/login?next=/"); return null; }
        return r.ok ? r.json() : null;
      })
      .then(function (body) {
        if (body && body.devices) { body.devices.forEach(applyDevice); }
      })
      .catch(function () { /* the socket's own reconnect will try again */ });
  }

  // a refused handshake looks like any network error to the page: ask whether the
  // session is still valid, and go to the login page if not
  function checkSession() {
    fetch("/api/v1/me", { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) { if (r.status === 401) { location.assign("/login?next=/"); } })
      .catch(function () { /* gateway unreachable: keep retrying */ });
  }

  function onEvent(ev) {
    if (ev.type === "reading") {
      var card = cardFor(ev.device);
      setValue(card, ev.metric, ev.value, ev.unit);
      setOnline(card, true);
      setSeen(card, ev.ts);
    } else if (ev.type === "device") {
      var c = cardFor(ev.device);
      if (typeof ev.online === "boolean") { setOnline(c, ev.online); }
      if (ev.state) {
        var st = c.querySelector('[data-role="state"]');
        if (st) { st.textContent = ev.state; }
      }
    } else if (ev.type === "event" && ev.kind === "device.removed" && ev.device) {
      var gone = findCard(ev.device);
      if (gone) { gone.remove(); updateCount(); }
    } else if (ev.type === "gap") {
      resync();
    }
  }

  function connect() {
    var scheme = location.protocol === "https:" ? "wss://" : "ws://";
    setStatus("connecting", "Connecting…");
    socket = new WebSocket(scheme + location.host + "/api/v1/live");
    var opened = false;
    socket.onopen = function () {
      opened = true;
      backoffMs = 1000;
      setStatus("live", "Live");
      resync();
    };
    socket.onmessage = function (msg) {
      var ev;
      try { ev = JSON.parse(msg.data); } catch (e) { return; }
      onEvent(ev);
    };
    socket.onclose = function (e) {
      if (e.code === AUTH_ENDED) {
        location.assign("/login?next=/");
        return;
      }
      if (!opened) { checkSession(); }
      // jitter, so that many phones do not all reconnect in the same instant after a restart
      var wait = Math.min(MAX_BACKOFF_MS, backoffMs) * (0.75 + Math.random() * 0.5);
      backoffMs = Math.min(MAX_BACKOFF_MS, backoffMs * 2);
      setStatus("offline", (opened ? "Connection lost" : "Cannot connect") +
        "; retrying in " + Math.round(wait / 1000) + " s");
      retryTimer = setTimeout(function () { retryTimer = null; connect(); }, wait);
    };
  }

  document.addEventListener("visibilitychange", function () {
    // phones freeze background tabs: come back current, at once
    if (document.visibilityState === "visible" && retryTimer !== null) {
      clearTimeout(retryTimer);
      retryTimer = null;
      backoffMs = 1000;
      connect();
    }
  });

  connect();
}());
