// bloodcell review page: upload cell images, check and correct each cell, export the count.
// Plain browser JavaScript, no dependencies: the page works on a lab network without internet.
"use strict";

const LEUKOCYTES = ["basophil", "eosinophil", "immature granulocyte", "lymphocyte", "monocyte", "neutrophil"];
const BATCH = 32; // files per request: hundreds of images go in steps the progress bar can show

const state = { classes: [], cells: [], current: -1, token: sessionStorage.getItem("bloodcell-token") || "" };
const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ talking to the server

function authHeaders() {
  return state.token ? { Authorization: "Bearer " + state.token } : {};
}

async function post(path, form) {
  const response = await fetch(path, { method: "POST", body: form, headers: authHeaders() });
  if (response.status === 401) {
    $("token-box").hidden = false;
    $("token").focus();
    throw new Error("this server needs an access token: enter it above and add the images again");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (error) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return response.json();
}

async function connect() {
  const health = await (await fetch("/health")).json();
  state.classes = health.classes;
  $("model").textContent = `${health.model}, ${health.image_size} px, bloodcell ${health.version}`;
  $("token-box").hidden = !health.token_required || Boolean(state.token);
  for (const select of [$("filter-class"), $("detail-class")]) {
    for (const name of state.classes) select.append(new Option(name, name));
  }
}

// ------------------------------------------------------------------ adding images

function imageFiles(files) {
  return [...files].filter((file) => file.type.startsWith("image/") || /\.(jpe?g|png|bmp|tiff?)$/i.test(file.name));
}

async function addFiles(files) {
  const todo = imageFiles(files);
  if (!todo.length) { $("status").textContent = "no image files there"; return; }
  const progress = $("progress");
  progress.hidden = false;
  progress.max = todo.length;
  progress.value = 0;
  let failed = 0;
  for (let start = 0; start < todo.length; start += BATCH) {
    const batch = todo.slice(start, start + BATCH);
    $("status").textContent = `classifying ${start + 1}–${start + batch.length} of ${todo.length}…`;
    const form = new FormData();
    for (const file of batch) form.append("files", file, file.webkitRelativePath || file.name);
    try {
      const result = await post("/predict", form);
      result.records.forEach((record, i) => addCell(batch[i], record));
    } catch (error) {
      failed += batch.length;
      $("status").textContent = `stopped: ${error.message}`;
      break;
    }
    progress.value = start + batch.length;
    render();
  }
  if (!failed) $("status").textContent = `${state.cells.length} images classified`;
  progress.hidden = true;
  render();
}

function addCell(file, record) {
  state.cells.push({
    id: state.cells.length,
    name: file.webkitRelativePath || file.name,
    file,
    url: URL.createObjectURL(file),
    record,
    reviewed: null, // the reviewer's class, when it differs from nothing chosen yet
  });
}

const finalClass = (cell) => cell.reviewed || cell.record.class;

// ------------------------------------------------------------------ the grid

function visibleCells() {
  const wanted = $("filter-class").value;
  const flaggedOnly = $("filter-flagged").checked;
  const cells = state.cells.filter((cell) =>
    (!wanted || finalClass(cell) === wanted) && (!flaggedOnly || cell.record.review || cell.record.error));
  const order = $("sort").value;
  const by = {
    name: (a, b) => a.name.localeCompare(b.name),
    class: (a, b) => String(finalClass(a)).localeCompare(String(finalClass(b))) || a.name.localeCompare(b.name),
    probability: (a, b) => (a.record.probability ?? -1) - (b.record.probability ?? -1),
    flagged: (a, b) => Number(Boolean(b.record.review || b.record.error)) - Number(Boolean(a.record.review || a.record.error))
      || a.name.localeCompare(b.name),
  }[order];
  return cells.sort(by);
}

function render() {
  const grid = $("grid");
  grid.replaceChildren();
  for (const cell of visibleCells()) {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = "cell";
    button.dataset.cell = String(cell.id);
    button.dataset.testid = "cell";
    const flagged = cell.record.review || cell.record.error;
    button.classList.toggle("flagged", Boolean(flagged));
    button.classList.toggle("corrected", Boolean(cell.reviewed));
    button.classList.toggle("failed", Boolean(cell.record.error));
    const label = cell.record.error ? "not classified" : finalClass(cell);
    const reason = cell.record.error || cell.record.review_reason || "";
    button.title = `${cell.name}${reason ? ": " + reason : ""}`;
    button.setAttribute("aria-label", `${cell.name}: ${label}${flagged ? ", flagged: " + reason : ""}`);
    const image = document.createElement("img");
    image.src = cell.url;
    image.alt = "";
    const cls = document.createElement("span");
    cls.className = "cls";
    cls.textContent = label;
    const prob = document.createElement("span");
    prob.className = "prob";
    prob.textContent = cell.record.error ? cell.record.error : `p ${cell.record.probability.toFixed(2)}`;
    button.append(image, cls, prob);
    if (flagged) {
      const mark = document.createElement("span");
      mark.className = "flagmark";
      mark.textContent = " ⚑";
      prob.append(mark);
    }
    button.addEventListener("click", () => openDetail(cell.id));
    item.append(button);
    grid.append(item);
  }
  $("controls").hidden = $("summary").hidden = state.cells.length === 0;
  renderDifferential();
}

// ------------------------------------------------------------------ the differential count

function differential() {
  const classified = state.cells.filter((cell) => !cell.record.error);
  const counts = Object.fromEntries(state.classes.map((name) => [name, 0]));
  for (const cell of classified) counts[finalClass(cell)] += 1;
  const wbc = LEUKOCYTES.reduce((sum, name) => sum + (counts[name] || 0), 0);
  const percent = (n, total) => (total ? (100 * n) / total : 0);
  return {
    images: state.cells.length,
    classified: classified.length,
    failed: state.cells.length - classified.length,
    flagged_for_review: classified.filter((cell) => cell.record.review).length,
    corrected: state.cells.filter((cell) => cell.reviewed).length,
    per_class: Object.fromEntries(state.classes.map((name) =>
      [name, { count: counts[name], percent: percent(counts[name], classified.length) }])),
    white_cells: wbc,
    white_cell_differential: Object.fromEntries(LEUKOCYTES.filter((name) => name in counts).map((name) =>
      [name, { count: counts[name], percent: percent(counts[name], wbc) }])),
    erythroblasts_per_100_wbc: wbc ? (100 * (counts.erythroblast || 0)) / wbc : null,
    platelets: counts.platelet || 0,
  };
}

function renderDifferential() {
  const summary = differential();
  const table = $("differential");
  table.replaceChildren();
  const head = table.insertRow();
  for (const title of ["class", "count", "%", "% of WBC"]) {
    const th = document.createElement("th");
    th.textContent = title;
    head.append(th);
  }
  for (const name of state.classes) {
    const row = table.insertRow();
    row.dataset.class = name;
    const wbc = summary.white_cell_differential[name];
    for (const text of [name, summary.per_class[name].count, summary.per_class[name].percent.toFixed(1),
      wbc ? wbc.percent.toFixed(1) : "–"]) row.insertCell().textContent = text;
  }
  const total = table.insertRow();
  for (const text of ["classified", summary.classified, "", ""]) total.insertCell().textContent = text;
  $("corrected").textContent = summary.corrected ? `(${summary.corrected} corrected)` : "";
  const ebl = summary.erythroblasts_per_100_wbc;
  $("wbc").textContent = `${summary.white_cells} white cells; erythroblasts per 100 WBC: ${ebl === null ? "–" : ebl.toFixed(1)}; `
    + `platelets counted apart: ${summary.platelets}; flagged for review: ${summary.flagged_for_review}; `
    + `unreadable: ${summary.failed}`;
  drawChart(summary);
}

function drawChart(summary) {
  const svg = $("chart");
  const width = 320, height = 170, left = 6, right = 36, bottom = 52; // right: room for the slanted last label
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const most = Math.max(1, ...state.classes.map((name) => summary.per_class[name].count));
  const step = (width - left - right) / state.classes.length;
  state.classes.forEach((name, i) => {
    const count = summary.per_class[name].count;
    const barHeight = ((height - bottom - 12) * count) / most;
    const x = left + i * step + 4;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    Object.entries({ x, y: height - bottom - barHeight, width: step - 8, height: barHeight })
      .forEach(([k, v]) => rect.setAttribute(k, v));
    const value = document.createElementNS("http://www.w3.org/2000/svg", "text");
    Object.entries({ x: x + (step - 8) / 2, y: height - bottom - barHeight - 2, "text-anchor": "middle" })
      .forEach(([k, v]) => value.setAttribute(k, v));
    value.textContent = count;
    const label = document.createElementNS("http://www.w3.org/2000/svg", "text");
    const lx = x + (step - 8) / 2, ly = height - bottom + 10;
    Object.entries({ x: lx, y: ly, transform: `rotate(35 ${lx} ${ly})` }).forEach(([k, v]) => label.setAttribute(k, v));
    label.textContent = name.replace("immature granulocyte", "imm. granulocyte");
    svg.append(rect, value, label);
  });
}

// ------------------------------------------------------------------ one cell in detail

async function openDetail(id) {
  const cell = state.cells[id];
  state.current = id;
  const dialog = $("detail");
  $("detail-title").textContent = cell.name;
  $("detail-image").src = cell.url;
  $("detail-overlay").removeAttribute("src");
  $("overlay-caption").textContent = cell.record.error ? "not classified" : "Grad-CAM: loading…";
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
  const select = $("detail-class");
  select.value = finalClass(cell) || "";
  select.disabled = Boolean(cell.record.error);
  if (!dialog.open) dialog.showModal();
  select.focus();
  if (!cell.record.error) {
    try {
      const form = new FormData();
      form.append("files", cell.file, cell.name);
      const explained = await post("/explain", form);
      if (state.current !== id) return;
      $("detail-image").src = explained.image;
      $("detail-overlay").src = explained.overlay;
      $("overlay-caption").textContent = `Grad-CAM for ${explained.explained_class}`;
    } catch (error) {
      $("overlay-caption").textContent = `Grad-CAM unavailable: ${error.message}`;
    }
  }
}

function correct(name) {
  const cell = state.cells[state.current];
  if (!cell || cell.record.error) return;
  cell.reviewed = name === cell.record.class ? null : name;
  $("detail-class").value = finalClass(cell);
  render();
}

function move(step) {
  const order = visibleCells().map((cell) => cell.id);
  const at = order.indexOf(state.current);
  if (at >= 0 && order[at + step] !== undefined) openDetail(order[at + step]);
}

// ------------------------------------------------------------------ export

function rows() {
  return state.cells.map((cell) => ({
    file: cell.name,
    model_class: cell.record.class,
    probability: cell.record.probability,
    review: cell.record.review,
    review_reason: cell.record.review_reason,
    reviewer_class: cell.reviewed || cell.record.class,
    corrected: Boolean(cell.reviewed),
    error: cell.record.error,
  }));
}

function csvText() {
  const quote = (value) => {
    const text = value === null || value === undefined ? "" : String(value);
    return /[",\n]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  };
  const header = ["file", "model_class", "probability", "review", "review_reason", "reviewer_class", "corrected", "error"];
  const lines = [header.join(",")].concat(rows().map((row) => header.map((key) => quote(row[key])).join(",")));
  const summary = differential();
  lines.push("", "class,count,percent,percent_of_white_cells");
  for (const name of state.classes) {
    const wbc = summary.white_cell_differential[name];
    lines.push([quote(name), summary.per_class[name].count, summary.per_class[name].percent.toFixed(2),
      wbc ? wbc.percent.toFixed(2) : ""].join(","));
  }
  return lines.join("\n") + "\n";
}

function download(name, text, type) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
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
  $("export-csv").addEventListener("click", () => download("bloodcell-review.csv", csvText(), "text/csv"));
  $("export-json").addEventListener("click", () => download("bloodcell-review.json",
    JSON.stringify({ cells: rows(), differential: differential() }, null, 2), "application/json"));
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

window.bloodcell = { state, differential, csvText, rows }; // for tests and the curious
wire();
connect().then(render).catch((error) => { $("model").textContent = `cannot reach the server: ${error.message}`; });
