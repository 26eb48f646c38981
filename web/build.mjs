// Builds the page into dist/: the esbuild bundle of src/, the static files, and ONNX Runtime
// Web's WebAssembly files copied from node_modules (the site serves them itself; no CDN).
import { build } from "esbuild";
import { cpSync, mkdirSync, rmSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, "dist");
rmSync(dist, { recursive: true, force: true });
mkdirSync(join(dist, "ort"), { recursive: true });

await build({
  entryPoints: [join(root, "src", "main.js")],
  bundle: true,
  format: "esm",
  minify: true,
  sourcemap: false,
  target: ["chrome110", "firefox115", "safari16"],
  outfile: join(dist, "app.js"),
  logLevel: "warning",
});
cpSync(join(root, "static"), dist, { recursive: true });
const ort = join(root, "node_modules", "onnxruntime-web", "dist");
for (const file of ["ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs"]) {
  cpSync(join(ort, file), join(dist, "ort", file));
}
console.log(`built ${dist}`);
