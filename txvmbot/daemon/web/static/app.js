// txvmbot's status page: live parts follow the daemon's event stream
// (server-sent events) and fetch their fresh HTML; no page reload, no framework.
(function () {
  "use strict";
  document.querySelectorAll("[data-live]").forEach(function (el) {
    var source = new EventSource(el.getAttribute("data-live"));
    var waiting = false;
    function refresh() {
      waiting = false;
      fetch(el.getAttribute("data-fragment"), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) { el.innerHTML = html; })
        .catch(function () {});
    }
    source.onmessage = function () {
      if (!waiting) { waiting = true; setTimeout(refresh, 150); }
    };
    source.addEventListener("end", function () { refresh(); source.close(); });
    var badge = document.getElementById("live");
    source.onopen = function () { if (badge) { badge.className = "live"; badge.textContent = "live"; } };
    source.onerror = function () { if (badge) { badge.className = "muted"; badge.textContent = "reconnecting"; } };
  });
})();
