// The customer portal: name + support key (or a support link) → POST /v1/join → the
// session WebSocket → share the screen → publish it on the one peer connection, as the
// native customer does (bench/src/client/customer.rs): a `sendonly` video transceiver and
// the `input`, `chat` and `files` data channels, then the offer.

import {
  $, el, say, api, describeError, chatLine, SessionConnection, FileTransfers, bindTransfers,
  decodeInput, keyName, retryResume, withToken, pageOn, pageParams, homeOrigin, trustedOrigins, resumeThrough,
  INPUT_LABEL, CHAT_LABEL, FILES_LABEL, MOD, MAX_REDIRECTS,
} from './common.js';
import { solveChallenge } from './work.js';

// `?key=` fills the key in; after a cluster redirect moved the page here (see `join`),
// the fragment carries `key` or the link's path, `name`, `join` (the number of moves so
// far: join at once) and `home` (the node first reached).
const params = pageParams();
const linkMatch = /^\/s\/([^/]+)$/.exec(location.pathname);
const supportLink = linkMatch ? decodeURIComponent(linkMatch[1]) : null;

const END_REASONS = {
  ended_by_host: 'Your agent ended the session.',
  customer_left: 'You ended the session.',
  agents_left: 'Every agent has left, so the session has ended.',
  key_expired: 'The support key expired.',
  customer_did_not_return: 'The connection was lost for too long, so the session has ended.',
  max_duration: 'The session reached its maximum length.',
  node_shutdown: 'The server shut down.',
};

const state = {
  conn: null,
  stream: null,
  input: null,
  chat: null,
  files: null,
  agents: new Map(),
  ended: false,
  // The URL of the next connection (the session WebSocket with the single-use resume
  // token of the last welcome), and whether a resume is under way.
  resumeUrl: null,
  resuming: false,
  // The origin first reached: resumes go through it when the session's node is gone.
  // Believed only if this node names it as one of its cluster's (GET /v1/origins).
  home: homeOrigin(params, params.get('home') ? await trustedOrigins() : []),
};


// Everything that arrived on the `input` channel, decoded, for people (the list) and for
// tests (window.__inputLog, and data-events on the layer).
window.__inputLog = [];

if (supportLink) {
  $('#link-note').hidden = false;
  $('#key-field').hidden = true;
}
if (params.get('key')) $('#key').value = params.get('key');
if (params.get('name')) $('#name').value = params.get('name');
const moves = Number(params.get('join')) || 0;

$('#join-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const status = $('#join-status');
  const name = $('#name').value.trim();
  const key = $('#key').value.replace(/[\s-]/g, '');
  if (!name) { say(status, 'Please enter your name.', true); $('#name').focus(); return; }
  if (!supportLink && !/^\d{9}$/.test(key)) {
    say(status, 'The support key has nine digits.', true);
    $('#key').focus();
    return;
  }
  say(status, 'Joining…');
  $('#join-button').disabled = true;
  try {
    const body = supportLink ? { name, support_link: supportLink } : { name, support_key: key };
    const creds = await joinWithWork(body, status);
    await enter(creds, name);
  } catch (e) {
    if (e.code === 'redirect' && e.location && moves < MAX_REDIRECTS) {
      // Another node of the cluster holds this session: load the portal there and join
      // again (the key or link was not used here).
      say(status, describeError('redirect'));
      document.body.dataset.state = 'redirecting';
      const path = supportLink ? `/s/${encodeURIComponent(supportLink)}` : '/';
      location.assign(pageOn(e.location, path,
        { key: supportLink ? undefined : key, name, join: String(moves + 1) }, state.home));
      return;
    }
    say(status, e.message || describeError(e.code), true);
    document.body.dataset.error = e.code || 'error';
    $('#join-button').disabled = false;
  }
});

/**
 * POST /v1/join; answered `challenge_required` (the server's key budget is spent by
 * someone guessing keys), does the proof of work it asks for and repeats the join with
 * the proof, a few times at most (a challenge may expire, or the difficulty rise).
 */
async function joinWithWork(body, status) {
  for (let attempt = 0; ; attempt++) {
    try {
      return await api('/v1/join', { method: 'POST', body });
    } catch (e) {
      if (e.code !== 'challenge_required' || !e.challenge || attempt >= 3) throw e;
      say(status, describeError('challenge_required'));
      document.body.dataset.state = 'working';
      const nonce = await solveChallenge(e.challenge.challenge, e.challenge.bits);
      body = { ...body, proof: { challenge: e.challenge.challenge, nonce } };
      say(status, 'Joining…');
    }
  }
}

/** Opens the session WebSocket at `url`; a drop afterwards starts a resume. */
async function connect(url) {
  const conn = new SessionConnection(url);
  conn.onmessage = onMessage;
  conn.onclose = () => {
    if (state.conn === conn && !state.ended) resume();
  };
  const welcome = await conn.open();
  state.conn = conn;
  // conn.wsUrl: the node that holds the session, after any redirect.
  state.resumeUrl = welcome.resume_token ? withToken(conn.wsUrl, welcome.resume_token) : null;
  return welcome;
}

/**
 * The connection dropped (network, sleep): come back with the resume token, and publish
 * the screen again on a new peer connection if it is still being shared. The agents keep
 * their connections and see "reconnecting" meanwhile.
 */
async function resume() {
  if (state.resuming || state.ended) return;
  state.resuming = true;
  document.body.dataset.state = 'reconnecting';
  if (state.conn) state.conn.close();
  say($('#session-status'), 'The connection was lost. Reconnecting…', true);
  const failed = await retryResume(
    () => resumeThrough(connect, state.resumeUrl, state.home, window.__resumeThroughHome),
    () => !state.ended && state.resumeUrl,
  );
  state.resuming = false;
  if (failed) {
    sessionOver(describeError(failed.code, failed.message), failed.code);
    return;
  }
  const [track] = state.stream ? state.stream.getVideoTracks() : [];
  if (track && track.readyState === 'live') {
    await publish(track);
    document.body.dataset.state = 'sharing';
  } else {
    // Not sharing any more (a restarted browser): ask again.
    document.body.dataset.state = 'joined';
    $('#session').hidden = true;
    $('#share').hidden = false;
  }
  window.__resumes = (window.__resumes || 0) + 1;
  say($('#session-status'), 'Reconnected.');
}

// For the browser tests: drop the connection as a network failure would.
window.__dropConnection = () => {
  if (state.conn) {
    if (state.conn.pc) state.conn.pc.close();
    state.conn.ws.close();
  }
};
// For the browser tests: an ICE restart, as after a network change (true if started).
window.__restartIce = () => Boolean(state.conn && state.conn.restartIce());
// For the browser tests: the session's connection (ICE restarts, redirects followed).
window.__connection = () => state.conn;
window.__home = () => state.home;

// Moved here by a cluster redirect: join at once, as the person asked on the other node.
if (moves > 0 && $('#name').value && (supportLink || $('#key').value)) {
  $('#join-form').requestSubmit();
}

async function enter(creds, name) {
  const welcome = await connect(creds.ws_url);
  // The link or key is used up: keep it out of the address bar and history.
  history.replaceState(null, '', '/');
  $('#join').hidden = true;
  $('#share').hidden = false;
  $('#who').textContent = `Signed in as ${name}`;
  $('#who').hidden = false;
  for (const p of welcome.roster) state.agents.set(p.participant_id, p);
  renderAgents();
  for (const m of welcome.chat) showChat(m);
  document.body.dataset.state = 'joined';
  $('#share-button').focus();
}

$('#share-button').addEventListener('click', async () => {
  const status = $('#share-status');
  try {
    state.stream = await captureScreen();
  } catch (e) {
    say(status, 'Screen sharing was not started. Your agent needs to see your screen to help: press the button to try again.', true);
    return;
  }
  say(status, '');
  $('#share').hidden = true;
  $('#session').hidden = false;
  $('#preview').srcObject = state.stream;
  const [track] = state.stream.getVideoTracks();
  track.addEventListener('ended', () => {
    say($('#session-status'), 'You stopped sharing your screen.');
  });
  await publish(track);
  document.body.dataset.state = 'sharing';
  $('#chat-text').focus();
});

/** The screen, or with `?screen=test` an animated test pattern (no capture prompt). */
async function captureScreen() {
  if (params.get('screen') === 'test' || !navigator.mediaDevices?.getDisplayMedia) {
    return testPattern();
  }
  return navigator.mediaDevices.getDisplayMedia({ video: { frameRate: 15 }, audio: false });
}

function testPattern() {
  const canvas = el('canvas', { width: 640, height: 360 });
  const g = canvas.getContext('2d');
  let n = 0;
  const draw = () => {
    n += 1;
    g.fillStyle = '#1d3557';
    g.fillRect(0, 0, 640, 360);
    g.fillStyle = '#f1faee';
    g.font = '32px sans-serif';
    g.fillText('Test screen', 40, 60);
    g.fillText(new Date().toLocaleTimeString(), 40, 110);
    g.fillStyle = '#e63946';
    g.fillRect((n * 7) % 600, 200, 40, 40);
  };
  draw();
  setInterval(draw, 66);
  return canvas.captureStream(15);
}

async function publish(track) {
  const conn = state.conn;
  let shareTransceiverAdded = false;
  // An agent's screen share: on the relay's first `renegotiate`, a `recvonly` video
  // section is added once, which the relay binds its share track to.
  conn.beforeOffer = async (pc, asked) => {
    if (asked && !shareTransceiverAdded) {
      shareTransceiverAdded = true;
      pc.addTransceiver('video', { direction: 'recvonly' });
    }
  };
  await conn.startPeer(async (pc) => {
    pc.addTransceiver(track, { direction: 'sendonly', streams: [state.stream] });
    state.input = pc.createDataChannel(INPUT_LABEL);
    state.input.binaryType = 'arraybuffer';
    state.input.onmessage = (m) => onInput(m.data);
    state.chat = pc.createDataChannel(CHAT_LABEL);
    state.chat.onmessage = (m) => {
      try { onMessage(JSON.parse(m.data)); } catch { /* not JSON: ignored */ }
    };
    state.files = new FileTransfers(pc.createDataChannel(FILES_LABEL));
    bindTransfers(state.files, $('#transfers'));
    pc.ontrack = (ev) => {
      $('#agent-screen').srcObject = new MediaStream([ev.track]);
    };
    pc.onconnectionstatechange = () => {
      document.body.dataset.peer = pc.connectionState;
      if (pc.connectionState === 'connected') say($('#session-status'), 'Connected: your agent can see your screen.');
      if (pc.connectionState === 'failed') say($('#session-status'), 'The screen connection failed.', true);
    };
  });
}

function onMessage(msg) {
  switch (msg.type) {
    case 'participant_joined':
    case 'participant_updated':
      state.agents.set(msg.participant.participant_id, msg.participant);
      renderAgents();
      break;
    case 'participant_left':
      state.agents.delete(msg.participant_id);
      renderAgents();
      break;
    case 'chat':
      showChat(msg);
      break;
    case 'agent_share':
      $('#agent-share').hidden = !msg.active;
      break;
    case 'session_ended':
      sessionOver(END_REASONS[msg.reason] || 'The session has ended.', msg.reason);
      break;
    case 'error':
      if (msg.code === 'replaced') sessionOver(describeError('replaced'));
      else say($('#session-status'), describeError(msg.code, msg.message), true);
      break;
    default:
  }
}

function renderAgents() {
  const list = $('#agents');
  list.replaceChildren(...[...state.agents.values()]
    .filter((p) => p.role !== 'customer')
    .map((p) => el('li', { dataset: { participantId: p.participant_id } },
      p.name, p.connected ? '' : ' (reconnecting)')));
  if (!list.children.length) list.append(el('li', { class: 'muted' }, 'Waiting for your agent…'));
}

function showChat(m) {
  const who = m.from_role === 'customer' ? 'You' : (m.from_name || 'Support agent');
  chatLine($('#chat-log'), who, m.text);
}

$('#chat-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const text = $('#chat-text').value.trim();
  if (!text) return;
  const msg = { type: 'chat', text };
  if (state.chat && state.chat.readyState === 'open') state.chat.send(JSON.stringify(msg));
  else state.conn.send(msg);
  $('#chat-text').value = '';
});

$('#file-input').addEventListener('change', async (ev) => {
  for (const f of ev.target.files) {
    try { await state.files.send(f); } catch (e) { say($('#session-status'), e.message, true); }
  }
  ev.target.value = '';
});

$('#leave-button').addEventListener('click', () => {
  if (!confirm('End the support session? Your agent will no longer see your screen.')) return;
  state.conn.send({ type: 'leave' });
  sessionOver(END_REASONS.customer_left, 'customer_left');
});

function sessionOver(text, reason) {
  if (state.ended) return;
  state.ended = true;
  document.body.dataset.state = 'ended';
  if (reason) document.body.dataset.endReason = reason;
  if (state.stream) for (const t of state.stream.getTracks()) t.stop();
  if (state.conn) state.conn.close();
  for (const id of ['#join', '#share']) $(id).hidden = true;
  $('#session').hidden = false;
  say($('#session-status'), text, true);
  for (const c of document.querySelectorAll('#session input, #session button')) c.disabled = true;
}

// ---------------------------------------------------------------------------------
// The remote cursor: where the agent points, drawn over the preview
// ---------------------------------------------------------------------------------

const BUTTONS = ['left', 'middle', 'right', 'back', 'forward'];

function onInput(data) {
  const ev = decodeInput(data);
  if (!ev) return;
  window.__inputLog.push(ev);
  const layer = $('#remote-layer');
  layer.dataset.events = String(window.__inputLog.length);
  const cursor = $('#remote-cursor');
  let text;
  switch (ev.kind) {
    case 'move': {
      const r = contentRect($('#preview'));
      cursor.hidden = false;
      cursor.style.left = `${r.x + (ev.x / 65535) * r.width}px`;
      cursor.style.top = `${r.y + (ev.y / 65535) * r.height}px`;
      layer.dataset.x = String(ev.x);
      layer.dataset.y = String(ev.y);
      return; // too many to list
    }
    case 'button':
      cursor.classList.toggle('pressed', ev.down);
      text = `${BUTTONS[ev.button] || 'button'} button ${ev.down ? 'pressed' : 'released'}`;
      break;
    case 'wheel': text = `scrolled ${ev.dx}, ${ev.dy}`; break;
    case 'key': {
      const mods = [[MOD.CTRL, 'Ctrl'], [MOD.ALT, 'Alt'], [MOD.SHIFT, 'Shift'], [MOD.META, 'Meta']]
        .filter(([bit]) => ev.modifiers & bit).map(([, n]) => n + '+').join('');
      if (!ev.down) return;
      text = `key ${mods}${keyName(ev.code)}`;
      layer.dataset.keys = (layer.dataset.keys || '') + keyName(ev.code) + ' ';
      break;
    }
    case 'cad': text = 'Ctrl+Alt+Del'; break;
    case 'clipboard': text = `clipboard set (${ev.text.length} characters)`; break;
    default: return;
  }
  const log = $('#input-log');
  log.append(el('li', {}, text));
  while (log.children.length > 20) log.firstElementChild.remove();
}

/** Where a video's picture is inside its element (object-fit: contain). */
function contentRect(video) {
  const w = video.clientWidth;
  const h = video.clientHeight;
  const vw = video.videoWidth || w;
  const vh = video.videoHeight || h;
  const scale = Math.min(w / vw, h / vh) || 1;
  const width = vw * scale;
  const height = vh * scale;
  return { x: video.offsetLeft + (w - width) / 2, y: video.offsetTop + (h - height) / 2, width, height };
}
