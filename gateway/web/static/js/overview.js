// Overview: re-read GET /api/v1/overview every 10 s (and at once when a device goes on- or offline on the
// live feed), writing each figure into the element marked data-o="path.to.field". SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var S = window.Siteward;
  if (!S || !document.getElementById("overview")) { return; }
  var SYNC_WORDS = { off: "not configured", down: "sync not running", disconnected: "disconnected", connected: "connected", unknown: "unknown" };

  function pick(obj, path) {
    return path.split(".").reduce(function (o, k) { return o == null ? undefined : o[k]; }, obj);
  }

  function show(el, v) {
    var f = el.dataset.format;
    var path = el.dataset.o;
    if (path === "sync.state") {
      el.textContent = SYNC_WORDS[v] || v;
      el.className = "state-" + v;
    } else if (f === "duration") { el.textContent = S.formatDuration(v); }
    else if (f === "bytes") { el.textContent = S.formatBytes(v); }
    else if (f === "clock") { el.textContent = v ? "synchronised" : "NOT synchronised"; }
    else if (f === "celsius") { el.textContent = v == null ? "not available" : v.toFixed(1) + " °C"; }
    else if (f === "number") { el.textContent = v == null ? "—" : S.formatValue(v); }
    else if (Array.isArray(v)) { el.textContent = v.join(", "); }
    else { el.textContent = v == null ? "—" : String(v); }
  }

  function refresh() {
    return S.api("GET", "/api/v1/overview").then(function (o) {
      Array.prototype.forEach.call(document.querySelectorAll("[data-o]"), function (el) { show(el, pick(o, el.dataset.o)); });
    });
  }

  S.poll(refresh, 10000);
  var timer = null;
  S.live(function (ev) {
    if (ev.type === "device" || (ev.type === "event" && /^(alert|device)\./.test(ev.kind))) {
      // a burst of transitions (a site power cut) makes one request, not hundreds
      clearTimeout(timer);
      timer = setTimeout(function () { refresh().catch(function () {}); }, 500);
    }
  }, { resync: function () { refresh().catch(function () {}); } });
}());
