// The Embeddings tab: several texts in, their pairwise cosine similarity out as a heat
// map. The map is a table (each cell coloured by its value and labelled with it), so a
// screen reader reads the same numbers the colours show.

import { call, errorOf, fillModelSelect, say } from "./api.js";

const $ = (id) => document.getElementById(id);

function cosine(a, b) {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i += 1) {
    dot += a[i] * b[i];
    na += a[i] * a[i];
    nb += b[i] * b[i];
  }
  return na && nb ? dot / Math.sqrt(na * nb) : 0;
}

// -1 .. 1 onto a blue (unlike) to white to red (alike) scale.
function colour(value) {
  const t = Math.max(-1, Math.min(1, value));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(255, ${fade}, ${fade})` : `rgb(${fade}, ${fade}, 255)`;
}

function short(text) {
  return text.length > 24 ? `${text.slice(0, 23)}…` : text;
}

function heatMap(texts, vectors) {
  const table = document.createElement("table");
  table.className = "heatmap";
  const caption = document.createElement("caption");
  caption.textContent = "Cosine similarity of each pair of texts (1: same direction)";
  table.append(caption);
  const head = table.createTHead().insertRow();
  head.append(document.createElement("td"));
  texts.forEach((text, i) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.textContent = `${i + 1}`;
    th.title = text;
    head.append(th);
  });
  const body = table.createTBody();
  texts.forEach((text, i) => {
    const row = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = `${i + 1}. ${short(text)}`;
    th.title = text;
    row.append(th);
    vectors.forEach((_, j) => {
      const value = cosine(vectors[i], vectors[j]);
      const cell = row.insertCell();
      cell.textContent = value.toFixed(2);
      cell.style.backgroundColor = colour(value);
      cell.dataset.value = value.toFixed(4);
    });
  });
  return table;
}

async function compare(event) {
  event.preventDefault();
  const texts = $("embed-texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  const model = $("embed-model").value;
  if (texts.length < 2) {
    say($("embed-status"), "Write at least two texts, one per line.", "error");
    return;
  }
  $("embed-compare").disabled = true;
  say($("embed-status"), "Embedding…");
  try {
    const response = await call("/v1/embeddings", { method: "POST", body: { model, input: texts } });
    if (!response.ok) throw await errorOf(response);
    const result = await response.json();
    const vectors = result.data.sort((a, b) => a.index - b.index).map((d) => d.embedding);
    $("embed-result").replaceChildren(heatMap(texts, vectors));
    say($("embed-status"), `${texts.length} texts, ${vectors[0].length} dimensions, ${result.usage.prompt_tokens} tokens.`);
  } catch (error) {
    say($("embed-status"), `Error: ${error.message}`, "error");
  } finally {
    $("embed-compare").disabled = false;
  }
}

export function setupEmbeddings() {
  $("embed-form").addEventListener("submit", compare);
}

export function showEmbedModels(models) {
  const usable = fillModelSelect($("embed-model"), models, ["embed"]);
  say($("embed-status"), usable.length ? "" : "No embedding model in the store.", usable.length ? "" : "error");
}
