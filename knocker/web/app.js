"use strict";
// Knocker knock page. Talks only to this origin's ./knock: POST to knock, DELETE to sign
// out (docs/api.md#grants). (The Content-Security-Policy
// allows nothing else) and keeps the key, the auto-knock choice and the options in
// localStorage of this browser.
(() => {
  const STORE_KEY = "knocker.apiKey";
  const STORE_AUTO = "knocker.autoKnock";
  const STORE_TTL = "knocker.ttl";
  const STORE_IP = "knocker.ip";
  const REFRESH_FRACTION = 0.9; // re-knock when 90 % of the granted time has passed
  // The server fills in its own limit (knocker/webpage.py): one definition, in config.py.
  const MAX_TTL = Number(document.documentElement.dataset.maxTtl);
  const MAX_TIMER_MS = 2147483647; // setTimeout cannot wait longer (about 24.8 days)
  const RETRY_MIN_MS = 5000;
  const RETRY_MAX_MS = 300000;

  const el = (id) => document.getElementById(id);
  const ui = {
    status: el("status"),
    grant: el("grant"),
    entry: el("entry"),
    countdown: el("countdown"),
    expiresAt: el("expires-at"),
    cap: el("cap-warning"),
    error: el("error"),
    form: el("knock-form"),
    keyEntry: el("key-entry"),
    keySaved: el("key-saved"),
    key: el("key"),
    forget: el("forget"),
    options: el("options"),
    ttl: el("ttl"),
    ip: el("ip"),
    auto: el("auto"),
    button: el("knock"),
    signOut: el("sign-out"),
  };

  // localStorage throws in some private modes; the page then works without memory.
  const store = {
    get(name) {
      try { return window.localStorage.getItem(name); } catch (e) { return null; }
    },
    set(name, value) {
      try { window.localStorage.setItem(name, value); } catch (e) { /* no memory */ }
    },
    remove(name) {
      try { window.localStorage.removeItem(name); } catch (e) { /* no memory */ }
    },
  };

  let deadline = 0; // local time (ms) when the current grant expires; 0 = none
  let refreshAt = 0; // local time (ms) of the next automatic knock; 0 = none
  let refreshTimer = 0;
  let tickTimer = 0;
  let failures = 0;
  let busy = false;

  function setStatus(text, ok) {
    ui.status.textContent = text;
    ui.status.classList.toggle("ok", Boolean(ok));
  }

  function showError(text) {
    ui.error.textContent = text || "";
    ui.error.hidden = !text;
  }

  function showCap(text) {
    ui.cap.textContent = text || "";
    ui.cap.hidden = !text;
  }

  function showKeyState() {
    const saved = Boolean(store.get(STORE_KEY));
    ui.keyEntry.hidden = saved;
    ui.keySaved.hidden = !saved;
  }

  function words(seconds) {
    const s = Math.max(0, Math.round(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const m = Math.floor((s % 3600) / 60);
    const parts = [];
    if (d) parts.push(d + (d === 1 ? " day" : " days"));
    if (h) parts.push(h + (h === 1 ? " hour" : " hours"));
    if (m && !d) parts.push(m + (m === 1 ? " minute" : " minutes"));
    if (!d && !h && (s % 60 || !parts.length)) parts.push((s % 60) + ((s % 60) === 1 ? " second" : " seconds"));
    return parts.join(" ");
  }

  function clockText(seconds) {
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400);
    const h = Math.floor((s % 86400) / 3600);
    const mm = String(Math.floor((s % 3600) / 60)).padStart(2, "0");
    const ss = String(s % 60).padStart(2, "0");
    if (d) return d + " d " + h + ":" + mm + ":" + ss;
    if (h) return h + ":" + mm + ":" + ss;
    return mm + ":" + ss;
  }

  function explain(status, reason) {
    const detail = reason ? " (" + reason + ")" : "";
    switch (status) {
      case 0:
        return "Could not reach Knocker. Check your network connection, then try again.";
      case 400:
        return "The server rejected the input" + detail + ". Check the time to live and the address.";
      case 401:
        return store.get(STORE_KEY)
          ? "Wrong key: the server no longer accepts the saved API key. Forget it and enter the current one."
          : "Wrong key: the server did not accept this API key. Check it and try again.";
      case 403:
        return "This key may not whitelist other addresses. Clear the address field to whitelist this device.";
      case 413:
      case 415:
        return "The server refused the request as malformed (HTTP " + status + ").";
      case 429:
        return "Too many attempts from this address. Wait a minute, then try again.";
      case 500:
        return "Knocker could not grant access because of a server error. Try again later.";
      case 503:
        return "Knocker cannot grant access right now (its firewall is unavailable or busy). Try again shortly.";
      default:
        return "Unexpected answer from the server (HTTP " + status + ")" + detail + ".";
    }
  }

  function tick() {
    if (!deadline) return;
    const left = (deadline - Date.now()) / 1000;
    if (left <= 0) {
      clearInterval(tickTimer);
      tickTimer = 0;
      deadline = 0;
      ui.countdown.textContent = "expired";
      setStatus("The whitelist entry has expired.");
      return;
    }
    ui.countdown.textContent = clockText(left);
  }

  function scheduleKnock(at) {
    clearTimeout(refreshTimer);
    refreshAt = at;
    // Timers longer than setTimeout's limit fire at once; wake early and check again.
    const wait = Math.min(Math.max(0, at - Date.now()), MAX_TIMER_MS);
    refreshTimer = setTimeout(() => {
      if (Date.now() + 1000 < refreshAt) scheduleKnock(refreshAt);
      else knock("refresh");
    }, wait);
  }

  function cancelSchedule() {
    clearTimeout(refreshTimer);
    refreshTimer = 0;
    refreshAt = 0;
  }

  function validGrant(data) {
    return data && typeof data.whitelisted_entry === "string" &&
      Number.isInteger(data.expires_at) && Number.isInteger(data.expires_in_seconds);
  }

  function succeed(data, response, requestedTtl, key, ttlText, ip) {
    failures = 0;
    if (!store.get(STORE_KEY)) {
      store.set(STORE_KEY, key); // remembered only once the server accepted it
      ui.key.value = "";
      showKeyState();
    }
    store.set(STORE_TTL, ttlText);
    store.set(STORE_IP, ip);

    const now = Date.now();
    // The server reports the entry's real expiry, which can be later than our TTL when a
    // longer grant already existed. Judge it against the server's clock (Date header),
    // not this device's, which may be off.
    let remainingMs = data.expires_in_seconds * 1000;
    const serverNow = Date.parse(response.headers.get("Date") || "");
    if (Number.isFinite(serverNow)) {
      const byServer = data.expires_at * 1000 - serverNow - 1000; // Date has 1 s resolution
      if (byServer > remainingMs) remainingMs = byServer;
    }
    deadline = now + remainingMs;

    ui.entry.textContent = data.whitelisted_entry;
    const end = new Date(deadline);
    const sameDay = end.toDateString() === new Date(now).toDateString();
    ui.expiresAt.textContent = "at " + (sameDay ? end.toLocaleTimeString() : end.toLocaleString());
    ui.grant.hidden = false;
    setStatus("Access granted for " + words(remainingMs / 1000) + ".", true);
    showError("");
    if (requestedTtl !== null && data.expires_in_seconds < requestedTtl) {
      showCap("The server granted " + words(data.expires_in_seconds) + " instead of the requested " +
        words(requestedTtl) + ": this key's maximum time is lower.");
    } else {
      showCap("");
    }
    tick();
    if (!tickTimer) tickTimer = setInterval(tick, 1000);
    scheduleKnock(now + Math.max(1000, data.expires_in_seconds * 1000 * REFRESH_FRACTION));
  }

  function fail(status, reason, why) {
    showError(explain(status, reason));
    setStatus(deadline ? "Still whitelisted, but the last knock failed." : "Not whitelisted.");
    const transient = status === 0 || status === 429 || status >= 500;
    if (transient && why !== "manual" && store.get(STORE_KEY)) {
      // Automatic knocks retry transient failures with exponential backoff and jitter.
      failures += 1;
      const ceiling = Math.min(RETRY_MAX_MS, RETRY_MIN_MS * 2 ** (failures - 1));
      scheduleKnock(Date.now() + ceiling / 2 + Math.random() * ceiling / 2);
    }
  }

  async function knock(why) {
    if (busy) return;
    const key = store.get(STORE_KEY) || ui.key.value.trim();
    if (!key) {
      showError("Enter your API key first.");
      ui.key.focus();
      return;
    }
    const body = {};
    const ttlText = ui.ttl.value.trim();
    let requestedTtl = null;
    if (ttlText) {
      const ttl = Number(ttlText);
      if (!/^[0-9]+$/.test(ttlText) || ttl < 1 || ttl > MAX_TTL) {
        showError("The time to live must be a whole number of seconds from 1 to " + MAX_TTL + ".");
        ui.options.open = true;
        ui.ttl.focus();
        return;
      }
      body.ttl = ttl;
      requestedTtl = ttl;
    }
    const ip = ui.ip.value.trim();
    if (ip) body.ip_address = ip;

    busy = true;
    cancelSchedule();
    ui.button.disabled = true;
    ui.button.setAttribute("aria-busy", "true");
    setStatus("Knocking…");
    let response = null;
    let data = null;
    try {
      response = await fetch("knock", {
        method: "POST",
        headers: { "X-Api-Key": key, "Content-Type": "application/json" },
        body: JSON.stringify(body),
        cache: "no-store",
        credentials: "omit",
        redirect: "error", // never carry the key to another address
        referrerPolicy: "no-referrer",
      });
      try { data = await response.json(); } catch (e) { data = null; }
    } catch (e) {
      response = null;
    } finally {
      busy = false;
      ui.button.disabled = false;
      ui.button.removeAttribute("aria-busy");
    }
    if (response === null) {
      fail(0, null, why);
    } else if (response.ok && validGrant(data)) {
      succeed(data, response, requestedTtl, key, ttlText, ip);
    } else {
      const reason = data && typeof data.error === "string" ? data.error.slice(0, 200) : null;
      fail(response.ok ? -1 : response.status, reason, why);
    }
  }

  // DELETE ./knock: end the grants this key made for this device (or the address field's).
  async function signOut() {
    if (busy) return;
    const key = store.get(STORE_KEY) || ui.key.value.trim();
    if (!key) {
      showError("Enter your API key first.");
      ui.key.focus();
      return;
    }
    const ip = ui.ip.value.trim();
    busy = true;
    cancelSchedule(); // no automatic knock may undo the sign-out
    ui.signOut.disabled = true;
    setStatus("Signing out…");
    let response = null;
    let data = null;
    try {
      response = await fetch("knock", {
        method: "DELETE",
        headers: { "X-Api-Key": key, "Content-Type": "application/json" },
        body: JSON.stringify(ip ? { ip_address: ip } : {}),
        cache: "no-store",
        credentials: "omit",
        redirect: "error",
        referrerPolicy: "no-referrer",
      });
      try { data = await response.json(); } catch (e) { data = null; }
    } catch (e) {
      response = null;
    } finally {
      busy = false;
      ui.signOut.disabled = false;
    }
    if (response !== null && (response.ok || response.status === 404)) {
      clearInterval(tickTimer);
      tickTimer = 0;
      deadline = 0;
      ui.grant.hidden = true;
      showError("");
      showCap("");
      setStatus(response.ok
        ? "Signed out: this key no longer whitelists this device."
        : "Nothing to sign out: this key had no grant for this device.");
      return;
    }
    const reason = data && typeof data.error === "string" ? data.error.slice(0, 200) : null;
    showError(explain(response === null ? 0 : response.status, reason));
    setStatus(deadline ? "Still whitelisted: signing out failed." : "Not whitelisted.");
  }

  function forget() {
    store.remove(STORE_KEY);
    cancelSchedule();
    failures = 0;
    showKeyState();
    showError("");
    setStatus(deadline
      ? "Key forgotten. The current entry stays whitelisted until it expires."
      : "Key forgotten.");
    ui.key.focus();
  }

  function init() {
    ui.auto.checked = store.get(STORE_AUTO) !== "0"; // on unless the user turned it off
    ui.ttl.value = store.get(STORE_TTL) || "";
    ui.ip.value = store.get(STORE_IP) || "";
    if (ui.ttl.value || ui.ip.value) ui.options.open = true; // show what will be sent
    showKeyState();

    ui.auto.addEventListener("change", () => store.set(STORE_AUTO, ui.auto.checked ? "1" : "0"));
    ui.form.addEventListener("submit", (event) => {
      event.preventDefault();
      knock("manual");
    });
    ui.forget.addEventListener("click", forget);
    ui.signOut.addEventListener("click", signOut);
    // Background tabs throttle timers and phones freeze them: catch up when shown again.
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState !== "visible") return;
      tick();
      if (refreshAt && Date.now() >= refreshAt) knock("refresh");
    });

    if (!store.get(STORE_KEY)) {
      setStatus("Enter your API key to knock.");
    } else if (ui.auto.checked) {
      knock("load");
    } else {
      setStatus("Ready to knock.");
    }
  }

  init();
})();
