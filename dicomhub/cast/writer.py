"""Applies change-feed entries to the FHIR server: Patient, Endpoint, ImagingStudy and dose Observations; a run
of entries of one study is written at once (one update of its ImagingStudy instead of one per instance).

Every step is idempotent (conditional creates, merges that leave what is already there), so an entry redone after a
crash or a transient failure changes nothing twice. Updates carry ``If-Match`` with the version read; on 412 the
resource is read again and the change made anew, never written over someone else's edit blindly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from dicomhub.cast import mapping
from dicomhub.cast.fhir import FhirClient, FhirError, PreconditionFailed
from dicomhub.cast.mapping import EntryRejected, Problems, identifier_query, reference, uid_identifier
from dicomhub.cast.source import Entry

MAX_CONFLICTS = 5
MAX_BATCH = 50  # entries cast together at most: bounds the work a crash or a failure makes redo
KNOWN_RESOURCES = 10_000  # Patients and ImagingStudies remembered as last written (most recent first)


def _content(resource: dict | None) -> dict | None:
    """A resource without the server's bookkeeping, to tell whether an update would change anything."""
    if resource is None:
        return None
    meta = {k: v for k, v in (resource.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")}
    body = {k: v for k, v in resource.items() if k not in ("meta", "id")}
    return {**body, "meta": meta} if meta else body


class FhirWriter:
    def __init__(self, fhir: FhirClient, patient_system: str, use_issuer: bool, observations: bool) -> None:
        self.fhir = fhir
        self.patient_system = patient_system
        self.use_issuer = use_issuer
        self.observations = observations
        self._endpoints: dict[str, str] = {}
        # search condition -> the resource as last read or written: an entry of a study already seen needs no
        # search, and its update's If-Match tells whether someone changed the resource since (412: read again)
        self._known: OrderedDict[str, dict] = OrderedDict()

    def batches(self, entries: list[Entry]) -> Iterator[list[Entry]]:
        """The entries in order, up to ``MAX_BATCH`` consecutive creates and updates of one study and patient
        together: such a run (the instances of one STOW, typically) is cast with one write of its Patient and
        ImagingStudy."""
        batch: list[Entry] = []
        for entry in entries:
            if (
                0 < len(batch) < MAX_BATCH
                and self._joinable(batch[-1])
                and self._joinable(entry)
                and self._same_study(batch[-1], entry)
            ):
                batch.append(entry)
                continue
            if batch:
                yield batch
            batch = [entry]
        if batch:
            yield batch

    @staticmethod
    def _joinable(entry: Entry) -> bool:
        return entry.action != "Delete" and entry.state != "Deleted" and entry.metadata is not None

    def _same_study(self, a: Entry, b: Entry) -> bool:
        if (a.partition_name, a.study_uid) != (b.partition_name, b.study_uid):
            return False
        try:
            patient = mapping.patient_identifier(a.metadata, self.patient_system, self.use_issuer)
            return patient == mapping.patient_identifier(b.metadata, self.patient_system, self.use_issuer)
        except EntryRejected:
            return False

    def apply(self, batch: list[Entry], base: str) -> list[list[str]]:
        """Casts a batch of ``batches``; returns each entry's reasons of attributes left out. Raises
        ``EntryRejected`` / ``FhirError`` (skip the entry) or ``TransientError`` (try again later)."""
        if len(batch) == 1 and not self._joinable(batch[0]):
            if batch[0].action == "Delete":
                self._delete_instance(batch[0], base)
            return [[]]  # a Create of an instance gone by now: its Delete entry follows
        return self._upsert_instances(batch, base)

    # -- create / update --------------------------------------------------------------------------------------------
    def _upsert_instances(self, batch: list[Entry], base: str) -> list[list[str]]:
        study_uid = batch[0].study_uid
        datasets = [entry.metadata for entry in batch]
        identifier = mapping.patient_identifier(datasets[0], self.patient_system, self.use_issuer)
        problems = [Problems() for _ in batch]

        def patient_of(current: dict | None) -> dict:
            for ds, found in zip(datasets, problems, strict=True):
                found.reasons.clear()  # built again after a conflict: report each problem once
                current = mapping.patient_resource(current, identifier, ds, found)
            return current

        patient = self._save(self._find("Patient", identifier), patient_of, self._condition(identifier))
        patient_problems = [list(found.reasons) for found in problems]
        patient_ref = reference("Patient", patient["id"])
        endpoint_ref = reference("Endpoint", self._endpoint(base))

        def study_of(current: dict | None) -> dict:
            for ds, found, before in zip(datasets, problems, patient_problems, strict=True):
                found.reasons[:] = before
                current = mapping.study_resource(current, ds, study_uid, patient_ref, endpoint_ref, base, found)
            return current

        study_identifier = uid_identifier(study_uid)
        study = self._save(self._find("ImagingStudy", study_identifier), study_of, self._condition(study_identifier))
        if self.observations:
            study_ref = reference("ImagingStudy", study["id"])
            for entry in batch:
                for observation in mapping.dose_observations(
                    entry.metadata, patient_ref, study_ref, study_uid, entry.sop_uid
                ):
                    self._save_observation(observation)
        return [list(found.reasons) for found in problems]

    def _save_observation(self, observation: dict) -> None:
        first = observation["identifier"][0]
        condition = f"identifier={identifier_query(first)}"
        if observation["code"]["coding"][0] == mapping.DOSE_SUMMARY_CODE:  # shares the study identifier: add the code
            report = observation["identifier"][1]
            summary = mapping.DOSE_SUMMARY_CODE
            condition = f"identifier={identifier_query(report)}&code={summary['system']}|{summary['code']}"
        found = self.fhir.search("Observation", dict(p.split("=", 1) for p in condition.split("&")))
        keep = lambda current: {**(current or {}), **observation}  # noqa: E731 - our fields, the server's id/meta
        self._save(found[0] if found else None, keep, condition)

    def _matching(self, resource_type: str, identifier: dict) -> list[dict]:
        """Resources carrying exactly this identifier (a value searched without system matches any system)."""
        found = self.fhir.search(resource_type, {"identifier": identifier_query(identifier)})
        exact = [
            r
            for r in found
            if any(
                i.get("value") == identifier["value"] and i.get("system") == identifier.get("system")
                for i in r.get("identifier", [])
            )
        ]
        if len(exact) > 1:
            raise EntryRejected(
                f"{len(exact)} {resource_type} resources have the identifier {identifier_query(identifier)}"
            )
        return exact

    @staticmethod
    def _condition(identifier: dict) -> str:
        return f"identifier={identifier_query(identifier)}"

    def _find(self, resource_type: str, identifier: dict) -> dict | None:
        """The resource with this identifier: as last seen, else searched for."""
        known = self._known.get(self._condition(identifier))
        if known is not None and known["resourceType"] == resource_type:
            return known
        found = self._matching(resource_type, identifier)
        return found[0] if found else None

    def _remember(self, condition: str, resource: dict | None) -> None:
        if resource is None:
            self._known.pop(condition, None)
            return
        self._known[condition] = resource
        self._known.move_to_end(condition)
        while len(self._known) > KNOWN_RESOURCES:
            self._known.popitem(last=False)

    def _save(self, current: dict | None, build: Callable[[dict | None], dict], condition: str) -> dict:
        """Creates (conditionally) or updates the resource ``build`` makes from the current one; on a lost race
        (a conditional create finding one, or 412) ``build`` runs again on what the server holds now."""
        for _ in range(MAX_CONFLICTS):
            desired = build(current)
            if current is None:
                created, is_new = self.fhir.create(desired, if_none_exist=condition)
                if is_new:
                    self._remember(condition, created)
                    return created
                current = created
                continue
            if _content(desired) == _content(current):
                self._remember(condition, current)
                return current
            try:
                saved = self.fhir.update(desired)
            except PreconditionFailed:
                current = self.fhir.read(current["resourceType"], current["id"])
            except FhirError as exc:
                if exc.status not in (404, 410):
                    raise
                current = None  # deleted meanwhile: created again
            else:
                self._remember(condition, saved)
                return saved
            self._remember(condition, current)
        raise FhirError(412, f"{condition}: changed by someone else {MAX_CONFLICTS} times in a row")

    def _endpoint(self, address: str) -> str:
        """The id of the Endpoint of this archive (partition) base URL, found by name, else created."""
        if address in self._endpoints:
            return self._endpoints[address]
        wanted = mapping.endpoint_resource(address)
        found = [
            e
            for e in self.fhir.search("Endpoint", {"name": wanted["name"]})
            if e.get("name") == wanted["name"]
            and (e.get("connectionType") or {}).get("code") == mapping.CONNECTION_TYPE["code"]
        ]
        if found and found[0].get("address") != address:
            raise EntryRejected(f"the Endpoint named {wanted['name']!r} has the address {found[0].get('address')!r}")
        endpoint = found[0] if found else self.fhir.create(wanted)[0]
        self._endpoints[address] = endpoint["id"]
        return endpoint["id"]

    # -- delete -----------------------------------------------------------------------------------------------------
    def _delete_instance(self, entry: Entry, base: str) -> None:
        """Removes the instance (and its emptied series) from the ImagingStudy; an emptied study of ours is
        deleted with its Observations. The report's Observations go with a deleted dose SR."""
        condition = self._condition(uid_identifier(entry.study_uid))
        study = self._find("ImagingStudy", uid_identifier(entry.study_uid))
        for _ in range(MAX_CONFLICTS):
            if study is None:
                break
            reduced = mapping.without_instance(study, entry.series_uid, entry.sop_uid)
            if reduced is None:
                break
            if not reduced.get("series") and (study.get("meta") or {}).get("source") == base:
                for observation in self.fhir.search("Observation", {"part-of": f"ImagingStudy/{study['id']}"}):
                    self.fhir.delete("Observation", observation["id"])
                self.fhir.delete("ImagingStudy", study["id"])
                self._remember(condition, None)
                break
            try:
                self._remember(condition, self.fhir.update(reduced))
                break
            except PreconditionFailed:
                study = self.fhir.read("ImagingStudy", study["id"])
            except FhirError as exc:
                if exc.status not in (404, 410):
                    raise
                study = None
            self._remember(condition, study)
        else:
            raise FhirError(412, f"ImagingStudy {entry.study_uid}: changed by someone else {MAX_CONFLICTS} times")
        report = {"identifier": identifier_query(uid_identifier(entry.sop_uid))}
        for observation in self.fhir.search("Observation", report):
            self.fhir.delete("Observation", observation["id"])
