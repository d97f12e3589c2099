// The search page: plain JavaScript against the JSON API of the same server (no build, no CDN).
// Every URL is relative to the page, so the page also works behind a proxy under a path prefix.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  info: null,
  query: null,        // {type: "upload", file} or {type: "item", id, label}
  latest: 0,          // number of the newest search; older answers are dropped
  finished: 0,        // searches answered (read by the browser test)
};

function showMessage(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

function setStatus(text) { $("status").textContent = text; }

function selectedLearners() {
  return [...document.querySelectorAll("#learners input")].filter((c) => c.checked).map((c) => Number(c.value));
}

async function loadInfo() {
  try {
    const response = await fetch("info");
    const info = await response.json();
    if (!response.ok) throw new Error(info.error || response.statusText);
    state.info = info;
    const sliceSize = info.learner_slices.length ? info.learner_slices[0][1] - info.learner_slices[0][0] : 0;
    const model = info.model_id ? info.model_id.slice(0, 12) : "?";
    $("info").textContent = `model ${model} · ${info.num_learners} learners × ${sliceSize} d` +
      ` · ${info.index_type} index of ${info.index_size.toLocaleString()} images` +
      (info.index_deleted ? ` (${info.index_deleted.toLocaleString()} deleted)` : "");
    const k = $("k");
    k.max = info.limits.max_k;
    k.value = Math.min(info.limits.default_k, info.limits.max_k);
    buildLearnerToggles(info.num_learners);
    if (!info.uploads) $("drop-text").innerHTML = "<strong>Uploads are off</strong><br>click a result to search";
  } catch (err) {
    $("info").textContent = "";
    showMessage(`Cannot reach the search service (${err.message}).`);
  }
}

function buildLearnerToggles(count) {
  const box = $("learners");
  box.replaceChildren();
  for (let n = 0; n < count; n++) {
    const label = document.createElement("label");
    label.className = "chip";
    label.title = `learner ${n}`;
    const input = document.createElement("input");
    input.type = "checkbox";
    input.value = String(n);
    input.checked = true;
    input.dataset.learner = String(n);
    input.addEventListener("change", () => {
      if (selectedLearners().length === 0) {
        input.checked = true;
        showMessage("Keep at least one learner switched on.");
        return;
      }
      if (state.query) search();
    });
    const text = document.createElement("span");
    text.textContent = `L${n}`;
    label.append(input, text);
    box.append(label);
  }
}

function setQueryImage(src, caption) {
  const img = $("query-image");
  img.onerror = () => {  // not displayable (e.g. a rejected upload): back to the drop prompt
    img.hidden = true;
    $("drop").classList.remove("has-image");
  };
  if (img.dataset.objectUrl) URL.revokeObjectURL(img.dataset.objectUrl);
  delete img.dataset.objectUrl;
  img.src = src;
  img.hidden = false;
  $("drop").classList.add("has-image");
  $("query-caption").textContent = caption;
}

function chooseFile(file) {
  if (!file) return;
  state.query = {type: "upload", file};
  const url = URL.createObjectURL(file);
  setQueryImage(url, file.name);
  $("query-image").dataset.objectUrl = url;
  search();
}

function chooseItem(id, label) {
  state.query = {type: "item", id, label};
  setQueryImage(`items/${id}/thumbnail`, `item ${id}${label ? " · " + label : ""}`);
  search();
}

async function search() {
  const query = state.query;
  if (!query) return;
  const number = ++state.latest;
  const form = new FormData();
  if (query.type === "upload") form.append("image", query.file, query.file.name || "upload");
  else form.append("id", String(query.id));
  const k = $("k").value.trim();
  if (k) form.append("k", k);
  const learners = selectedLearners();
  if (state.info && learners.length < state.info.num_learners) form.append("learners", learners.join(","));
  const filter = $("filter").value.trim();
  if (filter) form.append("filter", filter);  // one condition; the API takes the field repeated (AND)
  setStatus("Searching…");
  document.body.dataset.busy = "true";
  let answer;
  try {
    const response = await fetch("search", {method: "POST", body: form});
    let body;
    try { body = await response.json(); } catch { body = {error: `${response.status} ${response.statusText}`}; }
    answer = response.ok ? {body} : {error: body.error || `${response.status} ${response.statusText}`, status: response.status};
  } catch (err) {
    answer = {error: `the service did not answer (${err.message})`};
  }
  if (number !== state.latest) return;  // a newer search has started: this answer is stale
  if (answer.error) {
    // a refused filter is the filter's fault, not the upload's (its messages name the filter)
    const filterError = answer.status === 400 && /\bfilters?\b/.test(answer.error);
    const what = filterError ? `Filter rejected: ${answer.error}`
      : query.type === "upload" ? `Upload rejected: ${answer.error}` : `Search failed: ${answer.error}`;
    showMessage(what);
    setStatus("No results.");
    $("results").replaceChildren();
  } else {
    showMessage("");
    render(answer.body);
  }
  state.finished += 1;
  document.body.dataset.searches = String(state.finished);
  document.body.dataset.busy = "false";
}

function render(body) {
  const grid = $("results");
  const hits = body.results;
  const items = hits.map((hit) => {
    const li = document.createElement("li");
    li.className = "hit";
    li.tabIndex = 0;
    li.dataset.id = String(hit.id);
    li.dataset.score = String(hit.score);
    li.title = `item ${hit.id}: click to search from it`;
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    const img = document.createElement("img");
    img.src = hit.thumbnail.replace(/^\//, "");  // the API gives root paths; relative to the page
    img.alt = hit.label || `item ${hit.id}`;
    img.loading = "lazy";
    thumb.append(img);
    const meta = document.createElement("div");
    meta.className = "meta";
    const row = document.createElement("div");
    row.className = "row";
    const rank = document.createElement("span");
    rank.className = "rank";
    rank.textContent = `#${hit.rank}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    score.title = "mean cosine similarity over the chosen learners";
    row.append(rank, score);
    const label = document.createElement("div");
    label.className = hit.label ? "label" : "label none";
    label.textContent = hit.label || "no label";
    meta.append(row, label);
    li.append(thumb, meta);
    const open = () => chooseItem(hit.id, hit.label);
    li.addEventListener("click", open);
    li.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
    return li;
  });
  grid.replaceChildren(...items);
  const learners = body.learners.length === (state.info ? state.info.num_learners : body.learners.length)
    ? "all learners" : `learners ${body.learners.join(", ")}`;
  const filter = body.filter ? ` · ${body.filter}` : "";
  setStatus(`${hits.length} nearest neighbours · ${learners}${filter} · ${body.took_ms.toFixed(1)} ms`);
}

function wireDropZone() {
  const drop = $("drop");
  $("file-input").addEventListener("change", (e) => {
    chooseFile(e.target.files[0]);
    e.target.value = "";  // choosing the same file again still searches
  });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file-input").click(); } });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("dragging"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.remove("dragging"); });
  }
  drop.addEventListener("drop", (e) => chooseFile(e.dataTransfer.files[0]));
  // A drop outside the zone would make the browser navigate away to the file.
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("k").addEventListener("change", () => { if (state.query) search(); });
  $("filter").addEventListener("change", () => { if (state.query) search(); });  // Enter or leaving the field
}

wireDropZone();
loadInfo();
