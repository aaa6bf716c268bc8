// helip dashboard: one job's page (timeline, live progress, loss curves, eval table, events, checkpoints;
// the forgetting guard's section is guard.js).
"use strict";

(function () {
  const H = window.HELIP, el = H.el;
  const STAGES = ["embedding", "mining", "training", "evaluating"];
  const RUNS = ["helip", "control"];
  const COLORS = { helip: "#1a5fb4", control: "#c64600" };
  const STANDARD = new Set(["contrastive_loss", "margin_loss", "loss", "lr", "samples_per_second", "epoch", "logit_scale"]);
  const POLL_MS = 1500;

  // Stage intervals from the job's "stage: X" events; the last one ends when the job finished (or now).
  function timeline(job, events) {
    const starts = events.filter((e) => e.data && e.data.stage && e.message.startsWith("stage: "))
      .map((e) => ({ stage: e.data.stage, t: Date.parse(e.created_at) }));
    const end = job.finished_at ? Date.parse(job.finished_at) : Date.now();
    const out = [];
    if (job.started_at) out.push({ stage: "queued", seconds: (Date.parse(job.started_at) - Date.parse(job.created_at)) / 1000 });
    starts.forEach((s, i) => out.push({ stage: s.stage, seconds: ((i + 1 < starts.length ? starts[i + 1].t : end) - s.t) / 1000,
      current: i === starts.length - 1 && H.ACTIVE.has(job.status) }));
    return out;
  }

  function timelineView(job, events) {
    const items = timeline(job, events);
    const total = items.reduce((a, b) => a + Math.max(b.seconds, 0), 0) || 1;
    const done = new Set(items.map((i) => i.stage));
    const pending = STAGES.filter((s) => !done.has(s));
    return el("ol", { id: "timeline", class: "timeline", "aria-label": "Stages" },
      items.map((i) => el("li", { class: `stage ${i.current ? "current" : ""}`, "data-stage": i.stage, style: `flex-grow:${Math.max(i.seconds / total, 0.06)}` },
        el("span", { class: "name" }, i.stage), el("span", { class: "dur" }, H.fmtDuration(i.seconds) + (i.current ? " so far" : "")))),
      pending.map((s) => el("li", { class: "stage pending", "data-stage": s, style: "flex-grow:0.06" },
        el("span", { class: "name" }, s), el("span", { class: "dur" }, "not yet"))));
  }

  // The progress line is built once and updated in place, so that its live region is read out as it changes.
  function progressView() {
    const bar = el("progress", { id: "progress-bar", max: "1", "aria-label": "job progress" });
    const text = el("span", { id: "progress-text", "aria-live": "polite" });
    const eta = el("span", { id: "eta", class: "muted" });
    const loss = el("span", { class: "muted" });
    const box = el("div", { class: "progress-box" }, bar, text, eta, loss);
    box.update = (job) => {
      const p = job.progress || {};
      const prog = H.progressOf(job);
      if (prog.frac === null) bar.removeAttribute("value");
      else bar.value = prog.frac;
      if (text.textContent !== prog.text) text.textContent = prog.text;
      eta.textContent = H.ACTIVE.has(job.status) && p.eta_seconds !== null && p.eta_seconds !== undefined
        ? `ETA ${H.fmtDuration(p.eta_seconds)} (this stage)` : "";
      loss.textContent = p.loss !== null && p.loss !== undefined ? `loss ${H.fmtNum(p.loss)}` : "";
    };
    return box;
  }

  // -- curves ------------------------------------------------------------------------------------------

  function seriesData(steps, keys) {
    // x: every logged step; one y series per (run, key), null where that run has no value
    const xs = [...new Set(steps.map((s) => s.step))].sort((a, b) => a - b);
    const pos = new Map(xs.map((x, i) => [x, i]));
    const cols = [], labels = [];
    for (const key of keys) {
      for (const run of RUNS) {
        const rows = steps.filter((s) => s.run === run && typeof s.values[key] === "number");
        if (!rows.length) continue;
        const ys = new Array(xs.length).fill(null);
        rows.forEach((s) => (ys[pos.get(s.step)] = s.values[key]));
        cols.push(ys);
        labels.push({ run, key });
      }
    }
    return { data: [xs, ...cols], labels };
  }

  // Axis numbers that stay distinct at any scale (a learning rate of 2e-5 is not "0").
  function tick(v) {
    if (v === null || v === undefined) return "";
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a < 0.01 || a >= 1e5) return v.toExponential(1);
    return String(Number(v.toPrecision(3)));
  }

  function chart(holder, title, steps, keys, yLabel) {
    const { data, labels } = seriesData(steps, keys);
    const width = Math.max(280, Math.min(holder.clientWidth || 520, 560));
    const series = [{ label: "step" }, ...labels.map((l) => ({
      label: keys.length > 1 ? `${l.run} ${l.key.replace("_loss", "")}` : l.run,
      stroke: COLORS[l.run], width: 2, dash: l.key === "margin_loss" ? [6, 4] : undefined, spanGaps: true,
    }))];
    const summary = labels.map((l, i) => {
      const ys = data[i + 1].filter((v) => v !== null);
      return `${l.run} ${l.key}: ${ys.length ? H.fmtNum(ys[ys.length - 1]) : "–"}`;
    }).join("; ");
    const figure = el("figure", { class: "chart", "data-chart": keys.join(",") },
      el("figcaption", {}, title, el("span", { class: "sr-only" }, ` Last values: ${summary || "none yet"}.`)));
    holder.append(figure);
    if (!labels.length) {
      figure.append(el("p", { class: "muted" }, "no values yet"));
      return null;
    }
    const plot = new uPlot({ width, height: 200, series, scales: { x: { time: false } },
      axes: [{ label: "step" }, { label: yLabel, size: 64, values: (u, vals) => vals.map(tick) }], legend: { live: false } }, data, figure);
    plot.root.querySelector("canvas").setAttribute("aria-label", `${title}: ${summary}`);
    plot.root.querySelector("canvas").setAttribute("role", "img");
    return { plot, keys };
  }

  function chartSpecs(steps) {
    const keys = [...new Set(steps.flatMap((s) => Object.keys(s.values)))]
      .filter((k) => steps.some((s) => typeof s.values[k] === "number"));
    const extraLoss = keys.filter((k) => k.endsWith("_loss") && !STANDARD.has(k));
    const extra = keys.filter((k) => !STANDARD.has(k) && !k.endsWith("_loss"));
    return [
      { title: "Loss terms (solid: contrastive, dashed: margin)", keys: ["contrastive_loss", "margin_loss", ...extraLoss], y: "loss" },
      { title: "Learning rate", keys: ["lr"], y: "lr" },
      { title: "Samples per second", keys: ["samples_per_second"], y: "samples/s" },
      ...extra.map((k) => ({ title: k, keys: [k], y: k })), // e.g. evaluations during training, a guard's values
    ];
  }

  // The charts' layout: which series each chart has. Same layout: new points only; else drawn again.
  const layoutOf = (steps) => JSON.stringify(chartSpecs(steps).map((c) => seriesData(steps, c.keys).labels));

  function drawCharts(holder, steps) {
    holder.replaceChildren();
    return chartSpecs(steps).map((c) => chart(holder, c.title, steps, c.keys, c.y)).filter(Boolean);
  }

  // -- eval table ------------------------------------------------------------------------------------

  function evalView(evals) {
    const models = Object.keys(evals);
    if (!models.length) return el("p", { id: "eval-empty", class: "muted" }, "No evaluation yet.");
    const order = ["baseline", "control", "helip", ...models.filter((m) => !["baseline", "control", "helip"].includes(m)).sort()]
      .filter((m) => m in evals);
    const rows = [];
    for (const ds of Object.keys(evals[order[0]] || evals.helip || {})) {
      for (const metric of Object.keys((evals.helip || evals[order[0]])[ds] || {})) {
        const val = (m) => (evals[m] && evals[m][ds] ? evals[m][ds][metric] : undefined);
        const lifts = ["baseline", "control"].filter((o) => o in evals && "helip" in evals).map((o) => {
          const d = metric.startsWith("n_") ? NaN : val("helip") - val(o); // counts have no lift (as metrics.json)
          return el("td", { class: `num lift ${H.liftClass(d)}`, "data-lift": o }, H.fmtSigned(d));
        });
        rows.push(el("tr", { "data-dataset": ds, "data-metric": metric },
          el("th", { scope: "row" }, ds), el("th", { scope: "row" }, metric),
          order.map((m) => el("td", { class: "num", "data-model": m }, metric.startsWith("n_") ? H.fmtNum(val(m), 0) : H.fmtNum(val(m)))), lifts));
      }
    }
    const liftHeads = ["baseline", "control"].filter((o) => o in evals && "helip" in evals).map((o) => `HELIP − ${o}`);
    return el("table", { id: "eval-table", class: "data" },
      el("caption", {}, "Evaluation: green where HELIP is ahead, red where it is behind"),
      el("thead", {}, el("tr", {}, ["data set", "metric", ...order, ...liftHeads].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, rows));
  }

  function eventsView(events) {
    return el("ol", { id: "events", class: "events", reversed: true },
      [...events].reverse().map((e) => el("li", { class: `lvl-${e.level}` },
        el("time", { datetime: e.created_at }, new Date(e.created_at).toLocaleTimeString()), " ",
        el("span", { class: "lvl" }, e.level), " ", e.message)));
  }

  function checkpointsView(page) {
    const cks = page.data || [];
    if (!cks.length) return el("p", { class: "muted" }, "No checkpoints yet.");
    const more = page.has_more ? el("p", { class: "muted" }, "More checkpoints: GET /jobs/{id}/checkpoints with its cursor.") : null;
    return el("div", {}, el("table", { id: "checkpoints", class: "data" },
      el("thead", {}, el("tr", {}, ["run", "step", "final", "size", "sha256", ""].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, cks.map((c) => el("tr", {},
        el("td", {}, c.run), el("td", { class: "num" }, c.step), el("td", {}, c.final ? "final" : ""),
        el("td", { class: "num" }, `${(c.size / 1048576).toFixed(1)} MiB`), el("td", {}, el("code", {}, c.sha256.slice(0, 12))),
        el("td", {}, el("a", { href: c.url, download: "" }, "download")))))), more);
  }

  // -- the page and its polling ------------------------------------------------------------------------

  H.pages.job = async function (view, id) {
    const st = { job: null, steps: [], events: [], lastStep: null, lastEvent: null, evals: {} };
    async function pull() {
      st.job = await H.api(`/jobs/${encodeURIComponent(id)}`);
      for (;;) { // metrics and events through their cursors: only what is new
        const q = st.lastStep === null ? "" : `&after_step=${st.lastStep}`;
        const m = await H.api(`/jobs/${encodeURIComponent(id)}/metrics?limit=1000${q}`);
        st.steps.push(...m.data);
        st.evals = m.eval;
        if (m.data.length) st.lastStep = m.data[m.data.length - 1].step;
        if (!m.has_more) break;
      }
      for (;;) {
        const q = st.lastEvent === null ? "" : `&after=${st.lastEvent}`;
        const e = await H.api(`/jobs/${encodeURIComponent(id)}/events?limit=1000${q}`);
        st.events.push(...e.data);
        if (e.data.length) st.lastEvent = e.data[e.data.length - 1].id;
        if (!e.has_more) break;
      }
    }
    await pull();
    if (!view.alive) return;
    const cks = await H.api(`/jobs/${encodeURIComponent(id)}/checkpoints`).catch(() => ({ data: [] }));
    if (!view.alive) return;
    const head = el("div", { id: "job-head" });
    const progressLine = progressView();
    const progress = el("div", { id: "progress" }, progressLine);
    const tl = el("div", { id: "timeline-box" });
    const evalBox = el("div", { id: "eval-box" });
    const eventsBox = el("div", { id: "events-box", class: "scroll" });
    const ckBox = el("div", { id: "checkpoints-box" }, checkpointsView(cks));
    const chartBox = el("div", { id: "charts", class: "charts" });
    const guardBox = H.guardSection(view, id, st.job); // null without a guard in the spec: nothing shown
    H.render(`Job ${id}`, head, progress, el("h2", {}, "Stages"), tl, el("h2", {}, "Training curves (HELIP and control)"), chartBox,
      el("h2", {}, "Evaluation"), evalBox, ...(guardBox ? [guardBox] : []), el("h2", {}, "Checkpoints"), ckBox,
      el("h2", {}, "Events"), eventsBox);
    if (guardBox) guardBox.load(st.job);
    let plots = drawCharts(chartBox, st.steps), layout = layoutOf(st.steps), stepsDrawn = st.steps.length;

    let headSig = null, eventsShown = -1;
    function paint() {
      const j = st.job;
      // Parts that hold focus or a scroll position are rebuilt only when what they show changed.
      const sig = JSON.stringify([j.status, j.stage, j.attempts, j.error]);
      const headChanged = sig !== headSig;
      headSig = sig;
      const cancel = H.ACTIVE.has(j.status) && j.status !== "cancelling" ? el("button", { id: "cancel", type: "button", onclick: async (ev) => {
        ev.target.disabled = true;
        try { st.job = await H.api(`/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); paint(); } catch (e) { alert(e.message); }
      } }, "Cancel job") : null;
      if (headChanged) head.replaceChildren(el("p", {}, j.spec && j.spec.name ? el("strong", { class: "job-name" }, `${j.spec.name} `) : "",
        H.statusBadge(j.status), " ", j.stage && H.ACTIVE.has(j.status) ? `stage ${j.stage}` : "",
        ` · created ${H.fmtTime(j.created_at)} · attempt ${j.attempts} · seed ${j.seed} · `,
        el("a", { href: `#/jobs/${id}/hard-pairs`, id: "to-pairs" }, "Browse hard pairs"), " ", cancel),
        j.error ? el("p", { class: "error", role: "alert" }, `${j.error.code}: ${j.error.message}`) : "");
      progressLine.update(j);
      tl.replaceChildren(timelineView(j, st.events));
      evalBox.replaceChildren(evalView(st.evals));
      if (st.events.length !== eventsShown) {
        eventsShown = st.events.length;
        eventsBox.replaceChildren(eventsView(st.events));
      }
      if (st.steps.length !== stepsDrawn) {
        stepsDrawn = st.steps.length;
        const now = layoutOf(st.steps);
        if (now === layout) plots.forEach((p) => p.plot.setData(seriesData(st.steps, p.keys).data));
        else [plots, layout] = [drawCharts(chartBox, st.steps), now];
      }
    }
    paint();

    async function tick() {
      if (!view.alive) return;
      const wasActive = H.ACTIVE.has(st.job.status);
      try {
        await pull();
        if (!view.alive) return;
        paint();
        if (wasActive && !H.ACTIVE.has(st.job.status)) {
          const fresh = await H.api(`/jobs/${encodeURIComponent(id)}/checkpoints`).catch(() => ({ data: [] }));
          ckBox.replaceChildren(checkpointsView(fresh));
          if (guardBox) guardBox.load(st.job);
        }
      } catch (e) {
        if (e.status === 404 && view.alive) return H.renderError(e, "Job");
      }
      if (H.ACTIVE.has(st.job.status)) H.later(view, tick, POLL_MS);
    }
    if (H.ACTIVE.has(st.job.status)) H.later(view, tick, POLL_MS);
  };
})();
