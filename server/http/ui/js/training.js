// Training: submit a job (POST /v1/training/jobs, forwarded to --trainer), the jobs, and one job live from
// its event stream: phase, progress, the loss curve, and at the end base vs adapter scores.

import { get, request, streamEvents } from "./api.js";
import { scoresTable } from "./adapters.js";
import { lineChart } from "./charts.js";
import { el, fill, formNumbers, when } from "./dom.js";

const $ = (id) => document.getElementById(id);
const INTEGERS = ["rank", "num_virtual_tokens", "epochs", "max_steps", "batch_size", "max_seq_len", "seed"];
const NUMBERS = ["alpha", "learning_rate"];
const ENDED = ["succeeded", "failed", "cancelled", "rejected"];
let watching = null;
let onFinished = () => {};

export function setUp(finished) {
  onFinished = finished;
  $("training-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    await submit(event.target);
  });
}

export function enabled(on) {
  $("training-off").hidden = on;
  $("training-on").hidden = !on;
}

function config(form) {
  const value = (name) => form.elements[name].value.trim();
  const sent = { adapter_id: value("adapter_id"), method: value("method"), ...formNumbers(form, INTEGERS, NUMBERS) };
  const modules = value("target_modules");
  if (modules) sent.target_modules = modules === "all-linear" ? modules : modules.split(",").map((m) => m.trim());
  return sent;
}

async function submit(form) {
  const status = $("training-status");
  const body = new FormData();
  body.append("config", JSON.stringify(config(form)));
  body.append("data", form.elements.data.files[0]);
  if (form.elements.eval_data.files[0]) body.append("eval_data", form.elements.eval_data.files[0]);
  status.className = "";
  status.textContent = "Submitting…";
  try {
    const job = await request("POST", "/v1/training/jobs", { body });
    status.textContent = `Job ${job.id} ${job.status}`;
    await load();
    location.hash = `#training/${job.id}`;
  } catch (error) {
    status.className = "error";
    status.textContent = `${error.status || ""} ${error.message}`.trim();
  }
}

export async function load() {
  const jobs = (await get("/v1/training/jobs")).data;
  $("jobs-table").tBodies[0].replaceChildren(
    ...jobs.map((job) =>
      el(
        "tr",
        { dataset: { id: job.id }, onclick: () => (location.hash = `#training/${job.id}`) },
        el("td", {}, job.adapter_id),
        el("td", {}, job.method),
        el("td", { class: `status ${job.status}` }, job.status),
        el("td", {}, `${job.progress.step}/${job.progress.total_steps}`),
        el("td", {}, when(job.created_at)),
      ),
    ),
  );
  return jobs;
}

// Watch one job: redraw it from each event's job (its loss curve whole, so a late start misses nothing).
export async function watch(jobId) {
  if (watching) watching.abort();
  const controller = (watching = new AbortController());
  const box = $("job-detail");
  box.hidden = false;
  box.dataset.job = jobId;
  let last = null;
  try {
    await streamEvents("GET", `/v1/training/jobs/${encodeURIComponent(jobId)}/events`, {
      signal: controller.signal,
      onData: (event) => {
        if (event.error) throw new Error(event.error.message);
        last = event.job;
        draw(box, event.job);
      },
    });
  } catch (error) {
    if (error.name === "AbortError") return;
    box.append(el("p", { class: "error" }, error.message));
    return;
  }
  if (last && ENDED.includes(last.status)) {
    await load();
    onFinished(last);
  }
}

function draw(box, job) {
  const p = job.progress || {};
  const points = job.loss_curve && job.loss_curve.length ? job.loss_curve : p.step ? [[p.step, p.loss]] : [];
  const adapter = job.adapter;
  box.dataset.status = job.status;
  fill(
    box,
    el("h2", {}, `Job ${job.id}: ${job.adapter_id} (${job.method})`),
    el("p", { class: "job-state" }, el("span", { class: `status ${job.status}` }, job.status), job.phase ? ` · phase: ${job.phase}` : "", ` · step ${p.step || 0}/${p.total_steps || "?"}`, p.loss ? ` · loss ${Number(p.loss).toFixed(4)}` : ""),
    el("progress", { max: p.total_steps || 1, value: p.step || 0 }),
    el("div", { class: "loss-curve" }, lineChart(points, { xLabel: "step", yLabel: "loss" })),
    job.error ? el("p", { class: "error" }, job.error) : null,
    job.metrics ? el("div", {}, el("h3", {}, "Held-out scores"), scoresTable(job.metrics)) : null,
    adapter ? el("p", {}, "Registered: ", el("a", { href: `#adapters/${adapter.id}`, class: "adapter-link" }, `${adapter.id} v${adapter.version}`)) : null,
    !ENDED.includes(job.status) ? el("button", { type: "button", onclick: () => request("POST", `/v1/training/jobs/${encodeURIComponent(job.id)}/cancel`) }, "Cancel") : null,
  );
}
