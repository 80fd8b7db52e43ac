"use strict";
// The results browser: one run (a file URL or `rrt-dist browse RUN`) or two side by side (`rrt-dist browse A B`).
// Data files call rrtBrowse.load(document.currentScript, data); config.js calls rrtBrowse.configure({runs}).
const rrtBrowse = (() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  // which ground-truth lists are positives and which are junk in each revisitop protocol (as the metrics count)
  const REVISITOP = {easy: [["easy"], ["junk", "hard"]], medium: [["easy", "hard"], ["junk"]],
                     hard: [["hard"], ["junk", "easy"]]};
  let runs = [];

  function script(url) {
    return new Promise((resolve, reject) => {
      const element = document.createElement("script");
      element.src = url;
      element.resolveData = resolve;
      element.onerror = () => reject(new Error("cannot load " + url));
      document.body.append(element);
    });
  }

  function load(element, data) { element.resolveData(data); }

  function el(tag, attributes, ...children) {
    const node = document.createElement(tag);
    Object.entries(attributes || {}).forEach(([k, v]) => {
      if (k === "text") node.textContent = v; else if (k === "className") node.className = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
    });
    node.append(...children);
    return node;
  }

  const pct = (v) => (v === null || v === undefined || Number.isNaN(v)) ? "–" : (100 * v).toFixed(2);
  const link = (...parts) => "#" + parts.map(encodeURIComponent).join("/");
  const protocolsOf = (summary) => summary.protocol === "revisitop" ? ["easy", "medium", "hard"] : ["AP"];

  function status(entry, protocol) {
    const kind = entry[1];
    if (!kind) return "negative";
    if (!REVISITOP[protocol]) return "positive";
    const [positive, junk] = REVISITOP[protocol];
    return positive.includes(kind) ? "positive" : junk.includes(kind) ? "junk" : "negative";
  }

  function thumb(run, name, alt) {
    if (!run.summary.sizes[name]) return el("div", {className: "missing", text: "unreadable"});
    return el("img", {src: `${run.base}thumbs/${name}.jpg`, alt, loading: "lazy"});
  }

  async function configure(config) {
    try {
      runs = config.runs.map((r) => Object.assign({chunks: {}}, r));
      for (const run of runs) run.summary = await script(run.base + "data/run.js");
      $("title").textContent = runs.map((r) => r.summary.title).join("  vs  ");
      window.addEventListener("hashchange", route);
      route();
    } catch (err) {
      $("status").textContent = err.message;
      $("status").className = "error";
    }
  }

  async function route() {
    const [view, ...args] = location.hash.slice(1).split("/").map(decodeURIComponent);
    $("status").textContent = "";
    $("where").textContent = "";
    try {
      if (view === "list") showList(...args);
      else if (view === "q") await showQuery(Number(args[0]), args[1], args[2]);
      else showTable();
    } catch (err) {
      $("status").textContent = err.message;
      $("status").className = "error";
    }
    window.scrollTo(0, 0);
  }

  function tableOf(run) {
    const s = run.summary, revisitop = s.protocol === "revisitop";
    const columns = [];
    for (const setting of s.settings) {
      if (revisitop) protocolsOf(s).forEach((p) => columns.push({setting, label: `${p} mAP`, protocol: p,
                                                                  value: (m) => m[p] && m[p].mAP}));
      else Object.keys(s.results[s.rows[0]][setting]).forEach((key) => columns.push(
        {setting, label: key, protocol: "AP", value: (m) => m[key]}));
    }
    const head = el("tr", {}, el("th", {text: "Method"}),
                    ...columns.map((c) => el("th", {text: `${c.setting} ${c.label}`})));
    const body = s.rows.map((row) => el("tr", {className: "method"}, el("td", {text: row}), ...columns.map((c) =>
      el("td", {}, el("a", {href: link("list", row, c.setting, c.protocol), text: pct(c.value(s.results[row][c.setting]))})))));
    return el("table", {className: "results"}, head, ...body);
  }

  function showTable() {
    $("view").replaceChildren(...runs.flatMap((run, r) => [   // the page's heading is the run's title
      ...(runs.length > 1 ? [el("h2", {text: `Run ${r + 1}: ${run.summary.title}`})] : []),
      el("p", {text: `${run.summary.queries.length} of ${run.summary.queries_total} queries browsable; ` +
                     "each cell lists its queries, most changed first."}),
      tableOf(run)]));
  }

  function apOf(query, setting, row, protocol) {
    const byRow = query.ap[setting] && query.ap[setting][row];
    return byRow ? byRow[protocol] : null;
  }

  function showList(row, setting, protocol, order, filter) {
    const run = runs[0], s = run.summary, base = s.bases[row];
    order = order || (base ? "change" : "ap");
    filter = filter || "all";
    $("where").textContent = ` ${row} · ${setting} · ${protocol}`;
    const entries = s.queries.map((q) => {
      const ap = apOf(q, setting, row, protocol), before = base ? apOf(q, setting, base, protocol) : null;
      const change = (ap === null || before === null) ? null : ap - before;
      return {q, ap, before, change};
    }).filter((e) => e.ap !== null || e.before !== null)
      .filter((e) => filter === "all" || e.change === null ? filter === "all" :
              filter === "improved" ? e.change > 1e-9 : filter === "hurt" ? e.change < -1e-9 : Math.abs(e.change) <= 1e-9);
    const key = {change: (e) => -(e.change ?? -Infinity), hurt: (e) => (e.change ?? Infinity),
                 ap: (e) => -(e.ap ?? -Infinity), query: (e) => e.q.q}[order];
    entries.sort((a, b) => key(a) - key(b) || a.q.q - b.q.q);
    const select = (name, value, options) => el("label", {}, name, el("select", {id: `list-${name}`, onchange: () =>
      { location.hash = link("list", row, setting, protocol, $("list-order").value, $("list-filter").value); }},
      ...options.map(([v, text]) => { const o = el("option", {value: v, text}); o.selected = v === value; return o; })));
    const controls = el("div", {className: "controls"},
      select("order", order, [["change", "most improved first"], ["hurt", "most hurt first"], ["ap", "AP"],
                              ["query", "query order"]]),
      select("filter", filter, [["all", "all"], ["improved", "improved"], ["hurt", "hurt"],
                                ["unchanged", "unchanged"]]),
      el("span", {text: `${entries.length} queries`}));
    const others = runs.slice(1);
    const head = el("tr", {}, el("th", {text: "Query"}), el("th", {text: ""}),
                    ...(base ? [el("th", {text: `${base} AP`})] : []), el("th", {text: `${row} AP`}),
                    ...(base ? [el("th", {text: "Change"})] : []),
                    ...others.map((r, i) => el("th", {text: `run ${i + 2}: ${row} AP`})));
    const rows = entries.map((e) => el("tr", {className: "query", "data-q": e.q.q},
      el("td", {}, el("a", {href: link("q", e.q.q, setting, protocol)}, thumb(run, `q${e.q.id}`, e.q.name))),
      el("td", {}, el("a", {href: link("q", e.q.q, setting, protocol), text: e.q.name})),
      ...(base ? [el("td", {text: pct(e.before)})] : []), el("td", {text: pct(e.ap)}),
      ...(base ? [el("td", {className: e.change > 1e-9 ? "up" : e.change < -1e-9 ? "down" : "",
                            text: e.change === null ? "–" : (e.change > 0 ? "+" : "") + pct(e.change)})] : []),
      ...others.map((r) => { const q = r.summary.queries.find((x) => x.q === e.q.q);
                             return el("td", {text: q ? pct(apOf(q, setting, row, protocol)) : "–"}); })));
    $("view").replaceChildren(controls, el("table", {className: "queries"}, head, ...rows));
  }

  async function record(run, q) {
    const n = Math.floor(q / 50);
    if (!run.chunks[n]) run.chunks[n] = await script(`${run.base}data/queries-${n}.js`);
    return run.chunks[n][String(q)];
  }

  function move(entry, rank) {            // reranked rows' entries carry their place in the row they reranked
    if (entry.length < 3) return "";
    const was = entry[2];
    if (was === null) return " · new";
    const by = was - rank;
    return by > 0 ? ` · ▲${by} (was #${was})` : by < 0 ? ` · ▼${-by} (was #${was})` : " · =";
  }

  async function showQuery(q, setting, protocol) {
    const first = runs[0].summary;
    setting = setting || first.settings[0];
    protocol = protocol || protocolsOf(first)[protocolsOf(first).length > 1 ? 1 : 0];
    const records = await Promise.all(runs.map((run) => record(run, q)));
    if (!records[0]) throw new Error(`query ${q} is not in this browser (the run keeps ${first.queries.length})`);
    const query = first.queries.find((x) => x.q === q);
    $("where").textContent = ` query ${q} · ${query.name}`;
    const choose = (name, value, options) => el("label", {}, name, el("select", {id: `query-${name}`, onchange: () =>
      { location.hash = link("q", q, $("query-setting").value, $("query-protocol").value); }},
      ...options.map((v) => { const o = el("option", {value: v, text: v}); o.selected = v === value; return o; })));
    const header = el("div", {className: "controls"},
      el("figure", {className: "query-image"}, thumb(runs[0], `q${query.id}`, "query"),
         el("figcaption", {text: `query ${q}: ${query.name} (id ${query.id})`})),
      choose("setting", setting, first.settings), choose("protocol", protocol, protocolsOf(first)),
      el("span", {className: "legend", text: "borders: green positive, red negative, grey junk (by the protocol); " +
                                             "▲/▼: places moved by reranking; click a reranked image for its evidence"}));
    const sections = runs.map((run, r) => {
      const rec = records[r];
      const section = el("section", {className: "run", "data-run": r},
                         ...(runs.length > 1 ? [el("h2", {text: `Run ${r + 1}: ${run.name}`})] : []));
      if (!rec) { section.append(el("p", {text: "this run does not keep this query"})); return section; }
      const summary = run.summary, item = summary.queries.find((x) => x.q === q);
      for (const row of summary.rows) {
        const entries = (rec.rows[setting] || {})[row] || [];
        const base = summary.bases[row], reranker = summary.rerankers[row];
        const evidence = reranker && rec.evidence ? rec.evidence[reranker] || {} : {};
        const ap = apOf(item, setting, row, protocol), before = base ? apOf(item, setting, base, protocol) : null;
        const change = ap !== null && before !== null ? ` (${ap - before >= 0 ? "+" : ""}${pct(ap - before)} vs ${base})` : "";
        section.append(el("h3", {className: "rowname", text: `${row}: AP ${pct(ap)}${change}`}),
          el("div", {className: "row", "data-row": row}, ...entries.map((entry, i) => {
            const figure = el("figure", {className: status(entry, protocol), "data-id": entry[0], title: `id ${entry[0]}`},
              thumb(run, `g${entry[0]}`, `${row} #${i + 1}`), el("figcaption", {text: `#${i + 1}${move(entry, i + 1)}`}));
            if (evidence[entry[0]]) {
              figure.classList.add("explainable");
              figure.addEventListener("click", () => showEvidence(run, query, entry[0], reranker, evidence[entry[0]]));
            }
            return figure;
          })));
      }
      if (rec.missed.length) {
        section.append(el("h3", {className: "rowname", text: "Positives no row shows"}),
          el("div", {className: "row missed"}, ...rec.missed.map((entry) => el("figure",
            {className: status(entry, protocol), "data-id": entry[0]}, thumb(run, `g${entry[0]}`, "positive"),
            el("figcaption", {text: `id ${entry[0]}`})))));
      }
      return section;
    });
    $("view").replaceChildren(header, el("div", {className: "runs"}, ...sections));
  }

  function showEvidence(run, query, id, reranker, found) {
    const sizes = run.summary.sizes, height = 300;
    const [qw, qh] = sizes[`q${query.id}`], [cw, ch] = sizes[`g${id}`];
    const wq = height * qw / qh, wc = height * cw / ch, gap = 20;
    const svg = $("evidence-svg");
    svg.setAttribute("width", wq + gap + wc);
    svg.setAttribute("height", height);
    const shape = (tag, attributes) => {
      const node = document.createElementNS(SVG, tag);
      Object.entries(attributes).forEach(([k, v]) => node.setAttribute(k, v));
      return node;
    };
    const nodes = [shape("image", {href: `${run.base}thumbs/q${query.id}.jpg`, x: 0, y: 0, width: wq, height}),
                   shape("image", {href: `${run.base}thumbs/g${id}.jpg`, x: wq + gap, y: 0, width: wc, height})];
    const heaviest = Math.max(...found.matches.map((m) => m[4] || 0), 1e-12);
    for (const [key, x0, w] of [["query_weights", 0, wq], ["cand_weights", wq + gap, wc]]) {
      const weights = found[key] || [];
      const top = Math.max(...weights.map((p) => p[2]), 1e-12);
      weights.forEach(([x, y, v]) => nodes.push(shape("circle", {class: "weight", cx: x0 + x * w, cy: y * height,
                                                                  r: 2 + 8 * v / top})));
    }
    found.matches.forEach(([x0, y0, x1, y1, mass]) => nodes.push(shape("line", {class: "match",
      x1: x0 * wq, y1: y0 * height, x2: wq + gap + x1 * wc, y2: y1 * height,
      "stroke-width": mass === undefined ? 2 : 1 + 4 * mass / heaviest})));
    svg.replaceChildren(...nodes);
    const what = {gv: `GV: ${found.matches.length} verified matches`,
                  structural: `Structural: the ${found.matches.length} heaviest matches of the transport plan; dots: ` +
                              "its marginals",
                  rrt: "RRT: the classification token's last-layer attention to each local (dots)"}[reranker] ||
                 `${reranker}: ${found.matches.length} matches`;
    $("evidence-title").textContent = `${what} (query ${query.name} · id ${id})`;
    $("evidence").hidden = false;
  }

  document.addEventListener("DOMContentLoaded", () =>
    $("close-evidence").addEventListener("click", () => { $("evidence").hidden = true; }));
  return {configure, load};
})();
