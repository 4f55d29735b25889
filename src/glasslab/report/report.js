// Draws every figure of a glasslab page from the embedded JSON: line charts with uPlot (hover, drag to zoom,
// double-click to reset) and heat maps on a plain canvas (hover for values). Each figure can be saved as PNG.
(function () {
  "use strict";
  const FIGS = JSON.parse(document.getElementById("glasslab-figures").textContent);
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
    [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
  const FONT = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
  const HEIGHT = 260;
  const charts = new Map(); // figure id -> uPlot instance

  function fmt(v) {
    if (v == null || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return Number(v.toPrecision(4)).toString();
  }

  // Tick labels with just enough decimals to tell neighbours apart (0.0025 and 0.003 stay distinct).
  function ticks(u, splits, axisIdx) {
    const scale = u.axes[axisIdx].scale;
    if (u.scales[scale].distr === 3) return splits.map((v) => (v == null ? "" : fmt(v)));
    const finite = splits.filter((v) => v != null);
    if (finite.length < 2) return splits.map((v) => (v == null ? "" : fmt(v)));
    const step = Math.abs(finite[1] - finite[0]) || 1;
    const big = Math.max(...finite.map(Math.abs));
    if (big >= 1e6 || (step < 1e-4 && big < 1e-2)) {
      const digits = Math.min(6, Math.max(0, Math.ceil(Math.log10(big / step) - 1e-9)));
      return splits.map((v) => (v == null ? "" : v === 0 ? "0" : v.toExponential(digits)));
    }
    const decimals = Math.min(10, Math.max(0, Math.ceil(-Math.log10(step) - 1e-9)));
    return splits.map((v) => (v == null ? "" : v.toFixed(decimals)));
  }

  function colour(t) {
    const x = Math.min(1, Math.max(0, t)) * (VIRIDIS.length - 1);
    const i = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const f = x - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
    return "rgb(" + a.map((c, k) => Math.round(c + (b[k] - c) * f)).join(",") + ")";
  }

  function widthOf(body) {
    return Math.max(320, Math.floor(body.clientWidth || 800));
  }

  function drawLines(el, fig) {
    const body = el.querySelector(".fig-body");
    const positive = fig.series.every((s) => s.y.every((v) => v == null || v > 0));
    const opts = {
      width: widthOf(body),
      height: HEIGHT,
      scales: { x: { time: false }, y: { distr: fig.ylog && positive ? 3 : 1 } },
      axes: [
        { label: fig.xlabel, font: FONT, labelFont: FONT, values: ticks },
        { label: fig.ylabel || "", font: FONT, labelFont: FONT, size: 64, values: ticks },
      ],
      series: [{ label: fig.xlabel, value: (u, v) => fmt(v) }],
      bands: [],
      cursor: { drag: { x: true, y: false } },
    };
    const data = [fig.x];
    fig.series.forEach((s, i) => {
      const stroke = PALETTE[i % PALETTE.length];
      opts.series.push({ label: s.label, stroke, width: 1.5, spanGaps: true, points: { show: s.points, size: 5 },
        value: (u, v) => fmt(v) });
      data.push(s.y);
      if (s.lo && s.hi) { // a 95% interval: its bounds as faint lines, the band between them filled
        for (const [bound, values] of [["95% hi", s.hi], ["95% lo", s.lo]]) {
          opts.series.push({ label: s.label + " " + bound, stroke: stroke + "66", width: 1, spanGaps: true,
            points: { show: false }, value: (u, v) => fmt(v) });
          data.push(values);
        }
        opts.bands.push({ series: [data.length - 2, data.length - 1], fill: stroke + "22" });
      }
    });
    charts.set(el.id, new uPlot(opts, data, body));
  }

  function drawHeatmap(el, fig) {
    const body = el.querySelector(".fig-body");
    body.innerHTML = "";
    const rows = fig.rows.length, cols = fig.x.length;
    const measure = document.createElement("canvas").getContext("2d");
    measure.font = FONT;
    const left = Math.ceil(Math.max(20, ...fig.rows.map((r) => measure.measureText(r).width))) + 10;
    const right = 90, top = 6, bottom = 38;
    const W = widthOf(body), plotW = W - left - right;
    const cellH = Math.max(5, Math.min(18, Math.floor(300 / Math.max(rows, 1))));
    const plotH = cellH * rows, H = top + Math.max(plotH, 70) + bottom;
    const tf = (v) => (v == null ? null : fig.log ? (v > 0 ? Math.log10(v) : null) : v);
    let lo = fig.vmin != null ? tf(fig.vmin) : Infinity, hi = fig.vmax != null ? tf(fig.vmax) : -Infinity;
    if (fig.vmin == null || fig.vmax == null) {
      for (const row of fig.z) for (const v of row) {
        const t = tf(v);
        if (t == null) continue;
        if (fig.vmin == null) lo = Math.min(lo, t);
        if (fig.vmax == null) hi = Math.max(hi, t);
      }
    }
    if (!Number.isFinite(lo) || !Number.isFinite(hi)) { lo = 0; hi = 1; }
    if (hi <= lo) hi = lo + 1;
    const dpr = window.devicePixelRatio || 1;
    const canvas = document.createElement("canvas");
    canvas.width = Math.round(W * dpr); canvas.height = Math.round(H * dpr);
    canvas.style.width = W + "px"; canvas.style.height = H + "px";
    const ctx = canvas.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H);
    const cellW = plotW / Math.max(cols, 1);
    const x0 = (c) => Math.floor(left + c * cellW);
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const t = tf(fig.z[r][c]);
        ctx.fillStyle = t == null ? "#e5e7eb" : colour((t - lo) / (hi - lo));
        ctx.fillRect(x0(c), top + r * cellH, x0(c + 1) - x0(c), cellH);
      }
    }
    if (fig.threshold != null) {
      ctx.strokeStyle = "#dc2626"; ctx.lineWidth = 1.5;
      for (let r = 0; r < rows; r++) for (let c = 0; c < cols; c++) {
        const v = fig.z[r][c];
        if (v != null && v < fig.threshold) ctx.strokeRect(x0(c) + 0.75, top + r * cellH + 0.75, Math.max(1, x0(c + 1) - x0(c) - 1.5), cellH - 1.5);
      }
    }
    ctx.fillStyle = "#1d2330"; ctx.font = FONT; ctx.textBaseline = "middle"; ctx.textAlign = "right";
    const every = Math.ceil(11 / cellH);
    for (let r = 0; r < rows; r += every) ctx.fillText(fig.rows[r], left - 6, top + (r + 0.5) * cellH);
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    const ticks = Math.min(cols, Math.max(2, Math.floor(plotW / 90)));
    for (let k = 0; k < ticks; k++) {
      const c = ticks === 1 ? 0 : Math.round(k * (cols - 1) / (ticks - 1));
      const x = left + (c + 0.5) * cellW;
      ctx.fillRect(x, top + plotH, 1, 4);
      ctx.fillText(String(fig.x[c]), x, top + plotH + 6);
    }
    ctx.fillText(fig.xlabel, left + plotW / 2, top + plotH + 22);
    const bx = left + plotW + 14, bh = Math.max(plotH, 70);
    for (let i = 0; i < bh; i++) { ctx.fillStyle = colour(1 - i / bh); ctx.fillRect(bx, top + i, 12, 1); }
    ctx.fillStyle = "#1d2330"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
    const label = (t) => fmt(fig.log ? Math.pow(10, t) : t);
    ctx.fillText(label(hi), bx + 16, top + 5);
    ctx.fillText(label((lo + hi) / 2), bx + 16, top + bh / 2);
    ctx.fillText(label(lo), bx + 16, top + bh - 5);
    if (fig.log) ctx.fillText("log scale", bx - 2, top + bh + 14);
    body.appendChild(canvas);
    const tip = document.createElement("div");
    tip.className = "tip";
    body.appendChild(tip);
    canvas.addEventListener("mousemove", (ev) => {
      const rect = canvas.getBoundingClientRect();
      const mx = ev.clientX - rect.left, my = ev.clientY - rect.top;
      const c = Math.floor((mx - left) / cellW), r = Math.floor((my - top) / cellH);
      if (c < 0 || c >= cols || r < 0 || r >= rows) { tip.style.display = "none"; return; }
      tip.textContent = fig.rows[r] + " · " + fig.xlabel + " " + fig.x[c] + ": " + fmt(fig.z[r][c]);
      tip.style.display = "block";
      tip.style.left = Math.min(mx + 12, W - 200) + "px";
      tip.style.top = (my + 12) + "px";
    });
    canvas.addEventListener("mouseleave", () => { tip.style.display = "none"; });
  }

  function savePNG(el, fig) {
    const dpr = window.devicePixelRatio || 1;
    const src = fig.type === "heatmap" ? el.querySelector(".fig-body canvas") : charts.get(el.id).ctx.canvas;
    const legend = fig.type === "lines" ? fig.series.map((s, i) => [s.label, PALETTE[i % PALETTE.length]]) : [];
    const measure = document.createElement("canvas").getContext("2d");
    measure.font = FONT;
    const lineH = 16, titleH = 24, width = src.width / dpr;
    const lines = [[]];
    let used = 0;
    for (const item of legend) {
      const w = measure.measureText(item[0]).width + 30;
      if (used + w > width - 10 && lines[lines.length - 1].length) { lines.push([]); used = 0; }
      lines[lines.length - 1].push(item); used += w;
    }
    const legendH = legend.length ? lines.length * lineH + 6 : 0;
    const out = document.createElement("canvas");
    out.width = src.width; out.height = src.height + Math.round((titleH + legendH) * dpr);
    const ctx = out.getContext("2d");
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, out.width, out.height);
    ctx.scale(dpr, dpr);
    ctx.fillStyle = "#1d2330"; ctx.font = "600 13px system-ui, sans-serif"; ctx.textBaseline = "middle";
    ctx.fillText(fig.title, 8, titleH / 2);
    ctx.drawImage(src, 0, titleH, src.width / dpr, src.height / dpr);
    ctx.font = FONT;
    lines.forEach((line, k) => {
      let x = 8;
      const y = titleH + src.height / dpr + 6 + k * lineH + lineH / 2;
      for (const [label, stroke] of line) {
        ctx.fillStyle = stroke; ctx.fillRect(x, y - 1, 16, 3);
        ctx.fillStyle = "#1d2330"; ctx.fillText(label, x + 20, y);
        x += measure.measureText(label).width + 30;
      }
    });
    const a = document.createElement("a");
    a.download = fig.title.replace(/[^A-Za-z0-9._-]+/g, "_").replace(/^_+|_+$/g, "") + ".png";
    a.href = out.toDataURL("image/png");
    a.click();
  }

  function draw(el) {
    const fig = FIGS[el.dataset.fig];
    try {
      if (fig.type === "heatmap") drawHeatmap(el, fig); else drawLines(el, fig);
      return true;
    } catch (err) {
      el.querySelector(".fig-body").innerHTML = '<p class="fig-error">could not draw this figure: ' + String(err).replace(/</g, "&lt;") + "</p>";
      console.error("glasslab figure " + el.id + ": " + err);
      return false;
    }
  }

  const figures = Array.from(document.querySelectorAll(".figure[data-fig]"));
  let drawn = 0;
  for (const el of figures) {
    if (draw(el)) drawn++;
    el.querySelector("button.png").addEventListener("click", () => savePNG(el, FIGS[el.dataset.fig]));
  }
  document.body.dataset.figures = String(figures.length);
  document.body.dataset.drawn = String(drawn);

  let pending = null;
  window.addEventListener("resize", () => {
    clearTimeout(pending);
    pending = setTimeout(() => {
      for (const el of figures) {
        const fig = FIGS[el.dataset.fig];
        if (fig.type === "heatmap") drawHeatmap(el, fig);
        else if (charts.has(el.id)) charts.get(el.id).setSize({ width: widthOf(el.querySelector(".fig-body")), height: HEIGHT });
      }
    }, 150);
  });
})();
