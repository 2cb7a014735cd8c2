// Keeps "3 min ago" texts current between page loads; the absolute time stays in `datetime`.
(function () {
  "use strict";
  function span(s) {
    if (s < 1) return Math.round(s * 1000) + " ms";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.round(s / 60) + " min";
    if (s < 172800) return (s / 3600).toFixed(1) + " h";
    return Math.round(s / 86400) + " d";
  }
  function refresh() {
    var now = Date.now();
    document.querySelectorAll("time[data-ago]").forEach(function (el) {
      var s = (now - Date.parse(el.getAttribute("datetime"))) / 1000;
      // further than a year away the server wrote the date (api/ui.py, ago): keep it
      if (isNaN(s) || Math.abs(s) >= 31536000) return;
      el.textContent = Math.abs(s) < 1 ? "just now" : s > 0 ? span(s) + " ago" : "in " + span(-s);
    });
  }
  setInterval(refresh, 15000);
})();
