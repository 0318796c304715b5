// Nearby BLE: adverts are not on the live feed, so the list is re-read every 5 s; a changed set of sensors
// or states reloads the page (unless a bindkey is being typed). SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  var S = window.Siteward;
  var table = document.getElementById("sensors");
  if (!S || !table) { return; }

  function signature(list) {
    return list.map(function (s) { return s.address + ":" + s.state + ":" + s.key_status; }).sort().join(",");
  }
  var shown = Array.prototype.map.call(table.tBodies[0].rows, function (tr) { return tr.dataset.address; });

  S.poll(function () {
    return S.api("GET", "/api/v1/ble/nearby").then(function (body) {
      var typing = document.activeElement && document.activeElement.tagName === "INPUT";
      var now = signature(body.sensors);
      var before = S.bleSignature || (S.bleSignature = now);
      var count = document.getElementById("sensor-count");
      if (count) { count.textContent = String(body.sensors.length); }
      var fresh = body.sensors.some(function (s) { return shown.indexOf(s.address) === -1; });
      if ((now !== before || fresh) && !typing) { location.reload(); }
    });
  }, 5000);
}());
