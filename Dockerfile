# The broker's image: `broker serve` by default, `broker agent ...` or any other
# `broker` command by argument. Multi-stage: the build stage installs the package
# into a virtual environment; the final stage is python-slim with that environment
# only (no compilers, no pip cache, no sources), run by an unprivileged user.
#
#   docker build -t compute-broker .
#   docker run -p 8000:8000 compute-broker                       # SQLite in /data
#   docker run -e BROKER_DATABASE_URL=postgresql://... compute-broker serve --no-migrate
#   docker run compute-broker agent --help
#
# deploy/kubernetes/ runs it as N replicas on PostgreSQL (docs/operators.md).

ARG PYTHON=3.11

FROM python:${PYTHON}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/broker
WORKDIR /src
# The dependencies first, in a layer of their own: a change to the code reuses it.
COPY pyproject.toml README.md ./
RUN mkdir broker && touch broker/__init__.py \
    && /opt/broker/bin/pip install . \
    && /opt/broker/bin/pip uninstall --yes compute-broker \
    && rm -rf broker
COPY broker broker
COPY adapters adapters
COPY solver solver
COPY web web
COPY migrations migrations
COPY benchmarks benchmarks
RUN /opt/broker/bin/pip install --no-deps . \
    && /opt/broker/bin/python -m compileall -q /opt/broker/lib

FROM python:${PYTHON}-slim
RUN groupadd --system --gid 10001 broker \
    && useradd --system --uid 10001 --gid broker --home-dir /data --create-home broker
COPY --from=build /opt/broker /opt/broker
ENV PATH=/opt/broker/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    BROKER_DATA_DIR=/data \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8000
USER 10001:10001
WORKDIR /data
EXPOSE 8000
ENTRYPOINT ["broker"]
CMD ["serve"]
