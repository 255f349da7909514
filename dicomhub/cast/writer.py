"""Applies one change-feed entry to the FHIR server: Patient, Endpoint, ImagingStudy and dose Observations.

Every step is idempotent (conditional creates, merges that leave what is already there), so an entry redone after a
crash or a transient failure changes nothing twice. Updates carry ``If-Match`` with the version read; on 412 the
resource is read again and the change made anew, never written over someone else's edit blindly.
"""

from __future__ import annotations

from collections.abc import Callable

from dicomhub.cast import mapping
from dicomhub.cast.fhir import FhirClient, FhirError, PreconditionFailed
from dicomhub.cast.mapping import EntryRejected, Problems, identifier_query, reference, uid_identifier
from dicomhub.cast.source import Entry

MAX_CONFLICTS = 5


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

    def apply(self, entry: Entry, base: str) -> list[str]:
        """Casts the entry; returns the reasons of attributes left out. Raises ``EntryRejected`` / ``FhirError``
        (skip the entry) or ``TransientError`` (try again later)."""
        if entry.action == "Delete":
            self._delete_instance(entry, base)
            return []
        if entry.state == "Deleted" or entry.metadata is None:
            return []  # the instance is gone by now: its Delete entry follows
        return self._upsert_instance(entry, entry.metadata, base)

    # -- create / update --------------------------------------------------------------------------------------------
    def _upsert_instance(self, entry: Entry, ds: dict, base: str) -> list[str]:
        identifier = mapping.patient_identifier(ds, self.patient_system, self.use_issuer)
        problems = Problems()

        def patient_of(current: dict | None) -> dict:
            problems.reasons.clear()  # built again after a conflict: report each problem once
            return mapping.patient_resource(current, identifier, ds, problems)

        patients = self._matching("Patient", identifier)
        patient = self._save(
            patients[0] if patients else None, patient_of, f"identifier={identifier_query(identifier)}"
        )
        patient_problems = list(problems.reasons)
        patient_ref = reference("Patient", patient["id"])
        endpoint_ref = reference("Endpoint", self._endpoint(base))
        study_condition = f"identifier={identifier_query(uid_identifier(entry.study_uid))}"

        def study_of(current: dict | None) -> dict:
            problems.reasons[:] = patient_problems
            return mapping.study_resource(current, ds, entry.study_uid, patient_ref, endpoint_ref, base, problems)

        study = self._save(self._study(entry.study_uid), study_of, study_condition)
        if self.observations:
            study_ref = reference("ImagingStudy", study["id"])
            for observation in mapping.dose_observations(ds, patient_ref, study_ref, entry.study_uid, entry.sop_uid):
                self._save_observation(observation)
        return list(problems.reasons)

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

    def _study(self, study_uid: str) -> dict | None:
        found = self._matching("ImagingStudy", uid_identifier(study_uid))
        return found[0] if found else None

    def _save(self, current: dict | None, build: Callable[[dict | None], dict], condition: str) -> dict:
        """Creates (conditionally) or updates the resource ``build`` makes from the current one; on a lost race
        (a conditional create finding one, or 412) ``build`` runs again on what the server holds now."""
        for _ in range(MAX_CONFLICTS):
            desired = build(current)
            if current is None:
                created, is_new = self.fhir.create(desired, if_none_exist=condition)
                if is_new:
                    return created
                current = created
                continue
            if _content(desired) == _content(current):
                return current
            try:
                return self.fhir.update(desired)
            except PreconditionFailed:
                current = self.fhir.read(current["resourceType"], current["id"])
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
        study = self._study(entry.study_uid)
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
                break
            try:
                self.fhir.update(reduced)
                break
            except PreconditionFailed:
                study = self.fhir.read("ImagingStudy", study["id"])
        else:
            raise FhirError(412, f"ImagingStudy {entry.study_uid}: changed by someone else {MAX_CONFLICTS} times")
        report = {"identifier": identifier_query(uid_identifier(entry.sop_uid))}
        for observation in self.fhir.search("Observation", report):
            self.fhir.delete("Observation", observation["id"])
