// helip dashboard: the API key, calls to the JSON API, the router, the jobs list and the submit form.
// No build step: plain browser JavaScript. Every call goes to this API's own per-key endpoints.
"use strict";

const H = (window.HELIP = { pages: {} });
const KEY_STORE = "helip.apiKey";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelling", "cancelled"];
const ACTIVE = new Set(["queued", "running", "cancelling"]);
H.ACTIVE = ACTIVE;

// -- small helpers -----------------------------------------------------------------------------------

H.el = function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
};
const el = H.el;

H.fmtDuration = function (seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60), h = Math.floor(m / 60);
  if (h) return `${h} h ${String(m % 60).padStart(2, "0")} min`;
  return `${m} min ${String(s % 60).padStart(2, "0")} s`;
};
H.fmtTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
H.fmtNum = (v, digits = 4) => (v === null || v === undefined || !isFinite(v) ? "–" : Number(v).toFixed(digits));
H.fmtSigned = (v, digits = 4) => (v === null || v === undefined || !isFinite(v) ? "–" : (v >= 0 ? "+" : "−") + Math.abs(v).toFixed(digits));
H.liftClass = (v) => (v > 0 ? "up" : v < 0 ? "down" : "flat");

// -- the API key and calls ---------------------------------------------------------------------------

H.key = () => sessionStorage.getItem(KEY_STORE) || "";

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || "http_error";
    this.param = err.param || null;
  }
}
H.ApiError = ApiError;

H.api = async function api(path, options = {}) {
  const headers = Object.assign({ Accept: "application/json" }, options.headers || {});
  if (H.key()) headers.Authorization = `Bearer ${H.key()}`;
  const resp = await fetch(path, Object.assign({}, options, { headers }));
  if (options.raw) {
    if (!resp.ok) throw new ApiError(resp.status, await resp.json().catch(() => null));
    return resp;
  }
  const body = await resp.json().catch(() => null);
  if (!resp.ok) {
    if (resp.status === 401) showKeyNeeded(body);
    throw new ApiError(resp.status, body);
  }
  return body;
};

// Thumbnails need the key too, so they are fetched and shown from a blob (the key never goes in a URL).
H.loadImage = async function (img, path, owner) {
  try {
    const resp = await H.api(path, { raw: true });
    const url = URL.createObjectURL(await resp.blob());
    (owner || H.view).urls.push(url);
    img.addEventListener("load", () => img.naturalWidth < img.width && img.classList.add("upscaled"), { once: true });
    img.src = url;
  } catch (e) {
    img.replaceWith(el("div", { class: "thumb-missing", role: "img", "aria-label": `image unavailable: ${e.message}` },
      "no image", el("small", {}, e.message)));
  }
};

function showKeyNeeded(body) {
  const state = document.getElementById("key-state");
  state.textContent = H.key() ? "This key was refused." : "This API needs a key.";
  document.getElementById("api-key").focus();
}

function setupKeyForm() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  const state = document.getElementById("key-state");
  const show = () => (state.textContent = H.key() ? "key set for this tab" : "no key");
  show();
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY_STORE, input.value.trim());
    input.value = "";
    show();
    route(); // nothing from the previous key is kept: every view is rebuilt from the API
  });
  document.getElementById("key-forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    show();
    route();
  });
}

// -- router ------------------------------------------------------------------------------------------

// A view owns its timers and object URLs; leaving it stops and frees them.
H.view = { timers: [], urls: [], alive: true };

function newView() {
  const old = H.view;
  old.alive = false;
  old.timers.forEach(clearTimeout);
  old.urls.forEach((u) => URL.revokeObjectURL(u));
  H.view = { timers: [], urls: [], alive: true };
  return H.view;
}

H.later = function (view, fn, ms) {
  if (view.alive) view.timers.push(setTimeout(fn, ms));
};

function parseHash() {
  const raw = location.hash.replace(/^#/, "") || "/jobs";
  const [path, query] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || "") };
}

H.main = () => document.getElementById("main");

H.render = function (title, ...children) {
  const main = H.main();
  main.replaceChildren(el("h1", { id: "page-title", tabindex: "-1" }, title), ...children);
  main.dataset.route = location.hash; // which view is on screen (the browser tests wait for it)
  document.title = `${title} · helip`;
};

H.renderError = function (e, what) {
  const notFound = e.status === 404;
  H.render(notFound ? `${what} not found` : "Something went wrong",
    el("p", { id: notFound ? "not-found" : "error", class: "error", role: "alert" },
      notFound ? `No ${what.toLowerCase()} here for this API key.` : e.message),
    el("p", {}, el("a", { href: "#/jobs" }, "Back to the jobs")));
};

async function route() {
  const view = newView();
  const { parts, params } = parseHash();
  try {
    if (parts[0] !== "jobs") return (location.hash = "#/jobs");
    if (parts.length === 1) await jobsPage(view, params);
    else if (parts.length === 2) await H.pages.job(view, parts[1], params);
    else if (parts[2] === "hard-pairs") await H.pages.pairs(view, parts[1], params);
    else H.renderError({ status: 404 }, "Page");
  } catch (e) {
    if (view.alive) H.renderError(e, "Job");
  }
  const title = document.getElementById("page-title");
  if (title && view.alive) title.focus({ preventScroll: true });
}

// -- the jobs list -------------------------------------------------------------------------------------

const HEADLINE = ["acc1", "image_retrieval_recall@1", "lp_acc1", "text_retrieval_recall@1"];

H.headlineLift = function (job) {
  const summary = (job.result && job.result.summary) || {};
  const lift = (summary.lift || {}).helip_minus_baseline || {};
  for (const ds of Object.keys(lift)) {
    const metric = HEADLINE.find((k) => k in lift[ds]) || Object.keys(lift[ds])[0];
    if (metric) return { ds, metric, value: lift[ds][metric] };
  }
  return null;
};

H.progressOf = function (job) {
  const p = job.progress || {};
  if (job.status === "succeeded") return { frac: 1, text: "done" };
  if (p.total_steps && p.step !== null && p.step !== undefined && job.stage === "training") {
    return { frac: p.step / p.total_steps, text: `${p.run || "training"} step ${p.step} / ${p.total_steps}` };
  }
  if (p.total && p.done !== null && p.done !== undefined) return { frac: p.done / p.total, text: `${p.stage || ""} ${p.done} / ${p.total}` };
  return { frac: null, text: job.stage || job.status };
};

function statusBadge(status) {
  return el("span", { class: `badge s-${status}` }, status);
}
H.statusBadge = statusBadge;

function jobsTable(page) {
  const rows = page.data.map((job) => {
    const prog = H.progressOf(job);
    const lift = H.headlineLift(job);
    return el("tr", { "data-job": job.id },
      el("td", {}, el("a", { href: `#/jobs/${job.id}` }, job.id),
        job.spec && job.spec.name ? el("div", { class: "muted job-name" }, job.spec.name) : null),
      el("td", {}, H.fmtTime(job.created_at)),
      el("td", {}, statusBadge(job.status)),
      el("td", {}, ACTIVE.has(job.status) ? job.stage || "–" : "–"),
      el("td", {}, prog.frac === null ? prog.text : el("span", {},
        el("progress", { max: "1", value: String(prog.frac), "aria-label": `progress of ${job.id}` }), " ", prog.text)),
      el("td", { class: lift ? `lift ${H.liftClass(lift.value)}` : "" },
        lift ? el("span", { title: `${lift.ds} ${lift.metric}, HELIP minus baseline` }, `${H.fmtSigned(lift.value)} `,
          el("small", {}, `${lift.ds} ${lift.metric}`)) : "–"));
  });
  return el("table", { id: "jobs-table", class: "data" },
    el("caption", { class: "sr-only" }, "Your jobs, newest first"),
    el("thead", {}, el("tr", {}, ["Job", "Created", "Status", "Stage", "Progress", "Lift (HELIP − baseline)"]
      .map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, rows.length ? rows : el("tr", {}, el("td", { colspan: "6", class: "muted" }, "No jobs."))));
}

async function jobsPage(view, params) {
  const status = params.get("status") || "";
  const after = params.get("after") || "";
  const q = new URLSearchParams({ limit: "20" });
  if (status) q.set("status", status);
  if (after) q.set("after", after);
  const page = await H.api(`/jobs?${q}`);
  if (!view.alive) return;
  const filter = el("select", { id: "status-filter", onchange: (ev) => {
    location.hash = ev.target.value ? `#/jobs?status=${ev.target.value}` : "#/jobs";
  } }, el("option", { value: "" }, "all"), STATUSES.map((s) => el("option", { value: s, selected: s === status }, s)));
  const holder = el("div", { id: "jobs-box" }, jobsTable(page));
  const base = status ? `#/jobs?status=${status}&` : "#/jobs?";
  const pager = el("nav", { class: "pager", "aria-label": "Pages" },
    after ? el("a", { href: status ? `#/jobs?status=${status}` : "#/jobs" }, "« Newest") : null,
    page.has_more && page.data.length ? el("a", { id: "older", href: `${base}after=${page.data[page.data.length - 1].id}` }, "Older »") : null);
  H.render("Jobs",
    el("div", { class: "toolbar" }, el("label", { for: "status-filter" }, "Status "), filter),
    holder, pager, submitForm());
  // While a job on this page is active, only the table is refreshed: focus and a spec being typed stay.
  async function refresh(current) {
    if (!current.data.some((j) => ACTIVE.has(j.status))) return;
    H.later(view, async () => {
      try {
        const next = await H.api(`/jobs?${q}`);
        if (!view.alive) return;
        holder.replaceChildren(jobsTable(next));
        refresh(next);
      } catch (e) { /* the next navigation shows errors */ }
    }, 5000);
  }
  refresh(page);
}

// -- submitting a spec ---------------------------------------------------------------------------------

// Where a dotted field (train.batch_size, eval.zeroshot.0.root) is in the JSON text: [start, end] of the
// deepest key on that path, or null. Keys are matched by their place in the nesting, not by name alone.
H.locateField = function (text, param) {
  if (!param) return null;
  const want = param.split(".");
  const stack = []; // {obj: true, key} or {obj: false, index}
  let best = null, bestDepth = 0;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (c === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      let k = j + 1;
      while (k < text.length && /\s/.test(text[k])) k++;
      const top = stack[stack.length - 1];
      if (text[k] === ":" && top && top.obj) {
        top.key = text.slice(i + 1, j);
        const path = stack.map((p) => (p.obj ? p.key : String(p.index)));
        if (path.length >= bestDepth && path.length <= want.length && path.every((p, n) => p === want[n])) {
          best = [i, j + 1];
          bestDepth = path.length;
        }
      }
      i = j;
    } else if (c === "{") stack.push({ obj: true, key: null });
    else if (c === "[") stack.push({ obj: false, index: 0 });
    else if (c === "}" || c === "]") stack.pop();
    else if (c === "," && stack.length && !stack[stack.length - 1].obj) stack[stack.length - 1].index++;
  }
  return best;
};

function submitForm() {
  const text = el("textarea", { id: "spec-text", rows: "12", spellcheck: "false", "aria-describedby": "spec-help spec-error",
    placeholder: '{"model": {"name": "ViT-B-32", "pretrained": "..."}, "data": {"train": "..."}}' });
  const file = el("input", { id: "spec-file", type: "file", accept: ".json,application/json" });
  const error = el("div", { id: "spec-error", class: "field-error", role: "alert", "aria-live": "assertive" });
  file.addEventListener("change", async () => {
    if (file.files[0]) text.value = await file.files[0].text();
  });
  const form = el("form", { id: "submit-form", class: "card" },
    el("h2", {}, "Submit a job"),
    el("p", { id: "spec-help", class: "muted" }, "Paste a job spec as JSON (the body of POST /jobs; README has every field) or load a .json file."),
    el("label", { for: "spec-text" }, "Job spec (JSON)"), text, error,
    el("div", { class: "row" }, el("label", { for: "spec-file" }, "or load a file "), file,
      el("button", { type: "submit", id: "spec-submit" }, "Submit")));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    error.replaceChildren();
    text.removeAttribute("aria-invalid");
    let body;
    try {
      body = JSON.parse(text.value);
    } catch (e) {
      return showSpecError(text, error, "body", `not valid JSON: ${e.message}`);
    }
    try {
      const job = await H.api("/jobs", { method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" } });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      showSpecError(text, error, e.param, e.message);
    }
  });
  return form;
}

function showSpecError(text, error, param, message) {
  text.setAttribute("aria-invalid", "true");
  const at = H.locateField(text.value, param);
  const line = at ? text.value.slice(0, at[0]).split("\n").length : null;
  error.dataset.param = param || "";
  let said = message;
  while (param && said.startsWith(`${param}: `)) said = said.slice(param.length + 2); // the field is shown once
  error.replaceChildren(el("strong", { class: "param" }, param || "spec"), `: ${said}`,
    line ? el("span", { class: "muted" }, ` (line ${line}, selected)`) : "");
  if (at) {
    text.focus();
    text.setSelectionRange(at[0], at[1]);
    const lineHeight = parseFloat(getComputedStyle(text).lineHeight) || 18;
    text.scrollTop = Math.max(0, (line - 3) * lineHeight); // the selected field in view, not the end of the text
  }
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyForm();
  window.addEventListener("hashchange", route);
  route();
});
