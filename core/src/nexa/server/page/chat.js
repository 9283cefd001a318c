// The Chat tab: a streamed conversation with a chat or vision model. Reasoning
// (`delta.reasoning_content`) is shown folded apart from the answer; Stop aborts the
// request, which closes the connection, and the server cancels the generation.

import { call, errorOf, events, fillModelSelect, say } from "./api.js";

const $ = (id) => document.getElementById(id);

const history = [];
let running = null; // the AbortController of the answer being streamed
let imageUri = null;

function modelTasks() {
  const option = $("chat-model").selectedOptions[0];
  return option ? option.dataset.tasks.split(",") : [];
}

function showModelTasks() {
  const tasks = modelTasks();
  $("chat-model-tasks").textContent = tasks.length ? `Serves: ${tasks.join(", ")}` : "";
  const vision = tasks.includes("vlm");
  $("chat-image").disabled = !vision;
  $("chat-image-hint").textContent = vision ? "" : "This model does not take images.";
  if (!vision) clearImage();
}

function clearImage() {
  imageUri = null;
  $("chat-image").value = "";
  $("chat-image-preview").replaceChildren();
}

function readImage() {
  const file = $("chat-image").files[0];
  if (!file) {
    clearImage();
    return;
  }
  const reader = new FileReader();
  reader.onload = () => {
    imageUri = reader.result; // a data: URI, sent as the image_url
    const img = document.createElement("img");
    img.src = imageUri;
    img.alt = `Attached: ${file.name}`;
    $("chat-image-preview").replaceChildren(img);
  };
  reader.readAsDataURL(file);
}

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("p");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "Assistant";
  item.append(who);
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  reasoning.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const thoughts = document.createElement("div");
  thoughts.className = "reasoning-text";
  reasoning.append(summary, thoughts);
  const answer = document.createElement("div");
  answer.className = "answer";
  answer.textContent = text;
  const stats = document.createElement("p");
  stats.className = "stats";
  item.append(reasoning, answer, stats);
  $("chat-log").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, reasoning, thoughts, answer, stats };
}

function setRunning(controller) {
  running = controller;
  $("chat-send").disabled = Boolean(controller);
  $("chat-stop").disabled = !controller;
}

function describeSpeed(started, firstAt, endedAt, usage, pieces) {
  const parts = [];
  const tokens = usage ? usage.completion_tokens : pieces;
  parts.push(`${tokens} ${usage ? "tokens" : "pieces"}`);
  if (firstAt !== null) {
    const decode = (endedAt - firstAt) / 1000;
    if (tokens > 1 && decode > 0) parts.push(`${((tokens - 1) / decode).toFixed(1)} tokens/s`);
    parts.push(`first token ${Math.round(firstAt - started)} ms`);
  }
  return parts.join(" · ");
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  const model = $("chat-model").value;
  if (!text || !model || running) return;
  const content = imageUri
    ? [{ type: "text", text }, { type: "image_url", image_url: { url: imageUri } }]
    : text;
  const shown = addMessage("user", text);
  if (imageUri) {
    const img = document.createElement("img");
    img.src = imageUri;
    img.alt = "Attached image";
    shown.answer.append(img);
  }
  history.push({ role: "user", content });
  $("chat-input").value = "";
  clearImage();

  const messages = [];
  const system = $("chat-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history);
  const body = {
    model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("chat-temperature").value),
    max_tokens: Number($("chat-max-tokens").value),
  };

  const out = addMessage("assistant", "");
  out.item.setAttribute("aria-busy", "true");
  const controller = new AbortController();
  setRunning(controller);
  const started = performance.now();
  let firstAt = null;
  let usage = null;
  let pieces = 0;
  let answer = "";
  let ending = "";
  try {
    const response = await call("/v1/chat/completions", { method: "POST", body, signal: controller.signal });
    if (!response.ok) throw await errorOf(response);
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta;
      if (!delta) continue;
      if (delta.reasoning_content) {
        out.reasoning.hidden = false;
        out.thoughts.textContent += delta.reasoning_content;
      }
      if (delta.content) {
        answer += delta.content;
        out.answer.textContent = answer;
      }
      if ((delta.content || delta.reasoning_content) && firstAt === null) firstAt = performance.now();
      if (delta.content || delta.reasoning_content) pieces += 1;
      const finish = chunk.choices[0].finish_reason;
      if (finish === "length") ending = " · cut at max tokens";
    }
  } catch (error) {
    if (error.name === "AbortError") {
      ending = " · stopped";
    } else {
      out.item.classList.add("failed");
      ending = ` · error: ${error.message}`;
    }
  } finally {
    setRunning(null);
    out.item.removeAttribute("aria-busy");
  }
  out.stats.textContent = describeSpeed(started, firstAt, performance.now(), usage, pieces) + ending;
  // A turn that produced nothing (an error) leaves the conversation as it was.
  if (answer) history.push({ role: "assistant", content: answer });
  else history.pop();
  $("chat-input").focus();
}

function stop() {
  if (running) running.abort();
}

function clearChat() {
  stop();
  history.length = 0;
  $("chat-log").replaceChildren();
  say($("chat-note"), "");
}

export function setupChat() {
  $("chat-form").addEventListener("submit", send);
  $("chat-stop").addEventListener("click", stop);
  $("chat-clear").addEventListener("click", clearChat);
  $("chat-model").addEventListener("change", showModelTasks);
  $("chat-image").addEventListener("change", readImage);
  $("chat-input").addEventListener("keydown", (event) => {
    // Enter sends, Shift+Enter starts a new line (as in most chat programs).
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
}

export function showChatModels(models) {
  const usable = fillModelSelect($("chat-model"), models, ["chat", "vlm"]);
  say($("chat-note"), usable.length ? "" : "No chat model in the store: pull one on the Models tab.", "error");
  showModelTasks();
}
