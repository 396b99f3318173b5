"""The browser's static pages (HTML, CSS and plain JavaScript, no libraries, no network).

Data arrive by ``<script>`` tags that call ``sasaIndex(...)`` / ``sasaShard(...)`` (see
``sasa.analysis.browse``), so the pages work from ``file://`` as well as over HTTP. Plots are
inline SVG drawn by a few lines of JavaScript. ``@TITLE@`` is replaced by the site's title.
"""

STYLE = """body{font-family:system-ui,sans-serif;margin:1em auto;max-width:1150px;color:#222;padding:0 1em}h1{font-size:1.5em;margin:.3em 0}h2{font-size:1.2em}
a{color:#1a5fb4;text-decoration:none}a:hover{text-decoration:underline}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}
th{cursor:pointer;background:#f4f4f4;user-select:none}th.sorted{background:#dde7f3}td.l,th.l{text-align:left}
#controls{margin:.8em 0;display:flex;gap:.8em;align-items:center;flex-wrap:wrap}#search{width:24em;padding:4px}
.ctx{font-family:ui-monospace,monospace;font-size:13px;margin:3px 0;padding:3px 4px;border-bottom:1px solid #eee;white-space:pre-wrap}
.ctx span{border-radius:2px}.ctx span.center{outline:1px solid #c33}.ctx .a{color:#888;display:inline-block;width:5.5em}
.plots{display:flex;gap:1.2em;flex-wrap:wrap;align-items:flex-start}.plot{flex:0 0 auto}.plot h3{font-size:13px;margin:.4em 0;font-weight:600}
#hover{font-family:ui-monospace,monospace;font-size:12px;min-height:1.4em;color:#444;position:sticky;top:0;background:#fff;padding:2px 0}
.stats td{text-align:left}.muted{color:#777}"""

_HEAD = """<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>@TITLE@</title>
<link rel="icon" href="data:,"><link rel="stylesheet" href="style.css"></head><body>"""

INDEX_HTML = _HEAD + """
<h1>@TITLE@</h1><p id="summary" class="muted"></p>
<div id="controls"><input id="search" type="search" placeholder="search: SAE name, group number or top token">
<select id="sae"><option value="">all SAEs</option></select><span id="count"></span></div>
<table id="groups"><thead><tr></tr></thead><tbody></tbody></table>
<p class="muted">Showing at most 500 rows; search or sort to find others. Split: on synthetic caches, the
number of units that hold 90% of the planted feature this group recovers best (1 = not split).</p>
<script>
var INDEX = null;
function sasaIndex(d) { INDEX = d; }
</script>
<script src="data/index.js"></script>
<script>
(function () {
  var cols = [["sae", "SAE", "l"], ["group", "group", ""], ["freq", "firing freq", ""], ["max", "max act", ""],
              ["eff_rank", "eff. rank", ""], ["split", "split", ""], ["tokens", "top tokens", "l"]];
  var at = {}; INDEX.columns.forEach(function (c, i) { at[c] = i; });
  var sortKey = "freq", desc = true;
  var head = document.querySelector("#groups thead tr");
  cols.forEach(function (c) {
    var th = document.createElement("th"); th.textContent = c[1]; th.className = c[2]; th.dataset.key = c[0];
    th.onclick = function () { if (sortKey === c[0]) desc = !desc; else { sortKey = c[0]; desc = c[0] !== "sae" && c[0] !== "tokens"; } render(); };
    head.appendChild(th);
  });
  var sel = document.getElementById("sae");
  INDEX.saes.forEach(function (s, i) {
    var o = document.createElement("option"); o.value = i; o.textContent = s.name; sel.appendChild(o);
  });
  var nGroups = INDEX.rows.length;
  document.getElementById("summary").textContent = INDEX.saes.length + " SAE(s), " + nGroups + " groups";
  function fmt(v, key) {
    if (v === null || v === undefined) return "";
    if (key === "freq") return v.toExponential(2);
    if (key === "max" || key === "split") return (+v).toFixed(3);
    return String(v);
  }
  function value(r, key) { return key === "sae" ? INDEX.saes[r[0]].name : r[at[key]]; }
  function render() {
    var q = document.getElementById("search").value.trim().toLowerCase();
    var only = sel.value;
    var rows = INDEX.rows.filter(function (r) {
      if (only !== "" && r[0] !== +only) return false;
      if (!q) return true;
      return (INDEX.saes[r[0]].name + " " + r[1] + " " + r[at.tokens]).toLowerCase().indexOf(q) >= 0;
    });
    rows.sort(function (a, b) {
      var x = value(a, sortKey), y = value(b, sortKey);
      if (x === null) return 1; if (y === null) return -1;
      var c = x < y ? -1 : x > y ? 1 : 0; return desc ? -c : c;
    });
    document.querySelectorAll("#groups th").forEach(function (th) { th.classList.toggle("sorted", th.dataset.key === sortKey); });
    var body = document.querySelector("#groups tbody"); body.innerHTML = "";
    rows.slice(0, 500).forEach(function (r) {
      var tr = document.createElement("tr");
      cols.forEach(function (c) {
        var td = document.createElement("td"); td.className = c[2];
        if (c[0] === "group") {
          var a = document.createElement("a"); a.href = "group.html?s=" + r[0] + "&g=" + r[1]; a.textContent = r[1]; td.appendChild(a);
        } else td.textContent = c[0] === "sae" ? INDEX.saes[r[0]].name : fmt(r[at[c[0]]], c[0]);
        tr.appendChild(td);
      });
      body.appendChild(tr);
    });
    document.getElementById("count").textContent = rows.length + " of " + nGroups + " groups";
  }
  document.getElementById("search").oninput = render; sel.onchange = render;
  render();
})();
</script></body></html>"""

GROUP_HTML = _HEAD + """
<p><a href="index.html">&larr; all groups</a> <span id="nav"></span></p>
<h1 id="title">loading&hellip;</h1><table class="stats" id="stats"></table>
<div class="plots">
<div class="plot"><h3>activation density (log2 bins)</h3><div id="density"></div></div>
<div class="plot"><h3>singular values of its map</h3><div id="sv"></div></div>
<div class="plot" id="viewbox"><h3>2-D code view (origin +)</h3><div id="view"></div></div>
</div>
<h2>top contexts</h2><div id="hover" class="muted">hover a token: its activation and the group's code</div><div id="contexts"></div>
<script>
var params = new URLSearchParams(location.search);
var S = +params.get("s"), G = +params.get("g");
var NS = "http://www.w3.org/2000/svg";
function el(tag, attrs, parent) {
  var e = document.createElementNS(NS, tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e); return e;
}
function bars(target, values, labels, color) {
  var W = values.length > 4 ? 320 : 160, H = 150, pad = 28, n = Math.max(values.length, 1), m = Math.max.apply(null, values.concat([1e-12]));
  var svg = el("svg", {width: W, height: H, role: "img"});
  values.forEach(function (v, i) {
    var w = (W - pad) / n, h = (H - pad) * v / m;
    var r = el("rect", {x: pad + i * w, y: H - pad - h, width: Math.max(w - 1, 1), height: h, fill: color}, svg);
    el("title", {}, r).textContent = labels[i] + ": " + v;
  });
  el("line", {x1: pad, y1: H - pad, x2: W, y2: H - pad, stroke: "#333"}, svg);
  [0, n - 1].forEach(function (i) {
    var anchor = n > 2 ? (i === 0 ? "start" : "end") : "middle";
    var t = el("text", {x: n > 2 ? (i === 0 ? pad : W) : pad + (i + 0.5) * (W - pad) / n, y: H - 10, "font-size": 10, "text-anchor": anchor}, svg);
    t.textContent = labels[i];
  });
  el("text", {x: 2, y: 12, "font-size": 10}, svg).textContent = String(+m.toPrecision(3));
  document.getElementById(target).appendChild(svg);
}
function scatter(target, xs, ys) {
  // scale to the 99th percentile of |coordinate| so that one outlier does not shrink the rest
  var W = 240, r = xs.map(function (x, i) { return Math.max(Math.abs(x), Math.abs(ys[i])); }).sort(function (a, b) { return a - b; });
  var m = Math.max(1e-12, 1.05 * r[Math.min(r.length - 1, Math.floor(0.99 * r.length))]);
  function clip(v) { return Math.max(-m, Math.min(m, v)); }
  var svg = el("svg", {width: W, height: W, role: "img"}), s = (W / 2 - 8) / m;
  el("rect", {x: 0, y: 0, width: W, height: W, fill: "#fafafa", stroke: "#ddd"}, svg);
  xs.forEach(function (x, i) { el("circle", {cx: W / 2 + clip(x) * s, cy: W / 2 - clip(ys[i]) * s, r: 2, fill: "#1a5fb4", "fill-opacity": 0.5}, svg); });
  el("line", {x1: W / 2 - 6, y1: W / 2, x2: W / 2 + 6, y2: W / 2, stroke: "#000"}, svg);
  el("line", {x1: W / 2, y1: W / 2 - 6, x2: W / 2, y2: W / 2 + 6, stroke: "#000"}, svg);
  document.getElementById(target).appendChild(svg);
}
function sasaShard(s, shard, sae, groups) {
  var d = groups[G];
  if (!d) { document.getElementById("title").textContent = "no group " + G + " in " + sae.name; return; }
  document.title = sae.name + " group " + G;
  document.getElementById("title").textContent = sae.name + " \u2014 group " + G;
  var nav = document.getElementById("nav");
  [[G - 1, "\u2190 prev"], [G + 1, "next \u2192"]].forEach(function (p) {
    if (p[0] < 0 || p[0] >= sae.groups) return;
    var a = document.createElement("a"); a.href = "group.html?s=" + S + "&g=" + p[0]; a.textContent = " " + p[1] + " "; nav.appendChild(a);
  });
  var stats = [["architecture", sae.arch + " (r = " + sae.rank + ", " + sae.groups + " groups) on " + sae.hookpoint],
               ["firing frequency", d.freq.toExponential(3)], ["max activation", d.max.toFixed(4)],
               ["effective rank", d.eff_rank + " of " + sae.rank]];
  if (d.split !== null) stats.push(["splitting (units of its planted feature)", d.split.toFixed(2)]);
  if (d.view) stats.push(["code energy in the plane shown", (100 * d.view.energy).toFixed(1) + "%"]);
  var tb = document.getElementById("stats");
  stats.forEach(function (r) { var tr = tb.insertRow(); tr.insertCell().textContent = r[0]; tr.insertCell().textContent = r[1]; });
  var h = d.hist, labels = h.counts.map(function (_, i) { return "2^" + (h.log2_lo + (h.first + i) / h.per_octave).toFixed(2); });
  if (h.counts.length) bars("density", h.counts, labels, "#e66100"); else document.getElementById("density").textContent = "never active";
  bars("sv", d.sv, d.sv.map(function (_, i) { return "\u03c3" + (i + 1); }), "#1a5fb4");
  if (sae.rank < 2) document.getElementById("viewbox").style.display = "none";
  else if (d.view) scatter("view", d.view.x, d.view.y);
  else document.getElementById("view").textContent = "too few active tokens for a view";
  var box = document.getElementById("contexts"), hover = document.getElementById("hover");
  if (!d.contexts.length) box.textContent = "no active tokens in the evaluated rows";
  d.contexts.forEach(function (c) {
    var div = document.createElement("div"); div.className = "ctx";
    var a = document.createElement("span"); a.className = "a"; a.textContent = c.act.toFixed(3); div.appendChild(a);
    c.tokens.forEach(function (t, i) {
      var sp = document.createElement("span"), v = c.acts[i] / Math.max(d.max, 1e-12);
      sp.textContent = t + " ";
      sp.style.background = "rgba(230,97,0," + Math.min(1, Math.max(0, v)).toFixed(3) + ")";
      if (i === c.center) sp.className = "center";
      var info = JSON.stringify(t) + "  activation " + c.acts[i].toFixed(4) + (c.codes ? "  z = (" + c.codes[i].join(", ") + ")" : "");
      sp.title = info;
      sp.onmouseover = function () { hover.textContent = info; };
      div.appendChild(sp);
    });
    box.appendChild(div);
  });
}
(function () {
  var tag = document.createElement("script");
  tag.src = "data/" + S + "/" + Math.floor(G / @SHARD@) + ".js";
  tag.onerror = function () { document.getElementById("title").textContent = "no data for SAE " + S + " group " + G; };
  document.body.appendChild(tag);
})();
</script></body></html>"""
