// The Models tab: what is resident (refreshed every two seconds while the tab is shown),
// load, unload and pin; pulls from the Hub with a progress bar; the store's models.

import { ApiError, call, errorOf, events, humanBytes, json, say } from "./api.js";

const $ = (id) => document.getElementById(id);
const REFRESH_MS = 2000;

let refreshTimer = null;
let pulling = null; // the AbortController of the pull under way
let onStoreChanged = () => {};

/** A keep-alive countdown for people: "45 s", "4 min 5 s", "1.5 h". */
export function duration(value) {
  if (value === null || value === undefined) return "–";
  if (value >= 3600) return `${(value / 3600).toFixed(1)} h`;
  // Rounded once, before splitting: 299.6 s is "5 min 0 s", never "4 min 60 s".
  const whole = Math.round(value);
  if (whole >= 60) return `${Math.floor(whole / 60)} min ${whole % 60} s`;
  return `${whole} s`;
}

function button(label, onClick, extra = {}) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  Object.assign(b, extra);
  return b;
}

async function admin(path, body) {
  try {
    return await json(`/v1/admin/models/${path}`, { method: "POST", body });
  } finally {
    refreshResident();
  }
}

async function act(description, work) {
  say($("models-status"), `${description}…`);
  try {
    await work();
    say($("models-status"), `${description}: done.`);
  } catch (error) {
    say($("models-status"), `${description}: ${error.message}`, "error");
  }
}

function residentRow(entry) {
  const row = document.createElement("tr");
  row.dataset.model = entry.model;
  const cells = [
    ["Model", entry.model],
    ["Backend", `${entry.backend} on ${entry.device}`],
    ["State", entry.state],
    ["Weights", humanBytes(entry.weights_bytes)],
    ["KV cache", humanBytes(entry.kv_cache_bytes)],
    ["Context", entry.context ?? "–"],
    ["Slots busy", `${entry.slots_busy} / ${entry.slots_total}`],
    ["Queued", entry.queued],
    ["Unloads in", entry.pinned ? "pinned" : duration(entry.expires_in)],
  ];
  for (const [label, value] of cells) {
    const cell = row.insertCell();
    cell.dataset.label = label;
    cell.textContent = String(value);
  }
  const actions = row.insertCell();
  actions.dataset.label = "Actions";
  actions.className = "actions";
  actions.append(
    button("Unload", () => act(`Unloading ${entry.model}`, () => admin("unload", { model: entry.model, mode: "wait" })),
      { title: "Unload once its requests are done" }),
    button("Stop and unload", () => act(`Unloading ${entry.model}`,
      () => admin("unload", { model: entry.model, mode: "cancel" })), { title: "Cancel its requests, then unload" }),
    button(entry.pinned ? "Unpin" : "Pin", () => act(`${entry.pinned ? "Unpinning" : "Pinning"} ${entry.model}`,
      () => admin("pin", { model: entry.model, pinned: !entry.pinned })),
    { title: "A pinned model is never evicted nor unloaded when idle" }),
  );
  actions.lastChild.setAttribute("aria-pressed", String(entry.pinned));
  for (const b of actions.children) b.setAttribute("aria-label", `${b.textContent} ${entry.model}`);
  return row;
}

export async function refreshResident() {
  try {
    const listing = await json("/v1/admin/models");
    const body = $("resident-body");
    body.replaceChildren(...listing.data.map(residentRow));
    $("resident-empty").hidden = listing.data.length > 0;
    say($("resident-note"), `Updated ${new Date().toLocaleTimeString()}.`);
  } catch (error) {
    const text = error instanceof ApiError && error.status === 403
      ? error.message : `Could not list the loaded models: ${error.message}`;
    say($("resident-note"), text, "error");
  }
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(async () => {
    if (!$("panel-models").hidden && document.visibilityState === "visible") await refreshResident();
    scheduleRefresh();
  }, REFRESH_MS);
}

async function load(event) {
  event.preventDefault();
  const body = { model: $("load-model").value };
  const context = $("load-context").value.trim();
  const parallel = $("load-parallel").value.trim();
  const keepAlive = $("load-keep-alive").value.trim();
  if (context) body.context = Number(context);
  if (parallel) body.parallel = Number(parallel);
  if (keepAlive) body.keep_alive = /^-?\d+(\.\d+)?$/.test(keepAlive) ? Number(keepAlive) : keepAlive;
  $("load-submit").disabled = true;
  await act(`Loading ${body.model}`, () => admin("load", body));
  $("load-submit").disabled = false;
}

function showProgress(progress) {
  const bar = $("pull-progress");
  bar.hidden = false;
  if (progress.total) {
    bar.max = progress.total;
    bar.value = progress.done;
  } else {
    bar.removeAttribute("value"); // indeterminate while the size is unknown
  }
  const parts = [`${humanBytes(progress.done)}${progress.total ? ` of ${humanBytes(progress.total)}` : ""}`];
  if (progress.files_total) parts.push(`file ${Math.min(progress.files_done + 1, progress.files_total)} of ${progress.files_total}`);
  if (progress.file) parts.push(progress.file);
  if (progress.speed) parts.push(`${humanBytes(Math.round(progress.speed))}/s`);
  say($("pull-status"), parts.join(" · "));
}

async function pull(event) {
  event.preventDefault();
  const model = $("pull-name").value.trim();
  if (!model || pulling) return;
  const controller = new AbortController();
  pulling = controller;
  $("pull-submit").disabled = true;
  $("pull-cancel").disabled = false;
  $("pull-progress").value = 0;
  say($("pull-status"), `Pulling ${model}…`);
  try {
    const response = await call("/v1/admin/pull", { method: "POST", body: { model }, signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    let finished = null;
    for await (const progress of events(response)) {
      if (progress.error) throw new Error(progress.error.message);
      showProgress(progress);
      if (progress.stage === "done") finished = progress;
    }
    if (!finished) throw new Error("the pull ended before the model was installed");
    say($("pull-status"), `Pulled ${finished.model}.`, "done");
    onStoreChanged();
  } catch (error) {
    const text = error.name === "AbortError" ? "Pull cancelled; nothing was installed." : `Pull failed: ${error.message}`;
    say($("pull-status"), text, "error");
  } finally {
    pulling = null;
    $("pull-submit").disabled = false;
    $("pull-cancel").disabled = true;
  }
}

export function showStoreModels(models) {
  const select = $("load-model");
  const previous = select.value;
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === previous)) select.value = previous;
  const body = $("store-body");
  body.replaceChildren(...models.map((m) => {
    const row = document.createElement("tr");
    for (const [label, value] of [["Model", m.id], ["Format", m.format], ["Quant", m.quant ?? "–"],
      ["Tasks", m.tasks.join(", ")], ["Size", humanBytes(m.size)]]) {
      const cell = row.insertCell();
      cell.dataset.label = label;
      cell.textContent = value;
    }
    return row;
  }));
}

export function setupModels(storeChanged) {
  onStoreChanged = storeChanged;
  $("load-form").addEventListener("submit", load);
  $("pull-form").addEventListener("submit", pull);
  $("pull-cancel").addEventListener("click", () => pulling && pulling.abort());
  $("resident-refresh").addEventListener("click", refreshResident);
  scheduleRefresh();
}

