FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 10001 newsletter && mkdir /data && chown newsletter /data
WORKDIR /srv
COPY pyproject.toml README.md ./
COPY app ./app
COPY alembic ./alembic
RUN pip install --editable . && python -c "import app.main"

USER newsletter
# The embedded defaults (SQLite, secret key, development mails) live under /data/var.
WORKDIR /data
VOLUME /data
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s --start-period=10s \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status != 200)"
CMD ["newsletter", "serve", "--host", "0.0.0.0", "--port", "8000"]
