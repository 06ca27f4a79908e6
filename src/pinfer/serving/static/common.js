// Shared by the chat page and the dashboard: the API key and authenticated calls.
// The pages load without a key; every API call carries `Authorization: Bearer <key>`
// when one is set, and a 401 opens the key dialog.
"use strict";

const KEY_STORAGE = "pinfer.apiKey";

class AuthError extends Error {}

const api = {
  key() { return localStorage.getItem(KEY_STORAGE) || ""; },

  setKey(key) {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  },

  headers(extra = {}) {
    const headers = { ...extra };
    const key = api.key();
    if (key) headers["Authorization"] = "Bearer " + key;
    return headers;
  },

  // fetch() with the key; throws AuthError (after asking for the key) on 401.
  async fetch(path, options = {}) {
    const response = await fetch(path, { ...options, headers: api.headers(options.headers) });
    if (response.status === 401) {
      askForKey("The server needs an API key (started with --api-key).");
      throw new AuthError("missing or wrong API key");
    }
    return response;
  },

  async json(path, options = {}) {
    const response = await api.fetch(path, options);
    const body = await response.json();
    if (!response.ok) throw new Error(errorMessage(body, response.status));
    return body;
  },
};

function errorMessage(body, status) {
  return (body && body.error && body.error.message) || `HTTP ${status}`;
}

// Callbacks run after a key is saved (the page retries what failed).
const keyListeners = [];

function askForKey(reason) {
  const dialog = document.getElementById("key-dialog");
  if (dialog.open) return;
  document.getElementById("key-reason").textContent = reason || "";
  document.getElementById("key-input").value = api.key();
  dialog.showModal();
}

function setUpKeyDialog() {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    api.setKey(document.getElementById("key-input").value.trim());
    dialog.close();
    keyListeners.forEach((listener) => listener());
  });
  document.getElementById("key-cancel").addEventListener("click", () => dialog.close());
  document.getElementById("key-button").addEventListener("click", () => askForKey(""));
}

// Small DOM helper: el("div", {class: "x"}, "text", child). Text is always set as text, never HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function formatSeconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}

function formatPercent(x) {
  return x === null || x === undefined ? "–" : `${(x * 100).toFixed(1)}%`;
}
