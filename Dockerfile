# ChatBridge container image: one static binary on a slim Debian.
#
#   docker build -t chatbridge .
#   docker run -p 8080:8080 -v chatbridge-data:/data -e CHATBRIDGE_LLM_API_KEY=sk-… chatbridge
#
# Configuration comes from CHATBRIDGE_* environment variables, or from a YAML file mounted at
# /data/chatbridge.yaml (read when present; the variables win). The SQLite database lives in the /data volume; set CHATBRIDGE_DATABASE_URL to a
# postgres:// URL to share one database between replicas.

ARG SWIFT_VERSION=6.3
FROM swift:${SWIFT_VERSION}-bookworm AS build
WORKDIR /build
# Dependencies first, so they are cached while only the sources change.
COPY Package.swift Package.resolved* ./
RUN swift package resolve
COPY Sources Sources
COPY Tests Tests
RUN swift build -c release --product chatbridge --static-swift-stdlib -Xlinker -s \
    && cp "$(swift build -c release --show-bin-path)/chatbridge" /chatbridge

FROM debian:bookworm-slim
# CA certificates for the model API and the platforms; curl for the health check; tzdata for bot.timezone.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl tzdata \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin chatbridge \
    && mkdir -p /data && chown chatbridge:chatbridge /data
COPY --from=build /chatbridge /usr/local/bin/chatbridge
USER chatbridge
WORKDIR /data
ENV CHATBRIDGE_SERVER_HOST=0.0.0.0 \
    CHATBRIDGE_SERVER_PORT=8080 \
    CHATBRIDGE_DATABASE_URL=sqlite:/data/chatbridge.sqlite \
    CHATBRIDGE_LOG_FORMAT=json
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
# SIGTERM drains: /readyz turns 503 and answers in flight finish (server.drain_timeout, 30s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["chatbridge"]
CMD ["serve"]
