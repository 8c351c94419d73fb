// cliplens page: live search, "more like this", search by dropped image. No framework, no CDN.
// Every piece of data from the server is put on the page with textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const q = $("q"), indexSel = $("index"), templateSel = $("template"), superSel = $("superclass");
  const kInput = $("k"), statusEl = $("status"), results = $("results"), overlay = $("drop-overlay");
  const fileInput = $("image-file");
  const DEBOUNCE_MS = 250;
  let indexes = [], timer = null, inflight = null, lastQuery = null;

  function setStatus(parts, isError) {
    statusEl.classList.toggle("error", !!isError);
    statusEl.replaceChildren(...parts.map((p) => (typeof p === "string" ? document.createTextNode(p) : p)));
  }

  function span(cls, text) {
    const el = document.createElement("span");
    el.className = cls;
    el.textContent = text;
    return el;
  }

  function params(extra) {
    const p = new URLSearchParams();
    p.set("k", String(Math.max(1, Math.min(1000, parseInt(kInput.value, 10) || 24))));
    if (indexSel.value) p.set("index", indexSel.value);
    if (superSel.value) p.append("where", "superclass=" + superSel.value);
    for (const [key, val] of Object.entries(extra || {})) p.set(key, val);
    return p;
  }

  async function call(url, options, describe) {
    if (inflight) inflight.abort();
    const ctrl = new AbortController();
    inflight = ctrl;
    setStatus(["Searching\u2026"]);
    results.setAttribute("aria-busy", "true");
    try {
      const resp = await fetch(url, { ...(options || {}), signal: ctrl.signal });
      const body = await resp.json();
      if (!resp.ok) throw new Error(body.error || resp.statusText);
      render(body, describe);
    } catch (err) {
      if (err.name !== "AbortError") setStatus([String(err.message || err)], true);
    } finally {
      if (inflight === ctrl) { inflight = null; results.removeAttribute("aria-busy"); }
    }
  }

  function searchText() {
    const text = q.value.trim();
    if (!text) { results.replaceChildren(); setStatus(["Type to search; drop an image anywhere to search by it."]); return; }
    lastQuery = { kind: "text", text };
    call("/api/search?" + params({ q: text, template: templateSel.value }), null, (r) => `for \u201c${r.prompt}\u201d`);
  }

  function similar(id, label) {
    lastQuery = { kind: "similar", id };
    call(`/api/similar/${id}?` + params(), null, () => `like #${id}${label ? " (" + label + ")" : ""}`);
  }

  function searchImage(file) {
    if (!file) return;
    if (file.size > 10 * 1024 * 1024) { setStatus([`${file.name} is over 10 MB`], true); return; }
    lastQuery = { kind: "image", file };
    const form = new FormData();
    form.append("image", file, file.name);
    for (const [key, val] of params()) form.append(key, val);
    call("/api/search", { method: "POST", body: form }, () => `like the image ${file.name}`);
  }

  function render(result, describe) {
    const n = result.hits.length;
    const parts = [`${n} result${n === 1 ? "" : "s"} ${describe(result)} in ${result.index}`];
    if (result.precision_at_k !== null && result.precision_at_k !== undefined) {
      parts.push(" ", span("precision", `precision@${n} for \u201c${result.query_class}\u201d: ${result.precision_at_k.toFixed(2)}`));
    }
    setStatus(parts);
    const tiles = result.hits.map((h) => tile(h, result.index));
    results.replaceChildren(...tiles);
    document.dispatchEvent(new CustomEvent("cliplens:results", { detail: result }));  // study.js rings these on its map
  }

  function tile(hit, index) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "tile" + (hit.match === true ? " correct" : hit.match === false ? " incorrect" : "");
    b.dataset.id = String(hit.id);
    const what = hit.label || hit.ref;
    b.setAttribute("aria-label", `#${hit.rank}: ${what}, score ${hit.score.toFixed(3)}` +
      (hit.match === true ? ", right class" : hit.match === false ? ", wrong class" : "") + ". More like this.");
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = what;
    img.src = `/api/items/${hit.id}/image?` + new URLSearchParams({ index, size: "256" });
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.append(span("score", `#${hit.rank} \u00b7 ${hit.score.toFixed(3)}`));
    if (hit.label) {
      const lab = span("label", hit.label);
      if (hit.match !== null && hit.match !== undefined) lab.append(span("mark", hit.match ? "\u2713" : "\u2717"));
      meta.append(lab);
      if (hit.superclass) meta.append(span("superclass", hit.superclass));
    } else {
      meta.append(span("ref", hit.ref));
    }
    b.append(img, meta);
    b.addEventListener("click", () => similar(hit.id, hit.label));
    return b;
  }

  function fillIndexOptions() {
    const info = indexes.find((i) => i.name === indexSel.value) || indexes[0];
    superSel.replaceChildren(new Option("all", ""));
    for (const s of (info && info.superclasses) || []) superSel.append(new Option(s, s));
    $("superclass-label").hidden = !(info && info.superclasses.length);
  }

  function rerun() {
    if (!lastQuery || lastQuery.kind === "text") searchText();
    else if (lastQuery.kind === "similar") similar(lastQuery.id);
    else searchImage(lastQuery.file);
  }

  // ---------------------------------------------------------------- events
  q.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(searchText, DEBOUNCE_MS); });
  $("search-form").addEventListener("submit", (e) => { e.preventDefault(); clearTimeout(timer); searchText(); });
  indexSel.addEventListener("change", () => { fillIndexOptions(); lastQuery = lastQuery && lastQuery.kind === "similar" ? null : lastQuery; rerun(); });
  for (const el of [templateSel, superSel, kInput]) el.addEventListener("change", rerun);
  $("image-button").addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => { searchImage(fileInput.files[0]); fileInput.value = ""; });

  let dragDepth = 0;
  const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
  window.addEventListener("dragenter", (e) => { if (hasFiles(e)) { dragDepth++; overlay.hidden = false; } });
  window.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) overlay.hidden = true; });
  window.addEventListener("dragover", (e) => { if (hasFiles(e)) e.preventDefault(); });
  window.addEventListener("drop", (e) => {
    if (!hasFiles(e)) return;
    e.preventDefault();
    dragDepth = 0;
    overlay.hidden = true;
    searchImage(e.dataTransfer.files[0]);
  });

  document.addEventListener("keydown", (e) => {
    const inField = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "/" && !inField) { e.preventDefault(); q.focus(); q.select(); return; }
    if (e.key === "Escape") { q.value = ""; lastQuery = null; searchText(); q.focus(); return; }
    const tiles = Array.from(results.querySelectorAll(".tile"));
    const at = tiles.indexOf(document.activeElement);
    if (e.key === "ArrowDown" && document.activeElement === q && tiles.length) { e.preventDefault(); tiles[0].focus(); return; }
    if (at < 0 || !["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"].includes(e.key)) return;
    e.preventDefault();
    const cols = Math.max(1, tiles.filter((t) => t.offsetTop === tiles[0].offsetTop).length);
    const step = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols }[e.key];
    const next = at + step;
    if (next < 0 && e.key === "ArrowUp") q.focus();
    else if (tiles[next]) tiles[next].focus();
  });

  // ---------------------------------------------------------------- start
  fetch("/api/indexes").then((r) => r.json()).then((body) => {
    indexes = body.indexes;
    for (const i of indexes) indexSel.append(new Option(`${i.name} (${i.count})`, i.name));
    for (const t of body.template_sets) templateSel.append(new Option(t, t));
    fillIndexOptions();
    if (q.value.trim()) searchText();
  }).catch((err) => setStatus([`cannot reach the server: ${err.message}`], true));
})();
