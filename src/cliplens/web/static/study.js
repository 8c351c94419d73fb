// cliplens study views for the page: an embedding map (canvas scatter), suspect labels, models side by side.
// Self-contained: it adds its own bar, panel and styles; it learns the current hits from the "cliplens:results"
// event app.js fires. Server data goes on the page with textContent only. No third-party code.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const css = `
#study-bar{display:flex;gap:8px;flex-wrap:wrap;padding:8px 16px 0}
#study-bar button[aria-pressed=true]{background:#2f6fdf;color:#fff;border-color:#2f6fdf}
#study-panel{padding:8px 16px}#study-panel[hidden]{display:none}
#study-canvas{width:min(100%,720px);aspect-ratio:1;border:1px solid #dde1e6;border-radius:8px;background:#fff;display:block}
#study-tip{position:fixed;z-index:6;pointer-events:none;background:#fff;border:1px solid #b9c0ca;border-radius:6px;padding:4px;
 font-size:12px;box-shadow:0 2px 8px rgba(0,0,0,.2)}#study-tip img{width:64px;height:64px;image-rendering:pixelated;display:block}
.study-row{margin:10px 0}.study-row h3{font-size:14px;margin:4px 0}
.study-tiles{display:flex;gap:8px;overflow-x:auto;padding-bottom:4px}
.study-tile{flex:0 0 96px;font-size:12px;background:#fff;border-radius:6px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:0 0 4px;
 border:3px solid transparent;cursor:pointer;text-align:left}
.study-tile.correct{border-color:#1f9d46}.study-tile.incorrect{border-color:#d23c3c}
.study-tile img{width:100%;aspect-ratio:1;object-fit:cover;image-rendering:pixelated;display:block}
.study-tile span{display:block;padding:0 4px;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}`;
  const style = document.createElement("style");
  style.textContent = css;
  document.head.appendChild(style);

  const bar = document.createElement("nav");
  bar.id = "study-bar";
  bar.setAttribute("aria-label", "Study views");
  const panel = document.createElement("section");
  panel.id = "study-panel";
  panel.hidden = true;
  const status = $("status");
  status.before(bar);
  status.after(panel);
  const buttons = {};
  for (const [key, label] of [["map", "Map"], ["suspects", "Suspects"], ["compare", "Compare models"]]) {
    const b = document.createElement("button");
    b.type = "button";
    b.id = "study-" + key;
    b.textContent = label;
    b.setAttribute("aria-pressed", "false");
    b.addEventListener("click", () => toggle(key));
    bar.appendChild(b);
    buttons[key] = b;
  }
  let view = null, hits = new Set(), map = null;

  const index = () => ($("index") && $("index").value) || "";
  const imageUrl = (id, size, idx) => `/api/items/${id}/image?` + new URLSearchParams({ index: idx || index(), size: String(size) });
  const openItem = (id, idx) => window.open(imageUrl(id, 512, idx), "_blank", "noopener");

  function toggle(key) {
    view = view === key ? null : key;
    for (const [k, b] of Object.entries(buttons)) b.setAttribute("aria-pressed", String(k === view));
    panel.hidden = !view;
    if (view) show(view);
  }

  function note(text) {
    const p = document.createElement("p");
    p.textContent = text;
    panel.replaceChildren(p);
  }

  async function getJson(url) {
    const resp = await fetch(url);
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
    return body;
  }

  function tile(id, lines, match, idx) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "study-tile" + (match === true ? " correct" : match === false ? " incorrect" : "");
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = lines[0];
    img.src = imageUrl(id, 128, idx);
    b.appendChild(img);
    for (const line of lines) { const s = document.createElement("span"); s.textContent = line; b.appendChild(s); }
    b.addEventListener("click", () => openItem(id, idx));
    return b;
  }

  async function show(key) {
    note("Loading\u2026");
    try {
      if (key === "map") await showMap();
      else if (key === "suspects") await showSuspects();
      else await showCompare();
    } catch (err) { note(String(err.message || err)); }
  }

  // ------------------------------------------------------------------ map
  async function showMap() {
    map = await getJson("/api/study/map?" + new URLSearchParams({ index: index(), method: "pca" }));
    map.idx = index();
    const canvas = document.createElement("canvas");
    canvas.id = "study-canvas";
    const caption = document.createElement("p");
    caption.textContent = `${map.count} items, PCA, coloured by ${map.group_kind}; hover for the image, click to open it; ` +
      "the current search's hits are ringed.";
    panel.replaceChildren(caption, canvas);
    canvas.addEventListener("mousemove", (e) => hover(canvas, e));
    canvas.addEventListener("mouseleave", () => tip(null));
    canvas.addEventListener("click", (e) => { const i = nearest(canvas, e); if (i !== null) openItem(i, map.idx); });
    draw(canvas);
  }

  const colour = (g) => `hsl(${(g * 137.508) % 360} 65% 48%)`;

  function geometry(canvas) {
    const size = canvas.clientWidth || 600, pad = 14;
    return { size, pad, sx: (x) => pad + x * (size - 2 * pad), sy: (y) => size - pad - y * (size - 2 * pad) };
  }

  function draw(canvas) {
    if (!map || !canvas.isConnected) return;
    const g = geometry(canvas), dpr = window.devicePixelRatio || 1;
    canvas.width = g.size * dpr;
    canvas.height = g.size * dpr;
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    const r = map.count > 5000 ? 1.2 : map.count > 500 ? 2 : 3.5;
    for (let i = 0; i < map.count; i++) {
      ctx.fillStyle = colour(map.group[i]);
      ctx.fillRect(g.sx(map.x[i]) - r, g.sy(map.y[i]) - r, 2 * r, 2 * r);
    }
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#111";
    for (const i of hits) {
      if (i >= map.count) continue;
      ctx.beginPath();
      ctx.arc(g.sx(map.x[i]), g.sy(map.y[i]), 6, 0, 2 * Math.PI);
      ctx.stroke();
    }
    ctx.font = "12px system-ui, sans-serif";
    ctx.textAlign = "center";
    map.centres.forEach((c, k) => {
      if (!c) return;
      const text = map.groups[k];
      ctx.fillStyle = "rgba(255,255,255,.75)";
      const w = ctx.measureText(text).width;
      ctx.fillRect(g.sx(c[0]) - w / 2 - 2, g.sy(c[1]) - 10, w + 4, 14);
      ctx.fillStyle = "#111";
      ctx.fillText(text, g.sx(c[0]), g.sy(c[1]));
    });
  }

  function nearest(canvas, e) {
    const g = geometry(canvas), rect = canvas.getBoundingClientRect();
    const mx = e.clientX - rect.left, my = e.clientY - rect.top;
    let best = null, bestD = 64;  // within 8 px
    for (let i = 0; i < map.count; i++) {
      const dx = g.sx(map.x[i]) - mx, dy = g.sy(map.y[i]) - my, d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  let tipEl = null;
  function tip(content, x, y) {
    if (!content) { if (tipEl) tipEl.remove(); tipEl = null; return; }
    if (!tipEl) { tipEl = document.createElement("div"); tipEl.id = "study-tip"; document.body.appendChild(tipEl); }
    tipEl.replaceChildren(...content);
    tipEl.style.left = `${x + 14}px`;
    tipEl.style.top = `${y + 14}px`;
  }

  function hover(canvas, e) {
    const i = nearest(canvas, e);
    if (i === null) { tip(null); return; }
    const img = document.createElement("img");
    img.src = imageUrl(i, 64, map.idx);
    img.alt = "";
    const label = document.createElement("span");
    label.textContent = `#${i} ${map.groups[map.group[i]]}`;
    tip([img, label], e.clientX, e.clientY);
  }

  document.addEventListener("cliplens:results", (e) => {
    hits = new Set(((e.detail && e.detail.hits) || []).map((h) => h.id));
    if (view === "map") draw($("study-canvas"));
  });

  // ------------------------------------------------------------------ suspects
  async function showSuspects() {
    const body = await getJson("/api/study/suspects?" + new URLSearchParams({ index: index(), top: "48" }));
    const p = document.createElement("p");
    p.textContent = `${body.flagged} of ${body.count} labels disagree with both zero-shot and their nearest ` +
      "neighbours; lowest self-confidence first (given label \u2192 what CLIP suggests).";
    const row = document.createElement("div");
    row.className = "study-tiles";
    row.style.flexWrap = "wrap";
    for (const s of body.suspects) {
      row.appendChild(tile(s.id, [`${s.label} \u2192 ${s.suggested}`, `#${s.id} ${s.self_confidence.toFixed(3)}`], false, body.index));
    }
    panel.replaceChildren(p, row);
  }

  // ------------------------------------------------------------------ compare
  async function showCompare() {
    const text = ($("q") && $("q").value.trim()) || "";
    if (!text) { note("Type a query first: each model's top 10 for it appear here, one row per model."); return; }
    const body = await getJson("/api/study/compare?" + new URLSearchParams({ q: text, k: "10" }));
    const rows = body.rows.map((r) => {
      const div = document.createElement("div");
      div.className = "study-row";
      const h = document.createElement("h3");
      h.textContent = `${r.model} (${r.index})` + (r.precision_at_k != null ? `: precision@${r.hits.length} ${r.precision_at_k.toFixed(2)}` : "");
      const tiles = document.createElement("div");
      tiles.className = "study-tiles";
      for (const hit of r.hits) tiles.appendChild(tile(hit.id, [hit.label || hit.ref, hit.score.toFixed(3)], hit.match, r.index));
      div.append(h, tiles);
      return div;
    });
    panel.replaceChildren(...rows);
  }

  $("q") && $("q").addEventListener("input", () => { if (view === "compare") { clearTimeout(toggle.t); toggle.t = setTimeout(showCompare, 400); } });
  $("index") && $("index").addEventListener("change", () => { hits = new Set(); if (view && view !== "compare") show(view); });
})();
