"use strict";
// What the local pages (annotate, study) share: element lookup, the status and error lines, JSON API calls that
// surface the server's one-line errors, image preloading, the chosen side's highlight and one request at a time. Served by facereward.localweb at /localweb.js.
window.localweb = (function () {
  const $ = (id) => document.getElementById(id);

  function setStatus(text) { $("status").textContent = text; }
  function setError(text) { $("error").textContent = text || ""; }

  async function api(method, url, body) {
    const opts = { method, headers: {} };
    if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(url, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    if (!res.ok && !(data && data.progress)) {
      throw new Error((data && data.error) || (res.status + " " + res.statusText));
    }
    return data;
  }

  function preload(url) {
    return new Promise((resolve) => {
      if (!url) { resolve(null); return; }
      const im = new Image();
      im.onload = () => resolve(im);
      im.onerror = () => resolve(null);
      im.src = url;
    });
  }

  // a brief highlight of the chosen side ("left", "right"; "tie" both; anything else none)
  function flash(choice) {
    const figs = choice === "left" ? ["left-fig"] : choice === "right" ? ["right-fig"] : choice === "tie" ? ["left-fig", "right-fig"] : [];
    for (const id of figs) {
      const el = $(id);
      el.classList.add(choice === "tie" ? "flash-tie" : "flash");
      setTimeout(() => el.classList.remove("flash", "flash-tie"), 150);
    }
  }

  // run(action): one request at a time (a double key press never answers twice), its reply to render(), errors shown
  function oneAtATime(render) {
    let busy = false;
    return async function run(action) {
      if (busy) return;
      busy = true;
      setStatus("saving\u2026");
      try {
        const data = await action();
        setError(data && data.error ? data.error : "");
        await render(data);
      } catch (e) {
        setError(String(e.message || e));
        setStatus("error");
      } finally {
        busy = false;
      }
    };
  }

  return { $, setStatus, setError, api, preload, flash, oneAtATime };
})();
