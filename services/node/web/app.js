// hexfleet dispatch dashboard: a live map of one node's vehicles.
//
// The node does the geometry: it tells the page which H3 cells are in view,
// sends their outlines, and sends either every vehicle (snapshot, then
// added / moved / removed) or per-cell counts when the view is wide. The page
// projects, draws and keeps its view in sync; it needs no H3 library.
// Zones near the view come with their outlines and live counts; vehicles
// entering and leaving them flash on the map, and the side panel lists the
// zones and the queue of the one selected.
"use strict";

const STATUS_COLOURS = {
  available: "#1a9c4a",
  on_trip: "#2f6fd6",
  off_duty: "#8a8f98",
};
const STATUSES = Object.keys(STATUS_COLOURS);
const TILE_SIZE = 256;
const MIN_ZOOM = 2;
const MAX_ZOOM = 19;
const VIEWPORT_DEBOUNCE_MS = 120;
const FIND_RETRY_MS = 2000;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// ---------------------------------------------------------------- state --

const map = {
  lat: Number(params.get("lat")) || 0,
  lon: Number(params.get("lon")) || 0,
  zoom: Number(params.get("zoom")) || 3,
  placed: params.has("lat") && params.has("lon"),
  width: 0,
  height: 0,
};

const view = {
  subscription: 0, // the latest viewport or filter request sent
  reflected: -1, // the latest request an update or density message reflected
  mode: null, // "vehicles" | "density"
  resolution: null,
  cells: [], // cell ids in view
  vehicles: new Map(), // id -> vehicle
  counts: new Map(), // cell -> {available, on_trip, off_duty}
};

const outlines = new Map(); // cell -> [[lat, lon], ...]
const tiles = new Map(); // "z/x/y" -> Image
let tileUrl = null;
let serverClockOffset = 0; // server ms - browser ms
let selected = null; // id of the vehicle shown in the side panel
let selectedState = null; // its state from `find`, until it is in view
let following = null; // id the map follows
let dirty = true;
let live = false; // connected: otherwise what is drawn may be out of date
const zones = new Map(); // id -> {id, name, kind, polygons, counts}
let flashes = []; // {lat, lon, event, until}
let flashCount = 0;
let selectedZone = null;
const FLASH_MS = 1500;

// ----------------------------------------------------------- projection --

function worldSize(zoom) {
  return TILE_SIZE * Math.pow(2, zoom);
}

function project(lat, lon, zoom) {
  const size = worldSize(zoom);
  const clamped = Math.max(-85.0511, Math.min(85.0511, lat));
  const sin = Math.sin((clamped * Math.PI) / 180);
  return {
    x: ((lon + 180) / 360) * size,
    y: (0.5 - Math.log((1 + sin) / (1 - sin)) / (4 * Math.PI)) * size,
  };
}

function unproject(x, y, zoom) {
  const size = worldSize(zoom);
  const lon = (x / size) * 360 - 180;
  const n = Math.PI - (2 * Math.PI * y) / size;
  const lat = (180 / Math.PI) * Math.atan(Math.sinh(n));
  return { lat, lon };
}

/** Screen position of a point, for the current map. */
function toScreen(lat, lon) {
  const c = project(map.lat, map.lon, map.zoom);
  const p = project(lat, lon, map.zoom);
  return { x: p.x - c.x + map.width / 2, y: p.y - c.y + map.height / 2 };
}

function toLatLon(sx, sy) {
  const c = project(map.lat, map.lon, map.zoom);
  return unproject(c.x + sx - map.width / 2, c.y + sy - map.height / 2, map.zoom);
}

function bbox() {
  const nw = toLatLon(0, 0);
  const se = toLatLon(map.width, map.height);
  const clampLon = (v) => Math.max(-180, Math.min(180, v));
  const clampLat = (v) => Math.max(-85, Math.min(85, v));
  return {
    south: clampLat(se.lat),
    west: clampLon(nw.lon),
    north: clampLat(nw.lat),
    east: clampLon(se.lon),
  };
}

function setCenter(lat, lon) {
  map.lat = Math.max(-85, Math.min(85, lat));
  map.lon = ((((lon + 180) % 360) + 360) % 360) - 180;
}

function zoomAround(newZoom, sx, sy) {
  newZoom = Math.max(MIN_ZOOM, Math.min(MAX_ZOOM, newZoom));
  const anchor = toLatLon(sx, sy);
  map.zoom = newZoom;
  const after = toScreen(anchor.lat, anchor.lon);
  const c = toLatLon(map.width / 2 + (after.x - sx), map.height / 2 + (after.y - sy));
  setCenter(c.lat, c.lon);
  viewChanged();
}

function fit(b) {
  const lat = (b.south + b.north) / 2;
  const lon = (b.west + b.east) / 2;
  let zoom = MAX_ZOOM;
  while (zoom > MIN_ZOOM) {
    const sw = project(b.south, b.west, zoom);
    const ne = project(b.north, b.east, zoom);
    if (Math.abs(ne.x - sw.x) <= map.width * 0.9 && Math.abs(sw.y - ne.y) <= map.height * 0.9) break;
    zoom -= 0.25;
  }
  setCenter(lat, lon);
  map.zoom = zoom;
  viewChanged();
}

// ----------------------------------------------------------- connection --

let socket = null;
let retryDelay = 500;
let viewportTimer = null;

function token() {
  return params.get("token") || sessionStorage.getItem("hexfleet-token");
}

function setConnection(state, text) {
  const el = $("connection");
  el.dataset.state = state;
  el.textContent = text;
}

function notice(text) {
  const el = $("notice");
  el.textContent = text;
  el.hidden = !text;
  if (text) setTimeout(() => { if (el.textContent === text) el.hidden = true; }, 5000);
}

function connect() {
  const t = token();
  if (!t) {
    setConnection("closed", "no token");
    $("token-form").hidden = false;
    return;
  }
  $("token-form").hidden = true;
  setConnection("connecting", "connecting…");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  socket = new WebSocket(`${scheme}://${location.host}/v1/ws?token=${encodeURIComponent(t)}`);
  socket.onopen = () => {
    retryDelay = 500;
    live = true;
    dirty = true;
    setConnection("live", "live");
  };
  socket.onmessage = (event) => {
    let message;
    try {
      message = JSON.parse(event.data);
    } catch (e) {
      console.error("unreadable message", e);
      return;
    }
    handle(message);
  };
  socket.onclose = (event) => {
    socket = null;
    live = false;
    dirty = true;
    if (event.code === 4401) {
      setConnection("closed", "unauthorized");
      notice(event.reason || "the token was refused");
      sessionStorage.removeItem("hexfleet-token");
      $("token-form").hidden = false;
      return;
    }
    const seconds = (retryDelay / 1000).toFixed(1);
    setConnection("reconnecting", `reconnecting in ${seconds}s`);
    if (event.reason) notice(`connection closed: ${event.reason}`);
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 8000);
  };
}

function send(request) {
  if (socket && socket.readyState === WebSocket.OPEN) {
    socket.send(JSON.stringify(request));
  }
}

function currentFilter() {
  const checked = (id) =>
    [...document.querySelectorAll(`#${id} input:checked`)].map((i) => i.value);
  const all = (id) => document.querySelectorAll(`#${id} input`).length;
  const statuses = checked("status-filter");
  const classes = checked("class-filter");
  // Everything ticked means "any", which also covers kinds added later.
  return {
    statuses: statuses.length === all("status-filter") ? [] : statuses,
    classes: classes.length === all("class-filter") ? [] : classes,
  };
}

function sendViewport() {
  viewportTimer = null;
  view.subscription += 1;
  send({
    type: "viewport",
    id: view.subscription,
    bbox: bbox(),
    zoom: map.zoom,
    filter: currentFilter(),
  });
}

function viewChanged() {
  dirty = true;
  if (viewportTimer === null) viewportTimer = setTimeout(sendViewport, VIEWPORT_DEBOUNCE_MS);
}

// ------------------------------------------------------------- messages --

function handle(m) {
  switch (m.type) {
    case "hello":
      serverClockOffset = m.server_time_ms - Date.now();
      tileUrl = m.tile_url || null;
      $("attribution").textContent = tileUrl ? `tiles: ${new URL(tileUrl.replace(/[{}]/g, ""), location.href).host}` : `node ${m.node}`;
      if (!map.placed && m.fleet_bounds) {
        map.placed = true;
        fit(m.fleet_bounds);
      }
      sendViewport();
      if (following) find(following);
      break;
    case "view":
      // Vehicle deltas from the old view follow; counts come as a snapshot.
      if (m.mode !== view.mode) view.vehicles.clear();
      view.counts.clear();
      view.mode = m.mode;
      view.resolution = m.resolution;
      view.cells = m.cells;
      dirty = true;
      break;
    case "outlines":
      for (const o of m.outlines) outlines.set(o.cell, o.boundary);
      dirty = true;
      break;
    case "update":
      applyUpdate(m);
      break;
    case "density":
      view.reflected = m.subscription;
      if (m.snapshot) view.counts.clear();
      for (const c of m.cells) {
        if (c.available + c.on_trip + c.off_duty === 0) view.counts.delete(c.cell);
        else view.counts.set(c.cell, c);
      }
      dirty = true;
      break;
    case "found":
      found(m);
      break;
    case "zones":
      zones.clear();
      for (const z of m.zones) zones.set(z.id, z);
      showZones();
      dirty = true;
      break;
    case "zone_counts":
      for (const c of m.zones) {
        const z = zones.get(c.zone);
        if (z) z.counts = c;
      }
      showZones();
      dirty = true;
      break;
    case "zone_event":
      flashCount += 1;
      $("zone-list").dataset.flashes = String(flashCount);
      flashes.push({ lat: m.lat, lon: m.lon, event: m.event, until: performance.now() + FLASH_MS });
      dirty = true;
      break;
    case "queue":
      showQueue(m);
      break;
    case "error":
      notice(m.reason);
      break;
  }
}

function applyUpdate(m) {
  view.reflected = m.subscription;
  if (m.snapshot) view.vehicles.clear();
  for (const r of m.removed) view.vehicles.delete(r.id);
  for (const v of m.added) view.vehicles.set(v.id, v);
  for (const mv of m.moved) {
    const v = view.vehicles.get(mv.id);
    if (!v) continue;
    v.lat = mv.lat;
    v.lon = mv.lon;
    v.heading_deg = mv.heading_deg;
    v.speed_mps = mv.speed_mps;
    v.fix_time_ms = mv.fix_time_ms;
    v.seen_ms = mv.seen_ms;
  }
  if (following && view.vehicles.has(following)) {
    const v = view.vehicles.get(following);
    const p = toScreen(v.lat, v.lon);
    // Re-centre once it drifts, not on every fix: fewer viewport changes.
    if (Math.abs(p.x - map.width / 2) > map.width / 8 || Math.abs(p.y - map.height / 2) > map.height / 8) {
      setCenter(v.lat, v.lon);
      viewChanged();
    }
  }
  dirty = true;
}

// ----------------------------------------------------------- find/follow --

function find(id) {
  send({ type: "find", id });
}

function found(m) {
  const result = $("search-result");
  if (!m.vehicle) {
    result.textContent = `${m.id} is not live on this node`;
    return;
  }
  const v = m.vehicle;
  result.textContent = `${v.id}: ${v.status.replace("_", " ")}, ${v.class}`;
  select(v.id, v);
  if ($("follow").checked) following = v.id;
  map.placed = true;
  if (map.zoom < 15) map.zoom = 16;
  setCenter(v.lat, v.lon);
  viewChanged();
}

function select(id, state) {
  selected = id;
  selectedState = state || null;
  $("details").hidden = false;
  showDetails();
  dirty = true;
}

function showDetails() {
  if (!selected) return;
  const v = view.vehicles.get(selected) || selectedState;
  $("detail-id").textContent = selected;
  if (!v) {
    $("detail-status").textContent = "out of view";
    return;
  }
  const age = (Date.now() + serverClockOffset - v.fix_time_ms) / 1000;
  $("detail-class").textContent = v.class;
  $("detail-status").textContent = v.status.replace("_", " ");
  $("detail-speed").textContent = `${(v.speed_mps * 3.6).toFixed(0)} km/h`;
  $("detail-heading").textContent = `${Math.round(v.heading_deg)}°`;
  $("detail-age").textContent = age < 1 ? "just now" : `${age.toFixed(0)} s ago`;
  $("detail-position").textContent = `${v.lat.toFixed(5)}, ${v.lon.toFixed(5)}`;
  $("detail-clock").textContent = clockText(v.clock_offset_ms);
}

// How far off a driver's phone clock is (node minus phone, ms; its fix
// times are in node time either way).
function clockText(offsetMs) {
  if (!offsetMs || Math.abs(offsetMs) < 1000) return "right";
  const s = Math.abs(offsetMs) / 1000;
  const size =
    s < 120 ? `${Math.round(s)} s`
    : s < 7200 ? `${Math.round(s / 60)} min`
    : s < 172800 ? `${Math.round(s / 3600)} h`
    : `${Math.round(s / 86400)} d`;
  return `${size} ${offsetMs < 0 ? "ahead" : "behind"}`;
}

// -------------------------------------------------------------- drawing --

const canvas = $("canvas");
const ctx = canvas.getContext("2d");

function resize() {
  const rect = canvas.getBoundingClientRect();
  const ratio = window.devicePixelRatio || 1;
  map.width = rect.width;
  map.height = rect.height;
  canvas.width = Math.round(rect.width * ratio);
  canvas.height = Math.round(rect.height * ratio);
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  viewChanged();
}

function drawTiles() {
  if (!tileUrl) return;
  const z = Math.max(0, Math.min(MAX_ZOOM, Math.round(map.zoom)));
  const scale = Math.pow(2, map.zoom - z);
  const c = project(map.lat, map.lon, z);
  const left = c.x - map.width / 2 / scale;
  const top = c.y - map.height / 2 / scale;
  const count = Math.pow(2, z);
  for (let tx = Math.floor(left / TILE_SIZE); tx <= Math.floor((left + map.width / scale) / TILE_SIZE); tx++) {
    for (let ty = Math.max(0, Math.floor(top / TILE_SIZE)); ty <= Math.min(count - 1, Math.floor((top + map.height / scale) / TILE_SIZE)); ty++) {
      const x = ((tx % count) + count) % count;
      const key = `${z}/${x}/${ty}`;
      let img = tiles.get(key);
      if (!img) {
        img = new Image();
        img.onload = () => { dirty = true; };
        img.src = tileUrl.replace("{z}", z).replace("{x}", x).replace("{y}", ty);
        tiles.set(key, img);
        if (tiles.size > 512) tiles.delete(tiles.keys().next().value);
      }
      if (img.complete && img.naturalWidth) {
        const size = TILE_SIZE * scale;
        ctx.drawImage(img, (tx * TILE_SIZE - left) * scale, (ty * TILE_SIZE - top) * scale, size, size);
      }
    }
  }
}

function cellPath(cell) {
  const boundary = outlines.get(cell);
  if (!boundary) return false;
  ctx.beginPath();
  boundary.forEach(([lat, lon], i) => {
    const p = toScreen(lat, lon);
    if (i === 0) ctx.moveTo(p.x, p.y);
    else ctx.lineTo(p.x, p.y);
  });
  ctx.closePath();
  return true;
}

function drawCells() {
  if (view.mode === "density") {
    let max = 1;
    for (const c of view.counts.values()) max = Math.max(max, c.available + c.on_trip + c.off_duty);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    for (const cell of view.cells) {
      if (!cellPath(cell)) continue;
      const c = view.counts.get(cell);
      const total = c ? c.available + c.on_trip + c.off_duty : 0;
      if (total > 0) {
        // Shade by how many, tinted by how many are free.
        const share = c.available / total;
        ctx.fillStyle = `rgba(${Math.round(47 + (26 - 47) * share)}, ${Math.round(111 + (156 - 111) * share)}, ${Math.round(214 + (74 - 214) * share)}, ${0.15 + 0.6 * Math.sqrt(total / max)})`;
        ctx.fill();
      }
      ctx.strokeStyle = "rgba(40, 50, 70, 0.35)";
      ctx.lineWidth = 1;
      ctx.stroke();
      if (total > 0) {
        const boundary = outlines.get(cell);
        const centre = boundary.reduce((a, [lat, lon]) => ({ lat: a.lat + lat / boundary.length, lon: a.lon + lon / boundary.length }), { lat: 0, lon: 0 });
        const p = toScreen(centre.lat, centre.lon);
        const q = toScreen(boundary[0][0], boundary[0][1]);
        if (Math.hypot(p.x - q.x, p.y - q.y) > 18) {
          ctx.fillStyle = "#10151c";
          ctx.fillText(String(total), p.x, p.y);
        }
      }
    }
  } else if (view.mode === "vehicles") {
    ctx.strokeStyle = "rgba(60, 70, 90, 0.18)";
    ctx.lineWidth = 1;
    for (const cell of view.cells) {
      if (cellPath(cell)) ctx.stroke();
    }
  }
}

function zoneTotal(z) {
  return z.counts.available + z.counts.on_trip + z.counts.off_duty;
}

function drawZones() {
  let drawn = 0;
  ctx.font = "12px system-ui, sans-serif";
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  for (const z of zones.values()) {
    ctx.beginPath();
    let sx = 0, sy = 0, n = 0;
    for (const polygon of z.polygons) {
      polygon.forEach((ring, r) => {
        ring.forEach(([lat, lon], i) => {
          const p = toScreen(lat, lon);
          if (i === 0) ctx.moveTo(p.x, p.y);
          else ctx.lineTo(p.x, p.y);
          if (r === 0) { sx += p.x; sy += p.y; n += 1; }
        });
        ctx.closePath();
      });
    }
    const chosen = z.id === selectedZone;
    ctx.fillStyle = chosen ? "rgba(240, 180, 41, 0.22)" : "rgba(122, 72, 196, 0.12)";
    ctx.fill("evenodd");
    ctx.strokeStyle = chosen ? "#d99a06" : "rgba(122, 72, 196, 0.8)";
    ctx.lineWidth = chosen ? 3 : 2;
    ctx.stroke();
    drawn += 1;
    if (n > 0) {
      ctx.fillStyle = "#3b2466";
      ctx.fillText(`${z.name} · ${zoneTotal(z)}`, sx / n, sy / n);
    }
  }
  $("zone-list").dataset.drawn = String(drawn);
}

function drawFlashes() {
  const now = performance.now();
  flashes = flashes.filter((f) => f.until > now);
  for (const f of flashes) {
    const left = (f.until - now) / FLASH_MS;
    const p = toScreen(f.lat, f.lon);
    ctx.beginPath();
    ctx.arc(p.x, p.y, 8 + 22 * (1 - left), 0, 2 * Math.PI);
    ctx.strokeStyle = f.event === "entered" ? `rgba(26, 156, 74, ${left})` : `rgba(214, 47, 47, ${left})`;
    ctx.lineWidth = 3;
    ctx.stroke();
  }
  // Flashes fade: keep drawing while any is on.
  if (flashes.length > 0) dirty = true;
}

function zoneLine(z) {
  return `${zoneTotal(z)} · ${z.counts.available} free`;
}

function showZones() {
  const list = $("zone-list");
  const items = [...zones.values()].sort((a, b) => a.name.localeCompare(b.name));
  // The same zones as listed: update the lines in place (a click on one
  // must not land on a line just replaced).
  const listed = [...list.children].map((li) => li.dataset.zone);
  if (listed.length === items.length && items.every((z, i) => listed[i] === z.id)) {
    items.forEach((z, i) => {
      const li = list.children[i];
      li.className = z.id === selectedZone ? "selected" : "";
      li.querySelector(".n").textContent = zoneLine(z);
    });
    return;
  }
  list.replaceChildren();
  if (items.length === 0) {
    const li = document.createElement("li");
    li.className = "empty";
    li.textContent = "no zones near the view";
    list.append(li);
  }
  for (const z of items) {
    const li = document.createElement("li");
    li.dataset.zone = z.id;
    li.className = z.id === selectedZone ? "selected" : "";
    const name = document.createElement("span");
    name.textContent = `${z.name} (${z.kind})`;
    const n = document.createElement("span");
    n.className = "n";
    n.textContent = zoneLine(z);
    li.append(name, n);
    li.addEventListener("click", () => {
      selectedZone = selectedZone === z.id ? null : z.id;
      send({ type: "queue", zone: selectedZone || "" });
      $("queue").hidden = selectedZone === null;
      showZones();
      dirty = true;
    });
    list.append(li);
  }
}

function showQueue(m) {
  if (m.zone !== selectedZone) return;
  const z = zones.get(m.zone);
  $("queue-zone").textContent = z ? z.name : m.zone;
  const list = $("queue-list");
  list.replaceChildren();
  for (const v of m.vehicles) {
    const li = document.createElement("li");
    const waited = Math.max(0, Math.round((Date.now() + serverClockOffset - v.entered_ms) / 1000));
    li.textContent = `${v.id} — ${v.status.replace("_", " ")}, ${waited}s`;
    li.dataset.vehicle = v.id;
    list.append(li);
  }
  $("queue").hidden = false;
}

function drawVehicles() {
  let drawn = 0;
  let digest = 0;
  const totals = { available: 0, on_trip: 0, off_duty: 0 };
  const size = Math.max(6, Math.min(11, (map.zoom - 9) * 1.6));
  // Faded while disconnected: positions may be stale.
  ctx.globalAlpha = live ? 1 : 0.35;
  for (const v of view.vehicles.values()) {
    const p = toScreen(v.lat, v.lon);
    if (p.x < -size || p.y < -size || p.x > map.width + size || p.y > map.height + size) continue;
    drawn += 1;
    totals[v.status] += 1;
    digest = (digest + Math.round(v.lat * 1e5) * 31 + Math.round(v.lon * 1e5)) % 1000000007;
    ctx.save();
    ctx.translate(p.x, p.y);
    ctx.rotate((v.heading_deg * Math.PI) / 180);
    ctx.beginPath();
    ctx.moveTo(0, -size);
    ctx.lineTo(size * 0.7, size * 0.8);
    ctx.lineTo(0, size * 0.4);
    ctx.lineTo(-size * 0.7, size * 0.8);
    ctx.closePath();
    ctx.fillStyle = STATUS_COLOURS[v.status] || "#444";
    ctx.fill();
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    ctx.lineWidth = 1;
    ctx.stroke();
    ctx.restore();
    if (v.id === selected) {
      ctx.beginPath();
      ctx.arc(p.x, p.y, size + 6, 0, 2 * Math.PI);
      ctx.strokeStyle = "#f0b429";
      ctx.lineWidth = 3;
      ctx.stroke();
    }
  }
  ctx.globalAlpha = 1;
  const el = $("rendered-count");
  el.textContent = String(drawn);
  el.dataset.count = String(drawn);
  el.dataset.digest = String(digest);
  return totals;
}

/** Whether what is drawn reflects the latest viewport and filter asked for. */
function synced() {
  return viewportTimer === null && view.reflected === view.subscription;
}

function drawScale() {
  // Metres per pixel at the centre, rounded to a friendly length.
  const metresPerPixel = (40075016.686 * Math.cos((map.lat * Math.PI) / 180)) / worldSize(map.zoom);
  const target = metresPerPixel * 100;
  const step = Math.pow(10, Math.floor(Math.log10(target)));
  const nice = [1, 2, 5, 10].map((k) => k * step).filter((m) => m <= target).pop() || step;
  $("scale").textContent = nice >= 1000 ? `${nice / 1000} km` : `${nice} m`;
  $("scale").style.width = `${nice / metresPerPixel}px`;
}

/** Totals by status: of the vehicles drawn, or of the counted cells. */
function updateTotals(drawnTotals) {
  const totals = drawnTotals || { available: 0, on_trip: 0, off_duty: 0 };
  if (view.mode === "density") {
    for (const c of view.counts.values()) for (const s of STATUSES) totals[s] += c[s];
  }
  for (const s of STATUSES) {
    document.querySelector(`#totals tr[data-status="${s}"] .n`).textContent = totals[s].toLocaleString();
  }
  $("total").textContent = (totals.available + totals.on_trip + totals.off_duty).toLocaleString();
  $("mode").textContent = view.mode === "density" ? `counts per cell (res ${view.resolution}); zoom in for vehicles` : view.mode === "vehicles" ? "vehicles" : "—";
}

function render() {
  if (dirty) {
    dirty = false;
    const started = performance.now();
    ctx.clearRect(0, 0, map.width, map.height);
    ctx.fillStyle = "#eef0ea";
    ctx.fillRect(0, 0, map.width, map.height);
    drawTiles();
    drawCells();
    drawZones();
    let drawnTotals = null;
    if (view.mode === "vehicles") drawnTotals = drawVehicles();
    else {
      $("rendered-count").textContent = "0";
      $("rendered-count").dataset.count = "0";
    }
    drawFlashes();
    drawScale();
    updateTotals(drawnTotals);
    // How long a frame takes to draw, for whoever measures the page.
    $("rendered-count").dataset.drawMs = (performance.now() - started).toFixed(2);
    $("rendered-count").dataset.synced = String(synced());
  }
  requestAnimationFrame(render);
}

// ---------------------------------------------------------- interaction --

let drag = null;

canvas.addEventListener("pointerdown", (e) => {
  drag = { x: e.clientX, y: e.clientY, moved: false };
  canvas.setPointerCapture(e.pointerId);
});

canvas.addEventListener("pointermove", (e) => {
  if (!drag) return;
  const dx = e.clientX - drag.x;
  const dy = e.clientY - drag.y;
  if (!drag.moved && Math.hypot(dx, dy) < 3) return;
  drag.moved = true;
  canvas.classList.add("dragging");
  const c = toLatLon(map.width / 2 - dx, map.height / 2 - dy);
  setCenter(c.lat, c.lon);
  drag.x = e.clientX;
  drag.y = e.clientY;
  following = null;
  viewChanged();
});

canvas.addEventListener("pointerup", (e) => {
  const wasDrag = drag && drag.moved;
  drag = null;
  canvas.classList.remove("dragging");
  if (!wasDrag) click(e.offsetX, e.offsetY);
});

canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  zoomAround(map.zoom - Math.sign(e.deltaY) * 0.5, e.offsetX, e.offsetY);
}, { passive: false });

canvas.addEventListener("dblclick", (e) => zoomAround(map.zoom + 1, e.offsetX, e.offsetY));
$("zoom-in").addEventListener("click", () => zoomAround(map.zoom + 1, map.width / 2, map.height / 2));
$("zoom-out").addEventListener("click", () => zoomAround(map.zoom - 1, map.width / 2, map.height / 2));

function click(sx, sy) {
  if (view.mode === "density") {
    // Zoom into a wide view where the user clicked.
    zoomAround(map.zoom + 2, sx, sy);
    return;
  }
  let best = null;
  let bestDistance = 14;
  for (const v of view.vehicles.values()) {
    const p = toScreen(v.lat, v.lon);
    const d = Math.hypot(p.x - sx, p.y - sy);
    if (d < bestDistance) {
      best = v;
      bestDistance = d;
    }
  }
  if (best) select(best.id);
}

for (const box of document.querySelectorAll("#status-filter input, #class-filter input")) {
  box.addEventListener("change", () => {
    view.subscription += 1;
    send({ type: "filter", id: view.subscription, filter: currentFilter() });
  });
}

$("search").addEventListener("submit", (e) => {
  e.preventDefault();
  const id = $("search-input").value.trim();
  if (!id) return;
  $("search-result").textContent = "looking…";
  find(id);
});

$("follow").addEventListener("change", () => {
  following = $("follow").checked ? selected : null;
});

$("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const t = $("token-input").value.trim();
  if (!t) return;
  sessionStorage.setItem("hexfleet-token", t);
  connect();
});

window.addEventListener("resize", resize);

// Keep the details' "last fix" age current, and look for a followed vehicle
// that left the view (filtered out, or driving faster than we re-centre).
setInterval(showDetails, 1000);
setInterval(() => {
  if (following && !view.vehicles.has(following)) find(following);
}, FIND_RETRY_MS);

resize();
requestAnimationFrame(render);
connect();
