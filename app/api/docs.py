"""The API's interactive documentation at /docs: Swagger UI, which the browser fetches from
cdn.jsdelivr.net at a pinned release, each file checked against its hash (Subresource
Integrity). Operators paste admin keys into this page: a file changed on the CDN is refused
by the browser, not run. The release is the npm package `swagger-ui-dist`, which
tests/e2e/package.json pins too, so the browser test checks these hashes against its files.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse

SWAGGER_UI = "5.35.0"
CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI}"
SCRIPT = (
    f"{CDN}/swagger-ui-bundle.js",
    "sha384-gjRm0bEPMeTmMh5jT2cHccIwCUZSTd8YC+j0d0sXw0MdGEfScduGpSyF3ZSSLkX9",
)
STYLESHEET = (
    f"{CDN}/swagger-ui.css",
    "sha384-WlYgdmXYOOBWL5apwjDEZwN+U3HmXSSu5R6V5aGxEcf7z+KuRNwBhoxKVN1i3D5I",
)
# The page runs no inline script (its start-up is /static/docs.js); Swagger UI sets inline
# styles, and calls the API ("Try it out") on this origin only.
CSP = (
    "default-src 'none'; script-src 'self' https://cdn.jsdelivr.net; "
    "style-src https://cdn.jsdelivr.net 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)

router = APIRouter(include_in_schema=False)


@router.get("/docs")
def docs(request: Request) -> HTMLResponse:
    title = escape(f"{request.app.title} - API")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<link rel="stylesheet" href="{STYLESHEET[0]}" integrity="{STYLESHEET[1]}" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SCRIPT[0]}" integrity="{SCRIPT[1]}" crossorigin="anonymous"></script>
<script src="/static/docs.js"></script>
</body>
</html>
"""
    return HTMLResponse(page, headers={"content-security-policy": CSP, "cache-control": "no-cache"})
