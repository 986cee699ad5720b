// The classifier's page: vanilla JS over the service's own API; nothing is loaded from elsewhere.
"use strict";

const METHODS = [
  ["gradient", "Gradient", "how much each pixel changes the class score (signed, shown as |value|)"],
  ["guided", "Guided backprop", "the gradient with negative signals cut at every ReLU/tanh: edges the class uses"],
  ["gradcam", "Grad-CAM", "which regions of the last convolution's features raise the class score (coarse)"],
  ["guided_gradcam", "Guided Grad-CAM", "guided backprop × Grad-CAM: fine detail inside the Grad-CAM regions"],
];
const $ = (id) => document.getElementById(id);
const state = { image: null, name: "", info: null, generation: 0, channels: 3 };

function setStatus(text, isError = false, detail = "") {
  $("status").textContent = text;
  $("status").title = detail; // the service's exact words, for whoever needs them
  $("status").classList.toggle("error", isError);
}

// What a person is told about a refused request; the service's own message stays in the tooltip.
const PLAIN = {
  400: "The request was not understood. Try another file.",
  413: "That image is too large for this service. Try a smaller one.",
  415: "That file is not a picture this service can read. Use a JPEG, PNG, GIF, BMP, WebP or TIFF image.",
  422: "That picture could not be used: it may be damaged, or too small. Try another one.",
  503: "The service is busy right now. Try again in a moment.",
};

class ApiError extends Error {
  constructor(plain, detail) {
    super(plain);
    this.detail = detail;
  }
}

async function apiError(what, response) {
  let detail;
  try {
    const body = await response.json();
    detail = body.error || JSON.stringify(body);
  } catch {
    detail = `${response.status} ${response.statusText}`;
  }
  const plain = PLAIN[response.status] || "Something went wrong on the server. Try again.";
  return new ApiError(plain, `${what}: ${detail}`);
}

// k of the model card's "top5" metric and of the bars: five, or every class when there are fewer.
const topK = () => Math.min(5, state.info.classes.length);

async function loadCard() {
  const response = await fetch("/metadata");
  if (!response.ok) throw await apiError("GET /metadata", response);
  const info = await response.json();
  state.info = info;
  state.channels = info.channels;
  document.title = `${info.model} v${info.version || "?"}`;
  $("title").textContent = `${info.model}${info.version ? " version " + info.version : ""}`;
  const metric = (key) => (key in info.metrics ? info.metrics[key].toFixed(4) : "not recorded");
  const fields = [
    ["model", info.model], ["version", info.version || "(not registered)"], ["architecture", info.architecture],
    ["input", `${info.channels}×${info.image_size}×${info.image_size}`],
    ["test top-1", metric("top1")], [`test top-${topK()}`, metric("top5")],
    ["classes", `${info.classes.length}: ${info.classes.join(", ")}`],
    ["MLflow run", info.mlflow_run_id || "–"], ["data md5", info.data_md5 || "–"],
    ["git commit", info.git_commit || "–"], ["served from", info.source],
  ];
  const list = $("card-fields");
  list.replaceChildren();
  for (const [key, value] of fields) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dd.dataset.field = key;
    list.append(dt, dd);
  }
  $("top-k").textContent = `Top-${topK()}`;
  $("top-k-sub").textContent = `top-${topK()}`;
  const select = $("target");
  info.classes.forEach((name, index) => select.append(new Option(`${index}: ${name}`, String(index))));
  info.classes.forEach((name) => $("feedback-label").append(new Option(name, name)));
}

// The monitoring panel: GET /monitoring (class counts of every worker since start, the reference's,
// the last drift verdict); a failure leaves the panel as it was and says so.
async function loadMonitoring() {
  const response = await fetch("/monitoring");
  if (!response.ok) {
    $("drift-verdict").textContent = "The monitoring summary is not available right now.";
    return;
  }
  const panel = await response.json();
  const share = (counts, name) => {
    if (!counts) return "–";
    const total = Object.values(counts).reduce((a, b) => a + b, 0);
    return total ? `${counts[name]} (${((100 * counts[name]) / total).toFixed(1)}%)` : "0";
  };
  const body = $("class-table").querySelector("tbody");
  body.replaceChildren();
  for (const name of state.info.classes) {
    const row = document.createElement("tr");
    row.dataset.class = name;
    for (const text of [name, share(panel.traffic, name), share(panel.reference, name)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    body.append(row);
  }
  const drift = panel.drift;
  const verdict = $("drift-verdict");
  verdict.classList.toggle("drift", Boolean(drift.checked && drift.drift));
  if (!drift.checked) {
    verdict.textContent = drift.message;
  } else {
    const span = drift.window && drift.window.records ? `, last ${drift.window.records} predictions` : "";
    const version = drift.model && drift.model.version ? `model version ${drift.model.version}` : "the model";
    verdict.textContent = drift.drift
      ? `Drift (${drift.time}): ${version}${span} differ from the reference in ${drift.signals.join(", ")}.`
      : `No drift (${drift.time}): ${version}${span} match the reference.`;
  }
}

async function sendFeedback(event) {
  event.preventDefault();
  const label = $("feedback-label").value;
  $("feedback-status").classList.remove("error");
  $("feedback-status").textContent = "Sending…";
  const data = new FormData();
  data.append("image", state.image, "upload");
  data.append("label", label);
  const response = await fetch("/feedback", { method: "POST", body: data });
  if (response.ok) {
    $("feedback-status").textContent = `Thank you: stored as ${label} for review.`;
  } else {
    const err = await apiError("POST /feedback", response);
    $("feedback-status").classList.add("error");
    $("feedback-status").textContent = err.message;
    $("feedback-status").title = err.detail;
  }
}

async function loadExamples() {
  const response = await fetch("examples");
  const items = response.ok ? await response.json() : [];
  $("examples-box").hidden = items.length === 0;
  for (const item of items) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.title = `test image of class ${item.label}`;
    const img = document.createElement("img");
    img.src = item.url;
    img.alt = item.label;
    const caption = document.createElement("span");
    caption.textContent = item.label;
    button.append(img, caption);
    button.addEventListener("click", async () => {
      const blob = await (await fetch(item.url)).blob();
      useImage(blob, `example: a test image of class ${item.label}`);
    });
    $("examples").append(button);
  }
}

function useImage(blob, name) {
  state.image = blob;
  state.name = name;
  $("preview").hidden = false;
  $("preview").src = URL.createObjectURL(blob);
  $("preview-name").textContent = name;
  $("preview-box").hidden = false;
  run();
}

function form(extra) {
  const data = new FormData();
  data.append("image", state.image, "upload");
  for (const [key, value] of Object.entries(extra)) data.append(key, value);
  return data;
}

function showBars(predictions) {
  const bars = $("bars");
  bars.replaceChildren();
  for (const p of predictions) {
    const li = document.createElement("li");
    li.dataset.label = p.label;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = p.label;
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * p.probability).toFixed(1)}%`;
    track.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(100 * p.probability).toFixed(1)}%`;
    li.append(label, track, value);
    bars.append(li);
  }
  $("top1").textContent = predictions[0].label;
}

function clearMaps() {
  for (const img of document.querySelectorAll(".map img")) img.removeAttribute("src");
  for (const img of document.querySelectorAll(".map .overlay")) delete img.dataset.target;
}

// Small pictures (a 32×32 test image) are scaled up with visible pixels instead of a blur.
function sharpWhenSmall(img) {
  img.classList.toggle("pixelated", img.naturalWidth > 0 && img.naturalWidth < img.clientWidth);
}

function buildMapPanels() {
  const maps = $("maps");
  maps.replaceChildren();
  for (const [method, title, what] of METHODS) {
    const figure = document.createElement("figure");
    figure.className = "map";
    figure.dataset.method = method;
    const stack = document.createElement("div");
    stack.className = "stack";
    const base = document.createElement("img");
    base.className = "base" + (state.channels === 1 ? " grey" : "");
    base.alt = "";
    const overlay = document.createElement("img");
    overlay.className = "overlay";
    overlay.alt = `${title} map`;
    overlay.style.opacity = $("opacity").value;
    const empty = document.createElement("span");
    empty.className = "placeholder";
    empty.textContent = "the map appears here";
    stack.append(empty, base, overlay);
    const caption = document.createElement("figcaption");
    const strong = document.createElement("strong");
    strong.textContent = title;
    caption.append(strong, document.createTextNode(`: ${what}`));
    figure.append(stack, caption);
    maps.append(figure);
  }
}

async function loadMaps(generation) {
  const target = $("target").value;
  const baseUrl = $("preview").src;
  await Promise.all(METHODS.map(async ([method]) => {
    const figure = document.querySelector(`.map[data-method="${method}"]`);
    const overlay = figure.querySelector(".overlay");
    figure.querySelector(".base").src = baseUrl;
    overlay.removeAttribute("src");
    delete overlay.dataset.target;
    const fields = { method, format: "png" };
    if (target !== "") fields.target = target;
    const response = await fetch("/saliency", { method: "POST", body: form(fields) });
    if (!response.ok) throw await apiError(`POST /saliency (${method})`, response);
    if (generation !== state.generation) return; // a newer image or target replaced this one
    const url = URL.createObjectURL(await response.blob());
    await new Promise((resolve, reject) => {
      overlay.onload = () => { sharpWhenSmall(overlay); sharpWhenSmall(figure.querySelector(".base")); resolve(); };
      overlay.onerror = () => reject(new Error(`${method}: the PNG did not decode`));
      overlay.src = url;
    });
    overlay.dataset.target = response.headers.get("X-Target") || "";
  }));
}

async function run() {
  const generation = ++state.generation;
  document.body.dataset.state = "working";
  clearMaps();
  setStatus("Asking the model…");
  try {
    const response = await fetch("/predict", { method: "POST", body: form({ k: String(topK()) }) });
    if (!response.ok) throw await apiError("POST /predict", response);
    const body = await response.json();
    if (generation !== state.generation) return;
    showBars(body.predictions);
    $("ood-warning").hidden = body.ood !== true;
    $("feedback").hidden = false;
    $("feedback-status").textContent = "";
    $("feedback-label").value = body.predictions[0].label;
    loadMonitoring().catch(() => {});
    setStatus("Computing saliency maps…");
    await loadMaps(generation);
    if (generation !== state.generation) return;
    setStatus(`Done: ${state.name}`);
    document.body.dataset.state = "done";
  } catch (err) {
    if (generation !== state.generation) return;
    $("top1").textContent = "–";
    $("bars").replaceChildren();
    $("ood-warning").hidden = true;
    $("feedback").hidden = true;
    clearMaps();
    setStatus(err.message, true, err.detail || "");
    document.body.dataset.state = "error";
  }
}

function wireInputs() {
  $("preview").addEventListener("load", () => sharpWhenSmall($("preview")));
  $("preview").addEventListener("error", () => { $("preview").hidden = true; }); // not a picture the browser shows
  $("file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) useImage(file, file.name);
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) useImage(file, file.name);
  });
  $("opacity").addEventListener("input", () => {
    const value = $("opacity").value;
    $("opacity-value").textContent = Number(value).toFixed(2);
    for (const overlay of document.querySelectorAll(".map .overlay")) overlay.style.opacity = value;
  });
  $("target").addEventListener("change", () => { if (state.image) run(); });
  $("feedback").addEventListener("submit", (event) => { sendFeedback(event).catch((err) => { $("feedback-status").textContent = `Not sent: ${err.message}`; }); });
}

async function start() {
  wireInputs();
  try {
    await loadCard();
    buildMapPanels();
    await loadExamples();
    await loadMonitoring();
    setStatus("Ready: upload an image or pick an example.");
    document.body.dataset.state = "ready";
  } catch (err) {
    setStatus(err.message, true, err.detail || "");
    document.body.dataset.state = "error";
  }
}

start();
