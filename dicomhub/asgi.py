"""ASGI entry point for uvicorn: ``dicomhub.asgi:app`` (settings from the environment)."""

from dicomhub.app import create_app

app = create_app()
