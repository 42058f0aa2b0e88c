// madoguchi reference kiosk page: live verdicts, number pad, PIN card reads.
// No build step, no libraries. The token arrives in the URL fragment (#token=...),
// which browsers never send to a server; it is kept in sessionStorage for reloads
// and removed from the address bar at once. See docs/kiosk.md.
"use strict";

// Every text the page shows is in two languages: [日本語, English]. In the text,
// "|" starts a new line of a big title and "^" marks where a Japanese line may
// break (a <wbr>; the CSS keeps the other characters together, so no lone 「す」).
//
// Verdict codes come from the agent (agent/station/feedback.py); tests check this table.
const VERDICTS = {
  ok: {
    tone: "ok",
    ja: { title: "受付完了", detail: "ありがとう^ございました" },
    en: { title: "Accepted", detail: "Thank you" },
  },
  invalid_ticket: {
    tone: "error",
    ja: { title: "接種券の番号が|正しくありません", detail: "職員に^お声がけください" },
    en: { title: "The ticket number|is not valid", detail: "Please ask a member of staff" },
  },
  invalid_code: {
    tone: "error",
    ja: { title: "バーコードが|正しくありません", detail: "もう一度^読み取るか、^番号を^入力してください" },
    en: { title: "The barcode|is not valid", detail: "Scan it again or type the number" },
  },
  expired: {
    tone: "danger",
    ja: {
      title: "有効期限切れの|ワクチンです",
      detail: "使用しないで^ください。^すぐに^職員へ^連絡してください",
    },
    en: { title: "This vaccine|has expired", detail: "Do not use it. Tell a member of staff at once" },
  },
  unexpected: {
    tone: "warn",
    ja: { title: "この窓口では|受け付けできない書類です", detail: "書類を^お確かめください" },
    en: { title: "This desk does not|take this document", detail: "Please check your documents" },
  },
  read_error: {
    tone: "error",
    ja: { title: "読み取りエラー", detail: "もう一度^読み取って^ください" },
    en: { title: "Could not read", detail: "Please scan again" },
  },
  not_stored: {
    tone: "error",
    ja: {
      title: "記録できませんでした",
      detail: "職員を^呼んでください^（もう一度^読み取って^ください）",
    },
    en: { title: "Could not record this", detail: "Please call staff (and scan again)" },
  },
  card_not_genuine: {
    tone: "danger",
    ja: { title: "カードを|確認できませんでした", detail: "職員が^確認します。^お待ち^ください" },
    en: { title: "This card could not|be verified", detail: "A member of staff will check it" },
  },
  already_used: {
    tone: "danger",
    ja: { title: "この接種券は|使用済みです", detail: "職員に^お声がけください" },
    en: { title: "This ticket has|already been used", detail: "Please ask a member of staff" },
  },
  recalled: {
    tone: "danger",
    ja: {
      title: "回収対象の|ワクチンです",
      detail: "使用しないで^ください。^すぐに^職員へ^連絡してください",
    },
    en: { title: "This vaccine lot|has been recalled", detail: "Do not use it. Tell a member of staff at once" },
  },
};

const TYPE_LABELS = {
  vaccination_ticket: ["接種券", "vaccination ticket"],
  vaccination_ticket_number: ["接種券番号", "ticket number"],
  gs1: ["ワクチン（GS1）", "vaccine (GS1)"],
  gtin: ["商品コード", "product code"],
  mynumber_application_id: ["交付申請書", "application form"],
};

const TEXT = {
  // the desk's role ([api] role) names the station and picks the prompt
  role_vaccination: ["接種受付", "Vaccination desk"],
  role_mynumber: ["マイナンバーカード窓口", "My Number Card desk"],
  role_general: ["総合窓口", "General counter"],
  prompt: ["読み取ってください", "Please scan"],
  prompt_vaccination: [
    "接種券の^バーコードを^かざすか、^番号を^入力してください",
    "Hold the vaccination ticket's barcode to the scanner, or type its number",
  ],
  prompt_mynumber: [
    "交付申請書の^バーコードを^かざすか、^マイナンバーカードを^置いてください",
    "Hold the application form's barcode to the scanner, or place your My Number Card on the reader",
  ],
  prompt_general: [
    "書類の^バーコードを^かざすか、^番号を^入力してください",
    "Hold your document's barcode to the scanner, or type its number",
  ],
  connecting: ["接続中…", "Connecting…"],
  unreachable_title: ["端末と|接続できません", "The station|is not reachable"],
  unreachable_detail: [
    "職員に^お声がけください。^番号入力は^使えません",
    "Please ask a member of staff. The keypad is off until the station is back",
  ],
  online: ["オンライン", "Online"],
  offline: ["オフライン^（記録は^端末内に^安全に^保存されています）", "Offline (records are kept safely here)"],
  lost: ["端末と^接続できません", "Station not reachable"],
  waiting: ["送信待ち {n}件", "{n} waiting to send"],
  operator: ["担当 {name}", "Staff: {name}"],
  dev_connected: ["正常", "OK"],
  dev_disconnected: ["未接続", "not connected"],
  dev_error: ["エラー", "error"],
  dev_starting: ["起動中", "starting"],
  reserved: ["予約 {slot}（{timing}）", "Booked {slot} ({timing})"],
  no_reservation: ["本日の予約なし", "No booking today"],
  timing_on_time: ["時間どおり", "on time"],
  timing_early: ["早めの来庁", "early"],
  timing_late: ["予約時間を過ぎています", "late"],
  ds_used_tickets: ["使用済券", "Used tickets"],
  ds_recalled_lots: ["回収ロット", "Recalls"],
  ds_reservations: ["予約", "Bookings"],
  ds_staff: ["職員", "Staff"],
  ds_jpki_anchors: ["認証局", "Card CAs"],
  ds_stale: ["古い", "stale"],
  age_s: ["{n}秒前", "{n}s ago"],
  age_min: ["{n}分前", "{n} min ago"],
  age_h: ["{n}時間前", "{n} h ago"],
  age_d: ["{n}日前", "{n} d ago"],
  outbox_full: [
    "端末の^保存領域が^いっぱいです。^職員を^呼んでください",
    "The station's storage is full. Please call staff",
  ],
  duplicate: ["受付済み", "already accepted"],
  manual: ["手入力", "typed in"],
  card_checking: ["カードを|確認しています", "Checking|the card"],
  card_wait: ["カードを^置いたまま^お待ちください", "Leave the card on the reader and wait"],
  photo_taking: ["撮影します", "Taking a photo"],
  photo_look: ["カメラを^見てください", "Please look at the camera"],
  photo_done: ["撮影しました", "Photo taken"],
  photo_failed: ["撮影できませんでした", "Could not take the photo"],
  thanks: ["ありがとう^ございました", "Thank you"],
  send_failed: ["送信できませんでした", "Could not send"],
  clear: ["クリア", "Clear"],
  send: ["送信", "Send"],
  ok: ["確定", "OK"],
  cancel: ["キャンセル", "Cancel"],
  pad_placeholder: ["番号入力", "Number"],
  card_button: ["マイナンバーカード読取", "Read My Number Card"],
  photo_button: ["顔写真撮影", "Take ID photo"],
  card_check: ["カードの内容を^確認してください", "Please check the card's details"],
  name: ["氏名", "Name"],
  address: ["住所", "Address"],
  birth: ["生年月日", "Date of birth"],
  sex: ["性別", "Sex"],
  close: ["閉じる", "Close"],
  sex_male: ["男性", "Male"],
  sex_female: ["女性", "Female"],
  sex_not_applicable: ["適用不能", "Not applicable"],
  pin_title: ["暗証番号（数字4桁）を^入力してください", "Enter your 4-digit PIN"],
  pin_reading: ["読み取り中…", "Reading…"],
  pin_locked: [
    "カードが^ロックされました。^窓口で^ロック解除の^手続きを^してください",
    "The card is now locked. Ask at the counter to unlock it",
  ],
  pin_low: [
    "残り回数が^少ないため^読み取りを^中止しました。^職員に^お声がけください",
    "Few tries are left, so the card was not read. Please ask staff",
  ],
  pin_wrong: ["暗証番号が違います（残り{n}回）", "Wrong PIN ({n} tries left)"],
  pin_card_error: [
    "カードを^読み取れませんでした。^置き直してください",
    "Could not read the card. Place it again",
  ],
  pin_unreachable: ["端末と^接続できません", "Station not reachable"],
  unpaired: [
    "この画面は^端末と^接続されていません。|キオスクを^起動し直してください。",
    "This screen is not paired with the station.|Restart the kiosk.",
  ],
};

const LANGS = ["ja", "en"];
const VERDICT_HOLD_MS = 10000;
const STATUS_REFRESH_MS = 5000; // the waiting count drops on registry acks, which send no event
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
const state = {
  status: null,
  lastId: null,
  shownIds: new Set(),
  idleTimer: null,
  pin: "",
  lang: LANGS.includes(sessionStorage.getItem("madoguchi-lang"))
    ? sessionStorage.getItem("madoguchi-lang")
    : "ja",
  reachable: null, // null: not yet known, then true/false
  online: undefined, // the uplink: true, false, or null when the agent is unreachable
  devices: new Map(), // name -> state, from /v1/status and device_state events
  labels: {},
  view: null, // what the verdict area shows, re-rendered when the language changes
  pinMessage: null,
  full: false,
};

// -- the two languages -----------------------------------------------------------------

function tr(key, vars) {
  const pair = TEXT[key];
  let text = pair ? pair[LANGS.indexOf(state.lang)] : key;
  for (const [k, v] of Object.entries(vars || {})) text = text.replace(`{${k}}`, v);
  return text;
}

// Text with "^" break points: text nodes with <wbr> between them.
function fillText(el, text) {
  const nodes = [];
  text.split("^").forEach((piece, i) => {
    if (i) nodes.push(document.createElement("wbr"));
    nodes.push(document.createTextNode(piece));
  });
  el.replaceChildren(...nodes);
}

function applyLang() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-t]")) fillText(el, tr(el.dataset.t));
  $("pad-display").dataset.placeholder = tr("pad_placeholder");
  for (const span of $("lang").children) {
    span.classList.toggle("active", span.lang === state.lang);
  }
  const u = $("unpaired-text");
  u.replaceChildren();
  tr("unpaired")
    .split("|")
    .forEach((line, i) => {
      if (i) u.append(document.createElement("br"));
      const span = document.createElement("span");
      fillText(span, line);
      u.append(span);
    });
  renderStation();
  renderDevices();
  renderDatasets();
  renderOnline();
  if (state.view) renderView();
  if (state.pinMessage !== null) renderPin();
  tick();
}

function switchLang() {
  state.lang = state.lang === "ja" ? "en" : "ja";
  sessionStorage.setItem("madoguchi-lang", state.lang);
  applyLang();
}

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

// view: {tone, title, detail}; title and detail are functions of the language, so
// the 日本語 / English switch re-renders what is on screen without a new read.
function show(tone, title, detail) {
  state.view = { tone, title, detail };
  renderView();
  clearTimeout(state.idleTimer);
  if (tone !== "idle" && state.reachable) state.idleTimer = setTimeout(idle, VERDICT_HOLD_MS);
}

function renderView() {
  const { tone, title, detail } = state.view;
  $("verdict").className = `verdict-${tone}`;
  const t = $("verdict-title");
  const text = title();
  t.replaceChildren(
    ...text.split("|").map((line) => {
      const span = document.createElement("span");
      fillText(span, line);
      return span;
    }),
  );
  t.classList.toggle("short", text.length <= (state.lang === "ja" ? 6 : 10));
  fillText($("verdict-detail"), detail());
}

function idle() {
  if (!state.reachable) return unreachable();
  const role = (state.status && state.status.role) || "vaccination";
  show(
    "idle",
    () => tr("prompt"),
    () => tr(`prompt_${role}`),
  );
  return undefined;
}

function unreachable() {
  if (state.reachable === null) {
    show(
      "busy",
      () => tr("connecting"),
      () => "",
    );
  } else {
    show(
      "error",
      () => tr("unreachable_title"),
      () => tr("unreachable_detail"),
    );
  }
}

// The reservation a read matched (data.reservation): its slot and whether the person is
// early, on time or late; or that there is none today.
function hhmm(iso) {
  const t = new Date(iso);
  return Number.isNaN(t.getTime()) ? "?" : t.toTimeString().slice(0, 5);
}

function reservationText(r) {
  if (r.verdict !== "reserved") return tr("no_reservation");
  const slot = `${hhmm(r.slot_start)}–${hhmm(r.slot_end)}`;
  return tr("reserved", { slot, timing: tr(`timing_${r.timing}`) });
}

function showVerdict(code, body) {
  if (body && body.id) {
    if (state.shownIds.has(body.id)) return; // the POST answer and its event
    state.shownIds.add(body.id);
    if (state.shownIds.size > 50) state.shownIds.delete(state.shownIds.values().next().value);
  }
  const v = VERDICTS[code] || VERDICTS.read_error;
  const interp = body && body.interpretation;
  const detail = () => {
    const i = LANGS.indexOf(state.lang);
    const parts = [v[state.lang].detail];
    if (interp && TYPE_LABELS[interp.type]) parts.push(TYPE_LABELS[interp.type][i]);
    if (body && body.reservation) parts.push(reservationText(body.reservation));
    if (body && body.duplicate) parts.push(tr("duplicate"));
    if (body && body.source === "manual") parts.push(tr("manual"));
    return parts.join(state.lang === "ja" ? "・^" : " · ");
  };
  show(v.tone, () => v[state.lang].title, detail);
}

// -- station state: reachable, online, devices, waiting, buttons -------------------------

// Unreachable: no working keypad, no "please scan" (a read could not be stored).
function setReachable(reachable) {
  const was = state.reachable;
  state.reachable = reachable;
  document.body.classList.toggle("unreachable", !reachable);
  for (const b of document.querySelectorAll("#pad button, footer button")) {
    b.disabled = !reachable;
  }
  if (!reachable) {
    state.online = null;
    renderOnline();
    if (was !== false) unreachable();
  } else if (was !== true) {
    idle();
  }
}

function setOnline(online) {
  state.online = online;
  renderOnline();
}

function renderOnline() {
  const el = $("online");
  const online = state.online;
  if (online === undefined) {
    el.className = "state-unknown";
    fillText(el, tr("connecting"));
  } else if (online === null) {
    el.className = "state-lost";
    fillText(el, tr("lost"));
  } else if (online) {
    el.className = "state-online";
    fillText(el, tr("online"));
  } else {
    el.className = "state-offline";
    fillText(el, tr("offline"));
  }
}

function renderStation() {
  const s = state.status;
  const role = (s && s.role) || "vaccination";
  $("station").textContent = s ? `${tr(`role_${role}`)}  ${s.agent}` : tr(`role_${role}`);
  $("station").title = s ? `${s.site} / ${s.agent}` : "";
  const w = $("waiting");
  const n = s && s.waiting;
  w.hidden = n === null || n === undefined;
  w.textContent = w.hidden ? "" : tr("waiting", { n: String(n) });
  w.classList.toggle("some", Boolean(n));
  const op = s && s.operator;
  $("operator").hidden = !op;
  $("operator").textContent = op ? tr("operator", { name: op }) : "";
}

// One line per device, named by its label: every device that is down stays named
// until it comes back itself (a read or another device's return does not clear it).
function renderDevices() {
  const list = $("devices");
  const items = [];
  for (const [name, st] of state.devices) {
    const li = document.createElement("li");
    const ok = st === "connected";
    li.className = ok ? "dev-ok" : st === "starting" ? "dev-starting" : "dev-bad";
    li.dataset.device = name;
    li.dataset.state = st;
    const label = document.createElement("span");
    label.className = "dev-label";
    label.textContent = state.labels[name] || name;
    li.append(label);
    if (!ok) {
      const what = document.createElement("span");
      what.className = "dev-state";
      what.textContent = TEXT[`dev_${st}`] ? tr(`dev_${st}`) : st;
      li.append(what);
    }
    items.push(li);
  }
  list.replaceChildren(...items);
  const b = $("banner");
  b.hidden = !state.full;
  if (state.full) fillText(b, tr("outbox_full"));
  b.className = state.full ? "banner-danger" : "";
}

// The reference datasets the station holds, each with its age (from its issue time):
// a stale one (past its expiry or max_age_s) still decides, and says so in yellow.
function ageText(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return tr("age_s", { n: String(s) });
  if (s < 3600) return tr("age_min", { n: String(Math.floor(s / 60)) });
  if (s < 86400) return tr("age_h", { n: String(Math.floor(s / 3600)) });
  return tr("age_d", { n: String(Math.floor(s / 86400)) });
}

function renderDatasets() {
  const held = (state.status && state.status.datasets && state.status.datasets.held) || {};
  const items = [];
  for (const kind of Object.keys(held).sort()) {
    const h = held[kind];
    const li = document.createElement("li");
    li.dataset.kind = kind;
    li.className = h.stale ? "ds-stale" : "ds-ok";
    const issued = Date.parse(h.issued_at);
    const age = Number.isNaN(issued) ? h.age_s : (Date.now() - issued) / 1000;
    const stale = h.stale ? ` ${tr("ds_stale")}` : "";
    li.textContent = `${tr(`ds_${kind}`)} ${ageText(age)}${stale}`;
    li.title = `${kind} v${h.version}`;
    items.push(li);
  }
  $("datasets").replaceChildren(...items);
  $("datasets").hidden = !items.length;
}

async function refreshStatus() {
  let r;
  try {
    r = await api("GET", "/v1/status");
  } catch (e) {
    setReachable(false);
    return;
  }
  if (!r.ok || !r.data) return;
  const s = r.data;
  state.status = s;
  state.labels = s.labels || {};
  state.devices = new Map(Object.entries(s.devices || {}).map(([n, d]) => [n, d.state]));
  state.full = Boolean(s.outbox && s.outbox.full);
  setReachable(true);
  setOnline(s.online);
  renderStation();
  renderDevices();
  renderDatasets();
  $("card-button").hidden = !(s.card_readers && s.card_readers.length);
  $("photo-button").hidden = !(s.cameras && s.cameras.length);
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
      refreshStatus(); // the waiting count
      break;
    case "uplink":
      setOnline(body.connected);
      refreshStatus();
      break;
    case "outbox_full":
    case "disk_full":
      state.full = true;
      renderDevices();
  renderDatasets();
      break;
    case "device_state":
      state.devices.set(body.device, body.state);
      renderDevices();
  renderDatasets();
      refreshStatus();
      break;
    case "card_inserted":
      show(
        "busy",
        () => tr("card_checking"),
        () => tr("card_wait"),
      );
      break;
    case "card_removed":
      idle();
      break;
    case "operator_session":
      if (state.status) state.status.operator = body.operator;
      renderStation();
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
    setReachable(false);
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
  if (!text || !device || !state.reachable) return;
  $("pad-send").disabled = true;
  try {
    const r = await api("POST", "/v1/manual", { device, text });
    if (r.data && r.data.verdict && (r.ok || r.status === 503)) {
      showVerdict(r.data.verdict, r.data);
      if (r.ok) d.textContent = "";
    } else {
      const why = (r.data && r.data.detail) || `HTTP ${r.status}`;
      show(
        "error",
        () => tr("send_failed"),
        () => why,
      );
    }
  } catch (e) {
    show(
      "error",
      () => tr("send_failed"),
      () => tr("lost"),
    );
  } finally {
    $("pad-send").disabled = !state.reachable;
  }
}

// -- the PIN dialog (card info) ------------------------------------------------------

// message: a function of the language (or null for none)
function pinShow(message) {
  state.pinMessage = message || (() => "");
  renderPin();
}

function renderPin() {
  $("pin-display").textContent = "●".repeat(state.pin.length) + "○".repeat(4 - state.pin.length);
  fillText($("pin-message"), state.pinMessage());
  $("pin-ok").disabled = state.pin.length !== 4;
}

function pinOpen() {
  state.pin = "";
  pinShow(null);
  $("pin-dialog").hidden = false;
}

function pinClose() {
  state.pin = "";
  state.pinMessage = null;
  $("pin-dialog").hidden = true;
}

function pinKey(key) {
  if (key === "back") state.pin = state.pin.slice(0, -1);
  else if (key === "ok") return pinSubmit();
  else if (state.pin.length < 4) state.pin += key;
  pinShow(null);
  return undefined;
}

function pinRefusedMessage(d) {
  if (d.locked || d.tries_left === 0) return () => tr("pin_locked");
  if (d.tries_left !== null && d.tries_left !== undefined && d.tries_left < 2) {
    return () => tr("pin_low");
  }
  return () => tr("pin_wrong", { n: String(d.tries_left) });
}

async function pinSubmit() {
  const reader = state.status && state.status.card_readers && state.status.card_readers[0];
  const pin = state.pin;
  state.pin = ""; // never kept: one attempt per entry, never retried by the page
  if (!reader || pin.length !== 4) return pinShow(null);
  pinShow(() => tr("pin_reading"));
  $("pin-ok").disabled = true;
  let r;
  try {
    r = await api("POST", `/v1/cards/${encodeURIComponent(reader)}/info`, { pin });
  } catch (e) {
    return pinShow(() => tr("pin_unreachable"));
  }
  if (r.ok && r.data) {
    pinClose();
    const i = r.data.info || {};
    $("card-name").textContent = i.name || "";
    $("card-address").textContent = i.address || "";
    $("card-birth").textContent = i.birth_date || "";
    $("card-sex").textContent = TEXT[`sex_${i.sex}`] ? tr(`sex_${i.sex}`) : "";
    $("card-result").hidden = false;
    return undefined;
  }
  const d = r.data || {};
  if (d.error === "pin_refused") return pinShow(pinRefusedMessage(d));
  if (d.error === "card_error") return pinShow(() => tr("pin_card_error"));
  const why = d.detail || `HTTP ${r.status}`;
  return pinShow(() => why);
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
  show(
    "busy",
    () => tr("photo_taking"),
    () => tr("photo_look"),
  );
  const r = await api("POST", "/v1/photos", { camera });
  if (r.ok) {
    show(
      "ok",
      () => tr("photo_done"),
      () => tr("thanks"),
    );
  } else {
    const why = (r.data && r.data.detail) || `HTTP ${r.status}`;
    show(
      "error",
      () => tr("photo_failed"),
      () => why,
    );
  }
}

// -- start ------------------------------------------------------------------------------

function tick() {
  const now = new Date();
  const locale = state.lang === "ja" ? "ja-JP" : "en-GB";
  $("clock").textContent = now.toLocaleTimeString(locale, { hour: "2-digit", minute: "2-digit" });
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
  $("lang").addEventListener("click", switchLang);
  applyLang();
  unreachable();
  setInterval(tick, 10000);
  if (!token) {
    unpaired();
    return;
  }
  setInterval(() => {
    if (state.reachable) refreshStatus();
  }, STATUS_REFRESH_MS);
  follow();
});
