// helip dashboard: the hard-pair browser (a training row, its image and caption, its mined neighbours).
"use strict";

(function () {
  const H = window.HELIP, el = H.el;
  const TARGET_PX = 224, NEIGHBOR_PX = 128;

  function thumb(view, jobId, row, size, caption) {
    const img = el("img", { class: "thumb", width: String(size), height: String(size), alt: caption ? `row ${row}: ${caption}` : `row ${row}`,
      "data-row": String(row) });
    H.loadImage(img, `/jobs/${encodeURIComponent(jobId)}/thumbnails/${row}?size=${size}`, view);
    return img;
  }

  const score = (label, value, cls) => el("div", { class: `score ${cls || ""}` }, el("span", { class: "muted" }, label), " ", H.fmtNum(value, 3));

  function filtersView(d) {
    const f = d.filters, row = f.row, job = f.job || {};
    return el("section", { id: "filters", class: "card", "aria-labelledby": "filters-h" },
      el("h2", { id: "filters-h" }, "What the filters did"),
      row ? el("p", { id: "row-filters" },
        `For this row, of ${row.candidates} other pairs: `, el("strong", {}, String(row.same_caption)),
        ` dropped as the same caption (text cosine > ${f.same_caption_threshold}), `, el("strong", {}, String(row.duplicate)),
        ` had a cosine zeroed as a probable duplicate (> ${f.duplicate_threshold}), so they rank as if unrelated.`)
        : el("p", { class: "muted" }, "Per-row counts are not shown for this job (no embeddings, or too many rows to scan here)."),
      el("p", { class: "muted" }, `Whole job (${job.method || "?"} mining, counted over ${job.counted_over === "candidates" ? "the retrieved candidates" : "all pairs"}): `,
        `${job.same_caption_filtered ?? "–"} same-caption pairs dropped, ${job.duplicate_filtered ?? "–"} duplicate cosines zeroed.`),
      el("p", { class: "muted" }, `Cosines at or below 0 ${f.clamp_negative ? "are clamped to 0" : "are kept as they are"} before the product.`));
  }

  function neighborsView(view, jobId, d) {
    return el("ol", { id: "neighbors", class: "neighbors", "aria-label": "Mined neighbours, hardest first" },
      d.neighbors.map((n, i) => el("li", { class: "card neighbor", "data-row": String(n.row) },
        thumb(view, jobId, n.row, NEIGHBOR_PX, n.caption),
        el("div", { class: "ncap" }, el("span", { class: "rank" }, `#${i + 1}`), " ",
          el("a", { href: `#/jobs/${jobId}/hard-pairs?row=${n.row}` }, `row ${n.row}`), el("br"), n.caption ?? el("em", {}, "caption unavailable")),
        el("div", { class: "scores" },
          score("product", n.score, "product"),
          n.text_cosine === null ? null : score("text", n.text_cosine),
          n.image_cosine === null ? null : score("image", n.image_cosine)))));
  }

  function pickerView(jobId, picks, current) {
    const input = el("input", { id: "row-input", type: "number", min: "0", step: "1", value: current ?? "", inputmode: "numeric" });
    const go = (row) => (location.hash = `#/jobs/${jobId}/hard-pairs?row=${row}`);
    const form = el("form", { id: "row-form", class: "row" },
      el("label", { for: "row-input" }, "Training row "), input, el("button", { type: "submit" }, "Show"),
      el("button", { type: "button", id: "random-row", onclick: async () => {
        const r = await H.api(`/jobs/${encodeURIComponent(jobId)}/hard-pairs/rows?order=random&limit=1&seed=${Math.floor(Math.random() * 2 ** 31)}`);
        if (r.data.length) go(r.data[0].row);
      } }, "Random row"));
    form.addEventListener("submit", (ev) => { ev.preventDefault(); if (input.value !== "") go(input.value); });
    const list = (title, id, rows) => el("div", { class: "pick" }, el("h3", { id: `${id}-h` }, title),
      el("ul", { id, class: "picks", "aria-labelledby": `${id}-h` }, rows.map((p) => el("li", {},
        el("a", { href: `#/jobs/${jobId}/hard-pairs?row=${p.row}`, "aria-current": String(p.row) === String(current) ? "true" : null },
          `row ${p.row}`), " ", el("span", { class: "muted" }, H.fmtNum(p.score, 3))))));
    return el("section", { class: "card picker", "aria-label": "Pick a row" }, form,
      el("p", { class: "muted" }, `${picks.mined_rows} of ${picks.num_rows} rows were mined. Rows by their best neighbour's score:`),
      el("div", { class: "picks-row" }, list("Highest", "pick-highest", picks.highest), list("Lowest", "pick-lowest", picks.lowest)));
  }

  H.pages.pairs = async function (view, jobId, params) {
    const base = `/jobs/${encodeURIComponent(jobId)}/hard-pairs`;
    await H.api(`/jobs/${encodeURIComponent(jobId)}`); // 404 for another key's job, before anything else
    let picks;
    try {
      const [hi, lo] = await Promise.all([H.api(`${base}/rows?order=highest&limit=8`), H.api(`${base}/rows?order=lowest&limit=8`)]);
      picks = { num_rows: hi.num_rows, mined_rows: hi.mined_rows, highest: hi.data, lowest: lo.data };
    } catch (e) {
      if (e.code !== "not_available") throw e;
      return H.render(`Hard pairs of ${jobId}`, el("p", { id: "no-pairs", class: "muted" }, "This job has no mined hard pairs yet."),
        el("p", {}, el("a", { href: `#/jobs/${jobId}` }, "Back to the job")));
    }
    if (!view.alive) return;
    const row = params.get("row") ?? (picks.highest[0] ? String(picks.highest[0].row) : null);
    const body = el("div", { id: "pair-view" });
    H.render(`Hard pairs of ${jobId}`, el("p", {}, el("a", { href: `#/jobs/${jobId}` }, "← Job page")),
      pickerView(jobId, picks, row), body);
    if (row === null) return body.append(el("p", { class: "muted" }, "No mined rows."));
    let d;
    try {
      d = await H.api(`${base}/${encodeURIComponent(row)}`);
    } catch (e) {
      return body.append(el("p", { id: "row-error", class: "error", role: "alert" }, `${e.param ? e.param + ": " : ""}${e.message}`));
    }
    if (!view.alive) return;
    body.append(
      el("section", { id: "target", class: "card target", "aria-label": `Row ${d.row}` },
        thumb(view, jobId, d.row, TARGET_PX, d.caption),
        el("div", {}, el("h2", {}, `Row ${d.row}`), el("p", { class: "caption" }, d.caption ?? el("em", {}, "caption unavailable")),
          el("p", { class: "muted" }, `key ${d.key}`),
          el("p", { class: "muted" }, `Scores shown: ${d.scores.join(", ").replaceAll("_", " ")}. The product is the mined score `
            + "(text cosine × image cosine after the filters); the cosines are recomputed from the job's stored embeddings."),
          d.notes.map((n) => el("p", { class: "note", role: "note" }, n)))),
      el("h2", {}, `Its ${d.neighbors.length} mined neighbours, hardest first`),
      neighborsView(view, jobId, d), filtersView(d));
  };
})();
