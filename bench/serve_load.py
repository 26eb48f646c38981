"""Load on `graft serve`: 32 concurrent clients pulling and pushing on loopback, and the same
pull workload against the CNCF distribution registry (Debian's docker-registry), in one run.

A pull is what a client does to fetch an artifact: GET the manifest by tag, then GET every
blob it names (here 1 config + 16 layers of 64 KiB, about the size of a small module's
tensor blobs). A push uploads one new 64 KiB blob (monolithic POST) and PUTs a manifest
naming it under a fresh tag. Phases, each --seconds long with --clients threads:

1. graft serve, mixed: each client does 3 pulls, then 1 push, over and over;
2. graft serve, pulls only;
3. distribution, pulls only (the same artifact, pushed there first).

Every response is checked (status, and each blob's bytes against its digest); the run fails
if any request errors. Reported: operations, errors, p50/p99 latency per operation, and
throughput (operations/s and MB/s).

    .venv/bin/python bench/serve_load.py [--seconds 30] [--clients 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import quantiles

import httpx

REPO = Path(__file__).resolve().parents[1]
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
LAYERS, LAYER_BYTES = 16, 64 << 10


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):  # bounded: both servers bind within seconds
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode}")
        try:
            httpx.get(url + "/v2/", timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not start")


def _sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _manifest(config: bytes, layers: list[bytes]) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST, "artifactType": "application/vnd.bench",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": _sha(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/octet-stream", "digest": _sha(b),
                    "size": len(b)} for b in layers]}).encode()


def _push(client: httpx.Client, repo: str, tag: str, config: bytes, layers: list[bytes]) -> int:
    sent = 0
    for blob in [config, *layers]:
        r = client.post(f"/v2/{repo}/blobs/uploads/", params={"digest": _sha(blob)},
                        content=blob)
        if r.status_code == 202:  # distribution: monolithic POST is a session; finish it
            location = r.headers["location"]
            location += ("&" if "?" in location else "?") + "digest=" + _sha(blob)
            r = client.put(location, content=blob)
        if r.status_code != 201:
            raise RuntimeError(f"blob push answered {r.status_code}: {r.text[:200]}")
        sent += len(blob)
    data = _manifest(config, layers)
    r = client.put(f"/v2/{repo}/manifests/{tag}", content=data,
                   headers={"Content-Type": MANIFEST})
    if r.status_code != 201:
        raise RuntimeError(f"manifest push answered {r.status_code}: {r.text[:200]}")
    return sent + len(data)


def _pull(client: httpx.Client, repo: str, tag: str) -> int:
    r = client.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST})
    if r.status_code != 200:
        raise RuntimeError(f"manifest pull answered {r.status_code}")
    body = r.json()
    got = len(r.content)
    for d in [body["config"], *body["layers"]]:
        b = client.get(f"/v2/{repo}/blobs/{d['digest']}")
        if b.status_code != 200 or _sha(b.content) != d["digest"]:
            raise RuntimeError(f"blob {d['digest']} answered {b.status_code} or mismatched")
        got += len(b.content)
    return got


def _phase(name: str, base: str, token: str | None, repo: str, seconds: float, clients: int,
           push_every: int | None) -> dict[str, object]:
    lat: dict[str, list[float]] = {"pull": [], "push": []}
    moved = [0]
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    start = threading.Barrier(clients)

    def worker(index: int) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        with httpx.Client(base_url=base, headers=headers, timeout=60.0) as client:
            start.wait()
            n = 0
            while time.perf_counter() < deadline:
                n += 1
                kind = "push" if push_every and n % (push_every + 1) == 0 else "pull"
                began = time.perf_counter()
                try:
                    if kind == "pull":
                        size = _pull(client, repo, "v1")
                    else:
                        layer = os.urandom(LAYER_BYTES)
                        size = _push(client, repo, f"p{index}-{n}", b"{}", [layer])
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    with lock:
                        errors.append(f"{kind}: {exc}")
                    continue
                with lock:
                    lat[kind].append(time.perf_counter() - began)
                    moved[0] += size

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - began
    row: dict[str, object] = {"phase": name, "errors": len(errors), "seconds": wall,
                              "MB/s": moved[0] / wall / 1e6}
    for kind, values in lat.items():
        if values:
            cuts = quantiles(values, n=100)
            row[kind] = (len(values), len(values) / wall, cuts[49] * 1000, cuts[98] * 1000)
    if errors:
        row["first_error"] = errors[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()
    registry_bin = shutil.which("docker-registry")
    if registry_bin is None:
        raise SystemExit("docker-registry is not installed (.ci/system-packages)")
    work = Path(tempfile.mkdtemp(prefix="graft-serve-bench-"))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        root = work / "graft"
        token = subprocess.run([sys.executable, "-m", "graft.cli", "serve", "token", "create",
                                "--root", str(root), "--namespace", "bench"], env=env,
                               capture_output=True, text=True, check=True
                               ).stdout.strip().splitlines()[-1]
        graft_port, dist_port = _port(), _port()
        log = open(work / "graft.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "graft.cli", "serve", "--root",
                                       str(root), "--port", str(graft_port)], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        (work / "dist.yml").write_text(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {work / 'dist'}\n"
            f"http:\n  addr: 127.0.0.1:{dist_port}\n")
        procs.append(subprocess.Popen([registry_bin, "serve", str(work / "dist.yml")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        graft_url, dist_url = f"http://127.0.0.1:{graft_port}", f"http://127.0.0.1:{dist_port}"
        _wait(graft_url, procs[0])
        _wait(dist_url, procs[1])
        layers = [os.urandom(LAYER_BYTES) for _ in range(LAYERS)]
        with httpx.Client(base_url=graft_url, timeout=60,
                          headers={"Authorization": f"Bearer {token}"}) as c:
            _push(c, "bench/model", "v1", b"{}", layers)
        with httpx.Client(base_url=dist_url, timeout=60) as c:
            _push(c, "bench/model", "v1", b"{}", layers)
        rows = [
            _phase("graft serve: pull+push", graft_url, token, "bench/model", args.seconds,
                   args.clients, push_every=3),
            _phase("graft serve: pull", graft_url, token, "bench/model", args.seconds,
                   args.clients, None),
            _phase("distribution: pull", dist_url, None, "bench/model", args.seconds,
                   args.clients, None),
        ]
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.clients} clients, {args.seconds:g} s per phase, loopback; a pull = manifest "
          f"+ {LAYERS + 1} blobs ({LAYERS} x {LAYER_BYTES >> 10} KiB)")
    print(f"{'phase':26} {'op':5} {'count':>7} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'MB/s':>7} {'errors':>6}")
    for row in rows:
        for kind in ("pull", "push"):
            if kind in row:
                count, rate, p50, p99 = row[kind]  # type: ignore[misc]
                print(f"{row['phase']:26} {kind:5} {count:7d} {rate:8.1f} {p50:8.1f} "
                      f"{p99:8.1f} {row['MB/s']:7.1f} {row['errors']:6d}")
    graft_pull = rows[1]["pull"][1]  # type: ignore[index]
    dist_pull = rows[2]["pull"][1]  # type: ignore[index]
    print(f"pull throughput, graft serve / distribution: {graft_pull / dist_pull:.2f}x")
    failed = [r for r in rows if r["errors"]]
    if failed:
        raise SystemExit(f"errors: {[(r['phase'], r['errors'], r.get('first_error')) for r in failed]}")


if __name__ == "__main__":
    main()
