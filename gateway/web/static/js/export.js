// Export: the time pickers are in the browser's local time; the API takes unix seconds. The multi-selects
// become the comma-separated lists the API reads. SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var form = document.getElementById("export-form");
  if (!form) { return; }
  function localInput(ts) {
    var d = new Date(ts * 1000 - new Date(ts * 1000).getTimezoneOffset() * 60000);
    return d.toISOString().slice(0, 16);
  }
  var now = Date.now() / 1000;
  document.getElementById("x-since").value = localInput(now - 86400);
  document.getElementById("x-until").value = localInput(now);
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var status = form.querySelector(".form-status");
    var since = new Date(document.getElementById("x-since").value).getTime() / 1000;
    var until = new Date(document.getElementById("x-until").value).getTime() / 1000;
    if (!isFinite(since) || !isFinite(until) || since > until) {
      status.textContent = "Choose a start before the end.";
      return;
    }
    status.textContent = "";
    var p = new URLSearchParams();
    ["x-devices", "x-metrics"].forEach(function (id) {
      var sel = document.getElementById(id);
      var chosen = Array.prototype.filter.call(sel.options, function (o) { return o.selected; }).map(function (o) { return o.value; });
      if (chosen.length) { p.set(sel.name, chosen.join(",")); }
    });
    p.set("since", since.toFixed(0));
    p.set("until", until.toFixed(0));
    // a plain navigation: the browser streams the download to disk, nothing is held in the page
    location.assign(form.action + "?" + p.toString());
  });
}());
