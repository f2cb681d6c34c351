/* llm-pipeline: the service's dashboard (served at /).
 *
 * Lists the jobs, submits new ones, and shows one job live: its figures and charts are fed
 * by the job's recorded timeline, then by its progress events (Server-Sent Events, read with
 * fetch so that the request can carry the bearer token). Every API call carries the token
 * the user entered; it is kept in sessionStorage (this tab only), never in the page's URL.
 */
(function () {
  "use strict";

  const TOKEN_KEY = "llm-pipeline-token";
  const $ = (id) => document.getElementById(id);
  const state = {job: null, data: null, facts: {}, stream: null, renderQueued: false, listTimer: null};

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    const headers = new Headers(opts.headers || {});
    if (token()) headers.set("Authorization", "Bearer " + token());
    opts.headers = headers;
    const response = await fetch(path, opts);
    $("conn").textContent = response.status === 401 ? "the server wants a token" : "";
    if (!response.ok) {
      let detail = response.statusText;
      try {
        detail = (await response.json()).detail || detail;
      } catch (e) { /* not JSON */ }
      const error = new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
      error.status = response.status;
      throw error;
    }
    return response;
  }

  const json = async (path, options) => (await api(path, options)).json();

  // -- the job list ----------------------------------------------------------------------

  function pct(job) {
    const c = job.counters || {};
    const total = c.rows_total || job.rows;
    if (!total) return null;
    return Math.min(100, (100 * (c.rows_done || 0)) / total);
  }

  async function refreshJobs() {
    let jobs;
    try {
      jobs = (await json("/v1/jobs")).jobs;
    } catch (error) {
      $("jobs-message").textContent = `cannot list jobs: ${error.message}`;
      return;
    }
    $("jobs-message").textContent = jobs.length ? "" : "no jobs yet";
    const body = $("jobs");
    body.textContent = "";
    for (const job of jobs) {
      const p = pct(job);
      const bar = LP.h("div", {class: "bar"}, [LP.h("i", {style: `width:${p === null ? 0 : p.toFixed(1)}%`})]);
      const row = LP.h("tr", {"data-job-id": job.id, "data-status": job.status,
        class: state.job === job.id ? "selected" : null}, [
        LP.h("td", {}, [LP.h("code", {text: job.id.slice(0, 8)})]),
        LP.h("td", {}, [LP.h("span", {class: `status ${job.status}`, text: job.status})]),
        LP.h("td", {}, [bar, LP.h("small", {class: "pct", text: p === null ? "" : `${p.toFixed(0)}%`})]),
        LP.h("td", {text: LP.fmt(job.rows)}),
      ]);
      row.addEventListener("click", () => select(job.id));
      body.appendChild(row);
    }
  }

  // -- submitting ------------------------------------------------------------------------

  function number(id) {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  }

  async function submit(event) {
    event.preventDefault();
    const message = $("f-message");
    let settings;
    try {
      settings = $("f-extra").value.trim() ? JSON.parse($("f-extra").value) : {};
    } catch (error) {
      message.textContent = `more settings: not JSON (${error.message})`;
      return;
    }
    const fields = {model: $("f-model").value.trim(), prompt: $("f-prompt").value || undefined,
      system: $("f-system").value || undefined, rpm: number("f-rpm"), tpm: number("f-tpm"),
      concurrency: number("f-concurrency")};
    for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== "") settings[k] = v;
    const form = new FormData();
    const file = $("f-file").files[0];
    if (file) form.append("file", file, file.name);
    else if ($("f-rows").value.trim()) form.append("file", new Blob([$("f-rows").value + "\n"]), "rows.jsonl");
    else {
      message.textContent = "choose a file or type rows";
      return;
    }
    form.append("settings", JSON.stringify(settings));
    message.textContent = "submitting…";
    try {
      const job = await json("/v1/jobs", {method: "POST", body: form});
      message.textContent = `submitted ${job.id.slice(0, 8)}`;
      await refreshJobs();
      select(job.id);
    } catch (error) {
      message.textContent = error.message;
    }
  }

  // -- one job ---------------------------------------------------------------------------

  function sampleOf(counters) {
    return Object.assign({}, counters, {t: counters.elapsed_s});
  }

  /** Add a live progress snapshot to the job's timeline (a new run when time went back). */
  function addLive(counters) {
    if (!state.data || counters.elapsed_s === undefined) return;
    const runs = state.data.runs;
    const sample = sampleOf(counters);
    let run = runs[runs.length - 1];
    const last = run && run.samples[run.samples.length - 1];
    if (!run || (last && sample.t < last.t)) {
      run = {number: runs.length + 1, job: run ? run.job : state.facts, samples: [], end: null};
      runs.push(run);
    }
    if (!last || sample.t > last.t) run.samples.push(sample);
  }

  function render() {
    if (state.renderQueued) return;
    state.renderQueued = true;
    setTimeout(() => {
      state.renderQueued = false;
      if (state.data) LP.renderJob($("job-figures"), state.data);
    }, 250);
  }

  function showJob(job) {
    $("job-id").textContent = job.id;
    const status = $("job-status");
    status.textContent = job.status;
    status.className = `status ${job.status}`;
    $("job-view").setAttribute("data-job-id", job.id);
    $("job-view").setAttribute("data-status", job.status);
    const s = job.settings || {};
    const facts = [["model", s.model], ["rpm", s.rpm], ["tpm", s.tpm], ["rows", job.rows], ["runs", job.runs],
      ["created", job.created_at]];
    $("job-facts").textContent = "";
    for (const [k, v] of facts) {
      if (v !== undefined && v !== null) $("job-facts").appendChild(LP.h("span", {text: `${k}: ${v}`}));
    }
    const ended = ["succeeded", "failed", "cancelled", "interrupted", "stopped"].includes(job.status);
    $("btn-cancel").disabled = ended || job.status === "cancelling";
    $("btn-resume").disabled = !ended || job.status === "succeeded";
    $("job-error").textContent = job.error || job.stopped || "";
  }

  async function loadJob(id) {
    const [job, timeline, failures] = await Promise.all([
      json(`/v1/jobs/${id}`), json(`/v1/jobs/${id}/timeline`),
      json(`/v1/jobs/${id}/failures?limit=20`)]);
    if (state.job !== id) return null;
    const s = job.settings || {};
    state.facts = {model: s.model, rpm: s.rpm, tpm: s.tpm};
    state.data = {runs: timeline.runs, summary: job.summary, failures: failures.failures};
    showJob(job);
    render();
    return job;
  }

  /** Fetch the latest failures again when more rows failed (at most every two seconds). */
  async function refreshFailures(id, failed) {
    const now = Date.now();
    if (!state.data || failed <= (state.failedSeen || 0) || now - (state.failuresAt || 0) < 2000) return;
    state.failedSeen = failed;
    state.failuresAt = now;
    try {
      const found = await json(`/v1/jobs/${id}/failures?limit=20`);
      if (state.job === id && state.data) {
        state.data.failures = found.failures;
        render();
      }
    } catch (error) { /* the next end event loads them */ }
  }

  async function follow(id, controller) {
    const response = await api(`/v1/jobs/${id}/events`, {signal: controller.signal});
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message", data = "";
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trim();
        }
        if (!data || state.job !== id) continue;
        const payload = JSON.parse(data);
        if (event === "progress") {
          addLive(payload.counters || {});
          refreshFailures(id, (payload.counters || {}).failed || 0);
          $("job-status").textContent = payload.status;
          $("job-view").setAttribute("data-status", payload.status);
          render();
        } else if (event === "end") {
          await loadJob(id);
          refreshJobs();
        }
      }
    }
  }

  async function select(id) {
    if (state.stream) state.stream.abort();
    state.job = id;
    state.data = null;
    state.failedSeen = 0;
    location.hash = `job=${id}`;
    $("job-view").hidden = false;
    $("job-figures").textContent = "";
    for (const row of document.querySelectorAll("#jobs tr")) {
      row.classList.toggle("selected", row.getAttribute("data-job-id") === id);
    }
    const controller = new AbortController();
    state.stream = controller;
    try {
      await loadJob(id);
      await follow(id, controller);
    } catch (error) {
      if (error.name !== "AbortError" && state.job === id) $("job-error").textContent = error.message;
    }
  }

  async function act(method, suffix) {
    const id = state.job;
    if (!id) return;
    try {
      await api(`/v1/jobs/${id}${suffix}`, {method});
      await refreshJobs();
      if (suffix === "/resume") select(id);
      else showJob(await json(`/v1/jobs/${id}`));
    } catch (error) {
      $("job-error").textContent = error.message;
    }
  }

  async function download(kind) {
    const id = state.job;
    try {
      const blob = await (await api(`/v1/jobs/${id}/${kind}`)).blob();
      const url = URL.createObjectURL(blob);
      const link = LP.h("a", {href: url, download: `${id}-${kind}.jsonl`});
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (error) {
      $("job-error").textContent = error.message;
    }
  }

  // -- start -----------------------------------------------------------------------------

  function start() {
    $("token").value = token();
    $("save-token").addEventListener("click", () => {
      sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
      refreshJobs();
      if (state.job) select(state.job);
    });
    $("submit-form").addEventListener("submit", submit);
    $("btn-cancel").addEventListener("click", () => act("DELETE", ""));
    $("btn-resume").addEventListener("click", () => act("POST", "/resume"));
    $("btn-results").addEventListener("click", () => download("results"));
    $("btn-failed").addEventListener("click", () => download("failed"));
    refreshJobs();
    state.listTimer = setInterval(refreshJobs, 2000);
    const wanted = /job=([0-9a-f]{32})/.exec(location.hash);
    if (wanted) select(wanted[1]);
  }

  start();
})();
