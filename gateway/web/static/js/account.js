// Account: show a newly created API token once. SPDX-License-Identifier: Apache-2.0
(function () {
  "use strict";
  document.addEventListener("siteward:done", function (ev) {
    if (ev.detail.done !== "token" || !ev.detail.data) { return; }
    var box = document.getElementById("new-token");
    var input = document.getElementById("token-value");
    input.value = ev.detail.data.token;
    box.hidden = false;
    input.focus();
    input.select();
  });
}());
