// The operator console: log in, then one server-sent event stream of the
// field's snapshot (once per second), rendered into panels. Every value
// shows its age; nothing here is fetched from anywhere but this rack.

const $ = (id) => document.getElementById(id);
const esc = (v) => String(v ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
let csrf = '';
let role = '';
let snap = null;
let receivedAt = 0;
let source = null;

function ago(s) {
  if (s == null || Number.isNaN(s)) return '—';
  if (s < 1) return 'now';
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}
function dur(s) {
  if (s == null) return '—';
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
function bytes(n) {
  if (n == null) return '—';
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(0)} kB`;
  return `${n} B`;
}
const sinceReceipt = () => (Date.now() - receivedAt) / 1000;
// 24-hour, so a time is one short column whatever the browser's locale.
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23' });

async function post(path, body) {
  const r = await fetch(path, {
    method: 'POST', headers: { 'content-type': 'application/json', 'x-csrf-token': csrf }, body: JSON.stringify(body || {}),
  });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(j.error || `${r.status}`);
  return j;
}

function showLogin(msg) {
  $('dash').hidden = true; $('logout').hidden = true; $('login-view').hidden = false;
  $('whoami').textContent = ''; $('live').textContent = 'logged out'; $('live').className = 'badge warn';
  $('login-error').textContent = msg || '';
  document.body.dataset.view = 'login';
  if (source) { source.close(); source = null; }
}

function showDash(s) {
  csrf = s.csrf; role = s.role;
  $('login-view').hidden = true; $('dash').hidden = false; $('logout').hidden = false;
  $('whoami').textContent = `rack ${s.rack} · ${role === 'operator' ? 'operator' : 'read-only'}`;
  document.body.dataset.view = 'dash';
  connect();
  loadDrills();
}

function connect() {
  if (source) source.close();
  source = new EventSource('/console/api/stream');
  source.onmessage = (e) => { snap = JSON.parse(e.data); receivedAt = Date.now(); render(); };
  source.onerror = async () => {
    $('live').textContent = 'reconnecting…'; $('live').className = 'badge bad';
    const r = await fetch('/console/api/session', { cache: 'no-store' }).catch(() => null);
    if (r && r.status === 401) showLogin('Session ended: log in again.');
  };
}

function racksOf(st) {
  const me = { rack: st.rack, state: 'alive', rtt_ms: 0, last_seen_s: 0, power: st.power, self: true, site: st.site, role: st.role };
  return [me, ...st.peers.filter((p) => p.rack)].sort((a, b) => a.rack.localeCompare(b.rack));
}

function powerText(p) {
  if (!p) return 'power unknown';
  const parts = [p.source || '?'];
  if (p.battery_runtime_s != null) parts.push(`battery ${dur(p.battery_runtime_s)}`);
  if (p.battery_charge_pct != null) parts.push(`${Math.round(p.battery_charge_pct)}%`);
  if (p.fuel_pct != null) parts.push(`fuel ${Math.round(p.fuel_pct)}%`);
  return parts.join(' · ');
}

function renderRacks(st) {
  const el = document.querySelector('#field .racks');
  el.innerHTML = racksOf(st).map((p) => {
    const seen = p.self ? 'this rack' : `heard ${ago((p.last_seen_s ?? NaN) + sinceReceipt())}`;
    const rtt = p.self ? '' : `<div>RTT ${p.rtt_ms != null ? `${p.rtt_ms.toFixed(1)} ms` : '—'} · ${p.connected ? 'link up' : 'no link'}</div>`;
    const dying = p.power && p.power.dying ? '<div class="st failed">POWER DYING</div>' : '';
    return `<div class="rack ${esc(p.state)}" data-rack="${esc(p.rack)}" data-state="${esc(p.state)}">
      <div class="name">${esc(p.rack)} <span class="state">${esc(p.state)}</span></div>
      <div class="facts">${rtt}<div>${esc(seen)}${p.self ? '' : ` · ${esc(p.state)} for ${dur(p.state_since_s + sinceReceipt())}`}</div>
      <div>${esc(powerText(p.power))}</div>${dying}</div></div>`;
  }).join('');
}

// The move target an operator picked, per appliance: the table is drawn
// again on every update, and must not undo the choice.
const moveChoice = {};
document.addEventListener('change', (e) => {
  const s = e.target.closest('select[data-move-to]');
  if (s) moveChoice[s.dataset.moveTo] = s.value;
});

function renderApps(st) {
  // Not while the operator has a move target list open: drawing the
  // table again would close it under their pointer.
  if (document.activeElement && document.activeElement.matches('#apps select')) return;
  const racks = racksOf(st).filter((r) => r.role !== 'witness').map((r) => r.rack);
  const apps = st.appliances || [];
  const op = role === 'operator';
  const rows = apps.map((a) => {
    const moveTo = racks.filter((r) => r !== a.owner).map((r) => `<option${moveChoice[a.name] === r ? ' selected' : ''}>${esc(r)}</option>`).join('');
    const actions = op ? `<td class="actions">
      <button data-act="${a.state === 'stopped' ? 'start' : 'stop'}" data-app="${esc(a.name)}">${a.state === 'stopped' ? 'Start' : 'Stop'}</button>
      <select data-move-to="${esc(a.name)}" aria-label="Move ${esc(a.name)} to">${moveTo}</select>
      <button data-act="move" data-app="${esc(a.name)}">Move</button></td>` : '';
    return `<tr data-app="${esc(a.name)}" data-owner="${esc(a.owner)}"><td><b>${esc(a.name)}</b></td><td>${esc(a.owner || '—')}</td>
      <td class="st ${esc(a.state)}">${esc(a.state)}</td><td class="hide-narrow">${esc(a.tier)}</td><td class="hide-narrow">${esc(a.epoch)}</td>
      <td>${a.since_s != null ? `for ${dur(a.since_s + sinceReceipt())}` : '—'}${a.reason ? ` · ${esc(a.reason)}` : ''}</td>${actions}</tr>`;
  }).join('');
  document.querySelector('#apps .body').innerHTML = apps.length
    ? `<div class="table-wrap"><table><tr><th>Name</th><th>Owner</th><th>State</th><th class="hide-narrow">Tier</th><th class="hide-narrow">Epoch</th><th>Since</th>${op ? '<th></th>' : ''}</tr>${rows}</table></div>`
    : '<p class="muted">No appliances deployed.</p>';
}

function renderVolumes(st) {
  const vols = st.volumes || [];
  document.querySelector('#volumes .body').innerHTML = vols.length ? `<div class="table-wrap"><table>
    <tr><th>Volume</th><th>Owner</th><th>Replicas</th><th>RPO</th><th>Left</th></tr>
    ${vols.map((v) => {
      const lag = (v.replicas || []).map((r) => `${esc(r.rack)}${r.lag_s != null ? ` (${dur(r.lag_s)})` : ''}`).join(', ') || '—';
      const left = v.bytes_waiting ? `${bytes(v.bytes_waiting)}${v.eta_s != null ? `, ETA ${dur(v.eta_s)}` : ''}` : 'in sync';
      return `<tr><td><b>${esc(v.name)}</b></td><td>${esc(v.owner || '—')}</td><td>${lag}</td><td>${v.rpo_s != null ? dur(v.rpo_s) : '—'}</td><td>${esc(left)}</td></tr>`;
    }).join('')}</table></div>` : '<p class="muted">No volumes on this rack.</p>';
}

function majority(st) {
  const c = st.control;
  if (!c || !c.voters || !c.voters.length) return null;
  const alive = new Set(racksOf(st).filter((r) => r.state === 'alive').map((r) => r.rack));
  const up = c.voters.filter((v) => alive.has(v)).length;
  return { up, total: c.voters.length, ok: up * 2 > c.voters.length };
}

function renderControl(st) {
  const c = st.control;
  const m = majority(st);
  document.querySelector('#control .body').innerHTML = c ? `<dl class="kv">
    <dt>Leader</dt><dd>${esc(c.leader || 'none')}</dd><dt>Term</dt><dd>${esc(c.term)}</dd>
    <dt>This rack</dt><dd>${esc(c.role)}</dd><dt>Voters</dt><dd>${esc((c.voters || []).join(', '))}</dd>
    <dt>Majority</dt><dd class="st ${m && m.ok ? 'running' : 'failed'}">${m ? `${m.ok ? 'reachable' : 'NOT reachable'} (${m.up}/${m.total} alive)` : '—'}</dd></dl>` : '<p class="muted">No control plane status.</p>';
  const b = $('banner');
  if (m && !m.ok) { b.hidden = false; b.textContent = `This rack is cut off from the control-plane majority (${m.up} of ${m.total} voters reachable): appliances cannot move until the link returns.`; } else b.hidden = true;
}

function renderCache(st) {
  const c = st.cache;
  document.querySelector('#cache .body').innerHTML = c ? `<dl class="kv">
    <dt>Backhaul</dt><dd class="st ${c.backhaul === 'up' ? 'running' : 'failed'}">${esc(c.backhaul)}</dd>
    <dt>Hit ratio</dt><dd>${c.hit_ratio != null ? `${(c.hit_ratio * 100).toFixed(0)}%` : '—'}</dd>
    <dt>Objects</dt><dd>${esc(c.objects)}</dd><dt>Held</dt><dd>${bytes(c.bytes ?? c.stored_bytes)}</dd>
    <dt>Budget left</dt><dd>${c.budget_left_bytes != null ? bytes(c.budget_left_bytes) : 'unlimited'}</dd></dl>` : '<p class="muted">This rack runs no cache.</p>';
}

function timelineItems(s) {
  const items = [];
  const seenFailover = new Set();
  for (const e of s.events) {
    const d = e.detail || {};
    if (e.kind === 'failover') {
      seenFailover.add(`${d.appliance}/${d.epoch}`);
      const t0 = d.detected_ms ?? d.decided_ms;
      const step = (k) => (d[k] != null && t0 != null ? `+${((d[k] - t0) / 1000).toFixed(1)} s` : '—');
      items.push({ at: e.at_ms, cls: 'failover', html: `<b>Failover</b> ${esc(d.appliance)}: ${esc(d.from)} → ${esc(d.to)} (${esc(d.reason)})
        <div class="timings">detected ${d.detected_ms ? clock(d.detected_ms) : '—'} · decided ${step('decided_ms')} · started ${step('started_ms')} · healthy ${step('healthy_ms')}</div>` });
    } else if (e.kind === 'peer_state' || e.kind.startsWith('peer')) {
      items.push({ at: e.at_ms, cls: e.kind, html: `<b>${esc(d.rack || d.peer || 'rack')}</b> is ${esc(d.to || e.kind)}${d.from ? ` (was ${esc(d.from)})` : ''}` });
    } else {
      items.push({ at: e.at_ms, cls: e.kind, html: `<b>${esc(e.kind.replace(/_/g, ' '))}</b> ${esc(Object.entries(d).filter(([k]) => k !== 'peer_id').map(([k, v]) => `${k}=${typeof v === 'object' ? JSON.stringify(v) : v}`).join(' '))}` });
    }
  }
  for (const t of s.transfers) {
    if (!t.from || seenFailover.has(`${t.appliance}/${t.epoch}`) || t.reason === 'placed') continue;
    const dec = t.detected_ms != null ? ` · decided +${((t.decided_ms - t.detected_ms) / 1000).toFixed(1)} s` : '';
    items.push({ at: t.decided_ms, cls: t.reason === 'failover' ? 'failover' : 'transfer', html: `<b>${t.reason === 'failover' ? 'Failover' : esc(t.reason)}</b> ${esc(t.appliance)}: ${esc(t.from)} → ${esc(t.owner)} (epoch ${esc(t.epoch)})
      <div class="timings">detected ${t.detected_ms ? clock(t.detected_ms) : '—'}${dec}</div>` });
  }
  return items.sort((a, b) => b.at - a.at).slice(0, 80);
}

function renderTimeline(s) {
  document.querySelector('#timeline .body').innerHTML = timelineItems(s).map((i) => `<li class="${esc(i.cls)}" data-kind="${esc(i.cls)}"><span class="when">${clock(i.at)}</span><span class="what">${i.html}</span></li>`).join('') || '<li class="muted">Nothing yet.</li>';
}

// Drill reports (kept on every rack): fetched when the dashboard opens,
// then every 10 s; each links to its timeline chart.
let drillsAt = 0;
async function loadDrills() {
  if (document.body.dataset.view !== 'dash') return;
  const r = await fetch('/console/api/drills', { cache: 'no-store' }).catch(() => null);
  if (!r || !r.ok) return;
  const { drills } = await r.json();
  drillsAt = Date.now();
  const rows = drills.map((d) => {
    const cls = d.outcome === 'passed' ? 'ok' : 'bad';
    const secs = (d.ended_ms - d.started_ms) / 1000;
    const failed = d.targets_failed ? ` · ${d.targets_failed} of ${d.targets} targets failed` : '';
    return `<tr data-drill="${esc(d.id)}"><td class="when">${clock(d.started_ms)}</td><td><b>${esc(d.scenario)}</b><br><span class="muted">from ${esc(d.controller)}${esc(failed)}</span></td>`
      + `<td><span class="badge ${cls}">${esc(d.outcome)}</span></td><td>${dur(secs)}</td>`
      + `<td><a href="/console/api/drills/${encodeURIComponent(d.id)}" target="_blank" rel="noopener">Timeline</a></td></tr>`;
  }).join('');
  document.querySelector('#drills .body').innerHTML = rows
    ? `<div class="table-wrap"><table><thead><tr><th>Started</th><th>Drill</th><th>Outcome</th><th>Took</th><th></th></tr></thead><tbody>${rows}</tbody></table></div>`
    : '<p class="muted">No drill has run in this field yet (<code>fieldrack drill run</code>).</p>';
}
setInterval(loadDrills, 10000);

function renderAges() {
  const da = document.querySelector('.drills-age');
  if (da) da.textContent = drillsAt ? `updated ${ago((Date.now() - drillsAt) / 1000)}` : '';
  const age = snap ? `updated ${ago(sinceReceipt())}` : '';
  for (const el of document.querySelectorAll('.card .age:not(.drills-age)')) el.textContent = age;
  const live = $('live');
  if (!snap) return;
  if (sinceReceipt() > 3) { live.textContent = `stale: ${ago(sinceReceipt())}`; live.className = 'badge bad'; } else { live.textContent = 'live'; live.className = 'badge ok'; }
}

function render() {
  if (!snap || !snap.status) return;
  const st = snap.status;
  renderRacks(st); renderApps(st); renderVolumes(st); renderControl(st); renderCache(st); renderTimeline(snap); renderAges();
  document.body.dataset.seq = snap.seq;
}

document.addEventListener('click', async (e) => {
  const b = e.target.closest('button[data-act]');
  if (!b) return;
  const app = b.dataset.app; const act = b.dataset.act;
  const body = act === 'move' ? { to: document.querySelector(`select[data-move-to="${CSS.escape(app)}"]`).value } : {};
  b.disabled = true;
  try { await post(`/console/api/apps/${encodeURIComponent(app)}/${act}`, body); b.textContent = 'Sent ✓'; } catch (err) { alert(`${act} ${app}: ${err.message}`); } finally { setTimeout(() => { b.disabled = false; }, 1500); }
});

$('login').addEventListener('submit', async (e) => {
  e.preventDefault();
  try {
    const r = await fetch('/console/api/login', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ secret: $('secret').value }) });
    const j = await r.json();
    if (!r.ok) { $('login-error').textContent = j.error || 'Login failed'; return; }
    $('secret').value = '';
    showDash(j);
  } catch (err) { $('login-error').textContent = err.message; }
});

$('logout').addEventListener('click', async () => { await post('/console/api/logout').catch(() => {}); snap = null; showLogin(); });

setInterval(renderAges, 1000);
fetch('/console/api/session', { cache: 'no-store' }).then(async (r) => (r.ok ? showDash(await r.json()) : showLogin())).catch(() => showLogin('Rack unreachable'));
