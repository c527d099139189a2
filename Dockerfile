# Multi-stage build: compile in the Rust image, run from a small Debian base
# as a non-root user.
#
# Docker 25+ blocks io_uring in its default seccomp profile. yatagarasu then
# falls back to epoll by itself (and logs `driver=epoll`). To use io_uring,
# run with the profile shipped here, which allows the three io_uring syscalls:
#   docker run --security-opt seccomp=deploy/seccomp-io-uring.json ...
# (an allow-list of the syscalls yatagarasu uses, io_uring included).
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY loadtest ./loadtest
RUN cargo build --release --locked --bin yatagarasu

FROM debian:bookworm-slim
# ca-certificates: the system roots TLS to S3, R2 and other providers checks against.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home yatagarasu \
 && mkdir -p /etc/yatagarasu
COPY --from=build /src/target/release/yatagarasu /usr/local/bin/yatagarasu
COPY config/ha-tutorial.yaml /etc/yatagarasu/config.yaml
USER yatagarasu
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD ["/usr/local/bin/yatagarasu", "--probe", "127.0.0.1:8080"]
ENTRYPOINT ["/usr/local/bin/yatagarasu"]
CMD ["--config", "/etc/yatagarasu/config.yaml"]
