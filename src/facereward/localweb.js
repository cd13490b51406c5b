"use strict";
// What the local pages (annotate, study) share: element lookup, the status and error lines, JSON API calls that
// surface the server's one-line errors, and image preloading. Served by facereward.localweb at /localweb.js.
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

  return { $, setStatus, setError, api, preload };
})();
