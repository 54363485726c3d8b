// Evaluations: the results.json files of `adapterd eval --tasks ... --out DIR` (read in the browser) as a table
// and one bar chart per task, and the finished training jobs' held-out scores, base vs adapter.

import { barChart } from "./charts.js";
import { el, number, table } from "./dom.js";

const $ = (id) => document.getElementById(id);
const JOB_SCORES = ["exact_match", "rouge1", "rouge2", "rougeL"];

export function setUp() {
  $("eval-files").addEventListener("change", async (event) => {
    $("eval-error").textContent = "";
    const shown = [];
    for (const file of event.target.files) {
      try {
        shown.push(renderRun(file.name, JSON.parse(await file.text())));
      } catch (error) {
        $("eval-error").textContent = `${file.name}: ${error.message}`;
      }
    }
    $("eval-results").replaceChildren(...shown);
  });
}

// "acc,none" and the like: lm-eval's numeric metrics, without their standard errors.
function metricsOf(results, task) {
  return Object.keys(results[task] || {}).filter((k) => k.includes(",") && !k.includes("_stderr") && typeof results[task][k] === "number");
}

function stderrOf(values, metric) {
  const [name, filter] = metric.split(",");
  const error = values[`${name}_stderr,${filter}`];
  return typeof error === "number" ? error : 0;
}

function renderRun(name, run) {
  if (!run || typeof run.results !== "object") throw new Error("not an adapterd eval results.json (no \"results\")");
  const models = Object.keys(run.results);
  const tasks = Object.keys(run.results[models[0]] || {});
  const rows = [];
  const charts = [];
  for (const task of tasks) {
    const metrics = metricsOf(run.results[models[0]], task);
    for (const metric of metrics) {
      rows.push([task, metric, ...models.map((m) => {
        const values = run.results[m][task] || {};
        const error = stderrOf(values, metric);
        return typeof values[metric] === "number" ? `${number(values[metric])}${error ? ` ± ${number(error)}` : ""}` : "-";
      })]);
    }
    if (metrics.length) {
      const headline = metrics[0];
      const bars = models.map((m) => ({ label: m, value: run.results[m][task]?.[headline] ?? 0, error: stderrOf(run.results[m][task] || {}, headline) }));
      charts.push(el("figure", { dataset: { task } }, barChart(bars, { title: `${task}: ${headline.split(",")[0]}` }), el("figcaption", {}, task)));
    }
  }
  const wall = run.adapterd && typeof run.adapterd.wall_s === "number" ? ` · ${run.adapterd.wall_s.toFixed(1)} s` : "";
  return el("section", { class: "eval-run", dataset: { file: name } }, el("h3", {}, `${name}${wall}`), table(["task", "metric", ...models], rows), el("div", { class: "charts" }, charts));
}

// The held-out scores of every finished job that has them.
export function showJobScores(jobs) {
  const scored = jobs.filter((j) => j.metrics && j.metrics.base && j.metrics.adapter);
  if (!scored.length) return;
  $("job-scores").replaceChildren(
    ...scored.map((job) =>
      el(
        "section",
        { class: "job-scores", dataset: { job: job.id } },
        el("h3", {}, `${job.adapter_id} (${job.method}, job ${job.id})`),
        table(["score", "base", "adapter", "change"], JOB_SCORES.map((s) => [s, number(job.metrics.base[s]), number(job.metrics.adapter[s]), number(job.metrics.adapter[s] - job.metrics.base[s])])),
        el(
          "div",
          { class: "charts" },
          ["exact_match", "rougeL"].map((s) =>
            el("figure", {}, barChart([{ label: "base", value: job.metrics.base[s] ?? 0 }, { label: job.adapter_id, value: job.metrics.adapter[s] ?? 0 }], { title: s })),
          ),
        ),
      ),
    ),
  );
}
