# auth-service: built in a Rust image, run in a slim Debian one as an unprivileged user.
# Build context: the repository root (see deploy/docker-compose.yml).
FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p auth-service --bin auth-service

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home ferrybox
COPY --from=build /src/target/release/auth-service /usr/local/bin/auth-service
USER ferrybox
EXPOSE 8082
ENTRYPOINT ["/usr/local/bin/auth-service"]
CMD ["serve"]
