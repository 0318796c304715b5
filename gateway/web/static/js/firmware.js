// Firmware: campaign form -> API body; a USB flash job is followed until it ends. SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var S = window.Siteward;
  if (!S) { return; }
  S.shapers.campaign = function (f) {
    return { firmware: f.firmware, target: { devices: f.devices }, canary: f.canary || 0, max_concurrent: f.max_concurrent || 5 };
  };
  var out = document.getElementById("flash-status");
  function follow(job) {
    S.api("GET", "/api/v1/ota/flash/" + encodeURIComponent(job)).then(function (j) {
      out.textContent = "Flash job " + job + ": " + (j.state || "") + (j.progress != null ? " " + Math.round(j.progress) + " %" : "") +
        (j.error ? " — " + j.error : "");
      if (!/^(done|failed|success|error)$/i.test(String(j.state))) { setTimeout(function () { follow(job); }, 1000); }
    }, function (err) { out.textContent = "Flash job " + job + ": " + err.message; });
  }
  document.addEventListener("siteward:done", function (ev) {
    if (ev.detail.done === "flash" && ev.detail.data && out) { follow(ev.detail.data.job); }
  });
  var timer = null;
  S.live(function (ev) {
    if (ev.type === "event" && /^ota\./.test(ev.kind) && !timer) {
      var busy = document.activeElement && /^(INPUT|SELECT)$/.test(document.activeElement.tagName);
      if (!busy) { timer = setTimeout(function () { location.reload(); }, 3000); }
    }
  });
}());
