# Production image of dreamgate: gateway, worker, beat, migrate and the Wiro simulator
# are all this one image with a different command. It installs the wheel (migrations,
# samples and the client inside), pinned by constraints.txt.

FROM python:3.11-slim AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/constraints.txt
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /dist .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 dreamgate \
 && useradd --system --uid 10001 --gid dreamgate --home-dir /app --create-home \
      --shell /usr/sbin/nologin dreamgate

# No [embedded] or [dev] extras: compose provides PostgreSQL, Redis and S3.
COPY constraints.txt /tmp/constraints.txt
COPY --from=wheel /dist/ /tmp/dist/
RUN pip install --constraint /tmp/constraints.txt /tmp/dist/dreamgate-*.whl \
 && rm -rf /tmp/dist /tmp/constraints.txt

USER dreamgate
WORKDIR /app
EXPOSE 8000

# The gateway's liveness (the default command). Workers, beat and one-shot commands have
# no HTTP port: docker-compose.yml turns this off for them.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]

CMD ["dreamgate", "serve", "--host", "0.0.0.0", "--port", "8000"]
