// The page: run a module's signature on an image or text, and train a softmax head on the
// module's features, all in the browser. site.json (written by `graft export web`) says what
// the module is and where its ONNX models are.
import { Signature, wasmThreads } from "./model.js";
import * as head from "./head.js";

// Larger images would take gigabytes to decode; phones' 48-megapixel photos still pass.
const MAX_PIXELS = 50_000_000;
const MAX_BYTES = 100 * 2 ** 20;
const TOP = 5;

const $ = (id) => document.getElementById(id);
const state = { errors: [], examples: [], last: null, headLast: null, training: null, timings: [],
  threads: wasmThreads };
window.graftPage = state;

function show(message, kind = "error") {
  const box = $("message");
  box.textContent = message;
  box.className = kind;
  box.hidden = false;
  if (kind === "error") state.errors.push(message);
}

function clearMessage() {
  $("message").hidden = true;
}

function status(text) {
  $("status").textContent = text;
}

window.addEventListener("error", (event) => show(`Something went wrong: ${event.message}`));
window.addEventListener("unhandledrejection", (event) => {
  show(`Something went wrong: ${event.reason?.message || event.reason}`);
});

/** A user-facing error: shown as it is, never as a crash. */
class InputError extends Error {}

/** Decode an image file to RGBA pixels, refusing what is not an image or far too large. */
async function decode(file) {
  if (file.size > MAX_BYTES) {
    throw new InputError(`${file.name} is ${(file.size / 2 ** 20).toFixed(0)} MB; the page takes image files up to ${MAX_BYTES / 2 ** 20} MB`);
  }
  const url = URL.createObjectURL(file);
  try {
    const img = new Image();
    img.src = url;
    try {
      // Loading reads the header (the size) without decoding every pixel.
      await new Promise((resolve, reject) => { img.onload = resolve; img.onerror = reject; });
    } catch {
      throw new InputError(`${file.name} is not an image this browser can read; give a PNG, JPEG, GIF, WebP or BMP file`);
    }
    const { naturalWidth: w, naturalHeight: h } = img;
    if (!w || !h) throw new InputError(`${file.name} has no pixels (${w} × ${h})`);
    if (w * h > MAX_PIXELS) {
      throw new InputError(`${file.name} is ${w} × ${h} pixels (${(w * h / 1e6).toFixed(0)} megapixels); the page takes images up to ${MAX_PIXELS / 1e6} megapixels: scale it down first`);
    }
    const bitmap = await createImageBitmap(img, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
    const canvas = new OffscreenCanvas(w, h);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    return { rgba: ctx.getImageData(0, 0, w, h).data, width: w, height: h, url };
  } catch (err) {
    URL.revokeObjectURL(url);
    throw err;
  }
}

let site = null;
let runner = null; // the signature "Try it" runs
let featurer = null; // the signature whose output the head trains on

/** Run a signature on one example (a File or a string); returns outputs and timings. */
async function runOn(signature, example) {
  const t0 = performance.now();
  let feeds;
  let preview = null;
  let ids = null;
  if (site.kind === "image") {
    const image = await decode(example);
    preview = image.url;
    feeds = signature.imageFeeds(image.rgba, image.width, image.height);
  } else {
    if (!example.trim()) throw new InputError("Type some text first");
    ({ feeds, ids } = signature.textFeeds(example));
  }
  const t1 = performance.now();
  const outputs = await signature.run(feeds);
  const t2 = performance.now();
  state.timings.push({ preprocess: t1 - t0, inference: t2 - t1 });
  return { outputs, preview, ids, preprocessMs: t1 - t0, inferenceMs: t2 - t1 };
}

function probabilities(values) {
  const z = Float64Array.from(values);
  return Array.from(head.softmax(z, z.length));
}

function renderTop(list, probs, labels) {
  list.replaceChildren();
  const order = probs.map((p, i) => [p, i]).sort((a, b) => b[0] - a[0]).slice(0, TOP);
  for (const [p, i] of order) {
    const li = document.createElement("li");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(1, Math.round(p * 100))}%`;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = labels ? labels[i] : `#${i}`;
    const value = document.createElement("span");
    value.className = "prob";
    value.textContent = `${(p * 100).toFixed(1)}%`;
    li.append(name, value, bar);
    list.append(li);
  }
  return order.map(([p, i]) => ({ label: labels ? labels[i] : String(i), index: i, p }));
}

async function tryExample(example) {
  clearMessage();
  const name = site.kind === "image" ? example.name : "text";
  status(`Running ${runner.config.signature} on ${name}…`);
  try {
    const result = await runOn(runner, example);
    const [output] = runner.outputs;
    const values = result.outputs[output.name];
    if (result.preview) {
      $("try-preview").src = result.preview;
      $("try-preview").hidden = false;
    }
    const labels = runner.config.labels;
    let top = null;
    let probs = null;
    if (labels && values.length === labels.length) {
      probs = probabilities(values);
      top = renderTop($("top-classes"), probs, labels);
      $("embedding").hidden = true;
    } else {
      $("top-classes").replaceChildren();
      const norm = Math.sqrt(values.reduce((s, v) => s + v * v, 0));
      $("embedding").hidden = false;
      $("embedding").textContent = `${output.name}: ${values.length} values, norm ${norm.toFixed(4)}: [${Array.from(values.slice(0, 6), (v) => v.toFixed(4)).join(", ")}, …]`;
    }
    const threads = wasmThreads === 1 ? "1 thread" : `${wasmThreads} threads`;
    $("try-time").textContent = `${result.inferenceMs.toFixed(1)} ms in the model (WebAssembly, ${threads}), ${result.preprocessMs.toFixed(1)} ms to ${site.kind === "image" ? "decode and resize" : "tokenize"}`;
    state.last = { name, values: Array.from(values), probs, top, ...result };
    status("Ready.");
  } catch (err) {
    status("Ready.");
    show(err instanceof InputError ? err.message : `Could not run the model on ${name}: ${err.message}`);
  }
}

// -- training a head ------------------------------------------------------------------------

function addClass(label) {
  const index = state.examples.length;
  const entry = { name: label, features: [], node: null };
  state.examples.push(entry);
  const node = $("class-template").content.firstElementChild.cloneNode(true);
  entry.node = node;
  const nameInput = node.querySelector(".class-name");
  nameInput.value = label;
  nameInput.addEventListener("input", () => { entry.name = nameInput.value.trim(); });
  const files = node.querySelector(".class-files");
  const text = node.querySelector(".class-text");
  if (site.kind === "image") {
    text.remove();
    node.querySelector(".class-add-text").remove();
    files.addEventListener("change", () => addExamples(entry, Array.from(files.files)).then(() => { files.value = ""; }));
  } else {
    files.remove();
    node.querySelector(".class-add-text").addEventListener("click", () => {
      addExamples(entry, text.value.split("\n").map((s) => s.trim()).filter(Boolean)).then(() => { text.value = ""; });
    });
  }
  node.querySelector(".class-remove").addEventListener("click", () => {
    state.examples.splice(state.examples.indexOf(entry), 1);
    node.remove();
  });
  node.dataset.index = String(index);
  $("classes").append(node);
  return entry;
}

function updateCount(entry) {
  const n = entry.features.length;
  entry.node.querySelector(".class-count").textContent = `${n} example${n === 1 ? "" : "s"}`;
}

/** Compute the features of new examples once; they are kept for every training run. */
async function addExamples(entry, examples) {
  clearMessage();
  const problems = [];
  for (const example of examples) {
    const label = site.kind === "image" ? example.name : `"${example}"`;
    status(`Computing features of ${label}…`);
    try {
      const result = await runOn(featurer, example);
      entry.features.push(Array.from(result.outputs[featurer.outputs[0].name]));
      if (result.preview) {
        const thumb = document.createElement("img");
        thumb.src = result.preview;
        thumb.alt = example.name;
        entry.node.querySelector(".thumbs").append(thumb);
      }
      updateCount(entry);
    } catch (err) {
      problems.push(err instanceof InputError ? err.message : `${label}: ${err.message}`);
    }
  }
  status("Ready.");
  if (problems.length) show(problems.join("\n"));
}

function drawLoss(history) {
  const canvas = $("loss-chart");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  ctx.clearRect(0, 0, width, height);
  if (!history.length) return;
  const max = Math.max(...history.map((h) => h.loss), 1e-9);
  const steps = Math.max(history.length, Number($("steps").value) || history.length);
  ctx.strokeStyle = "#2d6cdf";
  ctx.lineWidth = 2;
  ctx.beginPath();
  history.forEach((h, i) => {
    const x = 8 + (i / Math.max(steps - 1, 1)) * (width - 16);
    const y = height - 8 - (h.loss / max) * (height - 16);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.stroke();
}

function readNumber(id, what, { min, integer }) {
  const value = Number($(id).value);
  if (!Number.isFinite(value) || value < min || (integer && !Number.isInteger(value))) {
    throw new InputError(`${what} must be ${integer ? "a whole number" : "a number"} of at least ${min}, got "${$(id).value}"`);
  }
  return value;
}

async function trainHead() {
  clearMessage();
  try {
    const classes = state.examples;
    if (classes.length < 2) throw new InputError("Add at least two classes to train a classifier");
    const empty = classes.filter((c) => c.features.length === 0);
    if (empty.length) {
      throw new InputError(`Class ${empty.map((c) => `"${c.name || "(unnamed)"}"`).join(", ")} has no examples; add at least one ${site.kind === "image" ? "image" : "line of text"} to every class, or remove the class`);
    }
    const names = classes.map((c) => c.name);
    if (names.some((n) => !n) || new Set(names).size !== names.length) {
      throw new InputError(`Every class needs a name of its own; got ${names.map((n) => `"${n}"`).join(", ")}`);
    }
    const steps = readNumber("steps", "Steps", { min: 1, integer: true });
    const lr = readNumber("lr", "The learning rate", { min: 1e-8 });
    const seed = readNumber("seed", "The seed", { min: 0, integer: true });
    const features = [];
    const labels = [];
    classes.forEach((c, i) => c.features.forEach((f) => { features.push(f); labels.push(i); }));
    const dim = features[0].length;
    const model = state.initialHead && state.initialHead.classes === classes.length
      ? { classes: classes.length, dim, weight: Float64Array.from(state.initialHead.weight), bias: Float64Array.from(state.initialHead.bias) }
      : head.initialHead(classes.length, dim, seed);
    const initial = { weight: Array.from(model.weight), bias: Array.from(model.bias) };
    $("train-run").disabled = true;
    const history = [];
    const result = await head.train(model, features, labels, {
      steps, lr,
      onStep: async (h) => {
        history.push(h);
        if (h.step % 5 === 0 || h.step === steps) {
          $("train-progress").textContent = `step ${h.step}/${steps} · loss ${h.loss.toFixed(4)} · training accuracy ${(h.accuracy * 100).toFixed(0)}%`;
          drawLoss(history);
          await new Promise((r) => setTimeout(r, 0)); // let the page repaint
        }
      },
    });
    $("train-progress").textContent = `trained ${steps} steps on ${features.length} examples: loss ${result.loss.toFixed(4)}, training accuracy ${(result.accuracy * 100).toFixed(0)}%`;
    state.training = { classes: names, features, labels, initial, lr, steps, history, loss: result.loss, accuracy: result.accuracy, head: model };
    $("after-training").hidden = false;
  } catch (err) {
    show(err instanceof InputError ? err.message : `Training failed: ${err.message}`);
  } finally {
    $("train-run").disabled = false;
  }
}

async function classifyWithHead(example) {
  clearMessage();
  try {
    const { head: model, classes } = state.training;
    const result = await runOn(featurer, example);
    const row = Float64Array.from(result.outputs[featurer.outputs[0].name]);
    const probs = Array.from(head.softmax(head.logits(model, [row]), model.classes));
    const top = renderTop($("head-result"), probs, classes);
    state.headLast = { probs, top, features: Array.from(row) };
  } catch (err) {
    show(err instanceof InputError ? err.message : `Could not classify: ${err.message}`);
  }
}

function headMetadata() {
  const t = state.training;
  return {
    format: "graft.head/1",
    classes: t.classes,
    parent: `${site.module.name}@${site.module.version}`,
    parent_digest: site.module.digest,
    signature: featurer.config.signature,
    steps: t.steps,
    learning_rate: t.lr,
    loss: t.loss,
    accuracy: t.accuracy,
  };
}

function download(data, filename, type) {
  const url = URL.createObjectURL(new Blob([data], { type }));
  const a = document.createElement("a");
  a.href = url;
  a.download = filename;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

// -- start ----------------------------------------------------------------------------------

function pickOne(id, handle) {
  const input = $(id);
  input.addEventListener("change", () => {
    const file = input.files[0];
    input.value = "";
    if (file) handle(file);
  });
}

function wireInputs() {
  if (site.kind === "image") {
    $("try-text-box").remove();
    // The input is emptied after each pick, so that picking the same file again runs again.
    pickOne("try-file", tryExample);
    const drop = $("drop");
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const file = e.dataTransfer.files[0];
      if (file) tryExample(file);
    });
    pickOne("head-file", classifyWithHead);
    $("head-text-box").remove();
  } else {
    $("drop").remove();
    $("try-run").addEventListener("click", () => tryExample($("try-text").value));
    $("head-file").remove();
    $("head-run").addEventListener("click", () => classifyWithHead($("head-text").value));
  }
  $("add-class").addEventListener("click", () => addClass(`class ${state.examples.length + 1}`));
  $("train-run").addEventListener("click", trainHead);
  $("download-safetensors").addEventListener("click", () => download(head.toSafetensors(state.training.head, headMetadata()), "head.safetensors", "application/octet-stream"));
  $("download-json").addEventListener("click", () => download(head.toJSON(state.training.head, headMetadata()), "head.json", "application/json"));
}

async function start() {
  status("Loading the module…");
  site = await (await fetch("site.json")).json();
  document.title = `${site.module.name} ${site.module.version} · Graft`;
  $("title").textContent = `${site.module.name} ${site.module.version}`;
  $("description").textContent = site.module.description;
  $("import-command").textContent = `graft import-head head.safetensors --parent ${site.module.name}@${site.module.version} --out my-classifier@1.0.0`;
  wireInputs();
  runner = await Signature.load(site.run);
  $("try-signature").textContent = runner.config.signature;
  if (site.features) {
    featurer = site.features.model === site.run.model ? runner : await Signature.load(site.features);
    $("features-signature").textContent = featurer.config.signature;
    for (let i = 1; i <= 2; i++) addClass(`class ${i}`);
  } else {
    $("train").remove();
  }
  status("Ready.");
}

state.ready = start().then(() => true, (err) => {
  show(`The module could not be loaded: ${err.message}. Serve the site over HTTP (python -m http.server -d SITE) rather than opening the file.`);
  return false;
});
