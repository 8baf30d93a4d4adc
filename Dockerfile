# Omnicue runtime image: one image for every role (worker, senders, topics, simulator).
#   docker build -t omnicue:dev .
#   docker run --rm omnicue:dev omnicue --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMNICUE_DATA_DIR=/data

# Every dependency ships a manylinux wheel for CPython 3.11, so no compiler is needed.
WORKDIR /src
COPY . .
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home --home-dir /data omnicue \
    && mkdir -p /data \
    && chown omnicue /data

# The worker keeps its RocksDB table state under /data (owned by the runtime user,
# so a fresh volume mounted there inherits that); compose gives each worker replica
# its own anonymous volume. No VOLUME here: senders and one-shot commands need none.
WORKDIR /data
USER omnicue

# Faust web server (worker /metrics) and sender /metrics.
EXPOSE 6066 6067

CMD ["omnicue", "worker"]
