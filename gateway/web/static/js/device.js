// Device page: live values and events over the live feed, the history chart (uPlot, served by the
// gateway from static/vendor/), commands followed until confirmed. SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var S = window.Siteward;
  var root = document.getElementById("device");
  if (!S || !root) { return; }
  var deviceId = root.dataset.device;
  var enc = encodeURIComponent(deviceId);
  var RANGES = { "1h": 3600, "24h": 86400, "7d": 7 * 86400 };

  // ---- live values ------------------------------------------------------------------------------------------
  var valuesEl = document.getElementById("values");

  function setValue(metric, value, unit) {
    var row = valuesEl.querySelector('div[data-metric="' + CSS.escape(metric) + '"]');
    if (!row) {
      var none = document.getElementById("no-values");
      if (none) { none.remove(); }
      row = S.metricRow(metric);
      var before = null;
      Array.prototype.some.call(valuesEl.children, function (c) {
        if (c.dataset.metric > metric) { before = c; return true; }
        return false;
      });
      valuesEl.insertBefore(row, before);
    }
    S.showValue(row, value, unit);
  }

  function setOnline(online) {
    var badge = document.querySelector('.meta [data-role="status"]');
    if (!badge) { return; }
    badge.textContent = online ? "online" : "offline";
    badge.className = "badge " + (online ? "online" : "offline");
  }

  function setSeen(ts) {
    var t = document.querySelector('.meta [data-role="seen"] time');
    if (t) { S.setTime(t, ts); }
  }

  // ---- events and commands ----------------------------------------------------------------------------------
  var eventsEl = document.getElementById("events");
  var commandsEl = document.getElementById("commands");
  var commandStatus = document.getElementById("command-status");
  var pending = {};

  function prependEvent(ev) {
    if (!eventsEl) { return; }
    var empty = eventsEl.querySelector(".empty");
    if (empty) { empty.remove(); }
    var li = S.el("li", "fresh");
    li.dataset.kind = ev.kind;
    var t = S.el("time");
    S.setTime(t, ev.ts);
    li.appendChild(t);
    li.appendChild(document.createTextNode(" "));
    li.appendChild(S.el("span", "kind", ev.kind));
    if (ev.data && Object.keys(ev.data).length) {
      li.appendChild(document.createTextNode(" "));
      li.appendChild(S.el("span", "muted small", JSON.stringify(ev.data)));
    }
    eventsEl.insertBefore(li, eventsEl.firstChild);
    while (eventsEl.children.length > 100) { eventsEl.removeChild(eventsEl.lastChild); }
  }

  function commandRow(cmd) {
    if (!commandsEl) { return null; }
    var li = commandsEl.querySelector('li[data-command="' + CSS.escape(cmd.id) + '"]');
    if (li) { return li; }
    var empty = commandsEl.querySelector(".empty");
    if (empty) { empty.remove(); }
    li = S.el("li", "fresh");
    li.dataset.command = cmd.id;
    var t = S.el("time");
    S.setTime(t, cmd.created_at || Date.now() / 1000);
    li.appendChild(t);
    li.appendChild(document.createTextNode(" "));
    li.appendChild(S.el("span", "kind", cmd.command || ""));
    li.appendChild(document.createTextNode(" "));
    li.appendChild(S.el("span", "muted small", JSON.stringify(cmd.args || {})));
    li.appendChild(document.createTextNode(" "));
    var badge = S.el("span", "badge cmd-sent", "sent");
    badge.dataset.role = "cmd-state";
    li.appendChild(badge);
    commandsEl.insertBefore(li, commandsEl.firstChild);
    return li;
  }

  function setCommandState(id, state, result) {
    var li = commandsEl && commandsEl.querySelector('li[data-command="' + CSS.escape(id) + '"]');
    if (li) {
      var badge = li.querySelector('[data-role="cmd-state"]');
      badge.textContent = state;
      badge.className = "badge cmd-" + state;
    }
    if (pending[id] && commandStatus) {
      var words = { confirmed: "confirmed by the device", timed_out: "NOT confirmed: the device did not answer in time",
                    failed: "FAILED" + (result && result.error ? ": " + result.error : "") };
      commandStatus.textContent = "Command " + pending[id] + " " + (words[state] || state) + ".";
      commandStatus.dataset.state = state;
      if (state !== "sent") { delete pending[id]; }
    }
  }

  function refreshDevice() {
    S.api("GET", "/api/v1/devices/" + enc).then(function (d) {
      var relay = document.getElementById("relay-state");
      var status = d.attributes && d.attributes.status;
      if (relay && status && status.relay !== undefined) {
        relay.textContent = String(status.relay);
        relay.dataset.state = String(status.relay);
      }
      setOnline(!!d.online);
      if (d.last_seen) { setSeen(d.last_seen); }
      var latest = d.latest || {};
      Object.keys(latest).forEach(function (m) {
        var row = valuesEl.querySelector('div[data-metric="' + CSS.escape(m) + '"]');
        if (!row || row.querySelector(".v").textContent !== S.formatValue(latest[m].value)) {
          setValue(m, latest[m].value, latest[m].unit);
        }
      });
    }, function () { /* next event or reconnect tries again */ });
  }

  document.addEventListener("siteward:done", function (ev) {
    if (ev.detail.done !== "command" || !ev.detail.data) { return; }
    var cmd = ev.detail.data;
    pending[cmd.id] = cmd.command;
    commandRow(cmd);
    if (commandStatus) {
      commandStatus.dataset.state = "sent";
      commandStatus.textContent = "Command " + cmd.command + " sent; waiting for the device to confirm…";
    }
    // the confirmation may have come over the feed before this answer: ask once
    S.api("GET", "/api/v1/commands/" + encodeURIComponent(cmd.id)).then(function (c) {
      if (c.state !== "sent") { setCommandState(c.id, c.state, c.result); refreshDevice(); }
    }, function () {});
  });

  // ---- the chart ----------------------------------------------------------------------------------------------
  var chartEl = document.getElementById("chart");
  var chartStatus = document.getElementById("chart-status");
  var controls = document.getElementById("chart-controls");
  var plot = null;
  var view = { metric: root.dataset.metric, range: root.dataset.range || "24h", since: null, until: null, live: true };
  var loadSeq = 0;
  var unit = "";
  var controller = null;
  var shown = { since: 0, until: 1 };

  function cssVar(name, fallback) {
    var v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
    return v || fallback;
  }

  function chartSize() {
    var w = Math.max(280, chartEl.clientWidth);
    return { width: w, height: w < 600 ? 240 : 320 };
  }

  // breaks in the data (device offline) are drawn as breaks, not as straight lines across
  function withGaps(s) {
    var n = s.t.length;
    var out = [[], [], [], []];
    if (!n) { return out; }
    var steps = [];
    for (var i = 1; i < n; i++) { steps.push(s.t[i] - s.t[i - 1]); }
    steps.sort(function (a, b) { return a - b; });
    var median = steps.length ? steps[Math.floor(steps.length / 2)] : s.bucket_s;
    var gap = Math.max(3 * median, 2 * s.bucket_s);
    for (var j = 0; j < n; j++) {
      if (j > 0 && s.t[j] - s.t[j - 1] > gap) {
        out[0].push((s.t[j] + s.t[j - 1]) / 2); out[1].push(null); out[2].push(null); out[3].push(null);
      }
      out[0].push(s.t[j]); out[1].push(s.min[j]); out[2].push(s.avg[j]); out[3].push(s.max[j]);
    }
    return out;
  }

  function describe(s) {
    if (!s.t.length) { return "No readings in this range."; }
    var lo = Math.min.apply(null, s.min), hi = Math.max.apply(null, s.max);
    var text = s.readings + " readings";
    if (s.readings > s.t.length) { text += ", drawn as " + s.t.length + " points (min/avg/max per " + S.formatDuration(s.bucket_s) + ")"; }
    return text + "; lowest " + S.formatValue(lo) + " " + s.unit + ", highest " + S.formatValue(hi) + " " + s.unit + ".";
  }

  function makePlot(data) {
    var accent = cssVar("--accent", "#0b5cad");
    var fg = cssVar("--fg", "#17202a");
    var line = cssVar("--line", "#c9ced6");
    var size = chartSize();
    var axis = { stroke: fg, grid: { stroke: line, width: 1 }, ticks: { stroke: line } };
    var opts = {
      width: size.width,
      height: size.height,
      // the axis shows the range that was asked for, even where there is no data (yet)
      scales: { x: { time: true, range: function () { return [shown.since, shown.until]; } } },
      series: [
        {},
        { label: "min", stroke: accent, width: 1, alpha: 0.5, value: function (u, v) { return v == null ? "—" : S.formatValue(v); } },
        { label: view.metric + (unit ? " (" + unit + ")" : ""), stroke: accent, width: 2,
          value: function (u, v) { return v == null ? "—" : S.formatValue(v); } },
        { label: "max", stroke: accent, width: 1, alpha: 0.5, value: function (u, v) { return v == null ? "—" : S.formatValue(v); } }
      ],
      // the band between min and max shows every spike a bucket's average would hide
      bands: [{ series: [3, 1], fill: accent + "33" }],
      axes: [axis, Object.assign({ size: 56 }, axis)],
      legend: { live: true },
      hooks: {
        draw: [function (u) {
          chartEl.dataset.state = u.data[0].length ? "drawn" : "empty";
          chartEl.dataset.points = String(u.data[0].length);
          performance.mark("chart-drawn");
        }]
      }
    };
    plot = new window.uPlot(opts, data, chartEl);
  }

  function span() {
    if (view.range === "custom") { return { since: view.since, until: view.until }; }
    var now = Date.now() / 1000;
    return { since: now - RANGES[view.range], until: now };
  }

  function load() {
    if (!chartEl || !view.metric) { return; }
    if (!window.uPlot) {
      chartStatus.textContent = "The chart library is missing (run scripts/frontend.sh on the gateway).";
      return;
    }
    var seq = ++loadSeq;
    var r = span();
    var points = Math.min(2000, Math.max(100, Math.round(chartSize().width)));
    var url = "/api/v1/devices/" + enc + "/series?metric=" + encodeURIComponent(view.metric) +
      "&since=" + r.since.toFixed(3) + "&until=" + r.until.toFixed(3) + "&points=" + points;
    if (controller) { controller.abort(); }
    controller = typeof AbortController === "function" ? new AbortController() : null;
    chartEl.dataset.state = "loading";
    chartEl.setAttribute("aria-busy", "true");
    chartStatus.textContent = "Loading…";
    performance.clearMarks("chart-request");
    performance.clearMarks("chart-drawn");
    performance.mark("chart-request");
    S.api("GET", url, undefined, { signal: controller ? controller.signal : undefined }).then(function (s) {
      if (seq !== loadSeq) { return; }
      unit = s.unit;
      shown = { since: s.since, until: s.until };
      var data = withGaps(s);
      if (plot) { plot.destroy(); plot = null; }
      makePlot(data);
      chartEl.removeAttribute("aria-busy");
      chartEl.dataset.url = url;
      chartEl.setAttribute("aria-label", "Chart of " + view.metric + ": " + describe(s));
      chartStatus.textContent = describe(s);
      view.live = view.range !== "custom";
    }, function (err) {
      if (seq !== loadSeq || (err && err.name === "AbortError")) { return; }
      chartEl.dataset.state = "error";
      chartEl.removeAttribute("aria-busy");
      chartStatus.textContent = "Could not load the history: " + (err.message || "network error");
    });
  }

  function appendLive(ev) {
    if (!plot || !view.live || ev.metric !== view.metric) { return; }
    var d = plot.data;
    var t = d[0];
    if (t.length && ev.ts <= t[t.length - 1]) { return; }
    var next = [t.concat([ev.ts]), d[1].concat([ev.value]), d[2].concat([ev.value]), d[3].concat([ev.value])];
    // a sliding window: what scrolled out of the range leaves the chart
    var from = Date.now() / 1000 - RANGES[view.range];
    var cut = 0;
    while (cut < next[0].length && next[0][cut] < from) { cut++; }
    if (cut) { next = next.map(function (col) { return col.slice(cut); }); }
    shown = { since: from, until: Math.max(ev.ts, Date.now() / 1000) };
    plot.setData(next);
  }

  function pressRange(range) {
    Array.prototype.forEach.call(controls.querySelectorAll("button.range"), function (b) {
      var on = (b.value || "custom") === range || (range === "custom" && b.id === "range-custom");
      b.classList.toggle("active", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
  }

  function remember() {
    var p = new URLSearchParams();
    p.set("metric", view.metric);
    p.set("range", view.range);
    if (view.range === "custom") {
      p.set("since", document.getElementById("since").value);
      p.set("until", document.getElementById("until").value);
    }
    history.replaceState(null, "", location.pathname + "?" + p.toString());
  }

  function localInput(ts) {
    var d = new Date(ts * 1000 - new Date(ts * 1000).getTimezoneOffset() * 60000);
    return d.toISOString().slice(0, 16);
  }

  if (controls && chartEl) {
    controls.addEventListener("submit", function (ev) { ev.preventDefault(); });
    controls.addEventListener("click", function (ev) {
      var b = ev.target.closest("button.range");
      if (!b) { return; }
      ev.preventDefault();
      if (b.id === "range-custom") {
        var box = document.getElementById("custom-range");
        box.hidden = false;
        var r = span();
        if (!document.getElementById("since").value) { document.getElementById("since").value = localInput(r.since); }
        if (!document.getElementById("until").value) { document.getElementById("until").value = localInput(r.until); }
        document.getElementById("since").focus();
        return;
      }
      document.getElementById("custom-range").hidden = true;
      view.range = b.value;
      pressRange(view.range);
      remember();
      load();
    });
    document.getElementById("apply-range").addEventListener("click", function () {
      var since = new Date(document.getElementById("since").value).getTime() / 1000;
      var until = new Date(document.getElementById("until").value).getTime() / 1000;
      if (!isFinite(since) || !isFinite(until) || since >= until) {
        chartStatus.textContent = "Choose a start before the end.";
        return;
      }
      view.range = "custom";
      view.since = since;
      view.until = until;
      pressRange("custom");
      remember();
      load();
    });
    document.getElementById("metric").addEventListener("change", function (ev) {
      view.metric = ev.target.value;
      remember();
      load();
    });
    var resizeTimer = null;
    window.addEventListener("resize", function () {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(function () { if (plot) { plot.setSize(chartSize()); } }, 150);
    });
    if (view.range === "custom") {
      var s0 = new Date(root.dataset.since).getTime() / 1000, u0 = new Date(root.dataset.until).getTime() / 1000;
      if (isFinite(s0) && isFinite(u0) && s0 < u0) { view.since = s0; view.until = u0; } else { view.range = "24h"; pressRange("24h"); }
    }
    load();
  }

  // ---- the live feed --------------------------------------------------------------------------------------------
  S.live(function (ev) {
    if (ev.device !== deviceId) { return; }
    if (ev.type === "reading") {
      setValue(ev.metric, ev.value, ev.unit);
      setOnline(true);
      setSeen(ev.ts);
      appendLive(ev);
    } else if (ev.type === "device") {
      if (typeof ev.online === "boolean") { setOnline(ev.online); }
    } else if (ev.type === "event") {
      prependEvent(ev);
      if (ev.kind === "device.removed") { S.toast("This device was removed.", true); }
      if (/^command\./.test(ev.kind) && ev.data && ev.data.id) {
        var state = ev.kind.split(".")[1];
        if (state === "sent") {
          // sent from another page, a script or the cloud: listed here too
          commandRow({ id: ev.data.id, command: ev.data.command, args: ev.data.args, created_at: ev.ts });
        } else {
          setCommandState(ev.data.id, state, ev.data.result);
          refreshDevice();
        }
      }
    }
  }, { device: deviceId, resync: refreshDevice });
}());
