// madoguchi reference kiosk page: live verdicts, number pad, PIN card reads.
// No build step, no libraries. The token arrives in the URL fragment (#token=...),
// which browsers never send to a server; it is kept in sessionStorage for reloads
// and removed from the address bar at once. See docs/kiosk.md.
"use strict";

// Verdict codes come from the agent (agent/api.py VERDICTS); tests check this table.
// "|" marks where a long title may break into its second line on the 800x480 screen.
const VERDICTS = {
  ok: { title: "受付完了", detail: "ありがとうございました", tone: "ok" },
  invalid_ticket: {
    title: "接種券の番号が|正しくありません",
    detail: "職員にお声がけください",
    tone: "error",
  },
  invalid_code: {
    title: "バーコードが正しくありません",
    detail: "もう一度読み取るか、番号を入力してください",
    tone: "error",
  },
  expired: {
    title: "有効期限切れの|ワクチンです",
    detail: "使用しないでください。すぐに職員へ連絡してください",
    tone: "danger",
  },
  unexpected: {
    title: "この窓口では|受け付けできない書類です",
    detail: "書類をお確かめください",
    tone: "warn",
  },
  read_error: { title: "読み取りエラー", detail: "もう一度読み取ってください", tone: "error" },
  not_stored: {
    title: "記録できませんでした",
    detail: "職員を呼んでください（もう一度読み取ってください）",
    tone: "error",
  },
};

const TYPE_LABELS = {
  vaccination_ticket: "接種券",
  vaccination_ticket_number: "接種券番号",
  gs1: "ワクチン（GS1）",
  gtin: "商品コード",
  mynumber_application_id: "交付申請書",
};

const IDLE = {
  title: "読み取ってください",
  detail: "接種券のバーコードをかざすか、番号を入力してください",
};
const VERDICT_HOLD_MS = 10000;
const PAD_MAX = 32;

const $ = (id) => document.getElementById(id);

// -- the token and the API ---------------------------------------------------------

function takeToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const fromHash = params.get("token");
  if (fromHash) {
    sessionStorage.setItem("madoguchi-token", fromHash);
    const api = params.get("api");
    if (api) sessionStorage.setItem("madoguchi-api", api);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return {
    token: sessionStorage.getItem("madoguchi-token"),
    base: sessionStorage.getItem("madoguchi-api") || "",
  };
}

const { token, base } = takeToken();
const state = { status: null, lastId: null, shownIds: new Set(), idleTimer: null, pin: "" };

async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${token}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(base + path, init);
  if (res.status === 401) unpaired();
  let data = null;
  try {
    data = await res.json();
  } catch (e) {
    data = null;
  }
  return { status: res.status, ok: res.ok, data };
}

function unpaired() {
  $("unpaired").hidden = false;
}

// -- the big verdict ---------------------------------------------------------------

function show(tone, title, detail) {
  const v = $("verdict");
  v.className = `verdict-${tone}`;
  const t = $("verdict-title");
  t.replaceChildren(
    ...title.split("|").map((line) => {
      const span = document.createElement("span");
      span.textContent = line;
      return span;
    }),
  );
  t.classList.toggle("short", title.length <= 6);
  $("verdict-detail").textContent = detail;
  clearTimeout(state.idleTimer);
  if (tone !== "idle") state.idleTimer = setTimeout(idle, VERDICT_HOLD_MS);
}

function idle() {
  show("idle", IDLE.title, IDLE.detail);
}

function showVerdict(code, body) {
  if (body && body.id) {
    if (state.shownIds.has(body.id)) return; // the POST answer and its event
    state.shownIds.add(body.id);
    if (state.shownIds.size > 50) state.shownIds.delete(state.shownIds.values().next().value);
  }
  const v = VERDICTS[code] || VERDICTS.read_error;
  const parts = [v.detail];
  const interp = body && body.interpretation;
  if (interp && TYPE_LABELS[interp.type]) parts.push(TYPE_LABELS[interp.type]);
  if (body && body.duplicate) parts.push("受付済み");
  if (body && body.source === "manual") parts.push("手入力");
  show(v.tone, v.title, parts.join(" ・ "));
}

// -- station state: online, banners, buttons -----------------------------------------

function setOnline(online) {
  const el = $("online");
  if (online === null) {
    el.className = "state-lost";
    el.textContent = "端末と接続できません";
  } else if (online) {
    el.className = "state-online";
    el.textContent = "オンライン";
  } else {
    el.className = "state-offline";
    el.textContent = "オフライン（記録は端末内に安全に保存されています）";
  }
}

function banner(text, danger) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.className = danger ? "banner-danger" : "";
}

async function refreshStatus() {
  const r = await api("GET", "/v1/status");
  if (!r.ok || !r.data) return;
  const s = r.data;
  state.status = s;
  $("station").textContent = `受付 ${s.site} / ${s.agent}`;
  setOnline(s.online);
  $("card-button").hidden = !(s.card_readers && s.card_readers.length);
  $("photo-button").hidden = !(s.cameras && s.cameras.length);
  if (s.outbox && s.outbox.full) {
    banner("端末の保存領域がいっぱいです。職員を呼んでください", true);
  }
}

// -- live events (SSE over fetch, so the token travels in a header) ----------------

function handle(kind, body) {
  switch (kind) {
    case "hello":
      if (body.reset) refreshStatus();
      break;
    case "read_accepted":
    case "read_rejected":
      showVerdict(body.verdict, body);
      if (kind === "read_accepted") banner("");
      break;
    case "uplink":
      setOnline(body.connected);
      break;
    case "outbox_full":
    case "disk_full":
      banner("端末の保存領域がいっぱいです。職員を呼んでください", true);
      break;
    case "device_state":
      refreshStatus();
      if (body.state !== "connected") banner(`機器「${body.device}」が接続されていません`);
      else banner("");
      break;
    case "card_inserted":
      show("busy", "カードを確認しています", "カードを置いたままお待ちください");
      break;
    case "card_removed":
      idle();
      break;
    case "operator_session":
      $("operator").hidden = !body.operator;
      $("operator").textContent = body.operator ? `担当 ${body.operator}` : "";
      break;
    default:
      break;
  }
}

function parseFrames(buffer, onEvent) {
  const frames = buffer.split(/\r?\n\r?\n/);
  const rest = frames.pop();
  for (const frame of frames) {
    let kind = "message";
    let id = null;
    const data = [];
    for (const line of frame.split(/\r?\n/)) {
      if (line.startsWith(":")) continue;
      const i = line.indexOf(":");
      const field = i < 0 ? line : line.slice(0, i);
      const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
      if (field === "event") kind = value;
      else if (field === "data") data.push(value);
      else if (field === "id") id = value;
    }
    if (id !== null) state.lastId = id;
    if (data.length) {
      try {
        onEvent(kind, JSON.parse(data.join("\n")));
      } catch (e) {
        /* a malformed frame is skipped, the stream goes on */
      }
    }
  }
  return rest;
}

async function follow() {
  for (;;) {
    try {
      const headers = { Authorization: `Bearer ${token}`, Accept: "text/event-stream" };
      if (state.lastId) headers["Last-Event-ID"] = state.lastId;
      const res = await fetch(base + "/v1/events", { headers, cache: "no-store" });
      if (res.status === 401) {
        unpaired();
        return;
      }
      if (res.ok && res.body) {
        await refreshStatus();
        const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer = parseFrames(buffer + value, handle);
        }
      }
    } catch (e) {
      /* the agent restarts or the network blips: retry below */
    }
    setOnline(null);
    await new Promise((r) => setTimeout(r, 2000));
  }
}

// -- the number pad (manual entry) ---------------------------------------------------

function padKey(key) {
  const d = $("pad-display");
  if (key === "clear") d.textContent = "";
  else if (key === "back") d.textContent = d.textContent.slice(0, -1);
  else if (d.textContent.length < PAD_MAX) d.textContent += key;
}

async function padSend() {
  const d = $("pad-display");
  const text = d.textContent;
  const device = state.status && state.status.manual_device;
  if (!text || !device) return;
  $("pad-send").disabled = true;
  try {
    const r = await api("POST", "/v1/manual", { device, text });
    if (r.data && r.data.verdict && (r.ok || r.status === 503)) {
      showVerdict(r.data.verdict, r.data);
      if (r.ok) d.textContent = "";
    } else {
      show("error", "送信できませんでした", (r.data && r.data.detail) || `HTTP ${r.status}`);
    }
  } catch (e) {
    show("error", "送信できませんでした", "端末と接続できません");
  } finally {
    $("pad-send").disabled = false;
  }
}

// -- the PIN dialog (card info) ------------------------------------------------------

function pinShow(message) {
  $("pin-display").textContent = "●".repeat(state.pin.length) + "○".repeat(4 - state.pin.length);
  $("pin-message").textContent = message || "";
  $("pin-ok").disabled = state.pin.length !== 4;
}

function pinOpen() {
  state.pin = "";
  pinShow("");
  $("pin-dialog").hidden = false;
}

function pinClose() {
  state.pin = "";
  $("pin-dialog").hidden = true;
}

function pinKey(key) {
  if (key === "back") state.pin = state.pin.slice(0, -1);
  else if (key === "ok") return pinSubmit();
  else if (state.pin.length < 4) state.pin += key;
  pinShow("");
}

function pinRefusedMessage(d) {
  if (d.locked || d.tries_left === 0) {
    return "カードがロックされました。窓口でロック解除の手続きをしてください";
  }
  if (d.tries_left !== null && d.tries_left !== undefined && d.tries_left < 2) {
    return "残り回数が少ないため読み取りを中止しました。職員にお声がけください";
  }
  return `暗証番号が違います（残り${d.tries_left}回）`;
}

async function pinSubmit() {
  const reader = state.status && state.status.card_readers && state.status.card_readers[0];
  const pin = state.pin;
  state.pin = ""; // never kept: one attempt per entry, never retried by the page
  if (!reader || pin.length !== 4) return pinShow("");
  pinShow("読み取り中…");
  $("pin-ok").disabled = true;
  let r;
  try {
    r = await api("POST", `/v1/cards/${encodeURIComponent(reader)}/info`, { pin });
  } catch (e) {
    return pinShow("端末と接続できません");
  }
  if (r.ok && r.data) {
    pinClose();
    const i = r.data.info || {};
    $("card-name").textContent = i.name || "";
    $("card-address").textContent = i.address || "";
    $("card-birth").textContent = i.birth_date || "";
    $("card-sex").textContent = { male: "男性", female: "女性", not_applicable: "適用不能" }[i.sex] || "";
    $("card-result").hidden = false;
    return undefined;
  }
  const d = r.data || {};
  if (d.error === "pin_refused") return pinShow(pinRefusedMessage(d));
  if (d.error === "card_error") return pinShow("カードを読み取れませんでした。置き直してください");
  return pinShow(d.detail || `エラー（HTTP ${r.status}）`);
}

function cardResultClose() {
  for (const id of ["card-name", "card-address", "card-birth", "card-sex"]) {
    $(id).textContent = "";
  }
  $("card-result").hidden = true;
}

async function takePhoto() {
  const camera = state.status && state.status.cameras && state.status.cameras[0];
  if (!camera) return;
  show("busy", "撮影します", "カメラを見てください");
  const r = await api("POST", "/v1/photos", { camera });
  if (r.ok) show("ok", "撮影しました", "ありがとうございました");
  else show("error", "撮影できませんでした", (r.data && r.data.detail) || `HTTP ${r.status}`);
}

// -- start ------------------------------------------------------------------------------

function tick() {
  const now = new Date();
  $("clock").textContent = now.toLocaleTimeString("ja-JP", { hour: "2-digit", minute: "2-digit" });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("[data-key]")) {
    b.addEventListener("click", () => padKey(b.dataset.key));
  }
  for (const b of document.querySelectorAll("[data-pin]")) {
    b.addEventListener("click", () => pinKey(b.dataset.pin));
  }
  $("pad-send").addEventListener("click", padSend);
  $("pin-cancel").addEventListener("click", pinClose);
  $("card-button").addEventListener("click", pinOpen);
  $("card-close").addEventListener("click", cardResultClose);
  $("photo-button").addEventListener("click", takePhoto);
  tick();
  setInterval(tick, 10000);
  idle();
  if (!token) {
    unpaired();
    return;
  }
  follow();
});
