// Siteward UI: what every page shares. Plain JavaScript, no build step, nothing from another host.
// Text from the network is always set with textContent, never innerHTML.
//
//  - Siteward.api(method, path, body): JSON API call with the session's CSRF token.
//  - Declarative actions: <button data-api="POST /path" data-body='{...}' data-confirm="..."
//    data-done="reload|none|/path|<name>"> and <form data-api="PATCH /path" ...> (fields become a JSON
//    object; data-type="number|json" on a field, checkboxes are booleans). A confirmation, when asked for,
//    uses the page's <dialog>; errors are shown next to the form and read out (role="alert").
//  - Siteward.live(onEvent, options): the live feed over a WebSocket, reconnecting with back-off and
//    jitter, asking the page to re-read values after a reconnect or a gap.
//  - <time data-ts> elements re-rendered in the browser's time zone.
// SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";

  document.documentElement.classList.add("js");
  var meta = document.querySelector('meta[name="csrf-token"]');
  var CSRF = meta ? meta.getAttribute("content") : "";
  var AUTH_ENDED = 4401;

  function loginAgain() {
    location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
  }

  // the same rule as the server (render.format_value): at most 3 decimals, no trailing zeros
  function formatValue(v) {
    if (typeof v !== "number" || !isFinite(v)) { return String(v); }
    var text = (Math.round(v * 1000) / 1000).toFixed(3).replace(/0+$/, "").replace(/\.$/, "");
    return text === "-0" || text === "" ? "0" : text;
  }

  function formatTime(ts) {
    var d = new Date(ts * 1000);
    var recent = Math.abs(Date.now() - d.getTime()) < 86400000;
    return recent ? d.toLocaleTimeString() : d.toLocaleString();
  }

  function formatDuration(s) {
    if (typeof s !== "number") { return "—"; }
    s = Math.max(0, Math.floor(s));
    if (s < 120) { return s + " s"; }
    if (s < 7200) { return Math.floor(s / 60) + " min"; }
    if (s < 172800) { return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min"; }
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }

  function formatBytes(n) {
    if (typeof n !== "number") { return "—"; }
    var units = ["B", "kB", "MB", "GB", "TB"];
    var i = 0;
    while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
    return i === 0 ? n.toFixed(0) + " B" : n.toFixed(1) + " " + units[i];
  }

  function setTime(el, ts) {
    el.dataset.ts = String(ts);
    el.dateTime = new Date(ts * 1000).toISOString();
    el.textContent = formatTime(ts);
  }

  function localiseTimes(root) {
    var times = (root || document).querySelectorAll("time[data-ts]");
    for (var i = 0; i < times.length; i++) { setTime(times[i], parseFloat(times[i].dataset.ts)); }
  }

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined && text !== null) { node.textContent = text; }
    return node;
  }

  // A live value in a <dl> of values (device list, device page): <div data-metric><dt>metric</dt>
  // <dd><span class="v"></span> <span class="u"></span></dd></div>. metricRow makes a new one; showValue
  // fills one in and restarts its highlight.
  function metricRow(metric) {
    var row = el("div");
    row.dataset.metric = metric;
    row.appendChild(el("dt", null, metric));
    var dd = el("dd");
    dd.appendChild(el("span", "v"));
    dd.appendChild(document.createTextNode(" "));
    dd.appendChild(el("span", "u"));
    row.appendChild(dd);
    return row;
  }

  function showValue(row, value, unit) {
    row.querySelector(".v").textContent = formatValue(value);
    row.querySelector(".u").textContent = unit || "";
    row.classList.remove("fresh");
    void row.offsetWidth; // restart the highlight
    row.classList.add("fresh");
  }

  var toastTimer = null;
  function toast(text, isError) {
    var t = document.getElementById("toast");
    if (!t) { return; }
    t.textContent = text;
    t.className = "toast" + (isError ? " error" : "");
    clearTimeout(toastTimer);
    toastTimer = setTimeout(function () { t.textContent = ""; }, isError ? 8000 : 4000);
  }

  function ApiError(status, body) {
    this.status = status;
    this.body = body || {};
    var detail = this.body.detail;
    if (Array.isArray(detail)) {
      detail = detail.map(function (d) { return (d.field ? d.field + ": " : "") + d.problem; }).join("; ");
    }
    this.message = status === 403 && this.body.error === "forbidden"
      ? "Not allowed for your role."
      : (detail || this.body.error || ("HTTP " + status));
  }

  function api(method, path, body, opts) {
    var headers = { "Accept": "application/json", "X-CSRF-Token": CSRF };
    var init = { method: method, headers: headers, credentials: "same-origin" };
    if (body instanceof FormData) {
      init.body = body;
    } else if (body !== undefined && body !== null) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (opts && opts.signal) { init.signal = opts.signal; }
    return fetch(path, init).then(function (r) {
      if (r.status === 401) { loginAgain(); throw new ApiError(401, { error: "unauthorised" }); }
      if (r.status === 204) { return null; }
      return r.text().then(function (text) {
        var data = null;
        try { data = text ? JSON.parse(text) : null; } catch (e) { data = { error: text }; }
        if (!r.ok) { throw new ApiError(r.status, data); }
        return data;
      });
    });
  }

  // ---- confirmation dialog ----------------------------------------------------------------------------------
  function confirmAction(text) {
    var dialog = document.getElementById("confirm");
    if (!text) { return Promise.resolve(true); }
    if (!dialog || typeof dialog.showModal !== "function") { return Promise.resolve(window.confirm(text)); }
    document.getElementById("confirm-text").textContent = text;
    return new Promise(function (resolve) {
      dialog.addEventListener("close", function onClose() {
        dialog.removeEventListener("close", onClose);
        resolve(dialog.returnValue === "ok");
      });
      dialog.returnValue = "";
      dialog.showModal();
      document.getElementById("confirm-ok").focus();
    });
  }

  // ---- declarative actions ------------------------------------------------------------------------------------
  var shapers = {};

  function formBody(form) {
    if (form.dataset.multipart === "true") { return new FormData(form); }
    var out = {};
    var fields = form.querySelectorAll("input[name], select[name], textarea[name]");
    for (var i = 0; i < fields.length; i++) {
      var f = fields[i];
      if (f.disabled) { continue; }
      if (f.type === "checkbox") { out[f.name] = f.checked; continue; }
      if (f.multiple) {
        out[f.name] = Array.prototype.filter.call(f.options, function (o) { return o.selected; })
          .map(function (o) { return o.value; });
        continue;
      }
      var v = f.value;
      if (f.dataset.type === "number") {
        if (v.trim() === "") { continue; }
        v = Number(v);
      } else if (f.dataset.type === "json") {
        try { v = JSON.parse(v || "null"); } catch (e) { throw new Error(f.name + ": not valid JSON"); }
      }
      out[f.name] = v;
    }
    var shape = form.dataset.shape;
    return shape && shapers[shape] ? shapers[shape](out) : out;
  }

  function statusOf(node) {
    var scope = node.tagName === "FORM" ? node : node.closest("td, section, .panel, form") || document.body;
    return scope.querySelector(".form-status");
  }

  function finish(node, data) {
    var done = node.dataset.done || "reload";
    var success = node.dataset.success;
    if (success) { toast(success); }
    if (node.tagName === "FORM" && node.dataset.reset === "true") { node.reset(); }
    if (done === "reload") { location.reload(); return; }
    if (done === "none") { return; }
    if (done.charAt(0) === "/") { location.assign(done); return; }
    node.dispatchEvent(new CustomEvent("siteward:done", { bubbles: true, detail: { done: done, data: data } }));
  }

  function run(node) {
    var spec = node.dataset.api.split(" ");
    var method = spec[0];
    var path = spec.slice(1).join(" ");
    var status = statusOf(node);
    var body;
    try {
      body = node.tagName === "FORM" ? formBody(node) : (node.dataset.body ? JSON.parse(node.dataset.body) : undefined);
    } catch (e) {
      if (status) { status.className = "form-status"; status.textContent = e.message; }
      return;
    }
    confirmAction(node.dataset.confirm).then(function (ok) {
      if (!ok) { return; }
      var buttons = node.tagName === "FORM" ? node.querySelectorAll("button") : [node];
      Array.prototype.forEach.call(buttons, function (b) { b.disabled = true; });
      if (status) { status.textContent = ""; }
      api(method, path, body).then(function (data) {
        Array.prototype.forEach.call(buttons, function (b) { b.disabled = false; });
        if (status && !node.dataset.success) { status.className = "form-status ok"; status.textContent = "Done."; }
        finish(node, data);
      }, function (err) {
        Array.prototype.forEach.call(buttons, function (b) { b.disabled = false; });
        var text = err && err.message ? err.message : "The gateway could not be reached.";
        if (status) { status.className = "form-status"; status.textContent = text; }
        toast(text, true);
      });
    });
  }

  document.addEventListener("click", function (ev) {
    var b = ev.target.closest("button[data-api]");
    if (b) { ev.preventDefault(); run(b); }
  });
  document.addEventListener("submit", function (ev) {
    var form = ev.target.closest("form[data-api]");
    if (form) { ev.preventDefault(); run(form); }
  });
  document.addEventListener("change", function (ev) {
    var form = ev.target.closest("form[data-autosubmit]");
    if (form) { run(form); }
  });

  // ---- the live feed ------------------------------------------------------------------------------------------
  // onEvent(ev) gets every frame; options.resync() runs after (re)connecting and after a gap, so the page
  // re-reads current values instead of showing stale ones as live; options.device follows one device.
  function live(onEvent, options) {
    options = options || {};
    var statusEl = document.getElementById("live-status");
    var backoff = 1000;
    var MAX_BACKOFF = 30000;
    var retry = null;
    var socket = null;

    function setStatus(state, text) {
      if (!statusEl) { return; }
      statusEl.dataset.state = state;
      statusEl.textContent = text;
    }

    function checkSession() {
      fetch("/api/v1/me", { credentials: "same-origin", headers: { "Accept": "application/json" } })
        .then(function (r) { if (r.status === 401) { loginAgain(); } })
        .catch(function () { /* gateway unreachable: keep retrying */ });
    }

    function connect() {
      var scheme = location.protocol === "https:" ? "wss://" : "ws://";
      var url = scheme + location.host + "/api/v1/live" + (options.device ? "?device=" + encodeURIComponent(options.device) : "");
      setStatus("connecting", "Connecting…");
      socket = new WebSocket(url);
      var opened = false;
      socket.onopen = function () {
        opened = true;
        backoff = 1000;
        setStatus("live", "Live");
        if (options.resync) { options.resync(); }
      };
      socket.onmessage = function (msg) {
        var ev;
        try { ev = JSON.parse(msg.data); } catch (e) { return; }
        if (ev.type === "gap" && options.resync) { options.resync(); return; }
        onEvent(ev);
      };
      socket.onclose = function (e) {
        if (e.code === AUTH_ENDED) { loginAgain(); return; }
        // a refused handshake looks like any network error: ask whether the session still holds
        if (!opened) { checkSession(); }
        // jitter, so that many phones do not all reconnect in the same instant after a restart
        var wait = Math.min(MAX_BACKOFF, backoff) * (0.75 + Math.random() * 0.5);
        backoff = Math.min(MAX_BACKOFF, backoff * 2);
        setStatus("offline", (opened ? "Connection lost" : "Cannot connect") + "; retrying in " + Math.round(wait / 1000) + " s");
        retry = setTimeout(function () { retry = null; connect(); }, wait);
      };
    }

    document.addEventListener("visibilitychange", function () {
      // phones freeze background tabs: come back current, at once
      if (document.visibilityState === "visible" && retry !== null) {
        clearTimeout(retry);
        retry = null;
        backoff = 1000;
        connect();
      }
    });
    connect();
    return { close: function () { if (socket) { socket.close(); } } };
  }

  // a page without a socket refreshes itself now and then (BLE adverts and alerts are not on the feed)
  function poll(fn, everyMs) {
    var statusEl = document.getElementById("live-status");
    function tick() {
      if (document.visibilityState !== "visible") { return; }
      fn().then(function () {
        if (statusEl) { statusEl.dataset.state = "live"; statusEl.textContent = "Updated " + new Date().toLocaleTimeString(); }
      }, function () {
        if (statusEl) { statusEl.dataset.state = "offline"; statusEl.textContent = "Cannot reach the gateway; retrying"; }
      });
    }
    setInterval(tick, everyMs);
    document.addEventListener("visibilitychange", tick);
  }

  localiseTimes(document);

  window.Siteward = {
    api: api,
    live: live,
    poll: poll,
    toast: toast,
    el: el,
    metricRow: metricRow,
    showValue: showValue,
    confirm: confirmAction,
    shapers: shapers,
    formatValue: formatValue,
    formatTime: formatTime,
    formatDuration: formatDuration,
    formatBytes: formatBytes,
    setTime: setTime,
    localiseTimes: localiseTimes
  };
}());
