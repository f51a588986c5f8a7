"""The page's own stylesheet and script, written to ``DIR/assets/`` next to plotly.min.js (kept as
text in the package: package data would need build configuration for two small files).

report.js: draws each figure from its JSON block (one at a time, so the page stays responsive while
a big sweep draws), makes ``table.sortable`` tables sortable by a click on a column head, and wires
the media steppers (a range slider showing one frame at a time). It sets ``data-rendered`` on
``<body>`` when every figure is drawn (the browser test waits for it).
"""

CSS = """
:root { --fg: #1d2330; --muted: #5f6b7a; --line: #dde2ea; --warn: #b54708; --warn-bg: #fff4e5;
        --info: #175cd3; --info-bg: #eff8ff; --accent: #3b5bdb; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: #f6f7f9; }
header { background: #1d2330; color: white; padding: 14px 24px; }
header h1 { margin: 0 0 4px; font-size: 20px; }
header p { margin: 0; color: #c9d1dd; font-size: 13px; }
nav { position: sticky; top: 0; z-index: 10; background: white; border-bottom: 1px solid var(--line);
      padding: 6px 24px; font-size: 13px; }
nav a { margin-right: 12px; color: var(--accent); text-decoration: none; white-space: nowrap; }
main { padding: 12px 24px 48px; max-width: 1600px; margin: 0 auto; }
section { background: white; border: 1px solid var(--line); border-radius: 6px; padding: 12px 16px;
          margin: 14px 0; scroll-margin-top: 44px; }
section h2 { margin: 0 0 6px; font-size: 17px; }
section h3 { margin: 14px 0 6px; font-size: 14px; }
.look-for { color: var(--muted); margin: 0 0 8px; }
.note { color: var(--muted); font-size: 12.5px; }
.figure { width: 100%; min-height: 200px; }
.png-link { font-size: 12px; }
table { border-collapse: collapse; font-size: 12.5px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f0f2f6; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-order="asc"]::after { content: " \\25B2"; }
table.sortable th[data-order="desc"]::after { content: " \\25BC"; }
td a { white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-height: 70vh; overflow-y: auto; }
.scroll th { position: sticky; top: 0; }  /* long tables scroll in their box, the head staying */
.badge { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 11.5px; font-weight: 600; }
.badge.warning { color: var(--warn); background: var(--warn-bg); }
.badge.info { color: var(--info); background: var(--info-bg); }
.finding { margin: 4px 0 8px; }
.evidence { color: var(--muted); font-size: 12px; }
.evidence code { background: #f3f4f6; padding: 0 3px; border-radius: 3px; }
details { margin: 6px 0; }
details > summary { cursor: pointer; font-weight: 600; }
.stepper { margin: 8px 0 14px; }
.stepper input[type=range] { width: min(520px, 90%); vertical-align: middle; }
.stepper .frame-label { margin-left: 8px; color: var(--muted); }
.stepper img.grid { max-width: 100%; image-rendering: pixelated; border: 1px solid var(--line); }
.captions td img { width: 48px; height: 48px; image-rendering: pixelated; }
.captions td.mismatch { color: var(--warn); }
.verdict { font-weight: 600; }
"""

JS = r"""
(function () {
  "use strict";

  function renderFigures() {
    var holders = Array.prototype.slice.call(document.querySelectorAll("[data-figure]"));
    var i = 0;
    function next() {
      if (i >= holders.length) { document.body.setAttribute("data-rendered", "true"); return; }
      var el = holders[i++];
      var spec = JSON.parse(document.getElementById(el.getAttribute("data-figure")).textContent);
      var config = { responsive: true, displaylogo: false,
                     toImageButtonOptions: { format: "png", filename: el.id, scale: 2 } };
      Plotly.newPlot(el, spec.data, spec.layout, config).then(function () { setTimeout(next, 0); },
        function (err) { console.error("figure " + el.id + ": " + err); setTimeout(next, 0); });
    }
    next();
  }

  // Numbers sort as numbers, text as text, empty cells last whatever the direction.
  function sortKey(row, col) {
    var cell = row.cells[col];
    var v = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent.trim();
    if (v === "") { return [2, ""]; }
    if (isFinite(v)) { return [0, parseFloat(v)]; }
    return [1, v.toLowerCase()];
  }

  function sortable(table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      th.title = "click to sort";
      th.addEventListener("click", function () {
        var asc = th.getAttribute("data-order") !== "asc";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("data-order"); });
        th.setAttribute("data-order", asc ? "asc" : "desc");
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var ka = sortKey(a, col), kb = sortKey(b, col);
          if (ka[0] !== kb[0]) { return ka[0] - kb[0]; }
          var c = ka[1] < kb[1] ? -1 : (ka[1] > kb[1] ? 1 : 0);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function stepper(box) {
    var frames = box.querySelectorAll(".frame");
    var input = box.querySelector("input[type=range]");
    var label = box.querySelector(".frame-label");
    function show(k) {
      Array.prototype.forEach.call(frames, function (f, j) { f.hidden = j !== k; });
      if (label) { label.textContent = frames[k].getAttribute("data-label"); }
    }
    input.addEventListener("input", function () { show(parseInt(input.value, 10)); });
    show(parseInt(input.value, 10));
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("table.sortable").forEach(sortable);
    document.querySelectorAll(".stepper").forEach(stepper);
    renderFigures();
  });
})();
"""
