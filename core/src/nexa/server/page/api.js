// Talking to this server: JSON calls with the API key, and server-sent event streams.
// The key, when the server has one, is asked for once and kept in this tab's session
// storage only (gone when the tab closes).

const KEY_NAME = "nexa-api-key";
const keyListeners = [];
let keyNeeded = null;

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export function apiKey() {
  return sessionStorage.getItem(KEY_NAME) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_NAME, key);
  else sessionStorage.removeItem(KEY_NAME);
  for (const listener of keyListeners) listener();
}

/** Called when the server answers 401: the page asks for the key. */
export function onKeyNeeded(listener) {
  keyNeeded = listener;
}

/** Called after the key changed: the page reloads what it shows. */
export function onKeyChanged(listener) {
  keyListeners.push(listener);
}

export async function call(path, { method = "GET", body, signal } = {}) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    credentials: "omit",
  });
  if (response.status === 401 && keyNeeded) keyNeeded();
  return response;
}

export async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // Not JSON: the status line says it.
  }
  const message = body?.error?.message || `${response.status} ${response.statusText}`;
  return new ApiError(response.status, message, body?.error);
}

export async function json(path, options) {
  const response = await call(path, options);
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

/** The JSON payloads of a server-sent event stream, until `[DONE]` or its end. */
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    while (true) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/** The models the store holds (`/v1/models`), each with its tasks. */
export async function listModels() {
  const listing = await json("/v1/models");
  return listing.data;
}

export function humanBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let size = n;
  let unit = 0;
  while (size >= 1000 && unit < units.length - 1) {
    size /= 1000;
    unit += 1;
  }
  return unit === 0 ? `${size} B` : `${size.toFixed(1)} ${units[unit]}`;
}

/** Fill a <select> with the models serving one of `tasks`, keeping the current choice. */
export function fillModelSelect(select, models, tasks) {
  const previous = select.value;
  select.replaceChildren();
  const usable = models.filter((m) => m.tasks.some((t) => tasks.includes(t)));
  for (const model of usable) {
    const option = document.createElement("option");
    option.value = model.id;
    option.textContent = `${model.id} (${model.tasks.join(", ")})`;
    option.dataset.tasks = model.tasks.join(",");
    select.append(option);
  }
  if (usable.some((m) => m.id === previous)) select.value = previous;
  select.disabled = usable.length === 0;
  return usable;
}

export function say(element, text, kind = "") {
  element.textContent = text;
  element.dataset.kind = kind;
}
