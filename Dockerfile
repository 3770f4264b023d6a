# Production image of dreamgate: gateway, worker, beat, migrate and the Wiro simulator
# are all this one image with a different command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # service/cli.py finds alembic.ini, migrations/ and samples/ next to the service
    # package it was imported from, so import the copy in /app, not the one pip put in
    # site-packages.
    PYTHONPATH=/app

WORKDIR /app

RUN groupadd --system --gid 10001 dreamgate \
 && useradd --system --uid 10001 --gid dreamgate --home-dir /app --shell /usr/sbin/nologin dreamgate

# The package and its dependencies (no [embedded] or [dev] extras: compose provides
# PostgreSQL, Redis and S3). README.md is the package's readme, so the build needs it.
COPY pyproject.toml README.md ./
COPY service/ service/
COPY workers/ workers/
COPY wirosim/ wirosim/
RUN pip install . \
 && rm -rf build *.egg-info

COPY migrations/ migrations/
COPY alembic.ini ./
COPY samples/ samples/

USER dreamgate
EXPOSE 8000

CMD ["dreamgate", "serve", "--host", "0.0.0.0", "--port", "8000"]
