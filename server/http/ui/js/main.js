// The console's start: the server's facts (GET /info, open), the key when the server asks for one, and the
// pages, one shown at a time by the URL's #fragment (#adapters, #playground, #training[/JOB], #evaluations).

import { ApiError, get, key } from "./api.js";
import * as adapters from "./adapters.js";
import * as evaluations from "./evaluations.js";
import * as playground from "./playground.js";
import * as training from "./training.js";

const $ = (id) => document.getElementById(id);
let info = null;

async function signIn() {
  const dialog = $("key-dialog");
  for (;;) {
    if (key.get()) {
      try {
        return await get("/v1/models");
      } catch (error) {
        if (!(error instanceof ApiError) || error.status !== 401) throw error;
        key.forget();
        $("key-error").textContent = error.message;
      }
    }
    if (info.auth !== "api_keys") return get("/v1/models");
    dialog.showModal();
    await new Promise((resolve) => $("key-form").addEventListener("submit", resolve, { once: true }));
    key.set($("key-input").value.trim());
    $("key-input").value = "";
  }
}

async function refresh() {
  const models = await get("/v1/models");
  await adapters.load();
  playground.setModels(info.model_id, models.data.filter((m) => m.id !== info.model_id).map((m) => m.id));
  if (info.trainer) evaluations.showJobScores(await training.load().catch(() => []));
}

// Each page shows the adapters, models and jobs as they are when it is opened.
async function show() {
  const [page, detail] = (location.hash.slice(1) || "adapters").split(/\/(.*)/s);
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("current", link.dataset.page === page);
  if (page === "training" && detail && info.trainer) training.watch(decodeURIComponent(detail));
  await refresh();
  if (page === "adapters" && detail) document.querySelector(`#adapters-table tr[data-id="${CSS.escape(decodeURIComponent(detail))}"]`)?.click();
}

function report(error) {
  document.body.dataset.error = error.message;
  console.error(error);
}

async function start() {
  info = await get("/info");
  $("model").textContent = `${info.model_id} · ${info.quantize || "none"} on ${info.device} · ${info.version}`;
  await signIn();
  $("key-dialog").close();
  if (key.get()) {
    $("sign-out").hidden = false;
    $("who").textContent = "with a key";
  }
  $("sign-out").addEventListener("click", () => {
    key.forget();
    location.reload();
  });
  adapters.setUp();
  playground.setUp();
  training.setUp(() => refresh().catch(report));
  training.enabled(Boolean(info.trainer));
  evaluations.setUp();
  window.addEventListener("hashchange", () => show().catch(report));
  await show();
  document.body.dataset.ready = "true";
}

start().catch(report);
