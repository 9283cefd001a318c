// The page's start: tabs (keyboard: arrow keys, Home, End), the API key dialog, and
// the model lists every tab draws from.

import { apiKey, listModels, onKeyChanged, onKeyNeeded, say, setApiKey } from "./api.js";
import { setupChat, showChatModels } from "./chat.js";
import { setupEmbeddings, showEmbedModels } from "./embeddings.js";
import { setupImages, showImageModels } from "./images.js";
import { refreshResident, setupModels, showStoreModels } from "./models.js";

const $ = (id) => document.getElementById(id);

function tabs() {
  return [...document.querySelectorAll('[role="tab"]')];
}

function selectTab(tab, focus = false) {
  for (const other of tabs()) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    $(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.dataset.name}`);
  if (tab.dataset.name === "models") refreshResident();
}

function setupTabs() {
  for (const tab of tabs()) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const all = tabs();
      const at = all.indexOf(tab);
      const next = { ArrowRight: at + 1, ArrowLeft: at - 1, Home: 0, End: all.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      selectTab(all[(next + all.length) % all.length], true);
    });
  }
  const wanted = tabs().find((t) => `#${t.dataset.name}` === location.hash) || tabs()[0];
  selectTab(wanted);
}

function askForKey() {
  const dialog = $("key-dialog");
  if (dialog.open) return;
  $("key-input").value = apiKey();
  dialog.showModal();
  $("key-input").focus();
}

function setupKeyDialog() {
  $("key-button").addEventListener("click", askForKey);
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey($("key-input").value.trim());
    $("key-dialog").close();
  });
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    $("key-dialog").close();
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close());
  onKeyNeeded(askForKey);
  onKeyChanged(() => {
    $("key-button").textContent = apiKey() ? "API key ✓" : "API key";
    loadModels();
  });
}

async function loadModels() {
  try {
    const models = await listModels();
    showChatModels(models);
    showImageModels(models);
    showEmbedModels(models);
    showStoreModels(models);
    say($("page-status"), "");
  } catch (error) {
    say($("page-status"), `Could not list the models: ${error.message}`, "error");
  }
  if (!$("panel-models").hidden) refreshResident();
}

setupKeyDialog();
setupChat();
setupImages();
setupEmbeddings();
setupModels(loadModels);
setupTabs();
loadModels();
