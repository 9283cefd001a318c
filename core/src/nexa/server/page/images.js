// The Images tab: prompt, size, steps and seed in; the PNGs shown as they come back
// (as base64, so no second request needs the API key).

import { call, errorOf, fillModelSelect, say } from "./api.js";

const $ = (id) => document.getElementById(id);

async function generate(event) {
  event.preventDefault();
  const prompt = $("image-prompt").value.trim();
  const model = $("image-model").value;
  if (!prompt || !model) return;
  const body = {
    model,
    prompt,
    size: `${Number($("image-width").value)}x${Number($("image-height").value)}`,
    num_inference_steps: Number($("image-steps").value),
    response_format: "b64_json",
  };
  const seed = $("image-seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  const button = $("image-generate");
  button.disabled = true;
  $("image-results").setAttribute("aria-busy", "true");
  say($("image-status"), "Generating…");
  const started = performance.now();
  try {
    const response = await call("/v1/images/generations", { method: "POST", body });
    if (!response.ok) throw await errorOf(response);
    const result = await response.json();
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    for (const item of result.data) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.src = `data:image/png;base64,${item.b64_json}`;
      img.alt = `Generated from the prompt: ${prompt}`;
      const caption = document.createElement("figcaption");
      caption.textContent = `${prompt} — ${body.size}, ${body.num_inference_steps} steps` +
        (seed !== "" ? `, seed ${seed}` : "") + `, ${seconds} s`;
      figure.append(img, caption);
      $("image-results").prepend(figure);
    }
    say($("image-status"), `Done in ${seconds} s.`);
  } catch (error) {
    say($("image-status"), `Error: ${error.message}`, "error");
  } finally {
    button.disabled = false;
    $("image-results").removeAttribute("aria-busy");
  }
}

export function setupImages() {
  $("image-form").addEventListener("submit", generate);
}

export function showImageModels(models) {
  const usable = fillModelSelect($("image-model"), models, ["image"]);
  say($("image-status"), usable.length ? "" : "No image model in the store.", usable.length ? "" : "error");
}
