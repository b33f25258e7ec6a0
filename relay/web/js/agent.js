// The agent console: sign in with a token, start a session or accept an invitation (or,
// for supervisors, monitor one), then watch the customer's screen on the one peer
// connection, as the native agent does (bench/src/client/agent.rs): a `recvonly` video
// transceiver and the `input`, `chat` and `files` data channels, then the offer.

import {
  $, el, say, api, describeError, chatLine, formatKey, SessionConnection, FileTransfers,
  bindTransfers, encodeInput, hidUsage, modifiersOf, framesDecoded, retryResume, withToken,
  pageOn, pageParams, homeOrigin, trustedOrigins, resumeThrough, INPUT_LABEL, CHAT_LABEL, FILES_LABEL,
  MAX_REDIRECTS,
} from './common.js';

const END_REASONS = {
  ended_by_host: 'The host ended the session.',
  customer_left: 'The customer ended the session.',
  agents_left: 'Every agent has left.',
  key_expired: 'The support key expired before the customer joined.',
  customer_did_not_return: 'The customer\'s connection was lost for too long.',
  max_duration: 'The session reached its maximum length.',
  node_shutdown: 'The server shut down.',
};

const agent = { token: null, claims: null, console: null };
let session = null; // the session on screen, see enterSession

// ---------------------------------------------------------------------------------
// Cluster redirects: a node that does not hold what was asked answers `redirect`; the
// console then moves itself to the owning node (its `/agent`, the token and what to do
// there in the fragment) and does it again there.
// ---------------------------------------------------------------------------------

const params = pageParams();
const HOME_KEY = 'relay-agent-home';
if (params.get('home')) sessionStorage.setItem(HOME_KEY, homeOrigin(params, await trustedOrigins()));
/** The origin first reached: resumes go through it when the session's node is gone. */
agent.home = sessionStorage.getItem(HOME_KEY) || window.location.origin;
/** What a redirect moved this page here to do: `then` = create, accept or monitor. */
const pending = params.get('then') ? {
  then: params.get('then'), portal: params.get('portal'), visibility: params.get('visibility'),
  invitation: params.get('invitation'), session: params.get('session'),
} : null;
const moves = Number(params.get('moves')) || 0;

/** Moves the console to the node of redirect `e` to do `action` there; false if not one. */
function followRedirect(e, action) {
  if (e.code !== 'redirect' || !e.location || moves >= MAX_REDIRECTS) return false;
  document.body.dataset.state = 'redirecting';
  location.assign(pageOn(e.location, '/agent',
    { token: agent.token, ...action, moves: String(moves + 1) }, agent.home));
  return true;
}

/** After a move: what the other node sent this page here for. */
async function doPending() {
  if (!pending || (session && !session.ended)) return;
  try {
    if (pending.then === 'create' && pending.portal) {
      // The node placement chose: `redirected` tells it to take the session.
      const created = await api('/v1/sessions?redirected=1', {
        method: 'POST', token: agent.token,
        body: { portal: pending.portal, visibility: pending.visibility || 'visible' },
      });
      await enterSession(created.host, { role: 'host', created });
    } else if (pending.then === 'accept' && pending.invitation) {
      const creds = await api(`/v1/invitations/${encodeURIComponent(pending.invitation)}/accept`, { method: 'POST', token: agent.token });
      await enterSession(creds, { role: 'agent' });
    } else if (pending.then === 'monitor' && pending.session) {
      await monitor(pending.session);
    }
  } catch (e) {
    if (!followRedirect(e, pending)) say($('#start-status'), e.message, true);
  }
}

// ---------------------------------------------------------------------------------
// Sign-in and the console WebSocket (invitations)
// ---------------------------------------------------------------------------------

function claimsOf(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(decodeURIComponent(escape(atob(part))));
  } catch {
    return null;
  }
}

function wsUrl(path) {
  return `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}${path}`;
}

async function signIn(token) {
  const status = $('#signin-status');
  const claims = claimsOf(token);
  if (!claims || !claims.sub || !Array.isArray(claims.portals)) {
    say(status, 'This is not an agent token.', true);
    return;
  }
  say(status, 'Signing in…');
  const ws = new WebSocket(wsUrl(`/v1/agent/ws?token=${encodeURIComponent(token)}`));
  ws.onmessage = (m) => onConsoleMessage(JSON.parse(m.data));
  ws.onclose = () => {
    if (!agent.claims) say(status, describeError('unauthorized'), true);
    else if (agent.console === ws) say($('#start-status'), 'The console lost its connection; reload the page to get invitations again.', true);
  };
  await new Promise((resolve) => {
    ws.addEventListener('message', resolve, { once: true });
    ws.addEventListener('close', resolve, { once: true });
  });
  if (ws.readyState !== WebSocket.OPEN) return;
  agent.token = token;
  agent.claims = claims;
  agent.console = ws;
  sessionStorage.setItem('relay-agent-token', token);
  say(status, '');
  $('#signin').hidden = true;
  $('#home').hidden = false;
  $('#who').textContent = `${claims.name} (${claims.sub})`;
  $('#who').hidden = false;
  $('#signout').hidden = false;
  $('#portal').replaceChildren(...claims.portals.map((p) => el('option', { value: p }, p)));
  const supervisor = (claims.grants || []).includes('monitor');
  $('#monitor-card').hidden = !supervisor;
  if (supervisor) refreshSessions();
  document.body.dataset.state = 'home';
  await resumeRemembered();
  await doPending();
}

function onConsoleMessage(msg) {
  switch (msg.type) {
    case 'invitation': addInvitation(msg); break;
    case 'invitation_withdrawn': {
      const li = document.querySelector(`#invitations [data-invitation-id="${msg.invitation_id}"]`);
      if (li) li.remove();
      if (!$('#invitations').children.length) $('#invitations').append(el('li', { class: 'muted' }, 'No invitations.'));
      break;
    }
    default:
  }
}

function addInvitation(inv) {
  const list = $('#invitations');
  for (const muted of list.querySelectorAll('.muted')) muted.remove();
  const rights = `${inv.permission === 'control' ? 'control' : 'view only'}, ${inv.visibility === 'masked' ? 'hidden from the customer' : 'visible to the customer'}`;
  const li = el('li', { dataset: { invitationId: inv.invitation_id } },
    el('strong', {}, inv.from), ` invites you to a session of ${inv.portal}${inv.portal_wide ? ' (whole portal)' : ''} (${rights})`,
    inv.comment ? el('q', {}, inv.comment) : '', ' ',
    el('button', { type: 'button', class: 'accept-invitation', onclick: () => answerInvitation(inv, true, li) }, 'Accept'), ' ',
    el('button', { type: 'button', onclick: () => answerInvitation(inv, false, li) }, 'Decline'));
  list.append(li);
}

async function answerInvitation(inv, accept, li) {
  try {
    if (accept) {
      const creds = await api(`/v1/invitations/${inv.invitation_id}/accept`, { method: 'POST', token: agent.token });
      li.remove();
      await enterSession(creds, { role: 'agent' });
    } else {
      await api(`/v1/invitations/${inv.invitation_id}/decline`, { method: 'POST', token: agent.token });
      li.remove();
    }
  } catch (e) {
    if (accept && followRedirect(e, { then: 'accept', invitation: inv.invitation_id })) return;
    li.append(el('span', { class: 'error' }, ` ${e.message}`));
  }
}

async function refreshSessions() {
  const body = $('#live-sessions');
  try {
    const list = await api('/v1/monitor/sessions', { token: agent.token });
    body.replaceChildren(...list.sessions.map((s) => el('tr', {},
      el('td', {}, s.portal), el('td', {}, s.host), el('td', {}, s.customer || '—'),
      el('td', {}, String(s.agents)), el('td', {}, `${Math.floor(s.age_s / 60)} min`),
      el('td', {}, el('button', { type: 'button', class: 'monitor', onclick: () => monitor(s.session_id) }, `Monitor ${s.host}'s session`)))));
    if (!list.sessions.length) body.append(el('tr', {}, el('td', { colspan: '6', class: 'muted' }, 'No live sessions.')));
  } catch (e) {
    say($('#monitor-status'), e.message, true);
  }
}

async function monitor(sid) {
  try {
    const creds = await api(`/v1/sessions/${sid}/monitor`, { method: 'POST', token: agent.token });
    await enterSession(creds, { role: 'supervisor' });
  } catch (e) {
    if (followRedirect(e, { then: 'monitor', session: sid })) return;
    say($('#monitor-status'), e.message, true);
  }
}

$('#signin-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  signIn($('#token').value.trim());
});
$('#signout').addEventListener('click', () => {
  sessionStorage.removeItem('relay-agent-token');
  sessionStorage.removeItem(HOME_KEY);
  forgetSession();
  location.replace('/agent');
});
$('#refresh-sessions').addEventListener('click', refreshSessions);

$('#start-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('#start-button').disabled = true;
  try {
    const body = { portal: $('#portal').value, visibility: $('#start-masked').checked ? 'masked' : 'visible' };
    const created = await api('/v1/sessions', { method: 'POST', token: agent.token, body });
    await enterSession(created.host, { role: 'host', created });
  } catch (e) {
    if (followRedirect(e, { then: 'create', portal: $('#portal').value, visibility: $('#start-masked').checked ? 'masked' : 'visible' })) return;
    say($('#start-status'), e.message, true);
  } finally {
    $('#start-button').disabled = false;
  }
});

// ---------------------------------------------------------------------------------
// A session
// ---------------------------------------------------------------------------------

/**
 * Opens the session of `creds` (its `ws_url`: a participant token, or the resume token of
 * a session this tab was in before a reload) and shows it. `created` is the answer that
 * created it (the host's support key and link).
 */
async function enterSession(creds, { created } = {}) {
  if (session && !session.ended) {
    throw new Error('Leave the current session first.');
  }
  session = {
    conn: null, creds, sid: creds.session_id, you: null, people: new Map(), controlling: false,
    seq: 1, input: null, chat: null, files: null, ended: false, lastForbidden: 0, created,
    resumeUrl: null, resuming: false,
  };
  const s = session;
  let welcome;
  try {
    welcome = await connect(s, creds.ws_url);
  } catch (e) {
    s.ended = true;
    throw e;
  }
  $('#home').hidden = true;
  $('#session').hidden = false;
  for (const c of document.querySelectorAll('#session input, #session button, #session select')) c.disabled = false;
  $('#transfers').replaceChildren();
  showWelcome(s, welcome);
  $('#key-box').hidden = !created;
  if (created) showKey(created);
  $('#end-button').hidden = s.you.role !== 'host';
  $('#back-button').hidden = true;
  $('#invite-box').hidden = s.you.role !== 'host';
  document.body.dataset.state = 'session';
  document.body.dataset.role = s.you.role;
  say($('#session-status'), s.you.role === 'supervisor' ? 'Monitoring silently: nobody in the session sees you.' : '');

  await startMedia(s);
  s.statsTimer = setInterval(async () => {
    // Frames of the current peer connection only (a new one after a resume starts at 0).
    const pc = s.conn?.pc;
    const n = await framesDecoded(pc).catch(() => 0);
    if (pc !== s.conn?.pc) return;
    s.decoded = { pc, n };
    const video = $('#remote');
    video.dataset.framesDecoded = String(n);
    $('#no-video').hidden = n > 0;
    if (n > 0) $('#video-stats').textContent = `${video.videoWidth}×${video.videoHeight}, ${n} frames`;
  }, 500);
}

/**
 * Opens the session WebSocket at `url` for `s`; resolves with the `welcome`. Keeps the
 * resume token of that welcome (the next connection's; each admits one) in `s` and in
 * this tab's storage, so a drop or a reload of the page comes back into the session.
 */
async function connect(s, url) {
  const conn = new SessionConnection(url);
  conn.onmessage = (m) => onSessionMessage(s, m);
  conn.onclose = () => {
    if (s.conn === conn && !s.ended) resume(s);
  };
  const welcome = await conn.open();
  s.conn = conn;
  // conn.wsUrl: the node that holds the session, after any redirect.
  s.resumeUrl = welcome.resume_token ? withToken(conn.wsUrl, welcome.resume_token) : null;
  rememberSession(s);
  return welcome;
}

/** The roster and recent chat of a `welcome` (the first, or one after a resume). */
function showWelcome(s, welcome) {
  s.you = welcome.you;
  s.people = new Map(welcome.roster.map((p) => [p.participant_id, p]));
  $('#chat-log').replaceChildren();
  for (const m of welcome.chat) showChat(s, m);
  renderPeople(s);
  updateControls(s);
}

/**
 * The one peer connection of the session's current WebSocket: a `recvonly` video
 * transceiver and the `input`, `chat` and `files` channels, then the offer. After a
 * resume this is a new peer connection with new channels (the relay replaces the old one
 * when its offer arrives).
 */
async function startMedia(s) {
  const previous = s.files;
  await s.conn.startPeer(async (pc) => {
    pc.addTransceiver('video', { direction: 'recvonly' });
    s.input = pc.createDataChannel(INPUT_LABEL);
    s.chat = pc.createDataChannel(CHAT_LABEL);
    s.chat.onmessage = (m) => {
      try { onSessionMessage(s, JSON.parse(m.data)); } catch { /* not JSON: ignored */ }
    };
    s.files = new FileTransfers(pc.createDataChannel(FILES_LABEL));
    if (previous) s.files.nextId = previous.nextId; // the list keeps the old transfers
    bindTransfers(s.files, $('#transfers'));
    pc.ontrack = (ev) => {
      $('#remote').srcObject = ev.streams[0] || new MediaStream([ev.track]);
    };
    pc.onconnectionstatechange = () => { document.body.dataset.peer = pc.connectionState; };
  });
}

/**
 * The session WebSocket dropped (network, sleep): come back with the resume token and a
 * new peer connection. The relay keeps the agent's place for its grace period, and its
 * old peer connection until the new one's offer replaces it, so the old one keeps
 * showing the screen meanwhile (if it still can) and is closed once the new one is
 * offered. Input waits for the new one; transfers under way are lost with the old one.
 */
async function resume(s) {
  if (s.resuming || s.ended) return;
  s.resuming = true;
  document.body.dataset.state = 'reconnecting';
  const old = s.conn;
  if (old.ws) old.ws.close();
  s.input = null;
  s.chat = null;
  $('#remote').dataset.framesDecoded = '0';
  if (s.files) {
    for (const t of s.files.transfers.values()) {
      if (['offered', 'sending', 'receiving'].includes(t.state)) {
        s.files.update(t, { state: 'cancelled', reason: 'the connection was lost', data: null, chunks: null });
      }
    }
  }
  say($('#session-status'), 'The connection was lost. Reconnecting…', true);
  let welcome = null;
  const failed = await retryResume(
    async () => {
      welcome = await resumeThrough((url) => connect(s, url), s.resumeUrl, agent.home, window.__resumeThroughHome);
    },
    () => !s.ended && s.resumeUrl,
  );
  s.resuming = false;
  if (failed || !welcome) {
    forgetSession();
    endView(s, describeError(failed?.code, failed?.message || 'The connection to the session was lost.'), failed?.code);
    return;
  }
  showWelcome(s, welcome);
  await startMedia(s);
  if (old.pc) old.pc.close();
  document.body.dataset.state = 'session';
  window.__resumes = (window.__resumes || 0) + 1;
  say($('#session-status'), 'Reconnected.');
  setTimeout(() => {
    if (!s.ended && $('#session-status').textContent === 'Reconnected.') say($('#session-status'), '');
  }, 4000);
}

// For the browser tests: drop the session WebSocket as a network failure would (the
// peer connection is left to the resume, as after a real drop).
window.__dropConnection = () => {
  if (session && session.conn) session.conn.ws.close();
};
// For the browser tests: an ICE restart, as after a network change (true if started).
window.__restartIce = () => Boolean(session && session.conn && session.conn.restartIce());

/** Where this tab keeps the session it is in, so that a reload comes back into it. */
const SESSION_KEY = 'relay-agent-session';

function rememberSession(s) {
  if (!s.resumeUrl) return;
  const created = s.created
    ? { support_key: s.created.support_key, support_url: s.created.support_url }
    : undefined;
  sessionStorage.setItem(SESSION_KEY, JSON.stringify({
    sid: s.sid, agent: agent.claims?.sub, resumeUrl: s.resumeUrl, created,
  }));
}

function forgetSession() {
  sessionStorage.removeItem(SESSION_KEY);
}

/** After a reload: back into the session this tab was in, with its resume token. */
async function resumeRemembered() {
  let saved;
  try { saved = JSON.parse(sessionStorage.getItem(SESSION_KEY)); } catch { saved = null; }
  if (!saved || !saved.resumeUrl || saved.agent !== agent.claims.sub) {
    forgetSession();
    return;
  }
  try {
    await enterSession({ session_id: saved.sid, ws_url: saved.resumeUrl }, { created: saved.created });
    window.__resumes = (window.__resumes || 0) + 1;
  } catch (e) {
    forgetSession();
    say($('#start-status'), `The session this page was in could not be resumed: ${e.message}`, true);
  }
}

function showKey(created) {
  $('#support-key').textContent = formatKey(created.support_key);
  $('#support-url').value = created.support_url;
  const subject = 'Your remote support session';
  const body = `To let us see your screen, open ${created.support_url}\n`
    + `or go to ${location.origin}/ and enter the support key ${formatKey(created.support_key)}.\n`;
  $('#mailto').href = `mailto:?subject=${encodeURIComponent(subject)}&body=${encodeURIComponent(body)}`;
}

async function copy(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    say($('#copy-status'), `${what} copied.`);
  } catch {
    say($('#copy-status'), `Copying was not allowed; select the ${what.toLowerCase()} and copy it.`, true);
  }
}
$('#copy-key').addEventListener('click', () => copy($('#support-key').textContent.replace(/\s/g, ''), 'Key'));
$('#copy-url').addEventListener('click', () => copy($('#support-url').value, 'Link'));

function onSessionMessage(s, msg) {
  if (s !== session) return;
  switch (msg.type) {
    case 'participant_joined':
    case 'participant_updated': {
      const p = msg.participant;
      if (p.participant_id === s.you.participant_id) s.you = p;
      else s.people.set(p.participant_id, p);
      renderPeople(s);
      updateControls(s);
      break;
    }
    case 'participant_left':
      s.people.delete(msg.participant_id);
      renderPeople(s);
      break;
    case 'chat': showChat(s, msg); break;
    case 'invitation_update':
      say($('#invite-status'), `Invitation ${msg.state}${msg.by ? ` by ${msg.by}` : ''}.`);
      break;
    case 'agent_share': break;
    case 'session_ended':
      endView(s, END_REASONS[msg.reason] || 'The session has ended.', msg.reason);
      break;
    case 'error':
      if (msg.code === 'replaced') {
        endView(s, describeError('replaced'), 'replaced');
        break;
      }
      if (msg.code === 'forbidden') {
        s.lastForbidden = Date.now();
        document.body.dataset.forbidden = String((Number(document.body.dataset.forbidden) || 0) + 1);
      }
      say($('#session-status'), describeError(msg.code, msg.message), true);
      break;
    default:
  }
}

function showChat(s, m) {
  const mine = m.from === s.you.participant_id;
  const who = mine ? 'You' : (m.from_name || (m.from_role === 'customer' ? 'Customer' : 'Agent'));
  chatLine($('#chat-log'), who, m.text, m.audience === 'agents');
}

function renderPeople(s) {
  const host = s.you.role === 'host';
  const items = [];
  const all = [s.you, ...s.people.values()];
  for (const p of all) {
    const me = p.participant_id === s.you.participant_id;
    const bits = [p.role];
    if (p.visibility === 'masked') bits.push('masked');
    if (p.permission) bits.push(p.permission === 'control' ? 'control' : 'view only');
    if (!p.connected) bits.push('disconnected');
    const li = el('li', { dataset: { participantId: p.participant_id, role: p.role } },
      el('span', {}, `${p.name}${me ? ' (you)' : ''}`), ' ', el('span', { class: 'muted' }, `(${bits.join(', ')})`));
    if (host && !me && p.role === 'agent') {
      const select = el('select', { 'aria-label': `Permission of ${p.name}`, class: 'permission' },
        el('option', { value: 'view', selected: p.permission === 'view' }, 'View only'),
        el('option', { value: 'control', selected: p.permission === 'control' }, 'Control'));
      select.addEventListener('change', () => setPermission(s, p, { permission: select.value }));
      const mask = el('button', { type: 'button', class: 'link' }, p.visibility === 'masked' ? 'Unmask' : 'Mask');
      mask.addEventListener('click', () => setPermission(s, p, { visibility: p.visibility === 'masked' ? 'visible' : 'masked' }));
      li.append(' ', select, ' ', mask);
    }
    items.push(li);
  }
  $('#people').replaceChildren(...items);
}

async function setPermission(s, p, change) {
  try {
    const entry = await api(`/v1/sessions/${s.sid}/participants/${p.participant_id}`, { method: 'PATCH', token: agent.token, body: change });
    s.people.set(entry.participant_id, entry);
    renderPeople(s);
  } catch (e) {
    say($('#session-status'), e.message, true);
  }
}

$('#invite-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const s = session;
  const kind = document.querySelector('input[name="target-kind"]:checked').value;
  const target = $('#invite-target').value.trim();
  if (!target) return;
  const comment = $('#invite-comment').value.trim();
  const body = {
    target: { [kind]: target },
    visibility: $('#invite-masked').checked ? 'masked' : 'visible',
    permission: $('#invite-permission').value,
  };
  if (comment) body.comment = comment;
  try {
    const r = await api(`/v1/sessions/${s.sid}/invitations`, { method: 'POST', token: agent.token, body });
    say($('#invite-status'), `Invitation sent (${r.delivered_to} signed in now).`);
    $('#invite-target').value = '';
    $('#invite-comment').value = '';
  } catch (e) {
    say($('#invite-status'), e.message, true);
  }
});

$('#chat-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const s = session;
  const text = $('#chat-text').value.trim();
  if (!text || !s) return;
  const msg = { type: 'chat', text, audience: $('#chat-note').checked ? 'agents' : 'all' };
  if (s.chat && s.chat.readyState === 'open') s.chat.send(JSON.stringify(msg)); else s.conn.send(msg);
  $('#chat-text').value = '';
});

$('#file-input').addEventListener('change', async (ev) => {
  for (const f of ev.target.files) {
    try { await session.files.send(f); } catch (e) { say($('#session-status'), e.message, true); }
  }
  ev.target.value = '';
});

$('#end-button').addEventListener('click', async () => {
  const s = session;
  try {
    await api(`/v1/sessions/${s.sid}`, { method: 'DELETE', token: agent.token });
  } catch (e) {
    say($('#session-status'), e.message, true);
  }
});
$('#leave-button').addEventListener('click', () => {
  const s = session;
  s.conn.send({ type: 'leave' });
  endView(s, 'You left the session.');
});
$('#back-button').addEventListener('click', () => {
  $('#session').hidden = true;
  $('#home').hidden = false;
  $('#remote').srcObject = null;
  document.body.dataset.state = 'home';
});

function endView(s, text, reason) {
  if (s.ended) return;
  s.ended = true;
  forgetSession();
  setControl(s, false);
  clearInterval(s.statsTimer);
  if (s.conn) s.conn.close();
  if (s !== session) return;
  document.body.dataset.state = 'ended';
  if (reason) document.body.dataset.endReason = reason;
  say($('#session-status'), text, true);
  for (const c of document.querySelectorAll('#session input, #session button, #session select')) c.disabled = true;
  $('#back-button').hidden = false;
  $('#back-button').disabled = false;
}

// ---------------------------------------------------------------------------------
// Remote control: input from the video element, scaled to the customer's screen
// ---------------------------------------------------------------------------------

function mayControl(s) {
  return s.you && (s.you.role === 'host' || s.you.role === 'agent') && s.you.permission === 'control';
}

function updateControls(s) {
  const allowed = mayControl(s) && !s.ended;
  $('#control-button').disabled = !allowed;
  $('#cad-button').disabled = !allowed;
  $('#control-hint').textContent = allowed ? '' : 'You can watch only: your permission is view.';
  if (!allowed) setControl(s, false);
}

function setControl(s, on) {
  s.controlling = on;
  const b = $('#control-button');
  b.setAttribute('aria-pressed', String(on));
  b.textContent = on ? 'Release control' : 'Take control';
  $('#remote').classList.toggle('controlling', on);
  if (on) $('#remote').focus();
}

$('#control-button').addEventListener('click', () => setControl(session, !session.controlling));
$('#cad-button').addEventListener('click', () => sendInput({ kind: 'cad' }));

/** Sends one input event on the `input` channel (the relay decides whether it passes). */
function sendInput(ev) {
  const s = session;
  if (!s || !s.input || s.input.readyState !== 'open') return false;
  s.input.send(encodeInput(s.seq++, ev));
  return true;
}

/** The customer-screen position (0..65535) of a pointer event, or null outside the picture. */
function screenPoint(video, ev) {
  const rect = video.getBoundingClientRect();
  const vw = video.videoWidth;
  const vh = video.videoHeight;
  if (!vw || !vh) return null;
  const scale = Math.min(rect.width / vw, rect.height / vh);
  const w = vw * scale;
  const h = vh * scale;
  const x = (ev.clientX - rect.left - (rect.width - w) / 2) / w;
  const y = (ev.clientY - rect.top - (rect.height - h) / 2) / h;
  if (x < 0 || x > 1 || y < 0 || y > 1) return null;
  return { x: Math.round(x * 65535), y: Math.round(y * 65535) };
}

const video = $('#remote');
video.addEventListener('mousemove', (ev) => {
  if (!session?.controlling) return;
  const p = screenPoint(video, ev);
  if (p) sendInput({ kind: 'move', ...p });
});
for (const [type, down] of [['mousedown', true], ['mouseup', false]]) {
  video.addEventListener(type, (ev) => {
    if (!session?.controlling) return;
    ev.preventDefault();
    video.focus();
    const p = screenPoint(video, ev);
    if (p) sendInput({ kind: 'move', ...p });
    if (ev.button <= 4) sendInput({ kind: 'button', button: ev.button, down });
  });
}
video.addEventListener('contextmenu', (ev) => { if (session?.controlling) ev.preventDefault(); });
video.addEventListener('wheel', (ev) => {
  if (!session?.controlling) return;
  ev.preventDefault();
  const clamp = (v) => Math.max(-32768, Math.min(32767, Math.round(v)));
  sendInput({ kind: 'wheel', dx: clamp(ev.deltaX), dy: clamp(ev.deltaY) });
}, { passive: false });
for (const [type, down] of [['keydown', true], ['keyup', false]]) {
  video.addEventListener(type, (ev) => {
    if (!session?.controlling) return;
    const usage = hidUsage(ev.code);
    if (usage === undefined) return;
    ev.preventDefault();
    sendInput({ kind: 'key', code: usage, down, modifiers: modifiersOf(ev) });
  });
}
video.addEventListener('blur', () => { if (session?.controlling) $('#control-hint').textContent = 'Control is on: click the screen to type again.'; });
video.addEventListener('focus', () => { if (session?.controlling) $('#control-hint').textContent = 'Control is on: press Release control to stop.'; });

// For tests and scripting: the state of the page, and input sent as is (the relay, not
// this page, must refuse it from a view-only agent).
window.__console = {
  sendInput,
  framesDecoded: () => framesDecoded(session?.conn.pc),
  /** Frames decoded on the current peer connection, as of the last half second. */
  decoded: () => (session?.decoded && session.decoded.pc === session.conn?.pc ? session.decoded.n : 0),
  inputOpen: () => session?.input?.readyState === 'open',
  you: () => session?.you,
  sessionId: () => session?.sid,
  /** The session's connection (its peer connection, ICE restarts, redirects followed). */
  connection: () => session?.conn,
};

// ---------------------------------------------------------------------------------
// Start: a token from the address bar (then removed from it) or from this tab's storage
// ---------------------------------------------------------------------------------

const fromUrl = params.get('token');
if (fromUrl || location.hash) history.replaceState(null, '', '/agent');
const remembered = fromUrl || sessionStorage.getItem('relay-agent-token');
if (remembered) {
  $('#token').value = remembered;
  signIn(remembered);
}
