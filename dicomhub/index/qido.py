"""QIDO-RS compiled to SQL: each filter becomes a condition on an indexed, pre-folded column."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from functools import cache

from sqlalchemy import ColumnElement, and_, exists, func, literal, select, true

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


def value_condition(column, flt: QueryFilter) -> ColumnElement[bool]:
    if flt.match == "wildcard":
        return column.like(like_pattern(flt.values[0]), escape="\\")
    if flt.match == "list":
        return column.in_(flt.values)
    if flt.match == "range":
        parts = []
        if flt.low:
            parts.append(column >= flt.low)
        if flt.high:
            parts.append(column <= flt.high)
        return and_(*parts)
    return column == flt.values[0]


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


def _condition(flt: QueryFilter, dialect: str, columns: dict = COLUMNS) -> ColumnElement[bool]:
    if flt.match == "universal":
        return true()
    if flt.tag == MODALITIES_IN_STUDY:
        # an alias: at series/instance level the outer query has ``series`` too, which must not be correlated
        other = series.alias("modality_series")
        return exists().where((other.c.study_key == study.c.study_key) & value_condition(other.c.modality, flt))
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
                    & name_word.c.word.like(like_pattern(word) + "%", escape="\\")
                    & _contains(dialect, current, literal(" ") + name_word.c.word + literal(" "))
                )
                for word in flt.values
            )
        )
    return value_condition(columns[flt.tag], flt)


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


def _extended_condition(flt: QueryFilter, owners: dict, number: int) -> ColumnElement[bool]:
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
                    select(word.c.resource_key).where(
                        (word.c.tag_key == tag_key) & word.c.word.like(like_pattern(w) + "%", escape="\\")
                    )
                )
                for w in flt.values
            )
        )
    # a join, not IN: planners then weigh the value index's statistics and start from it when it is selective
    # (one value row per tag and resource, so the join adds no rows)
    table = _value_alias(flt.extended.kind, number)
    if flt.extended.kind == "string":
        matches = value_condition(table.c.value, flt)
    else:
        matches = table.c.value == (int if flt.extended.kind == "long" else float)(flt.values[0])
    return (table.c.resource_key == owner) & (table.c.tag_key == tag_key) & matches


def search(index: Index, query: QidoQuery) -> list[QidoRow]:
    """Rows matching ``query``, newest first, one page."""
    columns = INSTANCE_LEVEL_COLUMNS if query.level == "instance" else COLUMNS
    conditions = [
        _extended_condition(f, EXTENDED_OWNERS[query.level], n) if f.extended else _condition(f, index.dialect, columns)
        for n, f in enumerate(query.filters)
    ]
    if query.level == "study":
        stmt = select(study.c.study_key, study.c.study_key.label("series_key"), study.c.watermark.label("wm"))
        stmt = stmt.where(study.c.partition_key == query.partition_key)
        order = study.c.watermark
        counts = (study.c.instance_count, study.c.series_count)
    elif query.level == "series":
        stmt = select(series.c.study_key, series.c.series_key, series.c.watermark.label("wm"))
        stmt = stmt.join(study, study.c.study_key == series.c.study_key).where(
            series.c.partition_key == query.partition_key
        )
        order = series.c.watermark
        counts = (series.c.instance_count,)
    else:
        stmt = select(instance.c.study_key, instance.c.series_key, instance.c.watermark.label("wm"))
        stmt = (
            stmt.join(series, series.c.series_key == instance.c.series_key)
            .join(study, study.c.study_key == instance.c.study_key)
            .where((instance.c.partition_key == query.partition_key) & (instance.c.status == INSTANCE_CREATED))
        )
        order = instance.c.watermark
        counts = ()
    stmt = (
        stmt.add_columns(instance_metadata.c.json, *counts)
        .outerjoin(instance_metadata, instance_metadata.c.watermark == order)
        .where(*conditions)
        .order_by(order.desc())
        .limit(query.limit)
        .offset(query.offset)
    )
    with index.read() as conn:
        rows = conn.execute(stmt).all()
    return [QidoRow(r[0], r[1] if query.level != "study" else None, r[2], r[3] or "{}", *r[4:]) for r in rows]


def study_modalities(index: Index, study_keys: Sequence[int]) -> dict[int, list[str]]:
    """study_key -> the modalities of its series, sorted (one read of their series rows, by the study key index)."""
    if not study_keys:
        return {}
    with index.read() as conn:
        rows = conn.execute(
            select(series.c.study_key, series.c.modality).where(series.c.study_key.in_(list(study_keys))).distinct()
        ).all()
    modalities: dict[int, list[str]] = defaultdict(list)
    for key, modality in rows:
        if modality:
            modalities[key].append(modality)
    return {key: sorted(values) for key, values in modalities.items()}


__all__ = ["COLUMNS", "MODALITIES_IN_STUDY", "search", "study_modalities"]
