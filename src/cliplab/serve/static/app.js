// cliplab search page: plain JS, no build step, talks to this service's /v1 API only.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { auth: false, index: null };

function headers() {
  const key = $("api-key").value || sessionStorage.getItem("cliplab-key") || "";
  return state.auth && key ? { "X-API-Key": key } : {};
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

async function call(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    throw new Error(`${res.status}: ${detail}`);
  }
  return body;
}

async function showImage(img, url) {
  // Files need the API key header, which <img src> cannot send: fetch them as blobs.
  try {
    const res = await fetch(url, { headers: headers() });
    if (!res.ok) throw new Error(res.status);
    img.src = URL.createObjectURL(await res.blob());
  } catch (e) {
    img.alt = "image not available";
  }
}

function showHits(hits) {
  const grid = $("results");
  grid.replaceChildren();
  for (const h of hits) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = h.id;
    const img = document.createElement("img");
    img.alt = h.path;
    const cap = document.createElement("figcaption");
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = h.score.toFixed(4);
    const path = document.createElement("div");
    path.className = "path";
    path.textContent = h.path;
    cap.append(score, path);
    card.append(img, cap);
    grid.append(card);
    showImage(img, h.url);
  }
  status(`${hits.length} result${hits.length === 1 ? "" : "s"}`);
}

async function searchText(event) {
  event.preventDefault();
  const text = $("query").value.trim();
  if (!text) return status("type a query", true);
  status("searching…");
  try {
    const k = parseInt($("k").value, 10) || 12;
    const body = await call("/v1/search/text", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, k }),
    });
    showHits(body.hits);
  } catch (e) { status(e.message, true); }
}

function chosenImage() {
  const file = $("image").files[0];
  if (!file) status("choose an image first", true);
  return file;
}

async function classify(event) {
  event.preventDefault();
  const file = chosenImage();
  if (!file) return;
  const labels = $("labels").value.trim();
  if (!labels) return status("type labels, comma-separated", true);
  const form = new FormData();
  form.append("image", file);
  form.append("labels", labels);
  form.append("k", "5");
  status("classifying…");
  try {
    const body = await call("/v1/classify", { method: "POST", body: form });
    const list = $("labels-out");
    list.replaceChildren();
    for (const l of body.labels) {
      const li = document.createElement("li");
      li.className = "label";
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.width = `${Math.round(l.prob * 120)}px`;
      li.textContent = `${l.label} ${l.prob.toFixed(3)}`;
      li.append(bar);
      list.append(li);
    }
    $("upload-result").hidden = false;
    status(`top label: ${body.labels[0].label}`);
  } catch (e) { status(e.message, true); }
}

async function searchImage() {
  const file = chosenImage();
  if (!file) return;
  const form = new FormData();
  form.append("image", file);
  form.append("k", String(parseInt($("k").value, 10) || 12));
  status("searching…");
  try {
    showHits((await call("/v1/search/image", { method: "POST", body: form })).hits);
  } catch (e) { status(e.message, true); }
}

async function init() {
  $("search-form").addEventListener("submit", searchText);
  $("upload-form").addEventListener("submit", classify);
  $("image-search-button").addEventListener("click", searchImage);
  $("api-key").addEventListener("change", () => sessionStorage.setItem("cliplab-key", $("api-key").value));
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    if (file) { $("preview").src = URL.createObjectURL(file); $("upload-result").hidden = false; }
  });
  try {
    const info = await call("/v1/info");
    state.auth = info.auth;
    state.index = info.index;
    $("key-box").hidden = !info.auth;
    $("api-key").value = sessionStorage.getItem("cliplab-key") || "";
    $("model").textContent = `${info.model}` + (info.index ? ` · ${info.index.size} indexed images` : " · no index");
    if (!info.index) {
      $("no-index").hidden = false;
      $("query").disabled = $("search-button").disabled = $("image-search-button").disabled = true;
    }
    document.body.dataset.ready = "1";
  } catch (e) { status(`cannot reach the service: ${e.message}`, true); }
}

init();
