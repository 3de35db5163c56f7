// Keeps vmpool's status page live: every two seconds the part under the header is fetched
// again from /ui/live (same origin, the same filter) and swapped in when it changed. The
// server escapes every string it puts in that HTML. Without this script the page is a
// snapshot.
"use strict";
(function () {
  const main = document.getElementById("status");
  const live = document.getElementById("live");
  if (!main || !live || !window.fetch) return;
  const period = 2000;
  let failures = 0;
  let shown = null;
  // The page's times are UTC, as the server writes them.
  function utc() { return new Date().toISOString().slice(11, 19) + " UTC"; }
  async function refresh() {
    // A tab in the background asks nothing; it catches up when shown again.
    if (document.hidden) { setTimeout(refresh, period); return; }
    try {
      const response = await fetch(main.dataset.live, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) { window.location.reload(); return; }
      if (!response.ok) throw new Error(String(response.status));
      const html = await response.text();
      // Not while the operator is choosing in the filter form: that would undo the choice.
      const choosing = document.activeElement && document.activeElement.form && main.contains(document.activeElement);
      if (html !== shown && !choosing) {
        main.innerHTML = html;
        shown = html;
      }
      failures = 0;
      live.className = "live";
      live.textContent = "live · " + utc();
    } catch (error) {
      failures += 1;
      live.className = "stale";
      live.textContent = "not updating (" + failures + " failed) · " + utc();
    }
    setTimeout(refresh, period);
  }
  setTimeout(refresh, period);
})();
