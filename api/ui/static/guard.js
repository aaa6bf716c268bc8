// helip dashboard: the forgetting guard on a job's page (GET /jobs/{id}/guard, i.e. metrics.json["guard"]).
// Two charts (the objective and each protected metric against the training step, and against the WiSE alpha),
// the protect bounds as dashed lines, the selected weights marked, and a line saying what was selected.
"use strict";

(function () {
  const H = window.HELIP, el = H.el;
  // dark enough for text-level contrast on white (WCAG AA), told apart by colour and by the legend's labels
  const PALETTE = ["#1a5fb4", "#c64600", "#0b6b2c", "#813d9c", "#a51d2d", "#5e5c64"];
  const MARK = "#1b1b1b";

  function metricOf(metrics, key) {
    const i = key.indexOf("/"); // DATASET/METRIC: the data set name never holds a '/', the metric may
    const v = (metrics || {})[key.slice(0, i)];
    return v && typeof v[key.slice(i + 1)] === "number" ? v[key.slice(i + 1)] : null;
  }

  // The series: the objective, then each protected metric (the objective only once when it is also protected).
  function tracked(g) {
    const label = g.objective === "mean" ? "objective (mean of every eval metric)" : `objective ${g.objective}`;
    const keys = [{ key: g.objective, label, of: (p) => p.objective }];
    for (const k of Object.keys(g.protect)) {
      if (k !== g.objective) keys.push({ key: k, label: k, of: (p) => metricOf(p.metrics, k) });
    }
    return keys.map((t, i) => Object.assign(t, { color: PALETTE[i % PALETTE.length] }));
  }

  // Against the step: the input model at step 0, each evaluated step, the final weights (the last step).
  function stepPoints(g) {
    const steps = g.steps.filter((s) => s.step !== g.final.step);
    return [Object.assign({}, g.input, { step: 0 }), ...steps, g.final].sort((a, b) => a.step - b.step);
  }

  function isSelected(g, p, axis) {
    const s = g.selected;
    if (axis === "alpha") return s.source === "wise" && p.alpha === s.alpha;
    return s.source !== "wise" && p.source === s.source && p.step === s.step;
  }

  const tick = (v) => (v === null || v === undefined ? "" : String(Number(v.toPrecision(3))));

  function chart(holder, g, axis) {
    const points = axis === "step" ? stepPoints(g) : [...g.wise].sort((a, b) => a.alpha - b.alpha);
    const xs = points.map((p) => p[axis]);
    const keys = tracked(g);
    const series = [{ label: axis }], data = [xs];
    for (const t of keys) {
      series.push({ label: t.label, stroke: t.color, width: 2, spanGaps: true, points: { show: true, size: 6 } });
      data.push(points.map(t.of));
    }
    for (const t of keys) {
      const bound = g.bounds[t.key];
      if (bound === undefined || bound === null) continue;
      series.push({ label: `bound ${t.key} ≥ ${H.fmtNum(bound)}`, stroke: t.color, width: 1.5, dash: [6, 4], points: { show: false } });
      data.push(xs.map(() => bound));
    }
    const at = points.findIndex((p) => isSelected(g, p, axis));
    if (at >= 0) {
      // one value, so no line: only its point, ringed
      series.push({ label: "selected", stroke: MARK, width: 1, points: { show: true, size: 13, width: 2, stroke: MARK, fill: "#fff" } });
      data.push(points.map((p, i) => (i === at ? keys[0].of(p) : null)));
    }
    const what = axis === "step" ? "against the training step (0: the input model; the last: the final weights)"
      : "against the WiSE alpha (0: the input model, 1: the boosted one)";
    const summary = keys.map((t) => `${t.label}: ${points.map((p) => `${axis} ${p[axis]} ${H.fmtNum(t.of(p))}`).join(", ")}`)
      .join("; ") + (at >= 0 ? `; selected: ${axis} ${xs[at]}` : "");
    const figure = el("figure", { class: "chart", "data-guard-chart": axis },
      el("figcaption", {}, `Objective and protected metrics ${what}`));
    holder.append(figure);
    const width = Math.max(280, Math.min(holder.clientWidth || 520, 560));
    const plot = new uPlot({ width, height: 220, series, scales: { x: { time: false } },
      axes: [{ label: axis === "step" ? "step (HELIP run)" : "WiSE alpha" },
        { label: "metric", size: 64, values: (u, vals) => vals.map(tick) }], legend: { live: false } }, data, figure);
    const canvas = plot.root.querySelector("canvas");
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", `Guard ${what}. ${summary}.`);
  }

  function describe(s) {
    if (s.source === "wise") return `the WiSE interpolation at alpha ${s.alpha} (the HELIP run's step ${s.step} weights)`;
    if (s.source === "step") return `the HELIP run's weights at step ${s.step} (an evaluation during training)`;
    return `the HELIP run's final weights (step ${s.step})`;
  }

  function selectedView(g) {
    const s = g.selected;
    const objective = g.objective === "mean" ? "objective (mean of every eval metric)" : `objective ${g.objective}`;
    const parts = [el("span", { "data-key": "objective" }, `${objective} ${H.fmtNum(s.objective)}`)];
    for (const [k, drop] of Object.entries(g.protect)) {
      const bound = g.bounds[k];
      parts.push(el("span", { "data-key": k }, `${k} ${H.fmtNum(metricOf(s.metrics, k))}`,
        ` (bound ≥ ${H.fmtNum(bound)}: the input's ${H.fmtNum(metricOf(g.input.metrics, k))} − ${drop})`));
    }
    const joined = parts.flatMap((p, i) => (i ? ["; ", p] : [p]));
    return el("p", { id: "guard-selected", "data-source": s.source },
      el("strong", {}, "Selected: "), describe(s), ". ", ...joined, ". ",
      el("span", { class: "muted" }, "Its every metric: the helip_selected column of the evaluation table; its weights: the helip_selected checkpoint."));
  }

  function draw(body, g) {
    const charts = el("div", { id: "guard-charts", class: "charts" });
    body.replaceChildren(selectedView(g), charts,
      el("p", { class: "muted" }, "Solid: the values; dashed: the protect bounds (the lowest value a selection may have); ",
        "the ringed point: the selected weights."));
    chart(charts, g, "step");
    chart(charts, g, "alpha");
  }

  // The section of a job's page; null for a job whose spec has no guard (nothing is shown for it).
  H.guardSection = function (view, id, job) {
    if (!job.spec || !job.spec.guard) return null;
    const body = el("div", { id: "guard-body" });
    const box = el("section", { id: "guard", "aria-labelledby": "guard-title" },
      el("h2", { id: "guard-title" }, "Forgetting guard"), body);
    box.load = async (j) => {
      if (H.ACTIVE.has(j.status)) {
        body.replaceChildren(el("p", { class: "muted" }, "The guard's curves and its selection appear when the job has finished."));
        return;
      }
      try {
        const g = await H.api(`/jobs/${encodeURIComponent(id)}/guard`);
        if (view.alive) draw(body, g);
      } catch (e) {
        if (view.alive) body.replaceChildren(el("p", { id: "guard-missing", class: "muted" }, e.message));
      }
    };
    return box;
  };
})();
