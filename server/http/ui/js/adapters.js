// Adapters: the table (GET /v1/adapters, with requests and tokens from /metrics), a detail view, upload,
// replace and delete (PUT / DELETE /v1/adapters/{id}), each showing the server's own messages.

import { ApiError, get, request, parseMetrics } from "./api.js";
import { bytes, el, fill, number, table, when } from "./dom.js";

const CONFIG = "adapter_config.json";
const WEIGHTS = "adapter_model.safetensors";
const $ = (id) => document.getElementById(id);
let adapters = [];
let served = { requests: {}, tokens: {} };
let chosen = [];

export function setUp() {
  for (const id of ["adapter-filter", "adapter-type-filter", "adapter-residency-filter"]) {
    $(id).addEventListener("input", render);
  }
  $("adapters-refresh").addEventListener("click", load);
  $("upload-files").addEventListener("change", (event) => choose([...event.target.files]));
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    choose(await droppedFiles(event.dataTransfer));
  });
  $("upload-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    await upload($("upload-id").value.trim(), chosen);
  });
}

export async function load() {
  const [list, metrics] = await Promise.all([get("/v1/adapters"), get("/metrics").catch(() => "")]);
  adapters = list.data;
  const parsed = parseMetrics(metrics, "adapter");
  served = {
    requests: parsed.adapterd_requests_total || {},
    tokens: parsed.adapterd_adapter_generated_tokens_total || {},
  };
  const types = [...new Set(adapters.map((a) => a.type))].sort();
  const select = $("adapter-type-filter");
  const keep = select.value;
  select.replaceChildren(el("option", { value: "" }, "every type"), ...types.map((t) => el("option", {}, t)));
  select.value = types.includes(keep) ? keep : "";
  render();
  return adapters;
}

export const adapterIds = () => adapters.map((a) => a.id);

// Requests and tokens of an adapter: its own series, or (a tenant's adapter) its tenant's `tenant/*` series.
function servedBy(metric, id) {
  if (id in metric) return String(metric[id]);
  const slash = id.lastIndexOf("/");
  const tenant = slash >= 0 ? `${id.slice(0, slash)}/*` : null;
  return tenant && tenant in metric ? `${metric[tenant]} (tenant)` : "0";
}

function render() {
  const text = $("adapter-filter").value.trim().toLowerCase();
  const type = $("adapter-type-filter").value;
  const residency = $("adapter-residency-filter").value;
  const shown = adapters.filter(
    (a) =>
      (!text || a.id.toLowerCase().includes(text) || (a.target_modules || []).join(" ").toLowerCase().includes(text)) &&
      (!type || a.type === type) &&
      (!residency || a.residency === residency),
  );
  $("adapters-table").tBodies[0].replaceChildren(
    ...shown.map((a) =>
      el(
        "tr",
        { dataset: { id: a.id }, tabindex: 0, onclick: () => showDetail(a.id) },
        el("td", { class: "id" }, a.id),
        el("td", {}, a.type),
        el("td", {}, String(a.rank ?? a.num_virtual_tokens ?? "-")),
        el("td", {}, (a.target_modules || []).join(", ") || "-"),
        el("td", {}, String(a.version)),
        el("td", {}, bytes(a.size_bytes)),
        el("td", { class: `residency ${a.residency}` }, a.residency),
        el("td", {}, when(a.created_at)),
        el("td", { class: "requests" }, servedBy(served.requests, a.id)),
        el("td", { class: "tokens" }, servedBy(served.tokens, a.id)),
      ),
    ),
  );
  $("adapters-note").textContent = `${shown.length} of ${adapters.length} adapters`;
}

async function showDetail(id) {
  const box = $("adapter-detail");
  box.hidden = false;
  let a;
  try {
    a = await get(`/v1/adapters/${encodeURIComponent(id)}`);
  } catch (error) {
    box.replaceChildren(el("p", { class: "error" }, error.message));
    return;
  }
  const metadata = a.metadata || {};
  const fields = ["id", "type", "rank", "alpha", "num_virtual_tokens", "target_modules", "base_model", "version", "sha256", "size_bytes", "created_at", "residency"];
  fill(
    box,
    el("h2", {}, a.id),
    el("dl", {}, fields.filter((f) => a[f] !== undefined && a[f] !== null).flatMap((f) => [el("dt", {}, f), el("dd", {}, Array.isArray(a[f]) ? a[f].join(", ") : String(a[f]))])),
    metadata.job_id ? el("p", {}, "Trained by job ", el("a", { href: `#training/${metadata.job_id}` }, metadata.job_id), ` (${metadata.method || "?"})`) : null,
    metadata.metrics ? scoresTable(metadata.metrics) : null,
    Object.keys(metadata).length ? el("details", {}, el("summary", {}, "metadata"), el("pre", {}, JSON.stringify(metadata, null, 2))) : null,
    el(
      "div",
      { class: "row" },
      el("button", { type: "button", onclick: () => prepareReplace(a.id) }, "Replace…"),
      el("button", { type: "button", class: "danger", onclick: () => remove(a.id) }, "Delete"),
    ),
    el("p", { id: "detail-status", role: "status" }),
  );
}

// {"base": scores, "adapter": scores} -> a table of each score for the base and the adapter.
export function scoresTable(metrics) {
  const names = ["exact_match", "rouge1", "rouge2", "rougeL"].filter((n) => metrics.base?.[n] !== undefined || metrics.adapter?.[n] !== undefined);
  return el(
    "div",
    { class: "scores" },
    table(["score", "base", "adapter"], names.map((n) => [n, number(metrics.base?.[n]), number(metrics.adapter?.[n])])),
  );
}

function prepareReplace(id) {
  $("upload-id").value = id;
  $("drop-zone").focus();
  $("upload-status").textContent = `Drop the new files for ${id}: they replace it as version ${adapters.find((a) => a.id === id)?.version + 1}.`;
}

async function remove(id) {
  if (!confirm(`Delete ${id}?`)) return;
  try {
    await request("DELETE", `/v1/adapters/${encodeURIComponent(id)}`);
    $("adapter-detail").hidden = true;
    await load();
  } catch (error) {
    $("detail-status").textContent = error.message;
    $("detail-status").className = "error";
  }
}

function choose(files) {
  chosen = files;
  $("upload-chosen").textContent = files.length ? files.map((f) => `${f.name} (${bytes(f.size)})`).join(", ") : "";
}

// A dropped directory (read through its entries), or the files themselves.
async function droppedFiles(transfer) {
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry()).filter(Boolean);
  if (!entries.some((e) => e.isDirectory)) return [...transfer.files];
  const files = [];
  for (const entry of entries) {
    if (entry.isFile) files.push(await new Promise((ok, fail) => entry.file(ok, fail)));
    else {
      const children = await new Promise((ok, fail) => entry.createReader().readEntries(ok, fail));
      for (const child of children) if (child.isFile) files.push(await new Promise((ok, fail) => child.file(ok, fail)));
    }
  }
  return files;
}

// The two PEFT files as multipart, or one tar archive as the body: the API's two upload forms.
function uploadBody(files) {
  const config = files.find((f) => f.name === CONFIG);
  const weights = files.find((f) => f.name === WEIGHTS);
  if (config || weights) {
    const form = new FormData();
    for (const f of [config, weights].filter(Boolean)) form.append(f.name, f, f.name);
    return { body: form };
  }
  const archive = files.find((f) => /\.(tar|tar\.gz|tgz)$/.test(f.name));
  if (archive) return { body: archive, contentType: archive.name.endsWith(".tar") ? "application/x-tar" : "application/gzip" };
  return null;
}

async function upload(id, files) {
  const status = $("upload-status");
  status.className = "";
  const body = uploadBody(files);
  if (!id || !body) {
    status.className = "error";
    status.textContent = !id ? "Give the adapter an id." : `Choose ${CONFIG} and ${WEIGHTS}, or a tar archive of the adapter directory.`;
    return;
  }
  status.textContent = "Uploading…";
  try {
    const a = await request("PUT", `/v1/adapters/${encodeURIComponent(id)}`, body);
    status.textContent = `${a.id}: version ${a.version} (${a.type}, ${bytes(a.size_bytes)})`;
    status.dataset.outcome = "ok";
    choose([]);
    await load();
    await showDetail(a.id);
  } catch (error) {
    status.className = "error";
    status.dataset.outcome = "error";
    status.textContent = error instanceof ApiError ? `${error.status}: ${error.message}` : String(error);
  }
}
