// Playground: one prompt (or chat message) sent at once to the base model and up to four adapters through the
// OpenAI routes, the answers streaming side by side; with log-probabilities, each token shaded by its
// probability and its alternatives named on hover.

import { streamEvents } from "./api.js";
import { el, formNumbers } from "./dom.js";

const MAX_ADAPTERS = 4;
const TOP = 5;
const $ = (id) => document.getElementById(id);
let base = "";
let running = [];

export function setUp() {
  $("playground-form").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
}

// The models the key may use (GET /v1/models): the base first, then its adapters as checkboxes.
export function setModels(baseModel, adapterIds) {
  base = baseModel;
  const box = $("playground-models");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const choice = (id, isBase) =>
    el("label", { class: "model-choice" }, el("input", { type: "checkbox", value: id, checked: isBase || checked.has(id), onchange: limit }), isBase ? `${id} (base)` : id);
  box.replaceChildren(el("legend", {}, `Base model and up to ${MAX_ADAPTERS} adapters`), choice(base, true), ...adapterIds.map((id) => choice(id, false)));
}

function limit() {
  const adapters = [...$("playground-models").querySelectorAll("input:checked")].filter((i) => i.value !== base);
  for (const input of $("playground-models").querySelectorAll("input:not(:checked)")) {
    input.disabled = input.value !== base && adapters.length >= MAX_ADAPTERS;
  }
}

function params(form) {
  const sent = formNumbers(form, ["max_tokens", "top_k", "seed"], ["temperature", "top_p", "repetition_penalty"]);
  const stop = form.elements.stop.value.trim();
  if (stop) sent.stop = stop.split(",").map((s) => s.trim()).filter(Boolean);
  return sent;
}

function send() {
  for (const controller of running) controller.abort();
  running = [];
  const form = $("playground-form");
  const models = [...$("playground-models").querySelectorAll("input:checked")].map((i) => i.value);
  const chat = form.elements.mode.value === "chat";
  const shade = form.elements.logprobs.checked;
  const prompt = $("prompt").value;
  const body = { ...params(form), stream: true };
  if (chat) Object.assign(body, { messages: [{ role: "user", content: prompt }] }, shade ? { logprobs: true, top_logprobs: TOP } : {});
  else Object.assign(body, { prompt }, shade ? { logprobs: TOP } : {});
  $("playground-error").textContent = "";
  $("answers").replaceChildren(...models.map((model) => answerColumn(model, chat, body)));
}

function answerColumn(model, chat, body) {
  const text = el("div", { class: "text" });
  const status = el("p", { class: "answer-status muted" }, "streaming…");
  const column = el("article", { class: "answer", dataset: { model, state: "streaming" } }, el("h3", {}, model === base ? `${model} (base)` : model), text, status);
  const controller = new AbortController();
  running.push(controller);
  let finish = null;
  streamEvents("POST", chat ? "/v1/chat/completions" : "/v1/completions", {
    json: { ...body, model },
    signal: controller.signal,
    onData: (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message || String(chunk.error));
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      const piece = chat ? choice.delta?.content : choice.text;
      if (piece) text.append(tokenSpan(piece, tokensOf(choice.logprobs, chat)));
      finish = choice.finish_reason || finish;
    },
  })
    .then(() => {
      column.dataset.state = "done";
      status.textContent = `finish: ${finish || "-"}`;
    })
    .catch((error) => {
      if (error.name === "AbortError") return;
      column.dataset.state = "error";
      status.className = "answer-status error";
      status.textContent = error.message;
    });
  return column;
}

// Each token's text, probability and alternatives, from either OpenAI shape of log-probabilities.
function tokensOf(logprobs, chat) {
  if (!logprobs) return [];
  if (chat) {
    return (logprobs.content || []).map((t) => ({ token: t.token, p: Math.exp(t.logprob), top: (t.top_logprobs || []).map((a) => [a.token, Math.exp(a.logprob)]) }));
  }
  return (logprobs.tokens || []).map((token, i) => ({
    token,
    p: Math.exp(logprobs.token_logprobs[i]),
    top: Object.entries((logprobs.top_logprobs || [])[i] || {}).map(([t, lp]) => [t, Math.exp(lp)]),
  }));
}

function tokenSpan(piece, tokens) {
  if (!tokens.length) return el("span", { class: "token" }, piece);
  const p = tokens.reduce((product, t) => product * t.p, 1);
  const hover = tokens
    .map((t) => `${JSON.stringify(t.token)} p=${t.p.toFixed(3)}${t.top.length ? `\n  ${t.top.map(([a, q]) => `${JSON.stringify(a)} ${q.toFixed(3)}`).join("\n  ")}` : ""}`)
    .join("\n");
  // Shade: the less likely the token, the stronger the colour.
  const span = el("span", { class: "token shaded", title: hover, dataset: { p: p.toFixed(6) } }, piece);
  span.style.background = `rgba(255, 140, 0, ${(0.7 * (1 - p)).toFixed(3)})`; // CSSOM: allowed by the CSP
  return span;
}
