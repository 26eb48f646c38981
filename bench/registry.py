"""Registry benchmark: what a head-only child costs on the wire and on disk, and how fast a
pull is against the OCI client a user would otherwise pick.

Run: ``.venv/bin/python bench/registry.py`` (``--repeats N``, default 5). Needs Debian's
``docker-registry`` and ``skopeo`` (``bash .ci/system-packages``). Everything runs on loopback
in temporary folders, in one run, and prints medians:

1. bytes sent pushing a head-only child of EfficientNet-Lite0 whose parent is already on the
   registry, against the parent's weights (target <= 5%);
2. bytes fetched pulling that child into a store that holds the parent (target <= 5%);
3. store growth for the child (the local store's bytes on disk, hard links counted once);
4. pull throughput of EfficientNet-Lite0 from the local distribution registry: ``graft pull``
   (into the store, verified, ready to load) vs ``skopeo copy docker://... oci:DIR`` of the
   same artifact (target >= 1.0x), the two taking turns going first, with the CPU time each
   client and the registry spent;
5. the per-blob round trip on loopback, the figure that decides whether small tensors need
   grouping into one blob;
6. what bounds a pull: the same layers fetched by a bare client (httpx, 8 threads, the bytes
   thrown away), and ``skopeo copy`` of a copy of the artifact whose tensors under 16 KB are
   one layer (what grouping would give a client that only checks digests).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))


def disk_bytes(root: Path) -> int:
    """Bytes of the files under ``root``, each inode once (the store hard-links trees)."""
    seen, total = set(), 0
    for folder, _, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def head_only_child(store, parent_handle: str):
    """EfficientNet-Lite0's backbone with a new 3-class head (what a head fine-tune exports)."""
    import torch

    import graft
    from graft.zoo import efficientnet

    parent = store.resolve(parent_handle)
    model = efficientnet.load_pretrained().eval()
    torch.manual_seed(0)
    model._fc = torch.nn.Linear(model._fc.in_features, 3)
    images = {"images": "float32[batch,3,224,224]"}
    example = (torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)),)
    return graft.save(model, "pets@1.0.0", store=store, parents=[(parent.handle, parent.digest)],
                      signatures={"classify": graft.Signature("classify", inputs=images,
                                                              outputs=["logits"],
                                                              example_inputs=example)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    skopeo = shutil.which("skopeo")
    if not Path("/usr/bin/docker-registry").exists() or skopeo is None:
        sys.exit("needs docker-registry and skopeo: bash .ci/system-packages")

    from graft.hub.oci import pull, push
    from graft.hub.oci.client import RegistryClient
    from graft.hub.store import Store
    from graft.zoo import import_module
    from tests.hub.oci.conftest import start_registry

    work = Path(tempfile.mkdtemp(prefix="graft-bench-registry-"))
    os.environ["GRAFT_HOME"] = str(work / "home")
    registry = start_registry(work / "registry")
    try:
        local = Store(work / "local")
        print("importing efficientnet-lite0 and saving a head-only child ...", flush=True)
        import_module("efficientnet-lite0", store=local)
        parent = local.resolve("efficientnet-lite0")
        head_only_child(local, parent.handle)
        manifest = parent.manifest()
        # the store's tree holds no weights file (tensors are blobs): sizes from the manifest
        weights = manifest.files["weights.safetensors"].size
        parent_bytes = manifest.size
        print(f"parent: {len(manifest.tensors)} tensors, weights {weights / 1e6:.2f} MB, "
              f"module {parent_bytes / 1e6:.2f} MB")

        pushed = push(parent.handle, registry.ref("zoo/efficientnet-lite0"), store=local)
        print(f"push parent: {pushed.bytes_sent / 1e6:.2f} MB sent, {pushed.uploaded} blobs")
        child = push("pets@1.0.0", registry.ref("team/pets"), store=local)
        print(f"1. push child, parent on the registry: {child.bytes_sent / 1e3:.1f} KB sent = "
              f"{100 * child.bytes_sent / weights:.2f}% of the parent's weights "
              f"({child.uploaded} uploaded, {child.mounted} mounted, {child.present} present) "
              f"[target <= 5%]")

        fresh = Store(work / "fresh")
        pull(pushed.reference, store=fresh)
        before = disk_bytes(fresh.root)
        with RegistryClient(registry.address) as client:
            pull(child.reference, store=fresh, client=client)
            fetched = client.bytes_received
        growth = disk_bytes(fresh.root) - before
        print(f"2. pull child, parent local: {fetched / 1e3:.1f} KB fetched = "
              f"{100 * fetched / weights:.2f}% of the parent's weights [target <= 5%]")
        print(f"3. store growth for the child: {growth / 1e6:.2f} MB = "
              f"{100 * growth / parent_bytes:.1f}% of the parent module [target <= 5%]")

        graft_times, skopeo_times = [], []
        cpu: dict[str, list[float]] = {"graft": [], "skopeo": [], "registry, graft": [],
                                       "registry, skopeo": []}

        def run_graft(i: int) -> None:
            target = Store(work / f"pull-{i}")
            before = _cpu(registry.process.pid)
            start = time.perf_counter()
            pull(pushed.reference, store=target, progress=False)
            graft_times.append(time.perf_counter() - start)
            _account(cpu, "graft", before, _cpu(registry.process.pid))

        def run_skopeo(i: int) -> None:
            before = _cpu(registry.process.pid)
            start = time.perf_counter()
            subprocess.run([skopeo, "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{registry.address}/zoo/efficientnet-lite0@"
                            f"{pushed.manifest_digest}", f"oci:{work / f'skopeo-{i}'}:net"],
                           check=True, capture_output=True)
            skopeo_times.append(time.perf_counter() - start)
            _account(cpu, "skopeo", before, _cpu(registry.process.pid))

        for i in range(args.repeats):
            # the clients take turns going first: neither always follows the other's deletes
            for run in (run_graft, run_skopeo) if i % 2 == 0 else (run_skopeo, run_graft):
                run(i)
            shutil.rmtree(work / f"pull-{i}")
            shutil.rmtree(work / f"skopeo-{i}")
        g, s = statistics.median(graft_times), statistics.median(skopeo_times)
        size = pushed_size(pushed, parent_bytes)
        # each repeat pulls with both clients back to back: its ratio sees the same machine
        paired = sorted(b / a for a, b in zip(graft_times, skopeo_times))
        print(f"4. pull efficientnet-lite0 ({size / 1e6:.1f} MB): graft {g * 1000:.0f} ms "
              f"({size / g / 1e6:.0f} MB/s), skopeo copy {s * 1000:.0f} ms "
              f"({size / s / 1e6:.0f} MB/s): {s / g:.2f}x [target >= 1.0x] "
              f"(medians of {args.repeats}); per repeat {statistics.median(paired):.2f}x "
              f"median, {paired[0]:.2f}x-{paired[-1]:.2f}x, faster in "
              f"{sum(r > 1 for r in paired)} of {len(paired)}")
        if all(cpu.values()):
            m = {k: statistics.median(v) * 1000 for k, v in cpu.items()}
            print(f"   CPU time per pull (medians): graft {m['graft']:.0f} ms with the registry "
                  f"{m['registry, graft']:.0f} ms; skopeo {m['skopeo']:.0f} ms with the "
                  f"registry {m['registry, skopeo']:.0f} ms (on {os.cpu_count()} cores)")

        with RegistryClient(registry.address) as client:
            digests = [d for d in manifest.tensors.values()]
            times = []
            for entry in digests:
                start = time.perf_counter()
                client.request("HEAD", f"/v2/zoo/efficientnet-lite0/blobs/sha256:{entry.sha256}",
                               scope="repository:zoo/efficientnet-lite0:pull")
                times.append(time.perf_counter() - start)
        small = sum(1 for t in manifest.tensors.values() if _nbytes(t) < 16384)
        rtt = statistics.median(times)
        print(f"5. per-blob round trip on loopback: {rtt * 1000:.2f} ms median; {small} of "
              f"{len(manifest.tensors)} tensors are under 16 KB, so one request each costs "
              f"about {small * rtt * 1000 / 8:.0f} ms per pull over 8 connections")
        bare, grouped, layers = _bounds(registry.address, pushed, args.repeats, work, skopeo)
        print(f"6. the same pull's bounds: a bare client fetching every layer and keeping "
              f"nothing {bare * 1000:.0f} ms; skopeo copy with the tensors under 16 KB as one "
              f"layer ({layers} layers) {grouped * 1000:.0f} ms (medians of {args.repeats})")
    finally:
        registry.stop()
        shutil.rmtree(work, ignore_errors=True)


def _bounds(address: str, pushed, repeats: int, work: Path, skopeo: str
            ) -> tuple[float, float, int]:
    """Median seconds of a bare fetch of every layer of ``pushed``, and of ``skopeo copy`` of
    a copy of it (repository ``bench/grouped``) whose small tensor layers are one blob."""
    import hashlib
    import json
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    repo = pushed.reference.removeprefix("oci://").partition("/")[2].partition("@")[0]
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}
    with httpx.Client(base_url=f"http://{address}", timeout=60) as http:
        body = http.get(f"/v2/{repo}/manifests/{pushed.manifest_digest}", headers=accept).json()
        layers = body["layers"]

        def fetch(digest: str) -> bytes:
            with http.stream("GET", f"/v2/{repo}/blobs/{digest}") as r:
                return b"".join(r.iter_raw())

        bare = []
        for _ in range(repeats):
            start = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                for _ in pool.map(lambda d: len(fetch(d)), [d["digest"] for d in layers]):
                    pass
            bare.append(time.perf_counter() - start)
        small = [d for d in layers if d["mediaType"].endswith("tensor.v1") and d["size"] < 16384]
        group = b"".join(fetch(d["digest"]) for d in small)
        digest = "sha256:" + hashlib.sha256(group).hexdigest()
        kept = [d for d in layers if d not in small]
        for d in [body["config"], *kept]:
            http.post("/v2/bench/grouped/blobs/uploads/",
                      params={"mount": d["digest"], "from": repo}).raise_for_status()
        location = http.post("/v2/bench/grouped/blobs/uploads/").headers["location"]
        http.put(location + ("&" if "?" in location else "?") + "digest=" + digest,
                 content=group).raise_for_status()
        grouped_body = {**body, "layers": [*kept, {"mediaType": "application/octet-stream",
                                                   "digest": digest, "size": len(group)}]}
        http.put("/v2/bench/grouped/manifests/1", content=json.dumps(grouped_body).encode(),
                 headers={"Content-Type": body["mediaType"]}).raise_for_status()
    times = []
    for i in range(repeats):
        layout = work / f"grouped-{i}"
        start = time.perf_counter()
        subprocess.run([skopeo, "copy", "--quiet", "--src-tls-verify=false",
                        f"docker://{address}/bench/grouped:1", f"oci:{layout}:net"], check=True,
                       capture_output=True)
        times.append(time.perf_counter() - start)
        shutil.rmtree(layout)
    return statistics.median(bare), statistics.median(times), len(grouped_body["layers"])


def _cpu(pid: int) -> tuple[float, float, float] | None:
    """CPU seconds so far of this process (all threads), of its waited-for children, and of
    the process ``pid`` (from /proc; None where there is none)."""
    import resource

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    ticks = os.sysconf("SC_CLK_TCK")
    return (own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime,
            (int(fields[11]) + int(fields[12])) / ticks)


def _account(cpu: dict[str, list[float]], who: str, before, after) -> None:
    """Record a contender's CPU time and the registry's while it pulled."""
    if before is None or after is None:
        return
    cpu[who].append(after[0] - before[0] if who == "graft" else after[1] - before[1])
    cpu[f"registry, {who}"].append(after[2] - before[2])


def pushed_size(pushed, fallback: int) -> int:
    """Bytes of the artifact's blobs (config + layers), from the registry's manifest."""
    import json

    import httpx

    ref = pushed.reference.removeprefix("oci://")
    host, _, rest = ref.partition("/")
    repo, _, digest = rest.partition("@")
    r = httpx.get(f"http://{host}/v2/{repo}/manifests/{digest}",
                  headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    if r.status_code != 200:
        return fallback
    body = json.loads(r.content)
    return body["config"]["size"] + sum(layer["size"] for layer in body["layers"])


def _nbytes(t) -> int:
    n = {"float32": 4, "int64": 8, "float16": 2}.get(t.dtype, 4)
    for d in t.shape:
        n *= d
    return n


if __name__ == "__main__":
    main()
