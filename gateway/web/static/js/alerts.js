// Alerts: the threshold-rule form becomes the rule body the API wants; the page follows alert events on the
// live feed by reloading (at most every 3 s). SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var S = window.Siteward;
  if (!S) { return; }
  S.shapers.threshold = function (f) {
    var rule = { id: f.id, kind: "threshold", target: { device: f.device }, metric: f.metric, severity: f.severity };
    if (f.above !== undefined) { rule.above = f.above; }
    if (f.below !== undefined) { rule.below = f.below; }
    if (f.for_s !== undefined) { rule.for_s = f.for_s; }
    return rule;
  };
  var timer = null;
  S.live(function (ev) {
    if (ev.type === "event" && /^alert\./.test(ev.kind) && !timer) {
      var busy = document.activeElement && /^(INPUT|SELECT)$/.test(document.activeElement.tagName);
      if (!busy) { timer = setTimeout(function () { location.reload(); }, 3000); }
    }
  });
}());
