// A softmax head trained in the page: logits = features @ W^T + b, the mean sparse softmax
// cross-entropy of graft.losses (logsumexp(z) - z[label], averaged over the batch), and Adam
// with torch.optim.Adam's update (bias-corrected moments, eps added to the corrected root).
// Arithmetic is float64; the head is stored as float32, as the PyTorch module keeps it.

/** A seeded generator of floats in [0, 1) (mulberry32): the same seed, the same head. */
export function random(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/**
 * Initial weights as torch.nn.Linear draws them: uniform in [-1/sqrt(D), 1/sqrt(D)), from
 * a seed, rounded to float32.
 */
export function initialHead(classes, dim, seed) {
  const next = random(seed);
  const bound = 1 / Math.sqrt(dim);
  const weight = new Float64Array(classes * dim);
  const bias = new Float64Array(classes);
  for (let i = 0; i < weight.length; i++) weight[i] = Math.fround((next() * 2 - 1) * bound);
  for (let i = 0; i < classes; i++) bias[i] = Math.fround((next() * 2 - 1) * bound);
  return { classes, dim, weight, bias };
}

/** Logits (N, C) of a head over features (N rows of D). */
export function logits(head, features) {
  const { classes, dim, weight, bias } = head;
  const out = new Float64Array(features.length * classes);
  features.forEach((row, n) => {
    for (let c = 0; c < classes; c++) {
      let s = bias[c];
      const w = c * dim;
      for (let d = 0; d < dim; d++) s += weight[w + d] * row[d];
      out[n * classes + c] = s;
    }
  });
  return out;
}

/** Row-wise softmax of (N, C) logits, computed stably. */
export function softmax(z, classes) {
  const p = new Float64Array(z.length);
  for (let n = 0; n < z.length / classes; n++) {
    let max = -Infinity;
    for (let c = 0; c < classes; c++) max = Math.max(max, z[n * classes + c]);
    let sum = 0;
    for (let c = 0; c < classes; c++) sum += (p[n * classes + c] = Math.exp(z[n * classes + c] - max));
    for (let c = 0; c < classes; c++) p[n * classes + c] /= sum;
  }
  return p;
}

/** Mean cross-entropy, accuracy, and the gradients of the loss wrt W and b. */
export function lossAndGradients(head, features, labels) {
  const { classes, dim } = head;
  const n = features.length;
  const z = logits(head, features);
  const p = softmax(z, classes);
  let loss = 0;
  let correct = 0;
  const gw = new Float64Array(classes * dim);
  const gb = new Float64Array(classes);
  for (let i = 0; i < n; i++) {
    const y = labels[i];
    let max = -Infinity;
    let best = 0;
    for (let c = 0; c < classes; c++) {
      const v = z[i * classes + c];
      if (v > max) { max = v; best = c; }
    }
    let sum = 0;
    for (let c = 0; c < classes; c++) sum += Math.exp(z[i * classes + c] - max);
    loss += max + Math.log(sum) - z[i * classes + y];
    if (best === y) correct++;
    const row = features[i];
    for (let c = 0; c < classes; c++) {
      const g = (p[i * classes + c] - (c === y ? 1 : 0)) / n; // d loss / d z
      gb[c] += g;
      const w = c * dim;
      for (let d = 0; d < dim; d++) gw[w + d] += g * row[d];
    }
  }
  return { loss: loss / n, accuracy: correct / n, gw, gb };
}

/** Adam over the head's weight and bias, as torch.optim.Adam (no weight decay, no amsgrad). */
export class Adam {
  constructor(head, { lr = 0.01, beta1 = 0.9, beta2 = 0.999, eps = 1e-8 } = {}) {
    Object.assign(this, { head, lr, beta1, beta2, eps, t: 0 });
    this.state = [head.weight, head.bias].map((p) => ({ m: new Float64Array(p.length),
                                                       v: new Float64Array(p.length) }));
  }

  step(gw, gb) {
    this.t += 1;
    const c1 = 1 - this.beta1 ** this.t;
    const c2 = Math.sqrt(1 - this.beta2 ** this.t);
    [[this.head.weight, gw], [this.head.bias, gb]].forEach(([param, grad], i) => {
      const { m, v } = this.state[i];
      for (let k = 0; k < param.length; k++) {
        m[k] = this.beta1 * m[k] + (1 - this.beta1) * grad[k];
        v[k] = this.beta2 * v[k] + (1 - this.beta2) * grad[k] * grad[k];
        param[k] -= (this.lr / c1) * m[k] / (Math.sqrt(v[k]) / c2 + this.eps);
      }
    });
  }
}

/**
 * Train a head full-batch; `onStep({step, loss, accuracy})` is awaited after every step so
 * the page can redraw. The loss recorded for a step is the one its gradient came from.
 */
export async function train(head, features, labels, { steps = 100, lr = 0.01, onStep } = {}) {
  const optimizer = new Adam(head, { lr });
  const history = [];
  for (let step = 1; step <= steps; step++) {
    const { loss, accuracy, gw, gb } = lossAndGradients(head, features, labels);
    if (!Number.isFinite(loss)) throw new Error(`the loss became ${loss} at step ${step}; lower the learning rate`);
    optimizer.step(gw, gb);
    history.push({ step, loss, accuracy });
    if (onStep) await onStep({ step, loss, accuracy });
  }
  const final = lossAndGradients(head, features, labels);
  return { history, loss: final.loss, accuracy: final.accuracy };
}

/**
 * The head as a safetensors file: `weight` float32 (C, D) and `bias` float32 (C), with the
 * classes, the backbone and the signature in the header's metadata.
 */
export function toSafetensors(head, metadata) {
  const wBytes = head.classes * head.dim * 4;
  const bBytes = head.classes * 4;
  const header = {
    __metadata__: Object.fromEntries(Object.entries(metadata).map(([k, v]) => [k, typeof v === "string" ? v : JSON.stringify(v)])),
    bias: { dtype: "F32", shape: [head.classes], data_offsets: [0, bBytes] },
    weight: { dtype: "F32", shape: [head.classes, head.dim], data_offsets: [bBytes, bBytes + wBytes] },
  };
  let text = JSON.stringify(header);
  // The data that follows starts 8-byte aligned, as the safetensors writers pad it.
  text += " ".repeat((8 - ((8 + new TextEncoder().encode(text).length) % 8)) % 8);
  const json = new TextEncoder().encode(text);
  const buffer = new ArrayBuffer(8 + json.length + bBytes + wBytes);
  const view = new DataView(buffer);
  view.setBigUint64(0, BigInt(json.length), true);
  new Uint8Array(buffer, 8, json.length).set(json);
  let offset = 8 + json.length;
  for (const value of [...head.bias, ...head.weight]) {
    view.setFloat32(offset, value, true);
    offset += 4;
  }
  return new Uint8Array(buffer);
}

/** The head as JSON (float32 values written in full, so they read back exactly). */
export function toJSON(head, metadata) {
  const f = Math.fround;
  const weight = [];
  for (let c = 0; c < head.classes; c++) {
    weight.push(Array.from(head.weight.subarray(c * head.dim, (c + 1) * head.dim), f));
  }
  return JSON.stringify({ ...metadata, weight, bias: Array.from(head.bias, f) });
}
