"""``GET /``: a small page for a person who opens the server in a browser (the API itself lives under /v{n})."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import HTMLResponse

from dicomhub import __version__
from dicomhub.api.openapi import answer

router = APIRouter(tags=["Service"])

PAGE = f"""<!doctype html>
<html lang="en">
<head><meta charset="utf-8"><title>dicomhub {__version__}</title></head>
<body>
<h1>dicomhub {__version__}</h1>
<p>A DICOMweb archive (STOW-RS, WADO-RS, QIDO-RS) with the API of the Azure DICOM service, under
<code>/v2/</code> (and <code>/v1/</code>): for example <code>/v2/studies</code> with
<code>Accept: application/dicom+json</code>.</p>
<ul>
<li><a href="/docs">API documentation</a></li>
<li><a href="/openapi.json">OpenAPI document</a></li>
<li><a href="/health/check">Health check</a></li>
</ul>
</body>
</html>
"""


PAGE_DOC = {
    "summary": "A page naming the service and its version, with links to the API documentation",
    "response_class": HTMLResponse,
    "responses": {200: answer("The page.", {"text/html": {"schema": {"type": "string"}}})},
}


@router.get("/", **PAGE_DOC)
@router.head("/", **PAGE_DOC)
async def home() -> HTMLResponse:
    return HTMLResponse(PAGE)
