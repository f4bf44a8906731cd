// bloodcell review page: images or whole fields in, one tile per cell found, corrections kept by the
// server (every review lasts: reopen it after closing the page or restarting the server), the
// differential in % or per litre, exports and a printable report. Plain browser JavaScript, no
// dependencies: the page works on a lab network without internet.
"use strict";

const BATCH = 16; // files per request: hundreds of images go in steps the progress bar can show
const state = {
  classes: [], review: null, cells: [], images: {}, summary: null, current: -1,
  files: {}, // name -> File, for the images added in this tab (Grad-CAM needs the original)
  token: sessionStorage.getItem("bloodcell-token") || "",
};
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ talking to the server

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function call(path, { method = "GET", body = null, json = null } = {}) {
  const headers = authHeaders();
  if (json !== null) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: json !== null ? JSON.stringify(json) : body });
  if (response.status === 401) {
    $("token-box").hidden = false;
    $("token").focus();
    throw new Error("this server needs an access token: enter it above and try again");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (error) { /* not JSON */ }
    const error = new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
    error.status = response.status;
    throw error;
  }
  return response;
}

const getJSON = async (path, options) => (await call(path, options)).json();
const reviewer = () => $("reviewer").value.trim() || "anonymous";

async function connect() {
  const health = await (await fetch("/health")).json();
  state.classes = health.classes;
  $("model").textContent = `${health.model}, ${health.image_size} px, bloodcell ${health.version}`;
  $("token-box").hidden = !health.token_required || Boolean(state.token);
  for (const select of [$("filter-class"), $("detail-class")]) {
    for (const name of state.classes) select.append(new Option(name, name));
  }
  $("reviewer").value = localStorage.getItem("bloodcell-reviewer") || "";
  await listReviews();
}

// ------------------------------------------------------------------ reviews

async function listReviews() {
  const list = $("review-list");
  const chosen = list.value;
  list.replaceChildren(new Option("a new review", ""));
  for (const review of await getJSON("/reviews")) {
    const done = review.finished ? ", finished" : "";
    list.append(new Option(`${review.title} (${review.cells} cells, ${review.corrected} corrected${done})`, review.id));
  }
  list.value = chosen;
}

async function openReview(id) {
  if (!id) {
    Object.assign(state, { review: null, cells: [], images: {}, summary: null });
    $("review-title").value = "";
    render();
    return;
  }
  const data = await getJSON(`/reviews/${id}`);
  state.review = data.review;
  state.cells = data.cells;
  state.images = Object.fromEntries(data.images.map((image) => [image.id, image]));
  state.summary = data.summary;
  $("review-list").value = String(id);
  $("review-title").value = data.review.title;
  $("wbc-count").value = data.review.wbc_count ?? "";
  render();
}

async function ensureReview() {
  if (state.review) return state.review.id;
  const title = $("review-title").value.trim() || `review of ${new Date().toLocaleString()}`;
  const { id } = await getJSON("/reviews", { method: "POST", json: { title, reviewer: reviewer() } });
  await listReviews();
  await openReview(id);
  return id;
}

// ------------------------------------------------------------------ adding images

function imageFiles(files) {
  return [...files].filter((file) => file.type.startsWith("image/") || /\.(jpe?g|png|bmp|tiff?|webp|gif)$/i.test(file.name));
}

async function addFiles(files) {
  const todo = imageFiles(files);
  if (!todo.length) { $("status").textContent = "no image files there"; return; }
  const id = await ensureReview();
  const progress = $("progress");
  Object.assign(progress, { hidden: false, max: todo.length, value: 0 });
  let failed = false;
  for (let start = 0; start < todo.length; start += BATCH) {
    const batch = todo.slice(start, start + BATCH);
    $("status").textContent = `classifying ${start + 1}–${start + batch.length} of ${todo.length}…`;
    const form = new FormData();
    for (const file of batch) {
      const name = file.webkitRelativePath || file.name;
      form.append("files", file, name);
      state.files[name] = file;
    }
    try {
      const result = await getJSON(`/reviews/${id}/images`, { method: "POST", body: form });
      state.cells.push(...result.cells);
      for (const image of result.images) state.images[image.id] = image;
      state.summary = result.summary;
    } catch (error) {
      failed = true;
      $("status").textContent = `stopped: ${error.message}`;
      break;
    }
    progress.value = start + batch.length;
    render();
  }
  if (!failed) $("status").textContent = `${todo.length} images added: ${state.cells.length} cells in this review`;
  progress.hidden = true;
  await listReviews();
  render();
}

// ------------------------------------------------------------------ the grid

const flagged = (cell) => Boolean(cell.record.review || cell.record.error);
const counted = (cell) => cell.record.counted !== false && !cell.record.error && cell.record.class;
const cellName = (cell) => cell.image_kind === "field" && cell.record.cell
  ? `${cell.name} · cell ${cell.record.cell.index + 1}` : cell.name;

function visibleCells() {
  const wanted = $("filter-class").value;
  const flaggedOnly = $("filter-flagged").checked;
  const cells = state.cells.filter((cell) => (!wanted || cell.class === wanted) && (!flaggedOnly || flagged(cell)));
  const by = {
    name: (a, b) => a.name.localeCompare(b.name) || a.id - b.id,
    class: (a, b) => String(a.class).localeCompare(String(b.class)) || a.name.localeCompare(b.name),
    probability: (a, b) => (a.record.probability ?? -1) - (b.record.probability ?? -1),
    flagged: (a, b) => Number(flagged(b)) - Number(flagged(a)) || a.name.localeCompare(b.name),
  }[$("sort").value];
  return cells.sort(by);
}

function render() {
  const grid = $("grid");
  grid.replaceChildren();
  for (const cell of visibleCells()) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    Object.assign(button, { type: "button", className: "cell" });
    button.dataset.cell = String(cell.id);
    button.dataset.testid = "cell";
    button.classList.toggle("flagged", flagged(cell));
    button.classList.toggle("corrected", cell.corrected);
    button.classList.toggle("failed", Boolean(cell.record.error));
    button.classList.toggle("uncounted", !counted(cell));
    const label = cell.record.error ? "not classified" : (cell.class || "no white cell");
    const reason = cell.record.error || cell.record.review_reason || "";
    button.title = `${cellName(cell)}${reason ? ": " + reason : ""}`;
    button.setAttribute("aria-label", `${cellName(cell)}: ${label}${flagged(cell) ? ", flagged: " + reason : ""}`);
    const image = document.createElement("img");
    image.src = cell.thumbnail || "";
    image.alt = "";
    const cls = document.createElement("span");
    cls.className = "cls";
    cls.textContent = label;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = cell.record.error ? cell.record.error
      : cell.record.probability === null ? "not counted" : `p ${cell.record.probability.toFixed(2)}`;
    if (flagged(cell)) {
      const mark = document.createElement("span");
      mark.className = "flagmark";
      mark.textContent = " ⚑";
      prob.append(mark);
    }
    button.append(image, cls, prob);
    button.addEventListener("click", () => openDetail(cell.id));
    item.append(button);
    grid.append(item);
  }
  const open = Boolean(state.review);
  $("controls").hidden = $("summary").hidden = !state.cells.length;
  $("finish").hidden = $("report").hidden = !open;
  const finished = state.review && state.review.finished;
  $("finish").textContent = finished ? "Reopen review" : "Finish review";
  $("review-state").textContent = !open ? "" : finished
    ? `finished by ${finished.by} at ${new Date(finished.time).toLocaleString()}`
    : `started by ${state.review.created_by || "anonymous"} at ${new Date(state.review.created).toLocaleString()}`;
  renderDifferential();
}

// ------------------------------------------------------------------ the differential count

function differential() {
  // the server's count of the reviewed classes, and how many cells the reviewers corrected
  const summary = state.summary || { per_class: {}, white_cell_differential: {}, classified: 0, white_cells: 0 };
  return { ...summary, corrected: state.cells.filter((cell) => cell.corrected).length };
}

function renderDifferential() {
  const summary = differential();
  const absolute = $("absolute").checked && summary.wbc_count;
  const table = $("differential");
  table.replaceChildren();
  const head = table.insertRow();
  for (const title of ["class", "count", "%", absolute ? "×10⁹/L" : "% of WBC"]) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  for (const name of state.classes) {
    const row = table.insertRow();
    row.dataset.class = name;
    const perClass = (summary.per_class || {})[name] || { count: 0, percent: 0 };
    const wbc = (summary.white_cell_differential || {})[name];
    const last = !wbc ? "–" : absolute ? wbc.per_litre.toFixed(2) : wbc.percent.toFixed(1);
    for (const text of [name, perClass.count, perClass.percent.toFixed(1), last]) row.insertCell().textContent = text;
  }
  const total = table.insertRow();
  for (const text of ["counted", summary.classified, "", ""]) total.insertCell().textContent = text;
  $("corrected").textContent = summary.corrected ? `(${summary.corrected} corrected)` : "";
  const ebl = summary.erythroblasts_per_100_wbc;
  $("wbc").textContent = `${summary.white_cells} white cells from ${summary.images || 0} images`
    + `${summary.fields ? ` (${summary.fields} fields)` : ""}; erythroblasts per 100 WBC: `
    + `${ebl === null || ebl === undefined ? "–" : ebl.toFixed(1)}; platelets counted apart: ${summary.platelets || 0}; `
    + `flagged: ${summary.flagged_for_review || 0}; not counted: ${summary.not_counted || 0}; unreadable: ${summary.failed || 0}`;
  drawChart(summary);
}

function drawChart(summary) {
  const svg = $("chart");
  const width = 320, height = 170, left = 6, right = 36, bottom = 52; // right: room for the slanted last label
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const count = (name) => ((summary.per_class || {})[name] || { count: 0 }).count;
  const most = Math.max(1, ...state.classes.map(count));
  const step = (width - left - right) / Math.max(1, state.classes.length);
  state.classes.forEach((name, i) => {
    const barHeight = ((height - bottom - 12) * count(name)) / most;
    const x = left + i * step + 4;
    const rect = svgElement("rect", { x, y: height - bottom - barHeight, width: step - 8, height: barHeight });
    const value = svgElement("text", { x: x + (step - 8) / 2, y: height - bottom - barHeight - 2, "text-anchor": "middle" });
    value.textContent = count(name);
    const lx = x + (step - 8) / 2, ly = height - bottom + 10;
    const label = svgElement("text", { x: lx, y: ly, transform: `rotate(35 ${lx} ${ly})` });
    label.textContent = name.replace("immature granulocyte", "imm. granulocyte");
    svg.append(rect, value, label);
  });
}

function svgElement(tag, attributes) {
  const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
  Object.entries(attributes).forEach(([k, v]) => element.setAttribute(k, v));
  return element;
}

// ------------------------------------------------------------------ one cell in detail

async function openDetail(id) {
  const cell = state.cells.find((c) => c.id === id);
  if (!cell) return;
  state.current = id;
  const dialog = $("detail");
  $("detail-title").textContent = cellName(cell);
  $("detail-image").src = cell.thumbnail || "";
  $("overlay-caption").textContent = "the framed cell";
  drawField(cell);
  $("detail-review").textContent = cell.record.error || (cell.record.review ? "⚑ " + cell.record.review_reason : "");
  const list = $("detail-topk");
  list.replaceChildren();
  for (const top of cell.record.top_k || []) {
    const item = document.createElement("li");
    item.textContent = `${top.class} ${top.probability.toFixed(3)}`;
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.round(top.probability * 8)}em`;
    item.append(bar);
    list.append(item);
  }
  $("detail-history").textContent = cell.corrections.length
    ? cell.corrections.map((c) => `${c.from} → ${c.to} by ${c.by}, ${new Date(c.time).toLocaleString()}`).join("; ")
    : "not corrected";
  const select = $("detail-class");
  select.value = cell.class || "";
  select.disabled = Boolean(cell.record.error) || !cell.record.class;
  if (!dialog.open) dialog.showModal();
  select.focus();
  const file = state.files[cell.name];
  if (file && cell.image_kind !== "field" && !cell.record.error) {  // Grad-CAM needs the original single-cell file
    try {
      const form = new FormData();
      form.append("files", file, cell.name);
      const explained = await getJSON("/explain", { method: "POST", body: form });
      if (state.current !== id) return;
      $("detail-image").src = explained.overlay;
      $("overlay-caption").textContent = `Grad-CAM for ${explained.explained_class}`;
    } catch (error) {
      $("overlay-caption").textContent = `Grad-CAM unavailable: ${error.message}`;
    }
  }
}

function drawField(cell) {
  const image = state.images[cell.image];
  const svg = $("field-boxes");
  svg.replaceChildren();
  $("field-image").src = image && image.thumbnail ? image.thumbnail : "";
  if (!image || !image.width) return;
  svg.setAttribute("viewBox", `0 0 ${image.width} ${image.height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const siblings = state.cells.filter((c) => c.image === cell.image && c.record.cell);
  for (const other of siblings) {
    const [x0, y0, x1, y1] = other.record.cell.box;
    const rect = svgElement("rect", { x: x0, y: y0, width: x1 - x0, height: y1 - y0 });
    rect.classList.add(other.id === cell.id ? "current" : "other");
    svg.append(rect);
  }
  $("field-caption").textContent = cell.image_kind === "field"
    ? `the field: ${siblings.length} white cell${siblings.length === 1 ? "" : "s"} found`
    : "the image, and the frame the model saw";
}

async function correct(name) {
  const cell = state.cells.find((c) => c.id === state.current);
  if (!cell || cell.record.error || !cell.record.class || name === cell.class) return;
  try {
    const result = await getJSON(`/reviews/${state.review.id}/corrections`, {
      method: "POST", json: { cell: cell.id, class: name, reviewer: reviewer(), expected: cell.class },
    });
    Object.assign(cell, { class: result.cell.class, corrected: result.cell.corrected, corrections: result.cell.corrections });
    state.summary = result.summary;
    $("status").textContent = `${cellName(cell)}: ${name}`;
  } catch (error) {
    $("status").textContent = error.status === 409 ? `not saved: ${error.message.slice(5)}` : `not saved: ${error.message}`;
    if (error.status === 409) await openReview(state.review.id);
  }
  $("detail-class").value = (state.cells.find((c) => c.id === state.current) || {}).class || "";
  render();
}

function move(step) {
  const order = visibleCells().map((cell) => cell.id);
  const at = order.indexOf(state.current);
  if (at >= 0 && order[at + step] !== undefined) openDetail(order[at + step]);
}

// ------------------------------------------------------------------ export, report, finishing

function rows() {
  return state.cells.map((cell) => ({
    file: cell.name,
    cell: cell.record.cell ? cell.record.cell.index : 0,
    model_class: cell.record.class,
    probability: cell.record.probability,
    review: cell.record.review,
    review_reason: cell.record.review_reason,
    reviewer_class: cell.class,
    corrected: cell.corrected,
    counted: counted(cell),
    error: cell.record.error,
  }));
}

async function download(path, name) {
  const blob = await (await call(path)).blob();
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function openReport() {
  const text = await (await call(`/reviews/${state.review.id}/report`)).text();
  const url = URL.createObjectURL(new Blob([text], { type: "text/html" }));
  window.open(url, "_blank");
}

async function toggleFinished() {
  const kind = state.review.finished ? "reopened" : "finished";
  const result = await getJSON(`/reviews/${state.review.id}/events`, { method: "POST", json: { kind, reviewer: reviewer() } });
  state.review = result.review;
  await listReviews();
  render();
}

async function setWbcCount() {
  const value = $("wbc-count").value.trim();
  if (!state.review) return;
  try {
    const result = await getJSON(`/reviews/${state.review.id}/events`, {
      method: "POST", json: { kind: "wbc_count", value, reviewer: reviewer() },
    });
    state.summary = result.summary;
    $("absolute").checked = Boolean(value);
  } catch (error) {
    $("status").textContent = `white-cell count not saved: ${error.message}`;
  }
  renderDifferential();
}

// ------------------------------------------------------------------ wiring

function wire() {
  $("files").addEventListener("change", (event) => addFiles(event.target.files));
  $("folder").addEventListener("change", (event) => addFiles(event.target.files));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(await droppedFiles(event.dataTransfer));
  });
  drop.addEventListener("keydown", (event) => { if (event.key === "Enter") $("files").click(); });
  $("token").addEventListener("change", (event) => {
    state.token = event.target.value.trim();
    sessionStorage.setItem("bloodcell-token", state.token);
  });
  $("reviewer").addEventListener("change", (event) => localStorage.setItem("bloodcell-reviewer", event.target.value.trim()));
  $("review-list").addEventListener("change", (event) => openReview(event.target.value));
  $("finish").addEventListener("click", toggleFinished);
  $("report").addEventListener("click", openReport);
  $("wbc-count").addEventListener("change", setWbcCount);
  $("absolute").addEventListener("change", renderDifferential);
  for (const id of ["sort", "filter-class", "filter-flagged"]) $(id).addEventListener("change", render);
  $("detail-class").addEventListener("change", (event) => correct(event.target.value));
  $("previous").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  $("detail").addEventListener("keydown", (event) => {
    if (/^[1-8]$/.test(event.key) && state.classes[Number(event.key) - 1]) {
      correct(state.classes[Number(event.key) - 1]);
    } else if (event.key === "ArrowRight") {
      event.preventDefault();
      move(1);
    } else if (event.key === "ArrowLeft") {
      event.preventDefault();
      move(-1);
    }
  });
  $("detail").addEventListener("close", () => {
    const button = document.querySelector(`[data-cell="${state.current}"]`);
    if (button) button.focus();
  });
  $("export-csv").addEventListener("click", () => download(`/reviews/${state.review.id}/export.csv`, "bloodcell-review.csv"));
  $("export-json").addEventListener("click", () => download(`/reviews/${state.review.id}/export.json`, "bloodcell-review.json"));
}

async function droppedFiles(transfer) {
  // folders dropped on the page: walk them (webkitGetAsEntry is what every current browser offers)
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (!entries.length) return transfer.files;
  const files = [];
  async function walk(entry, prefix) {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      Object.defineProperty(file, "webkitRelativePath", { value: prefix + file.name });
      files.push(file);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      let batch;
      do {
        batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      } while (batch.length);
    }
  }
  for (const entry of entries) await walk(entry, "");
  return files;
}

window.bloodcell = { state, differential, rows, openReview, listReviews }; // for tests and the curious
wire();
connect().then(render).catch((error) => { $("model").textContent = `cannot reach the server: ${error.message}`; });
