"""Code that runs on an instance. Never imports the server, FastAPI or SQLAlchemy: it must start fast."""
