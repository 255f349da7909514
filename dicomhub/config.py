"""Settings from environment variables (``DICOMHUB_*``) or an optional ``.env`` file.

Every default is chosen for the embedded mode: SQLite index and files under ``DICOMHUB_DATA_DIR``.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PARTITION = "Microsoft.Default"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DICOMHUB_", env_file=".env", extra="ignore")

    data_dir: Path = Field(Path("./data"), description="Folder for the SQLite index and the DICOM files.")
    database_url: str | None = Field(
        None,
        description="SQLAlchemy URL of the index; default sqlite under data_dir. PostgreSQL: postgresql+psycopg://...",
    )
    enable_partitions: bool = Field(False, description="Serve every Studies route under /partitions/{name}/.")
    max_file_size: int = Field(
        2 * 1024**3, description="Largest DICOM file or multipart part accepted by STOW (bytes)."
    )
    max_transcode_size: int = Field(100 * 1024**2, description="Largest file that may be transcoded or parsed (bytes).")
    decode_slots: int = Field(
        2, description="Decodes/encodes of pixel data (transcode, render) that may run at once; others wait."
    )
    max_decoded_size: int = Field(
        512 * 1024**2, description="Largest decoded pixel data (rows x columns x samples x bytes x frames) handled."
    )
    max_sequence_depth: int = Field(
        32, description="Deepest nesting of sequences a stored file may have; a deeper one is refused (43264)."
    )
    thumbnail_size: int = Field(128, description="Thumbnails fit in this many pixels square unless viewport is given.")
    thumbnail_cache_size: int = Field(
        256 * 1024**2, description="Bytes of encoded thumbnails kept under data_dir/thumbnails (0: no cache)."
    )
    metadata_bulkdata: bool = Field(
        False,
        description="Metadata carries BulkDataURI for bulk values by default (else only when asked: bulkdata=uri); "
        "off keeps Azure's metadata, which leaves them out.",
    )
    bulkdata_uri_threshold: int = Field(
        1024, description="In metadata with bulk data, values longer than this (bytes) become BulkDataURI."
    )
    fsync: bool = Field(True, description="fsync files before acknowledging a store (durability).")
    blob_url: str | None = Field(
        None,
        description="Where DICOM files live: file:///path (default: data_dir/blobs), s3://bucket[/prefix] "
        "(AWS_* variables) or azure://container[/prefix] (AZURE_STORAGE_* variables).",
    )
    blob_allow_http: bool = Field(
        False, description="Allow plain http object-store endpoints off loopback (S3 endpoint, Azure blob endpoint)."
    )
    export_roots: str = Field(
        "", description="Comma-separated folders that filesystem export and import may use (none by default)."
    )
    cors_origins: str = Field("*", description="Comma-separated origins allowed by CORS; empty disables CORS.")
    gzip_min_size: int = Field(
        8192, description="JSON responses larger than this are gzipped when the client asks (smaller: not worth it)."
    )
    delete_delay_seconds: float = Field(
        60.0, description="How long files of deleted instances are kept, so retrieves already under way finish."
    )
    cleanup_interval_seconds: float = Field(5.0, description="How often the background cleanup runs.")
    stale_create_seconds: float = Field(600.0, description="Age after which an unfinished store is rolled back.")
    workers: int = Field(
        default_factory=lambda: min(os.cpu_count() or 1, 4), description="API worker processes of `dicomhub serve`."
    )
    run_operations: bool = Field(
        True, description="Run long-running operations (re-index, bulk update) inside the server processes."
    )
    operation_lease_seconds: float = Field(
        120.0, description="How long a worker holds an operation task before another may take it over."
    )
    operation_poll_seconds: float = Field(1.0, description="How often an idle operation worker looks for work.")
    max_extended_query_tags: int = Field(128, description="Most extended query tags that may exist at once.")
    reindex_batch_size: int = Field(
        1000, description="Instance watermarks per re-index task (the unit a crashed worker redoes)."
    )
    auth_enabled: bool = Field(
        False, description="Require OpenID Connect bearer tokens and check roles on every route."
    )
    auth_authority: str | None = Field(
        None, description="Token issuer URL; keys come from its /.well-known/openid-configuration jwks_uri."
    )
    auth_audience: str | None = Field(None, description="Accepted token audience; a comma list accepts any of them.")
    auth_roles_claim: str = Field(
        "roles", description="Claim holding the caller's role names (a dotted path reaches into objects)."
    )
    auth_clock_skew: float = Field(5.0, description="Seconds of leeway on the token's exp and nbf.")
    auth_keys_refetch_seconds: float = Field(
        30.0, description="Least time between two fetches of the issuer's keys (an unknown kid triggers one)."
    )
    roles_file: Path | None = Field(
        None, description="Roles in Azure's roles.json shape (dataActions, notDataActions); replaces the built-in ones."
    )
    metrics_require_auth: bool = Field(False, description="With auth on, /metrics needs a valid token too.")
    audit_log: str | None = Field(
        None, description="Audit log destination: a file path, or '-' for stdout; no audit when unset."
    )
    dimse_enabled: bool = Field(False, description="Run the DIMSE listener inside `dicomhub serve` (bound once).")
    dimse_host: str = Field("127.0.0.1", description="Address the DIMSE listener binds.")
    dimse_port: int = Field(11112, description="TCP port of the DIMSE listener.")
    dimse_aet: str = Field("DICOMHUB", description="The archive's DIMSE AE title.")
    dimse_peers: Path | None = Field(
        None, description="JSON file of known DIMSE peers: {AET: {host, port, partition, operations}}."
    )
    dimse_accept_any: bool | None = Field(
        None, description="Accept associations from unknown AE titles (default partition); default: true unless auth."
    )
    dimse_tls_cert: Path | None = Field(None, description="PEM certificate: DIMSE over TLS when set with the key.")
    dimse_tls_key: Path | None = Field(None, description="PEM private key of the DIMSE TLS certificate.")
    dimse_tls_ca: Path | None = Field(None, description="PEM CA bundle: DIMSE TLS callers need a cert it signed.")
    dimse_max_associations: int = Field(16, description="DIMSE associations served at once (one thread each).")
    dimse_idle_timeout: float = Field(60.0, description="Seconds an association may stay silent before it is aborted.")
    dimse_commitment_delay: float = Field(
        0.0, description="Seconds the DIMSE listener waits before it sends a storage commitment report."
    )
    cast_enabled: bool = Field(False, description="Run DICOMcast (change feed -> FHIR) inside `dicomhub serve`.")
    cast_fhir_url: str | None = Field(None, description="DICOMcast: base URL of the FHIR R4 server.")
    cast_dicomweb_url: str | None = Field(
        None,
        description="DICOMcast: the archive's public versioned base URL, written into Endpoint.address and "
        "ImagingStudy.meta.source (default: the server's own URL, http://{host}:{port}/v2).",
    )
    cast_patient_system: str = Field("", description="DICOMcast: system of the Patient identifier (PatientID).")
    cast_use_issuer: bool = Field(
        False, description="DICOMcast: take the Patient identifier system from IssuerOfPatientID instead."
    )
    cast_poll_seconds: float = Field(5.0, description="DICOMcast: how often an idle cast reads the change feed.")
    cast_observations: bool = Field(True, description="DICOMcast: write Observations from radiation dose SRs.")
    cast_lease_seconds: float = Field(
        30.0, description="DICOMcast: how long a runner holds the cast before another process may take it over."
    )
    cast_state_file: Path | None = Field(
        None, description="DICOMcast following a remote archive: its state file (default data_dir/cast-state.json)."
    )
    cast_fhir_timeout_seconds: float = Field(
        30.0, gt=0, description="DICOMcast: how long one FHIR request may take before it is retried."
    )
    cast_fhir_token_url: str | None = Field(None, description="DICOMcast: OAuth2 token URL for the FHIR server.")
    cast_fhir_client_id: str | None = Field(None, description="DICOMcast: OAuth2 client id for the FHIR server.")
    cast_fhir_client_secret: str | None = Field(None, description="DICOMcast: OAuth2 secret for the FHIR server.")
    cast_fhir_scope: str | None = Field(None, description="DICOMcast: OAuth2 scope for the FHIR server.")
    cast_dicomweb_token_url: str | None = Field(None, description="DICOMcast: OAuth2 token URL for the archive.")
    cast_dicomweb_client_id: str | None = Field(None, description="DICOMcast: OAuth2 client id for the archive.")
    cast_dicomweb_client_secret: str | None = Field(None, description="DICOMcast: OAuth2 secret for the archive.")
    cast_dicomweb_scope: str | None = Field(None, description="DICOMcast: OAuth2 scope (or resource) for the archive.")
    log_level: str = Field("info", description="Log level: debug, info, warning, error.")
    log_json: bool = Field(True, description="Write logs as JSON lines.")

    @cached_property
    def index_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.db').resolve()}"

    @property
    def dimse_accepts_any_caller(self) -> bool:
        """Unknown AE titles are accepted unless said otherwise, or unless the HTTP side requires tokens."""
        return self.dimse_accept_any if self.dimse_accept_any is not None else not self.auth_enabled

    @cached_property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"
