// The chat page: a conversation kept in the page, streamed through POST /v1/chat/completions (SSE).
//
// Safety: model output never reaches innerHTML unescaped. While a reply streams it is set as
// text; once done it is rendered as markdown with raw HTML escaped (so "<script>" shows as
// text), then sanitized by DOMPurify; the page's Content-Security-Policy blocks inline scripts.
"use strict";

const $ = (id) => document.getElementById(id);

const conversation = []; // [{role, content}], the system prompt is added per request
let current = null; // the reply streaming now: {controller, message}

// ---- markdown -------------------------------------------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

let markdown = null; // built once the deferred vendor scripts have run

function renderMarkdown(text) {
  if (!markdown) {
    // raw HTML in the model's markdown is shown as text, not interpreted
    markdown = new marked.Marked({ gfm: true, breaks: true, renderer: { html: ({ text }) => escapeHtml(text) } });
    DOMPurify.addHook("afterSanitizeAttributes", (node) => {
      if (node.tagName === "A") { node.setAttribute("target", "_blank"); node.setAttribute("rel", "noopener noreferrer"); }
    });
  }
  return DOMPurify.sanitize(markdown.parse(text), { USE_PROFILES: { html: true } });
}

// ---- one assistant reply --------------------------------------------------------------------

// Token background by probability: red (unlikely) through yellow to green (certain).
function probabilityColor(p) {
  return `hsla(${Math.round(120 * p)}, 75%, 50%, ${0.12 + 0.28 * (1 - p)})`;
}

class AssistantMessage {
  constructor(withLogprobs) {
    this.text = "";
    this.tokens = []; // OpenAI chat logprobs entries: {token, logprob, top_logprobs}
    this.withLogprobs = withLogprobs;
    this.view = withLogprobs ? "tokens" : "text";
    this.started = performance.now();
    this.firstTokenAt = null;
    this.lastTokenAt = null;
    this.numTokens = 0;
    this.exactCount = false; // from usage or logprobs; else counted from chunks
    this.finishReason = null;

    this.status = el("span", { class: "status", "data-state": "streaming" }, "generating…");
    this.toggle = el("span", { class: "toggle" });
    this.content = el("div", { class: "content text plain" });
    this.tokenView = el("div", { class: "content tokens" });
    this.stats = el("div", { class: "stats" });
    this.node = el("div", { class: "msg assistant" },
      el("div", { class: "meta" }, el("span", { class: "role" }, "assistant"), this.toggle, this.status),
      this.content, this.tokenView, this.stats);
    this.showView();
  }

  append(delta, logprobs) {
    const now = performance.now();
    if (delta || logprobs.length) {
      this.firstTokenAt ??= now;
      this.lastTokenAt = now;
    }
    this.text += delta;
    this.content.textContent = this.text; // plain text while streaming
    for (const entry of logprobs) {
      this.tokenView.append(this.tokenSpan(entry, this.tokens.length));
      this.tokens.push(entry);
    }
    this.numTokens += logprobs.length || (delta ? 1 : 0); // without logprobs: about one token a chunk
    if (logprobs.length) this.exactCount = true;
  }

  tokenSpan(entry, index) {
    const span = el("span", { class: "tok", "data-index": String(index) }, entry.token);
    span.style.backgroundColor = probabilityColor(Math.exp(entry.logprob));
    return span;
  }

  finish(state, message) {
    this.status.dataset.state = state;
    this.status.textContent = { done: "", stopped: "stopped", error: "error" }[state];
    if (message) this.stats.textContent = message;
    if (state !== "error") {
      this.content.classList.remove("plain");
      this.content.innerHTML = renderMarkdown(this.text);
      this.showStats();
    }
    if (this.tokens.length) {
      this.toggle.replaceChildren(this.toggleButton("text", "Text"), this.toggleButton("tokens", "Tokens"));
    } else {
      this.view = "text";
    }
    this.showView();
  }

  toggleButton(view, label) {
    const button = el("button", { type: "button", class: "ghost small", "data-view": view }, label);
    button.addEventListener("click", () => { this.view = view; this.showView(); });
    return button;
  }

  showView() {
    const tokens = this.view === "tokens" && this.withLogprobs;
    this.content.hidden = tokens;
    this.tokenView.hidden = !tokens;
    for (const b of this.toggle.querySelectorAll("button")) b.classList.toggle("active", b.dataset.view === this.view);
  }

  setUsage(usage) {
    if (usage && usage.completion_tokens !== undefined) {
      this.numTokens = usage.completion_tokens;
      this.exactCount = true;
    }
  }

  showStats() {
    const parts = [`${this.exactCount ? "" : "~"}${this.numTokens} tokens`];
    if (this.firstTokenAt !== null) parts.push(`TTFT ${formatSeconds((this.firstTokenAt - this.started) / 1000)}`);
    if (this.numTokens > 1 && this.lastTokenAt > this.firstTokenAt) {
      parts.push(`${((this.numTokens - 1) / ((this.lastTokenAt - this.firstTokenAt) / 1000)).toFixed(1)} tok/s`);
    }
    if (this.finishReason) parts.push(`finish: ${this.finishReason}`);
    this.stats.textContent = parts.join(" · ");
  }
}

// ---- the logprob tooltip --------------------------------------------------------------------

function showTooltip(span, entry) {
  const tooltip = $("tooltip");
  const p = Math.exp(entry.logprob);
  const rows = (entry.top_logprobs || []).map((alt) => {
    const q = Math.exp(alt.logprob);
    const bar = el("span", { class: "bar" });
    bar.style.width = `${Math.max(1, Math.round(q * 60))}px`;
    return el("tr", { class: alt.token === entry.token ? "alt chosen" : "alt" },
      el("td", { class: "alt-token" }, JSON.stringify(alt.token)),
      el("td", { class: "alt-p" }, formatPercent(q)),
      el("td", {}, bar));
  });
  tooltip.replaceChildren(
    el("div", { class: "tip-token" }, JSON.stringify(entry.token)),
    el("div", { class: "tip-p" }, `p = ${formatPercent(p)}`, el("span", { class: "muted" }, `  logprob ${entry.logprob.toFixed(4)}`)),
    rows.length ? el("table", { class: "alts" }, ...rows) : el("div", { class: "muted" }, "no alternatives requested"));
  tooltip.hidden = false;
  const box = span.getBoundingClientRect();
  const width = tooltip.offsetWidth;
  tooltip.style.left = `${Math.min(window.innerWidth - width - 8, Math.max(8, box.left))}px`;
  const below = box.bottom + 6;
  tooltip.style.top = `${below + tooltip.offsetHeight < window.innerHeight ? below : box.top - tooltip.offsetHeight - 6}px`;
}

function setUpTooltip(messages) {
  messages.addEventListener("mouseover", (event) => {
    const span = event.target.closest(".tok");
    if (!span) return;
    const message = span.closest(".msg").pinferMessage;
    showTooltip(span, message.tokens[Number(span.dataset.index)]);
  });
  messages.addEventListener("mouseout", (event) => {
    if (event.target.closest(".tok")) $("tooltip").hidden = true;
  });
}

// ---- sending --------------------------------------------------------------------------------

function numberField(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: numberField("temperature"), top_p: numberField("top-p"), top_k: numberField("top-k"),
    max_tokens: numberField("max-tokens"), seed: numberField("seed"),
  };
  if ($("logprobs").checked) {
    body.logprobs = true;
    body.top_logprobs = numberField("top-logprobs") ?? 0;
  }
  return body;
}

// Yields the JSON of each `data:` event of an SSE response until [DONE].
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function addUserMessage(text) {
  $("empty")?.remove();
  const node = el("div", { class: "msg user" }, el("div", { class: "meta" }, el("span", { class: "role" }, "you")),
    el("div", { class: "content plain" }, text));
  $("messages").append(node);
}

function scrollToEnd() {
  const messages = $("messages");
  messages.scrollTop = messages.scrollHeight;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addUserMessage(text);
  const body = requestBody();
  const message = new AssistantMessage(Boolean(body.logprobs));
  message.node.pinferMessage = message;
  $("messages").append(message.node);
  scrollToEnd();
  const controller = new AbortController();
  current = { controller, message };
  setBusy(true);
  let state = "done", note = "";
  try {
    const response = await api.fetch("/v1/chat/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(errorMessage(await response.json().catch(() => null), response.status));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      message.setUsage(chunk.usage);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      message.append((choice.delta && choice.delta.content) || "", (choice.logprobs && choice.logprobs.content) || []);
      if (choice.finish_reason) message.finishReason = choice.finish_reason;
      scrollToEnd();
    }
  } catch (error) {
    // Aborting the fetch closes the connection; the server then aborts the request and frees its KV blocks.
    if (error.name === "AbortError") state = "stopped";
    else { state = "error"; note = error instanceof AuthError ? "API key needed: set it and send again." : error.message; }
  } finally {
    current = null;
    setBusy(false);
  }
  if (message.text || state !== "error") conversation.push({ role: "assistant", content: message.text });
  else conversation.pop(); // nothing came back: let the user retry the same message
  message.finish(state, note);
  scrollToEnd();
}

// ---- wiring ---------------------------------------------------------------------------------

async function loadModel() {
  try {
    const models = await api.json("/v1/models");
    $("model-name").textContent = models.data.map((m) => m.id).join(", ");
  } catch (error) {
    if (!(error instanceof AuthError)) $("model-name").textContent = `server unreachable: ${error.message}`;
  }
}

function newChat() {
  if (current) current.controller.abort();
  conversation.length = 0;
  $("messages").replaceChildren(el("div", { id: "empty", class: "empty" }, "New conversation."));
}

document.addEventListener("DOMContentLoaded", () => {
  setUpKeyDialog();
  keyListeners.push(loadModel);
  setUpTooltip($("messages"));
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || current) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => current && current.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  loadModel();
});
