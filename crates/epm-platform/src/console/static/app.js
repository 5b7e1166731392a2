// The EPM console's only script: progressive enhancement. Every page and
// form works without it; with it, the inbox and the counts update without
// a reload, the audit page can follow new records, relative times stay
// current, and the sign-in form reports the browser's time zone. Same
// origin only (the Content-Security-Policy allows nothing else).
"use strict";

(function () {
  document.documentElement.classList.add("js");

  function relative(seconds) {
    var delta = Math.round(Date.now() / 1000) - seconds;
    var future = delta < 0;
    var n = Math.abs(delta);
    var text;
    if (n < 45) return future ? "in a moment" : "just now";
    if (n < 3600) text = Math.ceil(n / 60) + " min";
    else if (n < 86400) text = Math.floor(n / 3600) + " h";
    else text = Math.floor(n / 86400) + " d";
    return future ? "in " + text : text + " ago";
  }

  function refreshTimes(root) {
    (root || document).querySelectorAll("[data-rel]").forEach(function (el) {
      el.textContent = relative(parseInt(el.getAttribute("data-rel"), 10));
    });
  }

  function fillTimeZone() {
    document.querySelectorAll('input[data-fill="time-zone"]').forEach(function (input) {
      try {
        input.value = Intl.DateTimeFormat().resolvedOptions().timeZone || "";
      } catch (e) {
        input.value = "";
      }
    });
  }

  function setCount(id, value) {
    var el = document.getElementById(id);
    if (el) el.textContent = value > 0 ? String(value) : "";
  }

  // Polls /console/live (marked as background, so polling does not keep an
// idle session alive); when the requests changed, reloads the inbox's
  // list in place and marks the new rows.
  function followInbox() {
    var inbox = document.getElementById("inbox");
    var navMine = document.getElementById("count-mine");
    if (!navMine) return;
    setCount("count-mine", parseInt(navMine.textContent, 10) || 0);
    setCount("count-others", parseInt((document.getElementById("count-others") || {}).textContent, 10) || 0);
    var busy = false;
    function tick() {
      if (busy || document.hidden) return;
      busy = true;
      fetch("/console/live", { credentials: "same-origin", headers: { Accept: "application/json", "X-EPM-Background": "1" } })
        .then(function (r) {
          if (r.status === 401) { signedOut(); return null; }
          return r.ok ? r.json() : null;
        })
        .then(function (live) {
          if (!live) return null;
          setCount("count-mine", live.mine);
          setCount("count-others", live.others);
          if (!inbox || live.stamp === inbox.getAttribute("data-stamp")) return null;
          var seen = {};
          inbox.querySelectorAll("tbody tr a[href]").forEach(function (a) { seen[a.getAttribute("href")] = true; });
          return fetch("/console/inbox?fragment=1", { credentials: "same-origin", headers: { "X-EPM-Background": "1" } })
            .then(function (r) { return r.ok ? r.text() : null; })
            .then(function (html) {
              if (html === null) return;
              var holder = document.createElement("div");
              holder.innerHTML = html;
              var fresh = holder.querySelector("#inbox");
              if (!fresh) return;
              fresh.querySelectorAll("tbody tr").forEach(function (row) {
                var link = row.querySelector("a[href]");
                if (link && !seen[link.getAttribute("href")]) row.classList.add("fresh");
              });
              inbox.replaceWith(fresh);
              inbox = fresh;
            });
        })
        .catch(function () {})
        .then(function () { busy = false; });
    }
    var timer = setInterval(tick, 3000);
    function signedOut() {
      clearInterval(timer);
      var main = document.getElementById("main");
      if (!main || document.getElementById("signed-out")) return;
      var note = document.createElement("p");
      note.id = "signed-out";
      note.className = "alert error";
      note.setAttribute("role", "alert");
      note.appendChild(document.createTextNode("Your session has ended. "));
      var link = document.createElement("a");
      link.href = "/console/sign-in";
      link.textContent = "Sign in again";
      note.appendChild(link);
      main.insertBefore(note, main.firstChild);
    }
  }

  // The audit page's live tail: new matching records are added on top.
  function followAudit() {
    var toggle = document.getElementById("live-tail");
    var rows = document.getElementById("audit-rows");
    if (!toggle || !rows) return;
    var timer = null;
    function tick() {
      var url = toggle.getAttribute("data-rows") + "&after=" + encodeURIComponent(toggle.getAttribute("data-after"));
      fetch(url, { credentials: "same-origin", headers: { "X-EPM-Background": "1" } })
        .then(function (r) {
          if (!r.ok) return null;
          var after = r.headers.get("x-epm-after");
          if (after) toggle.setAttribute("data-after", after);
          return r.text();
        })
        .then(function (html) {
          if (!html || !html.trim()) return;
          var body = document.createElement("tbody");
          body.innerHTML = html;
          var added = Array.prototype.slice.call(body.children);
          added.reverse().forEach(function (row) {
            row.classList.add("fresh");
            rows.insertBefore(row, rows.firstChild);
          });
          var empty = document.getElementById("audit-empty");
          if (empty) empty.remove();
        })
        .catch(function () {});
    }
    toggle.addEventListener("change", function () {
      if (toggle.checked) { tick(); timer = setInterval(tick, 2000); }
      else if (timer) { clearInterval(timer); timer = null; }
    });
  }

  // Copy fields: one click selects the secret shown once.
  function selectOnFocus() {
    document.querySelectorAll("input.copy").forEach(function (input) {
      input.addEventListener("focus", function () { input.select(); });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    fillTimeZone();
    refreshTimes();
    setInterval(refreshTimes, 30000);
    followInbox();
    followAudit();
    selectOnFocus();
  });
})();
