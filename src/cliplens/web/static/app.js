// cliplens page: live search, a viewer, "more like this", search by dropped image, filters, paging, a relevance
// cut; the whole search state lives in the URL. No framework, no CDN.
// Every piece of data from the server is put on the page with textContent, never as HTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const q = $("q"), indexSel = $("index"), templateSel = $("template"), superSel = $("superclass");
  const fromInput = $("taken-from"), toInput = $("taken-to"), cameraSel = $("camera"), sortSel = $("sort");
  const slider = $("min-score"), cutCount = $("cut-count"), cutButton = $("cut-calibrated"), cutMark = $("cut-mark");
  const suspectsBox = $("suspects"), collapseBox = $("collapse"), statusEl = $("status"), results = $("results"), moreButton = $("more");
  const overlay = $("drop-overlay"), fileInput = $("image-file"), examplesEl = $("examples");
  const viewer = $("viewer"), viewerImg = $("viewer-img");
  const DEBOUNCE_MS = 250, START = "Type to search; drop an image anywhere to search by it.";

  let indexes = [], limits = { default_k: 24, max_k: 1000 };
  let state = blankState();  // what the page is asked to show; the URL is written from it
  let shown = null;  // what the grid shows: {key, st, hits, more, result}
  let inflight = null, pendingKey = null, timer = null, focusAfter = null, userScrolled = false;
  let scores = null, scoresCtrl = null, scoresTimer = null;  // every score of the query, for the cut's count
  let calibration = {};  // "index|template" -> {threshold, ...} or null
  const images = new Map();  // token -> File: image searches of this page's life (a File cannot go in a URL)
  const items = new Map();  // "index|id" -> item JSON of duplicates shown beside their tile
  let imageSeq = 0;

  // ================================================================ state and the URL
  function blankState() {
    return { q: "", image: null, index: "", template: "", superclass: "", from: "", to: "", camera: "",
             sort: "score", min: null, collapse: true, suspects: false, view: null };
  }

  function toQuery(st) {
    const p = new URLSearchParams();
    if (st.image) p.set("image", st.image.name);
    if (st.q) p.set("q", st.q);
    for (const key of ["index", "template", "superclass", "from", "to", "camera"]) if (st[key]) p.set(key, st[key]);
    if (st.sort !== "score") p.set("sort", st.sort);
    if (st.min !== null) p.set("min", String(st.min));
    if (!st.collapse) p.set("collapse", "false");
    if (st.suspects) p.set("suspects", "true");
    if (st.view !== null) p.set("view", String(st.view));
    return p.toString();
  }

  function fromQuery(search, entry) {
    const p = new URLSearchParams(search), st = blankState();
    for (const key of ["q", "index", "template", "superclass", "from", "to", "camera"]) st[key] = (p.get(key) || "").trim();
    if (["taken", "-taken"].includes(p.get("sort"))) st.sort = p.get("sort");
    const min = parseFloat(p.get("min"));
    if (Number.isFinite(min)) st.min = Math.max(-1, Math.min(1, min));
    st.collapse = p.get("collapse") !== "false";
    st.suspects = p.get("suspects") === "true";
    const view = parseInt(p.get("view"), 10);
    if (view >= 0) st.view = view;
    if (p.get("image")) {
      const token = entry && entry.image && images.has(entry.image.token) ? entry.image.token : null;
      st.image = { token, name: p.get("image") };
    }
    if (!indexes.some((i) => i.name === st.index)) st.index = indexes.length ? indexes[0].name : "";
    return st;
  }

  // The search the grid answers (everything but the open viewer item).
  const searchKey = (st) => JSON.stringify({ ...st, view: null, image: st.image && [st.image.token, st.image.name] });
  const itemQuery = (text) => /^#(\d+)$/.exec(text.trim());
  const hasQuery = (st) => !!(st.q || st.image);
  const infoFor = (name) => indexes.find((i) => i.name === name) || indexes[0] || {};
  const isPhotoIndex = (info) => "taken_range" in info;

  // Change the state, record it in the history and bring the page up to date.
  // how: "push", "replace", or "coalesce:WHAT" (typing, sliding: one entry for a run of the same change).
  function navigate(changes, how) {
    const before = toQuery(state), image = state.image;
    state = { ...state, ...changes };
    if (toQuery(state) !== before || state.image !== image) writeHistory(how);  // the same state: no new entry
    update();
  }

  function writeHistory(how) {
    const qs = toQuery(state), url = location.pathname + (qs ? "?" + qs : "");
    const prev = history.state || {};
    const coalesce = how.startsWith("coalesce:") ? how.slice(9) : null;
    const entry = { image: state.image, coalesce, viewerPushed: how === "push-viewer" };
    if (how === "replace" || (coalesce && prev.coalesce === coalesce)) {
      history.replaceState({ ...entry, viewerPushed: !!prev.viewerPushed && state.view !== null }, "", url);
    } else {
      history.pushState(entry, "", url);
    }
  }

  function commitHistory() {  // the end of a run of typing or sliding: the next change gets its own entry
    if (history.state && history.state.coalesce) history.replaceState({ ...history.state, coalesce: null }, "", location.href);
  }

  function update() {
    showState();
    const key = searchKey(state);
    if (shown && shown.key === key) syncViewer();
    else if (pendingKey !== key) search();  // else: the search on its way opens the viewer when it lands
  }

  window.addEventListener("popstate", (e) => {
    state = fromQuery(location.search, e.state);
    update();
  });

  // ================================================================ controls <-> state
  function showState() {
    const info = infoFor(state.index);
    if (indexSel.value !== state.index) indexSel.value = state.index;
    fillIndexOptions(info);
    if (q.value.trim() !== state.q) q.value = state.q;
    templateSel.value = state.template || templateSel.options[0]?.value || "";
    superSel.value = state.superclass;
    fromInput.value = state.from;
    toInput.value = state.to;
    cameraSel.value = state.camera;
    sortSel.value = state.sort;
    collapseBox.checked = state.collapse;
    suspectsBox.checked = state.suspects;
    $("suspects-label").hidden = !info.has_labels;
    showChip();
    showExamples();
    showCut();
  }

  function fillIndexOptions(info) {
    if (fillIndexOptions.done === info.name) return;
    fillIndexOptions.done = info.name;
    superSel.replaceChildren(new Option("all", ""), ...(info.superclasses || []).map((s) => new Option(s, s)));
    cameraSel.replaceChildren(new Option("any", ""), ...(info.cameras || []).map((c) => new Option(c, c)));
    $("superclass-label").hidden = !info.has_superclasses;
    $("camera-label").hidden = !(info.cameras && info.cameras.length);
    $("taken-controls").hidden = !info.taken_range;
    $("sort-label").hidden = !isPhotoIndex(info);
    for (const input of [fromInput, toInput]) {
      input.min = info.taken_range ? info.taken_range[0].slice(0, 10) : "";
      input.max = info.taken_range ? info.taken_range[1].slice(0, 10) : "";
    }
    results.classList.toggle("tiny", !!info.tiny);
    viewerImg.classList.toggle("tiny", !!info.tiny);
  }

  function onIndexChange() {  // keep what the other index offers too; an item id means nothing there
    const info = infoFor(indexSel.value);
    navigate({
      index: info.name, view: null, min: null,
      q: itemQuery(state.q) ? "" : state.q,
      superclass: (info.superclasses || []).includes(state.superclass) ? state.superclass : "",
      camera: (info.cameras || []).includes(state.camera) ? state.camera : "",
      from: info.taken_range ? state.from : "", to: info.taken_range ? state.to : "",
      sort: isPhotoIndex(info) ? state.sort : "score",
    }, "push");
  }

  function wheres(st) {
    const out = [];
    if (st.superclass) out.push("superclass=" + st.superclass);
    if (st.from) out.push("taken>=" + st.from);
    if (st.to) out.push("taken<=" + st.to);  // the whole "to" day included
    if (st.camera) out.push("camera=" + st.camera.replace(/[[\]*?]/g, (c) => `[${c}]`));  // a glob: exact name
    return out;
  }

  const hasFilters = (st) => wheres(st).length > 0;

  // ================================================================ requests
  function pageSize(st) {  // sorted by date: the API orders within a page, so take the whole cut at once
    return st.sort === "score" ? limits.default_k : limits.max_k;
  }

  function request(st, offset, k) {
    const p = new URLSearchParams();
    p.set("k", String(k));
    if (offset) p.set("offset", String(offset));
    if (st.index) p.set("index", st.index);
    for (const w of wheres(st)) p.append("where", w);
    if (st.min !== null) p.set("min_score", String(st.min));
    if (st.sort !== "score") p.set("sort", st.sort);
    if (!st.collapse) p.set("collapse", "false");
    if (st.suspects && infoFor(st.index).has_labels) p.set("suspects", "true");
    if (st.image) {
      const form = new FormData();
      form.append("image", images.get(st.image.token).file, st.image.name);
      if (st.q) form.append("q", st.q);
      for (const [key, val] of p) form.append(key, val);
      return { url: "/api/search", options: { method: "POST", body: form } };
    }
    const item = itemQuery(st.q);
    if (item) return { url: `/api/similar/${item[1]}?${p}` };
    p.set("q", st.q);
    if (st.template) p.set("template", st.template);
    return { url: "/api/search?" + p };
  }

  async function getJson(req, signal) {
    const resp = await fetch(req.url, { ...(req.options || {}), signal });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error || resp.statusText);
    return body;
  }

  async function call(req, onOk, key) {
    if (inflight) inflight.abort();
    const ctrl = new AbortController();
    inflight = ctrl;
    results.setAttribute("aria-busy", "true");
    try {
      onOk(await getJson(req, ctrl.signal));
    } catch (err) {
      if (err.name !== "AbortError") showError(String(err.message || err), key);
    } finally {
      if (inflight === ctrl) { inflight = null; results.removeAttribute("aria-busy"); }
    }
  }

  function search() {
    const st = { ...state }, key = searchKey(st);
    if (!hasQuery(st)) { showNothing(key); return; }
    if (st.image && !st.image.token) {
      showNothing(key, `This link was a search by the image ${st.image.name}: drop it again to repeat the search.`);
      return;
    }
    setStatus(["Searching\u2026"]);
    pendingKey = key;
    call(request(st, 0, pageSize(st)), (body) => render(body, st, key, false), key)
      .finally(() => { if (pendingKey === key) pendingKey = null; });
  }

  // The next page (offset: the results shown so far). focusNew: focus its first result (the button asked for it).
  function loadMore(focusNew) {
    if (!shown || !shown.more) return Promise.resolve();
    const s = shown;
    s.focusNew = s.focusNew || focusNew;
    if (s.loading) return s.loading;  // one page at a time, whoever asks
    s.loading = call(request(s.st, s.hits.length, pageSize(s.st)), (body) => {
      if (shown !== s) return;
      focusAfter = s.focusNew ? "new" : null;
      s.focusNew = false;
      render(body, s.st, s.key, true);
    }).finally(() => { s.loading = null; });
    return s.loading;
  }

  // ================================================================ rendering the results
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

  function button(text, onClick, cls) {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = text;
    if (cls) b.className = cls;
    b.addEventListener("click", onClick);
    return b;
  }

  function showNothing(key, message) {
    shown = { key, st: { ...state }, hits: [], more: false, result: null };
    results.replaceChildren();
    moreButton.hidden = true;
    setStatus([message || START], !!message);
    showExamples();
    syncViewer();
  }

  function showError(message, key) {  // the error takes the place of the results it makes stale
    const box = document.createElement("div");
    box.className = "error-box";
    box.setAttribute("role", "alert");
    box.textContent = message;
    results.replaceChildren(box);
    shown = { key: key || (shown && shown.key), st: { ...state }, hits: [], more: false, result: null, error: message };
    moreButton.hidden = true;
    setStatus([message], true);
  }

  function render(body, st, key, append) {
    if (!append) shown = { key, st, hits: [], more: false, result: body };
    const cells = body.hits.map((h) => cell(h, body.index));
    shown.hits.push(...body.hits);
    shown.more = !!body.more && shown.hits.length <= limits.max_k;
    if (append) results.append(...cells);
    else results.replaceChildren(...cells);
    if (!shown.hits.length) results.replaceChildren(emptyAdvice(st));
    moreButton.hidden = !shown.more;
    showStatus(shown, st);
    showExamples();
    $("collapse-label").hidden = body.collapse.threshold === null && st.collapse;
    $("collapse-label").title = body.collapse.threshold === null ? body.collapse.why
      : "near-identical photos (re-encoded copies) shown as one tile, with a +N badge";
    document.dispatchEvent(new CustomEvent("cliplens:results", { detail: { ...body, hits: shown.hits } }));  // study.js
    if (!append) scheduleScores(st);
    syncViewer();
    moveFocusAfterRender(cells);
  }

  function describe(st, result) {
    const item = itemQuery(st.q);
    if (st.image) return `like the image ${st.image.name}` + (st.q ? ` and \u201c${st.q}\u201d` : "");
    if (item) return `like #${item[1]}`;
    return `for \u201c${result.prompt || st.q}\u201d`;
  }

  function showStatus(s, st) {
    const n = s.hits.length, r = s.result;
    const parts = [`${n}${s.more ? "+" : ""} result${n === 1 ? "" : "s"} ${describe(st, r)} in ${r.index}`];
    if (r.precision_at_k !== null && r.precision_at_k !== undefined) {
      const k = r.hits.length;
      parts.push(" ", span("precision", `precision@${k} for \u201c${r.query_class}\u201d: ${r.precision_at_k.toFixed(2)}`));
    }
    const notes = [];
    if (hasFilters(st)) notes.push(wheres(st).join(", "));
    if (st.min !== null) notes.push(`score \u2265 ${st.min}`);
    if (st.sort !== "score") notes.push(st.sort === "taken" ? "oldest first" : "newest first");
    if (notes.length) parts.push(span("notes", ` (${notes.join("; ")})`));
    setStatus(parts);
  }

  function emptyAdvice(st) {
    const box = document.createElement("div");
    box.className = "empty";
    const head = document.createElement("p");
    head.textContent = `Nothing ${describe(st, { prompt: st.q })}` + (hasFilters(st) || st.min !== null ? " with these settings." : ".");
    const list = document.createElement("ul");
    const info = infoFor(st.index);
    if (!st.image && (info.examples || []).length) {
      list.append(adviceItem("Try other words: ", exampleChips(info.examples)));
    } else if (!st.image) {
      list.append(adviceItem("Try other words: a thing (\u201cdog\u201d), a scene (\u201cbeach at sunset\u201d) or a colour.", []));
    }
    if (hasFilters(st)) {
      list.append(adviceItem(`Use fewer filters (${wheres(st).join(", ")}): `,
        [button("clear the filters", () => navigate({ superclass: "", from: "", to: "", camera: "" }, "push"))]));
    }
    if (st.min !== null) {
      list.append(adviceItem(`Lower the relevance cut (${st.min}): `, [button("remove the cut", () => navigate({ min: null }, "push"))]));
    }
    box.append(head, list);
    return box;
  }

  function adviceItem(text, nodes) {
    const li = document.createElement("li");
    li.append(text, ...nodes);
    return li;
  }

  const baseName = (path) => (path || "").split("/").pop();

  function tileTitle(hit) {
    return hit.label || hit.caption || baseName(hit.path) || hit.ref || `#${hit.id}`;
  }

  function cell(hit, index, copyOf) {
    const wrap = document.createElement("div");
    wrap.className = "cell" + (copyOf !== undefined ? " dup" : "");
    const ratio = hit.width && hit.height ? hit.width / hit.height : 1;
    wrap.style.setProperty("--ar", ratio.toFixed(4));
    wrap.append(tile(hit, index, copyOf));
    const dups = hit.duplicates || [];
    if (dups.length && copyOf === undefined) wrap.append(badge(hit, index, wrap));
    return wrap;
  }

  function tile(hit, index, copyOf) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "tile" + (hit.match === true ? " correct" : hit.match === false ? " incorrect" : "");
    b.dataset.id = String(hit.id);
    const what = tileTitle(hit);
    const scoreText = copyOf !== undefined ? `near-identical copy of #${copyOf}` : `score ${hit.score.toFixed(3)}`;
    b.setAttribute("aria-label", (hit.rank ? `#${hit.rank}: ` : "") + `${what}, ${scoreText}` +
      (hit.match === true ? ", right class" : hit.match === false ? ", wrong class" : "") + ". Open it.");
    const img = document.createElement("img");
    img.loading = "lazy";
    img.alt = what;
    const src = hit.thumb || `/api/items/${hit.id}/image?` + new URLSearchParams({ index, size: "256" });
    img.src = src;
    if (hit.thumb2x) img.srcset = `${src} 1x, ${hit.thumb2x} 2x`;
    if (hit.width && hit.height) { img.width = hit.width; img.height = hit.height; }
    b.append(img, tileMeta(hit, copyOf));
    b.addEventListener("click", () => openViewer(hit.id));
    return b;
  }

  function tileMeta(hit, copyOf) {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.append(span("score", copyOf !== undefined ? "near-identical copy" : `#${hit.rank} \u00b7 ${hit.score.toFixed(3)}`));
    if (hit.label) {
      const lab = span("label", hit.label);
      if (hit.match !== null && hit.match !== undefined) lab.append(span("mark", hit.match ? "\u2713" : "\u2717"));
      meta.append(lab);
      if (hit.superclass) meta.append(span("superclass", hit.superclass));
    } else {
      if (hit.caption) meta.append(span("caption", hit.caption));
      meta.append(span("ref", [baseName(hit.path || hit.ref), (hit.taken || "").slice(0, 10)].filter(Boolean).join(" \u00b7 ")));
    }
    return meta;
  }

  // ---------------------------------------------------------------- near-identical groups
  function badge(hit, index, wrap) {
    const n = hit.duplicates.length;
    const b = button(`+${n}`, () => toggleDuplicates(b, hit, index, wrap), "badge");
    b.setAttribute("aria-expanded", "false");
    b.setAttribute("aria-label", `${n} near-identical ${n === 1 ? "copy" : "copies"} of this one: show ${n === 1 ? "it" : "them"}`);
    return b;
  }

  async function toggleDuplicates(b, hit, index, wrap) {
    const open = b.getAttribute("aria-expanded") === "true";
    b.setAttribute("aria-expanded", String(!open));
    wrap.classList.toggle("expanded", !open);
    if (open) { for (const c of results.querySelectorAll(`.dup[data-of="${hit.id}"]`)) c.remove(); return; }
    try {
      const dups = await Promise.all(hit.duplicates.map((id) => itemDetails(index, id)));
      const cells = dups.map((d) => { const c = cell(d, index, hit.id); c.dataset.of = String(hit.id); return c; });
      wrap.after(...cells);
      cells[0].querySelector(".tile").focus();
    } catch (err) {
      setStatus([String(err.message || err)], true);
    }
  }

  async function itemDetails(index, id) {
    const key = `${index}|${id}`;
    if (!items.has(key)) items.set(key, await getJson({ url: `/api/items/${id}?` + new URLSearchParams({ index }) }));
    return items.get(key);
  }

  // ---------------------------------------------------------------- focus
  function moveFocusAfterRender(cells) {
    const want = focusAfter;
    focusAfter = null;
    const first = cells.length ? cells[0].querySelector(".tile") : null;
    if (want && first) first.focus();
    userScrolled = false;
  }

  const tiles = () => Array.from(results.querySelectorAll(".tile"));

  function neighbour(list, at, key) {  // the tile left/right, or in the row above/below nearest in x
    if (key === "ArrowLeft") return list[at - 1];
    if (key === "ArrowRight") return list[at + 1];
    const boxes = list.map((t) => t.getBoundingClientRect()), here = boxes[at];
    const down = key === "ArrowDown", cx = here.left + here.width / 2;
    const rowTops = boxes.map((b) => b.top).filter((t) => (down ? t > here.top + 2 : t < here.top - 2));
    if (!rowTops.length) return null;
    const rowTop = down ? Math.min(...rowTops) : Math.max(...rowTops);
    let best = null, bestD = Infinity;
    boxes.forEach((b, i) => {
      const d = Math.abs(b.left + b.width / 2 - cx);
      if (Math.abs(b.top - rowTop) <= 2 && d < bestD) { bestD = d; best = list[i]; }
    });
    return best;
  }

  // ================================================================ the viewer
  let viewing = null, closing = false;  // viewing: {id, hit, index}

  function openViewer(id) {
    navigate({ view: id }, state.view === null ? "push-viewer" : "replace");
  }

  function hitFor(id) {
    const hit = shown && shown.hits.find((h) => h.id === id);
    return hit || items.get(`${state.index}|${id}`) || null;
  }

  async function syncViewer() {
    if (state.view === null) { closeDialog(); return; }
    if (!shown || shown.key !== searchKey(state) || !shown.result && hasQuery(state)) return;  // after the results
    const id = state.view;
    let hit = hitFor(id);
    if (!hit) {
      try { hit = await itemDetails(state.index, id); } catch (err) { setStatus([String(err.message || err)], true); return; }
      if (state.view !== id) return;
    }
    showInViewer(hit, state.index);
  }

  function showInViewer(hit, index) {
    const info = infoFor(index);
    viewing = { id: hit.id, hit, index };
    $("viewer-title").textContent = hit.label ? `#${hit.id} ${hit.label}` : baseName(hit.path || hit.ref) || `#${hit.id}`;
    $("viewer-caption").textContent = hit.caption || "";
    $("viewer-caption").hidden = !hit.caption;
    $("viewer-meta").replaceChildren(...metaRows(hit));
    viewerImage(hit, index, info);
    const original = $("viewer-original");
    original.hidden = !info.has_originals;
    original.href = `/api/items/${hit.id}/original?` + new URLSearchParams({ index });
    showViewerPosition(hit.id);
    if (!viewer.open) { viewer.showModal(); $("viewer-close").focus(); }
  }

  function viewerSize(info) {
    if (info.tiny) return 512;  // a 32 px tile: the 512 px enlargement is already whole pixels
    return (window.devicePixelRatio || 1) * Math.max(innerWidth, innerHeight) > 1024 ? 2048 : 1024;
  }

  function viewerImage(hit, index, info) {
    const id = hit.id, big = `/api/items/${id}/image?` + new URLSearchParams({ index, size: String(viewerSize(info)) });
    viewerImg.alt = tileTitle(hit);
    viewerImg.src = hit.thumb2x || big;  // cached already: something at once, the sharp one when it arrives
    viewerImg.dataset.full = big;
    const pre = new Image();
    pre.onload = () => { if (viewing && viewing.id === id) viewerImg.src = big; };
    pre.src = big;
  }

  function metaRows(hit) {
    const rows = [];
    const add = (term, ...nodes) => {
      const dt = document.createElement("dt"), dd = document.createElement("dd");
      dt.textContent = term;
      dd.append(...nodes);
      rows.push(dt, dd);
    };
    const copyOf = shown && shown.hits.find((h) => (h.duplicates || []).includes(hit.id));
    if (typeof hit.score === "number" && hit.rank) add("Score", `${hit.score.toFixed(4)} (result #${hit.rank})`);
    else if (copyOf) add("Score", `none of its own: a near-identical copy of ${tileTitle(copyOf)} (result #${copyOf.rank})`);
    if (hit.label) add("Label", hit.label + (hit.match === true ? " \u2713" : hit.match === false ? " \u2717" : ""));
    if (hit.superclass) add("Superclass", hit.superclass);
    if (hit.path) add("Path", hit.path);
    else if (hit.ref) add("Ref", String(hit.ref));
    if (hit.taken) add("Taken", hit.taken.replace("T", " ").slice(0, 16) + (hit.taken_from === "exif" ? " (EXIF)" : " (file time: no EXIF date)"));
    if (hit.camera) add("Camera", hit.camera);
    if (hit.lat !== null && hit.lat !== undefined && hit.lon !== null && hit.lon !== undefined) add("GPS", gpsLink(hit.lat, hit.lon));
    if (hit.width && hit.height) add("Size", `${hit.width} \u00d7 ${hit.height} px`);
    if ((hit.duplicates || []).length) add("Near-identical", ...hit.duplicates.map((d) => button(`#${d}`, () => openViewer(d), "link")));
    return rows;
  }

  function gpsLink(lat, lon) {
    const a = document.createElement("a");
    a.href = `geo:${lat},${lon}`;  // the device's own map app; no map service is contacted
    a.textContent = `${lat.toFixed(5)}, ${lon.toFixed(5)}`;
    return a;
  }

  function showViewerPosition(id) {
    const list = tiles(), at = list.findIndex((t) => t.dataset.id === String(id));
    const pos = at >= 0 ? `${at + 1} of ${list.length}${shown && shown.more ? "+" : ""}` : "";
    $("viewer-pos").textContent = pos;
    $("viewer-announce").textContent = [$("viewer-title").textContent, pos].filter(Boolean).join(", ");
    $("viewer-prev").disabled = at <= 0;
    $("viewer-next").disabled = at < 0 || (at === list.length - 1 && !(shown && shown.more));
  }

  async function step(delta) {
    if (!viewing) return;
    let list = tiles(), at = list.findIndex((t) => t.dataset.id === String(viewing.id));
    if (at < 0) return;
    if (at + delta >= list.length && shown && shown.more) { await loadMore(false); list = tiles(); }
    const next = list[at + delta];
    if (next) { openViewer(parseInt(next.dataset.id, 10)); next.scrollIntoView({ block: "nearest" }); }
  }

  function closeViewer() {
    if (state.view === null) { closeDialog(); return; }
    if (closing) return;  // Esc both cancels and closes the dialog: one step back, not two
    closing = true;
    if (history.state && history.state.viewerPushed) history.back();  // the entry the viewer made goes
    else navigate({ view: null }, "replace");
  }

  function closeDialog() {
    closing = false;
    if (viewer.open) viewer.close();
    if (!viewing) return;
    const t = results.querySelector(`.tile[data-id="${viewing.id}"]`);
    viewing = null;
    (t || q).focus();
  }

  function moreLikeThis() {
    if (!viewing) return;
    focusAfter = "results";
    navigate({ q: `#${viewing.id}`, image: null, view: null }, "push");
    closeDialog();  // at once, not when the results land
  }

  // ================================================================ the relevance cut
  function scoresKey(st) { return searchKey({ ...st, min: null, sort: "score" }); }

  function scheduleScores(st) {
    clearTimeout(scoresTimer);
    if (scores && scores.key === scoresKey(st)) { showCut(); return; }
    scoresTimer = setTimeout(() => loadScores(st), 300);
  }

  async function loadScores(st) {  // every score above -1 of this query (up to max_k): the cut counts them
    if (scoresCtrl) scoresCtrl.abort();
    const ctrl = scoresCtrl = new AbortController(), key = scoresKey(st);
    try {
      const body = await getJson(request({ ...st, min: null, sort: "score" }, 0, limits.max_k), ctrl.signal);
      scores = { key, values: body.hits.map((h) => h.score), more: !!body.more };
      showCut();
    } catch (err) {
      if (err.name !== "AbortError") cutCount.textContent = "";
    }
  }

  function cutRange() {
    const vals = scores && scores.key === scoresKey(state) ? scores.values : [];
    const extra = [state.min, calibratedCut()].filter((v) => v !== null && v !== undefined);
    const all = vals.concat(extra);
    if (!all.length) return [-1, 1];
    let lo = Math.floor(Math.min(...all) * 100) / 100, hi = Math.ceil(Math.max(...all) * 100) / 100;
    if (state.min !== null && state.min <= lo) lo = Math.round((state.min - 0.01) * 100) / 100;
    if (hi <= lo) hi = lo + 0.01;
    return [Math.max(-1, lo), Math.min(1, hi)];
  }

  function showCut() {
    const [lo, hi] = cutRange();
    slider.min = String(lo);
    slider.max = String(hi);
    slider.value = String(state.min === null ? lo : state.min);
    showCutCount(state.min);
    showCalibrationMark(lo, hi);
  }

  function sliderValue() {
    const v = parseFloat(slider.value);
    return v <= parseFloat(slider.min) ? null : Math.round(v * 1000) / 1000;
  }

  function showCutCount(v) {
    const ready = scores && scores.key === scoresKey(state);
    if (!ready) { cutCount.textContent = v === null ? "off" : `\u2265 ${v}`; cutCount.removeAttribute("data-count"); return; }
    const n = v === null ? scores.values.length : scores.values.filter((s) => s >= v).length;
    const plus = n === scores.values.length && scores.more ? "+" : "";
    cutCount.dataset.count = String(n);
    cutCount.textContent = (v === null ? `off: ${n}${plus} results` : `${n}${plus} result${n === 1 ? "" : "s"} \u2265 ${v.toFixed(3)}`);
    slider.setAttribute("aria-valuetext", v === null ? "off" : `${v.toFixed(3)}, ${n}${plus} results`);
  }

  // ---------------------------------------------------------------- the calibrated threshold
  const calibrationKey = () => `${state.index}|${state.template}`;
  function calibratedCut() {
    const c = calibration[calibrationKey()];
    return c && !itemQuery(state.q) && !state.image ? c.threshold : null;
  }

  // Other prompt sets: asked for when the cut is first pointed at or focused (none recorded: a 404).
  async function loadCalibration() {
    const key = calibrationKey();
    if (key in calibration) return;
    calibration[key] = null;
    const p = new URLSearchParams({ index: state.index });
    if (state.template && state.template !== "single") p.set("template", state.template);
    try {
      calibration[key] = await getJson({ url: "/api/study/calibration?" + p });
    } catch (err) {
      calibration[key] = null;
    }
    showCut();
  }

  function showCalibrationMark(lo, hi) {
    const t = calibratedCut(), marks = $("cut-marks");
    cutMark.hidden = cutButton.hidden = t === null;
    marks.replaceChildren();
    if (t === null) return;
    const c = calibration[calibrationKey()];
    marks.append(new Option("calibrated", String(t)));
    cutMark.style.setProperty("--at", String((t - lo) / (hi - lo)));
    cutButton.textContent = `Calibrated: ${t.toFixed(3)}`;
    cutButton.title = `the cut \`cliplens calibrate\` measured for this model and prompt` +
      (c.precision != null ? ` (precision ${c.precision.toFixed(2)}, recall ${(c.recall ?? 0).toFixed(2)})` : "");
  }

  // ================================================================ examples and the image chip
  function exampleChips(examples) {
    return examples.map((text) => button(text, () => { focusAfter = null; navigate({ q: text, image: null, view: null }, "push"); }, "chip-button"));
  }

  function showExamples() {
    const info = infoFor(state.index), list = info.examples || [];
    examplesEl.hidden = hasQuery(state) || !list.length;
    if (examplesEl.hidden) return;
    examplesEl.replaceChildren(span("try", "Try:"), ...exampleChips(list));
  }

  function showChip() {
    const chip = $("image-chip"), img = $("image-chip-img");
    chip.hidden = !state.image;
    q.placeholder = state.image ? "add words to combine with the image" : 'Search: tractor, "2:red tractor" - snow, #12';
    if (!state.image) return;
    $("image-chip-name").textContent = state.image.name;
    const entry = state.image.token && images.get(state.image.token);
    img.hidden = !(entry && entry.thumb);
    if (entry && entry.thumb) img.src = entry.thumb;
  }

  async function chipThumb(file) {  // a small picture of the query image, drawn here (no object URL to fetch)
    try {
      const bmp = await createImageBitmap(file);
      const scale = 64 / Math.max(bmp.width, bmp.height), c = document.createElement("canvas");
      c.width = Math.max(1, Math.round(bmp.width * scale));
      c.height = Math.max(1, Math.round(bmp.height * scale));
      c.getContext("2d").drawImage(bmp, 0, 0, c.width, c.height);
      return c.toDataURL("image/png");
    } catch (err) {
      return "";  // a format the browser cannot draw (HEIC): the name alone
    }
  }

  function searchImage(file) {
    if (!file) return;
    if (file.size > limits.max_upload_bytes) { setStatus([`${file.name} is over ${Math.round(limits.max_upload_bytes / 1048576)} MB`], true); return; }
    const token = String(++imageSeq), entry = { file, thumb: "" };
    images.set(token, entry);
    navigate({ image: { token, name: file.name }, q: "", view: null }, "push");
    chipThumb(file).then((thumb) => { entry.thumb = thumb; showChip(); });
  }

  // ================================================================ events
  q.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => navigate({ q: q.value.trim(), view: null }, "coalesce:q"), DEBOUNCE_MS);
  });
  q.addEventListener("blur", commitHistory);
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    clearTimeout(timer);
    if (q.value.trim() !== state.q) navigate({ q: q.value.trim(), view: null }, "coalesce:q");
    else if (shown && shown.error) search();  // Enter again: try again
    commitHistory();
  });
  indexSel.addEventListener("change", onIndexChange);
  templateSel.addEventListener("change", () => navigate({ template: templateSel.selectedIndex ? templateSel.value : "" }, "push"));
  superSel.addEventListener("change", () => navigate({ superclass: superSel.value, view: null }, "push"));
  cameraSel.addEventListener("change", () => navigate({ camera: cameraSel.value, view: null }, "push"));
  sortSel.addEventListener("change", () => navigate({ sort: sortSel.value, view: null }, "push"));
  for (const [input, key] of [[fromInput, "from"], [toInput, "to"]]) {
    input.addEventListener("change", () => navigate({ [key]: input.value, view: null }, "push"));  // "" until a whole date
  }
  collapseBox.addEventListener("change", () => navigate({ collapse: collapseBox.checked, view: null }, "push"));
  suspectsBox.addEventListener("change", () => navigate({ suspects: suspectsBox.checked, view: null }, "push"));
  slider.addEventListener("input", () => showCutCount(sliderValue()));
  slider.addEventListener("change", () => navigate({ min: sliderValue(), view: null }, "coalesce:min"));
  slider.addEventListener("blur", commitHistory);
  for (const ev of ["pointerenter", "focusin"]) $("cut").addEventListener(ev, loadCalibration);
  cutButton.addEventListener("click", () => navigate({ min: calibratedCut(), view: null }, "push"));
  moreButton.addEventListener("click", () => loadMore(true));
  window.addEventListener("scroll", () => {  // infinite scroll: the next page when the end comes near
    userScrolled = true;
    if (!moreButton.hidden && moreButton.getBoundingClientRect().top < innerHeight + 200) loadMore(false);
  }, { passive: true });
  $("filters-button").addEventListener("click", () => {
    const open = $("controls").classList.toggle("open");
    $("filters-button").setAttribute("aria-expanded", String(open));
  });

  $("image-button").addEventListener("click", () => fileInput.click());
  $("image-chip-remove").addEventListener("click", () => { navigate({ image: null, view: null }, "push"); q.focus(); });
  fileInput.addEventListener("change", () => { searchImage(fileInput.files[0]); fileInput.value = ""; });

  $("viewer-prev").addEventListener("click", () => step(-1));
  $("viewer-next").addEventListener("click", () => step(1));
  $("viewer-close").addEventListener("click", closeViewer);
  $("viewer-similar").addEventListener("click", moreLikeThis);
  viewer.addEventListener("cancel", (e) => { e.preventDefault(); closeViewer(); });
  viewer.addEventListener("close", () => { if (state.view !== null) closeViewer(); });
  viewer.addEventListener("click", (e) => { if (e.target === viewer) closeViewer(); });  // the backdrop

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
    if (viewer.open) {  // the viewer's keys (Esc: its cancel event), wherever the focus is
      if (e.key === "ArrowLeft" || e.key === "ArrowRight") { e.preventDefault(); step(e.key === "ArrowLeft" ? -1 : 1); }
      return;
    }
    const inField = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName);
    if (e.key === "/" && !inField) { e.preventDefault(); q.focus(); q.select(); return; }
    if (e.key === "Escape") { clearTimeout(timer); q.value = ""; navigate({ q: "", image: null, view: null }, "push"); q.focus(); return; }
    const list = tiles();
    const at = list.indexOf(document.activeElement);
    if (e.key === "ArrowDown" && document.activeElement === q && list.length) { e.preventDefault(); list[0].focus(); return; }
    if (at < 0 || !["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown"].includes(e.key)) return;
    e.preventDefault();
    const next = neighbour(list, at, e.key);
    if (next) next.focus();
    else if (e.key === "ArrowUp") q.focus();
  });

  // ================================================================ start
  fetch("/api/indexes").then((r) => r.json()).then((body) => {
    indexes = body.indexes;
    limits = { ...limits, ...(body.limits || {}) };
    for (const i of indexes) {
      indexSel.append(new Option(`${i.name} (${i.count})`, i.name));
      // the calibrated cut of the default prompt comes with the index list: marked at once, no request
      calibration[`${i.name}|single`] = (i.calibration && i.calibration.single) || null;
    }
    for (const t of body.template_sets) templateSel.append(new Option(t, t));
    state = fromQuery(location.search, history.state);
    if (!state.q && !state.image && q.value.trim()) state.q = q.value.trim();  // typed before the list came
    history.replaceState({ ...(history.state || {}), image: state.image }, "", location.href);
    update();
  }).catch((err) => setStatus([`cannot reach the server: ${err.message}`], true));
})();
