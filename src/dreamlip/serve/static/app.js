// dreamlip serve: the page over the JSON API (docs/serve.md). Views are picked by the URL hash:
// "#q=TEXT&k=K" a text search, "#image=ID" an image, "" the search box alone.
"use strict";

const $ = (selector) => document.querySelector(selector);
let info = { models: [], dense: [], classes: [] };
let lastSearch = "";

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({ detail: response.statusText }));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function showError(err) {
  const box = $("#error");
  box.textContent = err ? String(err.message || err) : "";
  box.hidden = !err;
}

// ---------------------------------------------------------------------------------------------
// Search

function renderResults(answer) {
  const results = $("#results");
  results.replaceChildren();
  results.classList.toggle("compare", answer.models.length > 1);
  for (const model of answer.models) {
    const grid = element("div", { class: "grid" });
    for (const hit of model.results) {
      grid.append(
        element("a", { class: "card", href: `#image=${hit.id}`, "data-id": hit.id },
          element("img", { src: `/api/image/${hit.id}/file?size=256`, alt: hit.key, loading: "lazy" }),
          element("span", { class: "score" }, hit.score.toFixed(3)),
          element("span", { class: "key" }, hit.key)));
    }
    results.append(element("section", { class: "column" }, element("h2", {}, model.name), grid));
  }
}

async function textSearch(query, k) {
  $("#q").value = query;
  $("#k").value = k;
  renderResults(await api(`/api/search?q=${encodeURIComponent(query)}&k=${k}`));
}

async function imageSearch(file) {
  const form = new FormData();
  form.append("file", file);
  renderResults(await api(`/api/search/image?k=${$("#k").value}`, { method: "POST", body: form }));
  lastSearch = "";
}

// ---------------------------------------------------------------------------------------------
// Image page

// A dark-to-bright ramp (black, purple, orange, yellow) for heatmaps.
const RAMP = [[0, 0, 4], [120, 28, 109], [237, 105, 37], [252, 255, 164]];

function rampColour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - i;
  return RAMP[i].map((c, j) => Math.round(c + f * (RAMP[i + 1][j] - c)));
}

function overlayFrame(image, box) {
  // An image with a canvas placed over box = [left, top, right, bottom] (image pixels).
  const [left, top, right, bottom] = box;
  const canvas = element("canvas", { class: "overlay" });
  Object.assign(canvas.style, {
    left: `${(100 * left) / image.width}%`,
    top: `${(100 * top) / image.height}%`,
    width: `${(100 * (right - left)) / image.width}%`,
    height: `${(100 * (bottom - top)) / image.height}%`,
  });
  const frame = element("div", { class: "frame" }, element("img", { src: image.file, alt: image.key }), canvas);
  return { frame, canvas };
}

function paintHeatmap(canvas, weights) {
  const rows = weights.length, cols = weights[0].length;
  const peak = Math.max(...weights.flat()) || 1;
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(cols, rows);
  weights.flat().forEach((w, i) => {
    const t = w / peak; // low weights stay see-through, so the image shows where the text is not
    pixels.data.set([...rampColour(t), Math.round(40 + 200 * t)], 4 * i);
  });
  context.putImageData(pixels, 0, 0);
  canvas.dataset.peak = peak;
}

function palette(index) {
  const hue = (index * 137.508) % 360; // golden angle: neighbouring classes far apart
  const canvas = document.createElement("canvas").getContext("2d");
  canvas.fillStyle = `hsl(${hue}, 75%, 50%)`;
  canvas.fillRect(0, 0, 1, 1);
  return [...canvas.getImageData(0, 0, 1, 1).data.slice(0, 3)];
}

async function addHeatmaps(image, texts) {
  const answer = await api(`/api/heatmap?id=${image.id}&` + texts.map((t) => `text=${encodeURIComponent(t)}`).join("&"));
  const container = $("#heatmaps");
  answer.texts.forEach((text, t) => {
    const row = element("div", { class: "heatmap" }, element("p", { class: "text" }, text));
    const maps = element("div", { class: "maps" });
    for (const model of answer.models) {
      const { frame, canvas } = overlayFrame(image, answer.box);
      paintHeatmap(canvas, model.heatmaps[t]);
      maps.append(element("figure", {}, frame, element("figcaption", {}, model.name)));
    }
    row.append(maps);
    container.append(row);
  });
}

function captionList(captions) {
  const blocks = [];
  if (captions.raw) blocks.push(element("p", {}, element("b", {}, "raw: "), captions.raw));
  for (const captioner of captions.captioners) {
    const block = element("div", { class: "captioner" }, element("h3", {}, captioner.name));
    if (captioner.short) block.append(element("p", {}, element("b", {}, "short: "), captioner.short));
    if (captioner.sentences.length) {
      block.append(element("p", {}, element("b", {}, "long, as sub-captions:")),
        element("ol", {}, ...captioner.sentences.map((s) => element("li", {}, s))));
    }
    blocks.push(block);
  }
  if (captions.texts.length) {
    blocks.push(element("div", {}, element("h3", {}, "other captions"),
      element("ul", {}, ...captions.texts.map((s) => element("li", {}, s)))));
  }
  return blocks.length ? blocks : [element("p", { class: "hint" }, "This collection has no captions.")];
}

function subcaptions(captions) {
  // Every long caption's sentences, then the short captions: the texts DreamLIP trains with.
  const texts = captions.captioners.flatMap((c) => c.sentences)
    .concat(captions.captioners.map((c) => c.short).filter(Boolean));
  return [...new Set(texts)].slice(0, 32);
}

async function showImage(id) {
  const image = await api(`/api/image/${id}`);
  $("#picture").replaceChildren(
    element("img", { src: image.file, alt: image.key }),
    element("figcaption", {}, `${image.key} (${image.width}x${image.height})`));
  $("#captions").replaceChildren(...captionList(image.captions));
  $("#heatmaps").replaceChildren();
  $("#segments").replaceChildren();
  $("#back").href = lastSearch || "#";
  $("#image-view").dataset.id = id;
  const texts = subcaptions(image.captions);
  if (texts.length) await addHeatmaps(image, texts);
  else $("#heatmaps").append(element("p", { class: "hint" }, "No sub-captions: type a text above."));
  $("#heatmap-form").onsubmit = (event) => {
    event.preventDefault();
    const text = $("#heatmap-text").value.trim();
    if (text) addHeatmaps(image, [text]).catch(showError);
  };
  $("#segment-form").onsubmit = (event) => {
    event.preventDefault();
    segment(image).catch(showError);
  };
}

async function segment(image) {
  const classes = $("#classes").value.split(",").map((c) => c.trim()).filter(Boolean);
  const request = { id: image.id, classes };
  if (!$("#dense").hidden && $("#dense").value) request.dense = $("#dense").value;
  const answer = await api("/api/segment", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(request),
  });
  const colours = answer.classes.map((_, i) => palette(i));
  const container = $("#segments");
  container.replaceChildren();
  for (const model of answer.models) {
    const { frame, canvas } = overlayFrame(image, [0, 0, answer.width, answer.height]);
    canvas.width = answer.width;
    canvas.height = answer.height;
    const context = canvas.getContext("2d");
    const pixels = context.createImageData(answer.width, answer.height);
    const counts = new Array(answer.classes.length).fill(0);
    model.labels.flat().forEach((label, i) => {
      counts[label] += 1;
      pixels.data.set([...colours[label], 170], 4 * i);
    });
    context.putImageData(pixels, 0, 0);
    canvas.classList.add("labels");
    const total = answer.width * answer.height;
    const legend = element("ul", { class: "legend" }, ...answer.classes.map((name, i) =>
      element("li", {}, element("span", { class: "swatch", style: `background: rgb(${colours[i]})` }),
        `${name} ${((100 * counts[i]) / total).toFixed(1)}%`)));
    container.append(element("figure", {}, frame, element("figcaption", {}, model.name), legend));
  }
}

// ---------------------------------------------------------------------------------------------
// Routing

async function route() {
  showError(null);
  const params = new URLSearchParams(location.hash.slice(1));
  const imageView = params.has("image");
  $("#image-view").hidden = !imageView;
  $("#results").hidden = imageView;
  try {
    if (imageView) await showImage(Number(params.get("image")));
    else if (params.get("q")) {
      lastSearch = location.hash;
      await textSearch(params.get("q"), params.get("k") || 12);
    }
  } catch (err) {
    showError(err);
  }
}

async function start() {
  info = await api("/api/info").catch((err) => (showError(err), info));
  $("#info").textContent = `${info.images} images · ${info.models.join(" vs ")} · ${info.index} index`;
  if (info.dense.length) {
    $("#dense").replaceChildren(...info.dense.map((d) => element("option", { value: d }, d)));
    $("#dense").hidden = false;
  }
  $("#classes").value = (info.classes || []).join(", ");
  $("#search-form").onsubmit = (event) => {
    event.preventDefault();
    const query = $("#q").value.trim();
    if (query) location.hash = `q=${encodeURIComponent(query)}&k=${$("#k").value}`;
  };
  $("#upload").onchange = () => {
    const file = $("#upload").files[0];
    if (!file) return;
    if (location.hash) history.pushState(null, "", location.pathname);
    $("#image-view").hidden = true;
    $("#results").hidden = false;
    imageSearch(file).catch(showError);
    $("#upload").value = "";
  };
  window.addEventListener("hashchange", route);
  await route();
}

start();
