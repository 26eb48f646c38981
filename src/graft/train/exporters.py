"""Exporters: publish the trained model as a hub module after evaluations, keep the last N.

``train_and_evaluate`` (or the sidecar evaluator) calls every exporter after each evaluation
with its metrics, as TensorFlow's ``EvalSpec(exporters=...)`` does:

* :class:`LatestExporter` exports after every evaluation;
* :class:`BestExporter` exports when a metric beats the best exported so far;
* :class:`FinalExporter` exports once, after the last evaluation.

An export is :meth:`graft.Estimator.export` into the local store (``graft.save``): a
code-free module whose ``parents`` name the hub modules the model was built from (its
lineage). Best and latest exports are versioned ``<version>+step<N>``; the final export is
``<version>``. An exporter keeps its newest ``keep`` exports and removes older ones from the
store. Its record (what it exported, the best value) lives in
``model_dir/exports/<name>.json``, so a resumed job continues it; only the chief writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping

from graft._fs import atomic_write
from graft.format.manifest import validate_version

__all__ = ["BestExporter", "Exporter", "FinalExporter", "LatestExporter"]


class Exporter:
    """Exports the model as module ``name`` into the store; subclasses decide when.

    Args:
        name: The module name in the store (give each exporter its own).
        version: The base version; exports are ``<version>+step<N>`` (the final one
            ``<version>``).
        keep: How many of this exporter's newest exports to keep in the store.
        signatures: As for :func:`graft.save`; None: ``forward`` only.
        store: A :class:`graft.Store`; None: the local store (``$GRAFT_HOME``).
        **save_options: Passed to :func:`graft.save` (``description``, ``license``,
            ``trainable``, ``assets``, ...).

    Raises:
        ValueError: a name, version or ``keep`` is invalid.
    """

    kind = "exporter"

    def __init__(self, name: str, *, version: str = "1.0.0", keep: int = 5,
                 signatures: Any = None, store: Any = None, **save_options: Any) -> None:
        from graft.hub.handles import parse_handle

        if not isinstance(name, str) or not name or "@" in name or "/" in name:
            raise ValueError(f"{type(self).__name__}: name must be a module name such as "
                             f"'digits-best'; got {name!r}")
        parse_handle(f"{name}@{version}")  # a clear error for a name the store refuses
        validate_version(version)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"{type(self).__name__}: keep must be an int >= 1 (exports to "
                             f"keep in the store); got {keep!r}")
        for reserved in ("name", "version", "store"):
            save_options.pop(reserved, None)
        self.name, self.version, self.keep = name, version, keep
        self.signatures, self.store, self.save_options = signatures, store, save_options
        self.state: dict[str, Any] = {"best": None, "exports": []}

    # -- what subclasses decide ---------------------------------------------------------------

    def wants(self, metrics: Mapping[str, Any], *, final: bool) -> bool:
        """Whether to export after this evaluation."""
        raise NotImplementedError

    def version_for(self, step: int, *, final: bool) -> str:
        return f"{self.version}+step{step}"

    # -- the export ---------------------------------------------------------------------------

    def load(self, model_dir: Path | None) -> None:
        """Continue the record a previous run of the job left in ``model_dir``."""
        path = self._path(model_dir)
        if path is not None and path.is_file():
            from graft.format.jsonio import loads

            found = loads(path.read_bytes(), what=str(path), max_bytes=1 << 20)
            if isinstance(found, dict) and isinstance(found.get("exports"), list):
                self.state = {"best": found.get("best"), "exports": found["exports"]}

    def maybe_export(self, estimator: Any, metrics: Mapping[str, Any], *,
                     final: bool) -> dict[str, Any] | None:
        """Export if :meth:`wants` says so; every worker calls this, the chief writes.

        Returns:
            ``{"exporter", "handle", "digest", "step", "metrics"}`` for a new export (on
            every worker), else None.
        """
        step = int(metrics.get("step", estimator.step))
        if any(e["step"] == step for e in self.state["exports"]):
            return None  # this step is exported already (a re-run, or the sidecar's last)
        if not self.wants(metrics, final=final):
            return None
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        handle = f"{self.name}@{self.version_for(step, final=final)}"
        if estimator.strategy.is_chief and any(e["handle"] == handle
                                               for e in self.state["exports"]):
            self._remove(handle)  # a final export of a job re-run to more steps replaces it
        saved = estimator.export(handle, signatures=self.signatures, store=self.store,
                                 metadata={"graft.train": {"step": step, "exporter": self.kind,
                                                           "metrics": scalars}},
                                 **self.save_options)
        # Every worker learns what the chief exported (and keeps the same record).
        digest = estimator.strategy.gather_states(saved.digest if saved else None)[0]
        record = {"exporter": self.kind, "handle": handle, "digest": digest, "step": step,
                  "metrics": scalars}
        self.state["exports"] = [e for e in self.state["exports"] if e["handle"] != handle]
        self.state["exports"].append(record)
        if estimator.strategy.is_chief:
            self._prune()
            path = self._path(estimator.model_dir)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, json.dumps(self.state, indent=1, sort_keys=True) + "\n")
        self.state["exports"] = self.state["exports"][-self.keep:]
        estimator.strategy.barrier()
        return record

    def _prune(self) -> None:
        old, self.state["exports"] = (self.state["exports"][:-self.keep],
                                      self.state["exports"][-self.keep:])
        for record in old:
            self._remove(record["handle"])

    def _remove(self, handle: str) -> None:
        from graft.errors import ModuleNotFound
        from graft.hub.store import Store

        store = self.store if self.store is not None else Store()
        try:
            store.remove(handle)
        except ModuleNotFound:
            pass  # removed by hand already

    def _path(self, model_dir: Path | None) -> Path | None:
        return None if model_dir is None else Path(model_dir) / "exports" / f"{self.name}.json"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, version={self.version!r}, keep={self.keep})"


class LatestExporter(Exporter):
    """Exports after every evaluation, keeping the newest ``keep`` exports."""

    kind = "latest"

    def wants(self, metrics: Mapping[str, Any], *, final: bool) -> bool:
        return True


class BestExporter(Exporter):
    """Exports when ``metric`` beats the best value exported so far.

    Args:
        name: The module name in the store.
        metric: An evaluation result key (``"loss"``, ``"accuracy"``, a custom metric).
        mode: ``"min"`` or ``"max"``; None: ``"max"`` for ``accuracy`` and ``top<k>``,
            ``"min"`` for anything else.
        **options: As for :class:`Exporter` (``version``, ``keep``, ...).
    """

    kind = "best"

    def __init__(self, name: str, *, metric: str = "loss",
                 mode: Literal["min", "max"] | None = None, **options: Any) -> None:
        super().__init__(name, **options)
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"BestExporter: metric must name an evaluation result such as "
                             f"'loss'; got {metric!r}")
        if mode is None:
            mode = "max" if metric == "accuracy" or metric.startswith("top") else "min"
        if mode not in ("min", "max"):
            raise ValueError(f"BestExporter: mode must be 'min' or 'max'; got {mode!r}")
        self.metric, self.mode = metric, mode

    def wants(self, metrics: Mapping[str, Any], *, final: bool) -> bool:
        value = metrics.get(self.metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            scalars = sorted(k for k, v in metrics.items() if isinstance(v, float))
            raise ValueError(f"BestExporter: metric {self.metric!r} is not an evaluation "
                             f"result; the evaluation reports {scalars}")
        best = self.state["best"]
        better = best is None or (value < best if self.mode == "min" else value > best)
        if better:
            self.state["best"] = float(value)
        return better


class FinalExporter(Exporter):
    """Exports once, after the last evaluation, as ``<name>@<version>``."""

    kind = "final"

    def wants(self, metrics: Mapping[str, Any], *, final: bool) -> bool:
        return final

    def version_for(self, step: int, *, final: bool) -> str:
        return self.version
