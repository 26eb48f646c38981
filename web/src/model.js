// A module's signature in ONNX Runtime Web (WebAssembly), fed as Graft's preprocessing would.
import * as ort from "onnxruntime-web/wasm";

import { preprocessImage } from "./preprocess.js";
import { WordPieceTokenizer } from "./tokenizer.js";

// The WebAssembly files are served by the site itself, from ort/ beside the page.
ort.env.wasm.wasmPaths = new URL("ort/", document.baseURI).href;
// Threads need cross-origin isolation (SharedArrayBuffer); a plain static server has none.
// `graft serve` isolates its try pages; docs/browser.md says which headers a host needs.
ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
export const wasmThreads = ort.env.wasm.numThreads;
ort.env.logLevel = "error";

export class Signature {
  /** @param {object} entry {model, config} from site.json; config is the export's JSON */
  constructor(entry, session, tokenizer) {
    this.entry = entry;
    this.config = entry.config;
    this.session = session;
    this.tokenizer = tokenizer;
    this.inputs = this.config.inputs;
    this.outputs = this.config.outputs;
  }

  static async load(entry) {
    const session = await ort.InferenceSession.create(entry.model, {
      executionProviders: ["wasm"],
      graphOptimizationLevel: "all",
    });
    let tokenizer = null;
    const pre = entry.config.preprocess;
    if (pre && pre.kind === "text") {
      const response = await fetch(entry.tokenizer);
      tokenizer = new WordPieceTokenizer(await response.json(), pre.max_length);
    }
    return new Signature(entry, session, tokenizer);
  }

  /** The feeds for one image, given RGBA pixels. */
  imageFeeds(rgba, width, height) {
    const pre = this.config.preprocess;
    const data = preprocessImage(rgba, width, height, pre);
    return { [this.inputs[0].name]: new ort.Tensor("float32", data, [1, 3, pre.size, pre.size]) };
  }

  /** The feeds for one string: token ids and an attention mask of ones. */
  textFeeds(text) {
    const ids = this.tokenizer.encode(text);
    const shape = [1, ids.length];
    const feeds = {
      [this.inputs[0].name]: new ort.Tensor("int64", BigInt64Array.from(ids, BigInt), shape),
      [this.inputs[1].name]: new ort.Tensor("int64", BigInt64Array.from(ids, () => 1n), shape),
    };
    return { feeds, ids };
  }

  /** Run on prepared feeds; returns {name: Float32Array} of the outputs, row 0. */
  async run(feeds) {
    const results = await this.session.run(feeds);
    const out = {};
    for (const { name } of this.outputs) out[name] = results[name].data;
    return out;
  }
}
