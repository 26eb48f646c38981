// Image preprocessing that reproduces Graft's Python preprocessing (graft.runtime.preprocess)
// exactly: shorter side resized with Pillow's resampling (the same fixed-point two-pass
// filter, so the same uint8 pixels come out), centre crop, scale to [0, 1], normalise per
// channel in float32, laid out as (3, H, W).

// Pillow's 8-bit resampling keeps coefficients as integers with this many fraction bits.
const PRECISION_BITS = 32 - 8 - 2;
const ONE = 2 ** PRECISION_BITS;
const HALF = 2 ** (PRECISION_BITS - 1);

const FILTERS = {
  bilinear: {
    support: 1.0,
    weight(x) {
      x = Math.abs(x);
      return x < 1.0 ? 1.0 - x : 0.0;
    },
  },
  bicubic: {
    support: 2.0,
    weight(x) {
      const a = -0.5;
      x = Math.abs(x);
      if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
      return 0.0;
    },
  },
};

/** Filter taps for resizing `inSize` pixels to `outSize`: bounds (first, count) and weights. */
function coefficients(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterScale = Math.max(scale, 1.0);
  const support = filter.support * filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const weights = new Int32Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const taps = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    // C's (int) cast truncates toward zero; the clamp then handles negatives.
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    let total = 0.0;
    for (let x = 0; x < xmax; x++) {
      const w = filter.weight((x + xmin - center + 0.5) / filterScale);
      taps[x] = w;
      total += w;
    }
    for (let x = 0; x < ksize; x++) {
      let w = x < xmax ? taps[x] : 0.0;
      if (x < xmax && total !== 0.0) w /= total;
      weights[xx * ksize + x] = w < 0 ? Math.trunc(-0.5 + w * ONE) : Math.trunc(0.5 + w * ONE);
    }
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  return { ksize, weights, bounds };
}

function clip8(value) {
  const v = Math.floor(value / ONE);
  return v < 0 ? 0 : v > 255 ? 255 : v;
}

/**
 * Resize an RGB image (Uint8Array, 3 bytes a pixel) as Pillow's Image.resize does.
 * @returns {{data: Uint8Array, width: number, height: number}}
 */
export function resizeRGB(src, width, height, outWidth, outHeight, interpolation = "bilinear") {
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`interpolation ${interpolation} is not supported in the page`);
  let data = src;
  let w = width;
  let h = height;
  const vert = coefficients(height, outHeight, filter);
  if (outWidth !== width) {
    const hor = coefficients(width, outWidth, filter);
    // Only the rows the vertical pass reads are resampled horizontally.
    const first = vert.bounds[0];
    const last = vert.bounds[outHeight * 2 - 2] + vert.bounds[outHeight * 2 - 1];
    const rows = outHeight !== height ? last - first : height;
    const start = outHeight !== height ? first : 0;
    const out = new Uint8Array(outWidth * rows * 3);
    for (let y = 0; y < rows; y++) {
      const row = (y + start) * width * 3;
      for (let xx = 0; xx < outWidth; xx++) {
        const xmin = hor.bounds[xx * 2];
        const count = hor.bounds[xx * 2 + 1];
        const k = xx * hor.ksize;
        let s0 = HALF, s1 = HALF, s2 = HALF;
        for (let x = 0; x < count; x++) {
          const p = row + (x + xmin) * 3;
          const c = hor.weights[k + x];
          s0 += data[p] * c;
          s1 += data[p + 1] * c;
          s2 += data[p + 2] * c;
        }
        const o = (y * outWidth + xx) * 3;
        out[o] = clip8(s0);
        out[o + 1] = clip8(s1);
        out[o + 2] = clip8(s2);
      }
    }
    data = out;
    w = outWidth;
    if (outHeight !== height) {
      for (let i = 0; i < outHeight; i++) vert.bounds[i * 2] -= start;
    }
    h = rows;
  }
  if (outHeight !== height) {
    const out = new Uint8Array(w * outHeight * 3);
    for (let yy = 0; yy < outHeight; yy++) {
      const ymin = vert.bounds[yy * 2];
      const count = vert.bounds[yy * 2 + 1];
      const k = yy * vert.ksize;
      for (let xx = 0; xx < w; xx++) {
        let s0 = HALF, s1 = HALF, s2 = HALF;
        for (let y = 0; y < count; y++) {
          const p = ((y + ymin) * w + xx) * 3;
          const c = vert.weights[k + y];
          s0 += data[p] * c;
          s1 += data[p + 1] * c;
          s2 += data[p + 2] * c;
        }
        const o = (yy * w + xx) * 3;
        out[o] = clip8(s0);
        out[o + 1] = clip8(s1);
        out[o + 2] = clip8(s2);
      }
    }
    data = out;
    h = outHeight;
  }
  return { data, width: w, height: h };
}

/** Python's round(): halves go to the even neighbour. */
function roundHalfEven(x) {
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 ? 2 * Math.round(x / 2) : r;
}

/**
 * RGBA pixels (as a canvas gives them) -> the float32 (3, size, size) tensor data a
 * signature takes, following an ImagePreprocess spec {size, resize, mean, std, interpolation}.
 */
export function preprocessImage(rgba, width, height, spec) {
  const rgb = new Uint8Array(width * height * 3);
  for (let i = 0, j = 0; i < width * height; i++, j += 4) {
    rgb[i * 3] = rgba[j];
    rgb[i * 3 + 1] = rgba[j + 1];
    rgb[i * 3 + 2] = rgba[j + 2];
  }
  const scale = spec.resize / Math.min(width, height);
  const outW = Math.max(spec.size, roundHalfEven(width * scale));
  const outH = Math.max(spec.size, roundHalfEven(height * scale));
  const resized = resizeRGB(rgb, width, height, outW, outH, spec.interpolation || "bilinear");
  const left = Math.floor((outW - spec.size) / 2);
  const top = Math.floor((outH - spec.size) / 2);
  const n = spec.size * spec.size;
  const out = new Float32Array(3 * n);
  const f = Math.fround;
  for (let c = 0; c < 3; c++) {
    const mean = f(spec.mean[c]);
    const std = f(spec.std[c]);
    for (let y = 0; y < spec.size; y++) {
      for (let x = 0; x < spec.size; x++) {
        const v = resized.data[((y + top) * outW + (x + left)) * 3 + c];
        // float32 arithmetic, step by step, as torch does it.
        out[c * n + y * spec.size + x] = f(f(f(v / 255) - mean) / std);
      }
    }
  }
  return out;
}
