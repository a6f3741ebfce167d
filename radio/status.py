"""Typed status records. Each owner builds its own (the engine, a station, a mount) as a dataclass, and declares
beside a field the Prometheus metric it exports, if any: ``/status`` shows the records as JSON, ``/metrics``
reads every exported field from them by its declaration (``exported_fields``), so a new counter is one line
in one place."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class Metric:
    name: str  # radio_<owner>_<what>
    doc: str
    counter: bool = False  # a total that only grows (else a gauge)
    label: str | None = None  # the field is a dict: one sample per key, under this label


def exported(name: str, doc: str, counter: bool = False, label: str | None = None) -> Any:
    """A status field that ``/metrics`` exports as ``name`` (a gauge, or a counter; a dict of counts with
    ``label``: one sample per key)."""
    return field(metadata={"metric": Metric(name, doc, counter, label)})


def exported_fields(record: type) -> list[tuple[str, Metric]]:
    """The fields of a status record that ``/metrics`` exports, with their metrics, in declaration order."""
    return [(f.name, f.metadata["metric"]) for f in fields(record) if "metric" in f.metadata]


class Record:
    """A status record's JSON form: its fields by name (shallow: values are JSON already)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
