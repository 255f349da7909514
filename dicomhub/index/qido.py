"""QIDO-RS compiled to SQL: each filter becomes a condition on an indexed, pre-folded column.

A statement is built once per query shape (level, and each filter's attribute, kind of match and number of values)
and kept: its values, partition, limit and offset are bound parameters. Building a SQLAlchemy statement and its
cache key cost more than running the query on an index, and a viewer sends the same few shapes all day.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from functools import cache
from threading import Lock
from typing import Any

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    Select,
    and_,
    bindparam,
    exists,
    func,
    literal,
    literal_column,
    select,
    true,
)

from dicomhub.index.extended_tags import VALUE_TABLES
from dicomhub.index.records import QidoQuery, QidoRow, QueryFilter
from dicomhub.index.repository import Index
from dicomhub.index.schema import (
    INSTANCE_CREATED,
    NAME_PATIENT,
    NAME_REFERRING_PHYSICIAN,
    extended_name_word,
    instance,
    instance_metadata,
    name_word,
    series,
    study,
)

MODALITIES_IN_STUDY = 0x00080061

COLUMNS = {
    0x0020000D: study.c.study_uid,
    0x00100010: study.c.patient_name,
    0x00100020: study.c.patient_id,
    0x00100030: study.c.patient_birth_date,
    0x00080050: study.c.accession_number,
    0x00080090: study.c.referring_physician_name,
    0x00080020: study.c.study_date,
    0x00081030: study.c.study_description,
    0x0020000E: series.c.series_uid,
    0x00080060: series.c.modality,
    0x00400244: series.c.pps_start_date,
    0x00081090: series.c.manufacturer_model_name,
    0x00080018: instance.c.sop_uid,
}
NAME_ATTRIBUTES = {0x00100010: NAME_PATIENT, 0x00080090: NAME_REFERRING_PHYSICIAN}


def like_pattern(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%").replace("?", "_")


def filter_values(flt: QueryFilter) -> list[Any]:
    """The values a filter's condition compares with, in the order the condition uses them."""
    if flt.match == "universal":
        return []
    if flt.match == "fuzzy":
        return [like_pattern(word) + "%" for word in flt.values]
    if flt.match == "wildcard":
        return [like_pattern(flt.values[0])]
    if flt.match == "range":
        return [v for v in (flt.low, flt.high) if v]
    if flt.extended is not None and flt.extended.kind != "string":
        return [(int if flt.extended.kind == "long" else float)(flt.values[0])]
    return list(flt.values)


def value_condition(column, flt: QueryFilter, values: Sequence[Any] | None = None) -> ColumnElement[bool]:
    """``column`` against the filter's values (:func:`filter_values`, or bound parameters standing for them)."""
    values = filter_values(flt) if values is None else values
    if flt.match == "wildcard":
        return column.like(values[0], escape="\\")
    if flt.match == "list":
        return column.in_(values)
    if flt.match == "range":
        parts = []
        if flt.low:
            parts.append(column >= values[0])
        if flt.high:
            parts.append(column <= values[-1])
        return and_(*parts)
    return column == values[0]


def _words_of(column: ColumnElement[str]) -> ColumnElement[str]:
    """`` WORD1 WORD2 `` : a folded name column with its separators as spaces, padded, for whole-word lookups."""
    spaced = func.replace(func.replace(func.replace(column, "^", " "), "=", " "), ",", " ")
    return literal(" ") + spaced + literal(" ")


def _contains(dialect: str, haystack: ColumnElement[str], needle: ColumnElement[str]) -> ColumnElement[bool]:
    position = func.strpos(haystack, needle) if dialect == "postgresql" else func.instr(haystack, needle)
    return position > 0


# At instance level the study and series UIDs are matched on the instance row itself: its unique index (partition,
# study, series, SOP) then serves path-scoped searches, where joining from study and series lets planners that lack
# statistics scan every instance of the partition.
INSTANCE_LEVEL_COLUMNS = {**COLUMNS, 0x0020000D: instance.c.study_uid, 0x0020000E: instance.c.series_uid}
STUDY_UID = 0x0020000D


def _condition(flt: QueryFilter, values: Sequence[BindParameter], dialect: str, level: str) -> ColumnElement[bool]:
    if flt.match == "universal":
        return true()
    if level == "series" and flt.tag == STUDY_UID and flt.match == "exact":
        # the study's key, then its series by their (study_key, series_uid) index: planners otherwise tend to read
        # every series in watermark order and probe each one's study, which grows with the archive
        key = select(study.c.study_key).where(
            (study.c.partition_key == bindparam("q_partition")) & (study.c.study_uid == values[0])
        )
        return series.c.study_key == key.scalar_subquery()
    if flt.tag == MODALITIES_IN_STUDY:
        # an alias: at series/instance level the outer query has ``series`` too, which must not be correlated
        other = series.alias("modality_series")
        matches = value_condition(other.c.modality, flt, values)
        return exists().where((other.c.study_key == study.c.study_key) & matches)
    if flt.match == "fuzzy":
        attribute = NAME_ATTRIBUTES[flt.tag]
        # name_word rows are only ever added, so a study keeps the words of names it no longer has: each word
        # found must still be a whole word of the study's current (latest instance's) name
        current = _words_of(COLUMNS[flt.tag])
        return and_(
            *(
                exists().where(
                    (name_word.c.study_key == study.c.study_key)
                    & (name_word.c.attribute == attribute)
                    & name_word.c.word.like(word, escape="\\")
                    & _contains(dialect, current, literal(" ") + name_word.c.word + literal(" "))
                )
                for word in values
            )
        )
    columns = INSTANCE_LEVEL_COLUMNS if level == "instance" else COLUMNS
    return value_condition(columns[flt.tag], flt, values)


# The key an extended query tag's values are joined on, by query level and tag level.
EXTENDED_OWNERS = {
    "study": {"study": study.c.study_key},
    "series": {"study": series.c.study_key, "series": series.c.series_key},
    "instance": {"study": instance.c.study_key, "series": instance.c.series_key, "instance": instance.c.instance_key},
}


@cache
def _value_alias(kind: str, number: int):
    """The value table of the query's n-th extended filter, aliased once (building an alias costs more than the
    query)."""
    return VALUE_TABLES[kind].alias(f"extended_{kind}_{number}")


def _extended_condition(
    flt: QueryFilter, values: Sequence[BindParameter], owners: dict, number: int
) -> ColumnElement[bool]:
    """The value index (tag, value, key) joined on the owner's key; fuzzy names: ``key IN (matching words)``."""
    assert flt.extended is not None
    owner, tag_key = owners[flt.extended.level], flt.extended.tag_key
    if flt.match == "universal":
        return true()
    if flt.match == "fuzzy":
        word = extended_name_word
        return and_(
            *(
                owner.in_(
                    select(word.c.resource_key).where((word.c.tag_key == tag_key) & word.c.word.like(w, escape="\\"))
                )
                for w in values
            )
        )
    # a join, not IN: planners then weigh the value index's statistics and start from it when it is selective
    # (one value row per tag and resource, so the join adds no rows)
    table = _value_alias(flt.extended.kind, number)
    matches = (
        value_condition(table.c.value, flt, values) if flt.extended.kind == "string" else table.c.value == values[0]
    )
    return (table.c.resource_key == owner) & (table.c.tag_key == tag_key) & matches


def _shape(query: QidoQuery) -> tuple:
    """What the statement depends on besides its bound values."""
    return query.level, tuple(
        (f.tag, f.match, len(f.values), bool(f.low), bool(f.high), f.extended) for f in query.filters
    )


class _Statements:
    """Built statements by query shape, the least recently used dropped beyond ``size``."""

    def __init__(self, size: int = 512) -> None:
        self._size = size
        self._built: OrderedDict[tuple, Select] = OrderedDict()
        self._lock = Lock()

    def get(self, key: tuple, build) -> Select:
        with self._lock:
            stmt = self._built.get(key)
            if stmt is not None:
                self._built.move_to_end(key)
                return stmt
        stmt = build()
        with self._lock:
            self._built[key] = stmt
            if len(self._built) > self._size:
                self._built.popitem(last=False)
        return stmt


_STATEMENTS = _Statements()


# the modalities of a page of studies (by the series rows' study key index)
_MODALITIES = (
    select(series.c.study_key, series.c.modality)
    .where(series.c.study_key.in_(bindparam("keys", expanding=True)))
    .distinct()
)


def search(index: Index, query: QidoQuery, with_modalities: bool = False) -> tuple[list[QidoRow], dict[int, list[str]]]:
    """Rows matching ``query``, newest first, one page; with study rows, ``with_modalities`` also reads each
    study's modalities (study_key -> sorted modalities) in the same read transaction."""
    values = [filter_values(f) for f in query.filters]
    params: dict[str, Any] = {"q_partition": query.partition_key, "q_limit": query.limit, "q_offset": query.offset}
    for n, filter_value in enumerate(values):
        params.update((f"q{n}_{i}", value) for i, value in enumerate(filter_value))
    stmt = _STATEMENTS.get((index.dialect, *_shape(query)), lambda: _statement(query, values, index.dialect))
    with index.read() as conn:
        rows = conn.execute(stmt, params).all()
        keys = [r[0] for r in rows]
        modalities = conn.execute(_MODALITIES, {"keys": keys}).all() if with_modalities and keys else []
    found = [QidoRow(r[0], r[1] if query.level != "study" else None, r[2], r[3] or "{}", *r[4:]) for r in rows]
    by_study: dict[int, list[str]] = defaultdict(list)
    for key, modality in modalities:
        if modality:
            by_study[key].append(modality)
    return found, {key: sorted(values) for key, values in by_study.items()}


def _statement(query: QidoQuery, values: list[list[Any]], dialect: str) -> Select:
    conditions = []
    for n, (flt, filter_values_) in enumerate(zip(query.filters, values, strict=True)):
        binds = [bindparam(f"q{n}_{i}") for i in range(len(filter_values_))]
        if flt.extended:
            conditions.append(_extended_condition(flt, binds, EXTENDED_OWNERS[query.level], n))
        else:
            conditions.append(_condition(flt, binds, dialect, query.level))
    partition = bindparam("q_partition")
    if query.level == "study":
        stmt = select(study.c.study_key, study.c.study_key.label("series_key"), study.c.watermark.label("wm"))
        stmt = stmt.where(study.c.partition_key == partition)
        order = study.c.watermark
        counts = (study.c.instance_count, study.c.series_count)
    elif query.level == "series":
        stmt = select(series.c.study_key, series.c.series_key, series.c.watermark.label("wm"))
        stmt = stmt.join(study, study.c.study_key == series.c.study_key).where(series.c.partition_key == partition)
        order = series.c.watermark
        counts = (series.c.instance_count,)
    else:
        stmt = select(instance.c.study_key, instance.c.series_key, instance.c.watermark.label("wm"))
        stmt = (
            stmt.join(series, series.c.series_key == instance.c.series_key)
            .join(study, study.c.study_key == instance.c.study_key)
            .where((instance.c.partition_key == partition) & (instance.c.status == INSTANCE_CREATED))
        )
        order = instance.c.watermark
        counts = ()
    # the series of one study are few: sorting them beats reading every series in watermark order, which planners
    # without fresh statistics choose (an expression, not the column, keeps them off the watermark index)
    one_study = query.level == "series" and any(f.tag == STUDY_UID and f.match == "exact" for f in query.filters)
    page = (
        stmt.add_columns(*counts)
        .where(*conditions)
        .order_by((order + literal_column("0")).desc() if one_study else order.desc())
        .limit(bindparam("q_limit"))
        .offset(bindparam("q_offset"))
        .subquery("page")
    )
    # documents are joined to the page only: rows an offset skips never have theirs read
    keys = list(page.c)[:3]
    return (
        select(*keys, instance_metadata.c.json, *list(page.c)[3:])
        .select_from(page.outerjoin(instance_metadata, instance_metadata.c.watermark == page.c.wm))
        .order_by(page.c.wm.desc())
    )


__all__ = ["COLUMNS", "MODALITIES_IN_STUDY", "search"]
