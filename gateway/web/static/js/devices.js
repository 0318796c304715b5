// Device list: filter as one types (the server filtered the first view from the same query string),
// keep rows current over the live feed, add devices that appear. SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var S = window.Siteward;
  var table = document.getElementById("devices");
  if (!S || !table) { return; }
  var tbody = table.tBodies[0];
  var form = document.getElementById("filters");
  var LIST_VALUES = 3;

  function rows() { return tbody.querySelectorAll("tr.device"); }

  function rowFor(id) {
    var all = rows();
    for (var i = 0; i < all.length; i++) { if (all[i].dataset.device === id) { return all[i]; } }
    return null;
  }

  function filterValues() {
    return {
      q: form.elements.q.value.trim().toLowerCase(),
      status: form.elements.status.value,
      kind: form.elements.kind.value,
      state: form.elements.state.value
    };
  }

  function matches(tr, f) {
    if (f.status && (tr.dataset.online === "true") !== (f.status === "online")) { return false; }
    if (f.kind && tr.dataset.kind !== f.kind) { return false; }
    if (f.state && tr.dataset.state !== f.state) { return false; }
    if (f.q) {
      var hay = tr.dataset.search || "";
      return f.q.split(/\s+/).every(function (w) { return hay.indexOf(w) !== -1; });
    }
    return true;
  }

  function applyFilter() {
    var f = filterValues();
    var all = rows();
    var shown = 0;
    for (var i = 0; i < all.length; i++) {
      var ok = matches(all[i], f);
      all[i].hidden = !ok;
      if (ok) { shown++; }
    }
    document.getElementById("shown-count").textContent = String(shown);
    document.getElementById("device-count").textContent = String(all.length);
    document.getElementById("no-devices").hidden = all.length > 0;
    document.getElementById("no-match").hidden = all.length === 0 || shown > 0;
    // keep the address bar in step, so the filtered list can be bookmarked or shared
    var params = new URLSearchParams();
    ["q", "status", "kind", "state"].forEach(function (k) { if (form.elements[k].value) { params.set(k, form.elements[k].value); } });
    var qs = params.toString();
    history.replaceState(null, "", "/devices" + (qs ? "?" + qs : ""));
  }

  form.addEventListener("input", applyFilter);
  form.addEventListener("change", applyFilter);
  form.addEventListener("submit", function (ev) { ev.preventDefault(); applyFilter(); });

  function cell(label) {
    var td = S.el("td");
    td.dataset.label = label;
    return td;
  }

  function makeRow(id) {
    var tr = S.el("tr", "device");
    tr.dataset.device = id;
    tr.dataset.online = "false";
    tr.dataset.kind = "node";
    tr.dataset.state = "discovered";
    tr.dataset.search = id.toLowerCase();
    var th = S.el("th");
    th.scope = "row";
    th.dataset.label = "Device";
    var a = S.el("a", "name", id);
    a.href = "/devices/" + encodeURIComponent(id);
    th.appendChild(a);
    var sub = S.el("span", "sub");
    var st = S.el("span", null, "discovered");
    st.dataset.role = "state";
    sub.appendChild(st);
    th.appendChild(sub);
    tr.appendChild(th);
    var status = cell("Status");
    var badge = S.el("span", "badge offline", "offline");
    badge.dataset.role = "status";
    status.appendChild(badge);
    tr.appendChild(status);
    var seen = cell("Last seen");
    seen.dataset.role = "seen";
    seen.appendChild(S.el("time", null, "never"));
    tr.appendChild(seen);
    var values = cell("Values");
    values.appendChild(S.el("dl", "values"));
    tr.appendChild(values);
    ["battery", "rssi"].forEach(function (m) {
      var td = cell(m === "rssi" ? "RSSI" : "Battery");
      td.dataset.metricCell = m;
      td.textContent = "—";
      tr.appendChild(td);
    });
    var fw = cell("Firmware");
    fw.dataset.role = "firmware";
    fw.textContent = "—";
    tr.appendChild(fw);
    tbody.appendChild(tr);
    applyFilter();
    return tr;
  }

  function setOnline(tr, online) {
    tr.dataset.online = online ? "true" : "false";
    var badge = tr.querySelector('[data-role="status"]');
    badge.textContent = online ? "online" : "offline";
    badge.className = "badge " + (online ? "online" : "offline");
  }

  function setValue(tr, metric, value, unit) {
    if (metric === "battery" || metric === "rssi") {
      tr.querySelector('[data-metric-cell="' + metric + '"]').textContent = S.formatValue(value) + " " + (unit || "");
      return;
    }
    var dl = tr.querySelector("dl.values");
    var row = dl.querySelector('div[data-metric="' + CSS.escape(metric) + '"]');
    if (!row) {
      if (dl.children.length >= LIST_VALUES) { return; }
      row = S.metricRow(metric);
      dl.appendChild(row);
    }
    S.showValue(row, value, unit);
  }

  function setSeen(tr, ts) {
    var t = tr.querySelector('[data-role="seen"] time');
    if (t && typeof ts === "number") { S.setTime(t, ts); }
  }

  function applyDevice(d) {
    var tr = rowFor(d.id) || makeRow(d.id);
    tr.querySelector("a.name").textContent = d.name || d.id;
    tr.dataset.state = d.state;
    tr.dataset.kind = d.kind === "ble" ? "ble" : "node";
    tr.dataset.search = [d.id, d.name || "", d.location || "", d.firmware || ""].join(" ").toLowerCase();
    tr.querySelector('[data-role="state"]').textContent = d.state;
    tr.querySelector('[data-role="firmware"]').textContent = d.firmware || "—";
    setOnline(tr, !!d.online);
    if (d.last_seen) { setSeen(tr, d.last_seen); }
    var latest = d.latest || {};
    Object.keys(latest).sort().forEach(function (m) { setValue(tr, m, latest[m].value, latest[m].unit); });
  }

  function resync() {
    S.api("GET", "/api/v1/devices").then(function (body) {
      var seen = {};
      body.devices.forEach(function (d) { seen[d.id] = true; applyDevice(d); });
      Array.prototype.forEach.call(rows(), function (tr) { if (!seen[tr.dataset.device]) { tr.remove(); } });
      applyFilter();
    }, function () { /* the socket's reconnect will try again */ });
  }

  S.live(function (ev) {
    if (ev.type === "reading") {
      var tr = rowFor(ev.device) || makeRow(ev.device);
      setValue(tr, ev.metric, ev.value, ev.unit);
      if (tr.dataset.online !== "true") { setOnline(tr, true); applyFilter(); }
      setSeen(tr, ev.ts);
    } else if (ev.type === "device") {
      var r = rowFor(ev.device) || makeRow(ev.device);
      if (typeof ev.online === "boolean") { setOnline(r, ev.online); }
      if (ev.state) { r.dataset.state = ev.state; r.querySelector('[data-role="state"]').textContent = ev.state; }
      applyFilter();
    } else if (ev.type === "event" && ev.device) {
      if (ev.kind === "device.removed") {
        var gone = rowFor(ev.device);
        if (gone) { gone.remove(); applyFilter(); }
      } else if (/^device\.(adopted|ignored|discovered)$/.test(ev.kind)) {
        var row = rowFor(ev.device);
        if (row) { var st = ev.kind.split(".")[1]; row.dataset.state = st; row.querySelector('[data-role="state"]').textContent = st; applyFilter(); }
      }
    }
  }, { resync: resync });
}());
