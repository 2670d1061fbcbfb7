// The page of `i2v serve`: send an image to /api/tag once, then redraw tags, bars and caption locally as the
// thresholds move (the answer holds every tag's score). Plain JavaScript, no build step.
"use strict";

const HEADS = ["rating", "character", "copyright", "artist", "general"]; // display order
// Tags whose underscores are part of the face (the WD Space's list): kept as they are in captions.
const KAOMOJIS = new Set(["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
  ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"]);

const state = {
  health: null,
  result: null, // the last /api/tag answer
  thresholds: {}, // head -> slider value
  touched: new Set(), // heads whose slider the user moved: per-tag thresholds no longer apply to them
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "style") node.setAttribute("style", v);
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c);
  return node;
}

// ---- thresholds

function thresholdOf(head, tag) {
  const r = state.result;
  if (!state.touched.has(head) && r && tag in r.model_thresholds.tags) return r.model_thresholds.tags[tag];
  return state.thresholds[head];
}

function selected(head) {
  const scores = state.result.scores[head] || {};
  if (head === "rating") return Object.entries(scores);
  return Object.entries(scores).filter(([tag, s]) => s >= thresholdOf(head, tag));
}

function buildSliders(heads, values) {
  const box = $("sliders");
  box.replaceChildren();
  for (const head of heads) {
    if (head === "rating") continue;
    const value = values[head] ?? 0.5;
    state.thresholds[head] = value;
    const input = el("input", { type: "range", min: 0, max: 1, step: 0.01, value, id: `thr-${head}` });
    const out = el("output", { id: `thr-${head}-value`, text: value.toFixed(2) });
    input.addEventListener("input", () => {
      state.thresholds[head] = Number(input.value);
      state.touched.add(head);
      out.textContent = Number(input.value).toFixed(2);
      if (head === "general" || head === "character") $("mcut").checked = false;
      render();
    });
    box.append(el("label", { class: "slider" }, [el("span", { text: head }), input, out]));
  }
}

function setSlider(head, value) {
  const input = $(`thr-${head}`);
  if (!input) return;
  input.value = value;
  state.thresholds[head] = value;
  state.touched.add(head);
  $(`thr-${head}-value`).textContent = value.toFixed(2);
}

function applyMcut() {
  // MCut's thresholds come with the answer, as the server resolves them (the character one floored, as WD's Space).
  if (!$("mcut").checked || !state.result) return;
  for (const [head, t] of Object.entries(state.result.mcut_thresholds || {})) setSlider(head, t);
}

// ---- drawing

function render() {
  const r = state.result;
  const box = $("tags");
  box.replaceChildren();
  if (!r) return;
  for (const head of HEADS) {
    if (!(head in r.scores)) continue;
    const tags = selected(head);
    const list = el("ul", { class: "tag-list" });
    for (const [tag, score] of tags) {
      const pct = (100 * score).toFixed(1);
      list.append(el("li", { class: "tag", "data-tag": tag, title: `${tag}: ${score.toFixed(4)}` }, [
        el("span", { class: "tag-name", text: tag.replaceAll("_", " ") }),
        el("span", { class: "bar" }, [el("span", { class: "fill", style: `width: ${pct}%` })]),
        el("span", { class: "score", text: score.toFixed(2) }),
      ]));
    }
    const title = el("h3", { text: head }, [el("span", { class: "count", text: ` ${tags.length}` })]);
    box.append(el("div", { class: `group group-${head}`, "data-head": head }, [title, list]));
  }
  $("caption").value = caption();
  $("copy").disabled = false;
}

function caption() {
  // As WD taggers' users paste them: characters, copyrights, artists, then general tags, each highest first.
  const spaces = $("spaces").checked;
  const escape = $("escape").checked;
  const names = [];
  for (const head of ["character", "copyright", "artist", "general"]) {
    if (!(head in state.result.scores)) continue;
    for (const [tag] of selected(head)) {
      let name = spaces && !KAOMOJIS.has(tag) ? tag.replaceAll("_", " ") : tag;
      if (escape) name = name.replaceAll("(", "\\(").replaceAll(")", "\\)");
      names.push(name);
    }
  }
  return names.join(", ");
}

function renderSimilar(answer) {
  const grid = $("similar");
  grid.replaceChildren();
  for (const n of answer.neighbours) {
    const img = el("img", { src: n.thumb, alt: n.name || n.id, loading: "lazy" });
    const label = el("span", { class: "sim-score", text: n.score === null ? "" : n.score.toFixed(3) });
    grid.append(el("a", { class: "sim", href: n.image, target: "_blank", title: n.name || n.id }, [img, label]));
  }
  $("similar-box").hidden = answer.neighbours.length === 0;
}

// ---- talking to the server

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function answerOf(response) {
  let body;
  try {
    body = await response.json();
  } catch {
    body = { error: `${response.status} ${response.statusText}` };
  }
  if (!response.ok) throw new Error(body.error || `${response.status}`);
  return body;
}

async function tagImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    showError("That is not an image.");
    return;
  }
  showError("");
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop").classList.add("has-image");
  $("status").textContent = "Tagging…";
  const t0 = performance.now();
  const form = () => {
    const f = new FormData();
    f.append("file", file, file.name || "pasted.png");
    return f;
  };
  // Settled into a value at once: a rejection left waiting while the tags load would count as unhandled.
  const similar = state.health && state.health.index
    ? fetch("/api/similar", { method: "POST", body: form() }).then(answerOf).then(
        (answer) => ({ answer }),
        (error) => ({ error }),
      )
    : null;
  let tagged = false;
  try {
    state.result = await answerOf(await fetch("/api/tag", { method: "POST", body: form() }));
    state.touched.clear();
    buildSliders(Object.keys(state.result.scores), state.result.thresholds);
    applyMcut();
    render();
    const ms = Math.round(performance.now() - t0);
    $("status").textContent = `${file.name || "pasted image"}: ${state.result.width}×${state.result.height}, tagged in ${ms} ms`;
    tagged = true;
  } catch (e) {
    $("status").textContent = "";
    showError(e.message);
  }
  if (similar) {
    const result = await similar;
    if (result.error) {
      if (tagged) showError(`similar images: ${result.error.message}`);  // else the tag error says it already
    } else {
      renderSimilar(result.answer);
    }
  }
}

async function loadHealth() {
  try {
    state.health = await answerOf(await fetch("/api/health"));
    const h = state.health;
    const index = h.index ? `, index of ${h.index_size} images` : "";
    $("model").textContent = `${h.model}: ${h.tags} tags, ${h.backend}${index}`;
    if (!state.result) buildSliders(Object.keys(h.heads), h.thresholds);
  } catch (e) {
    showError(`the server does not answer: ${e.message}`);
  }
}

// ---- wiring

function setUp() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => tagImage(e.target.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") $("file").click();
  });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    document.addEventListener(type, () => drop.classList.remove("dragging"));
  }
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    tagImage(e.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (e) => {
    const item = [...e.clipboardData.items].find((i) => i.type.startsWith("image/"));
    if (item) tagImage(item.getAsFile());
  });
  $("mcut").addEventListener("change", () => {
    if ($("mcut").checked) applyMcut();
    render();
  });
  $("spaces").addEventListener("change", render);
  $("escape").addEventListener("change", render);
  $("copy").addEventListener("click", async () => {
    const text = $("caption").value;
    try {
      await navigator.clipboard.writeText(text);
    } catch {
      $("caption").select(); // no clipboard API (a non-local http page): the browser's own copy
      document.execCommand("copy");
    }
    $("copied").textContent = "copied";
    setTimeout(() => ($("copied").textContent = ""), 1500);
  });
  loadHealth();
}

setUp();
