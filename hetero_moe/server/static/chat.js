// The chat page: talks to this server's own OpenAI API (/v1/models, /v1/chat/completions, streamed).
// No build step and nothing from the internet. Model text is shown through a small Markdown renderer
// that escapes HTML first, so nothing the model writes becomes markup of its own.
"use strict";

const KEY_STORAGE = "hetero-moe-api-key";
const state = { model: null, history: [], controller: null, key: localStorage.getItem(KEY_STORAGE) || "" };
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

function showError(text) {
  const box = $("error");
  box.textContent = text || "";
  box.hidden = !text;
}

async function loadModel() {
  const r = await fetch("/v1/models", { headers: headers() });
  if (r.status === 401) {
    $("key-prompt").hidden = false;
    $("model").textContent = "API key needed";
    $("api-key").focus();
    return;
  }
  if (!r.ok) {
    showError("cannot list the models: HTTP " + r.status);
    return;
  }
  const card = (await r.json()).data[0];
  state.model = card.id;
  $("key-prompt").hidden = true;
  $("model").textContent = card.id + " · context " + card.max_model_len + " tokens";
  showError("");
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function inline(text) {
  // text is escaped already
  return text
    .replace(/`([^`]+)`/g, "<code>$1</code>")
    .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>")
    .replace(/\[([^\]]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" rel="noopener noreferrer" target="_blank">$1</a>');
}

// Markdown: fenced code blocks (closed or still streaming), headings, lists, paragraphs, inline code,
// bold, italics and http(s) links.
function markdown(source) {
  const parts = source.split(/```/);
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const newline = part.indexOf("\n");
      const code = newline >= 0 ? part.slice(newline + 1) : part;
      html += "<pre><code>" + escapeHtml(code) + "</code></pre>";
      return;
    }
    const blocks = escapeHtml(part).split(/\n{2,}/);
    for (const block of blocks) {
      if (!block.trim()) continue;
      const lines = block.split("\n");
      if (lines.every((l) => /^\s*([-*]|\d+\.)\s+/.test(l))) {
        const ordered = /^\s*\d+\./.test(lines[0]);
        const items = lines.map((l) => "<li>" + inline(l.replace(/^\s*([-*]|\d+\.)\s+/, "")) + "</li>").join("");
        html += ordered ? "<ol>" + items + "</ol>" : "<ul>" + items + "</ul>";
      } else if (/^#{1,6}\s/.test(block)) {
        const level = block.match(/^#+/)[0].length;
        html += "<h" + (level + 2 > 6 ? 6 : level + 2) + ">" + inline(block.replace(/^#+\s*/, "")) + "</h" + (level + 2 > 6 ? 6 : level + 2) + ">";
      } else {
        html += "<p>" + inline(block).replace(/\n/g, "<br>") + "</p>";
      }
    }
  });
  return html;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role === "user" ? "You" : state.model || "assistant";
  div.appendChild(label);
  if (role === "assistant") {
    const details = document.createElement("details");
    details.hidden = true;
    const summary = document.createElement("summary");
    summary.textContent = "Reasoning";
    const reasoning = document.createElement("div");
    reasoning.className = "reasoning";
    details.append(summary, reasoning);
    div.appendChild(details);
  }
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  div.appendChild(content);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "";
}

async function send(text) {
  if (!state.model) await loadModel();
  if (!state.model) return;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const div = addMessage("assistant", "");
  div.classList.add("streaming");
  const content = div.querySelector(".content");
  const details = div.querySelector("details");
  const reasoningBox = div.querySelector(".reasoning");
  let answer = "";
  let reasoning = "";
  let finish = null;
  let chunks = 0;
  state.controller = new AbortController();
  setBusy(true);
  showError("");
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify({ model: state.model, messages: state.history, stream: true }),
      signal: state.controller.signal,
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || "HTTP " + r.status);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop();
      for (const line of lines) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (choice.delta.reasoning_content) {
          reasoning += choice.delta.reasoning_content;
          details.hidden = false;
          reasoningBox.textContent = reasoning;
        }
        if (choice.delta.content) {
          answer += choice.delta.content;
          content.innerHTML = markdown(answer);
          div.dataset.chunks = String(++chunks); // how many deltas arrived: the answer streamed
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      div.scrollIntoView({ block: "end" });
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(String(e.message || e));
    finish = finish || "stopped";
  } finally {
    div.classList.remove("streaming");
    content.innerHTML = markdown(answer);
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.textContent = finish === "length" ? "cut at the token limit" : finish === "stopped" ? "stopped" : "";
    div.appendChild(meta);
    div.dataset.done = "1";
    state.history.push({ role: "assistant", content: answer });
    state.controller = null;
    setBusy(false);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("input").value.trim();
    if (!text || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    $("messages").replaceChildren();
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, state.key);
    loadModel();
  });
  loadModel();
});
