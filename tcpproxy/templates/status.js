(function () {
  var REFRESH_MS = {{ refresh_ms }}, received = Date.now(), refreshes = 0;
  function fmtSpan(s) {
    s = Math.max(0, Math.floor(s));
    function two(n) { return (n < 10 ? "0" : "") + n; }
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + two(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + two(Math.floor(s % 3600 / 60)) + "m";
    return Math.floor(s / 86400) + "d " + two(Math.floor(s % 86400 / 3600)) + "h";
  }
  function tick() {
    var spent = (Date.now() - received) / 1000;
    document.querySelectorAll("[data-left]").forEach(function (el) {
      el.textContent = fmtSpan(parseFloat(el.getAttribute("data-left")) - spent) + " left";
    });
  }
  function refresh() {
    fetch(location.pathname, { cache: "no-store" }).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.text();
    }).then(function (text) {
      var fresh = new DOMParser().parseFromString(text, "text/html").querySelector("main");
      if (!fresh) throw new Error("no <main> in the answer");
      document.querySelector("main").replaceWith(fresh);
      received = Date.now();
      refreshes += 1;
      document.body.setAttribute("data-refreshes", String(refreshes));
      document.body.classList.remove("is-stale");
    }).catch(function (err) {
      document.getElementById("stale-why").textContent = String(err);
      document.body.classList.add("is-stale");
    }).then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  setInterval(tick, 1000);
  setTimeout(refresh, REFRESH_MS);
})();
