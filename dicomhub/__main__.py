from dicomhub.cli import app

app()
