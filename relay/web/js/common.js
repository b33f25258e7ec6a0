// What the customer portal and the agent console share: the HTTP API, the session
// WebSocket with its one peer connection (the client offers, the relay answers; see
// docs/protocol.md, "Media"), the binary input events (codec/src/input.rs) and file
// transfer (codec/src/files.rs) on their data channels, and small DOM helpers.

export const INPUT_LABEL = 'input';
export const CHAT_LABEL = 'chat';
export const FILES_LABEL = 'files';

// ---------------------------------------------------------------------------------
// DOM helpers
// ---------------------------------------------------------------------------------

export const $ = (sel, root = document) => root.querySelector(sel);

/** Creates an element: `el('button', {type: 'button', onclick: f}, 'Label')`. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (v === true) node.setAttribute(k, '');
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) node.append(c);
  }
  return node;
}

/** Shows `text` in a status element (an ARIA live region), as an error or not. */
export function say(node, text, isError = false) {
  node.textContent = text;
  node.classList.toggle('error', isError);
  node.hidden = !text;
}

export function formatKey(key) {
  return key.replace(/^(\d{3})(\d{3})(\d{3})$/, '$1 $2 $3');
}

export function formatSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  return `${(n / 1024 / 1024).toFixed(1)} MiB`;
}

/** Appends a chat line to a log: who, what, and whether it is an agents-only note. */
export function chatLine(log, who, text, note = false) {
  const line = el('li', { class: note ? 'note' : '' },
    el('span', { class: 'who' }, who + (note ? ' (note)' : '')), ' ', el('span', { class: 'text' }, text));
  log.append(line);
  log.scrollTop = log.scrollHeight;
  return line;
}

// ---------------------------------------------------------------------------------
// HTTP API
// ---------------------------------------------------------------------------------

/** A refused API call or session socket: the relay's stable `code` and its message.
 * A `redirect` (a cluster node that does not hold what was asked) has `location`. */
export class RelayError extends Error {
  constructor(code, message, status = 0, location = undefined, challenge = undefined) {
    super(message);
    this.code = code;
    this.status = status;
    this.location = location;
    // For `challenge_required`: `{challenge, bits}`, the proof of work to do.
    this.challenge = challenge;
  }
}

/** What to tell a person about an error code. */
export function describeError(code, fallback) {
  const words = {
    wrong_key: 'There is no session with this support key. Check the nine digits and try again.',
    key_expired: 'This support key has expired. Ask your agent for a new one.',
    key_used: 'This support key has already been used. Ask your agent for a new one.',
    throttled: 'Too many wrong keys were tried from here. Please wait a moment and try again.',
    challenge_required: 'Many wrong keys were tried on this server recently; checking your key takes a moment.',
    session_full: 'This session is full.',
    session_ended: 'This session has ended.',
    unauthorized: 'Your sign-in was not accepted (the token is invalid or has expired).',
    forbidden: 'You are not allowed to do that.',
    draining: 'This server is restarting and takes no new sessions. Try again shortly.',
    invalid_field: fallback,
    agent_session_limit: 'You are already in as many sessions as allowed.',
    already_in_session: 'You are already in this session.',
    invitation_closed: 'This invitation is no longer open.',
    replaced: 'This session was opened in another window.',
    share_busy: 'Another agent is already sharing a screen.',
    session_lost: 'The server that held this session has stopped, and the session was lost with it. A new session is needed: please start one again (customers: ask your agent for a new support key).',
    redirect: 'Another server of this service holds this session; moving there…',
  };
  return words[code] || fallback || 'Something went wrong.';
}

/**
 * Calls the relay's API; resolves to the JSON answer (or null), rejects with RelayError.
 * In a cluster, a node that does not hold what is asked answers `421` with code
 * `redirect` and the owning node's `location` (the header below asks for that instead of
 * a `307`, which the browser would follow cross-origin, unreadably): the caller moves
 * the page there (see `pageOn`).
 */
export async function api(path, { method = 'GET', token, body } = {}) {
  const headers = { [REDIRECT_HEADER]: 'manual' };
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers['content-type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    throw new RelayError('network', 'The server cannot be reached. Check your connection and try again.');
  }
  const text = await resp.text();
  const json = text ? JSON.parse(text) : null;
  if (!resp.ok) {
    const err = json && json.error ? json.error : { code: 'internal', message: resp.statusText };
    throw new RelayError(err.code, describeError(err.code, err.message), resp.status, err.location,
      err.challenge);
  }
  return json;
}

/** The request header that asks a cluster node for a readable `421` redirect. */
export const REDIRECT_HEADER = 'relay-redirect';

/**
 * The page `path` on the node named by `location` (the `location` of a `redirect`), with
 * `params` in its fragment (which never reaches a server or a log): where a page moves
 * itself to repeat there what it asked. `home` (the origin the person first reached)
 * goes along, for resumes when that node is gone.
 */
export function pageOn(location, path, params, home) {
  const u = new URL(path, new URL(location).origin);
  const frag = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null) frag.set(k, v);
  }
  if (home && home !== u.origin) frag.set('home', home);
  u.hash = frag.toString();
  return u.toString();
}

/** The page's parameters: its query, and its fragment (set by `pageOn`), which wins. */
export function pageParams() {
  const params = new URLSearchParams(window.location.search);
  for (const [k, v] of new URLSearchParams(window.location.hash.replace(/^#/, ''))) params.set(k, v);
  return params;
}

/**
 * The origins this node names as its own and its cluster's (`GET /v1/origins`): the only
 * ones a `home=` may name. Empty when the node cannot be asked (then no `home` is
 * believed).
 */
export async function trustedOrigins() {
  try {
    const r = await api('/v1/origins');
    return Array.isArray(r && r.origins) ? r.origins : [];
  } catch {
    return [];
  }
}

/**
 * The origin this person first reached: `?home=` (set when a redirect moved the page)
 * if it is exactly one of the `trusted` origins (this node's and its cluster's, from
 * `trustedOrigins()`), else this page's own (`here`). Never a host merely under the
 * same parent domain: resume tokens are sent to the home node.
 */
export function homeOrigin(params, trusted = [], here = window.location.href) {
  const own = new URL(here).origin;
  const given = params.get('home');
  if (!given) return own;
  const origin = (u) => { try { return new URL(u).origin; } catch { return null; } };
  const home = origin(given);
  if (!home || home === 'null') return own;
  return trusted.some((t) => origin(t) === home) ? home : own;
}

/** A session WebSocket URL `wsUrl` aimed at the node of the page origin `origin`. */
export function wsVia(origin, wsUrl) {
  const u = new URL(wsUrl);
  const o = new URL(origin);
  u.protocol = o.protocol === 'https:' ? 'wss:' : 'ws:';
  u.host = o.host;
  return u.toString();
}

/**
 * One resume attempt: `connect(url)` (the node that holds the session); if that node
 * cannot be reached, `connect` through `home` (the node first reached), which answers
 * `redirect` (followed) while the session lives somewhere and `session_lost` once its
 * node is gone. `homeFirst` goes through `home` at once (tests).
 */
export async function resumeThrough(connect, url, home, homeFirst = false) {
  const viaHome = home ? wsVia(home, url) : null;
  const other = viaHome && new URL(viaHome).host !== new URL(url).host ? viaHome : null;
  if (homeFirst && other) return connect(other);
  try {
    return await connect(url);
  } catch (e) {
    if (e.code !== 'network' || !other) throw e;
    return connect(other);
  }
}

// ---------------------------------------------------------------------------------
// The session WebSocket and the peer connection
// ---------------------------------------------------------------------------------

/** How many cluster `redirect`s a session WebSocket follows (as the native client). */
export const MAX_REDIRECTS = 3;
/** Close codes of a session WebSocket answered with `redirect` or `session_lost`. */
const REDIRECT_CLOSE = 4307;
const SESSION_LOST_CLOSE = 4410;
/** How often an ICE restart is tried again while the media path is still down. */
export const ICE_RESTART_RETRY_MS = 3000;

/**
 * One participant's session: the WebSocket and the one RTCPeerConnection with the relay.
 *
 * `open()` resolves with the `welcome` (or rejects with a RelayError), following a
 * cluster's `redirect`s to the node that holds the session (`wsUrl` is then that node's
 * URL). `startPeer(setup)` builds the peer connection, lets `setup(pc)` add transceivers
 * and data channels, and offers; answers, candidates and `renegotiate` are handled here,
 * and so are ICE restarts: a peer connection that was connected and drops to
 * `disconnected` or `failed` (a network change) while the socket is up restarts ICE and
 * offers again on the same connection, every ICE_RESTART_RETRY_MS until it is connected
 * (a dropped socket is the pages' resume instead). Every other message is handed to
 * `onmessage(msg)`; `onclose({code, reason})` when the socket is gone.
 */
export class SessionConnection {
  constructor(wsUrl) {
    this.wsUrl = wsUrl;
    this.pc = null;
    this.onmessage = () => {};
    this.onclose = () => {};
    this.beforeOffer = null; // async (pc, asked) => {} before each offer
    this.awaitingAnswer = false;
    this.offerQueued = false;
    this.haveRemote = false;
    this.heldCandidates = [];
    this.renegotiations = 0;
    this.redirects = 0;
    this.iceRestarts = 0;
    this.iceRetry = null;
    this.wasConnected = false;
    this.nextId = 1;
  }

  /**
   * Opens the socket and resolves with the `welcome`. A `redirect` (the node reached
   * does not hold the session) is followed to its `url` with the same token, which the
   * redirecting node did not use, at most MAX_REDIRECTS times.
   */
  async open() {
    for (;;) {
      const { welcome, redirect } = await this.openOnce();
      if (welcome) return welcome;
      if (this.redirects >= MAX_REDIRECTS) {
        throw new RelayError('network', 'The connection to the session was redirected too often.');
      }
      const next = new URL(redirect, this.wsUrl);
      if (next.protocol !== 'ws:' && next.protocol !== 'wss:') {
        throw new RelayError('network', 'The server redirected the session somewhere unusable.');
      }
      const token = new URL(this.wsUrl).searchParams.get('token');
      if (token && !next.searchParams.get('token')) next.searchParams.set('token', token);
      this.wsUrl = next.toString();
      this.redirects += 1;
    }
  }

  /** One socket: resolves `{welcome}` or `{redirect: url}`, or rejects. */
  openOnce() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.wsUrl);
      this.ws = ws;
      let welcomed = false;
      let redirected = false;
      ws.onmessage = (m) => {
        let msg;
        try { msg = JSON.parse(m.data); } catch { return; }
        if (!welcomed) {
          if (msg.type === 'welcome') { welcomed = true; resolve({ welcome: msg }); return; }
          if (msg.type === 'redirect' && msg.url) { redirected = true; resolve({ redirect: msg.url }); return; }
          if (msg.type === 'error') { reject(new RelayError(msg.code, describeError(msg.code, msg.message))); return; }
        }
        this.handle(msg);
      };
      ws.onclose = (ev) => {
        if (redirected || (!welcomed && ev.code === REDIRECT_CLOSE)) {
          // A redirect's socket: not this session's end. (Its close may beat its one
          // message only if the message was lost, which then is a plain failure.)
          if (!redirected) reject(new RelayError('network', 'The connection to the session was lost.'));
          return;
        }
        if (!welcomed) {
          const lost = ev.code === SESSION_LOST_CLOSE;
          reject(lost
            ? new RelayError('session_lost', describeError('session_lost'))
            : new RelayError('network', 'The connection to the session was refused or lost.'));
        }
        this.onclose({ code: ev.code, reason: ev.reason });
      };
    });
  }

  socketOpen() {
    return Boolean(this.ws && this.ws.readyState === WebSocket.OPEN);
  }

  send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify(msg));
      return true;
    }
    return false;
  }

  /** Sends `msg` with a fresh correlation id; returns the id (echoed as `ref`). */
  sendWithId(msg) {
    const id = this.nextId++;
    this.send({ ...msg, id });
    return id;
  }

  async startPeer(setup) {
    const pc = new RTCPeerConnection({ iceServers: [] });
    this.pc = pc;
    pc.onicecandidate = (ev) => {
      const c = ev.candidate;
      if (c && !c.candidate) return; // a generation's end; the null below ends the list
      // An mDNS name (Chromium hides host addresses so) means nothing to the relay, which
      // learns this browser's address from its connectivity checks instead.
      if (c && /^candidate:\S+ \d+ \S+ \d+ \S+\.local /.test(c.candidate)) return;
      this.send({
        type: 'candidate',
        candidate: c ? c.candidate : '',
        sdp_mid: c ? (c.sdpMid ?? undefined) : (this.firstMid ?? undefined),
        sdp_mline_index: c ? (c.sdpMLineIndex ?? 0) : 0,
      });
    };
    this.wasConnected = false;
    const watch = () => this.watchPath(pc);
    pc.addEventListener('iceconnectionstatechange', watch);
    pc.addEventListener('connectionstatechange', watch);
    await setup(pc);
    await this.offer();
  }

  /** Whether `pc`'s media path is up (ICE and DTLS connected). */
  static connected(pc) {
    return pc.connectionState === 'connected'
      && (pc.iceConnectionState === 'connected' || pc.iceConnectionState === 'completed');
  }

  /** A state change of `pc`: remember that it was connected; restart ICE when it drops. */
  watchPath(pc) {
    if (pc !== this.pc) return;
    if (SessionConnection.connected(pc)) {
      this.wasConnected = true;
      clearTimeout(this.iceRetry);
      this.iceRetry = null;
      return;
    }
    const lost = ['disconnected', 'failed'].includes(pc.iceConnectionState)
      || ['disconnected', 'failed'].includes(pc.connectionState);
    if (lost && this.wasConnected && !this.iceRetry) this.restartIce();
  }

  /**
   * Restarts ICE on the current peer connection: new ICE credentials in a new offer on
   * the same socket (the relay answers on the same peer connection, and asks a
   * customer for a keyframe). Queued behind an offer still waiting for its answer. Tried
   * again every ICE_RESTART_RETRY_MS while the path is down and the socket is open.
   * Returns whether it was started (not without a peer connection or an open socket).
   */
  restartIce() {
    const pc = this.pc;
    if (!pc || pc.signalingState === 'closed' || !this.socketOpen()) return false;
    clearTimeout(this.iceRetry);
    this.iceRetry = setTimeout(() => this.retryIce(pc), ICE_RESTART_RETRY_MS);
    this.iceRestarts += 1;
    pc.restartIce();
    if (this.awaitingAnswer) {
      if (!this.offerQueued) this.offerQueued = 'restart';
    } else {
      this.offer(false).catch((e) => console.warn('ICE restart offer failed', e));
    }
    return true;
  }

  retryIce(pc) {
    this.iceRetry = null;
    if (pc !== this.pc || pc.signalingState === 'closed' || SessionConnection.connected(pc)) return;
    if (!this.socketOpen()) return; // the page's resume takes over, with a new connection
    // Still down: the answer may have been lost with the path, or the new path was not
    // there yet. Try again, answered or not.
    this.awaitingAnswer = false;
    this.restartIce();
  }

  /** Offers again (the application added a track), or queues it behind an open offer. */
  async renegotiate() {
    if (this.awaitingAnswer) { this.offerQueued = true; return; }
    await this.offer(false);
  }

  async offer(asked = false) {
    if (this.beforeOffer) await this.beforeOffer(this.pc, asked);
    const offer = await this.pc.createOffer();
    await this.pc.setLocalDescription(offer);
    const m = /^a=mid:(\S+)/m.exec(offer.sdp);
    this.firstMid = m ? m[1] : undefined;
    this.awaitingAnswer = true;
    this.send({ type: 'offer', sdp: this.pc.localDescription.sdp });
  }

  async handle(msg) {
    switch (msg.type) {
      case 'answer': {
        this.awaitingAnswer = false;
        try {
          await this.pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
          this.haveRemote = true;
          for (const c of this.heldCandidates.splice(0)) await this.addCandidate(c);
        } catch (e) {
          console.warn('applying the answer failed', e);
        }
        if (this.offerQueued) {
          // Asked by the relay (or the application), or an ICE restart's offer.
          const asked = this.offerQueued === true;
          this.offerQueued = false;
          await this.offer(asked);
        }
        return;
      }
      case 'candidate': {
        if (!msg.candidate) return;
        const init = { candidate: msg.candidate, sdpMid: msg.sdp_mid, sdpMLineIndex: msg.sdp_mline_index };
        if (this.haveRemote) await this.addCandidate(init); else this.heldCandidates.push(init);
        return;
      }
      case 'renegotiate': {
        this.renegotiations += 1;
        if (this.awaitingAnswer) this.offerQueued = true; else await this.offer(true);
        return;
      }
      default:
        this.onmessage(msg);
    }
  }

  async addCandidate(init) {
    try { await this.pc.addIceCandidate(init); } catch (e) { console.warn('relay candidate refused', e); }
  }

  close() {
    clearTimeout(this.iceRetry);
    this.iceRetry = null;
    if (this.pc) this.pc.close();
    if (this.ws) this.ws.close();
  }
}

/** Waits before each attempt to come back after a drop (about 16 s in all; the relay
 * keeps a participant's place for its grace period and says when the session ended). */
export const RESUME_DELAYS_MS = [250, 500, 1000, 2000, 4000, 8000];

/** The session WebSocket URL `wsUrl` with `token` as its token. */
export function withToken(wsUrl, token) {
  const u = new URL(wsUrl);
  u.searchParams.set('token', token);
  return u.toString();
}

/**
 * Tries `attempt()` after each of RESUME_DELAYS_MS while `wanted()` holds. Resolves with
 * `null` once an attempt succeeds, or with the error that makes further attempts
 * pointless (a refusal: a used token, an ended session) or the last one.
 */
export async function retryResume(attempt, wanted) {
  let last = new RelayError('network', 'The connection to the session was lost.');
  for (const delay of RESUME_DELAYS_MS) {
    await new Promise((r) => setTimeout(r, delay));
    if (!wanted()) return last;
    try {
      await attempt();
      return null;
    } catch (e) {
      last = e;
      if (e.code && e.code !== 'network') return e;
    }
  }
  return last;
}

/** The number of video frames a receiver decoded so far (0 before any). */
export async function framesDecoded(pc) {
  if (!pc) return 0;
  let n = 0;
  const stats = await pc.getStats();
  stats.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') n += s.framesDecoded || 0;
  });
  return n;
}

// ---------------------------------------------------------------------------------
// Input events (codec/src/input.rs): version 1, kind, seq: u32, fields; little-endian
// ---------------------------------------------------------------------------------

const INPUT_VERSION = 1;
export const MOD = { SHIFT: 1, CTRL: 2, ALT: 4, META: 8, CAPS_LOCK: 16 };

// DOM `KeyboardEvent.code` → USB HID usage on the keyboard page (7), as Chromium maps it.
const HID_KEYS = (() => {
  const m = {};
  for (let i = 0; i < 26; i++) m['Key' + String.fromCharCode(65 + i)] = 0x04 + i;
  for (let i = 1; i <= 9; i++) m['Digit' + i] = 0x1d + i;
  m.Digit0 = 0x27;
  Object.assign(m, {
    Enter: 0x28, Escape: 0x29, Backspace: 0x2a, Tab: 0x2b, Space: 0x2c, Minus: 0x2d,
    Equal: 0x2e, BracketLeft: 0x2f, BracketRight: 0x30, Backslash: 0x31, Semicolon: 0x33,
    Quote: 0x34, Backquote: 0x35, Comma: 0x36, Period: 0x37, Slash: 0x38, CapsLock: 0x39,
    PrintScreen: 0x46, ScrollLock: 0x47, Pause: 0x48, Insert: 0x49, Home: 0x4a, PageUp: 0x4b,
    Delete: 0x4c, End: 0x4d, PageDown: 0x4e, ArrowRight: 0x4f, ArrowLeft: 0x50,
    ArrowDown: 0x51, ArrowUp: 0x52, NumLock: 0x53, NumpadDivide: 0x54,
    NumpadMultiply: 0x55, NumpadSubtract: 0x56, NumpadAdd: 0x57, NumpadEnter: 0x58,
    Numpad0: 0x62, NumpadDecimal: 0x63, IntlBackslash: 0x64, ContextMenu: 0x65,
    ControlLeft: 0xe0, ShiftLeft: 0xe1, AltLeft: 0xe2, MetaLeft: 0xe3, ControlRight: 0xe4,
    ShiftRight: 0xe5, AltRight: 0xe6, MetaRight: 0xe7,
  });
  for (let i = 1; i <= 12; i++) m['F' + i] = 0x39 + i;
  for (let i = 1; i <= 9; i++) m['Numpad' + i] = 0x58 + i;
  return m;
})();
const HID_NAMES = Object.fromEntries(Object.entries(HID_KEYS).map(([k, v]) => [v, k]));

/** The HID usage of a DOM key code, or undefined for keys without one. */
export function hidUsage(code) {
  const id = HID_KEYS[code];
  return id === undefined ? undefined : (0x0007 << 16) | id;
}

/** The DOM key code of a HID usage (or its hex value). */
export function keyName(usage) {
  if (usage >>> 16 === 7 && HID_NAMES[usage & 0xffff]) return HID_NAMES[usage & 0xffff];
  return '0x' + usage.toString(16);
}

export function modifiersOf(ev) {
  let m = 0;
  if (ev.shiftKey) m |= MOD.SHIFT;
  if (ev.ctrlKey) m |= MOD.CTRL;
  if (ev.altKey) m |= MOD.ALT;
  if (ev.metaKey) m |= MOD.META;
  if (ev.getModifierState && ev.getModifierState('CapsLock')) m |= MOD.CAPS_LOCK;
  return m;
}

/** Encodes one input event: `{kind: 'move', x, y}`, `{kind: 'button', button, down}`,
 * `{kind: 'wheel', dx, dy}`, `{kind: 'key', code, down, modifiers}`, `{kind: 'cad'}`,
 * `{kind: 'clipboard', text}`. */
export function encodeInput(seq, ev) {
  const body = [];
  let tag;
  const u16 = (v) => body.push(v & 0xff, (v >>> 8) & 0xff);
  const u32 = (v) => body.push(v & 0xff, (v >>> 8) & 0xff, (v >>> 16) & 0xff, (v >>> 24) & 0xff);
  switch (ev.kind) {
    case 'move': tag = 1; u16(ev.x); u16(ev.y); break;
    case 'button': tag = 2; body.push(ev.button, ev.down ? 1 : 0); break;
    case 'wheel': tag = 3; u16(ev.dx); u16(ev.dy); break;
    case 'key': tag = 4; u32(ev.code); body.push(ev.down ? 1 : 0, ev.modifiers || 0); break;
    case 'cad': tag = 5; break;
    case 'clipboard': {
      tag = 6;
      const text = new TextEncoder().encode(ev.text);
      u16(text.length);
      body.push(...text);
      break;
    }
    default: throw new Error('unknown input kind ' + ev.kind);
  }
  const out = new Uint8Array(6 + body.length);
  const view = new DataView(out.buffer);
  out[0] = INPUT_VERSION;
  out[1] = tag;
  view.setUint32(2, seq >>> 0, true);
  out.set(body, 6);
  return out;
}

/** Decodes one input event into the shape `encodeInput` takes, plus `seq`; null if bad. */
export function decodeInput(buf) {
  const b = new Uint8Array(buf);
  if (b.length < 6 || b[0] !== INPUT_VERSION) return null;
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const seq = v.getUint32(2, true);
  const need = (n) => b.length === 6 + n;
  switch (b[1]) {
    case 1: return need(4) ? { seq, kind: 'move', x: v.getUint16(6, true), y: v.getUint16(8, true) } : null;
    case 2: return need(2) ? { seq, kind: 'button', button: b[6], down: b[7] === 1 } : null;
    case 3: return need(4) ? { seq, kind: 'wheel', dx: v.getInt16(6, true), dy: v.getInt16(8, true) } : null;
    case 4: return need(6) ? { seq, kind: 'key', code: v.getUint32(6, true), down: b[10] === 1, modifiers: b[11] } : null;
    case 5: return need(0) ? { seq, kind: 'cad' } : null;
    case 6: {
      if (b.length < 8) return null;
      const len = v.getUint16(6, true);
      if (b.length !== 8 + len) return null;
      return { seq, kind: 'clipboard', text: new TextDecoder().decode(b.subarray(8)) };
    }
    default: return null;
  }
}

// ---------------------------------------------------------------------------------
// File transfer (codec/src/files.rs) on the `files` channel
// ---------------------------------------------------------------------------------

const FILE_VERSION = 1;
const F = { OFFER: 1, ACCEPT: 2, DECLINE: 3, CHUNK: 4, CREDIT: 5, COMPLETE: 6, CANCEL: 7 };
const MAX_CHUNK = 16 * 1024;
const WINDOW = 256 * 1024;
const CREDIT_EVERY = 64 * 1024;
const RELAY_BIT = 0x80000000;
export const CANCEL_REASONS = {
  1: 'cancelled', 2: 'not allowed', 3: 'too large', 4: 'window exceeded', 5: 'out of order',
  6: 'past size', 7: 'unknown transfer', 8: 'incomplete', 9: 'the sender left',
  10: 'the receiver left', 11: 'nobody can receive it', 12: 'no answer in time', 13: 'protocol error',
  14: 'the file name could hide or spoof text',
};

function fileHeader(kind, id, extra) {
  const out = new Uint8Array(6 + extra);
  out[0] = FILE_VERSION;
  out[1] = kind;
  new DataView(out.buffer).setUint32(2, id >>> 0, true);
  return out;
}

function setU64(view, at, n) {
  view.setBigUint64(at, BigInt(n), true);
}

/**
 * Both directions of file transfer on a `files` channel. Emits through callbacks:
 * `onoffer(t)` for an incoming offer (answer with `accept(t.id)` / `decline(t.id)`),
 * `onchange(t)` whenever a transfer's state changes. A transfer `t` has `id`, `name`,
 * `size`, `mime`, `incoming`, `state` ('offered', 'sending', 'receiving', 'done',
 * 'declined', 'cancelled', 'failed'), `done` bytes, `reason`, and for a completed
 * incoming one `blob`.
 */
export class FileTransfers {
  constructor(channel) {
    this.dc = channel;
    this.dc.binaryType = 'arraybuffer';
    this.dc.bufferedAmountLowThreshold = 1024 * 1024;
    this.transfers = new Map();
    this.nextId = 1;
    this.onoffer = () => {};
    this.onchange = () => {};
    this.dc.addEventListener('message', (m) => this.receive(m.data));
  }

  get open() { return this.dc.readyState === 'open'; }

  update(t, changes) {
    Object.assign(t, changes);
    this.onchange(t);
  }

  /** Offers `file` (a File or Blob with a name) to the other side. */
  async send(file) {
    if (!this.open) throw new Error('file transfer is not connected yet');
    const id = this.nextId++;
    const data = new Uint8Array(await file.arrayBuffer());
    const name = new TextEncoder().encode(file.name || 'file').slice(0, 255);
    const mime = new TextEncoder().encode(file.type || '').slice(0, 255);
    const msg = fileHeader(F.OFFER, id, 8 + 1 + name.length + 1 + mime.length);
    const v = new DataView(msg.buffer);
    setU64(v, 6, data.length);
    msg[14] = name.length;
    msg.set(name, 15);
    msg[15 + name.length] = mime.length;
    msg.set(mime, 16 + name.length);
    const t = {
      id, incoming: false, name: file.name || 'file', size: data.length, mime: file.type || '',
      state: 'offered', done: 0, credited: 0, data,
    };
    this.transfers.set(id, t);
    this.dc.send(msg);
    this.onchange(t);
    return t;
  }

  accept(id) { this.answer(id, true); }
  decline(id) { this.answer(id, false); }

  answer(id, yes) {
    const t = this.transfers.get(id);
    if (!t || t.state !== 'offered' || !t.incoming) return;
    this.dc.send(fileHeader(yes ? F.ACCEPT : F.DECLINE, id, 0));
    this.update(t, yes ? { state: 'receiving', chunks: [] } : { state: 'declined' });
  }

  cancel(id) {
    const t = this.transfers.get(id);
    if (!t || ['done', 'declined', 'cancelled', 'failed'].includes(t.state)) return;
    const msg = fileHeader(F.CANCEL, id, 1);
    msg[6] = 1;
    this.dc.send(msg);
    this.update(t, { state: 'cancelled', reason: 'cancelled' });
  }

  async pump(t) {
    if (t.pumping) return;
    t.pumping = true;
    try {
      while (t.state === 'sending' && t.done < t.size) {
        const end = Math.min(t.done + MAX_CHUNK, t.size);
        if (end > t.credited + WINDOW) return; // resumed by the next Credit
        if (this.dc.bufferedAmount > 4 * 1024 * 1024) {
          await new Promise((r) => this.dc.addEventListener('bufferedamountlow', r, { once: true }));
          continue;
        }
        const msg = fileHeader(F.CHUNK, t.id, 8 + (end - t.done));
        setU64(new DataView(msg.buffer), 6, t.done);
        msg.set(t.data.subarray(t.done, end), 14);
        this.dc.send(msg);
        this.update(t, { done: end });
      }
      if (t.state === 'sending' && t.done === t.size) {
        const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', t.data));
        const msg = fileHeader(F.COMPLETE, t.id, 32);
        msg.set(digest, 6);
        this.dc.send(msg);
        this.update(t, { state: 'done', data: null });
      }
    } finally {
      t.pumping = false;
    }
  }

  async receive(data) {
    if (typeof data === 'string') return;
    const b = new Uint8Array(data);
    if (b.length < 6 || b[0] !== FILE_VERSION) return;
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    const id = v.getUint32(2, true);
    const t = this.transfers.get(id);
    switch (b[1]) {
      case F.OFFER: {
        const size = Number(v.getBigUint64(6, true));
        const nameLen = b[14];
        const name = new TextDecoder().decode(b.subarray(15, 15 + nameLen));
        const mimeLen = b[15 + nameLen];
        const mime = new TextDecoder().decode(b.subarray(16 + nameLen, 16 + nameLen + mimeLen));
        const offer = { id, incoming: true, name, size, mime, state: 'offered', done: 0, credited: 0 };
        this.transfers.set(id, offer);
        this.onoffer(offer);
        this.onchange(offer);
        return;
      }
      case F.CHUNK: {
        if (!t || t.state !== 'receiving') return;
        const offset = Number(v.getBigUint64(6, true));
        const chunk = b.slice(14);
        if (offset !== t.done || offset + chunk.length > t.size) {
          this.cancel(id);
          this.update(t, { state: 'failed', reason: 'chunks out of order' });
          return;
        }
        t.chunks.push(chunk);
        t.done += chunk.length;
        if (t.done - t.credited >= CREDIT_EVERY || t.done === t.size) {
          t.credited = t.done;
          const msg = fileHeader(F.CREDIT, id, 8);
          setU64(new DataView(msg.buffer), 6, t.done);
          this.dc.send(msg);
        }
        this.onchange(t);
        return;
      }
      case F.COMPLETE: {
        if (!t || t.state !== 'receiving') return;
        const blob = new Blob(t.chunks, { type: t.mime || 'application/octet-stream' });
        t.chunks = null;
        const digest = new Uint8Array(await crypto.subtle.digest('SHA-256', await blob.arrayBuffer()));
        const want = b.subarray(6, 38);
        const same = blob.size === t.size && digest.every((x, i) => x === want[i]);
        this.update(t, same ? { state: 'done', blob } : { state: 'failed', reason: 'the file arrived damaged' });
        return;
      }
      case F.ACCEPT:
        if (t && !t.incoming && t.state === 'offered') { this.update(t, { state: 'sending' }); this.pump(t); }
        return;
      case F.DECLINE:
        if (t && !t.incoming) this.update(t, { state: 'declined', data: null });
        return;
      case F.CREDIT:
        if (t && !t.incoming) {
          t.credited = Math.max(t.credited, Number(v.getBigUint64(6, true)));
          this.pump(t);
        }
        return;
      case F.CANCEL: {
        const reason = CANCEL_REASONS[b[6]] || `reason ${b[6]}`;
        // Top bit set: a transfer we receive; clear: one we send.
        if (t && Boolean(id & RELAY_BIT) === t.incoming) this.update(t, { state: 'cancelled', reason, data: null, chunks: null });
        return;
      }
      default:
    }
  }
}

/** A list item describing transfer `t`, with accept/decline/cancel/save controls. */
export function transferItem(files, t) {
  const label = `${t.incoming ? 'Received' : 'Sent'} file “${t.name}” (${formatSize(t.size)})`;
  const status = {
    offered: t.incoming ? 'offered to you' : 'waiting for an answer',
    sending: `sending, ${Math.floor((100 * t.done) / Math.max(t.size, 1))}%`,
    receiving: `receiving, ${Math.floor((100 * t.done) / Math.max(t.size, 1))}%`,
    done: t.incoming ? 'complete' : 'sent',
    declined: 'declined',
    cancelled: `cancelled (${t.reason || 'cancelled'})`,
    failed: `failed (${t.reason || ''})`,
  }[t.state];
  const li = el('li', { class: 'transfer', dataset: { transferId: String(t.id), state: t.state } },
    el('span', {}, `${label}: `), el('span', { class: 'transfer-state' }, status));
  if (t.incoming && t.state === 'offered') {
    li.append(' ',
      el('button', { type: 'button', class: 'accept-file', onclick: () => files.accept(t.id) }, `Accept ${t.name}`),
      ' ',
      el('button', { type: 'button', class: 'decline-file', onclick: () => files.decline(t.id) }, 'Decline'));
  }
  if (['sending', 'receiving', 'offered'].includes(t.state) && !(t.incoming && t.state === 'offered')) {
    li.append(' ', el('button', { type: 'button', onclick: () => files.cancel(t.id) }, 'Cancel'));
  }
  if (t.state === 'done' && t.blob) {
    if (!t.url) t.url = URL.createObjectURL(t.blob);
    li.append(' ', el('a', { href: t.url, download: t.name, class: 'save-file' }, `Save ${t.name}`));
  }
  return li;
}

/** Keeps `list` showing every transfer of `files`, one item each. */
export function bindTransfers(files, list) {
  files.onchange = (t) => {
    const item = transferItem(files, t);
    const old = list.querySelector(`[data-transfer-id="${t.id}"][data-incoming="${t.incoming}"]`);
    item.dataset.incoming = String(t.incoming);
    if (old) old.replaceWith(item); else list.append(item);
  };
}
