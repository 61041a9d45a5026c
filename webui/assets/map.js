// The offline map viewer: the rack's own tiles, which areas it holds, and
// "save this area". Every request goes to the rack that served this page.
/* global L */

const $ = (id) => document.getElementById(id);
const getJson = async (path) => {
  const r = await fetch(path, { cache: 'no-store' });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
};

const RASTER = new Set(['png', 'jpg', 'jpeg', 'webp']);
const map = L.map('map', { zoomControl: true, worldCopyJump: true });
map.attributionControl.setPrefix(false);
const coverageLayer = L.layerGroup().addTo(map);
// For the browser tests and a curious operator's devtools.
window.fieldrackMap = map;
let sources = [];
let current = null;
let layer = null;

function viewFromHash() {
  const m = location.hash.match(/^#(\d+)\/(-?[\d.]+)\/(-?[\d.]+)/);
  return m ? { z: +m[1], lat: +m[2], lon: +m[3] } : null;
}

function saveView() {
  const c = map.getCenter();
  const h = `#${map.getZoom()}/${c.lat.toFixed(5)}/${c.lng.toFixed(5)}`;
  history.replaceState(null, '', h);
  try { localStorage.setItem('fieldrack-map-view', h); } catch (_) { /* private mode */ }
}

function useSource(name) {
  current = sources.find((s) => s.name === name) || sources[0];
  if (!current) return;
  if (layer) map.removeLayer(layer);
  layer = L.tileLayer(current.tiles[0], {
    minZoom: current.minzoom, maxZoom: current.maxzoom,
    attribution: current.attribution, crossOrigin: false,
  }).addTo(map);
  map.setMinZoom(current.minzoom); map.setMaxZoom(current.maxzoom);
  try { localStorage.setItem('fieldrack-map-source', current.name); } catch (_) { /* private mode */ }
  refreshCoverage();
}

function bboxParam(b) {
  return [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()].map((v) => v.toFixed(6)).join(',');
}

function tileBounds(z, x, y) {
  const n = 2 ** z;
  const lon = (v) => v / n * 360 - 180;
  const lat = (v) => Math.atan(Math.sinh(Math.PI * (1 - 2 * v / n))) * 180 / Math.PI;
  return [[lat(y + 1), lon(x)], [lat(y), lon(x + 1)]];
}

let coverageSeq = 0;
async function refreshCoverage() {
  coverageLayer.clearLayers();
  if (!current || !$('coverage').checked) return;
  const seq = ++coverageSeq;
  const z = map.getZoom();
  const q = new URLSearchParams({ source: current.name, z, bbox: bboxParam(map.getBounds()) });
  try {
    const c = await getJson(`/map/api/coverage?${q}`);
    if (seq !== coverageSeq) return;
    if (c.too_many) { $('legend-text').textContent = 'Zoom in to see what is held:'; return; }
    $('legend-text').textContent = `Works offline (${c.tiles.length} tiles in view held):`;
    for (const [x, y, pinned] of c.tiles) {
      L.rectangle(tileBounds(c.z, x, y), {
        // A light tint in a colour no map feature uses (parks are green).
        stroke: false, fillColor: pinned ? '#7b1fa2' : '#0b57d0', fillOpacity: 0.06, interactive: false,
      }).addTo(coverageLayer);
    }
  } catch (e) { $('legend-text').textContent = 'Coverage unavailable'; console.warn(e); }
}

async function refreshState() {
  try {
    const s = await getJson('/map/api/state');
    const b = $('badge');
    b.textContent = s.backhaul_up ? `${s.rack}: online` : `${s.rack}: OFFLINE — maps from this rack only`;
    b.className = `badge ${s.backhaul_up ? 'ok' : 'bad'}`;
  } catch (_) {
    $('badge').textContent = 'rack unreachable'; $('badge').className = 'badge bad';
  }
}

function fmtBytes(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(1)} GB`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(1)} MB`;
  return `${Math.max(1, Math.round(n / 1e3))} kB`;
}

async function estimateSave() {
  const maxz = +$('save-max').value;
  const q = new URLSearchParams({ source: current.name, bbox: bboxParam(map.getBounds()), minzoom: current.minzoom, maxzoom: maxz });
  const dl = $('save-download');
  dl.hidden = true;
  $('save-estimate').textContent = 'Estimating…';
  try {
    const e = await getJson(`/map/api/estimate?${q}`);
    if (!e.allowed) {
      $('save-estimate').innerHTML = `<span class="big">${e.tiles.toLocaleString()} tiles</span><br>Too large (limit ${e.max_tiles.toLocaleString()}): zoom in or lower the deepest zoom.`;
      return;
    }
    $('save-estimate').innerHTML = `<span class="big">about ${fmtBytes(e.bytes_estimate)}</span><br>${e.held.toLocaleString()} of ${e.tiles.toLocaleString()} tiles are held on this rack (zoom ${e.minzoom}–${e.maxzoom}).`;
    if (e.held > 0) {
      dl.href = `/map/api/export.mbtiles?${q}`;
      dl.download = `${current.name}-area.mbtiles`;
      dl.hidden = false;
    }
  } catch (err) { $('save-estimate').textContent = `Estimate failed: ${err.message}`; }
}

function openSave() {
  const sel = $('save-max');
  sel.innerHTML = '';
  const z = map.getZoom();
  for (let i = z; i <= Math.min(current.maxzoom, z + 4); i++) {
    const o = document.createElement('option'); o.value = i; o.textContent = i; sel.appendChild(o);
  }
  sel.value = Math.min(current.maxzoom, z + 2);
  $('save-panel').hidden = false;
  estimateSave();
}

async function main() {
  sources = (await getJson('/map/api/sources')).filter((s) => RASTER.has(s.format));
  const picker = $('source');
  for (const s of sources) {
    const o = document.createElement('option'); o.value = s.name; o.textContent = s.name; picker.appendChild(o);
  }
  let saved = null;
  try { saved = localStorage.getItem('fieldrack-map-source'); } catch (_) { /* private mode */ }
  if (saved && sources.some((s) => s.name === saved)) picker.value = saved;
  let v = viewFromHash();
  if (!v) { try { const h = localStorage.getItem('fieldrack-map-view'); if (h) { location.hash = h; v = viewFromHash(); } } catch (_) { /* private mode */ } }
  map.setView(v ? [v.lat, v.lon] : [0, 0], v ? v.z : 2);
  picker.addEventListener('change', () => useSource(picker.value));
  useSource(picker.value);
  map.on('moveend', () => { saveView(); refreshCoverage(); if (!$('save-panel').hidden) openSave(); });
  $('coverage').addEventListener('change', refreshCoverage);
  $('save').addEventListener('click', openSave);
  $('save-max').addEventListener('change', estimateSave);
  $('save-close').addEventListener('click', () => { $('save-panel').hidden = true; });
  refreshState();
  setInterval(refreshState, 5000);
  document.body.dataset.ready = 'true';
}

main().catch((e) => { $('badge').textContent = `map failed: ${e.message}`; $('badge').className = 'badge bad'; });
