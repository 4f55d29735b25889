// The page of `glasslab serve`: a chat over the server's own OpenAI endpoint (streamed with server-sent events),
// and a live view of the runs directory whose figures are the report's, redrawn with uPlot as the run trains.
// Everything it loads comes from the server: no network beyond it.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 2000;
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
  let history = [];
  let controller = null;
  let timer = null;
  const charts = new Map(); // figure key -> {plot, labels}

  // ---- shared ------------------------------------------------------------------------------------------------

  $("api-key").value = localStorage.getItem("glasslab-api-key") || "";
  $("api-key").addEventListener("change", () => localStorage.setItem("glasslab-api-key", $("api-key").value));

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if ($("api-key").value) h.Authorization = "Bearer " + $("api-key").value;
    return h;
  }

  async function getJSON(url) {
    const r = await fetch(url, { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    return body;
  }

  function fmt(v) {
    if (v == null || Number.isNaN(v)) return "—";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return Number(v.toPrecision(4)).toString();
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    return e;
  }

  // ---- chat --------------------------------------------------------------------------------------------------

  async function loadModels() {
    try {
      const models = await getJSON("/v1/models");
      const select = $("model");
      select.innerHTML = "";
      for (const m of models.data) select.appendChild(el("option", null, m.id)).value = m.id;
      document.body.dataset.models = String(models.data.length);
    } catch (err) {
      $("chat-error").textContent = String(err.message || err);
    }
  }

  function bubble(role, text) {
    const m = el("div", "msg " + role);
    m.appendChild(el("span", "who", role === "user" ? "you" : "bot"));
    const body = el("span", "text", text || "");
    m.appendChild(body);
    $("messages").appendChild(m);
    $("messages").scrollTop = $("messages").scrollHeight;
    return { box: m, body: body };
  }

  function number(id) {
    const v = $(id).value;
    return v === "" ? undefined : Number(v);
  }

  async function send(text) {
    $("chat-error").textContent = "";
    history.push({ role: "user", content: text });
    bubble("user", text);
    const out = bubble("assistant", "");
    const system = $("system").value.trim();
    const body = {
      model: $("model").value,
      messages: (system ? [{ role: "system", content: system }] : []).concat(history),
      stream: true,
      stream_options: { include_usage: true },
      temperature: number("temperature"),
      top_p: number("top_p"),
      top_k: number("top_k"),
      max_tokens: number("max_tokens"),
      seed: number("seed"),
    };
    controller = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    let answer = "";
    const turns = [];
    try {
      const r = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: headers({ "Content-Type": "application/json" }),
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!r.ok) {
        const err = await r.json();
        throw new Error(err.error ? err.error.message : r.statusText);
      }
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
          const chunk = JSON.parse(event.slice(6));
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) {
            out.box.appendChild(el("span", "meta", chunk.usage.prompt_tokens + " prompt tokens, " + chunk.usage.completion_tokens + " generated"));
          }
          for (const choice of chunk.choices) {
            const delta = choice.delta || {};
            for (const call of delta.calculator_calls || []) {
              out.body.appendChild(el("span", "tool", "[calculator: " + call.expression + " = " + call.result + "]"));
              turns.push({ role: "assistant", content: "<|tool_call|>" + call.expression }, { role: "tool", content: call.result });
            }
            if (delta.content) {
              answer += delta.content;
              out.body.appendChild(document.createTextNode(delta.content));
              $("messages").scrollTop = $("messages").scrollHeight;
            }
            if (choice.finish_reason) out.box.dataset.finish = choice.finish_reason;
          }
        }
      }
      history = history.concat(turns, [{ role: "assistant", content: answer }]);
    } catch (err) {
      if (err.name === "AbortError") {
        out.box.appendChild(el("span", "meta", "(stopped)"));
        history = history.concat(turns, [{ role: "assistant", content: answer }]);
      } else {
        history.pop();
        out.box.remove();
        $("chat-error").textContent = String(err.message || err);
      }
    } finally {
      controller = null;
      $("send").disabled = false;
      $("stop").disabled = true;
      out.box.dataset.done = "1";
    }
  }

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("reset").addEventListener("click", () => {
    history = [];
    $("messages").innerHTML = "";
  });

  // ---- runs --------------------------------------------------------------------------------------------------

  async function refreshRuns() {
    try {
      const runs = await getJSON("/api/runs");
      const tbody = $("runs-table").querySelector("tbody");
      tbody.innerHTML = "";
      for (const r of runs) {
        const tr = document.createElement("tr");
        const name = el("td");
        const link = el("a", null, r.name);
        link.href = "#run/" + encodeURIComponent(r.name);
        name.appendChild(link);
        if (r.served) name.appendChild(el("span", "muted", " (chat)"));
        tr.appendChild(name);
        tr.appendChild(el("td", "status-" + r.status, r.status));
        tr.appendChild(el("td", null, r.stage || "—"));
        tr.appendChild(el("td", "step", String(r.last_step ?? "—")));
        tr.appendChild(el("td", "metrics", Object.entries(r.metrics).map(([k, v]) => k + " " + fmt(v)).join("  ")));
        tr.appendChild(el("td", "muted", (r.updated || "").replace("T", " ").slice(0, 19)));
        tr.dataset.run = r.name;
        tbody.appendChild(tr);
      }
      document.body.dataset.runs = String(runs.length);
    } catch (err) {
      $("runs-view").querySelector("p").textContent = String(err.message || err);
    }
  }

  function drawFigure(key, fig) {
    const data = [fig.x].concat(fig.series.map((s) => s.y));
    const labels = fig.series.map((s) => s.label).join("\u0000");
    const known = charts.get(key);
    if (known && known.labels === labels) {
      known.plot.setData(data);
      return;
    }
    if (known) known.plot.destroy();
    let box = document.querySelector('.figure[data-key="' + CSS.escape(key) + '"]');
    if (!box) {
      box = el("div", "figure");
      box.dataset.key = key;
      const title = el("div", "title", fig.title + " ");
      title.appendChild(el("span", "section", fig.section));
      box.appendChild(title);
      box.appendChild(el("div", "body"));
      $("figures").appendChild(box);
    }
    const body = box.querySelector(".body");
    body.innerHTML = "";
    const positive = fig.series.every((s) => s.y.every((v) => v == null || v > 0));
    const opts = {
      width: Math.max(320, body.clientWidth || 480),
      height: 220,
      scales: { x: { time: false }, y: { distr: fig.ylog && positive ? 3 : 1 } },
      axes: [{ label: fig.xlabel }, { label: fig.ylabel || "", size: 60 }],
      series: [{ label: fig.xlabel }].concat(fig.series.map((s, i) => ({
        label: s.label,
        stroke: PALETTE[i % PALETTE.length],
        width: 1.5,
        spanGaps: true,
        value: (u, v) => fmt(v),
      }))),
    };
    charts.set(key, { plot: new uPlot(opts, data, body), labels: labels });
  }

  async function refreshRun(name) {
    try {
      const run = await getJSON("/api/runs/" + encodeURIComponent(name));
      $("run-name").textContent = run.name;
      $("run-status").textContent = run.status;
      $("run-status").className = "status-" + run.status;
      $("run-stage").textContent = run.stage || "—";
      $("run-step").textContent = String(run.last_step ?? "—");
      $("run-message").textContent = run.message || "";
      for (const fig of run.figures) drawFigure(fig.section + " / " + fig.title, fig);
      document.body.dataset.figures = String(run.figures.length);
    } catch (err) {
      $("run-message").textContent = String(err.message || err);
    }
  }

  async function showReport(name) {
    const r = await fetch("/api/runs/" + encodeURIComponent(name) + "/report", { headers: headers() });
    $("report").srcdoc = await r.text();
    $("report").hidden = false;
  }

  // ---- views -------------------------------------------------------------------------------------------------

  function route() {
    clearInterval(timer);
    const hash = decodeURIComponent(location.hash.slice(1)) || "chat";
    const view = hash.startsWith("run/") ? "run" : hash === "runs" ? "runs" : "chat";
    $("chat-view").hidden = view !== "chat";
    $("runs-view").hidden = view !== "runs";
    $("run-view").hidden = view !== "run";
    $("nav-chat").className = view === "chat" ? "active" : "";
    $("nav-runs").className = view !== "chat" ? "active" : "";
    if (view === "runs") {
      refreshRuns();
      timer = setInterval(refreshRuns, POLL_MS);
    } else if (view === "run") {
      const name = hash.slice(4);
      for (const c of charts.values()) c.plot.destroy();
      charts.clear();
      $("figures").innerHTML = "";
      $("report").hidden = true;
      $("show-report").onclick = () => showReport(name);
      refreshRun(name);
      timer = setInterval(() => refreshRun(name), POLL_MS);
    }
  }

  window.addEventListener("hashchange", route);
  loadModels();
  route();
  document.body.dataset.ready = "1";
})();
